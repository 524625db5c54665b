//! The page cache of one open file: which of its pages are resident
//! (`mincore(2)` on a read-only mapping) and dropping them
//! (`posix_fadvise(POSIX_FADV_DONTNEED)`). Learned prefetch
//! (`crate::prefetch`) records what a host read of a layer image as the
//! image file's pages that became resident.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The size of a page, the unit of [`resident`].
pub fn page_size() -> u64 {
    rustix::param::page_size() as u64
}

/// One byte per page of the first `len` bytes of `file`, bit 0 set when
/// the page is in the page cache. Reads nothing of the file.
pub fn resident(file: &File, len: u64) -> io::Result<Vec<u8>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    let n = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large to map"))?;
    let pages = len.div_ceil(page_size()) as usize;
    // SAFETY: a new shared read-only mapping of `n` bytes of an open
    // file; nothing reads through it (mincore only looks at the page cache
    // behind it), and it is unmapped before this function returns.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), n, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let mut v = vec![0u8; pages];
    // SAFETY: `p` is the start of a mapping of `n` bytes; `v` holds one
    // byte for each of its pages.
    let r = unsafe { libc::mincore(p, n, v.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: the mapping made above, of `n` bytes, unused after this.
    unsafe { libc::munmap(p, n) };
    if r != 0 {
        return Err(err);
    }
    Ok(v)
}

/// Asks the kernel to drop `file`'s clean pages from the page cache.
pub fn drop_cached(file: &File) -> io::Result<()> {
    // SAFETY: posix_fadvise only reads its arguments.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pages_read_become_resident_and_dropped_ones_go() {
        let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        f.write_all(&vec![7u8; 64 * 4096]).unwrap();
        f.as_file().sync_all().unwrap();
        let file = File::open(f.path()).unwrap();
        drop_cached(&file).unwrap();
        let before = resident(&file, 64 * 4096).unwrap();
        assert_eq!(before.len(), 64);
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 4096];
        file.read_at(&mut buf, 10 * 4096).unwrap();
        let after = resident(&file, 64 * 4096).unwrap();
        assert_eq!(after[10] & 1, 1, "the page read is resident");
        drop_cached(&file).unwrap();
        let dropped = resident(&file, 64 * 4096).unwrap();
        assert_eq!(dropped[10] & 1, 0, "a dropped clean page is gone");
    }
}
