//! Store administration with the daemon up or down: garbage collection,
//! verification and promotion of fallback layers into root. See
//! docs/multi-host.md for the rules.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use crate::error::{Context, Error, Result};
use crate::ids::{random_token, ChainId};
use crate::imagefile::{ImageFile, Opened};
use crate::options::FsType;
use crate::store::{
    fsync_dir, no_links, now_unix, LayerInfo, Location, Store, DIGEST_ALWAYS_FORMAT, IMAGE_FILE, META_FILE,
};

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

fn age_secs(p: &Path, now: u64) -> u64 {
    fs::symlink_metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| now.saturating_sub(d.as_secs()))
        .unwrap_or(u64::MAX)
}

/// Hosts whose references still count in `loc`: a fresh heartbeat, or a
/// reference file written within the timeout (a host that just started).
fn live_ref(
    store: &Store,
    loc: Location,
    chain: &ChainId,
    host: &str,
    live_hosts: &HashSet<String>,
    p: &GcPolicy,
    now: u64,
) -> bool {
    if live_hosts.contains(host) {
        return true;
    }
    let f = store.base(loc).join("refs").join(chain.dir_name()).join(host);
    age_secs(&f, now) <= p.host_timeout_secs
}

/// Collects garbage in root and fallback.
pub fn gc(store: &Store, p: &GcPolicy) -> Result<GcReport> {
    let now = now_unix();
    let mut rep = GcReport { dry_run: p.dry_run, ..Default::default() };
    for loc in [Location::Root, Location::Fallback] {
        let base = store.base(loc);
        if !base.is_dir() {
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
                refs.into_iter().partition(|h| live_ref(store, loc, &chain, h, &live, p, now));
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
            let refs_dir = base.join("refs").join(chain.dir_name());
            for h in dead {
                if !p.dry_run && no_links(base, &refs_dir).is_ok() {
                    let _ = fs::remove_file(refs_dir.join(&h));
                }
                rep.dropped_refs.push(DroppedRef { chain_id: chain.clone(), host_id: h });
            }
        }
        // Builds and removals left by hosts that died (or by ourselves).
        let tmp = base.join("tmp");
        if let Ok(rd) = no_links(base, &tmp).and_then(|_| fs::read_dir(&tmp)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let owner_live = live.iter().any(|h| name.starts_with(&format!("{h}-")));
                if !owner_live && age_secs(&e.path(), now) > p.grace_secs.min(p.host_timeout_secs) {
                    if !p.dry_run {
                        let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
                    }
                    rep.swept_tmp.push(e.path());
                }
            }
        }
        // Build claims: a live one is rewritten every quarter of the claim
        // timeout; a published or abandoned one is only needed for a
        // minute or so (crate::claim). Old ones go.
        let claims = base.join(crate::claim::CLAIMS_DIR);
        if let Ok(rd) = no_links(base, &claims).and_then(|_| fs::read_dir(&claims)) {
            for e in rd.flatten() {
                if age_secs(&e.path(), now) > p.grace_secs.min(p.host_timeout_secs) {
                    if !p.dry_run {
                        let _ = fs::remove_file(e.path());
                    }
                    rep.swept_tmp.push(e.path());
                }
            }
        }
        // Records of dead hosts that pin nothing any more.
        if !p.dry_run && no_links(base, &base.join("refs")).is_ok() && no_links(base, &base.join("hosts")).is_ok() {
            let refs_dir = base.join("refs");
            let still: HashSet<String> = fs::read_dir(&refs_dir)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
                .flat_map(|d| fs::read_dir(d.path()).into_iter().flatten().flatten())
                .map(|r| r.file_name().to_string_lossy().into_owned())
                .collect();
            for h in hosts.iter().filter(|h| !live.contains(&h.host_id) && !still.contains(&h.host_id)) {
                let _ = fs::remove_file(base.join("hosts").join(&h.host_id));
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
        _ if !info.dir.join(META_FILE).exists() => Ok(Verdict::Removed),
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
    let f = match ImageFile::open(&img)? {
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
    Ok(if expected.is_some() { Verdict::Ok } else { Verdict::NoDigest })
}

/// Entries of `layers/` in `loc` named like a layer (`sha256-<hex>`) that
/// cannot be used as one, with the reason; [`Store::layers`] skips them.
/// Nothing is followed or opened but regular files.
pub fn unusable_layer_dirs(store: &Store, loc: Location) -> Vec<(ChainId, PathBuf, String)> {
    let base = store.base(loc);
    let dir = base.join("layers");
    let mut out = Vec::new();
    match fs::symlink_metadata(&dir) {
        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => {
            tracing::warn!(path = %dir.display(), "the layers directory is not a directory; not followed");
            return out;
        }
        Ok(_) => {}
        Err(_) => return out,
    }
    let Ok(rd) = fs::read_dir(&dir) else { return out };
    for e in rd.flatten() {
        let Some(chain) = ChainId::from_dir_name(&e.file_name().to_string_lossy()) else { continue };
        let p = e.path();
        let Ok(md) = fs::symlink_metadata(&p) else { continue }; // removed meanwhile
        let reason = if md.file_type().is_symlink() {
            Some("a symbolic link, not followed".to_owned())
        } else if !md.is_dir() {
            Some("not a directory".to_owned())
        } else {
            match Store::read_meta(base, &p) {
                Ok(m) if m.chain_id == chain => None,
                Ok(m) => Some(format!("meta.json names another layer, {}", m.chain_id)),
                Err(_) if !p.exists() => None, // removed meanwhile
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    Some("meta.json is a symbolic link, not followed".to_owned())
                }
                Err(e) => Some(format!("meta.json cannot be used: {e}")),
            }
        };
        if let Some(r) = reason {
            out.push((chain, p, r));
        }
    }
    out.sort();
    out
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

/// The meta.json of a layer promoted into root: the fallback's, with the
/// identity of the copy `img` (a new file, with its own times) in place of
/// the fallback file's. A layer without an image keeps its text as it is.
fn promoted_meta(layer: &LayerInfo, img: &Path) -> Result<Vec<u8>> {
    let meta_path = layer.dir.join(META_FILE);
    let text = fs::read(&meta_path).ctx("read", &meta_path)?;
    if layer.meta.fs.is_none() {
        return Ok(text);
    }
    let mut meta: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| Error::Corrupt { path: meta_path.clone(), reason: format!("not a JSON object: {e}") })?;
    let copy = ImageFile::open_for_mount(img)?;
    let stamp = crate::imagefile::ImageStamp::of(copy.at_open());
    meta.insert("image_file".into(), serde_json::to_value(stamp).expect("serialises"));
    Ok(serde_json::to_vec_pretty(&meta).expect("serialises"))
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
    let root_layers = store.root.join("layers");
    fs::create_dir_all(&root_layers).ctx("mkdir", &root_layers)?;
    for layer in store.layers(Location::Fallback) {
        let chain = layer.meta.chain_id.clone();
        let dest = root_layers.join(chain.dir_name());
        if dest.join(META_FILE).exists() {
            rep.deduplicated.push(chain.clone());
        } else {
            let tmp = store.root.join("tmp").join(format!("{}-{}", store.host_id, random_token()));
            fs::create_dir_all(&tmp).ctx("mkdir", &tmp)?;
            let r = (|| -> Result<()> {
                if let Some(img) = layer.image() {
                    crate::image::sparse_copy(&img, &tmp.join(IMAGE_FILE), crate::image::SHARED_IMAGE_MODE)?;
                    fs::File::open(tmp.join(IMAGE_FILE))
                        .ctx("open", tmp.join(IMAGE_FILE))?
                        .sync_all()
                        .ctx("fsync", &tmp)?;
                    rep.bytes_copied += layer.meta.image_bytes;
                    progress(layer.meta.image_bytes);
                }
                let text = promoted_meta(&layer, &tmp.join(IMAGE_FILE))?;
                crate::store::write_atomic_shared(&tmp.join(META_FILE), &text)?;
                fsync_dir(&tmp)?;
                if fs::rename(&tmp, &dest).is_err() && !dest.join(META_FILE).exists() {
                    return Err(Error::sys("rename", &dest, std::io::Error::last_os_error()));
                }
                fsync_dir(&root_layers)
            })();
            let _ = fs::remove_dir_all(&tmp);
            r?;
            rep.moved.push(chain.clone());
        }
        // References follow the layer.
        for h in store.refs(&layer) {
            let to = store.root.join("refs").join(chain.dir_name());
            fs::create_dir_all(&to).ctx("mkdir", &to)?;
            fs::File::create(to.join(&h)).ctx("create", to.join(&h))?;
        }
        let fb = &store.fallback;
        let grave = fb.join("tmp").join(format!("{}-rm-{}", store.host_id, random_token()));
        let _ = fs::create_dir_all(fb.join("tmp"));
        fs::rename(&layer.dir, &grave).ctx("rename", &layer.dir)?;
        let _ = fs::remove_dir_all(&grave);
        let _ = fs::remove_dir_all(fb.join("refs").join(chain.dir_name()));
        tracing::info!(layer = %chain, "promoted into root");
    }
    Ok(rep)
}
