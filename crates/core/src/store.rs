//! The layer store on the root and fallback directories.
//!
//! On-disk format, version 2 (docs/on-disk-format.md):
//! ```text
//! <root or fallback>/
//!   layers/<sha256-HEX>/layer.img      the layer image (absent for an empty layer)
//!   layers/<sha256-HEX>/meta.json      LayerMeta
//!   tmp/<host>-<token>/                builds in progress, never read by others
//!   refs/<sha256-HEX>/<host-id>        "this host uses the layer"
//!   hosts/<host-id>                    HostRecord: the host's heartbeat
//! ```
//! A layer directory appears by one `rename(2)` of a complete, fsynced
//! build, so readers never see a half-written layer; when the name already
//! exists another host won the race and its layer is used.
//!
//! Nothing below a base directory is followed when it is a symlink (the
//! base itself may be one: the operator chose it): another host could
//! plant `refs/<chain>` -> `/etc`, and this host would write there.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::ids::{random_token, ChainId, DiffId};
use crate::imagefile::{FileId, ImageFile, ImageStamp, Opened};
use crate::options::{Config, FsType};

/// The `format` written into each new meta.json. Readers take every
/// version up to this one (the layout is the same).
/// - 1: the first; `image_sha256` was added during its life, so a layer of
///   format 1 may lack it.
/// - 2: `image_sha256` is recorded for every layer that has an image.
pub const FORMAT_VERSION: u32 = 2;
/// The first format whose layers all record `image_sha256`: a layer of this
/// format or later without it had its record removed, and is refused.
pub const DIGEST_ALWAYS_FORMAT: u32 = 2;
/// Below this much free space, `docker info` says root cannot take layers.
const MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;
pub const IMAGE_FILE: &str = "layer.img";
pub const META_FILE: &str = "meta.json";

/// Where a layer lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Location {
    Root,
    Fallback,
}

impl Location {
    pub fn name(self) -> &'static str {
        match self {
            Location::Root => "root",
            Location::Fallback => "fallback",
        }
    }
}

/// `meta.json` of a published layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    pub format: u32,
    pub chain_id: ChainId,
    /// The layer tar's digest; `None` for a layer committed from a
    /// containerd snapshot, which is named by the chain id containerd gave.
    #[serde(default)]
    pub diff_id: Option<DiffId>,
    pub parent: Option<ChainId>,
    /// Filesystem of layer.img; `None` for an empty layer (no image).
    pub fs: Option<FsType>,
    pub image_bytes: u64,
    pub content_bytes: u64,
    pub tar_bytes: u64,
    pub entries: u64,
    pub publisher: String,
    pub created_unix: u64,
    /// sha256 of layer.img as published, for `sharedloop verify`.
    #[serde(default)]
    pub image_sha256: Option<String>,
    /// Size and times of layer.img as published (after its fsync), for
    /// `sharedloop.verify=identity`; `None` in a layer published by an
    /// older sharedloop (such a layer's digest is checked instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_file: Option<ImageStamp>,
}

/// A located layer.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    pub location: Location,
    pub dir: PathBuf,
    pub meta: LayerMeta,
    /// For a layer this process just published: the identity of the image
    /// file it built, so that only that file is recorded as checked.
    pub built: Option<FileId>,
}

impl LayerInfo {
    pub fn image(&self) -> Option<PathBuf> {
        self.meta.fs.map(|_| self.dir.join(IMAGE_FILE))
    }
}

/// Whether an error on root means "use the fallback" (the spec's not
/// found, permission denied, read-only; plus a root that went away or
/// filled up under us).
pub fn is_fallback_errno(e: Errno) -> bool {
    matches!(
        e,
        Errno::NOENT
            | Errno::ACCESS
            | Errno::PERM
            | Errno::ROFS
            | Errno::IO
            | Errno::STALE
            | Errno::NOTCONN
            | Errno::NOSPC
            | Errno::DQUOT
    )
}

/// Fails with ELOOP when `path` or a directory between `base` and it is a
/// symlink. Names that do not exist (yet) are fine.
pub fn no_links(base: &Path, path: &Path) -> io::Result<()> {
    let Ok(rel) = path.strip_prefix(base) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not below {}", path.display(), base.display()),
        ));
    };
    let mut p = base.to_path_buf();
    for c in rel.components() {
        p.push(c);
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                tracing::warn!(path = %p.display(), "a symlink in the store; not followed");
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Removes a temporary tree, logging (not failing) when it cannot; `gc`
/// sweeps what is left.
pub fn remove_tree(p: &Path) {
    match fs::remove_dir_all(p) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %p.display(), error = %e, "cannot remove a temporary directory"),
    }
}

/// Writes `data` to `path` crash-atomically: temp file, fsync, rename,
/// fsync the directory. A state file is never rewritten in place. The
/// file is root's alone (0600, see [`crate::perms`]): local state. Files
/// that other hosts read go through [`write_atomic_shared`].
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, crate::perms::PRIVATE_FILE)
}

/// [`write_atomic`] for a file of the shared store, which other hosts
/// read: 0644.
pub fn write_atomic_shared(path: &Path, data: &[u8]) -> Result<()> {
    write_atomic_mode(path, data, 0o644)
}

fn write_atomic_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().expect("file has a parent");
    let tmp = dir.join(format!(".{}.{}", path.file_name().unwrap().to_string_lossy(), random_token()));
    let r = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).ctx("create", &tmp)?;
        f.write_all(data).ctx("write", &tmp)?;
        f.sync_all().ctx("fsync", &tmp)?;
        fs::rename(&tmp, path).ctx("rename", path)?;
        fsync_dir(dir)
    })();
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).ctx("open", dir)?.sync_all().ctx("fsync", dir)
}

/// `hosts/<host-id>`: a host's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host_id: String,
    pub hostname: String,
    pub heartbeat_unix: u64,
    pub interval_secs: u64,
}

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Result of publishing: ours, or the one another host published first.
#[derive(Debug)]
pub enum Published {
    Created(LayerInfo),
    Existing(LayerInfo),
}

impl Published {
    pub fn into_info(self) -> LayerInfo {
        match self {
            Published::Created(i) | Published::Existing(i) => i,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
    pub fallback: PathBuf,
    pub host_id: String,
    /// `sharedloop.claim_timeout`.
    pub claim_timeout: std::time::Duration,
}

/// The largest `meta.json` read.
const META_MAX_BYTES: u64 = 1 << 20;

impl Store {
    pub fn new(cfg: &Config, host_id: &str) -> Store {
        Store {
            root: cfg.root.clone(),
            fallback: cfg.fallback.clone(),
            host_id: host_id.to_owned(),
            claim_timeout: std::time::Duration::from_secs(cfg.claim_timeout_secs),
        }
    }

    pub fn base(&self, loc: Location) -> &Path {
        match loc {
            Location::Root => &self.root,
            Location::Fallback => &self.fallback,
        }
    }

    /// Reads `dir/meta.json`: never through a symlink, and never anything
    /// but a regular file (a FIFO planted there would block the reader).
    pub(crate) fn read_meta(base: &Path, dir: &Path) -> io::Result<LayerMeta> {
        use std::io::Read as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let file = dir.join(META_FILE);
        no_links(base, &file)?;
        // O_PATH first: a device node a peer planted is never opened (its
        // driver's open could act), a FIFO never blocks.
        let pfd = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&file)?;
        if !pfd.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "meta.json is not a regular file"));
        }
        use std::os::fd::AsRawFd as _;
        let f = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open(format!("/proc/self/fd/{}", pfd.as_raw_fd()))?;
        // A record is a few hundred bytes: a huge one is not read whole.
        let mut text = Vec::new();
        f.take(META_MAX_BYTES + 1).read_to_end(&mut text)?;
        if text.len() as u64 > META_MAX_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "meta.json is larger than 1 MiB"));
        }
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Finds a layer: root first, then fallback. A root that cannot be read
    /// is logged and skipped.
    pub fn locate(&self, chain: &ChainId) -> Option<LayerInfo> {
        for loc in [Location::Root, Location::Fallback] {
            let dir = self.base(loc).join("layers").join(chain.dir_name());
            match Self::read_meta(self.base(loc), &dir) {
                Ok(meta) if meta.chain_id == *chain => {
                    return Some(LayerInfo { location: loc, dir, meta, built: None })
                }
                Ok(_) => {
                    tracing::warn!(layer = %chain, dir = %dir.display(), "meta.json names another layer; ignored")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(layer = %chain, dir = %dir.display(), error = %e, "layer unreadable; ignored")
                }
            }
        }
        None
    }

    /// Publishes a layer built by `build` (which fills the temp dir it is
    /// given and returns the meta), into root or, when root cannot take it,
    /// into fallback.
    pub fn publish(&self, chain: &ChainId, build: &dyn Fn(&Path) -> Result<LayerMeta>) -> Result<Published> {
        self.publish_claimed(chain, None, build)
    }

    /// Claims layer `chain` in root before this host does the work that
    /// precedes a build (extracting its tar), so that hosts waiting for it
    /// do not extract it too: `Published` when another host published it
    /// meanwhile, `Build` with the claim to hand to [`Self::publish_claimed`],
    /// `None` when root takes no claims now (it is missing, read-only,
    /// failing; publishing then falls back as usual).
    pub fn claim_in_root(&self, chain: &ChainId) -> Option<crate::claim::Outcome<LayerInfo>> {
        if !self.root.is_dir() {
            return None;
        }
        match crate::claim::claim_or_wait(&self.root, chain, &self.host_id, self.claim_timeout, &|| {
            Ok(self.locate(chain))
        }) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::debug!(layer = %chain, error = %e, "cannot claim the layer in the root directory");
                None
            }
        }
    }

    /// [`Self::publish`] with the root claim `claim` already held, if any.
    pub fn publish_claimed(
        &self,
        chain: &ChainId,
        claim: Option<crate::claim::Claim>,
        build: &dyn Fn(&Path) -> Result<LayerMeta>,
    ) -> Result<Published> {
        let root_err = match self.publish_in(Location::Root, chain, claim, build) {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        tracing::warn!(layer = %chain, root = %self.root.display(), fallback = %self.fallback.display(),
            error = %root_err, "cannot create the layer in the root directory; using the fallback directory");
        self.publish_in(Location::Fallback, chain, None, build).map_err(|fb| Error::NoStore {
            root: self.root.clone(),
            root_err: root_err.to_string(),
            fallback: self.fallback.clone(),
            fallback_err: fb.to_string(),
        })
    }

    fn publish_in(
        &self,
        loc: Location,
        chain: &ChainId,
        held: Option<crate::claim::Claim>,
        build: &dyn Fn(&Path) -> Result<LayerMeta>,
    ) -> Result<Published> {
        let base = self.base(loc);
        if loc == Location::Fallback {
            fs::create_dir_all(base).ctx("mkdir", base)?;
        } else if !base.is_dir() {
            return Err(Error::sys("open", base, io::Error::from_raw_os_error(libc::ENOENT)));
        }
        let (tmp_base, layers) = (base.join("tmp"), base.join("layers"));
        for d in [&tmp_base, &layers] {
            no_links(base, d).ctx("open", d)?;
            match fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::sys("mkdir", d, e)),
            }
        }
        // One build per layer across hosts: claim it, or wait for the host
        // that has (crate::claim).
        let claim = match held {
            Some(c) => c,
            None => match crate::claim::claim_or_wait(base, chain, &self.host_id, self.claim_timeout, &|| {
                Ok(self.locate(chain))
            })? {
                crate::claim::Outcome::Published(info) => {
                    tracing::info!(layer = %chain, location = info.location.name(), "another host built this layer; using it");
                    return Ok(Published::Existing(info));
                }
                crate::claim::Outcome::Build(c) => c,
            },
        };
        let started = std::time::Instant::now();
        let tmp = tmp_base.join(format!("{}-{}", self.host_id, random_token()));
        fs::create_dir(&tmp).ctx("mkdir", &tmp)?;
        let r = (|| {
            crate::fault::point("publish", "temp dir made");
            let mut meta = build(&tmp)?;
            crate::fault::point("publish", "image built");
            // What this host built and hashed, to vouch for exactly that file.
            let built = match meta.fs.map(|_| ImageFile::open(&tmp.join(IMAGE_FILE))).transpose()? {
                Some(Opened::File(f)) => Some(f.at_open()),
                _ => None,
            };
            // The finished image's identity, for hosts that check it by its
            // size and times (verify=identity). build() fsynced it: times
            // a network filesystem's server sets on the write back are in.
            meta.image_file = built.map(ImageStamp::of);
            let text = serde_json::to_vec_pretty(&meta).expect("meta serialises");
            {
                // Closed before anything may remove the directory: a network
                // filesystem keeps open, deleted files (.fuse_hidden*, .nfs*).
                let mut f = File::create(tmp.join(META_FILE)).ctx("create", tmp.join(META_FILE))?;
                f.write_all(&text).ctx("write", tmp.join(META_FILE))?;
                f.sync_all().ctx("fsync", tmp.join(META_FILE))?;
            }
            fsync_dir(&tmp)?;
            crate::fault::point("publish", "meta written and synced");
            let dest = layers.join(chain.dir_name());
            match rustix::fs::rename(&tmp, &dest) {
                Ok(()) => {
                    crate::fault::point("publish", "renamed into place");
                    fsync_dir(&layers)?;
                    crate::metrics::observe_publish(started, loc, meta.image_bytes);
                    Ok(Published::Created(LayerInfo { location: loc, dir: dest, meta, built }))
                }
                // EEXIST/ENOTEMPTY locally; network filesystems may answer
                // otherwise (EPERM, EIO): what counts is whether the name
                // now holds a complete layer.
                Err(e) => match Self::read_meta(base, &dest) {
                    Ok(meta) if meta.chain_id == *chain => {
                        tracing::info!(layer = %chain, "another host published this layer first; using theirs");
                        remove_tree(&tmp);
                        Ok(Published::Existing(LayerInfo { location: loc, dir: dest, meta, built: None }))
                    }
                    _ => Err(Error::sys("rename", dest, e)),
                },
            }
        })();
        if r.is_err() {
            remove_tree(&tmp);
        } else {
            // In place (ours, or another host's that won the rename):
            // waiters may stop waiting. On an error the claim is dropped,
            // which removes it, and a waiter takes over at once.
            claim.published();
        }
        r
    }

    fn ref_path(&self, info: &LayerInfo) -> PathBuf {
        let base = self.base(info.location);
        base.join("refs").join(info.meta.chain_id.dir_name()).join(&self.host_id)
    }

    /// Records that this host uses the layer. A read-only root cannot take
    /// the record; that is logged, not an error (such a root's layers are
    /// never collected by this host anyway).
    pub fn add_ref(&self, info: &LayerInfo) {
        let p = self.ref_path(info);
        let base = self.base(info.location);
        let r = no_links(base, &p).and_then(|_| fs::create_dir_all(p.parent().unwrap())).and_then(|_| {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)
                .map(drop)
        });
        if let Err(e) = r {
            tracing::info!(layer = %info.meta.chain_id, path = %p.display(), error = %e, "cannot record the layer reference");
        }
    }

    /// The layers (in root and fallback) that `host` holds a reference to.
    pub fn held_by(&self, host: &str) -> Vec<(ChainId, LayerInfo)> {
        let mut v = Vec::new();
        for loc in [Location::Root, Location::Fallback] {
            let base = self.base(loc);
            let refs = base.join("refs");
            if no_links(base, &refs).is_err() {
                continue;
            }
            let Ok(rd) = fs::read_dir(&refs) else { continue };
            for e in rd.flatten() {
                let Some(c) = ChainId::from_dir_name(&e.file_name().to_string_lossy()) else { continue };
                if fs::symlink_metadata(base.join("layers").join(c.dir_name())).is_err() {
                    // A removal that a crash interrupted after the rename:
                    // an empty reference directory (never one with others'
                    // references: remove_dir refuses).
                    let _ = fs::remove_file(e.path().join(host));
                    let _ = fs::remove_dir(e.path());
                    continue;
                }
                if fs::symlink_metadata(e.path().join(host)).is_ok() {
                    let dir = base.join("layers").join(c.dir_name());
                    let info = match Self::read_meta(base, &dir) {
                        Ok(meta) => LayerInfo { location: loc, dir, meta, built: None },
                        // The layer is gone: a reference to nothing.
                        Err(_) => {
                            let _ = fs::remove_file(e.path().join(host));
                            let _ = fs::remove_dir(e.path());
                            continue;
                        }
                    };
                    v.push((c, info));
                }
            }
        }
        v
    }

    /// The hosts that hold a reference to the layer.
    pub fn refs(&self, info: &LayerInfo) -> Vec<String> {
        let dir = self.base(info.location).join("refs").join(info.meta.chain_id.dir_name());
        if no_links(self.base(info.location), &dir).is_err() {
            return Vec::new();
        }
        let mut v: Vec<String> = fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Records this host's use of the layer and confirms it is still
    /// there: a deleter that raced us either saw our reference or we see
    /// that the layer is gone (`None`; publish it again).
    pub fn acquire(&self, info: &LayerInfo) -> Option<LayerInfo> {
        self.add_ref(info);
        let again = self.locate(&info.meta.chain_id)?;
        if again.location != info.location {
            self.add_ref(&again);
        }
        Some(again)
    }

    /// Drops this host's reference; removes the layer when no host holds
    /// one any more. Returns whether the layer was removed.
    pub fn release(&self, info: &LayerInfo) -> Result<bool> {
        let p = self.ref_path(info);
        let base = self.base(info.location);
        match no_links(base, p.parent().unwrap()).and_then(|_| fs::remove_file(&p)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::info!(layer = %info.meta.chain_id, error = %e, "cannot drop the layer reference; layer kept");
                return Ok(false);
            }
        }
        crate::fault::point("remove", "reference dropped");
        if !self.refs(info).is_empty() {
            return Ok(false);
        }
        self.delete_unreferenced(info, &[])
    }

    /// Deletes a layer that no host in `ignore` (dead hosts) and no other
    /// host references: rename it away, look at the references again, and
    /// put it back if one appeared meanwhile. Returns whether it was
    /// deleted.
    pub fn delete_unreferenced(&self, info: &LayerInfo, ignore: &[String]) -> Result<bool> {
        let live = |refs: Vec<String>| refs.into_iter().any(|r| !ignore.contains(&r));
        if live(self.refs(info)) {
            return Ok(false);
        }
        let base = self.base(info.location);
        let grave = base.join("tmp").join(format!("{}-rm-{}", self.host_id, random_token()));
        if no_links(base, &info.dir).and_then(|_| no_links(base, &grave)).is_err() {
            return Ok(false);
        }
        let _ = fs::create_dir(base.join("tmp"));
        match fs::rename(&info.dir, &grave) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                tracing::info!(layer = %info.meta.chain_id, error = %e, "cannot remove the layer; kept");
                return Ok(false);
            }
        }
        crate::fault::point("remove", "layer renamed away");
        // Its published build claims would hold up a host rebuilding it.
        crate::claim::forget(base, &info.meta.chain_id);
        if live(self.refs(info)) {
            tracing::info!(layer = %info.meta.chain_id, "a host started using the layer while it was being removed; kept");
            if fs::rename(&grave, &info.dir).is_err() {
                // Republished meanwhile: the new copy serves.
                let _ = fs::remove_dir_all(&grave);
            }
            return Ok(false);
        }
        let refs = base.join("refs").join(info.meta.chain_id.dir_name());
        if no_links(base, &refs).is_err() {
            fs::remove_dir_all(&grave).ctx("remove", &grave)?;
            return Ok(true);
        }
        for r in ignore {
            let _ = fs::remove_file(refs.join(r));
        }
        let _ = fs::remove_dir(&refs);
        fs::remove_dir_all(&grave).ctx("remove", &grave)?;
        Ok(true)
    }

    /// Every published layer in `loc`.
    pub fn layers(&self, loc: Location) -> Vec<LayerInfo> {
        let dir = self.base(loc).join("layers");
        if no_links(self.base(loc), &dir).is_err() {
            return Vec::new();
        }
        let Ok(rd) = fs::read_dir(&dir) else { return Vec::new() };
        let mut v: Vec<LayerInfo> = rd
            .flatten()
            .filter_map(|e| {
                let chain = ChainId::from_dir_name(&e.file_name().to_string_lossy())?;
                let meta = Self::read_meta(self.base(loc), &e.path()).ok().filter(|m| m.chain_id == chain)?;
                Some(LayerInfo { location: loc, dir: e.path(), meta, built: None })
            })
            .collect();
        v.sort_by(|a, b| a.meta.chain_id.cmp(&b.meta.chain_id));
        v
    }

    /// Writes this host's heartbeat into every store directory that exists
    /// and is writable.
    pub fn heartbeat(&self, interval_secs: u64) {
        let rec = HostRecord {
            host_id: self.host_id.clone(),
            hostname: rustix::system::uname().nodename().to_string_lossy().into_owned(),
            heartbeat_unix: now_unix(),
            interval_secs,
        };
        let text = serde_json::to_vec(&rec).expect("serialises");
        for loc in [Location::Root, Location::Fallback] {
            let base = self.base(loc);
            if !base.is_dir() {
                continue;
            }
            let dir = base.join("hosts");
            let r = match no_links(base, &dir).and_then(|_| fs::create_dir(&dir)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(Error::sys("mkdir", &dir, e)),
            }
            .and_then(|_| write_atomic_shared(&dir.join(&self.host_id), &text));
            match r {
                Ok(()) => crate::metrics::heartbeat_written(base),
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot write the heartbeat"),
            }
        }
    }

    /// The hosts registered in `loc`.
    pub fn hosts(&self, loc: Location) -> Vec<HostRecord> {
        let dir = self.base(loc).join("hosts");
        let Ok(rd) = fs::read_dir(&dir) else { return Vec::new() };
        let mut v: Vec<HostRecord> = rd
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| fs::read(e.path()).ok().and_then(|t| serde_json::from_slice(&t).ok()))
            .collect();
        v.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        v
    }

    /// Removes this host's leftovers in `tmp/` (builds of a previous run).
    pub fn sweep_own_tmp(&self) {
        for loc in [Location::Root, Location::Fallback] {
            let tmp = self.base(loc).join("tmp");
            if no_links(self.base(loc), &tmp).is_err() {
                continue;
            }
            let Ok(rd) = fs::read_dir(&tmp) else { continue };
            let prefix = format!("{}-", self.host_id);
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    tracing::info!(path = %e.path().display(), "removing leftover temporary build");
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Counts published layers per location (for status output).
    pub fn count_layers(&self, loc: Location) -> Option<usize> {
        fs::read_dir(self.base(loc).join("layers")).ok().map(|d| d.count())
    }

    /// Why root cannot take new layers, if it cannot (probed with a
    /// temporary file).
    pub fn root_problem(&self) -> Option<String> {
        let probe = self.root.join("tmp");
        // Never create root itself: a missing root is a reason to fall back.
        let r = fs::create_dir(&probe).or_else(|e| if probe.is_dir() { Ok(()) } else { Err(e) }).and_then(|_| {
            // Some data, not just a name: a full filesystem still takes
            // empty files.
            let p = probe.join(format!(".probe-{}", random_token()));
            let w = File::create(&p).and_then(|mut f| f.write_all(&[0u8; 65536]).and_then(|_| f.sync_all()));
            let _ = fs::remove_file(&p);
            w
        });
        if let Err(e) = r {
            return Some(e.to_string());
        }
        match rustix::fs::statvfs(&self.root) {
            Ok(s) if s.f_bavail.saturating_mul(s.f_frsize) < MIN_FREE_BYTES => {
                Some(format!("{} free, less than a layer needs", crate::ids::Bytes(s.f_bavail * s.f_frsize)))
            }
            _ => None,
        }
    }
}
