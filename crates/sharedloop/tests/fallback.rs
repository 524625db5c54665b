//! The spec's fallback rules under a real dockerd: a layer is looked up in
//! root, then fallback; it is created in root, and in fallback when root
//! is missing, read-only or not writable.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

fn layers_in(dir: &Path) -> usize {
    fs::read_dir(dir.join("layers")).map(|d| d.count()).unwrap_or(0)
}

fn load_image(host: &Host, layers: Vec<LayerSpec>, tag: &str) {
    let archive = host.dir.join(format!("{}.tar", tag.replace(':', "-")));
    docker_archive(&layers, tag, &archive);
    host.docker_stdin(&["load"], &archive);
}

fn base(host: &Host) -> LayerSpec {
    let rootfs = host.dir.join("rootfs");
    if !rootfs.exists() {
        busybox_rootfs(&rootfs);
    }
    LayerSpec { rootfs: Some(rootfs), ..Default::default() }
}

fn one_file(name: &str) -> LayerSpec {
    LayerSpec { files: vec![(name.into(), name.as_bytes().to_vec(), 0o644, 0, 0)], ..Default::default() }
}

/// On the spec's defaults, with /var/lib/docker/loopback/root absent:
/// layers go to /var/lib/docker/loopback/private and docker info says so.
#[test]
fn fallback_root_missing_on_default_paths() {
    require(&["dockerd", "busybox", "overlay"]);
    let mut host = Host::with("missing", HostOpts { default_paths: true, ..Default::default() });
    host.start_plugin();
    if let Err(e) = host.try_start_dockerd(&[], None) {
        panic!("{e}");
    }
    let status = host.driver_status();
    assert!(status.contains("Loopback Root Directory: /var/lib/docker/loopback/root\n"), "{status}");
    assert!(status.contains("Loopback Fallback Directory: /var/lib/docker/loopback/private\n"), "{status}");
    assert!(status.contains("Backing Filesystem: "), "{status}");
    let b = base(&host);
    load_image(&host, vec![b, one_file("f1")], "img:1");
    let varlib = host.dir.join("varlib");
    assert!(!varlib.join("loopback/root").exists(), "root was created instead of falling back");
    assert_eq!(layers_in(&varlib.join("loopback/private")), 2);
    assert_eq!(host.docker_ok(&["run", "--rm", "--network", "none", "img:1", "cat", "/f1"]), "f1");
    let data = host.docker_ok(&["inspect", "-f", "{{.GraphDriver.Data.LayerLocations}}", "img:1"]);
    assert_eq!(data.trim(), "fallback:fallback");
    assert!(host.plugin_log().contains("using the fallback directory"), "the fallback is not logged");
    let status = host.driver_status();
    assert!(status.contains("Root Directory State: new layers go to fallback"), "{status}");
}

/// Root read-only (a read-only bind mount, as a read-only export looks):
/// layers already in root are used from there, new ones land in fallback.
#[test]
fn fallback_root_read_only_keeps_using_existing_root_layers() {
    require(&["dockerd", "busybox", "overlay"]);
    // First a host that may write root publishes the base layer there.
    let shared = {
        let mut writer = Host::new("ro-writer");
        fs::create_dir_all(writer.root_dir()).unwrap();
        writer.start(&[]);
        let b = base(&writer);
        load_image(&writer, vec![b], "base:1");
        let shared = Path::new(TEST_ROOT).join(format!("ro-shared-{}", std::process::id()));
        let _ = fs::remove_dir_all(&shared);
        run_ok(Command::new("cp").arg("-a").arg(writer.root_dir()).arg(&shared));
        shared
    };
    let shared_guard = scopeguard(&shared);
    // Where the reader sees the store: a read-only bind inside its namespace
    // (the mount point is created on this machine's filesystem, so it is
    // removed with the guard).
    let root_inside = Path::new(TEST_ROOT).join(format!("ro-root-{}", std::process::id()));
    let mount_point_guard = scopeguard(&root_inside);
    let mut host = Host::with(
        "ro-reader",
        HostOpts { binds: vec![(shared.clone(), root_inside.clone(), true)], ..Default::default() },
    );
    // the bind target is this host's root dir
    let opts = vec![
        format!("sharedloop.loopback_root={}", root_inside.display()),
        format!("sharedloop.loopback_fallback={}", host.fallback_dir().display()),
    ];
    host.start_plugin();
    host.start_dockerd(&opts);
    let b = base(&host);
    load_image(&host, vec![b, one_file("f2")], "img:2");
    assert_eq!(layers_in(&shared), 1, "read-only root was written");
    assert_eq!(layers_in(&host.fallback_dir()), 1, "the new layer is not in fallback");
    let locs = host.docker_ok(&["inspect", "-f", "{{.GraphDriver.Data.LayerLocations}}", "img:2"]);
    assert_eq!(locs.trim(), "fallback:root");
    assert_eq!(host.docker_ok(&["run", "--rm", "--network", "none", "img:2", "cat", "/f2"]), "f2");
    let status = host.driver_status();
    assert!(status.contains(&format!("Loopback Root Directory: {}\n", root_inside.display())), "{status}");
    assert!(status.contains(&format!("Loopback Fallback Directory: {}\n", host.fallback_dir().display())), "{status}");
    assert!(status.contains("Read-only file system"), "{status}");
    host.docker_ok(&["rmi", "img:2"]);
    assert_eq!(layers_in(&shared), 1, "a layer in a read-only root was removed");
    drop(host);
    drop(mount_point_guard);
    drop(shared_guard);
}

/// Root not writable (immutable): new layers in fallback.
#[test]
fn fallback_root_immutable() {
    require(&["dockerd", "busybox", "overlay", "chattr"]);
    let mut host = Host::new("immutable");
    fs::create_dir_all(host.root_dir()).unwrap();
    run_ok(Command::new("chattr").arg("+i").arg(host.root_dir()));
    host.start(&[]);
    let b = base(&host);
    load_image(&host, vec![b, one_file("f3")], "img:3");
    assert_eq!(layers_in(&host.root_dir()), 0);
    assert_eq!(layers_in(&host.fallback_dir()), 2);
    assert_eq!(host.docker_ok(&["run", "--rm", "--network", "none", "img:3", "cat", "/f3"]), "f3");
    let status = host.driver_status();
    assert!(status.contains("Operation not permitted"), "{status}");
    run_ok(Command::new("chattr").arg("-i").arg(host.root_dir()));
}

struct Guard(std::path::PathBuf);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
fn scopeguard(p: &Path) -> Guard {
    Guard(p.to_owned())
}
