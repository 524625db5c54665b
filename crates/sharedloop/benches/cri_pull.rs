//! Kubernetes' pull path, timed: containerd's CRI PullImage of a large
//! image (default 1 GiB of incompressible data) on a host whose shared
//! store already has every layer, against the pull that published them
//! and against containerd's own overlayfs snapshotter. The set-up is
//! tests/cri.rs's (real registry, real containerd 1.7 and 2.x with CRI,
//! simulated hosts sharing one root); `bench/run --suite cri-pull` runs
//! this and writes the figures into docs/benchmarks.md.
//!
//! `cargo bench -p sharedloop --bench cri_pull -- [--mib N] [--runs N]
//! [--engines 1.7,2] [--json PATH]` (as root). Prints a JSON document
//! (and writes it to PATH): per engine, the seconds of host A's pull, the
//! overlayfs host's, each fresh host B's, and each round of the three
//! registry round trips a pull cannot avoid (resolve, manifest, config),
//! plus the layer blob GETs each host B made (0 is the point).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Instant;

use common::cri::*;
use common::registry::*;
use common::*;

struct Args {
    mib: usize,
    layers: usize,
    runs: usize,
    engines: Vec<Engine>,
    json: Option<String>,
}

fn args() -> Args {
    let mut a =
        Args { mib: 1024, layers: 8, runs: 5, engines: vec![Engine::Containerd17, Engine::Containerd2], json: None };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--mib" => a.mib = it.next().and_then(|v| v.parse().ok()).expect("--mib N"),
            "--layers" => a.layers = it.next().and_then(|v| v.parse().ok()).expect("--layers N"),
            "--runs" => a.runs = it.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            "--json" => a.json = it.next(),
            "--engines" => {
                a.engines = it
                    .next()
                    .expect("--engines 1.7,2")
                    .split(',')
                    .map(|e| match e {
                        "1.7" => Engine::Containerd17,
                        "2" => Engine::Containerd2,
                        other => panic!("unknown engine {other} (1.7, 2)"),
                    })
                    .collect()
            }
            // cargo bench passes --bench; filters and the like mean nothing here.
            _ => {}
        }
    }
    a
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn bench_engine(a: &Args, engine: Engine, tag: &str) -> serde_json::Value {
    let shared = SharedDir::new(&format!("bench-cri-{tag}"));
    let root = shared.path.join("root");
    let reg = Registry::start(&shared.path.join("registry"));
    let version = engine.version();
    eprintln!("cri-pull: {version}: building and pushing a {} MiB image", a.mib);
    let fx = shared.path.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let pause_tar = layer_tar(&LayerSpec {
        dirs: vec![("bin".into(), 0o755)],
        files: vec![("bin/busybox".into(), std::fs::read("/bin/busybox").unwrap(), 0o755, 0, 0)],
        ..Default::default()
    });
    let pause_img =
        RegistryImage::new(&[pause_tar], serde_json::json!({"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]}));
    let pause = reg.push("bench/pause", "1", &pause_img);
    let mut specs = vec![LayerSpec { rootfs: Some(rootfs), ..Default::default() }];
    specs.extend(data_layers(a.layers, a.mib / a.layers));
    let tars: Vec<Vec<u8>> = specs.iter().map(layer_tar).collect();
    drop(specs);
    let img = RegistryImage::new(&tars, serde_json::json!({"Cmd": ["/bin/sh"]}));
    drop(tars);
    let image = reg.push("bench/app", "1", &img);
    let layers = img.layer_digests();

    // Containerd's own overlayfs snapshotter: what a node without a
    // shared store pays.
    let (o, mut co) = cri_host(
        &format!("bench-cri-{tag}-ovl"),
        engine,
        "overlayfs",
        CriPull::Local,
        &shared.path.join("ovl-root"),
        &reg,
        &pause,
    );
    let t = Instant::now();
    co.pull(&image).unwrap_or_else(|e| fail(&o, "PullImage (overlayfs)", &e));
    let overlayfs_pull = secs(t);
    eprintln!("cri-pull: overlayfs host: {overlayfs_pull:.2} s");
    drop(co);
    drop(o);

    // Host A publishes every layer.
    let (h, mut ca) =
        cri_host(&format!("bench-cri-{tag}-a"), engine, "sharedloop", CriPull::Local, &root, &reg, &pause);
    let t = Instant::now();
    ca.pull(&image).unwrap_or_else(|e| fail(&h, "PullImage (host A)", &e));
    let a_pull = secs(t);
    eprintln!("cri-pull: host A: {a_pull:.2} s");

    // Fresh hosts B, one per run: the store has every layer.
    let mut b_pull = Vec::new();
    let mut b_gets = Vec::new();
    let mut round_trips = Vec::new();
    for i in 0..a.runs {
        let (b, mut cb) =
            cri_host(&format!("bench-cri-{tag}-b{i}"), engine, "sharedloop", CriPull::Local, &root, &reg, &pause);
        let mark = reg.log_mark();
        let t = Instant::now();
        cb.pull(&image).unwrap_or_else(|e| fail(&b, "PullImage (host B)", &e));
        let s = secs(t);
        reg.settle();
        let gets = reg.blob_gets(mark, &layers);
        eprintln!("cri-pull: host B{i}: {s:.3} s, {gets} layer blob GETs");
        b_pull.push(s);
        b_gets.push(gets);
        round_trips.extend(reg.round_trips(&b, "bench/app", "1", &img, 5));
    }
    drop(ca);
    drop(h);
    serde_json::json!({
        "engine": version,
        "image_bytes": img.layer_bytes(),
        "layers": layers.len(),
        "overlayfs_pull": [overlayfs_pull],
        "a_pull": [a_pull],
        "b_pull": b_pull,
        "b_layer_gets": b_gets,
        "round_trips": round_trips,
    })
}

fn main() {
    require(&["containerd", "runc", "mkfs.ext4", "busybox", "gzip"]);
    let a = args();
    let mut out = serde_json::Map::new();
    for &e in &a.engines {
        let tag = if e.is_v2() { "2" } else { "1.7" };
        out.insert(tag.to_owned(), bench_engine(&a, e, tag));
    }
    let doc = serde_json::to_string_pretty(&serde_json::Value::Object(out)).unwrap();
    if let Some(p) = &a.json {
        std::fs::write(Path::new(p), &doc).unwrap();
    }
    println!("{doc}");
}
