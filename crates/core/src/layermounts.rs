//! The read-only mounts of published layers on this host, one per layer,
//! shared by every driver of the process: the Docker plugin's and the
//! containerd snapshotter's. A mount records which drivers (by home
//! directory) use it and goes when the last one lets go.
//!
//! ```text
//! <dir>/<sha256-HEX>/     the layer image, mounted read-only
//! ```
//! On open, mounts found under `<dir>` (from before a restart) are adopted
//! without users; drivers claim what they use, and [`LayerMounts::sweep`]
//! unmounts the rest once every driver has had its say.
//!
//! Before the kernel first mounts an image on this host, the image is
//! checked (`sharedloop.verify`): its sha256 against the digest recorded at
//! publish, and with `full` a read-only fsck. The image is opened once
//! (`imagefile::ImageFile`); the check reads that open file and the loop device is
//! attached to it, so a name swapped meanwhile changes nothing, and a file
//! changed in place during the check (size, mtime or ctime) is detached
//! and refused. A record of the check (`<verified>/<sha256-HEX>`: layer,
//! path, the checked file's identity and times, digest, fsck) keeps later
//! mounts of an unchanged file off the check: once per host per image.
//! With `identity` (the default) the check reads nothing: the open file's
//! size, mtime and ctime must be those the publisher recorded in meta.json.
//! See "The image check before a mount" in docs/crash-safety.md.
//!
//! Locks: one mutex, the table (mounted layers and the layers being mounted
//! or unmounted now, "in flight"), and a condition variable on it. No I/O
//! runs under the table lock: a thread marks a layer in flight, lets go of
//! the lock, opens, checks, attaches and mounts (or unmounts), then takes
//! the lock again to record the outcome and wakes the waiters. Another
//! thread wanting the same layer meanwhile waits for that outcome; threads
//! wanting other layers go on, so one cold first mount of a big image (a
//! digest check reading gigabytes from a file server) stalls no other.
//! A release of a layer in flight waits for it (the mount may be the
//! releaser's); a sweep leaves layers in flight to their thread.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::guard::Staged;
use crate::ids::ChainId;
use crate::imagefile::{FileId, ImageFile, ImageStamp};
use crate::kernel::Kernel;
use crate::options::{DirectIo, VerifyMode};
use crate::store::{write_atomic, LayerInfo, DIGEST_ALWAYS_FORMAT};
use crate::sys::loopdev;

#[derive(Debug)]
struct Entry {
    /// The loop device, as mountinfo names it.
    dev: String,
    users: HashSet<PathBuf>,
    /// The layer's prefetch work (a recording or a replay), finished
    /// before the unmount.
    prefetch: Option<crate::prefetch::Job>,
}

impl Entry {
    fn finish_prefetch(&mut self) {
        if let Some(j) = self.prefetch.take() {
            j.finish();
        }
    }
}

/// How a driver wants its layers mounted: its `sharedloop.verify`,
/// `sharedloop.direct_io` and prefetch options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub verify: VerifyMode,
    pub direct_io: DirectIo,
    pub prefetch: crate::prefetch::Settings,
}

impl Policy {
    /// `verify` and `direct_io`, without prefetch.
    pub fn new(verify: VerifyMode, direct_io: DirectIo) -> Policy {
        Policy { verify, direct_io, prefetch: crate::prefetch::Settings::OFF }
    }

    /// A driver's options.
    pub fn of(cfg: &crate::Config) -> Policy {
        Policy { verify: cfg.verify, direct_io: cfg.direct_io, prefetch: cfg.prefetch_settings() }
    }
}

/// `<verified>/<sha256-HEX>`: what this host checked before it first
/// mounted a layer's image. It names the layer, the image path, the very
/// file that was checked and attached (inode, size and times from `fstat`
/// of the descriptor the loop device got), the digest it had and whether
/// fsck ran. A later mount skips the check only when all of them match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Checked {
    layer: ChainId,
    image: PathBuf,
    file: FileId,
    /// `None` for a layer of a format that did not record digests (only
    /// fsck ran).
    sha256: Option<String>,
    fsck: bool,
}

#[derive(Debug)]
pub struct LayerMounts {
    kernel: Arc<dyn Kernel>,
    dir: PathBuf,
    verified: PathBuf,
    /// Shared between drivers: leftovers are swept by the owner of the
    /// table, not by the first driver to open.
    shared: bool,
    /// Set by the first sweep: every driver there was at start has opened.
    settled: std::sync::atomic::AtomicBool,
    table: Mutex<Table>,
    /// Signalled whenever a layer leaves `Table::in_flight`.
    landed: Condvar,
}

#[derive(Debug, Default)]
struct Table {
    mounted: HashMap<ChainId, Entry>,
    /// Layers a thread is mounting or unmounting now, without the lock.
    /// They are in neither state for the others: whoever wants one waits.
    in_flight: HashSet<ChainId>,
}

/// A layer marked in flight: dropping it records `entry` (if any) as the
/// layer's mount, clears the mark and wakes the waiters, also when the
/// work fails or panics.
struct InFlight<'a> {
    mounts: &'a LayerMounts,
    chain: ChainId,
    entry: Option<Entry>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut t = self.mounts.lock();
        if let Some(e) = self.entry.take() {
            t.mounted.insert(self.chain.clone(), e);
        }
        t.in_flight.remove(&self.chain);
        drop(t);
        self.mounts.landed.notify_all();
    }
}

impl LayerMounts {
    /// Opens the mount directory `dir` (a private mount of its own) and
    /// adopts the layer mounts already there.
    /// Records of checked images go to `verified`.
    pub fn open(dir: &Path, verified: &Path, shared: bool) -> Result<Arc<LayerMounts>> {
        Self::open_on(crate::kernel::Host::shared(), dir, verified, shared)
    }

    /// [`Self::open`] on `kernel`.
    pub fn open_on(kernel: Arc<dyn Kernel>, dir: &Path, verified: &Path, shared: bool) -> Result<Arc<LayerMounts>> {
        crate::perms::private_dir(dir)?;
        crate::perms::private_dir(verified)?;
        kernel.make_private(dir)?;
        let mut table = HashMap::new();
        let mut strays = Vec::new();
        for m in kernel.mounts_under(dir)? {
            let Ok(rel) = m.mount_point.strip_prefix(dir) else { continue };
            let mut comps = rel.iter();
            let (Some(name), None) = (comps.next(), comps.next()) else {
                if rel.iter().count() > 1 {
                    strays.push(m.mount_point.clone());
                }
                continue;
            };
            match ChainId::from_dir_name(&name.to_string_lossy()) {
                Some(c) => {
                    table.insert(c, Entry { dev: m.source.clone(), users: HashSet::new(), prefetch: None });
                }
                None => strays.push(m.mount_point.clone()),
            }
        }
        for p in strays {
            tracing::info!(target = %p.display(), "unmounting a stray mount in the layer mount directory");
            let _ = kernel.unmount(&p);
        }
        Ok(Arc::new(LayerMounts {
            kernel,
            dir: dir.to_owned(),
            verified: verified.to_owned(),
            shared,
            settled: Default::default(),
            table: Mutex::new(Table { mounted: table, in_flight: HashSet::new() }),
            landed: Condvar::new(),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether drivers opening now may sweep: a private table, or a shared
    /// one after its start-up sweep.
    pub fn may_sweep(&self) -> bool {
        !self.shared || self.settled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops every claim of `user` (a driver reopening its home), keeping
    /// the mounts for the claims it makes next.
    pub fn forget_user(&self, user: &Path) {
        for e in self.lock().mounted.values_mut() {
            e.users.remove(user);
        }
    }

    /// Where layer `chain` is (or would be) mounted.
    pub fn path(&self, chain: &ChainId) -> PathBuf {
        self.dir.join(chain.dir_name())
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The table once `chain` is not in flight (mounted or not).
    fn lock_settled(&self, chain: &ChainId) -> MutexGuard<'_, Table> {
        let mut t = self.lock();
        while t.in_flight.contains(chain) {
            t = self.landed.wait(t).unwrap_or_else(|p| p.into_inner());
        }
        t
    }

    /// Marks `chain` in flight; the caller holds the lock and `chain` is
    /// neither mounted nor in flight.
    fn take_off<'a>(&'a self, t: &mut Table, chain: &ChainId) -> InFlight<'a> {
        debug_assert!(!t.mounted.contains_key(chain) && !t.in_flight.contains(chain));
        t.in_flight.insert(chain.clone());
        InFlight { mounts: self, chain: chain.clone(), entry: None }
    }

    /// Claims an adopted mount of `chain` for `user`; returns its device,
    /// or `None` when the layer is not mounted.
    pub fn claim(&self, chain: &ChainId, user: &Path) -> Option<String> {
        let mut t = self.lock_settled(chain);
        let e = t.mounted.get_mut(chain)?;
        e.users.insert(user.to_owned());
        Some(e.dev.clone())
    }

    /// Mounts layer `info`'s image read-only unless it is mounted, and
    /// records `user` as using it. The image is checked first
    /// (`policy.verify`) unless this host checked the same file before,
    /// and its prefetch (`crate::prefetch`) starts once it is attached.
    /// Returns the loop device.
    ///
    /// The open, check, attach and mount run without the table lock (see
    /// "Locks" above): a thread mounting the same layer meanwhile is waited
    /// for, others are not.
    pub fn acquire(&self, info: &LayerInfo, user: &Path, policy: &Policy) -> Result<String> {
        let chain = &info.meta.chain_id;
        let (Some(image), Some(fs_type)) = (info.image(), info.meta.fs) else {
            return Err(Error::Invalid(format!("layer {chain} has no image to mount")));
        };
        let mut t = self.lock_settled(chain);
        if let Some(e) = t.mounted.get_mut(chain) {
            e.users.insert(user.to_owned());
            return Ok(e.dev.clone());
        }
        let mut flight = self.take_off(&mut t, chain);
        drop(t);
        let started = std::time::Instant::now();
        let (dev, prefetch) = self.mount(info, &image, fs_type, policy)?;
        crate::metrics::observe_first_mount(started);
        flight.entry = Some(Entry { dev: dev.clone(), users: HashSet::from([user.to_owned()]), prefetch });
        Ok(dev)
    }

    /// Opens, checks, attaches and mounts `info`'s image; called without
    /// the table lock, with the layer in flight.
    fn mount(
        &self,
        info: &LayerInfo,
        image: &Path,
        fs_type: crate::options::FsType,
        policy: &Policy,
    ) -> Result<(String, Option<crate::prefetch::Job>)> {
        let verify = policy.verify;
        let chain = &info.meta.chain_id;
        crate::fault::pause("layer-mount", chain.as_str());
        // One open file for the check and the loop device: a name that
        // changes meanwhile (a peer renaming another image over it) changes
        // nothing here.
        // Opened beneath its store directory, never through a symlink.
        let opened = info.open_image()?.ok_or_else(|| Error::Invalid(format!("layer {chain} has no image")))?;
        let img = ImageFile::for_mount(opened, image)?;
        let record = self.check(info, &img, verify)?;
        let target = self.path(chain);
        fs::create_dir_all(&target).ctx("mkdir", &target)?;
        // The mount point goes again unless the layer is mounted on it.
        let mount_point = Staged::new(&target);
        let direct_io = policy.direct_io.for_file(image);
        let dev = self
            .kernel
            .attach(img.file(), image, loopdev::AttachOptions { read_only: true, direct_io })
            .ctx("attach loop device", image)?;
        if verify != VerifyMode::Off {
            // A writer changing the inode in place while it was checked:
            // what the device reads is not what was checked.
            let now = img.now()?;
            if now != img.at_open() {
                drop(dev); // autoclear: nothing else holds the device
                return Err(Error::Corrupt {
                    path: image.to_owned(),
                    reason: format!(
                        "the file changed while it was checked (size, mtime or ctime: {:?} then {:?}); \
                         something writes to the shared store; refusing to mount it",
                        img.at_open(),
                        now
                    ),
                });
            }
        }
        // Started before the mount, which reads the superblock; dropped
        // (recording nothing) if the mount fails.
        let prefetch = crate::prefetch::start(info, img.file(), &policy.prefetch, dev.direct_io());
        self.kernel.mount_image(dev.path(), &target, fs_type, false)?;
        mount_point.keep();
        let prefetch = prefetch.and_then(crate::prefetch::Pending::mounted);
        if let Some(rec) = record {
            let path = self.verified.join(chain.dir_name());
            if let Err(e) = write_atomic(&path, &serde_json::to_vec(&rec).expect("serialises")) {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the check; it will be repeated");
            }
        }
        tracing::debug!(layer = %chain, r#loop = %dev.path().display(), direct_io = dev.direct_io(),
            prefetch = prefetch.is_some(), "layer mounted");
        Ok((dev.path().display().to_string(), prefetch))
    }

    /// Records `info`'s image as checked without reading it: for the host
    /// that built it and computed its digest a moment ago. Only the file
    /// this process built (`info.built`) is vouched for, not whatever the
    /// name holds by now.
    pub fn vouch(&self, info: &LayerInfo) {
        let (Some(image), Some(sha256), Some(built)) = (info.image(), info.meta.image_sha256.clone(), info.built)
        else {
            return;
        };
        let Ok(Some(crate::imagefile::Opened::File(img))) = info.open_image() else { return };
        if img.at_open() != built {
            tracing::info!(layer = %info.meta.chain_id, image = %image.display(),
                "the published image is not the file this host built; it will be checked before its first mount");
            return;
        }
        let rec = Checked {
            layer: info.meta.chain_id.clone(),
            image: image.clone(),
            file: built,
            sha256: Some(sha256),
            fsck: false,
        };
        let path = self.verified.join(info.meta.chain_id.dir_name());
        if let Err(e) = write_atomic(&path, &serde_json::to_vec(&rec).expect("serialises")) {
            tracing::debug!(path = %path.display(), error = %e, "cannot record the image as checked");
        }
    }

    /// Refuses an image that is not what was published, before the kernel
    /// parses it: its sha256 against the digest recorded at publish, and
    /// with `full` a read-only fsck, both through the open file `img`.
    /// Skipped when this host checked the same file (same layer, path,
    /// device, inode, size, mtime, ctime and recorded digest) before, as
    /// thoroughly. Returns the record to keep once the image is mounted.
    ///
    /// A layer without a recorded digest is refused when its meta.json
    /// claims a format that always records one (the record was removed);
    /// one of an older format is not digest-checked, but `full` still runs
    /// fsck.
    fn check(&self, info: &LayerInfo, img: &ImageFile, verify: VerifyMode) -> Result<Option<Checked>> {
        if verify == VerifyMode::Off {
            return Ok(None);
        }
        let chain = &info.meta.chain_id;
        let image = img.path();
        if verify == VerifyMode::Identity {
            match &info.meta.image_file {
                Some(stamp) => match Self::check_identity(img, stamp) {
                    Ok(()) => return Ok(None),
                    // Not the file that was published: changed, or copied
                    // (`cp -a`, rsync and restores give it a new ctime).
                    // Its digest decides, once per host, as `digest` does.
                    Err(e) => tracing::warn!(layer = %chain, image = %image.display(), error = %e,
                        "the image is not the file its publisher stamped; checking its digest before mounting it"),
                },
                None => tracing::info!(layer = %chain, image = %image.display(),
                    "the layer records no image identity (published by an older sharedloop); checking its digest once on this host"),
            }
        }
        let want_fsck = verify == VerifyMode::Full;
        let expected = match &info.meta.image_sha256 {
            Some(d) => Some(d.clone()),
            None if info.meta.format >= DIGEST_ALWAYS_FORMAT => {
                return Err(Error::Corrupt {
                    path: info.dir.join(crate::store::META_FILE),
                    reason: format!(
                        "meta.json is of format {}, which records the image digest (image_sha256) of every \
                         layer, but it has none: the record was removed or damaged; refusing to mount the image \
                         of layer {chain} (sharedloop verify names every such layer)",
                        info.meta.format
                    ),
                });
            }
            None => None,
        };
        let now = |fsck: bool| Checked {
            layer: chain.clone(),
            image: image.to_owned(),
            file: img.at_open(),
            sha256: expected.clone(),
            fsck,
        };
        let record = self.verified.join(chain.dir_name());
        if let Some(prev) = fs::read(&record).ok().and_then(|t| serde_json::from_slice::<Checked>(&t).ok()) {
            if prev == now(prev.fsck) && (prev.fsck || !want_fsck) {
                return Ok(None);
            }
        }
        if expected.is_none() {
            tracing::warn!(layer = %chain, format = info.meta.format, fsck = want_fsck,
                "the layer has no recorded digest (published by an older sharedloop); its digest is not checked");
            if !want_fsck {
                return Ok(None);
            }
        }
        let t0 = std::time::Instant::now();
        let mut read = 0u64;
        if let Some(expected) = &expected {
            let actual = img.sha256(&mut |n| read += n)?;
            if actual != *expected {
                return Err(Error::Corrupt {
                    path: image.to_owned(),
                    reason: format!(
                        "sha256 is {actual}, but {expected} was recorded at publish: the image was changed or \
                         damaged; refusing to mount it (sharedloop verify names every such layer)"
                    ),
                });
            }
        }
        if want_fsck {
            if let Some(out) = self.kernel.fsck(&img.proc_path(), info.meta.fs.expect("an image has a fs"))? {
                return Err(Error::Corrupt {
                    path: image.to_owned(),
                    reason: format!("the filesystem check failed; refusing to mount it: {out}"),
                });
            }
        }
        tracing::debug!(layer = %chain, ms = t0.elapsed().as_secs_f64() * 1e3, fsck = want_fsck, "image checked before its first mount");
        crate::metrics::observe_verify(t0, info.location, read);
        Ok(Some(now(want_fsck)))
    }

    /// `verify=identity`: the open file `img` must be the one the publisher
    /// stamped (size, mtime, ctime); nothing of it is read. Nothing is
    /// recorded either: the check costs one `fstat`.
    fn check_identity(img: &ImageFile, stamp: &ImageStamp) -> Result<()> {
        match stamp.differs(img.at_open()) {
            None => Ok(()),
            Some(what) => Err(Error::Corrupt {
                path: img.path().to_owned(),
                reason: format!(
                    "not the file that was published ({what}): it was changed or replaced after publish; \
                     refusing to mount it (run sharedloop verify to check the store's images)"
                ),
            }),
        }
    }

    /// `user` no longer uses `chain`; the mount goes when nobody does.
    /// A layer being mounted meanwhile is waited for (its mount may be
    /// `user`'s); the unmount runs without the table lock.
    pub fn release(&self, chain: &ChainId, user: &Path) -> Result<()> {
        let mut t = self.lock_settled(chain);
        let Some(e) = t.mounted.get_mut(chain) else { return Ok(()) };
        e.users.remove(user);
        if !e.users.is_empty() {
            return Ok(());
        }
        let mut e = t.mounted.remove(chain).expect("just seen");
        let mut flight = self.take_off(&mut t, chain);
        drop(t);
        e.finish_prefetch();
        if let Err(err) = self.unmount(chain) {
            flight.entry = Some(e); // still mounted; kept, without users
            return Err(err);
        }
        Ok(())
    }

    fn unmount(&self, chain: &ChainId) -> Result<()> {
        let p = self.path(chain);
        self.kernel.unmount(&p)?;
        let _ = fs::remove_dir(&p);
        Ok(())
    }

    /// Unmounts the layers no driver uses (leftovers adopted at open).
    /// Layers in flight are left to the thread working on them.
    pub fn sweep(&self) {
        self.settled.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut t = self.lock();
        let idle: Vec<ChainId> = t.mounted.iter().filter(|(_, e)| e.users.is_empty()).map(|(c, _)| c.clone()).collect();
        let mut flights = Vec::new();
        for c in idle {
            if let Some(e) = t.mounted.remove(&c) {
                flights.push((self.take_off(&mut t, &c), e));
            }
        }
        drop(t);
        for (mut flight, mut e) in flights {
            e.finish_prefetch();
            let c = flight.chain.clone();
            tracing::info!(layer = %c, "unmounting a layer no driver uses");
            if let Err(err) = self.unmount(&c) {
                tracing::warn!(target = %self.path(&c).display(), error = %err, "cannot unmount an unused layer");
                flight.entry = Some(e);
            }
        }
    }

    /// Layers mounted now.
    pub fn count(&self) -> usize {
        self.lock().mounted.len()
    }

    /// Loop devices the layers mounted now are on.
    pub fn loop_devices(&self) -> usize {
        self.lock().mounted.values().filter(|e| !e.dev.is_empty()).map(|e| &e.dev).collect::<HashSet<_>>().len()
    }
}
