//! Docker engines of the engine matrix, on a simulated [`Host`] whose
//! sharedloop stores its layers in a given (shared) root:
//!
//! - Docker 20.10 (the machine's) through the graphdriver plugin
//!   (`dockerd --experimental -s sharedloop`);
//! - Docker 28+ (sid's, from `scripts/fetch-engines`) with the containerd
//!   image store (`"features": {"containerd-snapshotter": true}`) on the
//!   host's containerd 2.x, whose proxy snapshotter "sharedloop" is also
//!   dockerd's storage driver (`-s sharedloop`).
//!
//! [`DockerHost`] runs each engine's own CLI (28's with its buildx plugin)
//! and knows what each engine leaves to collect after `docker rmi`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::engines::{suite_tree, Engine, ModernDocker};
use super::snap_client::SnapClient;
use super::*;

/// A Docker engine and the way it reaches sharedloop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerEngine {
    /// The machine's Docker 20.10, through the graphdriver plugin.
    Plugin20,
    /// sid's Docker 28+ with the containerd image store, on containerd 2.x
    /// with sharedloop as its snapshotter.
    ContainerdStore28,
}

/// The containerd namespace dockerd keeps its images, containers and
/// build cache in.
pub const MOBY_NAMESPACE: &str = "moby";

/// A host running one Docker engine on sharedloop.
pub struct DockerHost {
    pub host: Host,
    pub engine: DockerEngine,
    /// The engine's CLI.
    cli: PathBuf,
    /// DOCKER_CONFIG for the CLI (Docker 28: buildx in its cli-plugins).
    config_dir: Option<PathBuf>,
}

impl std::ops::Deref for DockerHost {
    type Target = Host;
    fn deref(&self) -> &Host {
        &self.host
    }
}

impl DockerHost {
    /// A new host `name` running `engine`, its sharedloop storing layers in
    /// `root` (and falling back to the host's own directory).
    pub fn start(name: &str, engine: DockerEngine, root: &Path) -> DockerHost {
        require(&["runc", "mkfs.ext4", "busybox", "overlay"]);
        fs::create_dir_all(root).unwrap();
        match engine {
            DockerEngine::Plugin20 => {
                require(&["dockerd"]);
                let mut host = Host::new(name);
                host.start_plugin();
                host.start_dockerd(&[
                    format!("sharedloop.loopback_root={}", root.display()),
                    format!("sharedloop.loopback_fallback={}", host.fallback_dir().display()),
                ]);
                let status = host.driver_status();
                assert!(status.starts_with("sharedloop\n"), "dockerd 20.10 is not on the plugin: {status}");
                DockerHost { host, engine, cli: DOCKER.into(), config_dir: None }
            }
            DockerEngine::ContainerdStore28 => {
                let sid = suite_tree("sid");
                let mut host = Host::new(name);
                let md = ModernDocker::get(host.dir.join("docker-config"));
                let buildx = md.config_dir.join("cli-plugins/docker-buildx");
                for bin in [&md.dockerd, &md.docker, &buildx] {
                    assert!(
                        bin.exists(),
                        "{} is missing: run scripts/fetch-engines --refresh (as root)",
                        bin.display()
                    );
                }
                host.start_snapshotter(root);
                host.start_containerd_engine(Engine::Containerd2, None);
                fs::write(host.daemon_json(), "{\"features\": {\"containerd-snapshotter\": true}}\n").unwrap();
                let args: Vec<String> = vec![
                    format!("--config-file={}", host.daemon_json().display()),
                    format!("--containerd={CONTAINERD_SOCKET}"),
                    // With the containerd image store, the storage driver
                    // names containerd's snapshotter.
                    "--storage-driver=sharedloop".into(),
                    format!("--data-root={}", host.data_root().display()),
                    // Inside the host's own /run (a tmpfs).
                    "--exec-root=/run/docker28".into(),
                    format!("--pidfile={}", host.dir.join("docker.pid").display()),
                    format!("--host=unix://{}", host.socket().display()),
                    "--iptables=false".into(),
                    "--ip6tables=false".into(),
                ];
                // sid's docker-proxy and docker-init beside its dockerd,
                // then containerd 2.x's shims, then the machine's runc.
                let path = format!("{}:{}", sid.join("usr/sbin").display(), Engine::Containerd2.path_env());
                if let Err(e) = host.spawn_dockerd(&md.dockerd, &args, &[("PATH", &path)]) {
                    panic!(
                        "{e}\n--- sharedloop log (tail) ---\n{}\n--- containerd log (tail) ---\n{}",
                        tail(&host.plugin_log(), 30),
                        tail(&host.containerd_log(), 30)
                    );
                }
                let h = DockerHost { host, engine, cli: md.docker, config_dir: Some(md.config_dir) };
                let info = h.docker_ok(&["info", "--format", "{{.Driver}} {{json .DriverStatus}}"]);
                assert!(
                    info.starts_with("sharedloop ") && info.contains("io.containerd.snapshotter.v1"),
                    "dockerd 28 does not store images in containerd's snapshotter sharedloop: {info}"
                );
                h
            }
        }
    }

    /// The engine's version, for the test's log.
    pub fn version(&self) -> String {
        let v = |side: &str| self.docker_ok(&["version", "--format", &format!("{{{{.{side}.Version}}}}")]);
        format!("dockerd {} (CLI {})", v("Server").trim(), v("Client").trim())
    }

    /// The engine's CLI aimed at this host's dockerd.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(&self.cli);
        c.env_remove("DOCKER_HOST").env_remove("DOCKER_CONTEXT");
        match &self.config_dir {
            // BuildKit, Docker 28's default builder, through buildx.
            Some(d) => c.env("DOCKER_CONFIG", d).env_remove("DOCKER_BUILDKIT"),
            // Docker 20.10's classic builder goes through the driver.
            None => c.env("DOCKER_BUILDKIT", "0"),
        };
        c.arg("-H").arg(format!("unix://{}", self.socket().display()));
        c
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        run(self.cli().args(args))
    }

    /// A docker command that must succeed; returns stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "{}: docker {args:?} failed:\n{}\n--- sharedloop log (tail) ---\n{}\n--- dockerd log (tail) ---\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.plugin_log(), 40),
            tail(&self.dockerd_log(), 20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// [`Self::docker_ok`] with stdin from a file.
    pub fn docker_stdin(&self, args: &[&str], input: &Path) -> String {
        run_ok(self.cli().args(args).stdin(fs::File::open(input).unwrap()))
    }

    /// The manifest of `image` ([`MANIFEST_SCRIPT`]) from inside a
    /// container of it, without the paths Docker adds.
    pub fn manifest(&self, image: &str) -> Vec<String> {
        filter_manifest(&self.docker_ok(&manifest_run_args(image)))
    }

    /// Builds `ctx` as `tag` with the engine's default builder for this
    /// test: BuildKit on Docker 28, the classic builder on 20.10.
    pub fn build(&self, tag: &str, ctx: &Path) {
        let mut c = self.cli();
        c.arg("build");
        if self.engine == DockerEngine::ContainerdStore28 {
            c.arg("--progress=plain");
        }
        let out = run(c.args(["-t", tag]).arg(ctx));
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "{}: docker build failed:\n{log}\n--- sharedloop log (tail) ---\n{}\n--- dockerd log (tail) ---\n{}",
            self.name,
            tail(&self.plugin_log(), 40),
            tail(&self.dockerd_log(), 20)
        );
        if self.engine == DockerEngine::ContainerdStore28 {
            assert!(log.contains("exporting to image"), "not built by BuildKit:\n{log}");
        }
    }

    /// The diff ids of `image`'s layers, bottom first.
    pub fn diff_ids(&self, image: &str) -> Vec<String> {
        serde_json::from_str(&self.docker_ok(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", image])).unwrap()
    }

    /// The lower directories of the overlay a container of `image` runs
    /// on, as the container's own mount table shows its `/`.
    pub fn rootfs_lowers(&self, image: &str) -> Vec<String> {
        let mi = self.docker_ok(&["run", "--rm", "--network", "none", image, "cat", "/proc/self/mountinfo"]);
        let root = mi
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .unwrap_or_else(|| panic!("no / in the container's mountinfo:\n{mi}"));
        let (_, fs_part) = root.split_once(" - ").unwrap();
        let mut f = fs_part.split_whitespace();
        assert_eq!(f.next(), Some("overlay"), "the container's / is no overlay: {root}");
        let opts = f.nth(1).unwrap_or("");
        let mut lowers = Vec::new();
        for o in opts.split(',') {
            if let Some(l) = o.strip_prefix("lowerdir=") {
                lowers.extend(l.split(':').map(str::to_owned));
            } else if let Some(l) = o.strip_prefix("lowerdir+=") {
                lowers.push(l.to_owned());
            }
        }
        lowers
    }

    /// `ctr` in dockerd's containerd namespace (Docker 28 only).
    pub fn ctr_moby(&self, args: &[&str]) -> String {
        let out = run(self
            .cmd(self.host.engine.bin("ctr"))
            .args(["--address", CONTAINERD_SOCKET, "--namespace", MOBY_NAMESPACE])
            .args(args)
            .env("CONTAINERD_SNAPSHOTTER", "sharedloop"));
        assert!(
            out.status.success(),
            "{}: ctr {args:?} failed: {}\n--- containerd log (tail) ---\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr),
            tail(&self.containerd_log(), 20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The snapshots dockerd's namespace holds in sharedloop (Docker 28).
    pub fn moby_snapshots(&self) -> Vec<String> {
        self.ctr_moby(&["snapshots", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// Lets the engine drop what nothing references any more, and waits
    /// for it: on Docker 28 a synchronous run of containerd's garbage
    /// collector (deleting a lease with --sync), which removes the
    /// snapshots of deleted images and containers from sharedloop. Docker
    /// 20.10 removes layers through the plugin as it goes.
    pub fn collect_garbage(&self) {
        if self.engine == DockerEngine::ContainerdStore28 {
            let id = format!(
                "sharedloop-test-gc-{}",
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
            );
            self.ctr_moby(&["leases", "create", "--id", &id]);
            self.ctr_moby(&["leases", "delete", "--sync", &id]);
        }
    }

    /// Removes every container, `images`, the build cache and whatever
    /// else holds layers, then collects the garbage.
    pub fn remove_everything(&self, images: &[&str]) {
        for c in self.docker_ok(&["ps", "-aq"]).split_whitespace() {
            self.docker_ok(&["rm", "-f", c]);
        }
        for img in images {
            self.docker_ok(&["rmi", img]);
        }
        self.docker_ok(&["builder", "prune", "-af"]);
        self.docker_ok(&["image", "prune", "-af"]);
        let left = self.docker_ok(&["image", "ls", "-aq"]);
        assert!(left.trim().is_empty(), "{}: images left: {left}", self.name);
        self.collect_garbage();
    }

    /// Mounts of sharedloop's on this host: layer mounts, the
    /// snapshotter's areas, the plugin's home (but its own `tmp`), and any
    /// overlay stacked on layer mounts (a container's root).
    pub fn sharedloop_mounts(&self) -> Vec<String> {
        let sr = self.snapshotter_root();
        let home = self.data_root().join("sharedloop");
        let areas = [sr.join("rwmnt"), sr.join("merged"), sr.join("mnt"), PathBuf::from(LAYER_MOUNTS), home.clone()];
        self.mountinfo()
            .lines()
            .filter(|l| {
                let mp = Path::new(l.split_whitespace().nth(4).unwrap_or(""));
                let ours = areas.iter().any(|a| mp.starts_with(a) && mp != a) && mp != home.join("tmp");
                let on_layers = l
                    .split_once(" - ")
                    .is_some_and(|(_, fs)| fs.starts_with("overlay ") && fs.contains(&format!("{LAYER_MOUNTS}/")));
                ours || on_layers
            })
            .map(str::to_owned)
            .collect()
    }

    /// Layer mounts on this host.
    pub fn layer_mounts(&self) -> Vec<String> {
        self.mounts_under(Path::new(LAYER_MOUNTS))
    }

    /// After [`Self::remove_everything`]: sharedloop holds nothing for
    /// this host: no snapshot (Docker 28: none in dockerd's namespace, none
    /// in sharedloop's records) or writable layer (20.10), no mount, no
    /// loop device on the host's own files. Waits a bounded time for
    /// removals that finish in the background.
    pub fn assert_holds_nothing(&self) {
        let t = Instant::now();
        match self.engine {
            DockerEngine::ContainerdStore28 => {
                while !self.moby_snapshots().is_empty() {
                    assert!(
                        t.elapsed() < Duration::from_secs(60),
                        "{}: snapshots left in containerd: {:?}",
                        self.name,
                        self.moby_snapshots()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                    self.collect_garbage();
                }
                let mut c = SnapClient::connect(&self.inside(Path::new(SNAPSHOTTER_SOCKET)));
                c.cleanup().unwrap();
                let left: Vec<String> = c.list(&[]).unwrap().into_iter().map(|i| i.name).collect();
                assert!(left.is_empty(), "{}: sharedloop still has snapshots: {left:?}", self.name);
            }
            DockerEngine::Plugin20 => {
                let rw = self.data_root().join("sharedloop/rw");
                let left: Vec<_> = fs::read_dir(&rw).unwrap().flatten().map(|e| e.file_name()).collect();
                assert!(left.is_empty(), "{}: writable layers left in {}: {left:?}", self.name, rw.display());
            }
        }
        while !self.sharedloop_mounts().is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "{}: mounts left:\n{}",
                self.name,
                self.sharedloop_mounts().join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_no_loops(&self.dir);
        let log = self.plugin_log();
        assert!(!log.contains(" ERROR "), "{}: errors in the sharedloop log:\n{}", self.name, tail(&log, 40));
    }
}

/// The OCI chain ids of layers with `diff_ids` (bottom first).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    use sha2::Digest;
    let mut out: Vec<String> = Vec::new();
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(p) => format!("sha256:{}", hex::encode(sha2::Sha256::digest(format!("{p} {d}").as_bytes()))),
        };
        out.push(next);
    }
    out
}

/// The directory name of a layer in the store's `layers/`.
pub fn layer_dir_name(chain: &str) -> String {
    chain.replacen(':', "-", 1)
}

/// The diff ids of the layers in a `docker save` archive (either
/// engine's format: manifest.json names each layer's file or blob),
/// uncompressing gzip'd blobs.
pub fn saved_diff_ids(archive: &Path) -> Vec<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut files = std::collections::HashMap::new();
    let mut ar = tar::Archive::new(fs::File::open(archive).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.header().entry_type().is_file() {
            let p = e.path().unwrap().to_string_lossy().trim_start_matches("./").to_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            files.insert(p, data);
        }
    }
    let manifest: serde_json::Value = serde_json::from_slice(
        files.get("manifest.json").unwrap_or_else(|| panic!("{}: no manifest.json", archive.display())),
    )
    .unwrap();
    let layers = manifest[0]["Layers"].as_array().unwrap_or_else(|| panic!("no Layers: {manifest}"));
    layers
        .iter()
        .map(|l| {
            let p = l.as_str().unwrap();
            let blob = files.get(p).unwrap_or_else(|| panic!("{}: no layer {p}", archive.display()));
            let tar = if blob.starts_with(&[0x1f, 0x8b]) { gunzip(blob) } else { blob.clone() };
            format!("sha256:{}", hex::encode(sha2::Sha256::digest(&tar)))
        })
        .collect()
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip (the test needs it to read compressed layers)");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "gzip -dc failed");
    out.stdout
}
