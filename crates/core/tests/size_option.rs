//! Issue 10, item 14: a size beyond what a file can hold is refused naming
//! the option and the limit, at the driver (the per-layer `size` storage
//! option of Create, as `docker run --storage-opt size=` sends it) and in
//! the driver options. Needs root (the driver's home is a private mount).

mod common;

use std::collections::HashMap;

use sharedloop_core::options::Config;
use sharedloop_core::CreateKind;

use common::{require, Rig};

#[test]
fn real_a_size_beyond_a_file_is_refused_naming_the_option_and_the_limit() {
    require(&[]);
    let rig = Rig::new("sl-size-");

    let e = Config::from_opts(&rig.opts(&["sharedloop.size=9999999T"])).unwrap_err().to_string();
    assert!(e.contains("sharedloop.size") && e.contains("9999999T") && e.contains("8.0 EiB"), "{e}");

    let d = rig.driver();
    let big = HashMap::from([("size".to_owned(), "9999999T".to_owned())]);
    let e = d.create("c1", None, CreateKind::ReadWrite, &big).unwrap_err().to_string();
    assert!(!e.contains("integral type"), "{e}");
    assert!(e.contains("option size") && e.contains("9999999T") && e.contains("8.0 EiB"), "{e}");
    assert!(!d.exists("c1"), "a refused layer was created");
    // A size a file can have still works.
    let ok = HashMap::from([("size".to_owned(), "64M".to_owned())]);
    d.create("c2", None, CreateKind::ReadWrite, &ok).unwrap();
    d.remove("c2").unwrap();
    d.cleanup().unwrap();
}
