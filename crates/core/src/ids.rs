//! Identifiers and sizes as newtypes, so a diff id is never passed where a
//! chain id is expected.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// A `sha256:<hex>` digest of the uncompressed layer tar (OCI "DiffID").
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DiffId(String);

/// The content key of a layer in the store: the OCI "ChainID".
///
/// For the bottom layer it equals its diff id; above that it is
/// `sha256(parent_chain_id + " " + diff_id)`, exactly as the OCI image spec
/// defines, so two hosts that apply the same stack agree on every name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChainId(String);

fn valid_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

impl DiffId {
    pub fn from_sha256(hash: &[u8]) -> Self {
        DiffId(format!("sha256:{}", hex::encode(hash)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ChainId {
    /// Parses `sha256:<64 hex>`; anything else is refused, since the value
    /// becomes a directory name in a shared store.
    pub fn parse(s: &str) -> Option<Self> {
        valid_digest(s).then(|| ChainId(s.to_owned()))
    }

    /// The chain id of a layer with diff id `diff` on top of `parent`.
    pub fn of(parent: Option<&ChainId>, diff: &DiffId) -> Self {
        match parent {
            None => ChainId(diff.0.clone()),
            Some(p) => {
                let mut h = Sha256::new();
                h.update(p.0.as_bytes());
                h.update(b" ");
                h.update(diff.0.as_bytes());
                ChainId(format!("sha256:{}", hex::encode(h.finalize())))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory name used in the store (`sha256-<hex>`: no colon, which
    /// some network filesystems and tools handle badly).
    pub fn dir_name(&self) -> String {
        self.0.replacen(':', "-", 1)
    }

    pub fn from_dir_name(name: &str) -> Option<Self> {
        Self::parse(&name.replacen('-', ":", 1))
    }

    /// A short form for logs and mount paths.
    pub fn short(&self) -> &str {
        &self.0[7..19]
    }
}

impl fmt::Display for ChainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for DiffId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct Bytes(pub u64);

impl Bytes {
    pub const KIB: u64 = 1024;
    pub const MIB: u64 = 1024 * 1024;
    pub const GIB: u64 = 1024 * 1024 * 1024;

    pub const TIB: u64 = 1024 * Self::GIB;
    pub const PIB: u64 = 1024 * Self::TIB;
    pub const EIB: u64 = 1024 * Self::PIB;
    /// The largest size a file can have on Linux (`off_t` is signed 64-bit):
    /// no image, and so no size option, can be larger.
    pub const MAX: Bytes = Bytes(i64::MAX as u64);

    /// Parses sizes the way Docker's `--storage-opt size=` does: a number
    /// with an optional unit (b, k, kb, kib, m, mb, mib, g, ..., t),
    /// units in powers of 1024, case-insensitive. `None` for anything
    /// [`Bytes::parse_size`] refuses.
    pub fn parse(s: &str) -> Option<Bytes> {
        Self::parse_size(s).ok()
    }

    /// [`Bytes::parse`], saying why a value is refused: not a size, or more
    /// than [`Bytes::MAX`].
    pub fn parse_size(s: &str) -> Result<Bytes, SizeError> {
        let not = || SizeError::NotASize(s.to_owned());
        let t = s.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num.parse().map_err(|_| not())?;
        if !num.is_finite() || num < 0.0 {
            return Err(not());
        }
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "m" | "mb" | "mib" => Self::MIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::TIB,
            _ => return Err(not()),
        };
        let v = num * mult as f64;
        // i64::MAX is not exact as an f64 (it rounds up to 2^63): compare
        // below that, so the cast cannot saturate past the limit.
        if v >= Self::MAX.0 as f64 {
            return Err(SizeError::TooLarge { value: s.to_owned(), max: Self::MAX });
        }
        Ok(Bytes(v as u64))
    }
}

/// Why a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{0:?} is not a size (a number with an optional unit b, k, m, g or t, e.g. 10G)")]
    NotASize(String),
    #[error("{value:?} is more than the largest size a file can have, {max} ({} bytes)", max.0)]
    TooLarge { value: String, max: Bytes },
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0 as f64;
        if self.0 >= Self::EIB {
            write!(f, "{:.1} EiB", v / Self::EIB as f64)
        } else if self.0 >= Self::PIB {
            write!(f, "{:.1} PiB", v / Self::PIB as f64)
        } else if self.0 >= Self::TIB {
            write!(f, "{:.1} TiB", v / Self::TIB as f64)
        } else if self.0 >= Self::GIB {
            write!(f, "{:.1} GiB", v / Self::GIB as f64)
        } else if self.0 >= Self::MIB {
            write!(f, "{:.1} MiB", v / Self::MIB as f64)
        } else if self.0 >= Self::KIB {
            write!(f, "{:.1} KiB", v / Self::KIB as f64)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

/// A fresh random token for temporary names and host ids.
pub fn random_token() -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).expect("the kernel's random source is available");
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_id_follows_the_oci_definition() {
        let d1 = DiffId(format!("sha256:{}", "a".repeat(64)));
        let d2 = DiffId(format!("sha256:{}", "b".repeat(64)));
        let c1 = ChainId::of(None, &d1);
        assert_eq!(c1.as_str(), d1.as_str());
        let c2 = ChainId::of(Some(&c1), &d2);
        let mut h = Sha256::new();
        h.update(format!("{} {}", d1.as_str(), d2.as_str()));
        assert_eq!(c2.as_str(), format!("sha256:{}", hex::encode(h.finalize())));
        assert_eq!(ChainId::from_dir_name(&c2.dir_name()), Some(c2));
    }

    #[test]
    fn chain_id_parse_refuses_anything_but_a_digest() {
        assert!(ChainId::parse("sha256:../../etc").is_none());
        assert!(ChainId::parse(&format!("sha256:{}", "A".repeat(64))).is_none());
        assert!(ChainId::parse(&format!("md5:{}", "a".repeat(64))).is_none());
        assert!(ChainId::parse(&format!("sha256:{}", "0".repeat(64))).is_some());
    }

    #[test]
    fn sizes_parse_like_docker() {
        assert_eq!(Bytes::parse("2G"), Some(Bytes(2 * Bytes::GIB)));
        assert_eq!(Bytes::parse("512m"), Some(Bytes(512 * Bytes::MIB)));
        assert_eq!(Bytes::parse("10GB"), Some(Bytes(10 * Bytes::GIB)));
        assert_eq!(Bytes::parse("1.5k"), Some(Bytes(1536)));
        assert_eq!(Bytes::parse("4096"), Some(Bytes(4096)));
        assert_eq!(Bytes::parse("lots"), None);
        assert_eq!(Bytes::parse("-1G"), None);
        assert_eq!(Bytes::parse("3X"), None);
    }

    #[test]
    fn sizes_beyond_what_a_file_can_hold_are_refused_naming_the_limit() {
        for v in ["9999999T", "8388608T", "99999999999999999999999", "1e400"] {
            let e = Bytes::parse_size(v).unwrap_err();
            assert!(!e.to_string().contains("integral type"), "{v}: {e}");
            if v != "1e400" {
                assert_eq!(e, SizeError::TooLarge { value: v.into(), max: Bytes::MAX }, "{v}");
                assert!(e.to_string().contains("8.0 EiB") && e.to_string().contains(v), "{e}");
            }
        }
        // The largest accepted values fit an off_t.
        let b = Bytes::parse_size("8388607T").unwrap();
        assert!(i64::try_from(b.0).is_ok());
        assert_eq!(Bytes(16 * Bytes::TIB).to_string(), "16.0 TiB");
    }
}
