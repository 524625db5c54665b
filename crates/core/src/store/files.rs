//! File helpers for local state (below the driver's home, not the shared
//! store, which goes through [`super::Dir`]): crash-atomic writes and
//! directory fsyncs.

use std::fs::{self, File};
use std::io::Write;
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

/// Writes `data` to `path` crash-atomically: temp file, fsync, rename,
/// fsync the directory. A state file is never rewritten in place. The
/// file is root's alone (0600, see [`crate::perms`]): local state. Files
/// of the shared store, which other hosts read, go through
/// `Dir::write_atomic`.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mode = crate::perms::PRIVATE_FILE;
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
