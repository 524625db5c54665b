//! Names of filesystems as `docker info` prints them ("Backing
//! Filesystem"), from statfs(2) magic numbers, plus the network and
//! cluster filesystems sharedloop is meant for.

use std::path::Path;

const NAMES: &[(u64, &str)] = &[
    (0xEF53, "extfs"),
    (0x5846_5342, "xfs"),
    (0x6969, "nfs"),
    (0x0102_1994, "tmpfs"),
    (0x9123_683E, "btrfs"),
    (0x794C_7630, "overlayfs"),
    (0x6573_5546, "fuse"),
    (0x65735543, "fusectl"),
    (0x0BD0_0BD0, "lustre"),
    (0x4750_4653, "gpfs"),
    (0x00C3_6400, "cephfs"),
    (0x2FC1_2FC1, "zfs"),
    (0x7371_7368, "squashfs"),
    (0x8584_58F6, "ramfs"),
    (0x6175_6673, "aufs"),
    (0xF2F5_2010, "f2fs"),
    (0x3434, "nilfs"),
    (0xF15F, "ecryptfs"),
    (0xA501_FCF5, "vxfs"),
    (0x5346_544E, "ntfs"),
    (0x4D44, "vfat"),
    (0xFE53_4D42, "smb2"),
    (0xFF53_4D42, "cifs"),
    (0x0052_4653, "reiserfs"),
    (0x0000_5346_414F_4631, "beegfs"),
    (0x1905_1979, "beegfs"),
    (0x0BAD_1DEA, "wekafs"),
];

/// Docker-style name for a statfs magic number.
pub fn fs_name(magic: u64) -> String {
    NAMES
        .iter()
        .find(|(m, _)| *m == magic)
        .map(|(_, n)| (*n).to_owned())
        .unwrap_or_else(|| format!("<unknown> ({magic:#x})"))
}

/// Filesystems reached over a network (or a user-space daemon): every read
/// of a cold block is a round trip.
const NETWORK: &[&str] = &["nfs", "fuse", "lustre", "gpfs", "cephfs", "smb2", "cifs", "beegfs", "wekafs"];

/// Whether `p` lives on a network (or FUSE) filesystem. Unknown ones count
/// as local.
pub fn is_network(p: &Path) -> bool {
    let name = fs_name_of(p);
    NETWORK.contains(&name.as_str())
}

/// The filesystem name of the filesystem holding `p`.
pub fn fs_name_of(p: &Path) -> String {
    match rustix::fs::statfs(p) {
        Ok(s) => fs_name(s.f_type as u64),
        Err(e) => format!("<unavailable: {e}>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_docker() {
        assert_eq!(fs_name(0xEF53), "extfs");
        assert_eq!(fs_name(0x58465342), "xfs");
        assert_eq!(fs_name(0x6969), "nfs");
        assert_eq!(fs_name(0x0BD00BD0), "lustre");
        assert_eq!(fs_name(0x47504653), "gpfs");
        assert_eq!(fs_name(0x00C36400), "cephfs");
        assert_eq!(fs_name(0x65735546), "fuse");
        assert!(fs_name(0x1234).starts_with("<unknown>"));
    }
}
