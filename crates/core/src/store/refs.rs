//! The hosts' references to layers (`refs/<chain>/<host-id>`), and
//! deleting a layer none of them holds.

use std::fs;
use std::io;
use std::path::PathBuf;

use super::{no_links, LayerInfo, Location, Store};
use crate::error::{Context, Result};
use crate::ids::{random_token, ChainId};

impl Store {
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
}
