//! Unit tests of option parsing.
use super::*;

#[test]
fn defaults_are_the_spec_defaults() {
    let c = Config::from_opts::<&str>(&[]).unwrap();
    assert_eq!(c.root, PathBuf::from("/var/lib/docker/loopback/root"));
    assert_eq!(c.fallback, PathBuf::from("/var/lib/docker/loopback/private"));
    assert!(!c.override_kernel_check);
    assert_eq!(c.fs, FsType::Ext4);
    assert_eq!(c.verify, VerifyMode::Identity);
    assert_eq!(c.direct_io, DirectIo::Auto);
    assert!(!c.require_shared_root);
    assert!(Config::from_opts(&["sharedloop.require_shared_root=true"]).unwrap().require_shared_root);
    assert!(Config::from_opts(&["sharedloop.require_shared_root"]).unwrap().require_shared_root);
    assert!(Config::from_opts(&["sharedloop.require_shared_root=maybe"]).is_err());
    assert_eq!(Config::from_opts(&["sharedloop.direct_io=auto"]).unwrap().direct_io, DirectIo::Auto);
    assert_eq!(Config::from_opts(&["sharedloop.direct_io=true"]).unwrap().direct_io, DirectIo::On);
    assert!(DirectIo::On.for_file(std::path::Path::new("/proc/self/status")));
    assert!(!DirectIo::Off.for_file(std::path::Path::new("/")));
}

/// The names documented as options: docs/options.md's table rows and
/// the man page's `.BI sharedloop.NAME=` items.
fn documented(text: &str, start: &str, end: char) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(start))
        .filter_map(|rest| rest.split_once(end).map(|(name, _)| name.to_owned()))
        .collect()
}

#[test]
fn the_option_table_is_the_documented_options() {
    let names: Vec<String> = OPTIONS.iter().map(|o| o.name.to_owned()).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let md = std::fs::read_to_string(dir.join("docs/options.md")).unwrap();
    let man = std::fs::read_to_string(dir.join("man/sharedloop.8")).unwrap();
    let mut in_md = documented(&md, "| `sharedloop.", '`');
    let mut in_man = documented(&man, ".BI sharedloop.", '=');
    let mut sorted = names.clone();
    sorted.sort();
    in_md.sort();
    in_man.sort();
    assert_eq!(in_md, sorted, "docs/options.md's option table and OPTIONS differ");
    assert_eq!(in_man, sorted, "man/sharedloop.8's options and OPTIONS differ");
    let known = known_options();
    for n in &names {
        assert!(known.contains(&format!("sharedloop.{n}")), "{known}");
        // Every option parses by its name (a path for the path options).
        let v = if n.starts_with("loopback_") { "/x" } else { "" };
        let e = Config::default().set(&format!("sharedloop.{n}"), Some(v));
        assert!(!matches!(&e, Err(e) if e.to_string().contains("unknown option")), "{n}: {e:?}");
    }
}

#[test]
fn every_option_parses() {
    let c = Config::from_opts(&[
        "sharedloop.loopback_root=/srv/shared",
        "Sharedloop.Loopback_Fallback = /var/tmp/priv",
        "sharedloop.override_kernel_check",
        "sharedloop.fs=xfs",
        "sharedloop.size=2G",
        "sharedloop.direct_io=false",
        "sharedloop.heartbeat_interval=2m",
        "sharedloop.verify=full",
        "sharedloop.max_layer_size=20G",
    ])
    .unwrap();
    assert_eq!(c.root, PathBuf::from("/srv/shared"));
    assert_eq!(c.fallback, PathBuf::from("/var/tmp/priv"));
    assert!(c.override_kernel_check);
    assert_eq!(c.fs, FsType::Xfs);
    assert_eq!(c.rw_size, Bytes(2 * Bytes::GIB));
    assert_eq!(c.direct_io, DirectIo::Off);
    assert_eq!(c.heartbeat_secs, 120);
    assert_eq!(c.verify, VerifyMode::Full);
    assert_eq!(c.max_layer_size, Some(Bytes(20 * Bytes::GIB)));
    assert_eq!(Config::default().max_layer_size, None);
    assert_eq!(Config::from_opts(&["sharedloop.max_layer_size=none"]).unwrap().max_layer_size, None);
    let c = Config::from_opts(&["sharedloop.override_kernel_check=false"]).unwrap();
    assert!(!c.override_kernel_check);
}

#[test]
fn bad_options_name_the_option() {
    for (opt, name) in [
        ("sharedloop.colour=blue", "sharedloop.colour"),
        ("sharedloop.fs=btrfs", "sharedloop.fs"),
        ("sharedloop.loopback_root=relative/dir", "sharedloop.loopback_root"),
        ("sharedloop.loopback_root", "sharedloop.loopback_root"),
        ("sharedloop.override_kernel_check=maybe", "sharedloop.override_kernel_check"),
        ("sharedloop.size=huge", "sharedloop.size"),
        ("sharedloop.heartbeat_interval=soon", "sharedloop.heartbeat_interval"),
        ("sharedloop.direct_io=sometimes", "sharedloop.direct_io"),
        ("sharedloop.verify=maybe", "sharedloop.verify"),
        ("sharedloop.max_layer_size=big", "sharedloop.max_layer_size"),
        ("overlay2.size=1G", "overlay2.size"),
    ] {
        let e = Config::from_opts(&[opt]).unwrap_err().to_string();
        assert!(e.contains(name), "{opt}: {e}");
    }
    let e =
        Config::from_opts(&["sharedloop.loopback_root=/a", "sharedloop.loopback_fallback=/a"]).unwrap_err().to_string();
    assert!(e.contains("sharedloop.loopback_fallback"), "{e}");
}

#[test]
fn too_large_sizes_name_the_option_and_the_limit() {
    for (opt, name) in [
        ("sharedloop.size=9999999T", "sharedloop.size"),
        ("sharedloop.max_layer_size=9999999T", "sharedloop.max_layer_size"),
    ] {
        let e = Config::from_opts(&[opt]).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("9999999T") && e.contains("8.0 EiB"), "{opt}: {e}");
        assert!(!e.contains("integral type"), "{opt}: {e}");
    }
    let e = Config::from_opts(&["sharedloop.size=0"]).unwrap_err().to_string();
    assert!(e.contains("sharedloop.size") && e.contains("zero"), "{e}");
    assert_eq!(parse_size("size", "2G").unwrap(), Bytes(2 * Bytes::GIB));
    let e = parse_size("size", "9999999T").unwrap_err().to_string();
    assert!(e.starts_with("option size: ") && e.contains("8.0 EiB"), "{e}");
}

#[test]
fn kernel_check() {
    // The test kernel has every feature; the override skips probing.
    assert!(Config::default().check_kernel().is_ok());
    let c = Config { override_kernel_check: true, ..Config::default() };
    assert!(c.check_kernel().is_ok());
    let e = Error::KernelTooOld { release: "5.4.0".into(), feature: "LOOP_CONFIGURE".into(), detail: "EINVAL".into() };
    let e = e.to_string();
    assert!(e.contains("LOOP_CONFIGURE") && e.contains("sharedloop.override_kernel_check"), "{e}");
}

#[test]
fn writable_layers_is_image_or_dir() {
    assert_eq!(Config::default().writable_layers, WritableLayers::Image);
    let c = Config::from_opts(&["sharedloop.writable_layers=dir".to_owned()]).unwrap();
    assert_eq!(c.writable_layers, WritableLayers::Dir);
    let c = Config::from_opts(&["sharedloop.writable_layers=image".to_owned()]).unwrap();
    assert_eq!(c.writable_layers, WritableLayers::Image);
    let e = Config::from_opts(&["sharedloop.writable_layers=tmpfs".to_owned()]).unwrap_err().to_string();
    assert!(e.contains("writable_layers") && e.contains("image or dir"), "{e}");
    let e = Config::from_opts(&["sharedloop.writable_layers".to_owned()]).unwrap_err().to_string();
    assert!(e.contains("writable_layers") && e.contains("needs a value"), "{e}");
}
