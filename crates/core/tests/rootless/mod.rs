//! Runs the rest of a rootless-tier test binary again as `nobody`, so that
//! a run as root (`./scripts/test`, CI) shows every run that the tier
//! needs no privilege. Included by path from each rootless test file.

/// When run as root: runs this test binary's tests but `me` as uid and gid
/// 65534 with no supplementary groups (`setpriv`), in a temp dir of
/// theirs, and checks that every one of them, at least `at_least`, passed.
/// Run as another user the tier is already rootless: nothing more to show.
pub fn run_the_others_as_nobody(me: &str, at_least: usize) {
    if !rustix::process::geteuid().is_root() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let listed = std::process::Command::new(&exe).args(["--list", "--skip", me]).output().unwrap();
    let want = String::from_utf8_lossy(&listed.stdout).lines().filter(|l| l.ends_with(": test")).count();
    assert!(want >= at_least, "only {want} tests listed, expected at least {at_least}");
    // In /tmp, and with a copy of the test binary: the checkout may sit
    // where `nobody` cannot reach (under /root).
    let tmp = tempfile::Builder::new().prefix("sl-nobody-").tempdir_in("/tmp").unwrap();
    let bin = tmp.path().join("tests");
    std::fs::copy(&exe, &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    rustix::fs::chown(&work, Some(rustix::process::Uid::from_raw(65534)), None).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .current_dir(&work)
        .args(["--skip", me, "--test-threads=2"])
        .env("TMPDIR", &work)
        .env("HOME", &work)
        .output()
        .expect("setpriv (util-linux) runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the tier failed as nobody:\n{text}");
    let summary = format!("test result: ok. {want} passed; 0 failed");
    assert!(text.contains(&summary), "expected '{summary}' as nobody:\n{text}");
}
