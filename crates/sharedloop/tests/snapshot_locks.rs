//! Issue 11, item 4, in the containerd snapshotter: its lock is not held
//! across a commit's image build. With a commit held just before its
//! image is built (`SHAREDLOOP_FAULT_PAUSE`), snapshots on other keys are
//! prepared, listed and removed; a removal of the key being committed
//! waits for the commit and then finds the key gone, as when the two ran
//! one after the other. Needs root (loop devices, mounts); no timing is
//! asserted.
#![cfg(feature = "fault-injection")]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use sharedloop_containerd::snapshots::{SnapKind, Snapshotter};
use sharedloop_core::options::Config;
use sharedloop_core::{Driver, Error};

struct Rig {
    dir: tempfile::TempDir,
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

impl Drop for Rig {
    fn drop(&mut self) {
        for m in mounts_under(self.dir.path()).iter().rev() {
            let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn gettid() -> u32 {
    let link = fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

fn await_or_fail(what: &str, mut done: impl FnMut() -> bool) {
    const LIVENESS: std::time::Duration = std::time::Duration::from_secs(60);
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(t0.elapsed() < LIVENESS, "{what} (waited {} s)", LIVENESS.as_secs());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

struct LetGo<'a>(&'a Path);
impl Drop for LetGo<'_> {
    fn drop(&mut self) {
        let _ = fs::write(self.0, "");
    }
}

#[test]
fn real_a_commits_image_build_holds_up_no_other_snapshot() {
    assert!(rustix::process::geteuid().is_root(), "this test needs root (loop devices, mounts)");
    let rig = Rig { dir: tempfile::Builder::new().prefix("sl-snapshot-locks-").tempdir().unwrap() };
    let p = rig.dir.path();
    fs::create_dir_all(p.join("root")).unwrap();
    let opts = [
        format!("sharedloop.loopback_root={}", p.join("root").display()),
        format!("sharedloop.loopback_fallback={}", p.join("fallback").display()),
    ];
    let d = Driver::open(&p.join("home"), Config::from_opts(&opts).unwrap()).unwrap();
    let sn = Snapshotter::open(d).unwrap();
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
        await_or_fail("the removal of the key being committed never waited", || {
            fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default().contains("futex")
        });
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
