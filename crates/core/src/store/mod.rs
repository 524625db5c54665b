//! The layer store on the root and fallback directories.
//!
//! On-disk format, version 2 (docs/on-disk-format.md):
//! ```text
//! <root or fallback>/
//!   layers/<sha256-HEX>/layer.img      the layer image (absent for an empty layer)
//!   layers/<sha256-HEX>/meta.json      LayerMeta
//!   layers/<sha256-HEX>/prefetch       what hosts read of it at start (optional)
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
//! plant `refs/<chain>` -> `/etc`, and this host would write there. So
//! the store works behind a directory handle (`Dir`): every name below
//! a base is resolved with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! and changed with `*at` calls on directories opened that way.
//!
//! The store's parts: this file has the layout (`layout`), the records
//! (`LayerMeta`, `LayerInfo`) and finding layers; `dir` the directory
//! handle everything below a base goes through; `publish` writes new
//! layers, `refs` holds the hosts' references and deletes what none holds,
//! `hosts` has the heartbeats and the probes of the store directories,
//! `sweep` what `gc` and `verify` look at, `promote` the move of a
//! fallback layer into root, and `files` the crash-atomic file helpers
//! for local state. The build claims (`crate::claim`) go through `Dir`
//! too.

mod dir;
mod files;
mod hosts;
mod promote;
mod publish;
mod refs;
mod sweep;

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ids::{ChainId, DiffId};
use crate::imagefile::{FileId, ImageStamp};
use crate::options::{Config, FsType};

pub(crate) use dir::Dir;
pub use files::{fsync_dir, is_fallback_errno, write_atomic};
pub use hosts::HostRecord;
pub(crate) use promote::Promotion;
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
/// What hosts read of the layer's image when they started it
/// (`crate::prefetch`); optional, added after publish.
pub const PREFETCH_FILE: &str = "prefetch";

/// The layout below a base directory, as names relative to it: the one
/// place it is spelled out (docs/on-disk-format.md).
pub(crate) mod layout {
    use std::path::PathBuf;

    use crate::ids::ChainId;

    pub const LAYERS: &str = "layers";
    pub const TMP: &str = "tmp";
    pub const REFS: &str = "refs";
    pub const HOSTS: &str = "hosts";
    pub const CLAIMS: &str = "claims";

    /// `layers/<sha256-HEX>`
    pub fn layer(chain: &ChainId) -> PathBuf {
        PathBuf::from(LAYERS).join(chain.dir_name())
    }

    /// `layers/<sha256-HEX>/meta.json`
    pub fn meta(chain: &ChainId) -> PathBuf {
        layer(chain).join(super::META_FILE)
    }

    /// `layers/<sha256-HEX>/layer.img`
    pub fn image(chain: &ChainId) -> PathBuf {
        layer(chain).join(super::IMAGE_FILE)
    }

    /// `layers/<sha256-HEX>/prefetch`
    pub fn prefetch(chain: &ChainId) -> PathBuf {
        layer(chain).join(super::PREFETCH_FILE)
    }

    /// `refs/<sha256-HEX>`
    pub fn refs(chain: &ChainId) -> PathBuf {
        PathBuf::from(REFS).join(chain.dir_name())
    }

    /// `refs/<sha256-HEX>/<host-id>`
    pub fn reference(chain: &ChainId, host: &str) -> PathBuf {
        refs(chain).join(host)
    }

    /// `hosts/<host-id>`
    pub fn host(id: &str) -> PathBuf {
        PathBuf::from(HOSTS).join(id)
    }
}

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
    /// The layer's directory (for messages and for tools that take a
    /// path; the store itself opens it below `base`).
    pub dir: PathBuf,
    /// The store directory it is in.
    pub(crate) base: PathBuf,
    pub meta: LayerMeta,
    /// For a layer this process just published: the identity of the image
    /// file it built, so that only that file is recorded as checked.
    pub built: Option<FileId>,
}

impl LayerInfo {
    pub fn image(&self) -> Option<PathBuf> {
        self.meta.fs.map(|_| self.dir.join(IMAGE_FILE))
    }

    /// Opens the layer's image below its store directory (never through a
    /// symlink, never anything but a regular file); `None` for an empty
    /// layer.
    pub(crate) fn open_image(&self) -> crate::Result<Option<crate::imagefile::Opened>> {
        let Some(img) = self.image() else { return Ok(None) };
        let base = Dir::open(&self.base).map_err(|e| crate::Error::sys("open", &self.base, e))?;
        crate::imagefile::ImageFile::open_beneath(base.fd(), &layout::image(&self.meta.chain_id), &img).map(Some)
    }

    /// Whether the layer's meta.json is (still) there.
    pub(crate) fn present(&self) -> bool {
        Dir::open(&self.base).is_ok_and(|d| d.exists(layout::meta(&self.meta.chain_id)))
    }

    fn with_built(mut self, built: Option<FileId>) -> LayerInfo {
        self.built = built;
        self
    }

    fn found(loc: Location, base: &Dir, meta: LayerMeta) -> LayerInfo {
        let dir = base.join(layout::layer(&meta.chain_id));
        LayerInfo { location: loc, dir, base: base.path().to_owned(), meta, built: None }
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

    /// The store directory `loc`, open (see [`Dir`]).
    pub(crate) fn dir(&self, loc: Location) -> io::Result<Dir> {
        Dir::open(self.base(loc))
    }

    /// Reads the meta.json of layer `chain` in `base`: never through a
    /// symlink, never anything but a regular file (a FIFO planted there
    /// would block the reader), never more than 1 MiB.
    pub(crate) fn read_meta(base: &Dir, chain: &ChainId) -> io::Result<LayerMeta> {
        use std::io::Read as _;
        let mut text = Vec::new();
        base.open_regular(layout::meta(chain))?.take(META_MAX_BYTES + 1).read_to_end(&mut text)?;
        if text.len() as u64 > META_MAX_BYTES {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "meta.json is larger than 1 MiB"));
        }
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Layer `chain` in `base`, when meta.json is readable and names it.
    fn layer_in(loc: Location, base: &Dir, chain: &ChainId) -> io::Result<Option<LayerInfo>> {
        let meta = Self::read_meta(base, chain)?;
        if meta.chain_id != *chain {
            return Ok(None);
        }
        Ok(Some(LayerInfo::found(loc, base, meta)))
    }

    /// Finds a layer: root first, then fallback. A root that cannot be read
    /// is logged and skipped.
    pub fn locate(&self, chain: &ChainId) -> Option<LayerInfo> {
        for loc in [Location::Root, Location::Fallback] {
            let Ok(base) = self.dir(loc) else { continue };
            let dir = base.join(layout::layer(chain));
            match Self::layer_in(loc, &base, chain) {
                Ok(Some(info)) => return Some(info),
                Ok(None) => {
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
        let Ok(base) = self.dir(loc) else { return Vec::new() };
        let Ok(entries) = base.entries(layout::LAYERS) else { return Vec::new() };
        // Sorted by name, which is by chain id.
        entries
            .iter()
            .filter_map(|e| ChainId::from_dir_name(&e.name))
            .filter_map(|c| Self::layer_in(loc, &base, &c).ok().flatten())
            .collect()
    }
}
