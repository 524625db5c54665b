//! Commits that stay on this host: Docker's init layers.
//!
//! Docker 28+ on its containerd image store gives every container an init
//! layer: it prepares `<id>-init-key` (`<id>-init-prepare` in some
//! versions) over the image, writes a few
//! files and mount points into it (`/etc/hosts`, `/etc/resolv.conf`,
//! `/dev/pts`, `/.dockerenv`, ...), commits it as `<id>-init`, and prepares
//! the container's own snapshot `<id>` over that. The files get the time
//! of the container's creation, so each init layer is new content: built
//! and published into the shared store like an image layer, it would cost
//! every container start on every host an image build and a write to the
//! file server, for a layer no other host ever uses.
//!
//! Such a commit records a committed snapshot that keeps the writable layer
//! it was committed from (marked `local`): nothing is built or published.
//! The container's snapshot stacks on that layer's upper directory as
//! Docker's own overlay2 stacks on its init layer, and the init layer goes
//! with the snapshot's removal. Other commits publish as before.

use std::collections::BTreeMap;

use sharedloop_core::Result;

use crate::snapshots::{SnapInfo, SnapKind, Snapshotter, REF_LABEL};

/// Whether a commit of `key` as `name` is Docker's init layer, kept on this
/// host. containerd's metadata store prefixes both with
/// `<namespace>/<counter>/`, with different counters.
pub(crate) fn stays_local(name: &str, key: &str, labels: &BTreeMap<String, String>) -> bool {
    let tail = |s: &str| s.rsplit('/').next().unwrap_or(s).to_owned();
    let (name, key) = (tail(name), tail(key));
    let from_init = |suffix: &str| key.strip_suffix(suffix) == Some(name.as_str());
    !labels.contains_key(REF_LABEL)
        && name.len() > "-init".len()
        && name.ends_with("-init")
        && (from_init("-key") || from_init("-prepare"))
}

impl Snapshotter {
    /// Commits active snapshot `active` (key `key`, both names marked
    /// pending by the caller) as `name`, on this host only: the record of
    /// the committed snapshot names the writable layer itself.
    pub(crate) fn commit_local(
        &self,
        name: &str,
        key: &str,
        active: SnapInfo,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        let mut rec = Self::new_record(name, SnapKind::Committed, &active.parent, labels, active.layer.clone());
        rec.local = true;
        // Not `record`: on an error that would remove the layer, which is
        // still the active snapshot's.
        self.save(&rec)?;
        self.lock().snaps.insert(rec.name.clone(), rec);
        sharedloop_core::fault::point("snapshot", "committed record saved");
        self.forget(key)?;
        self.lock().snaps.remove(key);
        tracing::info!(snapshot = name, layer = %active.layer, "snapshot committed on this host only (an init layer)");
        Ok(())
    }
}

/// Active records whose layer a local committed record names: a commit
/// that a crash interrupted after its point of no return (the committed
/// record saved); the active record goes.
pub(crate) fn finished_local_commits(snaps: &std::collections::HashMap<String, SnapInfo>) -> Vec<String> {
    let local: std::collections::HashSet<&str> =
        snaps.values().filter(|s| s.local && s.kind == SnapKind::Committed).map(|s| s.layer.as_str()).collect();
    snaps
        .values()
        .filter(|s| s.kind == SnapKind::Active && local.contains(s.layer.as_str()))
        .map(|s| s.name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dockers_init_pattern_stays_local() {
        let none = BTreeMap::new();
        assert!(stays_local("moby/12/abc-init", "moby/11/abc-init-prepare", &none));
        assert!(stays_local("abc-init", "abc-init-prepare", &none));
        assert!(stays_local("moby/10/abc-init", "moby/9/abc-init-key", &none), "Docker 28.5");
        assert!(!stays_local("moby/10/abc-init", "moby/9/abc-init-other", &none));
        assert!(!stays_local("moby/12/abc-init", "moby/11/abd-init-prepare", &none), "another container's key");
        assert!(!stays_local("moby/12/abc", "moby/11/abc-prepare", &none), "not an init layer");
        assert!(!stays_local("-init", "-init-prepare", &none), "no container id");
        assert!(!stays_local("sha256:0123", "extract-1 sha256:0123", &none), "an unpack");
        let labelled: BTreeMap<String, String> = [(REF_LABEL.to_owned(), "sha256:00".to_owned())].into();
        assert!(!stays_local("abc-init", "abc-init-prepare", &labelled), "named for sharing");
    }

    #[test]
    fn an_active_record_left_beside_its_local_commit_is_finished() {
        use crate::snapshots::tests::snap;
        let mut active = snap("c-init-prepare", SnapKind::Active, "img", &[]);
        active.layer = "a-1".into();
        let mut done = snap("c-init", SnapKind::Committed, "img", &[]);
        done.layer = "a-1".into();
        let mut other = snap("other", SnapKind::Active, "img", &[]);
        other.layer = "a-2".into();
        let mut snaps: std::collections::HashMap<String, SnapInfo> =
            [active.clone(), other.clone()].into_iter().map(|s| (s.name.clone(), s)).collect();
        assert!(finished_local_commits(&snaps).is_empty(), "not committed yet");
        snaps.insert(done.name.clone(), done.clone());
        assert!(finished_local_commits(&snaps).is_empty(), "a published commit's record is another matter");
        done.local = true;
        snaps.insert(done.name.clone(), done);
        assert_eq!(finished_local_commits(&snaps), vec!["c-init-prepare".to_owned()]);
    }
}
