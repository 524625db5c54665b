//! Many hosts, one store: simulated hosts (separate namespaces, dockerd and
//! sharedloop instances, data roots and state) sharing one root directory,
//! on a local directory and on a real network filesystem (sshfs).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const HEARTBEAT: &str = "sharedloop.heartbeat_interval=1s";

fn image_layers(rootfs: &Path) -> Vec<LayerSpec> {
    let mut v = vec![LayerSpec { rootfs: Some(rootfs.to_owned()), ..Default::default() }];
    for i in 1..10 {
        let mut spec = LayerSpec::default();
        for j in 0..20 {
            spec.files.push((
                format!("data/l{i}/f{j}"),
                format!("layer {i} file {j}\n").repeat(200 * j + 1).into_bytes(),
                0o644,
                0,
                0,
            ));
        }
        if i > 1 {
            spec.whiteouts.push(format!("data/l{}/f0", i - 1));
        }
        v.push(spec);
    }
    v
}

struct Cluster {
    hosts: Vec<Host>,
    root: PathBuf,
    archive: PathBuf,
    tars: Vec<Vec<u8>>,
    _fixture: Host,
}

fn cluster(n: usize, root: &Path, slave: bool) -> Cluster {
    cluster_with(n, root, slave, &[])
}

/// [`cluster`] with more `--storage-opt`s for every host.
fn cluster_with(n: usize, root: &Path, slave: bool, extra: &[&str]) -> Cluster {
    fs::create_dir_all(root).unwrap();
    let fixture = Host::new("fixture");
    let rootfs = fixture.dir.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = fixture.dir.join("image.tar");
    let tars = docker_archive(&image_layers(&rootfs), "shared:1", &archive);
    let mut hosts = Vec::new();
    for i in 0..n {
        let mut h = Host::with(&format!("node{i}"), HostOpts { slave, ..Default::default() });
        h.start_plugin();
        let mut opts = vec![
            format!("sharedloop.loopback_root={}", root.display()),
            format!("sharedloop.loopback_fallback={}", h.fallback_dir().display()),
            HEARTBEAT.to_owned(),
            // A dead claimant holds others up this long (the kill test).
            "sharedloop.claim_timeout=10s".to_owned(),
        ];
        opts.extend(extra.iter().map(|o| o.to_string()));
        h.start_dockerd(&opts);
        hosts.push(h);
    }
    Cluster { hosts, root: root.to_owned(), archive, tars, _fixture: fixture }
}

/// Every published layer is complete: meta readable, image of the recorded size.
fn assert_layers_complete(root: &Path) {
    for d in layer_dirs(root) {
        let meta: serde_json::Value = serde_json::from_slice(
            &fs::read(d.join("meta.json")).unwrap_or_else(|e| panic!("{}: no meta.json ({e})", d.display())),
        )
        .unwrap_or_else(|e| panic!("{}: bad meta.json ({e})", d.display()));
        if !meta["fs"].is_null() {
            let len =
                fs::metadata(d.join("layer.img")).unwrap_or_else(|e| panic!("{}: no image ({e})", d.display())).len();
            assert_eq!(len, meta["image_bytes"].as_u64().unwrap(), "{}: image size differs from meta", d.display());
        }
    }
}

fn parallel<T: Send>(hosts: &[Host], f: impl Fn(&Host) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let hs: Vec<_> = hosts.iter().map(|h| s.spawn(|| f(h))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn concurrent_rounds(c: &Cluster, rounds: usize) {
    for round in 0..rounds {
        parallel(&c.hosts, |h| h.docker_stdin(&["load"], &c.archive));
        assert_eq!(layer_dirs(&c.root).len(), 10, "round {round}: one image per layer in root");
        assert_layers_complete(&c.root);
        for h in &c.hosts {
            assert_eq!(
                fs::read_dir(h.fallback_dir().join("layers")).map(|d| d.count()).unwrap_or(0),
                0,
                "round {round}: fallback used"
            );
        }
        if round + 1 < rounds {
            parallel(&c.hosts, |h| h.docker_ok(&["rmi", "shared:1"]));
            assert_eq!(layer_dirs(&c.root).len(), 0, "round {round}: layers left after every host removed the image");
        }
    }
    // One build per layer per round across all hosts (crate::claim): the
    // others waited for it instead of building and throwing theirs away.
    let builds: usize = c.hosts.iter().map(|h| h.plugin_log().matches("image built").count()).sum();
    let lost: usize =
        c.hosts.iter().map(|h| h.plugin_log().matches("another host published this layer first").count()).sum();
    assert_eq!((builds, lost), (10 * rounds, 0), "builds and builds thrown away over {rounds} rounds of 10 layers");
    // identical files in every container
    let expected_dir = c.hosts[0].dir.join("expected");
    expected_tree(&c.tars, &expected_dir);
    let expected = host_manifest(&expected_dir);
    for (i, m) in parallel(&c.hosts, |h| container_manifest(h, "shared:1")).iter().enumerate() {
        assert_same_manifest(&expected, m, &format!("host {i}"));
    }
    // disk use of one copy: the images in root are all there is
    let images: u64 =
        layer_dirs(&c.root).iter().filter_map(|d| fs::metadata(d.join("layer.img")).ok()).map(|m| m.len()).sum();
    let du: u64 =
        run_ok(Command::new("du").args(["-s", "--apparent-size", "--block-size=1"]).arg(c.root.join("layers")))
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
    assert!(du < images + images / 10 + 1_000_000, "root holds more than one copy: {du} bytes for {images} of images");
    let tmp_left: Vec<_> =
        fs::read_dir(c.root.join("tmp")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(tmp_left.is_empty(), "temporary builds left: {tmp_left:?}");
}

#[test]
fn multihost_three_hosts_load_concurrently_one_copy() {
    require(&["dockerd", "busybox", "overlay"]);
    let shared = SharedDir::new("mh-local");
    let c = cluster(3, &shared.path.join("root"), false);
    concurrent_rounds(&c, 20);
}

#[test]
fn multihost_three_hosts_on_sshfs_root() {
    require(&["dockerd", "busybox", "overlay", "sshfs"]);
    let net = Sshfs::new("mh-sshfs");
    let c = cluster(3, &net.mountpoint.join("store"), false);
    assert!(c.hosts[0].driver_status().contains("Root Filesystem: fuse"), "{}", c.hosts[0].driver_status());
    concurrent_rounds(&c, 3);
    // the layers really are on the other side of the network filesystem
    assert_eq!(fs::read_dir(net.exported.join("store/layers")).unwrap().count(), 10);
    let out = c.hosts[1].docker_ok(&["inspect", "-f", "{{.GraphDriver.Data.LayerLocations}}", "shared:1"]);
    assert!(out.trim().split(':').all(|l| l == "root"), "{out}");
    // On a network filesystem the loop devices read through the page cache
    // (sharedloop.direct_io=auto): readahead saves round trips.
    let loops = loops_under(&c.root);
    assert!(!loops.is_empty());
    for (dev, file) in &loops {
        assert!(!loop_dio(dev), "{} over {} uses direct I/O on sshfs", dev.display(), file.display());
    }
}

/// Learned prefetch on a network filesystem, with the defaults
/// (`sharedloop.prefetch=auto`, on for sshfs): the first host to run the
/// image records, for each layer its container read, what it read into the
/// store (nothing before a container runs); a second host, nothing cached,
/// reads those ranges ahead, records the layers nobody had, and sees every
/// file as published; `verify` finds the records well-formed.
#[test]
fn multihost_sshfs_prefetch_is_learned_once_and_read_ahead_elsewhere() {
    require(&["dockerd", "busybox", "overlay", "sshfs"]);
    let net = Sshfs::new("mh-prefetch");
    let c = cluster_with(2, &net.mountpoint.join("store"), false, &["sharedloop.prefetch_window=2s"]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    assert!(a.driver_status().contains("Learned Prefetch: auto"), "{}", a.driver_status());
    a.docker_stdin(&["load"], &c.archive);
    b.docker_stdin(&["load"], &c.archive);
    assert!(layer_dirs(&c.root).iter().all(|d| !d.join("prefetch").exists()), "a record before any container ran");
    a.docker_ok(&["run", "--rm", "--network", "none", "shared:1", "cat", "/data/l9/f19"]);
    // Layers the container read beyond what their mount read get a record
    // one window (2 s) after: the top one (the file) and the bottom one
    // (busybox) at least; the others only had their root looked up.
    let t0 = std::time::Instant::now();
    while layer_dirs(&c.root).iter().filter(|d| d.join("prefetch").exists()).count() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no prefetch records: {}", tail(&a.plugin_log(), 30));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(5));
    let recorded: Vec<PathBuf> = layer_dirs(&c.root).into_iter().filter(|d| d.join("prefetch").exists()).collect();
    for d in &recorded {
        let text = fs::read_to_string(d.join("prefetch")).unwrap();
        assert!(text.starts_with("sharedloop-prefetch 1\n"), "{}: {text}", d.display());
        let size = fs::metadata(d.join("layer.img")).unwrap().len();
        assert!(text.contains(&format!("image_bytes {size}\n")), "{}: {text}", d.display());
    }
    let n = recorded.len();
    assert_eq!(a.plugin_log().matches("prefetch: recorded what this host read of the layer").count(), n);
    // Host B: nothing cached. Its first mounts of the recorded layers read
    // their ranges ahead; it records the layers nobody recorded yet (its
    // container reads every file).
    fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap();
    let expected_dir = b.dir.join("expected");
    expected_tree(&c.tars, &expected_dir);
    assert_same_manifest(&host_manifest(&expected_dir), &container_manifest(b, "shared:1"), "host B with prefetch");
    let log = b.plugin_log();
    assert_eq!(log.matches("prefetch: read the layer's recorded ranges").count(), n, "{}", tail(&log, 40));
    let t0 = std::time::Instant::now();
    while b.plugin_log().matches("prefetch: recorded what this host read").count() < 10 - n {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "host B did not record the other layers: {}",
            tail(&b.plugin_log(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(layer_dirs(&c.root).iter().filter(|d| d.join("prefetch").exists()).count(), 10);
    let root = c.root.display().to_string();
    let v = a.cli(&["verify", "--root", &root, "--fallback", "/nonexistent"]);
    let out = String::from_utf8_lossy(&v.stdout);
    assert!(v.status.success() && out.contains("10 layers checked, 0 with problems"), "{out}");
}

#[test]
fn multihost_kill_during_load_leaves_no_partial_layer() {
    require(&["dockerd", "busybox", "overlay"]);
    let shared = SharedDir::new("mh-kill");
    let mut c = cluster(2, &shared.path.join("root"), false);
    // a bigger image, so the load is caught in the middle
    let big = c.hosts[0].dir.join("big.tar");
    let mut layers = vec![LayerSpec { rootfs: Some(c._fixture.dir.join("rootfs")), ..Default::default() }];
    for i in 1..12 {
        let data: Vec<u8> =
            (0..6_000_000u32).map(|x| (x.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8).collect();
        layers.push(LayerSpec { files: vec![(format!("big/{i}"), data, 0o644, 0, 0)], ..Default::default() });
    }
    docker_archive(&layers, "big:1", &big);
    // a container on the host that dies: it must die with it
    c.hosts[0].docker_stdin(&["load"], &c.archive);
    c.hosts[0].docker_ok(&["run", "-d", "--network", "none", "shared:1", "sleep", "7654321"]);
    let sock = c.hosts[0].socket();
    let loader = std::thread::spawn({
        let big = big.clone();
        move || {
            run(Command::new(DOCKER)
                .arg("-H")
                .arg(format!("unix://{}", sock.display()))
                .arg("load")
                .stdin(fs::File::open(&big).unwrap()))
        }
    });
    let t = std::time::Instant::now();
    while layer_dirs(&c.root).len() < 10 + 3 {
        assert!(t.elapsed() < Duration::from_secs(60), "the load did not get going");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.hosts[0].kill_all();
    let _ = loader.join();
    let survivors = run(Command::new("pgrep").args(["-f", "sleep 7654321"]));
    assert!(
        !survivors.status.success(),
        "a container outlived its killed host: {}",
        String::from_utf8_lossy(&survivors.stdout)
    );
    let published = layer_dirs(&c.root).len();
    assert!(published < 10 + 11, "the kill came too late to test anything");
    assert_layers_complete(&c.root);

    // the other host loads the same image: it reuses what is there, builds the rest
    c.hosts[1].docker_stdin(&["load"], &big);
    assert_eq!(layer_dirs(&c.root).len(), 10 + 11, "shared:1's 10 layers (busybox shared) and big:1's 11 more");
    assert_layers_complete(&c.root);
    let out = c.hosts[1].docker_ok(&["run", "--rm", "--network", "none", "big:1", "sh", "-c", "ls /big | wc -l"]);
    assert_eq!(out.trim(), "11");

    // once the killed host counts as dead, gc sweeps its leftovers and its references
    std::thread::sleep(Duration::from_secs(3));
    let rep = gc_json(&c.hosts[1], &c.root, "2s", "0s", false);
    // Only the dead host used shared:1's upper nine layers; host 1 uses big:1
    // (whose base layer is shared:1's base) and keeps all of it.
    assert_eq!(rep["removed_layers"].as_array().unwrap().len(), 9, "{rep}");
    assert_eq!(rep["kept_layers"], 12, "{rep}");
    let out = c.hosts[1].docker_ok(&["run", "--rm", "--network", "none", "big:1", "sh", "-c", "ls /big | wc -l"]);
    assert_eq!(out.trim(), "11", "host 1's image broke after gc");
    let left: Vec<_> =
        fs::read_dir(c.root.join("tmp")).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "leftovers not swept: {left:?}");
    let dead = rep["dead_hosts"].as_array().unwrap();
    assert_eq!(dead.len(), 1, "{rep}");
    for d in layer_dirs(&c.root) {
        let refs = c.root.join("refs").join(d.file_name().unwrap());
        let holders: Vec<String> =
            fs::read_dir(&refs).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        assert!(!holders.iter().any(|h| dead.iter().any(|x| x == h)), "dead host still pins {}", d.display());
    }
}

#[test]
fn multihost_rmi_on_one_host_keeps_the_other_running() {
    require(&["dockerd", "busybox", "overlay"]);
    let shared = SharedDir::new("mh-rmi");
    let c = cluster(2, &shared.path.join("root"), false);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    parallel(&c.hosts, |h| h.docker_stdin(&["load"], &c.archive));
    b.docker_ok(&["run", "-d", "--name", "keep", "--network", "none", "shared:1", "sleep", "1000"]);
    a.docker_ok(&["rmi", "shared:1"]);
    assert_eq!(layer_dirs(&c.root).len(), 10, "host A's rmi removed layers host B uses");
    let rep = gc_json(b, &c.root, "1h", "0s", false);
    assert!(rep["removed_layers"].as_array().unwrap().is_empty(), "{rep}");
    assert_eq!(b.docker_ok(&["exec", "keep", "cat", "/data/l9/f1"]).len(), "layer 9 file 1\n".len() * 201);
    // B lets go: the last reference goes and the layers with it
    b.docker_ok(&["rm", "-f", "keep"]);
    b.docker_ok(&["rmi", "shared:1"]);
    assert_eq!(layer_dirs(&c.root).len(), 0);
}

#[test]
fn multihost_dead_host_stops_pinning_after_the_timeout() {
    require(&["dockerd", "busybox", "overlay"]);
    let shared = SharedDir::new("mh-dead");
    let mut c = cluster(1, &shared.path.join("root"), false);
    c.hosts[0].docker_stdin(&["load"], &c.archive);
    let root = c.root.display().to_string();
    let gc = |h: &Host, dry: bool| gc_json(h, &c.root, "3s", "0s", dry);
    let status = c.hosts[0].cli(&["status", "--root", &root, "--fallback", "/nonexistent", "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st[0]["hosts"][0]["live"], true, "{st}");
    assert_eq!(
        gc(&c.hosts[0], false)["removed_layers"].as_array().unwrap().len(),
        0,
        "a live host's layers were collected"
    );
    c.hosts[0].kill_all();
    std::thread::sleep(Duration::from_secs(5));
    let dry = gc(&c.hosts[0], true);
    assert_eq!(dry["removed_layers"].as_array().unwrap().len(), 10, "{dry}");
    assert_eq!(layer_dirs(&c.root).len(), 10, "dry run removed layers");
    let rep = gc(&c.hosts[0], false);
    assert_eq!(rep["removed_layers"].as_array().unwrap().len(), 10, "{rep}");
    assert_eq!(layer_dirs(&c.root).len(), 0);
}

/// `sharedloop gc --json` on the cluster's root, run inside `h`.
fn gc_json(h: &Host, root: &Path, host_timeout: &str, grace: &str, dry_run: bool) -> serde_json::Value {
    let root = root.display().to_string();
    let mut args = vec![
        "gc",
        "--root",
        &root,
        "--fallback",
        "/nonexistent",
        "--host-timeout",
        host_timeout,
        "--grace",
        grace,
        "--json",
    ];
    if dry_run {
        args.push("--dry-run");
    }
    let out = h.cli(&args);
    assert!(out.status.success(), "gc: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn new_image(c: &Cluster, h: &Host, tag: &str, content: &str) {
    let rootfs = c._fixture.dir.join("rootfs");
    let archive = h.dir.join(format!("{}.tar", tag.replace(':', "-")));
    docker_archive(
        &[
            LayerSpec { rootfs: Some(rootfs), ..Default::default() },
            LayerSpec {
                files: vec![("marker".into(), content.as_bytes().to_vec(), 0o644, 0, 0)],
                ..Default::default()
            },
        ],
        tag,
        &archive,
    );
    h.docker_stdin(&["load"], &archive);
}

fn fallback_layers(h: &Host) -> usize {
    fs::read_dir(h.fallback_dir().join("layers")).map(|d| d.count()).unwrap_or(0)
}

/// A way to break root, and the way to heal it.
type FailureMode<'a> = (&'a str, &'a dyn Fn(), &'a dyn Fn());

/// Root read-only, unwritable, full, and unmounted under running daemons:
/// new layers land in fallback, running containers keep running, and
/// promote moves the layers into root once it is back.
#[test]
fn multihost_root_failures_fall_back_and_promote_restores() {
    require(&["dockerd", "busybox", "overlay", "chattr", "fallocate"]);
    let shared = SharedDir::new("mh-fail");
    let mnt = shared.mount_ext4("netfs", 400);
    let root = mnt.join("store");
    let c = cluster(2, &root, true);
    parallel(&c.hosts, |h| h.docker_stdin(&["load"], &c.archive));
    for h in &c.hosts {
        h.docker_ok(&["run", "-d", "--name", "running", "--network", "none", "shared:1", "sleep", "1000"]);
    }
    let modes: [FailureMode; 4] = [
        (
            "read-only",
            &|| {
                run_ok(Command::new("mount").args(["-o", "remount,ro"]).arg(&mnt));
            },
            &|| {
                run_ok(Command::new("mount").args(["-o", "remount,rw"]).arg(&mnt));
            },
        ),
        (
            "unwritable",
            &|| {
                fs::create_dir_all(root.join("tmp")).unwrap();
                run_ok(Command::new("chattr").arg("+i").arg(root.join("tmp")).arg(root.join("layers")));
            },
            &|| {
                run_ok(Command::new("chattr").arg("-i").arg(root.join("tmp")).arg(root.join("layers")));
            },
        ),
        (
            "full",
            &|| {
                let _ = run(Command::new("fallocate").args(["-l", "2G"]).arg(mnt.join("filler")));
                run_ok(
                    Command::new("sh")
                        .arg("-c")
                        .arg(format!("cat /dev/zero > {}/filler2 2>/dev/null; true", mnt.display())),
                );
            },
            &|| {
                let _ = fs::remove_file(mnt.join("filler"));
                let _ = fs::remove_file(mnt.join("filler2"));
            },
        ),
        (
            "unmounted",
            &|| {
                run_ok(Command::new("umount").arg("-l").arg(&mnt));
            },
            &|| {
                shared.mount_ext4("netfs", 400);
            },
        ),
    ];
    for (i, (mode, break_root, heal_root)) in modes.iter().enumerate() {
        break_root();
        let h = &c.hosts[i % 2];
        let before = fallback_layers(h);
        new_image(&c, h, &format!("during-{mode}:1"), mode);
        assert_eq!(fallback_layers(h), before + 1, "{mode}: the new layer is not in fallback");
        assert_eq!(
            h.docker_ok(&["run", "--rm", "--network", "none", &format!("during-{mode}:1"), "cat", "/marker"]),
            *mode
        );
        for other in &c.hosts {
            assert_eq!(
                other.docker_ok(&["exec", "running", "cat", "/data/l3/f2"]).len(),
                "layer 3 file 2\n".len() * 401,
                "{mode}: a running container broke"
            );
        }
        let status = h.driver_status();
        assert!(status.contains("Root Directory State: new layers go to fallback"), "{mode}: {status}");
        assert!(h.plugin_log().contains("using the fallback directory"), "{mode}: fallback not logged");
        heal_root();
        assert!(h.driver_status().contains("Root Directory State: writable"), "{mode}: root not back");
        let out = h.cli(&[
            "promote",
            "--root",
            &root.display().to_string(),
            "--fallback",
            &h.fallback_dir().display().to_string(),
            "--json",
        ]);
        assert!(out.status.success(), "{mode}: promote failed: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(fallback_layers(h), 0, "{mode}: fallback not emptied");
        assert!(layer_dirs(&root).len() >= 11 + i, "{mode}: layers not in root");
        assert_layers_complete(&root);
        // the promoted image still runs, and is found in root now
        assert_eq!(
            h.docker_ok(&["run", "--rm", "--network", "none", &format!("during-{mode}:1"), "cat", "/marker"]),
            *mode
        );
        // The other host mounts the promoted layer for the first time: its
        // check (verify=identity) passes against the stamp promote
        // recorded for the copy in root.
        let other = &c.hosts[(i + 1) % 2];
        other.docker_stdin(&["load"], &h.dir.join(format!("during-{mode}-1.tar")));
        assert_eq!(
            other.docker_ok(&["run", "--rm", "--network", "none", &format!("during-{mode}:1"), "cat", "/marker"]),
            *mode
        );
    }
    // and everything can be removed cleanly afterwards
    for (mode, _, _) in modes.iter() {
        for h in &c.hosts {
            h.docker_ok(&["rmi", &format!("during-{mode}:1")]);
        }
    }
    assert_eq!(layer_dirs(&root).len(), 10, "promoted layers not released: {:?}", layer_dirs(&root));
}

#[test]
fn verify_finds_a_flipped_byte_and_names_the_layer() {
    require(&["dockerd", "busybox", "overlay"]);
    let shared = SharedDir::new("mh-verify");
    let c = cluster(1, &shared.path.join("root"), false);
    c.hosts[0].docker_stdin(&["load"], &c.archive);
    let root = c.root.display().to_string();
    let args = ["verify", "--root", &root, "--fallback", "/nonexistent"];
    let ok = c.hosts[0].cli(&args);
    assert!(ok.status.success(), "{}{}", String::from_utf8_lossy(&ok.stdout), String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("10 layers checked, 0 with problems"));
    let victim = layer_dirs(&c.root)[4].clone();
    let chain = victim.file_name().unwrap().to_string_lossy().replacen('-', ":", 1);
    let img = victim.join("layer.img");
    let mut data = fs::read(&img).unwrap();
    let at = data.len() / 3;
    data[at] ^= 0x40;
    fs::write(&img, &data).unwrap();
    let bad = c.hosts[0].cli(&args);
    assert_eq!(bad.status.code(), Some(1));
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains(&format!("{chain} (root): CORRUPT")), "{text}");
    assert!(text.contains("1 with problems"), "{text}");
    let one = c.hosts[0].cli(&[&args[..], &[&chain[7..19]]].concat());
    assert_eq!(one.status.code(), Some(1));
    let other = layer_dirs(&c.root)[0].file_name().unwrap().to_string_lossy()[7..19].to_owned();
    assert_eq!(c.hosts[0].cli(&[&args[..], &[other.as_str()]].concat()).status.code(), Some(0));
}

/// A layer image changed in the shared root after publish (a flipped byte,
/// a truncation, a whole crafted filesystem) is refused before the kernel
/// mounts it, with an error naming it; with `digest` each host reads an
/// image once, and the genuine bytes put back are mounted.
#[test]
fn tampered_images_are_refused_before_the_kernel_mounts_them() {
    tampered_images_are_refused("digest");
}

/// The same with `identity` (the default): an untouched image is mounted
/// without a byte of it read; a changed one is not the file its publisher
/// stamped, so its digest is checked, and each change is refused; the
/// genuine bytes written back (a new file's times, as a restore or a
/// `cp -a` gives) pass the digest and are mounted.
#[test]
fn tampered_images_are_refused_by_identity_without_reading_them() {
    tampered_images_are_refused("identity");
}

fn tampered_images_are_refused(mode: &str) {
    require(&["dockerd", "busybox", "overlay", "mkfs.ext4"]);
    let shared = SharedDir::new("mh-tamper");
    let opt = format!("sharedloop.verify={mode}");
    let c = cluster_with(2, &shared.path.join("root"), false, &[&opt]);
    let (a, b) = (&c.hosts[0], &c.hosts[1]);
    let checks = |h: &Host| h.plugin_log().matches("image checked before its first mount").count();
    a.docker_stdin(&["load"], &c.archive);
    let run = ["run", "--rm", "--network", "none", "shared:1", "cat", "/data/l9/f1"];
    a.docker_ok(&run);
    let images = layer_dirs(&c.root).iter().filter(|d| d.join("layer.img").exists()).count();
    assert_eq!(checks(a), 0, "the publishing host vouches for the images it just built");

    b.docker_stdin(&["load"], &c.archive);
    let victim = layer_dirs(&c.root)[4].clone();
    let img = victim.join("layer.img");
    let original = fs::read(&img).unwrap();
    let crafted_dir = b.dir.join("crafted");
    fs::create_dir_all(crafted_dir.join("fs/data")).unwrap();
    fs::write(crafted_dir.join("fs/data/evil"), "not what was published\n").unwrap();
    type Tamper<'a> = Box<dyn Fn(&Path) + 'a>;
    let tampers: Vec<(&str, Tamper)> = vec![
        (
            "a flipped byte",
            Box::new(|p: &Path| {
                let mut d = fs::read(p).unwrap();
                let at = d.len() / 2;
                d[at] ^= 0x01;
                fs::write(p, d).unwrap();
            }),
        ),
        (
            "a truncation",
            Box::new(|p: &Path| {
                let f = fs::OpenOptions::new().write(true).open(p).unwrap();
                let len = f.metadata().unwrap().len();
                f.set_len(len / 2).unwrap();
            }),
        ),
        (
            "a crafted filesystem",
            Box::new(|p: &Path| {
                let len = fs::metadata(p).unwrap().len();
                fs::remove_file(p).unwrap();
                run_ok(
                    Command::new("mkfs.ext4")
                        .args(["-q", "-F", "-d"])
                        .arg(&crafted_dir)
                        .arg(p)
                        .arg(format!("{}k", len / 1024)),
                );
            }),
        ),
    ];
    // Host A mounted every layer before the tampering; host B none.
    let a_loops = loops_under(&victim);
    assert_eq!(a_loops.len(), 1);
    for (what, tamper) in &tampers {
        tamper(&img);
        let out = b.docker(&run);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: the container started");
        assert!(err.contains(img.to_str().unwrap()) && err.contains("refusing to mount"), "{what}: {err}");
        assert!(err.contains("sharedloop verify"), "{what}: {err}");
        assert_eq!(loops_under(&victim), a_loops, "{what}: host B gave the kernel the image");
        let chain_dir = victim.file_name().unwrap().to_string_lossy().into_owned();
        assert!(!b.mountinfo().contains(&chain_dir), "{what}: host B mounted it");
        fs::write(&img, &original).unwrap();
    }
    if mode == "identity" {
        assert_eq!(b.docker_ok(&run), "layer 9 file 1\n".repeat(201));
        assert_eq!(checks(b), 1, "host B read only the rewritten image (its digest), none of the untouched ones");
        assert!(b.plugin_log().contains("not the file its publisher stamped; checking its digest"));
        return;
    }
    assert_eq!(b.docker_ok(&run), "layer 9 file 1\n".repeat(201));
    assert_eq!(checks(b), images, "host B checked every image before its first mount");
    b.docker_ok(&run);
    assert_eq!(checks(b), images, "and only once");
}
