//! The container engines the matrix runs against: the machine's own
//! (Debian 12: containerd 1.6, Docker 20.10) and the newer ones
//! `scripts/fetch-engines` unpacks from Debian's trixie and sid into
//! `$SHAREDLOOP_ENGINES` (default /var/cache/sharedloop/engines), beside
//! the machine's engines, never replacing them. runc is always the
//! machine's own.

use std::fs;
use std::path::PathBuf;

/// A containerd build, with its `ctr` and runc shim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The machine's containerd (Debian 12: 1.6), on PATH.
    System,
    /// containerd 1.7, from trixie.
    Containerd17,
    /// containerd 2.x, from sid.
    Containerd2,
}

/// Where fetch-engines put the unpacked trees.
pub fn engines_dir() -> PathBuf {
    std::env::var_os("SHAREDLOOP_ENGINES").map(PathBuf::from).unwrap_or_else(|| "/var/cache/sharedloop/engines".into())
}

/// The unpacked tree of one Debian suite, failing the test (never
/// skipping it) with how to get it when it is missing.
pub fn suite_tree(suite: &str) -> PathBuf {
    let t = engines_dir().join(suite);
    assert!(
        t.join("VERSIONS").is_file(),
        "this test needs the engines of Debian {suite} in {}: run scripts/fetch-engines (as root; \
         scripts/test does when they are missing)",
        t.display()
    );
    t
}

impl Engine {
    /// The directory with this engine's `containerd`, `ctr` and
    /// `containerd-shim-runc-v2`; None for the machine's own (PATH).
    pub fn bin_dir(self) -> Option<PathBuf> {
        match self {
            Engine::System => None,
            Engine::Containerd17 => Some(suite_tree("trixie").join("usr/bin")),
            Engine::Containerd2 => Some(suite_tree("sid").join("usr/bin")),
        }
    }

    pub fn bin(self, name: &str) -> PathBuf {
        self.bin_dir().map(|d| d.join(name)).unwrap_or_else(|| PathBuf::from(name))
    }

    /// PATH for the daemon: its own shims first, then the machine's
    /// (runc).
    pub fn path_env(self) -> String {
        let sys = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        match self.bin_dir() {
            Some(d) => format!("{}:{sys}", d.display()),
            None => std::env::var("PATH").unwrap_or_else(|_| sys.into()),
        }
    }

    /// containerd 2.x reads config version 3 and needs the transfer
    /// service told which snapshotter to unpack into.
    pub fn is_v2(self) -> bool {
        self == Engine::Containerd2
    }

    /// `containerd --version`, for the test's log.
    pub fn version(self) -> String {
        let out = std::process::Command::new(self.bin("containerd")).arg("--version").output().expect("containerd");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The config file for a containerd of this engine on `root`, `state`
    /// and `socket`, with sharedloop as the proxy snapshotter at
    /// `snapshotter` (CRI off unless `cri` gives its section).
    pub fn config(
        self,
        root: &str,
        state: &str,
        socket: &str,
        snapshotter: &str,
        opt: &str,
        cri: Option<&str>,
    ) -> String {
        let disabled_snapshotters = "\"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
                                     \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"";
        if self.is_v2() {
            let cri_off = if cri.is_none() {
                "\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \"io.containerd.cri.v1.runtime\", \
                 \"io.containerd.podsandbox.controller.v1.podsandbox\", \"io.containerd.sandbox.controller.v1.shim\", "
            } else {
                ""
            };
            format!(
                "version = 3\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [{cri_off}{disabled_snapshotters}, \"io.containerd.snapshotter.v1.erofs\", \
                 \"io.containerd.snapshotter.v1.blockfile\"]\n\
                 [grpc]\n  address = \"{socket}\"\n\
                 [plugins.\"io.containerd.transfer.v1.local\"]\n\
                 [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux/amd64\"\n  snapshotter = \"sharedloop\"\n\
                 {cri}\n\
                 [proxy_plugins]\n  [proxy_plugins.sharedloop]\n    type = \"snapshot\"\n    address = \"{snapshotter}\"\n",
                cri = cri.unwrap_or("")
            )
        } else {
            let cri_off = if cri.is_none() { "\"io.containerd.grpc.v1.cri\", " } else { "" };
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [{cri_off}{disabled_snapshotters}]\n\
                 [grpc]\n  address = \"{socket}\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n\
                 {cri}\n\
                 [proxy_plugins]\n  [proxy_plugins.sharedloop]\n    type = \"snapshot\"\n    address = \"{snapshotter}\"\n",
                cri = cri.unwrap_or("")
            )
        }
    }
}

/// The sid tree's dockerd, docker CLI and buildx plugin (Docker 28+).
pub struct ModernDocker {
    pub dockerd: PathBuf,
    pub docker: PathBuf,
    /// A DOCKER_CONFIG directory whose cli-plugins has buildx.
    pub config_dir: PathBuf,
}

impl ModernDocker {
    pub fn get(config_dir: PathBuf) -> ModernDocker {
        let t = suite_tree("sid");
        let plugins = config_dir.join("cli-plugins");
        fs::create_dir_all(&plugins).unwrap();
        let link = plugins.join("docker-buildx");
        if !link.exists() {
            std::os::unix::fs::symlink(t.join("usr/libexec/docker/cli-plugins/docker-buildx"), &link).unwrap();
        }
        ModernDocker { dockerd: t.join("usr/sbin/dockerd"), docker: t.join("usr/bin/docker"), config_dir }
    }
}
