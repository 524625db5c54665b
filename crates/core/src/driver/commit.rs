//! Commit: a writable layer's upper directory frozen into a published
//! read-only layer.

use std::fs;
use std::path::Path;

use super::records::{Kind, LocalLayer, TreeFacts};
use super::{check_id, ChainHold, Driver};
use crate::error::{Context, Error, Result};
use crate::export;
use crate::guard::{Mounted, Staged};
use crate::ids::DiffId;
use crate::ids::{random_token, ChainId};
use crate::image;
use crate::store::LayerInfo;

impl Driver {
    /// Makes the published read-only layer `new_id`, on the same parent as
    /// writable layer `rw_id`, from its upper directory: a layer image named
    /// `chain` (or, without one, by the digest of its content as a tar).
    /// The writable layer stays; the caller removes it once the commit is
    /// recorded. Returns the chain id.
    pub fn commit(&self, rw_id: &str, new_id: &str, chain: Option<ChainId>) -> Result<ChainId> {
        check_id(new_id)?;
        let (_reserved, rw) = {
            let mut st = self.state_when(|st| Self::removing(st, &[Some(rw_id), Some(new_id)]))?;
            if st.layers.contains_key(new_id) || st.busy.contains(new_id) {
                return Err(Error::AlreadyExists(format!("layer {new_id}")));
            }
            let l = st.layers.get(rw_id).cloned().ok_or_else(|| Error::NotFound(format!("layer {rw_id}")))?;
            (self.reserve(&mut st, &[new_id], Some(rw_id))?, l)
        };
        // A writable layer over a writable parent (a container over
        // Docker's init layer, kept on this host): the parent is frozen
        // first, as a read-only layer over it would freeze it, and the new
        // layer stands on that snapshot.
        let writable_parent = {
            let st = self.lock();
            let parent = rw.parent.as_deref().and_then(|p| st.layers.get(p));
            (rw.base.is_none() && parent.is_some_and(|p| matches!(p.kind, Kind::Rw { .. })))
                .then(|| rw.parent.clone().expect("seen"))
        };
        let (base, base_hold) = match &writable_parent {
            Some(p) => {
                let (info, hold) = self.publish_upper(p, None, None)?;
                (Some(info.meta.chain_id), Some(hold))
            }
            None => (rw.base.clone(), None),
        };
        // The snapshot this commit made, to let go of should it fail.
        let frozen = writable_parent.as_ref().and(base.clone());
        let release_base = |hold| {
            drop(hold);
            if let Some(c) = &frozen {
                if let Err(e) = self.release_chain(c, new_id) {
                    tracing::warn!(layer = %c, error = %e, "cannot release a parent snapshot");
                }
            }
        };
        let (info, hold) = match self.publish_upper(rw_id, chain, base.clone()) {
            Ok(r) => r,
            Err(e) => {
                release_base(base_hold);
                return Err(e);
            }
        };
        crate::fault::point("commit", "published and referenced");
        let chain = info.meta.chain_id.clone();
        let l = LocalLayer {
            id: new_id.into(),
            parent: rw.parent,
            base,
            kind: Kind::Image { chain: Some(chain.clone()), size: info.meta.content_bytes },
        };
        if let Err(e) = self.save(&l) {
            drop(hold);
            let _ = self.release_chain(&chain, new_id);
            release_base(base_hold);
            return Err(e);
        }
        self.lock().layers.insert(new_id.into(), l);
        drop(hold);
        drop(base_hold);
        crate::fault::point("commit", "committed layer recorded");
        tracing::info!(layer = %chain, from = rw_id, location = info.location.name(), "writable layer committed");
        Ok(chain)
    }

    /// Publishes writable layer `rw_id`'s upper directory as it is now, as
    /// the layer `chain` (or, without one, named by the digest of its
    /// content as a tar) over what the writable layer stands on (or over
    /// `over`, a snapshot of its writable parent); takes a reference.
    pub(super) fn publish_upper(
        &self,
        rw_id: &str,
        chain: Option<ChainId>,
        over: Option<ChainId>,
    ) -> Result<(LayerInfo, ChainHold<'_>)> {
        let (parent_chain, fs, _lease) = {
            let mut st = self.state()?;
            let l = st.layers.get(rw_id).cloned().ok_or_else(|| Error::NotFound(format!("layer {rw_id}")))?;
            let Kind::Rw { fs, .. } = l.kind else {
                return Err(Error::Conflict(format!("layer {rw_id} is not writable")));
            };
            let lower = match over {
                Some(c) => Ok(Some(c)),
                None => Self::lower_chain(&st, &l),
            };
            let parent_chain = match lower {
                Err(Error::Invalid(_)) => {
                    return Err(Error::Conflict(format!(
                        "layer {rw_id} stands on a writable layer ({}) that stands on another writable layer: \
                         only a writable layer over published layers, or over one writable layer over them, can \
                         be frozen",
                        l.parent.as_deref().unwrap_or("")
                    )))
                }
                r => r?,
            };
            // A removal of the writable layer waits for the commit.
            (parent_chain, fs, self.lease(&mut st, rw_id, self.rw_mnt(rw_id)))
        };
        let upper = self.ensure_rw(rw_id, fs)?.join("upper");
        // The tree goes into the image under /fs: bind the upper there.
        let staging = Staged::mkdir(self.home.join("tmp").join(format!("commit-{}", random_token())))?;
        let fs_dir = staging.path().join(image::LAYER_ROOT);
        fs::create_dir(&fs_dir).ctx("mkdir", &fs_dir)?;
        // Read-only, so that no cleanup can delete through it.
        self.kernel.bind(&upper, &fs_dir, false)?;
        let bind = Mounted::new(&*self.kernel, &fs_dir);
        crate::fault::point("commit", "staging made");
        let r = self.commit_staged(staging.path(), &upper, chain, parent_chain.as_ref());
        if let Err(e) = bind.unmount() {
            // The staging stays (nothing is deleted through a mount).
            tracing::warn!(path = %fs_dir.display(), error = %e, "cannot unmount a commit's staging; left for the next start");
            staging.keep();
        }
        r
    }

    fn commit_staged(
        &self,
        staging: &Path,
        upper: &Path,
        chain: Option<ChainId>,
        parent: Option<&ChainId>,
    ) -> Result<(LayerInfo, ChainHold<'_>)> {
        // The staging must still show the upper (a bind of it): a tree
        // gone from under it would publish an empty layer under the real
        // content's name.
        if !self.kernel.shows(&staging.join(image::LAYER_ROOT), upper)? {
            return Err(Error::Invalid(format!(
                "the staging of {} no longer shows the writable layer; not publishing it",
                upper.display()
            )));
        }
        let counts = export::tree_counts(upper)?;
        let content_bytes = export::tree_size(upper)?;
        let (chain, diff_id) = match chain {
            Some(c) => (c, None),
            None => {
                let mut h = <sha2::Sha256 as sha2::Digest>::new();
                export::export_tar(upper, &mut h)?;
                let diff = DiffId::from_sha256(&sha2::Digest::finalize(h));
                (ChainId::of(parent, &diff), Some(diff))
            }
        };
        let tree = TreeFacts { diff_id, content_bytes, tar_bytes: 0, entries: counts.inodes.saturating_sub(1) };
        self.publish_tree(super::apply::Source::Staged(staging), &chain, parent, &tree, None)
    }
}
