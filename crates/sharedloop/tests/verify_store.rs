//! `sharedloop verify` over a real store (real ext4 images, e2fsck) with
//! layer.img entries that are not regular files, a symlinked layer
//! directory and a FIFO as meta.json: each is reported bad with the reason,
//! nothing is followed or opened, and the layers after them are still
//! checked. Needs root (mknod) and e2fsprogs; fails, never skips.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, run_ok, sharedloop_bin};
use sha2::Digest as _;

fn write_layer(root: &Path, hex: char, image: &Path, digest: &str) -> std::path::PathBuf {
    let chain = format!("sha256:{}", hex.to_string().repeat(64));
    let dir = root.join("layers").join(chain.replacen(':', "-", 1));
    fs::create_dir_all(&dir).unwrap();
    let meta = serde_json::json!({
        "format": 2, "chain_id": chain, "diff_id": null, "parent": null, "fs": "ext4",
        "image_bytes": fs::metadata(image).unwrap().len(), "content_bytes": 0, "tar_bytes": 0,
        "entries": 1, "publisher": "peer.1", "created_unix": 0, "image_sha256": digest,
    });
    fs::write(dir.join("meta.json"), serde_json::to_vec_pretty(&meta).unwrap()).unwrap();
    dir
}

/// Runs the CLI; a run that hangs (a FIFO opened for reading blocks) is
/// killed and fails the test instead of hanging it.
fn run_verify(args: &[&str]) -> (Option<i32>, String, String) {
    let mut child =
        Command::new(sharedloop_bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            return (out.status.code(), stdout.into_owned(), stderr.into_owned());
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sharedloop {args:?} hung (it opened something that blocks)");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn verify_reports_each_non_regular_image_and_checks_the_layers_after_it() {
    require(&["mkfs.ext4", "e2fsck"]);
    let t = tempfile::Builder::new().prefix("sl-verify-store-").tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("layers")).unwrap();
    // A genuine image, elsewhere on the host, with its digest.
    let staging = t.path().join("staging");
    fs::create_dir_all(staging.join("fs")).unwrap();
    fs::write(staging.join("fs/f"), "content\n").unwrap();
    let good = t.path().join("good.img");
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", "-d"]).arg(&staging).arg(&good).arg("8M"));
    let digest = hex::encode(sha2::Sha256::digest(fs::read(&good).unwrap()));

    // Layers in name order: good, device node, symlink, FIFO, good.
    let d1 = write_layer(&root, '1', &good, &digest);
    fs::copy(&good, d1.join("layer.img")).unwrap();
    let d2 = write_layer(&root, '2', &good, &digest);
    // /dev/zero's numbers: a reader that follows it never reaches the end.
    rustix::fs::mknodat(
        rustix::fs::CWD,
        d2.join("layer.img").as_path(),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(1, 5),
    )
    .unwrap();
    // A link to the genuine image: following it would report "ok".
    let d3 = write_layer(&root, '3', &good, &digest);
    symlink(&good, d3.join("layer.img")).unwrap();
    let d4 = write_layer(&root, '4', &good, &digest);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        d4.join("layer.img").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    let d5 = write_layer(&root, '5', &good, &digest);
    fs::copy(&good, d5.join("layer.img")).unwrap();
    // A layer directory that is a link to a complete layer elsewhere, and
    // one whose meta.json is a FIFO (reading it would block): the store
    // skips both, verify reports both.
    let elsewhere = t.path().join("elsewhere");
    fs::create_dir_all(elsewhere.join("layers")).unwrap();
    let d6 = write_layer(&elsewhere, '6', &good, &digest);
    fs::copy(&good, d6.join("layer.img")).unwrap();
    symlink(&d6, root.join("layers").join(format!("sha256-{}", "6".repeat(64)))).unwrap();
    let d7 = root.join("layers").join(format!("sha256-{}", "7".repeat(64)));
    fs::create_dir_all(&d7).unwrap();
    fs::copy(&good, d7.join("layer.img")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        d7.join("meta.json").as_path(),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();

    let root_s = root.display().to_string();
    let run_dir = t.path().join("run").display().to_string();
    let base = ["verify", "--root", &root_s, "--fallback", "/nonexistent", "--run-dir", &run_dir];
    let (code, text, stderr) = run_verify(&base);
    let text = format!("{text}{stderr}");
    let line = |hex: char| {
        let chain = format!("sha256:{}", hex.to_string().repeat(64));
        text.lines()
            .find(|l| l.starts_with(&chain))
            .unwrap_or_else(|| panic!("no line for {chain}:\n{text}"))
            .to_owned()
    };
    assert!(line('1').ends_with("(root): ok"), "{text}");
    assert!(line('2').contains("BAD") && line('2').contains("a character device"), "{text}");
    assert!(line('3').contains("BAD") && line('3').contains("a symbolic link"), "{text}");
    assert!(line('4').contains("BAD") && line('4').contains("a FIFO"), "{text}");
    assert!(line('5').ends_with("(root): ok"), "the layer after the bad ones was not checked:\n{text}");
    assert!(line('6').contains("BAD") && line('6').contains("a symbolic link, not followed"), "{text}");
    assert!(
        line('7').contains("BAD") && line('7').contains("meta.json") && line('7').contains("not a regular file"),
        "{text}"
    );
    assert!(text.contains("7 layers checked, 5 with problems"), "{text}");
    assert_eq!(code, Some(1), "{text}");

    // The same as JSON, for scripts.
    let (code, text, stderr) = run_verify(&[&base[..], &["--json"]].concat());
    assert_eq!(code, Some(1), "{text}{stderr}");
    let rows: serde_json::Value = serde_json::from_str(&text).unwrap();
    let statuses: Vec<&str> = rows.as_array().unwrap().iter().map(|r| r["status"].as_str().unwrap()).collect();
    assert_eq!(
        statuses,
        ["ok", "not_regular", "not_regular", "not_regular", "ok", "not_a_layer", "not_a_layer"],
        "{text}"
    );
    // Nothing was followed: the genuine image outside the store is intact.
    assert_eq!(hex::encode(sha2::Sha256::digest(fs::read(&good).unwrap())), digest);

    // A rate-limited scrub finds the same; a rate that is not a positive
    // size is a usage error naming the flag.
    let (code, text, stderr) = run_verify(&[&base[..], &["--max-rate", "1G"]].concat());
    assert_eq!(code, Some(1), "{text}{stderr}");
    assert!(text.contains("7 layers checked, 5 with problems"), "{text}{stderr}");
    for bad in ["0", "fast", "-5M"] {
        let flag = format!("--max-rate={bad}");
        let (code, text, stderr) = run_verify(&[&base[..], &[flag.as_str()]].concat());
        assert_eq!(code, Some(2), "--max-rate {bad}: {text}{stderr}");
        assert!(stderr.contains("--max-rate"), "--max-rate {bad}: {stderr}");
    }
}
