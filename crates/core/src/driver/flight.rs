//! Work on layers outside the state lock. A request checks under the
//! lock, marks what it works on (an id reserved, a mount in flight, a
//! lease, a published layer held), lets go of the lock for the kernel and
//! filesystem I/O, and takes the lock again to record the outcome. The
//! marks are guards: dropped, also on an error or a panic, they clear
//! themselves and wake the requests waiting for them.
//!
//! - [`Flight`]: a mount being made or unmade (a layer's view, a writable
//!   image), a layer being removed, a published layer being released.
//!   Requests wanting the same one wait for it to land; others go on.
//! - `Reservation`: ids a create, ApplyDiff or commit works on, and the
//!   parent it pins. Conflicting requests are refused (`InUse`,
//!   `AlreadyExists`); a removal waits, a bounded time.
//! - [`Lease`]: a reader using a layer's mounted directory outside the
//!   lock (a Diff streaming from it). A removal waits for it, a bounded
//!   time, then refuses (`InUse`): nothing is unmounted under a reader.
//! - `ChainHold`: a published layer referenced and not yet recorded.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{Driver, State};
use crate::error::{Error, Result};
use crate::ids::ChainId;

/// The state and a condition variable, signalled whenever a mark clears.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    pub(super) landed: Condvar,
}

impl Shared {
    pub(super) fn new() -> Arc<Shared> {
        Arc::new(Shared { state: Mutex::new(State::default()), landed: Condvar::new() })
    }
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn clear(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.landed.notify_all();
    }
}

/// What a request works on outside the lock, exclusively.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Flight {
    /// Layer `id`'s view (a Get, a Put, the mounts for containerd, a
    /// removal): its overlay, its hold count.
    View(String),
    /// Writable layer `id`'s image being attached and mounted.
    Rw(String),
    /// Layer `id` being removed: no layer is created over it meanwhile.
    Remove(String),
    /// This host's hold on a published layer being let go (its mount,
    /// its reference, perhaps the layer): no new hold meanwhile.
    Release(ChainId),
}

/// A [`Flight`] marked; dropping it clears the mark and wakes the waiters.
#[must_use]
pub(super) struct InFlight<'a> {
    shared: &'a Shared,
    key: Flight,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.shared.clear(|st| {
            st.flights.remove(&self.key);
        });
    }
}

/// A published layer held in flight (see `State::inflight`) until
/// dropped, once its user is recorded.
pub(super) struct ChainHold<'a> {
    shared: &'a Shared,
    chain: ChainId,
}

impl Drop for ChainHold<'_> {
    fn drop(&mut self) {
        self.shared.clear(|st| {
            if let Some(n) = st.inflight.get_mut(&self.chain) {
                *n -= 1;
                if *n == 0 {
                    st.inflight.remove(&self.chain);
                }
            }
        });
    }
}

/// Ids reserved by one request while it works outside the lock; released
/// when dropped.
pub(super) struct Reservation<'a> {
    shared: &'a Shared,
    ids: Vec<String>,
    pinned: Option<String>,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.shared.clear(|st| {
            for id in &self.ids {
                st.busy.remove(id);
            }
            if let Some(p) = &self.pinned {
                if let Some(n) = st.pinned.get_mut(p) {
                    *n -= 1;
                    if *n == 0 {
                        st.pinned.remove(p);
                    }
                }
            }
        });
    }
}

/// A layer's mounted directory, lent to a reader: while the lease is out,
/// a removal of the layer waits (a bounded time, then it is refused), so
/// the directory stays mounted. Owns no borrow of the driver: it may go
/// with a stream to another thread.
#[must_use = "the directory is only guaranteed while the lease is held"]
pub struct Lease {
    shared: Arc<Shared>,
    id: String,
    path: PathBuf,
}

impl Lease {
    /// The directory lent.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(super) fn with_path(mut self, path: PathBuf) -> Lease {
        self.path = path;
        self
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("id", &self.id).field("path", &self.path).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.clear(|st| {
            if let Some(n) = st.leases.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    st.leases.remove(&self.id);
                }
            }
        });
    }
}

impl Driver {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    fn refuse_closed(&self, st: &State) -> Result<()> {
        if st.closed {
            return Err(Error::Conflict(format!(
                "the driver in {} was cleaned up (engine shutdown); initialise it again",
                self.home.display()
            )));
        }
        Ok(())
    }

    /// The state, for a request: refused once the driver is cleaned up.
    pub(super) fn state(&self) -> Result<MutexGuard<'_, State>> {
        let st = self.lock();
        self.refuse_closed(&st)?;
        Ok(st)
    }

    /// Waits (without the lock) while `busy` holds.
    pub(super) fn wait_while<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        busy: impl Fn(&State) -> bool,
    ) -> MutexGuard<'a, State> {
        while busy(&st) {
            st = self.shared.landed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st
    }

    /// The state for a request once `busy` no longer holds.
    pub(super) fn state_when(&self, busy: impl Fn(&State) -> bool) -> Result<MutexGuard<'_, State>> {
        let st = self.wait_while(self.state()?, busy);
        self.refuse_closed(&st)?;
        Ok(st)
    }

    /// Waits, at most until `until`, while `busy` holds; the flag is
    /// `false` when it still does then.
    pub(super) fn wait_bounded<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        until: std::time::Instant,
        busy: impl Fn(&State) -> bool,
    ) -> (MutexGuard<'a, State>, bool) {
        while busy(&st) {
            let now = std::time::Instant::now();
            if now >= until {
                return (st, false);
            }
            st = self.shared.landed.wait_timeout(st, until - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        (st, true)
    }

    /// Whether any of `ids` is being removed (a request on it waits for
    /// that, then finds it gone, as if the two ran one after the other).
    pub(super) fn removing(st: &State, ids: &[Option<&str>]) -> bool {
        ids.iter().flatten().any(|id| st.flights.contains(&Flight::Remove((*id).to_owned())))
    }

    /// Marks `key` in flight; the caller has waited for it to land.
    pub(super) fn take_off(&self, st: &mut State, key: Flight) -> InFlight<'_> {
        debug_assert!(!st.flights.contains(&key), "{key:?} in flight twice");
        st.flights.insert(key.clone());
        InFlight { shared: &self.shared, key }
    }

    /// Reserves `ids` (which no other request may be working on) and pins
    /// `parent` for a request that works outside the lock.
    pub(super) fn reserve(&self, st: &mut State, ids: &[&str], parent: Option<&str>) -> Result<Reservation<'_>> {
        if let Some(id) = ids.iter().find(|id| st.busy.contains(**id)) {
            return Err(Error::InUse { id: (*id).into(), why: "another request is working on it".into() });
        }
        for id in ids {
            st.busy.insert((*id).to_owned());
        }
        if let Some(p) = parent {
            *st.pinned.entry(p.to_owned()).or_default() += 1;
        }
        Ok(Reservation {
            shared: &self.shared,
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            pinned: parent.map(str::to_owned),
        })
    }

    /// Holds published layer `chain` for a request about to reference it
    /// in the store; a release of it on this host finishes first.
    pub(super) fn hold_chain(&self, chain: &ChainId) -> ChainHold<'_> {
        let key = Flight::Release(chain.clone());
        let mut st = self.wait_while(self.lock(), |st| st.flights.contains(&key));
        *st.inflight.entry(chain.clone()).or_default() += 1;
        ChainHold { shared: &self.shared, chain: chain.clone() }
    }

    /// Lends layer `id` (waiting for its view to land) to a reader of
    /// `path`, which the caller makes sure is mounted.
    pub(super) fn lease(&self, st: &mut State, id: &str, path: PathBuf) -> Lease {
        *st.leases.entry(id.to_owned()).or_default() += 1;
        Lease { shared: self.shared.clone(), id: id.to_owned(), path }
    }
}
