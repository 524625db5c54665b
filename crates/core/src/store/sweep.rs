//! What `gc` and `verify` look at beyond the layers: leftover builds and
//! removals in `tmp/`, old build claims, which hosts still hold
//! references, and entries of `layers/` that cannot be layers. All of it
//! through the store directory's handle ([`super::Dir`]): a symlink
//! planted at `tmp`, `claims`, `refs/<chain>` or a layer's name is never
//! followed, so nothing outside the store is listed or deleted.

use std::collections::HashSet;
use std::io;
use std::path::PathBuf;

use rustix::fs::FileType;

use super::{layout, Location, Store};
use crate::ids::ChainId;

impl Store {
    /// Removes the entries of `tmp/` in `loc` for which `stale(name, age in
    /// seconds)` holds (or only lists them, with `dry_run`); returns their
    /// paths.
    pub(crate) fn sweep_tmp(
        &self,
        loc: Location,
        now: u64,
        dry_run: bool,
        stale: &dyn Fn(&str, u64) -> bool,
    ) -> Vec<PathBuf> {
        self.sweep(loc, layout::TMP, now, dry_run, stale)
    }

    /// [`Self::sweep_tmp`] for the build claims (`claims/`).
    pub(crate) fn sweep_claims(
        &self,
        loc: Location,
        now: u64,
        dry_run: bool,
        stale: &dyn Fn(&str, u64) -> bool,
    ) -> Vec<PathBuf> {
        self.sweep(loc, layout::CLAIMS, now, dry_run, stale)
    }

    fn sweep(
        &self,
        loc: Location,
        sub: &str,
        now: u64,
        dry_run: bool,
        stale: &dyn Fn(&str, u64) -> bool,
    ) -> Vec<PathBuf> {
        let Ok(dir) = self.dir(loc).and_then(|b| b.sub(sub)) else { return Vec::new() };
        let Ok(entries) = dir.entries("") else { return Vec::new() };
        let mut out = Vec::new();
        for e in entries {
            if stale(&e.name, dir.age_secs(&e.name, now)) {
                if !dry_run {
                    if let Err(err) = dir.remove_tree(&e.name) {
                        tracing::debug!(path = %dir.join(&e.name).display(), error = %err, "cannot sweep");
                    }
                }
                out.push(dir.join(&e.name));
            }
        }
        out
    }

    /// The hosts that hold any reference in `loc`; `None` when that cannot
    /// be told (the references are unreadable, or `refs` is a symlink).
    pub(crate) fn hosts_with_refs(&self, loc: Location) -> Option<HashSet<String>> {
        let base = self.dir(loc).ok()?;
        let chains = match base.entries(layout::REFS) {
            Ok(v) => v,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Some(HashSet::new()),
            Err(_) => return None,
        };
        let mut hosts = HashSet::new();
        for c in chains.iter().filter(|e| e.kind == FileType::Directory) {
            let rel = PathBuf::from(layout::REFS).join(&c.name);
            hosts.extend(base.entries(rel).into_iter().flatten().map(|r| r.name));
        }
        Some(hosts)
    }

    /// Entries of `layers/` in `loc` named like a layer (`sha256-<hex>`)
    /// that cannot be used as one, with the reason; [`Store::layers`]
    /// skips them. Nothing is followed or opened but regular files.
    pub(crate) fn unusable_layers(&self, loc: Location) -> Vec<(ChainId, PathBuf, String)> {
        let mut out = Vec::new();
        let Ok(base) = self.dir(loc) else { return out };
        match base.lstat(layout::LAYERS) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
                let p = base.join(layout::LAYERS);
                tracing::warn!(path = %p.display(), "the layers directory is not a directory; not followed");
                return out;
            }
            Ok(_) => {}
            Err(_) => return out,
        }
        let Ok(entries) = base.entries(layout::LAYERS) else { return out };
        for e in entries {
            let Some(chain) = ChainId::from_dir_name(&e.name) else { continue };
            let reason = match e.kind {
                FileType::Symlink => Some("a symbolic link, not followed".to_owned()),
                FileType::Directory => match Self::read_meta(&base, &chain) {
                    Ok(m) if m.chain_id == chain => None,
                    Ok(m) => Some(format!("meta.json names another layer, {}", m.chain_id)),
                    Err(_) if !base.exists(layout::layer(&chain)) => None, // removed meanwhile
                    Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                        Some("meta.json is a symbolic link, not followed".to_owned())
                    }
                    Err(e) => Some(format!("meta.json cannot be used: {e}")),
                },
                _ => Some("not a directory".to_owned()),
            };
            if let Some(r) = reason {
                out.push((chain.clone(), base.join(layout::layer(&chain)), r));
            }
        }
        out.sort();
        out
    }
}
