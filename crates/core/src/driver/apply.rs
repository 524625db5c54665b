//! Creating layers and giving them content: Create, ApplyDiff, a layer
//! the store has already, and publishing a staged tree.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::path::Path;

use super::flight::Flight;
use super::records::{Kind, LocalLayer, TreeFacts};
use super::{check_id, none_if_empty, ChainHold, CreateKind, Driver, State};
use crate::apply::apply_tar_limited;
use crate::apply::stream::Plan;
use crate::error::{Context, Error, Result};
use crate::export;
use crate::guard::Staged;
use crate::ids::{random_token, Bytes, ChainId};
use crate::image;
use crate::options::FsType;
use crate::store::{LayerInfo, LayerMeta, FORMAT_VERSION, IMAGE_FILE};

/// What a new layer image is built from.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// A tree extracted under `<dir>/fs`.
    Staged(&'a Path),
    /// A spooled tar planned for one pass ([`crate::apply::stream`]),
    /// and the (empty) staging directory should that fail.
    Tar { spool: &'a fs::File, plan: &'a crate::apply::stream::TarPlan, staging: &'a Path },
}

/// The image size of a [`CreateKind::ReadWriteDir`] layer on a home that
/// cannot hold it as a directory: it holds a handful of files.
const DIR_LAYER_IMAGE_SIZE: Bytes = Bytes(64 * Bytes::MIB);

impl Driver {
    /// Creates an empty layer `id` over `parent`.
    pub fn create(
        &self,
        id: &str,
        parent: Option<&str>,
        kind: CreateKind,
        storage_opt: &HashMap<String, String>,
    ) -> Result<()> {
        check_id(id)?;
        let parent = none_if_empty(parent);
        let mut size = None;
        for (k, v) in storage_opt {
            match k.to_ascii_lowercase().as_str() {
                "size" => size = Some(crate::options::parse_size("size", v)?),
                _ => {
                    return Err(Error::Option {
                        option: k.clone(),
                        reason: "unknown storage option; supported: size".into(),
                    })
                }
            }
        }
        if kind == CreateKind::ReadOnly && size.is_some() {
            return Err(Error::Option { option: "size".into(), reason: "only writable layers take a size".into() });
        }
        // The id is reserved and the parent pinned until the layer is
        // recorded: a concurrent create of the same id fails, a removal of
        // the id or of the parent waits for nothing and is refused.
        // A parent being removed, or (empty) being opened for writing by
        // a Get, is waited for: what it is afterwards decides.
        // A removal of the id itself is waited for too.
        let parent_busy = |st: &State| {
            Self::removing(st, &[Some(id), parent])
                || parent.is_some_and(|p| {
                    st.flights.contains(&Flight::View(p.to_owned()))
                        && matches!(st.layers.get(p).map(|l| &l.kind), Some(Kind::Image { chain: None, .. }))
                })
        };
        let (_reserved, writable_parent) = {
            let mut st = self.state_when(parent_busy)?;
            if st.layers.contains_key(id) || st.busy.contains(id) {
                return Err(Error::AlreadyExists(format!("layer {id}")));
            }
            let writable_parent = match parent {
                Some(p) => match st.layers.get(p) {
                    None => return Err(Error::ParentNotFound { id: id.into(), parent: p.into() }),
                    // Only a read-only layer freezes its parent: a writable
                    // one over a writable parent (Docker's container over
                    // its -init layer) sees the parent live, as overlay2's.
                    Some(pl) => {
                        (kind == CreateKind::ReadOnly && matches!(pl.kind, Kind::Rw { .. })).then(|| p.to_owned())
                    }
                },
                None => None,
            };
            (self.reserve(&mut st, &[id], parent)?, writable_parent)
        };
        // A read-only layer over a writable parent stands on a snapshot of
        // the parent's content as it is now (as vfs copies its parent): what
        // is written to the parent later does not show through.
        let (base, mut base_hold) = match &writable_parent {
            Some(p) => {
                let (info, hold) = self.publish_upper(p, None, None)?;
                (Some(info.meta.chain_id), Some(hold))
            }
            None => (None, None),
        };
        let release_base = |base: &Option<ChainId>, hold: Option<ChainHold<'_>>| {
            drop(hold);
            if let Some(c) = base {
                if let Err(e) = self.release_chain(c, id) {
                    tracing::warn!(layer = %c, error = %e, "cannot release a parent snapshot");
                }
            }
        };
        let mut image = None;
        let kind = match kind {
            CreateKind::ReadOnly => Kind::Image { chain: None, size: 0 },
            CreateKind::ReadWrite | CreateKind::ReadWriteDir => {
                let fs_type = self.cfg.fs;
                if let Some(s) = size.filter(|s| *s < fs_type.min_image_size()) {
                    release_base(&base, base_hold.take());
                    return Err(Error::Option {
                        option: "size".into(),
                        reason: format!("{s} is below the {} minimum of {}", fs_type.name(), fs_type.min_image_size()),
                    });
                }
                // A directory layer needs a home that can be an overlay
                // upper (not a network filesystem, one that holds
                // whiteouts); elsewhere it is a small image, as before.
                // A container's layer is one too with
                // `sharedloop.writable_layers=dir`, unless a size was asked.
                let wants_dir = kind == CreateKind::ReadWriteDir
                    || (size.is_none() && self.cfg.writable_layers == crate::options::WritableLayers::Dir);
                let dir = wants_dir && self.home_holds_uppers();
                // Without a size option, the configured `sharedloop.size`
                // (a small one for a directory layer made an image).
                let size = size.unwrap_or(if kind == CreateKind::ReadWriteDir {
                    Bytes(DIR_LAYER_IMAGE_SIZE.0.max(fs_type.min_image_size().0))
                } else {
                    self.cfg.rw_size
                });
                let made = if dir { self.make_rw_dir(id) } else { self.make_rw_image(id, fs_type, size) };
                match made {
                    Ok(made) => image = Some(made),
                    Err(e) => {
                        release_base(&base, base_hold.take());
                        return Err(e);
                    }
                }
                Kind::Rw { size, fs: fs_type }
            }
        };
        let l = LocalLayer { id: id.into(), parent: parent.map(str::to_owned), base: base.clone(), kind };
        if let Err(e) = self.save(&l) {
            drop(image); // the new image goes
            release_base(&base, base_hold.take());
            return Err(e);
        }
        self.lock().layers.insert(id.into(), l);
        if let Some(made) = image {
            made.keep();
        }
        Ok(())
    }

    /// Makes writable layer `id`'s image (replacing a leftover); its
    /// directory goes again unless the guard is kept.
    pub(super) fn make_rw_image(&self, id: &str, fs_type: FsType, size: Bytes) -> Result<Staged> {
        let img = self.rw_image(id);
        let dir = img.parent().unwrap();
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).ctx("mkdir", dir)?;
        let made = Staged::new(dir);
        crate::fault::point("create", "directory made");
        self.kernel.create_rw_image(&img, fs_type, size, &self.home.join("templates"))?;
        crate::fault::point("create", "image made");
        Ok(made)
    }

    /// Whether the home can hold a directory layer's upper: staging did
    /// not need a scratch image (the home holds whiteouts and
    /// `trusted.*` attributes) and the home is not on a network
    /// filesystem, which overlayfs refuses as an upper.
    pub(super) fn home_holds_uppers(&self) -> bool {
        !self.home.join("scratch.img").exists() && !crate::fsmagic::is_network(&self.home)
    }

    /// Makes writable layer `id`'s directory (a [`CreateKind::ReadWriteDir`]
    /// layer; replacing a leftover); it goes again unless the guard is
    /// kept.
    fn make_rw_dir(&self, id: &str) -> Result<Staged> {
        let dir = self.rw_dir(id);
        let parent = dir.parent().unwrap();
        let _ = fs::remove_dir_all(parent);
        fs::create_dir_all(&dir).ctx("mkdir", &dir)?;
        crate::perms::private_dir(parent)?;
        Ok(Staged::new(parent))
    }

    /// Applies a layer tar to the empty read-only layer `id`; returns the
    /// size of its content.
    pub fn apply_diff(&self, id: &str, parent: Option<&str>, tar: &mut dyn Read) -> Result<u64> {
        let parent = none_if_empty(parent);
        let (_reserved, parent_chain) = {
            let mut st = self.state_when(|st| Self::removing(st, &[Some(id)]))?;
            let l = st.layers.get(id).ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            if l.parent.as_deref() != parent {
                return Err(Error::Invalid(format!(
                    "layer {id} has parent {:?}, not {:?}",
                    l.parent.as_deref().unwrap_or(""),
                    parent.unwrap_or("")
                )));
            }
            match &l.kind {
                Kind::Image { chain: None, .. } => {}
                Kind::Image { chain: Some(_), .. } => {
                    return Err(Error::Invalid(format!("layer {id} already has content")))
                }
                Kind::Rw { .. } => {
                    return Err(Error::Invalid(format!(
                        "layer {id} is writable (a container layer, or content written through Get); \
                         diffs apply to empty read-only layers"
                    )))
                }
            }
            let parent_chain = match Self::lower_chain(&st, l) {
                Ok(c) => c,
                Err(Error::Invalid(_)) => {
                    return Err(Error::Invalid(format!("parent {} of {id} is not a published layer", parent.unwrap())))
                }
                Err(e) => return Err(e),
            };
            // Concurrent ApplyDiffs, a Get or a Remove of this id wait for
            // nothing: they are refused while this one runs.
            (self.reserve(&mut st, &[id], None)?, parent_chain)
        };
        let (info, content, hold) = {
            // Removed when done, whatever the outcome.
            let staging = Staged::mkdir(self.home.join("tmp").join(format!("apply-{}", random_token())))?;
            let fs_dir = staging.path().join(image::LAYER_ROOT);
            fs::create_dir(&fs_dir).ctx("mkdir", &fs_dir)?;
            self.apply_staged(staging.path(), parent_chain.as_ref(), tar)?
        };
        crate::fault::point("apply", "published and referenced");
        let chain = info.meta.chain_id.clone();
        let mut l = self.lock().layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        l.kind = Kind::Image { chain: Some(chain.clone()), size: content };
        if let Err(e) = self.save(&l) {
            drop(hold);
            let _ = self.release_chain(&chain, id);
            return Err(e);
        }
        self.lock().layers.insert(id.to_owned(), l);
        drop(hold);
        tracing::info!(layer = id, chain = %chain, location = info.location.name(), bytes = content, "diff applied");
        Ok(content)
    }

    fn apply_staged(
        &self,
        staging: &Path,
        parent: Option<&ChainId>,
        tar: &mut dyn Read,
    ) -> Result<(LayerInfo, u64, ChainHold<'_>)> {
        let t0 = std::time::Instant::now();
        crate::fault::point("apply", "staging made");
        // The stream first, into an unnamed local file: its digest names
        // the layer, and a layer the store has already (another host
        // published it) is used without extracting anything.
        let mut spool = crate::apply::spool(tar, &self.home.join("tmp"), self.cfg.max_layer_size)?;
        let chain = ChainId::of(parent, &spool.diff_id);
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, bytes = spool.bytes, layer = %chain, "stream spooled");
        if let Some((info, hold)) = self.use_published(&chain, parent)? {
            return Ok((info.clone(), info.meta.content_bytes, hold));
        }
        // Claimed before extracting: hosts that want the same new layer at
        // the same moment wait for this one instead of extracting it too.
        let claim = match self.store.claim_in_root(&chain) {
            Some(crate::claim::Outcome::Build(c)) => Some(c),
            Some(crate::claim::Outcome::Published(_)) => match self.use_published(&chain, parent)? {
                Some((info, hold)) => return Ok((info.clone(), info.meta.content_bytes, hold)),
                None => None,
            },
            None => None,
        };
        // In one pass where mke2fs reads tars and this tar reads the same
        // both ways; otherwise through the staging directory.
        if self.one_pass() {
            let t1 = std::time::Instant::now();
            match crate::apply::stream::plan(&spool.file, self.cfg.max_layer_size)? {
                Plan::Stream(mut plan) => {
                    plan.diff_id = Some(spool.diff_id.clone());
                    tracing::debug!(
                        ms = t1.elapsed().as_secs_f64() * 1e3,
                        entries = plan.entries,
                        "tar planned for one pass"
                    );
                    let tree = TreeFacts {
                        diff_id: Some(spool.diff_id.clone()),
                        content_bytes: plan.content_bytes,
                        tar_bytes: spool.bytes,
                        entries: plan.entries,
                    };
                    let source = Source::Tar { spool: &spool.file, plan: &plan, staging };
                    let (info, hold) = self.publish_tree(source, &chain, parent, &tree, claim)?;
                    crate::metrics::observe_apply(t1);
                    return Ok((info, plan.content_bytes, hold));
                }
                Plan::Staged(why) => tracing::debug!(layer = %chain, why, "built through a staging directory"),
            }
        }
        io::Seek::rewind(&mut spool.file).ctx("seek", "the spooled layer")?;
        let stats = apply_tar_limited(&mut spool.file, &staging.join(image::LAYER_ROOT), self.cfg.max_layer_size)?;
        crate::fault::point("apply", "tar applied to staging");
        tracing::debug!(ms = t0.elapsed().as_secs_f64() * 1e3, bytes = stats.tar_bytes, "tar applied to staging");
        let diff_id = stats.diff_id.clone().expect("set by apply");
        if diff_id != spool.diff_id {
            return Err(Error::Invalid(format!(
                "the spooled stream of layer {chain} changed on the local disk (sha256 {} then {diff_id})",
                spool.diff_id
            )));
        }
        let tree = TreeFacts {
            diff_id: Some(diff_id),
            content_bytes: stats.content_bytes,
            tar_bytes: stats.tar_bytes,
            entries: stats.entries,
        };
        let (info, hold) = self.publish_tree(Source::Staged(staging), &chain, parent, &tree, claim)?;
        Ok((info, stats.content_bytes, hold))
    }

    /// Layer `chain`, when the store has it on `parent`, referenced for
    /// this host: nothing to extract or build. Within
    /// `sharedloop.max_layer_size` like a layer applied here.
    fn use_published(&self, chain: &ChainId, parent: Option<&ChainId>) -> Result<Option<(LayerInfo, ChainHold<'_>)>> {
        let Some(info) = self.store.locate(chain) else { return Ok(None) };
        if info.meta.parent.as_ref() != parent {
            tracing::warn!(layer = %chain, "the published layer names another parent; building it here");
            return Ok(None);
        }
        if let Some(max) = self.cfg.max_layer_size.filter(|m| info.meta.content_bytes > m.0) {
            return Err(Error::BadTar {
                entry: String::new(),
                reason: format!(
                    "the layer's files add up to {} bytes, more than sharedloop.max_layer_size={max}; \
                     raise the option to apply it",
                    info.meta.content_bytes
                ),
            });
        }
        let hold = self.hold_chain(chain);
        let Some(info) = self.store.acquire(&info) else { return Ok(None) };
        tracing::info!(layer = %chain, location = info.location.name(), "layer already in the store; nothing extracted");
        Ok(Some((info, hold)))
    }

    /// Builds the image of `source` at `out`. A one-pass build that fails
    /// (but for a tar that changed) is done again through the staging
    /// directory: a tool's failure costs time, not the layer.
    fn build_image(
        &self,
        source: Source<'_>,
        out: &Path,
        counts: export::TreeCounts,
        chain: &ChainId,
    ) -> Result<Bytes> {
        let fs_type = self.cfg.fs;
        let (built, how) = match source {
            Source::Staged(staging) => (self.kernel.build_layer_image(staging, out, counts, fs_type), "staged"),
            Source::Tar { spool, plan, staging } => {
                match self.kernel.build_layer_image_from_tar(spool, plan, out, &self.home.join("tmp")) {
                    Err(e) if !matches!(e, Error::BadTar { .. }) => {
                        tracing::warn!(layer = %chain, error = %e, "the one-pass build failed; building through a staging directory");
                        let _ = fs::remove_file(out);
                        let mut f = spool;
                        io::Seek::rewind(&mut f).ctx("seek", "the spooled layer")?;
                        let stats = apply_tar_limited(f, &staging.join(image::LAYER_ROOT), self.cfg.max_layer_size)?;
                        if plan.diff_id.is_some() && stats.diff_id != plan.diff_id {
                            return Err(Error::Invalid(format!(
                                "the spooled stream of layer {chain} changed on the local disk"
                            )));
                        }
                        let counts = export::tree_counts(staging)?;
                        (self.kernel.build_layer_image(staging, out, counts, fs_type), "staged")
                    }
                    r => (r, "one_pass"),
                }
            }
        };
        built.inspect(|_| crate::metrics::observe_build(how))
    }

    /// Whether new ext4 layers are built in one pass from their tar
    /// (`sharedloop.one_pass_build`, and a mke2fs that can).
    pub(super) fn one_pass(&self) -> bool {
        self.cfg.one_pass_build != Some(false)
            && self.cfg.fs == FsType::Ext4
            && self.kernel.one_pass_tool(&self.home.join("tmp")).is_ok()
    }

    /// Publishes the tree `source` as layer `chain` (or uses the layer of
    /// that name already in the store) and takes a reference.
    pub(super) fn publish_tree(
        &self,
        source: Source<'_>,
        chain: &ChainId,
        parent: Option<&ChainId>,
        tree: &TreeFacts,
        mut claim: Option<crate::claim::Claim>,
    ) -> Result<(LayerInfo, ChainHold<'_>)> {
        // Held before the store's reference is taken, so that no removal
        // on this host drops it before the caller records the layer.
        let hold = self.hold_chain(chain);
        let fs_type = self.cfg.fs;
        let build = |tmp: &Path| -> Result<LayerMeta> {
            crate::fault::pause("layer-build", chain.as_str());
            let t1 = std::time::Instant::now();
            let counts = match source {
                Source::Staged(staging) => export::tree_counts(staging)?,
                Source::Tar { plan, .. } => plan.counts,
            };
            let empty = counts.inodes <= 2; // the image root and fs/
            let out = tmp.join(IMAGE_FILE);
            let image_bytes = if empty {
                0
            } else {
                self.build_image(source, &out, counts, chain)
                    .map_err(|e| Error::Build {
                        layer: chain.to_string(),
                        fs: fs_type.name().into(),
                        reason: e.to_string(),
                    })?
                    .0
            };
            tracing::debug!(ms = t1.elapsed().as_secs_f64() * 1e3, image_bytes, "image built");
            let t2 = std::time::Instant::now();
            let image_sha256 = if empty { None } else { Some(image::sha256_file(&tmp.join(IMAGE_FILE))?) };
            tracing::debug!(ms = t2.elapsed().as_secs_f64() * 1e3, "image hashed");
            Ok(LayerMeta {
                format: FORMAT_VERSION,
                chain_id: chain.clone(),
                diff_id: tree.diff_id.clone(),
                parent: parent.cloned(),
                fs: (!empty).then_some(fs_type),
                image_bytes,
                content_bytes: tree.content_bytes,
                tar_bytes: tree.tar_bytes,
                entries: tree.entries,
                publisher: self.store.host_id.clone(),
                created_unix: crate::store::now_unix(),
                image_sha256,
                // Set by the store from the finished file.
                image_file: None,
            })
        };
        // Use the layer that is there, or publish ours; then take a
        // reference and confirm the layer survived (a host removing it
        // concurrently either saw our reference or we publish again).
        for _ in 0..3 {
            let info = match self.store.locate(chain) {
                Some(info) => {
                    tracing::info!(layer = %chain, location = info.location.name(), "layer already in the store; reusing it");
                    info
                }
                None => match self.store.publish_claimed(chain, claim.take(), &build)? {
                    // This host wrote the image and its digest just now:
                    // no need to read it all again before the first mount.
                    crate::store::Published::Created(info) => {
                        self.mounts.vouch(&info);
                        info
                    }
                    crate::store::Published::Existing(info) => info,
                },
            };
            if let Some(info) = self.store.acquire(&info) {
                return Ok((info, hold));
            }
            tracing::info!(layer = %chain, "the layer was removed while being referenced; publishing it again");
        }
        Err(Error::Invalid(format!("layer {chain} keeps disappearing from the store; is another host collecting it?")))
    }

    /// The chain id of published layer `id`; `None` for no layer.
    pub(super) fn chain_of(st: &State, id: Option<&str>) -> Result<Option<ChainId>> {
        let Some(id) = id else { return Ok(None) };
        match st.layers.get(id).map(|l| &l.kind) {
            Some(Kind::Image { chain: Some(c), .. }) => Ok(Some(c.clone())),
            Some(_) => Err(Error::Invalid(format!("layer {id} is not a published layer"))),
            None => Err(Error::NotFound(format!("layer {id}"))),
        }
    }

    /// Creates read-only layer `id` over `parent` from layer `chain`, which
    /// is in the store already: no content moves, a reference is taken.
    /// Returns `false` (and creates nothing) when the store lacks `chain`
    /// or it sits on another parent.
    pub fn create_from_store(&self, id: &str, parent: Option<&str>, chain: &ChainId) -> Result<bool> {
        check_id(id)?;
        let parent_busy = |st: &State| Self::removing(st, &[Some(id), parent]);
        let (_reserved, parent_chain) = {
            let mut st = self.state_when(parent_busy)?;
            if st.layers.contains_key(id) || st.busy.contains(id) {
                return Err(Error::AlreadyExists(format!("layer {id}")));
            }
            let parent_chain = Self::chain_of(&st, parent)?;
            (self.reserve(&mut st, &[id], parent)?, parent_chain)
        };
        // The store is read and referenced without the lock, the layer
        // held meanwhile.
        let hold = self.hold_chain(chain);
        let Some(info) = self.store.locate(chain) else { return Ok(false) };
        if info.meta.parent != parent_chain {
            tracing::warn!(layer = %chain, "the published layer sits on another parent; not reusing it");
            return Ok(false);
        }
        let Some(info) = self.store.acquire(&info) else { return Ok(false) };
        let l = LocalLayer {
            id: id.into(),
            parent: parent.map(str::to_owned),
            base: None,
            kind: Kind::Image { chain: Some(chain.clone()), size: info.meta.content_bytes },
        };
        if let Err(e) = self.save(&l) {
            drop(hold);
            let _ = self.release_chain(chain, id);
            return Err(e);
        }
        tracing::info!(layer = %chain, location = info.location.name(), "using the published layer; nothing to unpack");
        self.lock().layers.insert(id.into(), l);
        Ok(true)
    }
}
