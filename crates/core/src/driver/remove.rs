//! Removal: layers, writable images (moved aside, then unmounted and
//! deleted by a background worker), this host's hold on published
//! layers, and Cleanup at engine shutdown.

use std::fs;
use std::path::PathBuf;

use super::flight::Flight;
use super::records::{GetRef, Kind};
use super::{Driver, State};
use crate::error::{Context, Error, Result};
use crate::guard::Staged;
use crate::ids::{random_token, ChainId};
use crate::store::LayerInfo;

/// How long a removal waits for a request working on the same id (tests
/// shorten it: `fault::shorten_wait("remove", ..)`).
const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Driver {
    /// Removes layer `id`. Removing what does not exist is not an error.
    ///
    /// The checks run under the state lock; then the id is reserved and
    /// its view and removal marked in flight (a Get, Put or lease of it, or
    /// a create over it, waits; a create of the same id is refused), and
    /// the unmounts, the release of published layers (on the shared root:
    /// references, perhaps the layer's deletion) and the record's deletion
    /// run without the lock.
    pub fn remove(&self, id: &str) -> Result<()> {
        // A request working on the id (an ApplyDiff whose client went away,
        // a create over it, a reader holding a lease on it) finishes first:
        // dockerd removes a layer right after its ApplyDiff failed on the
        // client side, and does not retry a refused Remove. Removal waits
        // for it, a bounded time.
        let (view, rw) = (Flight::View(id.to_owned()), Flight::Rw(id.to_owned()));
        let working = |st: &State| {
            st.busy.contains(id)
                || st.pinned.contains_key(id)
                || st.leases.contains_key(id)
                || st.flights.contains(&view)
                || st.flights.contains(&rw)
        };
        let wait = crate::fault::wait("remove", REMOVE_WAIT);
        let (st, idle) = self.wait_bounded(self.state()?, std::time::Instant::now() + wait, working);
        if st.closed {
            drop(st);
            return self.state().map(|_| ());
        }
        let mut st = st;
        if !idle {
            let why = if st.leases.contains_key(id) {
                format!(
                    "a reader has been using its directory (a diff streaming from it) for over {} s",
                    wait.as_secs()
                )
            } else {
                format!("another request has been working on it or on a child for over {} s", wait.as_secs())
            };
            return Err(Error::InUse { id: id.into(), why });
        }
        let Some(l) = st.layers.get(id).cloned() else {
            return Ok(());
        };
        if let Some(child) = st.layers.values().find(|c| c.parent.as_deref() == Some(id)) {
            return Err(Error::InUse { id: id.into(), why: format!("layer {} is built on it", child.id) });
        }
        if let Some(g) = st.gets.get(id).filter(|g| !g.adopted) {
            return Err(Error::InUse {
                id: id.into(),
                why: format!("it is mounted at {} (Get without Put)", g.dir.display()),
            });
        }
        let _flights = (self.take_off(&mut st, view), self.take_off(&mut st, Flight::Remove(id.to_owned())));
        // Dropped before the flights: a create of the id waiting for the
        // removal finds it free.
        let _reserved = self.reserve(&mut st, &[id], None)?;
        // Mounted by a run before a restart; nobody holds it now.
        let adopted = st.gets.remove(id);
        drop(st);
        if let Some(g) = adopted.filter(|g| g.mounted) {
            if let Err(e) = self.kernel.unmount(&g.dir) {
                self.lock().gets.insert(id.to_owned(), g);
                return Err(e);
            }
            let _ = fs::remove_dir(&g.dir);
        }
        if let Kind::Rw { .. } = &l.kind {
            self.bury_rw(id)?;
        }
        // From here the layer stands on nothing: a removal of another
        // layer on the same published layers, running meanwhile, sees that
        // (one of the two releases it). Put back if what follows fails.
        self.lock().layers.remove(id);
        let released = (|| {
            if let Kind::Image { chain: Some(c), .. } = &l.kind {
                self.release_chain(c, id)?;
            }
            if let Some(b) = &l.base {
                self.release_chain(b, id)?;
            }
            crate::fault::point("remove", "mounts released");
            let f = self.layer_file(id);
            fs::remove_file(&f).ctx("remove", &f)?;
            crate::store::fsync_dir(f.parent().unwrap())
        })();
        if let Err(e) = released {
            self.lock().layers.insert(id.to_owned(), l);
            return Err(e);
        }
        Ok(())
    }

    /// Takes writable layer `id`'s image and mount out of the way now, and
    /// unmounts (a journal commit) and deletes them off the request path.
    /// Nothing left under the id's names: a create of the same id right
    /// after cannot meet the removal. A crash in between leaves a mount and
    /// an `rw/.rm-*` entry, both of which the start-up reconcile removes.
    /// Called without the state lock, with the removal in flight.
    fn bury_rw(&self, id: &str) -> Result<()> {
        let dir = self.home.join("rw").join(id);
        // Same mount as rw/ (tmp/ is a mount of its own).
        let grave = Staged::mkdir(self.home.join("rw").join(format!(".rm-{}", random_token())))?;
        let was_mounted = {
            let mut st = self.lock();
            st.attached_elsewhere.remove(id);
            st.rw_mounted.contains(id)
        };
        let m = self.rw_mnt(id);
        let mut moved = None;
        if was_mounted {
            // The mount moves into the grave (both are on private mounts of
            // the home), so rwmnt/<id> is free at once.
            let to = grave.path().join("mnt");
            let r = fs::create_dir(&to).ctx("mkdir", &to).and_then(|_| self.kernel.move_mount(&m, &to));
            match r {
                Ok(()) => moved = Some(to),
                Err(e) => {
                    tracing::info!(target = %m.display(), error = %e, "cannot move the writable mount; detaching it");
                    // Nothing moved yet on an error: the layer stays as it
                    // was (the grave goes with its guard).
                    self.kernel.detach(&m)?;
                }
            }
            self.lock().rw_mounted.remove(id);
        }
        // The image last: once it is in the grave, the layer is gone.
        match fs::rename(&dir, grave.path().join("img")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot move a removed writable image aside; deleting it in place")
            }
        }
        let _ = fs::remove_dir(&m);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        // The worker owns the grave from here.
        let grave_path = grave.path().to_owned();
        grave.keep();
        let kernel = self.kernel.clone();
        std::thread::spawn(move || {
            if let Some(to) = moved {
                if let Err(e) = kernel.unmount(&to) {
                    // Still under an engine's overlay (containerd commits
                    // while its mount is up): detach; the filesystem and loop
                    // device go with the last user.
                    tracing::info!(target = %to.display(), error = %e, "writable layer busy; detaching it");
                    if let Err(e) = kernel.detach(&to) {
                        tracing::warn!(target = %to.display(), error = %e, "cannot unmount a removed writable layer");
                        return;
                    }
                    // A directory layer's files are the upper of the
                    // overlay still up: deleting them would pull them from
                    // under it (an image's filesystem lives on with its loop
                    // device). The next start removes the grave.
                    if grave_path.join("img").join("dir").is_dir() {
                        tracing::info!(grave = %grave_path.display(),
                            "a removed directory layer is still an overlay's upper; left for the next start");
                        return;
                    }
                }
            }
            let _ = fs::remove_dir_all(&grave_path);
            drop(tx);
        });
        let mut st = self.lock();
        st.pending.retain(|r| matches!(r.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)));
        st.pending.push(rx);
        Ok(())
    }

    /// Layer `id` no longer stands on published layer `c`: unless another
    /// local layer does, or a request holds it, its mount and this host's
    /// reference go. The decision is made under the state lock, with the
    /// release then marked in flight (a request about to reference `c`
    /// waits for it); the unmount and the store's work run without it.
    pub(super) fn release_chain(&self, c: &ChainId, id: &str) -> Result<()> {
        let key = Flight::Release(c.clone());
        let (m, _flight) = {
            let mut st = self.wait_while(self.lock(), |st| st.flights.contains(&key));
            if st.layers.values().any(|o| o.id != id && o.uses_chain(c)) || st.inflight.contains_key(c) {
                return Ok(());
            }
            (st.ro.remove(c), self.take_off(&mut st, key.clone()))
        };
        let info = match m {
            Some(m) => {
                if m.dev.is_some() {
                    if let Err(e) = self.mounts.release(c, &self.home) {
                        self.lock().ro.insert(c.clone(), m);
                        return Err(e);
                    }
                }
                Some(m.info)
            }
            None => self.store.locate(c),
        };
        // Where it was mounted from, and where it is now (a promote may
        // have moved it).
        let mut infos: Vec<LayerInfo> = info.into_iter().collect();
        if let Some(now) = self.store.locate(c) {
            if !infos.iter().any(|i| i.location == now.location) {
                infos.push(now);
            }
        }
        for info in infos {
            if self.store.release(&info)? {
                tracing::info!(layer = %c, location = info.location.name(), "layer removed from the store");
            }
        }
        Ok(())
    }

    /// Waits for background removals to finish.
    pub fn settle(&self) {
        let pending = std::mem::take(&mut self.lock().pending);
        for rx in pending {
            let _ = rx.recv();
        }
    }

    /// Releases every mount the driver holds, as dockerd expects of
    /// Cleanup at shutdown (overlay2 unmounts everything under its home):
    /// overlays handed out by Get (held or not), writable layers, this
    /// driver's claims on layer mounts, staging and the home's own bind.
    /// The driver serves no request afterwards; a new Init opens it again.
    pub fn cleanup(&self) -> Result<()> {
        // No new request from here on; wait for those in flight (an
        // ApplyDiff or a commit must not lose its staging under it).
        {
            let mut st = self.lock();
            if st.closed {
                return Ok(());
            }
            st.closed = true;
        }
        // Leases too: a diff streaming keeps its directory until it ends.
        let working = |st: &State| {
            !(st.busy.is_empty()
                && st.pinned.is_empty()
                && st.inflight.is_empty()
                && st.flights.is_empty()
                && st.leases.is_empty())
        };
        let until = std::time::Instant::now() + std::time::Duration::from_secs(300);
        let (st, idle) = self.wait_bounded(self.lock(), until, working);
        if !idle {
            tracing::warn!(busy = ?st.busy, flights = ?st.flights, leases = ?st.leases,
                "requests still in flight after 300 s; cleaning up around them");
        }
        drop(st);
        self.settle();
        // Nothing is detached: a mount that cannot go now (a process still
        // in a container) stays visible, so that the next start adopts it
        // instead of mounting a writable image a second time. The mounts
        // are taken out of the state, then unmounted without the lock.
        let mut failed = Vec::new();
        let gets: Vec<(String, GetRef)> = self.lock().gets.drain().collect();
        for (id, g) in gets {
            if !g.adopted {
                tracing::warn!(layer = %id, holds = g.count, "layer still mounted (Get without Put) at cleanup; unmounting it");
            }
            if g.mounted {
                match self.kernel.unmount(&g.dir) {
                    Ok(()) => {
                        let _ = fs::remove_dir(&g.dir);
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
        }
        if !failed.is_empty() {
            return Err(Error::Invalid(format!(
                "cleanup: overlays still in use, left mounted with what they stand on: {}",
                failed.join("; ")
            )));
        }
        let (rw_mounted, ro) = {
            let mut st = self.lock();
            (std::mem::take(&mut st.rw_mounted), std::mem::take(&mut st.ro))
        };
        for id in rw_mounted {
            let m = self.rw_mnt(&id);
            match self.kernel.unmount(&m) {
                Ok(()) => {
                    let _ = fs::remove_dir(&m);
                }
                Err(e) => failed.push(e.to_string()),
            }
        }
        for (c, m) in ro {
            if m.dev.is_some() {
                if let Err(e) = self.mounts.release(&c, &self.home) {
                    failed.push(e.to_string());
                }
            }
        }
        // Mounts of this home that the driver did not make itself (commit
        // staging left by a crash), deepest first, then staging and the
        // home. The layer mount directory, when it is the driver's own
        // (`<home>/mnt`), goes too: nothing is mounted in it any more.
        let mut rest: Vec<PathBuf> =
            self.kernel.mountinfo()?.into_iter().map(|m| m.mount_point).filter(|p| p.starts_with(&self.home)).collect();
        rest.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        rest.dedup();
        for p in rest {
            if p != self.home && self.mounts.dir().starts_with(&p) && self.mounts.count() > 0 {
                continue; // another driver's layers are still mounted there
            }
            // A mount may be stacked on itself (a bind of a bind): unmount
            // until it is gone, a bounded number of times.
            for _ in 0..4 {
                if !self.kernel.is_mountpoint(&p) {
                    break;
                }
                // The home's bind of itself may be pinned by this driver's
                // own open lock file: once nothing is mounted below it,
                // detaching it is harmless.
                let r = match self.kernel.unmount(&p) {
                    Err(_) if p == self.home && failed.is_empty() => self.kernel.detach(&p),
                    r => r,
                };
                if let Err(e) = r {
                    failed.push(e.to_string());
                    break;
                }
            }
        }
        tracing::info!(home = %self.home.display(), "driver cleaned up: every mount released");
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid(format!("cleanup left mounts behind: {}", failed.join("; "))))
        }
    }
}
