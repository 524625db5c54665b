//! `sharedloop doctor`: checks what sharedloop needs on this host, one line
//! per check: `ok   <check>: <detail>`, `warn <check>: <detail> — <fix>`
//! or `FAIL <check>: <detail> — <fix>`. Exit status 0 when nothing fails
//! (the host can serve), 1 otherwise, 2 for usage errors.
//!
//! A missing or unwritable root is a warning, not a failure: the spec
//! sends new layers to the fallback directory then, and the host serves.
//! An unusable fallback is a failure.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use sharedloop_core::mount::MountEntry;
use sharedloop_core::options::{FsType, VerifyMode};
use sharedloop_core::placement::check_root;
use sharedloop_core::probe::{self, Probe};
use sharedloop_core::store::{now_unix, HostRecord, Location};
use sharedloop_core::sys::loopdev;
use sharedloop_core::{fsmagic, Config};

use crate::admin::{StoreArgs, Usage};

#[derive(clap::Args, Debug, Clone)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub store: StoreArgs,
    /// sharedloop's config file (`serve --config`): socket paths, socket
    /// group and the snapshotter's options.
    #[arg(long, default_value = crate::serve::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// containerd's config file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub containerd_config: PathBuf,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub check: String,
    pub status: Status,
    pub detail: String,
    pub fix: String,
}

impl Check {
    fn ok(check: &str, detail: impl Into<String>) -> Check {
        Check { check: check.into(), status: Status::Ok, detail: detail.into(), fix: String::new() }
    }
    fn warn(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { check: check.into(), status: Status::Warn, detail: detail.into(), fix: fix.into() }
    }
    fn fail(check: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check { check: check.into(), status: Status::Fail, detail: detail.into(), fix: fix.into() }
    }

    /// The text line.
    pub fn line(&self) -> String {
        let tag = match self.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        if self.fix.is_empty() {
            format!("{tag} {}: {}", self.check, self.detail)
        } else {
            format!("{tag} {}: {} — {}", self.check, self.detail, self.fix)
        }
    }
}

pub fn doctor(args: &DoctorArgs) -> anyhow::Result<i32> {
    let plan = match crate::serve::plan_for_config(&args.config) {
        Ok(p) => p,
        Err(e) => return Err(Usage(format!("{e:#}")).into()),
    };
    // The snapshotter's options when it is configured and dockerd's Init
    // options are not recorded; then the flags.
    let base = match (&plan.containerd, args.store.has_init_record()) {
        (Some((_, _, cfg)), false) => cfg.clone(),
        _ => Config::default(),
    };
    let cfg = args.store.config_over(base)?;
    let mut checks = Vec::new();
    kernel(&mut checks, &cfg);
    loop_devices(&mut checks);
    filesystem_tools(&mut checks, &cfg);
    one_pass_tool(&mut checks, &cfg);
    directories(&mut checks, &cfg, args.store.docker_home().as_deref());
    clock(&mut checks, &cfg);
    docker(&mut checks);
    let snap_sock =
        plan.containerd.as_ref().map(|c| c.0.clone()).unwrap_or_else(|| crate::serve::DEFAULT_CONTAINERD_SOCKET.into());
    containerd(&mut checks, &args.containerd_config, &snap_sock, plan.containerd.is_some());
    let expected_mode = if plan.socket_gid.is_some() { 0o660 } else { 0o600 };
    let running = server_running();
    if let Some(s) = &plan.docker {
        checks.push(socket("docker plugin socket", s, expected_mode, running));
    }
    checks.push(socket("snapshotter socket", &snap_sock, expected_mode, running && plan.containerd.is_some()));

    if args.store.json {
        println!("{}", serde_json::to_string_pretty(&checks).expect("serialises"));
    } else {
        for c in &checks {
            println!("{}", c.line());
        }
    }
    Ok(if checks.iter().any(|c| c.status == Status::Fail) { 1 } else { 0 })
}

const OVERRIDE: &str = "upgrade the kernel (or set sharedloop.override_kernel_check=true to start anyway)";

fn kernel(out: &mut Vec<Check>, cfg: &Config) {
    out.push(match probe::openat2_beneath() {
        Probe::Present(d) => Check::ok("kernel openat2", d),
        Probe::Missing(d) => Check::fail("kernel openat2", d, OVERRIDE),
        Probe::Unknown(d) => Check::warn("kernel openat2", d, "check that the kernel has openat2 (Linux 5.6+)"),
    });
    out.push(if !Path::new("/dev/loop-control").exists() {
        Check::warn(
            "kernel LOOP_CONFIGURE",
            "not probed: no /dev/loop-control (see loop devices)",
            "make loop devices available, then run doctor again",
        )
    } else {
        match probe::loop_attach() {
            Probe::Present(d) => Check::ok("kernel LOOP_CONFIGURE", d),
            Probe::Missing(d) => Check::fail("kernel LOOP_CONFIGURE", d, OVERRIDE),
            Probe::Unknown(d) => Check::warn(
                "kernel LOOP_CONFIGURE",
                d,
                "check that loop devices can be attached (losetup -f --show a file)",
            ),
        }
    });
    match probe::overlay_present() {
        Probe::Missing(d) => {
            out.push(Check::fail("kernel overlayfs", d, "modprobe overlay, or use a kernel with CONFIG_OVERLAY_FS"))
        }
        p => {
            out.push(Check::ok("kernel overlayfs", p.detail()));
            out.push(match probe::overlay_lowerdir_plus() {
                Probe::Present(d) => Check::ok("kernel overlayfs lowerdir+", d),
                Probe::Missing(d) => Check::warn(
                    "kernel overlayfs lowerdir+",
                    d,
                    "images of many layers need Linux 6.7+; smaller stacks work",
                ),
                Probe::Unknown(d) => {
                    Check::warn("kernel overlayfs lowerdir+", d, "check that overlay mounts work on this host")
                }
            });
        }
    }
    let fs = cfg.fs.name();
    let name = format!("kernel {fs}");
    out.push(match probe::filesystem(fs) {
        Probe::Present(d) => Check::ok(&name, d),
        Probe::Missing(d) => {
            Check::fail(&name, d, format!("load the {fs} module (modprobe {fs}) or set sharedloop.fs"))
        }
        Probe::Unknown(d) => Check::warn(&name, d, format!("make sure the kernel can mount {fs}")),
    });
}

fn loop_devices(out: &mut Vec<Check>) {
    const C: &str = "loop devices";
    let ctl = Path::new("/dev/loop-control");
    match std::fs::metadata(ctl) {
        Ok(m) if m.file_type().is_char_device() => {}
        Ok(_) => {
            out.push(Check::fail(
                C,
                "/dev/loop-control is not a character device",
                "recreate it: mknod /dev/loop-control c 10 237",
            ));
            return;
        }
        Err(e) => {
            out.push(Check::fail(
                C,
                format!("no /dev/loop-control ({e})"),
                "load the loop module (modprobe loop); in a container, give it /dev/loop-control and the /dev/loopN devices (privileged, or --device)",
            ));
            return;
        }
    }
    let attached = loopdev::list().len();
    // max_loop is how many devices the module made at load; since Linux
    // 3.1 /dev/loop-control makes more on demand. Whether one is to be had
    // is what GET_FREE says.
    let max = std::fs::read_to_string("/sys/module/loop/parameters/max_loop")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let limit = if max == 0 { "max_loop=0".to_owned() } else { format!("max_loop={max}") };
    out.push(match loopdev::get_free() {
        Ok(n) => Check::ok(C, format!("/dev/loop-control present; {attached} attached ({limit}); /dev/loop{n} free")),
        Err(e) => Check::fail(
            C,
            format!("no free loop device: LOOP_CTL_GET_FREE failed ({e}); {attached} attached ({limit})"),
            "detach unused devices (losetup -D), or raise the limit (loop.max_loop=0 on the kernel command line)",
        ),
    });
}

/// The directories of `PATH` that hold `prog`.
fn in_path(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn filesystem_tools(out: &mut Vec<Check>, cfg: &Config) {
    let (mkfs, check) = match cfg.fs {
        FsType::Ext4 => ("mkfs.ext4", "e2fsck"),
        FsType::Xfs => ("mkfs.xfs", "xfs_repair"),
    };
    let pkg = match cfg.fs {
        FsType::Ext4 => "e2fsprogs",
        FsType::Xfs => "xfsprogs",
    };
    let fs = cfg.fs.name();
    out.push(match in_path(mkfs) {
        Some(p) => Check::ok(&format!("tools {mkfs}"), p.display().to_string()),
        None => Check::fail(
            &format!("tools {mkfs}"),
            format!("{mkfs} not in PATH (sharedloop.fs={fs} builds layer images with it)"),
            format!("install {pkg}"),
        ),
    });
    let name = format!("tools {check}");
    out.push(match (in_path(check), cfg.verify) {
        (Some(p), _) => Check::ok(&name, p.display().to_string()),
        (None, VerifyMode::Full) => Check::fail(
            &name,
            format!("{check} not in PATH (sharedloop.verify=full checks images with it)"),
            format!("install {pkg}"),
        ),
        (None, _) => Check::warn(
            &name,
            format!("{check} not in PATH (`sharedloop verify` and sharedloop.verify=full need it)"),
            format!("install {pkg}"),
        ),
    });
}

/// Whether ext4 layer images can be built in one pass from their tar
/// (`sharedloop.one_pass_build`): mke2fs >= 1.47.1 with libarchive.
fn one_pass_tool(out: &mut Vec<Check>, cfg: &Config) {
    let name = "tools one-pass build";
    if cfg.fs != FsType::Ext4 && cfg.one_pass_build == Some(true) {
        out.push(Check::fail(
            name,
            "sharedloop.one_pass_build=true with sharedloop.fs=xfs: the driver refuses to start",
            "one-pass builds make ext4 images: drop one_pass_build=true or use fs=ext4",
        ));
        return;
    }
    if cfg.fs != FsType::Ext4 || cfg.one_pass_build == Some(false) {
        out.push(Check::ok(name, "not used (sharedloop.fs=xfs or one_pass_build=false): layers are built staged"));
        return;
    }
    let hint = "install e2fsprogs >= 1.47.1 and libarchive13 (Debian 12: from bookworm-backports, as scripts/install-deps does)";
    out.push(match sharedloop_core::image::one_pass_tool(&std::env::temp_dir()) {
        Ok(tool) => Check::ok(name, tool),
        Err(why) if cfg.one_pass_build == Some(true) => {
            Check::fail(name, format!("{why} (sharedloop.one_pass_build=true refuses to start)"), hint)
        }
        Err(why) => Check::warn(name, format!("{why}: layers are built through a staging directory"), hint),
    });
}

/// Writes and removes a file of 64 KiB in `dir` (as the store's own
/// probe does: a full filesystem still takes empty files).
fn write_probe(dir: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let p = dir.join(format!(".sharedloop-doctor-{}", std::process::id()));
    let r = std::fs::File::create(&p).and_then(|mut f| f.write_all(&[0u8; 65536]).and_then(|_| f.sync_all()));
    let _ = std::fs::remove_file(&p);
    r
}

fn directories(out: &mut Vec<Check>, cfg: &Config, home: Option<&Path>) {
    let store = sharedloop_core::store::Store::new(cfg, "doctor");
    let fallback = cfg.fallback.display().to_string();
    // Root.
    let root = &cfg.root;
    if !root.is_dir() {
        out.push(Check::warn(
            "root",
            format!("{} does not exist: new layers go to fallback ({fallback}) and are not shared", root.display()),
            "mount the shared filesystem there (and mkdir it), or set sharedloop.loopback_root",
        ));
    } else {
        let fsname = fsmagic::fs_name_of(root);
        match store.root_problem() {
            Some(why) => out.push(Check::warn(
                "root",
                format!(
                    "{} ({fsname}) cannot take new layers ({why}): they go to fallback ({fallback})",
                    root.display()
                ),
                "make root writable by this host's root user (no root squash, not read-only, free space)",
            )),
            None => out.push(Check::ok("root", format!("{} writable, {fsname}", root.display()))),
        }
        let p = check_root(root, home);
        out.push(if p.is_local() {
            let d = p.describe();
            if cfg.require_shared_root {
                Check::fail(
                    "root placement",
                    d,
                    "mount the shared filesystem on root (sharedloop.require_shared_root refuses to start)",
                )
            } else {
                Check::warn("root placement", d, "mount the shared filesystem on root")
            }
        } else {
            Check::ok("root placement", p.describe())
        });
        mount_options(out, root);
    }
    // Fallback.
    let fb = &cfg.fallback;
    if fb.is_dir() {
        let fsname = fsmagic::fs_name_of(fb);
        out.push(match write_probe(fb) {
            Ok(()) => Check::ok("fallback", format!("{} writable, {fsname}", fb.display())),
            Err(e) => Check::fail(
                "fallback",
                format!("{} ({fsname}) is not writable: {e}", fb.display()),
                "the fallback must be a writable local directory: new layers go there when root cannot take them",
            ),
        });
    } else {
        // Created at start; its nearest existing parent must take it.
        let parent = fb.ancestors().skip(1).find(|a| a.is_dir()).unwrap_or(Path::new("/"));
        out.push(match write_probe(parent) {
            Ok(()) => Check::ok("fallback", format!("{} does not exist yet (created at start)", fb.display())),
            Err(e) => Check::fail(
                "fallback",
                format!("{} does not exist and {} is not writable: {e}", fb.display(), parent.display()),
                "create the fallback directory on a writable local filesystem",
            ),
        });
    }
}

/// What in an NFS mount's options works against the store: warnings, each
/// a (problem, fix). Other filesystems: none.
pub fn nfs_option_problems(m: &MountEntry) -> Vec<(String, String)> {
    if !m.fs_type.starts_with("nfs") {
        return Vec::new();
    }
    let mut v = Vec::new();
    let opt = |k: &str| {
        m.options.iter().find_map(|o| match o.split_once('=') {
            Some((a, b)) if a == k => Some(b.to_owned()),
            None if o == k => Some(String::new()),
            _ => None,
        })
    };
    if let Some(l) = opt("local_lock") {
        if l != "none" {
            v.push((
                format!("local_lock={l}: locks are node-local, other hosts do not see them"),
                "mount with local_lock=none (docs/multi-host.md)".to_owned(),
            ));
        }
    }
    if opt("noac").is_some() {
        v.push((
            "noac: every attribute read is a round trip to the server".to_owned(),
            "drop noac; layers never change after publish, the defaults are fine (docs/multi-host.md)".to_owned(),
        ));
    }
    match opt("lookupcache").as_deref() {
        Some("positive") | Some("pos") | Some("none") => {}
        other => v.push((
            format!(
                "lookupcache={}: a host may cache \"no such layer\" for up to acdirmax after another host published it",
                other.unwrap_or("all (default)")
            ),
            "mount with lookupcache=positive (or none) (docs/multi-host.md)".to_owned(),
        )),
    }
    if opt("soft").is_some() {
        v.push((
            "soft: a server hiccup becomes I/O errors inside containers".to_owned(),
            "mount with hard (docs/multi-host.md)".to_owned(),
        ));
    }
    v
}

fn mount_of(p: &Path, mounts: &[MountEntry]) -> Option<MountEntry> {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    if let Ok(st) = statx(CWD, p, AtFlags::NO_AUTOMOUNT, StatxFlags::MNT_ID) {
        if st.stx_mask & StatxFlags::MNT_ID.bits() != 0 {
            if let Some(m) = mounts.iter().find(|m| m.mount_id == st.stx_mnt_id) {
                return Some(m.clone());
            }
        }
    }
    mounts.iter().filter(|m| p.starts_with(&m.mount_point)).max_by_key(|m| m.mount_point.as_os_str().len()).cloned()
}

fn mount_options(out: &mut Vec<Check>, root: &Path) {
    const C: &str = "root mount options";
    let mounts =
        sharedloop_core::mount::parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let Some(m) = mount_of(root, &mounts) else {
        out.push(Check::warn(C, "the mount holding root is not in /proc/self/mountinfo", "check how root is mounted"));
        return;
    };
    let problems = nfs_option_problems(&m);
    if problems.is_empty() {
        out.push(Check::ok(C, format!("{} on {} ({})", m.fs_type, m.mount_point.display(), m.source)));
    }
    for (what, fix) in problems {
        out.push(Check::warn(C, format!("{} on {}: {what}", m.fs_type, m.mount_point.display()), fix));
    }
}

/// How far ahead a heartbeat may be before it counts as clock skew.
const SKEW_TOLERANCE_SECS: u64 = 10;
/// A host whose heartbeat is older than this counts as dead (as `status`).
const LIVE_SECS: u64 = 300;

/// Clock checks against other hosts' heartbeats at `now`: (status, text).
pub fn clock_findings(records: &[HostRecord], own_hostname: &str, now: u64) -> Vec<(Status, String)> {
    let others: Vec<&HostRecord> = records.iter().filter(|h| h.hostname != own_hostname).collect();
    if others.is_empty() {
        return vec![(Status::Ok, "no other hosts".into())];
    }
    let mut v = Vec::new();
    for h in &others {
        if h.heartbeat_unix > now + SKEW_TOLERANCE_SECS {
            v.push((
                Status::Warn,
                format!(
                    "host {} ({}) wrote a heartbeat {}s in the future: its clock or this one is off",
                    h.hostname,
                    h.host_id,
                    h.heartbeat_unix - now
                ),
            ));
        }
    }
    if let Some(newest) = others.iter().max_by_key(|h| h.heartbeat_unix) {
        let age = now.saturating_sub(newest.heartbeat_unix);
        let due = 2 * newest.interval_secs.max(1) + SKEW_TOLERANCE_SECS;
        if age > due && age <= LIVE_SECS {
            v.push((
                Status::Warn,
                format!(
                    "the newest heartbeat of another host ({} , every {}s) is {age}s old: this clock may be ahead, or that host stalled",
                    newest.hostname, newest.interval_secs
                ),
            ));
        }
    }
    if v.is_empty() {
        let live = others.iter().filter(|h| now.saturating_sub(h.heartbeat_unix) <= LIVE_SECS).count();
        v.push((Status::Ok, format!("{} other host records ({live} live), heartbeats consistent", others.len())));
    }
    v
}

fn clock(out: &mut Vec<Check>, cfg: &Config) {
    let store = sharedloop_core::store::Store::new(cfg, "doctor");
    let mut records = store.hosts(Location::Root);
    records.extend(store.hosts(Location::Fallback));
    let me = rustix::system::uname().nodename().to_string_lossy().into_owned();
    for (s, d) in clock_findings(&records, &me, now_unix()) {
        out.push(match s {
            Status::Ok => Check::ok("clock", d),
            _ => Check::warn(
                "clock",
                d,
                "synchronise the hosts' clocks (chrony or systemd-timesyncd against one NTP source)",
            ),
        });
    }
}

/// `docker info` output: `version|driver|driver-status-json`.
pub fn docker_finding(info: &str) -> Check {
    const C: &str = "docker";
    let mut parts = info.trim().splitn(3, '|');
    let (version, driver, status) =
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
    let snapshotter = status.contains("io.containerd.snapshotter");
    if driver != "sharedloop" {
        return Check::ok(C, format!("Docker {version}, storage driver {driver} (not sharedloop)"));
    }
    if snapshotter {
        return Check::ok(C, format!("Docker {version} uses the sharedloop snapshotter through containerd"));
    }
    if major >= 28 {
        return Check::fail(
            C,
            format!("Docker {version} with storage-driver sharedloop: Docker 28+ loads no graphdriver plugins"),
            "use the containerd image store (\"features\": {\"containerd-snapshotter\": true}, docs/containerd.md)",
        );
    }
    Check::ok(C, format!("Docker {version}, graphdriver plugin sharedloop"))
}

fn docker(out: &mut Vec<Check>) {
    const C: &str = "docker";
    let sock = ["/run/docker.sock", "/var/run/docker.sock"].into_iter().find(|s| Path::new(s).exists());
    if in_path("docker").is_none() || sock.is_none() {
        out.push(Check::ok(C, "no docker CLI or daemon socket: skipped"));
        return;
    }
    let r = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}|{{.Driver}}|{{json .DriverStatus}}"])
        .stdin(std::process::Stdio::null())
        .output();
    out.push(match r {
        Ok(o) if o.status.success() => docker_finding(&String::from_utf8_lossy(&o.stdout)),
        Ok(o) => Check::warn(
            C,
            format!("docker info failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
            "check that dockerd runs (systemctl status docker)",
        ),
        Err(e) => Check::warn(C, format!("cannot run docker: {e}"), "check the docker CLI"),
    });
}

/// containerd's config as it concerns sharedloop: (status, detail, fix).
/// `major` is containerd's major version (from `containerd --version`).
pub fn containerd_findings(text: &str, socket: &Path, major: Option<u32>, wanted: bool) -> Vec<Check> {
    const C: &str = "containerd";
    let doc: toml::Value = match toml::from_str(text) {
        Ok(d) => d,
        Err(e) => return vec![Check::fail(C, format!("config.toml does not parse: {e}"), "fix the file")],
    };
    let missing = |d: String, f: &str| if wanted { Check::fail(C, d, f) } else { Check::warn(C, d, f) };
    let plugin = doc.get("proxy_plugins").and_then(|p| p.get("sharedloop"));
    let Some(plugin) = plugin else {
        return vec![missing(
            "no [proxy_plugins.sharedloop]: containerd does not know the snapshotter".into(),
            "add [proxy_plugins.sharedloop] type = \"snapshot\" with the socket's address (docs/containerd.md), restart containerd",
        )];
    };
    let mut v = Vec::new();
    let ty = plugin.get("type").and_then(|t| t.as_str()).unwrap_or("");
    let addr = plugin.get("address").and_then(|t| t.as_str()).unwrap_or("");
    if ty != "snapshot" {
        v.push(Check::fail(C, format!("proxy_plugins.sharedloop type = {ty:?}"), "set type = \"snapshot\""));
    }
    if Path::new(addr) != socket {
        v.push(Check::fail(
            C,
            format!("proxy_plugins.sharedloop address = {addr:?}, but sharedloop serves {}", socket.display()),
            format!(
                "set address = \"{}\" (or serve's --containerd-socket to match), restart containerd",
                socket.display()
            ),
        ));
    }
    if major.is_some_and(|m| m >= 2) {
        let unpack = doc
            .get("plugins")
            .and_then(|p| p.get("io.containerd.transfer.v1.local"))
            .and_then(|t| t.get("unpack_config"))
            .and_then(|u| u.as_array())
            .is_some_and(|a| a.iter().any(|e| e.get("snapshotter").and_then(|s| s.as_str()) == Some("sharedloop")));
        if !unpack {
            v.push(Check::warn(
                C,
                "containerd 2.x: no unpack_config of the transfer service names sharedloop; pulls through it (ctr 2.x, Docker 29) unpack with the default snapshotter".to_owned(),
                "add to [plugins.\"io.containerd.transfer.v1.local\"] unpack_config = [{ platform = \"linux/amd64\", snapshotter = \"sharedloop\" }]",
            ));
        }
    }
    if v.is_empty() {
        v.push(Check::ok(C, format!("proxy_plugins.sharedloop -> {addr}")));
    }
    v
}

fn containerd(out: &mut Vec<Check>, config: &Path, socket: &Path, wanted: bool) {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            out.push(if wanted {
                Check::fail(
                    "containerd",
                    format!("the snapshotter is enabled but {} does not exist", config.display()),
                    "add the proxy_plugins entry to containerd's config (docs/containerd.md)",
                )
            } else {
                Check::ok("containerd", format!("no {}: skipped", config.display()))
            });
            return;
        }
        Err(e) => {
            out.push(Check::warn("containerd", format!("cannot read {}: {e}", config.display()), "check the file"));
            return;
        }
    };
    let major = Command::new("containerd").arg("--version").output().ok().and_then(|o| {
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        s.split_whitespace()
            .find_map(|w| w.strip_prefix('v').and_then(|v| v.split('.').next()).and_then(|m| m.parse().ok()))
    });
    out.extend(containerd_findings(&text, socket, major, wanted));
}

/// Whether a `sharedloop serve` runs in this PID namespace.
fn server_running() -> bool {
    let Ok(rd) = std::fs::read_dir("/proc") else { return false };
    rd.flatten().any(|e| {
        std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
            let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"sharedloop")) && args.iter().any(|a| *a == b"serve")
        })
    })
}

/// A socket's check: `expected` mode; `must` when a server should have made it.
pub fn socket(name: &str, path: &Path, expected: u32, must: bool) -> Check {
    let md = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(_) if must => {
            return Check::fail(
                name,
                format!("{} does not exist though sharedloop serve runs", path.display()),
                "check serve's log (journalctl -u sharedloop) and its socket options",
            )
        }
        Err(_) => return Check::ok(name, format!("{} absent (no server running)", path.display())),
    };
    if !md.file_type().is_socket() {
        return Check::fail(
            name,
            format!("{} is not a socket", path.display()),
            "remove it and restart sharedloop serve",
        );
    }
    let mode = md.permissions().mode() & 0o7777;
    if md.uid() != 0 {
        return Check::fail(
            name,
            format!("{} is owned by uid {}, not root", path.display(), md.uid()),
            "restart sharedloop serve as root (it creates its sockets)",
        );
    }
    if mode & 0o007 != 0 || mode & !expected & 0o777 != 0 {
        return Check::fail(
            name,
            format!(
                "{} has mode {mode:04o}: users beyond root{} can drive the storage driver",
                path.display(),
                if expected == 0o660 { " and the socket group" } else { "" }
            ),
            format!("chmod {expected:04o} {} (serve sets {expected:04o}; something changed it)", path.display()),
        );
    }
    Check::ok(name, format!("{} socket, mode {mode:04o}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MI: &str = "\
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
120 29 0:52 / /shared/store rw,relatime shared:60 - nfs4 srv:/export/layers rw,vers=4.2,rsize=1048576,hard,proto=tcp,local_lock=none,lookupcache=pos,addr=10.0.0.1
121 29 0:53 / /shared/soft\\040dir rw,relatime - nfs srv:/x rw,vers=3,soft,noac,local_lock=all,addr=10.0.0.1
";

    #[test]
    fn mountinfo_options_parse() {
        let m = sharedloop_core::mount::parse_mountinfo(MI);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].mount_id, 120);
        assert_eq!(m[1].fs_type, "nfs4");
        assert_eq!(m[1].source, "srv:/export/layers");
        assert!(m[1].options.contains(&"relatime".to_owned()) && m[1].options.contains(&"lookupcache=pos".to_owned()));
        assert_eq!(m[2].mount_point, PathBuf::from("/shared/soft dir"));
        assert!(nfs_option_problems(&m[0]).is_empty(), "not NFS");
        assert!(nfs_option_problems(&m[1]).is_empty(), "{:?}", nfs_option_problems(&m[1]));
        let p: Vec<String> = nfs_option_problems(&m[2]).into_iter().map(|p| p.0).collect();
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("local_lock=all"), "{p:?}");
        assert!(p[1].starts_with("noac") && p[2].starts_with("lookupcache=all") && p[3].starts_with("soft"), "{p:?}");
    }

    fn rec(name: &str, at: u64, every: u64) -> HostRecord {
        HostRecord { host_id: format!("{name}-1"), hostname: name.into(), heartbeat_unix: at, interval_secs: every }
    }

    #[test]
    fn clock_skew_is_seen_both_ways() {
        let now = 1_000_000;
        assert_eq!(clock_findings(&[rec("me", now, 30)], "me", now), vec![(Status::Ok, "no other hosts".into())]);
        let f = clock_findings(&[rec("b", now + 3600, 30), rec("c", now - 5, 30)], "me", now);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(f[0].0 == Status::Warn && f[0].1.contains("host b") && f[0].1.contains("3600s in the future"), "{f:?}");
        let f = clock_findings(&[rec("b", now - 200, 30)], "me", now);
        assert!(f[0].0 == Status::Warn && f[0].1.contains("200s old"), "{f:?}");
        let f = clock_findings(&[rec("b", now - 20, 30), rec("d", now - 9000, 30)], "me", now);
        assert_eq!(f[0].0, Status::Ok, "{f:?}");
        assert!(f[0].1.contains("1 live"), "{f:?}");
    }

    #[test]
    fn containerd_config_detection() {
        let sock = Path::new("/run/sharedloop/containerd.sock");
        let good = "version = 2\n[proxy_plugins]\n  [proxy_plugins.sharedloop]\n    type = \"snapshot\"\n    address = \"/run/sharedloop/containerd.sock\"\n";
        let f = containerd_findings(good, sock, Some(1), true);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].status, Status::Ok, "{f:?}");
        let f = containerd_findings(good, sock, Some(2), true);
        assert!(f[0].status == Status::Warn && f[0].detail.contains("unpack_config"), "{f:?}");
        let v2 = format!(
            "{good}[plugins.\"io.containerd.transfer.v1.local\"]\n  unpack_config = [{{ platform = \"linux/amd64\", snapshotter = \"sharedloop\" }}]\n"
        );
        assert_eq!(containerd_findings(&v2, sock, Some(2), true)[0].status, Status::Ok);
        let f = containerd_findings(&good.replace("containerd.sock", "other.sock"), sock, Some(1), true);
        assert!(f[0].status == Status::Fail && f[0].detail.contains("other.sock"), "{f:?}");
        let f = containerd_findings("version = 2\n", sock, None, false);
        assert!(f[0].status == Status::Warn && f[0].detail.contains("no [proxy_plugins.sharedloop]"), "{f:?}");
        assert_eq!(containerd_findings("version = 2\n", sock, None, true)[0].status, Status::Fail);
        assert_eq!(containerd_findings("[[[", sock, None, true)[0].status, Status::Fail);
    }

    #[test]
    fn docker_versions() {
        assert_eq!(docker_finding("27.5.1|sharedloop|null").status, Status::Ok);
        let f = docker_finding("28.0.1|sharedloop|[[\"Backing Filesystem\",\"extfs\"]]");
        assert!(f.status == Status::Fail && f.detail.contains("Docker 28+ loads no graphdriver plugins"), "{f:?}");
        assert_eq!(
            docker_finding("29.0.0|sharedloop|[[\"driver-type\",\"io.containerd.snapshotter.v1\"]]").status,
            Status::Ok
        );
        assert_eq!(docker_finding("29.0.0|overlay2|null").status, Status::Ok);
    }

    #[test]
    fn lines() {
        assert_eq!(Check::ok("a", "b").line(), "ok   a: b");
        assert_eq!(Check::fail("a", "b", "c").line(), "FAIL a: b — c");
        assert_eq!(Check::warn("a", "b", "c").line(), "warn a: b — c");
    }
}
