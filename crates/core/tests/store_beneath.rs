//! A peer that plants symlinks at each level of the shared store
//! (`refs/<chain>`, `refs/<chain>/<host>`, `layers/<chain>`, `meta.json`,
//! `layer.img`, `tmp`, `claims`, `hosts/<id>`): `add_ref`, `publish`,
//! `gc`, `promote` and `verify` refuse or ignore each one, and nothing
//! outside the store directories is written, truncated or deleted. Runs
//! without root, in a second.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use sharedloop_core::admin::{gc, promote, unusable_layer_dirs, verify, GcPolicy, Verdict};
use sharedloop_core::ids::ChainId;
use sharedloop_core::options::{Config, FsType};
use sharedloop_core::store::{LayerInfo, LayerMeta, Location, Store, FORMAT_VERSION, IMAGE_FILE};

mod rootless;

fn chain(c: char) -> ChainId {
    ChainId::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
}

fn meta(ch: &ChainId, fs: Option<FsType>) -> LayerMeta {
    LayerMeta {
        format: FORMAT_VERSION,
        chain_id: ch.clone(),
        diff_id: None,
        parent: None,
        fs,
        image_bytes: 4,
        content_bytes: 0,
        tar_bytes: 0,
        entries: 0,
        publisher: "peer".into(),
        created_unix: 0,
        image_sha256: fs.map(|_| "0".repeat(64)),
        image_file: None,
    }
}

struct Rig {
    t: tempfile::TempDir,
    root: PathBuf,
    fallback: PathBuf,
    /// What a planted link points at: must stay as it is.
    outside: PathBuf,
    store: Store,
}

impl Rig {
    fn new() -> Rig {
        let t = tempfile::tempdir().unwrap();
        let (root, fallback, outside) = (t.path().join("root"), t.path().join("fallback"), t.path().join("outside"));
        for d in [&root, &fallback, &outside] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(outside.join("precious"), "keep me").unwrap();
        // A complete-looking layer and a host record outside.
        fs::create_dir_all(outside.join("layer")).unwrap();
        let m = meta(&chain('a'), Some(FsType::Ext4));
        fs::write(outside.join("layer/meta.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        fs::write(outside.join("layer").join(IMAGE_FILE), "image").unwrap();
        fs::create_dir_all(outside.join("me.1-build")).unwrap();
        fs::create_dir_all(outside.join("dead.9-build")).unwrap();
        let host = r#"{"host_id":"dead.9","hostname":"x","heartbeat_unix":0,"interval_secs":30}"#;
        fs::write(outside.join("dead.9"), host).unwrap();
        let cfg = Config { root: root.clone(), fallback: fallback.clone(), ..Config::default() };
        let store = Store::new(&cfg, "me.1");
        Rig { t, root, fallback, outside, store }
    }

    /// Every file and directory outside, with its contents.
    fn outside_now(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        fn walk(d: &Path, base: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
            for e in fs::read_dir(d).unwrap().flatten() {
                let p = e.path();
                let rel = p.strip_prefix(base).unwrap().to_owned();
                if e.file_type().unwrap().is_dir() {
                    out.insert(rel, None);
                    walk(&p, base, out);
                } else {
                    out.insert(rel, Some(fs::read(&p).unwrap()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.outside, &self.outside, &mut out);
        out
    }

    fn publish(&self, c: char, fs_type: Option<FsType>) -> LayerInfo {
        let m = meta(&chain(c), fs_type);
        self.store
            .publish(&chain(c), &|tmp: &Path| {
                if m.fs.is_some() {
                    fs::write(tmp.join(IMAGE_FILE), "junk").unwrap();
                }
                Ok(m.clone())
            })
            .unwrap()
            .into_info()
    }

    fn gc_all(&self) {
        let p = GcPolicy { host_timeout_secs: 0, grace_secs: 0, dry_run: false };
        gc(&self.store, &p).unwrap();
    }

    /// Moves root's layers to fallback as they are (a host that published
    /// there while root was away).
    fn move_to_fallback(&self) {
        fs::rename(self.root.join("layers"), self.fallback.join("layers")).unwrap();
        if self.root.join("refs").exists() {
            fs::rename(self.root.join("refs"), self.fallback.join("refs")).unwrap();
        }
    }
}

/// Sets the times of `p` (not followed) to the epoch.
fn make_old(p: &Path) {
    use rustix::fs::{utimensat, AtFlags, Timespec, Timestamps, CWD};
    let t = Timespec { tv_sec: 0, tv_nsec: 0 };
    let ts = Timestamps { last_access: t, last_modification: t };
    utimensat(CWD, p, &ts, AtFlags::SYMLINK_NOFOLLOW).unwrap();
}

#[test]
fn a_planted_reference_directory_is_refused_by_add_ref_gc_and_promote() {
    let r = Rig::new();
    let before = r.outside_now();
    let info = r.publish('a', None);
    fs::create_dir_all(r.root.join("refs")).unwrap();
    symlink(&r.outside, r.root.join("refs").join(chain('a').dir_name())).unwrap();
    r.store.add_ref(&info);
    assert!(r.store.refs(&info).is_empty(), "references read through the link");
    assert!(r.store.held_by("precious").is_empty());
    let _ = r.store.release(&info);
    r.gc_all();
    assert_eq!(r.outside_now(), before, "add_ref, refs, held_by, release, gc");

    // promote: the fallback layer's references go to root, where
    // refs/<chain> is a link: refused, nothing made outside.
    let r = Rig::new();
    let before = r.outside_now();
    let info = r.publish('b', Some(FsType::Ext4));
    r.store.add_ref(&info);
    r.move_to_fallback();
    fs::create_dir_all(r.root.join("refs")).unwrap();
    symlink(&r.outside, r.root.join("refs").join(chain('b').dir_name())).unwrap();
    let e = promote(&r.store, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("refs") && e.contains("symbolic links"), "{e}");
    assert_eq!(r.outside_now(), before, "promote wrote a reference through the link");
    assert!(r.fallback.join("layers").join(chain('b').dir_name()).is_dir(), "the fallback copy went");
}

#[test]
fn a_planted_reference_file_is_never_written_through() {
    let r = Rig::new();
    let before = r.outside_now();
    let info = r.publish('a', None);
    let refs = r.root.join("refs").join(chain('a').dir_name());
    fs::create_dir_all(&refs).unwrap();
    symlink(r.outside.join("precious"), refs.join("me.1")).unwrap();
    symlink(r.outside.join("precious"), refs.join("dead.9")).unwrap();
    r.store.add_ref(&info);
    assert_eq!(r.outside_now(), before, "add_ref opened the link");
    // gc drops the dead host's reference: the link goes, not its target.
    fs::remove_file(refs.join("me.1")).unwrap();
    make_old(&refs.join("dead.9"));
    r.gc_all();
    assert!(r.store.locate(&chain('a')).is_none(), "the layer only a dead host held was kept");
    assert!(!refs.exists());
    assert_eq!(r.outside_now(), before, "gc");

    // promote: a link among the fallback's references is copied as a
    // plain reference; one in root's is refused.
    let r = Rig::new();
    let before = r.outside_now();
    let info = r.publish('c', None);
    r.store.add_ref(&info);
    r.move_to_fallback();
    let fb_refs = r.fallback.join("refs").join(chain('c').dir_name());
    symlink(r.outside.join("precious"), fb_refs.join("other.2")).unwrap();
    let root_refs = r.root.join("refs").join(chain('c').dir_name());
    fs::create_dir_all(&root_refs).unwrap();
    symlink(r.outside.join("precious"), root_refs.join("other.2")).unwrap();
    let e = promote(&r.store, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("other.2"), "{e}");
    assert_eq!(r.outside_now(), before, "promote");
    fs::remove_file(root_refs.join("other.2")).unwrap();
    let rep = promote(&r.store, &mut |_| {}).unwrap();
    assert_eq!(rep.deduplicated, vec![chain('c')]);
    assert!(fs::symlink_metadata(root_refs.join("other.2")).unwrap().is_file());
    assert!(fs::symlink_metadata(root_refs.join("me.1")).unwrap().is_file());
    assert!(!r.fallback.join("refs").join(chain('c').dir_name()).exists());
    assert_eq!(r.outside_now(), before, "promote");
}

#[test]
fn a_planted_layer_directory_or_record_is_not_a_layer() {
    let r = Rig::new();
    let before = r.outside_now();
    let c = chain('a');
    // layers/<chain> -> a complete-looking layer outside.
    fs::create_dir_all(r.root.join("layers")).unwrap();
    symlink(r.outside.join("layer"), r.root.join("layers").join(c.dir_name())).unwrap();
    // layers/<chain> with meta.json -> the record outside.
    let d = chain('d');
    let dd = r.root.join("layers").join(d.dir_name());
    fs::create_dir_all(&dd).unwrap();
    symlink(r.outside.join("layer/meta.json"), dd.join("meta.json")).unwrap();
    assert!(r.store.locate(&c).is_none() && r.store.locate(&d).is_none());
    assert!(r.store.layers(Location::Root).is_empty());
    let bad = unusable_layer_dirs(&r.store, Location::Root);
    assert_eq!(bad.len(), 2, "{bad:?}");
    assert!(bad[0].2.contains("a symbolic link, not followed"), "{bad:?}");
    assert!(bad[1].2.contains("meta.json is a symbolic link"), "{bad:?}");
    r.gc_all();
    // Publishing that chain does not build into the link's target.
    let e = r.store.publish(&c, &|_: &Path| Ok(meta(&c, None)));
    assert!(e.is_err() || e.unwrap().into_info().location == Location::Fallback);
    assert_eq!(r.outside_now(), before, "locate, gc, publish");
    // The same in fallback: promote leaves both alone.
    let r = Rig::new();
    let before = r.outside_now();
    fs::create_dir_all(r.fallback.join("layers")).unwrap();
    symlink(r.outside.join("layer"), r.fallback.join("layers").join(c.dir_name())).unwrap();
    let dd = r.fallback.join("layers").join(d.dir_name());
    fs::create_dir_all(&dd).unwrap();
    symlink(r.outside.join("layer/meta.json"), dd.join("meta.json")).unwrap();
    let rep = promote(&r.store, &mut |_| {}).unwrap();
    assert!(rep.moved.is_empty() && rep.deduplicated.is_empty(), "{rep:?}");
    r.gc_all();
    assert_eq!(unusable_layer_dirs(&r.store, Location::Fallback).len(), 2);
    assert_eq!(r.outside_now(), before, "promote, gc");
}

#[test]
fn a_planted_image_link_is_neither_verified_nor_promoted() {
    let r = Rig::new();
    let before = r.outside_now();
    let c = chain('e');
    let m = meta(&c, Some(FsType::Ext4));
    let layer_img = r.outside.join("layer").join(IMAGE_FILE);
    let info = r
        .store
        .publish(&c, &|tmp: &Path| {
            symlink(&layer_img, tmp.join(IMAGE_FILE)).unwrap();
            Ok(m.clone())
        })
        .unwrap()
        .into_info();
    let v = verify(&info, &mut |_| {}).unwrap();
    assert!(matches!(&v, Verdict::NotRegular { kind, .. } if kind.contains("symbolic link")), "{v:?}");
    r.move_to_fallback();
    let info = r.store.locate(&c).unwrap();
    assert_eq!(info.location, Location::Fallback);
    let e = promote(&r.store, &mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    assert!(!r.root.join("layers").join(c.dir_name()).exists(), "a linked image was promoted");
    assert_eq!(r.outside_now(), before, "verify, promote");
}

#[test]
fn planted_tmp_claims_and_host_links_are_not_swept_or_written() {
    let r = Rig::new();
    let before = r.outside_now();
    symlink(&r.outside, r.root.join("tmp")).unwrap();
    symlink(&r.outside, r.root.join("claims")).unwrap();
    fs::create_dir_all(r.root.join("hosts")).unwrap();
    symlink(r.outside.join("dead.9"), r.root.join("hosts").join("dead.9")).unwrap();
    symlink(r.outside.join("precious"), r.root.join("hosts").join("me.1")).unwrap();
    // hosts/<id> a link: the heartbeat replaces the link, not its target.
    r.store.heartbeat(30);
    assert!(fs::symlink_metadata(r.root.join("hosts/me.1")).unwrap().is_file());
    // A host record read through a link is not a host.
    assert_eq!(r.store.hosts(Location::Root).iter().map(|h| h.host_id.as_str()).collect::<Vec<_>>(), ["me.1"]);
    r.store.sweep_own_tmp();
    r.gc_all();
    assert!(r.store.root_problem().is_some(), "a root whose tmp is a link takes layers");
    let info = r.publish('f', None);
    assert_eq!(info.location, Location::Fallback);
    assert!(promote(&r.store, &mut |_| {}).is_err(), "promoted into a root whose tmp is a link");
    r.gc_all();
    assert_eq!(r.outside_now(), before, "heartbeat, sweep, gc, publish, promote");
    drop(r.t);
}

#[test]
fn promote_moves_a_layer_and_its_references_whole() {
    let r = Rig::new();
    let info = r.publish('7', Some(FsType::Ext4));
    r.store.add_ref(&info);
    r.move_to_fallback();
    let rep = promote(&r.store, &mut |_| {}).unwrap();
    assert_eq!(rep.moved, vec![chain('7')]);
    assert_eq!(rep.bytes_copied, 4);
    let info = r.store.locate(&chain('7')).unwrap();
    assert_eq!(info.location, Location::Root);
    assert_eq!(fs::read(info.image().unwrap()).unwrap(), b"junk");
    assert!(info.meta.image_file.is_some(), "the copy's identity is recorded");
    assert_eq!(r.store.refs(&info), ["me.1"]);
    assert!(r.store.layers(Location::Fallback).is_empty());
    assert!(fs::read_dir(r.fallback.join("tmp")).unwrap().next().is_none(), "the fallback copy is left in tmp");
}

/// Every other test of this file again, as `nobody` (see `rootless`): the
/// store's defences hold for a daemon without privilege too.
#[test]
fn every_test_here_passes_as_a_non_root_user() {
    rootless::run_the_others_as_nobody("every_test_here_passes_as_a_non_root_user", 6);
}
