//! The store's file helpers: crash-atomic writes, directory fsyncs, and
//! never following a symlink below a base directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use rustix::io::Errno;

use crate::error::{Context, Result};
use crate::ids::random_token;

/// Whether an error on root means "use the fallback" (the spec's not
/// found, permission denied, read-only; plus a root that went away or
/// filled up under us).
pub fn is_fallback_errno(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT
            | Errno::ACCESS
            | Errno::PERM
            | Errno::ROFS
            | Errno::IO
            | Errno::STALE
            | Errno::NOTCONN
            | Errno::NOSPC
            | Errno::DQUOT
    )
}

/// Fails with ELOOP when `path` or a directory between `base` and it is a
/// symlink. Names that do not exist (yet) are fine.
pub fn no_links(base: &Path, path: &Path) -> io::Result<()> {
    let Ok(rel) = path.strip_prefix(base) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not below {}", path.display(), base.display()),
        ));
    };
    let mut p = base.to_path_buf();
    for c in rel.components() {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                tracing::warn!(path = %p.display(), "a symlink in the store; not followed");
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes a temporary tree, logging (not failing) when it cannot; `gc`
/// sweeps what is left.
pub fn remove_tree(p: &Path) {
    match fs::remove_dir_all(p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot remove a temporary directory"),
    }
}

/// Writes `data` to `path` crash-atomically: temp file, fsync, rename,
/// fsync the directory. A state file is never rewritten in place. The
/// file is root's alone (0600, see [`crate::perms`]): local state. Files
/// that other hosts read go through [`write_atomic_shared`].
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, crate::perms::PRIVATE_FILE)
}

/// [`write_atomic`] for a file of the shared store, which other hosts
/// read: 0644.
pub fn write_atomic_shared(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o644)
}

fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().expect("file has a parent");
    let tmp = dir.join(format!(".{}.{}", path.file_name().unwrap().to_string_lossy(), random_token()));
    let r = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).ctx("create", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        fs::rename(&tmp, path).ctx("rename", path)?;
        fsync_dir(dir)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).ctx("open", dir)?.sync_all().ctx("fsync", dir)
}
