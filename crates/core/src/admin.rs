//! Store administration with the daemon up or down: garbage collection,
//! verification and promotion of fallback layers into root. See
//! docs/multi-host.md for the rules.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::ids::ChainId;
use crate::imagefile::Opened;
use crate::options::FsType;
use crate::store::{now_unix, LayerInfo, Location, Promotion, Store, DIGEST_ALWAYS_FORMAT};

/// When hosts count as dead and unreferenced layers may go.
#[derive(Debug, Clone, Copy)]
pub struct GcPolicy {
    /// A host whose last heartbeat is older than this is dead: its
    /// references no longer pin layers.
    pub host_timeout_secs: u64,
    /// An unreferenced layer (or temp entry) younger than this is kept: its
    /// publisher may not have recorded its reference yet.
    pub grace_secs: u64,
    pub dry_run: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub removed_layers: Vec<RemovedLayer>,
    pub dropped_refs: Vec<DroppedRef>,
    pub swept_tmp: Vec<PathBuf>,
    pub dead_hosts: Vec<String>,
    pub kept_layers: usize,
    pub dry_run: bool,
}

#[derive(Debug, Serialize)]
pub struct RemovedLayer {
    pub chain_id: ChainId,
    pub location: Location,
    pub image_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct DroppedRef {
    pub chain_id: ChainId,
    pub host_id: String,
}

/// Whether `host`'s reference to `layer` still counts: a fresh heartbeat,
/// or a reference file written within the timeout (a host that just
/// started).
fn live_ref(
    store: &Store,
    layer: &LayerInfo,
    host: &str,
    live_hosts: &HashSet<String>,
    p: &GcPolicy,
    now: u64,
) -> bool {
    live_hosts.contains(host) || store.ref_age_secs(layer, host, now) <= p.host_timeout_secs
}

/// Collects garbage in root and fallback.
pub fn gc(store: &Store, p: &GcPolicy) -> Result<GcReport> {
    let now = now_unix();
    let mut rep = GcReport { dry_run: p.dry_run, ..Default::default() };
    for loc in [Location::Root, Location::Fallback] {
        if store.dir(loc).is_err() {
            continue;
        }
        let hosts = store.hosts(loc);
        let live: HashSet<String> = hosts
            .iter()
            .filter(|h| now.saturating_sub(h.heartbeat_unix) <= p.host_timeout_secs)
            .map(|h| h.host_id.clone())
            .collect();
        for h in &hosts {
            if !live.contains(&h.host_id) && !rep.dead_hosts.contains(&h.host_id) {
                rep.dead_hosts.push(h.host_id.clone());
            }
        }
        for layer in store.layers(loc) {
            let chain = layer.meta.chain_id.clone();
            let refs = store.refs(&layer);
            let (alive, dead): (Vec<String>, Vec<String>) =
                refs.into_iter().partition(|h| live_ref(store, &layer, h, &live, p, now));
            let old = now.saturating_sub(layer.meta.created_unix) > p.grace_secs;
            if alive.is_empty() && old {
                let removed = if p.dry_run { true } else { store.delete_unreferenced(&layer, &dead)? };
                if removed {
                    tracing::info!(layer = %chain, location = loc.name(), dry_run = p.dry_run, "collected");
                    rep.removed_layers.push(RemovedLayer {
                        chain_id: chain,
                        location: loc,
                        image_bytes: layer.meta.image_bytes,
                    });
                    continue;
                }
            }
            rep.kept_layers += 1;
            if !p.dry_run {
                store.drop_refs(&layer, &dead);
            }
            for h in dead {
                rep.dropped_refs.push(DroppedRef { chain_id: chain.clone(), host_id: h });
            }
        }
        let max_age = p.grace_secs.min(p.host_timeout_secs);
        // Builds and removals left by hosts that died (or by ourselves).
        let stale_tmp = |name: &str, age: u64| {
            let owner_live = live.iter().any(|h| name.starts_with(&format!("{h}-")));
            !owner_live && age > max_age
        };
        rep.swept_tmp.extend(store.sweep_tmp(loc, now, p.dry_run, &stale_tmp));
        // Build claims: a live one is rewritten every quarter of the claim
        // timeout; a published or abandoned one is only needed for a
        // minute or so (crate::claim). Old ones go.
        rep.swept_tmp.extend(store.sweep_claims(loc, now, p.dry_run, &|_, age| age > max_age));
        // Records of dead hosts that pin nothing any more.
        if !p.dry_run {
            if let Some(still) = store.hosts_with_refs(loc) {
                for h in hosts.iter().filter(|h| !live.contains(&h.host_id) && !still.contains(&h.host_id)) {
                    store.remove_host(loc, &h.host_id);
                }
            }
        }
    }
    Ok(rep)
}

/// What verification found for one layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    /// An empty layer has no image to check.
    Empty,
    /// The layer was removed (by its last user) while verify ran.
    Removed,
    Missing {
        path: PathBuf,
    },
    /// `layer.img` is not a regular file (a symlink, a device node, a
    /// FIFO, ...); it was neither followed nor opened for reading.
    NotRegular {
        path: PathBuf,
        kind: String,
    },
    /// The image could not be read (an I/O error, a vanished file system).
    Unreadable {
        error: String,
    },
    DigestMismatch {
        expected: String,
        actual: String,
    },
    /// No digest was recorded (a layer of format 1, published before
    /// sharedloop recorded digests); only fsck ran.
    NoDigest,
    /// meta.json claims a format that records the digest of every image
    /// but has none: the record was removed or damaged.
    DigestRemoved {
        format: u32,
    },
    FsckFailed {
        output: String,
    },
    /// The image is fine but the layer's prefetch record is not: hosts
    /// ignore it (and the next to record the layer replaces it).
    BadPrefetchRecord {
        path: PathBuf,
        reason: String,
    },
    /// An entry of `layers/` named like a layer that cannot be one: a
    /// symlink (not followed), not a directory, or without a readable
    /// meta.json naming it. The store skips it; verify reports it.
    NotALayer {
        path: PathBuf,
        reason: String,
    },
}

impl Verdict {
    pub fn is_ok(&self) -> bool {
        matches!(self, Verdict::Ok | Verdict::Empty | Verdict::Removed)
    }
}

/// Checks a layer image against the digest recorded at publish time and
/// with a read-only fsck, both through one open file. `progress` is told how
/// many bytes were hashed. Never follows a link in the store, never opens
/// anything but a regular file, and answers a verdict (not an error) for a
/// layer it cannot check, so a caller goes on to the next layer.
pub fn verify(info: &LayerInfo, progress: &mut dyn FnMut(u64)) -> Result<Verdict> {
    let r = check_image(info, progress);
    // A layer its last user removed while this ran (removal renames the
    // whole directory away first) is not a broken one, whatever step the
    // removal interrupted.
    match r {
        Ok(Verdict::Ok | Verdict::Empty | Verdict::NoDigest) => r,
        _ if !info.present() => Ok(Verdict::Removed),
        Err(e) => Ok(Verdict::Unreadable { error: e.to_string() }),
        _ => r,
    }
}

/// Keeps reading at or below `bytes_per_sec` on average: `sharedloop verify
/// --max-rate`, so that a scrub of the whole store shares the file server
/// with the hosts using it. Told of each chunk read ([`RateLimit::read`]),
/// it sleeps until the bytes read so far are due at that rate.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: u64,
    start: std::time::Instant,
    read: u64,
}

impl RateLimit {
    pub fn new(bytes_per_sec: u64) -> RateLimit {
        RateLimit { bytes_per_sec: bytes_per_sec.max(1), start: std::time::Instant::now(), read: 0 }
    }

    pub fn read(&mut self, n: u64) {
        self.read += n;
        let due = std::time::Duration::from_secs_f64(self.read as f64 / self.bytes_per_sec as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

fn check_image(info: &LayerInfo, progress: &mut dyn FnMut(u64)) -> Result<Verdict> {
    let (Some(img), Some(fs_type)) = (info.image(), info.meta.fs) else { return Ok(Verdict::Empty) };
    let Some(opened) = info.open_image()? else { return Ok(Verdict::Empty) };
    let f = match opened {
        Opened::File(f) => f,
        Opened::Missing => return Ok(Verdict::Missing { path: img }),
        Opened::NotRegular(kind) => return Ok(Verdict::NotRegular { path: img, kind: kind.to_owned() }),
    };
    let expected = match &info.meta.image_sha256 {
        Some(d) => Some(d),
        None if info.meta.format >= DIGEST_ALWAYS_FORMAT => {
            return Ok(Verdict::DigestRemoved { format: info.meta.format })
        }
        None => None,
    };
    if let Some(expected) = expected {
        let actual = f.sha256(progress)?;
        if *expected != actual {
            return Ok(Verdict::DigestMismatch { expected: expected.clone(), actual });
        }
    }
    if let Some(output) = fsck(&f.proc_path(), fs_type)? {
        return Ok(Verdict::FsckFailed { output });
    }
    let size = f.file().metadata().map_err(|e| crate::Error::sys("stat", &img, e))?.len();
    // A record that cannot be read now (an I/O error) is not reported:
    // the image is what verify checks.
    if let Ok(Some(Err(reason))) = crate::prefetch::read_record(&info.base, &info.meta.chain_id, size) {
        return Ok(Verdict::BadPrefetchRecord { path: info.dir.join(crate::store::PREFETCH_FILE), reason });
    }
    Ok(if expected.is_some() { Verdict::Ok } else { Verdict::NoDigest })
}

/// Entries of `layers/` in `loc` named like a layer (`sha256-<hex>`) that
/// cannot be used as one, with the reason; [`Store::layers`] skips them.
/// Nothing is followed or opened but regular files.
pub fn unusable_layer_dirs(store: &Store, loc: Location) -> Vec<(ChainId, PathBuf, String)> {
    store.unusable_layers(loc)
}

/// A read-only fsck of a layer image: `None` when clean, else the first
/// lines of what the checker said.
pub fn fsck(img: &Path, fs_type: FsType) -> Result<Option<String>> {
    let out = match fs_type {
        FsType::Ext4 => Command::new("e2fsck").args(["-f", "-n"]).arg(img).output(),
        FsType::Xfs => Command::new("xfs_repair").args(["-n", "-f"]).arg(img).output(),
    }
    .map_err(|e| Error::Tool { tool: "fsck".into(), status: "not started".into(), stderr: e.to_string() })?;
    if out.status.success() {
        Ok(None)
    } else {
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        Ok(Some(text.lines().take(8).collect::<Vec<_>>().join("\n")))
    }
}

#[derive(Debug, Default, Serialize)]
pub struct PromoteReport {
    /// Copied into root.
    pub moved: Vec<ChainId>,
    /// Root had them already: the fallback copy was dropped.
    pub deduplicated: Vec<ChainId>,
    pub bytes_copied: u64,
}

/// Moves every fallback layer into root: copy into root's tmp, fsync,
/// rename into place (or keep root's copy when it has one), move the
/// references, then drop the fallback copy. Mounted layers keep working
/// (their open image stays until unmounted); their next mount uses root.
pub fn promote(store: &Store, progress: &mut dyn FnMut(u64)) -> Result<PromoteReport> {
    if let Some(why) = store.root_problem() {
        return Err(Error::Invalid(format!("the root directory {} cannot take layers: {why}", store.root.display())));
    }
    let mut rep = PromoteReport::default();
    for layer in store.layers(Location::Fallback) {
        let chain = layer.meta.chain_id.clone();
        match store.promote_layer(&layer, progress)? {
            Promotion::Moved(bytes) => {
                rep.bytes_copied += bytes;
                rep.moved.push(chain.clone());
            }
            Promotion::Deduplicated => rep.deduplicated.push(chain.clone()),
        }
        tracing::info!(layer = %chain, "promoted into root");
    }
    Ok(rep)
}
