//! A tree applied from any tar, exported as a tar (a layer's diff) and
//! applied again, gives the same export: export and apply agree.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sharedloop_core::{apply::apply_tar, export::export_tar};

fuzz_target!(|data: &[u8]| {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    if apply_tar(&mut &data[..], &a).is_err() {
        return;
    }
    let mut first = Vec::new();
    export_tar(&a, &mut first).expect("a tree apply_tar made exports");
    apply_tar(&mut &first[..], &b).expect("an exported tree applies");
    let mut second = Vec::new();
    export_tar(&b, &mut second).expect("exports again");
    assert!(first == second, "export -> apply -> export changed the layer");
});
