//! The Docker graphdriver plugin front end: the legacy plugin protocol
//! (HTTP/1.1 + JSON over a unix socket), with the shapes moby's
//! `daemon/graphdriver/proxy.go` sends and decodes. A thin adapter: each
//! endpoint decodes, calls the core [`Driver`] on a blocking thread, and
//! [`respond`] turns the outcome into a reply; core errors become wire
//! errors there and nowhere else.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sharedloop_core::driver::{DriverReport, LayerReport, LayerReportKind};
use sharedloop_core::layermounts::LayerMounts;
use sharedloop_core::options::DirectIo;
use sharedloop_core::store::Location;
use sharedloop_core::{Config, CreateKind, Driver};

type Body = BoxBody<Bytes, io::Error>;
const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";

/// `graphDriverRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct DriverRequest {
    #[serde(rename = "ID")]
    id: String,
    parent: String,
    #[allow(dead_code)]
    mount_label: String,
    storage_opt: Option<HashMap<String, String>>,
}

/// `graphDriverInitRequest` (20.10 embeds an IdentityMapping).
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "PascalCase")]
struct InitRequest {
    home: String,
    opts: Option<Vec<String>>,
    #[serde(rename = "UIDMaps")]
    uid_maps: Option<Vec<Value>>,
    #[serde(rename = "GIDMaps")]
    gid_maps: Option<Vec<Value>>,
}

/// What Init was given, kept in the run directory so that a restarted
/// plugin serves the same driver: dockerd does not call Init again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InitRecord {
    pub home: PathBuf,
    pub opts: Vec<String>,
}

/// The initialised driver and how it came to be.
struct Slot {
    driver: Arc<Driver>,
    /// Set by a GraphDriver.Init, or a restore from the init record (the
    /// dockerd that sent it may still run): that engine owns the driver
    /// until Cleanup, and an Init naming another home is refused.
    claimed: bool,
}

/// The largest JSON request body: every request but ApplyDiff's is a
/// few hundred bytes.
const MAX_JSON_BODY: usize = 1 << 20;

/// The plugin: at most one initialised driver.
pub struct Plugin {
    driver: RwLock<Option<Slot>>,
    init_file: PathBuf,
    /// The process's layer mounts, shared with its other front ends.
    mounts: Arc<LayerMounts>,
}

impl Plugin {
    /// A plugin that records Init in `run_dir/docker-init.json` and, when a
    /// record is there from before a restart, reopens that driver.
    pub fn new(run_dir: &Path, mounts: Arc<LayerMounts>) -> Plugin {
        let init_file = run_dir.join("docker-init.json");
        let p = Plugin { driver: RwLock::new(None), init_file, mounts };
        if let Ok(text) = std::fs::read(&p.init_file) {
            match serde_json::from_slice::<InitRecord>(&text) {
                Ok(rec) => match Config::from_opts(&rec.opts)
                    .and_then(|c| Driver::open_shared(&rec.home, c, p.mounts.clone()))
                {
                    Ok(d) => {
                        tracing::info!(home = %rec.home.display(), "restored the driver dockerd initialised before this restart");
                        // Claimed: the dockerd that initialised it may still
                        // be running and does not call Init again.
                        *p.driver.write().unwrap() = Some(Slot { driver: Arc::new(d), claimed: true });
                    }
                    Err(e) => tracing::error!(home = %rec.home.display(), error = %e, "cannot restore the driver"),
                },
                Err(e) => tracing::error!(file = %p.init_file.display(), error = %e, "unreadable init record"),
            }
        }
        p
    }

    /// The driver, once GraphDriver.Init has set it up.
    pub fn current_driver(&self) -> Option<Arc<Driver>> {
        self.driver().ok()
    }

    fn driver(&self) -> Result<Arc<Driver>, String> {
        self.driver
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|s| s.driver.clone())
            .ok_or_else(|| "the sharedloop driver is not initialised (GraphDriver.Init not called)".to_owned())
    }

    /// GraphDriver.Cleanup: the engine shuts down. Every mount goes and the
    /// driver is dropped (its state lock with it); the next engine's Init
    /// opens it again.
    fn cleanup(&self) -> Result<Value, String> {
        let mut slot = self.driver.write().unwrap_or_else(|p| p.into_inner());
        let Some(s) = slot.as_ref() else { return Ok(json!({})) };
        let r = s.driver.cleanup().map_err(wire_error);
        *slot = None;
        r.map(|_| json!({}))
    }

    fn init(&self, req: InitRequest) -> Result<Value, String> {
        let has_maps = |m: &Option<Vec<Value>>| m.as_ref().is_some_and(|v| !v.is_empty());
        if has_maps(&req.uid_maps) || has_maps(&req.gid_maps) {
            return Err("user namespace remapping (--userns-remap) is not supported by sharedloop".into());
        }
        if req.home.is_empty() {
            return Err("Init without a Home directory".into());
        }
        let opts = req.opts.unwrap_or_default();
        let cfg = Config::from_opts(&opts).map_err(wire_error)?;
        let home = PathBuf::from(&req.home);
        let mut slot = self.driver.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref().filter(|s| s.claimed && s.driver.home() != home) {
            return Err(format!(
                "the driver is already initialised with home {} by an earlier GraphDriver.Init; \
                 it serves one engine: that engine's shutdown (GraphDriver.Cleanup) releases it \
                 (or stop sharedloop and remove {})",
                s.driver.home().display(),
                self.init_file.display()
            ));
        }
        // A restarted dockerd initialising the same home: open it afresh.
        // Release the old driver's lock on state before opening the new one.
        *slot = None;
        let d = Driver::open_shared(&home, cfg, self.mounts.clone()).map_err(wire_error)?;
        let rec = InitRecord { home, opts };
        if let Some(dir) = self.init_file.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        sharedloop_core::store::write_atomic(&self.init_file, &serde_json::to_vec(&rec).expect("serialises"))
            .map_err(wire_error)?;
        tracing::info!(home = %rec.home.display(), root = %d.config().root.display(),
            fallback = %d.config().fallback.display(), fs = d.config().fs.name(), "driver initialised");
        *slot = Some(Slot { driver: Arc::new(d), claimed: true });
        Ok(json!({}))
    }
}

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("Content-Type", CONTENT_TYPE)
        .body(Full::new(Bytes::from(serde_json::to_vec(v).expect("json"))).map_err(|e: Infallible| match e {}).boxed())
        .expect("valid response")
}

/// The one place where outcomes become replies: a value is 200 with its
/// JSON, an error is 500 with `{"Err": message}`, which dockerd's plugin
/// client turns into the error it reports.
fn respond(method: &str, r: Result<Value, String>) -> Response<Body> {
    match r {
        Ok(v) => full(StatusCode::OK, &v),
        Err(e) => {
            tracing::warn!(op = method, error = %e, "request failed");
            full(StatusCode::INTERNAL_SERVER_ERROR, &json!({ "Err": e }))
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| format!("internal error: {e}"))?
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// A `Read` over request body chunks sent from the async side.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// A `Write` whose chunks become response body frames.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

const CHUNK: usize = 256 * 1024;

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let b = Bytes::from(std::mem::take(&mut self.buf));
            self.tx.blocking_send(Ok(b)).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "client went away"))?;
        }
        Ok(())
    }
}

fn query_params(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// Decodes a query component as Go's `url.Values.Encode` (dockerd) writes
/// it: `+` is a space, `%XX` with exactly two hex digits is that byte, and
/// any other `%` stands for itself (never `%+f` read as 0x0f).
fn percent_decode(s: &str) -> String {
    fn hex(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => match (b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
                (Some(hi), Some(lo)) => {
                    out.push((hi << 4) | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn apply_diff(plugin: Arc<Plugin>, req: Request<Incoming>) -> Result<Value, String> {
    let q = query_params(req.uri().query());
    let id = q.get("id").cloned().unwrap_or_default();
    let parent = q.get("parent").cloned().unwrap_or_default();
    // The slot's lock is taken on a blocking thread: Init and Cleanup hold
    // it across mounts, which must not stall the runtime's workers.
    let p = plugin.clone();
    let driver = blocking(move || p.driver()).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(64);
    let mut body = req.into_body();
    let pump = tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let item = match frame {
                Ok(f) => match f.into_data() {
                    Ok(d) => Ok(d),
                    Err(_) => continue, // trailers
                },
                Err(e) => Err(io::Error::other(format!("reading the request body: {e}"))),
            };
            let failed = item.is_err();
            // Waits (without blocking the runtime) while the reader is busy.
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    });
    let r = blocking(move || {
        let mut reader = ChannelReader { rx, cur: Bytes::new() };
        driver.apply_diff(&id, opt(&parent).as_deref(), &mut reader).map_err(wire_error)
    })
    .await;
    pump.abort();
    r.map(|size| json!({ "Size": size }))
}

async fn diff(plugin: Arc<Plugin>, req: DriverRequest) -> Response<Body> {
    let p = plugin.clone();
    let driver = match blocking(move || p.driver()).await {
        Ok(d) => d,
        Err(e) => return respond("GraphDriver.Diff", Err(e)),
    };
    let (id, parent) = (req.id.clone(), opt(&req.parent));
    let d2 = driver.clone();
    // A lease: the layer stays mounted (a Remove waits) while the tar streams.
    let src = match blocking(move || d2.diff_source(&id, parent.as_deref()).map_err(wire_error)).await {
        Ok(s) => s,
        Err(e) => return respond("GraphDriver.Diff", Err(e)),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(8);
    let id = req.id.clone();
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter { tx: tx.clone(), buf: Vec::new() };
        let r = sharedloop_core::export::export_tar(src.path(), &mut w)
            .and_then(|_| w.flush().map_err(|e| sharedloop_core::Error::sys("write tar", "<stream>", e)));
        if let Err(e) = r {
            tracing::warn!(op = "GraphDriver.Diff", layer = %id, error = %e, "diff stream failed");
            let _ = tx.blocking_send(Err(io::Error::other(wire_error(e))));
        }
        drop(src);
        drop(driver);
    });
    let stream =
        futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item.map(Frame::data), rx)) },
        );
    Response::builder()
        .status(StatusCode::OK)
        .header("Content-Type", "application/x-tar")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("valid response")
}

async fn read_json<T: for<'de> Deserialize<'de> + Default>(req: Request<Incoming>) -> Result<T, String> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_JSON_BODY);
    let bytes = body
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                format!("request body larger than {MAX_JSON_BODY} bytes; refused")
            } else {
                format!("reading the request: {e}")
            }
        })?
        .to_bytes();
    decode_json(&bytes)
}

/// A request body as dockerd sends it: JSON, or nothing for an empty one.
fn decode_json<T: for<'de> Deserialize<'de> + Default>(bytes: &[u8]) -> Result<T, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| format!("malformed request: {e}"))
}

/// Request decoding without a server, for the fuzz targets (`fuzz/`).
#[doc(hidden)]
pub mod fuzzing {
    /// Decodes a request to `path` with `query` and `body` the way the
    /// server does before calling the core; returns what it understood.
    pub fn decode(path: &str, query: &str, body: &[u8]) -> Result<String, String> {
        match path {
            "GraphDriver.Init" => super::decode_json::<super::InitRequest>(body).map(|r| format!("{r:?}")),
            "GraphDriver.ApplyDiff" => Ok(format!("{:?}", super::query_params(Some(query)))),
            _ => super::decode_json::<super::DriverRequest>(body).map(|r| format!("{r:?}")),
        }
    }
}

/// The methods of the protocol, as metric labels; any other path is
/// counted as `other`.
const METHODS: &[&str] = &[
    "Plugin.Activate",
    "GraphDriver.Init",
    "GraphDriver.Create",
    "GraphDriver.CreateReadWrite",
    "GraphDriver.Remove",
    "GraphDriver.Get",
    "GraphDriver.Put",
    "GraphDriver.Exists",
    "GraphDriver.Status",
    "GraphDriver.GetMetadata",
    "GraphDriver.Cleanup",
    "GraphDriver.Diff",
    "GraphDriver.Changes",
    "GraphDriver.ApplyDiff",
    "GraphDriver.DiffSize",
    "GraphDriver.Capabilities",
];

/// Handles one request, logging its duration at debug level and counting
/// it in the metrics.
pub async fn handle(plugin: Arc<Plugin>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let start = std::time::Instant::now();
    let r = route(plugin, req, &path).await;
    tracing::debug!(op = %path, ms = start.elapsed().as_secs_f64() * 1000.0, "request");
    let method = METHODS.iter().find(|m| **m == path).copied().unwrap_or("other");
    let ok = r.as_ref().is_ok_and(|r| r.status().is_success());
    sharedloop_core::metrics::request("docker", method, ok, start);
    r
}

async fn route(plugin: Arc<Plugin>, req: Request<Incoming>, path: &str) -> Result<Response<Body>, Infallible> {
    let path = path.to_owned();
    if path == "Plugin.Activate" {
        // Drain the (empty or `null`) body so the connection stays usable.
        let _ = http_body_util::Limited::new(req.into_body(), MAX_JSON_BODY).collect().await;
        return Ok(full(StatusCode::OK, &json!({ "Implements": ["GraphDriver"] })));
    }
    if path == "GraphDriver.ApplyDiff" {
        let r = apply_diff(plugin, req).await;
        return Ok(respond(&path, r));
    }
    if path == "GraphDriver.Init" {
        let r = match read_json::<InitRequest>(req).await {
            Ok(init) => {
                let p = plugin.clone();
                blocking(move || p.init(init)).await
            }
            Err(e) => Err(e),
        };
        return Ok(respond(&path, r));
    }
    let r: DriverRequest = match read_json(req).await {
        Ok(r) => r,
        Err(e) => return Ok(respond(&path, Err(e))),
    };
    if path == "GraphDriver.Diff" {
        return Ok(diff(plugin, r).await);
    }
    if path == "GraphDriver.Cleanup" {
        let p = plugin.clone();
        return Ok(respond(&path, blocking(move || p.cleanup()).await));
    }
    let method = path.clone();
    let r = blocking(move || call(&*plugin.driver()?, &method, r)).await;
    Ok(respond(&path, r))
}

/// The one place core errors become the plugin protocol's errors: the
/// graphdriver protocol carries only a message (`{"Err": "..."}`), which
/// dockerd matches on nothing but its text, so every error is its text.
fn wire_error(e: sharedloop_core::Error) -> String {
    e.to_string()
}

/// The JSON endpoints, as core calls.
fn call(d: &Driver, method: &str, r: DriverRequest) -> Result<Value, String> {
    let parent = opt(&r.parent);
    let parent = parent.as_deref();
    match method {
        "GraphDriver.Capabilities" => Ok(json!({ "Capabilities": { "ReproducesExactDiffs": false } })),
        "GraphDriver.Create" | "GraphDriver.CreateReadWrite" => {
            let kind = create_kind(method, &r.id);
            tracing::debug!(op = method, layer = %r.id, parent = %r.parent, storage_opt = ?r.storage_opt, "create");
            let opts = r.storage_opt.unwrap_or_default();
            d.create(&r.id, parent, kind, &opts).map_err(wire_error)?;
            Ok(json!({}))
        }
        "GraphDriver.Remove" => d.remove(&r.id).map(|_| json!({})).map_err(wire_error),
        "GraphDriver.Get" => d.get(&r.id).map(|dir| json!({ "Dir": dir })).map_err(wire_error),
        "GraphDriver.Put" => d.put(&r.id).map(|_| json!({})).map_err(wire_error),
        "GraphDriver.Exists" => Ok(json!({ "Exists": d.exists(&r.id) })),
        "GraphDriver.Status" => {
            let s: Vec<[String; 2]> = status(&d.report()).into_iter().map(|(k, v)| [k, v]).collect();
            Ok(json!({ "Status": s }))
        }
        "GraphDriver.GetMetadata" => {
            d.layer_report(&r.id).map(|l| json!({ "Metadata": metadata(&l) })).map_err(wire_error)
        }
        "GraphDriver.Changes" => {
            let ch = d.changes(&r.id, parent).map_err(wire_error)?;
            let v: Vec<Value> = ch.iter().map(|c| json!({ "Path": c.path, "Kind": c.kind as u8 })).collect();
            Ok(json!({ "Changes": v }))
        }
        "GraphDriver.DiffSize" => d.diff_size(&r.id, parent).map(|s| json!({ "Size": s })).map_err(wire_error),
        other => Err(format!("unknown method {other}")),
    }
}

/// What a create request makes. A writable layer named `<id>-init` is the
/// layer dockerd puts under each container for the files it writes before
/// the start (`/etc/hosts`, `/etc/resolv.conf`, `/.dockerenv`, ...): a
/// directory in the driver's home, not an image of its own, so that a
/// container costs one loop device and one image mount, not two.
fn create_kind(method: &str, id: &str) -> CreateKind {
    match method {
        "GraphDriver.Create" => CreateKind::ReadOnly,
        _ if id.ends_with("-init") => CreateKind::ReadWriteDir,
        _ => CreateKind::ReadWrite,
    }
}

/// The driver's report as `docker info` lists it (GraphDriver.Status).
fn status(r: &DriverReport) -> Vec<(String, String)> {
    let mut v = vec![
        ("Backing Filesystem".to_owned(), r.home_fs.clone()),
        ("Loopback Root Directory".to_owned(), r.root.display().to_string()),
        ("Loopback Fallback Directory".to_owned(), r.fallback.display().to_string()),
        ("Layer Image Filesystem".to_owned(), r.fs.name().to_owned()),
        (
            "Loop Direct I/O".to_owned(),
            match r.direct_io {
                DirectIo::Auto => "auto (on for local files, off on network filesystems)".to_owned(),
                d => d.name().to_owned(),
            },
        ),
    ];
    v.push(("Layer Build".to_owned(), r.layer_build.clone()));
    v.push(("Writable Layers".to_owned(), r.writable_layers.clone()));
    let p = &r.prefetch;
    v.push((
        "Learned Prefetch".to_owned(),
        match p.mode {
            sharedloop_core::prefetch::Mode::Off => "off".to_owned(),
            _ if p.max_bytes == 0 => "off (prefetch_max=0)".to_owned(),
            m => format!(
                "{}, window {}s, at most {} MiB per layer",
                if m == sharedloop_core::prefetch::Mode::Auto {
                    "auto (on for images on network filesystems)"
                } else {
                    "on"
                },
                p.window.as_secs(),
                p.max_bytes >> 20
            ),
        },
    ));
    v.push((
        "Root Directory State".to_owned(),
        match &r.root_problem {
            None => "writable".to_owned(),
            Some(why) => format!("new layers go to fallback ({why})"),
        },
    ));
    v.push(("Root Directory Placement".to_owned(), r.placement.describe()));
    for area in [&r.root_area, &r.fallback_area] {
        let name = if area.location == Location::Root { "Root" } else { "Fallback" };
        v.push((format!("{name} Filesystem"), area.fs.clone().unwrap_or_else(|| "(not created yet)".to_owned())));
        v.push((format!("Layers in {name}"), area.layers.to_string()));
    }
    v.push(("Layer Mounts".to_owned(), r.layer_mounts.to_string()));
    v.push(("Host ID".to_owned(), r.host_id.clone()));
    v
}

/// A layer's report as `docker inspect` shows it (GraphDriver.Data).
fn metadata(l: &LayerReport) -> HashMap<String, String> {
    let mut m = HashMap::new();
    let images: Vec<String> = l.stack.iter().map(|e| e.image.display().to_string()).collect();
    let locs: Vec<String> = l.stack.iter().map(|e| e.location.map_or("local", Location::name).to_owned()).collect();
    let loops: Vec<String> = l.stack.iter().map(|e| e.loop_device.clone().unwrap_or_else(|| "-".into())).collect();
    if let Some(first) = images.first() {
        m.insert("LayerImage".into(), first.clone());
        m.insert("Location".into(), locs[0].clone());
        m.insert("LoopDevice".into(), loops[0].clone());
    }
    m.insert("LayerImages".into(), images.join(":"));
    m.insert("LayerLocations".into(), locs.join(":"));
    m.insert("LoopDevices".into(), loops.join(":"));
    match &l.kind {
        LayerReportKind::Image { chain } => {
            if let Some(c) = chain {
                m.insert("ChainID".into(), c.to_string());
            }
        }
        LayerReportKind::Rw { upper, work, merged, image, lowers } => {
            m.insert("UpperDir".into(), upper.display().to_string());
            m.insert("WorkDir".into(), work.display().to_string());
            m.insert("MergedDir".into(), merged.display().to_string());
            match image {
                Some((size, fs)) => {
                    m.insert("WritableSize".into(), size.0.to_string());
                    m.insert("WritableFilesystem".into(), fs.name().into());
                }
                // A directory layer: the home's filesystem, no limit.
                None => {
                    m.insert("WritableFilesystem".into(), "directory".into());
                }
            }
            let lowers: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
            m.insert("LowerDir".into(), lowers.join(":"));
        }
    }
    m
}

/// Serves the plugin protocol on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    plugin: Arc<Plugin>,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = &mut shutdown => return Ok(()),
        };
        let plugin = plugin.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| handle(plugin.clone(), req));
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
}

/// Binds the plugin socket: removes a stale one, creates the directory,
/// and makes the socket root-only.
pub fn bind(path: &Path) -> io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parsing() {
        let q = query_params(Some("id=abc&parent=d%3Ae"));
        assert_eq!(q["id"], "abc");
        assert_eq!(q["parent"], "d:e");
        let q = query_params(Some("id=abc&parent="));
        assert_eq!(q["parent"], "");
    }

    #[test]
    fn percent_decoding_takes_only_two_hex_digits() {
        assert_eq!(percent_decode("%+f"), "% f");
        assert_eq!(percent_decode("%zz"), "%zz");
        assert_eq!(percent_decode("%4"), "%4");
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("+"), " ");
        assert_eq!(percent_decode("a+b%2Bc"), "a b+c");
        assert_eq!(percent_decode("%3a%3A%2f"), "::/");
        assert_eq!(percent_decode("%e2%82%ac"), "\u{20ac}");
        assert_eq!(percent_decode("%-1x"), "%-1x");
    }

    #[test]
    fn init_layers_are_directories() {
        assert_eq!(create_kind("GraphDriver.CreateReadWrite", "abc-init"), CreateKind::ReadWriteDir);
        assert_eq!(create_kind("GraphDriver.CreateReadWrite", "abc"), CreateKind::ReadWrite);
        assert_eq!(create_kind("GraphDriver.Create", "abc-init"), CreateKind::ReadOnly);
    }

    #[test]
    fn requests_decode_as_dockerd_sends_them() {
        let r: DriverRequest =
            serde_json::from_str(r#"{"ID":"x","Parent":"y","MountLabel":"","StorageOpt":{"size":"2G"}}"#).unwrap();
        assert_eq!((r.id.as_str(), r.parent.as_str()), ("x", "y"));
        assert_eq!(r.storage_opt.unwrap()["size"], "2G");
        let r: DriverRequest = serde_json::from_str(r#"{"ID":"x"}"#).unwrap();
        assert!(r.storage_opt.is_none());
        let i: InitRequest =
            serde_json::from_str(r#"{"Home":"/var/lib/docker/sharedloop","Opts":null,"UIDMaps":null,"GIDMaps":null}"#)
                .unwrap();
        assert_eq!(i.home, "/var/lib/docker/sharedloop");
        assert!(i.opts.is_none());
    }
}
