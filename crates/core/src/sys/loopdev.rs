//! Loop devices through one `LOOP_CONFIGURE` ioctl (Linux 5.8+):
//! read-only, autoclear and direct I/O are set atomically with the backing
//! file, so a device is never visible half-configured and is detached by the
//! kernel as soon as its last user (the mount) goes away.
//!
//! See the kernel's `include/uapi/linux/loop.h` for the layouts below.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// How to attach a backing file.
#[derive(Clone, Copy, Debug)]
pub struct AttachOptions {
    pub read_only: bool,
    /// Try `LO_FLAGS_DIRECT_IO`; fall back to buffered I/O when the backing
    /// file refuses it.
    pub direct_io: bool,
}

/// An attached loop device. It is configured with autoclear, so it detaches
/// itself once this handle is dropped and no mount uses it any more.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    direct_io: bool,
    /// `None` for a device of [`crate::kernel::fake`].
    _fd: Option<OwnedFd>,
}

impl LoopDevice {
    /// A device that a kernel for tests made up: nothing is attached.
    pub(crate) fn simulated(path: PathBuf) -> LoopDevice {
        LoopDevice { path, direct_io: false, _fd: None }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn direct_io(&self) -> bool {
        self.direct_io
    }
}

fn ioctl_arg(fd: &impl AsRawFd, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the requests passed here take an integer argument (or none),
    // not a pointer, so no memory is read or written through `arg`.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn configure(dev: &File, cfg: &LoopConfig) -> io::Result<()> {
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`; `cfg` is a valid,
    // initialised, correctly laid out (asserted above) value that outlives
    // the call, and the kernel does not keep the pointer.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, cfg as *const LoopConfig) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Attaches `backing` to a free loop device, opening it by path.
pub fn attach(backing: &Path, opts: AttachOptions) -> io::Result<LoopDevice> {
    let file = OpenOptions::new().read(true).write(!opts.read_only).open(backing)?;
    attach_file(&file, backing, opts)
}

/// Attaches the already open `file` to a free loop device: the device
/// reads exactly the inode the caller opened (and may have checked), not
/// whatever `name` names by now. `name` is only the label the kernel shows
/// (the first 63 bytes of `lo_file_name`). A read-write device needs a file
/// opened for writing.
pub fn attach_file(file: &File, name: &Path, opts: AttachOptions) -> io::Result<LoopDevice> {
    let backing = name;
    let ctl = OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if opts.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    // Another process may take the device between GET_FREE and CONFIGURE
    // (EBUSY): ask again, a bounded number of times.
    let mut last = io::Error::from_raw_os_error(libc::EBUSY);
    for _ in 0..64 {
        let n = ioctl_arg(&ctl, LOOP_CTL_GET_FREE, 0)?;
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = match OpenOptions::new().read(true).write(!opts.read_only).open(&path) {
            Ok(d) => d,
            // The node may not exist yet right after GET_FREE created it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                last = e;
                std::thread::sleep(std::time::Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut direct = opts.direct_io;
        loop {
            let mut info_flags = flags;
            if direct {
                info_flags |= LO_FLAGS_DIRECT_IO;
            }
            let cfg = LoopConfig {
                fd: file.as_raw_fd() as u32,
                block_size: 0,
                info: LoopInfo64 {
                    lo_device: 0,
                    lo_inode: 0,
                    lo_rdevice: 0,
                    lo_offset: 0,
                    lo_sizelimit: 0,
                    lo_number: 0,
                    lo_encrypt_type: 0,
                    lo_encrypt_key_size: 0,
                    lo_flags: info_flags,
                    lo_file_name: file_name_field(backing),
                    lo_crypt_name: [0; LO_NAME_SIZE],
                    lo_encrypt_key: [0; 32],
                    lo_init: [0; 2],
                },
                reserved: [0; 8],
            };
            match configure(&dev, &cfg) {
                Ok(()) => return Ok(LoopDevice { path, direct_io: direct, _fd: Some(dev.into()) }),
                // Direct I/O needs an aligned backing file on a filesystem
                // that supports O_DIRECT; without it, buffered I/O.
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => direct = false,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    last = e;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Err(last)
}

fn file_name_field(p: &Path) -> [u8; LO_NAME_SIZE] {
    let mut out = [0u8; LO_NAME_SIZE];
    let b = p.as_os_str().as_encoded_bytes();
    let n = b.len().min(LO_NAME_SIZE - 1);
    out[..n].copy_from_slice(&b[..n]);
    out
}

/// Detaches a loop device that autoclear did not release (a leftover of a
/// crash before it was mounted).
pub fn detach(dev: &Path) -> io::Result<()> {
    let f = File::open(dev)?;
    ioctl_arg(&f, LOOP_CLR_FD, 0).map(|_| ())
}

/// The backing file of `/dev/loopN`, from sysfs (full path, unlike the
/// 64-byte field of `loop_info64`). `None` when the device is not attached.
pub fn backing_file(dev: &Path) -> Option<PathBuf> {
    let name = dev.file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end_matches('\n').trim_end_matches(" (deleted)")))
}

/// Every attached loop device with its backing file.
pub fn list() -> Vec<(PathBuf, PathBuf)> {
    let Ok(rd) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with("loop") {
            continue;
        }
        let dev = PathBuf::from(format!("/dev/{name}"));
        if let Some(b) = backing_file(&dev) {
            out.push((dev, b));
        }
    }
    out
}

/// Asks a free loop device whether it knows `LOOP_CONFIGURE`, attaching
/// nothing: the ioctl with a file descriptor that is not open answers
/// EBADF on a kernel that has it (Ok here), EINVAL or ENOTTY on one that
/// does not (returned).
pub fn probe_configure() -> io::Result<()> {
    let ctl = OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    let n = ioctl_arg(&ctl, LOOP_CTL_GET_FREE, 0)?;
    let path = PathBuf::from(format!("/dev/loop{n}"));
    let mut dev = None;
    for _ in 0..20 {
        match File::open(&path) {
            Ok(d) => {
                dev = Some(d);
                break;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::thread::sleep(std::time::Duration::from_millis(5)),
            Err(e) => return Err(e),
        }
    }
    let dev =
        dev.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} did not appear", path.display())))?;
    let cfg = LoopConfig {
        fd: u32::MAX,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    match configure(&dev, &cfg) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(()),
        // Taken by another process in between: it was configured, so the
        // kernel knows the ioctl.
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(e) => Err(e),
        // Cannot happen with fd -1; should it, let it go again.
        Ok(()) => {
            let _ = ioctl_arg(&dev, LOOP_CLR_FD, 0);
            Ok(())
        }
    }
}

/// The number of a free loop device (`LOOP_CTL_GET_FREE`; the kernel makes
/// one when none is free, up to its limits).
pub fn get_free() -> io::Result<u32> {
    let ctl = OpenOptions::new().read(true).write(true).open("/dev/loop-control")?;
    ioctl_arg(&ctl, LOOP_CTL_GET_FREE, 0).map(|n| n as u32)
}
