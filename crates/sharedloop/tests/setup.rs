//! `scripts/setup` on the machines it meets, each a simulated host whose
//! /usr, /etc, /var/lib and /var/log are overlays (this machine's own
//! files stay as they were):
//! - one that already runs Docker 28 and containerd 2.x (installed as
//!   static binaries in /usr/local/bin, from `scripts/fetch-engines`'s sid
//!   tree) with configuration files of its own: setup wires sharedloop in
//!   through containerd and Docker's containerd image store, merges into
//!   both files with a backup, restarts both daemons with the arguments
//!   they ran with, replaces no engine, and runs a container on sharedloop;
//! - one that runs containerd 1.7 and no Docker: sharedloop as
//!   containerd's snapshotter, the demo container run with `ctr`;
//! - Debian 12 with its Docker 20.10: the graphdriver plugin, as the spec
//!   has it.
//!
//! The package comes from `SHAREDLOOP_DEB` (scripts/test builds it first).

mod common;
use common::engines::suite_tree;
use common::*;

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn deb() -> String {
    let p = std::env::var("SHAREDLOOP_DEB")
        .expect("SHAREDLOOP_DEB must name the package to install (scripts/test sets it; scripts/build-deb makes one)");
    let p = repo().join(p);
    assert!(p.is_file(), "SHAREDLOOP_DEB={} is not a file", p.display());
    p.display().to_string()
}

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What this machine's own engines and their configs look like.
fn machine_state() -> String {
    ["/etc/docker/daemon.json", "/etc/containerd/config.toml", "/var/lib/dpkg/status", "/usr/sbin/dockerd"]
        .iter()
        .map(|p| fs::metadata(p).map(|m| format!("{p}: {} {} {}\n", m.ino(), m.len(), m.mtime())).unwrap_or_default())
        .collect()
}

fn system_host(name: &str) -> Host {
    require(&["busybox", "overlay", "dpkg", "perl"]);
    let host = Host::with(name, HostOpts { default_paths: true, overlay_system: true, ..Default::default() });
    let mountinfo = host.mountinfo();
    for d in ["/usr", "/etc", "/var/lib", "/var/log"] {
        assert!(
            mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(d) && l.contains(" - overlay ")),
            "{d} is not an overlay in the test host: setup would change this machine"
        );
    }
    host
}

/// Runs scripts/setup inside `host`; its output, both streams.
fn setup(host: &Host) -> String {
    let out = run(host
        .cmd(repo().join("scripts/setup"))
        .env("SHAREDLOOP_DEB", deb())
        .env("PATH", format!("{PATH}:{}/.cargo/bin", std::env::var("HOME").unwrap_or_default()))
        .stdin(Stdio::null()));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        let logs: String = ["dockerd", "containerd", "sharedloop"]
            .iter()
            .map(|d| {
                let l = fs::read_to_string(host.inside(Path::new(&format!("/var/log/{d}.log")))).unwrap_or_default();
                format!("--- /var/log/{d}.log (tail) ---\n{}\n", tail(&l, 25))
            })
            .collect();
        panic!("scripts/setup failed ({}):\n{text}\n{logs}", out.status);
    }
    text
}

/// Starts `argv` in `host` in the background, as an admin would have;
/// reap the child once the host is gone.
fn start_daemon(host: &Host, argv: &[&str], log: &str) -> std::process::Child {
    let log = fs::File::create(host.dir.join(log)).unwrap();
    host.cmd(argv[0])
        .args(&argv[1..])
        .env("PATH", PATH)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(90), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pid in `host` of the process named `name` (newest).
fn pid_of(host: &Host, name: &str) -> Option<String> {
    let out = run(host.cmd("pgrep").args(["-n", "-x", name]));
    let p = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (!p.is_empty()).then_some(p)
}

fn cmdline(host: &Host, pid: &str) -> String {
    fs::read(host.inside(&Path::new("/proc").join(pid).join("cmdline")))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim().to_owned())
        .unwrap_or_default()
}

#[test]
fn setup_wires_sharedloop_into_a_running_docker_28_through_containerd() {
    let sid = suite_tree("sid");
    let before = machine_state();
    let host = system_host("setup-docker28");
    let at = |p: &str| host.inside(Path::new(p));

    // Docker 28 and containerd 2.x as static binaries, running, with the
    // site's own configuration.
    let bins = [
        "usr/sbin/dockerd",
        "usr/sbin/docker-proxy",
        "usr/bin/docker",
        "usr/bin/containerd",
        "usr/bin/ctr",
        "usr/bin/containerd-shim-runc-v2",
    ];
    for b in bins {
        let name = Path::new(b).file_name().unwrap();
        fs::copy(sid.join(b), at("/usr/local/bin").join(name)).unwrap();
    }
    let dockerd_before = fs::read(at("/usr/local/bin/dockerd")).unwrap();
    fs::create_dir_all(at("/etc/containerd")).unwrap();
    let ctrd_cfg = "# site settings: keep\nversion = 3\n\n[debug]\n  level = \"info\"\n";
    fs::write(at("/etc/containerd/config.toml"), ctrd_cfg).unwrap();
    fs::create_dir_all(at("/etc/docker")).unwrap();
    let daemon_json = "{\n  \"log-level\": \"warn\",\n  \"default-shm-size\": \"128M\"\n}\n";
    fs::write(at("/etc/docker/daemon.json"), daemon_json).unwrap();
    let ctrd = start_daemon(&host, &["/usr/local/bin/containerd"], "containerd-site.log");
    wait_for("containerd", || at("/run/containerd/containerd.sock").exists());
    let dockerd = start_daemon(
        &host,
        &[
            "/usr/local/bin/dockerd",
            "--iptables=false",
            "--ip6tables=false",
            "--containerd=/run/containerd/containerd.sock",
        ],
        "dockerd-site.log",
    );
    let docker = |args: &[&str]| run(host.cmd("/usr/local/bin/docker").args(args).env("PATH", PATH));
    wait_for("dockerd 28", || docker(&["version"]).status.success());
    let old_dockerd = pid_of(&host, "dockerd").unwrap();

    let out = setup(&host);
    eprintln!("--- setup ---\n{out}");
    assert!(out.contains("dockerd 28, containerd 2: using the docker-containerd path"), "{out}");
    assert!(out.contains("changed: [proxy_plugins.sharedloop] address"), "setup says what it changed:\n{out}");
    assert!(out.contains("changed: features.containerd-snapshotter = true"), "{out}");
    assert!(out.contains("restarting containerd") && out.contains("restarting docker"), "{out}");
    assert!(out.contains("hello from a container on sharedloop"), "{out}");

    // The engines are the site's, untouched; their configs merged, with
    // the originals kept.
    assert_eq!(fs::read(at("/usr/local/bin/dockerd")).unwrap(), dockerd_before, "dockerd was replaced");
    let v = run_ok(host.cmd("/usr/local/bin/dockerd").arg("--version"));
    assert!(v.starts_with("Docker version 28."), "{v}");
    assert_eq!(fs::read_to_string(at("/etc/containerd/config.toml.before-sharedloop")).unwrap(), ctrd_cfg);
    assert_eq!(fs::read_to_string(at("/etc/docker/daemon.json.before-sharedloop")).unwrap(), daemon_json);
    let cfg = fs::read_to_string(at("/etc/containerd/config.toml")).unwrap();
    assert!(cfg.starts_with(ctrd_cfg), "the site's config is kept as it was, then added to:\n{cfg}");
    let doc: toml::Value = toml::from_str(&cfg).unwrap();
    assert_eq!(doc["proxy_plugins"]["sharedloop"]["address"].as_str(), Some("/run/sharedloop/containerd.sock"));
    let unpack = doc["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"].as_array().unwrap();
    assert!(unpack.iter().any(|u| u["snapshotter"].as_str() == Some("sharedloop")), "{cfg}");
    let dj: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(at("/etc/docker/daemon.json")).unwrap()).unwrap();
    assert_eq!(dj["log-level"], "warn");
    assert_eq!(dj["default-shm-size"], "128M");
    assert_eq!(dj["storage-driver"], "sharedloop");
    assert_eq!(dj["features"]["containerd-snapshotter"], true);

    // dockerd was restarted with the arguments it had.
    let new_dockerd = pid_of(&host, "dockerd").unwrap();
    assert_ne!(new_dockerd, old_dockerd, "dockerd was not restarted");
    assert_eq!(
        cmdline(&host, &new_dockerd),
        "/usr/local/bin/dockerd --iptables=false --ip6tables=false --containerd=/run/containerd/containerd.sock"
    );
    let info = docker(&["info", "--format", "{{.Driver}}|{{json .DriverStatus}}"]);
    let info = String::from_utf8_lossy(&info.stdout).into_owned();
    assert!(info.starts_with("sharedloop|") && info.contains("io.containerd.snapshotter"), "{info}");

    // A container of Docker 28 on sharedloop's layer mounts.
    assert!(docker(&["run", "-d", "--name", "kept", "--network", "none", "sharedloop-demo", "sleep", "1000"])
        .status
        .success());
    // (Its first lower is its init layer's upper, kept on the host; the
    // image's layer mount is below it.)
    let mi = host.mountinfo();
    let on_layers = |l: &str| {
        l.contains(" - overlay ")
            && l.split(',')
                .filter_map(|o| o.strip_prefix("lowerdir="))
                .any(|lower| lower.split(':').any(|d| d.starts_with("/run/sharedloop/layers/")))
    };
    assert!(mi.lines().any(on_layers), "the container's root is not on sharedloop's layers:\n{mi}");
    assert!(docker(&["rm", "-f", "kept"]).status.success());

    // Again: nothing to change, the same result.
    let out = setup(&host);
    assert!(out.contains("/etc/containerd/config.toml: already configured for sharedloop; unchanged"), "{out}");
    assert!(out.contains("/etc/docker/daemon.json: already configured for sharedloop; unchanged"), "{out}");
    assert!(out.contains("hello from a container on sharedloop"), "{out}");
    assert_eq!(fs::read_to_string(at("/etc/docker/daemon.json.before-sharedloop")).unwrap(), daemon_json);
    drop(host);
    for mut c in [ctrd, dockerd] {
        let _ = c.wait();
    }
    assert_eq!(machine_state(), before, "setup in the host changed this machine");
}

#[test]
fn setup_wires_sharedloop_into_containerd_without_docker() {
    let trixie = suite_tree("trixie");
    let before = machine_state();
    let host = system_host("setup-ctrd17");
    let at = |p: &str| host.inside(Path::new(p));
    // No Docker on this machine (the host's /usr is an overlay: the
    // whiteout hides this machine's dockerd in the host only), containerd
    // 1.7 installed as static binaries, running with the site's config.
    fs::remove_file(at("/usr/sbin/dockerd")).unwrap();
    for b in ["containerd", "ctr", "containerd-shim-runc-v2"] {
        fs::copy(trixie.join("usr/bin").join(b), at("/usr/local/bin").join(b)).unwrap();
    }
    fs::create_dir_all(at("/etc/containerd")).unwrap();
    let site = "version = 2\noom_score = -100\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"site.local/pause:3.9\"\n";
    fs::write(at("/etc/containerd/config.toml"), site).unwrap();
    let ctrd = start_daemon(&host, &["/usr/local/bin/containerd"], "containerd-site.log");
    wait_for("containerd", || at("/run/containerd/containerd.sock").exists());

    let out = setup(&host);
    eprintln!("--- setup ---\n{out}");
    assert!(out.contains("dockerd none, containerd 1: using the containerd path"), "{out}");
    assert!(out.contains("changed: [proxy_plugins.sharedloop] address"), "{out}");
    assert!(!out.contains("unpack_config"), "containerd 1.7 needs no unpack_config:\n{out}");
    assert!(out.contains("restarting containerd"), "{out}");
    assert!(out.contains("hello from a container on sharedloop"), "{out}");
    assert!(!at("/etc/docker/daemon.json.before-sharedloop").exists(), "no Docker, no daemon.json change");
    let cfg = fs::read_to_string(at("/etc/containerd/config.toml")).unwrap();
    assert!(cfg.starts_with(site), "{cfg}");
    assert_eq!(fs::read_to_string(at("/etc/containerd/config.toml.before-sharedloop")).unwrap(), site);
    let ctr = |args: &[&str]| run_ok(host.cmd("/usr/local/bin/ctr").args(["--namespace", "default"]).args(args));
    assert!(ctr(&["image", "ls", "-q"]).lines().any(|l| l == "docker.io/library/sharedloop-demo:latest"));
    let snaps = ctr(&["snapshots", "--snapshotter", "sharedloop", "ls"]);
    assert_eq!(snaps.lines().skip(1).count(), 1, "the demo's one layer is a sharedloop snapshot:\n{snaps}");
    let layers = fs::read_dir(host.dir.join("varlib/loopback/root/layers")).unwrap().count();
    assert_eq!(layers, 1, "the demo's layer is published in the default root");

    // Again: unchanged, no restart, the demo runs.
    let out = setup(&host);
    assert!(out.contains("/etc/containerd/config.toml: already configured for sharedloop; unchanged"), "{out}");
    assert!(!out.contains("restarting containerd"), "{out}");
    assert!(out.contains("hello from a container on sharedloop"), "{out}");
    drop(host);
    let _ = { ctrd }.wait();
    assert_eq!(machine_state(), before, "setup in the host changed this machine");
}

#[test]
fn setup_on_debian_12_uses_the_graphdriver_plugin_and_merges_daemon_json() {
    require(&["dockerd"]);
    let v = run_ok(Command::new("/usr/sbin/dockerd").arg("--version"));
    assert!(v.starts_with("Docker version 20."), "this test is about Debian 12's Docker 20.10: {v}");
    let before = machine_state();
    let host = system_host("setup-deb12");
    let at = |p: &str| host.inside(Path::new(p));
    // The site's daemon.json, to be merged into.
    fs::create_dir_all(at("/etc/docker")).unwrap();
    fs::write(at("/etc/docker/daemon.json"), "{ \"log-level\": \"warn\" }\n").unwrap();

    let out = setup(&host);
    eprintln!("--- setup ---\n{out}");
    assert!(out.contains("dockerd 20, containerd 1: using the docker-plugin path"), "{out}");
    assert!(out.contains("hello from a container on sharedloop"), "{out}");
    assert!(out.contains("Storage Driver: sharedloop") && out.contains("Loopback Root Directory"), "{out}");
    let dj: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(at("/etc/docker/daemon.json")).unwrap()).unwrap();
    assert_eq!((dj["log-level"].as_str(), dj["storage-driver"].as_str()), (Some("warn"), Some("sharedloop")));
    assert_eq!(dj["experimental"], true);
    assert!(at("/var/lib/docker/loopback/root/layers").is_dir(), "the demo's layer is in the default root");
    drop(host);
    assert_eq!(machine_state(), before, "setup in the host changed this machine");
}
