//! One-pass layer builds (`mke2fs -d -` reading the layer's tar,
//! `sharedloop.one_pass_build`) against the real kernel: real ext4 images,
//! loop devices and overlayfs. Needs root and e2fsprogs >= 1.47.1 with
//! libarchive (scripts/install-deps installs them); fails, never skips,
//! without them.
//!
//! Two hosts with stores of their own apply the same two layers, one
//! through a staging directory and one in one pass. Every file of the
//! container over them, and every file of the raw layer images
//! (whiteouts, opaque markers, extended attributes, hardlinks, devices),
//! is the same both ways. Tars that one pass would build differently go
//! the staged way on the one-pass host too, and hostile ones are refused
//! there as before.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sharedloop_core::options::{Config, FsType};
use sharedloop_core::store::IMAGE_FILE;
use sharedloop_core::{CreateKind, Driver};

use common::{require, Rig};

struct T(tar::Builder<Vec<u8>>);

impl T {
    fn new() -> T {
        T(tar::Builder::new(Vec::new()))
    }
    #[allow(clippy::too_many_arguments)]
    fn add(
        mut self,
        kind: tar::EntryType,
        name: &str,
        mode: u32,
        owner: (u64, u64),
        data: &[u8],
        link: Option<&str>,
    ) -> T {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        h.set_mtime(1_600_000_000 + name.len() as u64);
        h.set_size(data.len() as u64);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(name.len() as u32).unwrap();
        }
        match link {
            Some(l) if l.len() < 100 => {
                h.set_link_name_literal(l).unwrap();
                self.0.append_data(&mut h, name, &b""[..]).unwrap();
            }
            Some(l) => self.0.append_link(&mut h, name, l).unwrap(),
            None => self.0.append_data(&mut h, name, data).unwrap(),
        }
        self
    }
    fn dir(self, name: &str, mode: u32) -> T {
        self.add(tar::EntryType::Directory, name, mode, (0, 0), b"", None)
    }
    fn file(self, name: &str, data: &[u8]) -> T {
        self.add(tar::EntryType::Regular, name, 0o644, (0, 0), data, None)
    }
    fn xattrs(mut self, x: &[(&str, &[u8])]) -> T {
        let recs: Vec<(String, &[u8])> = x.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
        self.0.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

/// The lower layer: what the upper one whites out and hides.
fn lower_tar() -> Vec<u8> {
    T::new()
        .dir("./", 0o755)
        .dir("etc/", 0o755)
        .file("etc/old.conf", b"old\n")
        .file("etc/kept.conf", b"kept\n")
        .dir("cache/", 0o755)
        .file("cache/stale", b"stale\n")
        .dir("cache/sub/", 0o700)
        .file("cache/sub/deep", b"deep\n")
        .bytes()
}

/// The upper layer: every kind of entry a layer has.
fn upper_tar() -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def0u64;
    let noise: Vec<u8> = (0..300_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut holes = vec![0u8; 64 << 10];
    holes[40_000..40_010].copy_from_slice(b"not a hole");
    let long_dir = format!("usr/{}/", "d".repeat(120));
    let long_file = format!("{long_dir}{}", "f".repeat(90));
    T::new()
        .dir("./", 0o755)
        .dir("etc/", 0o750)
        .file("etc/.wh.old.conf", b"")
        .add(tar::EntryType::Regular, "etc/shadow", 0o640, (0, 42), b"root:*:1::::::\n", None)
        .dir("cache/", 0o1777)
        .file("cache/.wh..wh..opq", b"")
        .file("cache/fresh", b"fresh\n")
        .dir("usr/", 0o755)
        .dir("usr/bin/", 0o755)
        .xattrs(&[(
            "security.capability",
            b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        )])
        .add(tar::EntryType::Regular, "usr/bin/ping", 0o4755, (0, 0), &noise, None)
        .add(tar::EntryType::Link, "usr/bin/ping6", 0, (0, 0), b"", Some("usr/bin/ping"))
        .add(tar::EntryType::Symlink, "usr/bin/sh", 0o777, (0, 0), b"", Some("busybox"))
        .add(tar::EntryType::Symlink, "usr/bin/odd", 0o777, (0, 0), b"", Some("x//y/."))
        .add(tar::EntryType::Link, "etc/also-old", 0, (0, 0), b"", Some("etc/old.conf"))
        .add(tar::EntryType::Symlink, "usr/bin/far", 0o777, (0, 0), b"", Some(&format!("/{}", "t/".repeat(70))))
        .xattrs(&[("user.origin", b"a layer"), ("trusted.note", b"\x00\x01binary")])
        .add(tar::EntryType::Regular, "usr/bin/busybox", 0o755, (1_000_000, 2_000_000), &noise[..5000], None)
        .dir(&long_dir, 0o755)
        .file(&long_file, b"a long name\n")
        .file("usr/holes", &holes)
        .file("usr/empty", b"")
        .dir("dev/", 0o755)
        .add(tar::EntryType::Char, "dev/null", 0o666, (0, 0), b"", None)
        .add(tar::EntryType::Block, "dev/blk", 0o660, (0, 6), b"", None)
        .add(tar::EntryType::Fifo, "dev/fifo", 0o600, (0, 0), b"", None)
        .xattrs(&[("user.dir", b"yes")])
        .dir("data/", 0o2775)
        .bytes()
}

/// What a path is, as a container or a reader of the image sees it.
#[derive(Debug, PartialEq, Eq)]
struct Desc {
    kind: String,
    mode: u32,
    owner: (u32, u32),
    size: u64,
    mtime: Option<i64>,
    atime: Option<i64>,
    rdev: u64,
    target: Option<PathBuf>,
    content: Option<Vec<u8>>,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The other paths of the same inode (hardlinks).
    links: Vec<PathBuf>,
}

fn describe(root: &Path) -> BTreeMap<PathBuf, Desc> {
    let mut out = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        if ft.is_dir() {
            for e in fs::read_dir(&p).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
        let mut xattrs = BTreeMap::new();
        if !ft.is_symlink() {
            for name in xattr_names(&p) {
                let mut buf = vec![0u8; 4096];
                let n = rustix::fs::lgetxattr(&p, name.as_str(), &mut buf).unwrap();
                buf.truncate(n);
                xattrs.insert(name, buf);
            }
        }
        let whiteout = ft.is_char_device() && md.rdev() == 0;
        inodes.entry((md.dev(), md.ino())).or_default().push(rel.clone());
        assert!(md.ctime() > 1_600_000_000, "{} has ctime {}", rel.display(), md.ctime());
        let d = Desc {
            kind: format!("{ft:?}"),
            mode: md.mode(),
            owner: (md.uid(), md.gid()),
            size: if ft.is_dir() { 0 } else { md.len() },
            // The layer root and whiteouts are made at build time, either way.
            mtime: (!rel.as_os_str().is_empty() && !whiteout).then(|| md.mtime()),
            // (a directory's atime is when the staged build read it)
            atime: (!ft.is_dir() && !whiteout).then(|| md.atime()),
            rdev: md.rdev(),
            target: ft.is_symlink().then(|| fs::read_link(&p).unwrap()),
            content: ft.is_file().then(|| fs::read(&p).unwrap()),
            xattrs,
            links: Vec::new(),
        };
        out.insert(rel, d);
    }
    for paths in inodes.values().filter(|v| v.len() > 1) {
        for p in paths {
            let mut others: Vec<PathBuf> = paths.iter().filter(|o| *o != p).cloned().collect();
            others.sort();
            out.get_mut(p).unwrap().links = others;
        }
    }
    out
}

fn xattr_names(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(p, &mut buf).unwrap();
    buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

fn host(rig: &Rig, one_pass: bool) -> Driver {
    let opts = rig.opts(&[&format!("sharedloop.one_pass_build={one_pass}"), "sharedloop.direct_io=false"]);
    Driver::open(&rig.path().join("home"), Config::from_opts(&opts).unwrap()).unwrap()
}

fn chain_of(d: &Driver, id: &str) -> String {
    match d.layer_report(id).unwrap().kind {
        sharedloop_core::driver::LayerReportKind::Image { chain: Some(c) } => c.dir_name(),
        k => panic!("{id} has no chain: {k:?}"),
    }
}

/// Applies both layers and a container over them on `d`; the merged
/// directory and the upper layer's chain id.
fn stack(d: &Driver) -> (PathBuf, String) {
    d.create("lower", None, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    d.apply_diff("lower", None, &mut &lower_tar()[..]).unwrap();
    d.create("upper", Some("lower"), CreateKind::ReadOnly, &HashMap::new()).unwrap();
    let content = d.apply_diff("upper", Some("lower"), &mut &upper_tar()[..]).unwrap();
    assert_eq!(content, 300_000 + 15 + 5000 + 12 + (64 << 10) + 6, "content bytes of the upper layer");
    d.create("c", Some("upper"), CreateKind::ReadWrite, &HashMap::new()).unwrap();
    (d.get("c").unwrap(), chain_of(d, "upper"))
}

/// Mounts image `img` read-only at `at` (a loop device that goes with
/// the unmount; the rig detaches it if the test fails first).
fn mount_image(img: &Path, at: &Path) {
    fs::create_dir_all(at).unwrap();
    let out = Command::new("mount").args(["-o", "loop,ro,noload"]).arg(img).arg(at).output().unwrap();
    assert!(out.status.success(), "mount {}: {}", img.display(), String::from_utf8_lossy(&out.stderr));
}

fn unmount(at: &Path) {
    let out = Command::new("umount").arg(at).output().unwrap();
    assert!(out.status.success(), "umount {}: {}", at.display(), String::from_utf8_lossy(&out.stderr));
}

fn require_one_pass() {
    if let Err(why) = sharedloop_core::image::one_pass_tool(Path::new("/tmp")) {
        panic!("this test needs mke2fs from e2fsprogs >= 1.47.1 with libarchive (scripts/install-deps): {why}");
    }
}

/// The tree under `fs/` of layer `chain`'s raw image in `rig`'s store,
/// as [`describe`] sees it through a read-only mount of its own.
fn raw_image(rig: &Rig, chain: &str) -> BTreeMap<PathBuf, Desc> {
    let img = rig.path().join("root").join("layers").join(chain).join(IMAGE_FILE);
    let at = rig.path().join("img");
    mount_image(&img, &at);
    let d = describe(&at.join("fs"));
    unmount(&at);
    d
}

/// Puts and removes what [`stack`] made on each host, and cleans up.
fn take_down(hosts: &[(&Driver, &PathBuf)]) {
    for (d, m) in hosts {
        assert!(m.exists());
        d.put("c").unwrap();
        for id in ["c", "upper", "lower"] {
            d.remove(id).unwrap();
        }
        d.cleanup().unwrap();
    }
}

#[test]
fn one_pass_images_hold_what_staged_images_hold() {
    require(&["mke2fs", "mount", "umount"]);
    require_one_pass();
    let (ra, rb) = (Rig::new("sl-onepass-a"), Rig::new("sl-onepass-b"));
    let (a, b) = (host(&ra, false), host(&rb, true));
    assert!(a.report().layer_build.starts_with("staged"), "{}", a.report().layer_build);
    assert!(b.report().layer_build.starts_with("one pass"), "{}", b.report().layer_build);
    let one_pass_before = sharedloop_core::metrics::builds("one_pass");
    let (merged_a, chain_a) = stack(&a);
    let (merged_b, chain_b) = stack(&b);
    assert_eq!(chain_a, chain_b, "the same tars make the same chain");
    assert!(
        sharedloop_core::metrics::builds("one_pass") >= one_pass_before + 2,
        "host b built its two layers in one pass"
    );

    // The container's view: whiteouts hide, the opaque directory hides
    // the lower's files, every file reads the same.
    let (va, vb) = (describe(&merged_a), describe(&merged_b));
    assert!(!vb.contains_key(Path::new("etc/old.conf")), "the whiteout hides the lower's file");
    assert!(vb.contains_key(Path::new("etc/kept.conf")));
    assert!(!vb.contains_key(Path::new("cache/stale")) && !vb.contains_key(Path::new("cache/sub")), "opaque");
    assert_eq!(vb[Path::new("usr/bin/ping")].links, vec![PathBuf::from("usr/bin/ping6")]);
    assert_eq!(vb[Path::new("usr/bin/ping")].mode & 0o7777, 0o4755);
    assert_eq!(vb[Path::new("usr/bin/busybox")].owner, (1_000_000, 2_000_000));
    assert_eq!(vb[Path::new("usr/bin/busybox")].xattrs.get("user.origin").map(Vec::as_slice), Some(&b"a layer"[..]));
    assert!(vb[Path::new("usr/bin/ping")].xattrs.contains_key("security.capability"));
    assert_eq!(vb[Path::new("data")].xattrs.get("user.dir").map(Vec::as_slice), Some(&b"yes"[..]));
    for (p, d) in &va {
        assert_eq!(Some(d), vb.get(p), "{} differs in the container", p.display());
    }
    assert_eq!(
        va.len(),
        vb.len(),
        "the same paths: {:?}",
        vb.keys().filter(|k| !va.contains_key(*k)).collect::<Vec<_>>()
    );

    // The raw images: whiteout devices, the opaque attribute, trusted.*
    // attributes that overlayfs does not show through.
    let (ia, ib) = (raw_image(&ra, &chain_a), raw_image(&rb, &chain_a));
    assert_eq!(ib[Path::new("cache")].xattrs.get("trusted.overlay.opaque").map(Vec::as_slice), Some(&b"y"[..]));
    assert_eq!(ib[Path::new("etc/old.conf")].kind, ia[Path::new("etc/old.conf")].kind);
    assert_eq!(ib[Path::new("etc/old.conf")].rdev, 0, "a whiteout is a 0:0 device");
    assert_eq!(ib[Path::new("etc/old.conf")].links, vec![PathBuf::from("etc/also-old")]);
    assert_eq!(ib[Path::new("usr/bin/odd")].target.as_deref(), Some(Path::new("x//y/.")));
    assert_eq!(
        ib[Path::new("usr/bin/busybox")].xattrs.get("trusted.note").map(Vec::as_slice),
        Some(&b"\x00\x01binary"[..])
    );
    assert_eq!(ia, ib, "the layer images hold the same tree");

    take_down(&[(&a, &merged_a), (&b, &merged_b)]);
}

/// A one-pass build that fails (as a mke2fs that cannot would; fault
/// injection) is done again staged from the same spool: the layer is
/// published all the same, its raw image holds what a staged host's
/// holds, and nothing is left in the home's or the store's tmp.
#[cfg(feature = "fault-injection")]
#[test]
fn a_failed_one_pass_build_is_done_again_staged() {
    require(&["mke2fs", "mount", "umount"]);
    require_one_pass();
    let (ra, rc) = (Rig::new("sl-onepass-fa"), Rig::new("sl-onepass-fc"));
    let (a, c) = (host(&ra, false), host(&rc, true));
    let (merged_a, chain_a) = stack(&a);
    // Host c: the lower in one pass; the upper's one-pass build fails.
    let none = HashMap::new();
    c.create("lower", None, CreateKind::ReadOnly, &none).unwrap();
    c.apply_diff("lower", None, &mut &lower_tar()[..]).unwrap();
    c.create("upper", Some("lower"), CreateKind::ReadOnly, &none).unwrap();
    let staged_before = sharedloop_core::metrics::builds("staged");
    sharedloop_core::fault::fail_next("one-pass-build");
    c.apply_diff("upper", Some("lower"), &mut &upper_tar()[..]).unwrap();
    assert!(!sharedloop_core::fault::fail_pending("one-pass-build"), "the one-pass build was not tried");
    assert!(sharedloop_core::metrics::builds("staged") > staged_before, "no staged build after the failure");
    assert_eq!(chain_of(&c, "upper"), chain_a);
    assert!(c.report().layer_build.starts_with("one pass"), "one failure does not turn one-pass builds off");
    c.create("c", Some("upper"), CreateKind::ReadWrite, &none).unwrap();
    let merged_c = c.get("c").unwrap();
    assert_eq!(describe(&merged_a), describe(&merged_c), "the container sees what a staged host's sees");
    let (ia, ic) = (raw_image(&ra, &chain_a), raw_image(&rc, &chain_a));
    assert_eq!(ia, ic, "the fallback's layer image holds what a staged build's holds");
    for tmp in [rc.path().join("root").join("tmp"), rc.path().join("home").join("tmp")] {
        let leftovers: Vec<_> =
            std::fs::read_dir(&tmp).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert!(leftovers.is_empty(), "the failed build left {leftovers:?} in {}", tmp.display());
    }
    take_down(&[(&a, &merged_a), (&c, &merged_c)]);
}

#[test]
fn tars_one_pass_would_build_differently_go_the_staged_way_and_hostile_ones_are_refused() {
    require(&["mke2fs"]);
    require_one_pass();
    let rig = Rig::new("sl-onepass-staged");
    let d = host(&rig, true);
    // No directory entries (as many hand-made tars): staged, and it works.
    let orphan = common::tar_of("a/b/c.txt", "deep");
    let mut spool = tempfile::tempfile().unwrap();
    std::io::Write::write_all(&mut spool, &orphan).unwrap();
    match sharedloop_core::apply::stream::plan(&spool, None).unwrap() {
        sharedloop_core::apply::stream::Plan::Staged(why) => assert!(why.contains("not listed"), "{why}"),
        p => panic!("planned for one pass: {p:?}"),
    }
    d.create("l", None, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    d.apply_diff("l", None, &mut &orphan[..]).unwrap();
    d.create("c", Some("l"), CreateKind::ReadWrite, &HashMap::new()).unwrap();
    let m = d.get("c").unwrap();
    assert_eq!(fs::read_to_string(m.join("a/b/c.txt")).unwrap(), "deep");
    d.put("c").unwrap();

    // A name that climbs out: refused, nothing published, nothing left.
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../../escape");
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(0);
    h.set_cksum();
    let mut evil = h.as_bytes().to_vec();
    evil.extend_from_slice(&[0u8; 1024]);
    d.create("e", None, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    let err = d.apply_diff("e", None, &mut &evil[..]).unwrap_err().to_string();
    assert!(err.contains(".."), "{err}");
    assert!(!rig.path().join("escape").exists());
    let left: Vec<_> = fs::read_dir(rig.path().join("home/tmp")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.iter().all(|n| !n.to_string_lossy().starts_with("apply-")), "staging left: {left:?}");
    d.remove("e").unwrap();

    // A name ext4 cannot hold (over 255 bytes): mke2fs fails, the staged
    // build is tried and fails too, with an error naming the entry;
    // nothing is published.
    let long = format!("{}.txt", "n".repeat(300));
    d.create("n", None, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    let layers_before = fs::read_dir(rig.path().join("root/layers")).unwrap().count();
    let err = d.apply_diff("n", None, &mut &common::tar_of(&long, "x")[..]).unwrap_err().to_string();
    assert!(err.contains("nnnn"), "{err}");
    assert_eq!(fs::read_dir(rig.path().join("root/layers")).unwrap().count(), layers_before);
    d.remove("n").unwrap();
    d.remove("c").unwrap();
    d.remove("l").unwrap();
    d.cleanup().unwrap();
}

#[test]
fn one_pass_build_true_refuses_xfs() {
    let rig = Rig::new("sl-onepass-xfs");
    let opts = rig.opts(&["sharedloop.one_pass_build=true", "sharedloop.fs=xfs"]);
    let cfg = Config::from_opts(&opts).unwrap();
    assert_eq!(cfg.fs, FsType::Xfs);
    let err = Driver::open(&rig.path().join("home"), cfg).err().expect("refused").to_string();
    assert!(err.contains("one_pass_build") && err.contains("ext4"), "{err}");
}
