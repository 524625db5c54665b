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

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::apply::apply_tar_limited;
use crate::error::{Context, Error, Result};
use crate::export::{self, Change};
use crate::fsmagic;
use crate::ids::DiffId;
use crate::ids::{random_token, Bytes, ChainId};
use crate::image;
use crate::layermounts::LayerMounts;
use crate::mount::{self, OverlaySpec};
use crate::options::{Config, FsType};
use crate::store::{write_atomic, LayerInfo, LayerMeta, Location, Store, FORMAT_VERSION, IMAGE_FILE};
use crate::sys::loopdev;

/// How long a removal waits for a request working on the same id.
const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Size of a Docker "-init" layer's image: it holds a handful of files.
const INIT_LAYER_SIZE: Bytes = Bytes(64 * Bytes::MIB);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Kind {
    /// A read-only layer; `chain` is set once its diff is applied.
    Image { chain: Option<ChainId>, size: u64 },
    /// A writable layer with its own image.
    Rw { size: Bytes, fs: FsType },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LocalLayer {
    id: String,
    parent: Option<String>,
    /// The parent's content as it was when this layer was created over a
    /// writable parent: a published snapshot of the parent's upper
    /// directory, so that later writes to the parent do not show through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<ChainId>,
    #[serde(flatten)]
    kind: Kind,
}

/// Where one level of a layer stack comes from.
#[derive(Debug, Clone)]
enum Source {
    /// A published layer, mounted read-only once per host.
    Chain(ChainId),
    /// The upper directory of local writable layer `id`.
    Upper(String, FsType),
}

impl LocalLayer {
    /// This layer's own content, if it has any.
    fn content(&self) -> Option<Source> {
        match &self.kind {
            Kind::Image { chain: Some(c), .. } => Some(Source::Chain(c.clone())),
            Kind::Rw { fs, .. } => Some(Source::Upper(self.id.clone(), *fs)),
            Kind::Image { chain: None, .. } => None,
        }
    }
    /// Whether this layer stands on published layer `c` (as its content
    /// or as the snapshot of its parent).
    fn uses_chain(&self, c: &ChainId) -> bool {
        self.base.as_ref() == Some(c) || matches!(&self.kind, Kind::Image { chain: Some(oc), .. } if oc == c)
    }
}

#[derive(Debug, Clone)]
struct RoMount {
    info: LayerInfo,
    /// `None` for an empty layer (nothing mounted).
    dev: Option<String>,
}

#[derive(Debug)]
struct GetRef {
    count: u32,
    dir: PathBuf,
    mounted: bool,
    /// Found mounted at start (a previous run's Get): nobody in this run
    /// holds it, so it does not keep the layer from being removed.
    adopted: bool,
}

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
}

/// A published layer held in flight (see `State::inflight`) until
/// dropped, once its user is recorded.
struct ChainHold<'a> {
    state: &'a Mutex<State>,
    chain: ChainId,
}

impl Drop for ChainHold<'_> {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = st.inflight.get_mut(&self.chain) {
            *n -= 1;
            if *n == 0 {
                st.inflight.remove(&self.chain);
            }
        }
    }
}

/// Ids reserved by one request while it works outside the lock; released
/// when dropped.
struct Reservation<'a> {
    state: &'a Mutex<State>,
    ids: Vec<String>,
    pinned: Option<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for id in &self.ids {
            st.busy.remove(id);
        }
        if let Some(p) = &self.pinned {
            if let Some(n) = st.pinned.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    st.pinned.remove(p);
                }
            }
        }
    }
}

/// Whether the created layer is read-only (an image layer) or writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateKind {
    ReadOnly,
    ReadWrite,
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

/// What the store records about a layer's tree besides its image.
struct TreeFacts {
    diff_id: Option<DiffId>,
    content_bytes: u64,
    tar_bytes: u64,
    entries: u64,
}

pub struct Driver {
    home: PathBuf,
    cfg: Config,
    store: Store,
    mounts: Arc<LayerMounts>,
    state: Mutex<State>,
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
fn prepare_staging(home: &Path) -> Result<()> {
    let tmp = home.join("tmp");
    if mount::is_mountpoint(&tmp) {
        return Ok(()); // from before a restart
    }
    if can_stage_in(&tmp) {
        return mount::make_inert(&tmp);
    }
    let img = home.join("scratch.img");
    if !img.exists() {
        tracing::info!(home = %home.display(), "the home filesystem cannot hold whiteouts; staging in a scratch image");
        let part = home.join(format!(".scratch-{}", random_token()));
        let made =
            image::create_scratch_image(&part, SCRATCH_SIZE).and_then(|_| fs::rename(&part, &img).ctx("rename", &img));
        if let Err(e) = made {
            let _ = fs::remove_file(&part);
            return Err(e);
        }
    }
    let dev = loopdev::attach(&img, loopdev::AttachOptions { read_only: false, direct_io: false })
        .ctx("attach loop device", &img)?;
    // discard: freed staging blocks are punched out of the sparse file.
    rustix::mount::mount(
        dev.path(),
        &tmp,
        "ext4",
        rustix::mount::MountFlags::NODEV | rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NOEXEC,
        c"discard",
    )
    .ctx("mount scratch image", &tmp)?;
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
        Self::open_with(home, cfg, None)
    }

    /// Opens a driver whose layer mounts live in `mounts`, shared with the
    /// process's other drivers.
    pub fn open_shared(home: &Path, cfg: Config, mounts: Arc<LayerMounts>) -> Result<Driver> {
        Self::open_with(home, cfg, Some(mounts))
    }

    fn open_with(home: &Path, cfg: Config, mounts: Option<Arc<LayerMounts>>) -> Result<Driver> {
        cfg.check_kernel()?;
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
        mount::make_private(home)?;
        prepare_staging(home)?;
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
            None => LayerMounts::open(&home.join("mnt"), &home.join("verified"), false)?,
        };
        let store = Store::new(&cfg, &host_id);
        let hb = spawn_heartbeat(store.clone(), cfg.heartbeat_secs);
        let d = Driver {
            home: home.to_owned(),
            cfg,
            store,
            mounts,
            state: Mutex::new(State::default()),
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

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, for a request: refused once the driver is cleaned up.
    fn state(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.lock();
        if st.closed {
            return Err(Error::FailedPrecondition(format!(
                "the driver in {} was cleaned up (engine shutdown); initialise it again",
                self.home.display()
            )));
        }
        Ok(st)
    }

    /// Reserves `ids` (which no other request may be working on) and pins
    /// `parent` for a request that works outside the lock.
    fn reserve(&self, st: &mut State, ids: &[&str], parent: Option<&str>) -> Result<Reservation<'_>> {
        if let Some(id) = ids.iter().find(|id| st.busy.contains(**id)) {
            return Err(Error::InUse { id: (*id).into(), why: "another request is working on it".into() });
        }
        for id in ids {
            st.busy.insert((*id).to_owned());
        }
        if let Some(p) = parent {
            *st.pinned.entry(p.to_owned()).or_default() += 1;
        }
        Ok(Reservation {
            state: &self.state,
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            pinned: parent.map(str::to_owned),
        })
    }

    fn layer_file(&self, id: &str) -> PathBuf {
        self.home.join("layers").join(format!("{id}.json"))
    }
    fn rw_image(&self, id: &str) -> PathBuf {
        self.home.join("rw").join(id).join("rw.img")
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

    fn save(&self, l: &LocalLayer) -> Result<()> {
        write_atomic(&self.layer_file(&l.id), &serde_json::to_vec(l).expect("serialises"))
    }

    /// Loads local layers, adopts mounts left by a previous run, removes
    /// leftovers.
    fn reconcile(&self) -> Result<()> {
        let mut st = self.lock();
        let dir = self.home.join("layers");
        for e in fs::read_dir(&dir).ctx("read dir", &dir)?.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                if e.file_name().to_string_lossy().starts_with('.') {
                    let _ = fs::remove_file(&p); // interrupted atomic write
                }
                continue;
            }
            let text = fs::read(&p).ctx("read", &p)?;
            let l: LocalLayer =
                serde_json::from_slice(&text).map_err(|e| Error::Corrupt { path: p.clone(), reason: e.to_string() })?;
            st.layers.insert(l.id.clone(), l);
        }
        let used_chains: HashSet<ChainId> = st
            .layers
            .values()
            .flat_map(|l| {
                let own = match &l.kind {
                    Kind::Image { chain, .. } => chain.clone(),
                    _ => None,
                };
                own.into_iter().chain(l.base.clone())
            })
            .collect();
        // Claim the layer mounts this driver's layers stand on.
        self.mounts.forget_user(&self.home);
        for c in &used_chains {
            let Some(dev) = self.mounts.claim(c, &self.home) else {
                continue;
            };
            match self.store.locate(c) {
                Some(info) => {
                    st.ro.insert(c.clone(), RoMount { info, dev: Some(dev) });
                }
                None => {
                    tracing::warn!(layer = %c, "a mounted layer is no longer in the store");
                    let _ = self.mounts.release(c, &self.home);
                }
            }
        }
        if self.mounts.may_sweep() {
            self.mounts.sweep();
        }
        let own_mnt = self.mounts.dir() == self.home.join("mnt");
        let mounts = mount::mounts_under(&self.home)?;
        // Deepest first, so merged overlays go before the layers under them.
        let mut orphans = Vec::new();
        for m in &mounts {
            let Ok(rel) = m.mount_point.strip_prefix(&self.home) else {
                continue;
            };
            // Anything mounted inside staging (a commit's bind of an upper).
            if rel.starts_with("tmp") && rel.iter().count() > 1 {
                orphans.push(m.mount_point.clone());
                continue;
            }
            let mut comps = rel.iter().map(|c| c.to_string_lossy().into_owned());
            let (Some(area), Some(name), None) = (comps.next(), comps.next(), comps.next()) else {
                continue;
            };
            match area.as_str() {
                "merged" if st.layers.contains_key(&name) => {
                    st.gets.insert(name, GetRef { count: 1, dir: m.mount_point.clone(), mounted: true, adopted: true });
                }
                "rwmnt" if st.layers.contains_key(&name) => {
                    st.rw_mounted.insert(name);
                }
                // Layer mounts of an earlier layout, when they live elsewhere now.
                "mnt" if !own_mnt => orphans.push(m.mount_point.clone()),
                "merged" | "rwmnt" => orphans.push(m.mount_point.clone()),
                _ => {}
            }
        }
        orphans.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        orphans.sort_by_key(|p| !p.starts_with(self.home.join("merged")));
        for p in orphans {
            tracing::info!(target = %p.display(), "unmounting a leftover mount");
            if let Err(e) = mount::unmount_path(&p) {
                tracing::warn!(target = %p.display(), error = %e, "cannot unmount leftover");
            }
        }
        // Writable layers whose removal a crash interrupted, and images of
        // creates a crash interrupted before their record was saved.
        let rw = self.home.join("rw");
        for e in fs::read_dir(&rw).ctx("read dir", &rw)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".rm-") || !st.layers.contains_key(&name) {
                tracing::info!(path = %e.path().display(), "removing a leftover writable image");
                let mnt = if name.starts_with(".rm-") { e.path().join("mnt") } else { self.rw_mnt(&name) };
                if mount::unmount_path(&mnt).or_else(|_| mount::detach_path(&mnt)).is_err() {
                    tracing::warn!(target = %mnt.display(), "cannot unmount a leftover writable layer; left in place");
                    continue;
                }
                let _ = fs::remove_dir_all(e.path());
            }
        }
        // Writable images still attached without a mount of ours: found once
        // here, so that mounting a writable layer never scans devices.
        let rw_dir = self.home.join("rw");
        for (dev, backing) in loopdev::list() {
            let Ok(rel) = backing.strip_prefix(&rw_dir) else { continue };
            let mut comps = rel.iter().map(|c| c.to_string_lossy().into_owned());
            if let (Some(id), Some(file), None) = (comps.next(), comps.next(), comps.next()) {
                if file == "rw.img" && st.layers.contains_key(&id) && !st.rw_mounted.contains(&id) {
                    tracing::warn!(layer = %id, r#loop = %dev.display(), "writable image still attached without its mount");
                    st.attached_elsewhere.insert(id, dev);
                }
            }
        }
        // Staging of interrupted ApplyDiffs and commits; never through a
        // mount that would not go (a commit's staging binds an upper).
        let tmp = self.home.join("tmp");
        let still: Vec<PathBuf> = mount::mountinfo()?.into_iter().map(|m| m.mount_point).collect();
        for e in fs::read_dir(&tmp).ctx("read dir", &tmp)?.flatten() {
            if still.iter().any(|m| m.starts_with(e.path())) {
                tracing::warn!(path = %e.path().display(), "staging still has a mount; left in place");
                continue;
            }
            let _ = fs::remove_dir_all(e.path());
        }
        self.store.sweep_own_tmp();
        // References this host holds in the store for layers none of its
        // local layers uses: a crash between taking one and recording the
        // layer locally.
        for (c, info) in self.store.held_by(&self.store.host_id) {
            if !used_chains.contains(&c) {
                tracing::info!(layer = %c, "dropping a reference no local layer uses");
                if let Err(e) = self.store.release(&info) {
                    tracing::warn!(layer = %c, error = %e, "cannot drop the reference");
                }
            }
        }
        tracing::info!(layers = st.layers.len(), mounted = st.ro.len(), in_use = st.gets.len(), "driver state loaded");
        Ok(())
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

    /// Creates an empty layer `id` over `parent`.
    pub fn create(
        &self,
        id: &str,
        parent: Option<&str>,
        kind: CreateKind,
        storage_opt: &HashMap<String, String>,
    ) -> Result<()> {
        check_id(id)?;
        let parent = none_if_empty(parent);
        let mut size = None;
        for (k, v) in storage_opt {
            match k.to_ascii_lowercase().as_str() {
                "size" => size = Some(crate::options::parse_size("size", v)?),
                _ => {
                    return Err(Error::Option {
                        option: k.clone(),
                        reason: "unknown storage option; supported: size".into(),
                    })
                }
            }
        }
        if kind == CreateKind::ReadOnly && size.is_some() {
            return Err(Error::Option { option: "size".into(), reason: "only writable layers take a size".into() });
        }
        // The id is reserved and the parent pinned until the layer is
        // recorded: a concurrent create of the same id fails, a removal of
        // the id or of the parent waits for nothing and is refused.
        let (_reserved, writable_parent) = {
            let mut st = self.state()?;
            if st.layers.contains_key(id) || st.busy.contains(id) {
                return Err(Error::AlreadyExists(format!("layer {id}")));
            }
            let writable_parent = match parent {
                Some(p) => match st.layers.get(p) {
                    None => return Err(Error::ParentNotFound { id: id.into(), parent: p.into() }),
                    // Only a read-only layer freezes its parent: a writable
                    // one over a writable parent (Docker's container over
                    // its -init layer) sees the parent live, as overlay2's.
                    Some(pl) => {
                        (kind == CreateKind::ReadOnly && matches!(pl.kind, Kind::Rw { .. })).then(|| p.to_owned())
                    }
                },
                None => None,
            };
            (self.reserve(&mut st, &[id], parent)?, writable_parent)
        };
        // A read-only layer over a writable parent stands on a snapshot of
        // the parent's content as it is now (as vfs copies its parent): what
        // is written to the parent later does not show through.
        let (base, mut base_hold) = match &writable_parent {
            Some(p) => {
                let (info, hold) = self.publish_upper(p, None)?;
                (Some(info.meta.chain_id), Some(hold))
            }
            None => (None, None),
        };
        let release_base = |base: &Option<ChainId>, hold: Option<ChainHold<'_>>| {
            drop(hold);
            if let Some(c) = base {
                let mut st = self.lock();
                if let Err(e) = self.release_chain(&mut st, c, id) {
                    tracing::warn!(layer = %c, error = %e, "cannot release a parent snapshot");
                }
            }
        };
        let kind = match kind {
            CreateKind::ReadOnly => Kind::Image { chain: None, size: 0 },
            CreateKind::ReadWrite => {
                let fs_type = self.cfg.fs;
                if let Some(s) = size.filter(|s| *s < fs_type.min_image_size()) {
                    release_base(&base, base_hold.take());
                    return Err(Error::Option {
                        option: "size".into(),
                        reason: format!("{s} is below the {} minimum of {}", fs_type.name(), fs_type.min_image_size()),
                    });
                }
                let default = if id.ends_with("-init") { INIT_LAYER_SIZE } else { self.cfg.rw_size };
                let size = size.unwrap_or(default);
                if let Err(e) = self.make_rw_image(id, fs_type, size) {
                    release_base(&base, base_hold.take());
                    return Err(e);
                }
                Kind::Rw { size, fs: fs_type }
            }
        };
        let l = LocalLayer { id: id.into(), parent: parent.map(str::to_owned), base: base.clone(), kind };
        if let Err(e) = self.save(&l) {
            let _ = fs::remove_dir_all(self.rw_image(id).parent().unwrap());
            release_base(&base, base_hold.take());
            return Err(e);
        }
        self.lock().layers.insert(id.into(), l);
        Ok(())
    }

    /// Makes writable layer `id`'s image (replacing a leftover).
    fn make_rw_image(&self, id: &str, fs_type: FsType, size: Bytes) -> Result<()> {
        let img = self.rw_image(id);
        let dir = img.parent().unwrap();
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).ctx("mkdir", dir)?;
        crate::fault::point("create", "directory made");
        if let Err(e) = image::create_rw_image(&img, fs_type, size, &self.home.join("templates")) {
            let _ = fs::remove_dir_all(dir);
            return Err(e);
        }
        crate::fault::point("create", "image made");
        Ok(())
    }

    /// Mounts (once per host) the published layer `chain`.
    fn ensure_ro(&self, st: &mut State, chain: &ChainId) -> Result<RoMount> {
        if let Some(m) = st.ro.get(chain) {
            return Ok(m.clone());
        }
        let info = self
            .store
            .locate(chain)
            .ok_or_else(|| Error::NotFound(format!("layer {chain} (not in root or fallback)")))?;
        if info.image().is_none() {
            let m = RoMount { info, dev: None };
            st.ro.insert(chain.clone(), m.clone());
            return Ok(m);
        }
        let dev = self.mounts.acquire(&info, &self.home, self.cfg.verify, self.cfg.direct_io)?;
        let m = RoMount { info, dev: Some(dev) };
        st.ro.insert(chain.clone(), m.clone());
        Ok(m)
    }

    fn ensure_rw(&self, st: &mut State, id: &str, fs_type: FsType) -> Result<PathBuf> {
        let target = self.rw_mnt(id);
        if st.rw_mounted.contains(id) {
            return Ok(target);
        }
        let img = self.rw_image(id);
        // A writable image still attached from before (a mount that a
        // process kept alive through a restart) must not be mounted twice:
        // two filesystems writing one image corrupt it.
        if let Some(dev) = st.attached_elsewhere.get(id) {
            return Err(Error::InUse {
                id: id.into(),
                why: format!(
                    "its image {} is still attached to {} by an earlier mount that something keeps alive; \
                     stop what uses it (a container's processes) and restart sharedloop",
                    img.display(),
                    dev.display()
                ),
            });
        }
        fs::create_dir_all(&target).ctx("mkdir", &target)?;
        let direct_io = self.cfg.direct_io.for_file(&img);
        let dev = loopdev::attach(&img, loopdev::AttachOptions { read_only: false, direct_io })
            .ctx("attach loop device", &img)?;
        mount::mount_layer_rw(dev.path(), &target, fs_type)?;
        for d in ["upper", "work"] {
            let p = target.join(d);
            match fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::sys("mkdir", p, e)),
            }
        }
        st.rw_mounted.insert(id.to_owned());
        Ok(target)
    }

    /// The directory holding layer `id`'s own content, mounted; `None` for
    /// an empty layer.
    fn own_dir(&self, st: &mut State, id: &str) -> Result<Option<PathBuf>> {
        let l = st.layers.get(id).ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        match l.content() {
            Some(src) => self.mount_source(st, &src),
            None => Ok(None),
        }
    }

    /// Mounts one level of a stack; `None` for an empty published layer.
    fn mount_source(&self, st: &mut State, src: &Source) -> Result<Option<PathBuf>> {
        match src {
            Source::Chain(c) => {
                let m = self.ensure_ro(st, c)?;
                Ok(m.dev.map(|_| self.ro_mnt(c).join(image::LAYER_ROOT)))
            }
            Source::Upper(id, fs) => Ok(Some(self.ensure_rw(st, id, *fs)?.join("upper"))),
        }
    }

    /// What layer `id` stands on, topmost first (with its own content first
    /// when `own`): for each parent, its snapshot when the child was created
    /// over it while it was writable, otherwise its own content.
    fn sources(&self, st: &State, id: &str, own: bool) -> Result<Vec<Source>> {
        let mut l = st.layers.get(id).ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        let mut out: Vec<Source> = if own { l.content().into_iter().collect() } else { Vec::new() };
        let mut depth = 0;
        while let Some(p) = &l.parent {
            depth += 1;
            if depth > 4096 {
                return Err(Error::Corrupt { path: self.layer_file(id), reason: "parent chain loops".into() });
            }
            let pl = st.layers.get(p).ok_or_else(|| Error::NotFound(format!("layer {p} (parent of {})", l.id)))?;
            match &l.base {
                Some(b) => out.push(Source::Chain(b.clone())),
                None => out.extend(pl.content()),
            }
            l = pl;
        }
        Ok(out)
    }

    /// The stack of layer `id` (without its own content unless `own`),
    /// topmost first, empty layers left out, everything mounted.
    fn stack(&self, st: &mut State, id: &str, own: bool) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for src in self.sources(st, id, own)? {
            out.extend(self.mount_source(st, &src)?);
        }
        Ok(out)
    }

    /// The directories of `stack`, without mounting anything: for reports
    /// and bookkeeping. Layers known to be empty are left out.
    fn stack_paths(&self, st: &State, id: &str, own: bool) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for src in self.sources(st, id, own).unwrap_or_default() {
            match src {
                Source::Chain(c) if st.ro.get(&c).is_none_or(|m| m.dev.is_some()) => {
                    out.push(self.ro_mnt(&c).join(image::LAYER_ROOT))
                }
                Source::Chain(_) => {}
                Source::Upper(id, _) => out.push(self.rw_mnt(&id).join("upper")),
            }
        }
        out
    }

    /// The published chain that layer `l` stands on: its parent's
    /// snapshot, or its parent's published layer.
    fn lower_chain(st: &State, l: &LocalLayer) -> Result<Option<ChainId>> {
        match &l.base {
            Some(b) => Ok(Some(b.clone())),
            None => Self::chain_of(st, l.parent.as_deref()),
        }
    }

    /// Mounts layer `id` and returns the directory with its full view.
    /// A layer created read-only and never given content (no ApplyDiff)
    /// is a layer of its own: the first Get gives it a writable image, and
    /// what is written into the directory Get returns is its content.
    pub fn get(&self, id: &str) -> Result<PathBuf> {
        let mut st = self.state()?;
        if let Some(g) = st.gets.get_mut(id) {
            g.count += 1;
            return Ok(g.dir.clone());
        }
        let mut l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        if st.busy.contains(id) {
            return Err(Error::InUse { id: id.into(), why: "another request is working on it".into() });
        }
        if let Kind::Image { chain: None, .. } = l.kind {
            // Layers built on it see it as it is: empty. Opening it for
            // writing now would change what they stand on.
            if st.pinned.contains_key(id) || st.layers.values().any(|c| c.parent.as_deref() == Some(id)) {
                return Err(Error::InUse {
                    id: id.into(),
                    why: "it is empty and layers are built on it; it can no longer be written".into(),
                });
            }
            let fs_type = self.cfg.fs;
            self.make_rw_image(id, fs_type, self.cfg.rw_size)?;
            l.kind = Kind::Rw { size: self.cfg.rw_size, fs: fs_type };
            if let Err(e) = self.save(&l) {
                let _ = fs::remove_dir_all(self.rw_image(id).parent().unwrap());
                return Err(e);
            }
            tracing::debug!(layer = id, "an empty read-only layer opened for writing through Get");
            st.layers.insert(id.to_owned(), l.clone());
        }
        let target = self.merged(id);
        let (dir, mounted) = match &l.kind {
            Kind::Rw { fs, .. } => {
                let rw = self.ensure_rw(&mut st, id, *fs)?;
                crate::fault::point("get", "writable image mounted");
                let mut lowers = self.stack(&mut st, id, false)?;
                crate::fault::point("get", "layers mounted");
                if lowers.is_empty() {
                    lowers.push(self.home.join("empty"));
                }
                fs::create_dir_all(&target).ctx("mkdir", &target)?;
                let (u, w) = (rw.join("upper"), rw.join("work"));
                mount::mount_overlay(&OverlaySpec { lowers: &lowers, upper: Some((&u, &w)) }, &target)?;
                (target, true)
            }
            Kind::Image { .. } => {
                let lowers = self.stack(&mut st, id, true)?;
                match lowers.len() {
                    0 => (self.home.join("empty"), false),
                    1 => (lowers[0].clone(), false),
                    _ => {
                        fs::create_dir_all(&target).ctx("mkdir", &target)?;
                        mount::mount_overlay(&OverlaySpec { lowers: &lowers, upper: None }, &target)?;
                        (target, true)
                    }
                }
            }
        };
        tracing::debug!(layer = id, target = %dir.display(), "get");
        st.gets.insert(id.to_owned(), GetRef { count: 1, dir: dir.clone(), mounted, adopted: false });
        Ok(dir)
    }

    /// The mounts that show layer `id` (a writable layer, or a read-only
    /// one standing for a view), for an engine that mounts them itself
    /// (containerd). The layers under it are mounted here, once per host;
    /// an overlay whose options would not fit in one page for `mount(2)`
    /// is mounted here too and handed over as a bind mount.
    pub fn mounts_for(&self, id: &str) -> Result<Vec<MountSpec>> {
        let mut st = self.state()?;
        if let Some(g) = st.gets.get(id) {
            let rw = matches!(st.layers.get(id).map(|l| &l.kind), Some(Kind::Rw { .. }));
            return Ok(vec![MountSpec::bind(&g.dir, rw)]);
        }
        let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        let (lowers, upper) = match &l.kind {
            Kind::Rw { fs, .. } => {
                let rw = self.ensure_rw(&mut st, id, *fs)?;
                (self.stack(&mut st, id, false)?, Some((rw.join("upper"), rw.join("work"))))
            }
            Kind::Image { .. } => (self.stack(&mut st, id, true)?, None),
        };
        match (&upper, lowers.len()) {
            (Some((u, _)), 0) => return Ok(vec![MountSpec::bind(u, true)]),
            (None, 0) => return Ok(vec![MountSpec::bind(&self.home.join("empty"), false)]),
            (None, 1) => return Ok(vec![MountSpec::bind(&lowers[0], false)]),
            _ => {}
        }
        let spec = MountSpec::overlay(&lowers, upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path())));
        let size: usize = spec.options.iter().map(|o| o.len() + 1).sum();
        if size + 512 < rustix::param::page_size() {
            return Ok(vec![spec]);
        }
        let target = self.merged(id);
        fs::create_dir_all(&target).ctx("mkdir", &target)?;
        let upper_refs = upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
        mount::mount_overlay(&OverlaySpec { lowers: &lowers, upper: upper_refs }, &target)?;
        tracing::debug!(layer = id, layers = lowers.len(), target = %target.display(), "overlay mounted for the engine");
        st.gets.insert(id.to_owned(), GetRef { count: 1, dir: target.clone(), mounted: true, adopted: false });
        Ok(vec![MountSpec::bind(&target, upper.is_some())])
    }

    /// Bytes and inodes of writable layer `id`'s own changes.
    pub fn rw_usage(&self, id: &str) -> Result<(u64, u64)> {
        let upper = {
            let mut st = self.lock();
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            let Kind::Rw { fs, .. } = l.kind else {
                return Err(Error::Invalid(format!("layer {id} is not writable")));
            };
            self.ensure_rw(&mut st, id, fs)?.join("upper")
        };
        Ok((export::tree_size(&upper)?, export::tree_counts(&upper)?.inodes.saturating_sub(1)))
    }

    /// Bytes of content and entries of published layer `id`, as recorded
    /// in the store.
    pub fn image_usage(&self, id: &str) -> Result<(u64, u64)> {
        let st = self.lock();
        match st.layers.get(id).map(|l| &l.kind) {
            Some(Kind::Image { chain: Some(c), size }) => {
                let entries = st
                    .ro
                    .get(c)
                    .map(|m| m.info.meta.entries)
                    .or_else(|| self.store.locate(c).map(|i| i.meta.entries))
                    .unwrap_or(0);
                Ok((*size, entries))
            }
            Some(_) => Ok((0, 0)),
            None => Err(Error::NotFound(format!("layer {id}"))),
        }
    }

    /// Waits for background removals to finish.
    pub fn settle(&self) {
        let pending = std::mem::take(&mut self.lock().pending);
        for rx in pending {
            let _ = rx.recv();
        }
    }

    /// Releases one `get`. Releasing what is not held is not an error.
    pub fn put(&self, id: &str) -> Result<()> {
        let mut st = self.lock();
        let Some(g) = st.gets.get_mut(id) else {
            tracing::debug!(layer = id, "put of a layer that is not mounted");
            return Ok(());
        };
        g.count -= 1;
        if g.count > 0 {
            return Ok(());
        }
        let g = st.gets.remove(id).expect("present");
        if g.mounted {
            if let Err(e) = mount::unmount_path(&g.dir) {
                st.gets.insert(id.to_owned(), GetRef { count: 1, ..g });
                return Err(e);
            }
            let _ = fs::remove_dir(&g.dir);
        }
        Ok(())
    }

    /// Applies a layer tar to the empty read-only layer `id`; returns the
    /// size of its content.
    pub fn apply_diff(&self, id: &str, parent: Option<&str>, tar: &mut dyn Read) -> Result<u64> {
        let parent = none_if_empty(parent);
        let (_reserved, parent_chain) = {
            let mut st = self.state()?;
            let l = st.layers.get(id).ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            if l.parent.as_deref() != parent {
                return Err(Error::Invalid(format!(
                    "layer {id} has parent {:?}, not {:?}",
                    l.parent.as_deref().unwrap_or(""),
                    parent.unwrap_or("")
                )));
            }
            match &l.kind {
                Kind::Image { chain: None, .. } => {}
                Kind::Image { chain: Some(_), .. } => {
                    return Err(Error::Invalid(format!("layer {id} already has content")))
                }
                Kind::Rw { .. } => {
                    return Err(Error::Invalid(format!(
                        "layer {id} is writable (a container layer, or content written through Get); \
                         diffs apply to empty read-only layers"
                    )))
                }
            }
            let parent_chain = match Self::lower_chain(&st, l) {
                Ok(c) => c,
                Err(Error::Invalid(_)) => {
                    return Err(Error::Invalid(format!("parent {} of {id} is not a published layer", parent.unwrap())))
                }
                Err(e) => return Err(e),
            };
            // Concurrent ApplyDiffs, a Get or a Remove of this id wait for
            // nothing: they are refused while this one runs.
            (self.reserve(&mut st, &[id], None)?, parent_chain)
        };
        let staging = self.home.join("tmp").join(format!("apply-{}", random_token()));
        fs::create_dir(&staging).ctx("mkdir", &staging)?;
        let r = fs::create_dir(staging.join(image::LAYER_ROOT))
            .ctx("mkdir", staging.join(image::LAYER_ROOT))
            .and_then(|_| self.apply_staged(&staging, parent_chain.as_ref(), tar));
        if let Err(e) = fs::remove_dir_all(&staging) {
            tracing::warn!(path = %staging.display(), error = %e, "cannot remove staging directory");
        }
        let (info, content, hold) = r?;
        crate::fault::point("apply", "published and referenced");
        let chain = info.meta.chain_id.clone();
        let mut l = self.lock().layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        l.kind = Kind::Image { chain: Some(chain.clone()), size: content };
        if let Err(e) = self.save(&l) {
            drop(hold);
            let _ = self.release_chain(&mut self.lock(), &chain, id);
            return Err(e);
        }
        self.lock().layers.insert(id.to_owned(), l);
        drop(hold);
        tracing::info!(layer = id, chain = %chain, location = info.location.name(), bytes = content, "diff applied");
        Ok(content)
    }

    fn apply_staged(
        &self,
        staging: &Path,
        parent: Option<&ChainId>,
        tar: &mut dyn Read,
    ) -> Result<(LayerInfo, u64, ChainHold<'_>)> {
        let t0 = std::time::Instant::now();
        crate::fault::point("apply", "staging made");
        // The stream first, into an unnamed local file: its digest names
        // the layer, and a layer the store has already (another host
        // published it) is used without extracting anything.
        let mut spool = crate::apply::spool(tar, &self.home.join("tmp"), self.cfg.max_layer_size)?;
        let chain = ChainId::of(parent, &spool.diff_id);
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, bytes = spool.bytes, layer = %chain, "stream spooled");
        if let Some((info, hold)) = self.use_published(&chain, parent)? {
            return Ok((info.clone(), info.meta.content_bytes, hold));
        }
        // Claimed before extracting: hosts that want the same new layer at
        // the same moment wait for this one instead of extracting it too.
        let claim = match self.store.claim_in_root(&chain) {
            Some(crate::claim::Outcome::Build(c)) => Some(c),
            Some(crate::claim::Outcome::Published(_)) => match self.use_published(&chain, parent)? {
                Some((info, hold)) => return Ok((info.clone(), info.meta.content_bytes, hold)),
                None => None,
            },
            None => None,
        };
        let stats = apply_tar_limited(&mut spool.file, &staging.join(image::LAYER_ROOT), self.cfg.max_layer_size)?;
        crate::fault::point("apply", "tar applied to staging");
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, bytes = stats.tar_bytes, "tar applied to staging");
        let diff_id = stats.diff_id.clone().expect("set by apply");
        if diff_id != spool.diff_id {
            return Err(Error::Invalid(format!(
                "the spooled stream of layer {chain} changed on the local disk (sha256 {} then {diff_id})",
                spool.diff_id
            )));
        }
        let tree = TreeFacts {
            diff_id: Some(diff_id),
            content_bytes: stats.content_bytes,
            tar_bytes: stats.tar_bytes,
            entries: stats.entries,
        };
        let (info, hold) = self.publish_tree(staging, &chain, parent, &tree, claim)?;
        Ok((info, stats.content_bytes, hold))
    }

    /// Layer `chain`, when the store has it on `parent`, referenced for
    /// this host: nothing to extract or build. Within
    /// `sharedloop.max_layer_size` like a layer applied here.
    fn use_published(&self, chain: &ChainId, parent: Option<&ChainId>) -> Result<Option<(LayerInfo, ChainHold<'_>)>> {
        let Some(info) = self.store.locate(chain) else { return Ok(None) };
        if info.meta.parent.as_ref() != parent {
            tracing::warn!(layer = %chain, "the published layer names another parent; building it here");
            return Ok(None);
        }
        if let Some(max) = self.cfg.max_layer_size.filter(|m| info.meta.content_bytes > m.0) {
            return Err(Error::BadTar {
                entry: String::new(),
                reason: format!(
                    "the layer's files add up to {} bytes, more than sharedloop.max_layer_size={max}; \
                     raise the option to apply it",
                    info.meta.content_bytes
                ),
            });
        }
        *self.lock().inflight.entry(chain.clone()).or_default() += 1;
        let hold = ChainHold { state: &self.state, chain: chain.clone() };
        let Some(info) = self.store.acquire(&info) else { return Ok(None) };
        tracing::info!(layer = %chain, location = info.location.name(), "layer already in the store; nothing extracted");
        Ok(Some((info, hold)))
    }

    /// Publishes the tree under `staging/fs` as layer `chain` (or uses the
    /// layer of that name already in the store) and takes a reference.
    fn publish_tree(
        &self,
        staging: &Path,
        chain: &ChainId,
        parent: Option<&ChainId>,
        tree: &TreeFacts,
        mut claim: Option<crate::claim::Claim>,
    ) -> Result<(LayerInfo, ChainHold<'_>)> {
        // Held before the store's reference is taken, so that no removal
        // on this host drops it before the caller records the layer.
        *self.lock().inflight.entry(chain.clone()).or_default() += 1;
        let hold = ChainHold { state: &self.state, chain: chain.clone() };
        let fs_type = self.cfg.fs;
        let build = |tmp: &Path| -> Result<LayerMeta> {
            let t1 = std::time::Instant::now();
            let counts = export::tree_counts(staging)?;
            let empty = counts.inodes <= 2; // the image root and fs/
            let image_bytes = if empty {
                0
            } else {
                image::build_layer_image(staging, &tmp.join(IMAGE_FILE), counts, fs_type)
                    .map_err(|e| Error::Build {
                        layer: chain.to_string(),
                        fs: fs_type.name().into(),
                        reason: e.to_string(),
                    })?
                    .0
            };
            tracing::debug!(ms = t1.elapsed().as_secs_f64() * 1e3, image_bytes, "image built");
            let t2 = std::time::Instant::now();
            let image_sha256 = if empty { None } else { Some(image::sha256_file(&tmp.join(IMAGE_FILE))?) };
            tracing::debug!(ms = t2.elapsed().as_secs_f64() * 1e3, "image hashed");
            Ok(LayerMeta {
                format: FORMAT_VERSION,
                chain_id: chain.clone(),
                diff_id: tree.diff_id.clone(),
                parent: parent.cloned(),
                fs: (!empty).then_some(fs_type),
                image_bytes,
                content_bytes: tree.content_bytes,
                tar_bytes: tree.tar_bytes,
                entries: tree.entries,
                publisher: self.store.host_id.clone(),
                created_unix: crate::store::now_unix(),
                image_sha256,
                // Set by the store from the finished file.
                image_file: None,
            })
        };
        // Use the layer that is there, or publish ours; then take a
        // reference and confirm the layer survived (a host removing it
        // concurrently either saw our reference or we publish again).
        for _ in 0..3 {
            let info = match self.store.locate(chain) {
                Some(info) => {
                    tracing::info!(layer = %chain, location = info.location.name(), "layer already in the store; reusing it");
                    info
                }
                None => match self.store.publish_claimed(chain, claim.take(), &build)? {
                    // This host wrote the image and its digest just now:
                    // no need to read it all again before the first mount.
                    crate::store::Published::Created(info) => {
                        self.mounts.vouch(&info);
                        info
                    }
                    crate::store::Published::Existing(info) => info,
                },
            };
            if let Some(info) = self.store.acquire(&info) {
                return Ok((info, hold));
            }
            tracing::info!(layer = %chain, "the layer was removed while being referenced; publishing it again");
        }
        Err(Error::Invalid(format!("layer {chain} keeps disappearing from the store; is another host collecting it?")))
    }

    /// The chain id of published layer `id`; `None` for no layer.
    fn chain_of(st: &State, id: Option<&str>) -> Result<Option<ChainId>> {
        let Some(id) = id else { return Ok(None) };
        match st.layers.get(id).map(|l| &l.kind) {
            Some(Kind::Image { chain: Some(c), .. }) => Ok(Some(c.clone())),
            Some(_) => Err(Error::Invalid(format!("layer {id} is not a published layer"))),
            None => Err(Error::NotFound(format!("layer {id}"))),
        }
    }

    /// Creates read-only layer `id` over `parent` from layer `chain`, which
    /// is in the store already: no content moves, a reference is taken.
    /// Returns `false` (and creates nothing) when the store lacks `chain`
    /// or it sits on another parent.
    pub fn create_from_store(&self, id: &str, parent: Option<&str>, chain: &ChainId) -> Result<bool> {
        check_id(id)?;
        let mut st = self.state()?;
        if st.layers.contains_key(id) || st.busy.contains(id) {
            return Err(Error::AlreadyExists(format!("layer {id}")));
        }
        let parent_chain = Self::chain_of(&st, parent)?;
        let Some(info) = self.store.locate(chain) else { return Ok(false) };
        if info.meta.parent != parent_chain {
            tracing::warn!(layer = %chain, "the published layer sits on another parent; not reusing it");
            return Ok(false);
        }
        let Some(info) = self.store.acquire(&info) else { return Ok(false) };
        let l = LocalLayer {
            id: id.into(),
            parent: parent.map(str::to_owned),
            base: None,
            kind: Kind::Image { chain: Some(chain.clone()), size: info.meta.content_bytes },
        };
        if let Err(e) = self.save(&l) {
            let _ = self.release_chain(&mut st, chain, id);
            return Err(e);
        }
        tracing::info!(layer = %chain, location = info.location.name(), "using the published layer; nothing to unpack");
        st.layers.insert(id.into(), l);
        Ok(true)
    }

    /// Makes the published read-only layer `new_id`, on the same parent as
    /// writable layer `rw_id`, from its upper directory: a layer image named
    /// `chain` (or, without one, by the digest of its content as a tar).
    /// The writable layer stays; the caller removes it once the commit is
    /// recorded. Returns the chain id.
    pub fn commit(&self, rw_id: &str, new_id: &str, chain: Option<ChainId>) -> Result<ChainId> {
        check_id(new_id)?;
        let (_reserved, rw) = {
            let mut st = self.state()?;
            if st.layers.contains_key(new_id) || st.busy.contains(new_id) {
                return Err(Error::AlreadyExists(format!("layer {new_id}")));
            }
            let l = st.layers.get(rw_id).cloned().ok_or_else(|| Error::NotFound(format!("layer {rw_id}")))?;
            (self.reserve(&mut st, &[new_id], Some(rw_id))?, l)
        };
        let (info, hold) = self.publish_upper(rw_id, chain)?;
        crate::fault::point("commit", "published and referenced");
        let chain = info.meta.chain_id.clone();
        let l = LocalLayer {
            id: new_id.into(),
            parent: rw.parent,
            base: rw.base,
            kind: Kind::Image { chain: Some(chain.clone()), size: info.meta.content_bytes },
        };
        if let Err(e) = self.save(&l) {
            drop(hold);
            let _ = self.release_chain(&mut self.lock(), &chain, new_id);
            return Err(e);
        }
        self.lock().layers.insert(new_id.into(), l);
        drop(hold);
        crate::fault::point("commit", "committed layer recorded");
        tracing::info!(layer = %chain, from = rw_id, location = info.location.name(), "writable layer committed");
        Ok(chain)
    }

    /// Publishes writable layer `rw_id`'s upper directory as it is now, as
    /// the layer `chain` (or, without one, named by the digest of its
    /// content as a tar) over what the writable layer stands on; takes a
    /// reference.
    fn publish_upper(&self, rw_id: &str, chain: Option<ChainId>) -> Result<(LayerInfo, ChainHold<'_>)> {
        let (parent_chain, upper) = {
            let mut st = self.state()?;
            let l = st.layers.get(rw_id).cloned().ok_or_else(|| Error::NotFound(format!("layer {rw_id}")))?;
            let Kind::Rw { fs, .. } = l.kind else {
                return Err(Error::FailedPrecondition(format!("layer {rw_id} is not writable")));
            };
            let parent_chain = match Self::lower_chain(&st, &l) {
                Err(Error::Invalid(_)) => {
                    return Err(Error::FailedPrecondition(format!(
                        "layer {rw_id} stands on a writable layer ({}): only a writable layer over published \
                         layers can be frozen (a read-only layer over a Docker container's layer is not supported)",
                        l.parent.as_deref().unwrap_or("")
                    )))
                }
                r => r?,
            };
            let upper = self.ensure_rw(&mut st, rw_id, fs)?.join("upper");
            (parent_chain, upper)
        };
        // The tree goes into the image under /fs: bind the upper there.
        let staging = self.home.join("tmp").join(format!("commit-{}", random_token()));
        let fs_dir = staging.join(image::LAYER_ROOT);
        fs::create_dir_all(&fs_dir).ctx("mkdir", &fs_dir)?;
        // Read-only, so that no cleanup can delete through it.
        let r = rustix::mount::mount_bind(&upper, &fs_dir)
            .and_then(|_| {
                rustix::mount::mount_remount(
                    &fs_dir,
                    rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
                    c"",
                )
            })
            .ctx("bind", &fs_dir)
            .and_then(|_| {
                crate::fault::point("commit", "staging made");
                self.commit_staged(&staging, &upper, chain, parent_chain.as_ref())
            });
        match mount::unmount_path(&fs_dir) {
            Ok(()) => {
                let _ = fs::remove_dir_all(&staging);
            }
            Err(e) => {
                tracing::warn!(path = %fs_dir.display(), error = %e, "cannot unmount a commit's staging; left for the next start")
            }
        }
        r
    }

    fn commit_staged(
        &self,
        staging: &Path,
        upper: &Path,
        chain: Option<ChainId>,
        parent: Option<&ChainId>,
    ) -> Result<(LayerInfo, ChainHold<'_>)> {
        // The staging must still show the upper (a bind of it): a tree
        // gone from under it would publish an empty layer under the real
        // content's name.
        let same = |a: &Path, b: &Path| -> Result<bool> {
            let (x, y) = (fs::metadata(a).ctx("stat", a)?, fs::metadata(b).ctx("stat", b)?);
            Ok((x.dev(), x.ino()) == (y.dev(), y.ino()))
        };
        if !same(&staging.join(image::LAYER_ROOT), upper)? {
            return Err(Error::Invalid(format!(
                "the staging of {} no longer shows the writable layer; not publishing it",
                upper.display()
            )));
        }
        let counts = export::tree_counts(upper)?;
        let content_bytes = export::tree_size(upper)?;
        let (chain, diff_id) = match chain {
            Some(c) => (c, None),
            None => {
                let mut h = <sha2::Sha256 as sha2::Digest>::new();
                export::export_tar(upper, &mut h)?;
                let diff = DiffId::from_sha256(&sha2::Digest::finalize(h));
                (ChainId::of(parent, &diff), Some(diff))
            }
        };
        let tree = TreeFacts { diff_id, content_bytes, tar_bytes: 0, entries: counts.inodes.saturating_sub(1) };
        self.publish_tree(staging, &chain, parent, &tree, None)
    }

    /// Removes layer `id`. Removing what does not exist is not an error.
    pub fn remove(&self, id: &str) -> Result<()> {
        // A request working on the id (an ApplyDiff whose client went away,
        // a create over it) finishes first: dockerd removes a layer right
        // after its ApplyDiff failed on the client side, and does not retry
        // a refused Remove. Removal waits for it, a bounded time.
        let mut st = self.state()?;
        let t0 = std::time::Instant::now();
        while st.busy.contains(id) || st.pinned.contains_key(id) {
            if t0.elapsed() > REMOVE_WAIT {
                return Err(Error::InUse {
                    id: id.into(),
                    why: format!(
                        "another request has been working on it or on a child for over {} s",
                        REMOVE_WAIT.as_secs()
                    ),
                });
            }
            drop(st);
            std::thread::sleep(std::time::Duration::from_millis(20));
            st = self.state()?;
        }
        let Some(l) = st.layers.get(id).cloned() else {
            return Ok(());
        };
        if let Some(child) = st.layers.values().find(|c| c.parent.as_deref() == Some(id)) {
            return Err(Error::InUse { id: id.into(), why: format!("layer {} is built on it", child.id) });
        }
        match st.gets.get(id) {
            Some(g) if !g.adopted => {
                return Err(Error::InUse {
                    id: id.into(),
                    why: format!("it is mounted at {} (Get without Put)", g.dir.display()),
                })
            }
            Some(g) => {
                // Mounted by a run before a restart; nobody holds it now.
                if g.mounted {
                    mount::unmount_path(&g.dir)?;
                    let _ = fs::remove_dir(&g.dir);
                }
                st.gets.remove(id);
            }
            None => {}
        }
        match &l.kind {
            Kind::Rw { .. } => self.bury_rw(&mut st, id)?,
            Kind::Image { chain: Some(c), .. } => self.release_chain(&mut st, c, id)?,
            Kind::Image { chain: None, .. } => {}
        }
        if let Some(b) = &l.base {
            self.release_chain(&mut st, b, id)?;
        }
        crate::fault::point("remove", "mounts released");
        let f = self.layer_file(id);
        fs::remove_file(&f).ctx("remove", &f)?;
        crate::store::fsync_dir(f.parent().unwrap())?;
        st.layers.remove(id);
        Ok(())
    }

    /// Takes writable layer `id`'s image and mount out of the way now, and
    /// unmounts (a journal commit) and deletes them off the request path.
    /// Nothing left under the id's names: a create of the same id right
    /// after cannot meet the removal. A crash in between leaves a mount and
    /// an `rw/.rm-*` entry, both of which the start-up reconcile removes.
    fn bury_rw(&self, st: &mut State, id: &str) -> Result<()> {
        let dir = self.home.join("rw").join(id);
        // Same mount as rw/ (tmp/ is a mount of its own).
        let grave = self.home.join("rw").join(format!(".rm-{}", random_token()));
        fs::create_dir(&grave).ctx("mkdir", &grave)?;
        st.attached_elsewhere.remove(id);
        let m = self.rw_mnt(id);
        let mut moved = None;
        if st.rw_mounted.contains(id) {
            // The mount moves into the grave (both are on private mounts of
            // the home), so rwmnt/<id> is free at once.
            let to = grave.join("mnt");
            let r = fs::create_dir(&to)
                .ctx("mkdir", &to)
                .and_then(|_| rustix::mount::mount_move(&m, &to).ctx("move mount", &m));
            match r {
                Ok(()) => moved = Some(to),
                Err(e) => {
                    tracing::info!(target = %m.display(), error = %e, "cannot move the writable mount; detaching it");
                    if let Err(e) = mount::detach_path(&m) {
                        // Nothing moved yet: the layer stays as it was.
                        let _ = fs::remove_dir(&to);
                        let _ = fs::remove_dir(&grave);
                        return Err(e);
                    }
                }
            }
            st.rw_mounted.remove(id);
        }
        // The image last: once it is in the grave, the layer is gone.
        match fs::rename(&dir, grave.join("img")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot move a removed writable image aside; deleting it in place")
            }
        }
        let _ = fs::remove_dir(&m);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Some(to) = moved {
                if let Err(e) = mount::unmount_path(&to) {
                    // Still under an engine's overlay (containerd commits
                    // while its mount is up): detach; the filesystem and loop
                    // device go with the last user.
                    tracing::info!(target = %to.display(), error = %e, "writable layer busy; detaching it");
                    if let Err(e) = mount::detach_path(&to) {
                        tracing::warn!(target = %to.display(), error = %e, "cannot unmount a removed writable layer");
                        return;
                    }
                }
            }
            let _ = fs::remove_dir_all(&grave);
            drop(tx);
        });
        st.pending.retain(|r| matches!(r.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)));
        st.pending.push(rx);
        Ok(())
    }

    /// Layer `id` no longer stands on published layer `c`: unless another
    /// local layer does, its mount and this host's reference go.
    fn release_chain(&self, st: &mut State, c: &ChainId, id: &str) -> Result<()> {
        if st.layers.values().any(|o| o.id != id && o.uses_chain(c)) || st.inflight.contains_key(c) {
            return Ok(());
        }
        let info = match st.ro.remove(c) {
            Some(m) => {
                if m.dev.is_some() {
                    if let Err(e) = self.mounts.release(c, &self.home) {
                        st.ro.insert(c.clone(), m);
                        return Err(e);
                    }
                }
                Some(m.info)
            }
            None => self.store.locate(c),
        };
        // Where it was mounted from, and where it is now (a promote may
        // have moved it).
        let mut infos: Vec<LayerInfo> = info.into_iter().collect();
        if let Some(now) = self.store.locate(c) {
            if !infos.iter().any(|i| i.location == now.location) {
                infos.push(now);
            }
        }
        for info in infos {
            if self.store.release(&info)? {
                tracing::info!(layer = %c, location = info.location.name(), "layer removed from the store");
            }
        }
        Ok(())
    }

    fn check_parent(l: &LocalLayer, parent: Option<&str>) -> Result<()> {
        let parent = none_if_empty(parent);
        if parent.is_some() && l.parent.as_deref() != parent {
            return Err(Error::Invalid(format!(
                "diff of {} against {:?} is not supported: its parent is {:?}",
                l.id,
                parent.unwrap_or(""),
                l.parent.as_deref().unwrap_or("")
            )));
        }
        Ok(())
    }

    /// The directory whose tree is layer `id`'s own changes, mounted, for
    /// [`export::export_tar`]. Checked before anything is streamed.
    pub fn diff_source(&self, id: &str, parent: Option<&str>) -> Result<PathBuf> {
        let mut st = self.state()?;
        let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        Self::check_parent(&l, parent)?;
        Ok(self.own_dir(&mut st, id)?.unwrap_or_else(|| self.home.join("empty")))
    }

    /// The changes of layer `id` against its parent.
    pub fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<Change>> {
        let (dir, lowers) = {
            let mut st = self.state()?;
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            Self::check_parent(&l, parent)?;
            let dir = self.own_dir(&mut st, id)?;
            (dir, self.stack(&mut st, id, false)?)
        };
        match dir {
            Some(d) => export::changes(&d, &lowers),
            None => Ok(Vec::new()),
        }
    }

    /// Bytes of content layer `id` adds.
    pub fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64> {
        let dir = {
            let mut st = self.state()?;
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            Self::check_parent(&l, parent)?;
            if let Kind::Image { size, .. } = l.kind {
                return Ok(size);
            }
            self.own_dir(&mut st, id)?
        };
        dir.map(|d| export::tree_size(&d)).unwrap_or(Ok(0))
    }

    /// Driver status, as `docker info` lists it.
    pub fn status(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("Backing Filesystem".to_owned(), fsmagic::fs_name_of(&self.home)),
            ("Loopback Root Directory".to_owned(), self.cfg.root.display().to_string()),
            ("Loopback Fallback Directory".to_owned(), self.cfg.fallback.display().to_string()),
            ("Layer Image Filesystem".to_owned(), self.cfg.fs.name().to_owned()),
            (
                "Loop Direct I/O".to_owned(),
                match self.cfg.direct_io {
                    crate::options::DirectIo::Auto => {
                        "auto (on for local files, off on network filesystems)".to_owned()
                    }
                    d => d.name().to_owned(),
                },
            ),
        ];
        v.push((
            "Root Directory State".to_owned(),
            match self.store.root_problem() {
                None => "writable".to_owned(),
                Some(why) => format!("new layers go to fallback ({why})"),
            },
        ));
        v.push((
            "Root Directory Placement".to_owned(),
            crate::placement::check_root(&self.cfg.root, Some(&self.home)).describe(),
        ));
        for loc in [Location::Root, Location::Fallback] {
            let base = self.store.base(loc);
            let root_fs = if base.exists() { fsmagic::fs_name_of(base) } else { "(not created yet)".to_owned() };
            let n = self.store.count_layers(loc).unwrap_or(0).to_string();
            let name = if loc == Location::Root { "Root" } else { "Fallback" };
            v.push((format!("{name} Filesystem"), root_fs));
            v.push((format!("Layers in {name}"), n));
        }
        let st = self.lock();
        v.push(("Layer Mounts".to_owned(), st.ro.values().filter(|m| m.dev.is_some()).count().to_string()));
        v.push(("Host ID".to_owned(), self.store.host_id.clone()));
        v
    }

    /// Per-layer details for `docker inspect` (GraphDriver.Data).
    pub fn metadata(&self, id: &str) -> Result<HashMap<String, String>> {
        let st = self.state()?;
        let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        let mut m = HashMap::new();
        let mounts = mount::mountinfo().unwrap_or_default();
        // Every layer of the stack, topmost first.
        let (mut images, mut locs, mut loops) = (Vec::new(), Vec::new(), Vec::new());
        for src in self.sources(&st, id, true)? {
            match &src {
                Source::Chain(ch) => {
                    let (info, dev) = match st.ro.get(ch) {
                        Some(r) => (Some(r.info.clone()), r.dev.clone()),
                        None => (self.store.locate(ch), None),
                    };
                    if let Some(info) = info {
                        if let Some(img) = info.image() {
                            images.push(img.display().to_string());
                            locs.push(info.location.name().to_owned());
                            loops.push(dev.unwrap_or_else(|| "-".into()));
                        }
                    }
                }
                Source::Upper(c, _) => {
                    images.push(self.rw_image(c).display().to_string());
                    locs.push("local".into());
                    let mnt = self.rw_mnt(c);
                    loops.push(
                        mounts
                            .iter()
                            .find(|e| e.mount_point == mnt)
                            .map(|e| e.source.clone())
                            .unwrap_or_else(|| "-".into()),
                    );
                }
            }
        }
        if let Some(first) = images.first() {
            m.insert("LayerImage".into(), first.clone());
            m.insert("Location".into(), locs[0].clone());
            m.insert("LoopDevice".into(), loops[0].clone());
        }
        m.insert("LayerImages".into(), images.join(":"));
        m.insert("LayerLocations".into(), locs.join(":"));
        m.insert("LoopDevices".into(), loops.join(":"));
        match &l.kind {
            Kind::Image { chain, .. } => {
                if let Some(c) = chain {
                    m.insert("ChainID".into(), c.to_string());
                }
            }
            Kind::Rw { size, fs } => {
                let rw = self.rw_mnt(id);
                m.insert("UpperDir".into(), rw.join("upper").display().to_string());
                m.insert("WorkDir".into(), rw.join("work").display().to_string());
                m.insert("MergedDir".into(), self.merged(id).display().to_string());
                m.insert("WritableSize".into(), size.0.to_string());
                m.insert("WritableFilesystem".into(), fs.name().into());
                let lowers: Vec<String> =
                    self.stack_paths(&st, id, false).iter().map(|p| p.display().to_string()).collect();
                m.insert("LowerDir".into(), lowers.join(":"));
            }
        }
        Ok(m)
    }

    /// Releases every mount the driver holds, as dockerd expects of
    /// Cleanup at shutdown (overlay2 unmounts everything under its home):
    /// overlays handed out by Get (held or not), writable layers, this
    /// driver's claims on layer mounts, staging and the home's own bind.
    /// The driver serves no request afterwards; a new Init opens it again.
    pub fn cleanup(&self) -> Result<()> {
        // No new request from here on; wait for those in flight (an
        // ApplyDiff or a commit must not lose its staging under it).
        {
            let mut st = self.lock();
            if st.closed {
                return Ok(());
            }
            st.closed = true;
        }
        let t0 = std::time::Instant::now();
        loop {
            let st = self.lock();
            if st.busy.is_empty() && st.pinned.is_empty() && st.inflight.is_empty() {
                break;
            }
            if t0.elapsed() > std::time::Duration::from_secs(300) {
                tracing::warn!(busy = ?st.busy, "requests still in flight after 300 s; cleaning up around them");
                break;
            }
            drop(st);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.settle();
        let mut st = self.lock();
        // Nothing is detached: a mount that cannot go now (a process still
        // in a container) stays visible, so that the next start adopts it
        // instead of mounting a writable image a second time.
        let mut failed = Vec::new();
        let gets: Vec<(String, GetRef)> = st.gets.drain().collect();
        for (id, g) in gets {
            if !g.adopted {
                tracing::warn!(layer = %id, holds = g.count, "layer still mounted (Get without Put) at cleanup; unmounting it");
            }
            if g.mounted {
                match mount::unmount_path(&g.dir) {
                    Ok(()) => {
                        let _ = fs::remove_dir(&g.dir);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
        }
        if !failed.is_empty() {
            return Err(Error::Invalid(format!(
                "cleanup: overlays still in use, left mounted with what they stand on: {}",
                failed.join("; ")
            )));
        }
        for id in std::mem::take(&mut st.rw_mounted) {
            let m = self.rw_mnt(&id);
            match mount::unmount_path(&m) {
                Ok(()) => {
                    let _ = fs::remove_dir(&m);
                }
                Err(e) => failed.push(e.to_string()),
            }
        }
        for (c, m) in std::mem::take(&mut st.ro) {
            if m.dev.is_some() {
                if let Err(e) = self.mounts.release(&c, &self.home) {
                    failed.push(e.to_string());
                }
            }
        }
        // Mounts of this home that the driver did not make itself (commit
        // staging left by a crash), deepest first, then staging and the
        // home. The layer mount directory, when it is the driver's own
        // (`<home>/mnt`), goes too: nothing is mounted in it any more.
        let mut rest: Vec<PathBuf> =
            mount::mountinfo()?.into_iter().map(|m| m.mount_point).filter(|p| p.starts_with(&self.home)).collect();
        rest.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        rest.dedup();
        for p in rest {
            if p != self.home && self.mounts.dir().starts_with(&p) && self.mounts.count() > 0 {
                continue; // another driver's layers are still mounted there
            }
            // A mount may be stacked on itself (a bind of a bind): unmount
            // until it is gone, a bounded number of times.
            for _ in 0..4 {
                if !mount::is_mountpoint(&p) {
                    break;
                }
                // The home's bind of itself may be pinned by this driver's
                // own open lock file: once nothing is mounted below it,
                // detaching it is harmless.
                let r = match mount::unmount_path(&p) {
                    Err(_) if p == self.home && failed.is_empty() => mount::detach_path(&p),
                    r => r,
                };
                if let Err(e) = r {
                    failed.push(e.to_string());
                    break;
                }
            }
        }
        tracing::info!(home = %self.home.display(), "driver cleaned up: every mount released");
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(format!("cleanup left mounts behind: {}", failed.join("; "))))
        }
    }
}
