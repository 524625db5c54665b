//! The engine matrix: the same end-to-end checks against every engine
//! sharedloop supports. containerd 1.6 (the machine's, Debian 12), 1.7
//! (trixie) and 2.x (sid), each driven with its own `ctr`: import, run
//! with every file compared to its source, a commit through containerd's
//! snapshot service, a second host on the shared root reusing every
//! layer, and removal with containerd's GC leaving nothing behind. The
//! newer engines come from `scripts/fetch-engines`; a missing one fails
//! the test and says how to get it.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::snap_client::*;
use common::*;

const IMAGE: &str = "docker.io/test/matrix:1";

fn layer_dirs(root: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        fs::read_dir(root.join("layers")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

fn engine_host(name: &str, engine: Engine, root: &Path) -> Host {
    require(&["containerd", "runc", "mkfs.ext4", "busybox"]);
    let mut h = Host::new(name);
    h.start_snapshotter(root);
    h.start_containerd_engine(engine, None);
    h
}

/// Snapshots of `kind` (`Committed`, `Active`, `View`) the host's
/// containerd lists: (key, parent).
fn snapshots_of(h: &Host, kind: &str) -> Vec<(String, String)> {
    h.ctr_ok(&["snapshots", "ls"])
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // KEY PARENT KIND, PARENT empty for a bottom layer.
            match f.as_slice() {
                [k, p, kd] if *kd == kind => Some((k.to_string(), p.to_string())),
                [k, kd] if *kd == kind => Some((k.to_string(), String::new())),
                _ => None,
            }
        })
        .collect()
}

fn wait_no_snapshots(h: &Host) {
    let t = Instant::now();
    while !h.ctr_snapshots().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "snapshots left: {:?}", h.ctr_snapshots());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Mounts of sharedloop's on the host: layer mounts and the snapshotter's
/// areas.
fn our_mounts(h: &Host) -> Vec<String> {
    let sr = h.snapshotter_root();
    let areas = [sr.join("rwmnt"), sr.join("merged"), sr.join("mnt"), PathBuf::from(LAYER_MOUNTS)];
    h.mountinfo()
        .lines()
        .filter(|l| {
            let mp = Path::new(l.split_whitespace().nth(4).unwrap_or(""));
            areas.iter().any(|a| mp.starts_with(a) && mp != a)
        })
        .map(str::to_owned)
        .collect()
}

fn containerd_matrix(engine: Engine, tag: &str) {
    let shared = SharedDir::new(&format!("eng-{tag}"));
    let root = shared.path.join("root");
    let a = engine_host(&format!("eng-{tag}-a"), engine, &root);
    eprintln!("engine: {} (ctr {})", engine.version(), a.ctr_ok(&["version"]).lines().nth(1).unwrap_or("").trim());

    // Import and run: every file as in the source.
    let fx = shared.path.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = fx.join("img.tar");
    let tars = oci_archive(&base_layers(&rootfs), IMAGE, &archive);
    a.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    let expected = fx.join("expected");
    expected_tree(&tars, &expected);
    let want = host_manifest(&expected);
    assert_same_manifest(&want, &a.ctr_manifest(IMAGE), &format!("{tag}: host A"));
    let published = layer_dirs(&root);
    assert_eq!(published.len(), 4, "one published image per layer");
    assert!(a.plugin_log().contains("image built"), "host A built the layers");

    // A commit through containerd's snapshot service (its metadata store
    // in front of sharedloop): prepare on the image's top layer, write,
    // commit, view. gc.root labels keep containerd's collector off them.
    let committed = snapshots_of(&a, "Committed");
    let parents: Vec<&str> = committed.iter().map(|(_, p)| p.as_str()).collect();
    let top = committed.iter().find(|(k, _)| !parents.contains(&k.as_str())).expect("a top layer").0.clone();
    let mut c = SnapClient::connect_containerd(&a.inside(Path::new(CONTAINERD_SOCKET)), "default");
    let keep = labels(&[("containerd.io/gc.root", "2026-01-01T00:00:00Z")]);
    let m = c.prepare("matrix-work", &top, keep.clone()).unwrap();
    let work = a.dir.join("work");
    let work_in = mount_all(&a, &m, &work);
    fs::write(work_in.join("srv/committed"), "through containerd\n").unwrap();
    fs::remove_file(work_in.join("srv/data/c")).unwrap();
    unmount(&a, &work);
    c.commit("matrix-committed", "matrix-work", keep.clone()).unwrap();
    let m = c.view_labelled("matrix-view", "matrix-committed", keep.clone()).unwrap();
    let view = a.dir.join("view");
    let view_in = mount_all(&a, &m, &view);
    assert_eq!(fs::read_to_string(view_in.join("srv/committed")).unwrap(), "through containerd\n");
    assert!(!view_in.join("srv/data/c").exists(), "the removal is committed");
    assert!(view_in.join("bin/busybox").is_file(), "the lower layers show through");
    unmount(&a, &view);
    c.remove("matrix-view").unwrap();
    c.remove("matrix-committed").unwrap();
    // The committed layer leaves the store (removal runs in the
    // background).
    let t = Instant::now();
    while layer_dirs(&root) != published {
        assert!(t.elapsed() < Duration::from_secs(30), "the committed layer stays: {:?}", layer_dirs(&root));
        std::thread::sleep(Duration::from_millis(100));
    }

    // Host B, same engine, same root: every layer reused, none built.
    let stamps: Vec<_> =
        published.iter().map(|d| fs::metadata(d.join("layer.img")).unwrap().modified().unwrap()).collect();
    let b = engine_host(&format!("eng-{tag}-b"), engine, &root);
    b.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    assert_eq!(layer_dirs(&root), published, "host B added no layer");
    for (d, m) in published.iter().zip(&stamps) {
        assert_eq!(fs::metadata(d.join("layer.img")).unwrap().modified().unwrap(), *m, "{} rewritten", d.display());
    }
    let log = b.plugin_log();
    // containerd 1.6 and 1.7 unpack by applying each layer's diff, which
    // finds the layer published; 2.x's unpacker names the layer it wants
    // (containerd.io/snapshot.ref) and is told it exists: nothing read.
    let reused = log.matches("layer already in the store; reusing it").count()
        + log.matches("using the published layer; nothing to unpack").count();
    assert_eq!(reused, 4, "every layer reused:\n{log}");
    assert!(!log.contains("image built"), "host B built no image");
    assert_same_manifest(&want, &b.ctr_manifest(IMAGE), &format!("{tag}: host B"));

    // Removal: containerd's GC on each host; the layers go with the last.
    for (h, last) in [(&a, false), (&b, true)] {
        h.ctr_ok(&["image", "rm", "--sync", IMAGE]);
        wait_no_snapshots(h);
        let mut c = SnapClient::connect(&h.inside(Path::new(SNAPSHOTTER_SOCKET)));
        c.cleanup().unwrap();
        assert!(c.list(&[]).unwrap().is_empty(), "{}: the snapshotter holds nothing", h.name);
        assert_eq!(our_mounts(h), Vec::<String>::new(), "{}: mounts left", h.name);
        assert!(loops_under(&h.dir).is_empty(), "{}: loop devices left: {:?}", h.name, loops_under(&h.dir));
        if last {
            assert!(layer_dirs(&root).is_empty(), "no unreferenced layer: {:?}", layer_dirs(&root));
        } else {
            assert_eq!(layer_dirs(&root), published, "host B still holds every layer");
        }
    }
    assert!(loops_under(&root).is_empty(), "loop devices on the store left: {:?}", loops_under(&root));
}

#[test]
fn engine_containerd_1_6_debian12() {
    containerd_matrix(Engine::System, "ctrd16");
}

#[test]
fn engine_containerd_1_7_trixie() {
    containerd_matrix(Engine::Containerd17, "ctrd17");
}

#[test]
fn engine_containerd_2_sid() {
    containerd_matrix(Engine::Containerd2, "ctrd2");
}
