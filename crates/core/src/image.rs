//! Building filesystem images.
//!
//! A read-only layer image holds its tree under `/fs` ([`LAYER_ROOT`]).
//! It is written once and then only read, so it has no
//! journal and no reserved blocks, and is sized to fit its content.
//! - ext4: `mkfs.ext4 -d STAGING` writes the tree straight into the image
//!   file without a mount (see "Decisions" in docs/architecture.md).
//! - xfs: mkfs, loop-mount read-write, copy, unmount (mkfs.xfs in Debian 12
//!   cannot populate from a directory). xfsprogs refuses filesystems under
//!   300 MiB, so xfs layer images are at least that large (sparse).
//!
//! A writable layer image holds `upper/` and `work/` for overlayfs; it is a
//! sparse file of the writable layer's size limit.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::Command;

use crate::apply::stream::TarPlan;
use crate::error::{Context, Error, Result};
use crate::export::TreeCounts;
use crate::guard::Staged;
use crate::ids::Bytes;
use crate::mount;
use crate::options::FsType;
use crate::sys::loopdev;

/// The directory inside a layer image that holds the layer's tree. The
/// image root also has ext4's `lost+found`, which must not show up in
/// containers; overlayfs stacks `<mount>/fs`.
pub const LAYER_ROOT: &str = "fs";

fn run(cmd: &mut Command) -> Result<()> {
    let tool = format!("{:?}", cmd.get_program());
    let out = cmd.output().map_err(|e| Error::Tool {
        tool: tool.clone(),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        let mut stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if stderr.is_empty() {
            stderr = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        // The first lines say what is wrong; usage texts follow.
        let stderr = stderr.lines().take(3).collect::<Vec<_>>().join("; ");
        Err(Error::Tool { tool, status: out.status.to_string(), stderr })
    }
}

/// Mode of a published layer image: other hosts read it.
pub const SHARED_IMAGE_MODE: u32 = 0o644;

/// A new sparse file of `size` with `mode` (a writable image is 0600: it
/// holds a container's files; a layer image for the store 0644).
fn create_sparse(path: &Path, size: Bytes, mode: u32) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new().write(true).read(true).create_new(true).mode(mode).open(path).ctx("create", path)?;
    f.set_len(size.0).ctx("truncate", path)?;
    Ok(f)
}

/// A first guess at the image size for a tree with `c` counts.
pub fn estimate_size(c: TreeCounts, fs: FsType) -> Bytes {
    let data = c.blocks * 4096;
    let inodes = c.inodes * 256;
    let est = match fs {
        // bitmaps and group descriptors are ~1/2048 of the fs; 10 % slack
        FsType::Ext4 => data + data / 10 + inodes + 4 * Bytes::MIB,
        // xfs: log (>= ~10 MiB at this size), AG headers, inode chunks
        FsType::Xfs => data + data / 5 + 2 * inodes + 64 * Bytes::MIB,
    };
    Bytes(est.max(fs.min_image_size().0).next_multiple_of(Bytes::MIB))
}

/// Builds a read-only layer image at `out` (must not exist) from `staging`.
/// Grows and retries when the first estimate was too small.
pub fn build_layer_image(staging: &Path, out: &Path, counts: TreeCounts, fs: FsType) -> Result<Bytes> {
    let mut size = estimate_size(counts, fs);
    let mut last = None;
    for _ in 0..5 {
        let r = match fs {
            FsType::Ext4 => build_ext4(staging, out, size, counts),
            FsType::Xfs => build_xfs(staging, out, size),
        };
        match r {
            Ok(()) => {
                let t = std::time::Instant::now();
                File::open(out).ctx("open", out)?.sync_all().ctx("fsync", out)?;
                tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "image synced");
                return Ok(size);
            }
            Err(e) => {
                tracing::debug!(image = %out.display(), size = %size, error = %e, "image build failed, growing");
                let _ = std::fs::remove_file(out);
                last = Some(e);
                size = Bytes((size.0 + size.0 / 2).next_multiple_of(Bytes::MIB));
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

fn build_ext4(staging: &Path, out: &Path, size: Bytes, counts: TreeCounts) -> Result<()> {
    create_sparse(out, size, SHARED_IMAGE_MODE)?;
    let inodes = (counts.inodes + counts.inodes / 10 + 64).to_string();
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N", &inodes, "-L", "sharedloop"])
        .args(["-O", "^has_journal,^resize_inode", "-E", "root_owner=0:0,nodiscard", "-d"])
        .arg(staging)
        .arg(out))
}

/// The `mke2fs` that builds layer images in one pass from a tar
/// (`mke2fs -d -`, e2fsprogs >= 1.47.1 with libarchive): its version
/// line, or why there is none. Probed once per process, by building a
/// tiny image from a tiny tar in `scratch` (the version alone does not
/// tell: mke2fs loads libarchive only when it meets a tar).
pub fn one_pass_tool(scratch: &Path) -> std::result::Result<String, String> {
    static PROBED: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
    PROBED
        .get_or_init(|| {
            let probed = probe_one_pass(scratch);
            match &probed {
                Ok(tool) => tracing::info!(tool = %tool, "layer images are built in one pass from the tar"),
                Err(why) => tracing::warn!(reason = %why, "layer images are built staged: no one-pass tool"),
            }
            probed
        })
        .clone()
}

fn probe_one_pass(scratch: &Path) -> std::result::Result<String, String> {
    let out = Command::new("mke2fs").arg("-V").output().map_err(|e| format!("mke2fs: {e}"))?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next().unwrap_or("").trim().to_owned();
    let version: Vec<u32> = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(|c: char| !c.is_ascii_digit())
        .map_while(|p| p.parse().ok())
        .collect();
    if version < vec![1, 47, 1] {
        return Err(format!("{line}: reading a tar needs e2fsprogs 1.47.1 or later"));
    }
    let img = scratch.join(format!(".probe-{}.img", crate::ids::random_token()));
    let _cleanup = Staged::new(&img);
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    tar.append_data(&mut h, LAYER_ROOT, std::io::empty()).map_err(|e| e.to_string())?;
    let tar = tar.into_inner().map_err(|e| e.to_string())?;
    create_sparse(&img, Bytes(8 * Bytes::MIB), 0o600).map_err(|e| e.to_string())?;
    match mke2fs_from_tar(&img, 64, &mut |w| w.write_all(&tar).ctx("write", "mke2fs")) {
        Ok(()) => Ok(line),
        Err(e) => Err(format!("{line} cannot build from a tar: {e}")),
    }
}

/// Runs `mke2fs -d -` into the existing sparse file `out`, feeding it
/// what `feed` writes. A feed error (other than mke2fs going away) is
/// returned as is; otherwise mke2fs's own failure.
fn mke2fs_from_tar(out: &Path, inodes: u64, feed: &mut dyn FnMut(&mut dyn std::io::Write) -> Result<()>) -> Result<()> {
    use std::io::{Read as _, Write as _};
    use std::process::Stdio;
    let tool = "mke2fs -d -".to_owned();
    let inodes = inodes.to_string();
    let mut child = Command::new("mke2fs")
        // Untranslated messages: out_of_space reads them.
        .env("LC_ALL", "C")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-N", &inodes, "-L", "sharedloop"])
        .args(["-O", "^has_journal,^resize_inode", "-E", "root_owner=0:0,nodiscard", "-d", "-"])
        .arg(out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Tool { tool: tool.clone(), status: "not started".into(), stderr: e.to_string() })?;
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        s
    });
    let fed = {
        let stdin = child.stdin.take().expect("piped");
        let mut w = std::io::BufWriter::with_capacity(1 << 20, stdin);
        feed(&mut w).and_then(|()| w.flush().ctx("write", "mke2fs"))
    };
    let status =
        child.wait().map_err(|e| Error::Tool { tool: tool.clone(), status: "lost".into(), stderr: e.to_string() })?;
    let stderr = reader.join().unwrap_or_default();
    if status.success() {
        // mke2fs read the whole tar and built the image; a feed error
        // now is ours (the stream changed), not a broken pipe.
        return fed;
    }
    let stderr = String::from_utf8_lossy(&stderr).lines().take(3).collect::<Vec<_>>().join("; ");
    match fed {
        Err(Error::Sys { ref source, .. }) if source.kind() == std::io::ErrorKind::BrokenPipe => {
            Err(Error::Tool { tool, status: status.to_string(), stderr })
        }
        Err(e) => Err(e),
        Ok(()) => Err(Error::Tool { tool, status: status.to_string(), stderr }),
    }
}

/// Builds a read-only ext4 layer image at `out` (must not exist) in one
/// pass from the tar in `spool`, planned by [`crate::apply::stream::plan`]:
/// `mke2fs -d -` reads the re-written tar, then the extended attributes
/// mke2fs does not copy are set through a read-write mount. Grows and
/// retries when the first estimate was too small.
///
/// Where `out` is on a network filesystem the image is built in `scratch`
/// (local) and then copied: mke2fs writes a tar's file data 4 KiB at a
/// time, one round trip each on NFS or sshfs; the copy writes MiBs.
pub fn build_layer_image_from_tar(spool: &File, plan: &TarPlan, out: &Path, scratch: &Path) -> Result<Bytes> {
    let remote = out.parent().is_some_and(crate::fsmagic::is_network);
    if !remote {
        return build_from_tar_at(spool, plan, out);
    }
    let local = scratch.join(format!(".build-{}.img", crate::ids::random_token()));
    let _cleanup = Staged::new(&local);
    let size = build_from_tar_at(spool, plan, &local)?;
    sparse_copy(&local, out, SHARED_IMAGE_MODE)?;
    File::open(out).ctx("open", out)?.sync_all().ctx("fsync", out)?;
    Ok(size)
}

fn build_from_tar_at(spool: &File, plan: &TarPlan, out: &Path) -> Result<Bytes> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut size = estimate_size(plan.counts, FsType::Ext4);
    let inodes = plan.counts.inodes + plan.counts.inodes / 10 + 64;
    let mut last = None;
    for _ in 0..4 {
        create_sparse(out, size, SHARED_IMAGE_MODE)?;
        let built = if crate::fault::fails("one-pass-build") {
            Err(Error::Tool {
                tool: "mke2fs -d -".into(),
                status: "exit status: 1".into(),
                stderr: "fault injection: one-pass-build".into(),
            })
        } else {
            mke2fs_from_tar(out, inodes, &mut |w| crate::apply::stream::rewrite(spool, plan, w, now))
                .and_then(|()| set_xattrs(out, &plan.xattrs))
        };
        match built {
            Ok(()) => {
                let t = std::time::Instant::now();
                File::open(out).ctx("open", out)?.sync_all().ctx("fsync", out)?;
                tracing::debug!(ms = t.elapsed().as_secs_f64() * 1e3, "image synced");
                return Ok(size);
            }
            Err(e) if !out_of_space(&e) => {
                let _ = std::fs::remove_file(out);
                return Err(e);
            }
            Err(e) => {
                tracing::debug!(image = %out.display(), size = %size, error = %e, "one-pass build ran out of space, growing");
                let _ = std::fs::remove_file(out);
                last = Some(e);
                size = Bytes((size.0 + size.0 / 2).next_multiple_of(Bytes::MIB));
            }
        }
    }
    Err(last.expect("at least one attempt"))
}

/// Whether a one-pass build failed for want of blocks or inodes (the
/// estimate was too small: grow and build again) rather than for a
/// reason a bigger image would not change (a tar mke2fs refuses, a tool
/// that fails): those go back to the caller at once.
fn out_of_space(e: &Error) -> bool {
    match e {
        Error::Tool { stderr, .. } => {
            let s = stderr.to_ascii_lowercase();
            ["could not allocate", "no free space", "too big for a", "too small"].iter().any(|m| s.contains(m))
        }
        _ => e.errno() == Some(rustix::io::Errno::NOSPC),
    }
}

/// Sets `xattrs` (paths below the image's `fs/`) through a read-write
/// mount of image `img`. The paths were planned from a tar whose every
/// parent is a directory it lists (no symlink on the way); the last
/// component is opened without following a link.
fn set_xattrs(img: &Path, xattrs: &[(std::path::PathBuf, String, Vec<u8>)]) -> Result<()> {
    if xattrs.is_empty() {
        return Ok(());
    }
    let dev = loopdev::attach(img, loopdev::AttachOptions { read_only: false, direct_io: false })
        .ctx("attach loop device", img)?;
    let mnt = tempdir_near(img)?;
    if let Err(e) = mount::mount_layer_rw(dev.path(), &mnt, FsType::Ext4) {
        let _ = std::fs::remove_dir(&mnt);
        return Err(e);
    }
    let root = mnt.join(LAYER_ROOT);
    let set = || -> Result<()> {
        for (rel, name, value) in xattrs {
            let p = root.join(rel);
            let fd = rustix::fs::open(
                &p,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            )
            .ctx("open", &p)?;
            let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
            rustix::fs::setxattr(proc.as_str(), name.as_str(), value, rustix::fs::XattrFlags::empty())
                .ctx("setxattr", &p)?;
        }
        Ok(())
    };
    let done = set();
    let unmounted = mount::unmount_path(&mnt);
    let _ = std::fs::remove_dir(&mnt);
    drop(dev);
    done.and(unmounted)
}

fn build_xfs(staging: &Path, out: &Path, size: Bytes) -> Result<()> {
    create_sparse(out, size, SHARED_IMAGE_MODE)?;
    run(Command::new("mkfs.xfs").args(["-q", "-f", "-K", "-L", "sharedloop"]).arg(out))?;
    copy_into_image(staging, out, FsType::Xfs)
}

fn copy_into_image(staging: &Path, image: &Path, fs: FsType) -> Result<()> {
    let dev = loopdev::attach(image, loopdev::AttachOptions { read_only: false, direct_io: false })
        .ctx("attach loop device", image)?;
    let mnt = tempdir_near(image)?;
    mount::mount_layer_rw(dev.path(), &mnt, fs)?;
    let copied = run(Command::new("cp").args(["-a", "--preserve=all"]).arg(staging.join(".")).arg(&mnt));
    let unmounted = mount::unmount_path(&mnt);
    let _ = std::fs::remove_dir(&mnt);
    drop(dev);
    copied.and(unmounted)
}

fn tempdir_near(image: &Path) -> Result<std::path::PathBuf> {
    let p = image.with_extension("mnt");
    std::fs::create_dir(&p).ctx("mkdir", &p)?;
    Ok(p)
}

fn mkfs_rw(out: &Path, fs: FsType) -> Result<()> {
    match fs {
        FsType::Ext4 => run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-t", "ext4", "-m", "0", "-L", "sl-rw"])
            .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard,root_owner=0:0"])
            .arg(out)),
        FsType::Xfs => run(Command::new("mkfs.xfs").args(["-q", "-f", "-K", "-L", "sl-rw"]).arg(out)),
    }
}

fn copy_range(from: &File, to: &File, start: u64, end: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    while pos < end {
        let n = from.read_at(&mut buf[..((end - pos) as usize).min(1 << 20)], pos)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// Copies the data extents of sparse file `src` into new file `dst` (of
/// `mode`), so a 10 GiB image with 4 MiB of metadata costs 4 MiB of I/O.
pub fn sparse_copy(src: &Path, dst: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let from = File::open(src).ctx("open", src)?;
    let to = OpenOptions::new().write(true).create_new(true).mode(mode).open(dst).ctx("create", dst)?;
    sparse_copy_file(&from, &to, src, dst)
}

/// [`sparse_copy`] between open files (`src` and `dst` name them in
/// messages): `to` is made as long as `from` and its data copied, holes
/// left holes.
pub(crate) fn sparse_copy_file(from: &File, to: &File, src: &Path, dst: &Path) -> Result<()> {
    use rustix::fs::{copy_file_range, seek, SeekFrom};
    let len = from.metadata().ctx("stat", src)?.len();
    to.set_len(len).ctx("truncate", dst)?;
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(from, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break, // only a hole is left
            Err(e) => return Err(Error::sys("seek", src, e)),
        };
        let hole = seek(from, SeekFrom::Hole(data)).ctx("seek", src)?.min(len);
        let (mut off_in, mut off_out) = (data, data);
        while off_in < hole {
            let want = (hole - off_in) as usize;
            match copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
                Ok(0) => break,
                Ok(_) => {}
                // Across filesystems (or where the kernel cannot): by hand.
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::INVAL
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::OPNOTSUPP,
                ) => {
                    copy_range(from, to, off_in, hole).ctx("copy", dst)?;
                    off_in = hole;
                }
                Err(e) => return Err(Error::sys("copy", dst, e)),
            }
        }
        pos = hole;
    }
    Ok(())
}

/// A sparse, journal-less ext4 image of `size` at `out` (must not exist),
/// used as scratch space for staging.
pub fn create_scratch_image(out: &Path, size: Bytes) -> Result<()> {
    drop(create_sparse(out, size, crate::perms::PRIVATE_FILE)?);
    let made = Staged::new(out);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-O", "^has_journal", "-m", "0", "-E", "lazy_itable_init=1,nodiscard", "-L", "sl-scratch"])
        .arg(out))?;
    made.keep();
    Ok(())
}

/// The sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest as _;
    let mut f = File::open(path).ctx("open", path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).ctx("read", path)?;
    Ok(hex::encode(h.finalize()))
}

/// Creates a writable layer image of `size` at `out` (must not exist).
///
/// The first image of each filesystem and size is made by mkfs into
/// `templates` (crash-atomically); later ones are sparse copies of it,
/// which saves a mkfs process per container (two per `docker run`). The
/// copies share the filesystem UUID: ext4 does not mind, xfs is mounted
/// with `nouuid`.
pub fn create_rw_image(out: &Path, fs: FsType, size: Bytes, templates: &Path) -> Result<()> {
    let size = Bytes(size.0.max(fs.min_image_size().0));
    let template = templates.join(format!("{}-{}.img", fs.name(), size.0));
    if !template.exists() {
        crate::perms::private_dir(templates)?;
        // Gone again unless renamed into place.
        let tmp = Staged::new(templates.join(format!(".{}-{}.{}", fs.name(), size.0, crate::ids::random_token())));
        drop(create_sparse(tmp.path(), size, crate::perms::PRIVATE_FILE)?);
        mkfs_rw(tmp.path(), fs)?;
        std::fs::rename(tmp.path(), &template).ctx("rename", &template)?;
    }
    let copy = Staged::new(out);
    sparse_copy(&template, out, crate::perms::PRIVATE_FILE)?;
    copy.keep();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(stderr: &str) -> Error {
        Error::Tool { tool: "mke2fs -d -".into(), status: "exit status: 1".into(), stderr: stderr.into() }
    }

    /// What mke2fs 1.47.2 prints when the image is too small, against
    /// failures a bigger image would not change: only the first grow.
    #[test]
    fn only_a_build_out_of_space_is_tried_again_bigger() {
        for grow in [
            "handle_entry: Could not allocate block in ext2 filesystem while writing file \"big\"",
            "handle_entry: Could not allocate inode in ext2 filesystem while writing file \"f47\"",
            "ext2fs_link: No free space in the directory",
            "mke2fs: inode_size (256) * inodes_count (9000) too big for a; filesystem with 256 blocks",
        ] {
            assert!(out_of_space(&tool(grow)), "{grow}");
        }
        assert!(out_of_space(&Error::sys("setxattr", "/x", std::io::Error::from_raw_os_error(28))));
        for stop in [
            "__populate_fs_from_tar: Unknown code ____ 226 while opening \"Unrecognized archive format\"",
            "mke2fs: Operation not permitted while populating file system",
            "handle_entry: No space left on device while writing file \"big\"",
        ] {
            assert!(!out_of_space(&tool(stop)), "{stop}");
        }
        assert!(!out_of_space(&Error::sys("setxattr", "/x", std::io::Error::from_raw_os_error(1))));
        assert!(!out_of_space(&Error::BadTar { entry: "a".into(), reason: "b".into() }));
    }
}
