//! One tar entry written beneath the destination: parents opened without
//! following links, whiteouts and the opaque marker turned into
//! overlayfs' own, file data written with holes, and the entry's owner,
//! mode, extended attributes and mtime.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{
    chownat, fchmod, fchown, linkat, mkdirat, mknodat, openat, openat2, symlinkat, unlinkat, utimensat, AtFlags,
    FileType, Gid, Mode, OFlags, ResolveFlags, Timespec, Timestamps, Uid,
};
use rustix::io::Errno;

use super::{bad, clean_name, ApplyStats, OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX};
use crate::error::{Context, Error, Result};

const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
const PAX_XATTR: &str = "SCHILY.xattr.";

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

/// A directory's metadata, set once all its entries are in.
pub(super) struct DirMeta {
    pub(super) rel: PathBuf,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mode: u32,
    pub(super) mtime: u64,
    pub(super) xattrs: Vec<(String, Vec<u8>)>,
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
pub(super) fn set_meta(
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

pub(super) fn apply_entry<R: Read>(
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
