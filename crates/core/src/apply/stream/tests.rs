use super::*;

/// A tar built entry by entry.
struct T(tar::Builder<Vec<u8>>);

impl T {
    fn new() -> Self {
        T(tar::Builder::new(Vec::new()))
    }
    fn entry(mut self, kind: tar::EntryType, name: &str, data: &[u8], link: Option<&str>) -> Self {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_000_000_000);
        h.set_size(data.len() as u64);
        match link {
            Some(l) if l.len() < 100 => {
                h.set_link_name_literal(l).unwrap();
                self.0.append_data(&mut h, name, &b""[..]).unwrap();
            }
            Some(l) => self.0.append_link(&mut h, name, l).unwrap(),
            None => self.0.append_data(&mut h, name, data).unwrap(),
        }
        self
    }
    fn dir(self, name: &str) -> Self {
        self.entry(tar::EntryType::Directory, name, b"", None)
    }
    fn file(self, name: &str, data: &[u8]) -> Self {
        self.entry(tar::EntryType::Regular, name, data, None)
    }
    fn xattr(self, name: &str, value: &[u8]) -> Self {
        self.xattrs(&[(name, value)])
    }
    fn xattrs(mut self, x: &[(&str, &[u8])]) -> Self {
        let recs: Vec<(String, &[u8])> = x.iter().map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v)).collect();
        self.0.append_pax_extensions(recs.iter().map(|(k, v)| (k.as_str(), *v))).unwrap();
        self
    }
    fn file_in(self) -> File {
        let bytes = self.0.into_inner().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        f
    }
}

/// A version 2 `security.capability` (cap_net_raw effective).
const CAP: &[u8] = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

fn staged_because(f: &File) -> String {
    match plan(f, None).unwrap() {
        Plan::Staged(why) => why,
        Plan::Stream(p) => panic!("planned for one pass: {p:?}"),
    }
}

/// What the rewritten tar holds: (path, type, mode, uid, gid, size, link, xattr names).
type Row = (String, tar::EntryType, u32, u64, u64, u64, Option<String>, Vec<String>);

fn rewritten(f: &File) -> Vec<Row> {
    let mut out = Vec::new();
    let Plan::Stream(p) = plan(f, None).unwrap() else { panic!("staged") };
    rewrite(f, &p, &mut out, 42).unwrap();
    let mut ar = tar::Archive::new(&out[..]);
    let mut rows = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let xattrs = e
            .pax_extensions()
            .unwrap()
            .map(|x| x.map(|r| r.unwrap().key().unwrap().to_owned()).collect())
            .unwrap_or_default();
        rows.push((
            e.path().unwrap().display().to_string(),
            h.entry_type(),
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap(),
            h.size().unwrap(),
            e.link_name().unwrap().map(|l| l.display().to_string()),
            xattrs,
        ));
    }
    rows
}

#[test]
fn a_layer_tar_is_planned_and_rewritten_under_fs_in_overlay_terms() {
    let long = format!("d/{}", "n".repeat(150));
    let f = T::new()
        .dir("./")
        .dir("d/")
        .xattrs(&[("security.capability", CAP), ("user.note", b"hi")])
        .file("d/bin", &[7u8; 5000])
        .file(&long, b"long name")
        .entry(tar::EntryType::Link, "d/hard", b"", Some("d/bin"))
        .entry(tar::EntryType::Symlink, "d/sl", b"", Some("../etc/passwd"))
        .dir("o/")
        .file("o/.wh..wh..opq", b"")
        .file("d/.wh.gone", b"")
        .file("d/.wh..wh.plnk", b"")
        .xattr("trusted.overlay.redirect", b"/x")
        .file("d/plain", b"x")
        .file_in();
    let p = match plan(&f, None).unwrap() {
        Plan::Stream(p) => p,
        Plan::Staged(w) => panic!("staged: {w}"),
    };
    // d, bin, long, sl, o, whiteout, plain (hardlink, root, markers: no inode)
    assert_eq!(p.counts.inodes, 2 + 7);
    assert_eq!(p.content_bytes, 5000 + 9 + 1);
    // every entry but the root; the hardlink and both markers count, as staged counts them
    assert_eq!(p.entries, 10);
    assert_eq!(
        p.xattrs,
        vec![
            (PathBuf::from("d/bin"), "user.note".to_owned(), b"hi".to_vec()),
            (PathBuf::from("o"), OPAQUE_XATTR.to_owned(), b"y".to_vec()),
        ]
    );
    let rows = rewritten(&f);
    let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(
        names,
        ["fs", "fs/d", "fs/d/bin", &format!("fs/{long}"), "fs/d/hard", "fs/d/sl", "fs/o", "fs/d/gone", "fs/d/plain"]
    );
    let by = |n: &str| rows.iter().find(|r| r.0 == n).unwrap().clone();
    assert_eq!((by("fs").1, by("fs").2, by("fs").3), (tar::EntryType::Directory, 0o755, 0));
    let bin = by("fs/d/bin");
    assert_eq!((bin.2, bin.3, bin.4, bin.5), (0o644, 1000, 1001, 5000));
    // only the capability goes in the tar: mke2fs copies nothing else
    assert_eq!(bin.7, vec!["SCHILY.xattr.security.capability".to_owned()]);
    assert_eq!(by("fs/d/hard").6.as_deref(), Some("fs/d/bin"));
    assert_eq!(by("fs/d/sl").6.as_deref(), Some("../etc/passwd"), "symlink targets are the layer's own");
    let wh = by("fs/d/gone");
    assert_eq!((wh.1, wh.2, wh.3, wh.5), (tar::EntryType::Char, 0, 0, 0));
    assert!(by("fs/d/plain").7.is_empty(), "overlayfs' own attributes are never a layer's");
}

#[test]
fn what_one_pass_would_build_differently_goes_the_staged_way() {
    let dup = T::new().dir("a/").file("a/x", b"1").file("a/x", b"2").file_in();
    assert!(staged_because(&dup).contains("seen twice"), "{}", staged_because(&dup));
    let wh_dup = T::new().dir("a/").file("a/x", b"1").file("a/.wh.x", b"").file_in();
    assert!(staged_because(&wh_dup).contains("seen twice"));
    let orphan = T::new().file("a/x", b"1").file_in();
    assert!(staged_because(&orphan).contains("not listed before"));
    let through_link = T::new().entry(tar::EntryType::Symlink, "a", b"", Some("/etc")).file("a/x", b"1").file_in();
    assert!(staged_because(&through_link).contains("not listed before"));
    let escape = {
        // the tar crate's builder refuses `..`; write the name by hand
        let mut h = tar::Header::new_gnu();
        h.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../escape");
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        let mut bytes = h.as_bytes().to_vec();
        bytes.extend_from_slice(&[0u8; 1024]);
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes).unwrap();
        f
    };
    assert!(staged_because(&escape).contains("escapes"));
    let late_link = T::new().entry(tar::EntryType::Link, "b", b"", Some("a")).file("a", b"1").file_in();
    assert!(staged_because(&late_link).contains("hardlink"));
    let dir_link = T::new().dir("a/").entry(tar::EntryType::Link, "b", b"", Some("a")).file_in();
    assert!(staged_because(&dir_link).contains("hardlink"));
    let fifo_ok = T::new().entry(tar::EntryType::Fifo, "p", b"", None).file_in();
    assert!(matches!(plan(&fifo_ok, None).unwrap(), Plan::Stream(_)));
    let bad_cap = T::new().xattr("security.capability", b"\x01\x02").file("f", b"x").file_in();
    assert!(staged_because(&bad_cap).contains("capability"));
    let long_name = T::new().file(&"n".repeat(256), b"x").file_in();
    assert!(staged_because(&long_name).contains("255"));
    let truncated = {
        let bytes = T::new().file("a", &[7u8; 10_000]).0.into_inner().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&bytes[..4096]).unwrap();
        f
    };
    assert!(staged_because(&truncated).contains("ends inside"));
    let sparse = T::new().entry(tar::EntryType::GNUSparse, "s", b"", None).file_in();
    assert!(matches!(plan(&sparse, None).unwrap(), Plan::Staged(_)));
    let sym_xattr = T::new().xattr("user.a", b"b").entry(tar::EntryType::Symlink, "s", b"", Some("t")).file_in();
    assert!(staged_because(&sym_xattr).contains("symlink"));
    let big = T::new().file("a", &[1u8; 3000]).file("b", &[1u8; 3000]).file_in();
    match plan(&big, Some(Bytes(5000))).unwrap() {
        Plan::Staged(why) => assert!(why.contains("max_layer_size"), "{why}"),
        Plan::Stream(_) => panic!("over the limit"),
    }
    let not_tar = {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0x55u8; 4096]).unwrap();
        f
    };
    assert!(matches!(plan(&not_tar, None).unwrap(), Plan::Staged(_)));
}

#[test]
fn symlink_targets_are_kept_byte_for_byte_and_links_to_whiteouts_work() {
    let f = T::new()
        .dir("d/")
        .entry(tar::EntryType::Symlink, "d/a", b"", Some("x//y"))
        .entry(tar::EntryType::Symlink, "d/b", b"", Some("x/."))
        .file("d/.wh.gone", b"")
        .entry(tar::EntryType::Link, "d/also-gone", b"", Some("d/gone"))
        .file_in();
    let rows = rewritten(&f);
    let by = |n: &str| rows.iter().find(|r| r.0 == n).unwrap().clone();
    assert_eq!(by("fs/d/a").6.as_deref(), Some("x//y"));
    assert_eq!(by("fs/d/b").6.as_deref(), Some("x/."));
    assert_eq!(by("fs/d/also-gone").6.as_deref(), Some("fs/d/gone"));
}

#[test]
fn a_spool_that_changed_since_it_was_planned_is_refused() {
    let mut f = T::new().dir("d/").file("d/x", b"first").file_in();
    let Plan::Stream(mut p) = plan(&f, None).unwrap() else { panic!("staged") };
    p.diff_id = Some(DiffId::from_sha256(&sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new())));
    // The same length, other bytes: only the digest tells.
    let mut bytes = T::new().dir("d/").file("d/x", b"other").0.into_inner().unwrap();
    f.rewind().unwrap();
    f.write_all(&bytes).unwrap();
    bytes.clear();
    let err = rewrite(&f, &p, &mut bytes, 1).unwrap_err().to_string();
    assert!(err.contains("changed"), "{err}");
}

#[test]
fn an_empty_layer_plans_no_inodes() {
    let f = T::new().dir("./").file_in();
    let p = match plan(&f, None).unwrap() {
        Plan::Stream(p) => p,
        Plan::Staged(w) => panic!("staged: {w}"),
    };
    assert_eq!((p.counts.inodes, p.entries, p.content_bytes), (2, 0, 0));
}
