//! `sharedloop`: serves the Docker graphdriver plugin and the containerd
//! snapshotter over one layer store, and administers the store.

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};

mod admin;
mod configure;
mod doctor;
mod metrics;
mod serve;

#[derive(Parser)]
#[command(
    name = "sharedloop",
    version,
    about = "Container image layers as loop-mounted filesystem images on shared storage"
)]
struct Cli {
    /// Log filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(
        long,
        global = true,
        env = "SHAREDLOOP_LOG",
        default_value = "warn,sharedloop=info,sharedloop_core=info,sharedloop_docker=info"
    )]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve the Docker graphdriver plugin and/or the containerd
    /// snapshotter, over one store and one set of layer mounts.
    Serve(serve::ServeArgs),
    /// Show the store: directories, where new layers go, hosts.
    Status {
        #[command(flatten)]
        store: admin::StoreArgs,
        /// A host whose heartbeat is older than this counts as dead.
        #[arg(long, default_value = admin::HOST_TIMEOUT)]
        host_timeout: String,
    },
    /// List published layers: where each lives, its size, which hosts use it.
    Layers {
        #[command(flatten)]
        store: admin::StoreArgs,
    },
    /// Remove layers no live host uses, references of dead hosts, and
    /// leftovers of interrupted builds.
    Gc {
        #[command(flatten)]
        store: admin::StoreArgs,
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// A host whose heartbeat is older than this counts as dead.
        #[arg(long, default_value = admin::HOST_TIMEOUT)]
        host_timeout: String,
        /// Keep unreferenced layers and leftovers younger than this.
        #[arg(long, default_value = "1h")]
        grace: String,
    },
    /// Check layer images against the digest recorded at publish and with a
    /// read-only fsck. Exit status 1 when any layer has a problem.
    Verify {
        #[command(flatten)]
        store: admin::StoreArgs,
        /// Read images at most this fast, in bytes per second (a size such
        /// as 50M): a scrub that leaves the file server to the hosts.
        #[arg(long, value_name = "BYTES_PER_SEC")]
        max_rate: Option<String>,
        /// Layers to check (chain id or a unique prefix); all when none.
        layers: Vec<String>,
    },
    /// Move layers from the fallback directory into root.
    Promote {
        #[command(flatten)]
        store: admin::StoreArgs,
    },
    /// Check what sharedloop needs on this host: kernel features, loop
    /// devices, mkfs tools, root and fallback, clocks, engine configs,
    /// sockets. Exit status 1 when a check fails.
    Doctor(doctor::DoctorArgs),
    /// Wire sharedloop into containerd's or Docker's configuration,
    /// merging into what is there (a backup kept, each change printed).
    Configure(configure::ConfigureArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell) on stdout; the Debian package installs them.
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        clap_complete::generate(shell, &mut Cli::command(), "sharedloop", &mut std::io::stdout());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&cli.log_level).context("bad --log-level")?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let code = match cli.cmd {
        Cmd::Serve(args) => return serve::serve(args),
        Cmd::Status { store, host_timeout } => admin::status(&store, &host_timeout),
        Cmd::Layers { store } => admin::layers(&store),
        Cmd::Gc { store, dry_run, host_timeout, grace } => admin::gc(&store, dry_run, &host_timeout, &grace),
        Cmd::Verify { store, max_rate, layers } => admin::verify(&store, max_rate.as_deref(), &layers),
        Cmd::Promote { store } => admin::promote(&store),
        Cmd::Doctor(args) => doctor::doctor(&args),
        Cmd::Configure(args) => configure::configure(&args),
        Cmd::Completions { .. } => unreachable!("handled above"),
    };
    match code {
        Ok(c) => std::process::exit(c),
        Err(e) => {
            eprintln!("sharedloop: {e:#}");
            std::process::exit(if e.is::<admin::Usage>() { 2 } else { 1 })
        }
    }
}
