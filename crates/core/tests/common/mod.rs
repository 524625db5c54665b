//! The rig the core's real-kernel tests share: a temporary directory whose
//! mounts go with it, a driver opened in it, small layer tars, and waits
//! bounded only to fail a hung test (no timing is asserted with them).
//! The snapshotter's test in the sharedloop crate includes it too
//! (`#[path]`), so it uses only what both crates' tests have: the core's
//! public API, `tempfile`, `rustix` and `tar`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sharedloop_core::driver::LayerReportKind;
use sharedloop_core::ids::ChainId;
use sharedloop_core::options::Config;
use sharedloop_core::{CreateKind, Driver};

/// Fails (never skips) a test that cannot run here: not root (loop
/// devices, mounts), or without one of `tools`.
pub fn require(tools: &[&str]) {
    assert!(rustix::process::geteuid().is_root(), "this test needs root (loop devices, mounts)");
    for t in tools {
        let ok = Command::new("sh").args(["-c", &format!("command -v {t}")]).output().is_ok_and(|o| o.status.success());
        assert!(ok, "this test needs {t}; install it (scripts/install-deps does)");
    }
}

/// The mount points at or below `dir`, in the order they were mounted.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// A temp dir whose mounts (and so loop devices, which autoclear) go with
/// it, also when the test fails.
pub struct Rig {
    dir: tempfile::TempDir,
}

impl Rig {
    /// A rig in a new directory `/tmp/<prefix>*`.
    pub fn new(prefix: &str) -> Rig {
        Rig { dir: tempfile::Builder::new().prefix(prefix).tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Driver options for a store in `<rig>/root` (made here), with
    /// fallback `<rig>/fallback`, and then `extra`.
    pub fn opts(&self, extra: &[&str]) -> Vec<String> {
        let p = self.path();
        fs::create_dir_all(p.join("root")).unwrap();
        let mut v = vec![
            format!("sharedloop.loopback_root={}", p.join("root").display()),
            format!("sharedloop.loopback_fallback={}", p.join("fallback").display()),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// A driver with its home in `<rig>/home`, over the store of
    /// [`Rig::opts`].
    pub fn driver(&self) -> Driver {
        Driver::open(&self.path().join("home"), Config::from_opts(&self.opts(&[])).unwrap()).unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for m in mounts_under(self.dir.path()).iter().rev() {
            let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// A layer tar with one file `name` holding `text`.
pub fn tar_of(name: &str, text: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(text.len() as u64);
    h.set_mtime(1_700_000_000);
    b.append_data(&mut h, name, text.as_bytes()).unwrap();
    b.into_inner().unwrap()
}

/// The entry names of the tar that `export_tar` makes of `dir` (a Diff).
pub fn exported_names(dir: &Path) -> Vec<String> {
    let mut tar = Vec::new();
    sharedloop_core::export::export_tar(dir, &mut tar).unwrap();
    tar::Archive::new(&tar[..]).entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect()
}

/// Image layer `id` over `parent` with file `name` = `text`; its chain.
pub fn layer(d: &Driver, id: &str, parent: Option<&str>, name: &str, text: &str) -> ChainId {
    d.create(id, parent, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    d.apply_diff(id, parent, &mut &tar_of(name, text)[..]).unwrap();
    match d.layer_report(id).unwrap().kind {
        LayerReportKind::Image { chain: Some(c) } => c,
        k => panic!("layer {id} has no chain: {k:?}"),
    }
}

/// Waits, at most `LIVENESS` (a bound for a hung test, not a timing
/// claim), for `done`; panics with `what` when it does not come.
pub fn await_or_fail(what: &str, mut done: impl FnMut() -> bool) {
    const LIVENESS: std::time::Duration = std::time::Duration::from_secs(60);
    let t0 = std::time::Instant::now();
    while !done() {
        assert!(t0.elapsed() < LIVENESS, "{what} (waited {} s)", LIVENESS.as_secs());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The kernel thread id of the calling thread.
pub fn gettid() -> u32 {
    let link = fs::read_link("/proc/thread-self").unwrap();
    link.file_name().unwrap().to_str().unwrap().parse().unwrap()
}

/// What thread `tid` of this process is blocked in (kernel function).
pub fn wchan(tid: u32) -> String {
    fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).unwrap_or_default()
}

/// Whether thread `tid` of this process sleeps on a futex (a lock or a
/// condition variable), as a request waiting for another does.
pub fn waits_on_futex(tid: u32) -> bool {
    wchan(tid).contains("futex")
}

/// Creates file `.0` when dropped: lets a step held by
/// `SHAREDLOOP_FAULT_PAUSE` go however the test ends, so that scoped
/// threads end.
pub struct LetGo<'a>(pub &'a Path);

impl Drop for LetGo<'_> {
    fn drop(&mut self) {
        let _ = fs::write(self.0, "");
    }
}
