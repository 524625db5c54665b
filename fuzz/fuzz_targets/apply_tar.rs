//! Any byte string as a layer tar: apply_tar never panics, and whatever it
//! does, it writes nothing outside the layer directory.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let outer = tempfile::tempdir().unwrap();
    let layer = outer.path().join("layer");
    std::fs::create_dir(&layer).unwrap();
    let _ = sharedloop_core::apply::apply_tar(&mut &data[..], &layer);
    let names: Vec<_> = std::fs::read_dir(outer.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("layer")], "apply_tar wrote outside the layer");
});
