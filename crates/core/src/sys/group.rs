//! Group names resolved through NSS (`getgrnam_r`), so groups from LDAP or
//! SSSD (common on HPC clusters) resolve as `getent group` shows them, not
//! only those in `/etc/group`.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;

/// The gid of group `name` as NSS reports it; `Ok(None)` when no source
/// knows the group.
pub fn gid_by_name(name: &str) -> io::Result<Option<u32>> {
    let c_name =
        CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "group name contains NUL"))?;
    lookup(&c_name)
}

fn lookup(name: &CStr) -> io::Result<Option<u32>> {
    // Large groups (many members from LDAP) need more than the usual
    // sysconf hint; ERANGE asks for a bigger buffer, up to a bound.
    let mut len = 16 * 1024;
    loop {
        let mut buf = vec![0u8; len];
        // SAFETY: an all-zero `struct group` is a valid value (null
        // pointers and gid 0); getgrnam_r only writes into it.
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated; `grp`, `buf` (of `buf.len()`
        // bytes) and `result` are valid for writes for the whole call and
        // outlive it; the strings `grp` points to live in `buf`, which is
        // not read through `grp` after this block except for `gr_gid`.
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr().cast(), buf.len(), &mut result) };
        match rc {
            0 if result.is_null() => return Ok(None),
            0 => return Ok(Some(grp.gr_gid)),
            libc::ERANGE if len < 16 * 1024 * 1024 => len *= 4,
            // Some NSS modules report "not found" as one of these.
            libc::ENOENT | libc::ESRCH | libc::EBADF | libc::EPERM => return Ok(None),
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_resolves_and_unknown_groups_do_not() {
        assert_eq!(gid_by_name("root").unwrap(), Some(0));
        assert_eq!(gid_by_name("sharedloop-no-such-group-x7").unwrap(), None);
        assert!(gid_by_name("a\0b").is_err());
    }
}
