//! The admin commands: a thin front end over `sharedloop_core::admin` and
//! the store. Output is a table for people or JSON (`--json`) for scripts.
//! Exit codes: 0 all good, 1 problems found (a layer failed verification,
//! root unusable for promote), 2 bad usage or configuration.

use std::io::IsTerminal;
use std::path::PathBuf;

use serde::Serialize;
use sharedloop_core::admin::{self, GcPolicy, Verdict};
use sharedloop_core::fsmagic;
use sharedloop_core::options::parse_duration;
use sharedloop_core::store::{now_unix, LayerInfo, Location, Store};
use sharedloop_core::Config;

/// Where the store is: what dockerd passed at Init (if recorded), then
/// `--storage-opt`, then `--root`/`--fallback`.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// The root directory (overrides sharedloop.loopback_root).
    #[arg(long, global = true)]
    pub root: Option<PathBuf>,
    /// The fallback directory (overrides sharedloop.loopback_fallback).
    #[arg(long, global = true)]
    pub fallback: Option<PathBuf>,
    /// A storage option, as given to dockerd (repeatable).
    #[arg(long = "storage-opt", short = 'o', global = true)]
    pub storage_opt: Vec<String>,
    /// The plugin's run directory, to read the options dockerd passed.
    #[arg(long, global = true, default_value = "/run/sharedloop")]
    pub run_dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A configuration or usage error: exit status 2.
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Usage {}

impl StoreArgs {
    /// A field of what dockerd passed at Init, as the plugin recorded it.
    fn init_record(&self, field: &str) -> Option<serde_json::Value> {
        std::fs::read(self.run_dir.join("docker-init.json"))
            .ok()
            .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get(field).cloned())
    }

    /// The Docker plugin's home (its local state), when dockerd initialised it.
    pub fn docker_home(&self) -> Option<PathBuf> {
        self.init_record("home").and_then(|h| serde_json::from_value(h).ok())
    }

    /// Whether dockerd's Init options were recorded in the run directory.
    pub fn has_init_record(&self) -> bool {
        self.init_record("opts").is_some()
    }

    /// The configuration: `base` (the defaults, or the snapshotter's
    /// config file) with what dockerd passed at Init, `--storage-opt`,
    /// then `--root`/`--fallback` over it.
    pub fn config_over(&self, base: Config) -> Result<Config, Usage> {
        let mut opts: Vec<String> =
            self.init_record("opts").and_then(|o| serde_json::from_value(o).ok()).unwrap_or_default();
        opts.extend(self.storage_opt.iter().cloned());
        let mut cfg = base;
        for opt in &opts {
            let opt = opt.trim();
            let r = match opt.split_once('=') {
                Some((k, v)) => cfg.set(k, Some(v)),
                None => cfg.set(opt, None),
            };
            r.map_err(|e| Usage(e.to_string()))?;
        }
        if let Some(r) = &self.root {
            cfg.root = r.clone();
        }
        if let Some(f) = &self.fallback {
            cfg.fallback = f.clone();
        }
        cfg.validate().map_err(|e| Usage(e.to_string()))?;
        Ok(cfg)
    }

    pub fn store(&self) -> Result<Store, Usage> {
        let cfg = self.config_over(Config::default())?;
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        let host: String = host.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(32).collect();
        Ok(Store::new(&cfg, &format!("admin-{host}-{}", std::process::id())))
    }
}

fn print_json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialises"));
}

fn bytes(n: u64) -> String {
    sharedloop_core::ids::Bytes(n).to_string()
}

fn ago(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s ago"),
        s if s < 7200 => format!("{}m ago", s / 60),
        s if s < 172_800 => format!("{}h ago", s / 3600),
        s => format!("{}d ago", s / 86400),
    }
}

fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

#[derive(Serialize)]
struct DirStatus {
    location: Location,
    path: PathBuf,
    filesystem: String,
    new_layers: String,
    /// Root only: whether it is a filesystem of its own or local
    /// (sharedloop_core::placement).
    #[serde(skip_serializing_if = "Option::is_none")]
    placement: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<bool>,
    layers: usize,
    image_bytes: u64,
    hosts: Vec<HostStatus>,
}

#[derive(Serialize)]
struct HostStatus {
    host_id: String,
    hostname: String,
    last_heartbeat_secs_ago: u64,
    live: bool,
}

const DEFAULT_HOST_TIMEOUT: &str = "5m";

pub fn status(args: &StoreArgs, host_timeout: &str) -> anyhow::Result<i32> {
    let store = args.store()?;
    let timeout = parse_duration(host_timeout)
        .ok_or_else(|| Usage(format!("--host-timeout {host_timeout:?}: not a duration such as 5m")))?;
    let now = now_unix();
    let mut out = Vec::new();
    for loc in [Location::Root, Location::Fallback] {
        let base = store.base(loc).to_owned();
        let layers = store.layers(loc);
        let new_layers = match loc {
            Location::Root => match store.root_problem() {
                None => "created here".to_owned(),
                Some(why) => format!("go to fallback ({why})"),
            },
            Location::Fallback => "created here when root cannot take them".to_owned(),
        };
        let placement = (loc == Location::Root)
            .then(|| sharedloop_core::placement::check_root(&base, args.docker_home().as_deref()));
        out.push(DirStatus {
            placement: placement.as_ref().map(|p| p.describe()),
            local: placement.as_ref().map(|p| p.is_local()),
            location: loc,
            filesystem: if base.exists() { fsmagic::fs_name_of(&base) } else { "(missing)".into() },
            path: base,
            new_layers,
            layers: layers.len(),
            image_bytes: layers.iter().map(|l| l.meta.image_bytes).sum(),
            hosts: store
                .hosts(loc)
                .into_iter()
                .map(|h| HostStatus {
                    live: now.saturating_sub(h.heartbeat_unix) <= timeout,
                    last_heartbeat_secs_ago: now.saturating_sub(h.heartbeat_unix),
                    host_id: h.host_id,
                    hostname: h.hostname,
                })
                .collect(),
        });
    }
    if args.json {
        print_json(&out);
        return Ok(0);
    }
    for d in &out {
        println!("{} directory: {}", if d.location == Location::Root { "Root" } else { "Fallback" }, d.path.display());
        println!("  filesystem:  {}", d.filesystem);
        println!("  new layers:  {}", d.new_layers);
        if let Some(p) = &d.placement {
            println!("  placement:   {p}");
        }
        println!("  layers:      {} ({})", d.layers, bytes(d.image_bytes));
        for h in &d.hosts {
            println!(
                "  host {:<40} {:<16} heartbeat {:<10} {}",
                h.host_id,
                h.hostname,
                ago(h.last_heartbeat_secs_ago),
                if h.live { "live" } else { "dead" }
            );
        }
    }
    Ok(0)
}

#[derive(Serialize)]
struct LayerRow {
    chain_id: String,
    location: Location,
    path: PathBuf,
    filesystem: Option<String>,
    image_bytes: u64,
    content_bytes: u64,
    publisher: String,
    created_unix: u64,
    refs: Vec<String>,
}

fn all_layers(store: &Store) -> Vec<LayerInfo> {
    let mut v = store.layers(Location::Root);
    v.extend(store.layers(Location::Fallback));
    v
}

pub fn layers(args: &StoreArgs) -> anyhow::Result<i32> {
    let store = args.store()?;
    let rows: Vec<LayerRow> = all_layers(&store)
        .into_iter()
        .map(|l| LayerRow {
            refs: store.refs(&l),
            chain_id: l.meta.chain_id.to_string(),
            location: l.location,
            path: l.dir.clone(),
            filesystem: l.meta.fs.map(|f| f.name().to_owned()),
            image_bytes: l.meta.image_bytes,
            content_bytes: l.meta.content_bytes,
            publisher: l.meta.publisher.clone(),
            created_unix: l.meta.created_unix,
        })
        .collect();
    if args.json {
        print_json(&rows);
        return Ok(0);
    }
    println!("{:<19} {:<9} {:<5} {:>10} {:>10}  HOSTS", "LAYER", "WHERE", "FS", "IMAGE", "CONTENT");
    for r in rows {
        println!(
            "{:<19} {:<9} {:<5} {:>10} {:>10}  {}",
            &r.chain_id[..19],
            r.location.name(),
            r.filesystem.as_deref().unwrap_or("-"),
            bytes(r.image_bytes),
            bytes(r.content_bytes),
            if r.refs.is_empty() { "(none)".to_owned() } else { r.refs.join(",") }
        );
    }
    Ok(0)
}

pub fn gc(args: &StoreArgs, dry_run: bool, host_timeout: &str, grace: &str) -> anyhow::Result<i32> {
    let store = args.store()?;
    let policy = GcPolicy {
        host_timeout_secs: parse_duration(host_timeout)
            .ok_or_else(|| Usage(format!("--host-timeout {host_timeout:?}: not a duration such as 5m")))?,
        grace_secs: parse_duration(grace)
            .ok_or_else(|| Usage(format!("--grace {grace:?}: not a duration such as 1h")))?,
        dry_run,
    };
    let rep = admin::gc(&store, &policy)?;
    if args.json {
        print_json(&rep);
        return Ok(0);
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    for l in &rep.removed_layers {
        println!("{verb} layer {} from {} ({})", l.chain_id, l.location.name(), bytes(l.image_bytes));
    }
    for r in &rep.dropped_refs {
        println!(
            "{} reference of dead host {} to {}",
            if dry_run { "would drop" } else { "dropped" },
            r.host_id,
            r.chain_id
        );
    }
    for t in &rep.swept_tmp {
        println!("{} leftover {}", if dry_run { "would sweep" } else { "swept" }, t.display());
    }
    let freed: u64 = rep.removed_layers.iter().map(|l| l.image_bytes).sum();
    println!(
        "{} layers {verb} ({}), {} kept, dead hosts: {}",
        rep.removed_layers.len(),
        bytes(freed),
        rep.kept_layers,
        if rep.dead_hosts.is_empty() { "none".to_owned() } else { rep.dead_hosts.join(", ") }
    );
    Ok(0)
}

#[derive(Serialize)]
struct VerifyRow {
    chain_id: String,
    location: Location,
    image: Option<PathBuf>,
    #[serde(flatten)]
    verdict: Verdict,
}

/// `--max-rate`: a positive size per second.
fn parse_rate(v: &str) -> anyhow::Result<u64> {
    match sharedloop_core::ids::Bytes::parse_size(v) {
        Ok(b) if b.0 > 0 => Ok(b.0),
        Ok(_) => Err(Usage(format!("--max-rate {v:?}: must be more than 0 bytes per second")).into()),
        Err(e) => Err(Usage(format!("--max-rate: {e}")).into()),
    }
}

pub fn verify(args: &StoreArgs, max_rate: Option<&str>, which: &[String]) -> anyhow::Result<i32> {
    let mut limit = max_rate.map(parse_rate).transpose()?.map(admin::RateLimit::new);
    let store = args.store()?;
    let mut layers = all_layers(&store);
    if !which.is_empty() {
        let mut chosen = Vec::new();
        for w in which {
            let hex = w.trim_start_matches("sha256:").trim_start_matches("sha256-");
            let m: Vec<&LayerInfo> = layers.iter().filter(|l| l.meta.chain_id.as_str()[7..].starts_with(hex)).collect();
            match m.len() {
                0 => {
                    return Err(Usage(format!(
                        "no layer {w} in {} or {}",
                        store.root.display(),
                        store.fallback.display()
                    ))
                    .into())
                }
                1 => chosen.push(m[0].clone()),
                _ => return Err(Usage(format!("{w} names {} layers; give more of the id", m.len())).into()),
            }
        }
        layers = chosen;
    }
    let total = layers.iter().map(|l| l.meta.image_bytes).sum();
    let pb = progress(total, "verifying");
    let mut rows = Vec::new();
    for l in &layers {
        let verdict = admin::verify(l, &mut |n| {
            pb.inc(n);
            if let Some(limit) = &mut limit {
                limit.read(n);
            }
        })?;
        rows.push(VerifyRow { chain_id: l.meta.chain_id.to_string(), location: l.location, image: l.image(), verdict });
    }
    if which.is_empty() {
        // Entries the store skips (a symlinked layer directory, a meta.json
        // that is a link or a FIFO, ...) are problems too.
        for loc in [Location::Root, Location::Fallback] {
            for (chain, path, reason) in admin::unusable_layer_dirs(&store, loc) {
                let verdict = Verdict::NotALayer { path, reason };
                rows.push(VerifyRow { chain_id: chain.to_string(), location: loc, image: None, verdict });
            }
        }
    }
    pb.finish_and_clear();
    let bad = rows.iter().filter(|r| !r.verdict.is_ok()).count();
    if args.json {
        print_json(&rows);
    } else {
        for r in &rows {
            let what = match &r.verdict {
                Verdict::Ok => "ok".to_owned(),
                Verdict::Empty => "ok (empty layer)".to_owned(),
                Verdict::Removed => "removed while being checked".to_owned(),
                Verdict::Missing { path } => format!("MISSING image {}", path.display()),
                Verdict::NotRegular { path, kind } => {
                    format!("BAD: {} is {kind}, not a regular file; not followed, not checked", path.display())
                }
                Verdict::Unreadable { error } => format!("UNREADABLE: {error}"),
                Verdict::DigestRemoved { format } => format!(
                    "CORRUPT: meta.json (format {format}) lacks the image digest that format always records; \
                     it was removed or damaged"
                ),
                Verdict::DigestMismatch { expected, actual } => {
                    format!("CORRUPT: image digest {actual} differs from the {expected} recorded at publish")
                }
                Verdict::NoDigest => {
                    "UNVERIFIABLE: no digest was recorded at publish (format 1); fsck found no errors".to_owned()
                }
                Verdict::FsckFailed { output } => format!("CORRUPT: fsck found errors: {output}"),
                Verdict::BadPrefetchRecord { path, reason } => format!(
                    "BAD: the image is fine, but its prefetch record {} is not ({reason}); hosts ignore it, \
                     and the next host to record the layer replaces it",
                    path.display()
                ),
                Verdict::NotALayer { path, reason } => {
                    format!("BAD: {}: {reason}; not used as a layer", path.display())
                }
            };
            println!("{} ({}): {what}", r.chain_id, r.location.name());
        }
        println!("{} layers checked, {bad} with problems", rows.len());
    }
    Ok(if bad > 0 { 1 } else { 0 })
}

pub fn promote(args: &StoreArgs) -> anyhow::Result<i32> {
    let store = args.store()?;
    let total = store.layers(Location::Fallback).iter().map(|l| l.meta.image_bytes).sum();
    let pb = progress(total, "promoting");
    let rep = match admin::promote(&store, &mut |n| pb.inc(n)) {
        Ok(r) => r,
        Err(e) => {
            pb.finish_and_clear();
            eprintln!("sharedloop promote: {e}");
            return Ok(1);
        }
    };
    pb.finish_and_clear();
    if args.json {
        print_json(&rep);
    } else {
        for c in &rep.moved {
            println!("moved {c} into root");
        }
        for c in &rep.deduplicated {
            println!("root already had {c}; dropped the fallback copy");
        }
        println!(
            "{} layers moved ({}), {} deduplicated",
            rep.moved.len(),
            bytes(rep.bytes_copied),
            rep.deduplicated.len()
        );
    }
    Ok(0)
}

pub const HOST_TIMEOUT: &str = DEFAULT_HOST_TIMEOUT;
