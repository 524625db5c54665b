//! The engine matrix: the same end-to-end checks against every engine
//! sharedloop supports. containerd 1.6 (the machine's, Debian 12), 1.7
//! (trixie) and 2.x (sid), each driven with its own `ctr`: import, run
//! with every file compared to its source, a commit through containerd's
//! snapshot service, a second host on the shared root reusing every
//! layer, and removal with containerd's GC leaving nothing behind. Docker
//! 20.10 (the machine's, through the graphdriver plugin) and Docker 28
//! (sid's, with the containerd image store on containerd 2.x), each with
//! its own CLI: load, run, build, commit, save, a second host loading the
//! same image and the saved one reusing every layer, and removal leaving
//! nothing behind. The newer engines come from `scripts/fetch-engines`; a
//! missing one fails the test and says how to get it.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::docker_engines::*;
use common::snap_client::*;
use common::*;

const IMAGE: &str = "docker.io/test/matrix:1";

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
    // The committed layer leaves the store once containerd's collector
    // passes the removal on (and sharedloop's removal, in the background,
    // is done).
    a.collect_garbage();
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
        assert_eq!(h.snapshotter_mounts(), Vec::<String>::new(), "{}: mounts left", h.name);
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

/// The build's RUN step: a new file, a file removed, a directory replaced
/// by a new one (opaque), an owner, a setuid bit and a symlink.
const BUILD_RUN: &str = "echo built > /srv/built && rm /gone && rm -rf /srv/data && mkdir /srv/data && \
    echo fresh > /srv/data/fresh && mkdir -p /opt/app && seq 1 300 > /opt/app/data && \
    ln -s data /opt/app/link && chmod 4711 /opt/app/data && chown 1000:1000 /opt/app";
/// What a container changes before `docker commit`.
const COMMIT_CHANGES: &str = "echo changed > /srv/built && rm /srv/data/fresh && mkdir /added && \
    echo hi > /added/f && ln -s f /added/l && rm -r /opt/app && chmod 700 /srv";

/// `from` copied to `to`, then `script` run in it by the same busybox (in
/// a chroot): what a container running `script` must leave.
fn derive_tree(from: &Path, to: &Path, script: &str) {
    run_ok(std::process::Command::new("cp").arg("-a").arg(from).arg(to));
    run_ok(std::process::Command::new("chroot").arg(to).args(["/bin/sh", "-c", script]));
}

fn layer_names(root: &Path) -> Vec<String> {
    layer_dirs(root).iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

fn dir_names(chains: &[String]) -> Vec<String> {
    let mut v: Vec<String> = chains.iter().map(|c| layer_dir_name(c)).collect();
    v.sort();
    v.dedup();
    v
}

/// Every layer of `chains` is a lower layer of the container's root, at
/// the host's mount of the layer's image: the container runs on sharedloop.
fn assert_runs_on_sharedloop(h: &DockerHost, image: &str, chains: &[String]) {
    let lowers = h.rootfs_lowers(image);
    for c in chains {
        let want = format!("{LAYER_MOUNTS}/{}/fs", layer_dir_name(c));
        assert!(lowers.contains(&want), "{}: {image}'s container is not on {want}: lowerdirs {lowers:#?}", h.name);
    }
}

fn wait_for<T: PartialEq + std::fmt::Debug>(what: &str, want: T, get: impl Fn() -> T) {
    let t = Instant::now();
    loop {
        let now = get();
        if now == want {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{what}: {now:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn docker_matrix(engine: DockerEngine, tag: &str) {
    let shared = SharedDir::new(&format!("eng-{tag}"));
    let root = shared.path.join("root");
    let a = DockerHost::start(&format!("eng-{tag}-a"), engine, &root);
    eprintln!("engine: {}", a.version());

    // The image (four layers: owners, setuid, links, whiteouts, an opaque
    // directory), a build context, and what each step must show.
    let fx = shared.path.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = fx.join("multi.tar");
    let tars = docker_archive(&base_layers(&rootfs), "multi:1", &archive);
    let expected = fx.join("expected");
    expected_tree(&tars, &expected);
    let want = host_manifest(&expected);
    let ctx = fx.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("Dockerfile"), format!("FROM multi:1\nRUN {BUILD_RUN}\nCOPY copied.txt /srv/copied/\n"))
        .unwrap();
    let built = fx.join("built");
    derive_tree(&expected, &built, BUILD_RUN);
    // The COPY's source, and what it makes: root's, its mode kept.
    for dir in [&ctx, &built.join("srv/copied")] {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(dir).unwrap();
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("copied.txt"), "from the build context\n").unwrap();
        fs::set_permissions(dir.join("copied.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let want_built = host_manifest(&built);
    let committed = fx.join("committed");
    derive_tree(&built, &committed, COMMIT_CHANGES);
    let want_committed = host_manifest(&committed);

    // Load: each layer built once, into the shared root, named by its
    // chain id.
    let out = a.docker_stdin(&["load"], &archive);
    assert!(out.contains("multi:1"), "{out}");
    let multi = chain_ids(&a.diff_ids("multi:1"));
    assert_eq!(multi.len(), 4, "{multi:?}");
    assert_eq!(layer_names(&root), dir_names(&multi), "one published image per layer");
    assert_eq!(a.plugin_log().matches("image built").count(), 4, "host A built the layers");

    // Run: every file as in the source, on overlays of sharedloop's mounts.
    assert_same_manifest(&want, &a.manifest("multi:1"), &format!("{tag}: docker run"));
    assert_runs_on_sharedloop(&a, "multi:1", &multi);

    // A container's init layer stays on its host (Docker 28 commits it
    // through containerd as `<id>-init` from `<id>-init-key`): nothing is added to the shared
    // root, nothing built.
    let built_before = a.plugin_log().matches("image built").count();
    a.docker_ok(&["create", "--name", "kept", "--network", "none", "multi:1", "true"]);
    assert_eq!(
        layer_names(&root),
        dir_names(&multi),
        "a container added a layer to the shared root: {}",
        a.plugin_log().lines().filter(|l| l.contains("commit") || l.contains("built")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(a.plugin_log().matches("image built").count(), built_before, "a container built an image");
    if engine == DockerEngine::ContainerdStore28 {
        assert!(a.plugin_log().contains("committed on this host only"), "{}", tail(&a.plugin_log(), 40));
    }
    a.docker_ok(&["rm", "kept"]);

    // Build FROM the loaded image: a RUN and a COPY.
    a.build("built:1", &ctx);
    let built_ids = a.diff_ids("built:1");
    assert_eq!(built_ids.len(), 6, "four layers and one per step: {built_ids:?}");
    assert_eq!(chain_ids(&built_ids[..4]), multi, "the build is on the loaded layers");
    assert_same_manifest(&want_built, &a.manifest("built:1"), &format!("{tag}: docker build"));

    // Commit a container's changes; run the committed image.
    a.docker_ok(&["run", "--name", "changer", "--network", "none", "built:1", "sh", "-c", COMMIT_CHANGES]);
    a.docker_ok(&["commit", "changer", "committed:1"]);
    a.docker_ok(&["rm", "changer"]);
    let ids = a.diff_ids("committed:1");
    assert_eq!(ids.len(), 7, "{ids:?}");
    assert_eq!(ids[..6], built_ids[..]);
    let chains = chain_ids(&ids);
    assert_same_manifest(&want_committed, &a.manifest("committed:1"), &format!("{tag}: docker commit"));
    assert_runs_on_sharedloop(&a, "committed:1", &chains);

    // Save: the archive holds the image's layers.
    let saved = fx.join("saved.tar");
    a.docker_ok(&["save", "-o", saved.to_str().unwrap(), "committed:1"]);
    assert_eq!(saved_diff_ids(&saved), ids, "the saved archive's layers are the image's");

    // What host A leaves in the shared root: every layer of the committed
    // image (under its chain id), and whatever else A still holds (Docker
    // 28: BuildKit's cache of the build steps, until `builder prune`).
    a.collect_garbage();
    let published = layer_dirs(&root);
    let names = layer_names(&root);
    for n in dir_names(&chains) {
        assert!(names.contains(&n), "{n} is not in the shared root: {names:?}");
    }
    eprintln!("shared root after host A: {} layers, {} of them the committed image's", names.len(), chains.len());
    let stamps: Vec<_> =
        published.iter().map(|d| fs::metadata(d.join("layer.img")).unwrap().modified().unwrap()).collect();

    // Host B, same engine, same root: loads the image and A's saved
    // archive, reusing every layer, building none.
    let b = DockerHost::start(&format!("eng-{tag}-b"), engine, &root);
    b.docker_stdin(&["load"], &archive);
    b.docker_stdin(&["load"], &saved);
    assert_eq!(layer_dirs(&root), published, "host B added no layer");
    for (d, m) in published.iter().zip(&stamps) {
        assert_eq!(fs::metadata(d.join("layer.img")).unwrap().modified().unwrap(), *m, "{} rewritten", d.display());
    }
    let log = b.plugin_log();
    assert!(!log.contains("image built"), "host B built an image:\n{}", tail(&log, 60));
    let reused = log.matches("layer already in the store; reusing it").count()
        + log.matches("layer already in the store; nothing extracted").count()
        + log.matches("using the published layer; nothing to unpack").count();
    assert_eq!(reused, 7, "every layer reused (multi:1's four, then the saved image's other three):\n{log}");
    assert_eq!(b.diff_ids("committed:1"), ids);
    assert_same_manifest(&want, &b.manifest("multi:1"), &format!("{tag}: host B"));
    assert_same_manifest(&want_committed, &b.manifest("committed:1"), &format!("{tag}: host B, the saved image"));
    assert_runs_on_sharedloop(&b, "committed:1", &chains);

    // Removal: A lets go of everything; the layers B uses stay, the rest
    // goes. Then B; nothing is left.
    a.remove_everything(&["committed:1", "built:1", "multi:1"]);
    a.assert_holds_nothing();
    b.collect_garbage();
    wait_for("layers left once host A removed everything", dir_names(&chains), || layer_names(&root));
    wait_for("loop devices on the store, once host A removed everything", b.layer_mounts().len(), || {
        loops_under(&root).len()
    });
    b.remove_everything(&["committed:1", "multi:1"]);
    b.assert_holds_nothing();
    wait_for("layers left once both hosts removed everything", Vec::<String>::new(), || layer_names(&root));
    assert_no_loops(&root);
}

#[test]
fn engine_docker_20_10_plugin() {
    docker_matrix(DockerEngine::Plugin20, "dck20");
}

#[test]
fn engine_docker_28_containerd_image_store() {
    docker_matrix(DockerEngine::ContainerdStore28, "dck28");
}
