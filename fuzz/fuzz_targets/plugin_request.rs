//! Docker plugin requests as dockerd (or anyone on the socket) might send
//! them: decoding never panics. Input: path, NUL, query, NUL, body.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let body = parts.next().unwrap_or_default();
    let _ = sharedloop_docker::fuzzing::decode(&path, &query, body);
});
