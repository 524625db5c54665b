//! `sharedloop configure containerd|docker`: wires sharedloop into an
//! engine's configuration file by merging, never replacing: what the file
//! has stays (comments and formatting too, for containerd's TOML), what
//! sharedloop needs is added or corrected, the file as it was is kept once
//! as `<file>.before-sharedloop`, and every change is printed. Running it
//! again changes nothing. `scripts/setup` uses it; docs/engines.md says
//! what each engine and version needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use toml_edit::{value, ArrayOfTables, DocumentMut, InlineTable, Item, Table};

#[derive(clap::Args, Debug)]
pub struct ConfigureArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Add sharedloop to containerd's config.toml as the proxy snapshotter
    /// "sharedloop"; on containerd 2.x also to the transfer service's
    /// unpack configuration (without it `ctr image import/pull` cannot
    /// unpack into sharedloop).
    Containerd {
        /// containerd's config file (created when missing).
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        config: PathBuf,
        /// The socket sharedloop serves the snapshotter on.
        #[arg(long, default_value = crate::serve::DEFAULT_CONTAINERD_SOCKET)]
        socket: PathBuf,
        /// The snapshotter's root (`serve --containerd-root`), exported to
        /// containerd so that CRI's ImageFsInfo (kubelet's image
        /// filesystem stats, for image GC and eviction) names it.
        #[arg(long, default_value = crate::serve::DEFAULT_CONTAINERD_ROOT)]
        root: PathBuf,
        /// containerd's major version; by default from `containerd --version`.
        #[arg(long)]
        containerd_major: Option<u32>,
        /// Also make sharedloop the CRI plugin's snapshotter (Kubernetes),
        /// with the snapshot annotations that let a host skip layers
        /// already in the shared store.
        #[arg(long)]
        cri: bool,
        /// Print what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Make Docker use sharedloop: through containerd's image store
    /// (Docker 27 and later; 28 and later load no graphdriver plugins) or
    /// as a graphdriver plugin (Docker 26 and earlier).
    Docker {
        /// dockerd's daemon.json (created when missing).
        #[arg(long, default_value = "/etc/docker/daemon.json")]
        daemon_json: PathBuf,
        /// By default containerd for dockerd 27 and later, plugin before.
        #[arg(long, value_enum)]
        mode: Option<DockerMode>,
        /// In containerd mode, set daemon.json's `containerd` (the
        /// containerd dockerd uses; it must have sharedloop as a proxy
        /// snapshotter: `configure containerd`). Without it dockerd uses
        /// the containerd at /run/containerd/containerd.sock when one runs
        /// there (and starts one of its own, without sharedloop, when
        /// none does). Not with dockerd's --containerd flag: dockerd
        /// refuses a setting given both ways.
        #[arg(long)]
        containerd_socket: Option<String>,
        /// Print what would change; write nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DockerMode {
    /// `storage-driver: sharedloop` with the containerd image store.
    Containerd,
    /// `storage-driver: sharedloop` as a graphdriver plugin (experimental).
    Plugin,
}

pub fn configure(args: &ConfigureArgs) -> anyhow::Result<i32> {
    match &args.what {
        What::Containerd { config, socket, root, containerd_major, cri, dry_run } => {
            let major = match containerd_major {
                Some(m) => *m,
                None => engine_major("containerd")
                    .context("cannot tell containerd's version (`containerd --version`); give --containerd-major")?,
            };
            let old = read_opt(config)?;
            let (new, changes) = merge_containerd(old.as_deref(), socket, root, major, *cri)
                .with_context(|| format!("{} (fix it, or move it away to start afresh)", config.display()))?;
            apply(config, old.as_deref(), &new, &changes, *dry_run)
        }
        What::Docker { daemon_json, mode, containerd_socket, dry_run } => {
            let mode = match mode {
                Some(m) => *m,
                None => match engine_major("dockerd") {
                    Some(m) if m >= 27 => DockerMode::Containerd,
                    Some(_) => DockerMode::Plugin,
                    None => bail!("cannot tell dockerd's version (`dockerd --version`); give --mode"),
                },
            };
            let old = read_opt(daemon_json)?;
            let (new, changes) = merge_daemon_json(old.as_deref(), mode, containerd_socket.as_deref())
                .with_context(|| format!("{} (fix it, or move it away to start afresh)", daemon_json.display()))?;
            apply(daemon_json, old.as_deref(), &new, &changes, *dry_run)
        }
    }
}

fn read_opt(p: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(p) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

/// The major version in `<prog> --version`: the first word that looks like
/// a version (`1.7.24~ds1`, `v2.1.4`, `28.5.2+dfsg4,`).
pub fn engine_major(prog: &str) -> Option<u32> {
    let out = Command::new(prog).arg("--version").output().ok()?;
    version_major(&String::from_utf8_lossy(&out.stdout))
}

pub fn version_major(text: &str) -> Option<u32> {
    text.split_whitespace().find_map(|w| {
        let w = w.strip_prefix('v').unwrap_or(w);
        let (major, rest) = w.split_once('.')?;
        (rest.starts_with(|c: char| c.is_ascii_digit())).then(|| major.parse().ok()).flatten()
    })
}

/// Writes `new` over `path` when `changes` is not empty (backup once,
/// atomic rename, the old file's mode), printing each change.
fn apply(path: &Path, old: Option<&str>, new: &str, changes: &[String], dry_run: bool) -> anyhow::Result<i32> {
    if changes.is_empty() {
        println!("{}: already configured for sharedloop; unchanged", path.display());
        return Ok(0);
    }
    let verb = if dry_run { "would change" } else { "changed" };
    for c in changes {
        println!("{}: {verb}: {c}", path.display());
    }
    if dry_run {
        return Ok(0);
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut mode = 0o644;
    if let Some(old) = old {
        use std::os::unix::fs::PermissionsExt as _;
        mode = std::fs::metadata(path)?.permissions().mode() & 0o7777;
        let backup = PathBuf::from(format!("{}.before-sharedloop", path.display()));
        if !backup.exists() {
            std::fs::write(&backup, old).with_context(|| format!("cannot write {}", backup.display()))?;
            println!("{}: the file as it was is kept as {}", path.display(), backup.display());
        }
    }
    let tmp = dir.join(format!(".{}.sharedloop-tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("config")));
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(new.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(0)
}

/// The platform containerd names this machine by (`linux/amd64`).
fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        a => a,
    };
    format!("linux/{arch}")
}

/// `table[key]` as a table, created (implicit: no header of its own) when
/// missing; an error naming `what` when it is something else.
fn subtable<'a>(t: &'a mut Table, key: &str, what: &str) -> anyhow::Result<&'a mut Table> {
    if !t.contains_key(key) {
        let mut n = Table::new();
        n.set_implicit(true);
        t.insert(key, Item::Table(n));
    }
    if t.get(key).is_some_and(|i| i.is_inline_table()) {
        // An inline table cannot take sub-tables; make it a table.
        if let Some(Item::Value(toml_edit::Value::InlineTable(it))) = t.remove(key) {
            t.insert(key, Item::Table(it.into_table()));
        }
    }
    match t.get_mut(key) {
        Some(Item::Table(t)) => Ok(t),
        _ => bail!("{what} is not a table"),
    }
}

/// Sets `t[key] = v` unless it is already; records the change.
fn set_str(t: &mut Table, key: &str, v: &str, what: &str, changes: &mut Vec<String>) {
    let cur = t.get(key).and_then(|i| i.as_str()).map(str::to_owned);
    if cur.as_deref() != Some(v) {
        t.insert(key, value(v));
        changes.push(match cur {
            Some(c) => format!("{what} = {c:?} -> {v:?}"),
            None => format!("{what} = {v:?}"),
        });
    }
}

fn set_bool(t: &mut Table, key: &str, v: bool, what: &str, changes: &mut Vec<String>) {
    let cur = t.get(key).and_then(|i| i.as_bool());
    if cur != Some(v) {
        t.insert(key, value(v));
        changes.push(format!("{what} = {v}"));
    }
}

/// containerd's config with sharedloop added: the proxy plugin, on 2.x
/// the transfer service's unpack entries, with `cri` the CRI plugin's
/// snapshotter. Returns the new text and what changed.
pub fn merge_containerd(
    old: Option<&str>,
    socket: &Path,
    root_dir: &Path,
    major: u32,
    cri: bool,
) -> anyhow::Result<(String, Vec<String>)> {
    let mut changes = Vec::new();
    let mut doc: DocumentMut = match old {
        Some(t) => t.parse().context("containerd's config does not parse as TOML")?,
        None => {
            let mut d = DocumentMut::new();
            d["version"] = value(if major >= 2 { 3 } else { 2 });
            changes.push(format!("new file, config version {}", if major >= 2 { 3 } else { 2 }));
            d
        }
    };
    // No `version` key is version 1 to containerd.
    let version = doc.get("version").and_then(|v| v.as_integer()).unwrap_or(1);
    let root = doc.as_table_mut();

    let proxies = subtable(root, "proxy_plugins", "proxy_plugins")?;
    let p = subtable(proxies, "sharedloop", "proxy_plugins.sharedloop")?;
    p.set_implicit(false);
    set_str(p, "type", "snapshot", "[proxy_plugins.sharedloop] type", &mut changes);
    set_str(p, "address", &socket.display().to_string(), "[proxy_plugins.sharedloop] address", &mut changes);
    let root_dir = root_dir.display().to_string();
    let exported = p.get("exports").and_then(|e| e.get("root")).and_then(|r| r.as_str()).map(str::to_owned);
    if exported.as_deref() != Some(root_dir.as_str()) {
        if !p.get("exports").is_some_and(|e| e.is_table_like()) {
            p.insert("exports", value(InlineTable::new()));
        }
        if let Some(e) = p.get_mut("exports").and_then(|e| e.as_table_like_mut()) {
            e.insert("root", value(root_dir.as_str()));
        }
        changes.push(format!("[proxy_plugins.sharedloop] exports.root = {root_dir:?} (CRI's image filesystem)"));
    }

    if major >= 2 {
        // The transfer service unpacks only into the snapshotters its
        // unpack_config names; an empty list means its default
        // (overlayfs), which a list of our own would drop: keep it first.
        let plugins = subtable(root, "plugins", "plugins")?;
        let transfer = subtable(plugins, "io.containerd.transfer.v1.local", "the transfer service's section")?;
        let platform = platform();
        let names = |e: &dyn toml_edit::TableLike| e.get("snapshotter").and_then(|s| s.as_str()) == Some("sharedloop");
        match transfer.get_mut("unpack_config") {
            None => {
                let mut a = ArrayOfTables::new();
                for snap in ["overlayfs", "sharedloop"] {
                    let mut t = Table::new();
                    t.insert("platform", value(platform.as_str()));
                    t.insert("snapshotter", value(snap));
                    a.push(t);
                }
                transfer.insert("unpack_config", Item::ArrayOfTables(a));
                changes.push(format!(
                    "transfer service unpack_config: {platform} into overlayfs (containerd's default) and sharedloop"
                ));
            }
            Some(Item::ArrayOfTables(a)) => {
                if !a.iter().any(|t| names(t)) {
                    let mut t = Table::new();
                    t.insert("platform", value(platform.as_str()));
                    t.insert("snapshotter", value("sharedloop"));
                    a.push(t);
                    changes.push(format!("transfer service unpack_config: added {platform} into sharedloop"));
                }
            }
            Some(Item::Value(toml_edit::Value::Array(a))) => {
                if !a.iter().any(|v| v.as_inline_table().is_some_and(|t| names(t))) {
                    let mut t = InlineTable::new();
                    t.insert("platform", platform.as_str().into());
                    t.insert("snapshotter", "sharedloop".into());
                    a.push(t);
                    changes.push(format!("transfer service unpack_config: added {platform} into sharedloop"));
                }
            }
            Some(_) => bail!("unpack_config of the transfer service is not a list"),
        }
    }

    if cri {
        let plugins = subtable(root, "plugins", "plugins")?;
        let (t, what) = match version {
            1 => {
                let c = subtable(plugins, "cri", "plugins.cri")?;
                (subtable(c, "containerd", "plugins.cri.containerd")?, "[plugins.cri.containerd]")
            }
            2 => {
                let c = subtable(plugins, "io.containerd.grpc.v1.cri", "the CRI plugin's section")?;
                (
                    subtable(c, "containerd", "the CRI plugin's containerd section")?,
                    "[plugins.\"io.containerd.grpc.v1.cri\".containerd]",
                )
            }
            _ => (
                subtable(plugins, "io.containerd.cri.v1.images", "the CRI image service's section")?,
                "[plugins.\"io.containerd.cri.v1.images\"]",
            ),
        };
        t.set_implicit(false);
        set_str(t, "snapshotter", "sharedloop", &format!("{what} snapshotter"), &mut changes);
        set_bool(
            t,
            "disable_snapshot_annotations",
            false,
            &format!("{what} disable_snapshot_annotations"),
            &mut changes,
        );
    }
    Ok((doc.to_string(), changes))
}

/// daemon.json with sharedloop as the storage driver in `mode`.
pub fn merge_daemon_json(
    old: Option<&str>,
    mode: DockerMode,
    containerd_socket: Option<&str>,
) -> anyhow::Result<(String, Vec<String>)> {
    use serde_json::{Map, Value};
    let mut changes = Vec::new();
    let mut doc: Map<String, Value> = match old {
        Some(t) if !t.trim().is_empty() => {
            match serde_json::from_str::<Value>(t).context("daemon.json does not parse as JSON")? {
                Value::Object(m) => m,
                _ => bail!("daemon.json is not a JSON object"),
            }
        }
        _ => Map::new(),
    };
    match doc.get("storage-driver").and_then(Value::as_str) {
        Some("sharedloop") => {}
        Some(other) => {
            let other = other.to_owned();
            doc.insert("storage-driver".into(), "sharedloop".into());
            changes.push(format!(
                "storage-driver {other:?} -> \"sharedloop\" (what {other} stored stays on disk, hidden until you switch back)"
            ));
        }
        None => {
            doc.insert("storage-driver".into(), "sharedloop".into());
            changes.push("storage-driver = \"sharedloop\"".into());
        }
    }
    if doc.contains_key("storage-opts") && mode == DockerMode::Containerd {
        // Ignored with a snapshotter; the snapshotter's options are in
        // sharedloop's own config file.
        changes
            .push("note: storage-opts are not passed to a snapshotter; set them in /etc/sharedloop/config.toml".into());
    }
    let features = doc.entry("features").or_insert_with(|| Value::Object(Map::new()));
    let Some(features) = features.as_object_mut() else { bail!("\"features\" is not an object") };
    let want_snapshotter = mode == DockerMode::Containerd;
    let cur = features.get("containerd-snapshotter").and_then(Value::as_bool);
    if cur != Some(want_snapshotter) && (want_snapshotter || cur == Some(true)) {
        features.insert("containerd-snapshotter".into(), want_snapshotter.into());
        changes.push(format!("features.containerd-snapshotter = {want_snapshotter}"));
    }
    if features.is_empty() {
        doc.remove("features");
    }
    match mode {
        DockerMode::Containerd => {
            if let Some(sock) = containerd_socket {
                if doc.get("containerd").and_then(Value::as_str) != Some(sock) {
                    doc.insert("containerd".into(), sock.into());
                    changes.push(format!("containerd = {sock:?} (the containerd that has sharedloop)"));
                }
            }
        }
        DockerMode::Plugin => {
            if doc.get("experimental").and_then(Value::as_bool) != Some(true) {
                doc.insert("experimental".into(), true.into());
                changes.push("experimental = true (graphdriver plugins need it)".into());
            }
        }
    }
    let changes: Vec<String> = if changes.iter().all(|c| c.starts_with("note:")) { Vec::new() } else { changes };
    let mut text = serde_json::to_string_pretty(&Value::Object(doc))?;
    text.push('\n');
    Ok((text, changes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCK: &str = "/run/sharedloop/containerd.sock";
    const ROOT: &str = "/var/lib/sharedloop/containerd";

    #[test]
    fn versions_are_read_from_each_engines_banner() {
        assert_eq!(
            version_major("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"),
            Some(1)
        );
        assert_eq!(version_major("containerd github.com/containerd/containerd/v2 2.1.9+unknown"), Some(2));
        assert_eq!(version_major("containerd containerd.io v1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da"), Some(1));
        assert_eq!(version_major("Docker version 28.5.2+dfsg4, build 3ef3c07"), Some(28));
        assert_eq!(version_major("Docker version 20.10.24+dfsg1, build 5d6db84"), Some(20));
        assert_eq!(version_major("no version here"), None);
    }

    #[test]
    fn containerd_config_is_created_per_version() {
        let (t, c) = merge_containerd(None, Path::new(SOCK), Path::new(ROOT), 1, false).unwrap();
        assert!(t.starts_with("version = 2\n"), "{t}");
        assert!(
            t.contains(
                "[proxy_plugins.sharedloop]\ntype = \"snapshot\"\naddress = \"/run/sharedloop/containerd.sock\""
            ),
            "{t}"
        );
        assert!(!t.contains("unpack_config") && !t.contains("[proxy_plugins]\n"), "{t}");
        assert_eq!(c.len(), 4, "{c:?}");
        let (t, _) = merge_containerd(None, Path::new(SOCK), Path::new(ROOT), 2, true).unwrap();
        assert!(t.starts_with("version = 3\n"), "{t}");
        let doc: toml::Value = toml::from_str(&t).unwrap();
        let u = doc["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"].as_array().unwrap();
        let snaps: Vec<&str> = u.iter().map(|e| e["snapshotter"].as_str().unwrap()).collect();
        assert_eq!(snaps, ["overlayfs", "sharedloop"]);
        assert_eq!(u[1]["platform"].as_str(), Some(platform().as_str()));
        let images = &doc["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(images["snapshotter"].as_str(), Some("sharedloop"));
        assert_eq!(images["disable_snapshot_annotations"].as_bool(), Some(false));
    }

    #[test]
    fn containerd_config_is_merged_keeping_what_was_there_and_is_idempotent() {
        let old = "# my cluster's settings\nversion = 2\nroot = \"/srv/containerd\"\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"reg.local/pause:3.9\"\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n    snapshotter = \"overlayfs\"\n\n[proxy_plugins]\n  [proxy_plugins.stargz]\n    type = \"snapshot\"\n    address = \"/run/stargz.sock\"\n  [proxy_plugins.sharedloop]\n    type = \"snapshot\"\n    address = \"/elsewhere.sock\"\n";
        let (t, c) = merge_containerd(Some(old), Path::new(SOCK), Path::new(ROOT), 1, true).unwrap();
        assert!(t.starts_with("# my cluster's settings\nversion = 2\nroot = \"/srv/containerd\"\n"), "{t}");
        assert!(t.contains("sandbox_image = \"reg.local/pause:3.9\""), "{t}");
        assert!(t.contains("address = \"/run/stargz.sock\""), "{t}");
        assert!(c.iter().any(|c| c.contains("\"/elsewhere.sock\" -> \"/run/sharedloop/containerd.sock\"")), "{c:?}");
        assert!(c.iter().any(|c| c.contains("snapshotter = \"overlayfs\" -> \"sharedloop\"")), "{c:?}");
        let doc: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(
            doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["disable_snapshot_annotations"].as_bool(),
            Some(false)
        );
        assert_eq!(doc["proxy_plugins"]["sharedloop"]["address"].as_str(), Some(SOCK));
        let (t2, c2) = merge_containerd(Some(&t), Path::new(SOCK), Path::new(ROOT), 1, true).unwrap();
        assert!(c2.is_empty() && t2 == t, "{c2:?}");
    }

    #[test]
    fn containerd_2_unpack_list_is_extended_not_replaced() {
        let old = "version = 3\n[plugins.\"io.containerd.transfer.v1.local\"]\n  unpack_config = [{ platform = \"linux/arm64\", snapshotter = \"overlayfs\" }]\n";
        let (t, c) = merge_containerd(Some(old), Path::new(SOCK), Path::new(ROOT), 2, false).unwrap();
        let doc: toml::Value = toml::from_str(&t).unwrap();
        let u = doc["plugins"]["io.containerd.transfer.v1.local"]["unpack_config"].as_array().unwrap();
        assert_eq!(u.len(), 2, "{t}");
        assert_eq!(u[0]["platform"].as_str(), Some("linux/arm64"));
        assert_eq!(u[1]["snapshotter"].as_str(), Some("sharedloop"));
        assert!(c.iter().any(|c| c.contains("unpack_config")));
        assert!(merge_containerd(Some(&t), Path::new(SOCK), Path::new(ROOT), 2, false).unwrap().1.is_empty());
        // A v1 file (no version key) gets the v1 CRI section.
        let (t, _) = merge_containerd(Some("oom_score = 0\n"), Path::new(SOCK), Path::new(ROOT), 1, true).unwrap();
        let doc: toml::Value = toml::from_str(&t).unwrap();
        assert_eq!(doc["plugins"]["cri"]["containerd"]["snapshotter"].as_str(), Some("sharedloop"));
    }

    #[test]
    fn containerd_config_errors_name_the_problem() {
        let e = merge_containerd(Some("[[["), Path::new(SOCK), Path::new(ROOT), 1, false).unwrap_err();
        assert!(format!("{e:#}").contains("does not parse as TOML"), "{e:#}");
        let e = merge_containerd(Some("proxy_plugins = 3\n"), Path::new(SOCK), Path::new(ROOT), 1, false).unwrap_err();
        assert!(format!("{e:#}").contains("proxy_plugins is not a table"), "{e:#}");
    }

    #[test]
    fn daemon_json_is_merged_per_mode() {
        let old = "{\n  \"log-level\": \"warn\",\n  \"storage-driver\": \"overlay2\",\n  \"features\": {\"buildkit\": true}\n}\n";
        let (t, c) =
            merge_daemon_json(Some(old), DockerMode::Containerd, Some("/run/containerd/containerd.sock")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!(v["log-level"], "warn");
        assert_eq!(v["storage-driver"], "sharedloop");
        assert_eq!(v["features"]["buildkit"], true);
        assert_eq!(v["features"]["containerd-snapshotter"], true);
        assert_eq!(v["containerd"], "/run/containerd/containerd.sock");
        assert!(c.iter().any(|c| c.contains("\"overlay2\" -> \"sharedloop\"")), "{c:?}");
        assert!(t.find("log-level").unwrap() < t.find("storage-driver").unwrap(), "key order kept: {t}");
        assert!(merge_daemon_json(Some(&t), DockerMode::Containerd, None).unwrap().1.is_empty());

        let (t, c) = merge_daemon_json(None, DockerMode::Plugin, None).unwrap();
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        assert_eq!((v["storage-driver"].as_str(), v["experimental"].as_bool()), (Some("sharedloop"), Some(true)));
        assert!(v.get("features").is_none() && v.get("containerd").is_none(), "{t}");
        assert_eq!(c.len(), 2, "{c:?}");
        // Switching an image-store config back to the plugin turns the
        // feature off.
        let (t, _) =
            merge_daemon_json(Some("{\"features\":{\"containerd-snapshotter\":true}}"), DockerMode::Plugin, None)
                .unwrap();
        assert!(t.contains("\"containerd-snapshotter\": false"), "{t}");
        assert!(format!("{:#}", merge_daemon_json(Some("[1]"), DockerMode::Plugin, None).unwrap_err())
            .contains("not a JSON object"));
        assert!(format!("{:#}", merge_daemon_json(Some("{"), DockerMode::Plugin, None).unwrap_err())
            .contains("does not parse"));
    }
}
