//! The containerd snapshotter front end: containerd's snapshots gRPC API
//! (a `proxy_plugins` entry of type "snapshot") over the core's
//! [`sharedloop_core::Driver`]. containerd's snapshot model (keys, kinds,
//! labels, its error semantics) is [`snapshots`], its Walk filter grammar
//! [`filter`]; the gRPC service runs each call on a blocking thread, and
//! [`status`] turns core errors into gRPC codes, in one place.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::{self, Code, Status};
use containerd_snapshots::{Info, Kind, Usage};
use sharedloop_core::{Error, MountSpec};

pub mod filter;
mod local;
mod records;
pub mod snapshots;

pub use snapshots::Snapshotter;
use snapshots::{SnapInfo, SnapKind};

/// Serves `sn` on the unix socket `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    sn: Arc<Snapshotter>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let svc = containerd_snapshots::server(Arc::new(Service { sn }));
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(tokio_stream::wrappers::UnixListenerStream::new(listener), shutdown)
        .await
}

/// Binds the snapshotter socket (0600), replacing a stale one.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

struct Service {
    sn: Arc<Snapshotter>,
}

/// The one place core errors become gRPC statuses.
pub fn status(e: Error) -> Status {
    let code = match &e {
        Error::NotFound(_) | Error::ParentNotFound { .. } => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::Conflict(_) | Error::InUse { .. } => Code::FailedPrecondition,
        Error::Invalid(_) | Error::Option { .. } | Error::BadTar { .. } => Code::InvalidArgument,
        Error::NoStore { .. } => Code::Unavailable,
        Error::Corrupt { .. } => Code::DataLoss,
        _ => Code::Internal,
    };
    Status::new(code, e.to_string())
}

async fn blocking<T: Send + 'static>(
    op: &'static str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Status> {
    let t = std::time::Instant::now();
    let r = tokio::task::spawn_blocking(f).await.map_err(|e| Status::internal(format!("{op}: {e}")));
    let r = match r {
        Ok(r) => r,
        Err(s) => {
            sharedloop_core::metrics::request("containerd", op, false, t);
            return Err(s);
        }
    };
    tracing::debug!(op, ms = t.elapsed().as_secs_f64() * 1e3, ok = r.is_ok(), "snapshots call");
    sharedloop_core::metrics::request("containerd", op, r.is_ok(), t);
    r.map_err(|e| {
        let s = status(e);
        if !matches!(s.code(), Code::NotFound | Code::AlreadyExists) {
            tracing::warn!(op, error = %s.message(), "snapshots call failed");
        }
        s
    })
}

fn labels(l: HashMap<String, String>) -> BTreeMap<String, String> {
    l.into_iter().collect()
}

fn info(s: SnapInfo) -> Info {
    Info {
        kind: match s.kind {
            SnapKind::View => Kind::View,
            SnapKind::Active => Kind::Active,
            SnapKind::Committed => Kind::Committed,
        },
        created_at: s.created(),
        updated_at: s.updated(),
        name: s.name,
        parent: s.parent,
        labels: s.labels.into_iter().collect(),
    }
}

fn from_info(i: &Info) -> SnapInfo {
    let ns = |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    SnapInfo {
        name: i.name.clone(),
        kind: match i.kind {
            Kind::View => SnapKind::View,
            Kind::Committed => SnapKind::Committed,
            _ => SnapKind::Active,
        },
        parent: i.parent.clone(),
        labels: i.labels.clone().into_iter().collect(),
        created_ns: ns(i.created_at),
        updated_ns: ns(i.updated_at),
        layer: String::new(),
        from_layer: None,
        local: false,
    }
}

fn mounts(v: Vec<MountSpec>) -> Vec<Mount> {
    v.into_iter()
        .map(|m| Mount { r#type: m.fs_type, source: m.source, target: String::new(), options: m.options })
        .collect()
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for Service {
    type Error = Status;

    async fn stat(&self, key: String) -> Result<Info, Status> {
        let sn = self.sn.clone();
        blocking("stat", move || sn.stat(&key)).await.map(info)
    }

    async fn update(&self, i: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Status> {
        let sn = self.sn.clone();
        let s = from_info(&i);
        blocking("update", move || sn.update(&s, &fieldpaths.unwrap_or_default())).await.map(info)
    }

    async fn usage(&self, key: String) -> Result<Usage, Status> {
        let sn = self.sn.clone();
        let u = blocking("usage", move || sn.usage(&key)).await?;
        Ok(Usage { size: u.bytes as i64, inodes: u.inodes as i64 })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Status> {
        let sn = self.sn.clone();
        blocking("mounts", move || sn.mounts(&key)).await.map(mounts)
    }

    async fn prepare(&self, key: String, parent: String, l: HashMap<String, String>) -> Result<Vec<Mount>, Status> {
        let sn = self.sn.clone();
        tracing::debug!(key = %key, parent = %parent, labels = ?l, "prepare");
        blocking("prepare", move || sn.prepare(&key, &parent, labels(l))).await.map(mounts)
    }

    async fn view(&self, key: String, parent: String, l: HashMap<String, String>) -> Result<Vec<Mount>, Status> {
        let sn = self.sn.clone();
        tracing::debug!(key = %key, parent = %parent, "view");
        blocking("view", move || sn.view(&key, &parent, labels(l))).await.map(mounts)
    }

    async fn commit(&self, name: String, key: String, l: HashMap<String, String>) -> Result<(), Status> {
        let sn = self.sn.clone();
        tracing::debug!(name = %name, key = %key, "commit");
        blocking("commit", move || sn.commit(&name, &key, labels(l))).await
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        let sn = self.sn.clone();
        tracing::debug!(key = %key, "remove");
        blocking("remove", move || sn.remove(&key)).await
    }

    async fn clear(&self) -> Result<(), Status> {
        let sn = self.sn.clone();
        blocking("cleanup", move || {
            sn.cleanup();
            Ok(())
        })
        .await
    }

    type InfoStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Info, Status>>>;

    async fn list(&self, _snapshotter: String, filters: Vec<String>) -> Result<Self::InfoStream, Status> {
        let sn = self.sn.clone();
        let v = blocking("walk", move || sn.list(&filters)).await?;
        Ok(futures_util::stream::iter(v.into_iter().map(info).map(Ok).collect::<Vec<_>>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_containerds_codes() {
        assert_eq!(status(Error::NotFound("x".into())).code(), Code::NotFound);
        assert_eq!(status(Error::AlreadyExists("x".into())).code(), Code::AlreadyExists);
        assert_eq!(status(Error::Conflict("x".into())).code(), Code::FailedPrecondition);
        assert_eq!(status(Error::Invalid("x".into())).code(), Code::InvalidArgument);
        let s = status(Error::NotFound("snapshot k".into()));
        assert!(s.message().contains("snapshot k"), "{}", s.message());
    }
}
