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

use std::fs::{self, File};
use std::io::{self, Read, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{
    chownat, fchmod, fchown, linkat, mkdirat, mknodat, openat, openat2, symlinkat, unlinkat, utimensat, AtFlags,
    FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid,
};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use crate::error::{Context, Error, Result};
use crate::ids::{Bytes, DiffId};

pub const WHITEOUT_PREFIX: &str = ".wh.";
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
const PAX_XATTR: &str = "SCHILY.xattr.";

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

struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    count: u64,
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

/// Opens directory `rel` (relative, may be empty) below `root`, refusing
/// symlinks anywhere on the way and any escape.
fn open_dir_beneath(root: &OwnedFd, rel: &Path) -> rustix::io::Result<OwnedFd> {
    let p: &Path = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
    openat2(
        root,
        p,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )
}

/// Opens (creating as needed, mode 0755) the parent directory `rel`.
fn ensure_dir(root: &OwnedFd, rel: &Path, entry: &Path) -> Result<OwnedFd> {
    match open_dir_beneath(root, rel) {
        Ok(fd) => return Ok(fd),
        Err(Errno::NOENT) => {}
        Err(Errno::LOOP) | Err(Errno::XDEV) | Err(Errno::NOTDIR) => {
            return Err(bad(entry, "a parent is a symlink or not a directory (writes through links are refused)"))
        }
        Err(e) => return Err(Error::sys("open", rel, e)),
    }
    let mut cur = PathBuf::new();
    for c in rel.components() {
        cur.push(c);
        match mkdirat(root, &cur, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(Error::sys("mkdir", cur, e)),
        }
    }
    open_dir_beneath(root, rel).map_err(|e| match e {
        Errno::LOOP | Errno::XDEV | Errno::NOTDIR => bad(entry, "a parent is a symlink or not a directory"),
        e => Error::sys("open", rel, e),
    })
}

/// Removes whatever is at `name` in `dir` (recursively for a directory).
fn remove_existing(dir: &OwnedFd, dir_path: &Path, name: &Path) -> Result<()> {
    match unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::ISDIR) => {
            let p = dir_path.join(name);
            std::fs::remove_dir_all(&p).ctx("remove", p)
        }
        Err(e) => Err(Error::sys("unlink", dir_path.join(name), e)),
    }
}

struct DirMeta {
    rel: PathBuf,
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
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

/// A numeric header field; blank (all NUL or space) reads as 0, as Go's
/// archive/tar (dockerd's) reads it. Ids and modes must fit 32 bits.
fn numeric(v: io::Result<u64>, field: &[u8], entry: &Path, what: &str) -> Result<u32> {
    let v = match v {
        Ok(v) => v,
        Err(_) if field.iter().all(|b| *b == 0 || *b == b' ') => 0,
        Err(e) => return Err(bad(entry, format!("bad {what}: {e}"))),
    };
    u32::try_from(v).map_err(|_| bad(entry, format!("{what} {v} is out of range")))
}

fn pax_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, raw: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions().map_err(|e| bad(raw, format!("bad pax header: {e}")))? {
        for ext in exts {
            let ext = ext.map_err(|e| bad(raw, format!("bad pax record: {e}")))?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix(PAX_XATTR) {
                // overlayfs' own attributes are ours to set, never a layer's.
                if !name.starts_with(OVERLAY_XATTR_PREFIX) {
                    out.push((name.to_owned(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Ok(out)
}

/// The granularity of holes: runs of zeros this long (and aligned) are
/// not written.
const HOLE_BLOCK: usize = 4096;
static ZEROS: [u8; HOLE_BLOCK] = [0; HOLE_BLOCK];

enum SparseError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `from` into the new, empty `to`, leaving a hole wherever a whole
/// aligned block is zero, and returns the bytes copied (the apparent size).
/// A GNU sparse entry's holes come out of the tar reader as zeros: they stay
/// holes here, and then in the image (`mkfs.ext4 -d` and `cp` keep holes),
/// so a 10 KB tar declaring a 10 GiB sparse file costs kilobytes of disk,
/// not gigabytes. Zero blocks of ordinary files become holes too; the
/// contents read the same.
fn write_sparse(from: &mut dyn Read, to: &File) -> std::result::Result<u64, SparseError> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        // Fill the buffer (or reach the end), so blocks stay aligned.
        let mut len = 0;
        while len < buf.len() {
            match from.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(SparseError::Read(e)),
            }
        }
        if len == 0 {
            break;
        }
        let mut off = 0;
        while off < len {
            // A run of data blocks, written at once.
            let start = off;
            while off < len && buf[off..(off + HOLE_BLOCK).min(len)] != ZEROS[..(len - off).min(HOLE_BLOCK)] {
                off = (off + HOLE_BLOCK).min(len);
            }
            if off > start {
                to.write_all_at(&buf[start..off], pos + start as u64).map_err(SparseError::Write)?;
            }
            // A run of zero blocks: skipped.
            while off < len && buf[off..(off + HOLE_BLOCK).min(len)] == ZEROS[..(len - off).min(HOLE_BLOCK)] {
                off = (off + HOLE_BLOCK).min(len);
            }
        }
        pos += len as u64;
    }
    // A trailing hole is the file's length, not data.
    to.set_len(pos).map_err(SparseError::Write)?;
    Ok(pos)
}

#[allow(clippy::too_many_arguments)]
fn set_meta(
    root: &OwnedFd,
    dest: &Path,
    rel: &Path,
    owner: Option<(u32, u32)>,
    mode: Option<u32>,
    mtime: u64,
    xattrs: &[(String, Vec<u8>)],
) -> Result<()> {
    let parent = rel.parent().unwrap_or(Path::new(""));
    let name = rel.file_name().expect("entry has a name");
    let dir = open_dir_beneath(root, parent).map_err(|e| Error::sys("open", dest.join(parent), e))?;
    if let Some((uid, gid)) = owner {
        chownat(&dir, name, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)), AtFlags::SYMLINK_NOFOLLOW)
            .ctx("chown", dest.join(rel))?;
    }
    if let Some(mode) = mode {
        // After chown, which clears setuid bits. O_PATH|O_NOFOLLOW: never a link.
        let fd = openat(&dir, name, OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
            .ctx("open", dest.join(rel))?;
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
        rustix::fs::chmod(proc.as_str(), Mode::from_raw_mode(mode & 0o7777)).ctx("chmod", dest.join(rel))?;
    }
    for (k, v) in xattrs {
        let p = dest.join(rel);
        rustix::fs::lsetxattr(&p, k.as_str(), v, rustix::fs::XattrFlags::empty()).ctx("setxattr", p)?;
    }
    let t = Timespec { tv_sec: mtime as i64, tv_nsec: 0 };
    utimensat(&dir, name, &Timestamps { last_access: t, last_modification: t }, AtFlags::SYMLINK_NOFOLLOW)
        .ctx("utimes", dest.join(rel))?;
    Ok(())
}

fn apply_entry<R: Read>(
    root: &OwnedFd,
    dest: &Path,
    raw: &Path,
    entry: &mut tar::Entry<'_, R>,
    stats: &mut ApplyStats,
    dirs: &mut Vec<DirMeta>,
) -> Result<()> {
    let Some(rel) = clean_name(raw)? else {
        return Ok(());
    };
    let hdr = entry.header().clone();
    let name = rel.file_name().expect("normal component").to_owned();
    let name_s = name.to_string_lossy().into_owned();
    let parent_rel = rel.parent().unwrap_or(Path::new("")).to_owned();
    let parent = ensure_dir(root, &parent_rel, raw)?;
    let parent_path = dest.join(&parent_rel);

    if let Some(target) = name_s.strip_prefix(WHITEOUT_PREFIX) {
        stats.entries += 1;
        if name_s == OPAQUE_MARKER {
            let p = dest.join(&parent_rel);
            return rustix::fs::lsetxattr(&p, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty()).ctx("setxattr", p);
        }
        if target.starts_with(WHITEOUT_PREFIX) {
            return Ok(()); // AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs)
        }
        if target.is_empty() || target == "." || target == ".." || target.contains('/') {
            return Err(bad(raw, "whiteout of an invalid name"));
        }
        remove_existing(&parent, &parent_path, Path::new(target))?;
        return mknodat(&parent, target, FileType::CharacterDevice, Mode::empty(), 0)
            .ctx("mknod whiteout", parent_path.join(target));
    }

    let old = hdr.as_old();
    let uid = numeric(hdr.uid(), &old.uid, raw, "uid")?;
    let gid = numeric(hdr.gid(), &old.gid, raw, "gid")?;
    let mode = numeric(hdr.mode().map(u64::from), &old.mode, raw, "mode")?;
    let mtime = hdr.mtime().unwrap_or(0);
    let xattrs = pax_xattrs(entry, raw)?;
    let kind = hdr.entry_type();
    stats.entries += 1;

    if kind.is_dir() {
        match open_dir_beneath(&parent, Path::new(&name)) {
            Ok(_) => {}
            Err(Errno::NOENT) => {
                mkdirat(&parent, &name, Mode::from_raw_mode(0o700)).ctx("mkdir", dest.join(&rel))?;
            }
            Err(_) => {
                remove_existing(&parent, &parent_path, Path::new(&name))?;
                mkdirat(&parent, &name, Mode::from_raw_mode(0o700)).ctx("mkdir", dest.join(&rel))?;
            }
        }
        dirs.push(DirMeta { rel, uid, gid, mode, mtime, xattrs });
        return Ok(());
    }

    remove_existing(&parent, &parent_path, Path::new(&name))?;
    let mut set_mode = Some(mode);
    let mut owner = Some((uid, gid));
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            let fd = openat(
                &parent,
                &name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .ctx("create", dest.join(&rel))?;
            let f = File::from(fd);
            let n = write_sparse(entry, &f).map_err(|e| match e {
                SparseError::Read(e) => bad(raw, format!("reading file data: {e}")),
                SparseError::Write(e) => Error::sys("write", dest.join(&rel), e),
            })?;
            stats.content_bytes += n;
            fchown(f.as_fd(), Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid))).ctx("chown", dest.join(&rel))?;
            fchmod(f.as_fd(), Mode::from_raw_mode(mode & 0o7777)).ctx("chmod", dest.join(&rel))?;
            (set_mode, owner) = (None, None);
        }
        tar::EntryType::Symlink => {
            let target = entry
                .link_name()
                .map_err(|e| bad(raw, format!("bad link name: {e}")))?
                .ok_or_else(|| bad(raw, "symlink without a target"))?;
            symlinkat(target.as_ref(), &parent, &name).ctx("symlink", dest.join(&rel))?;
            set_mode = None;
        }
        tar::EntryType::Link => {
            let target = entry
                .link_name()
                .map_err(|e| bad(raw, format!("bad link name: {e}")))?
                .ok_or_else(|| bad(raw, "hardlink without a target"))?;
            let trel = clean_name(&target)?.ok_or_else(|| bad(raw, "hardlink to the root"))?;
            let tparent = open_dir_beneath(root, trel.parent().unwrap_or(Path::new("")))
                .map_err(|_| bad(raw, format!("hardlink target {} is not in this layer", trel.display())))?;
            let tname = trel.file_name().expect("normal component");
            linkat(&tparent, tname, &parent, &name, AtFlags::empty()).map_err(|e| match e {
                Errno::NOENT => bad(raw, format!("hardlink target {} is not in this layer", trel.display())),
                e => bad(raw, format!("hardlink to {}: {e}", trel.display())),
            })?;
            // A hardlink shares the target's inode: no metadata of its own.
            return Ok(());
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let ft = match kind {
                tar::EntryType::Char => FileType::CharacterDevice,
                tar::EntryType::Block => FileType::BlockDevice,
                _ => FileType::Fifo,
            };
            let major = hdr.device_major().ok().flatten().unwrap_or(0);
            let minor = hdr.device_minor().ok().flatten().unwrap_or(0);
            let dev = rustix::fs::makedev(major, minor);
            mknodat(&parent, &name, ft, Mode::from_raw_mode(mode & 0o7777), dev).ctx("mknod", dest.join(&rel))?;
        }
        other => return Err(bad(raw, format!("unsupported entry type {other:?}"))),
    }
    set_meta(root, dest, &rel, owner, set_mode, mtime, &xattrs)
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
