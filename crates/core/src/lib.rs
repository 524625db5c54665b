//! sharedloop's core: a layer store of filesystem images, loop-mounted
//! read-only and stacked with overlayfs. No protocol code lives here; the
//! Docker plugin and the containerd snapshotter are adapters over
//! [`driver::Driver`].
//!
//! The API, by who uses it:
//! - the front ends (the Docker plugin, the containerd snapshotter):
//!   [`Driver`] and its reports, [`MountSpec`], [`Lease`], [`Config`],
//!   [`Error`] (semantic variants: not found, already exists, in use,
//!   conflict, invalid...; each front end maps them to its protocol in one
//!   place), [`ids`], [`metrics`] (request counters) and [`fault::point`];
//! - the binary (`sharedloop serve`, the admin commands, doctor):
//!   [`layermounts::LayerMounts`] (one table per process), [`store`]
//!   (reading the store: layers, references, hosts), [`admin`] (gc,
//!   verify, promote), [`placement`], [`probe`], [`fsmagic`],
//!   [`sys::group`], [`mount::parse_mountinfo`];
//! - tests and fuzzing: [`kernel`] (the seam and its fake), [`apply`] and
//!   [`export`] (tars in and out), [`image`], [`mount`], [`sys::loopdev`].
//!
//! The rest is the crate's own: build claims, guards, opened image files.
pub mod admin;
pub mod apply;
pub(crate) mod claim;
pub mod driver;
pub mod error;
pub mod export;
pub mod fault;
pub mod fsmagic;
pub(crate) mod guard;
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
pub mod prefetch;
pub mod probe;
pub mod store;
pub mod sys;

pub use driver::{CreateKind, Driver, Lease, MountSpec};
pub use error::{Error, Result};
pub use options::Config;
