//! The containerd snapshotter against a real containerd 1.6 (Debian's),
//! started per test with its own config, root, state and socket, and
//! driven with `ctr`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use common::snap_client::*;
use common::*;

fn require_containerd() {
    require(&["containerd", "ctr", "runc", "containerd-shim-runc-v2", "mkfs.ext4"]);
}

/// A host with sharedloop serving the snapshotter on `root` and a
/// containerd using it.
fn ctr_host(name: &str) -> Host {
    require_containerd();
    let mut h = Host::new(name);
    let root = h.root_dir();
    h.start_snapshotter(&root);
    h.start_containerd();
    h
}

/// Imports the four-layer test image (`base_layers`) as
/// docker.io/test/multi:1 on `h`.
fn import_multi(h: &Host) {
    let fx = h.dir.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = fx.join("img.tar");
    oci_archive(&base_layers(&rootfs), "docker.io/test/multi:1", &archive);
    h.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
}

fn du(dir: &Path) -> u64 {
    let out = run_ok(std::process::Command::new("du").args(["-s", "-B1"]).arg(dir));
    out.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn containerd_imports_and_runs_single_and_multi_layer_images() {
    let h = ctr_host("ctr-import");
    let root = h.root_dir();
    let fx = h.dir.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);

    // One layer.
    let single = fx.join("single.tar");
    let tars = oci_archive(
        &[LayerSpec { rootfs: Some(rootfs.clone()), ..Default::default() }],
        "docker.io/test/single:1",
        &single,
    );
    h.ctr_ok(&["image", "import", single.to_str().unwrap()]);
    let expected = fx.join("single-expected");
    expected_tree(&tars, &expected);
    assert_same_manifest(&host_manifest(&expected), &h.ctr_manifest("docker.io/test/single:1"), "single layer");

    // Four layers with whiteouts, an opaque directory, links, owners.
    let multi = fx.join("multi.tar");
    let tars = oci_archive(&base_layers(&rootfs), "docker.io/test/multi:1", &multi);
    h.ctr_ok(&["image", "import", multi.to_str().unwrap()]);
    let expected = fx.join("multi-expected");
    expected_tree(&tars, &expected);
    let got = h.ctr_manifest("docker.io/test/multi:1");
    assert_same_manifest(&host_manifest(&expected), &got, "multi layer");
    assert!(!got.iter().any(|l| l.starts_with("./gone/")), "whiteouts hide what they remove");
    assert!(got.iter().any(|l| l.starts_with("./gone F")), "a directory replaced by a file");
    assert!(!got.iter().any(|l| l.starts_with("./srv/data/b ")), "the opaque directory hides its lower content");

    // Four layers (the single image's base is shared): four images in the
    // store, each a loop-mounted filesystem image.
    assert_eq!(layer_dirs(&root).len(), 4, "one published image per distinct layer");
    for d in layer_dirs(&root) {
        assert!(d.join("layer.img").exists(), "{} has an image", d.display());
    }
    let layer_mounts = h.mountinfo().lines().filter(|l| l.contains(" /run/sharedloop/layers/sha256-")).count();
    assert_eq!(layer_mounts, 4, "one read-only mount per layer");
}

/// containerd's snapshots testsuite, rewritten: Basic, Stat, transitivity,
/// prepare/view on the same key, update, remove and reuse, views are
/// read-only, changes of files in lower layers.
#[test]
fn containerd_snapshot_api_behaves_as_containerds_testsuite_requires() {
    require(&["mkfs.ext4"]);
    let mut h = Host::new("ctr-api");
    let root = h.root_dir();
    h.start_snapshotter(&root);
    let mut c = SnapClient::connect(&h.inside(Path::new(SNAPSHOTTER_SOCKET)));
    let work = h.dir.join("work");
    let gc = labels(&[("containerd.io/gc.root", "2026-01-01T00:00:00Z")]);

    // Basic: prepare on nothing, write, commit, stat, prepare on it.
    let m = c.prepare("preparing", "", gc.clone()).unwrap();
    let p1 = work.join("preparing");
    let p1_in = mount_all(&h, &m, &p1);
    fs::write(p1_in.join("foo"), "foo\n").unwrap();
    fs::create_dir_all(p1_in.join("a/b/c")).unwrap();
    // Committed while still mounted, as the testsuite does.
    c.commit("committed", "preparing", gc.clone()).unwrap();
    unmount(&h, &p1);
    let si = c.stat("committed").unwrap();
    assert_eq!((si.parent.as_str(), si.kind), ("", 3), "committed has no parent, kind committed");
    assert_eq!(code(c.stat("preparing")), Code::NotFound, "a committed key is gone");
    let m = c.prepare("next", "committed", gc.clone()).unwrap();
    let p2 = work.join("next");
    let p2_in = mount_all(&h, &m, &p2);
    assert_eq!(fs::read_to_string(p2_in.join("foo")).unwrap(), "foo\n");
    assert!(p2_in.join("a/b/c").is_dir());
    fs::write(p2_in.join("bar"), "bar\n").unwrap();
    fs::write(p2_in.join("foo"), "bar\n").unwrap();
    fs::remove_dir_all(p2_in.join("a/b")).unwrap();
    let ni = c.stat("next").unwrap();
    assert_eq!((ni.parent.as_str(), ni.kind), ("committed", 2), "active over committed");
    c.commit("committed-next", "next", gc.clone()).unwrap();
    unmount(&h, &p2);
    let si2 = c.stat("committed-next").unwrap();
    assert_eq!((si2.parent.as_str(), si2.kind), ("committed", 3));
    let walked: Vec<String> = c.list(&[]).unwrap().into_iter().map(|i| i.name).collect();
    assert_eq!(walked, vec!["committed".to_owned(), "committed-next".to_owned()]);
    let m = c.view("view", "committed-next").unwrap();
    let v = work.join("view");
    let v_in = mount_all(&h, &m, &v);
    assert_eq!(fs::read_to_string(v_in.join("foo")).unwrap(), "bar\n");
    assert_eq!(fs::read_to_string(v_in.join("bar")).unwrap(), "bar\n");
    assert!(v_in.join("a").is_dir() && !v_in.join("a/b").exists(), "a removal in the upper layer hides the lower");
    // Views are read-only (a real mount, not just an option string).
    let e = fs::write(v_in.join("testfile"), "x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");
    unmount(&h, &v);
    // Remove ordering: a parent goes only after its children.
    c.remove("view").unwrap();
    assert_eq!(code(c.remove("committed")), Code::FailedPrecondition, "parent of committed-next");
    c.remove("committed-next").unwrap();
    c.remove("committed").unwrap();
    assert_eq!(code(c.remove("committed")), Code::NotFound);

    // Prepare and View on taken keys fail; parents must exist and be committed.
    c.prepare("base-a", "", gc.clone()).unwrap();
    c.commit("base", "base-a", gc.clone()).unwrap();
    c.prepare("newlayer", "base", gc.clone()).unwrap();
    assert_eq!(code(c.view("newlayer", "base")), Code::AlreadyExists);
    assert_eq!(code(c.prepare("newlayer", "base", gc.clone())), Code::AlreadyExists);
    c.view("viewlayer", "base").unwrap();
    assert_eq!(code(c.view("viewlayer", "base")), Code::AlreadyExists);
    assert_eq!(code(c.prepare("orphan", "nosuchparent", gc.clone())), Code::NotFound);
    assert_eq!(code(c.prepare("on-active", "newlayer", gc.clone())), Code::InvalidArgument);
    assert_eq!(code(c.commit("base", "newlayer", gc.clone())), Code::AlreadyExists, "name taken");
    assert_eq!(code(c.commit("x", "viewlayer", gc.clone())), Code::FailedPrecondition, "views do not commit");
    assert_eq!(code(c.commit("x", "nosuchkey", gc.clone())), Code::NotFound);
    assert_eq!(code(c.mounts("base")), Code::FailedPrecondition, "committed snapshots have no mounts");
    assert_eq!(code(c.mounts("nosuchkey")), Code::NotFound);
    // Mounts can be asked again.
    assert_eq!(c.mounts("newlayer").unwrap().len(), 1);
    // Transitivity: A <- B <- C.
    c.commit("snapB", "newlayer", gc.clone()).unwrap();
    let b = c.stat("snapB").unwrap();
    assert_eq!(b.parent, "base");
    assert_eq!(c.stat(&b.parent).unwrap().parent, "");
    c.remove("viewlayer").unwrap();

    // Remove and reuse keys (checkRemove).
    c.prepare("committed-a", "", gc.clone()).unwrap();
    c.commit("committed-1", "committed-a", gc.clone()).unwrap();
    c.prepare("reuse-1", "committed-1", gc.clone()).unwrap();
    c.remove("reuse-1").unwrap();
    c.view("reuse-1", "committed-1").unwrap();
    c.remove("reuse-1").unwrap();
    c.prepare("reuse-1", "", gc.clone()).unwrap();
    c.remove("committed-1").unwrap();
    c.commit("committed-1", "reuse-1", gc.clone()).unwrap();

    // Update: labels only; field paths; immutable fields refused.
    let before = c.stat("committed-1").unwrap();
    assert_eq!(before.created_at, before.updated_at, "created == updated at first");
    let mut i = before.clone();
    i.parent = "doesnotexist".into();
    i.labels = labels(&[("l1", "v1"), ("l2", "v2"), ("l3", "v3"), ("containerd.io/gc.root", "t")]);
    let u = c.update(i, &[]).unwrap();
    assert_eq!(u.parent, "", "parent is immutable");
    assert_eq!(u.created_at, before.created_at);
    assert_ne!(u.updated_at, before.updated_at);
    assert_eq!(u.labels.len(), 4);
    let mut i = u.clone();
    i.labels = labels(&[("l1", "updated"), ("l4", "v4")]);
    let u = c.update(i, &["labels.l1", "labels.l2"]).unwrap();
    assert_eq!(u.labels, labels(&[("l1", "updated"), ("l3", "v3"), ("containerd.io/gc.root", "t")]));
    let mut i = u.clone();
    i.labels = labels(&[("l4", "v4")]);
    let u = c.update(i, &["labels"]).unwrap();
    assert_eq!(u.labels, labels(&[("l4", "v4")]));
    assert_eq!(code(c.update(u.clone(), &["parent"])), Code::InvalidArgument);
    assert_eq!(c.stat("committed-1").unwrap().labels, labels(&[("l4", "v4")]), "updates persist");

    // Walk filters.
    let names =
        |c: &mut SnapClient, f: &[&str]| -> Vec<String> { c.list(f).unwrap().into_iter().map(|i| i.name).collect() };
    assert_eq!(names(&mut c, &["kind==committed", "name==snapB"]), vec!["base", "committed-1", "snapB"]);
    assert_eq!(names(&mut c, &["kind==committed,parent==base"]), vec!["snapB"]);
    assert_eq!(names(&mut c, &["labels.l4==v4"]), vec!["committed-1"]);
    assert_eq!(names(&mut c, &[r#"labels."containerd.io/gc.root""#, "name~=^snap"]), vec!["base", "snapB"]);
    assert_eq!(code(c.list(&["name~=("])), Code::InvalidArgument);

    // Usage: an active snapshot's own bytes; a committed one's content.
    let m = c.prepare("usage", "", gc.clone()).unwrap();
    let pu = work.join("usage");
    let pu_in = mount_all(&h, &m, &pu);
    fs::write(pu_in.join("big"), vec![7u8; 1 << 20]).unwrap();
    let (size, inodes) = c.usage("usage").unwrap();
    assert!(size >= 1 << 20, "usage {size} counts the 1 MiB file");
    assert!(inodes >= 1, "{inodes}");
    unmount(&h, &pu);
    c.commit("usage-c", "usage", gc.clone()).unwrap();
    assert_eq!(c.usage("usage-c").unwrap().0, size, "a committed layer keeps its size");
    c.cleanup().unwrap();

    // Restart: the snapshots and their kinds survive.
    h.kill_plugin();
    h.restart_plugin();
    let mut c = SnapClient::connect(&h.inside(Path::new(SNAPSHOTTER_SOCKET)));
    let kinds: Vec<(String, i32)> = c.list(&[]).unwrap().into_iter().map(|i| (i.name, i.kind)).collect();
    assert_eq!(
        kinds,
        vec![("base".to_owned(), 3), ("committed-1".to_owned(), 3), ("snapB".to_owned(), 3), ("usage-c".to_owned(), 3)]
    );
    for k in ["usage-c", "snapB", "committed-1", "base"] {
        c.remove(k).unwrap();
    }
    c.cleanup().unwrap();
    assert!(c.list(&[]).unwrap().is_empty());
    assert!(layer_dirs(&root).is_empty(), "removing every snapshot empties the store: {:?}", layer_dirs(&root));
    assert_no_loops(&h.dir);
}

fn libc_erofs() -> i32 {
    30 // EROFS
}

/// Changes to files and directories of lower layers, committed, as the
/// testsuite's LayerFileupdate, RemoveDirectoryInLowerLayer, Chown,
/// DirectoryPermissionOnCommit, DeletedFilesInChildSnapshot,
/// MoveFileFromLowerLayer and Rename check them; then a chain of commits,
/// each adding a file, 499 layers under a writable top, all visible.
#[test]
fn containerd_snapshot_changes_in_lower_layers_and_long_chains() {
    // Plus the two non-empty layers below: 499 lowers under the top.
    const CHAIN: usize = 497;
    require(&["mkfs.ext4"]);
    let mut h = Host::new("ctr-chain");
    let root = h.root_dir();
    h.start_snapshotter(&root);
    let mut c = SnapClient::connect(&h.inside(Path::new(SNAPSHOTTER_SOCKET)));
    let work = h.dir.join("work");
    let sh = |h: &Host, dir: &Path, script: &str| {
        run_ok(h.cmd("sh").arg("-c").arg(format!("set -e; cd {}; {script}", dir.display())));
    };
    let steps: &[&str] = &[
        "mkdir -p d1/sub d2 d3; echo one > d1/f; echo keep > d2/k; echo mv > d3/m; echo rn > rn; \
         echo hl > d2/hl; chmod 700 d1; chown 1000:1000 d2/k; mkdir -m 0711 perm",
        "echo two > d1/f; rm -rf d1/sub; chown 2000:3000 d1/f; rm d2/k; mv d3/m d3/moved; mv rn renamed; \
         ln d2/hl d2/hl2; rm d2/hl; chmod 0750 perm",
        "true",
    ];
    let mut parent = String::new();
    for (i, s) in steps.iter().enumerate() {
        let key = format!("k{i}");
        let m = c.prepare(&key, &parent, Default::default()).unwrap();
        let dir = work.join(&key);
        mount_all(&h, &m, &dir);
        sh(&h, &dir, s);
        unmount(&h, &dir);
        let name = format!("c{i}");
        c.commit(&name, &key, Default::default()).unwrap();
        parent = name;
    }
    let m = c.view("check", &parent).unwrap();
    let v = work.join("check");
    let v_in = mount_all(&h, &m, &v);
    let listing = run_ok(h.cmd("sh").arg("-c").arg(format!(
        "cd {} && find . | sort | while read f; do echo \"$f $(stat -c '%a %u:%g %F' \"$f\")\"; done",
        v.display()
    )));
    let expect = [
        ". 755 0:0 directory",
        "./d1 700 0:0 directory",
        "./d1/f 644 2000:3000 regular file",
        "./d2 755 0:0 directory",
        "./d2/hl2 644 0:0 regular file",
        "./d3 755 0:0 directory",
        "./d3/moved 644 0:0 regular file",
        "./perm 750 0:0 directory",
        "./renamed 644 0:0 regular file",
    ];
    assert_eq!(listing.lines().collect::<Vec<_>>(), expect, "the view shows every change");
    assert_eq!(fs::read_to_string(v_in.join("d1/f")).unwrap(), "two\n");
    assert_eq!(fs::read_to_string(v_in.join("d2/hl2")).unwrap(), "hl\n");
    unmount(&h, &v);
    c.remove("check").unwrap();

    // A chain of commits up to overlayfs' limit of 500 lower layers
    // (containerd's testsuite mounts 128).
    for i in 0..CHAIN {
        let key = format!("chain-a{i}");
        let m = c.prepare(&key, &parent, Default::default()).unwrap();
        let dir = work.join("chain");
        let dir_in = mount_all(&h, &m, &dir);
        fs::write(dir_in.join(format!("layer-{i:03}")), format!("{i}\n")).unwrap();
        unmount(&h, &dir);
        let name = format!("chain-{i}");
        c.commit(&name, &key, Default::default()).unwrap();
        parent = name;
    }
    let m = c.prepare("top", &parent, Default::default()).unwrap();
    let top = work.join("top");
    let top_in = mount_all(&h, &m, &top);
    for i in 0..CHAIN {
        assert_eq!(fs::read_to_string(top_in.join(format!("layer-{i:03}"))).unwrap(), format!("{i}\n"));
    }
    assert_eq!(fs::read_to_string(top_in.join("d1/f")).unwrap(), "two\n");
    unmount(&h, &top);
    // Deep stacks are mounted by sharedloop (one overlay with lowerdir+)
    // and handed over as a bind mount.
    assert_eq!(m[0].r#type, "bind", "{} lowers do not fit in one page of options: {:?}", CHAIN + 2, m[0]);
    c.remove("top").unwrap();
    assert!(!h.mountinfo().contains(" /merged/"), "the engine overlay goes with its snapshot");
}

#[test]
fn containerd_second_instance_sharing_root_reuses_published_layers() {
    require_containerd();
    let shared = SharedDir::new("ctr-shared");
    let root = shared.path.join("root");
    let mut a = Host::new("ctr-share-a");
    a.start_snapshotter(&root);
    a.start_containerd();
    let fx = a.dir.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = fx.join("multi.tar");
    let tars = oci_archive(&base_layers(&rootfs), "docker.io/test/multi:1", &archive);
    let t = Instant::now();
    a.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    let first = t.elapsed();
    let published = layer_dirs(&root);
    assert_eq!(published.len(), 4);
    let images: Vec<(PathBuf, std::time::SystemTime)> = published
        .iter()
        .filter(|d| d.join("layer.img").exists())
        .map(|d| (d.clone(), fs::metadata(d.join("layer.img")).unwrap().modified().unwrap()))
        .collect();
    let du_before = du(&root.join("layers"));

    // Host B: its own containerd and sharedloop, the same root.
    let mut b = Host::new("ctr-share-b");
    b.start_snapshotter(&root);
    b.start_containerd();
    let t = Instant::now();
    b.ctr_ok(&["image", "import", archive.to_str().unwrap()]);
    let second = t.elapsed();
    eprintln!("import: first host {first:?}, second host {second:?}");
    assert_eq!(layer_dirs(&root), published, "no layer added");
    for (d, mtime) in &images {
        assert_eq!(fs::metadata(d.join("layer.img")).unwrap().modified().unwrap(), *mtime, "{} rewritten", d.display());
    }
    assert_eq!(du(&root.join("layers")), du_before, "store disk use unchanged");
    let log = b.plugin_log();
    assert_eq!(log.matches("layer already in the store; reusing it").count(), 4, "every layer reused:\n{log}");
    assert!(!log.contains("image built"), "host B built no image");
    let expected = fx.join("expected");
    expected_tree(&tars, &expected);
    assert_same_manifest(&host_manifest(&expected), &b.ctr_manifest("docker.io/test/multi:1"), "host B");

    // The skip-download path: a Prepare naming a published layer by
    // containerd.io/snapshot.ref (as containerd's remote-snapshotter
    // clients send it) is answered AlreadyExists with the layer committed
    // under that name: nothing to fetch, nothing to unpack.
    // A third host with only sharedloop: containerd's garbage collector
    // would remove snapshots made behind its back.
    let mut hc = Host::new("ctr-share-c");
    hc.start_snapshotter(&root);
    let mut c = SnapClient::connect(&hc.inside(Path::new(SNAPSHOTTER_SOCKET)));
    let chains: Vec<String> =
        published.iter().map(|d| d.file_name().unwrap().to_string_lossy().replacen('-', ":", 1)).collect();
    let meta: Vec<serde_json::Value> =
        published.iter().map(|d| serde_json::from_slice(&fs::read(d.join("meta.json")).unwrap()).unwrap()).collect();
    let bottom = meta.iter().find(|m| m["parent"].is_null()).unwrap()["chain_id"].as_str().unwrap().to_owned();
    let next = meta.iter().find(|m| m["parent"] == bottom.as_str()).unwrap()["chain_id"].as_str().unwrap().to_owned();
    assert!(chains.contains(&bottom) && chains.contains(&next));
    let r = c.prepare("ns/1/extract-1 x", "", labels(&[("containerd.io/snapshot.ref", &bottom)]));
    assert_eq!(code(r), Code::AlreadyExists);
    assert_eq!(c.stat(&bottom).unwrap().kind, 3, "committed under the target name");
    let r = c.prepare("ns/2/extract-2 y", &bottom, labels(&[("containerd.io/snapshot.ref", &next)]));
    assert_eq!(code(r), Code::AlreadyExists);
    assert_eq!(c.stat(&next).unwrap().parent, bottom);
    // Asked again, the same answer; on the wrong parent, a normal prepare.
    let r = c.prepare("ns/3/extract-3 z", "", labels(&[("containerd.io/snapshot.ref", &bottom)]));
    assert_eq!(code(r), Code::AlreadyExists);
    let m = c.prepare("ns/4/extract-4 w", "", labels(&[("containerd.io/snapshot.ref", &next)])).unwrap();
    assert_eq!(m.len(), 1);
    c.remove("ns/4/extract-4 w").unwrap();
    let v = c.view("v", &next).unwrap();
    let dir = hc.dir.join("v");
    let dir_in = mount_all(&hc, &v, &dir);
    assert!(dir_in.join("srv/data/a").exists(), "the reused layers show their content");
    unmount(&hc, &dir);
    c.remove("v").unwrap();
    c.remove(&next).unwrap();
    c.remove(&bottom).unwrap();
    assert_eq!(layer_dirs(&root), published, "hosts A and B still hold every layer");
    drop(hc);
    drop(b);
    drop(a);
}

/// `sharedloop.writable_layers=dir` under containerd: the image unpacks
/// (through active snapshots that Commit publishes) to the same tree, and
/// a container's snapshot is a directory in the snapshotter's home, with
/// no writable image anywhere.
#[test]
fn containerd_writable_layers_dir_unpacks_and_runs_without_writable_images() {
    require_containerd();
    let mut h = Host::new("ctr-rwdirs");
    let root = h.root_dir();
    fs::create_dir_all(&root).unwrap();
    let mut args = h.snapshotter_args(&root, false);
    args.extend(["-o".to_owned(), "writable_layers=dir".to_owned()]);
    h.start_serve(&args, &[]);
    h.start_containerd();
    let fx = h.dir.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let multi = fx.join("multi.tar");
    let tars = oci_archive(&base_layers(&rootfs), "docker.io/test/multi:1", &multi);
    h.ctr_ok(&["image", "import", multi.to_str().unwrap()]);
    let expected = fx.join("multi-expected");
    expected_tree(&tars, &expected);
    assert_same_manifest(&host_manifest(&expected), &h.ctr_manifest("docker.io/test/multi:1"), "multi layer, dirs");
    assert_eq!(layer_dirs(&root).len(), 4, "one published image per layer");

    h.ctr_ok(&["run", "-d", "docker.io/test/multi:1", "d1", "/bin/sh", "-c", "echo up > /state; sleep 100000"]);
    h.ctr_ok(&["task", "exec", "--exec-id", "e0", "d1", "/bin/cat", "/state"]);
    let home = h.snapshotter_root();
    let layers = rw_layers(&home);
    assert!(!layers.is_empty(), "no writable layer under {}", home.display());
    assert!(layers.iter().all(|(_, dir, img)| *dir && !*img), "a writable layer with an image: {layers:?}");
    h.ctr_ok(&["task", "kill", "-s", "KILL", "d1"]);
    await_or_fail("d1 stops", || !h.ctr_ok(&["task", "ls"]).contains("RUNNING"));
    h.ctr_ok(&["task", "rm", "d1"]);
    h.ctr_ok(&["container", "rm", "d1"]);
    assert!(!h.ctr_snapshots().iter().any(|s| s == "d1"), "the container's snapshot is removed");
    await_or_fail("the removed snapshot's directory goes", || rw_layers(&home).is_empty());
    assert!(loops_under(&home).is_empty(), "a loop device on the snapshotter's home: {:?}", loops_under(&home));
}

#[test]
fn containerd_restart_of_sharedloop_keeps_containers_running() {
    let mut h = ctr_host("ctr-restart");
    import_multi(&h);
    h.ctr_ok(&["run", "-d", "docker.io/test/multi:1", "c1", "/bin/sh", "-c", "echo up > /tmp/state; sleep 100000"]);
    h.ctr_ok(&["task", "exec", "--exec-id", "e0", "c1", "/bin/cat", "/srv/data/a"]);

    h.kill_plugin();
    h.restart_plugin();
    // containerd redials the proxy socket with a back-off of its own.
    h.wait_for_snapshotter();
    // The container runs on; its files are there, its writes work.
    let tasks = h.ctr_ok(&["task", "ls"]);
    assert!(tasks.lines().any(|l| l.starts_with("c1 ") && l.contains("RUNNING")), "{tasks}");
    assert_eq!(h.ctr_ok(&["task", "exec", "--exec-id", "e1", "c1", "/bin/cat", "/srv/data/a"]), "new alpha\n");
    h.ctr_ok(&["task", "exec", "--exec-id", "e2", "c1", "/bin/sh", "-c", "echo more >> /tmp/state"]);
    assert_eq!(h.ctr_ok(&["task", "exec", "--exec-id", "e3", "c1", "/bin/cat", "/tmp/state"]), "up\nmore\n");
    // The next Prepare (a second container) and Remove work.
    assert_eq!(h.ctr_ok(&["run", "--rm", "docker.io/test/multi:1", "c2", "/bin/cat", "/gone"]), "now a file\n");
    h.ctr_ok(&["task", "kill", "-s", "KILL", "c1"]);
    let t = Instant::now();
    while h.ctr_ok(&["task", "ls"]).contains("RUNNING") {
        assert!(t.elapsed().as_secs() < 30, "c1 did not stop");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    h.ctr_ok(&["task", "rm", "c1"]);
    h.ctr_ok(&["container", "rm", "c1"]);
    assert!(!h.ctr_snapshots().iter().any(|s| s == "c1"), "the container's snapshot is removed");
}

#[test]
fn containerd_image_removal_and_gc_leave_nothing_behind() {
    let h = ctr_host("ctr-gc");
    let root = h.root_dir();
    import_multi(&h);
    assert_eq!(h.ctr_ok(&["run", "--rm", "docker.io/test/multi:1", "c1", "/bin/cat", "/srv/data/c"]), "gamma\n");
    assert_eq!(layer_dirs(&root).len(), 4);
    assert_eq!(h.ctr_snapshots().len(), 4);
    h.ctr_ok(&["image", "rm", "--sync", "docker.io/test/multi:1"]);
    // containerd's garbage collector removes the snapshots.
    let t = Instant::now();
    while !h.ctr_snapshots().is_empty() {
        assert!(t.elapsed().as_secs() < 30, "snapshots left: {:?}", h.ctr_snapshots());
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let mut c = SnapClient::connect(&h.inside(Path::new(SNAPSHOTTER_SOCKET)));
    c.cleanup().unwrap();
    assert!(c.list(&[]).unwrap().is_empty(), "the snapshotter holds nothing");
    assert!(layer_dirs(&root).is_empty(), "no unreferenced image: {:?}", layer_dirs(&root));
    let mi = h.mountinfo();
    let sr = h.snapshotter_root();
    let areas = [sr.join("rwmnt"), sr.join("merged"), sr.join("mnt"), PathBuf::from("/run/sharedloop/layers")];
    let ours: Vec<&str> = mi
        .lines()
        .filter(|l| {
            let mp = Path::new(l.split_whitespace().nth(4).unwrap_or(""));
            areas.iter().any(|a| mp.starts_with(a) && mp != a)
        })
        .collect();
    assert!(ours.is_empty(), "mounts left: {ours:#?}");
    assert!(loops_under(&h.dir).is_empty(), "loop devices left: {:?}", loops_under(&h.dir));
}

/// One sharedloop serving dockerd and containerd at once: the same image
/// loaded in both uses one store entry and one loop device per layer.
#[test]
fn containerd_and_docker_share_one_daemon_store_and_mounts() {
    require_containerd();
    require(&[DOCKERD]);
    let mut h = Host::new("ctr-both");
    let root = h.root_dir();
    let args = h.snapshotter_args(&root, true);
    fs::create_dir_all(&root).unwrap();
    h.start_serve(&args, &[]);
    let opts = h.default_storage_opts();
    h.start_dockerd(&opts);
    h.start_containerd();
    let fx = h.dir.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let layers = base_layers(&rootfs);
    let oci = fx.join("oci.tar");
    oci_archive(&layers, "docker.io/test/multi:1", &oci);
    let dck = fx.join("docker.tar");
    docker_archive(&layers, "multi:1", &dck);
    h.docker_stdin(&["load"], &dck);
    h.ctr_ok(&["image", "import", oci.to_str().unwrap()]);
    assert_eq!(layer_dirs(&root).len(), 4, "both engines' layers are the same four store entries");
    h.docker_ok(&["run", "-d", "--name", "d1", "--network", "none", "multi:1", "sleep", "100000"]);
    h.ctr_ok(&["run", "-d", "docker.io/test/multi:1", "c1", "/bin/sleep", "100000"]);
    let layer_mounts: Vec<String> = h
        .mountinfo()
        .lines()
        .filter(|l| l.split_whitespace().nth(4).is_some_and(|m| m.contains("/run/sharedloop/layers/sha256-")))
        .map(str::to_owned)
        .collect();
    assert_eq!(layer_mounts.len(), 4, "one mount per layer for both engines: {layer_mounts:#?}");
    let loops: Vec<_> = loops_under(&root).into_iter().filter(|(_, f)| f.ends_with("layer.img")).collect();
    assert_eq!(loops.len(), 4, "one loop device per layer: {loops:?}");
    assert_eq!(h.docker_ok(&["exec", "d1", "cat", "/srv/data/a"]), "new alpha\n");
    assert_eq!(h.ctr_ok(&["task", "exec", "--exec-id", "e", "c1", "/bin/cat", "/srv/data/a"]), "new alpha\n");
}

/// Both sockets are root's (0600) unless `--socket-group` shares them
/// (0660, that group).
#[test]
fn sockets_are_root_only_unless_a_group_is_given() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require(&["mkfs.ext4"]);
    let docker_sock = Path::new("/run/docker/plugins/sharedloop.sock");
    for (group, mode, gid) in [(None, 0o600, 0), (Some("6"), 0o660, 6)] {
        let mut h = Host::new("sockets");
        let root = h.root_dir();
        fs::create_dir_all(&root).unwrap();
        let mut args = h.snapshotter_args(&root, true);
        if let Some(g) = group {
            args.extend(["--socket-group".to_owned(), g.to_owned()]);
        }
        h.start_serve(&args, &[]);
        for sock in [docker_sock, Path::new(SNAPSHOTTER_SOCKET)] {
            let md = fs::metadata(h.inside(sock)).unwrap();
            assert_eq!(md.permissions().mode() & 0o777, mode, "{} with group {group:?}", sock.display());
            assert_eq!((md.uid(), md.gid()), (0, gid), "{} with group {group:?}", sock.display());
        }
        // The group passes through the run directory to the socket, and no further.
        let run_dir = fs::metadata(h.inside(Path::new("/run/sharedloop"))).unwrap();
        let want = if group.is_some() { 0o710 } else { 0o700 };
        assert_eq!((run_dir.permissions().mode() & 0o777, run_dir.gid()), (want, gid), "run dir, group {group:?}");
        let layers = fs::metadata(h.inside(Path::new(LAYER_MOUNTS))).unwrap();
        assert_eq!(layers.permissions().mode() & 0o777, 0o700);
    }
}

/// Two processes on one state directory would corrupt it: the second is
/// refused, naming the directory.
#[test]
fn a_second_process_on_the_same_state_is_refused() {
    require(&["mkfs.ext4"]);
    let mut h = Host::new("lock");
    let root = h.root_dir();
    h.start_snapshotter(&root);
    let out = run(h
        .cmd(sharedloop_bin())
        .args([
            "serve",
            "--config",
            "/dev/null",
            "--no-docker",
            "--containerd",
            "--containerd-socket",
            "/run/other.sock",
        ])
        .arg("--containerd-root")
        .arg(h.snapshotter_root())
        .arg("-o")
        .arg(format!("loopback_root={}", root.display())));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a second sharedloop ran on the same state");
    assert!(
        err.contains("in use by another sharedloop process") && err.contains(h.snapshotter_root().to_str().unwrap()),
        "{err}"
    );
    // The first one is unharmed.
    let mut c = common::snap_client::SnapClient::connect(&h.inside(Path::new(SNAPSHOTTER_SOCKET)));
    c.prepare("k", "", Default::default()).unwrap();
    c.remove("k").unwrap();
}
