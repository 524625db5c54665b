//! The plugin protocol itself, spoken the way dockerd speaks it, for what
//! dockerd cannot reach (stacks deeper than its 125-layer cap) and for
//! error replies. The plugin, the kernel and the filesystems are real.

mod common;

use std::fs;
use std::path::Path;

use common::*;
use serde_json::json;

#[test]
fn plugin_protocol_500_layer_stack() {
    require(&["busybox", "overlay", "ext4"]);
    let (host, c) = plugin_host("p500");
    fs::create_dir_all(host.root_dir()).unwrap();
    init_plugin(&host, &c, &[]);
    let rootfs = host.dir.join("rootfs");
    busybox_rootfs(&rootfs);
    let mut parent = String::new();
    for i in 0..500 {
        let spec = if i == 0 {
            LayerSpec { rootfs: Some(rootfs.clone()), ..Default::default() }
        } else {
            LayerSpec {
                files: vec![
                    (format!("layers/{i:03}"), format!("{i}\n").into_bytes(), 0o644, 0, 0),
                    ("top".into(), format!("{i}\n").into_bytes(), 0o644, 0, 0),
                ],
                ..Default::default()
            }
        };
        let id = format!("layer{i:03}");
        c.ok("GraphDriver.Create", json!({"ID": id, "Parent": parent}));
        let r = c.apply_diff(&id, &parent, &layer_tar(&spec));
        assert!(r.status == 200 && r.err().is_none(), "ApplyDiff {id}: {}", String::from_utf8_lossy(&r.body));
        parent = id;
    }
    // A container over all 500: overlayfs' limit of 500 lower layers.
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "ctr", "Parent": parent, "StorageOpt": {"size": "256M"}}));
    let dir = c.ok("GraphDriver.Get", json!({"ID": "ctr"}))["Dir"].as_str().unwrap().to_owned();
    let out = run_ok(host.cmd("chroot").arg(&dir).args([
        "/bin/busybox",
        "sh",
        "-c",
        "cat /top; ls /layers | wc -l; cat /layers/001; echo w > /written; cat /written",
    ]));
    assert_eq!(out, "499\n499\n1\nw\n");
    assert_eq!(loops_under(&host.root_dir()).len(), 500);
    c.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    c.ok("GraphDriver.Remove", json!({"ID": "ctr"}));
    for i in (0..500).rev() {
        c.ok("GraphDriver.Remove", json!({"ID": format!("layer{i:03}")}));
    }
    assert_no_loops(&host.dir);
    assert_eq!(fs::read_dir(host.root_dir().join("layers")).unwrap().count(), 0);
}

#[test]
fn plugin_init_rejects_bad_options_by_name() {
    let (host, c) = plugin_host("badopts");
    for (opt, name) in [
        ("sharedloop.colour=blue", "sharedloop.colour"),
        ("sharedloop.fs=btrfs", "sharedloop.fs"),
        ("sharedloop.loopback_root=relative", "sharedloop.loopback_root"),
        ("sharedloop.size=huge", "sharedloop.size"),
        ("sharedloop.override_kernel_check=perhaps", "sharedloop.override_kernel_check"),
    ] {
        let r = c.call("GraphDriver.Init", json!({"Home": host.dir.join("home"), "Opts": [opt]}));
        assert_eq!(r.status, 500, "{opt}");
        let err = r.err().unwrap();
        assert!(err.contains(name), "{opt}: {err}");
    }
    // Uninitialised: every call says so.
    let r = c.call("GraphDriver.Get", json!({"ID": "x"}));
    assert!(r.err().unwrap().contains("not initialised"));
}

#[test]
fn plugin_rejects_bad_requests_and_keeps_the_store_clean() {
    require(&["ext4"]);
    let (host, c) = plugin_host("badreq");
    fs::create_dir_all(host.root_dir()).unwrap();
    init_plugin(&host, &c, &[]);
    // unknown ids
    assert!(c.call("GraphDriver.Get", json!({"ID": "nope"})).err().unwrap().contains("nope"));
    assert_eq!(c.ok("GraphDriver.Exists", json!({"ID": "nope"}))["Exists"], json!(false));
    // hostile ids never become paths
    let r = c.call("GraphDriver.Create", json!({"ID": "../../etc"}));
    assert!(r.err().unwrap().contains("invalid layer id"));
    // a missing parent
    let r = c.call("GraphDriver.Create", json!({"ID": "a", "Parent": "missing"}));
    assert!(r.err().unwrap().contains("missing"));
    // garbage and hostile tars: error, nothing published, nothing left
    c.ok("GraphDriver.Create", json!({"ID": "l1"}));
    let garbage = vec![0x5a_u8; 10_000];
    let r = c.apply_diff("l1", "", &garbage);
    assert!(r.err().unwrap().contains("bad layer tar"), "{:?}", r.err());
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, "escape", "/etc").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(4);
    h.set_mode(0o644);
    b.append_data(&mut h, "escape/pwned", &b"evil"[..]).unwrap();
    let r = c.apply_diff("l1", "", &b.into_inner().unwrap());
    assert!(r.err().unwrap().contains("escape/pwned"), "{:?}", r.err());
    assert!(!Path::new("/etc/pwned").exists());
    assert_eq!(fs::read_dir(host.root_dir().join("layers")).map(|d| d.count()).unwrap_or(0), 0);
    assert_eq!(fs::read_dir(host.dir.join("home/tmp")).unwrap().count(), 0, "staging left behind");
    // the layer is still usable after the failures
    let ok = layer_tar(&LayerSpec { files: vec![("f".into(), b"ok".to_vec(), 0o644, 0, 0)], ..Default::default() });
    let r = c.apply_diff("l1", "", &ok);
    assert!(r.err().is_none(), "{:?}", r.err());
    assert_eq!(r.json()["Size"], json!(2));
    let r = c.apply_diff("l1", "", &ok);
    assert!(r.err().unwrap().contains("already has content"));
    // a rw layer with an unsupported storage option
    let r = c.call("GraphDriver.CreateReadWrite", json!({"ID": "rw", "Parent": "l1", "StorageOpt": {"quota": "1"}}));
    assert!(r.err().unwrap().contains("quota"));
    // removing a layer with a child is refused, the child first works
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "rw", "Parent": "l1"}));
    assert!(c.call("GraphDriver.Remove", json!({"ID": "l1"})).err().unwrap().contains("rw"));
    c.ok("GraphDriver.Remove", json!({"ID": "rw"}));
    c.ok("GraphDriver.Remove", json!({"ID": "l1"}));
    assert_no_loops(&host.dir);
}

/// The engine's data root on a filesystem that can hold neither overlayfs
/// whiteouts nor an overlay upper directory (sshfs, like NFS without
/// xattrs): staging moves to a scratch image, writable layers are images,
/// and containers work.
#[test]
fn plugin_home_on_a_network_filesystem() {
    require(&["busybox", "overlay", "ext4", "sshfs"]);
    let net = Sshfs::new("home-sshfs");
    let (mut host, c) = plugin_host("netfs-home");
    fs::create_dir_all(host.root_dir()).unwrap();
    let home = net.mountpoint.join("home");
    c.ok("GraphDriver.Init", json!({"Home": home, "Opts": host.default_storage_opts()}));
    let scratch_mounted = host
        .mountinfo()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(home.join("tmp").to_str().unwrap()) && l.contains(" - ext4 "));
    assert!(scratch_mounted, "staging is not on a scratch filesystem:\n{}", host.mountinfo());
    let rootfs = host.dir.join("rootfs");
    busybox_rootfs(&rootfs);
    c.ok("GraphDriver.Create", json!({"ID": "base"}));
    assert!(c
        .apply_diff("base", "", &layer_tar(&LayerSpec { rootfs: Some(rootfs), ..Default::default() }))
        .err()
        .is_none());
    let top = LayerSpec {
        whiteouts: vec!["etc/group".into()],
        opaque: vec!["usr/share/doc".into()],
        files: vec![("usr/share/doc/new".into(), b"new\n".to_vec(), 0o644, 0, 0)],
        ..Default::default()
    };
    c.ok("GraphDriver.Create", json!({"ID": "top", "Parent": "base"}));
    let r = c.apply_diff("top", "base", &layer_tar(&top));
    assert!(r.err().is_none(), "{:?}", r.err());
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "ctr", "Parent": "top", "StorageOpt": {"size": "128M"}}));
    let dir = c.ok("GraphDriver.Get", json!({"ID": "ctr"}))["Dir"].as_str().unwrap().to_owned();
    let out = run_ok(host.cmd("chroot").arg(&dir).args([
        "/bin/busybox",
        "sh",
        "-c",
        "test -e /etc/group && echo group-still-there; ls /usr/share/doc; echo w > /w; cat /w",
    ]));
    assert_eq!(out, "new\nw\n");
    // The writable image and the published layers really are where they should be.
    assert!(fs::metadata(home.join("rw/ctr/rw.img")).is_ok(), "the writable image is not on the network filesystem");
    c.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    for id in ["ctr", "top", "base"] {
        c.ok("GraphDriver.Remove", json!({"ID": id}));
    }
    assert_no_loops(&host.root_dir());
    host.kill_plugin();
}
