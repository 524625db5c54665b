//! A real OCI registry for the tests: Debian's `docker-registry`
//! (distribution 2.8) on 127.0.0.1, with its own config, storage and an
//! access log (one line per HTTP request), started by the test and killed
//! when it drops. Images are generated here and pushed with a few lines of
//! HTTP (the registry API's monolithic upload), so no engine is needed to
//! fill it.
//!
//! Hosts ([`super::Host`]) have network namespaces of their own: each gets
//! a forwarder ([`Registry::serve_in`]) listening on 127.0.0.1 at the
//! registry's port inside the host, so the same image reference works on
//! every host and on the machine.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{sha256_hex, Host, LayerSpec};

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A `docker-registry` process and the forwarders into hosts.
pub struct Registry {
    pub dir: PathBuf,
    pub port: u16,
    child: Child,
    forwarders: Mutex<Vec<Forwarder>>,
}

/// One image ready to push: gzip'd layer blobs, config, manifest.
pub struct RegistryImage {
    /// The gzip'd layer blobs, bottom first.
    pub layers: Vec<Vec<u8>>,
    /// The uncompressed tars' digests (`sha256:...`), bottom first.
    pub diff_ids: Vec<String>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl RegistryImage {
    /// An image of `tars` (each gzip'd, as registries usually serve
    /// layers: the blob digests then differ from the diff ids) with the
    /// image config's `config` section `run_config` (Cmd, Entrypoint...).
    pub fn new(tars: &[Vec<u8>], run_config: serde_json::Value) -> RegistryImage {
        let layers: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
        let diff_ids: Vec<String> = tars.iter().map(|t| format!("sha256:{}", sha256_hex(t))).collect();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
            "config": run_config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config = serde_json::to_vec(&config).unwrap();
        let desc = |media: &str, data: &[u8]| serde_json::json!({"mediaType": media, "digest": digest(data), "size": data.len()});
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": desc("application/vnd.oci.image.config.v1+json", &config),
            "layers": layers.iter().map(|l| desc("application/vnd.oci.image.layer.v1.tar+gzip", l)).collect::<Vec<_>>(),
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        RegistryImage { layers, diff_ids, config, manifest }
    }

    /// The layer blobs' digests, bottom first.
    pub fn layer_digests(&self) -> Vec<String> {
        self.layers.iter().map(|l| digest(l)).collect()
    }

    pub fn config_digest(&self) -> String {
        digest(&self.config)
    }

    pub fn manifest_digest(&self) -> String {
        digest(&self.manifest)
    }

    /// The OCI chain ids of the layers, bottom first: the names the store
    /// publishes them under.
    pub fn chain_ids(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for d in &self.diff_ids {
            let next = match out.last() {
                None => d.clone(),
                Some(prev) => format!("sha256:{}", sha256_hex(format!("{prev} {d}").as_bytes())),
            };
            out.push(next);
        }
        out
    }

    /// Bytes of all layer blobs.
    pub fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|l| l.len() as u64).sum()
    }
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    fs::File::open("/dev/urandom").unwrap().read_exact(&mut b).unwrap();
    b
}

/// `n` layers of `mib` MiB each of random data: a large file, 1 MiB files
/// and small files of assorted sizes and modes.
pub fn data_layers(n: usize, mib: usize) -> Vec<LayerSpec> {
    (0..n)
        .map(|i| {
            let dir = format!("data/l{i}");
            let mut files = Vec::new();
            let big = mib / 2;
            files.push((format!("{dir}/big"), random_bytes(big << 20), 0o644, 0, 0));
            let mut left = (mib - big) << 20;
            let mut k = 0;
            while left > 0 {
                let size = if k % 4 == 0 { 1 << 20 } else { [300, 4096, 70_000][k % 3] }.min(left);
                let mode = if k % 5 == 0 { 0o755 } else { 0o640 };
                files.push((format!("{dir}/f{k}"), random_bytes(size), mode, (k % 3) as u64 * 1000, 0));
                left -= size;
                k += 1;
            }
            LayerSpec {
                dirs: vec![("data".into(), 0o755), (dir.clone(), 0o750)],
                files,
                symlinks: vec![(format!("{dir}/link"), "big".into())],
                ..Default::default()
            }
        })
        .collect()
}

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// `gzip -1 -n` of `data` (deterministic: no name, no time).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .args(["-1", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip (this test needs it)");
    let mut stdin = child.stdin.take().unwrap();
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&owned));
    let mut out = Vec::new();
    child.stdout.take().unwrap().read_to_end(&mut out).unwrap();
    writer.join().unwrap().expect("writing to gzip");
    assert!(child.wait().unwrap().success(), "gzip failed");
    out
}

/// A response: status, headers (lower-case names), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on its own connection (`Connection: close`).
fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("registry on port {port}: {e}"));
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let mut body = Vec::new();
    r.read_to_end(&mut body).unwrap();
    Response { status, headers, body }
}

impl Registry {
    /// Starts a registry with its files in `dir` (config.yml, data/,
    /// access.log, registry.log) on a free port of 127.0.0.1 and waits
    /// until it answers.
    pub fn start(dir: &Path) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "this test needs {REGISTRY_BIN} (Debian's docker-registry package; scripts/install-deps installs it)"
        );
        fs::create_dir_all(dir.join("data")).unwrap();
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = format!(
            "version: 0.1\nlog:\n  level: warn\n  formatter: text\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
             \x20 maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: sharedloop-test\n",
            data = dir.join("data").display()
        );
        fs::write(dir.join("config.yml"), cfg).unwrap();
        // The access log is written to stdout, the rest to stderr.
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join("access.log")).unwrap())
            .stderr(fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("docker-registry");
        let mut reg = Registry { dir: dir.to_owned(), port, child, forwarders: Mutex::new(Vec::new()) };
        let t = Instant::now();
        loop {
            if let Some(s) = reg.child.try_wait().unwrap() {
                panic!(
                    "docker-registry exited ({s}): {}",
                    fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() && http(port, "GET", "/v2/", &[], b"").status == 200 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "docker-registry did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }

    /// `127.0.0.1:<port>`, the registry part of image references.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Uploads one blob (skipped when the registry has it).
    pub fn push_blob(&self, repo: &str, data: &[u8]) {
        let d = digest(data);
        if http(self.port, "HEAD", &format!("/v2/{repo}/blobs/{d}"), &[], b"").status == 200 {
            return;
        }
        let r = http(self.port, "POST", &format!("/v2/{repo}/blobs/uploads/"), &[], b"");
        assert_eq!(r.status, 202, "start of upload: {}", String::from_utf8_lossy(&r.body));
        let loc = r.header("location").expect("upload location").to_owned();
        let path = match loc.find("/v2/") {
            Some(i) => loc[i..].to_owned(),
            None => panic!("upload location {loc}"),
        };
        let sep = if path.contains('?') { '&' } else { '?' };
        let r = http(
            self.port,
            "PUT",
            &format!("{path}{sep}digest={d}"),
            &[("Content-Type", "application/octet-stream")],
            data,
        );
        assert_eq!(r.status, 201, "upload of {d}: {}", String::from_utf8_lossy(&r.body));
    }

    /// Pushes `image` as `<repo>:<tag>`; returns the reference
    /// (`127.0.0.1:<port>/<repo>:<tag>`).
    pub fn push(&self, repo: &str, tag: &str, image: &RegistryImage) -> String {
        for l in &image.layers {
            self.push_blob(repo, l);
        }
        self.push_blob(repo, &image.config);
        let r = http(
            self.port,
            "PUT",
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
            &image.manifest,
        );
        assert_eq!(r.status, 201, "manifest of {repo}:{tag}: {}", String::from_utf8_lossy(&r.body));
        format!("{}/{repo}:{tag}", self.addr())
    }

    /// The access log: one line per request, in the combined log format
    /// (`... "GET /v2/<repo>/blobs/<digest> HTTP/1.1" 200 <bytes> ...`).
    pub fn access_log(&self) -> String {
        fs::read_to_string(self.dir.join("access.log")).unwrap_or_default()
    }

    /// How many requests of `method` for `path_suffix` (e.g.
    /// `/blobs/sha256:...`) the access log has from byte `from` on.
    pub fn requests(&self, from: usize, method: &str, path_suffix: &str) -> usize {
        let log = self.access_log();
        let want = format!("\"{method} ");
        log.get(from..)
            .unwrap_or("")
            .lines()
            .filter(|l| {
                l.split_once(&want)
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|p| p.split('?').next().unwrap_or("").ends_with(path_suffix))
            })
            .count()
    }

    /// GETs of any of the `digests`' blobs from byte `from` of the log on.
    pub fn blob_gets(&self, from: usize, digests: &[String]) -> usize {
        digests.iter().map(|d| self.requests(from, "GET", &format!("/blobs/{d}"))).sum()
    }

    /// Waits until the access log stops growing: the registry writes a
    /// request's line after its response, which the client may have read
    /// already.
    pub fn settle(&self) {
        let mut last = self.log_mark();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.log_mark();
            if now == last {
                return;
            }
            last = now;
        }
    }

    /// The access log's length now, to count only later requests.
    pub fn log_mark(&self) -> usize {
        self.access_log().len()
    }

    /// Makes the registry reachable at the same address inside `host`
    /// (its own network namespace): a forwarder listens on 127.0.0.1 at
    /// the registry's port there and connects each connection to the
    /// registry here. It stops when the registry drops.
    pub fn serve_in(&self, host: &Host) {
        let f = Forwarder::start(&netns_of(host), self.port, self.port);
        self.forwarders.lock().unwrap().push(f);
    }

    /// A containerd registry hosts directory (`config_path`) saying the
    /// registry speaks plain HTTP: `<dir>/<addr>/hosts.toml`.
    pub fn hosts_dir(&self, dir: &Path) -> PathBuf {
        let d = dir.join(self.addr());
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{a}\"\n\n[host.\"http://{a}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                a = self.addr()
            ),
        )
        .unwrap();
        dir.to_owned()
    }

    /// Times, `n` times over, the requests no pull of `repo:tag` can do
    /// without, made from inside `host` (through its forwarder) as
    /// containerd makes them: HEAD of the manifest by tag (resolve), GET of
    /// the manifest by digest, GET of the config blob. Seconds of each
    /// round of three.
    pub fn round_trips(&self, host: &Host, repo: &str, tag: &str, image: &RegistryImage, n: usize) -> Vec<f64> {
        let (ns, port) = (netns_of(host), self.port);
        let paths = [
            ("HEAD", format!("/v2/{repo}/manifests/{tag}")),
            ("GET", format!("/v2/{repo}/manifests/{}", image.manifest_digest())),
            ("GET", format!("/v2/{repo}/blobs/{}", image.config_digest())),
        ];
        std::thread::spawn(move || {
            let f = fs::File::open(&ns).unwrap();
            rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .expect("setns into the host's network namespace");
            let accept = [("Accept", "application/vnd.oci.image.manifest.v1+json")];
            (0..n)
                .map(|_| {
                    let t = Instant::now();
                    for (method, path) in &paths {
                        let r = http(port, method, path, &accept, b"");
                        assert_eq!(r.status, 200, "{method} {path}");
                    }
                    t.elapsed().as_secs_f64()
                })
                .collect()
        })
        .join()
        .unwrap()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

/// The network namespace of `host` (`/proc/<its init>/ns/net`).
pub fn netns_of(host: &Host) -> PathBuf {
    // inside("/") is /proc/<init>/root/.
    let root = host.inside(Path::new("/"));
    root.parent().expect("/proc/<pid>").join("ns/net")
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.forwarders.lock().unwrap().clear();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder: a listener made inside another network namespace
/// (by a thread that enters it just for the `bind`: network namespaces
/// are per thread, and a socket keeps the namespace it was made in),
/// connecting each client to 127.0.0.1:`to` here.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on 127.0.0.1:`port` in the network namespace `netns` (a
    /// path like /proc/PID/ns/net).
    pub fn start(netns: &Path, port: u16, to: u16) -> Forwarder {
        let ns = netns.to_owned();
        let listener = std::thread::spawn(move || {
            let f = fs::File::open(&ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
            rustix::thread::move_into_link_name_space(f.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
                .expect("setns into the host's network namespace");
            TcpListener::bind(("127.0.0.1", port))
        })
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("forwarder: bind 127.0.0.1:{port} in {}: {e}", netns.display()));
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        // Spawned from this (the machine's namespace) thread: connections
        // to the registry are made here. poll(2) wakes it at once for a
        // client, and every 50 ms to look at the stop flag.
        let accept = std::thread::spawn(move || {
            let tick = rustix::event::Timespec { tv_sec: 0, tv_nsec: 50_000_000 };
            while !st.load(Ordering::Relaxed) {
                let mut fds = [rustix::event::PollFd::new(&listener, rustix::event::PollFlags::IN)];
                if !matches!(rustix::event::poll(&mut fds, Some(&tick)), Ok(n) if n > 0) {
                    continue;
                }
                if let Ok((client, _)) = listener.accept() {
                    std::thread::spawn(move || {
                        if let Ok(up) = TcpStream::connect(("127.0.0.1", to)) {
                            pipe(client, up);
                        }
                    });
                }
            }
        });
        Forwarder { stop, accept: Some(accept) }
    }
}

/// Copies both ways until either side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let t = std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
        let _ = b2.shutdown(std::net::Shutdown::Write);
    });
    let (mut a1, mut b1) = (a, b);
    let _ = std::io::copy(&mut b1, &mut a1);
    let _ = a1.shutdown(std::net::Shutdown::Write);
    let _ = t.join();
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
