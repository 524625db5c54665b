//! The hosts using a store directory (their heartbeats) and what a host
//! probes there: its own leftover builds, whether root takes new layers,
//! how many layers each directory has.

use std::fs::{self, File};
use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use super::{no_links, now_unix, write_atomic_shared, Location, Store};
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
            let base = self.base(loc);
            if !base.is_dir() {
                continue;
            }
            let dir = base.join("hosts");
            let r = match no_links(base, &dir).and_then(|_| fs::create_dir(&dir)) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(Error::sys("mkdir", &dir, e)),
            }
            .and_then(|_| write_atomic_shared(&dir.join(&self.host_id), &text));
            match r {
                Ok(()) => crate::metrics::heartbeat_written(base),
                Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot write the heartbeat"),
            }
        }
    }

    /// The hosts registered in `loc`.
    pub fn hosts(&self, loc: Location) -> Vec<HostRecord> {
        let dir = self.base(loc).join("hosts");
        let Ok(rd) = fs::read_dir(&dir) else { return Vec::new() };
        let mut v: Vec<HostRecord> = rd
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| fs::read(e.path()).ok().and_then(|t| serde_json::from_slice(&t).ok()))
            .collect();
        v.sort_by(|a, b| a.host_id.cmp(&b.host_id));
        v
    }

    /// Removes this host's leftovers in `tmp/` (builds of a previous run).
    pub fn sweep_own_tmp(&self) {
        for loc in [Location::Root, Location::Fallback] {
            let tmp = self.base(loc).join("tmp");
            if no_links(self.base(loc), &tmp).is_err() {
                continue;
            }
            let Ok(rd) = fs::read_dir(&tmp) else { continue };
            let prefix = format!("{}-", self.host_id);
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    tracing::info!(path = %e.path().display(), "removing leftover temporary build");
                    let _ = fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Counts published layers per location (for status output).
    pub fn count_layers(&self, loc: Location) -> Option<usize> {
        fs::read_dir(self.base(loc).join("layers")).ok().map(|d| d.count())
    }

    /// Why root cannot take new layers, if it cannot (probed with a
    /// temporary file).
    pub fn root_problem(&self) -> Option<String> {
        let probe = self.root.join("tmp");
        // Never create root itself: a missing root is a reason to fall back.
        let r = fs::create_dir(&probe).or_else(|e| if probe.is_dir() { Ok(()) } else { Err(e) }).and_then(|_| {
            // Some data, not just a name: a full filesystem still takes
            // empty files.
            let p = probe.join(format!(".probe-{}", random_token()));
            let w = File::create(&p).and_then(|mut f| f.write_all(&[0u8; 65536]).and_then(|_| f.sync_all()));
            let _ = fs::remove_file(&p);
            w
        });
        if let Err(e) = r {
            return Some(e.to_string());
        }
        match rustix::fs::statvfs(&self.root) {
            Ok(s) if s.f_bavail.saturating_mul(s.f_frsize) < MIN_FREE_BYTES => {
                Some(format!("{} free, less than a layer needs", crate::ids::Bytes(s.f_bavail * s.f_frsize)))
            }
            _ => None,
        }
    }
}
