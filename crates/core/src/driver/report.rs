//! What the driver tells about itself and its layers: its report and a
//! layer's (neutral data; the front ends render them), changes, diff size
//! and the directory a diff is exported from.

use std::path::PathBuf;

use super::records::{Kind, LocalLayer, Source};
use super::{none_if_empty, Driver, Lease};
use crate::error::{Error, Result};
use crate::export::{self, Change};
use crate::fsmagic;
use crate::ids::{Bytes, ChainId};
use crate::options::{DirectIo, FsType};
use crate::placement::RootPlacement;
use crate::store::Location;

impl Driver {
    pub(super) fn check_parent(l: &LocalLayer, parent: Option<&str>) -> Result<()> {
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
    /// [`export::export_tar`]. Checked before anything is streamed. The
    /// lease keeps it mounted while the caller streams from it: a removal
    /// of the layer meanwhile waits for the lease (a bounded time, then it
    /// is refused as in use).
    pub fn diff_source(&self, id: &str, parent: Option<&str>) -> Result<Lease> {
        Ok(self.lend_own(id, parent, false)?.0)
    }

    /// The changes of layer `id` against its parent.
    pub fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<Change>> {
        let (_lease, dir, lowers) = self.lend_own(id, parent, true)?;
        match dir {
            Some(d) => export::changes(&d, &lowers),
            None => Ok(Vec::new()),
        }
    }

    /// Bytes of content layer `id` adds.
    pub fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64> {
        {
            let st = self.state()?;
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            Self::check_parent(&l, parent)?;
            if let Kind::Image { size, .. } = l.kind {
                return Ok(size);
            }
        }
        let (_lease, dir, _) = self.lend_own(id, parent, false)?;
        dir.map(|d| export::tree_size(&d)).unwrap_or(Ok(0))
    }

    /// What the driver can tell about itself (a front end renders it:
    /// `docker info`'s lines, for one).
    pub fn report(&self) -> DriverReport {
        let area = |loc: Location| {
            let base = self.store.base(loc);
            AreaReport {
                location: loc,
                fs: base.exists().then(|| fsmagic::fs_name_of(base)),
                layers: self.store.count_layers(loc).unwrap_or(0),
            }
        };
        let home_fs = fsmagic::fs_name_of(&self.home);
        let root_problem = self.store.root_problem();
        let placement = crate::placement::check_root(&self.cfg.root, Some(&self.home));
        let (root_area, fallback_area) = (area(Location::Root), area(Location::Fallback));
        let st = self.lock();
        DriverReport {
            home_fs,
            root: self.cfg.root.clone(),
            fallback: self.cfg.fallback.clone(),
            fs: self.cfg.fs,
            direct_io: self.cfg.direct_io,
            prefetch: self.cfg.prefetch_settings(),
            layer_build: self.layer_build(),
            writable_layers: self.writable_layers_kind(),
            root_problem,
            placement,
            root_area,
            fallback_area,
            layer_mounts: st.ro.values().filter(|m| m.dev.is_some()).count(),
            host_id: self.store.host_id.clone(),
        }
    }

    /// What a container's writable layer is, as `docker info` says it.
    fn writable_layers_kind(&self) -> String {
        let image = format!("{} images of {} (sharedloop.size)", self.cfg.fs.name(), self.cfg.rw_size);
        match self.cfg.writable_layers {
            crate::options::WritableLayers::Image => image,
            crate::options::WritableLayers::Dir if self.home_holds_uppers() => {
                format!("directories in the home, no size limit; {image} where a size is given")
            }
            crate::options::WritableLayers::Dir => {
                format!("{image}: writable_layers=dir, but the home cannot be an overlay upper")
            }
        }
    }

    /// How new layer images are built, as `docker info` says it.
    fn layer_build(&self) -> String {
        let staged = "staged (the tar is extracted to a local directory, then mkfs copies it)";
        if self.cfg.one_pass_build == Some(false) {
            return format!("{staged}; one_pass_build=false");
        }
        if self.cfg.fs != FsType::Ext4 {
            return format!("{staged}; one pass is for ext4 images");
        }
        match self.kernel.one_pass_tool(&self.home.join("tmp")) {
            Ok(tool) => format!("one pass from the tar ({tool})"),
            Err(why) => format!("{staged}; {why}"),
        }
    }

    /// What the driver can tell about layer `id`: its stack and, for a
    /// writable layer, its directories.
    pub fn layer_report(&self, id: &str) -> Result<LayerReport> {
        // What the state knows, under the lock; the store and the mount
        // table are read after it.
        let (l, srcs, known, lowers) = {
            let st = self.state()?;
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            let srcs = self.sources(&st, id, true)?;
            let known: std::collections::HashMap<ChainId, (crate::store::LayerInfo, Option<String>)> = srcs
                .iter()
                .filter_map(|s| match s {
                    Source::Chain(c) => st.ro.get(c).map(|r| (c.clone(), (r.info.clone(), r.dev.clone()))),
                    Source::Upper(..) => None,
                })
                .collect();
            (l, srcs, known, self.stack_paths(&st, id, false))
        };
        let mounts = self.kernel.mountinfo().unwrap_or_default();
        // Every layer of the stack, topmost first.
        let mut stack = Vec::new();
        for src in srcs {
            match &src {
                Source::Chain(ch) => {
                    let (info, dev) = match known.get(ch) {
                        Some((info, dev)) => (Some(info.clone()), dev.clone()),
                        None => (self.store.locate(ch), None),
                    };
                    if let Some(info) = info {
                        if let Some(img) = info.image() {
                            stack.push(StackEntry { image: img, location: Some(info.location), loop_device: dev });
                        }
                    }
                }
                Source::Upper(c, _) => {
                    let mnt = self.rw_mnt(c);
                    // A directory layer: its directory, and no loop device
                    // (its bind mount's source is the home's device).
                    let dir = self.rw_dir(c);
                    let (image, loop_device) = if dir.is_dir() {
                        (dir, None)
                    } else {
                        (self.rw_image(c), mounts.iter().find(|e| e.mount_point == mnt).map(|e| e.source.clone()))
                    };
                    stack.push(StackEntry { image, location: None, loop_device });
                }
            }
        }
        let kind = match &l.kind {
            Kind::Image { chain, .. } => LayerReportKind::Image { chain: chain.clone() },
            Kind::Rw { size, fs } => {
                let rw = self.rw_mnt(id);
                LayerReportKind::Rw {
                    upper: rw.join("upper"),
                    work: rw.join("work"),
                    merged: self.merged(id),
                    image: (!self.rw_dir(id).is_dir()).then_some((*size, *fs)),
                    lowers,
                }
            }
        };
        Ok(LayerReport { stack, kind })
    }
}

/// The driver's own state, for a front end to render ([`Driver::report`]).
#[derive(Debug, Clone)]
pub struct DriverReport {
    /// The filesystem of the driver's home.
    pub home_fs: String,
    pub root: PathBuf,
    pub fallback: PathBuf,
    /// The filesystem of layer images.
    pub fs: FsType,
    pub direct_io: DirectIo,
    /// The learned-prefetch options.
    pub prefetch: crate::prefetch::Settings,
    /// How new layer images are built (`sharedloop.one_pass_build`).
    pub layer_build: String,
    /// What a container's writable layer is (`sharedloop.writable_layers`,
    /// `sharedloop.size`).
    pub writable_layers: String,
    /// Why new layers go to the fallback, if they do; `None`: the root is
    /// writable.
    pub root_problem: Option<String>,
    pub placement: RootPlacement,
    pub root_area: AreaReport,
    pub fallback_area: AreaReport,
    /// Read-only layer mounts with a loop device.
    pub layer_mounts: usize,
    pub host_id: String,
}

/// The root or the fallback.
#[derive(Debug, Clone)]
pub struct AreaReport {
    pub location: Location,
    /// Its filesystem; `None`: not created yet.
    pub fs: Option<String>,
    pub layers: usize,
}

/// A layer's details, for a front end to render ([`Driver::layer_report`]).
#[derive(Debug, Clone)]
pub struct LayerReport {
    /// Every layer image of the stack, topmost first.
    pub stack: Vec<StackEntry>,
    pub kind: LayerReportKind,
}

/// One image of a layer stack.
#[derive(Debug, Clone)]
pub struct StackEntry {
    pub image: PathBuf,
    /// Where a published layer is; `None`: a writable layer's own image,
    /// on this host.
    pub location: Option<Location>,
    /// The loop device it is attached to, if it is.
    pub loop_device: Option<String>,
}

#[derive(Debug, Clone)]
pub enum LayerReportKind {
    Image {
        chain: Option<ChainId>,
    },
    Rw {
        upper: PathBuf,
        work: PathBuf,
        merged: PathBuf,
        /// The image's size and filesystem; `None`: a directory layer
        /// (no image, no size limit).
        image: Option<(Bytes, FsType)>,
        /// The layers below, topmost first.
        lowers: Vec<PathBuf>,
    },
}
