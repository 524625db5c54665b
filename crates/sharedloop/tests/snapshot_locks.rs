//! Issue 11, item 4, in the containerd snapshotter: its lock is not held
//! across a commit's image build. With a commit held just before its
//! image is built (`SHAREDLOOP_FAULT_PAUSE`), snapshots on other keys are
//! prepared, listed and removed; a removal of the key being committed
//! waits for the commit and then finds the key gone, as when the two ran
//! one after the other. Needs root (loop devices, mounts); no timing is
//! asserted.
#![cfg(feature = "fault-injection")]

// The core's test rig (a temp dir whose mounts go with it, bounded waits).
#[path = "../../core/tests/common/mod.rs"]
mod core_rig;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use sharedloop_containerd::snapshots::{SnapKind, Snapshotter};
use sharedloop_core::Error;

use core_rig::{await_or_fail, gettid, require, waits_on_futex, LetGo, Rig};

#[test]
fn real_a_commits_image_build_holds_up_no_other_snapshot() {
    require(&[]);
    let rig = Rig::new("sl-snapshot-locks-");
    let p = rig.path();
    let sn = Snapshotter::open(rig.driver()).unwrap();
    let m = sn.prepare("k1", "", BTreeMap::new()).unwrap();
    // No parent: the mount is a bind of the writable layer's upper.
    assert_eq!(m[0].fs_type, "bind");
    fs::write(Path::new(&m[0].source).join("file"), "committed\n").unwrap();

    let hex = "c0".repeat(32);
    let name = format!("default/1/sha256:{hex}");
    let release = p.join("release-build");
    let reached = p.join("release-build.reached");
    std::env::set_var("SHAREDLOOP_FAULT_PAUSE", format!("layer-build:{hex}:{}", release.display()));
    std::thread::scope(|s| {
        let _let_go = LetGo(&release);
        let sn = &sn;
        let commit = s.spawn(|| sn.commit(&name, "k1", BTreeMap::new()));
        await_or_fail("the commit never reached its image build", || reached.exists());

        // Other keys: served while the commit is held.
        let (tx, rx) = std::sync::mpsc::channel();
        s.spawn(move || {
            let r = sn.prepare("k2", "", BTreeMap::new()).and_then(|_| {
                let listed = sn.list(&[])?.into_iter().map(|i| i.name).collect::<Vec<_>>();
                sn.remove("k2")?;
                Ok(listed)
            });
            let _ = tx.send(r);
        });
        let listed = rx.recv_timeout(std::time::Duration::from_secs(60)).expect(
            "prepare, list and remove of another key did not complete in 60 s while a commit was held: \
             the snapshotter's lock is held across the commit",
        );
        let listed = listed.unwrap();
        assert!(listed.contains(&"k1".to_owned()) && listed.contains(&"k2".to_owned()), "{listed:?}");
        assert!(!listed.contains(&name), "the commit shows before it is recorded: {listed:?}");
        assert!(!commit.is_finished() && !release.exists(), "the commit was not held meanwhile");

        // The key being committed: its removal waits for the commit.
        let (tx, rx) = std::sync::mpsc::channel();
        let remove = s.spawn(move || {
            tx.send(gettid()).unwrap();
            sn.remove("k1")
        });
        let tid = rx.recv().unwrap();
        await_or_fail("the removal of the key being committed never waited", || waits_on_futex(tid));
        assert!(!remove.is_finished());
        fs::write(&release, "").unwrap();
        commit.join().unwrap().unwrap();
        match remove.join().unwrap() {
            Err(Error::NotFound(what)) => assert!(what.contains("k1"), "{what}"),
            r => panic!("removing the committed key: {r:?}"),
        }
    });
    std::env::remove_var("SHAREDLOOP_FAULT_PAUSE");
    let c = sn.stat(&name).unwrap();
    assert_eq!(c.kind, SnapKind::Committed);
    assert!(matches!(sn.stat("k1"), Err(Error::NotFound(_))));
    let v = sn.view("v", &name, BTreeMap::new()).unwrap();
    assert_eq!(fs::read_to_string(Path::new(&v[0].source).join("file")).unwrap(), "committed\n");
    sn.remove("v").unwrap();
    sn.remove(&name).unwrap();
    sn.cleanup();
    sn.driver().cleanup().unwrap();
}
