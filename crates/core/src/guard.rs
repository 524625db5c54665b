//! Guards that own what they made: dropped on a failure path (an early
//! return, a `?`, a panic), they undo it; kept, they let it stand.
//!
//! - [`Staged`]: a directory or file made for the duration of a request
//!   (a staging directory, a layer's temporary build in the store's
//!   `tmp/`, a new writable image's directory, a template or scratch image
//!   being made), removed on drop unless kept; never through a mount left
//!   inside it.
//! - [`Mounted`]: a mount, unmounted on drop (and its mount point
//!   directory removed) unless kept.
//!
//! A loop device needs no guard of its own: [`crate::sys::loopdev::LoopDevice`]
//! is attached with autoclear, so it detaches itself when its handle is
//! dropped, unless a mount keeps it (which is how it is kept).

use std::fs;
use std::path::{Path, PathBuf};

use crate::kernel::Kernel;
use crate::mount;

/// A path made by this request, removed on drop unless kept.
#[must_use = "dropping it removes the path"]
#[derive(Debug)]
pub struct Staged {
    path: PathBuf,
    keep: bool,
}

impl Staged {
    /// Owns `path` (already made).
    pub fn new(path: impl Into<PathBuf>) -> Staged {
        Staged { path: path.into(), keep: false }
    }

    /// Makes directory `path` and owns it.
    pub fn mkdir(path: impl Into<PathBuf>) -> crate::Result<Staged> {
        let path = path.into();
        fs::create_dir(&path).map_err(|e| crate::Error::sys("mkdir", &path, e))?;
        Ok(Staged::new(path))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets the path stand.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        let r = match fs::symlink_metadata(&self.path) {
            Ok(m) if m.is_dir() => {
                // Nothing is deleted through a mount left inside (a bind
                // whose unmount failed): it stays for the next start.
                if mount::mounts_under(&self.path).map_or(true, |v| !v.is_empty()) {
                    tracing::warn!(path = %self.path.display(), "a mount is left inside; not removing it");
                    return;
                }
                fs::remove_dir_all(&self.path)
            }
            Ok(_) => fs::remove_file(&self.path),
            Err(_) => return,
        };
        if let Err(e) = r {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove what a request left");
        }
    }
}

/// A mount made by this request through `kernel`, unmounted on drop
/// unless kept.
#[must_use = "dropping it unmounts"]
#[derive(Debug)]
pub struct Mounted<'k> {
    kernel: &'k dyn Kernel,
    target: PathBuf,
    keep: bool,
}

impl<'k> Mounted<'k> {
    /// Owns the mount at `target` (already mounted).
    pub fn new(kernel: &'k dyn Kernel, target: impl Into<PathBuf>) -> Mounted<'k> {
        Mounted { kernel, target: target.into(), keep: false }
    }

    /// Lets the mount stand.
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// Unmounts now and says whether that worked; on an error the mount is
    /// left (a caller may then keep what is under it).
    pub fn unmount(mut self) -> crate::Result<()> {
        self.keep = true;
        self.kernel.unmount(&self.target)?;
        let _ = fs::remove_dir(&self.target);
        Ok(())
    }
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        match self.kernel.unmount(&self.target) {
            Ok(()) => {
                let _ = fs::remove_dir(&self.target);
            }
            Err(e) => tracing::warn!(target = %self.target.display(), error = %e, "cannot undo a mount"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_goes_unless_kept() {
        let t = tempfile::tempdir().unwrap();
        let a = Staged::mkdir(t.path().join("a")).unwrap();
        fs::write(a.path().join("f"), "x").unwrap();
        let p = a.path().to_owned();
        drop(a);
        assert!(!p.exists());
        let b = Staged::mkdir(t.path().join("b")).unwrap();
        let p = b.path().to_owned();
        b.keep();
        assert!(p.exists());
        fs::write(t.path().join("f"), "x").unwrap();
        drop(Staged::new(t.path().join("f")));
        assert!(!t.path().join("f").exists());
    }
}
