//! Any byte string as a layer's prefetch record (written by another host):
//! parsing never panics, and what it accepts stays within the image, in
//! order, page-aligned, and renders back to a record that parses the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sharedloop_core::prefetch::{Record, ALIGN, MAX_RANGES};

fuzz_target!(|data: &[u8]| {
    // The image size the record claims, when it claims one, so that the
    // interesting inputs get past that check.
    let size = std::str::from_utf8(data)
        .ok()
        .and_then(|t| t.lines().nth(1))
        .and_then(|l| l.strip_prefix("image_bytes "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(1 << 30);
    if let Ok(r) = Record::parse(data, size) {
        assert!(r.ranges.len() <= MAX_RANGES);
        let mut end = 0;
        for &(o, l) in &r.ranges {
            assert!(l > 0 && o % ALIGN == 0 && o >= end && o + l <= size);
            end = o + l;
        }
        assert_eq!(Record::parse(&r.render(), size).unwrap(), r);
    }
});
