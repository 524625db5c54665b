//! Issue 10, item 14: a size beyond what a file can hold is refused naming
//! the option and the limit, at the driver (the per-layer `size` storage
//! option of Create, as `docker run --storage-opt size=` sends it) and in
//! the driver options. Needs root (the driver's home is a private mount).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use sharedloop_core::options::Config;
use sharedloop_core::{CreateKind, Driver};

/// A temp dir whose mounts go with it, also when the test fails.
struct Rig {
    dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounts: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(PathBuf::from)
            .filter(|p| p.starts_with(self.dir.path()))
            .collect();
        for m in mounts.iter().rev() {
            let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

fn opts(dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("sharedloop.loopback_root={}", dir.join("root").display()),
        format!("sharedloop.loopback_fallback={}", dir.join("fallback").display()),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn real_a_size_beyond_a_file_is_refused_naming_the_option_and_the_limit() {
    assert!(rustix::process::geteuid().is_root(), "this test needs root (the driver's home is a private mount)");
    let rig = Rig { dir: tempfile::Builder::new().prefix("sl-size-").tempdir().unwrap() };
    let dir = rig.dir.path();
    fs::create_dir_all(dir.join("root")).unwrap();

    let e = Config::from_opts(&opts(dir, &["sharedloop.size=9999999T"])).unwrap_err().to_string();
    assert!(e.contains("sharedloop.size") && e.contains("9999999T") && e.contains("8.0 EiB"), "{e}");

    let d = Driver::open(&dir.join("home"), Config::from_opts(&opts(dir, &[])).unwrap()).unwrap();
    let big = HashMap::from([("size".to_owned(), "9999999T".to_owned())]);
    let e = d.create("c1", None, CreateKind::ReadWrite, &big).unwrap_err().to_string();
    assert!(!e.contains("integral type"), "{e}");
    assert!(e.contains("option size") && e.contains("9999999T") && e.contains("8.0 EiB"), "{e}");
    assert!(!d.exists("c1"), "a refused layer was created");
    // A size a file can have still works.
    let ok = HashMap::from([("size".to_owned(), "64M".to_owned())]);
    d.create("c2", None, CreateKind::ReadWrite, &ok).unwrap();
    d.remove("c2").unwrap();
    d.cleanup().unwrap();
}
