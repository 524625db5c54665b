//! Mounting layers and their stacks: Get/Put, the mounts handed to an
//! engine that mounts them itself, and usage.

use std::fs;
use std::path::PathBuf;

use super::flight::Flight;
use super::records::{GetRef, Kind, LocalLayer, RoMount, Source};
use super::{Driver, Lease, MountSpec, State};
use crate::error::{Context, Error, Result};
use crate::export;
use crate::guard::Mounted;
use crate::ids::ChainId;
use crate::image;
use crate::mount::OverlaySpec;
use crate::options::FsType;
use crate::sys::loopdev;

impl Driver {
    /// Mounts (once per host) the published layer `chain`. Called without
    /// the state lock, by a request that keeps a layer using `chain` from
    /// being removed meanwhile (a view in flight, a lease). The layer mount
    /// table lets concurrent first mounts of one layer make one mount.
    fn ensure_ro(&self, chain: &ChainId) -> Result<RoMount> {
        if let Some(m) = self.lock().ro.get(chain) {
            return Ok(m.clone());
        }
        let info = self
            .store
            .locate(chain)
            .ok_or_else(|| Error::NotFound(format!("layer {chain} (not in root or fallback)")))?;
        let dev = match info.image() {
            None => None,
            Some(_) => Some(self.mounts.acquire(&info, &self.home, &crate::layermounts::Policy::of(&self.cfg))?),
        };
        // Another request may have recorded it meanwhile: the same mount.
        Ok(self.lock().ro.entry(chain.clone()).or_insert(RoMount { info, dev }).clone())
    }

    /// Mounts writable layer `id`'s image (or binds its directory), once:
    /// a request mounting it meanwhile is waited for. Called without the
    /// state lock.
    pub(super) fn ensure_rw(&self, id: &str, fs_type: FsType) -> Result<PathBuf> {
        let target = self.rw_mnt(id);
        let img = self.rw_image(id);
        let key = Flight::Rw(id.to_owned());
        let _flight = {
            let mut st = self.wait_while(self.lock(), |st| st.flights.contains(&key));
            if st.rw_mounted.contains(id) {
                return Ok(target);
            }
            // A writable image still attached from before (a mount that a
            // process kept alive through a restart) must not be mounted
            // twice: two filesystems writing one image corrupt it.
            if let Some(dev) = st.attached_elsewhere.get(id) {
                return Err(Error::InUse {
                    id: id.into(),
                    why: format!(
                        "its image {} is still attached to {} by an earlier mount that something keeps alive; \
                         stop what uses it (a container's processes) and restart sharedloop",
                        img.display(),
                        dev.display()
                    ),
                });
            }
            self.take_off(&mut st, key)
        };
        fs::create_dir_all(&target).ctx("mkdir", &target)?;
        let dir = self.rw_dir(id);
        if dir.is_dir() {
            // A directory layer (`CreateKind::ReadWriteDir`): a bind, so
            // that it is mounted, moved and adopted as an image's mount is.
            self.kernel.bind(&dir, &target, true)?;
        } else {
            let direct_io = self.cfg.direct_io.for_file(&img);
            // Autoclear: the device goes with this handle unless the mount keeps it.
            let dev = self
                .kernel
                .attach_path(&img, loopdev::AttachOptions { read_only: false, direct_io })
                .ctx("attach loop device", &img)?;
            self.kernel.mount_image(dev.path(), &target, fs_type, true)?;
        }
        let mounted = Mounted::new(&*self.kernel, &target);
        for d in ["upper", "work"] {
            let p = target.join(d);
            match fs::create_dir(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(Error::sys("mkdir", p, e)),
            }
        }
        self.lock().rw_mounted.insert(id.to_owned());
        mounted.keep();
        Ok(target)
    }

    /// Mounts one level of a stack; `None` for an empty published layer.
    /// Called without the state lock.
    fn mount_source(&self, src: &Source) -> Result<Option<PathBuf>> {
        match src {
            Source::Chain(c) => {
                let m = self.ensure_ro(c)?;
                Ok(m.dev.map(|_| self.ro_mnt(c).join(image::LAYER_ROOT)))
            }
            Source::Upper(id, fs) => Ok(Some(self.ensure_rw(id, *fs)?.join("upper"))),
        }
    }

    /// Mounts the levels `srcs`, in order; empty layers left out.
    pub(super) fn mount_sources(&self, srcs: &[Source]) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for src in srcs {
            out.extend(self.mount_source(src)?);
        }
        Ok(out)
    }

    /// Lends layer `id`'s own content directory (mounted) to a reader, and
    /// the stack under it when `under`: the lease keeps a removal off them.
    /// `None` for a layer without content of its own.
    pub(super) fn lend_own(
        &self,
        id: &str,
        parent: Option<&str>,
        under: bool,
    ) -> Result<(Lease, Option<PathBuf>, Vec<PathBuf>)> {
        let view = Flight::View(id.to_owned());
        let (lease, own, lower) = {
            let mut st = self.state_when(|st| st.flights.contains(&view))?;
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            Self::check_parent(&l, parent)?;
            let lower = if under { self.sources(&st, id, false)? } else { Vec::new() };
            (self.lease(&mut st, id, self.home.join("empty")), l.content(), lower)
        };
        let own = match own {
            Some(src) => self.mount_source(&src)?,
            None => None,
        };
        let lower = self.mount_sources(&lower)?;
        Ok((lease.with_path(own.clone().unwrap_or_else(|| self.home.join("empty"))), own, lower))
    }

    /// What layer `id` stands on, topmost first (with its own content first
    /// when `own`): for each parent, its snapshot when the child was created
    /// over it while it was writable, otherwise its own content.
    pub(super) fn sources(&self, st: &State, id: &str, own: bool) -> Result<Vec<Source>> {
        let mut l = st.layers.get(id).ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        let mut out: Vec<Source> = if own { l.content().into_iter().collect() } else { Vec::new() };
        let mut depth = 0;
        while let Some(p) = &l.parent {
            depth += 1;
            if depth > 4096 {
                return Err(Error::Corrupt { path: self.layer_file(id), reason: "parent chain loops".into() });
            }
            let pl = st.layers.get(p).ok_or_else(|| Error::NotFound(format!("layer {p} (parent of {})", l.id)))?;
            match &l.base {
                Some(b) => out.push(Source::Chain(b.clone())),
                None => out.extend(pl.content()),
            }
            l = pl;
        }
        Ok(out)
    }

    /// The directories of `stack`, without mounting anything: for reports
    /// and bookkeeping. Layers known to be empty are left out.
    pub(super) fn stack_paths(&self, st: &State, id: &str, own: bool) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for src in self.sources(st, id, own).unwrap_or_default() {
            match src {
                Source::Chain(c) if st.ro.get(&c).is_none_or(|m| m.dev.is_some()) => {
                    out.push(self.ro_mnt(&c).join(image::LAYER_ROOT))
                }
                Source::Chain(_) => {}
                Source::Upper(id, _) => out.push(self.rw_mnt(&id).join("upper")),
            }
        }
        out
    }

    /// The published chain that layer `l` stands on: its parent's
    /// snapshot, or its parent's published layer.
    pub(super) fn lower_chain(st: &State, l: &LocalLayer) -> Result<Option<ChainId>> {
        match &l.base {
            Some(b) => Ok(Some(b.clone())),
            None => Self::chain_of(st, l.parent.as_deref()),
        }
    }

    /// Mounts layer `id` and returns the directory with its full view.
    /// A layer created read-only and never given content (no ApplyDiff)
    /// is a layer of its own: the first Get gives it a writable image, and
    /// what is written into the directory Get returns is its content.
    ///
    /// The mounts are made outside the state lock with the layer's view in
    /// flight: a Get, Put or Remove of the same id waits for it, requests
    /// on other layers do not.
    pub fn get(&self, id: &str) -> Result<PathBuf> {
        let view = Flight::View(id.to_owned());
        let (mut l, _flight, _reserved) = {
            let mut st = self.state_when(|st| st.flights.contains(&view))?;
            if let Some(g) = st.gets.get_mut(id) {
                g.count += 1;
                return Ok(g.dir.clone());
            }
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            if st.busy.contains(id) {
                return Err(Error::InUse { id: id.into(), why: "another request is working on it".into() });
            }
            let mut reserved = None;
            if let Kind::Image { chain: None, .. } = l.kind {
                // Layers built on it see it as it is: empty. Opening it for
                // writing now would change what they stand on.
                if st.pinned.contains_key(id) || st.layers.values().any(|c| c.parent.as_deref() == Some(id)) {
                    return Err(Error::InUse {
                        id: id.into(),
                        why: "it is empty and layers are built on it; it can no longer be written".into(),
                    });
                }
                // No ApplyDiff of it while it becomes writable.
                reserved = Some(self.reserve(&mut st, &[id], None)?);
            }
            (l, self.take_off(&mut st, view.clone()), reserved)
        };
        if let Kind::Image { chain: None, .. } = l.kind {
            let fs_type = self.cfg.fs;
            let made = self.make_rw_image(id, fs_type, self.cfg.rw_size)?;
            l.kind = Kind::Rw { size: self.cfg.rw_size, fs: fs_type };
            self.save(&l)?;
            made.keep();
            tracing::debug!(layer = id, "an empty read-only layer opened for writing through Get");
            self.lock().layers.insert(id.to_owned(), l.clone());
        }
        let target = self.merged(id);
        let (dir, overlay) = match &l.kind {
            Kind::Rw { fs, .. } => {
                let rw = self.ensure_rw(id, *fs)?;
                crate::fault::point("get", "writable image mounted");
                let srcs = self.sources(&self.lock(), id, false)?;
                let mut lowers = self.mount_sources(&srcs)?;
                crate::fault::point("get", "layers mounted");
                if lowers.is_empty() {
                    lowers.push(self.home.join("empty"));
                }
                fs::create_dir_all(&target).ctx("mkdir", &target)?;
                let (u, w) = (rw.join("upper"), rw.join("work"));
                self.kernel.mount_overlay(&OverlaySpec { lowers: &lowers, upper: Some((&u, &w)) }, &target)?;
                (target.clone(), Some(Mounted::new(&*self.kernel, target)))
            }
            Kind::Image { .. } => {
                let srcs = self.sources(&self.lock(), id, true)?;
                let lowers = self.mount_sources(&srcs)?;
                match lowers.len() {
                    0 => (self.home.join("empty"), None),
                    1 => (lowers[0].clone(), None),
                    _ => {
                        fs::create_dir_all(&target).ctx("mkdir", &target)?;
                        self.kernel.mount_overlay(&OverlaySpec { lowers: &lowers, upper: None }, &target)?;
                        (target.clone(), Some(Mounted::new(&*self.kernel, target)))
                    }
                }
            }
        };
        // Refused when the driver was cleaned up meanwhile: the overlay goes.
        let mut st = self.state()?;
        tracing::debug!(layer = id, target = %dir.display(), "get");
        let mounted = overlay.is_some();
        st.gets.insert(id.to_owned(), GetRef { count: 1, dir: dir.clone(), mounted, adopted: false });
        if let Some(o) = overlay {
            o.keep();
        }
        Ok(dir)
    }

    /// The mounts that show layer `id` (a writable layer, or a read-only
    /// one standing for a view), for an engine that mounts them itself
    /// (containerd). The layers under it are mounted here, once per host;
    /// an overlay whose options would not fit in one page for `mount(2)`
    /// is mounted here too and handed over as a bind mount. Mounting runs
    /// outside the state lock, as for [`Driver::get`].
    pub fn mounts_for(&self, id: &str) -> Result<Vec<MountSpec>> {
        let view = Flight::View(id.to_owned());
        let (l, srcs, _flight) = {
            let mut st = self.state_when(|st| st.flights.contains(&view))?;
            if let Some(g) = st.gets.get(id) {
                let rw = matches!(st.layers.get(id).map(|l| &l.kind), Some(Kind::Rw { .. }));
                return Ok(vec![MountSpec::bind(&g.dir, rw)]);
            }
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            let srcs = self.sources(&st, id, !matches!(l.kind, Kind::Rw { .. }))?;
            (l, srcs, self.take_off(&mut st, view.clone()))
        };
        let (lowers, upper) = match &l.kind {
            Kind::Rw { fs, .. } => {
                let rw = self.ensure_rw(id, *fs)?;
                (self.mount_sources(&srcs)?, Some((rw.join("upper"), rw.join("work"))))
            }
            Kind::Image { .. } => (self.mount_sources(&srcs)?, None),
        };
        match (&upper, lowers.len()) {
            (Some((u, _)), 0) => return Ok(vec![MountSpec::bind(u, true)]),
            (None, 0) => return Ok(vec![MountSpec::bind(&self.home.join("empty"), false)]),
            (None, 1) => return Ok(vec![MountSpec::bind(&lowers[0], false)]),
            _ => {}
        }
        let spec = MountSpec::overlay(&lowers, upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path())));
        let size: usize = spec.options.iter().map(|o| o.len() + 1).sum();
        if size + 512 < rustix::param::page_size() {
            return Ok(vec![spec]);
        }
        let target = self.merged(id);
        fs::create_dir_all(&target).ctx("mkdir", &target)?;
        let upper_refs = upper.as_ref().map(|(u, w)| (u.as_path(), w.as_path()));
        self.kernel.mount_overlay(&OverlaySpec { lowers: &lowers, upper: upper_refs }, &target)?;
        let overlay = Mounted::new(&*self.kernel, &target);
        tracing::debug!(layer = id, layers = lowers.len(), target = %target.display(), "overlay mounted for the engine");
        self.state()?
            .gets
            .insert(id.to_owned(), GetRef { count: 1, dir: target.clone(), mounted: true, adopted: false });
        overlay.keep();
        Ok(vec![MountSpec::bind(&target, upper.is_some())])
    }

    /// Bytes and inodes of writable layer `id`'s own changes.
    pub fn rw_usage(&self, id: &str) -> Result<(u64, u64)> {
        let view = Flight::View(id.to_owned());
        let (_lease, fs) = {
            let mut st = self.wait_while(self.lock(), |st| st.flights.contains(&view));
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            let Kind::Rw { fs, .. } = l.kind else {
                return Err(Error::Invalid(format!("layer {id} is not writable")));
            };
            (self.lease(&mut st, id, self.rw_mnt(id)), fs)
        };
        let upper = self.ensure_rw(id, fs)?.join("upper");
        Ok((export::tree_size(&upper)?, export::tree_counts(&upper)?.inodes.saturating_sub(1)))
    }

    /// Bytes of content and entries of published layer `id`, as recorded
    /// in the store.
    pub fn image_usage(&self, id: &str) -> Result<(u64, u64)> {
        let (chain, size, known) = {
            let st = self.lock();
            match st.layers.get(id).map(|l| &l.kind) {
                Some(Kind::Image { chain: Some(c), size }) => {
                    (c.clone(), *size, st.ro.get(c).map(|m| m.info.meta.entries))
                }
                Some(_) => return Ok((0, 0)),
                None => return Err(Error::NotFound(format!("layer {id}"))),
            }
        };
        // Not mounted here: the store says, read without the lock.
        let entries = known.or_else(|| self.store.locate(&chain).map(|i| i.meta.entries)).unwrap_or(0);
        Ok((size, entries))
    }

    /// Releases one `get`. Releasing what is not held is not an error.
    /// The last one unmounts the overlay outside the state lock, with the
    /// layer's view in flight.
    pub fn put(&self, id: &str) -> Result<()> {
        let view = Flight::View(id.to_owned());
        let mut st = self.wait_while(self.lock(), |st| st.flights.contains(&view));
        let Some(g) = st.gets.get_mut(id) else {
            tracing::debug!(layer = id, "put of a layer that is not mounted");
            return Ok(());
        };
        g.count -= 1;
        if g.count > 0 {
            return Ok(());
        }
        let g = st.gets.remove(id).expect("present");
        if !g.mounted {
            return Ok(());
        }
        let _flight = self.take_off(&mut st, view);
        drop(st);
        if let Err(e) = self.kernel.unmount(&g.dir) {
            self.lock().gets.insert(id.to_owned(), GetRef { count: 1, ..g });
            return Err(e);
        }
        let _ = fs::remove_dir(&g.dir);
        Ok(())
    }
}
