//! containerd Walk filters: parsing and matching never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sharedloop_containerd::filter::Filter;
use sharedloop_containerd::snapshots::{SnapInfo, SnapKind};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(f) = Filter::parse(&text) {
        let s = SnapInfo {
            name: "default/3/sha256:ab".into(),
            kind: SnapKind::Committed,
            parent: "p".into(),
            labels: [("containerd.io/gc.root".to_owned(), "x".to_owned())].into(),
            created_ns: 0,
            updated_ns: 0,
            layer: "l".into(),
            from_layer: None,
        };
        let _ = f.matches(&s);
    }
});
