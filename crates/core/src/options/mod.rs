//! Driver options, as Docker passes them (`--storage-opt key=value`).
//!
//! Every option is documented in docs/options.md and in sharedloop(8); keep
//! the three in step.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::Bytes;

pub const DEFAULT_ROOT: &str = "/var/lib/docker/loopback/root";
pub const DEFAULT_FALLBACK: &str = "/var/lib/docker/loopback/private";
pub const DEFAULT_HEARTBEAT_SECS: u64 = 30;
/// `sharedloop.claim_timeout`: how long a build claim may go unrenewed
/// before another host takes the build over (crate::claim).
pub const DEFAULT_CLAIM_TIMEOUT_SECS: u64 = 60;
pub const DEFAULT_RW_SIZE: Bytes = Bytes(10 * Bytes::GIB);

/// The filesystem inside layer images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    pub fn name(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
    /// Options for a read-only mount that never writes to the image, not
    /// even to replay a journal.
    pub fn ro_mount_data(self) -> &'static str {
        match self {
            FsType::Ext4 => "noload",
            // `nouuid`: one kernel may mount a layer's image more than
            // once (two sharedloop processes with tables of their own, each
            // mounting it), and xfs refuses a second mount of a UUID.
            FsType::Xfs => "norecovery,nouuid",
        }
    }
    /// The smallest image mkfs accepts (xfsprogs >= 5.19 refuses < 300 MiB).
    pub fn min_image_size(self) -> Bytes {
        match self {
            FsType::Ext4 => Bytes(8 * Bytes::MIB),
            FsType::Xfs => Bytes(300 * Bytes::MIB),
        }
    }
}

impl FromStr for FsType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            _ => Err(format!("{s:?} is not a supported filesystem (ext4 or xfs)")),
        }
    }
}

/// The driver configuration: everything `--storage-opt` can set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// `sharedloop.loopback_root`: preferred directory for layer images.
    pub root: PathBuf,
    /// `sharedloop.loopback_fallback`: used when root fails.
    pub fallback: PathBuf,
    /// `sharedloop.override_kernel_check`.
    pub override_kernel_check: bool,
    /// `sharedloop.fs`: filesystem of new layer images.
    pub fs: FsType,
    /// `sharedloop.size`: default size of a writable layer.
    pub rw_size: Bytes,
    /// `sharedloop.direct_io`: whether loop devices read their image files
    /// with O_DIRECT (no second copy in the page cache).
    pub direct_io: DirectIo,
    /// `sharedloop.heartbeat_interval`: how often this host says it is
    /// alive in the store (seconds).
    pub heartbeat_secs: u64,
    /// `sharedloop.verify`: what is checked of a layer image before this
    /// host first mounts it.
    pub verify: VerifyMode,
    /// `sharedloop.max_layer_size`: the largest expanded content of one
    /// layer (the sum of its regular files' apparent sizes, holes of sparse
    /// files included) that applying a layer accepts; `None`: no limit.
    #[serde(default)]
    pub max_layer_size: Option<Bytes>,
    /// `sharedloop.require_shared_root`: refuse to start when the root is
    /// local (see [`crate::placement`]).
    #[serde(default)]
    pub require_shared_root: bool,
    /// `sharedloop.claim_timeout`: seconds a build claim in the store may
    /// go unrenewed before a waiting host takes the build over.
    #[serde(default = "default_claim_timeout")]
    pub claim_timeout_secs: u64,
    /// `sharedloop.prefetch`: record what a layer's first host reads of
    /// it, and read that ahead on the others (see [`crate::prefetch`]).
    #[serde(default)]
    pub prefetch: crate::prefetch::Mode,
    /// `sharedloop.prefetch_window`: seconds after a layer's first mount
    /// during which its reads are recorded.
    #[serde(default = "default_prefetch_window")]
    pub prefetch_window_secs: u64,
    /// `sharedloop.prefetch_max`: the most bytes of a layer recorded and
    /// read ahead.
    #[serde(default = "default_prefetch_max")]
    pub prefetch_max: Bytes,
    /// `sharedloop.one_pass_build`: build ext4 layer images straight from
    /// the layer's tar (`mke2fs -d -`, e2fsprogs >= 1.47.1) instead of
    /// through a staging directory. `None`: auto (where mke2fs can).
    #[serde(default)]
    pub one_pass_build: Option<bool>,
    /// `sharedloop.writable_layers`: what a container's writable layer is
    /// when no size is asked for it: an image of `rw_size` (the default) or
    /// a directory in the home, as overlay2 keeps it.
    #[serde(default)]
    pub writable_layers: WritableLayers,
}

/// `sharedloop.writable_layers`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WritableLayers {
    /// A sparse image file of `sharedloop.size`, loop-mounted: bounded.
    #[default]
    Image,
    /// A directory in the driver's home, where the home can be an overlay
    /// upper: no loop device, no size limit; a layer created with a size
    /// is an image all the same.
    Dir,
}

impl std::str::FromStr for WritableLayers {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "image" => Ok(WritableLayers::Image),
            "dir" | "directory" => Ok(WritableLayers::Dir),
            _ => Err(format!("{s:?} is not a kind of writable layer (image or dir)")),
        }
    }
}

/// `sharedloop.prefetch_window`'s default: a container's start, with room.
pub const DEFAULT_PREFETCH_WINDOW_SECS: u64 = 30;
/// `sharedloop.prefetch_max`'s default.
pub const DEFAULT_PREFETCH_MAX: Bytes = Bytes(256 << 20);

fn default_prefetch_window() -> u64 {
    DEFAULT_PREFETCH_WINDOW_SECS
}

fn default_prefetch_max() -> Bytes {
    DEFAULT_PREFETCH_MAX
}

fn default_claim_timeout() -> u64 {
    DEFAULT_CLAIM_TIMEOUT_SECS
}

/// Direct I/O of loop devices on their image files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// On for images on local filesystems, off on network ones, where the
    /// backing file's readahead saves round trips (docs/benchmarks.md).
    #[default]
    Auto,
    On,
    Off,
}

impl DirectIo {
    /// Whether a loop device over `file` uses direct I/O.
    pub fn for_file(self, file: &std::path::Path) -> bool {
        match self {
            DirectIo::On => true,
            DirectIo::Off => false,
            DirectIo::Auto => !crate::fsmagic::is_network(file.parent().unwrap_or(file)),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DirectIo::Auto => "auto",
            DirectIo::On => "on",
            DirectIo::Off => "off",
        }
    }
}

/// What a host checks of a layer image before the kernel first mounts it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyMode {
    /// Nothing.
    Off,
    /// The image file's size, mtime and ctime against those recorded at
    /// publish, without reading it; a layer without that record (published
    /// by an older sharedloop) gets the digest check instead.
    #[default]
    Identity,
    /// The sha256 recorded at publish.
    Digest,
    /// The digest and a read-only fsck.
    Full,
}

impl std::str::FromStr for VerifyMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" | "none" | "false" => Ok(VerifyMode::Off),
            "identity" => Ok(VerifyMode::Identity),
            // `true` meant the digest check, the default it was written
            // under: an explicit setting is not silently weakened.
            "digest" | "true" => Ok(VerifyMode::Digest),
            "full" | "fsck" => Ok(VerifyMode::Full),
            _ => Err(format!("{s:?} is not a verification mode (off, identity, digest or full)")),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: DEFAULT_ROOT.into(),
            fallback: DEFAULT_FALLBACK.into(),
            override_kernel_check: false,
            fs: FsType::Ext4,
            rw_size: DEFAULT_RW_SIZE,
            direct_io: DirectIo::Auto,
            heartbeat_secs: DEFAULT_HEARTBEAT_SECS,
            claim_timeout_secs: DEFAULT_CLAIM_TIMEOUT_SECS,
            verify: VerifyMode::Identity,
            max_layer_size: None,
            require_shared_root: false,
            prefetch: crate::prefetch::Mode::Auto,
            prefetch_window_secs: DEFAULT_PREFETCH_WINDOW_SECS,
            prefetch_max: DEFAULT_PREFETCH_MAX,
            one_pass_build: None,
            writable_layers: WritableLayers::Image,
        }
    }
}

fn bad(option: &str, reason: impl Into<String>) -> Error {
    Error::Option { option: option.to_owned(), reason: reason.into() }
}

fn need<'a>(key: &str, v: Option<&'a str>) -> Result<&'a str> {
    v.ok_or_else(|| bad(key, "needs a value (key=value)"))
}

fn parse_bool(option: &str, v: &str) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "" | "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(bad(option, format!("{v:?} is not a boolean (true or false)"))),
    }
}

/// An `auto|true|false` option's value: `None` for `auto`; a bare key is
/// true.
fn parse_auto_bool(option: &str, v: Option<&str>) -> Result<Option<bool>> {
    let v = v.unwrap_or("");
    if v.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    parse_bool(option, v).map(Some).map_err(|_| bad(option, format!("{v:?} is not auto, true or false")))
}

/// A size option's value: a positive size no larger than [`Bytes::MAX`];
/// errors name the option, the value and the limit.
pub fn parse_size(option: &str, v: &str) -> Result<Bytes> {
    match Bytes::parse_size(v) {
        Ok(b) if b.0 > 0 => Ok(b),
        Ok(_) => Err(bad(option, format!("{v:?} is zero; give a size such as 10G"))),
        Err(e) => Err(bad(option, e.to_string())),
    }
}

/// A duration of at least one second, in seconds.
fn parse_positive_duration(option: &str, v: &str) -> Result<u64> {
    parse_duration(v).filter(|s| *s > 0).ok_or_else(|| bad(option, format!("{v:?} is not a duration (e.g. 30s, 5m)")))
}

fn parse_dir(option: &str, v: &str) -> Result<PathBuf> {
    if v.is_empty() {
        return Err(bad(option, "empty path"));
    }
    let p = PathBuf::from(v);
    if !p.is_absolute() {
        return Err(bad(option, format!("{v:?} is not an absolute path")));
    }
    Ok(p)
}

/// The prefix of every storage option's name (`sharedloop.fs`).
pub const PREFIX: &str = "sharedloop.";

/// One storage option: its name after [`PREFIX`] and how its value (none
/// for a bare `key`) sets the config. [`OPTIONS`] is the one list of them:
/// parsing, the unknown-option error and the documentation check (a unit
/// test against docs/options.md and man/sharedloop.8) all come from it.
pub struct OptionSpec {
    pub name: &'static str,
    set: fn(&mut Config, &str, Option<&str>) -> Result<()>,
}

/// Every storage option, in the documentation's order.
pub static OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "loopback_root",
        set: |c, k, v| {
            c.root = parse_dir(k, need(k, v)?)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "loopback_fallback",
        set: |c, k, v| {
            c.fallback = parse_dir(k, need(k, v)?)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "override_kernel_check",
        set: |c, k, v| {
            c.override_kernel_check = parse_bool(k, v.unwrap_or(""))?;
            Ok(())
        },
    },
    OptionSpec {
        name: "fs",
        set: |c, k, v| {
            c.fs = need(k, v)?.parse().map_err(|e: String| bad(k, e))?;
            Ok(())
        },
    },
    OptionSpec {
        name: "size",
        set: |c, k, v| {
            c.rw_size = parse_size(k, need(k, v)?)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "heartbeat_interval",
        set: |c, k, v| {
            c.heartbeat_secs = parse_positive_duration(k, need(k, v)?)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "direct_io",
        set: |c, k, v| {
            c.direct_io = match parse_auto_bool(k, v)? {
                None => DirectIo::Auto,
                Some(true) => DirectIo::On,
                Some(false) => DirectIo::Off,
            };
            Ok(())
        },
    },
    OptionSpec {
        name: "verify",
        set: |c, k, v| {
            c.verify = need(k, v)?.parse().map_err(|e: String| bad(k, e))?;
            Ok(())
        },
    },
    OptionSpec {
        name: "max_layer_size",
        set: |c, k, v| {
            let v = need(k, v)?;
            c.max_layer_size = match v.to_ascii_lowercase().as_str() {
                "" | "none" | "unlimited" | "0" => None,
                _ => Some(parse_size(k, v)?),
            };
            Ok(())
        },
    },
    OptionSpec {
        name: "require_shared_root",
        set: |c, k, v| {
            c.require_shared_root = parse_bool(k, v.unwrap_or(""))?;
            Ok(())
        },
    },
    OptionSpec {
        name: "claim_timeout",
        set: |c, k, v| {
            c.claim_timeout_secs = parse_positive_duration(k, need(k, v)?)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "prefetch",
        set: |c, k, v| {
            use crate::prefetch::Mode;
            c.prefetch = match parse_auto_bool(k, v)? {
                None => Mode::Auto,
                Some(true) => Mode::On,
                Some(false) => Mode::Off,
            };
            Ok(())
        },
    },
    OptionSpec {
        name: "prefetch_window",
        set: |c, k, v| {
            let secs = parse_positive_duration(k, need(k, v)?)?;
            if secs > 86_400 {
                return Err(bad(k, format!("{secs}s is longer than a day; a container's start is shorter")));
            }
            c.prefetch_window_secs = secs;
            Ok(())
        },
    },
    OptionSpec {
        name: "writable_layers",
        set: |c, k, v| {
            c.writable_layers = need(k, v)?.parse().map_err(|e: String| bad(k, e))?;
            Ok(())
        },
    },
    OptionSpec {
        name: "one_pass_build",
        set: |c, k, v| {
            c.one_pass_build = parse_auto_bool(k, v)?;
            Ok(())
        },
    },
    OptionSpec {
        name: "prefetch_max",
        set: |c, k, v| {
            let v = need(k, v)?;
            c.prefetch_max = if v == "0" { Bytes(0) } else { parse_size(k, v)? };
            Ok(())
        },
    },
];

/// The known options' full names, for errors: `sharedloop.loopback_root, ...`.
pub fn known_options() -> String {
    OPTIONS.iter().map(|o| format!("{PREFIX}{}", o.name)).collect::<Vec<_>>().join(", ")
}

impl Config {
    /// Parses Docker's option strings. Keys are case-insensitive, as in
    /// Docker's own drivers; `sharedloop.override_kernel_check` alone means
    /// true. Unknown keys and bad values are errors naming the option.
    pub fn from_opts<S: AsRef<str>>(opts: &[S]) -> Result<Config> {
        let mut c = Config::default();
        for opt in opts {
            let opt = opt.as_ref().trim();
            match opt.split_once('=') {
                Some((k, v)) => c.set(k, Some(v))?,
                None => c.set(opt, None)?,
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Sets one option by its full name (`sharedloop.fs`, any case) to
    /// `val` (trimmed; `None` for a bare key, which a boolean takes as
    /// true). Call [`Config::validate`] once all are set.
    pub fn set(&mut self, key: &str, val: Option<&str>) -> Result<()> {
        let key = key.trim().to_ascii_lowercase();
        let spec = key
            .strip_prefix(PREFIX)
            .and_then(|name| OPTIONS.iter().find(|o| o.name == name))
            .ok_or_else(|| bad(&key, format!("unknown option; known: {}", known_options())))?;
        (spec.set)(self, &key, val.map(str::trim))
    }

    /// The prefetch options (`sharedloop.prefetch*`).
    pub fn prefetch_settings(&self) -> crate::prefetch::Settings {
        crate::prefetch::Settings {
            mode: self.prefetch,
            window: std::time::Duration::from_secs(self.prefetch_window_secs),
            max_bytes: self.prefetch_max.0,
        }
    }

    /// The checks across options, after every option is set.
    pub fn validate(&self) -> Result<()> {
        if self.root == self.fallback {
            return Err(bad("sharedloop.loopback_fallback", "must differ from sharedloop.loopback_root"));
        }
        Ok(())
    }

    /// Checks that the running kernel has what sharedloop uses, by
    /// probing each feature (crate::probe), unless the check is
    /// overridden (`sharedloop.override_kernel_check`). The error names
    /// the missing feature.
    pub fn check_kernel(&self) -> Result<()> {
        if self.override_kernel_check {
            return Ok(());
        }
        match crate::probe::missing_required() {
            None => Ok(()),
            Some((feature, detail)) => Err(Error::KernelTooOld {
                release: rustix::system::uname().release().to_string_lossy().into_owned(),
                feature: feature.to_owned(),
                detail,
            }),
        }
    }
}

/// `90`, `90s`, `5m`, `2h`, `1d` -> seconds.
pub fn parse_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests;
