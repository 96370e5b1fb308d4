//! Rounds with a folder's uid/gid maps, and excluded leftovers swept
//! (`delete_excluded`) or counted.

use super::pair::{Pair, rel};
use crate::filter::Filter;
use crate::idmap::IdMap;
use std::fs;
use std::os::unix::fs::MetadataExt as _;

fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(t, p, i) in entries {
        v.extend_from_slice(&t.to_le_bytes());
        v.extend_from_slice(&p.to_le_bytes());
        v.extend_from_slice(&i.to_le_bytes());
    }
    v
}

const NONE: u32 = u32::MAX;

#[test]
fn mapped_owners_and_acls_arrive_and_hash_as_the_source_s() {
    let mut p = Pair::new();
    p.ids = IdMap::parse(&["1000:99".into()], &["1000:100".into()]).expect("a map");
    fs::write(p.src("f"), b"x").expect("write");
    std::os::unix::fs::chown(p.src("f"), Some(1000), Some(1000)).expect("chown");
    let access = acl(&[
        (0x01, 6, NONE),
        (0x02, 6, 1000),
        (0x04, 4, NONE),
        (0x08, 4, 1000),
        (0x10, 6, NONE),
        (0x20, 0, NONE),
    ]);
    xattr::set(p.src("f"), "system.posix_acl_access", &access).expect("setfacl");
    // Pair::full checks the replica's root hash (mapped back) is the source's.
    p.full().expect("round");
    let m = fs::metadata(p.dst("f")).expect("stat");
    assert_eq!((m.uid(), m.gid()), (99, 100));
    let got = xattr::get(p.dst("f"), "system.posix_acl_access")
        .expect("getxattr")
        .expect("an ACL");
    assert_eq!(
        got,
        acl(&[
            (0x01, 6, NONE),
            (0x02, 6, 99),
            (0x04, 4, NONE),
            (0x08, 4, 100),
            (0x10, 6, NONE),
            (0x20, 0, NONE),
        ])
    );
    // No owner churn: the next round changes nothing.
    let again = p.full().expect("round");
    assert_eq!(again.meta_updated, 0, "{again:?}");
    p.assert_mirrored();
    // Without the map, the replica's tree is not the source's.
    p.ids = IdMap::default();
    let (own, _) =
        super::own_manifest(&p.replica, Default::default(), Filter::default()).expect("scan");
    assert_ne!(own.root_hash(), p.source_manifest().root_hash());
}

fn leftovers_tree(p: &mut Pair) {
    p.filter = Filter::new(&["cache/".into(), "*.log".into(), "/banner.txt".into()]).expect("f");
    p.sweep.overlays = Filter::new(&["/banner.txt".into()]).expect("overlays");
    fs::write(p.src("a.txt"), b"a").expect("write");
    fs::create_dir_all(p.dst("cache/img")).expect("mkdir");
    fs::write(p.dst("cache/img/1.webp"), b"old").expect("write");
    fs::write(p.dst("x.log"), b"old").expect("write");
    fs::write(p.dst("banner.txt"), b"standby").expect("write");
}

#[test]
fn delete_excluded_sweeps_leftovers_but_never_overlays() {
    let mut p = Pair::new();
    leftovers_tree(&mut p);
    p.sweep.delete = true;
    p.full().expect("round");
    assert!(!p.dst("cache").exists() && !p.dst("x.log").exists());
    assert_eq!(fs::read(p.dst("banner.txt")).expect("overlay"), b"standby");
    let l = p.leftovers.clone().expect("a full round's leftovers");
    assert_eq!((l.count, l.swept), (0, 2), "{l:?}");
    // The root's mtime, moved by the removals, is the source's again.
    p.assert_mirrored();
}

#[test]
fn without_delete_excluded_leftovers_stay_and_are_counted() {
    let mut p = Pair::new();
    leftovers_tree(&mut p);
    p.full().expect("round");
    assert!(p.dst("cache/img/1.webp").exists() && p.dst("x.log").exists());
    let l = p.leftovers.clone().expect("a full round's leftovers");
    assert_eq!((l.count, l.swept), (2, 0));
    assert_eq!(l.first, [rel("cache"), rel("x.log")]);
}

#[test]
fn delete_excluded_never_removes_a_database_s_side_files() {
    let mut p = Pair::new();
    p.filter = Filter::new(&["*.db-shm".into()]).expect("f");
    p.sweep.delete = true;
    let c = rusqlite::Connection::open(p.src("library.db")).expect("open");
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .expect("sql");
    drop(c);
    p.full().expect("round");
    // The standby's own process has the database open: its index is there.
    fs::write(p.dst("library.db-shm"), vec![0u8; 32768]).expect("write");
    fs::write(p.dst("stray.db-shm"), b"no database beside it").expect("write");
    p.full().expect("round");
    assert!(
        p.dst("library.db-shm").exists(),
        "a live index was unlinked"
    );
    assert!(!p.dst("stray.db-shm").exists());
}
