//! A published layer image opened once, for checking and attaching.
//!
//! The check before a mount (`sharedloop.verify`) and the loop device must
//! see the same file: a host that hashes `layer.img` by path and then lets
//! the loop device open it by path again mounts whatever a peer renamed
//! over the name in between. So the image is opened once, here, without
//! following links (`ImageFile::open_beneath`, through
//! `LayerInfo::open_image`); it is identified by `fstat` of
//! that descriptor ([`FileId`]), hashed through it, given to fsck as
//! `/proc/<pid>/fd/<n>`, and attached to the loop device by descriptor
//! ([`crate::sys::loopdev::attach_file`]).
//!
//! Opening never opens anything but a regular file: the name is first
//! opened `O_PATH` (which reads nothing and never blocks, whatever the
//! inode is), checked with `fstat`, and only a regular file is reopened for
//! reading through the descriptor. Nothing below the store directory is
//! followed when it is a symlink (as everywhere in the store).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{fstat, openat2, FileType, Mode, OFlags, ResolveFlags, Stat};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};

/// What identifies the contents of an image file without reading it: the
/// inode and its size and times. A writer changes size, mtime or ctime
/// (a rename over the name changes the inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl FileId {
    fn of(st: &Stat) -> FileId {
        let ts = |s: i64, ns: i64| s as i128 * 1_000_000_000 + ns as i128;
        FileId {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ts(st.st_mtime, st.st_mtime_nsec as i64),
            ctime_ns: ts(st.st_ctime, st.st_ctime_nsec as i64),
        }
    }
}

/// What the publisher saw of a finished, fsynced image file, recorded in
/// `meta.json` (`image_file`): size, mtime and ctime. With
/// `sharedloop.verify=identity` a host mounts the image when the file it
/// opened still shows them, without reading it. Not the inode or device:
/// they differ between the clients of a network filesystem (sshfs, FUSE),
/// and renaming the layer directory into place changes neither time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStamp {
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

const NS: i128 = 1_000_000_000;

/// Two times are the same file time. A filesystem that keeps whole seconds
/// only (sshfs: SFTP carries seconds) shows a time with no nanoseconds;
/// against such a time only the seconds are compared, so a stamp taken on
/// the file server's own filesystem matches what an sshfs client sees, and
/// the other way round.
fn same_time(a: i128, b: i128) -> bool {
    a == b || ((a.rem_euclid(NS) == 0 || b.rem_euclid(NS) == 0) && a.div_euclid(NS) == b.div_euclid(NS))
}

impl ImageStamp {
    pub fn of(id: FileId) -> ImageStamp {
        ImageStamp { size: id.size, mtime_ns: id.mtime_ns, ctime_ns: id.ctime_ns }
    }

    /// What differs between this stamp and file `seen`; `None` when the file
    /// is the one stamped.
    ///
    /// ctime cannot be set by a writer (any change moves it to "now"), so
    /// it is what catches an mtime put back with `touch -d`. A filesystem
    /// without ctime of its own shows mtime as ctime (sshfs): a file whose
    /// ctime is its mtime, and whose mtime matches, is taken as unchanged,
    /// because on a filesystem that keeps ctime, a change after the stamp
    /// would have moved ctime past the stamped mtime.
    pub fn differs(&self, seen: FileId) -> Option<String> {
        let mut what = Vec::new();
        if seen.size != self.size {
            what.push(format!("size is {} bytes, {} were published", seen.size, self.size));
        }
        let mtime_ok = same_time(seen.mtime_ns, self.mtime_ns);
        if !mtime_ok {
            what.push(format!("mtime is {}, {} was published", show(seen.mtime_ns), show(self.mtime_ns)));
        }
        let mirrored = same_time(seen.ctime_ns, seen.mtime_ns) && mtime_ok;
        if !same_time(seen.ctime_ns, self.ctime_ns) && !mirrored {
            what.push(format!("ctime is {}, {} was published", show(seen.ctime_ns), show(self.ctime_ns)));
        }
        (!what.is_empty()).then(|| what.join("; "))
    }
}

/// A file time as seconds.nanoseconds since the epoch.
fn show(ns: i128) -> String {
    format!("{}.{:09}", ns.div_euclid(NS), ns.rem_euclid(NS))
}

/// What opening an image found.
#[derive(Debug)]
pub enum Opened {
    File(ImageFile),
    /// Nothing has that name.
    Missing,
    /// The name is not a regular file (a symlink, a device node, a FIFO,
    /// ...), or is reached through a symlink; it was not opened for reading.
    NotRegular(&'static str),
}

/// An image file open for reading, with its identity when opened.
#[derive(Debug)]
pub struct ImageFile {
    path: PathBuf,
    file: File,
    at_open: FileId,
}

fn kind_name(ft: FileType) -> &'static str {
    match ft {
        FileType::RegularFile => "a regular file",
        FileType::Directory => "a directory",
        FileType::Symlink => "a symbolic link",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice => "a character device",
        FileType::BlockDevice => "a block device",
        FileType::Unknown => "of an unknown type",
    }
}

impl ImageFile {
    /// Opens `rel` below directory `dir` for reading if it is a regular
    /// file, following no symlink; `path` names it in messages.
    pub(crate) fn open_beneath(dir: BorrowedFd<'_>, rel: &Path, path: &Path) -> Result<Opened> {
        let pfd = match openat2(
            dir,
            rel,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(Opened::Missing),
            Err(Errno::LOOP | Errno::XDEV) => return Ok(Opened::NotRegular("reached through a symbolic link")),
            Err(Errno::NOTDIR) => return Ok(Opened::NotRegular("below something that is not a directory")),
            Err(e) => return Err(Error::sys("open", path, e)),
        };
        let st = fstat(&pfd).ctx("stat", path)?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if ft != FileType::RegularFile {
            return Ok(Opened::NotRegular(kind_name(ft)));
        }
        // Reopen the very inode the O_PATH descriptor holds, for reading.
        let file = File::open(format!("/proc/self/fd/{}", pfd.as_raw_fd())).ctx("open", path)?;
        let at_open = FileId::of(&fstat(file.as_fd()).ctx("stat", path)?);
        if (at_open.dev, at_open.ino) != (st.st_dev, st.st_ino) {
            return Err(Error::Corrupt {
                path: path.to_owned(),
                reason: "the file changed while it was opened".into(),
            });
        }
        Ok(Opened::File(ImageFile { path: path.to_owned(), file, at_open }))
    }

    /// What [`Self::open_beneath`] found at `path`, as a file to mount: anything
    /// but a regular file is an error naming what it is.
    pub(crate) fn for_mount(opened: Opened, path: &Path) -> Result<ImageFile> {
        match opened {
            Opened::File(f) => Ok(f),
            Opened::Missing => Err(Error::sys("open", path, std::io::Error::from_raw_os_error(libc::ENOENT))),
            Opened::NotRegular(kind) => Err(Error::Corrupt {
                path: path.to_owned(),
                reason: format!("{kind}, not a regular file; refusing to mount it (links are not followed)"),
            }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's identity when it was opened.
    pub fn at_open(&self) -> FileId {
        self.at_open
    }

    /// The file's identity now (`fstat` of the open descriptor).
    pub fn now(&self) -> Result<FileId> {
        Ok(FileId::of(&fstat(self.file.as_fd()).ctx("stat", &self.path)?))
    }

    /// A path other processes (fsck) can open to reach this very file.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()))
    }

    /// The sha256 of the file's contents, read through the open descriptor;
    /// `progress` is told how many bytes were read.
    pub fn sha256(&self, progress: &mut dyn FnMut(u64)) -> Result<String> {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = 0u64;
        loop {
            let n = match self.file.read_at(&mut buf, pos) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::sys("read", &self.path, e)),
            };
            h.update(&buf[..n]);
            pos += n as u64;
            progress(n as u64);
        }
        Ok(hex::encode(h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(size: u64, mtime_ns: i128, ctime_ns: i128) -> FileId {
        FileId { dev: 1, ino: 2, size, mtime_ns, ctime_ns }
    }

    #[test]
    fn a_stamp_matches_the_file_it_was_taken_of_only() {
        let s = ImageStamp { size: 10, mtime_ns: 5 * NS + 7, ctime_ns: 6 * NS + 1 };
        assert_eq!(s.differs(id(10, 5 * NS + 7, 6 * NS + 1)), None);
        // Inode and device are not part of it.
        assert_eq!(s.differs(FileId { dev: 9, ino: 9, ..id(10, 5 * NS + 7, 6 * NS + 1) }), None);
        assert!(s.differs(id(11, 5 * NS + 7, 6 * NS + 1)).unwrap().contains("size is 11 bytes"));
        assert!(s.differs(id(10, 5 * NS + 8, 6 * NS + 1)).unwrap().contains("mtime is 5.000000008"));
        // mtime put back (touch -d): ctime moved on.
        assert!(s.differs(id(10, 5 * NS + 7, 9 * NS + 3)).unwrap().contains("ctime is 9.000000003"));
    }

    #[test]
    fn a_stamp_matches_across_whole_second_filesystems() {
        // Stamped on the file server's filesystem, seen through sshfs:
        // whole seconds, ctime shown as mtime.
        let s = ImageStamp { size: 10, mtime_ns: 5 * NS + 7, ctime_ns: 6 * NS + 1 };
        assert_eq!(s.differs(id(10, 5 * NS, 5 * NS)), None);
        assert!(s.differs(id(10, 4 * NS, 4 * NS)).is_some());
        // Stamped through sshfs, seen on the server.
        let s = ImageStamp { size: 10, mtime_ns: 5 * NS, ctime_ns: 5 * NS };
        assert_eq!(s.differs(id(10, 5 * NS + 7, 5 * NS + 9)), None);
        assert!(s.differs(id(10, 5 * NS + 7, 8 * NS)).is_some());
    }
}
