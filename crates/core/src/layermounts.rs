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
//! publish, and with `full` a read-only fsck. A record of the check, keyed
//! by the file's identity and times (`<verified>/<sha256-HEX>`), keeps later
//! mounts of an unchanged file off the check: once per host per image.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use std::os::unix::fs::MetadataExt;

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::ids::ChainId;
use crate::mount;
use crate::options::{DirectIo, VerifyMode};
use crate::store::{write_atomic, LayerInfo};
use crate::sys::loopdev;

#[derive(Debug)]
struct Entry {
    /// The loop device, as mountinfo names it.
    dev: String,
    users: HashSet<PathBuf>,
}

/// The identity of an image file when it was checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Checked {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    sha256: String,
    fsck: bool,
}

impl Checked {
    fn of(md: &fs::Metadata, sha256: String, fsck: bool) -> Checked {
        let ts = |s: i64, ns: i64| s as i128 * 1_000_000_000 + ns as i128;
        Checked {
            dev: md.dev(),
            ino: md.ino(),
            size: md.len(),
            mtime_ns: ts(md.mtime(), md.mtime_nsec()),
            ctime_ns: ts(md.ctime(), md.ctime_nsec()),
            sha256,
            fsck,
        }
    }
}

#[derive(Debug)]
pub struct LayerMounts {
    dir: PathBuf,
    verified: PathBuf,
    /// Shared between drivers: leftovers are swept by the owner of the
    /// table, not by the first driver to open.
    shared: bool,
    /// Set by the first sweep: every driver there was at start has opened.
    settled: std::sync::atomic::AtomicBool,
    table: Mutex<HashMap<ChainId, Entry>>,
}

impl LayerMounts {
    /// Opens the mount directory `dir` (a private mount of its own) and
    /// adopts the layer mounts already there.
    /// Records of checked images go to `verified`.
    pub fn open(dir: &Path, verified: &Path, shared: bool) -> Result<Arc<LayerMounts>> {
        crate::perms::private_dir(dir)?;
        crate::perms::private_dir(verified)?;
        mount::make_private(dir)?;
        let mut table = HashMap::new();
        let mut strays = Vec::new();
        for m in mount::mounts_under(dir)? {
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
                    table.insert(c, Entry { dev: m.source.clone(), users: HashSet::new() });
                }
                None => strays.push(m.mount_point.clone()),
            }
        }
        for p in strays {
            tracing::info!(target = %p.display(), "unmounting a stray mount in the layer mount directory");
            let _ = mount::unmount_path(&p);
        }
        Ok(Arc::new(LayerMounts {
            dir: dir.to_owned(),
            verified: verified.to_owned(),
            shared,
            settled: Default::default(),
            table: Mutex::new(table),
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
        for e in self.lock().values_mut() {
            e.users.remove(user);
        }
    }

    /// Where layer `chain` is (or would be) mounted.
    pub fn path(&self, chain: &ChainId) -> PathBuf {
        self.dir.join(chain.dir_name())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ChainId, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims an adopted mount of `chain` for `user`; returns its device,
    /// or `None` when the layer is not mounted.
    pub fn claim(&self, chain: &ChainId, user: &Path) -> Option<String> {
        let mut t = self.lock();
        let e = t.get_mut(chain)?;
        e.users.insert(user.to_owned());
        Some(e.dev.clone())
    }

    /// Mounts layer `info`'s image read-only unless it is mounted, and
    /// records `user` as using it. The image is checked first (`verify`)
    /// unless this host checked the same file before. Returns the loop
    /// device.
    pub fn acquire(&self, info: &LayerInfo, user: &Path, verify: VerifyMode, direct_io: DirectIo) -> Result<String> {
        let chain = &info.meta.chain_id;
        let (Some(image), Some(fs_type)) = (info.image(), info.meta.fs) else {
            return Err(Error::Invalid(format!("layer {chain} has no image to mount")));
        };
        let mut t = self.lock();
        if let Some(e) = t.get_mut(chain) {
            e.users.insert(user.to_owned());
            return Ok(e.dev.clone());
        }
        self.check(info, &image, verify)?;
        let target = self.path(chain);
        fs::create_dir_all(&target).ctx("mkdir", &target)?;
        let direct_io = direct_io.for_file(&image);
        let dev = loopdev::attach(&image, loopdev::AttachOptions { read_only: true, direct_io })
            .ctx("attach loop device", &image)?;
        mount::mount_layer_ro(dev.path(), &target, fs_type)?;
        tracing::debug!(layer = %chain, r#loop = %dev.path().display(), direct_io = dev.direct_io(), "layer mounted");
        let dev = dev.path().display().to_string();
        t.insert(chain.clone(), Entry { dev: dev.clone(), users: HashSet::from([user.to_owned()]) });
        Ok(dev)
    }

    /// Records `info`'s image as checked without reading it: for the host
    /// that built it and computed its digest a moment ago.
    pub fn vouch(&self, info: &LayerInfo) {
        let (Some(image), Some(sha256)) = (info.image(), info.meta.image_sha256.clone()) else { return };
        let Ok(md) = fs::symlink_metadata(&image) else { return };
        let rec = Checked::of(&md, sha256, false);
        let path = self.verified.join(info.meta.chain_id.dir_name());
        if let Err(e) = write_atomic(&path, &serde_json::to_vec(&rec).expect("serialises")) {
            tracing::debug!(path = %path.display(), error = %e, "cannot record the image as checked");
        }
    }

    /// Refuses an image that is not what was published, before the kernel
    /// parses it. Skipped when this host checked the same file (same
    /// device, inode, size, mtime and ctime) before, as thoroughly.
    fn check(&self, info: &LayerInfo, image: &Path, verify: VerifyMode) -> Result<()> {
        let chain = &info.meta.chain_id;
        let md = fs::symlink_metadata(image).ctx("stat", image)?;
        if !md.file_type().is_file() {
            return Err(Error::Corrupt {
                path: image.to_owned(),
                reason: "not a regular file; refusing to mount it".into(),
            });
        }
        if verify == VerifyMode::Off {
            return Ok(());
        }
        let now = |sha256: String, fsck: bool| Checked::of(&md, sha256, fsck);
        let record = self.verified.join(chain.dir_name());
        let want_fsck = verify == VerifyMode::Full;
        if let Some(prev) = fs::read(&record).ok().and_then(|t| serde_json::from_slice::<Checked>(&t).ok()) {
            if prev == now(prev.sha256.clone(), prev.fsck) && (prev.fsck || !want_fsck) {
                return Ok(());
            }
        }
        let Some(expected) = &info.meta.image_sha256 else {
            tracing::warn!(layer = %chain, "the layer has no recorded digest (published by an older sharedloop); not checked");
            return Ok(());
        };
        let t0 = std::time::Instant::now();
        let actual = crate::image::sha256_file(image)?;
        if actual != *expected {
            return Err(Error::Corrupt {
                path: image.to_owned(),
                reason: format!(
                    "sha256 is {actual}, but {expected} was recorded at publish: the image was changed or damaged; \
                     refusing to mount it (sharedloop verify names every such layer)"
                ),
            });
        }
        if want_fsck {
            if let Some(out) = crate::admin::fsck(image, info.meta.fs.expect("an image has a fs"))? {
                return Err(Error::Corrupt {
                    path: image.to_owned(),
                    reason: format!("the filesystem check failed; refusing to mount it: {out}"),
                });
            }
        }
        tracing::debug!(layer = %chain, ms = t0.elapsed().as_secs_f64() * 1e3, fsck = want_fsck, "image checked before its first mount");
        let rec = serde_json::to_vec(&now(actual, want_fsck)).expect("serialises");
        if let Err(e) = write_atomic(&record, &rec) {
            tracing::warn!(path = %record.display(), error = %e, "cannot record the check; it will be repeated");
        }
        Ok(())
    }

    /// `user` no longer uses `chain`; the mount goes when nobody does.
    pub fn release(&self, chain: &ChainId, user: &Path) -> Result<()> {
        let mut t = self.lock();
        let Some(e) = t.get_mut(chain) else { return Ok(()) };
        e.users.remove(user);
        if !e.users.is_empty() {
            return Ok(());
        }
        let p = self.path(chain);
        mount::unmount_path(&p)?;
        let _ = fs::remove_dir(&p);
        t.remove(chain);
        Ok(())
    }

    /// Unmounts the layers no driver uses (leftovers adopted at open).
    pub fn sweep(&self) {
        self.settled.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut t = self.lock();
        let idle: Vec<ChainId> = t.iter().filter(|(_, e)| e.users.is_empty()).map(|(c, _)| c.clone()).collect();
        for c in idle {
            let p = self.path(&c);
            tracing::info!(layer = %c, "unmounting a layer no driver uses");
            match mount::unmount_path(&p) {
                Ok(()) => {
                    let _ = fs::remove_dir(&p);
                    t.remove(&c);
                }
                Err(e) => tracing::warn!(target = %p.display(), error = %e, "cannot unmount an unused layer"),
            }
        }
    }

    /// Layers mounted now.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}
