//! Applying a layer tar to a staging directory.
//!
//! The stream is hashed as it is read (the digest is the layer's diff id).
//! OCI/AUFS whiteouts become overlayfs whiteouts: `.wh.NAME` a 0:0
//! character device `NAME`, `.wh..wh..opq` the `trusted.overlay.opaque=y`
//! xattr on its directory. Nothing is ever written outside `dest`: names
//! with `..` or a leading `/` are refused, and every parent directory is
//! opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so a tar
//! cannot write through a symlink (or a hardlink to outside) it placed
//! earlier.
//!
//! The stream, its digest and the spool are here; one entry's extraction
//! (whiteouts, links, devices, sparse data, metadata) is in `entry`.

mod entry;
pub mod stream;

use std::fs::{self, File};
use std::io::{self, Read, Write as _};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use sha2::{Digest as _, Sha256};

use crate::error::{Context, Error, Result};
use crate::ids::{Bytes, DiffId};
use entry::{apply_entry, set_meta, DirMeta};

pub const WHITEOUT_PREFIX: &str = ".wh.";
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What applying a tar produced.
#[derive(Debug, Clone, Default)]
pub struct ApplyStats {
    pub diff_id: Option<DiffId>,
    /// Bytes of the tar stream, padding included.
    pub tar_bytes: u64,
    /// Bytes of regular file content (hardlinks counted once).
    pub content_bytes: u64,
    /// Entries created (files, dirs, links, whiteouts, ...).
    pub entries: u64,
}

pub(crate) struct HashingReader<R> {
    pub(crate) inner: R,
    pub(crate) hash: Sha256,
    pub(crate) count: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

fn bad(entry: &Path, reason: impl Into<String>) -> Error {
    Error::BadTar { entry: entry.display().to_string(), reason: reason.into() }
}

/// Turns a tar name into a relative path of normal components. `None` for
/// the root itself (`./`).
pub fn clean_name(raw: &Path) -> Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad(raw, "name contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(bad(raw, "absolute name")),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Applies the tar read from `reader` into the (existing, empty) `dest`.
/// The whole stream is consumed and hashed.
pub fn apply_tar<R: Read>(reader: R, dest: &Path) -> Result<ApplyStats> {
    apply_tar_limited(reader, dest, None)
}

/// [`apply_tar`], refusing a layer whose regular files add up to more than
/// `max_content` bytes of apparent size (`sharedloop.max_layer_size`; holes
/// of sparse files count). The entry that would cross the limit is refused
/// before its data is written.
pub fn apply_tar_limited<R: Read>(reader: R, dest: &Path, max_content: Option<Bytes>) -> Result<ApplyStats> {
    let started = std::time::Instant::now();
    let root: OwnedFd = File::open(dest).ctx("open", dest)?.into();
    let mut hr = HashingReader { inner: reader, hash: Sha256::new(), count: 0 };
    let mut stats = ApplyStats::default();
    let mut dirs: Vec<DirMeta> = Vec::new();
    {
        let mut ar = tar::Archive::new(&mut hr);
        let entries = ar.entries().map_err(|e| bad(Path::new(""), format!("not a tar stream: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(Path::new("?"), format!("unreadable entry: {e}")))?;
            let raw = entry.path().map_err(|e| bad(Path::new("?"), format!("bad name: {e}")))?.into_owned();
            let data_entry = matches!(
                entry.header().entry_type(),
                tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
            );
            if let Some(max) =
                max_content.filter(|m| data_entry && stats.content_bytes.saturating_add(entry.size()) > m.0)
            {
                return Err(bad(
                    &raw,
                    format!(
                        "the layer's files add up to more than sharedloop.max_layer_size={max} \
                         ({} bytes; this entry declares {} bytes, sparse holes included); \
                         raise the option to apply it",
                        max.0,
                        entry.size()
                    ),
                ));
            }
            apply_entry(&root, dest, &raw, &mut entry, &mut stats, &mut dirs)?;
        }
    }
    // Everything after the end-of-archive blocks is part of the stream too.
    io::copy(&mut hr, &mut io::sink()).map_err(|e| bad(Path::new(""), format!("reading the stream: {e}")))?;
    // Directory metadata last, deepest first: adding children changes mtimes.
    for d in dirs.iter().rev() {
        set_meta(&root, dest, &d.rel, Some((d.uid, d.gid)), Some(d.mode), d.mtime, &d.xattrs)?;
    }
    stats.tar_bytes = hr.count;
    stats.diff_id = Some(DiffId::from_sha256(&hr.hash.finalize()));
    crate::metrics::observe_apply(started);
    Ok(stats)
}

/// A layer stream read once to learn its diff id before anything is
/// extracted: an unnamed temporary file (`O_TMPFILE`) in `dir` holding the
/// stream, its sha256 and its length. A layer the store has already costs
/// only this: the bytes pass through the page cache, and the file, never
/// linked, goes when it is dropped (usually before writeback).
pub struct Spool {
    pub file: File,
    pub diff_id: DiffId,
    pub bytes: u64,
}

/// Copies `reader` into a [`Spool`] in `dir`. With `max_content`
/// (`sharedloop.max_layer_size`) a stream longer than twice it plus
/// 256 MiB (room for the headers of many small files) is refused naming
/// the option, before it fills the local disk.
pub fn spool(reader: &mut dyn Read, dir: &Path, max_content: Option<Bytes>) -> Result<Spool> {
    let file = match rustix::fs::openat(
        rustix::fs::CWD,
        dir,
        OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) {
        Ok(fd) => File::from(fd),
        // A filesystem without O_TMPFILE: a named file, unlinked at once.
        Err(_) => {
            let p = dir.join(format!(".spool-{}", crate::ids::random_token()));
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&p)
                .ctx("create", &p)?;
            let _ = fs::remove_file(&p);
            f
        }
    };
    let limit = max_content.map(|m| m.0.saturating_mul(2).saturating_add(256 << 20));
    let mut hr = HashingReader { inner: reader, hash: Sha256::new(), count: 0 };
    let mut w = io::BufWriter::with_capacity(1 << 20, &file);
    let mut taken = (&mut hr).take(limit.map_or(u64::MAX, |l| l + 1));
    io::copy(&mut taken, &mut w).map_err(|e| match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => Error::sys("write", dir, e),
        _ => bad(Path::new(""), format!("reading the stream: {e}")),
    })?;
    w.flush().ctx("write", dir)?;
    drop(w);
    if let (Some(l), Some(m)) = (limit, max_content) {
        if hr.count > l {
            return Err(bad(
                Path::new(""),
                format!(
                    "the stream is longer than {l} bytes, more than a layer within \
                     sharedloop.max_layer_size={m} can be; raise the option to apply it"
                ),
            ));
        }
    }
    let mut file = file;
    io::Seek::rewind(&mut file).ctx("seek", dir)?;
    Ok(Spool { file, diff_id: DiffId::from_sha256(&hr.hash.finalize()), bytes: hr.count })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_cleaned_and_escapes_refused() {
        assert_eq!(clean_name(Path::new("./a/b")).unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(clean_name(Path::new("./")).unwrap(), None);
        assert!(clean_name(Path::new("a/../../etc")).is_err());
        assert!(clean_name(Path::new("/etc/passwd")).is_err());
    }
}
