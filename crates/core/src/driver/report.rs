//! What the driver tells about itself and its layers: status (`docker
//! info`), metadata (`docker inspect`), changes, diff size and the
//! directory a diff is exported from.

use std::collections::HashMap;
use std::path::PathBuf;

use super::records::{Kind, LocalLayer, Source};
use super::{none_if_empty, Driver};
use crate::error::{Error, Result};
use crate::export::{self, Change};
use crate::fsmagic;
use crate::mount;
use crate::store::Location;

impl Driver {
    fn check_parent(l: &LocalLayer, parent: Option<&str>) -> Result<()> {
        let parent = none_if_empty(parent);
        if parent.is_some() && l.parent.as_deref() != parent {
            return Err(Error::Invalid(format!(
                "diff of {} against {:?} is not supported: its parent is {:?}",
                l.id,
                parent.unwrap_or(""),
                l.parent.as_deref().unwrap_or("")
            )));
        }
        Ok(())
    }

    /// The directory whose tree is layer `id`'s own changes, mounted, for
    /// [`export::export_tar`]. Checked before anything is streamed.
    pub fn diff_source(&self, id: &str, parent: Option<&str>) -> Result<PathBuf> {
        let mut st = self.state()?;
        let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        Self::check_parent(&l, parent)?;
        Ok(self.own_dir(&mut st, id)?.unwrap_or_else(|| self.home.join("empty")))
    }

    /// The changes of layer `id` against its parent.
    pub fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<Change>> {
        let (dir, lowers) = {
            let mut st = self.state()?;
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            Self::check_parent(&l, parent)?;
            let dir = self.own_dir(&mut st, id)?;
            (dir, self.stack(&mut st, id, false)?)
        };
        match dir {
            Some(d) => export::changes(&d, &lowers),
            None => Ok(Vec::new()),
        }
    }

    /// Bytes of content layer `id` adds.
    pub fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64> {
        let dir = {
            let mut st = self.state()?;
            let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
            Self::check_parent(&l, parent)?;
            if let Kind::Image { size, .. } = l.kind {
                return Ok(size);
            }
            self.own_dir(&mut st, id)?
        };
        dir.map(|d| export::tree_size(&d)).unwrap_or(Ok(0))
    }

    /// Driver status, as `docker info` lists it.
    pub fn status(&self) -> Vec<(String, String)> {
        let mut v = vec![
            ("Backing Filesystem".to_owned(), fsmagic::fs_name_of(&self.home)),
            ("Loopback Root Directory".to_owned(), self.cfg.root.display().to_string()),
            ("Loopback Fallback Directory".to_owned(), self.cfg.fallback.display().to_string()),
            ("Layer Image Filesystem".to_owned(), self.cfg.fs.name().to_owned()),
            (
                "Loop Direct I/O".to_owned(),
                match self.cfg.direct_io {
                    crate::options::DirectIo::Auto => {
                        "auto (on for local files, off on network filesystems)".to_owned()
                    }
                    d => d.name().to_owned(),
                },
            ),
        ];
        v.push((
            "Root Directory State".to_owned(),
            match self.store.root_problem() {
                None => "writable".to_owned(),
                Some(why) => format!("new layers go to fallback ({why})"),
            },
        ));
        v.push((
            "Root Directory Placement".to_owned(),
            crate::placement::check_root(&self.cfg.root, Some(&self.home)).describe(),
        ));
        for loc in [Location::Root, Location::Fallback] {
            let base = self.store.base(loc);
            let root_fs = if base.exists() { fsmagic::fs_name_of(base) } else { "(not created yet)".to_owned() };
            let n = self.store.count_layers(loc).unwrap_or(0).to_string();
            let name = if loc == Location::Root { "Root" } else { "Fallback" };
            v.push((format!("{name} Filesystem"), root_fs));
            v.push((format!("Layers in {name}"), n));
        }
        let st = self.lock();
        v.push(("Layer Mounts".to_owned(), st.ro.values().filter(|m| m.dev.is_some()).count().to_string()));
        v.push(("Host ID".to_owned(), self.store.host_id.clone()));
        v
    }

    /// Per-layer details for `docker inspect` (GraphDriver.Data).
    pub fn metadata(&self, id: &str) -> Result<HashMap<String, String>> {
        let st = self.state()?;
        let l = st.layers.get(id).cloned().ok_or_else(|| Error::NotFound(format!("layer {id}")))?;
        let mut m = HashMap::new();
        let mounts = mount::mountinfo().unwrap_or_default();
        // Every layer of the stack, topmost first.
        let (mut images, mut locs, mut loops) = (Vec::new(), Vec::new(), Vec::new());
        for src in self.sources(&st, id, true)? {
            match &src {
                Source::Chain(ch) => {
                    let (info, dev) = match st.ro.get(ch) {
                        Some(r) => (Some(r.info.clone()), r.dev.clone()),
                        None => (self.store.locate(ch), None),
                    };
                    if let Some(info) = info {
                        if let Some(img) = info.image() {
                            images.push(img.display().to_string());
                            locs.push(info.location.name().to_owned());
                            loops.push(dev.unwrap_or_else(|| "-".into()));
                        }
                    }
                }
                Source::Upper(c, _) => {
                    images.push(self.rw_image(c).display().to_string());
                    locs.push("local".into());
                    let mnt = self.rw_mnt(c);
                    loops.push(
                        mounts
                            .iter()
                            .find(|e| e.mount_point == mnt)
                            .map(|e| e.source.clone())
                            .unwrap_or_else(|| "-".into()),
                    );
                }
            }
        }
        if let Some(first) = images.first() {
            m.insert("LayerImage".into(), first.clone());
            m.insert("Location".into(), locs[0].clone());
            m.insert("LoopDevice".into(), loops[0].clone());
        }
        m.insert("LayerImages".into(), images.join(":"));
        m.insert("LayerLocations".into(), locs.join(":"));
        m.insert("LoopDevices".into(), loops.join(":"));
        match &l.kind {
            Kind::Image { chain, .. } => {
                if let Some(c) = chain {
                    m.insert("ChainID".into(), c.to_string());
                }
            }
            Kind::Rw { size, fs } => {
                let rw = self.rw_mnt(id);
                m.insert("UpperDir".into(), rw.join("upper").display().to_string());
                m.insert("WorkDir".into(), rw.join("work").display().to_string());
                m.insert("MergedDir".into(), self.merged(id).display().to_string());
                m.insert("WritableSize".into(), size.0.to_string());
                m.insert("WritableFilesystem".into(), fs.name().into());
                let lowers: Vec<String> =
                    self.stack_paths(&st, id, false).iter().map(|p| p.display().to_string()).collect();
                m.insert("LowerDir".into(), lowers.join(":"));
            }
        }
        Ok(m)
    }
}
