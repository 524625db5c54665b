//! One pass from a layer tar to its image: the spooled tar, re-written in
//! overlayfs' terms, is fed to `mke2fs -d -` (e2fsprogs >= 1.47.1), which
//! writes the image straight from it. No staging directory, no second
//! copy of the layer's files.
//!
//! [`plan`] reads the spool's headers once (seeking over the data) and
//! decides whether the tar can go this way; [`rewrite`] then streams it:
//! - names go under the image's `fs/` ([`crate::image::LAYER_ROOT`]);
//! - `.wh.NAME` becomes a 0:0 character device `NAME`, as the staged
//!   path makes it (mode 0, root's, mtime now);
//! - `.wh..wh..opq` is dropped: its directory's `trusted.overlay.opaque`
//!   is set afterwards, with the other extended attributes mke2fs does not
//!   copy from a tar (it copies only `security.capability`), through a
//!   read-write mount of the new image ([`TarPlan::xattrs`]);
//! - every header is written anew from what the staged path reads of it
//!   (the same numeric parsing, the same defaults), so mke2fs's tar reader
//!   sees exactly this module's reading of the layer.
//!
//! Anything this path would do differently from the staged one goes the
//! staged way ([`Plan::Staged`] names why): a name seen twice, an entry
//! whose parent directory the tar has not listed before it (or is not a
//! directory), a sparse entry, a hardlink to what is not an earlier file,
//! an unsupported type, an escape. The staged path then extracts it, or
//! refuses it with its usual error.

use std::collections::HashSet;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::{clean_name, HashingReader, OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX};
use crate::error::{Error, Result};
use crate::export::TreeCounts;
use crate::ids::{Bytes, DiffId};
use crate::image::LAYER_ROOT;

const PAX_XATTR: &str = "SCHILY.xattr.";
const OVERLAY_XATTR_PREFIX: &str = "trusted.overlay.";
/// The one extended attribute `mke2fs -d` copies from a tar itself.
pub const CAPABILITY_XATTR: &str = "security.capability";

/// What the one-pass build needs to know of a tar before it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TarPlan {
    /// Inodes and blocks of the tree (as [`crate::export::tree_counts`]
    /// counts a staged one): the image's size and inode count.
    pub counts: TreeCounts,
    /// Bytes of regular file content (hardlinks counted once).
    pub content_bytes: u64,
    /// Entries, counted as the staged path counts them.
    pub entries: u64,
    /// Extended attributes set through a mount after mke2fs: paths below
    /// `fs/` (empty: `fs/` itself), names, values. Opaque directories are
    /// here as `trusted.overlay.opaque=y`.
    pub xattrs: Vec<(PathBuf, String, Vec<u8>)>,
    /// The stream's digest when it was spooled: [`rewrite`] hashes what
    /// it reads again and refuses a spool that changed on the local disk.
    pub diff_id: Option<DiffId>,
}

/// Whether a tar can be built in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Stream(TarPlan),
    /// Extract it to a staging directory, as before; why not in one pass.
    Staged(String),
}

fn staged(raw: &Path, why: &str) -> Plan {
    Plan::Staged(format!("{}: {why}", raw.display()))
}

/// A numeric header field as the staged path reads it; `None` where it
/// would refuse the entry.
fn numeric(v: io::Result<u64>, field: &[u8]) -> Option<u32> {
    let v = match v {
        Ok(v) => v,
        Err(_) if field.iter().all(|b| *b == 0 || *b == b' ') => 0,
        Err(_) => return None,
    };
    u32::try_from(v).ok()
}

/// The layer's own extended attributes of an entry (overlayfs' are never
/// a layer's); `None` for a sparse or unreadable pax header.
fn xattrs_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> Option<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    if let Some(exts) = entry.pax_extensions().ok()? {
        for ext in exts {
            let ext = ext.ok()?;
            let Ok(key) = ext.key() else { continue };
            if key.starts_with("GNU.sparse") {
                return None;
            }
            if let Some(name) = key.strip_prefix(PAX_XATTR) {
                if !name.starts_with(OVERLAY_XATTR_PREFIX) {
                    out.push((name.to_owned(), ext.value_bytes().to_vec()));
                }
            }
        }
    }
    Some(out)
}

/// Reads the headers of the tar in `file` (from its start; the data is
/// seeked over) and decides. `max_content` is `sharedloop.max_layer_size`:
/// a tar over it goes the staged way, which refuses it naming the option.
pub fn plan(file: &File, max_content: Option<Bytes>) -> Result<Plan> {
    let mut f = file;
    f.rewind().map_err(|e| Error::sys("seek", "the spooled layer", e))?;
    let len = file.metadata().map_err(|e| Error::sys("stat", "the spooled layer", e))?.len();
    let mut ar = tar::Archive::new(f);
    let Ok(entries) = ar.entries_with_seek() else { return Ok(Plan::Staged("not a tar stream".into())) };
    let mut p = TarPlan { counts: TreeCounts { inodes: 2, blocks: 2 }, ..TarPlan::default() };
    // Every name made, and which of them are directories ("" is fs/).
    let mut names: HashSet<PathBuf> = HashSet::new();
    let mut dirs: HashSet<PathBuf> = HashSet::from([PathBuf::new()]);
    let mut opaque: HashSet<PathBuf> = HashSet::new();
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => return Ok(Plan::Staged(format!("an unreadable entry: {e}"))),
        };
        let Ok(raw) = entry.path().map(|p| p.into_owned()) else {
            return Ok(Plan::Staged("an entry with a bad name".into()));
        };
        let Ok(rel) = clean_name(&raw) else { return Ok(staged(&raw, "a name that escapes")) };
        let Some(rel) = rel else { continue }; // the root: the staged path ignores it too
                                               // Seeking over the data does not notice a stream cut short.
        if entry.raw_file_position().saturating_add(entry.size()) > len {
            return Ok(staged(&raw, "the stream ends inside its data"));
        }
        if rel.components().any(|c| c.as_os_str().len() > 255) {
            return Ok(staged(&raw, "a name longer than 255 bytes"));
        }
        let parent = rel.parent().unwrap_or(Path::new("")).to_owned();
        if !dirs.contains(&parent) {
            return Ok(staged(&raw, "its directory is not listed before it"));
        }
        let name = rel.file_name().expect("a normal component").to_string_lossy().into_owned();
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            p.entries += 1;
            if name == OPAQUE_MARKER {
                if opaque.insert(parent.clone()) {
                    p.xattrs.push((parent, OPAQUE_XATTR.to_owned(), b"y".to_vec()));
                }
                continue;
            }
            if target.starts_with(WHITEOUT_PREFIX) {
                continue; // AUFS bookkeeping
            }
            if target.is_empty() || target == "." || target == ".." {
                return Ok(staged(&raw, "a whiteout of an invalid name"));
            }
            if !names.insert(parent.join(target)) {
                return Ok(staged(&raw, "a name seen twice"));
            }
            p.counts.inodes += 1;
            continue;
        }
        let hdr = entry.header().clone();
        let old = hdr.as_old();
        if numeric(hdr.uid(), &old.uid).is_none()
            || numeric(hdr.gid(), &old.gid).is_none()
            || numeric(hdr.mode().map(u64::from), &old.mode).is_none()
        {
            return Ok(staged(&raw, "a bad numeric field"));
        }
        let Some(xattrs) = xattrs_of(&mut entry) else { return Ok(staged(&raw, "a sparse or bad pax header")) };
        // mke2fs writes a capability as it is; the kernel refuses a
        // malformed one when the staged path sets it: let it.
        if xattrs.iter().any(|(k, v)| k == CAPABILITY_XATTR && !valid_capability(v)) {
            return Ok(staged(&raw, "a malformed security.capability"));
        }
        if !names.insert(rel.clone()) {
            return Ok(staged(&raw, "a name seen twice"));
        }
        p.entries += 1;
        let kind = hdr.entry_type();
        match kind {
            tar::EntryType::Directory => {
                dirs.insert(rel.clone());
                p.counts.blocks += 1;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                p.content_bytes = p.content_bytes.saturating_add(size);
                if max_content.is_some_and(|m| p.content_bytes > m.0) {
                    return Ok(staged(&raw, "over sharedloop.max_layer_size"));
                }
                let data = size.div_ceil(4096);
                p.counts.blocks += data + data / 340;
            }
            tar::EntryType::Symlink => {
                let Ok(Some(target)) = entry.link_name() else { return Ok(staged(&raw, "a symlink without a target")) };
                if !xattrs.is_empty() {
                    return Ok(staged(&raw, "extended attributes on a symlink"));
                }
                let n = target.as_os_str().len();
                // mke2fs copies a target of exactly 1, 2 or 3 KiB one byte
                // past its buffer.
                if n > 0 && n % 1024 == 0 {
                    return Ok(staged(&raw, "a symlink target of a whole number of KiB"));
                }
                if n > 59 {
                    p.counts.blocks += 1;
                }
            }
            tar::EntryType::Link => {
                let Ok(Some(target)) = entry.link_name() else {
                    return Ok(staged(&raw, "a hardlink without a target"));
                };
                let Ok(Some(trel)) = clean_name(&target) else { return Ok(staged(&raw, "a hardlink that escapes")) };
                if !names.contains(&trel) || dirs.contains(&trel) || trel == rel {
                    return Ok(staged(&raw, "a hardlink to what is not an earlier file"));
                }
                // The staged path sets nothing of a hardlink's own.
                continue;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {}
            _ => return Ok(staged(&raw, "an entry type the one-pass build does not take")),
        }
        p.counts.inodes += 1;
        for (k, v) in xattrs {
            if k != CAPABILITY_XATTR || kind.is_dir() {
                p.xattrs.push((rel.clone(), k, v));
            }
        }
    }
    p.counts.blocks += p.counts.inodes / 16;
    Ok(Plan::Stream(p))
}

/// Whether `v` is a `security.capability` value the kernel takes: a
/// version 2 (20 bytes) or version 3 (24 bytes) header.
fn valid_capability(v: &[u8]) -> bool {
    matches!((v.len(), v.get(3)), (20, Some(2)) | (24, Some(3)))
}

/// The header of a new entry `kind` with the given fields: atime the
/// mtime and ctime now, as the staged path leaves them.
fn header(kind: tar::EntryType, mode: u32, uid: u32, gid: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if let Some(g) = h.as_gnu_mut() {
        g.set_atime(mtime);
        g.set_ctime(now);
    }
    h.set_entry_type(kind);
    h.set_mode(mode & 0o7777);
    h.set_uid(uid.into());
    h.set_gid(gid.into());
    h.set_mtime(mtime);
    h.set_size(0);
    h
}

fn under_root(rel: &Path) -> PathBuf {
    Path::new(LAYER_ROOT).join(rel)
}

/// Writes the tar in `file` (planned by [`plan`]) to `out` in the form
/// `mke2fs -d -` takes for a layer image: see the module's notes. `now`
/// is the mtime of what the staged path makes itself (`fs/`, whiteouts).
/// Errors writing `out` are [`Error::Io`]-like system errors naming
/// `what`; an entry that no longer reads as planned is a bad tar.
pub fn rewrite(file: &File, plan: &TarPlan, out: &mut dyn Write, now: u64) -> Result<()> {
    let mut f = file;
    f.rewind().map_err(|e| Error::sys("seek", "the spooled layer", e))?;
    let mut hr = HashingReader { inner: f, hash: <sha2::Sha256 as sha2::Digest>::new(), count: 0 };
    let werr = |e: io::Error| Error::sys("write", "the tar fed to mke2fs", e);
    let changed = |what: &str| Error::BadTar {
        entry: String::new(),
        reason: format!("the spooled stream changed between reads ({what})"),
    };
    let mut b = tar::Builder::new(out);
    b.mode(tar::HeaderMode::Complete);
    let mut h = header(tar::EntryType::Directory, 0o755, 0, 0, now);
    b.append_data(&mut h, LAYER_ROOT, io::empty()).map_err(werr)?;
    // mke2fs sets a hardlink entry's owner, mode and mtime on the inode
    // it links to: the header repeats the target's own.
    let mut meta: std::collections::HashMap<PathBuf, (u32, u32, u32, u64)> = std::collections::HashMap::new();
    let mut ar = tar::Archive::new(&mut hr);
    for entry in ar.entries().map_err(|_| changed("not a tar"))? {
        let mut entry = entry.map_err(|_| changed("an entry"))?;
        let raw = entry.path().map_err(|_| changed("a name"))?.into_owned();
        let Some(rel) = clean_name(&raw)? else { continue };
        let name = rel.file_name().expect("a normal component").to_string_lossy().into_owned();
        if let Some(target) = name.strip_prefix(WHITEOUT_PREFIX) {
            if name == OPAQUE_MARKER || target.starts_with(WHITEOUT_PREFIX) {
                continue;
            }
            let wrel = rel.parent().unwrap_or(Path::new("")).join(target);
            meta.insert(wrel.clone(), (0, 0, 0, now));
            let path = under_root(&wrel);
            let mut h = header(tar::EntryType::Char, 0, 0, 0, now);
            h.set_device_major(0).map_err(werr)?;
            h.set_device_minor(0).map_err(werr)?;
            b.append_data(&mut h, &path, io::empty()).map_err(werr)?;
            continue;
        }
        let hdr = entry.header().clone();
        let old = hdr.as_old();
        let (Some(uid), Some(gid), Some(mode)) =
            (numeric(hdr.uid(), &old.uid), numeric(hdr.gid(), &old.gid), numeric(hdr.mode().map(u64::from), &old.mode))
        else {
            return Err(changed("a numeric field"));
        };
        let mtime = hdr.mtime().unwrap_or(0);
        let xattrs = xattrs_of(&mut entry).ok_or_else(|| changed("a pax header"))?;
        let kind = hdr.entry_type();
        let path = under_root(&rel);
        if !matches!(kind, tar::EntryType::Link | tar::EntryType::Directory) {
            let mode = if kind == tar::EntryType::Symlink { 0o777 } else { mode };
            meta.insert(rel.clone(), (mode, uid, gid, mtime));
        }
        match kind {
            tar::EntryType::Link => {
                let target = entry.link_name().ok().flatten().ok_or_else(|| changed("a link"))?;
                let trel = clean_name(&target)?.ok_or_else(|| changed("a link"))?;
                let (mode, uid, gid, mtime) = *meta.get(&trel).ok_or_else(|| changed("a link"))?;
                meta.insert(rel.clone(), (mode, uid, gid, mtime));
                let mut h = header(tar::EntryType::Link, mode, uid, gid, mtime);
                b.append_link(&mut h, &path, under_root(&trel)).map_err(werr)?;
                continue;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name().ok().flatten().ok_or_else(|| changed("a link"))?.into_owned();
                // A symlink's mode is not set by the staged path either.
                let mut h = header(tar::EntryType::Symlink, 0o777, uid, gid, mtime);
                // The target's bytes as they are (`append_link` would
                // tidy a short one: `a//b` to `a/b`); a long one goes in a
                // GNU long-link entry, raw too.
                let bytes = target.as_os_str().as_encoded_bytes();
                if bytes.len() < 100 {
                    h.set_link_name_literal(bytes).map_err(werr)?;
                    b.append_data(&mut h, &path, io::empty()).map_err(werr)?;
                } else {
                    b.append_link(&mut h, &path, target).map_err(werr)?;
                }
                continue;
            }
            _ => {}
        }
        let caps: Vec<(&str, &[u8])> = xattrs
            .iter()
            .filter(|(k, _)| k == CAPABILITY_XATTR && !kind.is_dir())
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        if !caps.is_empty() {
            let recs: Vec<(String, &[u8])> = caps.iter().map(|(k, v)| (format!("{PAX_XATTR}{k}"), *v)).collect();
            b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v))).map_err(werr)?;
        }
        match kind {
            tar::EntryType::Directory => {
                let mut h = header(kind, mode, uid, gid, mtime);
                b.append_data(&mut h, &path, io::empty()).map_err(werr)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut h = header(tar::EntryType::Regular, mode, uid, gid, mtime);
                h.set_size(entry.size());
                b.append_data(&mut h, &path, &mut entry).map_err(|e| match e.kind() {
                    io::ErrorKind::UnexpectedEof => changed("file data"),
                    _ => werr(e),
                })?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let mut h = header(kind, mode, uid, gid, mtime);
                if kind != tar::EntryType::Fifo {
                    let major = hdr.device_major().ok().flatten().unwrap_or(0);
                    let minor = hdr.device_minor().ok().flatten().unwrap_or(0);
                    h.set_device_major(major).map_err(werr)?;
                    h.set_device_minor(minor).map_err(werr)?;
                }
                b.append_data(&mut h, &path, io::empty()).map_err(werr)?;
            }
            _ => return Err(changed("an entry type")),
        }
    }
    io::copy(&mut hr, &mut io::sink()).map_err(|e| Error::sys("read", "the spooled layer", e))?;
    if let Some(want) = &plan.diff_id {
        let got = DiffId::from_sha256(&sha2::Digest::finalize(hr.hash));
        if &got != want {
            return Err(changed(&format!("sha256 {want} then {got}")));
        }
    }
    b.into_inner().map_err(werr)?.flush().map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests;
