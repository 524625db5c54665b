//! `sharedloop`: serves the Docker graphdriver plugin (and, later, the
//! containerd snapshotter) over one layer store.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "sharedloop",
    version,
    about = "Container image layers as loop-mounted filesystem images on shared storage"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, global = true, env = "SHAREDLOOP_LOG", default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the Docker graphdriver plugin protocol.
    Serve {
        /// The plugin socket; dockerd finds plugins in /run/docker/plugins/.
        #[arg(long, default_value = "/run/docker/plugins/sharedloop.sock")]
        docker_socket: PathBuf,
        /// Where the plugin keeps what dockerd told it at Init, so a
        /// restarted plugin serves the same driver (dockerd does not call
        /// Init again).
        #[arg(long, default_value = "/run/sharedloop")]
        run_dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("bad --log-level")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.cmd {
        Cmd::Serve { docker_socket, run_dir } => serve(docker_socket, run_dir),
    }
}

fn serve(docker_socket: PathBuf, run_dir: PathBuf) -> anyhow::Result<()> {
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).max_blocking_threads(64).enable_all().build()?;
    rt.block_on(async move {
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let plugin = Arc::new(tokio::task::spawn_blocking(move || sharedloop_docker::Plugin::new(&run_dir)).await?);
        let listener = sharedloop_docker::bind(&docker_socket)
            .with_context(|| format!("binding the plugin socket {}", docker_socket.display()))?;
        tracing::info!(socket = %docker_socket.display(), "serving the Docker graphdriver plugin");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down; layer mounts stay for running containers");
        };
        sharedloop_docker::serve(listener, plugin, shutdown).await?;
        let _ = std::fs::remove_file(&docker_socket);
        Ok(())
    })
}
