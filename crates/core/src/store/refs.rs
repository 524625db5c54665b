//! The hosts' references to layers (`refs/<chain>/<host-id>`), and
//! deleting a layer none of them holds. Everything goes through the
//! store directory's handle ([`super::Dir`]): a symlink planted at
//! `refs/<chain>` or at a reference is never followed.

use std::io;

use super::{layout, Dir, LayerInfo, Location, Store};
use crate::error::{Context, Result};
use crate::ids::{random_token, ChainId};

impl Store {
    /// The store directory `info` is in, open.
    fn base_of(&self, info: &LayerInfo) -> io::Result<Dir> {
        self.dir(info.location)
    }

    /// Records that this host uses the layer. A read-only root cannot take
    /// the record; that is logged, not an error (such a root's layers are
    /// never collected by this host anyway).
    pub fn add_ref(&self, info: &LayerInfo) {
        let chain = &info.meta.chain_id;
        let r = self.base_of(info).and_then(|base| Self::put_ref(&base, chain, &self.host_id));
        if let Err(e) = r {
            let p = self.base(info.location).join(layout::reference(chain, &self.host_id));
            tracing::info!(layer = %chain, path = %p.display(), error = %e, "cannot record the layer reference");
        }
    }

    /// Makes reference `refs/<chain>/<host>` in `base` (never through a
    /// symlink, never opening what is there already).
    pub(crate) fn put_ref(base: &Dir, chain: &ChainId, host: &str) -> io::Result<()> {
        base.sub_made(layout::refs(chain))?.touch(host)
    }

    /// The layers (in root and fallback) that `host` holds a reference to.
    pub fn held_by(&self, host: &str) -> Vec<(ChainId, LayerInfo)> {
        let mut v = Vec::new();
        for loc in [Location::Root, Location::Fallback] {
            let Ok(base) = self.dir(loc) else { continue };
            let Ok(entries) = base.entries(layout::REFS) else { continue };
            for e in entries {
                let Some(c) = ChainId::from_dir_name(&e.name) else { continue };
                if !base.exists(layout::layer(&c)) {
                    // A removal that a crash interrupted after the rename:
                    // an empty reference directory (never one with others'
                    // references: remove_dir refuses).
                    Self::forget_ref(&base, &c, host);
                    continue;
                }
                if base.exists(layout::reference(&c, host)) {
                    match Self::layer_in(loc, &base, &c) {
                        Ok(Some(info)) => v.push((c, info)),
                        // The layer is gone: a reference to nothing.
                        _ => Self::forget_ref(&base, &c, host),
                    }
                }
            }
        }
        v
    }

    /// Removes `host`'s reference to `chain`, and the reference directory
    /// when it is empty then.
    fn forget_ref(base: &Dir, chain: &ChainId, host: &str) {
        let _ = base.remove_file(layout::reference(chain, host));
        let _ = base.remove_dir(layout::refs(chain));
    }

    /// The hosts that hold a reference to the layer.
    pub fn refs(&self, info: &LayerInfo) -> Vec<String> {
        let Ok(base) = self.base_of(info) else { return Vec::new() };
        Self::refs_in(&base, &info.meta.chain_id)
    }

    fn refs_in(base: &Dir, chain: &ChainId) -> Vec<String> {
        base.entries(layout::refs(chain)).map(|v| v.into_iter().map(|e| e.name).collect()).unwrap_or_default()
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
        let chain = &info.meta.chain_id;
        let r = self.base_of(info).and_then(|b| b.remove_file(layout::reference(chain, &self.host_id)));
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::info!(layer = %chain, error = %e, "cannot drop the layer reference; layer kept");
                return Ok(false);
            }
        }
        crate::fault::point("remove", "reference dropped");
        if !self.refs(info).is_empty() {
            return Ok(false);
        }
        self.delete_unreferenced(info, &[])
    }

    /// Drops the references of `hosts` (dead ones) to the layer.
    pub(crate) fn drop_refs(&self, info: &LayerInfo, hosts: &[String]) {
        let Ok(base) = self.base_of(info) else { return };
        for h in hosts {
            let _ = base.remove_file(layout::reference(&info.meta.chain_id, h));
        }
    }

    /// Seconds since `host` wrote its reference to the layer (`u64::MAX`
    /// when there is none).
    pub(crate) fn ref_age_secs(&self, info: &LayerInfo, host: &str, now: u64) -> u64 {
        let Ok(base) = self.base_of(info) else { return u64::MAX };
        base.age_secs(layout::reference(&info.meta.chain_id, host), now)
    }

    /// Deletes a layer that no host in `ignore` (dead hosts) and no other
    /// host references: rename it away, look at the references again, and
    /// put it back if one appeared meanwhile. Returns whether it was
    /// deleted.
    pub fn delete_unreferenced(&self, info: &LayerInfo, ignore: &[String]) -> Result<bool> {
        let chain = &info.meta.chain_id;
        let live = |refs: Vec<String>| refs.into_iter().any(|r| !ignore.contains(&r));
        let Ok(base) = self.base_of(info) else { return Ok(false) };
        if live(Self::refs_in(&base, chain)) {
            return Ok(false);
        }
        let grave = std::path::Path::new(layout::TMP).join(format!("{}-rm-{}", self.host_id, random_token()));
        if let Err(e) = base.sub_made(layout::TMP) {
            tracing::info!(layer = %chain, error = %e, "cannot remove the layer; kept");
            return Ok(false);
        }
        match base.rename(layout::layer(chain), &grave) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => {
                tracing::info!(layer = %chain, error = %e, "cannot remove the layer; kept");
                return Ok(false);
            }
        }
        crate::fault::point("remove", "layer renamed away");
        // Its published build claims would hold up a host rebuilding it.
        crate::claim::forget(base.path(), chain);
        if live(Self::refs_in(&base, chain)) {
            tracing::info!(layer = %chain, "a host started using the layer while it was being removed; kept");
            if base.rename(&grave, layout::layer(chain)).is_err() {
                // Republished meanwhile: the new copy serves.
                let _ = base.remove_tree(&grave);
            }
            return Ok(false);
        }
        for r in ignore {
            let _ = base.remove_file(layout::reference(chain, r));
        }
        let _ = base.remove_dir(layout::refs(chain));
        base.remove_tree(&grave).ctx("remove", base.join(&grave))?;
        Ok(true)
    }
}
