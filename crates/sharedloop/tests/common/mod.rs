//! End-to-end test harness: simulated hosts, real daemons.
//!
//! A [`Host`] is a private mount and network namespace (held by a `sleep`
//! process) with a tmpfs on /run, so every program in it uses its default
//! socket paths: the plugin on /run/docker/plugins/sharedloop.sock, dockerd
//! and its own containerd. On drop every process in the namespace is
//! killed, which also drops its mounts; loop devices detach themselves
//! (autoclear). Hosts of test processes that died are swept at start.
//!
//! Nothing here fakes the thing under test: dockerd, containerd, the
//! kernel's loop devices, ext4/xfs and overlayfs are real. Tests fail
//! loudly when they cannot run (not root, no dockerd).
#![allow(dead_code)]

pub mod cri;
pub mod docker_engines;
pub mod engines;
pub mod plugin_client;
pub mod registry;
pub mod snap_client;

pub use engines::Engine;

use plugin_client::PluginClient;

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

pub const TEST_ROOT: &str = "/tmp/sharedloop-test";
pub const DOCKER: &str = "/usr/bin/docker";
pub const DOCKERD: &str = "/usr/sbin/dockerd";

pub fn sharedloop_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sharedloop"))
}

/// Fails the test (never skips) when the machine cannot run it.
pub fn require(what: &[&str]) {
    assert!(rustix::process::geteuid().is_root(), "this test needs root: it starts daemons and mounts filesystems");
    for w in what {
        let ok = match *w {
            "dockerd" => Path::new(DOCKERD).exists() && Path::new(DOCKER).exists(),
            "xfs" => which("mkfs.xfs"),
            "ext4" => which("mkfs.ext4"),
            "busybox" => Path::new("/bin/busybox").exists(),
            "overlay" => fs::read_to_string("/proc/filesystems").unwrap_or_default().contains("overlay"),
            other => which(other),
        };
        assert!(ok, "this test needs {w}; install it (scripts/install-deps does)");
    }
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs and panics with the output when it fails; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn token() -> String {
    let mut b = [0u8; 6];
    getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn getrandom(b: &mut [u8]) {
    let mut f = fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut f, b).unwrap();
}

fn mnt_ns(pid: u32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/ns/mnt")).ok().map(|m| m.ino())
}

/// Signals the program that `nsenter -p` runs for `child`: nsenter forks to
/// enter the PID namespace and does not forward signals, so the program is
/// nsenter's child.
fn signal_inner(child: &Child, sig: rustix::process::Signal) {
    let id = child.id();
    let inner = fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
        .ok()
        .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()));
    if let Some(pid) = inner {
        let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), sig);
    } else {
        let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(id as i32).unwrap(), sig);
    }
}

/// A process's start time (field 22 of /proc/PID/stat), to tell it from a
/// later process with the same pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` belongs to the PID namespace of `init`, or to one nested
/// in it (a container): it, or an ancestor of it, shares init's namespace.
/// (Processes started with `nsenter -p` are children of an nsenter outside.)
fn in_pid_ns_of(pid: u32, init: u32) -> bool {
    let ns = |p: u32| fs::read_link(format!("/proc/{p}/ns/pid")).ok();
    let Some(target) = ns(init) else { return false };
    let mut cur = pid;
    for _ in 0..64 {
        if ns(cur).as_ref() == Some(&target) {
            return true;
        }
        let parent = fs::read_to_string(format!("/proc/{cur}/stat")).ok().and_then(|s| {
            s.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1).and_then(|x| x.parse::<u32>().ok()))
        });
        match parent {
            Some(p) if p > 1 => cur = p,
            _ => return false,
        }
    }
    false
}

fn pids_in_namespace(ns: u64, except: Option<u32>) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        if Some(pid as u32) != except && mnt_ns(pid as u32) == Some(ns) {
            out.push(pid);
        }
    }
    out
}

fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_raw(pid).unwrap(), rustix::process::Signal::KILL);
    }
}

/// Kills every process in the namespace `ns`, which `holder` keeps alive
/// (so its inode number cannot be reused by another host meanwhile), and
/// the holder last.
fn kill_namespace(ns: u64, init: u32, holder: &mut Child) {
    // The PID namespace's init: the kernel takes every process of the
    // namespace with it.
    kill_pids(&[init as i32]);
    let _ = holder.wait();
    for _ in 0..100 {
        let pids = pids_in_namespace(ns, None);
        if pids.is_empty() {
            break;
        }
        kill_pids(&pids);
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes what test processes that died left behind: their hosts'
/// processes (and with them mounts), loop devices and directories. A
/// namespace is only touched when one of its processes names the dead
/// host's directory, since namespace inode numbers are reused.
fn sweep_dead_hosts() {
    let Ok(rd) = fs::read_dir(TEST_ROOT) else { return };
    for e in rd.flatten() {
        let dir = e.path();
        let owner: Option<u32> = fs::read_to_string(dir.join("owner")).ok().and_then(|s| s.trim().parse().ok());
        let alive = owner.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if alive {
            continue;
        }
        if let Some(ns) = fs::read_to_string(dir.join("ns")).ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            let pids = pids_in_namespace(ns, None);
            let holder_alive = fs::read_to_string(dir.join("holder")).ok().is_some_and(|h| {
                let mut it = h.split_whitespace().filter_map(|x| x.parse::<u64>().ok());
                match (it.next(), it.next()) {
                    (Some(pid), Some(st)) => start_time(pid as u32) == Some(st) && mnt_ns(pid as u32) == Some(ns),
                    _ => false,
                }
            });
            let ours = holder_alive
                || pids.iter().any(|p| {
                    fs::read(format!("/proc/{p}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
                        .unwrap_or(false)
                });
            if holder_alive {
                // The PID namespace's init: its containers go with it.
                let init = fs::read_to_string(dir.join("holder"))
                    .ok()
                    .and_then(|h| h.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()));
                kill_pids(&init.into_iter().collect::<Vec<_>>());
            }
            if ours {
                kill_pids(&pids);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        // sshd, sshfs and anything else started with the directory in its
        // command line.
        let strays: Vec<i32> = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|p| {
                fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(&*dir.to_string_lossy()))
                    .unwrap_or(false)
            })
            .collect();
        kill_pids(&strays);
        detach_loops_under(&dir);
        let _ = Command::new("umount").arg("-R").arg("-l").arg(&dir).stderr(Stdio::null()).status();
        let _ = Command::new("chattr").args(["-R", "-i"]).arg(&dir).stderr(Stdio::null()).status();
        let _ = fs::remove_dir_all(&dir);
    }
}

/// Loop devices whose backing file is below `dir`.
pub fn loops_under(dir: &Path) -> Vec<(PathBuf, PathBuf)> {
    sharedloop_core::sys::loopdev::list().into_iter().filter(|(_, b)| b.starts_with(dir)).collect()
}

fn detach_loops_under(dir: &Path) {
    for (dev, _) in loops_under(dir) {
        let _ = sharedloop_core::sys::loopdev::detach(&dev);
    }
}

static SWEEP: Once = Once::new();

/// Whether a Docker API answers on `sock` (`GET /_ping`), whichever
/// dockerd and CLI versions are installed.
fn api_answers(sock: &Path) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(sock) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n").is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.") && reply.lines().next().is_some_and(|l| l.contains(" 200 "))
}

/// Options of a simulated host.
#[derive(Clone, Debug, Default)]
pub struct HostOpts {
    /// Bind mounts into the namespace: (host path, path inside, read-only).
    pub binds: Vec<(PathBuf, PathBuf, bool)>,
    /// Bind the host's own dir/varlib onto /var/lib/docker (for defaults).
    pub default_paths: bool,
    /// Receive mount events from shared mounts outside ([`SharedDir`]), so
    /// a filesystem unmounted or mounted there changes under the host.
    pub slave: bool,
    /// An overlayfs over /usr, /etc, /var/lib and /var/log (and /lib,
    /// /lib64, /bin, /sbin where they are directories, not symlinks into
    /// /usr), mounted before anything runs, with the upper layers in the
    /// host's directory: what runs inside (dpkg) changes the system's
    /// files and package database for this host only, and the changes
    /// vanish with it.
    pub overlay_system: bool,
}

/// The system directories [`HostOpts::overlay_system`] covers.
pub const OVERLAID: &[&str] = &["/usr", "/etc", "/var/lib", "/var/log", "/lib", "/lib64", "/bin", "/sbin"];

/// A simulated host: a mount + network namespace with its own /run.
pub struct Host {
    pub name: String,
    pub dir: PathBuf,
    holder: Child,
    /// PID 1 of the host's PID namespace (as seen from outside).
    init: u32,
    ns: u64,
    plugin: Option<Child>,
    dockerd: Option<Child>,
    dockerd_args: Vec<String>,
    containerd: Option<Child>,
    /// The containerd build `start_containerd_engine` started.
    pub engine: Engine,
    /// What the plugin was last started with, for restarts.
    plugin_args: Vec<String>,
}

impl Host {
    pub fn new(name: &str) -> Host {
        Host::with(name, HostOpts::default())
    }

    pub fn with(name: &str, opts: HostOpts) -> Host {
        SWEEP.call_once(sweep_dead_hosts);
        let dir = PathBuf::from(TEST_ROOT).join(format!("{name}-{}", token()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("owner"), std::process::id().to_string()).unwrap();
        let mut script =
            // The machine's own mounts under /run (a sharedloop started by
            // scripts/setup keeps its layer mounts there) are dropped from
            // this namespace first: covered by the tmpfs they would still
            // be listed in its mountinfo, as if this host had made them.
            String::from(
                "set -ex\nawk '$5 ~ \"^/run/\" {print $5}' /proc/self/mountinfo | sort -r | \
                 while read -r m; do umount -l \"$m\" 2>/dev/null || true; done\n\
                 mount -t tmpfs tmpfs /run\nmkdir -p /run/docker/plugins\nip link set lo up\n",
            );
        if opts.overlay_system {
            for (i, d) in OVERLAID.iter().enumerate() {
                let layer = dir.join(format!("overlay/{i}"));
                script.push_str(&format!(
                    "if [ -d {d} ] && [ ! -L {d} ]; then mkdir -p {l}/upper {l}/work && \
                     mount -t overlay overlay -o lowerdir={d},upperdir={l}/upper,workdir={l}/work {d}; fi\n",
                    l = layer.display()
                ));
            }
        }
        if opts.default_paths {
            fs::create_dir_all(dir.join("varlib")).unwrap();
            script.push_str(&format!(
                "mkdir -p /var/lib/docker\nmount --bind {} /var/lib/docker\n",
                dir.join("varlib").display()
            ));
        }
        for (src, dst, ro) in &opts.binds {
            script.push_str(&format!("mkdir -p {d}\nmount --bind {s} {d}\n", s = src.display(), d = dst.display()));
            if *ro {
                script.push_str(&format!("mount -o remount,bind,ro {}\n", dst.display()));
            }
        }
        script.push_str(&format!("touch {}/ready\nexec sleep infinity\n", dir.display()));
        // A PID namespace too, whose init is the holder: when it dies the
        // kernel kills every process in it, containers (in nested PID
        // namespaces) included, which a kill by mount namespace misses.
        let mut holder = Command::new("unshare")
            .args([
                "-m",
                "-n",
                "-p",
                "-f",
                "--mount-proc",
                "--propagation",
                if opts.slave { "slave" } else { "private" },
            ])
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stderr(fs::File::create(dir.join("holder.log")).unwrap())
            .spawn()
            .expect("unshare");
        let t = Instant::now();
        // Generous: on a loaded 2-core CI machine forking the namespace's
        // few processes has taken more than 10 s. The script traces each
        // step (set -x) into holder.log, so a hang names its step.
        while !dir.join("ready").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "host {name} did not come up in 60 s; holder exited: {:?}; its trace:\n{}",
                holder.try_wait().ok().flatten(),
                fs::read_to_string(dir.join("holder.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // unshare forks: its child is PID 1 of the new PID namespace.
        let init = fs::read_to_string(format!("/proc/{}/task/{}/children", holder.id(), holder.id()))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
            .expect("the host's init process");
        let ns = mnt_ns(init).expect("holder namespace");
        fs::write(dir.join("ns"), ns.to_string()).unwrap();
        fs::write(dir.join("holder"), format!("{} {}", init, start_time(init).unwrap_or(0))).unwrap();
        Host {
            name: name.into(),
            dir,
            holder,
            init,
            ns,
            plugin: None,
            dockerd: None,
            dockerd_args: Vec::new(),
            containerd: None,
            engine: Engine::System,
            plugin_args: Vec::new(),
        }
    }

    /// A command that runs inside this host.
    pub fn cmd(&self, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(self.init.to_string()).args(["-m", "-n", "-p", "--"]).arg(prog);
        c
    }

    /// A path inside this host's namespace, as seen from outside.
    pub fn inside(&self, p: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.init)).join(p.strip_prefix("/").unwrap_or(p))
    }

    pub fn mountinfo(&self) -> String {
        fs::read_to_string(format!("/proc/{}/mountinfo", self.init)).unwrap()
    }

    pub fn data_root(&self) -> PathBuf {
        self.dir.join("docker")
    }
    pub fn root_dir(&self) -> PathBuf {
        self.dir.join("root")
    }
    pub fn fallback_dir(&self) -> PathBuf {
        self.dir.join("private")
    }
    pub fn daemon_json(&self) -> PathBuf {
        let p = self.dir.join("daemon.json");
        if !p.exists() {
            fs::write(&p, "{}\n").unwrap();
        }
        p
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    pub fn start_plugin(&mut self) {
        self.start_plugin_env(&[]);
    }

    /// Starts the plugin with extra environment (fault injection).
    pub fn start_plugin_env(&mut self, env: &[(&str, &str)]) {
        self.start_serve(&[], env);
    }

    /// Starts `sharedloop serve` with `args` (after the defaults: debug
    /// log, this host's empty config file) and waits for its sockets.
    pub fn start_serve(&mut self, args: &[String], env: &[(&str, &str)]) {
        let cfg = self.dir.join("sharedloop.toml");
        if !cfg.exists() {
            fs::write(&cfg, "").unwrap();
        }
        let mut all: Vec<String> =
            ["serve", "--log-level", "debug", "--config"].iter().map(|s| s.to_string()).collect();
        all.push(cfg.display().to_string());
        all.extend(args.iter().cloned());
        self.plugin_args = all.clone();
        let mut socks = Vec::new();
        if !args.iter().any(|a| a == "--no-docker") {
            socks.push(self.inside(Path::new("/run/docker/plugins/sharedloop.sock")));
        }
        if args.iter().any(|a| a == "--containerd") {
            socks.push(self.inside(Path::new(SNAPSHOTTER_SOCKET)));
        }
        for sock in &socks {
            let _ = fs::remove_file(sock); // left by a killed plugin
        }
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join("sharedloop.log")).unwrap();
        let child = self
            .cmd(sharedloop_bin())
            .args(&all)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.plugin = Some(child);
        let t = Instant::now();
        while !socks.iter().all(|s| s.exists()) {
            if let Some(s) = self.plugin.as_mut().unwrap().try_wait().unwrap() {
                panic!("sharedloop exited ({s}): {}", self.plugin_log());
            }
            assert!(t.elapsed() < Duration::from_secs(20), "plugin socket did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills every process of this host (kill -9 of a whole machine), but
    /// keeps the namespace for inspection.
    pub fn kill_all(&mut self) {
        // Everything but the init (which keeps the namespace): daemons,
        // shims, and the containers in their own namespaces below ours.
        let all: Vec<i32> = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<i32>().ok())
            .filter(|&p| p as u32 != self.init && in_pid_ns_of(p as u32, self.init))
            .collect();
        kill_pids(&all);
        if let Some(mut p) = self.plugin.take() {
            let _ = p.wait();
        }
        if let Some(mut d) = self.dockerd.take() {
            let _ = d.wait();
        }
        if let Some(mut d) = self.containerd.take() {
            let _ = d.wait();
        }
    }

    /// Runs the sharedloop admin CLI inside this host.
    pub fn cli(&self, args: &[&str]) -> Output {
        run(self.cmd(sharedloop_bin()).args(args))
    }

    /// Kills the plugin (SIGKILL: nothing it could tidy up) and waits.
    pub fn kill_plugin(&mut self) {
        if let Some(mut p) = self.plugin.take() {
            signal_inner(&p, rustix::process::Signal::KILL);
            let _ = p.wait();
        }
    }

    /// The pid of the running `sharedloop` (nsenter's child), as seen from
    /// outside.
    pub fn plugin_pid(&self) -> u32 {
        let id = self.plugin.as_ref().expect("the plugin runs").id();
        fs::read_to_string(format!("/proc/{id}/task/{id}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse().ok()))
            .unwrap_or(id)
    }

    /// Waits for a plugin that aborted (fault injection) to be gone.
    pub fn reap_plugin(&mut self) {
        if let Some(mut p) = self.plugin.take() {
            let _ = p.wait();
        }
    }

    pub fn plugin_log(&self) -> String {
        fs::read_to_string(self.dir.join("sharedloop.log")).unwrap_or_default()
    }
    pub fn dockerd_log(&self) -> String {
        fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// The storage options for this host's own root and fallback dirs.
    pub fn default_storage_opts(&self) -> Vec<String> {
        vec![
            format!("sharedloop.loopback_root={}", self.root_dir().display()),
            format!("sharedloop.loopback_fallback={}", self.fallback_dir().display()),
        ]
    }

    /// Starts dockerd with `-s sharedloop` and `storage_opts`; waits until it
    /// answers. Returns the daemon's error output when it exits instead.
    pub fn try_start_dockerd(&mut self, storage_opts: &[String], data_root: Option<&Path>) -> Result<(), String> {
        let mut args: Vec<String> = vec![
            "--experimental".into(),
            "-s".into(),
            "sharedloop".into(),
            "-H".into(),
            format!("unix://{}", self.socket().display()),
            "--iptables=false".into(),
            "--ip-masq=false".into(),
            // Never the machine's /etc/docker/daemon.json (scripts/setup writes one).
            format!("--config-file={}", self.daemon_json().display()),
        ];
        if let Some(dr) = data_root {
            args.push(format!("--data-root={}", dr.display()));
        }
        for o in storage_opts {
            args.push("--storage-opt".into());
            args.push(o.clone());
        }
        self.spawn_dockerd(Path::new(DOCKERD), &args, &[])
    }

    /// Starts the dockerd binary `bin` with `args` (which must make it
    /// listen on [`Host::socket`]) and `env`; waits until it answers.
    /// Returns the daemon's error output when it exits instead.
    pub fn spawn_dockerd(&mut self, bin: &Path, args: &[String], env: &[(&str, &str)]) -> Result<(), String> {
        self.dockerd_args = args.to_vec();
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join("dockerd.log")).unwrap();
        let mut child = self
            .cmd(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let t = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Err(format!("dockerd exited ({s}): {}", self.dockerd_log()));
            }
            if api_answers(&self.socket()) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(90), "dockerd did not come up: {}", self.dockerd_log());
            std::thread::sleep(Duration::from_millis(100));
        }
        self.dockerd = Some(child);
        Ok(())
    }

    pub fn start_dockerd(&mut self, storage_opts: &[String]) {
        let dr = self.data_root();
        if let Err(e) = self.try_start_dockerd(storage_opts, Some(&dr)) {
            panic!("{e}\n--- plugin log ---\n{}", self.plugin_log());
        }
    }

    /// Plugin and dockerd on this host's own dirs.
    pub fn start(&mut self, extra_opts: &[&str]) {
        self.start_plugin();
        let mut opts = self.default_storage_opts();
        opts.extend(extra_opts.iter().map(|s| s.to_string()));
        self.start_dockerd(&opts);
    }

    pub fn stop_dockerd(&mut self) {
        if let Some(mut d) = self.dockerd.take() {
            signal_inner(&d, rustix::process::Signal::TERM);
            let t = Instant::now();
            while d.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(30) {
                    let _ = d.kill();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        run(Command::new(DOCKER).arg("-H").arg(format!("unix://{}", self.socket().display())).args(args))
    }

    /// Runs a docker command that must succeed; returns stdout.
    pub fn docker_ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        if !out.status.success() {
            panic!(
                "docker {args:?} failed:\n{}\n--- plugin log (tail) ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&self.plugin_log(), 40)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `docker` with stdin from a file.
    pub fn docker_stdin(&self, args: &[&str], input: &Path) -> String {
        run_ok(
            Command::new(DOCKER)
                .arg("-H")
                .arg(format!("unix://{}", self.socket().display()))
                .args(args)
                .stdin(fs::File::open(input).unwrap()),
        )
    }

    /// The `docker info` lines of the storage driver section.
    pub fn driver_status(&self) -> String {
        self.docker_ok(&[
            "info",
            "--format",
            "{{.Driver}}\n{{range .DriverStatus}}{{index . 0}}: {{index . 1}}\n{{end}}",
        ])
    }

    /// Mount points in this host's namespace below `dir`.
    /// Mount points below `dir` (not `dir` itself) in this host.
    pub fn mounts_under(&self, dir: &Path) -> Vec<String> {
        sharedloop_core::mount::parse_mountinfo(&self.mountinfo())
            .into_iter()
            .filter(|m| m.mount_point.starts_with(dir) && m.mount_point != dir)
            .map(|m| m.mount_point.display().to_string())
            .collect()
    }
}

/// The layer directories of the store at `root`, sorted.
pub fn layer_dirs(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        fs::read_dir(root.join("layers")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// Where a host's sharedloop serves the snapshotter (inside the host).
pub const SNAPSHOTTER_SOCKET: &str = "/run/sharedloop/containerd.sock";
/// Where `sharedloop serve` mounts layers, inside a host.
pub const LAYER_MOUNTS: &str = "/run/sharedloop/layers";
/// containerd's socket inside a host.
pub const CONTAINERD_SOCKET: &str = "/run/ctrd/containerd.sock";

impl Host {
    /// The snapshotter's state directory on this host.
    pub fn snapshotter_root(&self) -> PathBuf {
        self.dir.join("snapshotter")
    }

    /// `serve` arguments for the containerd snapshotter on this host's
    /// root and fallback dirs (the Docker plugin off unless `docker`).
    pub fn snapshotter_args(&self, root: &Path, docker: bool) -> Vec<String> {
        let mut v: Vec<String> = vec![
            "--containerd".into(),
            "--containerd-root".into(),
            self.snapshotter_root().display().to_string(),
            "-o".into(),
            format!("loopback_root={}", root.display()),
            "-o".into(),
            format!("loopback_fallback={}", self.fallback_dir().display()),
        ];
        if !docker {
            v.push("--no-docker".into());
        }
        v
    }

    pub fn start_snapshotter(&mut self, root: &Path) {
        fs::create_dir_all(root).unwrap();
        let args = self.snapshotter_args(root, false);
        self.start_serve(&args, &[]);
    }

    /// Restarts sharedloop with the arguments it had.
    pub fn restart_plugin(&mut self) {
        let args: Vec<String> = self.plugin_args[5..].to_vec();
        self.start_serve(&args, &[]);
    }

    pub fn containerd_root(&self) -> PathBuf {
        self.dir.join("containerd")
    }

    /// Starts containerd with its own config, root, state and socket, and
    /// sharedloop as the proxy snapshotter "sharedloop".
    pub fn start_containerd(&mut self) {
        self.start_containerd_engine(Engine::System, None);
    }

    /// [`Host::start_containerd`] for one `engine` of the matrix, with the
    /// CRI plugin's config section `cri` (CRI off without it).
    pub fn start_containerd_engine(&mut self, engine: Engine, cri: Option<&str>) {
        self.engine = engine;
        let cfg = self.dir.join("containerd.toml");
        fs::write(
            &cfg,
            engine.config(
                &self.containerd_root().display().to_string(),
                "/run/ctrd/state",
                CONTAINERD_SOCKET,
                SNAPSHOTTER_SOCKET,
                &self.dir.join("containerd-opt").display().to_string(),
                cri,
            ),
        )
        .unwrap();
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join("containerd.log")).unwrap();
        let mut child = self
            .cmd(engine.bin("containerd"))
            .arg("--config")
            .arg(&cfg)
            .env("PATH", engine.path_env())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let t = Instant::now();
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                panic!("containerd exited ({s}): {}", self.containerd_log());
            }
            if self.inside(Path::new(CONTAINERD_SOCKET)).exists() && self.ctr(&["version"]).status.success() {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "containerd did not come up: {}", self.containerd_log());
            std::thread::sleep(Duration::from_millis(100));
        }
        self.containerd = Some(child);
    }

    pub fn containerd_log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` against this host's containerd, snapshotter sharedloop.
    pub fn ctr(&self, args: &[&str]) -> Output {
        run(self
            .cmd(self.engine.bin("ctr"))
            .args(["--address", CONTAINERD_SOCKET, "--namespace", "default"])
            .args(args)
            .env("CONTAINERD_SNAPSHOTTER", "sharedloop"))
    }

    /// A `ctr` command that must succeed; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        if !out.status.success() {
            panic!(
                "ctr {args:?} failed:\n{}\n--- sharedloop log (tail) ---\n{}\n--- containerd log (tail) ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&self.plugin_log(), 40),
                tail(&self.containerd_log(), 20)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The manifest of an image, from inside a container ctr runs.
    pub fn ctr_manifest(&self, image: &str) -> Vec<String> {
        let id = format!("m{}", &token()[..8]);
        let m = self.ctr_ok(&["run", "--rm", image, &id, "/bin/busybox", "sh", "-c", MANIFEST_SCRIPT]);
        // containerd's default spec mounts a tmpfs on /run: runc makes the
        // mount point (the test images have no /run).
        filter_manifest(&m).into_iter().filter(|l| !l.starts_with("./run ")).collect()
    }

    /// Waits until containerd reaches the snapshotter again (it redials a
    /// restarted one with a back-off): a Prepare must go through.
    pub fn wait_for_snapshotter(&self) {
        let t = Instant::now();
        loop {
            let key = format!("probe-{}", &token()[..8]);
            let out = self.ctr(&["snapshots", "prepare", &key]);
            if out.status.success() {
                self.ctr_ok(&["snapshots", "rm", &key]);
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "containerd does not reach the snapshotter: {}\n--- sharedloop log (tail) ---\n{}\n--- containerd log (tail) ---\n{}",
                String::from_utf8_lossy(&out.stderr),
                tail(&self.plugin_log(), 30),
                tail(&self.containerd_log(), 15)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs containerd's garbage collector now and waits for it (deleting
    /// a lease with --sync): containerd removes a deleted snapshot from
    /// the snapshotter only when it collects, which it otherwise schedules
    /// at a pace set by how long the last collection took.
    pub fn collect_garbage(&self) {
        let id = format!("gc-{}", &token()[..12]);
        self.ctr_ok(&["leases", "create", "--id", &id]);
        self.ctr_ok(&["leases", "delete", "--sync", &id]);
    }

    /// sharedloop's mounts on this host: its layer mounts and the
    /// snapshotter's areas (writable layers, merged views, mounts).
    pub fn snapshotter_mounts(&self) -> Vec<String> {
        let sr = self.snapshotter_root();
        let areas = [sr.join("rwmnt"), sr.join("merged"), sr.join("mnt"), PathBuf::from(LAYER_MOUNTS)];
        self.mountinfo()
            .lines()
            .filter(|l| {
                let mp = Path::new(l.split_whitespace().nth(4).unwrap_or(""));
                areas.iter().any(|a| mp.starts_with(a) && mp != a)
            })
            .map(str::to_owned)
            .collect()
    }

    /// Names of the snapshots the snapshotter has, by `ctr snapshots ls`.
    pub fn ctr_snapshots(&self) -> Vec<String> {
        self.ctr_ok(&["snapshots", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_dockerd();
        kill_namespace(self.ns, self.init, &mut self.holder);
        if let Some(mut p) = self.plugin.take() {
            let _ = p.wait();
        }
        // The namespace's mounts are gone with it; give autoclear a moment.
        let t = Instant::now();
        while !loops_under(&self.dir).is_empty() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        detach_loops_under(&self.dir);
        let _ = Command::new("chattr").args(["-R", "-i"]).arg(&self.dir).stderr(Stdio::null()).status();
        if std::env::var_os("SHAREDLOOP_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------
// Test images

/// A busybox-static root filesystem at `dir`.
pub fn busybox_rootfs(dir: &Path) {
    for d in ["bin", "etc", "tmp", "root", "usr/share/doc"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    let list = run_ok(Command::new("/bin/busybox").arg("--list"));
    for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let _ = std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet));
    }
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n").unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    fs::write(dir.join("usr/share/doc/readme"), "sharedloop test image\n".repeat(100)).unwrap();
    run_ok(Command::new("chmod").args(["1777"]).arg(dir.join("tmp")));
}

/// Prints one line per file: path, type, mode, owner, size, checksum or
/// link target. Run by busybox inside a container and in a chroot of the
/// expected tree, so both sides format alike.
pub const MANIFEST_SCRIPT: &str = r#"cd / && find . -xdev | sort | while read -r f; do
  if [ -L "$f" ]; then echo "$f L $(stat -c '%a %u:%g' "$f") -> $(readlink "$f")";
  elif [ -f "$f" ]; then echo "$f F $(stat -c '%a %u:%g %s' "$f") $(md5sum < "$f" | cut -c1-32)";
  elif [ -d "$f" ]; then echo "$f D $(stat -c '%a %u:%g' "$f")";
  else echo "$f O $(stat -c '%a %u:%g %t:%T %F' "$f")"; fi
done"#;

/// Paths Docker itself adds to every container (init layer, mounts).
const DOCKER_ADDED: &[&str] =
    &["./proc", "./sys", "./dev", "./etc/hosts", "./etc/hostname", "./etc/resolv.conf", "./etc/mtab", "./.dockerenv"];

pub fn filter_manifest(m: &str) -> Vec<String> {
    m.lines()
        .filter(|l| {
            let path = l.split(' ').next().unwrap_or("");
            path != "." && !DOCKER_ADDED.iter().any(|p| path == *p || path.starts_with(&format!("{p}/")))
        })
        .map(str::to_owned)
        .collect()
}

/// The manifest of a tree on this machine (chroot into it).
pub fn host_manifest(tree: &Path) -> Vec<String> {
    filter_manifest(&run_ok(Command::new("chroot").arg(tree).args(["/bin/busybox", "sh", "-c", MANIFEST_SCRIPT])))
}

/// `docker run` arguments that print [`MANIFEST_SCRIPT`]'s manifest of
/// `image` from inside a container of it.
pub fn manifest_run_args(image: &str) -> [&str; 9] {
    ["run", "--rm", "--network", "none", image, "/bin/busybox", "sh", "-c", MANIFEST_SCRIPT]
}

/// The manifest of an image, from inside a container of it.
pub fn container_manifest(host: &Host, image: &str) -> Vec<String> {
    filter_manifest(&host.docker_ok(&manifest_run_args(image)))
}

pub fn assert_same_manifest(expected: &[String], actual: &[String], what: &str) {
    if expected != actual {
        let e: std::collections::BTreeSet<_> = expected.iter().collect();
        let a: std::collections::BTreeSet<_> = actual.iter().collect();
        let missing: Vec<_> = e.difference(&a).take(20).collect();
        let extra: Vec<_> = a.difference(&e).take(20).collect();
        panic!("{what}: container differs from source\nmissing: {missing:#?}\nunexpected: {extra:#?}");
    }
    assert!(expected.len() > 10, "{what}: suspiciously small manifest");
}

/// One layer of a generated image: what it adds and what it removes.
#[derive(Default, Clone)]
pub struct LayerSpec {
    /// (path, content, mode, uid, gid)
    pub files: Vec<(String, Vec<u8>, u32, u64, u64)>,
    pub dirs: Vec<(String, u32)>,
    pub symlinks: Vec<(String, String)>,
    pub hardlinks: Vec<(String, String)>,
    /// Paths removed from below (become `.wh.NAME`).
    pub whiteouts: Vec<String>,
    /// Directories whose lower content is hidden (`.wh..wh..opq`).
    pub opaque: Vec<String>,
    /// Add the busybox rootfs (for the base layer).
    pub rootfs: Option<PathBuf>,
}

fn tar_header(kind: tar::EntryType, mode: u32, size: u64, uid: u64, gid: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_mtime(1_700_000_000);
    h
}

/// The tar of one layer.
pub fn layer_tar(spec: &LayerSpec) -> Vec<u8> {
    if let Some(root) = &spec.rootfs {
        // Deterministic: the same tree gives the same bytes (and diff id)
        // on every host.
        let out = run(Command::new("tar")
            .args(["--sort=name", "--mtime=@1700000000", "--owner=0", "--group=0", "--numeric-owner", "-C"])
            .arg(root)
            .args(["-cf", "-", "."]));
        assert!(out.status.success(), "tar of {}: {}", root.display(), String::from_utf8_lossy(&out.stderr));
        assert!(spec.files.is_empty() && spec.dirs.is_empty(), "a rootfs layer has nothing else");
        return out.stdout;
    }
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    for d in &spec.opaque {
        b.append_data(&mut tar_header(tar::EntryType::Directory, 0o755, 0, 0, 0), format!("{d}/"), std::io::empty())
            .unwrap();
        b.append_data(
            &mut tar_header(tar::EntryType::Regular, 0o644, 0, 0, 0),
            format!("{d}/.wh..wh..opq"),
            std::io::empty(),
        )
        .unwrap();
    }
    for w in &spec.whiteouts {
        let p = Path::new(w);
        let name = format!(".wh.{}", p.file_name().unwrap().to_string_lossy());
        let wh = p.with_file_name(name);
        b.append_data(&mut tar_header(tar::EntryType::Regular, 0o644, 0, 0, 0), wh, std::io::empty()).unwrap();
    }
    for (d, mode) in &spec.dirs {
        b.append_data(&mut tar_header(tar::EntryType::Directory, *mode, 0, 0, 0), format!("{d}/"), std::io::empty())
            .unwrap();
    }
    for (p, data, mode, uid, gid) in &spec.files {
        b.append_data(&mut tar_header(tar::EntryType::Regular, *mode, data.len() as u64, *uid, *gid), p, &data[..])
            .unwrap();
    }
    for (p, target) in &spec.symlinks {
        b.append_link(&mut tar_header(tar::EntryType::Symlink, 0o777, 0, 0, 0), p, target).unwrap();
    }
    for (p, target) in &spec.hardlinks {
        b.append_link(&mut tar_header(tar::EntryType::Link, 0o644, 0, 0, 0), p, target).unwrap();
    }
    b.into_inner().unwrap()
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// A four-layer image: the busybox rootfs, then owners, setuid, links,
/// whiteouts, an opaque directory and a directory replaced by a file.
pub fn base_layers(rootfs: &Path) -> Vec<LayerSpec> {
    let mut layers = vec![LayerSpec { rootfs: Some(rootfs.to_owned()), ..Default::default() }];
    layers.push(LayerSpec {
        dirs: vec![("srv".into(), 0o755), ("srv/data".into(), 0o750), ("gone".into(), 0o755)],
        files: vec![
            ("srv/data/a".into(), b"alpha\n".to_vec(), 0o644, 0, 0),
            ("srv/data/b".into(), vec![b'b'; 100_000], 0o600, 1000, 1000),
            ("srv/setuid".into(), b"#!/bin/sh\n".to_vec(), 0o4755, 0, 0),
            ("gone/x".into(), b"x".to_vec(), 0o644, 0, 0),
            ("gone/y".into(), b"y".to_vec(), 0o644, 0, 0),
        ],
        symlinks: vec![("srv/link".into(), "data/a".into())],
        hardlinks: vec![("srv/hard".into(), "srv/data/a".into())],
        ..Default::default()
    });
    layers.push(LayerSpec {
        whiteouts: vec!["gone/x".into(), "etc/group".into()],
        opaque: vec!["srv/data".into()],
        files: vec![
            ("srv/data/c".into(), b"gamma\n".to_vec(), 0o644, 0, 0),
            ("srv/data/a".into(), b"new alpha\n".to_vec(), 0o644, 0, 0),
        ],
        ..Default::default()
    });
    layers.push(LayerSpec {
        whiteouts: vec!["gone".into()],
        files: vec![("gone".into(), b"now a file\n".to_vec(), 0o644, 0, 0)],
        ..Default::default()
    });
    layers
}

/// Writes a `docker save` style archive of the layers to `out` and returns
/// the layer tars (bottom first).
pub fn docker_archive(layers: &[LayerSpec], tag: &str, out: &Path) -> Vec<Vec<u8>> {
    let tars: Vec<Vec<u8>> = layers.iter().map(layer_tar).collect();
    let diff_ids: Vec<String> = tars.iter().map(|t| format!("sha256:{}", sha256_hex(t))).collect();
    let history: Vec<serde_json::Value> = tars
        .iter()
        .map(|_| serde_json::json!({"created": "2023-11-14T22:13:20Z", "created_by": "sharedloop test"}))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_name = format!("{}.json", sha256_hex(&config_bytes));
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    let add = |b: &mut tar::Builder<fs::File>, name: &str, data: &[u8]| {
        b.append_data(&mut tar_header(tar::EntryType::Regular, 0o644, data.len() as u64, 0, 0), name, data).unwrap();
    };
    let mut layer_paths = Vec::new();
    for (i, t) in tars.iter().enumerate() {
        let p = format!("layer{i:04}/layer.tar");
        add(&mut b, &p, t);
        layer_paths.push(p);
    }
    add(&mut b, &config_name, &config_bytes);
    let manifest = serde_json::json!([{"Config": config_name, "RepoTags": [tag], "Layers": layer_paths}]);
    add(&mut b, "manifest.json", &serde_json::to_vec(&manifest).unwrap());
    b.into_inner().unwrap().flush().unwrap();
    tars
}

/// Writes an OCI image layout archive (for `ctr image import`) of the
/// layers to `out`, named `name` (a full reference); returns the tars.
pub fn oci_archive(layers: &[LayerSpec], name: &str, out: &Path) -> Vec<Vec<u8>> {
    let tars: Vec<Vec<u8>> = layers.iter().map(layer_tar).collect();
    oci_archive_of_tars(&tars, name, out);
    tars
}

/// [`oci_archive`] of given layer tars (which may be anything at all).
pub fn oci_archive_of_tars(tars: &[Vec<u8>], name: &str, out: &Path) {
    let diff_ids: Vec<String> = tars.iter().map(|t| format!("sha256:{}", sha256_hex(t))).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2023-11-14T22:13:20Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let desc = |media: &str, data: &[u8]| serde_json::json!({"mediaType": media, "digest": format!("sha256:{}", sha256_hex(data)), "size": data.len()});
    let layer_descs: Vec<serde_json::Value> =
        tars.iter().map(|t| desc("application/vnd.oci.image.layer.v1.tar", t)).collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": desc("application/vnd.oci.image.config.v1+json", &config_bytes),
        "layers": layer_descs,
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let mut mdesc = desc("application/vnd.oci.image.manifest.v1+json", &manifest_bytes);
    mdesc["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    mdesc["annotations"] = serde_json::json!({
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(':').next().unwrap(),
    });
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [mdesc]});
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    let add = |b: &mut tar::Builder<fs::File>, name: &str, data: &[u8]| {
        b.append_data(&mut tar_header(tar::EntryType::Regular, 0o644, data.len() as u64, 0, 0), name, data).unwrap();
    };
    add(&mut b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    let mut seen = std::collections::HashSet::new();
    for blob in tars.iter().map(|t| &t[..]).chain([&config_bytes[..], &manifest_bytes[..]]) {
        let h = sha256_hex(blob);
        if seen.insert(h.clone()) {
            add(&mut b, &format!("blobs/sha256/{h}"), blob);
        }
    }
    add(&mut b, "index.json", &serde_json::to_vec(&index).unwrap());
    b.into_inner().unwrap().flush().unwrap();
}

/// Materialises the tree an image of `tars` must show, the way the OCI
/// image spec defines it (GNU tar for extraction, whiteouts by hand).
pub fn expected_tree(tars: &[Vec<u8>], dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    for t in tars {
        let mut ar = tar::Archive::new(&t[..]);
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let p = e.path().unwrap().into_owned();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let parent = dest.join(p.parent().unwrap_or(Path::new("")));
            if name == ".wh..wh..opq" {
                if let Ok(rd) = fs::read_dir(&parent) {
                    for c in rd.flatten() {
                        let _ = run(Command::new("rm").arg("-rf").arg(c.path()));
                    }
                }
            } else if let Some(victim) = name.strip_prefix(".wh.") {
                run_ok(Command::new("rm").arg("-rf").arg(parent.join(victim)));
            }
        }
        let tf = dest.with_extension("layer.tar");
        fs::write(&tf, t).unwrap();
        run_ok(
            Command::new("tar")
                .args(["-x", "--same-owner", "-p", "--exclude=.wh.*", "-f"])
                .arg(&tf)
                .arg("-C")
                .arg(dest),
        );
        fs::remove_file(&tf).unwrap();
    }
}

/// Whether loop device `dev` reads its backing file with direct I/O.
pub fn loop_dio(dev: &Path) -> bool {
    let name = dev.file_name().unwrap().to_string_lossy();
    fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap().trim() == "1"
}

/// Asserts that no loop device is backed by a file under `dir`, allowing a
/// few seconds for removals that finish in the background.
pub fn assert_no_loops(dir: &Path) {
    let t = Instant::now();
    while !loops_under(dir).is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = loops_under(dir);
    assert!(left.is_empty(), "loop devices left: {left:?}");
}

/// Mount points under `dir` in `host`, once background removals settle.
pub fn settled_mounts(host: &Host, dir: &Path, expect: usize) -> Vec<String> {
    let t = Instant::now();
    loop {
        let m = host.mounts_under(dir);
        if m.len() <= expect || t.elapsed() > Duration::from_secs(10) {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A directory that is a shared mount, so mounts and unmounts below it
/// reach hosts created with `HostOpts { slave: true, .. }`.
pub struct SharedDir {
    pub path: PathBuf,
}

impl SharedDir {
    pub fn new(name: &str) -> SharedDir {
        SWEEP.call_once(sweep_dead_hosts);
        let path = PathBuf::from(TEST_ROOT).join(format!("{name}-{}", token()));
        fs::create_dir_all(&path).unwrap();
        fs::write(path.join("owner"), std::process::id().to_string()).unwrap();
        run_ok(Command::new("mount").arg("--bind").arg(&path).arg(&path));
        run_ok(Command::new("mount").arg("--make-shared").arg(&path));
        SharedDir { path }
    }

    /// Mounts a fresh ext4 filesystem of `mb` MiB at `path/name` (a stand-in
    /// for a network filesystem's mount point).
    pub fn mount_ext4(&self, name: &str, mb: u64) -> PathBuf {
        let img = self.path.join(format!("{name}.img"));
        if !img.exists() {
            run_ok(Command::new("truncate").arg("-s").arg(format!("{mb}M")).arg(&img));
            run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&img));
        }
        let mnt = self.path.join(name);
        fs::create_dir_all(&mnt).unwrap();
        run_ok(Command::new("mount").args(["-o", "loop"]).arg(&img).arg(&mnt));
        mnt
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").args(["-R", "-l"]).arg(&self.path).status();
        let _ = Command::new("chattr").args(["-R", "-i"]).arg(&self.path).stderr(Stdio::null()).status();
        detach_loops_under(&self.path);
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// An sshfs mount of a local directory through an sshd of our own on
/// 127.0.0.1 (own config, keys and port): a real network filesystem.
pub struct Sshfs {
    pub mountpoint: PathBuf,
    pub exported: PathBuf,
    dir: PathBuf,
    sshd: Child,
}

impl Sshfs {
    pub fn new(name: &str) -> Sshfs {
        require(&["sshfs", "/usr/sbin/sshd"]);
        SWEEP.call_once(sweep_dead_hosts);
        let dir = PathBuf::from(TEST_ROOT).join(format!("{name}-{}", token()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("owner"), std::process::id().to_string()).unwrap();
        let (exported, mountpoint) = (dir.join("exported"), dir.join("mnt"));
        fs::create_dir_all(&exported).unwrap();
        fs::create_dir_all(&mountpoint).unwrap();
        for k in ["hostkey", "userkey"] {
            run_ok(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(dir.join(k)));
        }
        fs::copy(dir.join("userkey.pub"), dir.join("authorized_keys")).unwrap();
        fs::create_dir_all("/run/sshd").unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let cfg = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile {d}/sshd.pid\nSubsystem sftp internal-sftp\n",
            d = dir.display()
        );
        fs::write(dir.join("sshd_config"), cfg).unwrap();
        let sshd = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stderr(fs::File::create(dir.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let t = Instant::now();
        loop {
            let out = run(Command::new("sshfs")
                .arg(format!("root@127.0.0.1:{}", exported.display()))
                .arg(&mountpoint)
                .args(["-p", &port.to_string(), "-o"])
                .arg(format!(
                    "IdentityFile={}/userkey,StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes",
                    dir.display()
                )));
            if out.status.success() {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "sshfs mount failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                fs::read_to_string(dir.join("sshd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let fstype = sharedloop_core::fsmagic::fs_name_of(&mountpoint);
        assert_eq!(fstype, "fuse", "{} is not an sshfs mount", mountpoint.display());
        Sshfs { mountpoint, exported, dir, sshd }
    }
}

impl Drop for Sshfs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").args(["-u", "-z"]).arg(&self.mountpoint).stderr(Stdio::null()).status();
        let _ = self.sshd.kill();
        let _ = self.sshd.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A host running the plugin alone, and a client that speaks to it as
/// dockerd does (activated).
pub fn plugin_host(name: &str) -> (Host, PluginClient) {
    let mut host = Host::new(name);
    host.start_plugin();
    let c = PluginClient::new(&host.inside(Path::new("/run/docker/plugins/sharedloop.sock")));
    let act = c.ok("Plugin.Activate", serde_json::json!(null));
    assert_eq!(act["Implements"], serde_json::json!(["GraphDriver"]));
    (host, c)
}

/// GraphDriver.Init with the host's root and fallback plus `extra`
/// options, home `<host>/home`.
pub fn init_plugin(host: &Host, c: &PluginClient, extra: &[&str]) {
    fs::create_dir_all(host.root_dir()).unwrap();
    let mut opts: Vec<String> = host.default_storage_opts();
    opts.extend(extra.iter().map(|s| s.to_string()));
    c.ok(
        "GraphDriver.Init",
        serde_json::json!({"Home": host.dir.join("home"), "Opts": opts, "UIDMaps": null, "GIDMaps": null}),
    );
    let caps = c.ok("GraphDriver.Capabilities", serde_json::json!({}));
    assert_eq!(caps["Capabilities"]["ReproducesExactDiffs"], serde_json::json!(false));
}

/// Waits, at most a minute (a bound for a hung test, not a timing claim),
/// for `done`; panics with `what` when it does not come.
pub fn await_or_fail(what: &str, mut done: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < end, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The writable layers in a driver home `home` (`rw/<id>`; removals in
/// progress, `rw/.rm-*`, left out): each one's path, whether it is a
/// directory layer (`dir/`) and whether it has an image (`rw.img`).
pub fn rw_layers(home: &Path) -> Vec<(PathBuf, bool, bool)> {
    fs::read_dir(home.join("rw"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| {
            let p = e.path();
            let (dir, img) = (p.join("dir").is_dir(), p.join("rw.img").is_file());
            (p, dir, img)
        })
        .collect()
}
