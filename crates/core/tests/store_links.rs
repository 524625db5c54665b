//! Symlinks another host plants in the shared root are never followed: no
//! write, delete or mount goes through one.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use sharedloop_core::admin::{gc, GcPolicy};
use sharedloop_core::ids::{ChainId, DiffId};
use sharedloop_core::layermounts::{LayerMounts, Policy};
use sharedloop_core::options::{Config, DirectIo, FsType, VerifyMode};
use sharedloop_core::store::{LayerMeta, Store, FORMAT_VERSION, IMAGE_FILE};

fn chain(c: char) -> ChainId {
    ChainId::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
}

fn meta(ch: &ChainId, fs: Option<FsType>) -> LayerMeta {
    LayerMeta {
        format: FORMAT_VERSION,
        chain_id: ch.clone(),
        diff_id: Some(serde_json::from_value::<DiffId>(serde_json::json!(ch.as_str())).unwrap()),
        parent: None,
        fs,
        image_bytes: 0,
        content_bytes: 0,
        tar_bytes: 0,
        entries: 0,
        publisher: "other".into(),
        created_unix: 0,
        image_sha256: None,
        image_file: None,
    }
}

struct Rig {
    _t: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    store: Store,
}

fn rig() -> Rig {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    fs::create_dir_all(&root).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("precious"), "keep me").unwrap();
    let cfg = Config { root: root.clone(), fallback: t.path().join("fallback"), ..Config::default() };
    let store = Store::new(&cfg, "me.0123");
    Rig { _t: t, root, outside, store }
}

fn outside_untouched(r: &Rig, what: &str) {
    let names: Vec<String> =
        fs::read_dir(&r.outside).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["precious".to_owned()], "{what}: written through a symlink");
    assert_eq!(fs::read_to_string(r.outside.join("precious")).unwrap(), "keep me", "{what}");
}

fn publish_empty(r: &Rig, ch: &ChainId) -> sharedloop_core::store::LayerInfo {
    let m = meta(ch, None);
    r.store.publish(ch, &|_: &Path| Ok(m.clone())).unwrap().into_info()
}

#[test]
fn a_planted_refs_symlink_is_not_written_or_emptied() {
    let r = rig();
    let c = chain('a');
    let info = publish_empty(&r, &c);
    fs::create_dir_all(r.root.join("refs")).unwrap();
    symlink(&r.outside, r.root.join("refs").join(c.dir_name())).unwrap();
    r.store.add_ref(&info);
    outside_untouched(&r, "add_ref");
    assert!(r.store.refs(&info).is_empty(), "refs read through the link");
    // Release and gc with a dead host whose name matches a file outside.
    fs::write(r.outside.join("dead.host"), "").unwrap();
    let _ = r.store.release(&info);
    let p = GcPolicy { host_timeout_secs: 0, grace_secs: 0, dry_run: false };
    let _ = gc(&r.store, &p);
    assert!(r.outside.join("dead.host").exists(), "gc deleted through the link");
    fs::remove_file(r.outside.join("dead.host")).unwrap();
    outside_untouched(&r, "release and gc");
}

#[test]
fn planted_hosts_and_tmp_symlinks_are_not_written_or_swept() {
    let r = rig();
    symlink(&r.outside, r.root.join("hosts")).unwrap();
    symlink(&r.outside, r.root.join("tmp")).unwrap();
    fs::create_dir(r.outside.join("me.0123-build")).unwrap();
    fs::create_dir(r.outside.join("gone.host-build")).unwrap();
    r.store.heartbeat(30);
    r.store.sweep_own_tmp();
    let p = GcPolicy { host_timeout_secs: 0, grace_secs: 0, dry_run: false };
    gc(&r.store, &p).unwrap();
    assert!(
        r.outside.join("me.0123-build").is_dir() && r.outside.join("gone.host-build").is_dir(),
        "swept through tmp"
    );
    fs::remove_dir(r.outside.join("me.0123-build")).unwrap();
    fs::remove_dir(r.outside.join("gone.host-build")).unwrap();
    outside_untouched(&r, "heartbeat, sweep, gc");
    // With tmp a symlink, root cannot take layers: they go to fallback.
    let info = publish_empty(&r, &chain('b'));
    assert_eq!(info.location.name(), "fallback");
    outside_untouched(&r, "publish");
}

#[test]
fn a_planted_layer_symlink_is_not_a_layer() {
    let r = rig();
    let c = chain('c');
    // A complete-looking layer outside, linked in under a real chain id.
    fs::write(r.outside.join("meta.json"), serde_json::to_vec(&meta(&c, None)).unwrap()).unwrap();
    fs::create_dir_all(r.root.join("layers")).unwrap();
    symlink(&r.outside, r.root.join("layers").join(c.dir_name())).unwrap();
    assert!(r.store.locate(&c).is_none(), "a symlinked layer directory was used");
    assert!(r.store.layers(sharedloop_core::store::Location::Root).is_empty());
    fs::remove_file(r.outside.join("meta.json")).unwrap();
}

#[test]
fn a_symlinked_layer_image_is_refused_before_the_kernel_sees_it() {
    let r = rig();
    let c = chain('d');
    let m = meta(&c, Some(FsType::Ext4));
    let info = r
        .store
        .publish(&c, &|tmp: &Path| {
            symlink("/dev/null", tmp.join(IMAGE_FILE)).unwrap();
            Ok(m.clone())
        })
        .unwrap()
        .into_info();
    let mnt = r._t.path().join("mnt");
    let mounts = LayerMounts::open(&mnt, &r._t.path().join("verified"), false).unwrap();
    for mode in [VerifyMode::Off, VerifyMode::Digest] {
        let e = mounts.acquire(&info, Path::new("/test"), &Policy::new(mode, DirectIo::Off)).unwrap_err().to_string();
        assert!(e.contains("not a regular file") && e.contains(IMAGE_FILE), "{mode:?}: {e}");
    }
    assert_eq!(mounts.count(), 0);
    let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH);
}
