//! The check before a layer image's first mount, against the real kernel:
//! real ext4 images, loop devices and mounts. Needs root, mkfs.ext4,
//! e2fsck and debugfs; fails (never skips) without them.
//!
//! A "peer host" here is another writer of the shared root (a thread doing
//! what a peer's process would do to the files): renaming another image
//! over `layer.img`, editing `meta.json`.

mod common;

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sharedloop_core::admin::{verify, Verdict};
use sharedloop_core::ids::ChainId;
use sharedloop_core::image::{sha256_file, sparse_copy};
use sharedloop_core::layermounts::{LayerMounts, Policy};
use sharedloop_core::options::{Config, DirectIo, FsType, VerifyMode};
use sharedloop_core::store::{LayerInfo, LayerMeta, Store, FORMAT_VERSION, IMAGE_FILE, META_FILE};
use sharedloop_core::sys::loopdev;
use sharedloop_core::Error;

#[cfg(feature = "fault-injection")]
use common::{await_or_fail, mounts_under, wchan, LetGo};
use common::{gettid, require, Rig};

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A sparse ext4 image of `mb` MiB whose tree is `fs/marker` = `marker`.
fn make_image(dir: &Path, name: &str, marker: &str, mb: u64) -> PathBuf {
    let staging = dir.join(format!("{name}.d"));
    fs::create_dir_all(staging.join("fs")).unwrap();
    fs::write(staging.join("fs/marker"), marker).unwrap();
    let img = dir.join(format!("{name}.img"));
    run_ok(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-E", "nodiscard", "-d"])
            .arg(&staging)
            .arg(&img)
            .arg(format!("{mb}M")),
    );
    img
}

fn chain(c: char) -> ChainId {
    ChainId::parse(&format!("sha256:{}", c.to_string().repeat(64))).unwrap()
}

/// Publishes a copy of `img` as layer `chain` with its digest recorded.
fn publish(store: &Store, chain: &ChainId, img: &Path) -> LayerInfo {
    let digest = sha256_file(img).unwrap();
    let meta = LayerMeta {
        format: FORMAT_VERSION,
        chain_id: chain.clone(),
        diff_id: None,
        parent: None,
        fs: Some(FsType::Ext4),
        image_bytes: fs::metadata(img).unwrap().len(),
        content_bytes: 0,
        tar_bytes: 0,
        entries: 1,
        publisher: "publisher.1".into(),
        created_unix: 0,
        image_sha256: Some(digest),
        image_file: None,
    };
    store
        .publish(chain, &|tmp: &Path| {
            sparse_copy(img, &tmp.join(IMAGE_FILE), 0o644)?;
            Ok(meta.clone())
        })
        .unwrap()
        .into_info()
}

fn store_in(rig: &Rig) -> Store {
    let root = rig.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let cfg = Config { root, fallback: rig.path().join("fallback"), ..Config::default() };
    Store::new(&cfg, "me.1")
}

/// Finds an open descriptor of this process on exactly `path`.
fn fd_open_on(path: &Path) -> bool {
    let Ok(rd) = fs::read_dir("/proc/self/fd") else { return false };
    rd.flatten().any(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
}

/// Item 1 of issue 10: a peer renaming a crafted image over `layer.img`
/// while this host hashes the genuine one must not get its filesystem
/// mounted. Each round, the peer waits until the check has the image open
/// (and no loop device has it yet), then renames; the host mounts the
/// genuine image or refuses, never the crafted one (with `digest` and
/// `full` in turn).
#[test]
fn real_an_image_renamed_over_layer_img_during_the_check_is_never_mounted() {
    require(&["mkfs.ext4"]);
    let rig = Rig::new("sl-image-check-");
    let store = store_in(&rig);
    // Big enough (apparent size; sparse) that hashing takes a while.
    let genuine = make_image(rig.path(), "genuine", "genuine\n", 768);
    let crafted = make_image(rig.path(), "crafted", "crafted\n", 768);
    let c = chain('a');
    let info = publish(&store, &c, &genuine);
    let img = info.image().unwrap();
    let peer_dir = rig.path().join("root/tmp/peer");
    fs::create_dir_all(&peer_dir).unwrap();
    let (mut mounted, mut refused) = (0, 0);
    for round in 0..6 {
        let mode = if round % 2 == 0 { VerifyMode::Digest } else { VerifyMode::Full };
        // The genuine image in place again (a new inode), the crafted one
        // ready on the same filesystem.
        let fresh = img.with_extension(format!("fresh{round}"));
        sparse_copy(&genuine, &fresh, 0o644).unwrap();
        fs::rename(&fresh, &img).unwrap();
        let swap = peer_dir.join(format!("crafted{round}.img"));
        sparse_copy(&crafted, &swap, 0o644).unwrap();
        let genuine_ino = fs::metadata(&img).unwrap().ino();

        let mounts = LayerMounts::open(
            &rig.path().join(format!("mnt{round}")),
            &rig.path().join(format!("verified{round}")),
            false,
        )
        .unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let peer = {
            let (img, swap, done) = (img.clone(), swap.clone(), done.clone());
            let layer_dir = info.dir.clone();
            std::thread::spawn(move || -> bool {
                while !done.load(Ordering::SeqCst) {
                    if fd_open_on(&img) {
                        let attached = loopdev::list().iter().any(|(_, b)| b.starts_with(&layer_dir));
                        fs::rename(&swap, &img).unwrap();
                        return !attached;
                    }
                    std::thread::yield_now();
                }
                false
            })
        };
        let r = mounts.acquire(&info, Path::new("/test-user"), &Policy::new(mode, DirectIo::Off));
        done.store(true, Ordering::SeqCst);
        let raced = peer.join().unwrap();
        assert!(raced, "round {round}: the peer did not rename during the check; the round proves nothing");
        assert_ne!(fs::metadata(&img).unwrap().ino(), genuine_ino, "round {round}: the name holds the crafted image");
        let mnt = mounts.path(&c);
        match r {
            Ok(_) => {
                let seen = fs::read_to_string(mnt.join("fs/marker")).unwrap();
                mounts.release(&c, Path::new("/test-user")).unwrap();
                assert_eq!(seen, "genuine\n", "round {round}: the peer's crafted filesystem was mounted");
                // The record names the file that was checked and attached.
                let rec: serde_json::Value = serde_json::from_slice(
                    &fs::read(rig.path().join(format!("verified{round}")).join(c.dir_name())).unwrap(),
                )
                .unwrap();
                assert_eq!(rec["file"]["ino"], genuine_ino, "round {round}: {rec}");
                assert_eq!(rec["layer"], c.as_str(), "round {round}: {rec}");
                mounted += 1;
            }
            Err(e) => {
                assert!(matches!(e, Error::Corrupt { .. }), "round {round}: {e}");
                assert!(e.to_string().contains("refusing to mount"), "round {round}: {e}");
                assert!(!mnt.join("fs/marker").exists(), "round {round}: mounted anyway");
                assert!(
                    !rig.path().join(format!("verified{round}")).join(c.dir_name()).exists(),
                    "round {round}: a refused image was recorded as checked"
                );
                refused += 1;
            }
        }
        assert_eq!(mounts.count(), 0);
        assert!(
            !loopdev::list().iter().any(|(_, b)| b.starts_with(&info.dir)),
            "round {round}: a loop device still holds the image"
        );
    }
    eprintln!("{mounted} rounds mounted the genuine image, {refused} refused it");
    // The crafted image, now in place, is refused by its digest.
    let mounts = LayerMounts::open(&rig.path().join("mnt-last"), &rig.path().join("verified-last"), false).unwrap();
    let e =
        mounts.acquire(&info, Path::new("/test-user"), &Policy::new(VerifyMode::Digest, DirectIo::Off)).unwrap_err();
    assert!(e.to_string().contains("was recorded at publish"), "{e}");
}

/// An ext4 image that mounts but that e2fsck refuses (an inode with a
/// wrong link count).
fn make_fsck_refused_image(dir: &Path) -> PathBuf {
    let img = make_image(dir, "broken", "broken\n", 16);
    run_ok(Command::new("debugfs").args(["-w", "-R", "set_inode_field /fs/marker links_count 5"]).arg(&img));
    let out = Command::new("e2fsck").args(["-f", "-n"]).arg(&img).output().unwrap();
    assert!(!out.status.success(), "the broken image passes e2fsck; the test proves nothing");
    img
}

/// What a peer host does to meta.json: rewrites it with `edit` applied.
fn peer_edits_meta(info: &LayerInfo, edit: impl Fn(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = info.dir.join(META_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&p).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// Item 2 of issue 10: deleting `image_sha256` from meta.json must not
/// lower the check. A layer of the current format without its digest is
/// refused (digest and full); one of format 1 (which predates digests) is
/// still fsck-checked with `full`.
#[test]
fn real_a_removed_digest_does_not_lower_the_check() {
    require(&["mkfs.ext4", "e2fsck", "debugfs"]);
    let rig = Rig::new("sl-image-check-");
    let store = store_in(&rig);
    let broken = make_fsck_refused_image(rig.path());
    let good = make_image(rig.path(), "good", "good\n", 16);
    let (cb, cg) = (chain('b'), chain('c'));
    let info = publish(&store, &cb, &broken);
    let good_info = publish(&store, &cg, &good);
    const { assert!(FORMAT_VERSION >= sharedloop_core::store::DIGEST_ALWAYS_FORMAT) };
    let mounts = LayerMounts::open(&rig.path().join("mnt"), &rig.path().join("verified"), false).unwrap();
    let user = Path::new("/test-user");

    // The peer removes the digest: refused with digest and with full.
    peer_edits_meta(&info, |m| {
        m.remove("image_sha256");
    });
    let info = store.locate(&cb).unwrap();
    assert_eq!(info.meta.image_sha256, None);
    for mode in [VerifyMode::Digest, VerifyMode::Full] {
        let e = mounts.acquire(&info, user, &Policy::new(mode, DirectIo::Off)).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Corrupt { .. }), "{mode:?}: {text}");
        assert!(text.contains("image_sha256") && text.contains("refusing to mount"), "{mode:?}: {text}");
        assert!(text.contains(&format!("format {FORMAT_VERSION}")), "{mode:?}: {text}");
        assert_eq!(mounts.count(), 0, "{mode:?}: mounted");
        assert!(!loopdev::list().iter().any(|(_, b)| b.starts_with(&info.dir)), "{mode:?}: attached");
    }
    assert_eq!(verify(&info, &mut |_| {}).unwrap(), Verdict::DigestRemoved { format: FORMAT_VERSION });

    // The peer also claims format 1 (before digests): full still runs
    // fsck, which refuses the image.
    peer_edits_meta(&info, |m| {
        m.insert("format".into(), 1.into());
    });
    let info = store.locate(&cb).unwrap();
    assert_eq!(info.meta.format, 1);
    let e = mounts.acquire(&info, user, &Policy::new(VerifyMode::Full, DirectIo::Off)).unwrap_err();
    assert!(e.to_string().contains("the filesystem check failed"), "{e}");
    assert_eq!(mounts.count(), 0);
    assert!(matches!(verify(&info, &mut |_| {}).unwrap(), Verdict::FsckFailed { .. }));

    // A genuine format-1 layer without a digest: full checks it with fsck
    // and mounts it; digest mounts it with a warning.
    peer_edits_meta(&good_info, |m| {
        m.remove("image_sha256");
        m.insert("format".into(), 1.into());
    });
    let good_info = store.locate(&cg).unwrap();
    assert_eq!(verify(&good_info, &mut |_| {}).unwrap(), Verdict::NoDigest);
    for mode in [VerifyMode::Full, VerifyMode::Digest] {
        mounts.acquire(&good_info, user, &Policy::new(mode, DirectIo::Off)).unwrap();
        assert_eq!(fs::read_to_string(mounts.path(&cg).join("fs/marker")).unwrap(), "good\n");
        mounts.release(&cg, user).unwrap();
    }
    assert_eq!(mounts.count(), 0);
}

/// Bytes `tid` of this process has read so far.
fn rchar(tid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/self/task/{tid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
}

/// A peer writing into `layer.img` in place, behind the hash (into a region
/// the check has already read), while the check runs: the hash matches the
/// digest, but the file is not what was checked any more. The host refuses
/// it (the file's size, mtime or ctime changed between open and attach).
#[test]
fn real_an_image_written_in_place_during_the_check_is_refused() {
    require(&["mkfs.ext4"]);
    let rig = Rig::new("sl-image-check-");
    let store = store_in(&rig);
    let genuine = make_image(rig.path(), "genuine", "genuine\n", 768);
    let c = chain('d');
    let info = publish(&store, &c, &genuine);
    let img = info.image().unwrap();
    let me = gettid();
    for (round, mode) in [VerifyMode::Digest, VerifyMode::Full, VerifyMode::Digest].into_iter().enumerate() {
        let fresh = img.with_extension(format!("fresh{round}"));
        sparse_copy(&genuine, &fresh, 0o644).unwrap();
        fs::rename(&fresh, &img).unwrap();
        let mounts = LayerMounts::open(
            &rig.path().join(format!("mnt{round}")),
            &rig.path().join(format!("verified{round}")),
            false,
        )
        .unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let peer = {
            let (img, done, layer_dir) = (img.clone(), done.clone(), info.dir.clone());
            std::thread::spawn(move || -> bool {
                while !done.load(Ordering::SeqCst) && !fd_open_on(&img) {
                    std::thread::yield_now();
                }
                // Wait until the check has read 2 MiB: the file's identity
                // was taken, and the first blocks are hashed.
                let start = rchar(me);
                while !done.load(Ordering::SeqCst) && rchar(me) < start + (2 << 20) {
                    std::thread::yield_now();
                }
                if done.load(Ordering::SeqCst) {
                    return false;
                }
                let attached = loopdev::list().iter().any(|(_, b)| b.starts_with(&layer_dir));
                // Behind the hash: the boot block, which ext4 does not use.
                let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
                f.write_all_at(b"written in place", 0).unwrap();
                !attached
            })
        };
        let r = mounts.acquire(&info, Path::new("/test-user"), &Policy::new(mode, DirectIo::Off));
        done.store(true, Ordering::SeqCst);
        let raced = peer.join().unwrap();
        assert!(raced, "round {round}: the peer did not write during the check; the round proves nothing");
        if r.is_ok() {
            mounts.release(&c, Path::new("/test-user")).unwrap();
        }
        let e = r.expect_err(&format!("round {round} ({mode:?}): an image written during the check was mounted"));
        assert!(e.to_string().contains("changed while it was checked"), "round {round}: {e}");
        assert_eq!(mounts.count(), 0);
        assert!(!rig.path().join(format!("verified{round}")).join(c.dir_name()).exists());
        assert!(
            !loopdev::list().iter().any(|(_, b)| b.starts_with(&info.dir)),
            "round {round}: a loop device still holds the image"
        );
    }
}

/// Sets a file's mtime (to the nanosecond) the way an operator or a peer
/// would, with touch.
fn touch_mtime(path: &Path, mtime_ns: i128) {
    let at = format!("@{}.{:09}", mtime_ns.div_euclid(1_000_000_000), mtime_ns.rem_euclid(1_000_000_000));
    run_ok(Command::new("touch").args(["-m", "-d", &at]).arg(path));
}

/// Issue 12, item 3: `verify=identity` (the default) mounts an image whose
/// size and times are those stamped at publish, reading nothing of it (the
/// thread's read count grows by far less than the image, which a digest
/// check reads whole) and recording nothing; it is the default.
#[test]
fn real_identity_mounts_an_untouched_image_without_reading_it() {
    require(&["mkfs.ext4"]);
    assert_eq!(Config::default().verify, VerifyMode::Identity);
    let rig = Rig::new("sl-image-check-");
    let store = store_in(&rig);
    let genuine = make_image(rig.path(), "genuine", "genuine\n", 256);
    let c = chain('5');
    let info = publish(&store, &c, &genuine);
    let stamp = info.meta.image_file.expect("publish records the image's identity");
    assert_eq!(stamp.size, fs::metadata(info.image().unwrap()).unwrap().len());
    // What other hosts read back from meta.json.
    assert_eq!(store.locate(&c).unwrap().meta.image_file, Some(stamp));
    let mounts = LayerMounts::open(&rig.path().join("mnt"), &rig.path().join("verified"), false).unwrap();
    let me = gettid();
    let before = rchar(me);
    mounts.acquire(&info, Path::new("/test-user"), &Policy::new(VerifyMode::Identity, DirectIo::Off)).unwrap();
    let read = rchar(me) - before;
    assert!(read < stamp.size / 16, "the identity check read {read} bytes of a {} byte image", stamp.size);
    assert_eq!(fs::read_to_string(mounts.path(&c).join("fs/marker")).unwrap(), "genuine\n");
    assert!(!rig.path().join("verified").join(c.dir_name()).exists(), "identity records nothing");
    mounts.release(&c, Path::new("/test-user")).unwrap();
    assert_eq!(mounts.count(), 0);
}

/// Issue 12, item 3: with `verify=identity` an image whose size, mtime or
/// ctime is not what the publisher stamped is not trusted untouched: its
/// digest decides. Times changed on genuine bytes (a `touch`, a copy, a
/// restore) pass the digest and mount, recorded once; an appended byte and
/// a write in place with mtime put back (ctime, which no writer can set,
/// still tells) are refused, naming the file and `sharedloop verify`.
#[test]
fn real_identity_checks_the_digest_of_an_image_changed_after_publish() {
    require(&["mkfs.ext4"]);
    let rig = Rig::new("sl-image-check-");
    let store = store_in(&rig);
    let genuine = make_image(rig.path(), "genuine", "genuine\n", 16);
    let mounts = LayerMounts::open(&rig.path().join("mnt"), &rig.path().join("verified"), false).unwrap();
    type Change = fn(&Path, i128);
    let rounds: [(char, &str, bool, Change); 3] = [
        ('6', "mtime", true, |img, _| touch_mtime(img, 978_307_200_000_000_000)),
        ('7', "size", false, |img, _| {
            use std::io::Write;
            fs::OpenOptions::new().append(true).open(img).unwrap().write_all(b"x").unwrap();
        }),
        ('8', "ctime", false, |img, mtime| {
            fs::OpenOptions::new().write(true).open(img).unwrap().write_all_at(b"written in place", 0).unwrap();
            touch_mtime(img, mtime);
        }),
    ];
    for (c, what, genuine_bytes, change) in rounds {
        let c = chain(c);
        let info = publish(&store, &c, &genuine);
        let img = info.image().unwrap();
        let stamp = info.meta.image_file.unwrap();
        // ctime has a clock tick's resolution: let it move past the stamp.
        std::thread::sleep(std::time::Duration::from_millis(20));
        change(&img, stamp.mtime_ns);
        let r = mounts.acquire(&info, Path::new("/test-user"), &Policy::new(VerifyMode::Identity, DirectIo::Off));
        if genuine_bytes {
            r.unwrap_or_else(|e| panic!("{what}: genuine bytes with new times refused: {e}"));
            assert!(rig.path().join("verified").join(c.dir_name()).exists(), "{what}: the digest check is recorded");
            mounts.release(&c, Path::new("/test-user")).unwrap();
            continue;
        }
        let e = r.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::Corrupt { .. }), "{what}: {text}");
        assert!(text.contains(&img.display().to_string()), "{what}: the error does not name the file: {text}");
        assert!(text.contains("sha256 is") && text.contains("sharedloop verify"), "{what}: {text}");
        assert_eq!(mounts.count(), 0, "{what}: mounted");
        assert!(!loopdev::list().iter().any(|(_, b)| b.starts_with(&info.dir)), "{what}: attached");
    }
}

/// A layer published by an older sharedloop records no identity: with
/// `identity` its digest is checked once on this host (and recorded), and
/// a damaged image is refused.
#[test]
fn real_identity_checks_the_digest_of_a_layer_without_a_stamp() {
    require(&["mkfs.ext4"]);
    let rig = Rig::new("sl-image-check-");
    let store = store_in(&rig);
    let genuine = make_image(rig.path(), "genuine", "genuine\n", 16);
    let mounts = LayerMounts::open(&rig.path().join("mnt"), &rig.path().join("verified"), false).unwrap();
    let user = Path::new("/test-user");
    let (good, bad) = (chain('9'), chain('0'));
    for c in [&good, &bad] {
        let info = publish(&store, c, &genuine);
        peer_edits_meta(&info, |m| {
            m.remove("image_file");
        });
    }
    let info = store.locate(&good).unwrap();
    assert_eq!(info.meta.image_file, None);
    mounts.acquire(&info, user, &Policy::new(VerifyMode::Identity, DirectIo::Off)).unwrap();
    assert!(rig.path().join("verified").join(good.dir_name()).exists(), "the digest check was not recorded");
    mounts.release(&good, user).unwrap();

    let info = store.locate(&bad).unwrap();
    let f = fs::OpenOptions::new().write(true).open(info.image().unwrap()).unwrap();
    f.write_all_at(b"written in place", 0).unwrap();
    let e = mounts.acquire(&info, user, &Policy::new(VerifyMode::Identity, DirectIo::Off)).unwrap_err();
    assert!(e.to_string().contains("sha256 is"), "{e}");
    assert_eq!(mounts.count(), 0);
}

/// The tests that hold a layer's first mount (`SHAREDLOOP_FAULT_PAUSE`,
/// one value per process) take turns.
#[cfg(feature = "fault-injection")]
static PAUSE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Holds the first mount of `chain` (before its image is opened) until
/// `release` exists; `<release>.reached` appears when a thread is held.
#[cfg(feature = "fault-injection")]
fn pause_first_mount_of(chain: &ChainId, release: &Path) {
    std::env::set_var("SHAREDLOOP_FAULT_PAUSE", format!("layer-mount:{}:{}", &chain.as_str()[7..], release.display()));
}

/// Issue 12, item 3: the check and mount of one layer run without the
/// layer mount table's lock. Layer A's first mount is held (as a long
/// digest check of a big image on a busy file server would hold it);
/// layer B's first mount completes meanwhile, while A is still held; then
/// A is let go and mounts. Before, B waited for A behind the lock.
#[cfg(feature = "fault-injection")]
#[test]
fn real_first_mounts_of_two_layers_proceed_in_parallel() {
    require(&["mkfs.ext4"]);
    let _turn = PAUSE.lock().unwrap_or_else(|p| p.into_inner());
    let rig = Rig::new("sl-image-check-");
    let store = store_in(&rig);
    let img = make_image(rig.path(), "genuine", "genuine\n", 16);
    let (ca, cb) = (chain('1'), chain('2'));
    let (info_a, info_b) = (publish(&store, &ca, &img), publish(&store, &cb, &img));
    let mounts = LayerMounts::open(&rig.path().join("mnt"), &rig.path().join("verified"), false).unwrap();
    let release = rig.path().join("release-a");
    let reached = rig.path().join("release-a.reached");
    pause_first_mount_of(&ca, &release);
    let user = Path::new("/test-user");
    std::thread::scope(|s| {
        // Let A go however the test ends, so the scope can end.
        let _let_go = LetGo(&release);
        let a = s.spawn(|| mounts.acquire(&info_a, user, &Policy::new(VerifyMode::Digest, DirectIo::Off)));
        await_or_fail("layer A's first mount never reached its pause point", || reached.exists());
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, info_b) = (&mounts, &info_b);
        s.spawn(move || {
            let _ = tx.send(m.acquire(info_b, user, &Policy::new(VerifyMode::Digest, DirectIo::Off)));
        });
        let b = rx.recv_timeout(std::time::Duration::from_secs(60)).expect(
            "layer B's first mount did not complete in 60 s while layer A's was held: \
             first mounts of different layers wait for each other",
        );
        b.unwrap();
        assert_eq!(fs::read_to_string(mounts.path(&cb).join("fs/marker")).unwrap(), "genuine\n");
        assert!(!a.is_finished() && !release.exists(), "layer A was not held while B mounted");
        fs::write(&release, "").unwrap();
        a.join().unwrap().unwrap();
    });
    std::env::remove_var("SHAREDLOOP_FAULT_PAUSE");
    assert_eq!(fs::read_to_string(mounts.path(&ca).join("fs/marker")).unwrap(), "genuine\n");
    assert_eq!(mounts.count(), 2);
    for c in [&ca, &cb] {
        mounts.release(c, user).unwrap();
    }
    assert_eq!(mounts.count(), 0);
}

/// Two threads first-mounting the same layer at once: the second waits for
/// the first (blocked on the table, not in a mount of its own), and both
/// get the one mount and its device; the layer is attached once.
#[cfg(feature = "fault-injection")]
#[test]
fn real_two_first_mounts_of_one_layer_make_one_mount() {
    require(&["mkfs.ext4"]);
    let _turn = PAUSE.lock().unwrap_or_else(|p| p.into_inner());
    let rig = Rig::new("sl-image-check-");
    let store = store_in(&rig);
    let img = make_image(rig.path(), "genuine", "genuine\n", 16);
    let c = chain('3');
    let info = publish(&store, &c, &img);
    let mounts = LayerMounts::open(&rig.path().join("mnt"), &rig.path().join("verified"), false).unwrap();
    let release = rig.path().join("release");
    let reached = rig.path().join("release.reached");
    pause_first_mount_of(&c, &release);
    let (u1, u2) = (Path::new("/test-user-1"), Path::new("/test-user-2"));
    let (d1, d2) = std::thread::scope(|s| {
        let _let_go = LetGo(&release);
        let first = s.spawn(|| mounts.acquire(&info, u1, &Policy::new(VerifyMode::Digest, DirectIo::Off)));
        await_or_fail("the first mount never reached its pause point", || reached.exists());
        fs::remove_file(&reached).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (m, i) = (&mounts, &info);
        let second = s.spawn(move || {
            tx.send(gettid()).unwrap();
            m.acquire(i, u2, &Policy::new(VerifyMode::Digest, DirectIo::Off))
        });
        let tid = rx.recv().unwrap();
        // Held in the mount itself it would sleep at the pause point
        // (and mark it reached); waiting for the first it sleeps on a futex.
        await_or_fail("the second thread never blocked", || {
            assert!(!reached.exists(), "the second thread mounts the layer too, while the first is mounting it");
            wchan(tid).contains("futex")
        });
        assert!(!second.is_finished());
        fs::write(&release, "").unwrap();
        (first.join().unwrap().unwrap(), second.join().unwrap().unwrap())
    });
    std::env::remove_var("SHAREDLOOP_FAULT_PAUSE");
    assert_eq!(d1, d2);
    assert_eq!(mounts.count(), 1);
    let attached = loopdev::list().iter().filter(|(_, b)| b.starts_with(&info.dir)).count();
    assert_eq!(attached, 1, "the image is attached {attached} times");
    assert_eq!(mounts_under(&mounts.path(&c)).len(), 1);
    // Both users hold it: it goes with the second release only.
    mounts.release(&c, u1).unwrap();
    assert_eq!(mounts.count(), 1);
    mounts.release(&c, u2).unwrap();
    assert_eq!(mounts.count(), 0);
}
