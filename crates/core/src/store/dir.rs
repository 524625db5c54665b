//! A store directory (root or fallback, or a directory below one) behind
//! an open handle: every name below it is resolved by the kernel with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, and the last step of
//! each change (create, rename, unlink, mkdir) is a `*at` call on a parent
//! opened that way, which never follows the final name either. A symlink
//! another host plants anywhere below the base (`refs/<chain>` -> `/etc`)
//! makes the access fail with `ELOOP`; nothing outside the base is read,
//! written or deleted through it.
//!
//! The base itself is opened by path and followed: the operator chose it,
//! and it may be a symlink. A handle is opened per operation
//! ([`super::Store::dir`]), not kept for the daemon's life: a root the
//! operator mounts (or remounts) after the daemon started must be the one
//! used, not the directory it covers; and a long operation (a build, a
//! claim wait, promote's copy) opens the base again for its last step, so
//! a root unmounted meanwhile fails it over to fallback instead of
//! publishing into a detached filesystem.
//!
//! Paths (`Dir::join`) are still made, for messages and for what the
//! kernel only takes by name (mkfs, the loop device by name); they come
//! from here and from [`super::layout`].

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{
    fstat, fsync, mkdirat, openat, openat2, renameat, statat, unlinkat, AtFlags, FileType, Mode, OFlags, ResolveFlags,
    Stat,
};
use rustix::io::Errno;

use crate::error::{Context, Result};
use crate::ids::random_token;

/// How every name below a base is resolved.
const RESOLVE: ResolveFlags = ResolveFlags::BENEATH.union(ResolveFlags::NO_SYMLINKS).union(ResolveFlags::NO_MAGICLINKS);

/// A directory of the store, open.
#[derive(Debug)]
pub struct Dir {
    path: PathBuf,
    fd: OwnedFd,
}

/// An entry of a store directory: its name and what it is (not followed).
#[derive(Debug, Clone)]
pub struct Entry {
    pub name: String,
    pub kind: FileType,
}

fn loop_err() -> io::Error {
    io::Error::from_raw_os_error(libc::ELOOP)
}

/// `rel` split into the directory holding it and its last name, which
/// must be a plain name (not `.`, `..` or empty).
fn split(rel: &Path) -> io::Result<(&Path, &OsStr)> {
    match rel.components().next_back() {
        Some(Component::Normal(name)) => {
            let parent = rel.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            Ok((parent, name))
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: not a name", rel.display()))),
    }
}

impl Dir {
    /// Opens base directory `base`, following it if it is a symlink (the
    /// operator's choice).
    pub fn open(base: &Path) -> io::Result<Dir> {
        let open = |how: OFlags| rustix::fs::open(base, how | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty());
        // A directory this user may search and write but not list (NFS
        // with root_squash) still takes names: O_PATH is enough for that.
        let fd = open(OFlags::RDONLY).or_else(|e| if e == Errno::ACCESS { open(OFlags::PATH) } else { Err(e) })?;
        Ok(Dir { path: base.to_owned(), fd })
    }

    /// The directory's path, for messages and for tools that take a path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `rel` below this directory (for messages and tools; it
    /// is never opened by this module).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn beneath(&self, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() { Path::new(".") } else { rel };
        match openat2(&self.fd, rel, flags | OFlags::CLOEXEC, mode, RESOLVE) {
            // A symlink met (LOOP) or a path leaving the base (XDEV).
            Err(Errno::LOOP | Errno::XDEV) => {
                tracing::warn!(path = %self.join(rel).display(), "a symlink in the store; not followed");
                Err(loop_err())
            }
            r => Ok(r?),
        }
    }

    /// The directory `rel` below this one, open; never through a symlink.
    pub fn sub(&self, rel: impl AsRef<Path>) -> io::Result<Dir> {
        let rel = rel.as_ref();
        // No O_NOFOLLOW: RESOLVE_NO_SYMLINKS refuses a final symlink with
        // ELOOP (O_NOFOLLOW | O_DIRECTORY would say ENOTDIR).
        let fd = match self.beneath(rel, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) {
            // Searchable and writable but not listable: see Dir::open.
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                self.beneath(rel, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?
            }
            r => r?,
        };
        Ok(Dir { path: self.join(rel), fd })
    }

    /// [`Dir::sub`], making each missing directory on the way (0755).
    pub fn sub_made(&self, rel: impl AsRef<Path>) -> io::Result<Dir> {
        let mut d = self.sub("")?;
        for c in rel.as_ref().components() {
            let Component::Normal(name) = c else { return Err(io::ErrorKind::InvalidInput.into()) };
            match mkdirat(&d.fd, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
            d = d.sub(name)?;
        }
        Ok(d)
    }

    /// What `rel` is, not followed (`lstat` below the base).
    pub fn lstat(&self, rel: impl AsRef<Path>) -> io::Result<Stat> {
        let rel = rel.as_ref();
        // O_PATH|O_NOFOLLOW hands back a final symlink itself; a symlink
        // on the way fails.
        let (parent, name) = split(rel)?;
        let p = self.beneath(parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok(statat(&p, name, AtFlags::SYMLINK_NOFOLLOW)?)
    }

    /// Whether anything (even a symlink) has the name `rel`.
    pub fn exists(&self, rel: impl AsRef<Path>) -> bool {
        self.lstat(rel).is_ok()
    }

    /// Seconds since `rel` was last modified (`u64::MAX` when it cannot
    /// be told).
    pub fn age_secs(&self, rel: impl AsRef<Path>, now: u64) -> u64 {
        self.lstat(rel).map(|st| now.saturating_sub(st.st_mtime.max(0) as u64)).unwrap_or(u64::MAX)
    }

    /// The entries of directory `rel` (without `.` and `..`); nothing is
    /// followed.
    pub fn entries(&self, rel: impl AsRef<Path>) -> io::Result<Vec<Entry>> {
        let d = self.sub(rel)?;
        let mut v = Vec::new();
        for e in rustix::fs::Dir::read_from(&d.fd)? {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            let kind = match e.file_type() {
                FileType::Unknown => match statat(&d.fd, e.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => FileType::from_raw_mode(st.st_mode),
                    Err(_) => continue, // removed meanwhile
                },
                k => k,
            };
            v.push(Entry { name, kind });
        }
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Opens regular file `rel` for reading: never a symlink (`ELOOP`),
    /// never anything but a regular file (`InvalidData`): the name is
    /// opened `O_PATH` first, so a planted device node is never opened and
    /// a FIFO never blocks.
    pub fn open_regular(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        let rel = rel.as_ref();
        let pfd = self.beneath(rel, OFlags::PATH | OFlags::NOFOLLOW, Mode::empty())?;
        match FileType::from_raw_mode(fstat(&pfd)?.st_mode) {
            FileType::RegularFile => {}
            FileType::Symlink => return Err(loop_err()),
            _ => {
                let name = rel.file_name().unwrap_or(rel.as_os_str()).to_string_lossy();
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{name} is not a regular file")));
            }
        }
        // The very inode the O_PATH descriptor holds.
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(format!("/proc/self/fd/{}", pfd.as_raw_fd()))
    }

    /// Reads regular file `rel` ([`Dir::open_regular`]), at most `max`
    /// bytes (a larger one is `InvalidData`).
    pub fn read(&self, rel: impl AsRef<Path>, max: u64) -> io::Result<Vec<u8>> {
        let rel = rel.as_ref();
        let mut text = Vec::new();
        self.open_regular(rel)?.take(max + 1).read_to_end(&mut text)?;
        if text.len() as u64 > max {
            let name = rel.file_name().unwrap_or(rel.as_os_str()).to_string_lossy();
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{name} is larger than {max} bytes")));
        }
        Ok(text)
    }

    /// Creates the new file `rel` (`O_EXCL`, so nothing already there is
    /// opened or followed) with `mode`, open for writing.
    pub fn create_new(&self, rel: impl AsRef<Path>, mode: u32) -> io::Result<File> {
        let (parent, name) = split(rel.as_ref())?;
        let p = self.beneath(parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(openat(&p, name, flags, Mode::from_bits_truncate(mode))?.into())
    }

    /// Makes sure the empty marker file `rel` exists (a reference): a
    /// regular file already there is kept as it is; anything else there
    /// (a symlink, a FIFO) is refused, never opened.
    pub fn touch(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let rel = rel.as_ref();
        match self.create_new(rel, 0o644) {
            Ok(f) => drop(f),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                let kind = FileType::from_raw_mode(self.lstat(rel)?.st_mode);
                if kind == FileType::Symlink {
                    tracing::warn!(path = %self.join(rel).display(), "a symlink in the store; not followed");
                    return Err(loop_err());
                }
                if kind != FileType::RegularFile {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
                }
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Writes `data` to `rel` crash-atomically: a new temporary file beside
    /// it, fsync, rename over the name, fsync the directory.
    pub fn write_atomic(&self, rel: impl AsRef<Path>, data: &[u8], mode: u32) -> Result<()> {
        let rel = rel.as_ref();
        let (parent, name) = split(rel).ctx("write", self.join(rel))?;
        let dir = self.sub(parent).ctx("open", self.join(parent))?;
        let tmp = format!(".{}.{}", name.to_string_lossy(), random_token());
        let r = (|| {
            let mut f = dir.create_new(&tmp, mode).ctx("create", dir.join(&tmp))?;
            f.write_all(data).ctx("write", dir.join(&tmp))?;
            f.sync_all().ctx("fsync", dir.join(&tmp))?;
            renameat(&dir.fd, tmp.as_str(), &dir.fd, name).ctx("rename", self.join(rel))?;
            dir.fsync()
        })();
        if r.is_err() {
            let _ = unlinkat(&dir.fd, tmp.as_str(), AtFlags::empty());
        }
        r
    }

    /// fsyncs this directory.
    pub fn fsync(&self) -> Result<()> {
        fsync(&self.fd).ctx("fsync", &self.path)
    }

    /// Removes the file (or symlink) `rel`; a symlink on the way is `ELOOP`.
    pub fn remove_file(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let (parent, name) = split(rel.as_ref())?;
        let p = self.beneath(parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok(unlinkat(&p, name, AtFlags::empty())?)
    }

    /// Removes the empty directory `rel`.
    pub fn remove_dir(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let (parent, name) = split(rel.as_ref())?;
        let p = self.beneath(parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok(unlinkat(&p, name, AtFlags::REMOVEDIR)?)
    }

    /// Removes `rel` and, when it is a directory, everything in it; a
    /// symlink inside is removed, never followed.
    pub fn remove_tree(&self, rel: impl AsRef<Path>) -> io::Result<()> {
        let (parent, name) = split(rel.as_ref())?;
        let p = self.beneath(parent, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        remove_at(p.as_fd(), name)
    }

    /// Renames `from` to `to`, both below this directory; neither name is
    /// followed.
    pub fn rename(&self, from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
        let (fp, fname) = split(from.as_ref())?;
        let (tp, tname) = split(to.as_ref())?;
        let f = self.beneath(fp, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        let t = self.beneath(tp, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
        Ok(renameat(&f, fname, &t, tname)?)
    }

    /// A new directory below this one named `<prefix>-<token>`, open.
    pub fn mkdir_unique(&self, prefix: &str) -> Result<(String, Dir)> {
        let name = format!("{prefix}-{}", random_token());
        mkdirat(&self.fd, name.as_str(), Mode::from_bits_truncate(0o755)).ctx("mkdir", self.join(&name))?;
        let d = self.sub(&name).ctx("open", self.join(&name))?;
        Ok((name, d))
    }
}

/// Removes `name` in `dir`, recursively, through descriptors only.
fn remove_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = match statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return match unlinkat(dir, name, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        };
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let sub = openat(dir, name, flags, Mode::empty())?;
    let names: Vec<std::ffi::CString> = rustix::fs::Dir::read_from(&sub)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_owned())
        .filter(|n| n.as_bytes() != b"." && n.as_bytes() != b"..")
        .collect();
    for n in names {
        use std::os::unix::ffi::OsStrExt as _;
        remove_at(sub.as_fd(), OsStr::from_bytes(n.as_bytes()))?;
    }
    match unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A build directory below `tmp/`, removed (through its parent's handle)
/// on drop unless kept.
#[must_use = "dropping it removes the build"]
pub(crate) struct Building {
    pub(crate) tmp: Dir,
    pub(crate) name: String,
    pub(crate) dir: Dir,
    keep: bool,
}

impl Building {
    pub(crate) fn new(tmp: Dir, prefix: &str) -> Result<Building> {
        let (name, dir) = tmp.mkdir_unique(prefix)?;
        Ok(Building { tmp, name, dir, keep: false })
    }

    pub(crate) fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = self.tmp.remove_tree(&self.name) {
                let p = self.dir.path().display().to_string();
                tracing::warn!(path = %p, error = %e, "cannot remove a temporary build; gc sweeps it");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::symlink;

    use super::*;

    /// A base (reached through a symlink, as an operator may set it up)
    /// and a directory outside it with a file that must stay.
    fn rig() -> (tempfile::TempDir, Dir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (real, outside) = (t.path().join("real"), t.path().join("outside"));
        fs::create_dir_all(&real).unwrap();
        fs::create_dir_all(outside.join("sub")).unwrap();
        fs::write(outside.join("f"), "keep").unwrap();
        symlink(&real, t.path().join("base")).unwrap();
        let d = Dir::open(&t.path().join("base")).unwrap();
        (t, d, outside)
    }

    fn intact(outside: &Path) {
        assert_eq!(fs::read_to_string(outside.join("f")).unwrap(), "keep");
        assert!(outside.join("sub").is_dir());
        assert_eq!(fs::read_dir(outside).unwrap().count(), 2, "something was made outside");
    }

    fn is_loop(e: io::Error) -> bool {
        e.raw_os_error() == Some(libc::ELOOP)
    }

    #[test]
    fn nothing_below_the_base_is_followed() {
        let (_t, d, outside) = rig();
        symlink(&outside, d.join("l")).unwrap();
        symlink(outside.join("f"), d.join("f")).unwrap();
        assert!(is_loop(d.sub("l").unwrap_err()));
        assert!(is_loop(d.sub_made("l/x").unwrap_err()));
        assert!(is_loop(d.entries("l").unwrap_err()));
        assert!(is_loop(d.read("f", 100).unwrap_err()));
        assert!(is_loop(d.read("l/f", 100).unwrap_err()));
        assert!(is_loop(d.touch("f").unwrap_err()));
        assert!(is_loop(d.create_new("l/new", 0o644).unwrap_err()));
        assert!(is_loop(d.remove_file("l/f").unwrap_err()));
        assert!(is_loop(d.remove_tree("l/sub").unwrap_err()));
        assert!(is_loop(d.rename("l/f", "g").unwrap_err()));
        assert!(d.write_atomic("l/f", b"x", 0o644).is_err());
        assert!(d.lstat("f").is_ok_and(|s| FileType::from_raw_mode(s.st_mode) == FileType::Symlink));
        assert!(!d.exists("l/f"));
        assert!(d.sub("../outside").is_err() && d.read("/etc/hostname", 100).is_err());
        intact(&outside);
        // A link is itself replaced or removed, never its target.
        d.write_atomic("f", b"new", 0o644).unwrap();
        assert_eq!(d.read("f", 100).unwrap(), b"new");
        d.remove_tree("l").unwrap();
        intact(&outside);
    }

    #[test]
    fn a_tree_is_removed_without_following_the_links_in_it() {
        let (_t, d, outside) = rig();
        let sub = d.sub_made("a/b/c").unwrap();
        fs::write(sub.join("x"), "x").unwrap();
        symlink(&outside, sub.join("out")).unwrap();
        symlink(outside.join("f"), d.join("a/f")).unwrap();
        d.remove_tree("a").unwrap();
        assert!(!d.exists("a"));
        intact(&outside);
        d.remove_tree("a").unwrap(); // gone already: fine
    }

    #[test]
    fn fifos_and_devices_are_never_opened() {
        let (_t, d, outside) = rig();
        rustix::fs::mknodat(d.fd(), "p", FileType::Fifo, Mode::from_bits_truncate(0o600), 0).unwrap();
        let e = d.read("p", 100).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        assert!(d.touch("p").is_err());
        d.touch("r").unwrap();
        d.touch("r").unwrap();
        assert_eq!(d.read("r", 100).unwrap(), b"");
        fs::write(d.join("big"), [0u8; 10]).unwrap();
        assert_eq!(d.read("big", 4).unwrap_err().kind(), io::ErrorKind::InvalidData);
        intact(&outside);
    }
}
