//! Sparse files stay sparse from the layer tar to the mounted layer, and
//! `sharedloop.max_layer_size` caps a layer's expanded size. Real path:
//! the driver applies the tar, builds and publishes the ext4 image, mounts
//! it on a loop device. Needs root and GNU tar; fails, never skips.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sharedloop_core::apply::apply_tar;
use sharedloop_core::ids::Bytes;
use sharedloop_core::options::Config;
use sharedloop_core::{CreateKind, Driver};

use common::{require, Rig};

const GIB: u64 = 1 << 30;
const SIZE: u64 = 10 * GIB;
/// (offset, data) of the sparse file; the rest is holes.
const PIECES: [(u64, &[u8]); 3] = [(0, b"head"), (5 * GIB + 12345, b"middle"), (SIZE - 4096, b"tail")];

/// Bytes a file occupies on disk.
fn allocated(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().blocks() * 512
}

/// A GNU-format tar (`tar --sparse`) of one 10 GiB sparse file, `big`.
fn sparse_tar(dir: &Path) -> Vec<u8> {
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    let f = fs::File::create(src.join("big")).unwrap();
    f.set_len(SIZE).unwrap();
    for (off, data) in PIECES {
        f.write_all_at(data, off).unwrap();
    }
    drop(f);
    let tar = dir.join("sparse.tar");
    let out = Command::new("tar")
        .args(["--sparse", "--format=gnu", "--owner=0", "--group=0", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("big")
        .output()
        .unwrap();
    assert!(out.status.success(), "tar: {}", String::from_utf8_lossy(&out.stderr));
    fs::remove_dir_all(&src).unwrap();
    let bytes = fs::read(&tar).unwrap();
    assert!(bytes.len() < 64 * 1024, "the tar is {} bytes", bytes.len());
    let mut ar = tar::Archive::new(&bytes[..]);
    let e = ar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(e.header().entry_type(), tar::EntryType::GNUSparse, "not a GNU sparse entry");
    bytes
}

fn check_sparse_file(p: &Path) {
    let md = fs::metadata(p).unwrap();
    assert_eq!(md.len(), SIZE, "{}: apparent size", p.display());
    let f = fs::File::open(p).unwrap();
    for (off, data) in PIECES {
        let before = off.min(4) as usize;
        let mut buf = vec![0u8; before + data.len() + 4];
        f.read_exact_at(&mut buf, off - before as u64).unwrap();
        assert!(buf[..before].iter().all(|b| *b == 0), "{}: before {off}", p.display());
        assert_eq!(&buf[before..before + data.len()], data, "{}: at {off}", p.display());
        assert!(buf[before + data.len()..].iter().all(|b| *b == 0), "{}: after {off}", p.display());
    }
    assert!(allocated(p) < 4 << 20, "{}: {} bytes allocated", p.display(), allocated(p));
}

fn driver(rig: &Rig, name: &str, opts: &[&str]) -> Driver {
    let root = rig.path().join(format!("{name}-root"));
    fs::create_dir_all(&root).unwrap();
    let mut all = vec![
        format!("sharedloop.loopback_root={}", root.display()),
        format!("sharedloop.loopback_fallback={}", rig.path().join(format!("{name}-fallback")).display()),
    ];
    all.extend(opts.iter().map(|s| s.to_string()));
    Driver::open(&rig.path().join(format!("{name}-home")), Config::from_opts(&all).unwrap()).unwrap()
}

/// Issue 10, item 13: a 10 KB tar declaring a 10 GiB sparse file stays
/// kilobytes on disk in staging and in the published image, the image is
/// small, and the mounted layer reads back the same file.
#[test]
fn real_a_sparse_file_stays_sparse_from_tar_to_mounted_ext4_layer() {
    require(&["tar", "mkfs.ext4"]);
    let rig = Rig::new("sl-sparse-");
    let tar = sparse_tar(rig.path());

    // Staging, as apply writes it.
    let staging = rig.path().join("staging");
    fs::create_dir(&staging).unwrap();
    let stats = apply_tar(&tar[..], &staging).unwrap();
    assert_eq!(stats.content_bytes, SIZE);
    check_sparse_file(&staging.join("big"));

    // The whole path: apply, image, publish, mount.
    sparse_roundtrip(&rig, &tar, "ext4", 64 << 20, 16 << 20);
}

/// The same through an xfs image (filled by `cp`, not `mkfs -d`); xfs
/// images are at least 300 MiB, sparse, and mkfs.xfs writes their 64 MiB
/// log out even for an empty filesystem.
#[test]
fn real_a_sparse_file_stays_sparse_in_an_xfs_layer() {
    require(&["tar", "mkfs.xfs"]);
    let rig = Rig::new("sl-sparse-");
    let tar = sparse_tar(rig.path());
    sparse_roundtrip(&rig, &tar, "xfs", 400 << 20, 80 << 20);
}

fn sparse_roundtrip(rig: &Rig, tar: &[u8], fs_type: &str, max_apparent: u64, max_allocated: u64) {
    let d = driver(rig, fs_type, &[&format!("sharedloop.fs={fs_type}")]);
    d.create("l1", None, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    assert_eq!(d.apply_diff("l1", None, &mut &tar[..]).unwrap(), SIZE);
    let layers: Vec<PathBuf> =
        fs::read_dir(rig.path().join(format!("{fs_type}-root/layers"))).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(layers.len(), 1);
    let img = layers[0].join("layer.img");
    let img_len = fs::metadata(&img).unwrap().len();
    assert!(img_len < max_apparent, "{fs_type}: the image's apparent size is {img_len} bytes");
    assert!(allocated(&img) < max_allocated, "{fs_type}: the image occupies {} bytes", allocated(&img));
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(layers[0].join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["content_bytes"], SIZE);
    assert_eq!(meta["fs"], fs_type);
    let dir = d.get("l1").unwrap();
    check_sparse_file(&dir.join("big"));
    d.put("l1").unwrap();
    d.cleanup().unwrap();
}

/// `sharedloop.max_layer_size` refuses a layer whose files expand beyond
/// it, naming the option and the limit; nothing is published and staging
/// is gone.
#[test]
fn real_max_layer_size_refuses_a_layer_that_expands_beyond_it() {
    require(&["tar", "mkfs.ext4"]);
    let rig = Rig::new("sl-sparse-");
    let tar = sparse_tar(rig.path());
    let d = driver(&rig, "b", &["sharedloop.max_layer_size=1G"]);
    assert_eq!(d.config().max_layer_size, Some(Bytes(GIB)));
    d.create("l1", None, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    let e = d.apply_diff("l1", None, &mut &tar[..]).unwrap_err().to_string();
    assert!(e.contains("sharedloop.max_layer_size=1.0 GiB") && e.contains("1073741824"), "{e}");
    assert!(e.contains("big"), "the error names the entry: {e}");
    let published = fs::read_dir(rig.path().join("b-root/layers")).map(|r| r.count()).unwrap_or(0);
    assert_eq!(published, 0, "a refused layer was published");
    let tmp: Vec<_> = fs::read_dir(rig.path().join("b-root/tmp")).map(|r| r.flatten().collect()).unwrap_or_default();
    assert!(tmp.is_empty(), "build directories left: {tmp:?}");
    let staging: Vec<_> = fs::read_dir(rig.path().join("b-home/tmp")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(staging.is_empty(), "staging left: {staging:?}");
    // A layer within the limit still applies.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o644);
    b.append_data(&mut h, "small", &b"small"[..]).unwrap();
    d.create("l2", None, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    assert_eq!(d.apply_diff("l2", None, &mut &b.into_inner().unwrap()[..]).unwrap(), 5);
    d.cleanup().unwrap();
}
