//! One build per layer across hosts (crate::claim, docs/multi-host.md
//! "Publishing"): simulated hosts, each with its own sharedloop, share one
//! root and apply the same new layers at once through the plugin protocol.
//! Each layer is built once; a host that dies holding a claim, at any step
//! of its build, leaves the others able to finish; a root that fails while
//! a host waits sends the layer to fallback. Real kernel, loop devices,
//! ext4 and overlayfs; the plugins abort by fault injection (no destructors
//! run: a kill -9).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::plugin_client::PluginClient;
use common::*;
use serde_json::json;

/// A host running only sharedloop's Docker plugin, with `env` (faults).
fn host(name: &str, slave: bool, env: &[(&str, &str)]) -> (Host, PluginClient) {
    let mut h = Host::with(name, HostOpts { slave, ..Default::default() });
    h.start_plugin_env(env);
    let c = PluginClient::new(&h.inside(Path::new("/run/docker/plugins/sharedloop.sock")));
    c.ok("Plugin.Activate", json!(null));
    (h, c)
}

/// Init over the shared `root`, with the host's own fallback and home.
fn init(h: &Host, c: &PluginClient, root: &Path, claim_timeout: &str) {
    c.ok(
        "GraphDriver.Init",
        json!({"Home": h.dir.join("home"), "UIDMaps": null, "GIDMaps": null, "Opts": [
            format!("sharedloop.loopback_root={}", root.display()),
            format!("sharedloop.loopback_fallback={}", h.fallback_dir().display()),
            format!("sharedloop.claim_timeout={claim_timeout}"),
        ]}),
    );
}

/// Layer tars of one new image: `n` layers, each with a few MB of its own
/// data (so that a build takes a while) and a marker file.
fn image(n: usize, salt: &str) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let data: Vec<u8> = (0..3_000_000u32)
                .map(|x| (x.wrapping_mul(2654435761).wrapping_add(i as u32 * 7919) >> 11) as u8)
                .collect();
            layer_tar(&LayerSpec {
                files: vec![
                    (format!("data/{i}"), data, 0o644, 0, 0),
                    (format!("marker/{i}"), format!("{salt} {i}\n").into_bytes(), 0o644, 0, 0),
                ],
                ..Default::default()
            })
        })
        .collect()
}

fn apply_all(c: &PluginClient, tars: &[Vec<u8>], prefix: &str) {
    let mut parent = String::new();
    for (i, tar) in tars.iter().enumerate() {
        let id = format!("{prefix}{i}");
        c.ok("GraphDriver.Create", json!({"ID": id, "Parent": parent}));
        let r = c.apply_diff(&id, &parent, tar);
        assert!(r.status == 200 && r.err().is_none(), "ApplyDiff {id}: {}", String::from_utf8_lossy(&r.body));
        parent = id;
    }
}

fn count(h: &Host, what: &str) -> usize {
    h.plugin_log().matches(what).count()
}

fn dir_names(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d)
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Claims under `root` still saying "building".
fn live_claims(root: &Path) -> Vec<String> {
    dir_names(&root.join("claims"))
        .into_iter()
        .filter(|n| fs::read_to_string(root.join("claims").join(n)).unwrap_or_default().contains("state=building"))
        .collect()
}

#[test]
fn claims_four_hosts_applying_one_new_image_build_each_layer_once() {
    require(&["busybox", "overlay"]);
    let shared = SharedDir::new("claims-herd");
    let root = shared.path.join("root");
    fs::create_dir_all(&root).unwrap();
    let hosts: Vec<(Host, PluginClient)> = (0..4).map(|i| host(&format!("herd{i}"), false, &[])).collect();
    for (h, c) in &hosts {
        init(h, c, &root, "60s");
    }
    let tars = image(6, "herd");
    let barrier = Barrier::new(hosts.len());
    std::thread::scope(|s| {
        for (_, c) in &hosts {
            let (b, tars) = (&barrier, &tars);
            s.spawn(move || {
                b.wait();
                apply_all(c, tars, "l");
            });
        }
    });
    let builds: usize = hosts.iter().map(|(h, _)| count(h, "image built")).sum();
    let lost: usize = hosts.iter().map(|(h, _)| count(h, "another host published this layer first")).sum();
    let logs = || hosts.iter().map(|(h, _)| h.plugin_log()).collect::<Vec<_>>().join("\n----\n");
    assert_eq!(builds, 6, "each of the 6 layers built once across 4 hosts; logs:\n{}", logs());
    assert_eq!(lost, 0, "no build thrown away; logs:\n{}", logs());
    // The claim is taken before extracting: the hosts that waited did not
    // extract the layer either.
    let staged: usize = hosts.iter().map(|(h, _)| count(h, "tar applied to staging")).sum();
    assert_eq!(staged, 6, "each layer extracted once across 4 hosts; logs:\n{}", logs());
    assert_eq!(dir_names(&root.join("layers")).len(), 6);
    assert!(dir_names(&root.join("tmp")).is_empty(), "builds left in tmp/: {:?}", dir_names(&root.join("tmp")));
    assert!(live_claims(&root).is_empty(), "claims left building: {:?}", live_claims(&root));
    // Every host runs a container over the image and sees every layer.
    for (h, c) in &hosts {
        c.ok("GraphDriver.CreateReadWrite", json!({"ID": "ctr", "Parent": "l5", "StorageOpt": {}}));
        let dir = c.ok("GraphDriver.Get", json!({"ID": "ctr"}))["Dir"].as_str().unwrap().to_owned();
        for i in 0..6 {
            let m = fs::read_to_string(h.inside(Path::new(&dir)).join(format!("marker/{i}"))).unwrap();
            assert_eq!(m, format!("herd {i}\n"), "{}", h.name);
        }
        c.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    }
}

/// A host applying a layer that is already published extracts nothing.
#[test]
fn claims_a_published_layer_is_not_extracted_again() {
    require(&["busybox", "overlay"]);
    let shared = SharedDir::new("claims-known");
    let root = shared.path.join("root");
    fs::create_dir_all(&root).unwrap();
    let (a, ca) = host("known-a", false, &[]);
    let (b, cb) = host("known-b", false, &[]);
    init(&a, &ca, &root, "60s");
    init(&b, &cb, &root, "60s");
    let tars = image(3, "known");
    apply_all(&ca, &tars, "x");
    apply_all(&cb, &tars, "y");
    assert_eq!(count(&a, "tar applied to staging"), 3, "{}", a.plugin_log());
    assert_eq!(count(&b, "tar applied to staging"), 0, "host b extracted a published layer:\n{}", b.plugin_log());
    assert_eq!(count(&b, "layer already in the store; nothing extracted"), 3, "{}", b.plugin_log());
    // What b answers is the same layer: its content and size.
    let size_a = ca.ok("GraphDriver.DiffSize", json!({"ID": "x2", "Parent": "x1"}))["Size"].clone();
    let size_b = cb.ok("GraphDriver.DiffSize", json!({"ID": "y2", "Parent": "y1"}))["Size"].clone();
    assert_eq!(size_a, size_b);
    cb.ok("GraphDriver.CreateReadWrite", json!({"ID": "ctr", "Parent": "y2", "StorageOpt": {}}));
    let dir = cb.ok("GraphDriver.Get", json!({"ID": "ctr"}))["Dir"].as_str().unwrap().to_owned();
    assert_eq!(fs::read_to_string(b.inside(Path::new(&dir)).join("marker/2")).unwrap(), "known 2\n");
    cb.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    // Nothing of the stream stays in b's local tmp (the spool is unnamed).
    assert!(dir_names(&b.dir.join("home/tmp")).is_empty(), "{:?}", dir_names(&b.dir.join("home/tmp")));
}

/// The claimant dies (abort: no destructors, like kill -9) at each step
/// of its build: after claiming, with its temp dir made, with the image
/// built, with meta written, after the rename. Another host applying the
/// same layer finishes: it takes the build over once the claim goes
/// unrenewed for the timeout, or finds the layer in place. The dead
/// host, restarted, uses the layer and sweeps its leftovers.
#[test]
fn claims_a_claimant_killed_at_each_step_does_not_stop_the_others() {
    require(&["busybox", "overlay"]);
    let steps = [
        ("claim:2", "claim made", true),
        ("publish:1", "temp dir made", true),
        ("publish:2", "image built", true),
        ("publish:3", "meta written and synced", true),
        ("publish:4", "renamed into place", false),
    ];
    for (fault, what, takes_over) in steps {
        let shared = SharedDir::new("claims-kill");
        let root = shared.path.join("root");
        fs::create_dir_all(&root).unwrap();
        let (mut a, ca) = host("kill-a", false, &[("SHAREDLOOP_FAULT", fault)]);
        let (b, cb) = host("kill-b", false, &[]);
        init(&a, &ca, &root, "2s");
        init(&b, &cb, &root, "2s");
        let tars = image(1, fault);
        ca.ok("GraphDriver.Create", json!({"ID": "l0", "Parent": ""}));
        let r = ca.apply_diff("l0", "", &tars[0]);
        assert!(r.status != 200 || r.aborted() || r.err().is_some(), "{fault}: the fault did not fire");
        a.reap_plugin();
        assert!(
            a.plugin_log().contains(&format!("aborting in {}", fault.split(':').next().unwrap())),
            "{fault}: {}",
            a.plugin_log()
        );
        let claims = dir_names(&root.join("claims"));
        assert_eq!(claims.len(), 1, "{fault} ({what}): the dead host's claim stays: {claims:?}");

        apply_all(&cb, &tars, "m");
        let log = b.plugin_log();
        if takes_over {
            assert!(log.contains("stopped renewing its claim; taking over"), "{fault} ({what}):\n{log}");
            assert_eq!(count(&b, "image built"), 1, "{fault}:\n{log}");
        } else {
            assert_eq!(count(&b, "image built"), 0, "{fault}: the layer was in place:\n{log}");
        }
        assert_eq!(dir_names(&root.join("layers")).len(), 1, "{fault}");
        if takes_over {
            assert!(live_claims(&root).is_empty(), "{fault}: {:?}", live_claims(&root));
        } else {
            // Dead after the rename, before marking its claim published:
            // the claim stays (gc removes it; the layer's removal does),
            // and holds nobody up, since the layer is found first.
            assert_eq!(live_claims(&root).len(), 1, "{fault}");
        }

        // The dead host comes back: it uses the layer, and its leftover
        // build in tmp/ is gone.
        a.restart_plugin();
        let ca = PluginClient::new(&a.inside(Path::new("/run/docker/plugins/sharedloop.sock")));
        ca.ok("Plugin.Activate", json!(null));
        init(&a, &ca, &root, "2s");
        let _ = ca.call("GraphDriver.Remove", json!({"ID": "l0"}));
        apply_all(&ca, &tars, "n");
        assert!(
            dir_names(&root.join("tmp")).is_empty(),
            "{fault}: leftovers in tmp/: {:?}",
            dir_names(&root.join("tmp"))
        );
        assert_eq!(dir_names(&root.join("layers")).len(), 1, "{fault}");
    }
}

/// A host waits on another's claim; the root then fails (the shared
/// filesystem goes away): the waiter publishes the layer in its fallback
/// directory, as any layer whose creation in root fails.
#[test]
fn claims_a_root_that_fails_while_waiting_sends_the_layer_to_fallback() {
    require(&["busybox", "overlay"]);
    let shared = SharedDir::new("claims-fail");
    let mnt = shared.mount_ext4("netfs", 200);
    let root = mnt.join("store");
    fs::create_dir_all(&root).unwrap();
    // a dies holding the claim, which stays live-looking for 10 minutes.
    let (mut a, ca) = host("fail-a", true, &[("SHAREDLOOP_FAULT", "publish:2")]);
    let (b, cb) = host("fail-b", true, &[]);
    init(&a, &ca, &root, "600s");
    init(&b, &cb, &root, "600s");
    let tars = image(1, "fail");
    ca.ok("GraphDriver.Create", json!({"ID": "l0", "Parent": ""}));
    let _ = ca.apply_diff("l0", "", &tars[0]);
    a.reap_plugin();
    cb.ok("GraphDriver.Create", json!({"ID": "l0", "Parent": ""}));
    std::thread::scope(|s| {
        let waiter = s.spawn(|| cb.apply_diff("l0", "", &tars[0]));
        let t = Instant::now();
        while !b.plugin_log().contains("another host is building this layer; waiting for it") {
            assert!(t.elapsed() < Duration::from_secs(60), "b never waited on a's claim:\n{}", b.plugin_log());
            std::thread::sleep(Duration::from_millis(50));
        }
        run_ok(Command::new("umount").arg("-l").arg(&mnt));
        let r = waiter.join().unwrap();
        assert!(
            r.status == 200 && r.err().is_none(),
            "ApplyDiff: {}\n{}",
            String::from_utf8_lossy(&r.body),
            b.plugin_log()
        );
    });
    let fb: PathBuf = b.fallback_dir().join("layers");
    assert_eq!(dir_names(&fb).len(), 1, "the layer is in b's fallback:\n{}", b.plugin_log());
    assert!(b.plugin_log().contains("using the fallback directory"), "{}", b.plugin_log());
}
