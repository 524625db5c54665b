//! Modes of what sharedloop keeps on the local host.
//!
//! A writable layer's image holds a running container's files in the
//! clear, its mount shows them, and the layer mounts and overlay stacks
//! show every image's files: on a multi-user host none of that is for
//! other users. The local state (the engines' homes, the run directory)
//! is therefore root's alone, like containerd's own snapshotter directory
//! (0700): directories 0700, files written there 0600. dockerd, containerd
//! and runc run as root and reach them anyway; the overlay mounts they are
//! handed do not depend on the modes of the directories above them.
//!
//! The shared store (loopback root and fallback) is not covered: other
//! hosts read it, and it holds only published read-only layers, never a
//! container's writable layer.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::error::{Context, Result};

/// Mode of sharedloop's local directories.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of sharedloop's local files (writable images, state records).
pub const PRIVATE_FILE: u32 = 0o600;

/// Creates `dir` (and missing parents) and makes it root's alone. An
/// existing directory is narrowed too, so an upgrade fixes old installs.
pub fn private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).ctx("mkdir", dir)?;
    restrict(dir, PRIVATE_DIR)
}

/// Takes group and other permission bits off `path` (never adds any).
pub fn restrict(path: &Path, mode: u32) -> Result<()> {
    let md = fs::symlink_metadata(path).ctx("stat", path)?;
    let cur = md.permissions().mode() & 0o7777;
    if md.file_type().is_symlink() || cur & !mode == 0 {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(cur & mode)).ctx("chmod", path)
}

/// Narrows the files an older sharedloop created world-readable in an
/// engine home: writable layer images, image templates, the scratch
/// image. Logs what it changed.
pub fn restrict_old_files(home: &Path) {
    let mut files = vec![home.join("scratch.img"), home.join("host-id")];
    for sub in ["rw", "templates", "layers", "snapshots"] {
        let Ok(rd) = fs::read_dir(home.join(sub)) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if sub == "rw" {
                files.push(p.join("rw.img"));
            } else {
                files.push(p);
            }
        }
    }
    let mut changed = 0usize;
    for f in files {
        let Ok(md) = fs::symlink_metadata(&f) else { continue };
        if !md.file_type().is_file() || md.permissions().mode() & 0o077 == 0 {
            continue;
        }
        match restrict(&f, PRIVATE_FILE) {
            Ok(()) => changed += 1,
            Err(e) => tracing::warn!(path = %f.display(), error = %e, "cannot make a local file root-only"),
        }
    }
    if changed > 0 {
        tracing::info!(home = %home.display(), files = changed, "made files of an older install root-only (0600)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn directories_and_old_files_become_root_only() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("home");
        fs::create_dir_all(home.join("rw/c1")).unwrap();
        fs::create_dir_all(home.join("templates")).unwrap();
        for f in ["rw/c1/rw.img", "templates/ext4-1.img", "scratch.img"] {
            fs::write(home.join(f), b"x").unwrap();
            fs::set_permissions(home.join(f), fs::Permissions::from_mode(0o644)).unwrap();
        }
        fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&home).unwrap();
        private_dir(&home.join("new/sub")).unwrap();
        assert_eq!(mode(&home), 0o700);
        assert_eq!(mode(&home.join("new/sub")), 0o700);
        restrict_old_files(&home);
        for f in ["rw/c1/rw.img", "templates/ext4-1.img", "scratch.img"] {
            assert_eq!(mode(&home.join(f)), 0o600, "{f}");
        }
        // Narrowing never widens.
        fs::set_permissions(home.join("scratch.img"), fs::Permissions::from_mode(0o400)).unwrap();
        restrict(&home.join("scratch.img"), PRIVATE_FILE).unwrap();
        assert_eq!(mode(&home.join("scratch.img")), 0o400);
    }
}
