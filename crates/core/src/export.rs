//! Reading a layer back: the tar of a layer's own changes (`Diff`), the list
//! of changes (`Changes`) and their size (`DiffSize`).
//!
//! The walk is sorted by name, so the same directory always gives the same
//! bytes. overlayfs whiteouts (0:0 character devices) become `.wh.NAME`
//! entries and opaque directories get a `.wh..wh..opq` entry, as the OCI
//! image spec and Docker write them.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apply::{OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX};
use crate::error::{Context, Error, Result};

/// Whether `md` is an overlayfs whiteout.
pub fn is_whiteout(md: &fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

/// Whether directory `p` is marked opaque.
pub fn is_opaque(p: &Path) -> bool {
    matches!(xattr::get(p, OPAQUE_XATTR), Ok(Some(v)) if v == b"y")
}

/// The entries of a tree, sorted depth-first by name, as paths relative to
/// the root.
fn walk(root: &Path, rel: &Path, out: &mut Vec<(PathBuf, fs::Metadata)>) -> Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .ctx("read dir", &dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()
        .ctx("read dir", &dir)?;
    names.sort();
    for n in names {
        let r = rel.join(&n);
        let md = fs::symlink_metadata(root.join(&r)).ctx("stat", root.join(&r))?;
        let is_dir = md.is_dir();
        out.push((r.clone(), md));
        if is_dir {
            walk(root, &r, out)?;
        }
    }
    Ok(())
}

fn tar_err(e: io::Error) -> Error {
    Error::sys("write tar", "<stream>", e)
}

fn xattrs_of(p: &Path) -> Vec<(String, Vec<u8>)> {
    let Ok(names) = xattr::list(p) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = names
        .filter_map(|n| n.into_string().ok())
        .filter(|n| !n.starts_with("trusted.overlay."))
        .filter_map(|n| xattr::get(p, &n).ok().flatten().map(|v| (n, v)))
        .collect();
    out.sort();
    out
}

fn header_for(md: &fs::Metadata, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(md.uid() as u64);
    h.set_gid(md.gid() as u64);
    h.set_mtime(md.mtime().max(0) as u64);
    h.set_size(0);
    h
}

fn empty_file_header() -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(0);
    h
}

/// Writes the tar of the tree at `root` (an upper directory or a layer
/// image's mount) to `w`.
pub fn export_tar<W: Write>(root: &Path, w: W) -> Result<()> {
    let mut entries = Vec::new();
    walk(root, Path::new(""), &mut entries)?;
    let mut b = tar::Builder::new(w);
    b.follow_symlinks(false);
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for (rel, md) in entries {
        let full = root.join(&rel);
        let ft = md.file_type();
        if is_whiteout(&md) {
            let name = rel.file_name().expect("named").to_string_lossy();
            let wh = rel.with_file_name(format!("{WHITEOUT_PREFIX}{name}"));
            b.append_data(&mut empty_file_header(), wh, io::empty()).map_err(tar_err)?;
            continue;
        }
        let xattrs = xattrs_of(&full);
        if !xattrs.is_empty() {
            let recs: Vec<(String, &[u8])> =
                xattrs.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), v.as_slice())).collect();
            b.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v))).map_err(tar_err)?;
        }
        if ft.is_dir() {
            let mut h = header_for(&md, tar::EntryType::Directory);
            let mut name = rel.clone().into_os_string();
            name.push("/");
            b.append_data(&mut h, PathBuf::from(name), io::empty()).map_err(tar_err)?;
            if is_opaque(&full) {
                b.append_data(&mut empty_file_header(), rel.join(OPAQUE_MARKER), io::empty()).map_err(tar_err)?;
            }
        } else if ft.is_file() {
            let key = (md.dev(), md.ino());
            if md.nlink() > 1 {
                if let Some(first) = links.get(&key) {
                    let mut h = header_for(&md, tar::EntryType::Link);
                    b.append_link(&mut h, &rel, first).map_err(tar_err)?;
                    continue;
                }
                links.insert(key, rel.clone());
            }
            let mut h = header_for(&md, tar::EntryType::Regular);
            h.set_size(md.len());
            let f = File::open(&full).ctx("open", &full)?;
            b.append_data(&mut h, &rel, f).map_err(tar_err)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&full).ctx("readlink", &full)?;
            let mut h = header_for(&md, tar::EntryType::Symlink);
            b.append_link(&mut h, &rel, target).map_err(tar_err)?;
        } else {
            let kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else if ft.is_fifo() {
                tar::EntryType::Fifo
            } else {
                continue; // sockets do not belong in a layer
            };
            let mut h = header_for(&md, kind);
            let rdev = md.rdev();
            h.set_device_major(rustix::fs::major(rdev)).map_err(tar_err)?;
            h.set_device_minor(rustix::fs::minor(rdev)).map_err(tar_err)?;
            b.append_data(&mut h, &rel, io::empty()).map_err(tar_err)?;
        }
    }
    b.into_inner().map_err(tar_err)?.flush().map_err(tar_err)
}

/// Kind of a change, with Docker's numbering (`archive.ChangeType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    Modify = 0,
    Add = 1,
    Delete = 2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Absolute path inside the container (`/etc/passwd`).
    pub path: String,
    pub kind: ChangeKind,
}

/// Whether `rel` is visible in the stack `lowers` (topmost first).
pub fn exists_in_lowers(lowers: &[PathBuf], rel: &Path) -> bool {
    for l in lowers {
        if let Ok(md) = fs::symlink_metadata(l.join(rel)) {
            return !is_whiteout(&md);
        }
        // Hidden below if an ancestor in this layer is opaque or not a dir.
        let mut anc = rel.parent();
        while let Some(a) = anc {
            if a.as_os_str().is_empty() {
                break;
            }
            match fs::symlink_metadata(l.join(a)) {
                Ok(md) if !md.is_dir() => return false,
                Ok(_) if is_opaque(&l.join(a)) => return false,
                _ => {}
            }
            anc = a.parent();
        }
    }
    false
}

/// The changes an upper directory makes over `lowers`.
pub fn changes(upper: &Path, lowers: &[PathBuf]) -> Result<Vec<Change>> {
    let mut entries = Vec::new();
    walk(upper, Path::new(""), &mut entries)?;
    Ok(entries
        .into_iter()
        .map(|(rel, md)| {
            let kind = if is_whiteout(&md) {
                ChangeKind::Delete
            } else if exists_in_lowers(lowers, &rel) {
                ChangeKind::Modify
            } else {
                ChangeKind::Add
            };
            Change { path: format!("/{}", rel.display()), kind }
        })
        .collect())
}

/// Bytes of regular file content under `root`, hardlinks counted once.
pub fn tree_size(root: &Path) -> Result<u64> {
    let mut entries = Vec::new();
    walk(root, Path::new(""), &mut entries)?;
    let mut seen = std::collections::HashSet::new();
    Ok(entries
        .iter()
        .filter(|(_, md)| md.is_file() && (md.nlink() == 1 || seen.insert((md.dev(), md.ino()))))
        .map(|(_, md)| md.len())
        .sum())
}

/// Counts used to size a layer image for a tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeCounts {
    pub inodes: u64,
    /// 4 KiB blocks for data, directories, long symlinks and xattrs.
    pub blocks: u64,
}

pub fn tree_counts(root: &Path) -> Result<TreeCounts> {
    let mut entries = Vec::new();
    walk(root, Path::new(""), &mut entries)?;
    let mut seen = std::collections::HashSet::new();
    let mut c = TreeCounts { inodes: 1, blocks: 1 };
    for (_, md) in &entries {
        if md.nlink() > 1 && !md.is_dir() && !seen.insert((md.dev(), md.ino())) {
            continue;
        }
        c.inodes += 1;
        c.blocks += if md.is_file() {
            // What the file occupies, not its apparent size: a sparse file's
            // holes stay holes in the image (mkfs.ext4 -d, cp keep them).
            let data = md.len().div_ceil(4096).min((md.blocks() * 512).div_ceil(4096));
            data + data / 340 // + extent tree blocks
        } else if md.is_dir() {
            md.len().div_ceil(4096).max(1)
        } else if md.file_type().is_symlink() && md.len() > 59 {
            1
        } else {
            0
        };
        // Many entries carry xattrs (capabilities, opaque markers): budget
        // one block per 16 entries.
    }
    c.blocks += c.inodes / 16;
    Ok(c)
}
