//! Moving a fallback layer into root (`sharedloop promote`): copied into
//! root's `tmp/`, fsynced, renamed into place whole (or root's copy kept
//! when it has one), the references moved, the fallback copy dropped.
//! Everything on both sides goes through the directories' handles
//! ([`super::Dir`]): the source image is opened without following links,
//! and the references are made as [`Store::add_ref`] makes them.

use std::io::Write as _;
use std::path::Path;

use super::dir::Building;
use super::{layout, Dir, LayerInfo, Location, Store, IMAGE_FILE, META_FILE};
use crate::error::{Context, Error, Result};
use crate::ids::random_token;
use crate::imagefile::{ImageFile, ImageStamp, Opened};

/// What promoting one layer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Promotion {
    /// Copied into root: this many image bytes.
    Moved(u64),
    /// Root had it already: the fallback copy was dropped.
    Deduplicated,
}

/// The largest meta.json copied.
const META_MAX_BYTES: u64 = 1 << 20;

impl Store {
    /// Moves fallback layer `layer` into root (see the module).
    pub(crate) fn promote_layer(&self, layer: &LayerInfo, progress: &mut dyn FnMut(u64)) -> Result<Promotion> {
        let chain = &layer.meta.chain_id;
        let root = self.dir(Location::Root).ctx("open", &self.root)?;
        let fb = self.dir(Location::Fallback).ctx("open", &self.fallback)?;
        root.sub_made(layout::LAYERS).ctx("mkdir", root.join(layout::LAYERS))?;
        let done = if root.exists(layout::meta(chain)) {
            Promotion::Deduplicated
        } else {
            let tmp = root.sub_made(layout::TMP).ctx("mkdir", root.join(layout::TMP))?;
            let building = Building::new(tmp, &self.host_id)?;
            let dir = &building.dir;
            let mut bytes = 0;
            if let Some(src) = layer.open_image()? {
                let src = match src {
                    Opened::File(f) => f,
                    Opened::Missing => {
                        let p = fb.join(layout::image(chain));
                        return Err(Error::sys("open", p, std::io::Error::from_raw_os_error(libc::ENOENT)));
                    }
                    Opened::NotRegular(kind) => {
                        return Err(Error::Corrupt {
                            path: fb.join(layout::image(chain)),
                            reason: format!("{kind}, not a regular file; not promoted (links are not followed)"),
                        })
                    }
                };
                let dst = dir.join(IMAGE_FILE);
                let to = dir.create_new(IMAGE_FILE, crate::image::SHARED_IMAGE_MODE).ctx("create", &dst)?;
                crate::image::sparse_copy_file(src.file(), &to, src.path(), &dst)?;
                to.sync_all().ctx("fsync", &dst)?;
                bytes = layer.meta.image_bytes;
                progress(bytes);
            }
            let text = promoted_meta(&fb, layer, dir)?;
            {
                let mp = dir.join(META_FILE);
                let mut f = dir.create_new(META_FILE, 0o644).ctx("create", &mp)?;
                f.write_all(&text).ctx("write", &mp)?;
                f.sync_all().ctx("fsync", &mp)?;
            }
            dir.fsync()?;
            // Root looked up again after the copy: one unmounted or
            // remounted meanwhile is not written through the old handle.
            let root = self.dir(Location::Root).ctx("open", &self.root)?;
            let layers = root.sub(layout::LAYERS).ctx("open", root.join(layout::LAYERS))?;
            let name = chain.dir_name();
            match rustix::fs::renameat(building.tmp.fd(), building.name.as_str(), layers.fd(), name.as_str()) {
                Ok(()) => building.keep(),
                Err(_) if root.exists(layout::meta(chain)) => {} // another host's copy serves
                Err(e) => return Err(Error::sys("rename", layers.join(&name), e)),
            }
            layers.fsync()?;
            Promotion::Moved(bytes)
        };
        let root = self.dir(Location::Root).ctx("open", &self.root)?;
        // References follow the layer.
        for h in self.refs(layer) {
            Self::put_ref(&root, chain, &h).ctx("create", root.join(layout::reference(chain, &h)))?;
        }
        let tmp = fb.sub_made(layout::TMP).ctx("mkdir", fb.join(layout::TMP))?;
        let grave = format!("{}-rm-{}", self.host_id, random_token());
        fb.rename(layout::layer(chain), Path::new(layout::TMP).join(&grave)).ctx("rename", &layer.dir)?;
        let _ = tmp.remove_tree(&grave);
        let _ = fb.remove_tree(layout::refs(chain));
        Ok(done)
    }
}

/// The meta.json of a layer promoted into root: the fallback's, with the
/// identity of the copy in `dir` (a new file, with its own times) in place
/// of the fallback file's. A layer without an image keeps its text as it is.
fn promoted_meta(fb: &Dir, layer: &LayerInfo, dir: &Dir) -> Result<Vec<u8>> {
    let meta_path = fb.join(layout::meta(&layer.meta.chain_id));
    let text = fb.read(layout::meta(&layer.meta.chain_id), META_MAX_BYTES).ctx("read", &meta_path)?;
    if layer.meta.fs.is_none() {
        return Ok(text);
    }
    let mut meta: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
        .map_err(|e| Error::Corrupt { path: meta_path.clone(), reason: format!("not a JSON object: {e}") })?;
    let img = dir.join(IMAGE_FILE);
    let copy = match ImageFile::open_beneath(dir.fd(), Path::new(IMAGE_FILE), &img)? {
        Opened::File(f) => f,
        _ => return Err(Error::Corrupt { path: img, reason: "the copy is not a regular file".into() }),
    };
    let stamp = ImageStamp::of(copy.at_open());
    meta.insert("image_file".into(), serde_json::to_value(stamp).expect("serialises"));
    Ok(serde_json::to_vec_pretty(&meta).expect("serialises"))
}
