//! containerd's snapshot model over the driver: snapshots named by key,
//! with parents, labels and three kinds (active, view, committed), kept
//! in a small metadata store beside the driver's local layers.
//!
//! ```text
//! <home>/snapshots/<sha256(key)>.json   one record per snapshot
//! ```
//! | snapshot  | driver layer                                            |
//! |-----------|---------------------------------------------------------|
//! | active    | a writable layer (its own image) over the parent        |
//! | view      | an empty read-only layer over the parent                |
//! | committed | a read-only layer standing for a published image        |
//!
//! Commit turns the active layer's upper directory into a layer image in
//! the shared store, named by chain id. Errors follow containerd's own
//! snapshotters (`snapshots/storage`): a missing key is `NotFound`, a
//! taken key `AlreadyExists`, a parent that is not committed
//! `Invalid` (InvalidArgument), a commit of a non-active snapshot and a
//! removal of a snapshot with children `Conflict` (FailedPrecondition);
//! [`crate::status`] turns them into gRPC codes.
//!
//! The records are guarded by one lock that no driver call or file write
//! runs under ([`crate::records`]): requests on one key (or its parent, or
//! a commit's name) follow each other, requests on others do not, so a
//! commit building an image holds up no other snapshot.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;
use std::sync::MutexGuard;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use sharedloop_core::error::Context;
use sharedloop_core::fault::point;
use sharedloop_core::ids::{random_token, ChainId};
use sharedloop_core::store::{fsync_dir, write_atomic};
use sharedloop_core::{CreateKind, Driver, Error, MountSpec, Result};

use crate::filter::Filter;
use crate::records::{Records, Table};

/// The label containerd's unpacker puts on the snapshot of a layer: the
/// chain id it will commit the layer as.
pub const REF_LABEL: &str = "containerd.io/snapshot.ref";
/// A label that sets the size of an active snapshot's writable image.
pub const SIZE_LABEL: &str = "containerd.io/snapshot/sharedloop.size";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapKind {
    View,
    Active,
    Committed,
}

impl SnapKind {
    pub fn name(self) -> &'static str {
        match self {
            SnapKind::View => "view",
            SnapKind::Active => "active",
            SnapKind::Committed => "committed",
        }
    }
}

/// A snapshot as containerd sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapInfo {
    pub name: String,
    pub kind: SnapKind,
    /// Empty for none.
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created_ns: u64,
    pub updated_ns: u64,
    /// The driver layer behind it.
    pub layer: String,
    /// For a committed snapshot: the writable layer it was committed from.
    /// While an active record still names that layer, the commit did not
    /// finish (a crash) and is rolled back at start, as containerd rolls
    /// back its own record of a commit that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_layer: Option<String>,
    /// A committed snapshot kept on this host (its layer is the writable
    /// layer it was committed from; see `local.rs`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

impl SnapInfo {
    pub fn created(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.created_ns)
    }
    pub fn updated(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.updated_ns)
    }
}

fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Resource use of one snapshot, without its parents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

pub struct Snapshotter {
    driver: Driver,
    dir: PathBuf,
    table: Table,
}

impl Snapshotter {
    /// Opens the snapshot records in `<driver home>/snapshots` and drops
    /// records whose layer a crash left behind (or never made).
    pub fn open(driver: Driver) -> Result<Snapshotter> {
        let dir = driver.home().join("snapshots");
        sharedloop_core::perms::private_dir(&dir)?;
        let mut snaps = HashMap::new();
        for e in fs::read_dir(&dir).ctx("read dir", &dir)?.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy().starts_with('.') {
                let _ = fs::remove_file(&p); // interrupted atomic write
                continue;
            }
            let text = fs::read(&p).ctx("read", &p)?;
            let s: SnapInfo =
                serde_json::from_slice(&text).map_err(|e| Error::Corrupt { path: p.clone(), reason: e.to_string() })?;
            if !driver.exists(&s.layer) {
                tracing::warn!(snapshot = %s.name, layer = %s.layer, "dropping a snapshot whose layer is gone");
                let _ = fs::remove_file(&p);
                continue;
            }
            snaps.insert(s.name.clone(), s);
        }
        // Commits a crash interrupted before the active record went.
        let actives: std::collections::HashSet<String> =
            snaps.values().filter(|s| s.kind == SnapKind::Active).map(|s| s.layer.clone()).collect();
        let unfinished: Vec<String> = snaps
            .values()
            .filter(|s| s.from_layer.as_ref().is_some_and(|l| actives.contains(l)))
            .map(|s| s.name.clone())
            .collect();
        let finished = crate::local::finished_local_commits(&snaps);
        let sn = Snapshotter { driver, dir, table: Table::new(snaps) };
        for key in finished {
            tracing::info!(snapshot = %key, "dropping the active record of a commit a crash interrupted after it was recorded");
            sn.forget(&key)?;
            sn.lock().snaps.remove(&key);
        }
        for name in unfinished {
            tracing::info!(snapshot = %name, "rolling back a commit a crash interrupted");
            sn.forget(&name)?;
            sn.lock().snaps.remove(&name);
        }
        sn.remove_stray_layers();
        tracing::info!(snapshots = sn.lock().snaps.len(), "snapshots loaded");
        Ok(sn)
    }

    /// Driver layers no snapshot names: a crash between making a layer and
    /// recording its snapshot. Children before parents.
    fn remove_stray_layers(&self) {
        let named: std::collections::HashSet<String> = self.lock().snaps.values().map(|s| s.layer.clone()).collect();
        let mut stray: Vec<String> = self.driver.layer_ids().into_iter().filter(|l| !named.contains(l)).collect();
        for _ in 0..stray.len() {
            stray.retain(|l| match self.driver.remove(l) {
                Ok(()) => {
                    tracing::info!(layer = %l, "removed a layer no snapshot names");
                    false
                }
                Err(_) => true,
            });
            if stray.is_empty() {
                break;
            }
        }
    }

    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Records> {
        self.table.lock()
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{}.json", hex::encode(Sha256::digest(key.as_bytes()))))
    }

    pub(crate) fn save(&self, s: &SnapInfo) -> Result<()> {
        write_atomic(&self.record_path(&s.name), &serde_json::to_vec(s).expect("serialises"))
    }

    pub(crate) fn forget(&self, key: &str) -> Result<()> {
        let p = self.record_path(key);
        match fs::remove_file(&p) {
            Ok(()) => fsync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::sys("remove", p, e)),
        }
    }

    /// Records snapshot `rec` (whose driver layer exists, and whose key the
    /// caller marked pending); when the record cannot be written, the
    /// layer goes again.
    fn record(&self, rec: SnapInfo) -> Result<()> {
        if let Err(e) = self.save(&rec) {
            let _ = self.driver.remove(&rec.layer);
            return Err(e);
        }
        self.lock().snaps.insert(rec.name.clone(), rec);
        Ok(())
    }

    pub(crate) fn new_record(
        key: &str,
        kind: SnapKind,
        parent: &str,
        labels: BTreeMap<String, String>,
        layer: String,
    ) -> SnapInfo {
        let t = now_ns();
        SnapInfo {
            name: key.into(),
            kind,
            parent: parent.into(),
            labels,
            created_ns: t,
            updated_ns: t,
            layer,
            from_layer: None,
            local: false,
        }
    }

    /// Creates active snapshot `key` over `parent` and returns its mounts.
    /// With [`REF_LABEL`] naming a layer the store already has (on this
    /// parent), records a committed snapshot of that name instead and
    /// answers `AlreadyExists`: the engine then skips fetching and
    /// unpacking the layer.
    pub fn prepare(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<MountSpec>> {
        let (parent_layer, _pending) = self.table.mark_new(key, parent)?;
        if let Some(target) = labels.get(REF_LABEL) {
            if self.use_published(key, target, parent, parent_layer.as_deref(), &labels)? {
                return Err(Error::AlreadyExists(format!("snapshot {target}")));
            }
        }
        let mut opts = HashMap::new();
        if let Some(size) = labels.get(SIZE_LABEL) {
            opts.insert("size".to_owned(), size.clone());
        }
        let layer = format!("a-{}", random_token());
        self.driver.create(&layer, parent_layer.as_deref(), CreateKind::ReadWrite, &opts)?;
        point("snapshot", "writable layer made");
        self.record(Self::new_record(key, SnapKind::Active, parent, labels, layer.clone()))?;
        self.driver.mounts_for(&layer)
    }

    /// The skip-download path of [`Self::prepare`] of `key`; `true` when
    /// committed snapshot `target` now stands (or stood already) for the
    /// layer.
    fn use_published(
        &self,
        key: &str,
        target: &str,
        parent: &str,
        parent_layer: Option<&str>,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool> {
        // `key` is this request's own mark.
        let _pending = {
            let mut r = self.table.settled(&[if target == key { "" } else { target }]);
            if let Some(t) = r.snaps.get(target) {
                return Ok(t.kind == SnapKind::Committed && t.parent == parent);
            }
            (target != key).then(|| self.table.mark(&mut r, target, parent))
        };
        let Some(chain) = ChainId::parse(target) else { return Ok(false) };
        let layer = format!("c-{}", random_token());
        if !self.driver.create_from_store(&layer, parent_layer, &chain)? {
            return Ok(false);
        }
        let mut labels = labels.clone();
        labels.remove(SIZE_LABEL);
        self.record(Self::new_record(target, SnapKind::Committed, parent, labels, layer))?;
        Ok(true)
    }

    /// Creates view snapshot `key`: read-only, over `parent`.
    pub fn view(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<MountSpec>> {
        let (parent_layer, _pending) = self.table.mark_new(key, parent)?;
        let layer = format!("v-{}", random_token());
        self.driver.create(&layer, parent_layer.as_deref(), CreateKind::ReadOnly, &HashMap::new())?;
        self.record(Self::new_record(key, SnapKind::View, parent, labels, layer.clone()))?;
        self.driver.mounts_for(&layer)
    }

    /// The mounts of active or view snapshot `key`.
    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>> {
        let layer = {
            let r = self.table.settled(&[key]);
            let s = r.snaps.get(key).ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
            if s.kind == SnapKind::Committed {
                return Err(Error::Conflict(format!("snapshot {key} is committed; it has no mounts")));
            }
            s.layer.clone()
        };
        self.driver.mounts_for(&layer)
    }

    /// The chain id a commit names the layer by: the unpacker's label, or
    /// a digest at the end of the commit name or of the key (containerd
    /// prefixes names with `<namespace>/<n>/`, and unpack keys end in the
    /// chain id).
    fn chain_hint(name: &str, active: &SnapInfo, labels: &BTreeMap<String, String>) -> Option<ChainId> {
        let tail = |s: &str, sep: char| s.rsplit(sep).next().and_then(ChainId::parse);
        labels
            .get(REF_LABEL)
            .and_then(|v| ChainId::parse(v))
            .or_else(|| active.labels.get(REF_LABEL).and_then(|v| ChainId::parse(v)))
            .or_else(|| tail(name, '/'))
            .or_else(|| tail(&active.name, ' '))
    }

    /// Commits active snapshot `key` as `name`; `key` is gone afterwards.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        // Both names pending while the image is built, without the lock.
        let (active, _name, _key) = {
            let mut r = self.table.settled(&[name, key]);
            if r.snaps.contains_key(name) {
                return Err(Error::AlreadyExists(format!("snapshot {name}")));
            }
            let active = r.snaps.get(key).cloned().ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
            if active.kind != SnapKind::Active {
                return Err(Error::Conflict(format!("snapshot {key} is {}, not active", active.kind.name())));
            }
            let marks = (self.table.mark(&mut r, name, &active.parent), self.table.mark(&mut r, key, &active.parent));
            (active, marks.0, marks.1)
        };
        if crate::local::stays_local(name, key, &labels) {
            return self.commit_local(name, key, active, labels);
        }
        let hint = Self::chain_hint(name, &active, &labels);
        let layer = format!("c-{}", random_token());
        // The layer, then its record, then the active record goes (the
        // point of no return), then the writable layer.
        let chain = self.driver.commit(&active.layer, &layer, hint)?;
        let mut rec = Self::new_record(name, SnapKind::Committed, &active.parent, labels, layer);
        rec.from_layer = Some(active.layer.clone());
        self.record(rec)?;
        point("snapshot", "committed record saved");
        self.forget(key)?;
        self.lock().snaps.remove(key);
        point("snapshot", "active record removed");
        if let Err(e) = self.driver.remove(&active.layer) {
            tracing::warn!(layer = %active.layer, error = %e, "cannot remove the committed writable layer now; removed at the next start");
        }
        tracing::info!(snapshot = name, layer = %chain, "snapshot committed");
        Ok(())
    }

    /// Removes snapshot `key`; refused while another snapshot is based on
    /// it (or being made over it).
    pub fn remove(&self, key: &str) -> Result<()> {
        let (s, _pending) = {
            let mut r = self.table.settled(&[key]);
            let s = r.snaps.get(key).cloned().ok_or_else(|| Error::NotFound(format!("snapshot {key}")))?;
            let child = r.snaps.values().find(|c| c.parent == key).map(|c| c.name.clone());
            let child = child.or_else(|| r.pending.iter().find(|(_, p)| *p == key).map(|(k, _)| k.clone()));
            if let Some(child) = child {
                return Err(Error::Conflict(format!("cannot remove snapshot {key}: snapshot {child} is based on it")));
            }
            let mark = self.table.mark(&mut r, key, &s.parent);
            (s, mark)
        };
        self.forget(key)?;
        self.lock().snaps.remove(key);
        point("snapshot", "record removed");
        if let Err(e) = self.driver.remove(&s.layer) {
            // The record is gone; the layer is removed at the next start.
            tracing::warn!(snapshot = key, layer = %s.layer, error = %e, "cannot remove the snapshot's layer now");
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<SnapInfo> {
        self.lock().snaps.get(key).cloned().ok_or_else(|| Error::NotFound(format!("snapshot {key}")))
    }

    /// Updates the labels of `info.name`: all of them without field paths,
    /// or those named `labels` / `labels.<key>`. Other fields are immutable.
    pub fn update(&self, info: &SnapInfo, paths: &[String]) -> Result<SnapInfo> {
        let mut r = self.table.settled(&[&info.name]);
        let cur = r.snaps.get(&info.name).cloned().ok_or_else(|| Error::NotFound(format!("snapshot {}", info.name)))?;
        let mut next = cur.clone();
        if paths.is_empty() {
            next.labels = info.labels.clone();
        }
        for p in paths {
            if p == "labels" {
                next.labels = info.labels.clone();
            } else if let Some(k) = p.strip_prefix("labels.") {
                match info.labels.get(k) {
                    Some(v) => next.labels.insert(k.to_owned(), v.clone()),
                    None => next.labels.remove(k),
                };
            } else {
                return Err(Error::Invalid(format!(
                    "cannot update {p:?} of snapshot {}: only labels change",
                    info.name
                )));
            }
        }
        next.updated_ns = now_ns();
        // Written without the lock, the name pending meanwhile.
        let _pending = self.table.mark(&mut r, &info.name, &cur.parent);
        drop(r);
        self.save(&next)?;
        self.lock().snaps.insert(next.name.clone(), next.clone());
        Ok(next)
    }

    pub fn usage(&self, key: &str) -> Result<Usage> {
        let s = self.stat(key)?;
        let (bytes, inodes) = match s.kind {
            SnapKind::Active => self.driver.rw_usage(&s.layer)?,
            SnapKind::Committed if s.local => self.driver.rw_usage(&s.layer)?,
            SnapKind::Committed => self.driver.image_usage(&s.layer)?,
            SnapKind::View => (0, 0),
        };
        Ok(Usage { bytes, inodes })
    }

    /// Every snapshot matching any of `filters` (all without filters).
    pub fn list(&self, filters: &[String]) -> Result<Vec<SnapInfo>> {
        let parsed: Vec<Filter> =
            filters.iter().filter(|f| !f.trim().is_empty()).map(|f| Filter::parse(f)).collect::<Result<_>>()?;
        let mut v: Vec<SnapInfo> = self
            .lock()
            .snaps
            .values()
            .filter(|s| parsed.is_empty() || parsed.iter().any(|f| f.matches(s)))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// Finishes deferred work (background removals of writable images).
    pub fn cleanup(&self) {
        self.driver.settle();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn snap(name: &str, kind: SnapKind, parent: &str, labels: &[(&str, &str)]) -> SnapInfo {
        SnapInfo {
            name: name.into(),
            kind,
            parent: parent.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            created_ns: 0,
            updated_ns: 0,
            layer: "x".into(),
            from_layer: None,
            local: false,
        }
    }

    #[test]
    fn chain_hints_come_from_label_name_or_key() {
        let c = format!("sha256:{}", "a".repeat(64));
        let d = format!("sha256:{}", "b".repeat(64));
        let active = snap(&format!("default/5/extract-123 {d}"), SnapKind::Active, "", &[]);
        let none = BTreeMap::new();
        let lab: BTreeMap<String, String> = [(REF_LABEL.to_owned(), c.clone())].into();
        assert_eq!(Snapshotter::chain_hint("x", &active, &lab).unwrap().as_str(), c);
        assert_eq!(Snapshotter::chain_hint(&format!("default/6/{c}"), &active, &none).unwrap().as_str(), c);
        assert_eq!(Snapshotter::chain_hint("plain", &active, &none).unwrap().as_str(), d);
        let plain = snap("key", SnapKind::Active, "", &[]);
        assert!(Snapshotter::chain_hint("plain", &plain, &none).is_none());
    }
}
