//! What sharedloop keeps on the local host: who may read it, and where it
//! starts. Real dockerd, containerd, runc and kernel; needs root.
//! (Issue 10: items 3 and 16.)

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

/// Runs `args` inside `h` as nobody (65534:65534, no groups); returns
/// whether it succeeded and what it printed.
fn as_nobody(h: &Host, args: &[&str]) -> (bool, String) {
    let out = run(h.cmd("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"]).args(args));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Each path (inside `h`) must be out of nobody's reach: listing a
/// directory, reading a file, both refused with "Permission denied".
fn assert_denied(h: &Host, paths: &[PathBuf]) {
    for p in paths {
        assert!(h.inside(p).exists(), "{} should exist (as root)", p.display());
        let s = p.to_str().unwrap();
        let probe = if h.inside(p).is_dir() { vec!["ls", "-la", s] } else { vec!["cat", s] };
        let (ok, text) = as_nobody(h, &probe);
        assert!(!ok && text.contains("Permission denied"), "nobody could {probe:?}:\n{text}");
    }
}

/// Item 3: a non-root user reads nothing of a running container through
/// sharedloop's directories: not the upper directory, the overlay, the
/// writable image, the layer mounts or the run directory, for Docker and
/// containerd alike. Homes and the run directory are 0700, images 0600,
/// and a restart narrows what an older version left wider.
#[test]
fn local_state_is_root_only_for_other_users() {
    require(&["dockerd", "busybox", "mkfs.ext4", "setpriv", "containerd", "ctr", "runc", "containerd-shim-runc-v2"]);
    let mut h = Host::new("perms");
    let root = h.root_dir();
    fs::create_dir_all(&root).unwrap();
    let args = h.snapshotter_args(&root, true);
    h.start_serve(&args, &[]);
    let opts = h.default_storage_opts();
    h.start_dockerd(&opts);
    h.start_containerd();
    // dockerd keeps its data root 0710; sharedloop's home in it must not
    // rely on that (a data root on a path that others can pass through).
    fs::set_permissions(h.data_root(), fs::Permissions::from_mode(0o755)).unwrap();

    let fx = h.dir.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let tar = fx.join("rootfs.tar");
    run_ok(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."));
    h.docker_stdin(&["import", "-", "base:1"], &tar);
    let oci = fx.join("oci.tar");
    oci_archive(&base_layers(&rootfs), "docker.io/test/multi:1", &oci);
    h.ctr_ok(&["image", "import", oci.to_str().unwrap()]);

    // Containers, as root and as a user, on 0700 homes.
    let sh = "echo secret > /secret && sleep 100000";
    h.docker_ok(&["run", "-d", "--name", "d1", "--network", "none", "base:1", "sh", "-c", sh]);
    h.ctr_ok(&["run", "-d", "docker.io/test/multi:1", "c1", "/bin/sh", "-c", sh]);
    assert_eq!(h.docker_ok(&["run", "--rm", "--network", "none", "-u", "1000", "base:1", "id", "-u"]), "1000\n");
    assert_eq!(h.ctr_ok(&["run", "--rm", "docker.io/test/multi:1", "c2", "/bin/su", "user", "-c", "id -u"]), "1000\n");
    for _ in 0..100 {
        if h.docker(&["exec", "d1", "cat", "/secret"]).status.success()
            && h.ctr(&["task", "exec", "--exec-id", "e", "c1", "/bin/cat", "/secret"]).status.success()
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(h.docker_ok(&["exec", "d1", "cat", "/secret"]), "secret\n");

    let dhome = h.data_root().join("sharedloop");
    let chome = h.snapshotter_root();
    let d_id = h.docker_ok(&["inspect", "-f", "{{.GraphDriver.Data.MergedDir}}", "d1"]);
    let d_id = Path::new(d_id.trim()).file_name().unwrap().to_str().unwrap().to_owned();
    let run_dir = PathBuf::from("/run/sharedloop");
    let layers = run_dir.join("layers");
    let a_layer = layers.join(fs::read_dir(h.inside(&layers)).unwrap().flatten().next().unwrap().file_name());
    // The containerd container's writable snapshot: the one rw image
    // besides the committed ones (rw/ holds only writable layers).
    let c_rws: Vec<String> = fs::read_dir(h.inside(&chome.join("rwmnt")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| h.inside(&chome.join("rwmnt").join(n).join("upper/secret")).exists())
        .collect();
    assert_eq!(c_rws.len(), 1, "{c_rws:?}");
    let c_id = &c_rws[0];

    let mut denied = vec![
        run_dir.clone(),
        layers.clone(),
        a_layer.clone(),
        a_layer.join("fs"),
        run_dir.join("verified"),
        run_dir.join("docker-init.json"),
    ];
    for (home, id) in [(&dhome, d_id.as_str()), (&chome, c_id.as_str())] {
        denied.extend([
            home.clone(),
            home.join("rw").join(id).join("rw.img"),
            home.join("rwmnt").join(id).join("upper"),
            home.join("rwmnt").join(id).join("upper/secret"),
            home.join("rw"),
            home.join("layers"),
        ]);
    }
    denied.push(dhome.join("merged").join(&d_id));
    denied.push(dhome.join("merged").join(&d_id).join("secret"));
    denied.push(chome.join("snapshots"));
    assert!(h.inside(&dhome.join("rwmnt").join(&d_id).join("upper/secret")).exists(), "the container wrote its file");
    assert_denied(&h, &denied);
    // The check itself works: nobody can read what is meant to be read.
    let (ok, text) = as_nobody(&h, &["cat", "/etc/hostname"]);
    assert!(ok, "nobody cannot read at all: {text}");

    // The modes themselves.
    for d in [&run_dir, &layers, &run_dir.join("verified")] {
        assert_eq!(mode(&h.inside(d)), 0o700, "{}", d.display());
    }
    assert_eq!(mode(&h.inside(&run_dir.join("docker-init.json"))), 0o600);
    for home in [&dhome, &chome] {
        for sub in ["", "layers", "rw", "mnt", "rwmnt", "merged", "tmp", "templates"] {
            assert_eq!(mode(&h.inside(&home.join(sub))), 0o700, "{}/{sub}", home.display());
        }
        for e in fs::read_dir(h.inside(&home.join("rw"))).unwrap().flatten() {
            if e.path().join("dir").is_dir() {
                // A directory layer (Docker's -init): its directory is root's.
                assert_eq!(mode(&e.path()), 0o700, "{}", e.path().display());
                assert_denied(&h, &[home.join("rw").join(e.file_name()).join("dir/upper")]);
            } else {
                assert_eq!(mode(&e.path().join("rw.img")), 0o600, "{}", e.path().display());
            }
        }
        for e in fs::read_dir(h.inside(&home.join("templates"))).unwrap().flatten() {
            assert_eq!(mode(&e.path()), 0o600, "{}", e.path().display());
        }
        assert_eq!(mode(&h.inside(&home.join("host-id"))), 0o600);
    }
    assert_eq!(mode(&h.inside(&chome.join("snapshots"))), 0o700);
    // The shared store keeps its modes: other hosts read it.
    let published = fs::read_dir(root.join("layers")).unwrap().flatten().next().unwrap().path();
    assert_eq!(mode(&published.join("layer.img")), 0o644);

    // An older install's wider modes are narrowed at the next start.
    let (dhome_in, chome_in) = (h.inside(&dhome), h.inside(&chome));
    let d_img = h.inside(&dhome.join("rw").join(&d_id).join("rw.img"));
    for (p, m) in [(&dhome_in, 0o755), (&chome_in, 0o755), (&d_img, 0o644)] {
        fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
    }
    fs::set_permissions(h.inside(&run_dir), fs::Permissions::from_mode(0o755)).unwrap();
    h.kill_plugin();
    h.restart_plugin();
    assert_eq!(h.docker_ok(&["exec", "d1", "cat", "/secret"]), "secret\n");
    assert_eq!((mode(&dhome_in), mode(&chome_in), mode(&d_img)), (0o700, 0o700, 0o600));
    assert_eq!(mode(&h.inside(&run_dir)), 0o700);
    assert_denied(&h, &denied);
}

/// Item 16: a sharedloop that ran on the machine leaves its layer
/// directory and home mounted; in a namespace where later mounts cover
/// them (a test host's own /run and data root), mountinfo still lists
/// them. serve and Init must not take them for their own: they bind their
/// directories afresh and run containers.
#[test]
fn serve_starts_where_old_mounts_are_covered_by_later_ones() {
    require(&["dockerd", "busybox", "mkfs.ext4"]);
    let mut h = Host::new("covered");
    let data_root = h.data_root();
    let home = data_root.join("sharedloop");
    let layer = format!("{LAYER_MOUNTS}/sha256-{}", "ab".repeat(32));
    let script = format!(
        "set -e\n\
         mkdir -p {layer} {home}/merged/gone\n\
         mount --bind {LAYER_MOUNTS} {LAYER_MOUNTS}\n\
         mount -t tmpfs tmpfs {layer}\n\
         mount --bind {home} {home}\n\
         mount -t tmpfs tmpfs {home}/merged/gone\n\
         mount -t tmpfs tmpfs /run\n\
         mkdir -p /run/docker/plugins\n\
         mount -t tmpfs tmpfs {dr}\n",
        home = home.display(),
        dr = data_root.display(),
    );
    run_ok(h.cmd("sh").args(["-c", &script]));
    let listed = h.mounts_under(Path::new("/run/sharedloop"));
    assert!(listed.contains(&layer), "the covered layer mount is listed: {listed:?}");

    fs::create_dir_all(h.root_dir()).unwrap();
    h.start(&[]);
    let fx = h.dir.join("fixture");
    let rootfs = fx.join("rootfs");
    busybox_rootfs(&rootfs);
    let tar = fx.join("rootfs.tar");
    run_ok(Command::new("tar").arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg("."));
    h.docker_stdin(&["import", "-", "base:1"], &tar);
    assert_eq!(
        h.docker_ok(&["run", "--rm", "--network", "none", "base:1", "cat", "/etc/group"]),
        "root:x:0:\nuser:x:1000:\n"
    );
    let log = h.plugin_log();
    assert!(!log.contains("Invalid argument"), "{log}");
}

/// Item 4: a shared filesystem mounted at the spec's default root,
/// /var/lib/docker/loopback/root, before dockerd starts is covered when
/// dockerd binds its data root (not a mount point) onto itself. sharedloop
/// says so in `docker info`, `sharedloop status` and its log, instead of
/// calling the local directory under it a writable root.
#[test]
fn a_root_covered_by_dockerds_data_root_bind_is_reported() {
    require(&["dockerd", "busybox", "mkfs.ext4"]);
    let mut h = Host::new("covered-root");
    // The host's own /var/lib, so /var/lib/docker is a plain directory
    // (not a mount point) as on a fresh machine; then the "shared"
    // filesystem at the default root.
    let script = format!(
        "set -e\nmkdir -p {v}\nmount --bind {v} /var/lib\n\
         mkdir -p /var/lib/docker/loopback/root\n\
         mount -t tmpfs -o size=256m shared-store /var/lib/docker/loopback/root\n",
        v = h.dir.join("varlib").display()
    );
    run_ok(h.cmd("sh").args(["-c", &script]));
    h.start_plugin();
    h.try_start_dockerd(&[], None).unwrap_or_else(|e| panic!("{e}\n{}", h.plugin_log()));
    let mi = h.mountinfo();
    assert!(
        mi.lines().any(|l| l.split_whitespace().nth(4) == Some("/var/lib/docker")),
        "dockerd did not bind its data root onto itself:\n{mi}"
    );

    let status = h.driver_status();
    assert!(status.contains("Loopback Root Directory: /var/lib/docker/loopback/root"), "{status}");
    let line =
        status.lines().find(|l| l.starts_with("Root Directory Placement: ")).unwrap_or_else(|| panic!("{status}"));
    assert!(line.contains("LOCAL, NOT SHARED"), "{line}");
    assert!(line.contains("tmpfs filesystem shared-store mounted on /var/lib/docker/loopback/root"), "{line}");
    assert!(line.contains("covered by a later mount on /var/lib/docker"), "{line}");

    let out = h.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("placement:   LOCAL, NOT SHARED: the tmpfs filesystem shared-store"), "{text}");
    let out = h.cli(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["local"], serde_json::json!(true), "{v}");

    let log = h.plugin_log();
    assert!(log.lines().any(|l| l.contains("WARN") && l.contains("LOCAL, NOT SHARED")), "{log}");

    // A root on a filesystem of its own, not covered: said so, not warned.
    let other = h.dir.join("other");
    fs::create_dir_all(&other).unwrap();
    run_ok(h.cmd("mount").args(["-t", "tmpfs", "-o", "size=64m", "other-store"]).arg(&other));
    let out = h.cli(&["status", "--root", other.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("placement:   own filesystem (tmpfs other-store on {})", other.display());
    assert!(text.contains(&want), "{text}");
}

/// `sharedloop.require_shared_root=true` turns a local root into a refusal
/// to start, naming the option and the reason; a root on its own
/// filesystem starts.
#[test]
fn require_shared_root_refuses_a_local_root() {
    require(&["mkfs.ext4"]);
    let h = Host::new("strict-root");
    let (local, shared) = (h.dir.join("local-root"), h.dir.join("shared-root"));
    fs::create_dir_all(&local).unwrap();
    fs::create_dir_all(&shared).unwrap();
    run_ok(h.cmd("mount").args(["-t", "tmpfs", "-o", "size=64m", "other-store"]).arg(&shared));
    let serve = |name: &str, root: &str| {
        let mut c = h.cmd(sharedloop_bin());
        c.args(["serve", "--config", "/dev/null", "--no-docker", "--containerd"])
            .arg("--containerd-socket")
            .arg(format!("/run/{name}.sock"))
            .arg("--containerd-root")
            .arg(h.dir.join(format!("home-{name}")))
            .args(["--run-dir", &format!("/run/{name}")])
            .args(["-o", &format!("loopback_root={root}"), "-o", "require_shared_root=true"]);
        c
    };
    let out = run(&mut serve("local", local.to_str().unwrap()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a local root: {err}");
    let want =
        format!("option sharedloop.require_shared_root: the loopback root {} is LOCAL, NOT SHARED", local.display());
    assert!(err.contains(&want), "{err}");

    let mut child = serve("shared", shared.to_str().unwrap())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(h.dir.join("shared.log")).unwrap())
        .spawn()
        .unwrap();
    let sock = h.inside(Path::new("/run/shared.sock"));
    let t = std::time::Instant::now();
    while !sock.exists() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("refused a shared root ({s}): {}", fs::read_to_string(h.dir.join("shared.log")).unwrap());
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(20), "no socket");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The host's end kills it (and its namespace); reap our handle.
    drop(h);
    let _ = child.wait();
}
