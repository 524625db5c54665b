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
//!
//! The store's parts: this file has the records (`LayerMeta`,
//! `LayerInfo`) and finding layers; `publish` writes new layers, `refs`
//! holds the hosts' references and deletes what none holds, `hosts` has
//! the heartbeats and the probes of the store directories, and `files`
//! the crash-atomic file helpers everything else writes through.

mod files;
mod hosts;
mod publish;
mod refs;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{ChainId, DiffId};
use crate::imagefile::{FileId, ImageStamp};
use crate::options::{Config, FsType};

pub use files::{fsync_dir, is_fallback_errno, no_links, remove_tree, write_atomic, write_atomic_shared};
pub use hosts::HostRecord;
pub use publish::Published;

/// The `format` written into each new meta.json. Readers take every
/// version up to this one (the layout is the same).
/// - 1: the first; `image_sha256` was added during its life, so a layer of
///   format 1 may lack it.
/// - 2: `image_sha256` is recorded for every layer that has an image.
pub const FORMAT_VERSION: u32 = 2;
/// The first format whose layers all record `image_sha256`: a layer of this
/// format or later without it had its record removed, and is refused.
pub const DIGEST_ALWAYS_FORMAT: u32 = 2;
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

pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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
}
