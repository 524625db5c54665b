//! The driver's local records (`<home>/layers/<id>.json`) and what it
//! keeps about layers and mounts.

use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Driver, State};
use crate::error::{Context, Error, Result};
use crate::ids::DiffId;
use crate::ids::{Bytes, ChainId};
use crate::options::FsType;
use crate::store::{write_atomic, LayerInfo};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(super) enum Kind {
    /// A read-only layer; `chain` is set once its diff is applied.
    Image { chain: Option<ChainId>, size: u64 },
    /// A writable layer with its own image.
    Rw { size: Bytes, fs: FsType },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct LocalLayer {
    pub(super) id: String,
    pub(super) parent: Option<String>,
    /// The parent's content as it was when this layer was created over a
    /// writable parent: a published snapshot of the parent's upper
    /// directory, so that later writes to the parent do not show through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) base: Option<ChainId>,
    #[serde(flatten)]
    pub(super) kind: Kind,
}

/// Where one level of a layer stack comes from.
#[derive(Debug, Clone)]
pub(super) enum Source {
    /// A published layer, mounted read-only once per host.
    Chain(ChainId),
    /// The upper directory of local writable layer `id`.
    Upper(String, FsType),
}

impl LocalLayer {
    /// This layer's own content, if it has any.
    pub(super) fn content(&self) -> Option<Source> {
        match &self.kind {
            Kind::Image { chain: Some(c), .. } => Some(Source::Chain(c.clone())),
            Kind::Rw { fs, .. } => Some(Source::Upper(self.id.clone(), *fs)),
            Kind::Image { chain: None, .. } => None,
        }
    }
    /// Whether this layer stands on published layer `c` (as its content
    /// or as the snapshot of its parent).
    pub(super) fn uses_chain(&self, c: &ChainId) -> bool {
        self.base.as_ref() == Some(c) || matches!(&self.kind, Kind::Image { chain: Some(oc), .. } if oc == c)
    }
}

#[derive(Debug, Clone)]
pub(super) struct RoMount {
    pub(super) info: LayerInfo,
    /// `None` for an empty layer (nothing mounted).
    pub(super) dev: Option<String>,
}

#[derive(Debug)]
pub(super) struct GetRef {
    pub(super) count: u32,
    pub(super) dir: PathBuf,
    pub(super) mounted: bool,
    /// Found mounted at start (a previous run's Get): nobody in this run
    /// holds it, so it does not keep the layer from being removed.
    pub(super) adopted: bool,
}

/// What the store records about a layer's tree besides its image.
pub(super) struct TreeFacts {
    pub(super) diff_id: Option<DiffId>,
    pub(super) content_bytes: u64,
    pub(super) tar_bytes: u64,
    pub(super) entries: u64,
}

impl Driver {
    pub(super) fn save(&self, l: &LocalLayer) -> Result<()> {
        write_atomic(&self.layer_file(&l.id), &serde_json::to_vec(l).expect("serialises"))
    }

    /// Loads the local layer records into `st`, removing what an
    /// interrupted atomic write left.
    pub(super) fn load_records(&self, st: &mut State) -> Result<()> {
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
        Ok(())
    }
}
