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

    /// Parses sizes the way Docker's `--storage-opt size=` does: a number
    /// with an optional unit (b, k, kb, kib, m, mb, mib, g, ..., t),
    /// units in powers of 1024, case-insensitive.
    pub fn parse(s: &str) -> Option<Bytes> {
        let s = s.trim();
        let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num.parse().ok()?;
        if !num.is_finite() || num < 0.0 {
            return None;
        }
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => Self::KIB,
            "m" | "mb" | "mib" => Self::MIB,
            "g" | "gb" | "gib" => Self::GIB,
            "t" | "tb" | "tib" => Self::GIB * 1024,
            _ => return None,
        };
        let v = num * mult as f64;
        (v <= u64::MAX as f64).then_some(Bytes(v as u64))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0 as f64;
        if self.0 >= Self::GIB {
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
}
