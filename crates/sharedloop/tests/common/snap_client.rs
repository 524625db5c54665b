//! A client of the containerd snapshots gRPC API, as containerd's proxy
//! speaks it, for driving sharedloop's snapshotter directly (the way
//! containerd's own `snapshots/testsuite` drives a snapshotter).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::*;
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::transport::{Channel, Endpoint};
pub use containerd_snapshots::tonic::{Code, Status};

use super::{run, run_ok, Host};

pub struct SnapClient {
    rt: tokio::runtime::Runtime,
    c: SnapshotsClient<Channel>,
    /// The containerd namespace sent with each call, when talking to
    /// containerd's own snapshots service rather than to sharedloop.
    ns: Option<String>,
}

/// `m` as a request, in containerd namespace `ns` when one is set.
fn with_ns<T>(ns: &Option<String>, m: T) -> containerd_snapshots::tonic::Request<T> {
    let mut r = containerd_snapshots::tonic::Request::new(m);
    if let Some(ns) = ns {
        r.metadata_mut().insert("containerd-namespace", ns.parse().unwrap());
    }
    r
}

/// A call's result; the status is boxed (it is large), `s.code()` reads through.
pub type R<T> = Result<T, Box<Status>>;

pub fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

impl SnapClient {
    /// Connects to the snapshotter socket at `sock` (a path reachable from
    /// here, e.g. through `/proc/<pid>/root`).
    pub fn connect(sock: &Path) -> SnapClient {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let sock: PathBuf = sock.to_owned();
        let ch = rt
            .block_on(async move {
                Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_| tokio::net::UnixStream::connect(sock.clone())))
                    .await
            })
            .expect("connect to the snapshotter");
        SnapClient { rt, c: SnapshotsClient::new(ch), ns: None }
    }

    /// Connects to containerd's snapshots service at `sock`, in containerd
    /// namespace `ns`: calls go through containerd's metadata store (and
    /// its garbage collector, so what should stay needs a
    /// `containerd.io/gc.root` label) to the snapshotter named in them.
    pub fn connect_containerd(sock: &Path, ns: &str) -> SnapClient {
        let mut c = SnapClient::connect(sock);
        c.ns = Some(ns.into());
        c
    }

    pub fn prepare(&mut self, key: &str, parent: &str, l: HashMap<String, String>) -> R<Vec<Mount>> {
        let req = PrepareSnapshotRequest {
            snapshotter: "sharedloop".into(),
            key: key.into(),
            parent: parent.into(),
            labels: l,
        };
        self.rt.block_on(self.c.prepare(with_ns(&self.ns, req))).map_err(Box::new).map(|r| r.into_inner().mounts)
    }

    pub fn view(&mut self, key: &str, parent: &str) -> R<Vec<Mount>> {
        self.view_labelled(key, parent, HashMap::new())
    }

    pub fn view_labelled(&mut self, key: &str, parent: &str, l: HashMap<String, String>) -> R<Vec<Mount>> {
        let req =
            ViewSnapshotRequest { snapshotter: "sharedloop".into(), key: key.into(), parent: parent.into(), labels: l };
        self.rt.block_on(self.c.view(with_ns(&self.ns, req))).map_err(Box::new).map(|r| r.into_inner().mounts)
    }

    pub fn mounts(&mut self, key: &str) -> R<Vec<Mount>> {
        let req = MountsRequest { snapshotter: "sharedloop".into(), key: key.into() };
        self.rt.block_on(self.c.mounts(with_ns(&self.ns, req))).map_err(Box::new).map(|r| r.into_inner().mounts)
    }

    pub fn commit(&mut self, name: &str, key: &str, l: HashMap<String, String>) -> R<()> {
        let req =
            CommitSnapshotRequest { snapshotter: "sharedloop".into(), name: name.into(), key: key.into(), labels: l };
        self.rt.block_on(self.c.commit(with_ns(&self.ns, req))).map_err(Box::new).map(|_| ())
    }

    pub fn remove(&mut self, key: &str) -> R<()> {
        let req = RemoveSnapshotRequest { snapshotter: "sharedloop".into(), key: key.into() };
        self.rt.block_on(self.c.remove(with_ns(&self.ns, req))).map_err(Box::new).map(|_| ())
    }

    pub fn stat(&mut self, key: &str) -> R<Info> {
        let req = StatSnapshotRequest { snapshotter: "sharedloop".into(), key: key.into() };
        self.rt
            .block_on(self.c.stat(with_ns(&self.ns, req)))
            .map_err(Box::new)
            .map(|r| r.into_inner().info.expect("info"))
    }

    pub fn update(&mut self, info: Info, paths: &[&str]) -> R<Info> {
        let req = UpdateSnapshotRequest {
            snapshotter: "sharedloop".into(),
            info: Some(info),
            update_mask: (!paths.is_empty())
                .then(|| prost_types::FieldMask { paths: paths.iter().map(|s| s.to_string()).collect() }),
        };
        self.rt
            .block_on(self.c.update(with_ns(&self.ns, req)))
            .map_err(Box::new)
            .map(|r| r.into_inner().info.expect("info"))
    }

    pub fn usage(&mut self, key: &str) -> R<(i64, i64)> {
        let req = UsageRequest { snapshotter: "sharedloop".into(), key: key.into() };
        self.rt.block_on(self.c.usage(with_ns(&self.ns, req))).map_err(Box::new).map(|r| {
            let u = r.into_inner();
            (u.size, u.inodes)
        })
    }

    pub fn list(&mut self, filters: &[&str]) -> R<Vec<Info>> {
        let req = ListSnapshotsRequest {
            snapshotter: "sharedloop".into(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        };
        self.rt.block_on(async {
            let mut stream = self.c.list(with_ns(&self.ns, req)).await?.into_inner();
            let mut out = Vec::new();
            while let Some(m) = stream.message().await? {
                out.extend(m.info);
            }
            Ok(out)
        })
    }

    pub fn cleanup(&mut self) -> R<()> {
        let req = CleanupRequest { snapshotter: "sharedloop".into() };
        self.rt.block_on(self.c.cleanup(with_ns(&self.ns, req))).map_err(Box::new).map(|_| ())
    }
}

/// The gRPC code of a failed call; panics on success.
pub fn code<T: std::fmt::Debug>(r: R<T>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Mounts `mounts` at `target` inside `host`, as containerd would;
/// returns the path through which this process sees the mount.
pub fn mount_all(host: &Host, mounts: &[Mount], target: &Path) -> PathBuf {
    std::fs::create_dir_all(target).unwrap();
    assert_eq!(mounts.len(), 1, "sharedloop returns one mount: {mounts:?}");
    let m = &mounts[0];
    let mut cmd = host.cmd("mount");
    match m.r#type.as_str() {
        "bind" => cmd.arg("-o").arg(m.options.join(",")).arg(&m.source).arg(target),
        "overlay" => cmd.args(["-t", "overlay", "overlay", "-o"]).arg(m.options.join(",")).arg(target),
        t => panic!("unexpected mount type {t}: {m:?}"),
    };
    run_ok(&mut cmd);
    host.inside(target)
}

pub fn unmount(host: &Host, target: &Path) {
    let out = run(host.cmd("umount").arg(target));
    assert!(out.status.success(), "umount {}: {}", target.display(), String::from_utf8_lossy(&out.stderr));
}
