//! A client of the Kubernetes CRI (runtime.v1), as kubelet speaks it to
//! containerd's CRI plugin on containerd's own socket: the image service
//! (pull, status, remove) and the runtime calls a pod needs. Pods use the
//! node's network (NamespaceMode NODE), so no CNI plugin is involved.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use tonic::transport::{Channel, Endpoint};
pub use tonic::Status;

use super::registry::Registry;
use super::{require, tail, Engine, Host, CONTAINERD_SOCKET};

/// How containerd's CRI image service pulls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CriPull {
    /// With containerd's client library in the CRI plugin, passing the
    /// snapshot labels and annotations (`disable_snapshot_annotations =
    /// false`): 1.x's only way; 2.1+ with `use_local_image_pull = true`.
    Local,
    /// Through containerd's transfer service, 2.1+'s default: its
    /// unpacker sends `containerd.io/snapshot.ref` but none of CRI's
    /// annotations, and unpacks into the snapshotter its
    /// `unpack_config` names for the platform.
    Transfer,
}

/// The CRI section of containerd's config for `engine`: `snapshotter`
/// (sharedloop, or containerd's own for a comparison), pulls as `pull` says, the sandbox (pause) image
/// `sandbox`, registries as `hosts_dir` (containerd's `config_path`)
/// says, CNI config in `cni_dir` (none: pods use the node's network), and
/// no lowering of containers' OOM score below containerd's own (root here
/// may lack CAP_SYS_RESOURCE).
pub fn cri_config(
    engine: Engine,
    snapshotter: &str,
    pull: CriPull,
    sandbox: &str,
    hosts_dir: &Path,
    cni_dir: &Path,
) -> String {
    let (hosts, cni) = (hosts_dir.display(), cni_dir.display());
    if engine.is_v2() {
        // Config version 3: the CRI plugin split into an image service
        // and a runtime service. 2.1 also falls back to the local pull
        // by itself when it sees disable_snapshot_annotations (with a
        // warning); use_local_image_pull says so outright.
        let local = match pull {
            CriPull::Local => "  disable_snapshot_annotations = false\n  use_local_image_pull = true\n",
            CriPull::Transfer => "",
        };
        format!(
            "[plugins.\"io.containerd.cri.v1.images\"]\n\
             \x20 snapshotter = \"{snapshotter}\"\n\
             {local}\
             [plugins.\"io.containerd.cri.v1.images\".pinned_images]\n\
             \x20 sandbox = \"{sandbox}\"\n\
             [plugins.\"io.containerd.cri.v1.images\".registry]\n\
             \x20 config_path = \"{hosts}\"\n\
             [plugins.\"io.containerd.cri.v1.runtime\"]\n\
             \x20 restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.cri.v1.runtime\".cni]\n\
             \x20 bin_dirs = [\"{cni}/bin\"]\n\
             \x20 conf_dir = \"{cni}/net.d\"\n"
        )
    } else {
        // Config version 2 (containerd 1.6 and 1.7): one CRI plugin,
        // which always pulls with the client library.
        assert_eq!(pull, CriPull::Local, "containerd 1.x's CRI has no transfer-service pull");
        format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
             \x20 sandbox_image = \"{sandbox}\"\n\
             \x20 restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
             \x20 snapshotter = \"{snapshotter}\"\n\
             \x20 disable_snapshot_annotations = false\n\
             [plugins.\"io.containerd.grpc.v1.cri\".registry]\n\
             \x20 config_path = \"{hosts}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
             \x20 bin_dir = \"{cni}/bin\"\n\
             \x20 conf_dir = \"{cni}/net.d\"\n"
        )
    }
}

/// A host with sharedloop on `root`, the registry reachable inside it,
/// and `engine`'s containerd with CRI on, its CRI snapshotter
/// `snapshotter`, pulling as `pull` says, its sandbox image `pause`.
pub fn cri_host(
    name: &str,
    engine: Engine,
    snapshotter: &str,
    pull: CriPull,
    root: &Path,
    reg: &Registry,
    pause: &str,
) -> (Host, CriClient) {
    require(&["containerd", "runc", "mkfs.ext4", "busybox", "gzip"]);
    let mut h = Host::new(name);
    h.start_snapshotter(root);
    reg.serve_in(&h);
    let hosts = reg.hosts_dir(&h.dir.join("certs.d"));
    let cni = h.dir.join("cni");
    std::fs::create_dir_all(cni.join("bin")).unwrap();
    std::fs::create_dir_all(cni.join("net.d")).unwrap();
    let mut cfg = cri_config(engine, snapshotter, pull, pause, &hosts, &cni);
    // The proxy plugin's exported root: CRI's ImageFsInfo (kubelet's
    // image filesystem, for its image garbage collection and eviction)
    // names it; without it CRI reports
    // <containerd root>/io.containerd.snapshotter.v1.sharedloop, which
    // does not exist. (A sub-table may come before its parent's header,
    // which Engine::config writes after this section.)
    cfg.push_str(&format!("[proxy_plugins.sharedloop.exports]\n  root = \"{}\"\n", h.snapshotter_root().display()));
    h.start_containerd_engine(engine, Some(&cfg));
    let c = CriClient::connect(&h.inside(Path::new(CONTAINERD_SOCKET)));
    (h, c)
}

/// Fails with the host's logs.
pub fn fail(h: &Host, what: &str, e: &Status) -> ! {
    panic!(
        "{}: {what}: {e}\n--- sharedloop log (tail) ---\n{}\n--- containerd log (tail) ---\n{}",
        h.name,
        tail(&h.plugin_log(), 40),
        tail(&h.containerd_log(), 40)
    )
}

/// A call's result; the status is boxed (it is large).
pub type R<T> = Result<T, Box<Status>>;

pub struct CriClient {
    rt: tokio::runtime::Runtime,
    pub rs: RuntimeServiceClient<Channel>,
    pub is: ImageServiceClient<Channel>,
}

fn image_spec(image: &str) -> ImageSpec {
    ImageSpec { image: image.into(), ..Default::default() }
}

/// Network, PID and IPC namespace options: the node's network, the pod's
/// PID and IPC namespaces.
fn node_network() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Pod as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// The config of a pod named `name` on the node's network.
pub fn pod_config(name: &str, uid: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: uid.into(),
            namespace: "sharedloop-test".into(),
            attempt: 0,
        }),
        // No hostname: a pod on the node's network has the node's UTS
        // namespace (kubelet leaves it empty too).
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(node_network()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl CriClient {
    /// Connects to containerd's socket at `sock` (a path reachable from
    /// here) and waits until the CRI runtime answers `Version` (the plugin
    /// may start after the socket appears).
    pub fn connect(sock: &Path) -> CriClient {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let sock: PathBuf = sock.to_owned();
        let ch = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_| tokio::net::UnixStream::connect(sock.clone())))
                    .await
            })
            .expect("connect to containerd's socket");
        let mut c = CriClient { rt, rs: RuntimeServiceClient::new(ch.clone()), is: ImageServiceClient::new(ch) };
        let t = Instant::now();
        loop {
            match c.version() {
                Ok(_) => return c,
                Err(e) => assert!(t.elapsed() < Duration::from_secs(60), "the CRI service does not answer: {e}"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn version(&mut self) -> R<VersionResponse> {
        let req = VersionRequest { version: "v1".into() };
        self.rt.block_on(self.rs.version(req)).map(|r| r.into_inner()).map_err(Box::new)
    }

    /// CRI PullImage; returns the image ref (the config digest).
    pub fn pull(&mut self, image: &str) -> R<String> {
        let req = PullImageRequest { image: Some(image_spec(image)), auth: None, sandbox_config: None };
        self.rt.block_on(self.is.pull_image(req)).map(|r| r.into_inner().image_ref).map_err(Box::new)
    }

    /// CRI ImageStatus: None when the image is unknown.
    pub fn image_status(&mut self, image: &str) -> R<Option<Image>> {
        let req = ImageStatusRequest { image: Some(image_spec(image)), verbose: false };
        self.rt.block_on(self.is.image_status(req)).map(|r| r.into_inner().image).map_err(Box::new)
    }

    /// CRI ImageFsInfo: the filesystems holding images (kubelet's image
    /// garbage collection and eviction read it).
    pub fn image_fs_info(&mut self) -> R<ImageFsInfoResponse> {
        self.rt.block_on(self.is.image_fs_info(ImageFsInfoRequest {})).map(|r| r.into_inner()).map_err(Box::new)
    }

    pub fn list_images(&mut self) -> R<Vec<Image>> {
        let req = ListImagesRequest { filter: None };
        self.rt.block_on(self.is.list_images(req)).map(|r| r.into_inner().images).map_err(Box::new)
    }

    pub fn remove_image(&mut self, image: &str) -> R<()> {
        let req = RemoveImageRequest { image: Some(image_spec(image)) };
        self.rt.block_on(self.is.remove_image(req)).map(|_| ()).map_err(Box::new)
    }

    /// RunPodSandbox: the sandbox (pause) container of `config`; returns
    /// the pod sandbox id.
    pub fn run_pod(&mut self, config: &PodSandboxConfig) -> R<String> {
        let req = RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: String::new() };
        self.rt.block_on(self.rs.run_pod_sandbox(req)).map(|r| r.into_inner().pod_sandbox_id).map_err(Box::new)
    }

    /// CreateContainer of `image` in pod `pod` running `command`; returns
    /// the container id.
    pub fn create_container(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> R<String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(image_spec(image)),
            command: command.iter().map(|s| s.to_string()).collect(),
            labels: HashMap::new(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(node_network()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        self.rt.block_on(self.rs.create_container(req)).map(|r| r.into_inner().container_id).map_err(Box::new)
    }

    pub fn start_container(&mut self, id: &str) -> R<()> {
        let req = StartContainerRequest { container_id: id.into() };
        self.rt.block_on(self.rs.start_container(req)).map(|_| ()).map_err(Box::new)
    }

    /// ExecSync: (exit code, stdout, stderr).
    pub fn exec_sync(&mut self, id: &str, cmd: &[&str], timeout_s: i64) -> R<(i32, Vec<u8>, Vec<u8>)> {
        let req = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: timeout_s,
        };
        self.rt
            .block_on(self.rs.exec_sync(req))
            .map(|r| {
                let r = r.into_inner();
                (r.exit_code, r.stdout, r.stderr)
            })
            .map_err(Box::new)
    }

    pub fn container_status(&mut self, id: &str) -> R<Option<ContainerStatus>> {
        let req = ContainerStatusRequest { container_id: id.into(), verbose: false };
        self.rt.block_on(self.rs.container_status(req)).map(|r| r.into_inner().status).map_err(Box::new)
    }

    pub fn stop_container(&mut self, id: &str, timeout_s: i64) -> R<()> {
        let req = StopContainerRequest { container_id: id.into(), timeout: timeout_s };
        self.rt.block_on(self.rs.stop_container(req)).map(|_| ()).map_err(Box::new)
    }

    pub fn remove_container(&mut self, id: &str) -> R<()> {
        let req = RemoveContainerRequest { container_id: id.into() };
        self.rt.block_on(self.rs.remove_container(req)).map(|_| ()).map_err(Box::new)
    }

    pub fn stop_pod(&mut self, id: &str) -> R<()> {
        let req = StopPodSandboxRequest { pod_sandbox_id: id.into() };
        self.rt.block_on(self.rs.stop_pod_sandbox(req)).map(|_| ()).map_err(Box::new)
    }

    pub fn remove_pod(&mut self, id: &str) -> R<()> {
        let req = RemovePodSandboxRequest { pod_sandbox_id: id.into() };
        self.rt.block_on(self.rs.remove_pod_sandbox(req)).map(|_| ()).map_err(Box::new)
    }

    pub fn list_pods(&mut self) -> R<Vec<PodSandbox>> {
        let req = ListPodSandboxRequest { filter: None };
        self.rt.block_on(self.rs.list_pod_sandbox(req)).map(|r| r.into_inner().items).map_err(Box::new)
    }

    pub fn list_containers(&mut self) -> R<Vec<Container>> {
        let req = ListContainersRequest { filter: None };
        self.rt.block_on(self.rs.list_containers(req)).map(|r| r.into_inner().containers).map_err(Box::new)
    }
}
