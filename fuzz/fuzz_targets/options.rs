//! Storage option strings: parsing never panics, and what it accepts is a
//! usable configuration.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let opts: Vec<&str> = text.split('\n').collect();
    if let Ok(c) = sharedloop_core::Config::from_opts(&opts) {
        assert!(c.root.is_absolute() && c.fallback.is_absolute());
        assert_ne!(c.root, c.fallback);
        assert!(c.rw_size.0 > 0 && c.heartbeat_secs > 0);
        // Every accepted size fits a file (off_t): no later conversion fails.
        assert!(c.rw_size <= sharedloop_core::ids::Bytes::MAX);
        assert!(c.max_layer_size.is_none_or(|m| m.0 > 0 && m <= sharedloop_core::ids::Bytes::MAX));
    }
});
