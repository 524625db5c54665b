//! `sharedloop doctor` on simulated hosts broken on purpose: each test
//! asserts the line of the check that names the problem, and the exit
//! status (0 when the host can serve, 1 when a check fails).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

struct Doctor {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Doctor {
    /// The line of `check` (the first one).
    fn line(&self, check: &str) -> &str {
        let tail = format!(" {check}: ");
        self.stdout
            .lines()
            .find(|l| l.get(4..).is_some_and(|r| r.starts_with(&tail)))
            .unwrap_or_else(|| panic!("no {check} line in:\n{}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// A root on a filesystem of its own (a tmpfs mounted inside the host),
/// a fallback directory, sharedloop's and containerd's config files that
/// are right.
fn healthy(name: &str, opts: HostOpts) -> Host {
    let host = Host::with(name, opts);
    fs::create_dir_all(host.root_dir()).unwrap();
    fs::create_dir_all(host.fallback_dir()).unwrap();
    run_ok(host.cmd("mount").args(["-t", "tmpfs", "tmpfs"]).arg(host.root_dir()));
    fs::write(host.dir.join("sharedloop.toml"), "").unwrap();
    fs::write(
        host.dir.join("containerd.toml"),
        "version = 2\n[proxy_plugins]\n  [proxy_plugins.sharedloop]\n    type = \"snapshot\"\n    \
         address = \"/run/sharedloop/containerd.sock\"\n\
         [plugins.\"io.containerd.transfer.v1.local\"]\n  \
         unpack_config = [{ platform = \"linux/amd64\", snapshotter = \"sharedloop\" }]\n",
    )
    .unwrap();
    host
}

/// `sharedloop doctor` inside the host with its config files, its root
/// and fallback (unless `extra` names others), then `extra`; `env` as
/// `NAME=value` for sharedloop only (not for nsenter).
fn doctor_env(host: &Host, extra: &[&str], env: &[&str]) -> Doctor {
    let mut args: Vec<String> = vec![
        "doctor".into(),
        "--config".into(),
        host.dir.join("sharedloop.toml").display().to_string(),
        "--containerd-config".into(),
        host.dir.join("containerd.toml").display().to_string(),
    ];
    for (flag, dir) in [("--root", host.root_dir()), ("--fallback", host.fallback_dir())] {
        if !extra.contains(&flag) {
            args.extend([flag.to_owned(), dir.display().to_string()]);
        }
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run(host.cmd("/usr/bin/env").args(env).arg(sharedloop_bin()).args(&args));
    Doctor {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn doctor(host: &Host, extra: &[&str]) -> Doctor {
    doctor_env(host, extra, &[])
}

#[test]
fn a_healthy_host_is_all_ok_and_json_matches_the_text() {
    require(&["ext4", "overlay"]);
    let host = healthy("doctor-ok", HostOpts::default());
    let d = doctor(&host, &[]);
    assert_eq!(d.code, 0, "{}\n{}", d.stdout, d.stderr);
    for l in d.stdout.lines() {
        assert!(l.starts_with("ok   "), "not ok: {l}\nall:\n{}", d.stdout);
    }
    for check in [
        "kernel openat2",
        "kernel LOOP_CONFIGURE",
        "kernel overlayfs",
        "kernel overlayfs lowerdir+",
        "kernel ext4",
        "loop devices",
        "tools mkfs.ext4",
        "root",
        "root placement",
        "root mount options",
        "fallback",
        "clock",
        "containerd",
        "docker plugin socket",
    ] {
        d.line(check);
    }
    assert!(d.line("clock").contains("no other hosts"), "{}", d.stdout);
    // The probes leave nothing behind: no loop device of a probe file, no
    // overlay mount, no scratch directory.
    assert!(!host.mountinfo().contains("sharedloop-probe"), "{}", host.mountinfo());
    assert!(loops_under(Path::new("/tmp")).iter().all(|(_, b)| !b.to_string_lossy().contains("sharedloop-probe")));

    let j = doctor(&host, &["--json"]);
    assert_eq!(j.code, 0, "{}", j.stderr);
    let v: serde_json::Value = serde_json::from_str(&j.stdout).expect("doctor --json is JSON");
    let lines: Vec<String> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap_or_else(|| panic!("{k} in {c}")).to_owned();
            let tag = match s("status").as_str() {
                "ok" => "ok  ",
                "warn" => "warn",
                "fail" => "FAIL",
                other => panic!("status {other}"),
            };
            if s("fix").is_empty() {
                format!("{tag} {}: {}", s("check"), s("detail"))
            } else {
                format!("{tag} {}: {} — {}", s("check"), s("detail"), s("fix"))
            }
        })
        .collect();
    // The LOOP_CONFIGURE probe and the free device name the device it got.
    let norm = |l: &str| l.split("/dev/loop").next().unwrap_or("").to_owned();
    let text: Vec<String> = d.stdout.lines().map(norm).collect();
    let json: Vec<String> = lines.iter().map(|l| norm(l)).collect();
    assert_eq!(text, json);
}

#[test]
fn a_missing_root_warns_that_new_layers_go_to_fallback() {
    require(&["ext4", "overlay"]);
    let host = healthy("doctor-noroot", HostOpts::default());
    let missing = host.dir.join("no-such-root");
    let d = doctor(&host, &["--root", missing.to_str().unwrap()]);
    let l = d.line("root");
    assert!(l.starts_with("warn") && l.contains("does not exist") && l.contains("new layers go to fallback"), "{l}");
    assert_eq!(d.code, 0, "a missing root is a fallback, not a failure:\n{}", d.stdout);
}

#[test]
fn a_read_only_fallback_fails() {
    require(&["ext4", "overlay"]);
    let fb = PathBuf::from(TEST_ROOT).join(format!("doctor-rofb-{}", std::process::id()));
    fs::create_dir_all(&fb).unwrap();
    let host = healthy("doctor-rofb", HostOpts { binds: vec![(fb.clone(), fb.clone(), true)], ..Default::default() });
    let d = doctor(&host, &["--fallback", fb.to_str().unwrap()]);
    let l = d.line("fallback");
    assert!(l.starts_with("FAIL") && l.contains("not writable") && l.contains("Read-only file system"), "{l}");
    assert_eq!(d.code, 1, "{}", d.stdout);
    let _ = fs::remove_dir(&fb);
}

#[test]
fn no_loop_devices_fails() {
    require(&["ext4", "overlay"]);
    let host = healthy("doctor-noloop", HostOpts::default());
    run_ok(host.cmd("sh").args(["-c", "mount -t tmpfs tmpfs /dev && mknod -m 666 /dev/null c 1 3"]));
    let d = doctor(&host, &[]);
    let l = d.line("loop devices");
    assert!(l.starts_with("FAIL") && l.contains("no /dev/loop-control") && l.contains("modprobe loop"), "{l}");
    assert!(d.line("kernel LOOP_CONFIGURE").starts_with("warn"), "{}", d.stdout);
    assert_eq!(d.code, 1, "{}", d.stdout);
}

#[test]
fn xfs_without_mkfs_xfs_fails() {
    require(&["ext4", "overlay"]);
    let host = healthy("doctor-nomkfs", HostOpts::default());
    let empty = host.dir.join("empty-bin");
    fs::create_dir_all(&empty).unwrap();
    let d = doctor_env(&host, &["-o", "sharedloop.fs=xfs"], &[&format!("PATH={}", empty.display())]);
    let l = d.line("tools mkfs.xfs");
    assert!(l.starts_with("FAIL") && l.contains("mkfs.xfs not in PATH") && l.contains("xfsprogs"), "{l}");
    assert!(d.line("tools xfs_repair").starts_with("warn"), "{}", d.stdout);
    assert_eq!(d.code, 1, "{}", d.stdout);
}

#[test]
fn a_heartbeat_from_the_future_warns_of_clock_skew() {
    require(&["ext4", "overlay"]);
    let host = healthy("doctor-skew", HostOpts::default());
    let hosts = host.inside(&host.root_dir()).join("hosts");
    fs::create_dir_all(&hosts).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    fs::write(
        hosts.join("farhost-1234"),
        format!(
            "{{\"host_id\":\"farhost-1234\",\"hostname\":\"farhost\",\"heartbeat_unix\":{},\"interval_secs\":30}}",
            now + 3600
        ),
    )
    .unwrap();
    let d = doctor(&host, &[]);
    let l = d.line("clock");
    assert!(l.starts_with("warn") && l.contains("host farhost") && l.contains("in the future"), "{l}");
    assert_eq!(d.code, 0, "clock skew is a warning:\n{}", d.stdout);
}

#[test]
fn a_world_writable_plugin_socket_fails() {
    require(&["ext4", "overlay"]);
    let mut host = healthy("doctor-sock", HostOpts::default());
    host.start_serve(&[], &[]);
    let sock = Path::new("/run/docker/plugins/sharedloop.sock");
    let ok = doctor(&host, &[]);
    assert!(ok.line("docker plugin socket").starts_with("ok   ") && ok.line("docker plugin socket").contains("0600"));
    run_ok(host.cmd("chmod").arg("0666").arg(sock));
    let d = doctor(&host, &[]);
    let l = d.line("docker plugin socket");
    assert!(l.starts_with("FAIL") && l.contains("mode 0666") && l.contains("chmod 0600"), "{l}");
    assert_eq!(d.code, 1, "{}", d.stdout);
}
