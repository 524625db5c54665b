//! One build per layer across hosts: a host about to build a layer claims
//! it in the store first; the others wait for the layer instead of building
//! it too.
//!
//! ```text
//! <base>/claims/<sha256-HEX>.<generation>    "host H builds this layer"
//! ```
//! A claim is a small file created with `O_CREAT|O_EXCL`, which every
//! shared filesystem the store supports (NFSv3+, Lustre, GPFS, CephFS,
//! sshfs) decides on the server: one creator wins. `flock` is not used:
//! Lustre may disable it and NFS `local_lock` makes it node-local.
//!
//! The holder rewrites the file's fixed-width contents (a beat counter)
//! every quarter of `sharedloop.claim_timeout` while it builds, and writes
//! the state `published` once the layer is renamed into place. A waiter
//! reads the contents (close-to-open consistency makes a fresh `open`
//! see the last close's data on NFS, unlike cached attributes) and judges
//! by its own monotonic clock: contents unchanged for the timeout mean the
//! holder stopped (killed, hung, its host gone), and the waiter takes over
//! by creating the next generation exclusively, so of several waiters one
//! wins. No clocks are compared between hosts.
//!
//! Claims only save work; they are never needed for correctness: the
//! layer still appears by one `rename(2)` of a complete build, and two
//! builds of one layer (a claim taken over from a holder that was only
//! slow) end as today, the second rename losing and its build dropped.
//! A peer that renews a claim forever delays the others by at most
//! [`MAX_WAIT_TIMEOUTS`] timeouts; then they build anyway.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use crate::ids::{random_token, ChainId};
use crate::store::Dir;

/// The directory of claims below a store base.
pub const CLAIMS_DIR: &str = crate::store::layout::CLAIMS;
/// A waiter builds anyway after this many timeouts of a live claim.
pub const MAX_WAIT_TIMEOUTS: u32 = 20;
/// Claim contents are padded to this width, so that a rewrite never
/// shortens the file and a reader never sees it empty.
const WIDTH: usize = 160;
/// The largest claim file read (a peer could plant anything there).
const MAX_READ: u64 = 4096;
/// The first and the longest pause between two looks at a claim.
const FIRST_PAUSE: Duration = Duration::from_millis(20);
const MAX_PAUSE: Duration = Duration::from_millis(500);

/// What [`claim_or_wait`] came to.
pub enum Outcome<T> {
    /// This host builds the layer, holding `Claim` until it is done.
    Build(Claim),
    /// Another host published it meanwhile: `T` is what `locate` found.
    Published(T),
}

/// A claim this host holds: renewed by a thread until dropped. Dropping
/// it without [`Claim::published`] removes the file, so that waiters take
/// over at once instead of after the timeout.
pub struct Claim {
    path: Option<PathBuf>,
    /// The claims directory and the file's name in it, to remove it.
    at: Option<(Dir, String)>,
    token: String,
    host: String,
    stop: Option<Sender<()>>,
    renewer: Option<JoinHandle<File>>,
    done: bool,
}

fn contents(host: &str, token: &str, state: &str, beat: u64) -> Vec<u8> {
    let mut s = format!("sharedloop-claim host={host} token={token} state={state} beat={beat}");
    s.truncate(WIDTH - 1);
    let mut v = s.into_bytes();
    v.resize(WIDTH - 1, b' ');
    v.push(b'\n');
    v
}

impl Claim {
    /// A claim that holds nothing: the store had no room for one, or a
    /// waiter gave up waiting. The build goes ahead unclaimed.
    fn none() -> Claim {
        Claim {
            path: None,
            at: None,
            token: String::new(),
            host: String::new(),
            stop: None,
            renewer: None,
            done: false,
        }
    }

    fn held(dir: Dir, name: String, file: File, host: &str, timeout: Duration) -> Claim {
        let path = dir.join(&name);
        let token = random_token();
        let (tx, rx) = mpsc::channel::<()>();
        let every = (timeout / 4).max(Duration::from_millis(100));
        let (h, t, p) = (host.to_owned(), token.clone(), path.clone());
        let _ = file.write_all_at(&contents(&h, &t, "building", 0), 0);
        let renewer = std::thread::Builder::new()
            .name("sharedloop-claim".into())
            .spawn(move || {
                let mut beat = 0u64;
                loop {
                    match rx.recv_timeout(every) {
                        Err(RecvTimeoutError::Timeout) => {
                            beat += 1;
                            if let Err(e) = file.write_all_at(&contents(&h, &t, "building", beat), 0) {
                                tracing::warn!(claim = %p.display(), error = %e, "cannot renew the build claim");
                            }
                        }
                        _ => return file,
                    }
                }
            })
            .ok();
        Claim {
            path: Some(path),
            at: Some((dir, name)),
            token,
            host: host.to_owned(),
            stop: Some(tx),
            renewer,
            done: false,
        }
    }

    /// Whether this claim holds a file in the store.
    pub fn is_held(&self) -> bool {
        self.path.is_some()
    }

    fn stop_renewing(&mut self) -> Option<File> {
        drop(self.stop.take());
        self.renewer.take().and_then(|h| h.join().ok())
    }

    /// The layer is in place: waiters see the state and look for it. The
    /// file stays (a waiter's cached negative lookup of the new layer may
    /// need the timeout to expire; the state keeps it from building
    /// meanwhile); `sharedloop gc` removes old claims.
    pub fn published(mut self) {
        self.done = true;
        if let (Some(f), Some(p)) = (self.stop_renewing(), self.path.as_ref()) {
            if let Err(e) = f.write_all_at(&contents(&self.host, &self.token, "published", 0), 0) {
                tracing::debug!(claim = %p.display(), error = %e, "cannot mark the claim published");
            }
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let f = self.stop_renewing();
        if self.done {
            return;
        }
        drop(f);
        if let Some((dir, name)) = &self.at {
            match dir.remove_file(name) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(claim = %dir.join(name).display(), error = %e, "cannot remove the build claim")
                }
            }
        }
    }
}

/// A claim file as a waiter last saw it.
struct Seen {
    name: String,
    bytes: Vec<u8>,
    since: Instant,
}

/// The claims of `chain` in `dir`: (generation, file name), highest
/// generation last. Names that do not parse are ignored.
fn generations(dir: &Dir, chain: &ChainId) -> io::Result<Vec<(u32, String)>> {
    let prefix = format!("{}.", chain.dir_name());
    let mut v = Vec::new();
    for e in dir.entries("")? {
        if let Some(g) = e.name.strip_prefix(&prefix).and_then(|g| g.parse::<u32>().ok()) {
            v.push((g, e.name));
        }
    }
    v.sort();
    Ok(v)
}

/// The contents of claim file `name` in `dir`, bounded, never through a
/// symlink and never of anything but a regular file; `None` when it is
/// gone.
fn read_claim(dir: &Dir, name: &str) -> io::Result<Option<Vec<u8>>> {
    let f = match dir.open_regular(name) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "a claim that is not a regular file"))
        }
        Err(e) => return Err(e),
    };
    let mut v = Vec::new();
    f.take(MAX_READ).read_to_end(&mut v)?;
    Ok(Some(v))
}

fn is_published(bytes: &[u8]) -> bool {
    String::from_utf8_lossy(bytes).contains(" state=published ")
}

/// Creates claim file `name` in `dir` exclusively; `None` when it exists.
fn create(dir: &Dir, name: &str) -> io::Result<Option<File>> {
    match dir.create_new(name, 0o644) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(e),
    }
}

/// The claims directory of store base `base`, open (made when `make`);
/// never through a symlink below the base.
fn claims_dir(base: &Path, make: bool) -> io::Result<Dir> {
    let base = Dir::open(base)?;
    if make {
        base.sub_made(CLAIMS_DIR)
    } else {
        base.sub(CLAIMS_DIR)
    }
}

/// Removes every claim of `chain` under `base` (its layer was removed, and
/// a `published` claim would hold up a host about to rebuild it).
pub fn forget(base: &Path, chain: &ChainId) {
    let Ok(dir) = claims_dir(base, false) else { return };
    for (_, name) in generations(&dir, chain).unwrap_or_default() {
        let _ = dir.remove_file(name);
    }
}

/// Claims layer `chain` in store base `base` for building, or waits until
/// another host publishes it. `locate` looks for the published layer (and
/// fails when the base cannot be read: the caller then falls back).
///
/// Each look: the layer, when published, is used. Otherwise the highest
/// generation of claim is read; no claim, or one whose holder gave it up,
/// is claimed; one whose contents stayed the same for `timeout` is taken
/// over with the next generation; a live one is waited on, with pauses
/// growing from 20 ms to 500 ms.
pub fn claim_or_wait<T>(
    base: &Path,
    chain: &ChainId,
    host: &str,
    timeout: Duration,
    locate: &dyn Fn() -> Result<Option<T>>,
) -> Result<Outcome<T>> {
    claims_dir(base, true).ctx("open", base.join(CLAIMS_DIR))?;
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    let mut seen: Option<Seen> = None;
    let mut announced = false;
    loop {
        if let Some(t) = locate()? {
            return Ok(Outcome::Published(t));
        }
        crate::fault::point("claim", "looked for the layer");
        // Opened again for each look: a root unmounted (or remounted) while
        // this host waits is seen as such, not read through an old handle.
        let dir = claims_dir(base, false).ctx("open", base.join(CLAIMS_DIR))?;
        let gens = generations(&dir, chain).ctx("read", dir.path())?;
        let next = match gens.last() {
            None => Some(0),
            Some((g, name)) => {
                let p = dir.join(name);
                match read_claim(&dir, name).ctx("read", &p)? {
                    // Given up (its holder failed and removed it): ours to take.
                    None => Some(g + 1),
                    Some(bytes) if is_published(&bytes) => {
                        // Published, but the layer is not visible here yet
                        // (a cached lookup): look again, do not build.
                        if started.elapsed() > timeout {
                            tracing::warn!(layer = %chain, claim = %p.display(),
                                "a claim says the layer is published, but it is not in the store; building it");
                            Some(g + 1)
                        } else {
                            None
                        }
                    }
                    Some(bytes) => match &seen {
                        Some(s) if s.name == *name && s.bytes == bytes => {
                            if s.since.elapsed() >= timeout {
                                tracing::info!(layer = %chain, claim = %p.display(), timeout_s = timeout.as_secs_f64(),
                                    "the host building this layer stopped renewing its claim; taking over");
                                Some(g + 1)
                            } else {
                                None
                            }
                        }
                        _ => {
                            if !announced {
                                tracing::info!(layer = %chain, claim = %p.display(),
                                    "another host is building this layer; waiting for it");
                                announced = true;
                            }
                            seen = Some(Seen { name: name.clone(), bytes, since: Instant::now() });
                            None
                        }
                    },
                }
            }
        };
        if let Some(g) = next {
            let name = format!("{}.{g}", chain.dir_name());
            if let Some(f) = create(&dir, &name).ctx("create", dir.join(&name))? {
                crate::fault::point("claim", "claim made");
                let own = dir.sub("").ctx("open", dir.path())?;
                let claim = Claim::held(own, name, f, host, timeout);
                // Published between the look and the claim: use it.
                if let Some(t) = locate()? {
                    drop(claim);
                    return Ok(Outcome::Published(t));
                }
                for (_, old) in gens.iter().filter(|(og, _)| *og < g) {
                    let _ = dir.remove_file(old);
                }
                return Ok(Outcome::Build(claim));
            }
            // Another waiter took it first: watch theirs.
            seen = None;
            continue;
        }
        if started.elapsed() >= timeout * MAX_WAIT_TIMEOUTS {
            tracing::warn!(layer = %chain, waited_s = started.elapsed().as_secs(),
                "a claim on this layer stays live without the layer appearing; building it unclaimed");
            return Ok(Outcome::Build(Claim::none()));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    fn chain() -> ChainId {
        ChainId::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap()
    }

    fn tmpdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("sl-claim-{}", random_token()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn the_first_claims_and_the_second_waits_for_the_layer() {
        let base = tmpdir();
        let published = Arc::new(Mutex::new(false));
        let p = published.clone();
        let locate = move || Ok(p.lock().unwrap().then_some(()));
        let Outcome::Build(c) = claim_or_wait(&base, &chain(), "a", Duration::from_secs(30), &locate).unwrap() else {
            panic!("the first host must build")
        };
        assert!(c.is_held());
        let (b, p2) = (base.clone(), published.clone());
        let waiter = std::thread::spawn(move || {
            let locate = move || Ok(p2.lock().unwrap().then_some(()));
            matches!(claim_or_wait(&b, &chain(), "b", Duration::from_secs(30), &locate), Ok(Outcome::Published(())))
        });
        // The waiter sees a live claim; publish, then mark it.
        std::thread::sleep(Duration::from_millis(100));
        *published.lock().unwrap() = true;
        c.published();
        assert!(waiter.join().unwrap(), "the second host must use the published layer");
        let text = fs::read_to_string(base.join(CLAIMS_DIR).join(format!("{}.0", chain().dir_name()))).unwrap();
        assert!(text.contains("state=published"), "{text}");
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_claim_that_is_not_renewed_is_taken_over_by_one_waiter() {
        let base = tmpdir();
        let dir = base.join(CLAIMS_DIR);
        fs::create_dir(&dir).unwrap();
        // A holder that died: its file stays, never rewritten.
        fs::write(dir.join(format!("{}.0", chain().dir_name())), contents("dead", "t", "building", 3)).unwrap();
        let builders = Arc::new(AtomicUsize::new(0));
        let published = Arc::new(Mutex::new(false));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (b, n, p) = (base.clone(), builders.clone(), published.clone());
                std::thread::spawn(move || {
                    let p2 = p.clone();
                    let locate = move || Ok(p2.lock().unwrap().then_some(()));
                    match claim_or_wait(&b, &chain(), &format!("h{i}"), Duration::from_millis(300), &locate).unwrap() {
                        Outcome::Build(c) => {
                            assert!(c.is_held());
                            n.fetch_add(1, Ordering::SeqCst);
                            // Build, publish: the other waiters use it.
                            std::thread::sleep(Duration::from_millis(200));
                            *p.lock().unwrap() = true;
                            c.published();
                        }
                        Outcome::Published(()) => {}
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(builders.load(Ordering::SeqCst), 1, "one waiter takes over, the others use its layer");
        let gens = generations(&Dir::open(&dir).unwrap(), &chain()).unwrap();
        assert_eq!(gens.iter().map(|(g, _)| *g).collect::<Vec<_>>(), vec![1], "the dead claim is removed");
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_renewed_claim_is_not_taken_over() {
        let base = tmpdir();
        let locate = || Ok(None::<()>);
        let Outcome::Build(c) = claim_or_wait(&base, &chain(), "a", Duration::from_millis(400), &locate).unwrap()
        else {
            panic!()
        };
        // The renewer rewrites every 100 ms: a waiter sees it live for
        // well past the timeout. Bound the wait with a peer giving up.
        let (b, stop) = (base.clone(), Arc::new(Mutex::new(false)));
        let s2 = stop.clone();
        let waiter = std::thread::spawn(move || {
            let locate = move || Ok(s2.lock().unwrap().then_some(()));
            claim_or_wait(&b, &chain(), "b", Duration::from_millis(400), &locate)
                .map(|o| matches!(o, Outcome::Published(())))
        });
        std::thread::sleep(Duration::from_millis(1500));
        *stop.lock().unwrap() = true;
        assert!(waiter.join().unwrap().unwrap(), "the waiter must not have taken over a renewed claim");
        assert_eq!(generations(&Dir::open(&base.join(CLAIMS_DIR)).unwrap(), &chain()).unwrap().len(), 1);
        drop(c);
        assert!(
            generations(&Dir::open(&base.join(CLAIMS_DIR)).unwrap(), &chain()).unwrap().is_empty(),
            "a dropped claim is removed"
        );
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn a_planted_fifo_or_symlink_is_not_read_as_a_claim() {
        let base = tmpdir();
        let dir = base.join(CLAIMS_DIR);
        fs::create_dir(&dir).unwrap();
        let name = dir.join(format!("{}.0", chain().dir_name()));
        rustix::fs::mkfifoat(rustix::fs::CWD, &name, rustix::fs::Mode::from_raw_mode(0o644)).unwrap();
        let locate = || Ok(None::<()>);
        let e = claim_or_wait(&base, &chain(), "a", Duration::from_secs(1), &locate).err().expect("refused");
        assert!(e.to_string().contains(&name.display().to_string()), "{e}");
        fs::remove_file(&name).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &name).unwrap();
        let e = claim_or_wait(&base, &chain(), "a", Duration::from_secs(1), &locate).err().expect("refused");
        assert!(e.to_string().contains(&name.display().to_string()), "{e}");
        fs::remove_dir_all(base).unwrap();
    }
}
