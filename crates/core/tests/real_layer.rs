//! Real kernel tests of the layer path: needs root, loop devices, ext4,
//! xfs and overlayfs. Fails (never skips) where those are missing.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use sharedloop_core::apply::apply_tar;
use sharedloop_core::export::{self, export_tar, is_opaque, is_whiteout};
use sharedloop_core::image::build_layer_image;
use sharedloop_core::mount::{mount_layer_ro, mount_overlay, unmount_path, OverlaySpec};
use sharedloop_core::options::FsType;
use sharedloop_core::sys::loopdev;

fn require_root() {
    assert!(rustix::process::geteuid().is_root(), "this test needs root (loop devices, mounts)");
}

fn hdr(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(1000);
    h.set_gid(1001);
    h.set_mtime(1_700_000_000);
    h
}

fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut hdr(tar::EntryType::Directory, 0o755, 0), "etc/", std::io::empty()).unwrap();
    b.append_data(&mut hdr(tar::EntryType::Regular, 0o644, 5), "etc/motd", &b"hello"[..]).unwrap();
    b.append_data(&mut hdr(tar::EntryType::Regular, 0o4755, 3), "bin/su", &b"su!"[..]).unwrap();
    let mut l = hdr(tar::EntryType::Link, 0o644, 0);
    b.append_link(&mut l, "etc/motd.link", "etc/motd").unwrap();
    let mut s = hdr(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut s, "etc/motd.sym", "/etc/motd").unwrap();
    let mut c = hdr(tar::EntryType::Char, 0o600, 0);
    c.set_device_major(1).unwrap();
    c.set_device_minor(3).unwrap();
    b.append_data(&mut c, "dev/null", std::io::empty()).unwrap();
    b.append_data(&mut hdr(tar::EntryType::Regular, 0, 0), "gone/.wh.old", std::io::empty()).unwrap();
    b.append_data(&mut hdr(tar::EntryType::Directory, 0o750, 0), "opq/", std::io::empty()).unwrap();
    b.append_data(&mut hdr(tar::EntryType::Regular, 0, 0), "opq/.wh..wh..opq", std::io::empty()).unwrap();
    b.append_data(&mut hdr(tar::EntryType::Regular, 0o600, 3), "opq/new", &b"new"[..]).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.color", &b"blue"[..])]).unwrap();
    b.append_data(&mut hdr(tar::EntryType::Regular, 0o644, 1), "xattr-file", &b"x"[..]).unwrap();
    let big = vec![7u8; 3 * 1024 * 1024 + 5];
    b.append_data(&mut hdr(tar::EntryType::Regular, 0o644, big.len() as u64), "big", &big[..]).unwrap();
    b.into_inner().unwrap()
}

fn check_tree(root: &Path) {
    assert_eq!(fs::read(root.join("etc/motd")).unwrap(), b"hello");
    let md = fs::metadata(root.join("etc/motd")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1000, 1001));
    assert_eq!(md.nlink(), 2, "hardlink kept");
    assert_eq!(md.ino(), fs::metadata(root.join("etc/motd.link")).unwrap().ino());
    assert_eq!(fs::read_link(root.join("etc/motd.sym")).unwrap(), Path::new("/etc/motd"));
    assert_eq!(fs::metadata(root.join("bin/su")).unwrap().permissions().mode() & 0o7777, 0o4755);
    let null = fs::symlink_metadata(root.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!((rustix::fs::major(null.rdev()), rustix::fs::minor(null.rdev())), (1, 3));
    assert!(is_whiteout(&fs::symlink_metadata(root.join("gone/old")).unwrap()));
    assert!(is_opaque(&root.join("opq")));
    assert_eq!(fs::metadata(root.join("opq")).unwrap().permissions().mode() & 0o777, 0o750);
    assert_eq!(xattr::get(root.join("xattr-file"), "user.color").unwrap().as_deref(), Some(&b"blue"[..]));
    assert_eq!(fs::metadata(root.join("big")).unwrap().len(), 3 * 1024 * 1024 + 5);
    assert_eq!(fs::metadata(root.join("etc/motd")).unwrap().mtime(), 1_700_000_000);
}

fn tar_names(data: &[u8]) -> HashMap<String, tar::EntryType> {
    let mut ar = tar::Archive::new(data);
    ar.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path().unwrap().display().to_string(), e.header().entry_type())
        })
        .collect()
}

fn roundtrip(fs_type: FsType) {
    require_root();
    let t = tempfile::tempdir().unwrap();
    let staging = t.path().join("staging");
    fs::create_dir_all(staging.join("fs")).unwrap();
    let data = layer_tar();
    let stats = apply_tar(&data[..], &staging.join("fs")).unwrap();
    check_tree(&staging.join("fs"));
    let expect = {
        use sha2::Digest;
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&data)))
    };
    assert_eq!(stats.diff_id.unwrap().as_str(), expect);
    assert_eq!(stats.tar_bytes, data.len() as u64);

    let img = t.path().join("layer.img");
    let counts = export::tree_counts(&staging).unwrap();
    build_layer_image(&staging, &img, counts, fs_type).unwrap();
    let mnt = t.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let dev = loopdev::attach(&img, loopdev::AttachOptions { read_only: true, direct_io: true }).unwrap();
    mount_layer_ro(dev.path(), &mnt, fs_type).unwrap();
    drop(dev);
    let result = std::panic::catch_unwind(|| {
        let mnt = mnt.join("fs");
        check_tree(&mnt);
        assert!(fs::write(mnt.join("new"), b"x").is_err(), "layer mount is read-only");
        // Export gives back the whiteout and opaque markers.
        let mut out = Vec::new();
        export_tar(&mnt, &mut out).unwrap();
        let names = tar_names(&out);
        assert!(names.contains_key("gone/.wh.old"), "{names:?}");
        assert!(names.contains_key("opq/.wh..wh..opq"), "{names:?}");
        assert_eq!(names.get("etc/motd.link"), Some(&tar::EntryType::Link));
        assert!(!names.keys().any(|n| n.contains("lost+found")), "{names:?}");
        // Deterministic.
        let mut again = Vec::new();
        export_tar(&mnt, &mut again).unwrap();
        assert_eq!(out, again);
        // The exported tar applies to an identical tree.
        let s2 = t.path().join("staging2");
        fs::create_dir(&s2).unwrap();
        let mut rd: &[u8] = &out;
        let mut buf = Vec::new();
        rd.read_to_end(&mut buf).unwrap();
        apply_tar(&buf[..], &s2).unwrap();
        check_tree(&s2);
    });
    unmount_path(&mnt).unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
}

#[test]
fn real_ext4_layer_roundtrip() {
    roundtrip(FsType::Ext4);
}

#[test]
fn real_xfs_layer_roundtrip() {
    roundtrip(FsType::Xfs);
}

#[test]
fn real_overlay_stack_of_many_layers() {
    require_root();
    let t = tempfile::tempdir().unwrap();
    // 300 lower dirs with long paths: far beyond mount(2)'s one-page limit.
    let mut lowers = Vec::new();
    for i in 0..300 {
        let d = t.path().join(format!("a-rather-long-directory-name-to-fill-the-page-{i:04}"));
        fs::create_dir(&d).unwrap();
        fs::write(d.join(format!("f{i}")), i.to_string()).unwrap();
        fs::write(d.join("top"), i.to_string()).unwrap();
        lowers.push(d);
    }
    let target = t.path().join("merged");
    fs::create_dir(&target).unwrap();
    mount_overlay(&OverlaySpec { lowers: &lowers, upper: None }, &target).unwrap();
    let r = std::panic::catch_unwind(|| {
        assert_eq!(fs::read_to_string(target.join("top")).unwrap(), "0", "lowers[0] is the top");
        assert_eq!(fs::read_to_string(target.join("f299")).unwrap(), "299", "the bottom layer is there");
    });
    unmount_path(&target).unwrap();
    r.unwrap();
}
