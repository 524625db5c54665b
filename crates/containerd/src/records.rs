//! The snapshotter's records in memory, and the keys in flight.
//!
//! One mutex guards the records; no driver call (which may build an
//! image, attach a loop device or touch the shared store) and no file
//! write runs under it. A request checks under the lock, marks the keys
//! it makes or takes away as pending, lets go, does the work and records
//! the outcome under the lock again. A request naming a pending key (as
//! its key, its parent or its commit name) waits for it to land; requests
//! on other keys go on, so a commit's image build holds up no other
//! snapshot. The mark is a guard: it clears itself, and wakes the waiters,
//! also on an error or a panic.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::snapshots::SnapInfo;

#[derive(Default)]
pub(crate) struct Records {
    pub(crate) snaps: HashMap<String, SnapInfo>,
    /// Keys a request is making or taking away now, with the parent they
    /// name: a removal of that parent is refused as for a child.
    pub(crate) pending: HashMap<String, String>,
}

pub(crate) struct Table {
    records: Mutex<Records>,
    landed: Condvar,
}

/// A pending key; dropping it clears the mark and wakes the waiters.
#[must_use]
pub(crate) struct Pending<'a> {
    table: &'a Table,
    key: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.table.lock().pending.remove(&self.key);
        self.table.landed.notify_all();
    }
}

impl Table {
    pub(crate) fn new(snaps: HashMap<String, SnapInfo>) -> Table {
        Table { records: Mutex::new(Records { snaps, pending: HashMap::new() }), landed: Condvar::new() }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Records> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The records once none of `keys` (empty ones ignored) is pending.
    pub(crate) fn settled(&self, keys: &[&str]) -> MutexGuard<'_, Records> {
        let mut r = self.lock();
        while keys.iter().any(|k| !k.is_empty() && r.pending.contains_key(*k)) {
            r = self.landed.wait(r).unwrap_or_else(|p| p.into_inner());
        }
        r
    }

    /// Marks `key` (naming `parent`) pending; the caller has waited for it.
    pub(crate) fn mark(&self, r: &mut Records, key: &str, parent: &str) -> Pending<'_> {
        debug_assert!(!r.pending.contains_key(key));
        r.pending.insert(key.to_owned(), parent.to_owned());
        Pending { table: self, key: key.to_owned() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request on a pending key waits for it; one on another key does
    /// not; the mark clears when its guard drops, also in a panic.
    #[test]
    fn a_pending_key_is_waited_for_and_cleared_also_by_a_panic() {
        let t = Table::new(HashMap::new());
        let mark = {
            let mut r = t.lock();
            t.mark(&mut r, "k", "p")
        };
        std::thread::scope(|s| {
            let waiter = s.spawn(|| t.settled(&["k"]).pending.contains_key("k"));
            assert!(t.settled(&["other", ""]).pending.contains_key("k"), "another key waited for k");
            drop(mark);
            assert!(!waiter.join().unwrap(), "the waiter went on while k was pending");
        });
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _mark = {
                let mut r = t.lock();
                t.mark(&mut r, "k2", "")
            };
            panic!("a request fails while k2 is pending");
        }));
        assert!(r.is_err());
        assert!(t.lock().pending.is_empty(), "the mark outlived its request");
    }
}
