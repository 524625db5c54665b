//! Learned prefetch against the real kernel: real ext4 and xfs layer
//! images, loop devices, overlayfs and the page cache. Needs root,
//! mkfs.ext4, mkfs.xfs and filefrag; fails (never skips) without them.
//!
//! Hosts are drivers with homes of their own over one store. Host A
//! publishes a layer and reads a few small files of it: its record names
//! the pages it read. Host B, with the image's pages dropped from the
//! cache, reads those pages ahead before its container reads anything,
//! and not the big file nobody read. Every file is the same with and
//! without prefetch. A malformed or linked record is named by `verify`,
//! ignored by the next host, and recorded over.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sharedloop_core::admin::{verify, Verdict};
use sharedloop_core::ids::ChainId;
use sharedloop_core::options::Config;
use sharedloop_core::prefetch::Record;
use sharedloop_core::store::{Store, IMAGE_FILE, PREFETCH_FILE};
use sharedloop_core::sys::pagecache;
use sharedloop_core::{CreateKind, Driver};

use common::{await_or_fail, require, Rig};

const BIG: usize = 8 << 20;

/// The layer: ten small files and one big one of 8 MiB.
fn layer_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        b.append_data(&mut h, name, data).unwrap();
    };
    for i in 0..10 {
        add(&format!("small/f{i}"), format!("small file {i}\n").repeat(100).as_bytes());
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let big: Vec<u8> = (0..BIG)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    add("big", &big);
    b.into_inner().unwrap()
}

fn host(rig: &Rig, name: &str, fs: &str, extra: &[&str]) -> Driver {
    let mut opts = vec![format!("sharedloop.fs={fs}"), "sharedloop.direct_io=false".to_owned()];
    opts.extend(extra.iter().map(|s| s.to_string()));
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    Driver::open(&rig.path().join(name), Config::from_opts(&rig.opts(&opts)).unwrap()).unwrap()
}

/// Layer `l1` on `d` (built, or found in the store) and container `c`
/// over it, mounted; the merged directory.
fn container(d: &Driver, c: &str) -> (ChainId, PathBuf) {
    d.create("l1", None, CreateKind::ReadOnly, &HashMap::new()).unwrap();
    d.apply_diff("l1", None, &mut &layer_tar()[..]).unwrap();
    let chain = match d.layer_report("l1").unwrap().kind {
        sharedloop_core::driver::LayerReportKind::Image { chain: Some(c) } => c,
        k => panic!("no chain: {k:?}"),
    };
    d.create(c, Some("l1"), CreateKind::ReadWrite, &HashMap::new()).unwrap();
    (chain, d.get(c).unwrap())
}

/// Container `c` goes, and with the driver's cleanup its layer mounts
/// (which ends a recording: the record is made).
fn done(d: &Driver, c: &str) {
    d.put(c).unwrap();
    d.remove(c).unwrap();
    d.cleanup().unwrap();
}

/// The image byte ranges holding `file` (FIEMAP through overlayfs).
fn extents(file: &Path) -> Vec<(u64, u64)> {
    let out = Command::new("filefrag").args(["-e", "-b4096"]).arg(file).output().unwrap();
    assert!(out.status.success(), "filefrag {}: {}", file.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split(':').map(str::trim).collect();
        if f.len() < 4 || f[0].parse::<u32>().is_err() {
            continue;
        }
        let phys: u64 = f[2].split("..").next().unwrap().trim().parse().unwrap();
        let len: u64 = f[3].parse().unwrap();
        v.push((phys * 4096, len * 4096));
    }
    assert!(!v.is_empty(), "no extents for {}: {text}", file.display());
    v
}

fn covered(ranges: &[(u64, u64)], (off, len): (u64, u64)) -> bool {
    ranges.iter().any(|&(o, l)| o <= off && off + len <= o + l)
}

/// The share of `extent`'s pages resident in the page cache of `image`.
fn resident_share(image: &Path, (off, len): (u64, u64)) -> f64 {
    let f = fs::File::open(image).unwrap();
    let pages = pagecache::resident(&f, f.metadata().unwrap().len()).unwrap();
    let (a, b) = ((off / 4096) as usize, (off + len).div_ceil(4096) as usize);
    pages[a..b].iter().filter(|p| *p & 1 == 1).count() as f64 / (b - a) as f64
}

fn all_resident(image: &Path, ranges: &[(u64, u64)]) -> bool {
    ranges.iter().all(|&r| resident_share(image, r) == 1.0)
}

fn drop_cache(image: &Path) {
    pagecache::drop_cached(&fs::File::open(image).unwrap()).unwrap();
}

/// Every file under `dir` and its content.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_owned(), fs::read(&p).unwrap());
            }
        }
    }
    out
}

fn record_of(path: &Path, image: &Path) -> Record {
    let text = fs::read(path).unwrap_or_else(|e| panic!("no prefetch record at {}: {e}", path.display()));
    Record::parse(&text, fs::metadata(image).unwrap().len()).unwrap()
}

fn learned_and_replayed(fs_type: &str) {
    require(&["mkfs.ext4", "mkfs.xfs", "filefrag"]);
    let rig = Rig::new("sl-prefetch-");
    // A long window: the record is made when the layer is unmounted.
    let on = ["sharedloop.prefetch=true", "sharedloop.prefetch_window=1h"];

    // Host A publishes the layer and reads three small files of it.
    let a = host(&rig, "a", fs_type, &on);
    let (chain, merged) = container(&a, "ca");
    let layer_dir = rig.path().join("root/layers").join(chain.dir_name());
    let image = layer_dir.join(IMAGE_FILE);
    let record_path = layer_dir.join(PREFETCH_FILE);
    let read: Vec<PathBuf> = (0..3).map(|i| merged.join(format!("small/f{i}"))).collect();
    for f in &read {
        assert!(fs::read_to_string(f).unwrap().starts_with("small file"));
    }
    let small: Vec<(u64, u64)> = read.iter().flat_map(|f| extents(f)).collect();
    let big = extents(&merged.join("big"));
    assert!(!record_path.exists(), "recorded before the window ended");
    done(&a, "ca");
    drop(a);

    let rec = record_of(&record_path, &image);
    let size = fs::metadata(&image).unwrap().len();
    assert!(rec.bytes() > 0 && rec.bytes() < size, "record of {} bytes for a {size}-byte image", rec.bytes());
    for e in &small {
        assert!(covered(&rec.ranges, *e), "the record {:?} lacks the read file's extent {e:?}", rec.ranges);
    }
    let big_bytes: u64 = big.iter().map(|e| e.1).sum();
    let big_recorded: u64 = big
        .iter()
        .map(|&(o, l)| rec.ranges.iter().map(|&(ro, rl)| (o + l).min(ro + rl).saturating_sub(o.max(ro))).sum::<u64>())
        .sum();
    assert!(big_recorded * 4 < big_bytes, "{big_recorded} of the big file's {big_bytes} bytes recorded, though unread");

    // Host B: nothing of the image cached. Its first mount reads the
    // recorded ranges ahead, before its container reads anything.
    drop_cache(&image);
    let b = host(&rig, "b", fs_type, &on);
    let (_, merged_b) = container(&b, "cb");
    await_or_fail("host B reads the recorded ranges ahead", || all_resident(&image, &rec.ranges));
    // (Its first pages may share a merged range with metadata.)
    let big_resident: f64 = big.iter().map(|&e| resident_share(&image, e) * e.1 as f64).sum();
    assert!(
        big_resident < 0.5 * big_bytes as f64,
        "the unread big file was read ahead: {big_resident} of {big_bytes} bytes"
    );
    let with = tree(&merged_b);

    // Host C without prefetch sees the same files.
    drop_cache(&image);
    let c = host(&rig, "c", fs_type, &["sharedloop.prefetch=false"]);
    let (_, merged_c) = container(&c, "cc");
    let without = tree(&merged_c);
    assert_eq!(with.len(), 11);
    assert_eq!(with, without, "a file differs with prefetch");
    done(&b, "cb");
    done(&c, "cc");
    drop((b, c));
    assert_eq!(record_of(&record_path, &image), rec, "a host that replayed the record rewrote it");

    // A malformed record: verify names it; the next host ignores it and
    // records over it.
    let store = Store::new(&Config::from_opts(&rig.opts(&[])).unwrap(), "verify");
    let info = store.locate(&chain).unwrap();
    fs::write(&record_path, "sharedloop-prefetch 1\nimage_bytes 1\n0 4096\n").unwrap();
    match verify(&info, &mut |_| {}).unwrap() {
        Verdict::BadPrefetchRecord { path, reason } => {
            assert_eq!(path, record_path);
            assert!(reason.contains("image of 1 bytes"), "{reason}");
        }
        v => panic!("verify passed a malformed prefetch record: {v:?}"),
    }
    drop_cache(&image);
    let d = host(&rig, "d", fs_type, &on);
    let (_, merged_d) = container(&d, "cd");
    assert_eq!(tree(&merged_d), with);
    done(&d, "cd");
    drop(d);
    assert!(record_of(&record_path, &image).bytes() > 0, "the malformed record was not recorded over");
    assert_eq!(verify(&info, &mut |_| {}).unwrap(), Verdict::Ok);

    // A record that is a symlink (to a file outside the store) is not
    // followed: verify names it; the next host ignores it and records a
    // new one in its place, writing nothing through it.
    let outside = rig.path().join("outside");
    fs::write(&outside, rec.render()).unwrap();
    fs::remove_file(&record_path).unwrap();
    std::os::unix::fs::symlink(&outside, &record_path).unwrap();
    match verify(&info, &mut |_| {}).unwrap() {
        Verdict::BadPrefetchRecord { reason, .. } => assert!(reason.contains("symbolic link"), "{reason}"),
        v => panic!("verify passed a symlinked prefetch record: {v:?}"),
    }
    let e = host(&rig, "e", fs_type, &on);
    let (_, merged_e) = container(&e, "ce");
    assert_eq!(tree(&merged_e), with);
    done(&e, "ce");
    assert_eq!(fs::read(&outside).unwrap(), rec.render(), "the file outside the store changed");
    assert!(fs::symlink_metadata(&record_path).unwrap().file_type().is_file(), "the link was not recorded over");
    assert!(record_of(&record_path, &image).bytes() > 0);
}

#[test]
fn ext4_layer_reads_are_learned_and_replayed() {
    learned_and_replayed("ext4");
}

#[test]
fn xfs_layer_reads_are_learned_and_replayed() {
    learned_and_replayed("xfs");
}

/// With direct I/O the loop device bypasses the page cache that prefetch
/// fills: nothing is recorded.
#[test]
fn direct_io_records_nothing() {
    require(&["mkfs.ext4"]);
    let rig = Rig::new("sl-prefetch-dio-");
    let mut opts =
        rig.opts(&["sharedloop.prefetch=true", "sharedloop.prefetch_window=1h", "sharedloop.direct_io=true"]);
    opts.push("sharedloop.fs=ext4".to_owned());
    // /tmp takes O_DIRECT here (ext4); a backing file that refused it
    // would make the loop buffered and this test would see a record.
    let d = Driver::open(&rig.path().join("h"), Config::from_opts(&opts).unwrap()).unwrap();
    let (chain, merged) = container(&d, "c");
    assert!(fs::read_to_string(merged.join("small/f0")).unwrap().starts_with("small file"));
    done(&d, "c");
    let rec = rig.path().join("root/layers").join(chain.dir_name()).join(PREFETCH_FILE);
    assert!(!rec.exists(), "a record was made through a direct-I/O loop device");
}
