//! Kubernetes' pull path: containerd's CRI image service, as kubelet
//! drives it, with sharedloop as the snapshotter and the snapshot labels
//! on (`disable_snapshot_annotations = false`), for containerd 1.7
//! (trixie, config version 2) and 2.x (sid, config version 3); for 2.x
//! also through the transfer service, 2.1's default way of pulling.
//!
//! A real registry (Debian's docker-registry, on 127.0.0.1) serves a
//! generated multi-layer image of incompressible data and a pause image.
//! Host A pulls the image through CRI PullImage: every layer is fetched
//! and published in the shared root. Host B, on the same root, pulls it
//! too: the registry's access log shows no GET of any layer blob (only
//! the manifest and config), sharedloop's log shows every layer reused,
//! the store gains nothing. Then B runs a pod on the node's network
//! (RunPodSandbox with the pause image, CreateContainer, StartContainer)
//! and every file of the container is compared with the source; the pod
//! and the images are removed through CRI, which leaves no snapshot,
//! mount, loop device or layer behind. Host B's pull time is printed,
//! not asserted (bench/run --suite cri-pull measures it).

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::cri::*;
use common::registry::*;
use common::snap_client::SnapClient;
use common::*;

/// Data layers of the test image and the MiB of incompressible data in
/// each: over base_layers' four (busybox, then owners, links, whiteouts,
/// an opaque directory), about 150 MB in eight layers.
const DATA_LAYERS: usize = 4;
const LAYER_MIB: usize = 36;

/// The store's layer directory names, sorted.
fn layer_names(root: &Path) -> Vec<String> {
    layer_dirs(root).iter().map(|d| d.file_name().unwrap().to_string_lossy().into_owned()).collect()
}

/// Removes `images` through CRI and waits until containerd's collector
/// has removed every snapshot from sharedloop: nothing of ours left on
/// the host.
fn remove_images(h: &Host, c: &mut CriClient, images: &[&str]) {
    for i in images {
        c.remove_image(i).unwrap_or_else(|e| fail(h, &format!("RemoveImage {i}"), &e));
        assert!(c.image_status(i).unwrap().is_none(), "{}: {i} still listed", h.name);
    }
    let mut s = SnapClient::connect(&h.inside(Path::new(SNAPSHOTTER_SOCKET)));
    let t = Instant::now();
    loop {
        let left = s.list(&[]).unwrap();
        if left.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "{}: snapshots left: {left:?}", h.name);
        std::thread::sleep(Duration::from_millis(200));
    }
    s.cleanup().unwrap();
    let t = Instant::now();
    while !h.snapshotter_mounts().is_empty() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(h.snapshotter_mounts(), Vec::<String>::new(), "{}: mounts left", h.name);
    assert_no_loops(&h.dir);
}

fn cri_pull_path(engine: Engine, pull: CriPull, tag: &str) {
    require(&["containerd", "runc", "mkfs.ext4", "busybox", "gzip"]);
    let shared = SharedDir::new(&format!("cri-{tag}"));
    let root = shared.path.join("root");
    let reg = Registry::start(&shared.path.join("registry"));
    eprintln!("engine: {}; registry on {}", engine.version(), reg.addr());

    // The images: a pause image (busybox, sleeping) and the test image.
    let fx = shared.path.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let pause_tar = layer_tar(&LayerSpec {
        dirs: vec![("bin".into(), 0o755)],
        files: vec![("bin/busybox".into(), fs::read("/bin/busybox").unwrap(), 0o755, 0, 0)],
        ..Default::default()
    });
    let pause_img =
        RegistryImage::new(&[pause_tar], serde_json::json!({"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]}));
    let pause = reg.push("sharedloop-test/pause", "1", &pause_img);
    let mut specs = base_layers(&rootfs);
    specs.extend(data_layers(DATA_LAYERS, LAYER_MIB));
    let tars: Vec<Vec<u8>> = specs.iter().map(layer_tar).collect();
    drop(specs);
    let img = RegistryImage::new(&tars, serde_json::json!({"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}));
    let image = reg.push("sharedloop-test/app", "1", &img);
    let expected = fx.join("expected");
    expected_tree(&tars, &expected);
    drop(tars);
    let want = host_manifest(&expected);
    let layers = img.layer_digests();
    let chains: Vec<String> = img.chain_ids().iter().map(|c| c.replacen(':', "-", 1)).collect();
    eprintln!("image {image}: {} layers, {:.0} MB of blobs", layers.len(), img.layer_bytes() as f64 / 1e6);

    // Host A pulls: every layer fetched once and published.
    let (a, mut ca) = cri_host(&format!("cri-{tag}-a"), engine, "sharedloop", pull, &root, &reg, &pause);
    let v = ca.version().unwrap();
    eprintln!("CRI: {} {} (API {})", v.runtime_name, v.runtime_version, v.runtime_api_version);
    let mark = reg.log_mark();
    let t = Instant::now();
    let id = ca.pull(&image).unwrap_or_else(|e| fail(&a, "PullImage", &e));
    eprintln!("host A's CRI pull: {:.2} s", t.elapsed().as_secs_f64());
    reg.settle();
    assert_eq!(id, img.config_digest(), "PullImage answers the image id (its config digest)");
    assert_eq!(reg.blob_gets(mark, &layers), layers.len(), "host A fetched each layer once:\n{}", reg.access_log());
    let mut want_chains = chains.clone();
    want_chains.sort();
    assert_eq!(layer_names(&root), want_chains, "host A published every layer under its chain id");
    assert!(a.plugin_log().contains("image built"), "host A built the layer images");

    // Host B pulls the same image: no layer leaves the registry.
    let (b, mut cb) = cri_host(&format!("cri-{tag}-b"), engine, "sharedloop", pull, &root, &reg, &pause);
    let stamps: Vec<_> = chains
        .iter()
        .map(|c| fs::metadata(root.join("layers").join(c).join("layer.img")).unwrap().modified().unwrap())
        .collect();
    let mark = reg.log_mark();
    let t = Instant::now();
    let id_b = cb.pull(&image).unwrap_or_else(|e| fail(&b, "PullImage", &e));
    let took = t.elapsed();
    reg.settle();
    let requests: Vec<String> = reg.access_log()[mark..].lines().map(str::to_owned).collect();
    eprintln!(
        "host B's CRI pull: {:.3} s ({} requests to the registry: {:?})",
        took.as_secs_f64(),
        requests.len(),
        requests.iter().map(|l| l.split('"').nth(1).unwrap_or("")).collect::<Vec<_>>()
    );
    assert_eq!(id_b, id);
    assert_eq!(reg.blob_gets(mark, &layers), 0, "host B fetched layer blobs:\n{}", requests.join("\n"));
    assert_eq!(reg.blob_gets(mark, &[img.config_digest()]), 1, "host B fetched the config once");
    let log = b.plugin_log();
    assert_eq!(
        log.matches("using the published layer; nothing to unpack").count(),
        layers.len(),
        "host B reused every layer:\n{log}"
    );
    assert!(!log.contains("image built"), "host B built no image:\n{log}");
    // The snapshot annotations arrive with the local pull only.
    let annotated = log.contains("containerd.io/snapshot/cri.layer-digest");
    assert_eq!(annotated, pull == CriPull::Local, "CRI's annotations with a {pull:?} pull:\n{log}");
    assert_eq!(layer_names(&root), want_chains, "host B added no layer");
    for (c, m) in chains.iter().zip(&stamps) {
        let now = fs::metadata(root.join("layers").join(c).join("layer.img")).unwrap().modified().unwrap();
        assert_eq!(now, *m, "{c} rewritten");
    }
    let st = cb.image_status(&image).unwrap().expect("host B lists the image");
    assert_eq!(st.id, id);
    assert!(st.repo_tags.contains(&image), "repo tags: {:?}", st.repo_tags);

    // A pod on host B: the sandbox (pause image, pulled on demand), then
    // a container of the image; every file as in the source.
    let pod_cfg = pod_config(&format!("cri-{tag}"), &format!("uid-{tag}"));
    let pod = cb.run_pod(&pod_cfg).unwrap_or_else(|e| fail(&b, "RunPodSandbox", &e));
    let ctr = cb
        .create_container(&pod, &pod_cfg, "app", &image, &["/bin/busybox", "sleep", "3600"])
        .unwrap_or_else(|e| fail(&b, "CreateContainer", &e));
    cb.start_container(&ctr).unwrap_or_else(|e| fail(&b, "StartContainer", &e));
    let (code, out, err) = cb
        .exec_sync(&ctr, &["/bin/busybox", "sh", "-c", MANIFEST_SCRIPT], 600)
        .unwrap_or_else(|e| fail(&b, "ExecSync", &e));
    assert_eq!(code, 0, "the manifest script failed: {}", String::from_utf8_lossy(&err));
    // The runtime adds what Docker adds (mount points of /proc, /sys,
    // /dev; /etc/hosts, /etc/hostname, /etc/resolv.conf).
    let got = filter_manifest(&String::from_utf8_lossy(&out));
    assert_same_manifest(&want, &got, &format!("{tag}: CRI container on host B"));
    // kubelet's image filesystem: the snapshotter's exported root, and
    // the images' bytes as sharedloop's Usage reports them (CRI collects
    // them every 10 s).
    let t = Instant::now();
    loop {
        let info = cb.image_fs_info().unwrap_or_else(|e| fail(&b, "ImageFsInfo", &e));
        let f = info.image_filesystems.first().expect("an image filesystem");
        let mp = f.fs_id.as_ref().map(|i| i.mountpoint.clone()).unwrap_or_default();
        assert_eq!(Path::new(&mp), b.snapshotter_root(), "ImageFsInfo names the exported root");
        let used = f.used_bytes.as_ref().map(|u| u.value).unwrap_or(0);
        if used >= img.layer_bytes() / 2 {
            eprintln!("ImageFsInfo on host B: {mp}: {used} bytes, {:?} inodes", f.inodes_used);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "ImageFsInfo reports {used} bytes used: {f:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let stacked = b.mounts_under(Path::new(LAYER_MOUNTS)).len();
    assert!(stacked >= layers.len(), "host B mounts each layer of the image: {stacked} layer mounts");
    cb.stop_container(&ctr, 5).unwrap_or_else(|e| fail(&b, "StopContainer", &e));
    cb.remove_container(&ctr).unwrap_or_else(|e| fail(&b, "RemoveContainer", &e));
    cb.stop_pod(&pod).unwrap_or_else(|e| fail(&b, "StopPodSandbox", &e));
    cb.remove_pod(&pod).unwrap_or_else(|e| fail(&b, "RemovePodSandbox", &e));
    assert!(cb.list_pods().unwrap().is_empty(), "pods left on host B");
    assert!(cb.list_containers().unwrap().is_empty(), "containers left on host B");

    // Removal through CRI: containerd's collector removes the snapshots,
    // sharedloop drops each host's references, and the layers leave the
    // store with the last.
    remove_images(&b, &mut cb, &[&image, &pause]);
    assert_eq!(layer_names(&root), want_chains, "host A still holds the image's layers");
    remove_images(&a, &mut ca, &[&image]);
    let t = Instant::now();
    while !layer_names(&root).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "layers left in the store: {:?}", layer_names(&root));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(loops_under(&root).is_empty(), "loop devices on the store left: {:?}", loops_under(&root));
}

#[test]
fn cri_pull_path_containerd_1_7_trixie() {
    cri_pull_path(Engine::Containerd17, CriPull::Local, "ctrd17");
}

#[test]
fn cri_pull_path_containerd_2_sid() {
    cri_pull_path(Engine::Containerd2, CriPull::Local, "ctrd2");
}

/// containerd 2.1+'s default: CRI pulls through the transfer service,
/// whose unpacker sends only the snapshot.ref label: enough to skip the
/// download.
#[test]
fn cri_pull_path_containerd_2_sid_transfer_service() {
    cri_pull_path(Engine::Containerd2, CriPull::Transfer, "ctrd2t");
}
