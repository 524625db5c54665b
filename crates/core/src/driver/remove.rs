//! Removal: layers, writable images (moved aside, then unmounted and
//! deleted by a background worker), this host's hold on published
//! layers, and Cleanup at engine shutdown.

use std::fs;
use std::path::PathBuf;

use super::records::{GetRef, Kind};
use super::{Driver, State};
use crate::error::{Context, Error, Result};
use crate::ids::{random_token, ChainId};
use crate::mount;
use crate::store::LayerInfo;

/// How long a removal waits for a request working on the same id.
const REMOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Driver {
    /// Removes layer `id`. Removing what does not exist is not an error.
    pub fn remove(&self, id: &str) -> Result<()> {
        // A request working on the id (an ApplyDiff whose client went away,
        // a create over it) finishes first: dockerd removes a layer right
        // after its ApplyDiff failed on the client side, and does not retry
        // a refused Remove. Removal waits for it, a bounded time.
        let mut st = self.state()?;
        let t0 = std::time::Instant::now();
        while st.busy.contains(id) || st.pinned.contains_key(id) {
            if t0.elapsed() > REMOVE_WAIT {
                return Err(Error::InUse {
                    id: id.into(),
                    why: format!(
                        "another request has been working on it or on a child for over {} s",
                        REMOVE_WAIT.as_secs()
                    ),
                });
            }
            drop(st);
            std::thread::sleep(std::time::Duration::from_millis(20));
            st = self.state()?;
        }
        let Some(l) = st.layers.get(id).cloned() else {
            return Ok(());
        };
        if let Some(child) = st.layers.values().find(|c| c.parent.as_deref() == Some(id)) {
            return Err(Error::InUse { id: id.into(), why: format!("layer {} is built on it", child.id) });
        }
        match st.gets.get(id) {
            Some(g) if !g.adopted => {
                return Err(Error::InUse {
                    id: id.into(),
                    why: format!("it is mounted at {} (Get without Put)", g.dir.display()),
                })
            }
            Some(g) => {
                // Mounted by a run before a restart; nobody holds it now.
                if g.mounted {
                    mount::unmount_path(&g.dir)?;
                    let _ = fs::remove_dir(&g.dir);
                }
                st.gets.remove(id);
            }
            None => {}
        }
        match &l.kind {
            Kind::Rw { .. } => self.bury_rw(&mut st, id)?,
            Kind::Image { chain: Some(c), .. } => self.release_chain(&mut st, c, id)?,
            Kind::Image { chain: None, .. } => {}
        }
        if let Some(b) = &l.base {
            self.release_chain(&mut st, b, id)?;
        }
        crate::fault::point("remove", "mounts released");
        let f = self.layer_file(id);
        fs::remove_file(&f).ctx("remove", &f)?;
        crate::store::fsync_dir(f.parent().unwrap())?;
        st.layers.remove(id);
        Ok(())
    }

    /// Takes writable layer `id`'s image and mount out of the way now, and
    /// unmounts (a journal commit) and deletes them off the request path.
    /// Nothing left under the id's names: a create of the same id right
    /// after cannot meet the removal. A crash in between leaves a mount and
    /// an `rw/.rm-*` entry, both of which the start-up reconcile removes.
    fn bury_rw(&self, st: &mut State, id: &str) -> Result<()> {
        let dir = self.home.join("rw").join(id);
        // Same mount as rw/ (tmp/ is a mount of its own).
        let grave = self.home.join("rw").join(format!(".rm-{}", random_token()));
        fs::create_dir(&grave).ctx("mkdir", &grave)?;
        st.attached_elsewhere.remove(id);
        let m = self.rw_mnt(id);
        let mut moved = None;
        if st.rw_mounted.contains(id) {
            // The mount moves into the grave (both are on private mounts of
            // the home), so rwmnt/<id> is free at once.
            let to = grave.join("mnt");
            let r = fs::create_dir(&to)
                .ctx("mkdir", &to)
                .and_then(|_| rustix::mount::mount_move(&m, &to).ctx("move mount", &m));
            match r {
                Ok(()) => moved = Some(to),
                Err(e) => {
                    tracing::info!(target = %m.display(), error = %e, "cannot move the writable mount; detaching it");
                    if let Err(e) = mount::detach_path(&m) {
                        // Nothing moved yet: the layer stays as it was.
                        let _ = fs::remove_dir(&to);
                        let _ = fs::remove_dir(&grave);
                        return Err(e);
                    }
                }
            }
            st.rw_mounted.remove(id);
        }
        // The image last: once it is in the grave, the layer is gone.
        match fs::rename(&dir, grave.join("img")) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot move a removed writable image aside; deleting it in place")
            }
        }
        let _ = fs::remove_dir(&m);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Some(to) = moved {
                if let Err(e) = mount::unmount_path(&to) {
                    // Still under an engine's overlay (containerd commits
                    // while its mount is up): detach; the filesystem and loop
                    // device go with the last user.
                    tracing::info!(target = %to.display(), error = %e, "writable layer busy; detaching it");
                    if let Err(e) = mount::detach_path(&to) {
                        tracing::warn!(target = %to.display(), error = %e, "cannot unmount a removed writable layer");
                        return;
                    }
                }
            }
            let _ = fs::remove_dir_all(&grave);
            drop(tx);
        });
        st.pending.retain(|r| matches!(r.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty)));
        st.pending.push(rx);
        Ok(())
    }

    /// Layer `id` no longer stands on published layer `c`: unless another
    /// local layer does, its mount and this host's reference go.
    pub(super) fn release_chain(&self, st: &mut State, c: &ChainId, id: &str) -> Result<()> {
        if st.layers.values().any(|o| o.id != id && o.uses_chain(c)) || st.inflight.contains_key(c) {
            return Ok(());
        }
        let info = match st.ro.remove(c) {
            Some(m) => {
                if m.dev.is_some() {
                    if let Err(e) = self.mounts.release(c, &self.home) {
                        st.ro.insert(c.clone(), m);
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
        let t0 = std::time::Instant::now();
        loop {
            let st = self.lock();
            if st.busy.is_empty() && st.pinned.is_empty() && st.inflight.is_empty() {
                break;
            }
            if t0.elapsed() > std::time::Duration::from_secs(300) {
                tracing::warn!(busy = ?st.busy, "requests still in flight after 300 s; cleaning up around them");
                break;
            }
            drop(st);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.settle();
        let mut st = self.lock();
        // Nothing is detached: a mount that cannot go now (a process still
        // in a container) stays visible, so that the next start adopts it
        // instead of mounting a writable image a second time.
        let mut failed = Vec::new();
        let gets: Vec<(String, GetRef)> = st.gets.drain().collect();
        for (id, g) in gets {
            if !g.adopted {
                tracing::warn!(layer = %id, holds = g.count, "layer still mounted (Get without Put) at cleanup; unmounting it");
            }
            if g.mounted {
                match mount::unmount_path(&g.dir) {
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
        for id in std::mem::take(&mut st.rw_mounted) {
            let m = self.rw_mnt(&id);
            match mount::unmount_path(&m) {
                Ok(()) => {
                    let _ = fs::remove_dir(&m);
                }
                Err(e) => failed.push(e.to_string()),
            }
        }
        for (c, m) in std::mem::take(&mut st.ro) {
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
            mount::mountinfo()?.into_iter().map(|m| m.mount_point).filter(|p| p.starts_with(&self.home)).collect();
        rest.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        rest.dedup();
        for p in rest {
            if p != self.home && self.mounts.dir().starts_with(&p) && self.mounts.count() > 0 {
                continue; // another driver's layers are still mounted there
            }
            // A mount may be stacked on itself (a bind of a bind): unmount
            // until it is gone, a bounded number of times.
            for _ in 0..4 {
                if !mount::is_mountpoint(&p) {
                    break;
                }
                // The home's bind of itself may be pinned by this driver's
                // own open lock file: once nothing is mounted below it,
                // detaching it is harmless.
                let r = match mount::unmount_path(&p) {
                    Err(_) if p == self.home && failed.is_empty() => mount::detach_path(&p),
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
