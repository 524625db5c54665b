//! Typed errors of the core. Front ends turn these into wire errors in one
//! place each; nothing here knows about HTTP or gRPC.

use std::io;
use std::path::PathBuf;

use rustix::io::Errno;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration option is unknown or has a bad value.
    #[error("option {option}: {reason}")]
    Option { option: String, reason: String },

    /// The running kernel lacks what sharedloop needs.
    #[error("kernel {release} lacks {feature}: {detail} (`sharedloop doctor` checks the host; set sharedloop.override_kernel_check=true to skip this check)")]
    KernelTooOld { release: String, feature: String, detail: String },

    /// What the engine named does not exist (the text says what it is).
    #[error("{0} does not exist")]
    NotFound(String),

    /// The parent of a new layer does not exist.
    #[error("parent layer {parent} of {id} does not exist")]
    ParentNotFound { id: String, parent: String },

    /// A layer still has users (mounts or children).
    #[error("layer {id} is in use: {why}")]
    InUse { id: String, why: String },

    /// A snapshot or layer of that name exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),

    /// The object is not in the state the request needs (a commit of a
    /// snapshot that is not active, a removal of a snapshot with children).
    #[error("{0}")]
    Conflict(String),

    /// The request is not valid for this layer (wrong kind, bad argument).
    #[error("{0}")]
    Invalid(String),

    /// The layer tar is malformed or tries to escape the layer.
    #[error("bad layer tar (entry {entry:?}): {reason}")]
    BadTar { entry: String, reason: String },

    /// A layer image could not be built.
    #[error("building the {fs} image for layer {layer} failed: {reason}")]
    Build { layer: String, fs: String, reason: String },

    /// Neither the root nor the fallback directory could take a new layer.
    #[error("no usable layer directory: root {root}: {root_err}; fallback {fallback}: {fallback_err}")]
    NoStore { root: PathBuf, root_err: String, fallback: PathBuf, fallback_err: String },

    /// A system call failed on a path.
    #[error("{op} {path}: {source}")]
    Sys { op: &'static str, path: PathBuf, source: io::Error },

    /// An external tool (mkfs, ...) failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool { tool: String, status: String, stderr: String },

    /// On-disk state is not what it should be.
    #[error("corrupt state in {path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn sys(op: &'static str, path: impl Into<PathBuf>, source: impl Into<io::Error>) -> Self {
        Error::Sys { op, path: path.into(), source: source.into() }
    }

    /// The errno under a system error, if there is one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Sys { source, .. } => source.raw_os_error().map(Errno::from_raw_os_error),
            _ => None,
        }
    }
}

/// Extension to attach an operation and a path to I/O results.
pub trait Context<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T, E: Into<io::Error>> Context<T> for std::result::Result<T, E> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::sys(op, path, e))
    }
}
