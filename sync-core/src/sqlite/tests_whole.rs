//! Tests of a cut that compares every page straight from the database file
//! (`whole.rs`): it must find exactly what `sqlite_dbpage` would.

use super::tests::{assert_same, replica_hash, ship_and_end, wal_source};
use super::whole::FILE_PAGES;
use super::*;
use rusqlite::Connection;
use std::path::Path;

fn file_pages() -> u64 {
    FILE_PAGES.with(std::cell::Cell::take)
}

fn log(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push("-wal");
    p.into()
}

/// A writer that changed, grew, then shrank the database and checkpointed
/// it on its close (the log that named the pages is gone): each cut hashes
/// every page straight from the file, and finds what a fresh connection
/// sees; the replica ends up the same.
#[test]
fn a_database_checkpointed_between_cuts_is_hashed_from_its_file() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    drop(w);
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    file_pages();
    let steps = [
        // changed and grown
        "UPDATE t SET v = randomblob(300) WHERE k % 7 = 0;
         WITH RECURSIVE n(i) AS (SELECT 2001 UNION ALL SELECT i+1 FROM n WHERE i < 2600)
         INSERT INTO t SELECT i, randomblob(300) FROM n;",
        // truncated
        "DELETE FROM t WHERE k > 300; VACUUM;",
        // one byte of one row
        "UPDATE t SET v = x'00' WHERE k = 150;",
    ];
    for sql in steps {
        let w = Connection::open(&src).unwrap();
        w.execute_batch(sql).unwrap();
        drop(w);
        assert!(!log(&src).exists(), "the writer's close kept its log");
        let c = live.cut().unwrap();
        assert_eq!(c.changed, vec![rel.clone()], "{sql}");
        let snap = live.snapshot(&rel).unwrap();
        assert_eq!(file_pages(), u64::from(snap.pages), "{sql}");
        assert_eq!(snap.hash, replica_hash(&src), "{sql}");
        assert_eq!(
            live.dbs[&rel].hashes,
            read_hashes(&src).unwrap().unwrap().hashes
        );
        // the pages this cut found changed were kept as read: the read-ahead
        // reads only those an older remembered cut needs besides
        let since = live.dbs[&rel].history.front().unwrap().1.clone();
        let older = since.iter().filter(|&&p| p <= snap.pages).count() - c.pages_changed;
        PAGES_READ.with(|n| n.set(0));
        live.release(false).unwrap();
        assert_eq!(PAGES_READ.with(std::cell::Cell::get), older as u64, "{sql}");
        ship_and_end(&mut live, &rel, &dst);
        assert_same(&src, &dst);
    }
}

/// A snapshot that reads pages from its log (a writer's commits not yet
/// checkpointed, a database cut for the first time) is never hashed from
/// the file alone.
#[test]
fn a_log_with_frames_is_read_through_sqlite() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    w.execute_batch(
        "PRAGMA wal_autocheckpoint = 0; PRAGMA wal_checkpoint(TRUNCATE);
         UPDATE t SET v = randomblob(300) WHERE k % 3 = 0;",
    )
    .unwrap();
    assert!(std::fs::metadata(log(&src)).unwrap().len() > 0);
    file_pages();
    live.cut().unwrap();
    assert_eq!(file_pages(), 0);
    assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
    // the file is written by a checkpoint, the log keeps new frames: every
    // page is compared, through SQLite
    w.execute_batch(
        "PRAGMA wal_checkpoint(TRUNCATE);
         UPDATE t SET v = randomblob(300) WHERE k % 5 = 0;
         PRAGMA wal_checkpoint(PASSIVE);
         UPDATE t SET v = x'01' WHERE k = 7;",
    )
    .unwrap();
    let c = live.cut().unwrap();
    assert_eq!(c.changed, vec![rel.clone()]);
    assert_eq!(file_pages(), 0);
    assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
}
