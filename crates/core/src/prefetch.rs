//! Learned prefetch: the first host to use a layer image learns which parts
//! of it its containers read while they start, and publishes that beside
//! the layer (`layers/<sha256-HEX>/prefetch`); every later host reads
//! those parts first, in large requests at bounded concurrency, in the
//! background, as soon as it attaches the image.
//!
//! What is read is learned from the page cache: the loop device of a
//! layer on a network filesystem reads its image file through the page
//! cache (`sharedloop.direct_io=auto`), so the image file's pages that
//! became resident between the first mount and the end of the window
//! are what this host read of it: file data, inodes, directories and the
//! superblock alike, with no tracing on the container's path. The window
//! (`sharedloop.prefetch_window`) opens when a container first reads the
//! layer beyond what the mount read, and the layer's unmount closes it
//! early.
//! A host that has pages of the image cached before its first mount (the
//! publisher, which wrote them) drops them first, so that the record is
//! what a cold host reads. The pages are merged into ranges (holes up to
//! [`MERGE_GAP`] are read too: a larger request costs less than another
//! round trip) and capped at `sharedloop.prefetch_max` bytes.
//!
//! Replaying fills the same page cache the loop device reads from: the
//! open file the loop device was attached to is read with `pread` in
//! [`CHUNK`]-sized requests by [`CONCURRENCY`] threads, and at most
//! [`PROCESS_CONCURRENCY`] reads are in flight in the process. Nothing waits for
//! it: a container reading a page first simply reads it itself. A loop
//! device with direct I/O bypasses that page cache, so with direct I/O
//! nothing is recorded or replayed.
//!
//! The record comes from another host and is checked like any input
//! (`Record::parse`): at most [`RECORD_MAX_BYTES`], [`MAX_RANGES`] ranges,
//! each page-aligned, in order, not overlapping, within the image; one
//! that is not is ignored with a warning and recorded over, and
//! `sharedloop verify` names it. At worst a hostile record makes a host read `prefetch_max` bytes
//! of an image it mounts anyway: it cannot change what the container
//! sees, which is the image.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::ids::ChainId;
use crate::store::{layout, Dir, LayerInfo};
use crate::sys::pagecache;

/// The record's first line.
const MAGIC: &str = "sharedloop-prefetch 1";
/// The largest record read.
pub const RECORD_MAX_BYTES: u64 = 2 << 20;
/// The most ranges a record holds.
pub const MAX_RANGES: usize = 65_536;
/// Ranges are in units of this (the page size the kernel caches in).
pub const ALIGN: u64 = 4096;
/// Holes up to this size between pages read are read too.
pub const MERGE_GAP: u64 = 128 << 10;
/// The largest single read of a replay.
pub const CHUNK: u64 = 1 << 20;
/// Reads in flight during one layer's replay.
pub const CONCURRENCY: usize = 8;
/// Reads in flight across every replay of the process: an image of many
/// layers mounted at once does not send many times [`CONCURRENCY`]
/// requests to the file server, or hold as many buffers.
pub const PROCESS_CONCURRENCY: usize = 16;

/// The process' read slots ([`PROCESS_CONCURRENCY`]).
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

static SLOTS: Slots = Slots { free: Mutex::new(PROCESS_CONCURRENCY), cv: Condvar::new() };

/// A read slot, given back when dropped.
struct Slot;

impl Slot {
    /// A slot, or `None` once `s` is stopped (a replay being stopped does
    /// not wait behind other layers' reads).
    fn take(s: &Signal) -> Option<Slot> {
        let mut free = SLOTS.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            if s.stopped() {
                return None;
            }
            free = SLOTS.cv.wait_timeout(free, Duration::from_millis(100)).unwrap_or_else(|p| p.into_inner()).0;
        }
        if s.stopped() {
            return None;
        }
        *free -= 1;
        Some(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        *SLOTS.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        SLOTS.cv.notify_one();
    }
}

/// `sharedloop.prefetch`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// On for images on network filesystems, where a read is a round trip.
    #[default]
    Auto,
    On,
    Off,
}

impl Mode {
    /// Whether prefetch is wanted for an image at `file`.
    pub fn for_file(self, file: &Path) -> bool {
        match self {
            Mode::On => true,
            Mode::Off => false,
            Mode::Auto => crate::fsmagic::is_network(file.parent().unwrap_or(file)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::On => "on",
            Mode::Off => "off",
        }
    }
}

/// The prefetch options of a driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub mode: Mode,
    /// How long after a layer's first mount its reads are recorded.
    pub window: Duration,
    /// The most bytes recorded, and replayed, per layer.
    pub max_bytes: u64,
}

impl Settings {
    pub const OFF: Settings = Settings { mode: Mode::Off, window: Duration::from_secs(0), max_bytes: 0 };
}

/// What a host read of a layer image: byte ranges of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The size of the image the ranges are of.
    pub image_bytes: u64,
    /// `(offset, length)`, page-aligned, ascending, not overlapping.
    pub ranges: Vec<(u64, u64)>,
}

impl Record {
    /// The ranges of the pages marked resident in `pages` (one byte per
    /// page of `page` bytes, bit 0, as `mincore` gives them), holes up to
    /// [`MERGE_GAP`] merged, at most `max_bytes` in all.
    pub fn from_pages(pages: &[u8], page: u64, image_bytes: u64, max_bytes: u64) -> Record {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut total = 0u64;
        for (i, p) in pages.iter().enumerate() {
            if p & 1 == 0 {
                continue;
            }
            let off = i as u64 * page;
            let len = page.min(image_bytes.saturating_sub(off));
            if len == 0 {
                break;
            }
            match ranges.last_mut() {
                Some((o, l)) if off <= *o + *l + MERGE_GAP => {
                    let grown = off + len - (*o + *l);
                    if total + grown > max_bytes {
                        break;
                    }
                    total += grown;
                    *l = off + len - *o;
                }
                _ => {
                    if total + len > max_bytes || ranges.len() == MAX_RANGES {
                        break;
                    }
                    total += len;
                    ranges.push((off, len));
                }
            }
        }
        Record { image_bytes, ranges }
    }

    /// The bytes the ranges cover.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    pub fn render(&self) -> Vec<u8> {
        let mut s = format!("{MAGIC}\nimage_bytes {}\n", self.image_bytes);
        for (o, l) in &self.ranges {
            s.push_str(&format!("{o} {l}\n"));
        }
        s.into_bytes()
    }

    /// Parses a record for an image of `image_bytes`; the error says what
    /// is wrong with it.
    pub fn parse(text: &[u8], image_bytes: u64) -> Result<Record, String> {
        if text.len() as u64 > RECORD_MAX_BYTES {
            return Err(format!("larger than {RECORD_MAX_BYTES} bytes"));
        }
        let text = std::str::from_utf8(text).map_err(|_| "not text".to_owned())?;
        let mut lines = text.lines();
        if lines.next() != Some(MAGIC) {
            return Err(format!("does not start with {MAGIC:?}"));
        }
        let size = lines
            .next()
            .and_then(|l| l.strip_prefix("image_bytes "))
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or("no image_bytes line")?;
        if size != image_bytes {
            return Err(format!("made for an image of {size} bytes, but the image has {image_bytes}"));
        }
        let mut ranges = Vec::new();
        let mut end = 0u64;
        for (n, line) in lines.enumerate() {
            let bad = |why: &str| format!("range {}: {why}: {line:?}", n + 1);
            if ranges.len() == MAX_RANGES {
                return Err(format!("more than {MAX_RANGES} ranges"));
            }
            let (o, l) = line.split_once(' ').ok_or_else(|| bad("not \"offset length\""))?;
            let (o, l) =
                (o.parse::<u64>().map_err(|_| bad("bad offset"))?, l.parse::<u64>().map_err(|_| bad("bad length"))?);
            let stop = o.checked_add(l).ok_or_else(|| bad("overflows"))?;
            if l == 0 || o % ALIGN != 0 || (l % ALIGN != 0 && stop != image_bytes) {
                return Err(bad("not page-aligned"));
            }
            if o < end {
                return Err(bad("out of order or overlapping"));
            }
            if stop > image_bytes {
                return Err(bad("beyond the end of the image"));
            }
            end = stop;
            ranges.push((o, l));
        }
        Ok(Record { image_bytes, ranges })
    }

    /// The record's ranges cut at `max_bytes` in all, split into reads of
    /// at most [`CHUNK`].
    fn chunks(&self, max_bytes: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut left = max_bytes;
        for &(o, l) in &self.ranges {
            let l = l.min(left);
            left -= l;
            let mut at = o;
            while at < o + l {
                let n = CHUNK.min(o + l - at);
                out.push((at, n));
                at += n;
            }
            if left == 0 {
                break;
            }
        }
        out
    }
}

/// Reads layer `chain`'s record in the store directory `base`: `Ok(None)`
/// when there is none.
pub(crate) fn read_record(
    base: &Path,
    chain: &ChainId,
    image_bytes: u64,
) -> std::io::Result<Option<Result<Record, String>>> {
    let dir = Dir::open(base)?;
    match dir.read(layout::prefetch(chain), RECORD_MAX_BYTES) {
        Ok(text) => Ok(Some(Record::parse(&text, image_bytes))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Ok(Some(Err(e.to_string()))),
        // A symbolic link planted at the record's name: never followed;
        // a malformed record (a new one is renamed over the link).
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Ok(Some(Err("a symbolic link, not followed".to_owned()))),
        Err(e) => Err(e),
    }
}

/// A stop signal and the thread that heeds it.
struct Signal {
    stop: AtomicBool,
    /// Set with `stop` when the mount failed: nothing is recorded.
    discard: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

/// The background work of one layer mount (a recording or a replay).
/// [`Job::finish`] stops a replay, ends a recording's window early
/// (recording what was read so far) and waits for the thread, which then
/// no longer holds the image file open. Dropping it does the same but
/// records nothing (the mount it was for failed).
pub(crate) struct Job {
    signal: Arc<Signal>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("prefetch::Job")
    }
}

impl Job {
    fn spawn(name: &str, work: impl FnOnce(&Signal) + Send + 'static) -> Option<Job> {
        let signal = Arc::new(Signal {
            stop: AtomicBool::new(false),
            discard: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let s = signal.clone();
        match std::thread::Builder::new().name(name.to_owned()).spawn(move || work(&s)) {
            Ok(t) => Some(Job { signal, thread: Some(t) }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a prefetch thread; going on without it");
                None
            }
        }
    }

    pub(crate) fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.signal.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.signal.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.signal.cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.signal.discard.store(true, Ordering::SeqCst);
        }
        self.stop();
    }
}

impl Signal {
    /// Waits until `until` or a stop.
    fn wait(&self, until: Instant) {
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stop.load(Ordering::SeqCst) {
            let Some(left) = until.checked_duration_since(Instant::now()) else { return };
            g = self.cv.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}

/// Prefetch work started before a layer's mount: a replay already
/// running, or a recording that begins once the mount is there
/// ([`Pending::mounted`]).
pub(crate) enum Pending {
    Replay(Job),
    Record(Box<Recording>),
}

/// What a recording needs once its layer is mounted.
pub(crate) struct Recording {
    base: std::path::PathBuf,
    chain: ChainId,
    file: File,
    size: u64,
    settings: Settings,
    replace: bool,
}

impl Pending {
    /// The layer is mounted: a recording takes what the mount read as its
    /// baseline and starts watching (see [`watch`]).
    pub(crate) fn mounted(self) -> Option<Job> {
        match self {
            Pending::Replay(j) => Some(j),
            Pending::Record(r) => {
                let baseline = resident_count(&r.file, r.size);
                // mincore shows every page resident to a process that may
                // not write the file and does not own it (Linux 5.0+, no
                // CAP_FOWNER): nothing could be learned.
                if baseline as u64 == r.size.div_ceil(pagecache::page_size()) && r.size > 64 * ALIGN {
                    tracing::debug!(layer = %r.chain, "prefetch: the page cache of the image cannot be observed here; not recording");
                    return None;
                }
                Job::spawn("prefetch-record", move |s| watch(*r, baseline, s))
            }
        }
    }
}

/// How long a recording watches a layer no container reads.
const GIVE_UP: Duration = Duration::from_secs(24 * 3600);

fn resident_count(file: &File, size: u64) -> usize {
    pagecache::resident(file, size).map(|p| p.iter().filter(|b| *b & 1 == 1).count()).unwrap_or(0)
}

/// A recording: the window opens when the image is read beyond what the
/// mount read (`baseline` pages), that is when a container first uses the
/// layer, which may be long after the mount (`docker create` now, `start`
/// later); the image is polled for that, at intervals growing from 250 ms
/// to 30 s. The record is made one window after, or at the unmount if it
/// comes first; a layer unmounted before any container read it records
/// nothing.
fn watch(r: Recording, baseline: usize, s: &Signal) {
    let mut interval = Duration::from_millis(250);
    let started = Instant::now();
    let mut last_poll = started;
    let opened = loop {
        s.wait(Instant::now() + interval);
        if s.discard.load(Ordering::SeqCst) {
            return;
        }
        let grown = resident_count(&r.file, r.size) > baseline;
        if s.stopped() {
            if grown {
                record(&r.base, &r.chain, &r.file, r.size, r.settings.max_bytes, r.replace);
            }
            return;
        }
        if grown {
            // The reads began after the previous look.
            break last_poll;
        }
        last_poll = Instant::now();
        // An idle layer: the watch ends when another host recorded it, or
        // after a day (this host records it at its next mount).
        if interval >= Duration::from_secs(30)
            && (started.elapsed() > GIVE_UP
                || (!r.replace && Dir::open(&r.base).is_ok_and(|d| d.exists(layout::prefetch(&r.chain)))))
        {
            return;
        }
        interval = (interval * 2).min(Duration::from_secs(30));
    };
    s.wait(opened.checked_add(r.settings.window).unwrap_or(opened));
    if !s.discard.load(Ordering::SeqCst) {
        record(&r.base, &r.chain, &r.file, r.size, r.settings.max_bytes, r.replace);
    }
}

/// Starts the prefetch work for layer `info`, whose image `file` a loop
/// device was just attached to (and not yet mounted): a replay of the
/// layer's record when there is one, else a recording. `None` when
/// prefetch is off for it (`settings`, or a loop device with direct I/O).
pub(crate) fn start(info: &LayerInfo, file: &File, settings: &Settings, direct_io: bool) -> Option<Pending> {
    let image = info.image()?;
    if direct_io || settings.max_bytes == 0 || !settings.mode.for_file(&image) {
        return None;
    }
    let chain = info.meta.chain_id.clone();
    let size = match file.metadata() {
        Ok(m) => m.len(),
        Err(e) => {
            tracing::debug!(layer = %chain, error = %e, "prefetch: cannot stat the image");
            return None;
        }
    };
    // The thread holds its own descriptor of the same open file: opening
    // the image again would be another open, which a FUSE filesystem
    // answers by dropping the inode's cached pages.
    let file = file.try_clone().ok()?;
    let base = info.base.clone();
    match read_record(&base, &chain, size) {
        Ok(Some(Ok(rec))) => {
            let max = settings.max_bytes;
            Job::spawn("prefetch", move |s| replay(&chain, &file, &rec, max, s)).map(Pending::Replay)
        }
        Ok(found) => {
            // A malformed record is recorded over, so one bad write (or a
            // hostile one) does not turn the layer's prefetch off for good.
            let replace = match found {
                Some(Err(why)) => {
                    tracing::warn!(layer = %chain, record = %info.dir.join(crate::store::PREFETCH_FILE).display(),
                        reason = %why, "ignoring the layer's malformed prefetch record; recording a new one");
                    true
                }
                _ => false,
            };
            // What is cached already was not read by this host's
            // containers: dropped, so that the record shows a cold start.
            if pagecache::resident(&file, size).is_ok_and(|p| p.iter().any(|b| b & 1 == 1)) {
                if let Err(e) = pagecache::drop_cached(&file) {
                    tracing::debug!(layer = %chain, error = %e, "prefetch: cannot drop the image's cached pages");
                }
            }
            Some(Pending::Record(Box::new(Recording { base, chain, file, size, settings: *settings, replace })))
        }
        Err(e) => {
            tracing::debug!(layer = %chain, error = %e, "prefetch: cannot read the layer's record");
            None
        }
    }
}

/// Publishes what this host read of the image, unless another host did
/// meanwhile (a record there is replaced only when it was found
/// malformed, `replace`).
fn record(base: &Path, chain: &ChainId, file: &File, size: u64, max_bytes: u64, replace: bool) {
    let pages = match pagecache::resident(file, size) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(layer = %chain, error = %e, "prefetch: cannot tell which pages were read");
            return;
        }
    };
    let rec = Record::from_pages(&pages, pagecache::page_size(), size, max_bytes);
    if rec.ranges.is_empty() {
        return;
    }
    let r = Dir::open(base).map_err(|e| e.to_string()).and_then(|d| {
        if d.exists(layout::prefetch(chain)) && !replace {
            return Ok(false);
        }
        d.write_atomic(layout::prefetch(chain), &rec.render(), 0o644).map(|_| true).map_err(|e| e.to_string())
    });
    match r {
        Ok(true) => {
            crate::metrics::observe_prefetch_recorded();
            tracing::info!(layer = %chain, bytes = rec.bytes(), ranges = rec.ranges.len(), "prefetch: recorded what this host read of the layer");
        }
        Ok(false) => {}
        Err(e) => tracing::debug!(layer = %chain, error = %e, "prefetch: cannot publish the record"),
    }
}

/// Reads `rec`'s ranges (at most `max_bytes`) of `file` into the page
/// cache, until done or stopped.
fn replay(chain: &ChainId, file: &File, rec: &Record, max_bytes: u64, s: &Signal) {
    let t0 = Instant::now();
    let chunks = rec.chunks(max_bytes);
    let next = AtomicUsize::new(0);
    let read = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..CONCURRENCY.min(chunks.len()) {
            scope.spawn(|| {
                while !s.stopped() {
                    let Some(slot) = Slot::take(s) else { break };
                    let Some(&(off, len)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) else { break };
                    // Held only with the slot: at most PROCESS_CONCURRENCY
                    // buffers in the process.
                    let mut buf = vec![0u8; len as usize];
                    let mut done = 0u64;
                    while done < len {
                        match file.read_at(&mut buf[..(len - done) as usize], off + done) {
                            Ok(0) => break,
                            Ok(n) => done += n as u64,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(_) => break,
                        }
                    }
                    read.fetch_add(done, Ordering::Relaxed);
                    drop(buf);
                    drop(slot);
                }
            });
        }
    });
    let bytes = read.into_inner();
    crate::metrics::observe_prefetch_read(bytes);
    tracing::debug!(layer = %chain, bytes, ms = t0.elapsed().as_secs_f64() * 1e3, stopped = s.stopped(),
        "prefetch: read the layer's recorded ranges");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_become_merged_ranges_within_the_cap() {
        let mut pages = vec![0u8; 200];
        for i in [0, 1, 2, 10, 100, 101, 199] {
            pages[i] = 1;
        }
        let size = 199 * 4096 + 100;
        let r = Record::from_pages(&pages, 4096, size, u64::MAX);
        // 0..3 and 10 merge (a 7-page hole is under 128 KiB); 100..102
        // does not; the last page is cut at the image's end.
        assert_eq!(r.ranges, vec![(0, 11 * 4096), (100 * 4096, 2 * 4096), (199 * 4096, 100)]);
        assert_eq!(Record::parse(&r.render(), size).unwrap(), r);
        let capped = Record::from_pages(&pages, 4096, size, 12 * 4096 - 1);
        assert_eq!(capped.ranges, vec![(0, 11 * 4096)]);
        assert!(Record::from_pages(&[0, 0], 4096, 8192, u64::MAX).ranges.is_empty());
    }

    #[test]
    fn hostile_records_are_refused_with_the_reason() {
        let size = 1 << 20;
        let rec = |body: &str| Record::parse(format!("{MAGIC}\nimage_bytes {size}\n{body}").as_bytes(), size);
        assert!(rec("0 4096\n8192 4096\n").is_ok());
        for (body, why) in [
            ("0 4096\n0 4096\n", "overlapping"),
            ("8192 4096\n0 4096\n", "out of order"),
            ("4095 4096\n", "aligned"),
            ("0 0\n", "aligned"),
            ("1044480 8192\n", "beyond the end"),
            ("18446744073709547520 8192\n", "overflows"),
            ("0\n", "offset length"),
            ("x 4096\n", "bad offset"),
        ] {
            let e = rec(body).unwrap_err();
            assert!(e.contains(why), "{body:?}: {e}");
        }
        assert!(Record::parse(b"something else\n", size).unwrap_err().contains("does not start"));
        let other = format!("{MAGIC}\nimage_bytes 8192\n");
        assert!(Record::parse(other.as_bytes(), size).unwrap_err().contains("image of 8192 bytes"));
        let many: String = (0..=MAX_RANGES as u64).map(|i| format!("{} 4096\n", i * 8192)).collect();
        let e = Record::parse(format!("{MAGIC}\nimage_bytes {}\n{many}", 1u64 << 40).as_bytes(), 1 << 40).unwrap_err();
        assert!(e.contains("ranges") || e.contains("larger"), "{e}");
        assert!(Record::parse(&[0xff, 0xfe], size).is_err());
    }

    #[test]
    fn chunks_split_large_ranges_and_stop_at_the_cap() {
        let r = Record { image_bytes: 8 << 20, ranges: vec![(0, 3 << 20), (4 << 20, 4096)] };
        assert_eq!(r.chunks(u64::MAX), vec![(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 20), (4 << 20, 4096)]);
        assert_eq!(r.chunks(1 << 20), vec![(0, 1 << 20)]);
        assert_eq!(r.chunks((1 << 20) + 10), vec![(0, 1 << 20), (1 << 20, 10)]);
    }
}
