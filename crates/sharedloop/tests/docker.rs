//! The Docker graphdriver plugin under a real dockerd 20.10
//! (`--experimental -s sharedloop`). Needs root, dockerd, busybox-static,
//! ext4 and xfs tools; fails, never skips, without them.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const BUILD_STEPS: &[&str] = &[
    "mkdir -p /app/lib /app/etc /opq/sub && echo v1 > /app/etc/conf && seq 1 500 > /app/lib/data && echo keep > /opq/keep && echo deep > /opq/sub/deep && ln -s /bin/busybox /app/tool",
    "echo v2 > /app/etc/conf && ln -s /app/etc/conf /app/conf-link && ln /app/lib/data /app/lib/data-hard",
    "rm /app/lib/data-hard && chmod 4755 /app/lib/data && chown 1000:1000 /app/etc",
    "rm -rf /opq && mkdir -p /opq && echo fresh > /opq/fresh",
    "rm -rf /usr/share/doc && touch /usr/share/newfile",
    "mkdir /many && for i in $(seq 1 200); do echo $i > /many/f$i; done",
    "rm /many/f1* && mv /many/f2 /many/renamed",
    "rm /app/tool && printf '#!/bin/sh\\necho tool\\n' > /app/tool && chmod 755 /app/tool",
    "mkfifo /app/fifo && mkdir -p /app/empty && yes abcdefgh | head -c 3000000 > /app/big",
];

struct Fixture {
    _tmp: PathBuf,
    rootfs: PathBuf,
    rootfs_tar: PathBuf,
    archive: PathBuf,
    archive_tars: Vec<Vec<u8>>,
    build_ctx: PathBuf,
    build_expected: PathBuf,
}

fn fixture(host: &Host) -> Fixture {
    let tmp = host.dir.join("fixture");
    let rootfs = tmp.join("rootfs");
    busybox_rootfs(&rootfs);
    let rootfs_tar = tmp.join("rootfs.tar");
    run_ok(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&rootfs_tar).arg("."));
    let archive = tmp.join("multi.tar");
    let archive_tars = docker_archive(&base_layers(&rootfs), "multi:1", &archive);
    let build_ctx = tmp.join("ctx");
    fs::create_dir_all(&build_ctx).unwrap();
    let mut df = String::from("FROM base:1\n");
    for s in BUILD_STEPS {
        df.push_str(&format!("RUN {s}\n"));
    }
    fs::write(build_ctx.join("Dockerfile"), df).unwrap();
    // The same steps, run by the same busybox in a chroot of the same base.
    let build_expected = tmp.join("build-expected");
    run_ok(Command::new("cp").arg("-a").arg(&rootfs).arg(&build_expected));
    for s in BUILD_STEPS {
        run_ok(Command::new("chroot").arg(&build_expected).args(["/bin/sh", "-c", s]));
    }
    Fixture { _tmp: tmp, rootfs, rootfs_tar, archive, archive_tars, build_ctx, build_expected }
}

fn layer_count(dir: &Path) -> usize {
    fs::read_dir(dir.join("layers")).map(|d| d.count()).unwrap_or(0)
}

fn image_suite(fs_type: &str) {
    require(&["dockerd", "busybox", "overlay", if fs_type == "xfs" { "xfs" } else { "ext4" }]);
    let mut host = Host::new(&format!("suite-{fs_type}"));
    fs::create_dir_all(host.root_dir()).unwrap();
    host.start(&[&format!("sharedloop.fs={fs_type}")]);
    let fx = fixture(&host);
    let status = host.driver_status();
    assert!(status.starts_with("sharedloop\n"), "{status}");
    assert!(status.contains(&format!("Layer Image Filesystem: {fs_type}")), "{status}");
    assert!(
        status.contains("Learned Prefetch: auto (on for images on network filesystems), window 30s, at most 256 MiB"),
        "{status}"
    );

    // import: one layer
    host.docker_stdin(&["import", "-", "base:1"], &fx.rootfs_tar);
    assert_same_manifest(&host_manifest(&fx.rootfs), &container_manifest(&host, "base:1"), "docker import");

    // load: four layers with whiteouts, an opaque dir, links, setuid, owners
    let out = host.docker_stdin(&["load"], &fx.archive);
    assert!(out.contains("multi:1"), "{out}");
    let expected = host.dir.join("multi-expected");
    expected_tree(&fx.archive_tars, &expected);
    assert_same_manifest(&host_manifest(&expected), &container_manifest(&host, "multi:1"), "docker load");

    // the 10-layer legacy build
    let out = run(Command::new(DOCKER)
        .env("DOCKER_BUILDKIT", "0")
        .arg("-H")
        .arg(format!("unix://{}", host.socket().display()))
        .args(["build", "-q", "-t", "built:1"])
        .arg(&fx.build_ctx));
    assert!(out.status.success(), "build: {}\n{}", String::from_utf8_lossy(&out.stderr), tail(&host.plugin_log(), 30));
    let layers = host.docker_ok(&["inspect", "-f", "{{len .RootFS.Layers}}", "built:1"]);
    assert_eq!(layers.trim(), "10");
    assert_same_manifest(&host_manifest(&fx.build_expected), &container_manifest(&host, "built:1"), "docker build");
    assert_eq!(layer_count(&host.root_dir()), 1 + 4 + 10 - 1, "every layer is one image in root (base shared)");

    // inspect shows each layer's image, location and loop device
    let data = host.docker_ok(&["inspect", "-f", "{{json .GraphDriver.Data}}", "built:1"]);
    let data: serde_json::Value = serde_json::from_str(&data).unwrap();
    let images = data["LayerImages"].as_str().unwrap();
    assert_eq!(images.split(':').count(), 10, "{data}");
    assert!(images.split(':').all(|p| p.starts_with(host.root_dir().to_str().unwrap()) && p.ends_with("/layer.img")));
    assert_eq!(data["Location"], "root");
    assert!(data["LoopDevices"].as_str().unwrap().split(':').all(|d| d.starts_with("/dev/loop")), "{data}");

    // a container: diff, cp both ways, commit, export
    host.docker_ok(&[
        "run",
        "--name",
        "c1",
        "--network",
        "none",
        "built:1",
        "sh",
        "-c",
        "echo changed > /app/etc/conf && mkdir /added && echo hi > /added/f && rm /opq/fresh && rm -r /many",
    ]);
    let diff = host.docker_ok(&["diff", "c1"]);
    for line in ["C /app/etc/conf", "A /added", "A /added/f", "D /opq/fresh", "D /many"] {
        assert!(diff.lines().any(|l| l == line), "docker diff lacks {line:?}:\n{diff}");
    }
    let cp_out = host.dir.join("cp-out");
    host.docker_ok(&["cp", "c1:/added/f", cp_out.to_str().unwrap()]);
    assert_eq!(fs::read_to_string(&cp_out).unwrap(), "hi\n");
    let cp_in = host.dir.join("cp-in");
    fs::write(&cp_in, "from the host\n").unwrap();
    host.docker_ok(&["cp", cp_in.to_str().unwrap(), "c1:/app/from-host"]);
    host.docker_ok(&["commit", "c1", "committed:1"]);
    let out = host.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "committed:1",
        "sh",
        "-c",
        "cat /app/etc/conf /added/f /app/from-host; ls /opq | wc -l; test -e /many && echo many-still-there; true",
    ]);
    assert_eq!(out, "changed\nhi\nfrom the host\n0\n");
    let export = host.dir.join("export.tar");
    host.docker_ok(&["export", "-o", export.to_str().unwrap(), "c1"]);
    let names = run_ok(Command::new("tar").arg("-tf").arg(&export));
    for n in ["added/f", "app/from-host", "app/lib/data", "bin/busybox"] {
        assert!(names.lines().any(|l| l.trim_start_matches("./") == n), "export lacks {n}");
    }
    assert!(!names.lines().any(|l| l.contains("many/") || l.contains("lost+found")), "export has removed files");

    // save, remove, load again: same content
    let saved = host.dir.join("saved.tar");
    host.docker_ok(&["save", "-o", saved.to_str().unwrap(), "committed:1"]);
    let before = container_manifest(&host, "committed:1");
    host.docker_ok(&["rm", "c1"]);
    host.docker_ok(&["rmi", "committed:1"]);
    host.docker_stdin(&["load"], &saved);
    assert_same_manifest(&before, &container_manifest(&host, "committed:1"), "save + load");

    // a writable layer's size limit (xfs cannot be smaller than 300 MiB)
    let limit_mb = if fs_type == "xfs" { 320 } else { 64 };
    let over = format!("yes 0123456789abcdef | head -c {} > /big", (limit_mb + 40) * 1_000_000);
    let out = host.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--storage-opt",
        &format!("size={limit_mb}M"),
        "base:1",
        "sh",
        "-c",
        &over,
    ]);
    assert!(!out.status.success(), "writing past a {limit_mb} MB writable layer succeeded");
    host.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--storage-opt",
        &format!("size={}M", limit_mb * 2),
        "base:1",
        "sh",
        "-c",
        &over,
    ]);
    if fs_type == "xfs" {
        let out = host.docker(&["run", "--rm", "--network", "none", "--storage-opt", "size=64M", "base:1", "true"]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("below the xfs minimum"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = host.docker(&["run", "--rm", "--network", "none", "--storage-opt", "size=lots", "base:1", "true"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("size"),
        "bad size not named: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // remove everything: no layer image, loop device or mount remains
    let all = host.docker_ok(&["ps", "-aq"]);
    for c in all.split_whitespace() {
        host.docker_ok(&["rm", "-f", c]);
    }
    for img in ["committed:1", "built:1", "multi:1", "base:1"] {
        host.docker_ok(&["rmi", img]);
    }
    assert_eq!(layer_count(&host.root_dir()), 0, "layer images left in root");
    assert_eq!(layer_count(&host.fallback_dir()), 0, "layer images left in fallback");
    let home = host.data_root().join("sharedloop");
    assert_eq!(
        settled_mounts(&host, &home, 1),
        vec![home.join("tmp").display().to_string()],
        "mounts left under {}",
        home.display()
    );
    assert_eq!(settled_mounts(&host, Path::new(LAYER_MOUNTS), 0), Vec::<String>::new(), "layer mounts left");
    assert_no_loops(&host.dir);
    assert!(fs::read_dir(home.join("rw")).unwrap().next().is_none(), "writable images left");
    let log = host.plugin_log();
    assert!(!log.contains(" ERROR "), "errors in the plugin log:\n{}", tail(&log, 40));
}

#[test]
fn docker_image_suite_ext4() {
    image_suite("ext4");
}

#[test]
fn docker_image_suite_xfs() {
    image_suite("xfs");
}

fn deep_image(rootfs: &Path, n: usize) -> Vec<LayerSpec> {
    let mut layers = vec![LayerSpec { rootfs: Some(rootfs.to_owned()), ..Default::default() }];
    for i in 1..n {
        layers.push(LayerSpec {
            files: vec![
                (format!("layers/{i:03}"), format!("{i}\n").into_bytes(), 0o644, 0, 0),
                ("top".into(), format!("{i}\n").into_bytes(), 0o644, 0, 0),
            ],
            ..Default::default()
        });
    }
    layers
}

/// dockerd's own layer store refuses images deeper than 125 layers, for
/// every graph driver (moby `layer/layer_store.go`, `maxLayerDepth`), so
/// the deepest image Docker can run is 125 layers: it runs here, and one
/// more layer is refused by dockerd before sharedloop is asked. Deeper
/// stacks (up to overlayfs' 500) are tested through the plugin protocol
/// in plugin.rs and through containerd.
#[test]
fn docker_deepest_image_dockerd_allows_runs() {
    require(&["dockerd", "busybox", "overlay"]);
    let mut host = Host::new("deep");
    fs::create_dir_all(host.root_dir()).unwrap();
    host.start(&[]);
    let rootfs = host.dir.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = host.dir.join("deep.tar");
    docker_archive(&deep_image(&rootfs, 125), "deep:1", &archive);
    host.docker_stdin(&["load"], &archive);
    assert_eq!(host.docker_ok(&["inspect", "-f", "{{len .RootFS.Layers}}", "deep:1"]).trim(), "125");
    let out = host.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "deep:1",
        "sh",
        "-c",
        "cat /top; ls /layers | wc -l; cat /layers/001 /layers/124",
    ]);
    assert_eq!(out, "124\n124\n1\n124\n");
    assert_eq!(loops_under(&host.root_dir()).len(), 125, "one loop device per layer");

    let archive = host.dir.join("deeper.tar");
    docker_archive(&deep_image(&rootfs, 126), "deeper:1", &archive);
    let out = run(Command::new(DOCKER)
        .arg("-H")
        .arg(format!("unix://{}", host.socket().display()))
        .arg("load")
        .stdin(fs::File::open(&archive).unwrap()));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max depth exceeded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A host with root and fallback of its own and `multi:1` (4 layers) loaded.
fn loaded_host(name: &str) -> Host {
    loaded_host_with(name, &[])
}

/// [`loaded_host`] with storage options `opts`.
fn loaded_host_with(name: &str, opts: &[&str]) -> Host {
    let mut host = Host::new(name);
    fs::create_dir_all(host.root_dir()).unwrap();
    host.start(opts);
    let rootfs = host.dir.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = host.dir.join("img.tar");
    docker_archive(&base_layers(&rootfs), "multi:1", &archive);
    host.docker_stdin(&["load"], &archive);
    host
}

#[test]
fn docker_twenty_containers_share_one_mount_per_layer() {
    require(&["dockerd", "busybox", "overlay"]);
    let host = loaded_host("twenty");
    let layers = layer_count(&host.root_dir());
    assert_eq!(layers, 4);
    let handles: Vec<_> = (0..20)
        .map(|i| {
            let sock = host.socket();
            std::thread::spawn(move || {
                run_ok(Command::new(DOCKER).arg("-H").arg(format!("unix://{}", sock.display())).args([
                    "run",
                    "-d",
                    "--network",
                    "none",
                    "--name",
                    &format!("c{i}"),
                    "multi:1",
                    "sleep",
                    "1000",
                ]))
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let running = host.docker_ok(&["ps", "-q"]);
    assert_eq!(running.lines().count(), 20);
    let layer_loops = loops_under(&host.root_dir());
    assert_eq!(layer_loops.len(), layers, "one loop device per layer, not per container: {layer_loops:?}");
    for (dev, _) in &layer_loops {
        assert!(loop_dio(dev), "{}: no direct I/O on a local filesystem", dev.display());
    }
    let layer_mounts = host.mounts_under(Path::new(LAYER_MOUNTS));
    assert_eq!(layer_mounts.len(), layers, "{layer_mounts:?}");
    for i in 0..20 {
        host.docker_ok(&["rm", "-f", &format!("c{i}")]);
    }
    host.docker_ok(&["rmi", "multi:1"]);
    assert_no_loops(&host.dir);
}

/// `sharedloop.writable_layers=dir` under dockerd: a container's layer
/// is a directory in the home (no loop device or image of its own), its
/// changes show in `docker diff`, `docker commit` publishes them, and a
/// container given `--storage-opt size=` gets a bounded image as before.
#[test]
fn docker_writable_layers_dir_runs_commits_and_bounds_sized_containers() {
    require(&["dockerd", "busybox", "overlay"]);
    let host = loaded_host_with("rwdirs", &["sharedloop.writable_layers=dir"]);
    let status = host.driver_status();
    assert!(status.contains("Writable Layers: directories in the home, no size limit"), "{status}");
    let home = host.data_root().join("sharedloop");
    let layers = layer_count(&host.root_dir());
    host.docker_ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "wr",
        "multi:1",
        "sh",
        "-c",
        "echo kept > /kept && rm /etc/passwd && sleep 1000",
    ]);
    await_or_fail("the container wrote its file and removed /etc/passwd", || {
        let diff = host.docker_ok(&["diff", "wr"]);
        diff.lines().any(|l| l.trim() == "A /kept") && diff.lines().any(|l| l.trim() == "D /etc/passwd")
    });
    let rw = rw_layers(&home);
    assert!(
        rw.len() == 2 && rw.iter().all(|(_, dir, img)| *dir && !*img),
        "the container's layer and its -init layer are directories: {rw:?}"
    );
    assert_eq!(loops_under(&host.dir).len(), layers, "only the image's layers have loop devices");
    let data = host.docker_ok(&["inspect", "-f", "{{json .GraphDriver.Data}}", "wr"]);
    assert!(data.contains(r#""WritableFilesystem":"directory""#) && !data.contains("WritableSize"), "{data}");
    host.docker_ok(&["commit", "wr", "committed:1"]);
    host.docker_ok(&["rm", "-f", "wr"]);
    let out = host.docker_ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "committed:1",
        "sh",
        "-c",
        "cat /kept; test -e /etc/passwd && echo still || echo gone",
    ]);
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["kept", "gone"], "{out}");

    // A size asked for: the container's layer is an image of that size.
    host.docker_ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--storage-opt",
        "size=64M",
        "--name",
        "sz",
        "multi:1",
        "sleep",
        "1000",
    ]);
    let images = rw_layers(&home).into_iter().filter(|(_, _, img)| *img).count();
    assert_eq!(images, 1, "the sized container's layer is an image (its -init layer a directory)");
    let df = host.docker_ok(&["exec", "sz", "df", "-k", "/"]);
    let total: u64 = df.lines().nth(1).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap();
    assert!(total <= 64 * 1024, "the sized container's root is bounded by its image: {df}");
    host.docker_ok(&["rm", "-f", "sz"]);
    host.docker_ok(&["rmi", "committed:1", "multi:1"]);
    await_or_fail("the removed containers' layers go", || rw_layers(&home).is_empty());
    assert_no_loops(&host.dir);
}

#[test]
fn docker_plugin_restart_keeps_containers_running() {
    require(&["dockerd", "busybox", "overlay"]);
    let mut host = loaded_host("restart");
    for c in ["ca", "cb"] {
        host.docker_ok(&[
            "run",
            "-d",
            "--network",
            "none",
            "--name",
            c,
            "multi:1",
            "sh",
            "-c",
            "echo $HOSTNAME > /mine; sleep 1000",
        ]);
    }
    let mounts_of = |h: &Host| {
        let mut v = h.mounts_under(&h.data_root().join("sharedloop"));
        v.extend(h.mounts_under(Path::new(LAYER_MOUNTS)));
        v
    };
    let mounts_before = mounts_of(&host);

    host.kill_plugin();
    host.start_plugin();
    assert!(host.plugin_log().contains("restored the driver"), "{}", host.plugin_log());
    assert_eq!(mounts_of(&host), mounts_before, "restart changed mounts");
    assert_eq!(host.docker_ok(&["ps", "-q"]).lines().count(), 2, "containers died with the plugin");
    host.docker_ok(&["exec", "ca", "cat", "/srv/data/c"]);

    // stop, commit and rm work with the restarted plugin
    host.docker_ok(&["stop", "-t", "1", "ca"]);
    host.docker_ok(&["commit", "cb", "b-committed:1"]);
    let out = host.docker_ok(&["run", "--rm", "--network", "none", "b-committed:1", "cat", "/srv/data/c"]);
    assert_eq!(out, "gamma\n");
    host.docker_ok(&["rm", "-f", "ca", "cb"]);
    host.docker_ok(&["rmi", "b-committed:1", "multi:1"]);
    assert_no_loops(&host.dir);
    let home = host.data_root().join("sharedloop");
    assert_eq!(settled_mounts(&host, &home, 1), vec![home.join("tmp").display().to_string()], "mounts left");
    assert_eq!(settled_mounts(&host, Path::new(LAYER_MOUNTS), 0), Vec::<String>::new(), "layer mounts left");
}

#[test]
fn docker_refuses_to_start_with_a_bad_option_and_names_it() {
    require(&["dockerd"]);
    let mut host = Host::new("badopt");
    host.start_plugin();
    for (opt, name) in
        [("sharedloop.fs=btrfs", "sharedloop.fs"), ("sharedloop.no_such_thing=1", "sharedloop.no_such_thing")]
    {
        let mut opts = host.default_storage_opts();
        opts.push(opt.into());
        let dr = host.data_root();
        let err = host.try_start_dockerd(&opts, Some(&dr)).expect_err("dockerd started with a bad option");
        assert!(err.contains(name), "dockerd's error does not name {name}: {}", tail(&err, 5));
    }
}
