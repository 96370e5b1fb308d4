//! Rounds between an in-memory source and replica: full and partial rounds
//! over real trees, and hostile sequences fed to the replica side.

use super::pair::{Pair, rel};
use proto::round::Outgoing;
use proto::{Kind, Message};
use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};

pub(super) fn write(p: &Pair, rel: &str, data: &[u8]) {
    let path = p.src(rel);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).expect("mkdir");
    }
    fs::write(path, data).expect("write");
}

pub(super) fn tree(p: &Pair) {
    write(p, "etc/app.conf", b"port = 80\n");
    write(p, "etc/big.bin", &vec![7u8; 300_000]);
    write(p, "data/notes.txt", b"notes");
    symlink("../etc/app.conf", p.src("data/conf")).expect("symlink");
    fs::hard_link(p.src("data/notes.txt"), p.src("data/notes.link")).expect("hard link");
    fs::set_permissions(p.src("etc/app.conf"), fs::Permissions::from_mode(0o640)).expect("chmod");
    xattr::set(p.src("data/notes.txt"), "user.tag", b"blue").expect("xattr");
    fs::create_dir(p.src("empty")).expect("mkdir");
}

fn temp_files(p: &Pair) -> Vec<String> {
    let opts = crate::scan::ScanOptions::default();
    let (_, report) = crate::scan::scan_with(p.dst.path(), &opts, None).expect("scan");
    report.temp_files.iter().map(ToString::to_string).collect()
}

fn dst_is_empty(p: &Pair) -> bool {
    fs::read_dir(p.dst.path())
        .expect("read dir")
        .next()
        .is_none()
}

#[test]
fn a_full_round_mirrors_files_dirs_links_and_metadata() {
    let mut p = Pair::new();
    tree(&p);
    let sum = p.full().expect("the round applies");
    assert_eq!(sum.files_transferred, 3, "{sum:?}");
    p.assert_mirrored();
    assert_eq!(
        fs::read(p.dst("etc/app.conf")).expect("read"),
        b"port = 80\n"
    );
    let mode = fs::metadata(p.dst("etc/app.conf"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o640);
    assert_eq!(
        xattr::get(p.dst("data/notes.txt"), "user.tag").expect("xattr"),
        Some(b"blue".to_vec())
    );
    assert_eq!(
        fs::read_link(p.dst("data/conf")).expect("link"),
        std::path::Path::new("../etc/app.conf")
    );
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (
        fs::metadata(p.dst("data/notes.txt")).expect("stat"),
        fs::metadata(p.dst("data/notes.link")).expect("stat"),
    );
    assert_eq!(a.ino(), b.ino(), "hard link kept");
}

#[test]
fn a_second_full_round_changes_nothing() {
    let mut p = Pair::new();
    tree(&p);
    p.full().expect("first");
    let sum = p.full().expect("second");
    // (hard links are linked again every round: others_created counts them)
    assert_eq!(
        (sum.files_transferred, sum.entries_deleted, sum.meta_updated),
        (0, 0, 0),
        "{sum:?}"
    );
}

#[test]
fn a_full_round_brings_changes_and_deletions() {
    let mut p = Pair::new();
    tree(&p);
    p.full().expect("first");
    write(&p, "etc/app.conf", b"port = 81\n");
    fs::remove_dir_all(p.src("data")).expect("rm");
    fs::remove_dir(p.src("empty")).expect("rmdir");
    write(&p, "empty", b"now a file");
    let sum = p.full().expect("second");
    assert!(sum.entries_deleted >= 2, "{sum:?}");
    p.assert_mirrored();
    assert!(!p.dst("data").exists());
    assert_eq!(fs::read(p.dst("empty")).expect("read"), b"now a file");
}

#[test]
fn a_partial_round_creates_modifies_and_deletes_with_inline_content() {
    let mut p = Pair::new();
    tree(&p);
    p.full().expect("first");
    write(&p, "etc/new.conf", b"new");
    write(&p, "etc/app.conf", b"port = 82\n");
    fs::remove_file(p.src("data/notes.link")).expect("rm");
    let sum = p
        .partial(&["etc/app.conf", "etc/new.conf"], &["data/notes.link"], &[])
        .expect("partial");
    assert_eq!((sum.files_inline, sum.entries_deleted), (2, 1), "{sum:?}");
    p.full().expect("a full round after");
    p.assert_mirrored();
}

#[test]
fn a_partial_round_pulls_large_files_and_applies_renames_first() {
    let mut p = Pair::new();
    tree(&p);
    p.full().expect("first");
    fs::rename(p.src("etc"), p.src("conf")).expect("rename");
    write(&p, "conf/big.bin", &vec![8u8; 300_000]);
    let sum = p
        .partial(&["conf", "conf/big.bin"], &[], &[("etc", "conf")])
        .expect("partial");
    assert_eq!((sum.files_transferred, sum.files_inline), (1, 0), "{sum:?}");
    assert!(!p.dst("etc").exists());
    assert_eq!(
        fs::read(p.dst("conf/app.conf")).expect("read"),
        b"port = 80\n"
    );
    // the symlink into the old name is the source's too: dangling on both
    p.assert_mirrored();
}

#[test]
fn a_metadata_change_alone_moves_no_content() {
    let mut p = Pair::new();
    tree(&p);
    p.full().expect("first");
    fs::set_permissions(p.src("etc/app.conf"), fs::Permissions::from_mode(0o600)).expect("chmod");
    xattr::set(p.src("etc/app.conf"), "user.k", b"v").expect("xattr");
    let sum = p.partial(&["etc/app.conf"], &[], &[]).expect("partial");
    assert_eq!((sum.files_transferred, sum.meta_updated), (0, 1), "{sum:?}");
    p.assert_mirrored();
}

#[test]
fn a_new_hard_link_and_symlink_in_a_partial_round() {
    let mut p = Pair::new();
    tree(&p);
    p.full().expect("first");
    fs::hard_link(p.src("etc/big.bin"), p.src("etc/big.link")).expect("link");
    symlink("big.bin", p.src("etc/big.sym")).expect("symlink");
    p.partial(&["etc/big.bin", "etc/big.link", "etc/big.sym"], &[], &[])
        .expect("partial");
    p.assert_mirrored();
}

#[test]
fn excluded_entries_are_neither_written_nor_deleted() {
    let mut p = Pair::new();
    p.filter = crate::filter::Filter::new(&["*.cache".to_string()]).expect("a filter");
    write(&p, "a.txt", b"a");
    write(&p, "b.cache", b"source cache");
    fs::write(p.dst("mine.cache"), b"replica cache").expect("write");
    p.full().expect("round");
    assert!(!p.dst("b.cache").exists());
    assert_eq!(
        fs::read(p.dst("mine.cache")).expect("read"),
        b"replica cache"
    );
    assert_eq!(fs::read(p.dst("a.txt")).expect("read"), b"a");
}

pub(super) fn live_db(p: &Pair) -> rusqlite::Connection {
    let c = rusqlite::Connection::open(p.src("app.db")).expect("open");
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .expect("wal");
    c.execute_batch(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
         INSERT INTO t SELECT i, randomblob(200) FROM n;",
    )
    .expect("rows");
    c
}

#[test]
fn a_live_database_travels_as_pages_of_a_cut() {
    let mut p = Pair::new();
    let c = live_db(&p);
    write(&p, "app.conf", b"x");
    let sum = p.full().expect("first");
    assert_eq!(sum.databases_applied, 1, "{sum:?}");
    assert!(!p.dst("app.db-wal").exists(), "the WAL never travels");
    assert_eq!(
        crate::sqlite::integrity(&p.dst("app.db")).expect("check"),
        "ok"
    );
    // A write, uncheckpointed: the next round ships the changed pages only.
    c.execute("UPDATE t SET v = randomblob(200) WHERE k = 7", [])
        .expect("update");
    let sum = p.partial(&["app.db"], &[], &[]).expect("partial");
    assert_eq!(sum.databases_applied, 1, "{sum:?}");
    assert!(sum.db_pages < 10, "{sum:?}");
    let copy = rusqlite::Connection::open(p.dst("app.db")).expect("open copy");
    let n: i64 = copy
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 500);
    p.full().expect("a full round after");
    p.assert_mirrored();
}

/// A replica database another process holds open (the standby's app left
/// running) is left alone, and the round's summary names it with its holder
/// as data; once released, the next round brings it.
#[test]
fn a_held_replica_database_is_reported_with_its_holder() {
    let mut p = Pair::new();
    let c = live_db(&p);
    p.full().expect("first");
    let before = fs::read(p.dst("app.db")).expect("read");
    let mut holder = std::process::Command::new("sleep")
        .arg("30")
        .stdin(fs::File::open(p.dst("app.db")).expect("open"))
        .spawn()
        .expect("sleep runs");
    c.execute("UPDATE t SET v = randomblob(200) WHERE k = 7", [])
        .expect("update");
    let sum = p.full_as_is();
    let _ = holder.kill();
    let _ = holder.wait();
    let (sum, root) = sum.expect("the round applies around the held database");
    assert_ne!(
        sum.root_hash,
        Some(root),
        "the held database was left as it was"
    );
    let want = proto::HeldDb {
        path: rel("app.db"),
        holders: format!("pid {} (sleep)", holder.id()),
    };
    assert_eq!(sum.held, [want], "{sum:?}");
    assert_eq!(fs::read(p.dst("app.db")).expect("read"), before);
    let sum = p.full().expect("released");
    assert!(sum.held.is_empty(), "{sum:?}");
    p.assert_mirrored();
}

// ---- hostile sequences fed to the replica side ----

fn one_file_round(p: &mut Pair, full: bool) -> (Vec<proto::Entry>, [u8; 32]) {
    write(p, "f", b"x");
    let m = p.source_manifest();
    let entries = if full {
        m.entries.clone()
    } else {
        m.entries
            .into_iter()
            .filter(|e| !e.path.is_root())
            .collect()
    };
    let root = crate::Manifest {
        entries: entries.clone(),
    }
    .root_hash();
    (entries, root)
}

fn round(id: u64, full: bool, entries: &[proto::Entry], root_hash: [u8; 32]) -> Vec<Message> {
    Outgoing {
        id,
        full,
        checksum: false,
        verify: false,
        entries,
        renamed: &[],
        deleted: &[],
        root_hash,
    }
    .messages(Vec::new())
    .collect()
}

#[test]
fn a_full_round_with_another_root_hash_writes_nothing() {
    let mut p = Pair::new();
    let (entries, _) = one_file_round(&mut p, true);
    let e = p
        .send(round(1, true, &entries, [9; 32]))
        .expect_err("refused");
    assert!(e.contains("announced root hash"), "{e}");
    assert!(dst_is_empty(&p));
}

#[test]
fn a_full_round_that_is_not_a_tree_writes_nothing() {
    let mut p = Pair::new();
    write(&p, "d/f", b"x");
    let mut m = p.source_manifest();
    m.entries.retain(|e| e.path != rel("d"));
    let e = p
        .send(round(1, true, &m.entries, m.root_hash()))
        .expect_err("refused");
    assert!(e.contains("manifest from the source"), "{e}");
    assert!(dst_is_empty(&p));
}

#[test]
fn an_unsorted_partial_round_writes_nothing() {
    let mut p = Pair::new();
    write(&p, "a", b"a");
    write(&p, "b", b"b");
    let mut m = p.source_manifest();
    m.entries.retain(|e| !e.path.is_root());
    m.entries.reverse();
    let e = p
        .send(round(1, false, &m.entries, [0; 32]))
        .expect_err("refused");
    assert!(e.contains("not sorted at"), "{e}");
    assert!(dst_is_empty(&p));
}

#[test]
fn a_reserved_temp_name_is_refused_by_name() {
    let mut p = Pair::new();
    let (mut entries, _) = one_file_round(&mut p, false);
    entries[0].path = rel(".understudy.tmp.0123456789abcdef");
    let e = p
        .send(round(1, false, &entries, [0; 32]))
        .expect_err("refused");
    assert!(e.contains("reserved"), "{e}");
    let mut p = Pair::new();
    let msgs = vec![
        Message::RoundStart {
            id: 1,
            full: false,
            checksum: false,
            verify: false,
        },
        Message::Deleted(vec![rel("d/.understudy.tmp.x")]),
        Message::RoundEnd {
            id: 1,
            entries: 0,
            root_hash: [0; 32],
        },
    ];
    assert!(p.send(msgs).expect_err("refused").contains("reserved"));
}

#[test]
fn a_path_too_long_for_the_replica_root_is_refused() {
    let mut p = Pair::new();
    let (mut entries, _) = one_file_round(&mut p, false);
    let long: Vec<String> = (0..16).map(|i| format!("{i:0>255}")).collect();
    entries[0].path = rel(&long.join("/"));
    let e = p
        .send(round(1, false, &entries, [0; 32]))
        .expect_err("refused");
    assert!(e.contains("path too long"), "{e}");
    assert!(dst_is_empty(&p));
}

#[test]
fn a_round_end_that_does_not_match_writes_nothing() {
    let mut p = Pair::new();
    let (entries, root) = one_file_round(&mut p, true);
    let mut msgs = round(1, true, &entries, root);
    let last = msgs.len() - 1;
    msgs[last] = Message::RoundEnd {
        id: 1,
        entries: entries.len() as u64 + 1,
        root_hash: root,
    };
    let e = p.send(msgs).expect_err("refused");
    assert!(e.contains("entries announced"), "{e}");
    assert!(dst_is_empty(&p));
}

#[test]
fn messages_out_of_order_are_refused_before_anything_is_applied() {
    let mut p = Pair::new();
    let (entries, root) = one_file_round(&mut p, true);
    let mut msgs = round(1, true, &entries, root);
    msgs.swap(0, 1); // a manifest before the start
    assert!(
        p.send(msgs)
            .expect_err("refused")
            .contains("expected a round")
    );
    let mut msgs = round(1, true, &entries, root);
    msgs.insert(2, Message::Literal(vec![1]));
    assert!(
        p.send(msgs)
            .expect_err("refused")
            .contains("expected the rest")
    );
    assert!(dst_is_empty(&p));
}

#[test]
fn inline_content_that_does_not_match_its_entry_is_not_installed() {
    let mut p = Pair::new();
    let (entries, _) = one_file_round(&mut p, false);
    let mut msgs = round(1, false, &entries, [0; 32]);
    let end = msgs.pop().expect("an end");
    msgs.push(Message::Inline {
        index: 0,
        data: b"forged".to_vec(),
    });
    msgs.push(end);
    assert!(p.send(msgs).is_err());
    assert!(!p.dst("f").exists());
    assert!(temp_files(&p).is_empty(), "{:?}", temp_files(&p));
}

#[test]
fn nothing_is_written_through_a_symlink_planted_by_an_earlier_round() {
    let mut p = Pair::new();
    let outside = tempfile::tempdir().expect("a temp dir");
    symlink(outside.path(), p.src("d")).expect("symlink");
    p.full().expect("the symlink is an entry like any other");
    // A hostile partial round: content below the symlink.
    let x = b"written through the symlink";
    let entry = proto::Entry {
        path: rel("d/x"),
        kind: Kind::File {
            size: x.len() as u64,
            hash: *blake3::hash(x).as_bytes(),
        },
        meta: proto::Meta::default(),
    };
    let mut msgs = round(2, false, std::slice::from_ref(&entry), [0; 32]);
    let end = msgs.pop().expect("an end");
    msgs.push(Message::Inline {
        index: 0,
        data: x.to_vec(),
    });
    msgs.push(end);
    let res = p.send(msgs);
    assert!(res.is_err(), "{res:?}");
    assert!(
        fs::read_dir(outside.path()).expect("read").next().is_none(),
        "written outside the root"
    );
}

#[test]
fn a_promotion_between_rounds_is_not_a_round() {
    let mut p = Pair::new();
    let e = p
        .send([Message::Promote { epoch: 2 }])
        .expect_err("not a round");
    assert_eq!(e, "promote 2");
}

#[test]
fn fifos_and_empty_files_are_made_not_pulled() {
    let mut p = Pair::new();
    write(&p, "empty", b"");
    let status = std::process::Command::new("mkfifo")
        .arg(p.src("pipe"))
        .status()
        .expect("mkfifo runs");
    assert!(status.success());
    p.full().expect("round");
    use std::os::unix::fs::FileTypeExt;
    let ft = fs::symlink_metadata(p.dst("pipe"))
        .expect("stat")
        .file_type();
    assert!(ft.is_fifo());
    assert_eq!(fs::read(p.dst("empty")).expect("read"), b"");
    p.assert_mirrored();
}

#[test]
fn a_checksum_round_finds_a_change_that_kept_size_and_mtime() {
    let mut p = Pair::new();
    write(&p, "f", b"aaaa");
    p.full().expect("first");
    let mtime = fs::metadata(p.src("f"))
        .expect("stat")
        .modified()
        .expect("mtime");
    fs::write(p.src("f"), b"bbbb").expect("write");
    fs::File::options()
        .write(true)
        .open(p.src("f"))
        .and_then(|f| f.set_modified(mtime))
        .expect("mtime back");
    let m = p.source_manifest();
    let out = |id, checksum| Outgoing {
        id,
        full: true,
        checksum,
        verify: true,
        entries: &m.entries,
        renamed: &[],
        deleted: &[],
        root_hash: m.root_hash(),
    };
    let sum = p
        .send(out(2, false).messages(Vec::new()))
        .expect("by size and mtime");
    assert_eq!(sum.files_transferred, 0, "rsync's quick check misses it");
    // the verified cut says so
    assert_ne!(sum.root_hash, Some(m.root_hash()));
    assert!(
        sum.warnings.iter().any(|w| w.contains("differs: f")),
        "{sum:?}"
    );
    let sum = p
        .send(out(3, true).messages(Vec::new()))
        .expect("by content");
    assert_eq!(sum.files_transferred, 1);
    assert_eq!(sum.root_hash, Some(m.root_hash()));
    assert_eq!(fs::read(p.dst("f")).expect("read"), b"bbbb");
}

#[test]
fn a_directory_replaced_by_a_file_in_a_partial_round() {
    let mut p = Pair::new();
    write(&p, "x/inner", b"i");
    p.full().expect("first");
    fs::remove_dir_all(p.src("x")).expect("rm");
    write(&p, "x", b"now a file");
    p.partial(&["x"], &[], &[]).expect("partial");
    assert_eq!(fs::read(p.dst("x")).expect("read"), b"now a file");
}

#[test]
fn a_deleted_tree_goes_whole_in_a_partial_round() {
    let mut p = Pair::new();
    write(&p, "t/a/b/c", b"c");
    write(&p, "t/d", b"d");
    write(&p, "keep", b"k");
    p.full().expect("first");
    fs::remove_dir_all(p.src("t")).expect("rm");
    let sum = p.partial(&[], &["t"], &[]).expect("partial");
    assert_eq!(sum.entries_deleted, 1, "{sum:?}");
    assert!(!p.dst("t").exists());
    assert!(p.dst("keep").exists());
}

#[test]
fn a_round_with_nothing_changed_writes_nothing() {
    let mut p = Pair::new();
    write(&p, "a", b"a");
    p.full().expect("first");
    let sum = p.partial(&[], &[], &[]).expect("an empty partial round");
    assert_eq!(
        sum,
        proto::ApplySummary {
            root_hash: sum.root_hash,
            ..Default::default()
        }
    );
    assert!(temp_files(&p).is_empty());
}
