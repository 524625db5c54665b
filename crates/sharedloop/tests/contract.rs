//! The graph driver contract, call by call, as dockerd's graph driver
//! proxy sends it and as moby's own drivers (vfs, overlay2) answer it:
//! layers made by Create and written through Get, repeated and racing
//! calls on one id, removal while mounted, Cleanup, a second Init, and
//! request bodies. docs/driver-contract.md states what is tested here.
//! The plugin, the kernel, loop devices, ext4 and overlayfs are real.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::plugin_client::PluginClient;
use common::*;
use serde_json::json;

fn get(host: &Host, c: &PluginClient, id: &str) -> PathBuf {
    let dir = c.ok("GraphDriver.Get", json!({"ID": id}))["Dir"].as_str().unwrap().to_owned();
    host.inside(Path::new(&dir))
}

/// The entries of a Diff (a tar), by path, with the content of files.
fn diff_entries(c: &PluginClient, id: &str, parent: &str) -> BTreeSet<(String, String)> {
    let r = c.call("GraphDriver.Diff", json!({"ID": id, "Parent": parent}));
    assert_eq!(r.status, 200, "Diff {id}: {}", String::from_utf8_lossy(&r.body));
    let mut a = tar::Archive::new(&r.body[..]);
    let mut out = BTreeSet::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        let mut data = String::new();
        if e.header().entry_type().is_file() {
            e.read_to_string(&mut data).unwrap();
        }
        out.insert((path.trim_end_matches('/').to_owned(), data));
    }
    out
}

fn changes(c: &PluginClient, id: &str, parent: &str) -> Vec<String> {
    let v = c.ok("GraphDriver.Changes", json!({"ID": id, "Parent": parent}));
    let mut out: Vec<String> =
        v["Changes"].as_array().unwrap().iter().map(|c| c["Path"].as_str().unwrap().to_owned()).collect();
    out.sort();
    out
}

fn files(pairs: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    pairs.iter().map(|(p, d)| (p.to_string(), d.to_string())).collect()
}

/// Layers made by Create (read-only, no ApplyDiff) and written through the
/// directory Get returns are layers of their own, as graphtest's
/// createBase and DriverTestDeepLayerRead use them: each keeps what was
/// written to it, and Diff, Changes and DiffSize agree.
#[test]
fn contract_layers_written_through_get_are_their_own() {
    require(&["ext4", "overlay"]);
    let (host, c) = plugin_host("own-layers");
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    c.ok("GraphDriver.Create", json!({"ID": "a"}));
    let da = get(&host, &c, "a");
    fs::write(da.join("in-a"), "A").unwrap();
    c.ok("GraphDriver.Create", json!({"ID": "b"}));
    let db = get(&host, &c, "b");
    assert_ne!(da, db, "two layers share one directory");
    assert!(!db.join("in-a").exists(), "a file written to layer a shows in layer b");
    fs::write(db.join("in-b"), "BB").unwrap();
    // A parentless writable layer sees neither.
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "rw"}));
    let drw = get(&host, &c, "rw");
    assert_eq!(fs::read_dir(&drw).unwrap().count(), 0, "a new writable layer is not empty");
    for (id, put) in [("a", true), ("b", true), ("rw", true)] {
        if put {
            c.ok("GraphDriver.Put", json!({"ID": id}));
        }
    }
    assert_eq!(diff_entries(&c, "a", ""), files(&[("in-a", "A")]));
    assert_eq!(diff_entries(&c, "b", ""), files(&[("in-b", "BB")]));
    assert_eq!(changes(&c, "a", ""), vec!["/in-a"]);
    assert_eq!(c.ok("GraphDriver.DiffSize", json!({"ID": "a"}))["Size"], json!(1));
    assert_eq!(c.ok("GraphDriver.DiffSize", json!({"ID": "b"}))["Size"], json!(2));
    // Content written through Get takes no ApplyDiff afterwards.
    let r = c.apply_diff("a", "", &layer_tar(&LayerSpec::default()));
    assert!(r.err().unwrap().contains("writable"), "{:?}", r.err());
    for id in ["rw", "b", "a"] {
        c.ok("GraphDriver.Remove", json!({"ID": id}));
    }
    assert_no_loops(&host.dir);
}

/// 128 layers, each made by Create over the one before and written through
/// Get: the top one shows every layer's files, and each Diff holds only its
/// own layer's.
#[test]
fn contract_128_layers_written_through_get_stack() {
    require(&["ext4", "overlay"]);
    let (host, c) = plugin_host("deep-get");
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    let mut parent = String::new();
    for i in 0..128 {
        let id = format!("l{i:03}");
        c.ok("GraphDriver.Create", json!({"ID": id, "Parent": parent}));
        let d = get(&host, &c, &id);
        fs::create_dir_all(d.join("layers")).unwrap();
        fs::write(d.join(format!("layers/{i:03}")), format!("{i}")).unwrap();
        fs::write(d.join("top"), format!("{i}")).unwrap();
        c.ok("GraphDriver.Put", json!({"ID": id}));
        parent = id;
    }
    let top = get(&host, &c, "l127");
    let mut names: Vec<String> =
        fs::read_dir(top.join("layers")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names, (0..128).map(|i| format!("{i:03}")).collect::<Vec<_>>());
    for i in [0, 1, 64, 127] {
        assert_eq!(fs::read_to_string(top.join(format!("layers/{i:03}"))).unwrap(), format!("{i}"));
    }
    assert_eq!(fs::read_to_string(top.join("top")).unwrap(), "127");
    c.ok("GraphDriver.Put", json!({"ID": "l127"}));
    assert_eq!(diff_entries(&c, "l005", "l004"), files(&[("layers", ""), ("layers/005", "5"), ("top", "5")]));
    assert_eq!(changes(&c, "l005", "l004"), vec!["/layers", "/layers/005", "/top"]);
    for i in (0..128).rev() {
        c.ok("GraphDriver.Remove", json!({"ID": format!("l{i:03}")}));
    }
    assert_no_loops(&host.dir);
    let left = fs::read_dir(host.root_dir().join("layers")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "layers left in the store");
}

/// A read-only layer made over a writable one shows the writable layer's
/// content as it was when the layer was made, not its live upper
/// directory.
#[test]
fn contract_layer_over_a_writable_parent_is_a_snapshot() {
    require(&["ext4", "overlay"]);
    let (host, c) = plugin_host("rw-parent");
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "ctr"}));
    let d = get(&host, &c, "ctr");
    fs::write(d.join("f"), "1").unwrap();
    c.ok("GraphDriver.Create", json!({"ID": "child", "Parent": "ctr"}));
    let dc = get(&host, &c, "child");
    assert_ne!(fs::canonicalize(&dc).unwrap(), fs::canonicalize(&d).unwrap());
    fs::write(d.join("f"), "2").unwrap();
    fs::write(d.join("later"), "x").unwrap();
    assert_eq!(fs::read_to_string(dc.join("f")).unwrap(), "1", "the child shows the parent's live content");
    assert!(!dc.join("later").exists());
    // Writes to the child stay in the child.
    fs::write(dc.join("g"), "child").unwrap();
    assert!(!d.join("g").exists());
    c.ok("GraphDriver.Put", json!({"ID": "child"}));
    assert_eq!(diff_entries(&c, "child", "ctr"), files(&[("g", "child")]));
    // The parent is pinned by its child; removal goes child first.
    assert!(c.call("GraphDriver.Remove", json!({"ID": "ctr"})).err().unwrap().contains("child"));
    c.ok("GraphDriver.Remove", json!({"ID": "child"}));
    c.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    c.ok("GraphDriver.Remove", json!({"ID": "ctr"}));
    assert_no_loops(&host.dir);
    let left = fs::read_dir(host.root_dir().join("layers")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "the parent's snapshot is left in the store");
}

/// Each call on a missing id, repeated calls, a mounted layer's removal.
#[test]
fn contract_missing_repeated_and_mounted() {
    require(&["ext4", "overlay"]);
    let (host, c) = plugin_host("repeat");
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    // Missing ids: errors that name them; Exists false; Put and Remove fine.
    for m in ["GraphDriver.Get", "GraphDriver.GetMetadata", "GraphDriver.Changes", "GraphDriver.DiffSize"] {
        let e = c.call(m, json!({"ID": "ghost"})).err().unwrap_or_else(|| panic!("{m} of a missing id succeeded"));
        assert!(e.contains("ghost"), "{m}: {e}");
    }
    assert_eq!(c.call("GraphDriver.Diff", json!({"ID": "ghost"})).status, 500);
    assert_eq!(c.ok("GraphDriver.Exists", json!({"ID": "ghost"}))["Exists"], json!(false));
    c.ok("GraphDriver.Put", json!({"ID": "ghost"}));
    c.ok("GraphDriver.Remove", json!({"ID": "ghost"}));
    assert!(c.apply_diff("ghost", "", &layer_tar(&LayerSpec::default())).err().unwrap().contains("ghost"));
    // Create of an id that exists fails (overlay2: EEXIST) and keeps the layer.
    c.ok("GraphDriver.Create", json!({"ID": "base"}));
    let r = c.apply_diff(
        "base",
        "",
        &layer_tar(&LayerSpec { files: vec![("f".into(), b"f".to_vec(), 0o644, 0, 0)], ..Default::default() }),
    );
    assert!(r.err().is_none(), "{:?}", r.err());
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "ctr", "Parent": "base"}));
    for (m, parent) in
        [("GraphDriver.Create", ""), ("GraphDriver.CreateReadWrite", "base"), ("GraphDriver.Create", "base")]
    {
        let e = c.call(m, json!({"ID": "ctr", "Parent": parent})).err();
        assert!(e.as_deref().is_some_and(|e| e.contains("already exists")), "{m} of an existing id: {e:?}");
    }
    assert_eq!(c.ok("GraphDriver.GetMetadata", json!({"ID": "ctr"}))["Metadata"]["WritableFilesystem"], json!("ext4"));
    // Get twice, Put twice: one mount, gone after the second Put.
    let d1 = get(&host, &c, "ctr");
    let d2 = get(&host, &c, "ctr");
    assert_eq!(d1, d2);
    assert!(d1.join("f").exists());
    // Removing a mounted layer is refused as busy; the container keeps it.
    let e = c.call("GraphDriver.Remove", json!({"ID": "ctr"})).err().unwrap();
    assert!(e.contains("in use") && e.contains("mounted"), "{e}");
    assert!(c.ok("GraphDriver.GetMetadata", json!({"ID": "ctr"}))["Metadata"]["UpperDir"].is_string());
    c.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    assert!(c.call("GraphDriver.Remove", json!({"ID": "ctr"})).err().is_some(), "still held once");
    c.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    c.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    c.ok("GraphDriver.Remove", json!({"ID": "ctr"}));
    c.ok("GraphDriver.Remove", json!({"ID": "ctr"}));
    assert_eq!(c.ok("GraphDriver.Exists", json!({"ID": "ctr"}))["Exists"], json!(false));
    c.ok("GraphDriver.Remove", json!({"ID": "base"}));
    // An empty layer that others are built on is not opened for writing:
    // they stand on it as empty.
    c.ok("GraphDriver.Create", json!({"ID": "e1"}));
    c.ok("GraphDriver.Create", json!({"ID": "e2", "Parent": "e1"}));
    let e = c.call("GraphDriver.Get", json!({"ID": "e1"})).err().unwrap();
    assert!(e.contains("built on it"), "{e}");
    for id in ["e2", "e1"] {
        c.ok("GraphDriver.Remove", json!({"ID": id}));
    }
    assert_no_loops(&host.dir);
}

/// Remove, then CreateReadWrite of the same id at once, hundreds of times:
/// the removal's background work never touches the new layer.
#[test]
fn contract_remove_then_recreate_same_id() {
    require(&["ext4", "overlay"]);
    let (host, c) = plugin_host("recreate");
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    for round in 0..200 {
        c.ok("GraphDriver.CreateReadWrite", json!({"ID": "x"}));
        let d = get(&host, &c, "x");
        let left: Vec<_> = fs::read_dir(&d).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "round {round}: the new layer holds {left:?}");
        fs::write(d.join(format!("w{round}")), "w").unwrap();
        c.ok("GraphDriver.Put", json!({"ID": "x"}));
        c.ok("GraphDriver.Remove", json!({"ID": "x"}));
    }
    assert_eq!(c.ok("GraphDriver.Exists", json!({"ID": "x"}))["Exists"], json!(false));
    assert_no_loops(&host.dir);
    let home = host.dir.join("home");
    let rw: Vec<_> = fs::read_dir(home.join("rw")).unwrap().flatten().map(|e| e.path()).collect();
    let t = std::time::Instant::now();
    let mut rw = rw;
    while !rw.is_empty() && t.elapsed() < std::time::Duration::from_secs(20) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        rw = fs::read_dir(home.join("rw")).unwrap().flatten().map(|e| e.path()).collect();
    }
    assert!(rw.is_empty(), "removed writable images left: {rw:?}");
}

/// 20 clients, each 10 rounds of CreateReadWrite, Get, Remove, Create, Put,
/// Remove on one id. Calls may fail (the id exists, is busy, is mounted),
/// but the driver never ends in a state it cannot leave: what Exists says
/// matches the record and the image, and the layer can be removed.
#[test]
fn contract_racing_clients_on_one_id() {
    require(&["ext4", "overlay"]);
    let (host, c) = plugin_host("race");
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    let sock = host.inside(Path::new("/run/docker/plugins/sharedloop.sock"));
    let home = host.dir.join("home");
    for _attempt in 0..3 {
        let sock = Arc::new(sock.clone());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let sock = sock.clone();
                std::thread::spawn(move || {
                    let c = PluginClient::new(&sock);
                    let mut held = 0;
                    for _ in 0..10 {
                        let _ = c.call("GraphDriver.CreateReadWrite", json!({"ID": "one"}));
                        let r = c.call("GraphDriver.Get", json!({"ID": "one"}));
                        if r.status == 200 && r.err().is_none() {
                            held += 1;
                        }
                        let _ = c.call("GraphDriver.Remove", json!({"ID": "one"}));
                        let _ = c.call("GraphDriver.Create", json!({"ID": "one"}));
                        let _ = c.call("GraphDriver.Put", json!({"ID": "one"}));
                        let _ = c.call("GraphDriver.Remove", json!({"ID": "one"}));
                        let r = c.call("GraphDriver.Exists", json!({"ID": "one"}));
                        assert_eq!(r.status, 200, "the plugin stopped answering");
                    }
                    held
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a client panicked");
        }
        let exists = c.ok("GraphDriver.Exists", json!({"ID": "one"}))["Exists"] == json!(true);
        assert_eq!(exists, home.join("layers/one.json").exists(), "Exists disagrees with the record");
        if exists {
            // Whatever Gets are still held: Put until Remove goes through.
            let mut removed = false;
            for _ in 0..250 {
                if c.call("GraphDriver.Remove", json!({"ID": "one"})).err().is_none() {
                    removed = true;
                    break;
                }
                c.ok("GraphDriver.Put", json!({"ID": "one"}));
            }
            assert!(removed, "the layer cannot be removed: {}", tail(&host.plugin_log(), 20));
        }
        assert_eq!(c.ok("GraphDriver.Exists", json!({"ID": "one"}))["Exists"], json!(false));
        // And the id is usable again.
        c.ok("GraphDriver.CreateReadWrite", json!({"ID": "one"}));
        let d = get(&host, &c, "one");
        fs::write(d.join("ok"), "ok").unwrap();
        c.ok("GraphDriver.Put", json!({"ID": "one"}));
        c.ok("GraphDriver.Remove", json!({"ID": "one"}));
    }
    assert_no_loops(&host.dir);
    let mounts = settled_mounts(&host, &home, 1);
    assert_eq!(mounts, vec![home.join("tmp").display().to_string()], "mounts left under the home");
}

/// Cleanup (dockerd's shutdown) releases every mount: held and unheld
/// Gets, writable layers, layer mounts, staging and the home itself. A new
/// Init then serves the same layers again.
#[test]
fn contract_cleanup_unmounts_everything() {
    require(&["ext4", "overlay"]);
    let (host, c) = plugin_host("cleanup");
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    let base = LayerSpec { files: vec![("f".into(), b"base".to_vec(), 0o644, 0, 0)], ..Default::default() };
    c.ok("GraphDriver.Create", json!({"ID": "base"}));
    assert!(c.apply_diff("base", "", &layer_tar(&base)).err().is_none());
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "held", "Parent": "base"}));
    let d = get(&host, &c, "held"); // never Put
    fs::write(d.join("w"), "kept").unwrap();
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "put", "Parent": "base"}));
    get(&host, &c, "put");
    c.ok("GraphDriver.Put", json!({"ID": "put"}));
    let home = host.dir.join("home");
    assert!(!host.mounts_under(&home).is_empty());
    c.ok("GraphDriver.Cleanup", json!({}));
    let info = host.mountinfo();
    let left: Vec<String> = sharedloop_core::mount::parse_mountinfo(&info)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(&home) || m.mount_point.starts_with(LAYER_MOUNTS))
        .map(|m| m.mount_point.display().to_string())
        .filter(|p| p != LAYER_MOUNTS)
        .collect();
    assert!(left.is_empty(), "mounts left after Cleanup: {left:?}");
    assert_no_loops(&host.dir);
    // Requests after Cleanup are refused until the next Init.
    assert!(c.call("GraphDriver.Get", json!({"ID": "put"})).err().unwrap().contains("not initialised"));
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    let d = get(&host, &c, "held");
    assert_eq!(fs::read_to_string(d.join("w")).unwrap(), "kept");
    assert_eq!(fs::read_to_string(d.join("f")).unwrap(), "base");
    c.ok("GraphDriver.Put", json!({"ID": "held"}));
    for id in ["held", "put", "base"] {
        c.ok("GraphDriver.Remove", json!({"ID": id}));
    }
    assert_no_loops(&host.dir);
}

/// Once a client initialised the driver, an Init naming another home is
/// refused and the live driver keeps serving; the same home again (a
/// restarted dockerd) works, and after Cleanup another home does too.
#[test]
fn contract_second_init_cannot_take_the_driver() {
    require(&["ext4", "overlay"]);
    let (host, c) = plugin_host("reinit");
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "ctr"}));
    let other = host.dir.join("other-home");
    let r = c.call("GraphDriver.Init", json!({"Home": other, "Opts": host.default_storage_opts()}));
    let e = r.err().expect("a second Init with another home was accepted");
    assert!(e.contains("already initialised") && e.contains(host.dir.join("home").to_str().unwrap()), "{e}");
    assert!(!other.exists(), "the refused Init created its home");
    assert_eq!(c.ok("GraphDriver.Exists", json!({"ID": "ctr"}))["Exists"], json!(true));
    let rec = fs::read_to_string(host.inside(Path::new("/run/sharedloop/docker-init.json"))).unwrap();
    assert!(!rec.contains("other-home"), "the refused Init was recorded: {rec}");
    // The same home again: a restarted dockerd.
    init_plugin(&host, &c, &["sharedloop.size=64M"]);
    get(&host, &c, "ctr");
    c.ok("GraphDriver.Put", json!({"ID": "ctr"}));
    c.ok("GraphDriver.Remove", json!({"ID": "ctr"}));
    c.ok("GraphDriver.Cleanup", json!({}));
    c.ok("GraphDriver.Init", json!({"Home": other, "Opts": host.default_storage_opts()}));
    c.ok("GraphDriver.CreateReadWrite", json!({"ID": "ctr2"}));
    c.ok("GraphDriver.Remove", json!({"ID": "ctr2"}));
    c.ok("GraphDriver.Cleanup", json!({}));
    assert_no_loops(&host.dir);
}

/// A JSON body far larger than any request is refused without being held
/// in memory.
#[test]
fn contract_oversized_request_bodies_are_refused() {
    require(&["ext4"]);
    let (host, c) = plugin_host("bigbody");
    init_plugin(&host, &c, &[]);
    let sock = host.inside(Path::new("/run/docker/plugins/sharedloop.sock"));
    let total: usize = 256 << 20;
    let mut s = UnixStream::connect(&sock).unwrap();
    let start = "{\"ID\":\"x\",\"MountLabel\":\"";
    let head = format!(
        "POST /GraphDriver.Create HTTP/1.1\r\nHost: plugin\r\nContent-Length: {total}\r\nConnection: close\r\n\r\n{start}"
    );
    s.write_all(head.as_bytes()).unwrap();
    // Exactly the declared length (a string that never closes: malformed
    // JSON), unless the plugin answers and closes first.
    let chunk = vec![b'a'; 1 << 20];
    let mut sent = start.len();
    while sent < total {
        let n = chunk.len().min(total - sent);
        if s.write_all(&chunk[..n]).is_err() {
            break; // the plugin answered and closed
        }
        sent += n;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("larger than"), "reply: {}", &reply[..reply.len().min(300)]);
    let status = fs::read_to_string(format!("/proc/{}/status", host.plugin_pid())).unwrap();
    let hwm_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(hwm_kb < 128 * 1024, "the plugin's peak memory is {hwm_kb} kB after a {total}-byte body");
    // The plugin still serves.
    assert_eq!(c.ok("GraphDriver.Exists", json!({"ID": "x"}))["Exists"], json!(false));
}
