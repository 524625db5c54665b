//! `sharedloop serve`: the front ends, their options and their sockets.
//!
//! The Docker plugin takes its options from dockerd (`--storage-opt`,
//! passed at Init). The containerd snapshotter takes the same options from
//! the config file (`/etc/sharedloop/config.toml`) and from `-o` flags,
//! flags last.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use sharedloop_containerd::Snapshotter;
use sharedloop_core::layermounts::LayerMounts;
use sharedloop_core::{options, Config, Driver};

pub const DEFAULT_CONFIG: &str = "/etc/sharedloop/config.toml";

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The config file; a missing file at the default path means defaults.
    #[arg(long, default_value = DEFAULT_CONFIG)]
    config: PathBuf,
    /// The Docker plugin socket; dockerd finds plugins in /run/docker/plugins/.
    #[arg(long)]
    docker_socket: Option<PathBuf>,
    /// Do not serve the Docker plugin.
    #[arg(long)]
    no_docker: bool,
    /// Serve the containerd snapshotter (also `[containerd] enable = true`).
    #[arg(long)]
    containerd: bool,
    /// The snapshotter socket, for containerd's `proxy_plugins`.
    #[arg(long)]
    containerd_socket: Option<PathBuf>,
    /// The snapshotter's own state: snapshot records, writable images.
    #[arg(long)]
    containerd_root: Option<PathBuf>,
    /// An option of the containerd snapshotter, as `key=value` with the
    /// Docker storage option names (`loopback_root=/shared/layers`, with or
    /// without the `sharedloop.` prefix). Repeatable; wins over the file.
    #[arg(short = 'o', long = "opt", value_name = "KEY=VALUE")]
    opts: Vec<String>,
    /// Let this group use the sockets too (mode 0660); a name from
    /// the system's group database (NSS: /etc/group, LDAP, SSSD) or a
    /// number. Without it the sockets are root's (0600).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (an IP address
    /// and port, such as 127.0.0.1:9323). Without it (nor
    /// `metrics_address` in the config file) there is no metrics listener.
    #[arg(long, value_name = "ADDRESS")]
    metrics_address: Option<String>,
    /// Where the plugin keeps what dockerd told it at Init (a restarted
    /// plugin serves the same driver; dockerd does not call Init again),
    /// and the layer mounts of this host.
    #[arg(long, default_value = "/run/sharedloop")]
    run_dir: PathBuf,
}

/// `config.toml`. The sections refuse unknown keys; the other top-level
/// keys (and those of a `[sharedloop]` table, TOML's reading of
/// `sharedloop.fs = ...`) are storage options, each set through core's
/// option table ([`options::OPTIONS`]), which names an unknown one.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    socket_group: Option<toml::Value>,
    metrics_address: Option<toml::Value>,
    #[serde(default)]
    docker: DockerSection,
    #[serde(default)]
    containerd: ContainerdSection,
    #[serde(flatten)]
    options: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DockerSection {
    enable: Option<bool>,
    socket: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContainerdSection {
    enable: Option<bool>,
    socket: Option<PathBuf>,
    root: Option<PathBuf>,
}

/// What `serve` will do, from file and flags.
#[derive(Debug, PartialEq)]
pub struct Plan {
    /// The group given the sockets, resolved to a gid.
    pub socket_gid: Option<u32>,
    pub docker: Option<PathBuf>,
    pub containerd: Option<(PathBuf, PathBuf, Config)>,
    pub run_dir: PathBuf,
    /// Where to serve the metrics.
    pub metrics: Option<std::net::SocketAddr>,
}

/// A storage option's full name: `fs` and `sharedloop.fs` are both
/// `sharedloop.fs`.
fn option_key(key: &str) -> String {
    if key.trim().to_ascii_lowercase().starts_with(options::PREFIX) {
        key.to_owned()
    } else {
        format!("{}{}", options::PREFIX, key.trim())
    }
}

/// A config-file option's value as the option's parser reads it.
fn option_value(key: &str, v: &toml::Value) -> anyhow::Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Integer(i) => i.to_string(),
        other => bail!("option {}: {other} is not a string, number or boolean", option_key(key)),
    })
}

/// What `serve` with only `--config config` would do (for `doctor`).
pub fn plan_for_config(config: &Path) -> anyhow::Result<Plan> {
    ServeArgs {
        config: config.to_owned(),
        docker_socket: None,
        no_docker: false,
        containerd: false,
        containerd_socket: None,
        containerd_root: None,
        opts: Vec::new(),
        socket_group: None,
        run_dir: "/run/sharedloop".into(),
        metrics_address: None,
    }
    .plan()
}

/// The snapshotter socket when neither flag nor file names one.
pub const DEFAULT_CONTAINERD_SOCKET: &str = "/run/sharedloop/containerd.sock";
/// Where the snapshotter keeps its records and writable images.
pub const DEFAULT_CONTAINERD_ROOT: &str = "/var/lib/sharedloop/containerd";

impl ServeArgs {
    pub fn plan(&self) -> anyhow::Result<Plan> {
        let file: FileConfig = match std::fs::read_to_string(&self.config) {
            Ok(text) => toml::from_str(&text).with_context(|| format!("config file {}", self.config.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.config == Path::new(DEFAULT_CONFIG) => {
                FileConfig::default()
            }
            Err(e) => return Err(e).with_context(|| format!("reading config file {}", self.config.display())),
        };
        let docker = (!self.no_docker && file.docker.enable.unwrap_or(true)).then(|| {
            self.docker_socket
                .clone()
                .or(file.docker.socket)
                .unwrap_or_else(|| "/run/docker/plugins/sharedloop.sock".into())
        });
        let containerd = if self.containerd || file.containerd.enable.unwrap_or(false) {
            // The options go straight into the config, each through its
            // entry in the option table: the file's first, then `-o`.
            let mut cfg = Config::default();
            for (k, v) in &file.options {
                // `sharedloop.fs = ...` is a dotted key: a table in TOML.
                let entries: Vec<(&String, &toml::Value)> = match (k.as_str(), v) {
                    ("sharedloop", toml::Value::Table(t)) => t.iter().collect(),
                    _ => vec![(k, v)],
                };
                for (k, v) in entries {
                    let set = option_value(k, v).and_then(|v| Ok(cfg.set(&option_key(k), Some(&v))?));
                    set.with_context(|| format!("config file {}", self.config.display()))?;
                }
            }
            for o in &self.opts {
                let (k, v) = o.split_once('=').unwrap_or((o, "true"));
                cfg.set(&option_key(k), Some(v))?;
            }
            cfg.validate()?;
            let socket = self
                .containerd_socket
                .clone()
                .or(file.containerd.socket)
                .unwrap_or_else(|| DEFAULT_CONTAINERD_SOCKET.into());
            let root =
                self.containerd_root.clone().or(file.containerd.root).unwrap_or_else(|| DEFAULT_CONTAINERD_ROOT.into());
            Some((socket, root, cfg))
        } else {
            if !self.opts.is_empty() {
                bail!("-o sets options of the containerd snapshotter; the Docker plugin takes its options from dockerd's --storage-opt");
            }
            None
        };
        let group = match (&self.socket_group, &file.socket_group) {
            (Some(g), _) => Some(g.clone()),
            (None, Some(toml::Value::String(g))) => Some(g.clone()),
            (None, Some(toml::Value::Integer(g))) => Some(g.to_string()),
            (None, Some(v)) => bail!("config file {}: socket_group: {v} is not a group", self.config.display()),
            (None, None) => None,
        };
        let socket_gid = match group {
            Some(g) => Some(resolve_group(&g)?),
            None => None,
        };
        let metrics = match (&self.metrics_address, &file.metrics_address) {
            (Some(a), _) => Some(a.clone()),
            (None, Some(toml::Value::String(a))) => Some(a.clone()),
            (None, Some(v)) => bail!("config file {}: metrics_address: {v} is not an address", self.config.display()),
            (None, None) => None,
        };
        let metrics = match metrics {
            Some(a) => Some(a.parse::<std::net::SocketAddr>().map_err(|e| {
                anyhow::anyhow!("metrics address {a:?}: {e}; give an IP address and port, such as 127.0.0.1:9323")
            })?),
            None => None,
        };
        if docker.is_none() && containerd.is_none() {
            bail!("nothing to serve: the Docker plugin is off and the containerd snapshotter is not on (--containerd)");
        }
        Ok(Plan { socket_gid, docker, containerd, run_dir: self.run_dir.clone(), metrics })
    }
}

/// A group number as it is, or a group name resolved through NSS (so LDAP
/// and SSSD groups resolve as `getent group` shows them), as a gid.
fn resolve_group(g: &str) -> anyhow::Result<u32> {
    if let Ok(n) = g.parse::<u32>() {
        return Ok(n);
    }
    sharedloop_core::sys::group::gid_by_name(g)
        .with_context(|| format!("socket group {g:?}: looking it up"))?
        .with_context(|| format!("socket group {g:?}: no such group (as `getent group {g}` would show it)"))
}

/// Gives a socket to `gid` with mode 0660 (the front ends create them 0600).
fn share_socket(path: &Path, gid: Option<u32>) -> anyhow::Result<()> {
    if let Some(gid) = gid {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .with_context(|| format!("chown {}", path.display()))?;
        rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o660))
            .with_context(|| format!("chmod {}", path.display()))?;
    }
    Ok(())
}

/// Creates the run directory root's alone (0700; see
/// `sharedloop_core::perms`): its layer mounts show every image's files.
/// When a socket group is given and the snapshotter socket lives in it,
/// that group may pass through (0710) to reach the socket, but lists and
/// enters nothing else: `layers/` and `verified/` stay 0700.
fn private_run_dir(run_dir: &Path, gid: Option<u32>, socket: Option<&Path>) -> anyhow::Result<()> {
    sharedloop_core::perms::private_dir(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    if let (Some(gid), true) = (gid, socket.is_some_and(|s| s.parent() == Some(run_dir))) {
        rustix::fs::chown(run_dir, None, Some(rustix::fs::Gid::from_raw(gid)))
            .with_context(|| format!("chown {}", run_dir.display()))?;
        rustix::fs::chmod(run_dir, rustix::fs::Mode::from_raw_mode(0o710))
            .with_context(|| format!("chmod {}", run_dir.display()))?;
    }
    Ok(())
}

/// A front end's state for the metrics: its driver's store and writable
/// layers.
fn frontend_state(d: Option<&Driver>) -> sharedloop_core::metrics::FrontendState {
    let (writable, writable_mounted) = d.map(|d| d.writable_layers()).unwrap_or((0, 0));
    sharedloop_core::metrics::FrontendState { store: d.map(|d| d.store().clone()), writable, writable_mounted }
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let plan = args.plan()?;
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).max_blocking_threads(64).enable_all().build()?;
    rt.block_on(async move {
        let run_dir = plan.run_dir.clone();
        private_run_dir(&run_dir, plan.socket_gid, plan.containerd.as_ref().map(|c| c.0.as_path()))?;
        let mounts = LayerMounts::open(&run_dir.join("layers"), &run_dir.join("verified"), true)?;
        sharedloop_core::metrics::register_mounts(&mounts);
        let m = mounts.clone();
        let docker = plan.docker.clone();
        let plugin =
            tokio::task::spawn_blocking(move || docker.map(|_| Arc::new(sharedloop_docker::Plugin::new(&run_dir, m))))
                .await?;
        let m = mounts.clone();
        let ctr = plan.containerd.clone();
        let snapshotter = tokio::task::spawn_blocking(move || -> anyhow::Result<Option<Arc<Snapshotter>>> {
            let Some((_, root, cfg)) = ctr else { return Ok(None) };
            let d = Driver::open_shared(&root, cfg, m)
                .with_context(|| format!("opening the snapshotter state in {}", root.display()))?;
            tracing::info!(root = %root.display(), store = %d.config().root.display(),
                fallback = %d.config().fallback.display(), fs = d.config().fs.name(), "containerd snapshotter ready");
            Ok(Some(Arc::new(Snapshotter::open(d)?)))
        })
        .await??;
        if let Some(p) = &plugin {
            let p = p.clone();
            sharedloop_core::metrics::register_frontend("docker", move || {
                frontend_state(p.current_driver().as_deref())
            });
        }
        if let Some(sn) = &snapshotter {
            let sn = sn.clone();
            sharedloop_core::metrics::register_frontend("containerd", move || frontend_state(Some(sn.driver())));
        }
        if let Some(addr) = plan.metrics {
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding the metrics address {addr}"))?;
            crate::metrics::spawn(l).context("starting the metrics listener")?;
            tracing::info!(address = %addr, "serving metrics at /metrics");
        }
        // Every driver there was before a restart has claimed its mounts.
        let m = mounts.clone();
        tokio::task::spawn_blocking(move || m.sweep()).await?;

        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let mut tasks = tokio::task::JoinSet::new();
        if let (Some(plugin), Some(sock)) = (plugin, plan.docker.clone()) {
            let listener = sharedloop_docker::bind(&sock)
                .with_context(|| format!("binding the plugin socket {}", sock.display()))?;
            share_socket(&sock, plan.socket_gid)?;
            tracing::info!(socket = %sock.display(), "serving the Docker graphdriver plugin");
            let stop = stopped(stop_rx.clone());
            tasks.spawn(async move {
                let r = sharedloop_docker::serve(listener, plugin, stop).await.context("Docker plugin");
                let _ = std::fs::remove_file(&sock);
                r
            });
        }
        if let (Some(sn), Some((sock, _, _))) = (snapshotter, plan.containerd.clone()) {
            let listener = sharedloop_containerd::bind(&sock)
                .with_context(|| format!("binding the snapshotter socket {}", sock.display()))?;
            share_socket(&sock, plan.socket_gid)?;
            tracing::info!(socket = %sock.display(), "serving the containerd snapshotter");
            let stop = stopped(stop_rx.clone());
            tasks.spawn(async move {
                let r = sharedloop_containerd::serve(listener, sn, stop).await.context("containerd snapshotter");
                let _ = std::fs::remove_file(&sock);
                r
            });
        }
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        let first = tokio::select! {
            _ = term.recv() => None,
            _ = tokio::signal::ctrl_c() => None,
            r = tasks.join_next() => r,
        };
        tracing::info!("shutting down; layer mounts stay for running containers");
        let _ = stop_tx.send(true);
        if let Some(r) = first {
            r??;
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    fn plan(args: &[&str]) -> anyhow::Result<Plan> {
        T::try_parse_from(std::iter::once("serve").chain(args.iter().copied())).unwrap().a.plan()
    }

    #[test]
    fn the_file_sets_options_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        std::fs::write(
            &f,
            "loopback_root = \"/shared/root\"\nsharedloop.fs = \"xfs\"\ndirect_io = false\nheartbeat_interval = \"10s\"\n\
             [containerd]\nenable = true\nsocket = \"/run/x.sock\"\n",
        )
        .unwrap();
        let p = plan(&["--config", f.to_str().unwrap(), "-o", "fs=ext4", "--no-docker"]).unwrap();
        assert_eq!(p.docker, None);
        let (sock, root, cfg) = p.containerd.unwrap();
        assert_eq!(sock, PathBuf::from("/run/x.sock"));
        assert_eq!(root, PathBuf::from("/var/lib/sharedloop/containerd"));
        assert_eq!(cfg.root, PathBuf::from("/shared/root"));
        assert_eq!(cfg.fs.name(), "ext4");
        assert_eq!(cfg.direct_io, sharedloop_core::options::DirectIo::Off);
        assert_eq!(cfg.heartbeat_secs, 10);
    }

    /// The first ```toml block of a docs page.
    fn doc_example(page: &str) -> String {
        let text =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs").join(page)).unwrap();
        let start = text.find("```toml\n").unwrap() + "```toml\n".len();
        text[start..][..text[start..].find("```").unwrap()].to_owned()
    }

    #[test]
    fn the_documented_config_files_work_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        // The group must exist here: root's, by name.
        let options = doc_example("options.md").replace("socket_group = \"docker\"", "socket_group = \"root\"");
        std::fs::write(&f, options).unwrap();
        let p = plan(&["--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(p.socket_gid, Some(0));
        assert_eq!(p.docker, Some(PathBuf::from("/run/docker/plugins/sharedloop.sock")));
        let (sock, root, cfg) = p.containerd.unwrap();
        assert_eq!(sock, PathBuf::from("/run/sharedloop/containerd.sock"));
        assert_eq!(root, PathBuf::from("/var/lib/sharedloop/containerd"));
        assert_eq!(cfg.root, PathBuf::from("/shared/layers"));
        assert_eq!(cfg.fallback, PathBuf::from("/var/lib/sharedloop/private"));
        assert_eq!(cfg.max_layer_size, None);
        assert!(!cfg.require_shared_root);
        std::fs::write(&f, doc_example("containerd.md")).unwrap();
        let p = plan(&["--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(p.docker, None);
        assert_eq!(p.containerd.unwrap().2.root, PathBuf::from("/shared/layers"));
        // Integers, booleans and the prefixed spelling, in the file and -o.
        std::fs::write(
            &f,
            "size = 1048576\noverride_kernel_check = true\n[sharedloop]\nmax_layer_size = \"5G\"\n[containerd]\nenable = true\n",
        )
        .unwrap();
        let cfg = plan(&["--config", f.to_str().unwrap(), "-o", "sharedloop.verify=full", "-o", "require_shared_root"])
            .unwrap()
            .containerd
            .unwrap()
            .2;
        assert_eq!(cfg.rw_size.0, 1 << 20);
        assert!(cfg.override_kernel_check && cfg.require_shared_root);
        assert_eq!(cfg.max_layer_size.map(|b| b.0), Some(5 << 30));
        assert_eq!(cfg.verify, sharedloop_core::options::VerifyMode::Full);
    }

    #[test]
    fn bad_config_is_an_error_naming_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        for (text, names) in [
            (
                "sharedloop.colour = \"blue\"\n[containerd]\nenable = true\n",
                &["sharedloop.colour", "sharedloop.fs"][..],
            ),
            ("size = [1]\n[containerd]\nenable = true\n", &["sharedloop.size"][..]),
            (
                "loopback_root = \"/a\"\nloopback_fallback = \"/a\"\n[containerd]\nenable = true\n",
                &["loopback_fallback"][..],
            ),
        ] {
            std::fs::write(&f, text).unwrap();
            let e = format!("{:#}", plan(&["--config", f.to_str().unwrap()]).unwrap_err());
            for n in names {
                assert!(e.contains(n), "{text}: {e}");
            }
        }

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        std::fs::write(&f, "loopback_rot = \"/x\"\n[containerd]\nenable = true\n").unwrap();
        let e = format!("{:#}", plan(&["--config", f.to_str().unwrap()]).unwrap_err());
        assert!(e.contains("loopback_rot"), "{e}");
        std::fs::write(&f, "[containerd]\nenabel = true\n").unwrap();
        let e = format!("{:#}", plan(&["--config", f.to_str().unwrap()]).unwrap_err());
        assert!(e.contains("enabel"), "{e}");
        let e = format!("{:#}", plan(&["--config", "/nonexistent/c.toml"]).unwrap_err());
        assert!(e.contains("/nonexistent/c.toml"), "{e}");
        // An empty config file of its own: the machine's default one
        // (/etc/sharedloop/config.toml, which the package installs with
        // the snapshotter on) must not decide what this test sees.
        let empty = dir.path().join("empty.toml");
        std::fs::write(&empty, "").unwrap();
        let empty = empty.to_str().unwrap();
        let e = format!("{:#}", plan(&["--config", empty, "--no-docker"]).unwrap_err());
        assert!(e.contains("nothing to serve"), "{e}");
        let e = format!("{:#}", plan(&["--config", empty, "-o", "fs=ext4"]).unwrap_err());
        assert!(e.contains("storage-opt"), "{e}");
    }

    #[test]
    fn socket_groups_resolve_by_name_or_number() {
        assert_eq!(resolve_group("root").unwrap(), 0);
        assert_eq!(resolve_group("4321").unwrap(), 4321);
        let e = format!("{:#}", resolve_group("sharedloop-nosuch").unwrap_err());
        assert!(e.contains("sharedloop-nosuch"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, "socket_group = 77\n").unwrap();
        assert_eq!(plan(&["--config", cfg.to_str().unwrap()]).unwrap().socket_gid, Some(77));
        assert_eq!(plan(&["--config", cfg.to_str().unwrap(), "--socket-group", "78"]).unwrap().socket_gid, Some(78));
        std::fs::write(&cfg, "socket_group = [1]\n").unwrap();
        assert!(plan(&["--config", cfg.to_str().unwrap()]).is_err());
    }

    #[test]
    fn the_metrics_address_comes_from_the_file_or_the_flag() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        std::fs::write(&f, "").unwrap();
        assert_eq!(plan(&["--config", f.to_str().unwrap()]).unwrap().metrics, None);
        std::fs::write(&f, "metrics_address = \"127.0.0.1:9323\"\n").unwrap();
        let p = plan(&["--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(p.metrics, Some("127.0.0.1:9323".parse().unwrap()));
        let p = plan(&["--config", f.to_str().unwrap(), "--metrics-address", "[::1]:9400"]).unwrap();
        assert_eq!(p.metrics, Some("[::1]:9400".parse().unwrap()));
        let e = format!("{:#}", plan(&["--config", f.to_str().unwrap(), "--metrics-address", "nohost"]).unwrap_err());
        assert!(e.contains("nohost"), "{e}");
        std::fs::write(&f, "metrics_address = 9323\n").unwrap();
        let e = format!("{:#}", plan(&["--config", f.to_str().unwrap()]).unwrap_err());
        assert!(e.contains("metrics_address"), "{e}");
    }

    #[test]
    fn an_empty_file_serves_docker_only() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("config.toml");
        std::fs::write(&f, "").unwrap();
        let p = plan(&["--config", f.to_str().unwrap()]).unwrap();
        assert_eq!(p.docker, Some(PathBuf::from("/run/docker/plugins/sharedloop.sock")));
        assert!(p.containerd.is_none());
        let p = plan(&["--config", f.to_str().unwrap(), "--containerd"]).unwrap();
        let (sock, _, cfg) = p.containerd.unwrap();
        assert_eq!(sock, PathBuf::from("/run/sharedloop/containerd.sock"));
        assert_eq!(cfg, Config::default());
    }
}
