//! A session's first full round on a tree the replica already mirrors: the
//! replica's quick digest ([`crate::digest`]) matches the source's and the
//! round is `RoundSame`; any change on either side, of any field a full
//! round compares, makes it a full round again.

use super::pair::Pair;
use super::pair_tests::{live_db, tree, write};
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::time::{Duration, SystemTime};

/// Files, a directory tree, a symlink, two hard-linked names, a fifo, an
/// xattr, an access ACL, another owner and a live WAL database.
fn rich_tree(p: &Pair) -> rusqlite::Connection {
    tree(p);
    // u::rw-, u:1234:r--, g::r--, m::r--, o::---
    let acl: Vec<u8> = [
        &[2u8, 0, 0, 0][..],
        &[1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff],
        &[2, 0, 4, 0, 0xd2, 0x04, 0, 0],
        &[4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff],
        &[0x10, 0, 4, 0, 0xff, 0xff, 0xff, 0xff],
        &[0x20, 0, 0, 0, 0xff, 0xff, 0xff, 0xff],
    ]
    .concat();
    xattr::set(p.src("etc/big.bin"), "system.posix_acl_access", &acl).expect("acl");
    std::os::unix::fs::chown(p.src("etc/big.bin"), Some(1234), Some(1235)).expect("chown");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p.src("data/pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("fifo");
    live_db(p)
}

fn mirrored() -> (Pair, rusqlite::Connection) {
    let mut p = Pair::new();
    let c = rich_tree(&p);
    p.full().expect("the first mirror");
    (p, c)
}

fn set_mtime(path: &std::path::Path, t: SystemTime) {
    let f = fs::File::options().write(true).open(path).expect("open");
    f.set_modified(t).expect("set mtime");
}

#[test]
fn a_session_on_a_mirrored_tree_is_a_round_with_nothing_to_do() {
    let (mut p, _c) = mirrored();
    assert_eq!(p.first_full(), Ok(true));
    p.assert_mirrored();
    // and again: RoundSame left nothing behind that the next digest sees
    assert_eq!(p.first_full(), Ok(true));
}

type Change = Box<dyn Fn(&Pair, &rusqlite::Connection)>;

/// Changes of every field a full round compares, on the source and on the
/// replica.
fn changes() -> Vec<(&'static str, Change)> {
    let later = SystemTime::now() + Duration::from_secs(3600);
    let mut changes: Vec<(&str, Change)> = vec![
        (
            "same size, new mtime",
            Box::new(|p, _| fs::write(p.src("data/notes.txt"), b"NOTES").expect("write")),
        ),
        (
            "mode",
            Box::new(|p, _| {
                fs::set_permissions(p.src("etc/app.conf"), fs::Permissions::from_mode(0o600))
                    .expect("chmod")
            }),
        ),
        (
            "owner",
            Box::new(|p, _| {
                std::os::unix::fs::chown(p.src("etc/app.conf"), Some(7), None).expect("chown")
            }),
        ),
        (
            "xattr",
            Box::new(|p, _| xattr::set(p.src("etc/app.conf"), "user.x", b"1").expect("xattr")),
        ),
        (
            "acl removed",
            Box::new(|p, _| {
                xattr::remove(p.src("etc/big.bin"), "system.posix_acl_access").expect("acl")
            }),
        ),
        ("new file", Box::new(|p, _| write(p, "data/new", b"n"))),
        (
            "deleted file",
            Box::new(|p, _| fs::remove_file(p.src("etc/app.conf")).expect("rm")),
        ),
        (
            "symlink target",
            Box::new(|p, _| {
                fs::remove_file(p.src("data/conf")).expect("rm");
                symlink("../etc/big.bin", p.src("data/conf")).expect("symlink");
            }),
        ),
        (
            "database write",
            Box::new(|_, c| {
                c.execute("UPDATE t SET v = randomblob(200) WHERE k = 9", [])
                    .expect("update");
            }),
        ),
        (
            "directory mtime",
            Box::new(move |p, _| {
                let d = fs::File::open(p.src("etc")).expect("open dir");
                d.set_modified(later).expect("mtime");
            }),
        ),
    ];
    changes.extend(replica_changes());
    changes
}

/// Changes made on the replica alone.
fn replica_changes() -> Vec<(&'static str, Change)> {
    let later = SystemTime::now() + Duration::from_secs(3600);
    vec![
        (
            "replica file edited",
            Box::new(|p, _| fs::write(p.dst("etc/app.conf"), b"port = 8080\n").expect("write")),
        ),
        (
            "replica file, same size, other mtime",
            Box::new(move |p, _| set_mtime(&p.dst("etc/app.conf"), later)),
        ),
        (
            "replica xattr set",
            Box::new(|p, _| xattr::set(p.dst("etc/app.conf"), "user.y", b"2").expect("xattr")),
        ),
        (
            "replica ACL set",
            Box::new(|p, _| {
                let st = std::process::Command::new("setfacl")
                    .args(["-m", "u:65534:r"])
                    .arg(p.dst("etc/app.conf"))
                    .status();
                assert!(st.is_ok_and(|s| s.success()), "setfacl");
            }),
        ),
        (
            "replica ACL removed",
            Box::new(|p, _| {
                xattr::remove(p.dst("etc/big.bin"), "system.posix_acl_access").expect("acl")
            }),
        ),
        (
            "stray replica file",
            Box::new(|p, _| fs::write(p.dst("data/stray"), b"s").expect("write")),
        ),
        (
            "temp file left on the replica",
            Box::new(|p, _| {
                fs::write(p.dst("data/.understudy.tmp.0123456789abcdef"), b"t").expect("write")
            }),
        ),
        (
            "replica hard link broken",
            Box::new(|p, _| {
                fs::remove_file(p.dst("data/notes.link")).expect("rm");
                fs::copy(p.dst("data/notes.txt"), p.dst("data/notes.link")).expect("copy");
            }),
        ),
        (
            "replica database replaced",
            Box::new(|p, _| {
                let c = rusqlite::Connection::open(p.dst("app.db")).expect("open");
                c.execute("DELETE FROM t WHERE k < 5", []).expect("delete");
            }),
        ),
    ]
}

#[test]
fn any_change_on_either_side_makes_it_a_full_round() {
    for (what, change) in changes() {
        let (mut p, c) = mirrored();
        change(&p, &c);
        assert_eq!(p.first_full(), Ok(false), "{what}: taken as the same tree");
        p.assert_mirrored();
        assert_eq!(
            p.first_full(),
            Ok(true),
            "{what}: not the same after the round"
        );
    }
}

/// The replica's scan ahead skips listing the xattrs of files its index
/// holds as bare at their stamps: with every stamp trusted (as if old), each
/// change is still seen.
#[test]
fn with_the_replicas_stamps_trusted_any_change_is_still_seen() {
    for (what, change) in changes() {
        let (mut p, c) = mirrored();
        p.trust_replica_stamps();
        // past the coarse clock's tick, as the racy rule ensures in use
        std::thread::sleep(Duration::from_millis(20));
        change(&p, &c);
        assert_eq!(p.first_full(), Ok(false), "{what}: taken as the same tree");
        p.assert_mirrored();
    }
}

#[test]
fn a_round_same_with_another_digest_is_refused() {
    let (mut p, _c) = mirrored();
    let err = p.same_as([9; 32]).expect_err("refused");
    assert!(err.contains("scan differs"), "{err}");
}

/// With id maps the replica's owners are this host's: a file whose owner was
/// put back to the source's number would have the source's digest, but the
/// plan maps it; no digest is offered and the full round maps it again.
#[test]
fn with_id_maps_no_digest_is_offered() {
    use std::os::unix::fs::MetadataExt;
    let mut p = Pair::new();
    p.ids =
        crate::idmap::IdMap::parse(&["1234:4321".into()], &["1235:5321".into()]).expect("a map");
    tree(&p);
    std::os::unix::fs::chown(p.src("etc/app.conf"), Some(1234), Some(1235)).expect("chown");
    p.full().expect("the first mirror");
    let mapped = p.dst("etc/app.conf");
    assert_eq!(fs::metadata(&mapped).expect("stat").uid(), 4321);
    std::os::unix::fs::chown(&mapped, Some(1234), Some(1235)).expect("chown");
    assert_eq!(p.first_full(), Ok(false));
    assert_eq!(fs::metadata(&mapped).expect("stat").uid(), 4321);
}

/// A restarted replica (a new process) takes its databases' page tables from
/// the file the last one saved: it offers the same quick digest without
/// reading any database; with no such file it reads them.
#[test]
fn a_restarted_replica_offers_the_quick_digest_without_reading_its_databases() {
    let (mut p, _c) = mirrored();
    let state = tempfile::tempdir().expect("a temp dir");
    let file = state.path().join("tables");
    p.replica.keep_tables_in(file.clone());
    assert!(p.replica.save_tables().expect("saved"));
    for saved in [false, true] {
        p.replica = crate::apply::Replica::open(p.dst.path()).expect("reopened");
        if saved {
            p.replica.keep_tables_in(file.clone());
            assert_eq!(p.replica.load_tables(), 1);
        }
        assert_eq!(p.first_full(), Ok(true), "saved tables: {saved}");
        assert_eq!(p.replica.databases_read(), u64::from(!saved));
    }
}

/// A live WAL database with a second name that sorts first: the manifest
/// names it by its first name on both ends (the replica's own scan gives
/// the source's root hash), while the cut goes through the name whose log
/// it is (the log's rows arrive). A later commit reaches both names.
#[test]
fn a_database_with_two_names_is_cut_through_its_log_and_verified() {
    let mut p = Pair::new();
    let c = live_db(&p);
    c.execute_batch("PRAGMA wal_autocheckpoint=0; DELETE FROM t WHERE k > 400;")
        .expect("a commit left in the log");
    fs::hard_link(p.src("app.db"), p.src("0-old.db")).expect("link");
    let count = |path: std::path::PathBuf| -> i64 {
        let c = rusqlite::Connection::open(path).expect("open");
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("count")
    };
    p.full()
        .expect("verified: the replica's root is the source's");
    assert_eq!(count(p.dst("0-old.db")), 400);
    use std::os::unix::fs::MetadataExt;
    let dst = p.dst.path().to_path_buf();
    let ino = |rel: &str| fs::metadata(dst.join(rel)).expect("stat").ino();
    assert_eq!(ino("0-old.db"), ino("app.db"));
    assert!(
        !p.src("0-old.db-wal").exists(),
        "opened through its other name"
    );
    c.execute("DELETE FROM t WHERE k > 300", [])
        .expect("commit");
    p.full().expect("verified again");
    assert_eq!(count(p.dst("app.db")), 300);
    assert_eq!(ino("0-old.db"), ino("app.db"));
}
