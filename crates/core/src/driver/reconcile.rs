//! The start-up reconcile: the driver's state rebuilt from its records
//! and from what is mounted, and what a crash or an earlier run left
//! behind removed. The steps run in this order, under the state lock.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

use super::records::{GetRef, Kind, RoMount};
use super::{Driver, State};
use crate::error::{Context, Result};
use crate::ids::ChainId;

impl Driver {
    /// Loads local layers, adopts mounts left by a previous run, removes
    /// leftovers.
    pub(super) fn reconcile(&self) -> Result<()> {
        let mut st = self.lock();
        self.load_records(&mut st)?;
        let used_chains = used_chains(&st);
        self.claim_layer_mounts(&mut st, &used_chains);
        let orphans = self.adopt_mounts(&mut st)?;
        self.unmount_orphans(orphans);
        self.remove_leftover_rw(&st)?;
        self.find_attached_rw(&mut st);
        self.sweep_staging()?;
        self.drop_unused_refs(&used_chains);
        tracing::info!(layers = st.layers.len(), mounted = st.ro.len(), in_use = st.gets.len(), "driver state loaded");
        Ok(())
    }

    /// Claims the layer mounts this driver's layers stand on.
    fn claim_layer_mounts(&self, st: &mut State, used_chains: &HashSet<ChainId>) {
        self.mounts.forget_user(&self.home);
        for c in used_chains {
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
    }

    /// Adopts the merged overlays and writable mounts of the layers it
    /// knows, left by a previous run; returns the mounts under the home
    /// that are leftovers.
    fn adopt_mounts(&self, st: &mut State) -> Result<Vec<PathBuf>> {
        let own_mnt = self.mounts.dir() == self.home.join("mnt");
        let mounts = self.kernel.mounts_under(&self.home)?;
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
        Ok(orphans)
    }

    /// Unmounts the leftovers [`Self::adopt_mounts`] found.
    fn unmount_orphans(&self, mut orphans: Vec<PathBuf>) {
        // Deepest first, so merged overlays go before the layers under them.
        orphans.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        orphans.sort_by_key(|p| !p.starts_with(self.home.join("merged")));
        for p in orphans {
            tracing::info!(target = %p.display(), "unmounting a leftover mount");
            if let Err(e) = self.kernel.unmount(&p) {
                tracing::warn!(target = %p.display(), error = %e, "cannot unmount leftover");
            }
        }
    }

    /// Writable layers whose removal a crash interrupted, and images of
    /// creates a crash interrupted before their record was saved.
    fn remove_leftover_rw(&self, st: &State) -> Result<()> {
        let rw = self.home.join("rw");
        for e in fs::read_dir(&rw).ctx("read dir", &rw)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(".rm-") || !st.layers.contains_key(&name) {
                tracing::info!(path = %e.path().display(), "removing a leftover writable image");
                let mnt = if name.starts_with(".rm-") { e.path().join("mnt") } else { self.rw_mnt(&name) };
                if self.kernel.unmount(&mnt).or_else(|_| self.kernel.detach(&mnt)).is_err() {
                    tracing::warn!(target = %mnt.display(), "cannot unmount a leftover writable layer; left in place");
                    continue;
                }
                let _ = fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    /// Writable images still attached without a mount of ours: found once
    /// here, so that mounting a writable layer never scans devices.
    fn find_attached_rw(&self, st: &mut State) {
        let rw_dir = self.home.join("rw");
        for (dev, backing) in self.kernel.loop_devices() {
            let Ok(rel) = backing.strip_prefix(&rw_dir) else { continue };
            let mut comps = rel.iter().map(|c| c.to_string_lossy().into_owned());
            if let (Some(id), Some(file), None) = (comps.next(), comps.next(), comps.next()) {
                if file == "rw.img" && st.layers.contains_key(&id) && !st.rw_mounted.contains(&id) {
                    tracing::warn!(layer = %id, r#loop = %dev.display(), "writable image still attached without its mount");
                    st.attached_elsewhere.insert(id, dev);
                }
            }
        }
    }

    /// Staging of interrupted ApplyDiffs and commits; never through a
    /// mount that would not go (a commit's staging binds an upper).
    /// Then this host's leftover builds in the store.
    fn sweep_staging(&self) -> Result<()> {
        let tmp = self.home.join("tmp");
        let still: Vec<PathBuf> = self.kernel.mountinfo()?.into_iter().map(|m| m.mount_point).collect();
        for e in fs::read_dir(&tmp).ctx("read dir", &tmp)?.flatten() {
            if still.iter().any(|m| m.starts_with(e.path())) {
                tracing::warn!(path = %e.path().display(), "staging still has a mount; left in place");
                continue;
            }
            // Directories of ApplyDiffs and commits; files of one-pass
            // builds for a network store and of the one-pass probe.
            let _ = match e.file_type() {
                Ok(t) if t.is_dir() => fs::remove_dir_all(e.path()),
                _ => fs::remove_file(e.path()),
            };
        }
        self.store.sweep_own_tmp();
        Ok(())
    }

    /// References this host holds in the store for layers none of its
    /// local layers uses: a crash between taking one and recording the
    /// layer locally.
    fn drop_unused_refs(&self, used_chains: &HashSet<ChainId>) {
        for (c, info) in self.store.held_by(&self.store.host_id) {
            if !used_chains.contains(&c) {
                tracing::info!(layer = %c, "dropping a reference no local layer uses");
                if let Err(e) = self.store.release(&info) {
                    tracing::warn!(layer = %c, error = %e, "cannot drop the reference");
                }
            }
        }
    }
}

/// The published layers the local layers stand on (their own content or
/// their parent's snapshot).
fn used_chains(st: &State) -> HashSet<ChainId> {
    st.layers
        .values()
        .flat_map(|l| {
            let own = match &l.kind {
                Kind::Image { chain, .. } => chain.clone(),
                _ => None,
            };
            own.into_iter().chain(l.base.clone())
        })
        .collect()
}
