//! The only place with `unsafe` code: ioctls that neither rustix nor the
//! standard library wrap. Each ioctl is declared once, by name.

pub mod loopdev;
