//! Mounts: layer images, writable layer images and overlay stacks.
//!
//! Overlay stacks use the new mount API (`fsopen`/`fsconfig`/`fsmount`/
//! `move_mount`) with one `lowerdir+` per layer (Linux 6.7+), which has no
//! page-size limit on options, so stacks up to overlayfs' own limit of 500
//! lower layers work. Older kernels get `mount(2)` with a `lowerdir=` list,
//! which is refused (not silently cut, as mount(8) would) when it does not
//! fit in one page.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{statx, AtFlags, StatxAttributes, StatxFlags, CWD};
use rustix::io::Errno;
use rustix::mount::{
    fsconfig_create, fsconfig_set_string, fsmount, fsopen, mount, mount_bind, mount_change, move_mount, unmount,
    FsMountFlags, FsOpenFlags, MountAttrFlags, MountFlags, MountPropagationFlags, MoveMountFlags, UnmountFlags,
};

use crate::error::{Context, Error, Result};
use crate::options::FsType;

/// Mounts a layer image's block device read-only, never replaying a
/// journal, without device nodes or setuid honoured on the host path.
pub fn mount_layer_ro(dev: &Path, target: &Path, fs: FsType) -> Result<()> {
    let data = CString::new(fs.ro_mount_data()).expect("no NUL");
    mount(dev, target, fs.name(), MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID, data.as_c_str())
        .ctx("mount layer image", target)
}

/// Mounts a writable layer image read-write.
/// Writable images are clones of one template, so xfs ones share a UUID.
pub fn mount_layer_rw(dev: &Path, target: &Path, fs: FsType) -> Result<()> {
    let data = match fs {
        FsType::Ext4 => None,
        FsType::Xfs => Some(c"nouuid"),
    };
    mount(dev, target, fs.name(), MountFlags::NOSUID | MountFlags::NODEV, data).ctx("mount writable image", target)
}

/// What an overlay mount stacks. `lowers[0]` is the topmost lower layer.
#[derive(Debug, Clone)]
pub struct OverlaySpec<'a> {
    pub lowers: &'a [PathBuf],
    /// `(upperdir, workdir)`; without it the overlay is read-only.
    pub upper: Option<(&'a Path, &'a Path)>,
}

/// Mounts an overlay at `target`.
pub fn mount_overlay(spec: &OverlaySpec<'_>, target: &Path) -> Result<()> {
    if spec.lowers.is_empty() {
        return Err(Error::Invalid("an overlay needs at least one lower layer".into()));
    }
    match mount_overlay_new_api(spec, target) {
        Ok(()) => Ok(()),
        // No new mount API, or no `lowerdir+` (before 6.7): the old way.
        Err(e) if matches!(e, Errno::NOSYS | Errno::INVAL) => {
            tracing::debug!(target = %target.display(), error = %e, "new mount API unavailable, using mount(2)");
            mount_overlay_legacy(spec, target)
        }
        Err(e) => Err(Error::sys("mount overlay", target, e)),
    }
}

pub(crate) fn mount_overlay_new_api(spec: &OverlaySpec<'_>, target: &Path) -> rustix::io::Result<()> {
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for l in spec.lowers {
        fsconfig_set_string(&fs, "lowerdir+", l)?;
    }
    if let Some((upper, work)) = spec.upper {
        fsconfig_set_string(&fs, "upperdir", upper)?;
        fsconfig_set_string(&fs, "workdir", work)?;
    }
    // The same upper dir is mounted over the same lowers after a restart;
    // no index, no redirects that would tie it to one lower stack.
    fsconfig_set_string(&fs, "index", "off")?;
    fsconfig_set_string(&fs, "redirect_dir", "off")?;
    fsconfig_create(&fs)?;
    let attrs = if spec.upper.is_none() { MountAttrFlags::MOUNT_ATTR_RDONLY } else { MountAttrFlags::empty() };
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    move_mount(&mnt, "", CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
}

pub(crate) fn mount_overlay_legacy(spec: &OverlaySpec<'_>, target: &Path) -> Result<()> {
    let mut lower = String::new();
    for (i, l) in spec.lowers.iter().enumerate() {
        let s = l.to_str().ok_or_else(|| Error::Invalid(format!("non-UTF-8 path {}", l.display())))?;
        if s.contains([':', ',']) {
            return Err(Error::Invalid(format!("path {s} has ':' or ',' which mount(2) cannot take")));
        }
        if i > 0 {
            lower.push(':');
        }
        lower.push_str(s);
    }
    let mut data = format!("lowerdir={lower},index=off,redirect_dir=off");
    let mut flags = MountFlags::empty();
    match spec.upper {
        Some((u, w)) => data.push_str(&format!(",upperdir={},workdir={}", u.display(), w.display())),
        None => flags |= MountFlags::RDONLY,
    }
    let page = rustix::param::page_size();
    if data.len() >= page {
        return Err(Error::Invalid(format!(
            "{} layers need {} bytes of overlay options, more than mount(2) takes ({page}); \
             this kernel lacks the new mount API's lowerdir+ (Linux 6.7+)",
            spec.lowers.len(),
            data.len()
        )));
    }
    let data = CString::new(data).map_err(|_| Error::Invalid("NUL in a path".into()))?;
    mount("overlay", target, "overlay", flags, data.as_c_str()).ctx("mount overlay", target)
}

/// Detaches `target` now; the filesystem goes when its last user does.
pub fn detach_path(target: &Path) -> Result<()> {
    match unmount(target, UnmountFlags::NOFOLLOW | UnmountFlags::DETACH) {
        Ok(()) | Err(Errno::INVAL) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(Error::sys("unmount", target, e)),
    }
}

/// Unmounts `target`, retrying a busy mount a bounded number of times.
/// A target that is not mounted is fine.
pub fn unmount_path(target: &Path) -> Result<()> {
    let mut delay = Duration::from_millis(10);
    for attempt in 0.. {
        match unmount(target, UnmountFlags::NOFOLLOW) {
            Ok(()) => return Ok(()),
            Err(Errno::INVAL) | Err(Errno::NOENT) => return Ok(()),
            Err(Errno::BUSY) if attempt < 6 => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(e) => return Err(Error::sys("unmount", target, e)),
        }
    }
    unreachable!()
}

/// Makes `dir` a private mount (binding it onto itself first if needed), so
/// layer mounts under it do not propagate into every container's mount
/// namespace, where they would pin loop devices.
pub fn make_private(dir: &Path) -> Result<()> {
    if !is_mountpoint(dir) {
        mount_bind(dir, dir).ctx("bind mount", dir)?;
    }
    mount_change(dir, MountPropagationFlags::PRIVATE).ctx("make mount private", dir)
}

/// Makes `dir` a `nodev,nosuid,noexec` bind mount of itself, so device
/// nodes, setuid files and executables that a layer tar puts there are
/// inert on the host until they are inside a layer image.
pub fn make_inert(dir: &Path) -> Result<()> {
    if !is_mountpoint(dir) {
        mount_bind(dir, dir).ctx("bind mount", dir)?;
    }
    rustix::mount::mount_remount(
        dir,
        MountFlags::BIND | MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOEXEC,
        "",
    )
    .ctx("remount nodev,nosuid,noexec", dir)
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (the first field), as `statx`'s `STATX_MNT_ID` gives it.
    pub mount_id: u64,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
    /// The per-mount options, then the superblock's (`rw,relatime,...`).
    pub options: Vec<String>,
}

/// Undoes mountinfo's octal escapes (`\040` for space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_id = left.split(' ').next()?.parse().ok()?;
            let mount_point = left.split(' ').nth(4)?;
            let mut options: Vec<String> = left.split(' ').nth(5).unwrap_or("").split(',').map(str::to_owned).collect();
            let mut r = right.split(' ');
            let fs_type = r.next()?;
            let source = r.next().unwrap_or("");
            options.extend(r.next().unwrap_or("").split(',').filter(|o| !o.is_empty()).map(str::to_owned));
            options.retain(|o| !o.is_empty());
            Some(MountEntry {
                mount_id,
                mount_point: PathBuf::from(unescape(mount_point)),
                fs_type: fs_type.to_owned(),
                source: unescape(source),
                options,
            })
        })
        .collect()
}

/// This process's mounts.
pub fn mountinfo() -> Result<Vec<MountEntry>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ctx("read", "/proc/self/mountinfo")?;
    Ok(parse_mountinfo(&text))
}

/// Whether `p` is the root of the mount that a lookup of `p` reaches.
///
/// Asks the kernel about the path itself (`STATX_ATTR_MOUNT_ROOT`, Linux
/// 5.8+), not mountinfo: a mount that mountinfo lists at `p` but that a
/// later mount on a parent covers (a host's `/run/sharedloop/layers` in a
/// namespace with its own tmpfs on `/run`) is not what `p` names, and
/// treating it as such makes `make_private` fail with EINVAL. Kernels
/// without the attribute get the mountinfo answer, narrowed by
/// [`is_visible`].
pub fn is_mountpoint(p: &Path) -> bool {
    match statx(CWD, p, AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT, StatxFlags::empty()) {
        Ok(st) if st.stx_attributes_mask.contains(StatxAttributes::MOUNT_ROOT) => {
            st.stx_attributes.contains(StatxAttributes::MOUNT_ROOT)
        }
        Ok(_) | Err(Errno::NOSYS) => {
            mountinfo().map(|m| m.iter().any(|e| e.mount_point == p && is_visible(e))).unwrap_or(false)
        }
        Err(_) => false,
    }
}

/// Whether the mount `e` is the one a lookup of its mount point reaches,
/// not one covered by a later mount there or on a parent (mountinfo lists
/// those too). Asks `statx` for the path's mount id (Linux 5.8+); older
/// kernels cannot tell, and every mount counts as visible.
pub fn is_visible(e: &MountEntry) -> bool {
    match statx(CWD, &e.mount_point, AtFlags::SYMLINK_NOFOLLOW | AtFlags::NO_AUTOMOUNT, StatxFlags::MNT_ID) {
        Ok(st) if st.stx_mask & StatxFlags::MNT_ID.bits() != 0 => st.stx_mnt_id == e.mount_id,
        Ok(_) | Err(Errno::NOSYS) => true,
        Err(_) => false,
    }
}

/// The mounts at or below `dir` that paths there reach (see
/// [`is_visible`]), in mountinfo order. Only these are asked about, so a
/// hung network mount elsewhere cannot stall the caller.
pub fn mounts_under(dir: &Path) -> Result<Vec<MountEntry>> {
    Ok(mountinfo()?.into_iter().filter(|e| e.mount_point.starts_with(dir) && is_visible(e)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_and_unescapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 7:3 / /var/lib/x/mnt/sha256-ab ro,nodev shared:5 - ext4 /dev/loop3 ro,noload\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[1].mount_point, PathBuf::from("/var/lib/x/mnt/sha256-ab"));
        assert_eq!((m[0].mount_id, m[1].mount_id), (36, 40));
    }
}
