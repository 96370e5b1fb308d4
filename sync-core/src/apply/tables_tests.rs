//! Page tables saved for the next process: used when the stamps vouch for
//! the database, read again whenever anything could have changed it.

use super::super::Replica;
use super::super::db::tests::replace_whole;
use crate::RelPath;
use crate::sqlite::{self, PageTable};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn make_db(path: &Path, wal: bool, tag: &str) {
    let c = Connection::open(path).unwrap();
    let mode = if wal { "WAL" } else { "DELETE" };
    c.query_row(&format!("PRAGMA journal_mode={mode}"), [], |_| Ok(()))
        .unwrap();
    c.execute_batch(&format!(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 2000)
         INSERT INTO t SELECT i, '{tag}' || hex(randomblob(100)) FROM n;"
    ))
    .unwrap();
}

/// Past the time within which a stamp proves nothing (`RACY_NS`).
fn settle() {
    std::thread::sleep(Duration::from_millis(60));
}

struct Setup {
    _t: tempfile::TempDir,
    root: PathBuf,
    db: PathBuf,
    file: PathBuf,
    rel: RelPath,
    /// The table saved.
    table: PageTable,
}

/// A replica root holding `app.db`, whose table a first process read and
/// saved.
fn saved(wal: bool) -> Setup {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let db = root.join("app.db");
    make_db(&db, wal, "A");
    let table = sqlite::read_hashes(&db).unwrap().unwrap();
    let s = Setup {
        root,
        db,
        file: t.path().join("state/tables"),
        rel: RelPath::new(b"app.db").unwrap(),
        table,
        _t: t,
    };
    settle();
    let r = Replica::open(&s.root).unwrap();
    r.keep_tables_in(s.file.clone());
    assert_eq!(r.load_tables(), 0);
    assert_eq!(*r.page_table(&s.rel).unwrap().unwrap(), s.table);
    assert_eq!(r.databases_read(), 1);
    assert!(r.save_tables().unwrap(), "nothing saved");
    s
}

/// A new process's replica over the same root and file.
fn restarted(s: &Setup) -> Replica {
    let r = Replica::open(&s.root).unwrap();
    r.keep_tables_in(s.file.clone());
    r
}

/// The restarted replica's table of the database (asserted to be what a
/// fresh read finds) and how many times it read the database.
fn table_after_restart(s: &Setup) -> (PageTable, u64) {
    let r = restarted(s);
    let got = r.page_table(&s.rel).unwrap().unwrap();
    let reads = r.databases_read();
    assert_eq!(*got, sqlite::read_hashes(&s.db).unwrap().unwrap());
    (PageTable::clone(&got), reads)
}

fn mtime_of(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

fn set_mtime(p: &Path, t: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(t)
        .unwrap();
}

#[test]
fn a_restarted_replica_takes_its_saved_table_without_reading_the_database() {
    for wal in [true, false] {
        let s = saved(wal);
        let before = std::fs::metadata(&s.file).unwrap();
        let (_, reads) = table_after_restart(&s);
        assert_eq!(reads, 0, "wal {wal}: the database was read again");
        // nothing changed: the file is not rewritten
        let r = restarted(&s);
        r.page_table(&s.rel).unwrap();
        assert!(!r.save_tables().unwrap(), "rewritten unchanged");
        let after = std::fs::metadata(&s.file).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(
            (before.ino(), before.mtime_nsec()),
            (after.ino(), after.mtime_nsec())
        );
        // nor when the database was not even asked about
        assert!(!restarted(&s).save_tables().unwrap());
        assert_eq!(table_after_restart(&s).1, 0);
    }
}

#[test]
fn a_database_replaced_by_rename_is_read_again() {
    let s = saved(true);
    let other = s.root.join("other.db");
    make_db(&other, true, "B");
    assert_eq!(
        std::fs::metadata(&other).unwrap().len(),
        std::fs::metadata(&s.db).unwrap().len()
    );
    set_mtime(&other, mtime_of(&s.db));
    std::fs::rename(&other, &s.db).unwrap();
    settle();
    assert_eq!(table_after_restart(&s).1, 1);
}

#[test]
fn a_database_written_by_a_local_user_is_read_again() {
    let s = saved(false);
    let was = mtime_of(&s.db);
    let c = Connection::open(&s.db).unwrap();
    c.execute("UPDATE t SET v = 'local' WHERE k = 7", [])
        .unwrap();
    drop(c);
    // its mtime put back: the ctime still tells
    set_mtime(&s.db, was);
    settle();
    let (t, reads) = table_after_restart(&s);
    assert_eq!(reads, 1);
    assert_ne!(t, s.table, "the change is not in the table");
}

#[test]
fn a_write_still_in_the_log_is_read_again() {
    // a WAL writer still running: the database file is untouched, its log
    // holds the change
    let s = saved(true);
    let c = Connection::open(&s.db).unwrap();
    c.execute("UPDATE t SET v = 'local' WHERE k = 7", [])
        .unwrap();
    settle();
    assert!(s.root.join("app.db-wal").exists());
    let (t, reads) = table_after_restart(&s);
    assert_eq!(reads, 1);
    drop(c);
    assert_eq!(t, sqlite::read_hashes(&s.db).unwrap().unwrap());
}

#[test]
fn a_truncated_database_is_read_again() {
    let s = saved(false);
    let was = mtime_of(&s.db);
    let len = std::fs::metadata(&s.db).unwrap().len();
    let f = std::fs::File::options().write(true).open(&s.db).unwrap();
    f.set_len(len / 2).unwrap();
    drop(f);
    set_mtime(&s.db, was);
    settle();
    let r = restarted(&s);
    let got = r.page_table(&s.rel).unwrap();
    assert_eq!(r.databases_read(), 1);
    assert_eq!(got.as_deref(), sqlite::read_hashes(&s.db).unwrap().as_ref());
}

/// A writer that crashed mid-transaction left a hot journal beside the
/// database: SQLite rolls it back on the next open, so it is read again.
#[test]
fn a_hot_journal_beside_the_database_is_read_again() {
    let s = saved(false);
    let scratch = s.root.join("scratch.db");
    std::fs::copy(&s.db, &scratch).unwrap();
    let c = Connection::open(&scratch).unwrap();
    // a tiny cache: the update spills into the file, so its journal is
    // written and synced (hot) before the commit
    c.execute_batch("PRAGMA cache_size = 2; BEGIN; UPDATE t SET v = v || 'x';")
        .unwrap();
    let journal = s.root.join("scratch.db-journal");
    assert!(std::fs::metadata(&journal).unwrap().len() > 0);
    std::fs::copy(&journal, s.root.join("app.db-journal")).unwrap();
    c.execute_batch("ROLLBACK").unwrap();
    drop(c);
    settle();
    assert_eq!(table_after_restart(&s).1, 1);
    assert!(!s.root.join("app.db-journal").exists(), "not rolled back");
}

/// A stamp whose times are not older than the moment it was taken proves
/// nothing (a write in the same clock tick would leave them as they are):
/// such a table is neither saved nor served.
#[test]
fn a_racy_stamp_is_never_trusted() {
    let s = saved(true);
    // a time in the future stays racy for as long as the test runs
    set_mtime(
        &s.db,
        std::time::SystemTime::now() + Duration::from_secs(600),
    );
    let r = restarted(&s);
    r.page_table(&s.rel).unwrap().unwrap();
    assert_eq!(r.databases_read(), 1);
    r.save_tables().unwrap();
    assert_eq!(table_after_restart(&s).1, 1, "a racy stamp was saved");
}

#[test]
fn a_bad_tables_file_costs_a_read_and_nothing_else() {
    let s = saved(true);
    let good = std::fs::read(&s.file).unwrap();
    let mut flipped = good.clone();
    let at = flipped.len() - 100; // inside the page hashes
    flipped[at] ^= 0x55;
    let variants: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"not a page table file".to_vec()),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("flipped", flipped),
        ("empty", Vec::new()),
    ];
    for (what, bytes) in variants {
        std::fs::write(&s.file, &bytes).unwrap();
        assert_eq!(table_after_restart(&s).1, 1, "{what}");
    }
    // oversized (sparse): not even read
    let f = std::fs::File::create(&s.file).unwrap();
    f.set_len((1 << 30) + 1).unwrap();
    drop(f);
    assert_eq!(table_after_restart(&s).1, 1, "oversized");
    // another root's tables: the same database copied elsewhere
    std::fs::write(&s.file, &good).unwrap();
    let elsewhere = s.root.with_file_name("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::copy(&s.db, elsewhere.join("app.db")).unwrap();
    let r = Replica::open(&elsewhere).unwrap();
    r.keep_tables_in(s.file.clone());
    assert_eq!(r.load_tables(), 0, "a foreign root's tables");
    // and the good file still serves
    assert_eq!(table_after_restart(&s).1, 0);
}

/// A database the replica wrote itself is saved without being read: once
/// its stamps are old enough (the save waits for that).
#[test]
fn a_database_the_replica_wrote_is_saved_without_a_read() {
    let s = saved(true);
    let src = s.root.with_file_name("src.db");
    make_db(&src, true, "C");
    let r = restarted(&s);
    replace_whole(&r, &s.rel, &src);
    assert!(r.save_tables().unwrap());
    assert_eq!(r.databases_read(), 0);
    let (t, reads) = table_after_restart(&s);
    assert_eq!(reads, 0);
    assert_eq!(t, sqlite::read_hashes(&src).unwrap().unwrap());
}
