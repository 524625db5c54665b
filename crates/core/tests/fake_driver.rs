//! The rootless tier: the driver's logic on [`FakeKernel`], without root,
//! loop devices or mounts, in seconds. Reference counting of layer mounts,
//! Get/Put, removal with children, reconcile after a crash, commit and its
//! rollback, and the cleanup of every failure the kernel can return. The
//! same logic is tested against the real kernel, as root, in
//! driver_locks.rs and the front ends' tests.
//!
//! `every_test_here_passes_as_a_non_root_user` runs this whole file again
//! as `nobody` when it runs as root (as `./scripts/test` does), so the tier
//! is shown to need no privilege on every run.
//!
//! No timing is asserted: a held kernel call is held until the test lets
//! it go, and waits are bounded only to fail a hung test.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::io::Errno;
use sharedloop_core::driver::LayerReportKind;
use sharedloop_core::ids::ChainId;
use sharedloop_core::kernel::fake::{FakeKernel, Op};
use sharedloop_core::kernel::Kernel;
use sharedloop_core::options::Config;
use sharedloop_core::{CreateKind, Driver, Error};

mod rootless;

struct Rig {
    dir: tempfile::TempDir,
    kernel: Arc<FakeKernel>,
}

fn rig() -> Rig {
    let dir = tempfile::Builder::new().prefix("sl-fake-").tempdir().unwrap();
    fs::create_dir_all(dir.path().join("root")).unwrap();
    Rig { dir, kernel: FakeKernel::new() }
}

impl Rig {
    fn home(&self, host: &str) -> PathBuf {
        self.dir.path().join(host)
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A driver of host `host` (its own home) on the rig's store and kernel.
    fn open(&self, host: &str, extra: &[&str]) -> Driver {
        let mut opts = vec![
            format!("sharedloop.loopback_root={}", self.root().display()),
            format!("sharedloop.loopback_fallback={}", self.dir.path().join("fallback").display()),
        ];
        opts.extend(extra.iter().map(|s| s.to_string()));
        let cfg = Config::from_opts(&opts).unwrap();
        Driver::open_on(self.kernel.clone(), &self.home(host), cfg, None).unwrap()
    }

    /// The fake mounts at or below `dir`.
    fn mounts_under(&self, dir: &Path) -> Vec<PathBuf> {
        self.kernel.mounts().into_iter().map(|m| m.mount_point).filter(|p| p.starts_with(dir)).collect()
    }

    /// Published layers in the store's root.
    fn published(&self) -> usize {
        fs::read_dir(self.root().join("layers")).map(|rd| rd.count()).unwrap_or(0)
    }
}

/// A layer tar of `files` (name, text), owned by whoever runs the test
/// (a non-root user can give files only to itself).
fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
    let (uid, gid) = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    let mut b = tar::Builder::new(Vec::new());
    for (name, text) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(uid.into());
        h.set_gid(gid.into());
        h.set_size(text.len() as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, text.as_bytes()).unwrap();
    }
    b.into_inner().unwrap()
}

/// Image layer `id` over `parent` with `files`; its chain.
fn layer(d: &Driver, id: &str, parent: Option<&str>, files: &[(&str, &str)]) -> ChainId {
    d.create(id, parent, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    d.apply_diff(id, parent, &mut &tar_of(files)[..]).unwrap();
    chain(d, id)
}

fn chain(d: &Driver, id: &str) -> ChainId {
    match d.layer_report(id).unwrap().kind {
        LayerReportKind::Image { chain: Some(c) } => c,
        k => panic!("layer {id} has no chain: {k:?}"),
    }
}

fn writable(d: &Driver, id: &str, parent: Option<&str>) {
    d.create(id, parent, CreateKind::ReadWrite, &HashMap::new()).unwrap();
}

fn read(dir: &Path, name: &str) -> String {
    fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(name).display()))
}

/// Two writable layers on one published layer: the layer image is
/// attached and mounted once for both, shows its files through both
/// stacks, and stays mounted until the last local layer on it is removed;
/// then this host's reference goes, and with it the layer (no other host
/// holds it).
#[test]
fn a_published_layer_is_mounted_once_and_released_by_its_last_user() {
    let rig = rig();
    let d = rig.open("a", &[]);
    let c = layer(&d, "base", None, &[("etc/os", "fake os\n")]);
    writable(&d, "c1", Some("base"));
    writable(&d, "c2", Some("base"));
    let m1 = d.get("c1").unwrap();
    let m2 = d.get("c2").unwrap();
    assert_eq!(read(&m1, "etc/os"), "fake os\n");
    assert_eq!(read(&m2, "etc/os"), "fake os\n");
    let layer_mnt = rig.home("a").join("mnt").join(c.dir_name());
    assert_eq!(rig.kernel.count_on(Op::MountImage, &c.dir_name()), 1, "{:?}", rig.kernel.calls());
    assert_eq!(rig.kernel.count_on(Op::Attach, &c.dir_name()), 1);
    assert_eq!(rig.kernel.count(Op::MountOverlay), 2);
    d.put("c1").unwrap();
    d.put("c2").unwrap();
    assert!(rig.mounts_under(&rig.home("a").join("merged")).is_empty());
    d.remove("c1").unwrap();
    d.remove("c2").unwrap();
    d.settle();
    assert_eq!(rig.mounts_under(&layer_mnt), vec![layer_mnt.clone()], "the image layer itself still uses it");
    assert_eq!(rig.published(), 1);
    d.remove("base").unwrap();
    let mnt = rig.home("a").join("mnt");
    assert_eq!(rig.mounts_under(&mnt), vec![mnt.clone()], "only the directory's own private bind is left");
    assert!(rig.mounts_under(&rig.home("a").join("rwmnt")).is_empty(), "{:?}", rig.kernel.mounts());
    assert_eq!(rig.published(), 0, "the last reference went, and the layer with it");
    assert_eq!(rig.kernel.count_on(Op::Unmount, &c.dir_name()), 1);
}

/// Get and Put count: one overlay for two Gets, unmounted by the second
/// Put; a Remove while a Get is held is refused and changes nothing.
#[test]
fn gets_and_puts_are_counted_and_a_held_layer_is_not_removed() {
    let rig = rig();
    let d = rig.open("a", &[]);
    layer(&d, "base", None, &[("f", "1")]);
    writable(&d, "r", Some("base"));
    let a = d.get("r").unwrap();
    let b = d.get("r").unwrap();
    assert_eq!(a, b);
    assert_eq!(rig.kernel.count(Op::MountOverlay), 1);
    match d.remove("r") {
        Err(Error::InUse { .. }) => {}
        r => panic!("remove of a held layer: {r:?}"),
    }
    d.put("r").unwrap();
    assert_eq!(rig.mounts_under(&a), vec![a.clone()], "one Get is still held");
    d.put("r").unwrap();
    assert!(rig.mounts_under(&a).is_empty());
    d.put("r").unwrap(); // one too many: not an error
    d.remove("r").unwrap();
    d.settle();
    assert!(!rig.home("a").join("rw").join("r").exists());
    assert!(rig.mounts_under(&rig.home("a").join("rwmnt")).is_empty(), "{:?}", rig.kernel.mounts());
    assert!(!d.exists("r"));
}

/// A layer with a child is not removed; the child first, then the parent.
#[test]
fn a_layer_with_children_is_removed_only_after_them() {
    let rig = rig();
    let d = rig.open("a", &[]);
    layer(&d, "l1", None, &[("a", "1")]);
    layer(&d, "l2", Some("l1"), &[("b", "2")]);
    match d.remove("l1") {
        Err(Error::InUse { why, .. }) => assert!(why.contains("l2"), "{why}"),
        r => panic!("remove of a parent: {r:?}"),
    }
    assert!(d.exists("l1"));
    let v = d.get("l2").unwrap();
    assert_eq!((read(&v, "a"), read(&v, "b")), ("1".into(), "2".into()));
    d.put("l2").unwrap();
    d.remove("l2").unwrap();
    d.remove("l1").unwrap();
    assert_eq!(rig.published(), 0);
    assert!(d.layer_ids().is_empty());
}

/// Item 4 of issue 11, shown with a slow check: host B mounts layers that
/// host A published, with `verify=full`, so each first mount runs fsck.
/// With fsck held, the first mounts of two different layers are both in
/// their check at once (one does not wait for the other); a Get of a
/// writable layer on the first one's layer waits for that mount instead of
/// making its own. Once fsck is let go, all three Gets see their files,
/// and each layer image was attached once.
#[test]
fn first_mounts_of_different_layers_proceed_in_parallel() {
    let rig = rig();
    let a = rig.open("a", &[]);
    let ca = layer(&a, "x", None, &[("x", "layer x\n")]);
    let cb = layer(&a, "y", None, &[("y", "layer y\n")]);
    let b = rig.open("b", &["sharedloop.verify=full"]);
    assert_eq!(layer(&b, "x", None, &[("x", "layer x\n")]), ca);
    assert_eq!(layer(&b, "y", None, &[("y", "layer y\n")]), cb);
    assert_eq!(rig.kernel.count(Op::BuildImage), 2, "host B found both layers published");
    writable(&b, "rx", Some("x"));
    rig.kernel.hold(Op::Fsck);
    std::thread::scope(|s| {
        let gx = s.spawn(|| b.get("x"));
        let gy = s.spawn(|| b.get("y"));
        rig.kernel.wait_parked(Op::Fsck, 2);
        let grx = s.spawn(|| b.get("rx"));
        rig.kernel.release(Op::Fsck);
        let (x, y, rx) = (gx.join().unwrap().unwrap(), gy.join().unwrap().unwrap(), grx.join().unwrap().unwrap());
        assert_eq!(read(&x, "x"), "layer x\n");
        assert_eq!(read(&y, "y"), "layer y\n");
        assert_eq!(read(&rx, "x"), "layer x\n");
    });
    assert_eq!(rig.kernel.count(Op::Fsck), 2);
    assert_eq!(rig.kernel.count_on(Op::Attach, &ca.dir_name()), 1, "{:?}", rig.kernel.calls());
    assert_eq!(rig.kernel.count_on(Op::Attach, &cb.dir_name()), 1);
}

/// A run that ended without Cleanup (a crash) left mounts: reconcile
/// adopts those of layers it knows (no mount made again), unmounts the
/// rest (an overlay of an unknown layer, a stray mount in the layer mount
/// directory) and deletes a removal the crash interrupted, staging and
/// build files included.
#[test]
fn reconcile_adopts_what_a_crashed_run_left_and_unmounts_the_rest() {
    let rig = rig();
    let home = rig.home("a");
    let d = rig.open("a", &[]);
    let c = layer(&d, "base", None, &[("f", "1")]);
    writable(&d, "r", Some("base"));
    let merged = d.get("r").unwrap();
    let k = &rig.kernel;
    let ghost = home.join("merged").join("ghost");
    fs::create_dir_all(&ghost).unwrap();
    k.mount_overlay(&sharedloop_core::mount::OverlaySpec { lowers: &[home.join("empty")], upper: None }, &ghost)
        .unwrap();
    let stray = home.join("mnt").join("not-a-layer");
    fs::create_dir_all(&stray).unwrap();
    k.bind(&home.join("empty"), &stray, false).unwrap();
    let grave = home.join("rw").join(".rm-crashed");
    fs::create_dir_all(grave.join("img")).unwrap();
    // An interrupted ApplyDiff's staging, a one-pass build's local image
    // for a network store and the one-pass probe's image.
    fs::create_dir_all(home.join("tmp").join("apply-crashed").join("fs")).unwrap();
    fs::write(home.join("tmp").join(".build-crashed.img"), "half an image").unwrap();
    fs::write(home.join("tmp").join(".probe-crashed.img"), "a probe").unwrap();
    drop(d); // no cleanup: what was mounted stays mounted
    let (images, overlays) = (k.count(Op::MountImage), k.count(Op::MountOverlay));
    let d = rig.open("a", &[]);
    let left: Vec<_> = fs::read_dir(home.join("tmp")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "a crashed run's staging and build files are left: {left:?}");
    assert!(!k.is_mountpoint(&ghost), "{:?}", k.mounts());
    assert!(!k.is_mountpoint(&stray));
    assert!(!grave.exists());
    assert_eq!(d.get("r").unwrap(), merged, "the overlay left mounted is adopted");
    assert_eq!(read(&merged, "f"), "1");
    assert_eq!((k.count(Op::MountImage), k.count(Op::MountOverlay)), (images, overlays), "nothing mounted again");
    assert!(k.is_mountpoint(&home.join("mnt").join(c.dir_name())));
    d.put("r").unwrap();
    d.put("r").unwrap();
    d.cleanup().unwrap();
    assert!(rig.mounts_under(&home).is_empty(), "{:?}", k.mounts());
}

/// A commit whose image build fails publishes nothing and leaves the
/// writable layer as it was: no layer recorded, no staging or mount left,
/// its changes still there; the next commit succeeds and shows them over
/// the layer below.
#[test]
fn a_commit_whose_build_fails_is_rolled_back() {
    let rig = rig();
    let home = rig.home("a");
    let d = rig.open("a", &[]);
    layer(&d, "base", None, &[("f", "1")]);
    writable(&d, "r", Some("base"));
    d.get("r").unwrap();
    let upper = home.join("rwmnt").join("r").join("upper");
    fs::write(upper.join("new"), "changed").unwrap();
    rig.kernel.fail(Op::BuildImage, "", Errno::NOMEM, 2); // in root, then in the fallback
    let e = d.commit("r", "frozen", None).unwrap_err();
    assert!(e.to_string().contains("Cannot allocate memory"), "{e}");
    assert!(!d.exists("frozen"));
    assert_eq!(rig.published(), 1, "nothing published");
    assert!(fs::read_dir(home.join("tmp")).unwrap().next().is_none(), "staging left");
    assert!(rig.mounts_under(&home.join("tmp")).iter().all(|p| *p == home.join("tmp")), "{:?}", rig.kernel.mounts());
    assert_eq!(read(&upper, "new"), "changed");
    let c = d.commit("r", "frozen", None).unwrap();
    assert_eq!(rig.published(), 2);
    let v = d.get("frozen").unwrap();
    assert_eq!((read(&v, "new"), read(&v, "f")), ("changed".into(), "1".into()));
    assert!(rig.kernel.count_on(Op::Bind, "commit-") >= 2, "the upper was bound into staging");
    d.put("frozen").unwrap();
    d.put("r").unwrap();
    d.remove("r").unwrap();
    d.remove("frozen").unwrap();
    d.remove("base").unwrap();
    d.settle();
    assert_eq!(rig.published(), 0, "{c} and base released");
}

/// A writable layer over a writable parent (a container over Docker's
/// init layer) commits: the parent is frozen into a snapshot first, and
/// the committed layer shows its own changes over the parent's and the
/// image's. Removing it lets go of both published layers.
#[test]
fn a_writable_layer_over_a_writable_parent_commits_over_a_snapshot_of_it() {
    let rig = rig();
    let home = rig.home("a");
    let d = rig.open("a", &[]);
    layer(&d, "base", None, &[("f", "image")]);
    writable(&d, "init", Some("base"));
    d.get("init").unwrap();
    fs::write(home.join("rwmnt/init/upper/hostname"), "c1").unwrap();
    d.put("init").unwrap();
    writable(&d, "ctr", Some("init"));
    let m = d.get("ctr").unwrap();
    assert_eq!((read(&m, "f"), read(&m, "hostname")), ("image".into(), "c1".into()));
    fs::write(home.join("rwmnt/ctr/upper/own"), "changed").unwrap();
    d.commit("ctr", "frozen", None).unwrap();
    assert_eq!(rig.published(), 3, "the image, the parent's snapshot, the committed layer");
    let v = d.get("frozen").unwrap();
    assert_eq!((read(&v, "f"), read(&v, "hostname"), read(&v, "own")), ("image".into(), "c1".into(), "changed".into()));
    d.put("frozen").unwrap();
    d.remove("frozen").unwrap();
    assert_eq!(rig.published(), 1, "both let go");
    d.put("ctr").unwrap();
    for id in ["ctr", "init", "base"] {
        d.remove(id).unwrap();
    }
    d.settle();
    assert_eq!(rig.published(), 0);
}

/// The root refusing a build for want of space (ENOSPC from the image
/// build in the root's `tmp/`) sends the layer to the fallback directory,
/// as the spec has it; the layer works from there.
#[test]
fn a_root_without_space_sends_the_layer_to_the_fallback() {
    let rig = rig();
    let d = rig.open("a", &[]);
    let root_tmp = rig.root().join("tmp");
    rig.kernel.fail(Op::BuildImage, &root_tmp.display().to_string(), Errno::NOSPC, 1);
    let c = layer(&d, "l", None, &[("f", "in fallback")]);
    assert_eq!(rig.published(), 0);
    let fallback = rig.dir.path().join("fallback").join("layers").join(c.dir_name());
    assert!(fallback.join("meta.json").exists(), "not in the fallback");
    let v = d.get("l").unwrap();
    assert_eq!(read(&v, "f"), "in fallback");
    d.put("l").unwrap();
}

/// Failures of the kernel on the request path leave nothing behind and
/// the next try works: an overlay mount refused (Get), a loop device not
/// to be had (first mount), an unmount refused (Put keeps the layer held).
#[test]
fn kernel_failures_leave_nothing_and_the_next_try_works() {
    let rig = rig();
    let a = rig.open("a", &[]);
    let c = layer(&a, "base", None, &[("f", "1")]);
    let b = rig.open("b", &[]);
    layer(&b, "base", None, &[("f", "1")]);
    writable(&b, "r", Some("base"));
    let k = &rig.kernel;
    let home = rig.home("b");

    k.fail(Op::Attach, &c.dir_name(), Errno::NOSPC, 1);
    let e = b.get("r").unwrap_err();
    assert!(e.to_string().contains("attach loop device"), "{e}");
    assert!(!home.join("mnt").join(c.dir_name()).exists(), "the mount point goes with the failure");
    assert!(rig.mounts_under(&home.join("merged")).is_empty());

    k.fail(Op::MountOverlay, "merged", Errno::NOMEM, 1);
    let e = b.get("r").unwrap_err();
    assert!(e.to_string().contains("mount overlay"), "{e}");
    assert!(!k.is_mountpoint(&home.join("merged").join("r")));

    let m = b.get("r").unwrap();
    assert_eq!(read(&m, "f"), "1");
    k.fail(Op::Unmount, "merged", Errno::BUSY, 1);
    assert!(b.put("r").is_err());
    assert!(k.is_mountpoint(&m), "a Put that failed keeps the layer held");
    assert!(matches!(b.remove("r"), Err(Error::InUse { .. })));
    b.put("r").unwrap();
    assert!(!k.is_mountpoint(&m));
    b.remove("r").unwrap();
    b.settle();
    b.cleanup().unwrap();
    assert!(rig.mounts_under(&home).is_empty(), "{:?}", k.mounts());
}

/// Cleanup releases every mount of the driver (overlays, writable layers,
/// layer mounts, staging, the home's own bind), and a new driver opens on
/// the same home and serves the layers again.
#[test]
fn cleanup_releases_every_mount_and_a_reopened_driver_serves_again() {
    let rig = rig();
    let home = rig.home("a");
    let d = rig.open("a", &[]);
    layer(&d, "l1", None, &[("a", "1")]);
    layer(&d, "l2", Some("l1"), &[("b", "2")]);
    writable(&d, "r", Some("l2"));
    d.get("r").unwrap();
    d.get("l2").unwrap();
    assert!(!rig.mounts_under(&home).is_empty());
    d.cleanup().unwrap();
    assert!(rig.mounts_under(&home).is_empty(), "{:?}", rig.kernel.mounts());
    assert!(d.get("r").is_err(), "a cleaned-up driver serves nothing");
    drop(d);
    let d = rig.open("a", &[]);
    let m = d.get("r").unwrap();
    assert_eq!((read(&m, "a"), read(&m, "b")), ("1".into(), "2".into()));
    d.put("r").unwrap();
    d.cleanup().unwrap();
    assert!(rig.mounts_under(&home).is_empty(), "{:?}", rig.kernel.mounts());
}

/// Every other test of this file again, as `nobody` (see `rootless`).
#[test]
fn every_test_here_passes_as_a_non_root_user() {
    rootless::run_the_others_as_nobody("every_test_here_passes_as_a_non_root_user", 8);
}
