//! Writable layers kept as a directory (`CreateKind::ReadWriteDir`, what
//! the Docker front end makes of a container's `-init` layer), against
//! the real kernel: no image and no loop device of their own, a container
//! layer stacked on one sees its files, its own changes stay its own, a
//! restart adopts the mount, and removal leaves nothing. Needs root.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use sharedloop_core::options::Config;
use sharedloop_core::{CreateKind, Driver};

use common::{layer, mounts_under, require, Rig};

/// Loop devices whose backing file is below `dir`.
fn loops_below(dir: &Path) -> usize {
    let out = std::process::Command::new("losetup").args(["-l", "-n", "-O", "BACK-FILE"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.trim().starts_with(&*dir.to_string_lossy())).count()
}

#[test]
fn a_directory_layer_serves_as_a_containers_init_layer() {
    require(&["mkfs.ext4"]);
    let rig = Rig::new("sl-rwdir-");
    let d = rig.driver();
    let home = d.home().to_owned();
    layer(&d, "img", None, "etc/os-release", "base\n");
    let none = HashMap::new();

    // The init layer: a directory, written through Get as dockerd does.
    d.create("c-init", Some("img"), CreateKind::ReadWriteDir, &none).unwrap();
    assert!(home.join("rw/c-init/dir").is_dir());
    assert!(!home.join("rw/c-init/rw.img").exists(), "a directory layer got an image");
    let init = d.get("c-init").unwrap();
    assert_eq!(fs::read_to_string(init.join("etc/os-release")).unwrap(), "base\n");
    fs::create_dir_all(init.join("etc")).unwrap();
    fs::write(init.join("etc/hosts"), "127.0.0.1 c\n").unwrap();
    fs::write(init.join(".dockerenv"), "").unwrap();
    d.put("c-init").unwrap();
    assert_eq!(loops_below(&home.join("rw/c-init")), 0, "the directory layer has a loop device");

    // The container over it: its own image; it sees the init files.
    d.create("c", Some("c-init"), CreateKind::ReadWrite, &none).unwrap();
    let c = d.get("c").unwrap();
    assert_eq!(fs::read_to_string(c.join("etc/hosts")).unwrap(), "127.0.0.1 c\n");
    assert_eq!(fs::read_to_string(c.join("etc/os-release")).unwrap(), "base\n");
    fs::write(c.join("app"), "app\n").unwrap();
    let ch: Vec<String> = d.changes("c", Some("c-init")).unwrap().iter().map(|x| x.path.clone()).collect();
    assert_eq!(ch, vec!["/app".to_owned()], "the container's changes hold the init layer's files");
    assert_eq!(loops_below(&home.join("rw/c")), 1, "the container's own image");

    // A restart with both mounted: adopted, the files still there.
    drop(d);
    let d = Driver::open(&home, Config::from_opts(&rig.opts(&[])).unwrap()).unwrap();
    let c2 = d.get("c").unwrap();
    assert_eq!(fs::read_to_string(c2.join("etc/hosts")).unwrap(), "127.0.0.1 c\n");
    assert_eq!(fs::read_to_string(c2.join("app")).unwrap(), "app\n");
    d.put("c").unwrap();

    // Removal, container first as dockerd does: nothing left.
    d.remove("c").unwrap();
    d.remove("c-init").unwrap();
    common::await_or_fail("the removed layers' mounts go", || {
        mounts_under(&home.join("rwmnt")).is_empty() && mounts_under(&home.join("rw")).is_empty()
    });
    assert!(!home.join("rw/c-init").exists() && !home.join("rw/c").exists());
    d.cleanup().unwrap();
}

/// `sharedloop.writable_layers=dir`: a container's layer created without
/// a size is a directory too (no image, no loop device), written,
/// measured, committed into a published layer and removed like an image
/// layer; one created with a size is still a bounded image.
#[test]
fn writable_layers_dir_makes_container_layers_directories_unless_a_size_is_asked() {
    require(&["mkfs.ext4"]);
    let rig = Rig::new("sl-rwdir-opt-");
    let home = rig.path().join("home");
    let d = Driver::open(&home, Config::from_opts(&rig.opts(&["sharedloop.writable_layers=dir"])).unwrap()).unwrap();
    assert!(d.report().writable_layers.starts_with("directories in the home"), "{}", d.report().writable_layers);
    layer(&d, "img", None, "etc/os-release", "base\n");
    let none = HashMap::new();

    d.create("c", Some("img"), CreateKind::ReadWrite, &none).unwrap();
    assert!(home.join("rw/c/dir").is_dir());
    assert!(!home.join("rw/c/rw.img").exists(), "writable_layers=dir made an image");
    let c = d.get("c").unwrap();
    assert_eq!(fs::read_to_string(c.join("etc/os-release")).unwrap(), "base\n");
    fs::write(c.join("app"), "app\n").unwrap();
    fs::remove_file(c.join("etc/os-release")).unwrap();
    assert_eq!(loops_below(&home.join("rw/c")), 0, "a directory layer has a loop device");
    let (bytes, inodes) = d.rw_usage("c").unwrap();
    assert!(bytes >= 4 && inodes >= 2, "usage of the directory's upper: {bytes} bytes, {inodes} entries");
    let mut ch: Vec<String> = d.changes("c", Some("img")).unwrap().iter().map(|x| x.path.clone()).collect();
    ch.sort();
    assert_eq!(ch, vec!["/app".to_owned(), "/etc".to_owned(), "/etc/os-release".to_owned()]);
    d.put("c").unwrap();

    // Committed: a published layer with the container's file and its
    // whiteout, seen through a new container over it.
    d.commit("c", "frozen", None).unwrap();
    d.create("v", Some("frozen"), CreateKind::ReadWrite, &none).unwrap();
    let v = d.get("v").unwrap();
    assert_eq!(fs::read_to_string(v.join("app")).unwrap(), "app\n");
    assert!(!v.join("etc/os-release").exists(), "the deletion was committed");
    d.put("v").unwrap();

    // A size asked for: an image of that size, as without the option.
    let sized = HashMap::from([("size".to_owned(), "64M".to_owned())]);
    d.create("s", Some("img"), CreateKind::ReadWrite, &sized).unwrap();
    assert!(home.join("rw/s/rw.img").is_file() && !home.join("rw/s/dir").exists(), "a sized layer is an image");
    let s = d.get("s").unwrap();
    assert_eq!(fs::read_to_string(s.join("etc/os-release")).unwrap(), "base\n");
    assert_eq!(loops_below(&home.join("rw/s")), 1, "the sized layer's image");
    d.put("s").unwrap();

    // A restart with a container mounted, and the option switched off:
    // the directory layer is adopted as it is; new layers are images.
    let c = d.get("c").unwrap();
    drop(d);
    let d = Driver::open(&home, Config::from_opts(&rig.opts(&[])).unwrap()).unwrap();
    let c2 = d.get("c").unwrap();
    assert_eq!(c2, c);
    assert_eq!(fs::read_to_string(c2.join("app")).unwrap(), "app\n");
    assert!(home.join("rw/c/dir").is_dir() && !home.join("rw/c/rw.img").exists());
    d.put("c").unwrap();
    d.create("n", Some("img"), CreateKind::ReadWrite, &none).unwrap();
    assert!(home.join("rw/n/rw.img").is_file(), "with the option off a new layer is an image");
    d.remove("n").unwrap();

    for id in ["s", "v", "c", "frozen", "img"] {
        d.remove(id).unwrap();
    }
    common::await_or_fail("the removed layers' mounts go", || {
        mounts_under(&home.join("rwmnt")).is_empty() && mounts_under(&home.join("rw")).is_empty()
    });
    for id in ["c", "s", "v", "n"] {
        assert!(!home.join("rw").join(id).exists(), "rw/{id} is left");
    }
    d.cleanup().unwrap();
}
