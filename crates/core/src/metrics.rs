//! Prometheus metrics: one process-wide registry, always on.
//!
//! Counters and histograms are atomics in a global [`OnceLock`]; code
//! anywhere records with the small functions below (`observe_publish`,
//! `request`, ...) without plumbing. What describes the state of the store
//! and of this host (layers per location, mounts, writable layers, where
//! new layers go, heartbeat age) is read at scrape time, from the sources
//! the server registers ([`register_mounts`], [`register_frontend`]).
//! [`encode`] renders everything in Prometheus' text exposition format
//! (0.0.4) through the `prometheus-client` crate.
//!
//! Names carry the prefix `sharedloop_` and their unit (`_seconds`,
//! `_bytes`); counters end in `_total`. docs/operations.md lists them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::layermounts::LayerMounts;
use crate::store::{Location, Store};

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    frontend: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LocationLabels {
    location: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Durations from 5 ms to about 3 minutes.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_errors: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RequestLabels>,
    publish: Histogram,
    first_mount: Histogram,
    verify: Histogram,
    apply: Histogram,
    written: Family<LocationLabels, Counter>,
    check_read: Family<LocationLabels, Counter>,
    prefetch_read: Counter,
    prefetch_recorded: Counter,
    builds: Family<BuildLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    how: &'static str,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let mut r = Registry::with_prefix("sharedloop");
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            request_errors: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            publish: duration_histogram(),
            first_mount: duration_histogram(),
            verify: duration_histogram(),
            apply: duration_histogram(),
            written: Family::default(),
            check_read: Family::default(),
            prefetch_read: Counter::default(),
            prefetch_recorded: Counter::default(),
            builds: Family::default(),
        };
        r.register("requests", "Requests served, per front end and method", m.requests.clone());
        r.register(
            "request_errors",
            "Requests answered with an error, per front end and method (containerd's NotFound and AlreadyExists included)",
            m.request_errors.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time to answer a request, per front end and method",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register_with_unit(
            "publish_duration",
            "Time to build a layer's image and publish it into the store (layers this process built)",
            Unit::Seconds,
            m.publish.clone(),
        );
        r.register_with_unit(
            "first_mount_duration",
            "Time to open, check, attach and mount a layer image not yet mounted on this host",
            Unit::Seconds,
            m.first_mount.clone(),
        );
        r.register_with_unit(
            "verify_duration",
            "Time to check a layer image before its first mount (digest, and fsck with verify=full), checks that read it",
            Unit::Seconds,
            m.verify.clone(),
        );
        r.register_with_unit(
            "apply_duration",
            "Time to unpack a layer's tar into its staging tree, or to plan it and build its image from it in one pass (ApplyDiff)",
            Unit::Seconds,
            m.apply.clone(),
        );
        r.register_with_unit(
            "store_written",
            "Image bytes this process published into the store, per location",
            Unit::Bytes,
            m.written.clone(),
        );
        r.register_with_unit(
            "check_read",
            "Image bytes read from the store to check layer images before mounting them, per location",
            Unit::Bytes,
            m.check_read.clone(),
        );
        r.register_with_unit(
            "prefetch_read",
            "Image bytes read ahead of the containers from layers' prefetch records",
            Unit::Bytes,
            m.prefetch_read.clone(),
        );
        r.register(
            "prefetch_recorded",
            "Prefetch records this process published (what it read of a layer at start)",
            m.prefetch_recorded.clone(),
        );
        r.register(
            "layer_builds",
            "Layer images this process built from a tar: how=one_pass (mke2fs read the tar) or staged (extracted to a directory first)",
            m.builds.clone(),
        );
        r.register_collector(Box::new(StateCollector));
        Metrics { registry: r, ..m }
    })
}

/// Records a request a front end answered.
pub fn request(frontend: &'static str, method: &'static str, ok: bool, started: Instant) {
    let m = metrics();
    let l = RequestLabels { frontend, method };
    m.requests.get_or_create(&l).inc();
    if !ok {
        m.request_errors.get_or_create(&l).inc();
    }
    m.request_duration.get_or_create(&l).observe(started.elapsed().as_secs_f64());
}

/// A layer this process built was published in `loc`: `image_bytes` written.
pub fn observe_publish(started: Instant, loc: Location, image_bytes: u64) {
    let m = metrics();
    m.publish.observe(started.elapsed().as_secs_f64());
    m.written.get_or_create(&LocationLabels { location: loc.name() }).inc_by(image_bytes);
}

/// A layer was mounted for the first time on this host.
pub fn observe_first_mount(started: Instant) {
    metrics().first_mount.observe(started.elapsed().as_secs_f64());
}

/// A layer image was checked before its first mount, `bytes` read of it.
pub fn observe_verify(started: Instant, loc: Location, bytes: u64) {
    let m = metrics();
    m.verify.observe(started.elapsed().as_secs_f64());
    m.check_read.get_or_create(&LocationLabels { location: loc.name() }).inc_by(bytes);
}

/// A prefetch replay read `bytes` of a layer image.
pub fn observe_prefetch_read(bytes: u64) {
    metrics().prefetch_read.inc_by(bytes);
}

/// This process published a prefetch record.
pub fn observe_prefetch_recorded() {
    metrics().prefetch_recorded.inc();
}

/// This process built a layer image from a tar, `how` (`one_pass` or
/// `staged`).
pub fn observe_build(how: &'static str) {
    metrics().builds.get_or_create(&BuildLabels { how }).inc();
}

/// The count of [`observe_build`]s of `how` so far.
pub fn builds(how: &'static str) -> u64 {
    metrics().builds.get_or_create(&BuildLabels { how }).get()
}

/// A layer's tar was unpacked.
pub fn observe_apply(started: Instant) {
    metrics().apply.observe(started.elapsed().as_secs_f64());
}

/// What a front end shows at scrape time.
pub struct FrontendState {
    /// Its store, `None` while it has no driver (the Docker plugin before
    /// GraphDriver.Init).
    pub store: Option<Store>,
    /// Its writable layers, and how many of them are mounted (each on a
    /// loop device).
    pub writable: usize,
    pub writable_mounted: usize,
}

type FrontendFn = Box<dyn Fn() -> FrontendState + Send + Sync>;

struct Sources {
    mounts: Option<Weak<LayerMounts>>,
    frontends: Vec<(&'static str, FrontendFn)>,
}

fn sources() -> &'static Mutex<Sources> {
    static S: OnceLock<Mutex<Sources>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(Sources { mounts: None, frontends: Vec::new() }))
}

/// The layer mounts of this process, counted at scrape time.
pub fn register_mounts(m: &Arc<LayerMounts>) {
    sources().lock().unwrap_or_else(|p| p.into_inner()).mounts = Some(Arc::downgrade(m));
}

/// A front end (`docker`, `containerd`), asked for its state at scrape
/// time.
pub fn register_frontend(name: &'static str, state: impl Fn() -> FrontendState + Send + Sync + 'static) {
    sources().lock().unwrap_or_else(|p| p.into_inner()).frontends.push((name, Box::new(state)));
}

/// When this host last wrote its heartbeat into a store directory.
fn heartbeats() -> &'static Mutex<HashMap<PathBuf, Instant>> {
    static H: OnceLock<Mutex<HashMap<PathBuf, Instant>>> = OnceLock::new();
    H.get_or_init(Default::default)
}

/// This host's heartbeat was written into the store directory `base`.
pub fn heartbeat_written(base: &Path) {
    heartbeats().lock().unwrap_or_else(|p| p.into_inner()).insert(base.to_owned(), Instant::now());
}

/// Renders every metric in Prometheus' text format.
pub fn encode() -> String {
    let mut s = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut s, &metrics().registry).expect("writing to a String");
    s
}

/// The metrics read at scrape time.
#[derive(Debug)]
struct StateCollector;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabels {
    store: String,
    location: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabels {
    frontend: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

fn gauges<L: EncodeLabelSet, V: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    samples: Vec<(L, V)>,
) -> Result<(), std::fmt::Error> {
    if samples.is_empty() {
        return Ok(());
    }
    let mut m = enc.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (l, v) in samples {
        ConstGauge::new(v).encode(m.encode_family(&l)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (mounts, states) = {
            let s = sources().lock().unwrap_or_else(|p| p.into_inner());
            (s.mounts.as_ref().and_then(Weak::upgrade), s.frontends.iter().map(|(n, f)| (*n, f())).collect::<Vec<_>>())
        };
        // The stores of the front ends, each once (both may use one store).
        let mut stores: Vec<Store> = Vec::new();
        for st in states.iter().filter_map(|(_, s)| s.store.as_ref()) {
            if !stores.iter().any(|s| s.root == st.root && s.fallback == st.fallback) {
                stores.push(st.clone());
            }
        }
        let mut layers = Vec::new();
        let mut new_loc = Vec::new();
        let mut hb = Vec::new();
        let beats = heartbeats().lock().unwrap_or_else(|p| p.into_inner()).clone();
        for s in &stores {
            let store = s.root.display().to_string();
            for loc in [Location::Root, Location::Fallback] {
                let labels = StoreLabels { store: store.clone(), location: loc.name() };
                if let Some(n) = s.count_layers(loc) {
                    layers.push((labels.clone(), n as i64));
                }
                if let Some(t) = beats.get(s.base(loc)) {
                    hb.push((labels, t.elapsed().as_secs_f64()));
                }
            }
            let to_root = root_takes_layers(s);
            for (loc, v) in [(Location::Root, to_root), (Location::Fallback, !to_root)] {
                new_loc.push((StoreLabels { store: store.clone(), location: loc.name() }, v as i64));
            }
        }
        gauges(
            &mut enc,
            "layers",
            "Published layers in the store, per store (its root directory) and location",
            None,
            layers,
        )?;
        gauges(
            &mut enc,
            "new_layers_location",
            "Where new layers go now: 1 for the location (root, or fallback when root cannot take them), 0 for the other",
            None,
            new_loc,
        )?;
        gauges(
            &mut enc,
            "heartbeat_age",
            "Seconds since this host last wrote its heartbeat into the store directory",
            Some(&Unit::Seconds),
            hb,
        )?;
        let (layer_mounts, layer_loops) = mounts.map(|m| (m.count(), m.loop_devices())).unwrap_or((0, 0));
        let m = enc.encode_descriptor(
            "layer_mounts",
            "Read-only layer mounts this host holds (one per published layer in use)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(layer_mounts as i64).encode(m)?;
        let writable_loops: usize = states.iter().map(|(_, s)| s.writable_mounted).sum();
        gauges(
            &mut enc,
            "loop_devices",
            "Loop devices this process holds: for layer mounts, and for mounted writable layers",
            None,
            vec![
                (KindLabels { kind: "layer" }, layer_loops as i64),
                (KindLabels { kind: "writable" }, writable_loops as i64),
            ],
        )?;
        gauges(
            &mut enc,
            "writable_layers",
            "Writable layers (containers' layers, active snapshots), per front end",
            None,
            states.iter().map(|(n, s)| (FrontendLabels { frontend: n }, s.writable as i64)).collect(),
        )?;
        Ok(())
    }
}

/// How long the answer of the root probe (a 64 KiB write in `tmp/`) is
/// reused between scrapes: a fleet scraped every 15 s would otherwise
/// write to the file server on every scrape of every host.
const ROOT_PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether new layers of store `s` go to its root, probed at most once per
/// [`ROOT_PROBE_EVERY`].
fn root_takes_layers(s: &crate::store::Store) -> bool {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;
    static LAST: Mutex<Option<HashMap<std::path::PathBuf, (Instant, bool)>>> = Mutex::new(None);
    if let Some((at, v)) = LAST.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(HashMap::new).get(&s.root)
    {
        if at.elapsed() < ROOT_PROBE_EVERY {
            return *v;
        }
    }
    let v = s.root_problem().is_none();
    LAST.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(s.root.clone(), (Instant::now(), v));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_encodes_in_prometheus_text_format() {
        let t = Instant::now();
        request("docker", "GraphDriver.Remove", false, t);
        request("docker", "GraphDriver.Remove", true, t);
        observe_publish(t, Location::Root, 4096);
        observe_apply(t);
        let dir = tempfile::tempdir().unwrap();
        let cfg =
            crate::Config { root: dir.path().join("root"), fallback: dir.path().join("fb"), ..Default::default() };
        std::fs::create_dir_all(cfg.root.join("layers")).unwrap();
        let store = Store::new(&cfg, "h1");
        store.heartbeat(5);
        register_frontend("test", move || FrontendState {
            store: Some(store.clone()),
            writable: 2,
            writable_mounted: 1,
        });
        let text = encode();
        for want in [
            "# TYPE sharedloop_requests_total counter",
            "sharedloop_requests_total{frontend=\"docker\",method=\"GraphDriver.Remove\"} 2",
            "sharedloop_request_errors_total{frontend=\"docker\",method=\"GraphDriver.Remove\"} 1",
            "# TYPE sharedloop_publish_duration_seconds histogram",
            "sharedloop_publish_duration_seconds_count 1",
            "sharedloop_apply_duration_seconds_count 1",
            "sharedloop_store_written_bytes_total{location=\"root\"} 4096",
            "sharedloop_writable_layers{frontend=\"test\"} 2",
            "sharedloop_loop_devices{kind=\"writable\"} 1",
            "sharedloop_layer_mounts 0",
            &format!("sharedloop_layers{{store=\"{}\",location=\"root\"}} 0", cfg.root.display()),
            &format!("sharedloop_new_layers_location{{store=\"{}\",location=\"root\"}} 1", cfg.root.display()),
            &format!("sharedloop_new_layers_location{{store=\"{}\",location=\"fallback\"}} 0", cfg.root.display()),
            &format!("sharedloop_heartbeat_age_seconds{{store=\"{}\",location=\"root\"}} ", cfg.root.display()),
        ] {
            assert!(text.contains(want), "{want:?} missing from:\n{text}");
        }
        // Every sample line is `name{labels} value`, the value a number.
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(name.starts_with("sharedloop_"), "{line}");
        }
    }
}
