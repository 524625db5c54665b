//! The Debian package (scripts/build-deb): installed, upgraded with the
//! daemon and a container running, removed and purged by the real dpkg,
//! inside a simulated host whose /usr, /etc, /var/lib and /var/log are
//! overlays ([`HostOpts::overlay_system`]): this machine's own files and
//! package database stay as they were.
//!
//! The package comes from `SHAREDLOOP_DEB` (scripts/test builds it first);
//! without it the test runs scripts/build-deb itself (a release build).
//! The newer version is the same binary repackaged with a version suffix.

mod common;
use common::*;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// The package under test, built once per test binary unless given.
fn deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        if let Some(p) = std::env::var_os("SHAREDLOOP_DEB") {
            let p = repo().join(p); // a relative path is the repository's
            assert!(p.is_file(), "SHAREDLOOP_DEB={} is not a file", p.display());
            return p;
        }
        // Swept (as hosts' directories are) once this process is gone.
        let out = PathBuf::from(TEST_ROOT).join(format!("debs-{}", std::process::id()));
        fs::create_dir_all(&out).unwrap();
        fs::write(out.join("owner"), std::process::id().to_string()).unwrap();
        let path = run_ok(Command::new(repo().join("scripts/build-deb")).env("DEB_OUT", &out));
        PathBuf::from(path.trim())
    })
    .clone()
}

fn deb_field(deb: &Path, field: &str) -> String {
    run_ok(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field)).trim().to_owned()
}

/// The same package with version `<version><suffix>`, into `out`.
fn newer_deb(deb: &Path, suffix: &str, out: &Path) -> PathBuf {
    let x = out.join("x");
    fs::create_dir_all(&x).unwrap();
    run_ok(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&x));
    let path = run_ok(
        Command::new(repo().join("scripts/build-deb"))
            .env("SHAREDLOOP_BIN", x.join("usr/sbin/sharedloop"))
            .env("VERSION", deb_field(deb, "Version"))
            .env("VERSION_SUFFIX", suffix)
            .env("DEB_OUT", out),
    );
    PathBuf::from(path.trim())
}

/// Runs `dpkg args` inside the host; panics with its output on failure.
fn dpkg(host: &Host, args: &[&str]) -> String {
    let out = run(host.cmd("dpkg").args(args).stdin(Stdio::null()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "dpkg {args:?} failed ({}):\n{text}", out.status);
    text
}

/// `${Status} ${Version}` of the sharedloop package, as dpkg inside
/// `host` (or this machine's, without one) knows it.
fn pkg_status(host: Option<&Host>) -> String {
    let mut c = match host {
        Some(h) => h.cmd("dpkg-query"),
        None => Command::new("dpkg-query"),
    };
    let out = run(c.args(["-W", "-f=${Status} ${Version}", "sharedloop"]));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The pids (in the host's PID namespace) of its live `sharedloop`
/// processes. (A daemon the postinst started is a child of the host's
/// init, which does not reap: once stopped it stays a zombie.)
fn daemons(host: &Host) -> Vec<String> {
    let out = run(host.cmd("pgrep").args(["-x", "sharedloop"]));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|pid| {
            let stat = fs::read_to_string(host.inside(&Path::new("/proc").join(pid).join("stat"))).unwrap_or_default();
            stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z'))
        })
        .map(str::to_owned)
        .collect()
}

fn cmdline(host: &Host, pid: &str) -> String {
    fs::read(host.inside(&Path::new("/proc").join(pid).join("cmdline")))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim().to_owned())
        .unwrap_or_default()
}

/// Every file under `dir` with its size and modification time (the
/// published layers' never change).
fn listing(dir: &Path) -> Vec<String> {
    fn walk(d: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(d).unwrap().flatten() {
            let m = e.path().symlink_metadata().unwrap();
            if m.is_dir() {
                walk(&e.path(), out);
            } else {
                out.push(format!("{} {} {}", e.path().display(), m.len(), m.mtime()));
            }
        }
    }
    let mut v = Vec::new();
    walk(dir, &mut v);
    v.sort();
    v
}

/// What this machine's own installation looks like (must not change).
fn machine_state() -> String {
    let meta = |p: &str| {
        fs::symlink_metadata(p).map(|m| format!("{p}: {} {} {}", m.ino(), m.len(), m.mtime())).unwrap_or_default()
    };
    format!(
        "{}\n{}\n{}\n{}",
        pkg_status(None),
        meta("/usr/sbin/sharedloop"),
        meta("/etc/sharedloop/config.toml"),
        meta("/var/lib/dpkg/status")
    )
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn package_installs_restarts_the_daemon_on_upgrade_removes_and_purges_keeping_the_store() {
    require(&["dockerd", "busybox", "overlay", "dpkg-deb", "dpkg"]);
    let deb1 = deb();
    let before = machine_state();
    let mut host = Host::with("package", HostOpts { default_paths: true, overlay_system: true, ..Default::default() });
    let mountinfo = host.mountinfo();
    for d in ["/usr", "/etc", "/var/lib", "/var/log"] {
        assert!(
            mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(d) && l.contains(" - overlay ")),
            "{d} is not an overlay in the test host: dpkg would change this machine\n{mountinfo}"
        );
    }
    // This machine may have the package (scripts/setup installs it): the
    // host starts from none.
    if !pkg_status(Some(&host)).is_empty() {
        dpkg(&host, &["--purge", "sharedloop"]);
    }
    let root = host.inside(Path::new("/"));
    let at = |p: &str| root.join(p.trim_start_matches('/'));

    // Install.
    dpkg(&host, &["-i", deb1.to_str().unwrap()]);
    let v1 = deb_field(&deb1, "Version");
    assert_eq!(pkg_status(Some(&host)), format!("install ok installed {v1}"));
    let version = run_ok(host.cmd("/usr/sbin/sharedloop").arg("--version"));
    assert!(version.starts_with("sharedloop "), "{version}");
    for f in [
        "/usr/share/man/man8/sharedloop.8.gz",
        "/lib/systemd/system/sharedloop.service",
        "/usr/share/sharedloop/docker-sharedloop.conf",
        "/usr/share/sharedloop/containerd-sharedloop.conf",
        "/usr/share/bash-completion/completions/sharedloop",
        "/usr/share/zsh/vendor-completions/_sharedloop",
        "/usr/share/fish/vendor_completions.d/sharedloop.fish",
        "/usr/share/doc/sharedloop/copyright",
        "/usr/share/doc/sharedloop/changelog.Debian.gz",
        "/etc/sharedloop/config.toml",
    ] {
        assert!(at(f).is_file(), "{f} is not installed");
    }
    let unit = fs::read_to_string(at("/lib/systemd/system/sharedloop.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/sharedloop serve"), "{unit}");
    let bash = fs::read_to_string(at("/usr/share/bash-completion/completions/sharedloop")).unwrap();
    assert!(bash.contains("serve") && bash.contains("verify"), "bash completion lacks subcommands");
    let conffiles = run_ok(host.cmd("dpkg-query").args(["-W", "-f=${Conffiles}", "sharedloop"]));
    assert!(conffiles.contains("/etc/sharedloop/config.toml"), "not a conffile: {conffiles}");
    if Path::new("/usr/bin/deb-systemd-helper").exists() {
        assert!(
            at("/etc/systemd/system/multi-user.target.wants/sharedloop.service").is_symlink(),
            "sharedloop.service is not enabled"
        );
    }
    // No systemd in the host (its /run is new): nothing was started.
    assert_eq!(daemons(&host), Vec::<String>::new(), "installing started a daemon without systemd");
    assert_eq!(machine_state(), before, "installing in the host changed this machine");

    // The packaged daemon with the packaged config (Docker plugin and
    // containerd snapshotter), dockerd on the default store, a container.
    fs::create_dir_all(host.dir.join("varlib/loopback/root")).unwrap();
    let serve_log = fs::File::create(host.dir.join("serve.log")).unwrap();
    let mut serve = host
        .cmd("/usr/sbin/sharedloop")
        .args(["serve", "--log-level", "debug"])
        .env("SHAREDLOOP_TEST_MARK", "kept")
        .stdin(Stdio::null())
        .stdout(serve_log.try_clone().unwrap())
        .stderr(serve_log)
        .spawn()
        .unwrap();
    let plugin_sock = at("/run/docker/plugins/sharedloop.sock");
    let snap_sock = at("/run/sharedloop/containerd.sock");
    wait_for("the packaged daemon's sockets", || plugin_sock.exists() && snap_sock.exists());
    let old = daemons(&host);
    assert_eq!(old.len(), 1, "{old:?}");
    host.start_dockerd(&[]);
    let rootfs = host.dir.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = host.dir.join("img.tar");
    docker_archive(&base_layers(&rootfs), "multi:1", &archive);
    host.docker_stdin(&["load"], &archive);
    host.docker_ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "kept",
        "multi:1",
        "sh",
        "-c",
        "echo kept > /mine; sleep 1000",
    ]);
    wait_for("the container's file", || host.docker(&["exec", "kept", "cat", "/mine"]).stdout == b"kept\n");
    let store = host.dir.join("varlib/loopback");
    let store_before = listing(&store);
    let published =
        |v: &[String]| v.iter().filter(|l| l.contains("/loopback/root/layers/")).cloned().collect::<Vec<_>>();
    assert!(!published(&store_before).is_empty(), "no layer in the root: {store_before:?}");

    // Upgrade: postinst restarts the running daemon (no systemd) with the
    // same arguments; the container keeps running.
    let debs = host.dir.join("debs");
    let deb2 = newer_deb(&deb1, "+1", &debs);
    let v2 = deb_field(&deb2, "Version");
    let out = dpkg(&host, &["-i", deb2.to_str().unwrap()]);
    assert_eq!(pkg_status(Some(&host)), format!("install ok installed {v2}"));
    assert!(out.contains("restarting sharedloop serve"), "{out}");
    let _ = serve.wait(); // the old daemon, stopped by the postinst
    let new = daemons(&host);
    assert_eq!(new.len(), 1, "{new:?}");
    assert_ne!(new, old, "the daemon was not restarted");
    assert_eq!(cmdline(&host, &new[0]), "/usr/sbin/sharedloop serve --log-level debug");
    let environ = fs::read(host.inside(&Path::new("/proc").join(&new[0]).join("environ"))).unwrap();
    assert!(String::from_utf8_lossy(&environ).contains("SHAREDLOOP_TEST_MARK=kept"), "environment not kept");
    assert!(plugin_sock.exists() && snap_sock.exists(), "the restarted daemon's sockets are missing");
    let log = fs::read_to_string(at("/var/log/sharedloop.log")).unwrap_or_default();
    assert!(log.contains("restored the driver"), "restarted daemon's log:\n{log}");
    assert_eq!(host.docker_ok(&["ps", "-q"]).lines().count(), 1, "the container died with the upgrade");
    assert_eq!(host.docker_ok(&["exec", "kept", "cat", "/mine"]), "kept\n");
    let hello = host.docker_ok(&["run", "--rm", "--network", "none", "multi:1", "echo", "hello"]);
    assert_eq!(hello, "hello\n");

    // Remove: the daemon stops, the binary goes, the config stays.
    dpkg(&host, &["-r", "sharedloop"]);
    assert_eq!(pkg_status(Some(&host)), format!("deinstall ok config-files {v2}"));
    wait_for("the daemon to stop", || daemons(&host).is_empty());
    assert!(!at("/usr/sbin/sharedloop").exists(), "the binary is still installed");
    assert!(at("/etc/sharedloop/config.toml").is_file(), "remove took the config");

    // Purge: the config goes; the store stays.
    dpkg(&host, &["-P", "sharedloop"]);
    assert_eq!(pkg_status(Some(&host)), "");
    assert!(!at("/etc/sharedloop").exists(), "purge left /etc/sharedloop");
    assert!(!at("/etc/systemd/system/multi-user.target.wants/sharedloop.service").is_symlink());
    let store_after = listing(&store);
    assert_eq!(published(&store_after), published(&store_before), "the store's layers changed");
    assert!(at("/var/lib/sharedloop").is_dir(), "purge removed the snapshotter's state");

    host.stop_dockerd();
    drop(host);
    assert_eq!(machine_state(), before, "the package test changed this machine");
}
