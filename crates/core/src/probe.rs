//! Probes of the kernel features sharedloop uses, by trying them rather
//! than by comparing version numbers (distributions backport, and a
//! feature may be configured out). Shared by the start-up check
//! ([`crate::Config::check_kernel`]) and `sharedloop doctor`.

use std::fs::{self, File, OpenOptions};
use std::path::PathBuf;

use rustix::fs::{openat2, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::mount::{fsopen, unmount, FsOpenFlags, UnmountFlags};

use crate::sys::loopdev;

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The feature works; the text says how it was seen.
    Present(String),
    /// The kernel lacks it; the text says how that showed.
    Missing(String),
    /// The probe could not tell (no device to try it on, not allowed...).
    Unknown(String),
}

impl Probe {
    pub fn is_missing(&self) -> bool {
        matches!(self, Probe::Missing(_))
    }
    pub fn detail(&self) -> &str {
        match self {
            Probe::Present(s) | Probe::Missing(s) | Probe::Unknown(s) => s,
        }
    }
}

/// `openat2(2)` with `RESOLVE_BENEATH` (Linux 5.6+): how layer tars are
/// extracted and images opened without following links out of the store.
pub fn openat2_beneath() -> Probe {
    let root = match rustix::fs::open("/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) => return Probe::Unknown(format!("cannot open /: {e}")),
    };
    match openat2(
        &root,
        ".",
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(_) => Probe::Present("openat2(RESOLVE_BENEATH) works".into()),
        Err(Errno::NOSYS) => Probe::Missing("openat2 is not implemented (ENOSYS; Linux 5.6+ has it)".into()),
        Err(e @ (Errno::INVAL | Errno::NOTSUP)) => {
            Probe::Missing(format!("openat2 refuses RESOLVE_BENEATH ({e}; Linux 5.6+ has it)"))
        }
        Err(e) => Probe::Unknown(format!("openat2 failed: {e}")),
    }
}

/// `LOOP_CONFIGURE` (Linux 5.8+), asked of a free loop device with a bad
/// file descriptor: a kernel that knows the ioctl answers EBADF, one that
/// does not EINVAL or ENOTTY. Nothing is attached. Unknown without
/// `/dev/loop-control` (see [`loop_attach`]).
pub fn loop_configure_ioctl() -> Probe {
    match loopdev::probe_configure() {
        Ok(()) => Probe::Present("the loop driver knows LOOP_CONFIGURE".into()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
            Probe::Missing(format!("the loop driver refuses LOOP_CONFIGURE ({e}; Linux 5.8+ has it)"))
        }
        Err(e) => Probe::Unknown(format!("cannot ask a loop device: {e}")),
    }
}

/// A scratch directory under the system temp dir, removed (after its
/// mounts are detached) when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(what: &str) -> std::io::Result<Scratch> {
        // A random name: pids repeat across PID namespaces sharing /tmp,
        // and a predictable name in /tmp lets a local user block it.
        let p = std::env::temp_dir().join(format!("sharedloop-probe-{what}-{}", crate::ids::random_token()));
        fs::create_dir(&p)?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = unmount(self.0.join("merged"), UnmountFlags::DETACH | UnmountFlags::NOFOLLOW);
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Attaches a tiny sparse file to a loop device with `LOOP_CONFIGURE`, as
/// layer images are, and lets it go (autoclear detaches it). The full
/// test `sharedloop doctor` runs; the file is removed in any case.
pub fn loop_attach() -> Probe {
    let scratch = match Scratch::new("loop") {
        Ok(s) => s,
        Err(e) => return Probe::Unknown(format!("cannot create a scratch directory: {e}")),
    };
    let img = scratch.0.join("probe.img");
    let file = match OpenOptions::new().read(true).write(true).create_new(true).open(&img) {
        Ok(f) => f,
        Err(e) => return Probe::Unknown(format!("cannot create {}: {e}", img.display())),
    };
    if let Err(e) = file.set_len(1 << 20) {
        return Probe::Unknown(format!("cannot size {}: {e}", img.display()));
    }
    drop(file);
    let file = match File::open(&img) {
        Ok(f) => f,
        Err(e) => return Probe::Unknown(format!("cannot open {}: {e}", img.display())),
    };
    let r = loopdev::attach_file(&file, &img, loopdev::AttachOptions { read_only: true, direct_io: false });
    match r {
        Ok(dev) => {
            let p = format!("attached and detached {} with LOOP_CONFIGURE", dev.path().display());
            let _ = loopdev::detach(dev.path());
            drop(dev);
            Probe::Present(p)
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOTTY)) => {
            Probe::Missing(format!("LOOP_CONFIGURE refused ({e}; Linux 5.8+ has it)"))
        }
        Err(e) => Probe::Unknown(format!("cannot attach a loop device: {e}")),
    }
}

/// The filesystems the kernel has now (`/proc/filesystems`).
pub fn proc_filesystems() -> Vec<String> {
    fs::read_to_string("/proc/filesystems")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect()
}

/// Whether the kernel has filesystem `name`: registered, or a module
/// `modprobe -n` would load.
pub fn filesystem(name: &str) -> Probe {
    if proc_filesystems().iter().any(|f| f == name) {
        return Probe::Present(format!("{name} in /proc/filesystems"));
    }
    match std::process::Command::new("modprobe")
        .args(["-n", "-q", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Probe::Present(format!("{name} is a loadable module")),
        Ok(_) => Probe::Missing(format!("{name} is not in /proc/filesystems and modprobe finds no module")),
        Err(e) => Probe::Unknown(format!("{name} is not in /proc/filesystems; modprobe: {e}")),
    }
}

/// overlayfs is there: `fsopen("overlay")` (which loads the module like
/// a mount would), or `/proc/filesystems` on a kernel without fsopen.
pub fn overlay_present() -> Probe {
    match fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(_) => Probe::Present("fsopen(overlay) works".into()),
        Err(Errno::NODEV) => Probe::Missing("the kernel has no overlay filesystem (fsopen: ENODEV)".into()),
        Err(_) if proc_filesystems().iter().any(|f| f == "overlay") => {
            Probe::Present("overlay in /proc/filesystems".into())
        }
        Err(e) => Probe::Missing(format!("overlay is not in /proc/filesystems (fsopen: {e})")),
    }
}

/// Mounts a read-only overlay of two empty lower dirs in a scratch dir the
/// way stacks are mounted ([`crate::mount`]: the new mount API with one
/// `lowerdir+` each), then unmounts it. `Missing` when only mount(2)'s
/// `lowerdir=` list works (stacks are then limited to a page of options);
/// the text says so.
pub fn overlay_lowerdir_plus() -> Probe {
    let scratch = match Scratch::new("overlay") {
        Ok(s) => s,
        Err(e) => return Probe::Unknown(format!("cannot create a scratch directory: {e}")),
    };
    let (l1, l2, merged) = (scratch.0.join("l1"), scratch.0.join("l2"), scratch.0.join("merged"));
    for d in [&l1, &l2, &merged] {
        if let Err(e) = fs::create_dir(d) {
            return Probe::Unknown(format!("cannot create {}: {e}", d.display()));
        }
    }
    let lowers = [l1, l2];
    let spec = crate::mount::OverlaySpec { lowers: &lowers, upper: None };
    match crate::mount::mount_overlay_new_api(&spec, &merged) {
        Ok(()) => Probe::Present("mounted a test overlay with lowerdir+".into()),
        Err(e @ (Errno::NOSYS | Errno::INVAL)) => match crate::mount::mount_overlay_legacy(&spec, &merged) {
            Ok(()) => Probe::Missing(format!(
                "no lowerdir+ ({e}; Linux 6.7+): stacks fall back to mount(2), limited to one page of options"
            )),
            Err(e2) => Probe::Unknown(format!("lowerdir+: {e}; mount(2): {e2}")),
        },
        Err(e) => Probe::Unknown(format!("test overlay mount failed: {e}")),
    }
}

type ProbeFn = fn() -> Probe;

/// The features without which sharedloop cannot work, as the start-up
/// check probes them (cheaply: nothing is mounted or attached). The first
/// missing one, named, with how it showed.
pub fn missing_required() -> Option<(&'static str, String)> {
    static RESULT: std::sync::OnceLock<Option<(&'static str, String)>> = std::sync::OnceLock::new();
    RESULT
        .get_or_init(|| {
            let probes: [(&'static str, ProbeFn); 3] = [
                ("openat2 (RESOLVE_BENEATH)", openat2_beneath),
                ("overlayfs", overlay_present),
                ("LOOP_CONFIGURE", loop_configure_ioctl),
            ];
            probes.iter().find_map(|(name, f)| match f() {
                Probe::Missing(d) => Some((*name, d)),
                _ => None,
            })
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openat2_is_there_on_the_test_kernel() {
        assert!(matches!(openat2_beneath(), Probe::Present(_)), "{:?}", openat2_beneath());
    }
}
