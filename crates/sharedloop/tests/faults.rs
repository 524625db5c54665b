//! Fault injection: for each operation, the plugin aborts (as kill -9
//! would stop it) after step N, for every N until the operation completes;
//! after each abort the plugin restarts, the reconcile runs, and the
//! invariants hold: no staging or temp build left, every published layer
//! complete, the operation can be done again, and a full cleanup leaves no
//! layer, mount or loop device.
//!
//! The binary must be built with the `fault-injection` feature
//! (`scripts/test` does: `--features sharedloop/fault-injection`); without
//! it `SHAREDLOOP_FAULT` is ignored and these tests fail, never pass vacuously.

mod common;

use std::fs;
use std::path::Path;

use common::plugin_client::PluginClient;
use common::*;
use serde_json::json;

/// Fails (never skips) when this build ignores `SHAREDLOOP_FAULT`.
#[cfg(not(feature = "fault-injection"))]
fn require_fault_injection() {
    panic!(
        "tests/faults.rs needs the fault-injection feature: cargo test -p sharedloop --features fault-injection (scripts/test passes it)"
    );
}
#[cfg(feature = "fault-injection")]
fn require_fault_injection() {}

struct Rig {
    host: Host,
    tar: Vec<u8>,
}

impl Rig {
    fn client(&self) -> PluginClient {
        PluginClient::new(&self.host.inside(Path::new("/run/docker/plugins/sharedloop.sock")))
    }
    fn home(&self) -> std::path::PathBuf {
        self.host.dir.join("home")
    }
    fn restart(&mut self, fault: Option<&str>) {
        self.host.kill_plugin();
        match fault {
            Some(f) => {
                require_fault_injection();
                self.host.start_plugin_env(&[("SHAREDLOOP_FAULT", f)])
            }
            None => self.host.start_plugin(),
        }
    }
    fn check_invariants(&self, what: &str) {
        store_invariants(&self.home(), &self.host.root_dir(), what);
    }
    /// Brings the plugin to a known state: layer `l1` applied, nothing else.
    fn base(&self) {
        let c = self.client();
        for id in ["rw1", "l1"] {
            c.ok("GraphDriver.Remove", json!({"ID": id}));
        }
        c.ok("GraphDriver.Create", json!({"ID": "l1"}));
        let r = c.apply_diff("l1", "", &self.tar);
        assert!(!r.aborted() && r.err().is_none(), "{:?}", r.err());
    }
    fn cleanup_and_check(&self, what: &str) {
        let c = self.client();
        c.ok("GraphDriver.Put", json!({"ID": "rw1"}));
        for id in ["rw1", "l1"] {
            c.ok("GraphDriver.Remove", json!({"ID": id}));
        }
        c.ok("GraphDriver.Cleanup", json!({}));
        assert_no_loops(&self.host.dir);
        let layers = fs::read_dir(self.host.root_dir().join("layers")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(layers, 0, "{what}: layers left after removing everything");
        let home = self.home();
        let mounts = self.host.mounts_under(&home);
        assert!(mounts.is_empty(), "{what}: mounts left after Cleanup: {mounts:?}");
        let layer_mounts = self.host.mounts_under(Path::new(LAYER_MOUNTS));
        assert!(layer_mounts.is_empty(), "{what}: layer mounts left: {layer_mounts:?}");
        let rw: Vec<_> = fs::read_dir(home.join("rw")).unwrap().flatten().map(|e| e.path()).collect();
        assert!(rw.is_empty(), "{what}: writable images left: {rw:?}");
    }
}

/// After a restart: no staging (in `home`) or build (in `root`) left, and
/// every published layer complete.
fn store_invariants(home: &Path, root: &Path, what: &str) {
    let staging: Vec<_> = fs::read_dir(home.join("tmp")).unwrap().flatten().map(|e| e.path()).collect();
    assert!(staging.is_empty(), "{what}: staging left: {staging:?}");
    let tmp: Vec<_> =
        fs::read_dir(root.join("tmp")).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(tmp.is_empty(), "{what}: builds left in root: {tmp:?}");
    for d in
        fs::read_dir(root.join("layers")).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>()).unwrap_or_default()
    {
        let meta: serde_json::Value = serde_json::from_slice(
            &fs::read(d.join("meta.json")).unwrap_or_else(|e| panic!("{what}: {} without meta ({e})", d.display())),
        )
        .unwrap();
        if let Some(fs_type) = meta["fs"].as_str() {
            let len =
                fs::metadata(d.join("layer.img")).unwrap_or_else(|e| panic!("{what}: {fs_type} image: {e}")).len();
            assert_eq!(len, meta["image_bytes"].as_u64().unwrap(), "{what}: {} incomplete", d.display());
        }
    }
}

/// Runs `op` with a fault at every step in turn; returns how many steps it has.
fn every_step(
    rig: &mut Rig,
    fault_op: &str,
    setup: &dyn Fn(&Rig),
    op: &dyn Fn(&Rig) -> bool,
    redo: &dyn Fn(&Rig),
) -> u32 {
    for n in 1..50 {
        let what = format!("{fault_op}:{n}");
        rig.restart(None);
        setup(rig);
        rig.restart(Some(&what));
        let aborted = op(rig);
        if aborted {
            rig.host.reap_plugin();
        }
        rig.restart(None);
        rig.check_invariants(&what);
        if aborted {
            assert!(
                rig.host.plugin_log().contains(&format!("aborting in {fault_op} at step {n}")),
                "{what}: aborted elsewhere"
            );
            redo(rig);
        }
        rig.cleanup_and_check(&what);
        if !aborted {
            return n - 1;
        }
    }
    panic!("{fault_op}: never completed");
}

#[test]
fn faults_at_every_step_leave_a_repairable_state() {
    require(&["ext4", "overlay"]);
    let mut host = Host::new("faults");
    fs::create_dir_all(host.root_dir()).unwrap();
    host.start_plugin();
    let c = PluginClient::new(&host.inside(Path::new("/run/docker/plugins/sharedloop.sock")));
    c.ok("GraphDriver.Init", json!({"Home": host.dir.join("home"), "Opts": host.default_storage_opts()}));
    let tar = layer_tar(&LayerSpec {
        files: vec![
            ("data/a".into(), vec![b'a'; 200_000], 0o644, 0, 0),
            ("data/b".into(), b"b".to_vec(), 0o4755, 0, 0),
        ],
        whiteouts: vec!["gone".into()],
        ..Default::default()
    });
    let mut rig = Rig { host, tar };

    let nothing = |_: &Rig| {};
    let apply = |r: &Rig| {
        let c = r.client();
        c.ok("GraphDriver.Create", json!({"ID": "l1"}));
        r.client().apply_diff("l1", "", &r.tar).aborted()
    };
    // After a crash inside ApplyDiff the engine removes the layer and applies again.
    let reapply = |r: &Rig| {
        let c = r.client();
        c.ok("GraphDriver.Remove", json!({"ID": "l1"}));
        c.ok("GraphDriver.Create", json!({"ID": "l1"}));
        let rep = c.apply_diff("l1", "", &r.tar);
        assert!(rep.err().is_none(), "{:?}", rep.err());
        let dir = c.ok("GraphDriver.Get", json!({"ID": "l1"}))["Dir"].as_str().unwrap().to_owned();
        assert_eq!(fs::read(r.host.inside(Path::new(&dir)).join("data/a")).unwrap().len(), 200_000);
        c.ok("GraphDriver.Put", json!({"ID": "l1"}));
    };
    let create =
        |r: &Rig| r.client().call("GraphDriver.CreateReadWrite", json!({"ID": "rw1", "Parent": "l1"})).aborted();
    let recreate = |r: &Rig| {
        let c = r.client();
        c.ok("GraphDriver.Remove", json!({"ID": "rw1"}));
        c.ok("GraphDriver.CreateReadWrite", json!({"ID": "rw1", "Parent": "l1"}));
    };
    let with_rw = |r: &Rig| {
        r.base();
        r.client().ok("GraphDriver.CreateReadWrite", json!({"ID": "rw1", "Parent": "l1"}));
    };
    let get = |r: &Rig| r.client().call("GraphDriver.Get", json!({"ID": "rw1"})).aborted();
    let reget = |r: &Rig| {
        let c = r.client();
        let dir = c.ok("GraphDriver.Get", json!({"ID": "rw1"}))["Dir"].as_str().unwrap().to_owned();
        let d = r.host.inside(Path::new(&dir));
        fs::write(d.join("written"), b"w").unwrap();
        assert_eq!(fs::read(d.join("data/a")).unwrap().len(), 200_000);
    };
    let remove = |r: &Rig| r.client().call("GraphDriver.Remove", json!({"ID": "l1"})).aborted();
    let reremove = |r: &Rig| {
        r.client().ok("GraphDriver.Remove", json!({"ID": "l1"}));
    };

    let steps = [
        ("apply", every_step(&mut rig, "apply", &nothing, &apply, &reapply)),
        ("publish", every_step(&mut rig, "publish", &nothing, &apply, &reapply)),
        ("create", every_step(&mut rig, "create", &|r: &Rig| r.base(), &create, &recreate)),
        ("get", every_step(&mut rig, "get", &with_rw, &get, &reget)),
        ("remove", every_step(&mut rig, "remove", &|r: &Rig| r.base(), &remove, &reremove)),
    ];
    for (op, n) in steps {
        assert!(n >= 2, "{op}: only {n} fault points were reached");
        eprintln!("{op}: aborted at each of {n} steps, recovered every time");
    }
}

// ---------------------------------------------------------------------------
// The containerd front end: the same, through the snapshots API.

use common::snap_client::{mount_all, unmount, SnapClient};

struct CtrRig {
    host: Host,
}

impl CtrRig {
    fn client(&self) -> SnapClient {
        SnapClient::connect(&self.host.inside(Path::new(SNAPSHOTTER_SOCKET)))
    }
    fn restart(&mut self, fault: Option<&str>) {
        self.host.kill_plugin();
        let root = self.host.root_dir();
        let args = self.host.snapshotter_args(&root, false);
        if fault.is_some() {
            require_fault_injection();
        }
        let env: Vec<(&str, &str)> = fault.map(|f| vec![("SHAREDLOOP_FAULT", f)]).unwrap_or_default();
        self.host.start_serve(&args, &env);
    }
    fn home(&self) -> std::path::PathBuf {
        self.host.snapshotter_root()
    }
    /// Everything removed: no snapshot, layer, writable image, mount or loop device.
    fn clean(&self, what: &str) {
        let mut c = self.client();
        let mut names: Vec<(String, String)> = c.list(&[]).unwrap().into_iter().map(|i| (i.name, i.parent)).collect();
        while !names.is_empty() {
            let parents: Vec<String> = names.iter().map(|(_, p)| p.clone()).collect();
            for (n, _) in names.iter().filter(|(n, _)| !parents.contains(n)) {
                c.remove(n).unwrap();
            }
            names = c.list(&[]).unwrap().into_iter().map(|i| (i.name, i.parent)).collect();
        }
        c.cleanup().unwrap();
        let layers = fs::read_dir(self.host.root_dir().join("layers")).map(|d| d.count()).unwrap_or(0);
        assert_eq!(layers, 0, "{what}: layers left in the store after removing every snapshot");
        let refs: Vec<_> = fs::read_dir(self.host.root_dir().join("refs"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(refs.is_empty(), "{what}: references left: {refs:?}");
        let home = self.home();
        for area in ["rwmnt", "merged", "tmp/"] {
            let m = self.host.mounts_under(&home.join(area));
            assert!(m.is_empty(), "{what}: mounts left in {area}: {m:?}");
        }
        assert!(self.host.mounts_under(Path::new(LAYER_MOUNTS)).is_empty(), "{what}: layer mounts left");
        let rw: Vec<_> = fs::read_dir(home.join("rw")).unwrap().flatten().map(|e| e.path()).collect();
        assert!(rw.is_empty(), "{what}: writable images left: {rw:?}");
        assert_no_loops(&self.host.dir);
    }
    fn check_invariants(&self, what: &str) {
        store_invariants(&self.home(), &self.host.root_dir(), what);
        // Every snapshot the snapshotter lists is usable.
        let mut c = self.client();
        for i in c.list(&[]).unwrap() {
            if i.kind != 3 {
                assert_eq!(c.mounts(&i.name).unwrap().len(), 1, "{what}: {} has no mounts", i.name);
            }
        }
    }
}

/// `base` (committed, one file) and `work` (active over it, one file written).
fn ctr_setup(r: &CtrRig) {
    let mut c = r.client();
    let m = c.prepare("base-a", "", Default::default()).unwrap();
    let d = r.host.dir.join("mnt-base");
    let din = mount_all(&r.host, &m, &d);
    fs::write(din.join("base-file"), vec![b'b'; 100_000]).unwrap();
    unmount(&r.host, &d);
    c.commit("base", "base-a", Default::default()).unwrap();
    let m = c.prepare("work", "base", Default::default()).unwrap();
    let d = r.host.dir.join("mnt-work");
    let din = mount_all(&r.host, &m, &d);
    fs::write(din.join("work-file"), "work\n").unwrap();
    unmount(&r.host, &d);
}

/// The view of committed `name` shows both files.
fn ctr_check_committed(r: &CtrRig, name: &str) {
    let mut c = r.client();
    let m = c.view("check", name).unwrap();
    let d = r.host.dir.join("mnt-check");
    let din = mount_all(&r.host, &m, &d);
    assert_eq!(fs::read_to_string(din.join("work-file")).unwrap(), "work\n");
    assert_eq!(fs::read(din.join("base-file")).unwrap().len(), 100_000);
    unmount(&r.host, &d);
    c.remove("check").unwrap();
}

fn ctr_every_step(
    r: &mut CtrRig,
    fault_op: &str,
    setup: &dyn Fn(&CtrRig),
    op: &dyn Fn(&CtrRig),
    redo: &dyn Fn(&CtrRig),
) -> u32 {
    for n in 1..50 {
        let what = format!("containerd {fault_op}:{n}");
        r.restart(None);
        setup(r);
        r.restart(Some(&what[11..]));
        let before = r.host.plugin_log().len();
        op(r);
        let aborted = r.host.plugin_log()[before..].contains(&format!("aborting in {fault_op} at step {n} "));
        if aborted {
            r.host.reap_plugin();
        }
        r.restart(None);
        r.check_invariants(&what);
        redo(r);
        r.clean(&what);
        if !aborted {
            return n - 1;
        }
    }
    panic!("{fault_op}: never completed");
}

#[test]
fn faults_at_every_step_of_the_snapshotter_leave_a_repairable_state() {
    require(&["ext4", "overlay"]);
    let mut host = Host::new("faults-ctr");
    let root = host.root_dir();
    host.start_snapshotter(&root);
    let mut rig = CtrRig { host };

    let commit = |r: &CtrRig| {
        let _ = r.client().commit("done", "work", Default::default());
    };
    // Rolled back (work still active) or finished (done committed).
    let recommit = |r: &CtrRig| {
        let mut c = r.client();
        match c.stat("done") {
            Ok(i) => {
                assert_eq!(i.kind, 3);
                assert!(c.stat("work").is_err(), "committed and still active");
            }
            Err(_) => c.commit("done", "work", Default::default()).unwrap(),
        }
        ctr_check_committed(r, "done");
    };
    let prepare = |r: &CtrRig| {
        let _ = r.client().prepare("new", "base", Default::default());
    };
    let reprepare = |r: &CtrRig| {
        let mut c = r.client();
        if c.stat("new").is_err() {
            c.prepare("new", "base", Default::default()).unwrap();
        }
        let m = c.mounts("new").unwrap();
        let d = r.host.dir.join("mnt-new");
        let din = mount_all(&r.host, &m, &d);
        assert_eq!(fs::read(din.join("base-file")).unwrap().len(), 100_000);
        unmount(&r.host, &d);
    };
    let remove = |r: &CtrRig| {
        let mut c = r.client();
        let _ = c.remove("work");
        let _ = c.remove("base");
    };
    let reremove = |r: &CtrRig| {
        let mut c = r.client();
        for k in ["work", "base"] {
            if c.stat(k).is_ok() {
                c.remove(k).unwrap();
            }
        }
    };
    let steps = [
        ("snapshot/commit", ctr_every_step(&mut rig, "snapshot", &ctr_setup, &commit, &recommit)),
        ("commit", ctr_every_step(&mut rig, "commit", &ctr_setup, &commit, &recommit)),
        ("publish", ctr_every_step(&mut rig, "publish", &ctr_setup, &commit, &recommit)),
        ("snapshot/prepare", ctr_every_step(&mut rig, "snapshot", &ctr_setup, &prepare, &reprepare)),
        ("create", ctr_every_step(&mut rig, "create", &ctr_setup, &prepare, &reprepare)),
        ("remove", ctr_every_step(&mut rig, "remove", &ctr_setup, &remove, &reremove)),
    ];
    for (op, n) in steps {
        assert!(n >= 1, "{op}: no fault point was reached");
        eprintln!("containerd {op}: aborted at each of {n} steps, recovered every time");
    }
}
