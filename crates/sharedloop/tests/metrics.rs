//! `sharedloop serve --metrics-address`: the Prometheus metrics of a host
//! running dockerd on the plugin, scraped inside the host's network
//! namespace with busybox wget. The values must move as the work done
//! says; no timing is asserted. Needs root, dockerd, busybox, overlay.

mod common;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use common::plugin_client::PluginClient;
use common::*;
use serde_json::json;

const ADDRESS: &str = "127.0.0.1:9323";

/// The metrics text, scraped from inside `host`.
fn scrape_text(host: &Host, path: &str) -> std::process::Output {
    run(host.cmd("/bin/busybox").args(["wget", "-qO-", &format!("http://{ADDRESS}{path}")]))
}

/// Every sample, `name{labels}` to value; checks that every line that is
/// not a comment is `name{labels} value` with a number for the value.
fn scrape(host: &Host) -> HashMap<String, f64> {
    let out = scrape_text(host, "/metrics");
    assert!(out.status.success(), "scrape failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut m = HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            assert!(
                line.is_empty() || line.starts_with("# HELP sharedloop_") || line.starts_with("# TYPE sharedloop_")
            );
            continue;
        }
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not `name value`: {line:?}"));
        let name_end = key.find('{').unwrap_or(key.len());
        let name = &key[..name_end];
        assert!(
            name.starts_with("sharedloop_") && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name: {line:?}"
        );
        if name_end < key.len() {
            let labels = &key[name_end..];
            assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels: {line:?}");
            for pair in labels[1..labels.len() - 1].split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("bad label {pair:?}: {line:?}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad label name: {line:?}");
                assert!(v.starts_with('"'), "bad label value: {line:?}");
            }
        }
        let v: f64 = value.parse().unwrap_or_else(|e| panic!("bad value ({e}): {line:?}"));
        assert!(m.insert(key.to_owned(), v).is_none(), "sample twice: {line:?}");
    }
    m
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

#[test]
fn metrics_follow_loads_runs_and_errors() {
    require(&["dockerd", "busybox", "overlay"]);
    let mut host = Host::new("metrics");
    fs::create_dir_all(host.root_dir()).unwrap();
    host.start_serve(&["--metrics-address".into(), ADDRESS.into()], &[]);
    // Before Init: the metrics answer, with no store yet.
    let m = scrape(&host);
    assert_eq!(get(&m, "sharedloop_layer_mounts"), 0.0, "{m:?}");
    let opts = host.default_storage_opts();
    host.start_dockerd(&opts);

    let root = host.root_dir().display().to_string();
    let key = |name: &str, loc: &str| format!("{name}{{store=\"{root}\",location=\"{loc}\"}}");
    let apply = "sharedloop_requests_total{frontend=\"docker\",method=\"GraphDriver.ApplyDiff\"}";
    let before = scrape(&host);
    assert_eq!(get(&before, &key("sharedloop_new_layers_location", "root")), 1.0, "{before:?}");
    assert_eq!(get(&before, &key("sharedloop_new_layers_location", "fallback")), 0.0, "{before:?}");
    assert!(before.contains_key(&key("sharedloop_heartbeat_age_seconds", "root")), "{before:?}");
    assert!(get(&before, "sharedloop_requests_total{frontend=\"docker\",method=\"GraphDriver.Init\"}") >= 1.0);

    let rootfs = host.dir.join("rootfs");
    busybox_rootfs(&rootfs);
    let archive = host.dir.join("img.tar");
    let layers = docker_archive(&base_layers(&rootfs), "multi:1", &archive).len() as f64;
    host.docker_stdin(&["load"], &archive);
    let after = scrape(&host);
    let rose = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(rose(apply), layers, "{after:?}");
    assert_eq!(rose(&key("sharedloop_layers", "root")), layers, "{after:?}");
    assert_eq!(rose("sharedloop_publish_duration_seconds_count"), layers, "{after:?}");
    assert_eq!(rose("sharedloop_apply_duration_seconds_count"), layers, "{after:?}");
    assert_eq!(
        rose("sharedloop_layer_builds_total{how=\"one_pass\"}") + rose("sharedloop_layer_builds_total{how=\"staged\"}"),
        layers,
        "{after:?}"
    );
    assert_eq!(
        rose("sharedloop_request_duration_seconds_count{frontend=\"docker\",method=\"GraphDriver.ApplyDiff\"}"),
        layers
    );
    assert!(rose("sharedloop_store_written_bytes_total{location=\"root\"}") > 0.0, "{after:?}");
    assert_eq!(rose("sharedloop_store_written_bytes_total{location=\"fallback\"}"), 0.0, "{after:?}");
    assert_eq!(
        get(&after, "sharedloop_request_errors_total{frontend=\"docker\",method=\"GraphDriver.ApplyDiff\"}"),
        0.0
    );

    host.docker_ok(&["run", "-d", "--network", "none", "--name", "c1", "multi:1", "sleep", "1000"]);
    let running = scrape(&host);
    assert!(get(&running, "sharedloop_layer_mounts") > 0.0, "{running:?}");
    assert!(get(&running, "sharedloop_loop_devices{kind=\"layer\"}") > 0.0, "{running:?}");
    assert!(get(&running, "sharedloop_loop_devices{kind=\"writable\"}") > 0.0, "{running:?}");
    assert!(get(&running, "sharedloop_writable_layers{frontend=\"docker\"}") > 0.0, "{running:?}");
    assert!(get(&running, "sharedloop_first_mount_duration_seconds_count") > 0.0, "{running:?}");

    // A request that fails counts as an error of its method.
    let errors = "sharedloop_request_errors_total{frontend=\"docker\",method=\"GraphDriver.Get\"}";
    let c = PluginClient::new(&host.inside(Path::new("/run/docker/plugins/sharedloop.sock")));
    assert!(c.call("GraphDriver.Get", json!({"ID": "no-such-layer"})).err().is_some());
    let failed = scrape(&host);
    assert_eq!(get(&failed, errors) - get(&running, errors), 1.0, "{failed:?}");

    host.docker_ok(&["rm", "-f", "c1"]);
    let gone = scrape(&host);
    assert_eq!(get(&gone, "sharedloop_loop_devices{kind=\"writable\"}"), 0.0, "{gone:?}");

    // Anything but /metrics is not found.
    assert!(!scrape_text(&host, "/other").status.success());
}
