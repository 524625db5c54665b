//! The graph driver: engine layer ids (Docker cache ids) on top of the
//! shared store, with one read-only mount per layer per host.
//!
//! Local state, under the engine's home directory (version 1):
//! ```text
//! <home>/
//!   host-id                  this engine instance's stable id in the store
//!   layers/<id>.json         LocalLayer: parent id and kind
//!   rw/<id>/rw.img           a writable layer's image (upper/ and work/ inside)
//!   mnt/<sha256-HEX>/        the read-only mount of a published layer (when
//!                            the driver is alone; `sharedloop serve` keeps
//!                            them in one directory for all its drivers,
//!                            see [`crate::layermounts`])
//!   rwmnt/<id>/              the mount of a writable layer's image
//!   merged/<id>/             overlay mounts handed to the engine
//!   tmp/                     staging for ApplyDiff (nodev,nosuid,noexec), swept at start
//!   templates/<fs>-<bytes>.img  a formatted empty writable image, cloned per container
//!   empty/                   an empty directory (lower of a parentless stack)
//! ```
//! A layer mount stays mounted while its layer exists on this host, so a
//! warm start attaches no loop device; N containers of one image share it.
//! On start the mounts are adopted from /proc/self/mountinfo.
//!
//! The driver's parts:
//! - `records`: the local layer records (`layers/<id>.json`) and the
//!   types the driver keeps about layers and mounts;
//! - `reconcile`: the start-up reconcile, step by step;
//! - `views`: mounting layers and their stacks (Get/Put, the mounts
//!   handed to containerd, usage);
//! - `apply`: creating layers and giving them content (ApplyDiff, a
//!   layer the store has already);
//! - `commit`: freezing a writable layer into a published one;
//! - `remove`: removal, releasing published layers, Cleanup;
//! - `report`: what the driver tells about itself and its layers
//!   (status, metadata, changes, diff size);
//! - `flight`: how requests work outside the state lock (marks of work
//!   in flight, reservations, leases), which no kernel or file system
//!   I/O runs under, apart from the start-up reconcile.

mod apply;
mod commit;
mod flight;
pub use flight::Lease;
use flight::{ChainHold, Flight, Shared};
mod reconcile;
mod records;
mod remove;
mod report;
pub use report::{AreaReport, DriverReport, LayerReport, LayerReportKind, StackEntry};
mod views;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Context, Error, Result};
use crate::guard::Staged;
use crate::ids::{random_token, Bytes, ChainId};
use crate::kernel::{Host, Kernel};
use crate::layermounts::LayerMounts;
use crate::options::Config;
use crate::store::{write_atomic, Store};
use crate::sys::loopdev;

use records::{GetRef, Kind, LocalLayer, RoMount};

#[derive(Default)]
struct State {
    layers: HashMap<String, LocalLayer>,
    ro: HashMap<ChainId, RoMount>,
    rw_mounted: HashSet<String>,
    /// Writable layers whose image was found attached to a loop device at
    /// start without its mount here (an earlier mount that something keeps
    /// alive), with the device: never mounted a second time.
    attached_elsewhere: HashMap<String, PathBuf>,
    gets: HashMap<String, GetRef>,
    /// Ids a request is working on outside the lock (a create, an
    /// ApplyDiff, a commit): no other request may create or remove them.
    busy: HashSet<String>,
    /// Parents of creates in flight, with their count: not removable.
    pinned: HashMap<String, u32>,
    /// Published layers a request has referenced and not yet recorded
    /// (an ApplyDiff, commit or snapshot between taking the store's
    /// reference and saving the layer): a removal of another layer on the
    /// same chain must not drop this host's reference meanwhile.
    inflight: HashMap<ChainId, u32>,
    /// Set by [`Driver::cleanup`]: every mount is released and no request
    /// is served any more.
    closed: bool,
    /// Background removals of writable layers; each sender drops when done.
    pending: Vec<std::sync::mpsc::Receiver<()>>,
    /// Mounts made or unmade, layers removed and published layers
    /// released outside the lock now (see `flight`).
    flights: HashSet<Flight>,
    /// Layers lent to readers ([`Lease`]), with their count.
    leases: HashMap<String, u32>,
}

/// Whether the created layer is read-only (an image layer) or writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateKind {
    ReadOnly,
    /// A writable layer on an image of its own (loop device, filesystem,
    /// size limit).
    ReadWrite,
    /// A writable layer kept as a directory in the driver's home, for an
    /// engine's small per-container setup layer (Docker's `-init`: a few
    /// files such as `/etc/hosts` and `/.dockerenv`): no image, no loop
    /// device, no filesystem to mount, so one container costs one
    /// writable image, not two. Mounted as a bind of the directory; no
    /// size limit applies (a size given is checked as for `ReadWrite`).
    ReadWriteDir,
}

/// One mount for an engine to perform, as containerd's `mount.Mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub fs_type: String,
    pub source: String,
    pub options: Vec<String>,
}

impl MountSpec {
    fn bind(dir: &Path, rw: bool) -> MountSpec {
        MountSpec {
            fs_type: "bind".into(),
            source: dir.display().to_string(),
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        }
    }

    fn overlay(lowers: &[PathBuf], upper: Option<(&Path, &Path)>) -> MountSpec {
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let mut options = vec!["index=off".to_owned(), "redirect_dir=off".to_owned()];
        if let Some((u, w)) = upper {
            options.push(format!("workdir={}", w.display()));
            options.push(format!("upperdir={}", u.display()));
        } else {
            options.push("ro".into());
        }
        options.push(format!("lowerdir={}", lower.join(":")));
        MountSpec { fs_type: "overlay".into(), source: "overlay".into(), options }
    }
}

pub struct Driver {
    kernel: Arc<dyn Kernel>,
    home: PathBuf,
    cfg: Config,
    store: Store,
    mounts: Arc<LayerMounts>,
    shared: Arc<Shared>,
    /// An exclusive lock on `<home>/lock`, held while the driver lives: a
    /// second process on the same state would corrupt it.
    _lock: fs::File,
    /// Dropping it stops the heartbeat thread.
    _heartbeat: std::sync::mpsc::Sender<()>,
}

/// Writes this host's heartbeat every `secs` until the sender is dropped.
fn spawn_heartbeat(store: Store, secs: u64) -> std::sync::mpsc::Sender<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || loop {
            store.heartbeat(secs);
            match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        })
        .expect("spawn heartbeat thread");
    tx
}

/// Size of the scratch filesystem used for staging when the home
/// directory cannot hold overlayfs whiteouts (a sparse file).
const SCRATCH_SIZE: Bytes = Bytes(256 * Bytes::GIB);

/// Whether `dir` can hold what staging needs: 0:0 character devices
/// (whiteouts) and `trusted.*` attributes (opaque directories).
fn can_stage_in(dir: &Path) -> bool {
    let wh = dir.join(format!(".probe-wh-{}", random_token()));
    let d = dir.join(format!(".probe-opq-{}", random_token()));
    let dev =
        rustix::fs::mknodat(rustix::fs::CWD, &wh, rustix::fs::FileType::CharacterDevice, rustix::fs::Mode::empty(), 0);
    let _ = fs::remove_file(&wh);
    let xattr = fs::create_dir(&d).map_err(|_| ()).and_then(|_| {
        rustix::fs::lsetxattr(&d, crate::apply::OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty()).map_err(|_| ())
    });
    let _ = fs::remove_dir(&d);
    dev.is_ok() && xattr.is_ok()
}

/// Makes `<home>/tmp` the staging area: a `nodev,nosuid,noexec` bind of
/// itself where the home filesystem can hold whiteouts, otherwise (NFS,
/// sshfs, ...) a loop-mounted sparse ext4 scratch image kept in the home
/// directory, which can hold anything a layer has.
fn prepare_staging(kernel: &dyn Kernel, home: &Path) -> Result<()> {
    let tmp = home.join("tmp");
    if kernel.is_mountpoint(&tmp) {
        return Ok(()); // from before a restart
    }
    if can_stage_in(&tmp) {
        return kernel.make_inert(&tmp);
    }
    let img = home.join("scratch.img");
    if !img.exists() {
        tracing::info!(home = %home.display(), "the home filesystem cannot hold whiteouts; staging in a scratch image");
        // Gone again unless renamed into place.
        let part = Staged::new(home.join(format!(".scratch-{}", random_token())));
        kernel.create_scratch_image(part.path(), SCRATCH_SIZE)?;
        fs::rename(part.path(), &img).ctx("rename", &img)?;
    }
    let dev = kernel
        .attach_path(&img, loopdev::AttachOptions { read_only: false, direct_io: false })
        .ctx("attach loop device", &img)?;
    kernel.mount_scratch(dev.path(), &tmp)?;
    let lf = tmp.join("lost+found");
    let _ = fs::remove_dir(&lf);
    Ok(())
}

/// Engine ids become path components: keep them plain.
fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid layer id {id:?}")))
    }
}

fn none_if_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

impl Driver {
    /// Opens (creating) the driver state in `home`, checks the kernel and
    /// reconciles with what is mounted.
    pub fn open(home: &Path, cfg: Config) -> Result<Driver> {
        Self::open_on(Host::shared(), home, cfg, None)
    }

    /// Opens a driver whose layer mounts live in `mounts`, shared with the
    /// process's other drivers.
    pub fn open_shared(home: &Path, cfg: Config, mounts: Arc<LayerMounts>) -> Result<Driver> {
        Self::open_on(Host::shared(), home, cfg, Some(mounts))
    }

    /// Opens a driver that asks `kernel` for its mounts, loop devices and
    /// image builds (a [`crate::kernel::fake::FakeKernel`] in tests); its
    /// layer mounts live in `mounts` when given (opened on the same
    /// kernel), otherwise in `<home>/mnt`.
    pub fn open_on(
        kernel: Arc<dyn Kernel>,
        home: &Path,
        cfg: Config,
        mounts: Option<Arc<LayerMounts>>,
    ) -> Result<Driver> {
        kernel.check(&cfg)?;
        // Root's alone (see crate::perms). `empty` keeps the usual mode:
        // it is a lower layer, whose root directory a stack may show.
        for d in ["", "layers", "rw", "mnt", "rwmnt", "merged", "tmp"] {
            crate::perms::private_dir(&home.join(d))?;
        }
        let empty = home.join("empty");
        fs::create_dir_all(&empty).ctx("mkdir", &empty)?;
        crate::perms::restrict_old_files(home);
        crate::placement::check_at_start(&cfg, home)?;
        let lock_path = home.join("lock");
        let lock =
            fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).ctx("open", &lock_path)?;
        // A driver of this process reopened (dockerd's Init again) may wait
        // a moment for requests still running on the one it replaces.
        let t0 = std::time::Instant::now();
        while let Err(e) = rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                return Err(Error::Invalid(format!(
                    "{} is in use by another sharedloop process ({e}); one process per state directory",
                    home.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        kernel.make_private(home)?;
        prepare_staging(&*kernel, home)?;
        if cfg.one_pass_build == Some(true) {
            let why = if cfg.fs == crate::options::FsType::Ext4 {
                kernel.one_pass_tool(&home.join("tmp")).err()
            } else {
                Some(format!("one-pass builds make ext4 images, and sharedloop.fs is {}", cfg.fs.name()))
            };
            if let Some(why) = why {
                return Err(Error::Option { option: "sharedloop.one_pass_build".into(), reason: why });
            }
        }
        let host_file = home.join("host-id");
        let host_id = match fs::read_to_string(&host_file) {
            Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
            _ => {
                let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
                let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
                let id = format!("{host}.{}", &random_token()[..12]);
                write_atomic(&host_file, id.as_bytes())?;
                id
            }
        };
        let mounts = match mounts {
            Some(m) => m,
            None => LayerMounts::open_on(kernel.clone(), &home.join("mnt"), &home.join("verified"), false)?,
        };
        let store = Store::new(&cfg, &host_id);
        let hb = spawn_heartbeat(store.clone(), cfg.heartbeat_secs);
        let d = Driver {
            kernel,
            home: home.to_owned(),
            cfg,
            store,
            mounts,
            shared: Shared::new(),
            _lock: lock,
            _heartbeat: hb,
        };
        d.reconcile()?;
        Ok(d)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn store(&self) -> &Store {
        &self.store
    }
    pub fn home(&self) -> &Path {
        &self.home
    }

    fn layer_file(&self, id: &str) -> PathBuf {
        self.home.join("layers").join(format!("{id}.json"))
    }
    fn rw_image(&self, id: &str) -> PathBuf {
        self.home.join("rw").join(id).join("rw.img")
    }
    /// The directory of a [`CreateKind::ReadWriteDir`] layer, beside
    /// where an image would be.
    fn rw_dir(&self, id: &str) -> PathBuf {
        self.home.join("rw").join(id).join("dir")
    }
    fn rw_mnt(&self, id: &str) -> PathBuf {
        self.home.join("rwmnt").join(id)
    }
    fn ro_mnt(&self, chain: &ChainId) -> PathBuf {
        self.mounts.path(chain)
    }
    fn merged(&self, id: &str) -> PathBuf {
        self.home.join("merged").join(id)
    }

    /// Writable layers, and how many are mounted now (for metrics).
    pub fn writable_layers(&self) -> (usize, usize) {
        let st = self.lock();
        (st.layers.values().filter(|l| matches!(l.kind, Kind::Rw { .. })).count(), st.rw_mounted.len())
    }

    /// Every local layer id.
    pub fn layer_ids(&self) -> Vec<String> {
        self.lock().layers.keys().cloned().collect()
    }

    pub fn exists(&self, id: &str) -> bool {
        self.lock().layers.contains_key(id)
    }
}
