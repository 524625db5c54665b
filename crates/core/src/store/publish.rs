//! Publishing a layer: built in `tmp/`, claimed so that one host builds
//! it, and renamed into `layers/` whole.

use std::fs;
use std::io::Write;
use std::path::Path;

use super::dir::Building;
use super::{layout, LayerInfo, LayerMeta, Location, Store, IMAGE_FILE, META_FILE};
use crate::error::{Context, Error, Result};
use crate::ids::ChainId;
use crate::imagefile::{ImageFile, ImageStamp, Opened};

/// Result of publishing: ours, or the one another host published first.
#[derive(Debug)]
pub enum Published {
    Created(LayerInfo),
    Existing(LayerInfo),
}

impl Published {
    pub fn into_info(self) -> LayerInfo {
        match self {
            Published::Created(i) | Published::Existing(i) => i,
        }
    }
}

impl Store {
    /// Publishes a layer built by `build` (which fills the temp dir it is
    /// given and returns the meta), into root or, when root cannot take it,
    /// into fallback.
    pub fn publish(&self, chain: &ChainId, build: &dyn Fn(&Path) -> Result<LayerMeta>) -> Result<Published> {
        self.publish_claimed(chain, None, build)
    }

    /// Claims layer `chain` in root before this host does the work that
    /// precedes a build (extracting its tar), so that hosts waiting for it
    /// do not extract it too: `Published` when another host published it
    /// meanwhile, `Build` with the claim to hand to [`Self::publish_claimed`],
    /// `None` when root takes no claims now (it is missing, read-only,
    /// failing; publishing then falls back as usual).
    pub fn claim_in_root(&self, chain: &ChainId) -> Option<crate::claim::Outcome<LayerInfo>> {
        if self.dir(Location::Root).is_err() {
            return None;
        }
        match crate::claim::claim_or_wait(&self.root, chain, &self.host_id, self.claim_timeout, &|| {
            Ok(self.locate(chain))
        }) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::debug!(layer = %chain, error = %e, "cannot claim the layer in the root directory");
                None
            }
        }
    }

    /// [`Self::publish`] with the root claim `claim` already held, if any.
    pub fn publish_claimed(
        &self,
        chain: &ChainId,
        claim: Option<crate::claim::Claim>,
        build: &dyn Fn(&Path) -> Result<LayerMeta>,
    ) -> Result<Published> {
        let root_err = match self.publish_in(Location::Root, chain, claim, build) {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        tracing::warn!(layer = %chain, root = %self.root.display(), fallback = %self.fallback.display(),
            error = %root_err, "cannot create the layer in the root directory; using the fallback directory");
        self.publish_in(Location::Fallback, chain, None, build).map_err(|fb| Error::NoStore {
            root: self.root.clone(),
            root_err: root_err.to_string(),
            fallback: self.fallback.clone(),
            fallback_err: fb.to_string(),
        })
    }

    fn publish_in(
        &self,
        loc: Location,
        chain: &ChainId,
        held: Option<crate::claim::Claim>,
        build: &dyn Fn(&Path) -> Result<LayerMeta>,
    ) -> Result<Published> {
        let path = self.base(loc);
        if loc == Location::Fallback {
            fs::create_dir_all(path).ctx("mkdir", path)?;
        }
        let base = self.dir(loc).ctx("open", path)?;
        let tmp = base.sub_made(layout::TMP).ctx("open", base.join(layout::TMP))?;
        base.sub_made(layout::LAYERS).ctx("open", base.join(layout::LAYERS))?;
        // One build per layer across hosts: claim it, or wait for the host
        // that has (crate::claim).
        let claim = match held {
            Some(c) => c,
            None => match crate::claim::claim_or_wait(path, chain, &self.host_id, self.claim_timeout, &|| {
                Ok(self.locate(chain))
            })? {
                crate::claim::Outcome::Published(info) => {
                    tracing::info!(layer = %chain, location = info.location.name(), "another host built this layer; using it");
                    return Ok(Published::Existing(info));
                }
                crate::claim::Outcome::Build(c) => c,
            },
        };
        let started = std::time::Instant::now();
        // The temporary build goes again unless it is renamed into place.
        let building = Building::new(tmp, &self.host_id)?;
        let r = (|| {
            let dir = &building.dir;
            crate::fault::point("publish", "temp dir made");
            let mut meta = build(dir.path())?;
            crate::fault::point("publish", "image built");
            // What this host built and hashed, to vouch for exactly that file.
            let img = dir.join(IMAGE_FILE);
            let built = match meta.fs.map(|_| ImageFile::open_beneath(dir.fd(), Path::new(IMAGE_FILE), &img)) {
                Some(Ok(Opened::File(f))) => Some(f.at_open()),
                Some(Err(e)) => return Err(e),
                _ => None,
            };
            // The finished image's identity, for hosts that check it by its
            // size and times (verify=identity). build() fsynced it: times
            // a network filesystem's server sets on the write back are in.
            meta.image_file = built.map(ImageStamp::of);
            let text = serde_json::to_vec_pretty(&meta).expect("meta serialises");
            {
                // Closed before anything may remove the directory: a network
                // filesystem keeps open, deleted files (.fuse_hidden*, .nfs*).
                let mp = dir.join(META_FILE);
                let mut f = dir.create_new(META_FILE, 0o644).ctx("create", &mp)?;
                f.write_all(&text).ctx("write", &mp)?;
                f.sync_all().ctx("fsync", &mp)?;
            }
            dir.fsync()?;
            crate::fault::point("publish", "meta written and synced");
            // The base is looked up again for the rename: a root unmounted
            // or remounted during the build is not published into through
            // the old handle (the rename fails, EXDEV or ENOENT, and the
            // layer goes to fallback as before).
            let base = self.dir(loc).ctx("open", path)?;
            let layers = base.sub(layout::LAYERS).ctx("open", base.join(layout::LAYERS))?;
            let name = chain.dir_name();
            let dest = layers.join(&name);
            match rustix::fs::renameat(building.tmp.fd(), building.name.as_str(), layers.fd(), name.as_str()) {
                Ok(()) => {
                    crate::fault::point("publish", "renamed into place");
                    layers.fsync()?;
                    crate::metrics::observe_publish(started, loc, meta.image_bytes);
                    Ok(Published::Created(LayerInfo::found(loc, &base, meta).with_built(built)))
                }
                // EEXIST/ENOTEMPTY locally; network filesystems may answer
                // otherwise (EPERM, EIO): what counts is whether the name
                // now holds a complete layer.
                Err(e) => match Self::layer_in(loc, &base, chain) {
                    Ok(Some(info)) => {
                        tracing::info!(layer = %chain, "another host published this layer first; using theirs");
                        Ok(Published::Existing(info))
                    }
                    _ => Err(Error::sys("rename", dest, e)),
                },
            }
        })();
        match &r {
            Ok(Published::Created(_)) => building.keep(),
            _ => drop(building), // ours is not the published one: it goes
        }
        if r.is_ok() {
            // In place (ours, or another host's that won the rename):
            // waiters may stop waiting. On an error the claim is dropped,
            // which removes it, and a waiter takes over at once.
            claim.published();
        }
        r
    }
}
