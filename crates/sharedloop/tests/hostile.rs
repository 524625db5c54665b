//! Hostile layer tars through the plugin's ApplyDiff, as dockerd sends
//! them: each gets a clear error (or, where the layer is legitimate but
//! dangerous, is kept inert inside the layer), nothing is written outside
//! the layer, the store is unchanged and no mount leaks.

mod common;

use std::fs;
use std::path::Path;

use common::plugin_client::PluginClient;
use common::*;
use serde_json::json;

/// One raw ustar header (+ data), written byte by byte so that names the
/// tar crate refuses to write (`..`, absolute) can be sent.
fn raw(name: &[u8], typ: u8, data: &[u8], link: &[u8]) -> Vec<u8> {
    raw_sized(name, typ, data, link, format!("{:011o}", data.len()).as_bytes(), 0)
}

fn raw_sized(name: &[u8], typ: u8, data: &[u8], link: &[u8], size: &[u8], mode_bits: u32) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(format!("{:07o}\0", 0o644 | mode_bits).as_bytes());
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..124 + size.len()].copy_from_slice(size);
    h[136..148].copy_from_slice(b"14571234567\0");
    h[156] = typ;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(512), 0);
    out
}

fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut v: Vec<u8> = entries.concat();
    v.extend_from_slice(&[0u8; 1024]);
    v
}

fn pax(path: &[u8]) -> Vec<u8> {
    let rec = {
        let body = [b" path=".as_slice(), path, b"\n"].concat();
        let mut n = body.len() + 2;
        if (n.to_string().len() + body.len()) != n {
            n = n.to_string().len() + body.len();
        }
        [n.to_string().as_bytes(), &body].concat()
    };
    raw(b"PaxHeaders/x", b'x', &rec, b"")
}

const REG: u8 = b'0';
const LNK: u8 = b'1';
const SYM: u8 = b'2';
const DIR: u8 = b'5';

/// Hostile layer tars: (what, tar, what the error must say).
fn hostile_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let longname = {
        let name = b"a/../../long-escape";
        let gnu = raw(b"././@LongLink", b'L', &[name.as_slice(), b"\0"].concat(), b"");
        [gnu, raw(b"placeholder", REG, b"x", b"")].concat()
    };
    vec![
        ("dot-dot name", archive(&[raw(b"../escape-1", REG, b"x", b"")]), "'..'"),
        ("dot-dot inside", archive(&[raw(b"a/../../escape-2", REG, b"x", b"")]), "'..'"),
        ("dot then dot-dot", archive(&[raw(b"./../escape-3", REG, b"x", b"")]), "'..'"),
        ("absolute name", archive(&[raw(b"/tmp/escape-4", REG, b"x", b"")]), "absolute"),
        (
            "write through symlink to /",
            archive(&[raw(b"ln", SYM, b"", b"/"), raw(b"ln/tmp/escape-5", REG, b"x", b"")]),
            "symlink",
        ),
        (
            "write through relative symlink",
            archive(&[raw(b"ln", SYM, b"", b"../../../../../.."), raw(b"ln/escape-6", REG, b"x", b"")]),
            "symlink",
        ),
        (
            "dir replaced by symlink",
            archive(&[raw(b"d/", DIR, b"", b""), raw(b"d", SYM, b"", b"/tmp"), raw(b"d/escape-7", REG, b"x", b"")]),
            "symlink",
        ),
        (
            "symlink chain",
            archive(&[raw(b"s1", SYM, b"", b"s2"), raw(b"s2", SYM, b"", b"/tmp"), raw(b"s1/escape-8", REG, b"x", b"")]),
            "symlink",
        ),
        ("hardlink with dot-dot", archive(&[raw(b"hl", LNK, b"", b"../../../../etc/passwd")]), "'..'"),
        ("hardlink absolute", archive(&[raw(b"hl", LNK, b"", b"/etc/passwd")]), "absolute"),
        ("hardlink to nothing", archive(&[raw(b"hl", LNK, b"", b"missing")]), "not in this layer"),
        (
            "hardlink through symlink",
            archive(&[raw(b"s", SYM, b"", b"/etc"), raw(b"hl", LNK, b"", b"s/passwd")]),
            "not in this layer",
        ),
        ("whiteout with dot-dot", archive(&[raw(b"../.wh.x", REG, b"", b"")]), "'..'"),
        ("whiteout of dot-dot", archive(&[raw(b"dir/.wh...", REG, b"", b"")]), "invalid name"),
        ("opaque marker outside", archive(&[raw(b"../.wh..wh..opq", REG, b"", b"")]), "'..'"),
        (
            "whiteout through symlink",
            archive(&[raw(b"ln", SYM, b"", b"/etc"), raw(b"ln/.wh.passwd", REG, b"", b"")]),
            "symlink",
        ),
        ("not a tar", (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect(), "bad layer tar"),
        (
            "truncated data",
            raw_sized(b"big", REG, &[1u8; 100], b"", format!("{:011o}", 1_000_000).as_bytes(), 0)[..612].to_vec(),
            "bad layer tar",
        ),
        ("huge size, no data", raw_sized(b"huge", REG, b"", b"", b"77777777777", 0), "bad layer tar"),
        ("size not a number", archive(&[raw_sized(b"nan", REG, b"", b"", b"zzzzzzzzzzz", 0)]), "bad layer tar"),
        (
            "bad checksum",
            {
                let mut t = archive(&[raw(b"f", REG, b"x", b"")]);
                t[148] = b'7';
                t
            },
            "bad layer tar",
        ),
        ("pax path escape", archive(&[pax(b"../pax-escape"), raw(b"innocent", REG, b"x", b"")]), "'..'"),
        ("gnu long name escape", archive(&[longname]), "'..'"),
        ("unsupported entry type", archive(&[raw(b"weird", b'Z', b"", b"")]), "unsupported entry type"),
        (
            "uid out of range",
            {
                let mut h = raw(b"f", REG, b"x", b"");
                h[108..116].copy_from_slice(&[0x80, 0, 0, 0x01, 0, 0, 0, 0]); // base-256: 2^32
                h[148..156].copy_from_slice(b"        ");
                let sum: u32 = h[..512].iter().map(|b| *b as u32).sum();
                h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
                archive(&[h])
            },
            "out of range",
        ),
    ]
}

#[test]
fn hostile_tars_are_refused_or_kept_inert() {
    require(&["ext4"]);
    let mut host = Host::new("hostile");
    fs::create_dir_all(host.root_dir()).unwrap();
    host.start_plugin();
    let c = PluginClient::new(&host.inside(Path::new("/run/docker/plugins/sharedloop.sock")));
    c.ok("Plugin.Activate", json!(null));
    let home = host.dir.join("home");
    c.ok("GraphDriver.Init", json!({"Home": home, "Opts": host.default_storage_opts()}));
    // A base layer, so that parents exist and escapes have somewhere to aim.
    c.ok("GraphDriver.Create", json!({"ID": "base"}));
    let base = layer_tar(&LayerSpec {
        files: vec![("etc/passwd".into(), b"root:x:0:0::/:/bin/sh\n".to_vec(), 0o644, 0, 0)],
        ..Default::default()
    });
    assert!(c.apply_diff("base", "", &base).err().is_none());

    let cases = hostile_cases();
    assert!(cases.len() >= 20);
    let before_layers = fs::read_dir(host.root_dir().join("layers")).unwrap().count();
    for (i, (what, tar, expect)) in cases.iter().enumerate() {
        let id = format!("h{i}");
        c.ok("GraphDriver.Create", json!({"ID": id, "Parent": "base"}));
        let r = c.apply_diff(&id, "base", tar);
        let err = r.err().unwrap_or_else(|| panic!("{what}: accepted"));
        assert!(err.contains(expect), "{what}: error {err:?} does not say {expect:?}");
        assert_eq!(
            fs::read_dir(host.root_dir().join("layers")).unwrap().count(),
            before_layers,
            "{what}: store changed"
        );
        assert_eq!(fs::read_dir(home.join("tmp")).unwrap().count(), 0, "{what}: staging left");
        c.ok("GraphDriver.Remove", json!({"ID": id}));
    }
    // Nothing escaped anywhere we can see.
    for n in 1..=8 {
        for dir in [Path::new("/tmp"), Path::new("/"), &host.dir, &home, &home.join("tmp")] {
            assert!(!dir.join(format!("escape-{n}")).exists(), "escape-{n} written to {}", dir.display());
        }
    }
    assert!(!Path::new("/pax-escape").exists() && !host.dir.join("pax-escape").exists());
    assert!(!Path::new("/long-escape").exists() && !home.join("long-escape").exists());
    assert!(!fs::read_to_string("/etc/passwd").unwrap().contains("root:x:0:0::/:/bin/sh"), "host /etc/passwd touched");

    // Legitimate but dangerous content: kept as the layer says, inside the
    // image, inert on the host (staging is nodev,nosuid,noexec).
    let staging_mount = host
        .mountinfo()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(home.join("tmp").to_str().unwrap()))
        .map(str::to_owned);
    let staging_mount = staging_mount.expect("staging is a mount of its own");
    for flag in ["nodev", "nosuid", "noexec"] {
        assert!(
            staging_mount.split(' ').nth(5).unwrap().split(',').any(|f| f == flag),
            "staging not {flag}: {staging_mount}"
        );
    }
    c.ok("GraphDriver.Create", json!({"ID": "devs", "Parent": "base"}));
    let mut dev = raw_sized(b"dev/kmem", b'3', b"", b"", b"00000000000", 0);
    dev[329..337].copy_from_slice(b"0000001\0");
    dev[337..345].copy_from_slice(b"0000002\0");
    dev[148..156].copy_from_slice(b"        ");
    let sum: u32 = dev[..512].iter().map(|b| *b as u32).sum();
    dev[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let setuid = raw_sized(b"bin/su", REG, b"#!/bin/sh\n", b"", format!("{:011o}", 10).as_bytes(), 0o4000 | 0o111);
    let replace_symlink =
        [raw(b"etc/passwd", SYM, b"", b"/etc/shadow"), raw(b"etc/passwd", REG, b"mine\n", b"")].concat();
    let r = c.apply_diff("devs", "base", &archive(&[dev, setuid, replace_symlink]));
    assert!(r.err().is_none(), "{:?}", r.err());
    let dir = c.ok("GraphDriver.Get", json!({"ID": "devs"}))["Dir"].as_str().unwrap().to_owned();
    let inside = host.inside(Path::new(&dir));
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = fs::symlink_metadata(inside.join("dev/kmem")).unwrap();
    assert!(
        md.file_type().is_char_device() && md.rdev() == rustix::fs::makedev(1, 2),
        "device node not kept in the layer"
    );
    assert_eq!(
        fs::metadata(inside.join("bin/su")).unwrap().mode() & 0o7777,
        0o4755,
        "setuid bit not kept in the layer"
    );
    assert_eq!(fs::read_to_string(inside.join("etc/passwd")).unwrap(), "mine\n");
    c.ok("GraphDriver.Put", json!({"ID": "devs"}));
    for id in ["devs", "base"] {
        c.ok("GraphDriver.Remove", json!({"ID": id}));
    }
    assert_no_loops(&host.dir);
    assert_eq!(fs::read_dir(host.root_dir().join("layers")).unwrap().count(), 0);
    drop(host);
}

/// The same tars as layers of images imported into a real containerd:
/// containerd applies them itself, through the mounts sharedloop hands it.
/// Whatever containerd does with each (refuse, or keep it inside the
/// layer), nothing is written outside the layer, a refused layer leaves
/// the store unchanged, and no writable snapshot, mount or loop device
/// stays behind.
#[test]
fn hostile_tars_through_containerd_stay_inside() {
    require(&["containerd", "ctr", "ext4"]);
    let mut host = Host::new("hostile-ctr");
    let root = host.root_dir();
    host.start_snapshotter(&root);
    host.start_containerd();
    let base = layer_tar(&LayerSpec {
        files: vec![("etc/passwd".into(), b"root:x:0:0::/:/bin/sh\n".to_vec(), 0o644, 0, 0)],
        ..Default::default()
    });
    let fx = host.dir.join("fixture");
    fs::create_dir_all(&fx).unwrap();
    let a = fx.join("base.tar");
    oci_archive_of_tars(std::slice::from_ref(&base), "docker.io/test/base:1", &a);
    host.ctr_ok(&["image", "import", a.to_str().unwrap()]);
    let layers = |r: &Path| fs::read_dir(r.join("layers")).map(|d| d.count()).unwrap_or(0);
    let (mut refused, mut kept) = (0, 0);
    for (i, (what, tar, _)) in hostile_cases().iter().enumerate() {
        let before = layers(&root);
        let a = fx.join(format!("h{i}.tar"));
        let name = format!("docker.io/test/h{i}:1");
        oci_archive_of_tars(&[base.clone(), tar.clone()], &name, &a);
        let out = host.ctr(&["image", "import", a.to_str().unwrap()]);
        if out.status.success() {
            kept += 1;
        } else {
            refused += 1;
            assert_eq!(layers(&root), before, "{what}: refused, yet the store changed");
        }
        eprintln!(
            "{what}: {}",
            if out.status.success() {
                "imported".into()
            } else {
                String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("").to_owned()
            }
        );
    }
    eprintln!("containerd refused {refused}, imported {kept} (contained)");
    for n in 1..=8 {
        for dir in [Path::new("/tmp"), Path::new("/"), &host.dir, &host.snapshotter_root()] {
            assert!(!dir.join(format!("escape-{n}")).exists(), "escape-{n} written to {}", dir.display());
        }
    }
    assert!(!Path::new("/pax-escape").exists() && !Path::new("/long-escape").exists());
    assert!(!fs::read_to_string("/etc/passwd").unwrap().contains("root:x:0:0::/:/bin/sh"), "host /etc/passwd touched");
    // Every image goes (with a synchronous garbage collection: containerd
    // removes a failed unpack's snapshot from its metadata at once and from
    // the snapshotter only when it collects); then nothing is left.
    let images = host.ctr_ok(&["image", "ls", "-q"]);
    for img in images.lines() {
        host.ctr_ok(&["image", "rm", "--sync", img]);
    }
    let mut c = common::snap_client::SnapClient::connect(&host.inside(Path::new(SNAPSHOTTER_SOCKET)));
    let t = std::time::Instant::now();
    loop {
        let active = c.list(&["kind==active"]).unwrap();
        if active.is_empty() {
            break;
        }
        assert!(
            t.elapsed().as_secs() < 30,
            "writable snapshots left: {:?}",
            active.iter().map(|i| &i.name).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(host.mounts_under(&host.snapshotter_root().join("rwmnt")).is_empty(), "writable mounts left");
    let t = std::time::Instant::now();
    while layers(&root) > 0 {
        assert!(t.elapsed().as_secs() < 30, "layers left: {}", layers(&root));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_no_loops(&host.dir);
}
