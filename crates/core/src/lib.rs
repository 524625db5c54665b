//! sharedloop's core: a layer store of filesystem images, loop-mounted
//! read-only and stacked with overlayfs. No protocol code lives here; the
//! Docker plugin and the containerd snapshotter are adapters over
//! [`driver::Driver`].
pub mod admin;
pub mod apply;
pub(crate) mod claim;
pub mod driver;
pub mod error;
pub mod export;
pub mod fault;
pub mod fsmagic;
pub mod guard;
pub mod ids;
pub mod image;
pub(crate) mod imagefile;
pub mod kernel;
pub mod layermounts;
pub mod metrics;
pub mod mount;
pub mod options;
pub mod perms;
pub mod placement;
pub mod probe;
pub mod store;
pub mod sys;

pub use driver::{CreateKind, Driver, Lease, MountSpec};
pub use error::{Error, Result};
pub use options::Config;
