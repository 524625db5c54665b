//! Issue 11, items 4 and 5, through the driver against the real kernel:
//! no driver lock is held across a layer's first mount (a Get of another
//! layer goes on while one is held), racing calls on one id still make one
//! mount, and a lease on a layer's directory (a Diff streaming from it)
//! keeps a Remove from unmounting it. Needs root, mkfs.ext4 and overlayfs.
//! No timing is asserted: a held step is held by `SHAREDLOOP_FAULT_PAUSE`
//! until the test lets it go, and waits are bounded only to fail a hung
//! test.

mod common;

use std::fs;

#[cfg(feature = "fault-injection")]
use common::LetGo;
use common::{await_or_fail, gettid, layer, mounts_under, require, waits_on_futex, Rig};

fn rig() -> Rig {
    require(&[]);
    Rig::new("sl-driver-locks-")
}

/// Item 4: with the first mount of layer A's image held (as a long digest
/// check of a big image on a busy file server would hold it), a Get of
/// layer B, on another image, completes; a second Get of A waits for the
/// first instead of mounting anything itself; once A is let go, both Gets
/// of A return the one overlay, with the image attached once. Before, the
/// driver's lock was held across the first mount and B's Get waited.
#[cfg(feature = "fault-injection")]
#[test]
fn real_a_get_goes_on_while_another_layers_first_mount_is_held_and_racing_gets_make_one_mount() {
    let rig = rig();
    let d = rig.driver();
    let a0 = layer(&d, "a0", None, "a0", "base of a\n");
    layer(&d, "a1", Some("a0"), "a1", "top of a\n");
    layer(&d, "b", None, "b", "b\n");
    let release = rig.path().join("release-a0");
    let reached = rig.path().join("release-a0.reached");
    std::env::set_var("SHAREDLOOP_FAULT_PAUSE", format!("layer-mount:{}:{}", &a0.as_str()[7..], release.display()));
    let merged = d.home().join("merged").join("a1");
    let (first, second) = std::thread::scope(|s| {
        let _let_go = LetGo(&release);
        let first = s.spawn(|| d.get("a1"));
        await_or_fail("the first mount of a0's image never reached its pause point", || reached.exists());
        fs::remove_file(&reached).unwrap();

        // Another layer, on another image: mounted while a0 is held.
        let (tx, rx) = std::sync::mpsc::channel();
        let dr = &d;
        s.spawn(move || {
            let _ = tx.send(dr.get("b"));
        });
        let b = rx.recv_timeout(std::time::Duration::from_secs(60)).expect(
            "Get of layer b did not complete in 60 s while a0's first mount was held: \
             the driver's lock is held across a first mount",
        );
        let b = b.unwrap();
        assert_eq!(fs::read_to_string(b.join("b")).unwrap(), "b\n");
        assert!(!first.is_finished() && !release.exists(), "a0's first mount was not held while b mounted");

        // A second Get of a1 meanwhile waits for the first.
        let (tx, rx) = std::sync::mpsc::channel();
        let second = s.spawn(move || {
            tx.send(gettid()).unwrap();
            dr.get("a1")
        });
        let tid = rx.recv().unwrap();
        await_or_fail("the second Get of a1 never blocked", || {
            assert!(!reached.exists(), "the second Get mounts a0 too, while the first is mounting it");
            waits_on_futex(tid)
        });
        assert!(!second.is_finished(), "the second Get of a1 returned while its layers were being mounted");
        fs::write(&release, "").unwrap();
        (first.join().unwrap().unwrap(), second.join().unwrap().unwrap())
    });
    std::env::remove_var("SHAREDLOOP_FAULT_PAUSE");
    assert_eq!(first, merged);
    assert_eq!(second, merged);
    assert_eq!(fs::read_to_string(merged.join("a0")).unwrap(), "base of a\n");
    assert_eq!(fs::read_to_string(merged.join("a1")).unwrap(), "top of a\n");
    assert_eq!(mounts_under(&merged).len(), 1, "a1's overlay is mounted more than once");
    let a0_dir = d.store().locate(&a0).unwrap().dir;
    let attached = sharedloop_core::sys::loopdev::list().iter().filter(|(_, b)| b.starts_with(&a0_dir)).count();
    assert_eq!(attached, 1, "a0's image is attached {attached} times");
    // Two Gets, two Puts: the overlay goes with the second.
    d.put("a1").unwrap();
    assert_eq!(mounts_under(&merged).len(), 1);
    d.put("a1").unwrap();
    assert!(mounts_under(&merged).is_empty());
    d.put("b").unwrap();
    for id in ["a1", "a0", "b"] {
        d.remove(id).unwrap();
    }
    assert_eq!(d.report().layer_mounts, 0);
    d.cleanup().unwrap();
}

/// Item 5: Diff's directory is lent (`diff_source` returns a lease). A
/// Remove of the layer while the lease is out waits for it: the
/// directory stays mounted and reads whole; the Remove ends once the
/// lease is dropped, and then unmounts the layer.
#[test]
fn real_a_remove_waits_for_a_diff_lease_and_unmounts_after_it() {
    let rig = rig();
    let d = rig.driver();
    layer(&d, "l", None, "file", "content\n");
    let lease = d.diff_source("l", None).unwrap();
    let dir = lease.path().to_owned();
    assert_eq!(fs::read_to_string(dir.join("file")).unwrap(), "content\n");
    let mount = dir.parent().unwrap().to_owned(); // <layer mount>/fs
    assert_eq!(mounts_under(&mount).len(), 1);
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::channel();
        let dr = &d;
        let remove = s.spawn(move || {
            tx.send(gettid()).unwrap();
            dr.remove("l")
        });
        let tid = rx.recv().unwrap();
        await_or_fail("the Remove never waited", || waits_on_futex(tid));
        // The reader streams the whole layer while the Remove waits.
        let mut tar = Vec::new();
        sharedloop_core::export::export_tar(lease.path(), &mut tar).unwrap();
        let names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"file".to_owned()), "{names:?}");
        assert!(!remove.is_finished(), "the Remove ended while a lease was out");
        assert!(d.exists("l"));
        assert_eq!(mounts_under(&mount).len(), 1, "the layer was unmounted under its reader");
        drop(lease);
        remove.join().unwrap().unwrap();
    });
    assert!(!d.exists("l"));
    assert!(mounts_under(&mount).is_empty(), "the layer stayed mounted after its removal");
    d.cleanup().unwrap();
}

/// Item 5: a Put, a Remove and a Get of one id are serialised on its view:
/// a Remove after the last Put finds nothing mounted and removes; one
/// with a Get outstanding is refused as before.
#[test]
fn real_remove_refuses_a_held_get_and_removes_after_the_put() {
    let rig = rig();
    let d = rig.driver();
    layer(&d, "p", None, "p", "p\n");
    layer(&d, "c", Some("p"), "c", "c\n");
    let dir = d.get("c").unwrap();
    assert_eq!(fs::read_to_string(dir.join("p")).unwrap(), "p\n");
    let e = d.remove("c").unwrap_err().to_string();
    assert!(e.contains("in use") && e.contains("Get without Put"), "{e}");
    d.put("c").unwrap();
    assert!(mounts_under(&dir).is_empty());
    d.remove("c").unwrap();
    d.remove("p").unwrap();
    assert_eq!(d.report().layer_mounts, 0);
    d.cleanup().unwrap();
}
