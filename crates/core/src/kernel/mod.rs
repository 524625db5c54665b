//! The seam between the driver's logic and the kernel: loop devices,
//! mounts, the mount table, image builds and fsck.
//!
//! Everything the driver and the layer mount table ask of the kernel goes
//! through [`Kernel`]. [`Host`] is the real one (the functions of
//! [`crate::mount`], [`crate::sys::loopdev`] and [`crate::image`]);
//! [`fake::FakeKernel`] records calls, keeps a mount table of its own,
//! holds or fails calls on demand, and needs no privilege, so reference
//! counting, reconcile, removal, commit and their failure paths are tested
//! without root in seconds (`crates/core/tests/fake_*.rs`), beside the
//! real-kernel tests, which stay.
//!
//! What is not behind the seam: reading and writing files (the store, the
//! tar extraction, digests), `flock`, and the read-only look at
//! `/proc/self/mountinfo` that the staging guard (`guard::Staged`) takes before it
//! deletes a directory (a fake mount is a plain directory, so deleting
//! through it deletes nothing that matters).

pub mod fake;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::apply::stream::TarPlan;
use crate::error::{Context, Result};
use crate::export::TreeCounts;
use crate::ids::Bytes;
use crate::mount::{self, MountEntry, OverlaySpec};
use crate::options::{Config, FsType};
use crate::sys::loopdev::{self, AttachOptions, LoopDevice};

/// What the driver needs of the kernel. Paths are absolute.
pub trait Kernel: Send + Sync + std::fmt::Debug {
    /// Refuses a kernel that lacks what the driver needs (see
    /// [`Config::check_kernel`]).
    fn check(&self, cfg: &Config) -> Result<()>;

    /// Attaches the open `file` to a free loop device (autoclear: it goes
    /// with the handle unless a mount keeps it). `name` is the label.
    fn attach(&self, file: &File, name: &Path, opts: AttachOptions) -> io::Result<LoopDevice>;
    /// Attaches the file at `path`, opened for writing unless read-only.
    fn attach_path(&self, path: &Path, opts: AttachOptions) -> io::Result<LoopDevice> {
        let file = OpenOptions::new().read(true).write(!opts.read_only).open(path)?;
        self.attach(&file, path, opts)
    }
    /// Attached loop devices with their backing files.
    fn loop_devices(&self) -> Vec<(PathBuf, PathBuf)>;

    /// Mounts a layer image's device at `target`: read-only (a published
    /// layer) or read-write (a writable layer's image).
    fn mount_image(&self, dev: &Path, target: &Path, fs: FsType, rw: bool) -> Result<()>;
    /// Mounts the staging scratch image's device at `target`
    /// (`nodev,nosuid,noexec,discard`).
    fn mount_scratch(&self, dev: &Path, target: &Path) -> Result<()>;
    /// Mounts an overlay stack at `target`.
    fn mount_overlay(&self, spec: &OverlaySpec<'_>, target: &Path) -> Result<()>;
    /// Binds `src` onto `target`, read-only when `!rw`.
    fn bind(&self, src: &Path, target: &Path, rw: bool) -> Result<()>;
    /// Whether the directory `target` shows is directory `src` itself (the
    /// same inode: `target` is `src` or a bind of it).
    fn shows(&self, target: &Path, src: &Path) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let (x, y) = (std::fs::metadata(target).ctx("stat", target)?, std::fs::metadata(src).ctx("stat", src)?);
        Ok((x.dev(), x.ino()) == (y.dev(), y.ino()))
    }
    /// Moves the mount at `from` to `to`.
    fn move_mount(&self, from: &Path, to: &Path) -> Result<()>;
    /// Unmounts `target` (a busy one is retried a bounded number of
    /// times); one that is not mounted is fine.
    fn unmount(&self, target: &Path) -> Result<()>;
    /// Detaches `target` now; the filesystem goes with its last user.
    fn detach(&self, target: &Path) -> Result<()>;
    /// Makes `dir` a private mount (a bind of itself if need be).
    fn make_private(&self, dir: &Path) -> Result<()>;
    /// Makes `dir` a `nodev,nosuid,noexec` bind of itself.
    fn make_inert(&self, dir: &Path) -> Result<()>;

    /// This process's mounts.
    fn mountinfo(&self) -> Result<Vec<MountEntry>>;
    /// The mounts at or below `dir` that paths there reach.
    fn mounts_under(&self, dir: &Path) -> Result<Vec<MountEntry>>;
    /// Whether `p` is the root of the mount a lookup of it reaches.
    fn is_mountpoint(&self, p: &Path) -> bool;

    /// Builds a read-only layer image at `out` from `staging`; returns
    /// its size.
    fn build_layer_image(&self, staging: &Path, out: &Path, counts: TreeCounts, fs: FsType) -> Result<Bytes>;
    /// The tool that builds ext4 layer images in one pass from a tar
    /// (its version line), or why there is none; `scratch` is a local
    /// directory for a probe.
    fn one_pass_tool(&self, _scratch: &Path) -> std::result::Result<String, String> {
        Err("this kernel builds every layer from a staging directory".into())
    }
    /// Builds a read-only ext4 layer image at `out` in one pass from the
    /// tar in `spool`, planned as `plan`; returns its size. Only where
    /// [`Kernel::one_pass_tool`] has a tool.
    /// `scratch` is a local directory for an image built to be copied.
    fn build_layer_image_from_tar(
        &self,
        _spool: &std::fs::File,
        _plan: &TarPlan,
        out: &Path,
        _scratch: &Path,
    ) -> Result<Bytes> {
        Err(crate::error::Error::Invalid(format!("no one-pass build for {}", out.display())))
    }
    /// Makes an empty writable layer image at `out`.
    fn create_rw_image(&self, out: &Path, fs: FsType, size: Bytes, templates: &Path) -> Result<()>;
    /// Makes the staging scratch image at `out`.
    fn create_scratch_image(&self, out: &Path, size: Bytes) -> Result<()>;
    /// A read-only fsck of image `img`: `None` when clean, else what the
    /// checker said.
    fn fsck(&self, img: &Path, fs: FsType) -> Result<Option<String>>;
}

/// The kernel itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Host;

impl Host {
    pub fn shared() -> Arc<dyn Kernel> {
        Arc::new(Host)
    }
}

impl Kernel for Host {
    fn check(&self, cfg: &Config) -> Result<()> {
        cfg.check_kernel()
    }
    fn attach(&self, file: &File, name: &Path, opts: AttachOptions) -> io::Result<LoopDevice> {
        loopdev::attach_file(file, name, opts)
    }
    fn loop_devices(&self) -> Vec<(PathBuf, PathBuf)> {
        loopdev::list()
    }
    fn mount_image(&self, dev: &Path, target: &Path, fs: FsType, rw: bool) -> Result<()> {
        if rw {
            mount::mount_layer_rw(dev, target, fs)
        } else {
            mount::mount_layer_ro(dev, target, fs)
        }
    }
    fn mount_scratch(&self, dev: &Path, target: &Path) -> Result<()> {
        use rustix::mount::MountFlags;
        // discard: freed staging blocks are punched out of the sparse file.
        rustix::mount::mount(
            dev,
            target,
            "ext4",
            MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC,
            c"discard",
        )
        .ctx("mount scratch image", target)
    }
    fn mount_overlay(&self, spec: &OverlaySpec<'_>, target: &Path) -> Result<()> {
        mount::mount_overlay(spec, target)
    }
    fn bind(&self, src: &Path, target: &Path, rw: bool) -> Result<()> {
        rustix::mount::mount_bind(src, target).ctx("bind", target)?;
        if !rw {
            use rustix::mount::MountFlags;
            if let Err(e) = rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, c"") {
                let _ = mount::unmount_path(target);
                return Err(crate::Error::sys("remount read-only", target, e));
            }
        }
        Ok(())
    }
    fn move_mount(&self, from: &Path, to: &Path) -> Result<()> {
        rustix::mount::mount_move(from, to).ctx("move mount", from)
    }
    fn unmount(&self, target: &Path) -> Result<()> {
        mount::unmount_path(target)
    }
    fn detach(&self, target: &Path) -> Result<()> {
        mount::detach_path(target)
    }
    fn make_private(&self, dir: &Path) -> Result<()> {
        mount::make_private(dir)
    }
    fn make_inert(&self, dir: &Path) -> Result<()> {
        mount::make_inert(dir)
    }
    fn mountinfo(&self) -> Result<Vec<MountEntry>> {
        mount::mountinfo()
    }
    fn mounts_under(&self, dir: &Path) -> Result<Vec<MountEntry>> {
        mount::mounts_under(dir)
    }
    fn is_mountpoint(&self, p: &Path) -> bool {
        mount::is_mountpoint(p)
    }
    fn build_layer_image(&self, staging: &Path, out: &Path, counts: TreeCounts, fs: FsType) -> Result<Bytes> {
        crate::image::build_layer_image(staging, out, counts, fs)
    }
    fn one_pass_tool(&self, scratch: &Path) -> std::result::Result<String, String> {
        crate::image::one_pass_tool(scratch)
    }
    fn build_layer_image_from_tar(
        &self,
        spool: &std::fs::File,
        plan: &TarPlan,
        out: &Path,
        scratch: &Path,
    ) -> Result<Bytes> {
        crate::image::build_layer_image_from_tar(spool, plan, out, scratch)
    }
    fn create_rw_image(&self, out: &Path, fs: FsType, size: Bytes, templates: &Path) -> Result<()> {
        crate::image::create_rw_image(out, fs, size, templates)
    }
    fn create_scratch_image(&self, out: &Path, size: Bytes) -> Result<()> {
        crate::image::create_scratch_image(out, size)
    }
    fn fsck(&self, img: &Path, fs: FsType) -> Result<Option<String>> {
        crate::admin::fsck(img, fs)
    }
}
