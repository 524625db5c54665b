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

use sharedloop_core::{Error, Result};

use crate::snapshots::{SnapInfo, SnapKind};

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

    /// For a request making snapshot `key` over `parent` ("" for none):
    /// once neither is pending, refuses a taken key and a parent that is
    /// missing or not committed, and marks `key` pending; with the
    /// parent's layer.
    pub(crate) fn mark_new(&self, key: &str, parent: &str) -> Result<(Option<String>, Pending<'_>)> {
        let mut r = self.settled(&[key, parent]);
        if r.snaps.contains_key(key) {
            return Err(Error::AlreadyExists(format!("snapshot {key}")));
        }
        let parent_layer = parent_layer(&r.snaps, parent)?;
        Ok((parent_layer, self.mark(&mut r, key, parent)))
    }

    /// Marks `key` (naming `parent`) pending; the caller has waited for it.
    pub(crate) fn mark(&self, r: &mut Records, key: &str, parent: &str) -> Pending<'_> {
        debug_assert!(!r.pending.contains_key(key));
        r.pending.insert(key.to_owned(), parent.to_owned());
        Pending { table: self, key: key.to_owned() }
    }
}

/// The layer of committed snapshot `parent` ("" for none).
fn parent_layer(snaps: &HashMap<String, SnapInfo>, parent: &str) -> Result<Option<String>> {
    if parent.is_empty() {
        return Ok(None);
    }
    let p = snaps.get(parent).ok_or_else(|| Error::NotFound(format!("parent snapshot {parent}")))?;
    if p.kind != SnapKind::Committed {
        return Err(Error::Invalid(format!("parent {parent} is not a committed snapshot")));
    }
    Ok(Some(p.layer.clone()))
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

    /// A new key: refused when taken, over a missing or uncommitted
    /// parent; otherwise marked, with the parent's layer.
    #[test]
    fn a_new_key_needs_a_free_name_and_a_committed_parent() {
        use crate::snapshots::tests::snap;
        let snaps = [snap("c", SnapKind::Committed, "", &[]), snap("a", SnapKind::Active, "c", &[])];
        let t = Table::new(snaps.into_iter().map(|s| (s.name.clone(), s)).collect());
        assert!(matches!(t.mark_new("a", ""), Err(Error::AlreadyExists(_))));
        assert!(matches!(t.mark_new("n", "gone"), Err(Error::NotFound(_))));
        assert!(matches!(t.mark_new("n", "a"), Err(Error::Invalid(_))));
        assert!(t.lock().pending.is_empty(), "a refused request left a mark");
        let (layer, mark) = t.mark_new("n", "c").unwrap();
        assert_eq!(layer.as_deref(), Some("x"));
        assert_eq!(t.lock().pending.get("n").map(String::as_str), Some("c"));
        drop(mark);
        let (layer, _mark) = t.mark_new("n", "").unwrap();
        assert_eq!(layer, None);
    }
}
