//! A kernel for tests: no privilege, no loop device, no mount.
//!
//! [`FakeKernel`] keeps a mount table of its own and shows a mount's
//! content by copying it into the mount point, so the driver's logic runs
//! on plain directories:
//! - a layer image is a tar of the tree it was built from
//!   ([`Kernel::build_layer_image`]); mounting it unpacks the tar into the
//!   mount point, unmounting clears the mount point, and unmounting a
//!   writable image first packs the mount point back into the image file;
//! - an overlay mount copies its lower layers (bottom first) and its upper
//!   into the mount point. Writes through it go nowhere: a test writes a
//!   container's changes into the upper directory;
//! - a bind copies its source; a bind of a directory onto itself
//!   ([`Kernel::make_private`], [`Kernel::make_inert`]) changes nothing.
//!
//! It behaves as the kernel does where the driver's logic depends on it:
//! a mount point must exist, a mount with mounts below it is busy, a
//! device must be attached before it is mounted, an unmount of what is not
//! mounted is fine.
//!
//! Tests steer it: every call is recorded ([`FakeKernel::calls`],
//! [`FakeKernel::count`]); [`FakeKernel::fail`] makes the next calls of an
//! operation (on a path containing a text) fail with an errno; and
//! [`FakeKernel::hold`] parks the callers of an operation until
//! [`FakeKernel::release`], with [`FakeKernel::wait_parked`] to see them
//! arrive: how a test shows that one slow first mount stalls no other.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustix::io::Errno;

use super::Kernel;
use tree::{clear, copy_tree, read_tar, sparse, write_tar};

mod tree;
use crate::error::{Context, Error, Result};
use crate::export::TreeCounts;
use crate::ids::Bytes;
use crate::mount::{MountEntry, OverlaySpec};
use crate::options::{Config, FsType};
use crate::sys::loopdev::{AttachOptions, LoopDevice};

/// The operations of [`Kernel`], for recording, failing and holding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Attach,
    MountImage,
    MountScratch,
    MountOverlay,
    Bind,
    MoveMount,
    Unmount,
    Detach,
    MakePrivate,
    MakeInert,
    BuildImage,
    CreateRwImage,
    CreateScratchImage,
    Fsck,
}

/// One recorded call: the operation and the path it was about (the
/// target of a mount, the image of a build or fsck, the file of an attach).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub op: Op,
    pub path: PathBuf,
}

#[derive(Debug)]
enum Content {
    /// An image's tree, unpacked; written back on unmount when `rw`.
    Image { file: File, rw: bool },
    /// A copy (overlay, bind); dropped on unmount.
    Copy,
    /// A bind of a directory onto itself: the directory as it is.
    Itself,
}

#[derive(Debug)]
struct FakeMount {
    entry: MountEntry,
    content: Content,
}

#[derive(Debug)]
struct Failure {
    op: Op,
    path_has: String,
    errno: Errno,
    times: usize,
}

#[derive(Debug, Default)]
struct St {
    mounts: Vec<FakeMount>,
    next_id: u64,
    /// Attached devices: path -> (backing name, the open file).
    devs: HashMap<PathBuf, (PathBuf, File)>,
    next_loop: u32,
    calls: Vec<Call>,
    failures: Vec<Failure>,
    held: HashSet<Op>,
    parked: HashMap<Op, usize>,
}

/// See the module documentation.
#[derive(Debug, Default)]
pub struct FakeKernel {
    st: Mutex<St>,
    changed: Condvar,
}

/// How long [`FakeKernel::wait_parked`] waits before it gives up: a test
/// waiting this long is stuck (a deadlock), not slow.
const STUCK: Duration = Duration::from_secs(60);

impl FakeKernel {
    pub fn new() -> Arc<FakeKernel> {
        Arc::new(FakeKernel::default())
    }

    fn lock(&self) -> MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// How many calls of `op` there were.
    pub fn count(&self, op: Op) -> usize {
        self.lock().calls.iter().filter(|c| c.op == op).count()
    }

    /// How many calls of `op` were about a path containing `text`.
    pub fn count_on(&self, op: Op, text: &str) -> usize {
        self.lock().calls.iter().filter(|c| c.op == op && c.path.to_string_lossy().contains(text)).count()
    }

    /// The next `times` calls of `op` about a path containing `path_has`
    /// (any path when empty) fail with `errno`.
    pub fn fail(&self, op: Op, path_has: &str, errno: Errno, times: usize) {
        self.lock().failures.push(Failure { op, path_has: path_has.to_owned(), errno, times });
    }

    /// Calls of `op` wait from now until [`Self::release`].
    pub fn hold(&self, op: Op) {
        self.lock().held.insert(op);
    }

    /// Lets the calls of `op` held by [`Self::hold`] go on.
    pub fn release(&self, op: Op) {
        self.lock().held.remove(&op);
        self.changed.notify_all();
    }

    /// Waits until `n` calls of `op` are held; panics when that does not
    /// happen within a minute (the test is stuck), letting every held call
    /// go first so that the threads making them can end.
    pub fn wait_parked(&self, op: Op, n: usize) {
        let until = Instant::now() + STUCK;
        let mut st = self.lock();
        while st.parked.get(&op).copied().unwrap_or(0) < n {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.held.clear();
                self.changed.notify_all();
                let calls = format!("{:?}", st.calls);
                drop(st);
                panic!("no {n} calls of {op:?} held within {STUCK:?}; calls: {calls}");
            }
            st = self.changed.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// The mounts now, in the order they were made.
    pub fn mounts(&self) -> Vec<MountEntry> {
        self.lock().mounts.iter().map(|m| m.entry.clone()).collect()
    }

    /// Records a call, waits while `op` is held, and fails it when asked.
    fn enter(&self, op: Op, path: &Path) -> std::result::Result<(), Errno> {
        let mut st = self.lock();
        st.calls.push(Call { op, path: path.to_owned() });
        if st.held.contains(&op) {
            *st.parked.entry(op).or_default() += 1;
            self.changed.notify_all();
            while st.held.contains(&op) {
                st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            *st.parked.get_mut(&op).expect("counted") -= 1;
        }
        let text = path.to_string_lossy();
        let hit = st.failures.iter().position(|f| f.op == op && f.times > 0 && text.contains(f.path_has.as_str()));
        if let Some(i) = hit {
            let f = &mut st.failures[i];
            f.times -= 1;
            return Err(f.errno);
        }
        Ok(())
    }

    fn add_mount(&self, st: &mut St, target: &Path, fs_type: &str, source: &str, content: Content) {
        st.next_id += 1;
        let entry = MountEntry {
            mount_id: st.next_id,
            mount_point: target.to_owned(),
            fs_type: fs_type.to_owned(),
            source: source.to_owned(),
            options: Vec::new(),
        };
        st.mounts.push(FakeMount { entry, content });
    }

    /// Checks that `target` is a directory nothing is mounted on.
    fn mount_point(st: &St, target: &Path) -> std::result::Result<(), Errno> {
        match fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Errno::NOTDIR),
            Err(_) => return Err(Errno::NOENT),
        }
        if st.mounts.iter().any(|m| m.entry.mount_point == target) {
            return Err(Errno::BUSY);
        }
        Ok(())
    }

    /// Mounts attached device `dev` at `target`: its image's tree unpacked
    /// there.
    fn mount_device(&self, op: Op, what: &'static str, dev: &Path, target: &Path, fs: &str, rw: bool) -> Result<()> {
        self.enter(op, target).map_err(|e| Error::sys(what, target, e))?;
        let mut st = self.lock();
        Self::mount_point(&st, target).map_err(|e| Error::sys(what, target, e))?;
        let file = match st.devs.get(dev) {
            Some((_, f)) => f.try_clone().ctx("dup", dev)?,
            None => return Err(Error::sys(what, dev, Errno::NXIO)),
        };
        read_tar(&file, target).ctx("unpack a fake image", target)?;
        let source = dev.display().to_string();
        self.add_mount(&mut st, target, fs, &source, Content::Image { file, rw });
        Ok(())
    }

    /// Binds `dir` onto itself unless something is mounted there already
    /// (`make_private`, `make_inert`).
    fn bind_itself(&self, op: Op, what: &'static str, dir: &Path) -> Result<()> {
        self.enter(op, dir).map_err(|e| Error::sys(what, dir, e))?;
        let mut st = self.lock();
        if !st.mounts.iter().any(|m| m.entry.mount_point == dir) {
            Self::mount_point(&st, dir).map_err(|e| Error::sys("bind mount", dir, e))?;
            self.add_mount(&mut st, dir, "none", &dir.display().to_string(), Content::Itself);
        }
        Ok(())
    }

    fn take_down(&self, target: &Path, lazy: bool) -> Result<()> {
        let mut st = self.lock();
        if !st.mounts.iter().any(|m| m.entry.mount_point == target) {
            return Ok(());
        }
        let below = |m: &FakeMount| m.entry.mount_point != target && m.entry.mount_point.starts_with(target);
        if st.mounts.iter().any(below) {
            if !lazy {
                return Err(Error::sys("unmount", target, Errno::BUSY));
            }
            st.mounts.retain(|m| !below(m));
        }
        let i = st.mounts.iter().rposition(|m| m.entry.mount_point == target).expect("seen above");
        let m = st.mounts.remove(i);
        drop(st);
        match m.content {
            Content::Itself => Ok(()),
            Content::Copy => clear(target),
            Content::Image { file, rw } => {
                if rw {
                    write_tar(target, &file).ctx("write back a fake image", target)?;
                }
                clear(target)
            }
        }
    }
}

impl Kernel for FakeKernel {
    fn check(&self, _cfg: &Config) -> Result<()> {
        Ok(())
    }

    fn attach(&self, file: &File, name: &Path, _opts: AttachOptions) -> io::Result<LoopDevice> {
        self.enter(Op::Attach, name)?;
        let mut st = self.lock();
        st.next_loop += 1;
        let dev = PathBuf::from(format!("/dev/fake-loop{}", st.next_loop));
        st.devs.insert(dev.clone(), (name.to_owned(), file.try_clone()?));
        Ok(LoopDevice::simulated(dev))
    }

    fn loop_devices(&self) -> Vec<(PathBuf, PathBuf)> {
        let st = self.lock();
        let used: HashSet<&str> = st.mounts.iter().map(|m| m.entry.source.as_str()).collect();
        st.devs
            .iter()
            .filter(|(d, _)| used.contains(d.to_string_lossy().as_ref()))
            .map(|(d, (b, _))| (d.clone(), b.clone()))
            .collect()
    }

    fn mount_image(&self, dev: &Path, target: &Path, fs: FsType, rw: bool) -> Result<()> {
        self.mount_device(Op::MountImage, "mount layer image", dev, target, fs.name(), rw)
    }

    fn mount_scratch(&self, dev: &Path, target: &Path) -> Result<()> {
        self.mount_device(Op::MountScratch, "mount scratch image", dev, target, "ext4", true)
    }

    fn mount_overlay(&self, spec: &OverlaySpec<'_>, target: &Path) -> Result<()> {
        self.enter(Op::MountOverlay, target).map_err(|e| Error::sys("mount overlay", target, e))?;
        if spec.lowers.is_empty() {
            return Err(Error::Invalid("an overlay needs at least one lower layer".into()));
        }
        let mut st = self.lock();
        Self::mount_point(&st, target).map_err(|e| Error::sys("mount overlay", target, e))?;
        let upper = spec.upper.map(|(u, _)| u);
        for (d, what) in spec.lowers.iter().map(|l| (l.as_path(), "lowerdir")).chain(upper.map(|u| (u, "upperdir"))) {
            if !d.is_dir() {
                return Err(Error::Invalid(format!("fake overlay: {what} {} is not a directory", d.display())));
            }
        }
        for l in spec.lowers.iter().rev() {
            copy_tree(l, target).ctx("copy a lower layer", l)?;
        }
        if let Some(u) = upper {
            copy_tree(u, target).ctx("copy the upper layer", u)?;
        }
        self.add_mount(&mut st, target, "overlay", "overlay", Content::Copy);
        Ok(())
    }

    fn bind(&self, src: &Path, target: &Path, _rw: bool) -> Result<()> {
        self.enter(Op::Bind, target).map_err(|e| Error::sys("bind", target, e))?;
        let mut st = self.lock();
        Self::mount_point(&st, target).map_err(|e| Error::sys("bind", target, e))?;
        copy_tree(src, target).ctx("copy a bind's source", src)?;
        self.add_mount(&mut st, target, "none", &src.display().to_string(), Content::Copy);
        Ok(())
    }

    fn shows(&self, target: &Path, src: &Path) -> Result<bool> {
        let st = self.lock();
        let top = st.mounts.iter().rev().find(|m| m.entry.mount_point == target);
        Ok(match top {
            // A copy stands for a bind of its source.
            Some(m) => {
                matches!(m.content, Content::Copy) && m.entry.fs_type == "none" && Path::new(&m.entry.source) == src
            }
            None => {
                let (x, y) = (fs::metadata(target).ctx("stat", target)?, fs::metadata(src).ctx("stat", src)?);
                (x.dev(), x.ino()) == (y.dev(), y.ino())
            }
        })
    }

    fn move_mount(&self, from: &Path, to: &Path) -> Result<()> {
        self.enter(Op::MoveMount, from).map_err(|e| Error::sys("move mount", from, e))?;
        let mut st = self.lock();
        if !st.mounts.iter().any(|m| m.entry.mount_point == from) {
            return Err(Error::sys("move mount", from, Errno::INVAL));
        }
        Self::mount_point(&st, to).map_err(|e| Error::sys("move mount", to, e))?;
        for e in fs::read_dir(from).ctx("read dir", from)? {
            let e = e.ctx("read dir", from)?;
            fs::rename(e.path(), to.join(e.file_name())).ctx("rename", e.path())?;
        }
        for m in st.mounts.iter_mut() {
            if let Ok(rel) = m.entry.mount_point.strip_prefix(from) {
                m.entry.mount_point = if rel.as_os_str().is_empty() { to.to_owned() } else { to.join(rel) };
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        self.enter(Op::Unmount, target).map_err(|e| Error::sys("unmount", target, e))?;
        self.take_down(target, false)
    }

    fn detach(&self, target: &Path) -> Result<()> {
        self.enter(Op::Detach, target).map_err(|e| Error::sys("unmount", target, e))?;
        self.take_down(target, true)
    }

    fn make_private(&self, dir: &Path) -> Result<()> {
        self.bind_itself(Op::MakePrivate, "make mount private", dir)
    }

    fn make_inert(&self, dir: &Path) -> Result<()> {
        self.bind_itself(Op::MakeInert, "remount nodev,nosuid,noexec", dir)
    }

    fn mountinfo(&self) -> Result<Vec<MountEntry>> {
        Ok(self.mounts())
    }

    fn mounts_under(&self, dir: &Path) -> Result<Vec<MountEntry>> {
        Ok(self.mounts().into_iter().filter(|m| m.mount_point.starts_with(dir)).collect())
    }

    fn is_mountpoint(&self, p: &Path) -> bool {
        self.lock().mounts.iter().any(|m| m.entry.mount_point == p)
    }

    fn build_layer_image(&self, staging: &Path, out: &Path, _counts: TreeCounts, _fs: FsType) -> Result<Bytes> {
        self.enter(Op::BuildImage, out).map_err(|e| Error::sys("build image", out, e))?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(crate::image::SHARED_IMAGE_MODE)
            .open(out)
            .ctx("create", out)?;
        write_tar(staging, &file).ctx("write a fake image", out)?;
        file.sync_all().ctx("fsync", out)?;
        Ok(Bytes(file.metadata().ctx("stat", out)?.len()))
    }

    fn create_rw_image(&self, out: &Path, _fs: FsType, size: Bytes, _templates: &Path) -> Result<()> {
        self.enter(Op::CreateRwImage, out).map_err(|e| Error::sys("create writable image", out, e))?;
        sparse(out, size, crate::perms::PRIVATE_FILE)
    }

    fn create_scratch_image(&self, out: &Path, size: Bytes) -> Result<()> {
        self.enter(Op::CreateScratchImage, out).map_err(|e| Error::sys("create scratch image", out, e))?;
        sparse(out, size, crate::perms::PRIVATE_FILE)
    }

    fn fsck(&self, img: &Path, _fs: FsType) -> Result<Option<String>> {
        self.enter(Op::Fsck, img).map_err(|e| Error::sys("fsck", img, e))?;
        Ok(None)
    }
}
