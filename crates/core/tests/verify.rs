//! `verify` tells a broken layer from one its last user removed meanwhile.

use std::fs;
use std::path::Path;

use sharedloop_core::admin::{verify, Verdict};
use sharedloop_core::ids::ChainId;
use sharedloop_core::options::{Config, FsType};
use sharedloop_core::store::{LayerMeta, Store, FORMAT_VERSION, IMAGE_FILE};

#[test]
fn a_layer_removed_during_verify_is_not_reported_broken() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir_all(&root).unwrap();
    let cfg = Config { root: root.clone(), fallback: t.path().join("fallback"), ..Config::default() };
    let store = Store::new(&cfg, "me.1");
    let chain = ChainId::parse(&format!("sha256:{}", "e".repeat(64))).unwrap();
    let meta = LayerMeta {
        format: FORMAT_VERSION,
        chain_id: chain.clone(),
        diff_id: None,
        parent: None,
        fs: Some(FsType::Ext4),
        image_bytes: 4,
        content_bytes: 0,
        tar_bytes: 0,
        entries: 0,
        publisher: "me.1".into(),
        created_unix: 0,
        image_sha256: Some("0".repeat(64)),
        image_file: None,
    };
    let info = store
        .publish(&chain, &|tmp: &Path| {
            fs::write(tmp.join(IMAGE_FILE), b"junk").unwrap();
            Ok(meta.clone())
        })
        .unwrap()
        .into_info();
    // Present but wrong: reported.
    assert!(matches!(verify(&info, &mut |_| {}).unwrap(), Verdict::DigestMismatch { .. }));
    // The image gone, the layer still there: reported missing.
    fs::remove_file(info.dir.join(IMAGE_FILE)).unwrap();
    assert!(matches!(verify(&info, &mut |_| {}).unwrap(), Verdict::Missing { .. }));
    // The whole layer gone (a removal renames it away first): not broken.
    fs::remove_dir_all(&info.dir).unwrap();
    let v = verify(&info, &mut |_| {}).unwrap();
    assert_eq!(v, Verdict::Removed);
    assert!(v.is_ok());
}
