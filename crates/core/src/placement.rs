//! Where the loopback root really is.
//!
//! The root is meant to be a shared filesystem, but nothing stops it from
//! silently being a local directory. The common way in: dockerd binds its
//! data root onto itself (not recursively) when that is not a mount
//! point, which covers a filesystem mounted below it before dockerd
//! started; the spec's default root, `/var/lib/docker/loopback/root`, is
//! exactly there. Layers then go to the local directory under the covered
//! mount, and the root looks writable. [`check_root`] tells these cases
//! apart by asking the kernel about the root path itself (its mount id
//! and device) and comparing with mountinfo, the engine's home and `/`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rustix::fs::{statx, AtFlags, StatxFlags, CWD};

use crate::error::{Error, Result};
use crate::mount::{mountinfo, MountEntry};
use crate::options::Config;

/// Where the root directory is, as far as this host can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootPlacement {
    /// On a filesystem of its own: not the engine home's, not `/`'s.
    Separate { fs_type: String, source: String, mount_point: PathBuf },
    /// A filesystem is mounted at (or above) the root, but a later mount
    /// higher up covers it: the root path reaches the directory under it.
    Covered { hidden: MountEntry, by: MountEntry },
    /// On the same filesystem as `like` (the engine's home, or `/`).
    Local { like: PathBuf, fs_type: String },
    /// The root does not exist (or cannot be examined).
    Missing,
}

impl RootPlacement {
    /// Whether layers created "in root" would stay on this host.
    pub fn is_local(&self) -> bool {
        matches!(self, RootPlacement::Covered { .. } | RootPlacement::Local { .. })
    }

    /// One line for `docker info` and `sharedloop status`.
    pub fn describe(&self) -> String {
        match self {
            RootPlacement::Separate { fs_type, source, mount_point } => {
                format!("own filesystem ({fs_type} {source} on {})", mount_point.display())
            }
            RootPlacement::Covered { hidden, by } => format!(
                "LOCAL, NOT SHARED: the {} filesystem {} mounted on {} is covered by a later mount on {} \
                 (dockerd binds its data root onto itself when it is not a mount point); layers go to the \
                 local directory under it. Mount the shared filesystem outside the engine's data root, or \
                 order the mounts (docs/operations.md)",
                hidden.fs_type,
                hidden.source,
                hidden.mount_point.display(),
                by.mount_point.display()
            ),
            RootPlacement::Local { like, fs_type } => format!(
                "LOCAL, NOT SHARED: on the same {fs_type} filesystem as {}; other hosts do not see its layers \
                 (docs/operations.md)",
                like.display()
            ),
            RootPlacement::Missing => "(root directory missing)".to_owned(),
        }
    }
}

fn mnt_id(p: &Path) -> Option<u64> {
    let st = statx(CWD, p, AtFlags::NO_AUTOMOUNT, StatxFlags::MNT_ID).ok()?;
    (st.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(st.stx_mnt_id)
}

/// Examines `root` against the mounts of this namespace, the engine's
/// `home` (when there is one) and `/`.
pub fn check_root(root: &Path, home: Option<&Path>) -> RootPlacement {
    let Ok(md) = std::fs::metadata(root) else { return RootPlacement::Missing };
    let mounts = mountinfo().unwrap_or_default();
    let visible = mnt_id(root).and_then(|id| mounts.iter().find(|m| m.mount_id == id).cloned());
    if let Some(v) = &visible {
        // A mount at or above root, below the mount root reaches, that
        // root does not reach: covered by `v` (or by what covers it).
        let hidden = mounts
            .iter()
            .filter(|m| {
                m.mount_id != v.mount_id
                    && root.starts_with(&m.mount_point)
                    && m.mount_point.starts_with(&v.mount_point)
                    && m.mount_point != v.mount_point
            })
            .max_by_key(|m| m.mount_point.components().count());
        if let Some(h) = hidden {
            return RootPlacement::Covered { hidden: h.clone(), by: v.clone() };
        }
    }
    let fs_type = crate::fsmagic::fs_name_of(root);
    for like in home.into_iter().chain([Path::new("/")]) {
        if std::fs::metadata(like).is_ok_and(|l| l.dev() == md.dev()) {
            return RootPlacement::Local { like: like.to_owned(), fs_type };
        }
    }
    match visible {
        Some(v) => RootPlacement::Separate { fs_type: v.fs_type, source: v.source, mount_point: v.mount_point },
        None => RootPlacement::Separate { fs_type, source: String::new(), mount_point: root.to_owned() },
    }
}

/// Logs where the root is, a warning when it is local (see
/// [`check_root`]); with `sharedloop.require_shared_root` a local root is
/// an error instead.
pub fn check_at_start(cfg: &Config, home: &Path) -> Result<()> {
    let p = check_root(&cfg.root, Some(home));
    if !p.is_local() {
        tracing::info!(root = %cfg.root.display(), "loopback root: {}", p.describe());
        return Ok(());
    }
    if cfg.require_shared_root {
        return Err(Error::Option {
            option: "sharedloop.require_shared_root".into(),
            reason: format!("the loopback root {} is {}", cfg.root.display(), p.describe()),
        });
    }
    tracing::warn!(root = %cfg.root.display(), "loopback root: {}", p.describe());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_on_the_homes_filesystem_is_local() {
        let t = tempfile::tempdir().unwrap();
        let (root, home) = (t.path().join("root"), t.path().join("home"));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&home).unwrap();
        let p = check_root(&root, Some(&home));
        assert_eq!(p, RootPlacement::Local { like: home.clone(), fs_type: crate::fsmagic::fs_name_of(&root) });
        assert!(p.is_local());
        assert!(p.describe().contains(home.to_str().unwrap()), "{}", p.describe());
        assert_eq!(check_root(&t.path().join("nope"), Some(&home)), RootPlacement::Missing);
        assert!(!RootPlacement::Missing.is_local());
        let cfg = Config { root: root.clone(), ..Config::default() };
        assert!(check_at_start(&cfg, &home).is_ok(), "a local root is only a warning by default");
        let strict = Config { require_shared_root: true, ..cfg };
        let e = check_at_start(&strict, &home).unwrap_err().to_string();
        assert!(e.contains("sharedloop.require_shared_root") && e.contains("LOCAL, NOT SHARED"), "{e}");
    }
}
