//! The snapshotter's logic on the fake kernel (the rootless tier; see
//! crates/core/tests/fake_driver.rs): an unpack as containerd makes it
//! (prepare, write, commit, layer after layer), views, removal order,
//! a commit rolled back, and a restart. Run as root, the last test runs the
//! others again as `nobody`. The same paths run against real containerd
//! in crates/sharedloop/tests/containerd.rs and engines.rs.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::io::Errno;
use sharedloop_containerd::snapshots::SnapKind;
use sharedloop_containerd::Snapshotter;
use sharedloop_core::kernel::fake::{FakeKernel, Op};
use sharedloop_core::options::Config;
use sharedloop_core::{Driver, Error, MountSpec};

#[path = "../../core/tests/rootless/mod.rs"]
mod rootless;

struct Rig {
    dir: tempfile::TempDir,
    kernel: Arc<FakeKernel>,
}

fn rig() -> Rig {
    let dir = tempfile::Builder::new().prefix("sl-fake-snap-").tempdir().unwrap();
    fs::create_dir_all(dir.path().join("root")).unwrap();
    Rig { dir, kernel: FakeKernel::new() }
}

impl Rig {
    fn open(&self) -> Snapshotter {
        let opts = [
            format!("sharedloop.loopback_root={}", self.dir.path().join("root").display()),
            format!("sharedloop.loopback_fallback={}", self.dir.path().join("fallback").display()),
        ];
        let cfg = Config::from_opts(&opts).unwrap();
        let d = Driver::open_on(self.kernel.clone(), &self.home(), cfg, None).unwrap();
        Snapshotter::open(d).unwrap()
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn published(&self) -> usize {
        fs::read_dir(self.dir.path().join("root").join("layers")).map(|rd| rd.count()).unwrap_or(0)
    }
}

fn none() -> BTreeMap<String, String> {
    BTreeMap::new()
}

/// Where an active snapshot's changes go: a bind's source or the overlay's
/// upper directory.
fn upper_of(m: &[MountSpec]) -> PathBuf {
    assert_eq!(m.len(), 1, "{m:?}");
    if m[0].fs_type == "bind" {
        return PathBuf::from(&m[0].source);
    }
    let o = m[0].options.iter().find_map(|o| o.strip_prefix("upperdir=")).expect("an upper directory");
    PathBuf::from(o)
}

/// The read-only directories a mount stacks, topmost first.
fn lowers_of(m: &[MountSpec]) -> Vec<PathBuf> {
    assert_eq!(m.len(), 1, "{m:?}");
    if m[0].fs_type == "bind" {
        return vec![PathBuf::from(&m[0].source)];
    }
    let l = m[0].options.iter().find_map(|o| o.strip_prefix("lowerdir=")).expect("lower directories");
    l.split(':').map(PathBuf::from).collect()
}

/// The file `name` as the stack `dirs` (topmost first) shows it.
fn find(dirs: &[PathBuf], name: &str) -> Option<String> {
    dirs.iter().find_map(|d| fs::read_to_string(d.join(name)).ok())
}

/// Unpacks `n` layers as containerd does, one file each; returns the
/// committed names.
fn unpack(sn: &Snapshotter, n: usize) -> Vec<String> {
    let mut parent = String::new();
    let mut names = Vec::new();
    for i in 0..n {
        let key = format!("extract-{i}");
        let m = sn.prepare(&key, &parent, none()).unwrap();
        fs::write(upper_of(&m).join(format!("f{i}")), format!("layer {i}")).unwrap();
        let name = format!("layer-{i}");
        sn.commit(&name, &key, none()).unwrap();
        parent = name.clone();
        names.push(name);
    }
    names
}

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

#[test]
fn an_unpack_commits_layers_that_a_view_and_a_container_stack() {
    let rig = rig();
    let sn = rig.open();
    let names = unpack(&sn, 3);
    assert_eq!(rig.published(), 3);
    assert_eq!(rig.kernel.count(Op::BuildImage), 3);
    let v = sn.view("view", &names[2], none()).unwrap();
    let lowers = lowers_of(&v);
    for i in 0..3 {
        assert_eq!(find(&lowers, &format!("f{i}")).as_deref(), Some(format!("layer {i}").as_str()), "{lowers:?}");
    }
    let c = sn.prepare("container", &names[2], none()).unwrap();
    write(&upper_of(&c), "own", "container's own");
    assert_eq!(lowers_of(&c), lowers, "a container stands on what the view shows");
    assert_eq!(sn.stat("container").unwrap().kind, SnapKind::Active);
    for k in ["container", "view", "layer-2", "layer-1", "layer-0"] {
        sn.remove(k).unwrap();
    }
    sn.driver().settle();
    assert_eq!(rig.published(), 0);
    assert!(sn.list(&[]).unwrap().is_empty());
    let left: Vec<_> = rig.kernel.mounts().into_iter().filter(|m| m.mount_point.starts_with(rig.home())).collect();
    let (home, tmp, mnt) = (rig.home(), rig.home().join("tmp"), rig.home().join("mnt"));
    // The home's, staging's and the layer directory's own mounts stay.
    assert!(left.iter().all(|m| [&home, &tmp, &mnt].contains(&&m.mount_point)), "{left:?}");
}

#[test]
fn a_snapshot_with_children_is_not_removed() {
    let rig = rig();
    let sn = rig.open();
    let names = unpack(&sn, 2);
    match sn.remove(&names[0]) {
        Err(Error::Conflict(why)) => assert!(why.contains(&names[1]), "{why}"),
        r => panic!("remove of a parent: {r:?}"),
    }
    assert_eq!(sn.stat(&names[0]).unwrap().kind, SnapKind::Committed);
    assert_eq!(rig.published(), 2);
}

/// A commit whose image build fails leaves the active snapshot as it was
/// (still active, its changes there), records nothing, publishes nothing;
/// the commit then succeeds.
#[test]
fn a_commit_that_fails_leaves_the_active_snapshot() {
    let rig = rig();
    let sn = rig.open();
    let m = sn.prepare("k", "", none()).unwrap();
    let upper = upper_of(&m);
    write(&upper, "a", "1");
    rig.kernel.fail(Op::BuildImage, "", Errno::NOMEM, 2); // in root, then in the fallback
    let e = sn.commit("n", "k", none()).unwrap_err();
    assert!(e.to_string().contains("Cannot allocate memory"), "{e}");
    assert!(matches!(sn.stat("n"), Err(Error::NotFound(_))));
    assert_eq!(sn.stat("k").unwrap().kind, SnapKind::Active);
    assert_eq!(fs::read_to_string(upper.join("a")).unwrap(), "1");
    assert_eq!(rig.published(), 0);
    sn.commit("n", "k", none()).unwrap();
    assert!(matches!(sn.stat("k"), Err(Error::NotFound(_))));
    assert_eq!(rig.published(), 1);
}

/// After a restart (the process gone without cleanup, its mounts left),
/// the snapshots are there and their mounts work; a layer no snapshot
/// names (a crash between making it and recording it) is removed.
#[test]
fn a_restart_keeps_the_snapshots_and_drops_a_stray_layer() {
    let rig = rig();
    let sn = rig.open();
    let names = unpack(&sn, 2);
    let m = sn.prepare("ctr", &names[1], none()).unwrap();
    write(&upper_of(&m), "x", "kept");
    sn.driver()
        .create("stray", None, sharedloop_core::CreateKind::ReadWrite, &std::collections::HashMap::new())
        .unwrap();
    drop(sn);
    let sn = rig.open();
    assert!(!sn.driver().exists("stray"));
    let mut keys: Vec<String> = sn.list(&[]).unwrap().into_iter().map(|s| s.name).collect();
    keys.sort();
    assert_eq!(keys, vec!["ctr", "layer-0", "layer-1"]);
    let m = sn.mounts("ctr").unwrap();
    assert_eq!(fs::read_to_string(upper_of(&m).join("x")).unwrap(), "kept");
    assert_eq!(find(&lowers_of(&m), "f0").as_deref(), Some("layer 0"));
}

/// Docker's init layer (`<id>-init` committed from `<id>-init-prepare`)
/// stays on this host: no image built, nothing published; the container's
/// snapshot stacks on it, it survives a restart, and it goes with its
/// removal.
#[test]
fn dockers_init_layer_is_committed_on_this_host_only() {
    let rig = rig();
    let sn = rig.open();
    let names = unpack(&sn, 1);
    let builds = rig.kernel.count(Op::BuildImage);
    let m = sn.prepare("moby/7/c1-init-prepare", &names[0], none()).unwrap();
    write(&upper_of(&m), ".dockerenv", "");
    write(&upper_of(&m), "hostname", "c1\n");
    sn.commit("moby/8/c1-init", "moby/7/c1-init-prepare", none()).unwrap();
    assert_eq!(rig.kernel.count(Op::BuildImage), builds, "no image built for the init layer");
    assert_eq!(rig.published(), 1, "nothing published for it");
    let init = sn.stat("moby/8/c1-init").unwrap();
    assert_eq!((init.kind, init.local), (SnapKind::Committed, true));
    assert!(matches!(sn.stat("moby/7/c1-init-prepare"), Err(Error::NotFound(_))));
    assert!(sn.usage("moby/8/c1-init").unwrap().bytes > 0);
    let c = sn.prepare("moby/9/c1", "moby/8/c1-init", none()).unwrap();
    write(&upper_of(&c), "own", "x");
    let lowers = lowers_of(&c);
    assert_eq!(find(&lowers, "hostname").as_deref(), Some("c1\n"), "{lowers:?}");
    assert_eq!(find(&lowers, "f0").as_deref(), Some("layer 0"));
    // `docker commit` of the container: Docker applies the diff in a
    // snapshot over the init layer and commits it; the init layer is then
    // frozen into the store under the new layer.
    let e = sn.prepare("moby/10/extract-1-img", "moby/8/c1-init", none()).unwrap();
    write(&upper_of(&e), "own", "x");
    sn.commit("moby/11/img", "moby/10/extract-1-img", none()).unwrap();
    assert_eq!(rig.published(), 3, "the image layer, the init layer's snapshot, the new layer");
    sn.remove("moby/11/img").unwrap();
    assert_eq!(rig.published(), 1);
    drop(sn);
    let sn = rig.open();
    assert!(sn.stat("moby/8/c1-init").unwrap().local);
    assert_eq!(find(&lowers_of(&sn.mounts("moby/9/c1").unwrap()), "hostname").as_deref(), Some("c1\n"));
    assert!(sn.remove("moby/8/c1-init").is_err(), "the container stands on it");
    sn.remove("moby/9/c1").unwrap();
    sn.remove("moby/8/c1-init").unwrap();
    sn.driver().settle();
    assert_eq!(sn.driver().layer_ids().len(), 1, "only the image layer is left: {:?}", sn.driver().layer_ids());
    assert_eq!(rig.published(), 1);
}

#[test]
fn every_test_here_passes_as_a_non_root_user() {
    rootless::run_the_others_as_nobody("every_test_here_passes_as_a_non_root_user", 5);
}
