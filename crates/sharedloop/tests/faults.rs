//! Fault injection: for each operation, the plugin aborts (as kill -9
//! would stop it) after step N, for every N until the operation completes;
//! after each abort the plugin restarts, the reconcile runs, and the
//! invariants hold: no staging or temp build left, every published layer
//! complete, the operation can be done again, and a full cleanup leaves no
//! layer, mount or loop device.

mod common;

use std::fs;
use std::path::Path;

use common::plugin_client::PluginClient;
use common::*;
use serde_json::json;

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
            Some(f) => self.host.start_plugin_env(&[("SHAREDLOOP_FAULT", f)]),
            None => self.host.start_plugin(),
        }
    }
    fn check_invariants(&self, what: &str) {
        let staging: Vec<_> = fs::read_dir(self.home().join("tmp")).unwrap().flatten().map(|e| e.path()).collect();
        assert!(staging.is_empty(), "{what}: staging left: {staging:?}");
        let tmp: Vec<_> = fs::read_dir(self.host.root_dir().join("tmp"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(tmp.is_empty(), "{what}: builds left in root: {tmp:?}");
        for d in fs::read_dir(self.host.root_dir().join("layers"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default()
        {
            let meta: serde_json::Value = serde_json::from_slice(
                &fs::read(d.join("meta.json")).unwrap_or_else(|e| panic!("{what}: {} without meta ({e})", d.display())),
            )
            .unwrap();
            let len = fs::metadata(d.join("layer.img")).unwrap().len();
            assert_eq!(len, meta["image_bytes"].as_u64().unwrap(), "{what}: {} incomplete", d.display());
        }
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
        assert_eq!(mounts, vec![home.join("tmp").display().to_string()], "{what}: mounts left");
        let layer_mounts = self.host.mounts_under(Path::new(LAYER_MOUNTS));
        assert!(layer_mounts.is_empty(), "{what}: layer mounts left: {layer_mounts:?}");
        let rw: Vec<_> = fs::read_dir(home.join("rw")).unwrap().flatten().map(|e| e.path()).collect();
        assert!(rw.is_empty(), "{what}: writable images left: {rw:?}");
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
