//! The fake kernel's trees: images as tars, copies into mount points.

use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};
use crate::ids::Bytes;

/// A sparse file of `size` (a fresh image: reads as an empty tar).
pub(super) fn sparse(out: &Path, size: Bytes, mode: u32) -> Result<()> {
    let f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(out).ctx("create", out)?;
    f.set_len(size.0).ctx("truncate", out)
}

/// Packs the tree at `dir` into `file` (from its start, replacing what it
/// held). Directories, files and symlinks; other kinds are left out.
pub(super) fn write_tar(dir: &Path, file: &File) -> io::Result<()> {
    let mut f = file.try_clone()?;
    f.set_len(0)?;
    f.rewind()?;
    let mut b = tar::Builder::new(io::BufWriter::new(f));
    b.follow_symlinks(false);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let name = rel.join(e.file_name());
            let md = fs::symlink_metadata(e.path())?;
            let ft = md.file_type();
            if ft.is_dir() || ft.is_file() || ft.is_symlink() {
                b.append_path_with_name(e.path(), &name)?;
            }
            if ft.is_dir() {
                stack.push(name);
            }
        }
    }
    let mut w = b.into_inner()?;
    w.flush()?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Unpacks the tar in `file` into `dir`. A file of zeros (a fresh sparse
/// image) holds nothing.
pub(super) fn read_tar(file: &File, dir: &Path) -> io::Result<()> {
    let mut f = file.try_clone()?;
    f.rewind()?;
    let mut head = [0u8; 512];
    let n = f.read(&mut head)?;
    if n < 512 || head.iter().all(|b| *b == 0) {
        return Ok(());
    }
    f.rewind()?;
    let mut a = tar::Archive::new(io::BufReader::new(f));
    a.set_preserve_permissions(true);
    a.set_preserve_mtime(true);
    a.set_overwrite(true);
    a.unpack(dir)
}

/// Copies the tree at `src` into `dst` (existing), over what is there.
pub(super) fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    for e in fs::read_dir(src)? {
        let e = e?;
        let (from, to) = (e.path(), dst.join(e.file_name()));
        let md = fs::symlink_metadata(&from)?;
        let ft = md.file_type();
        if ft.is_dir() {
            if !fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir()) {
                let _ = fs::remove_file(&to);
                fs::create_dir(&to)?;
            }
            fs::set_permissions(&to, fs::Permissions::from_mode(0o700))?;
            copy_tree(&from, &to)?;
            fs::set_permissions(&to, fs::Permissions::from_mode(md.mode() & 0o7777))?;
        } else if ft.is_file() || ft.is_symlink() {
            if fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir()) {
                clear(&to).map_err(io::Error::other)?;
                fs::remove_dir(&to)?;
            } else {
                let _ = fs::remove_file(&to);
            }
            if ft.is_symlink() {
                std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            } else {
                fs::copy(&from, &to)?;
            }
        }
    }
    Ok(())
}

/// Removes everything inside `dir` (made writable first: a tree unpacked
/// from a layer may have read-only directories).
pub(super) fn clear(dir: &Path) -> Result<()> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::sys("read dir", dir, e)),
    };
    for e in rd {
        let p = e.ctx("read dir", dir)?.path();
        let md = fs::symlink_metadata(&p).ctx("stat", &p)?;
        if md.is_dir() {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).ctx("chmod", &p)?;
            clear(&p)?;
            fs::remove_dir(&p).ctx("rmdir", &p)?;
        } else {
            fs::remove_file(&p).ctx("remove", &p)?;
        }
    }
    Ok(())
}
