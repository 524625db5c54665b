//! The only place with `unsafe` code: ioctls and libc calls that neither
//! rustix nor the standard library wrap. Each ioctl is declared once, by name.

pub mod group;
pub mod loopdev;
pub mod pagecache;
