//! Mount checks ask the kernel about the path, so a mount that mountinfo
//! lists but a later mount on a parent covers does not count (issue 10,
//! item 16: a host's `/run/sharedloop/layers` under a namespace's own tmpfs
//! on `/run` made `make_private` fail with EINVAL).
//!
//! Needs root (it mounts). The test runs itself again inside a new mount
//! namespace (`unshare -m`), so every mount it makes goes with that process,
//! also when an assertion fails.

use std::fs;
use std::path::Path;
use std::process::Command;

use rustix::mount::{mount, mount_bind, MountFlags};
use sharedloop_core::mount::{is_mountpoint, make_private, mountinfo, mounts_under};

const INNER: &str = "SHAREDLOOP_SHADOW_TEST_DIR";

fn tmpfs(at: &Path) {
    mount("tmpfs", at, "tmpfs", MountFlags::empty(), c"size=1m").unwrap_or_else(|e| panic!("mount tmpfs {at:?}: {e}"));
}

/// Runs in the private namespace: sets up a shadowed mount and checks.
fn inner(base: &Path) {
    let parent = base.join("parent");
    let target = parent.join("layers");
    let layer = target.join("sha256-0123");
    fs::create_dir_all(&target).unwrap();
    // As a sharedloop on the host leaves it: the directory bound onto
    // itself, a layer mounted inside.
    mount_bind(&target, &target).unwrap();
    fs::create_dir_all(&layer).unwrap();
    tmpfs(&layer);
    assert!(is_mountpoint(&target));
    assert!(is_mountpoint(&layer));
    assert_eq!(mounts_under(&target).unwrap().len(), 2);
    // A new filesystem on the parent (a namespace's own /run) covers both.
    tmpfs(&parent);
    fs::create_dir_all(&target).unwrap();
    let listed = mountinfo().unwrap().into_iter().filter(|m| m.mount_point.starts_with(&target)).count();
    assert_eq!(listed, 2, "mountinfo still lists the covered mounts (the situation of the bug)");
    assert!(!is_mountpoint(&target), "a covered mount is not what the path names");
    assert!(mounts_under(&target).unwrap().is_empty(), "covered mounts are not visible: {:?}", mounts_under(&target));
    make_private(&target).expect("make_private on a path whose old mount is covered");
    assert!(is_mountpoint(&target));
    let seen = mounts_under(&target).unwrap();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].mount_point, target);
    // A second call finds the bind it made.
    make_private(&target).unwrap();
    assert_eq!(mounts_under(&target).unwrap().len(), 1);
}

#[test]
fn real_make_private_ignores_mounts_covered_by_a_later_mount() {
    if let Some(dir) = std::env::var_os(INNER) {
        inner(Path::new(&dir));
        return;
    }
    assert!(rustix::process::geteuid().is_root(), "this test needs root: it mounts filesystems");
    let t = tempfile::tempdir().unwrap();
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "--"])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "real_make_private_ignores_mounts_covered_by_a_later_mount", "--nocapture"])
        .env(INNER, t.path())
        .output()
        .expect("unshare (util-linux)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the check in a private mount namespace failed:\n{text}");
    assert!(text.contains("1 passed"), "the inner run did not run the test:\n{text}");
}
