//! The hosts using a store directory (their heartbeats) and what a host
//! probes there: its own leftover builds, whether root takes new layers,
//! how many layers each directory has.

use std::io::Write;

use serde::{Deserialize, Serialize};

use super::{layout, now_unix, Location, Store};
use crate::error::Error;
use crate::ids::random_token;

/// Below this much free space, `docker info` says root cannot take layers.
const MIN_FREE_BYTES: u64 = 16 * 1024 * 1024;

/// `hosts/<host-id>`: a host's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRecord {
    pub host_id: String,
    pub hostname: String,
    pub heartbeat_unix: u64,
    pub interval_secs: u64,
}

/// The largest host record read.
const RECORD_MAX_BYTES: u64 = 64 * 1024;

impl Store {
    /// Writes this host's heartbeat into every store directory that exists
    /// and is writable.
    pub fn heartbeat(&self, interval_secs: u64) {
        let rec = HostRecord {
            host_id: self.host_id.clone(),
            hostname: rustix::system::uname().nodename().to_string_lossy().into_owned(),
            heartbeat_unix: now_unix(),
            interval_secs,
        };
        let text = serde_json::to_vec(&rec).expect("serialises");
        for loc in [Location::Root, Location::Fallback] {
            let Ok(base) = self.dir(loc) else { continue };
            let file = layout::host(&self.host_id);
            let r = base
                .sub_made(layout::HOSTS)
                .map_err(|e| Error::sys("mkdir", base.join(layout::HOSTS), e))
                .and_then(|_| base.write_atomic(&file, &text, 0o644));
            match r {
                Ok(()) => crate::metrics::heartbeat_written(base.path()),
                Err(e) => tracing::debug!(path = %base.join(&file).display(), error = %e, "cannot write the heartbeat"),
            }
        }
    }

    /// The hosts registered in `loc`.
    pub fn hosts(&self, loc: Location) -> Vec<HostRecord> {
        let Ok(base) = self.dir(loc) else { return Vec::new() };
        let Ok(entries) = base.entries(layout::HOSTS) else { return Vec::new() };
        let mut v: Vec<HostRecord> = entries
            .iter()
            .filter(|e| !e.name.starts_with('.'))
            .filter_map(|e| base.read(layout::host(&e.name), RECORD_MAX_BYTES).ok())
            .filter_map(|t| serde_json::from_slice(&t).ok())
            .collect();
        v.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        v
    }

    /// Removes the record of host `id` in `loc`.
    pub(crate) fn remove_host(&self, loc: Location, id: &str) {
        if let Ok(base) = self.dir(loc) {
            let _ = base.remove_file(layout::host(id));
        }
    }

    /// Removes this host's leftovers in `tmp/` (builds of a previous run).
    pub fn sweep_own_tmp(&self) {
        let prefix = format!("{}-", self.host_id);
        for loc in [Location::Root, Location::Fallback] {
            let Ok(base) = self.dir(loc) else { continue };
            let Ok(tmp) = base.sub(layout::TMP) else { continue };
            let Ok(entries) = tmp.entries("") else { continue };
            for e in entries.iter().filter(|e| e.name.starts_with(&prefix)) {
                tracing::info!(path = %tmp.join(&e.name).display(), "removing leftover temporary build");
                let _ = tmp.remove_tree(&e.name);
            }
        }
    }

    /// Counts published layers per location (for status output).
    pub fn count_layers(&self, loc: Location) -> Option<usize> {
        self.dir(loc).and_then(|b| b.entries(layout::LAYERS)).ok().map(|v| v.len())
    }

    /// Why root cannot take new layers, if it cannot (probed with a
    /// temporary file).
    pub fn root_problem(&self) -> Option<String> {
        // Never create root itself: a missing root is a reason to fall back.
        let r = self.dir(Location::Root).and_then(|root| {
            let tmp = root.sub_made(layout::TMP)?;
            // Some data, not just a name: a full filesystem still takes
            // empty files.
            let name = format!(".probe-{}", random_token());
            let w =
                tmp.create_new(&name, 0o644).and_then(|mut f| f.write_all(&[0u8; 65536]).and_then(|_| f.sync_all()));
            let _ = tmp.remove_file(&name);
            w.map(|_| root)
        });
        let root = match r {
            Ok(root) => root,
            Err(e) => return Some(e.to_string()),
        };
        match rustix::fs::fstatvfs(root.fd()) {
            Ok(s) if s.f_bavail.saturating_mul(s.f_frsize) < MIN_FREE_BYTES => {
                Some(format!("{} free, less than a layer needs", crate::ids::Bytes(s.f_bavail * s.f_frsize)))
            }
            _ => None,
        }
    }
}
