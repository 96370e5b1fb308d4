//! The replica's side alone: pages written into its databases.

use super::*;
use rusqlite::Connection;
use std::path::Path;

fn big(path: &Path) {
    let c = Connection::open(path).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    c.execute_batch(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 3000)
         INSERT INTO t SELECT i, hex(randomblob(200)) FROM n;",
    )
    .unwrap();
}

fn pages_of(path: &Path) -> Vec<(u32, Vec<u8>)> {
    let c = Connection::open(path).unwrap();
    let mut s = c
        .prepare("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A database emptied to its one page (a restore of an empty backup, an app
/// that dropped everything and vacuumed) is applied like any other.
#[test]
fn a_database_shrunk_to_one_page_is_applied() {
    let t = tempfile::tempdir().unwrap();
    let (old, new) = (t.path().join("old.db"), t.path().join("new.db"));
    big(&old);
    let c = Connection::open(&new).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    drop(c);
    let pages = pages_of(&new);
    assert_eq!(pages.len(), 1);
    apply_pages(&old, 1, pages.into_iter().map(Ok)).unwrap();
    assert_eq!(integrity(&old).unwrap(), "ok");
    assert_eq!(
        read_hashes(&old).unwrap().unwrap(),
        read_hashes(&new).unwrap().unwrap()
    );
    assert_eq!(
        std::fs::metadata(&old).unwrap().len(),
        4096,
        "not truncated"
    );
}

#[allow(unsafe_code)]
/// A new page 1 whose schema sits elsewhere on the page (a schema change, a
/// restored backup) with a smaller database: no statement reads the schema
/// through the old page's parse, and the file is cut to its new size.
#[test]
fn a_different_database_is_applied_over_a_bigger_one() {
    let t = tempfile::tempdir().unwrap();
    let (old, new) = (t.path().join("old.db"), t.path().join("new.db"));
    big(&old);
    let c = Connection::open(&new).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    c.execute_batch(
        "CREATE TABLE other(a, b, c); CREATE INDEX oi ON other(b);
         CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'restored');
         INSERT INTO other SELECT 1, hex(randomblob(500)), 3 FROM t;
         PRAGMA schema_version = -5;",
    )
    .unwrap();
    drop(c);
    let pages = pages_of(&new);
    let count = pages.len() as u32;
    assert!(count > 2);
    apply_pages(&old, count, pages.into_iter().map(Ok)).unwrap();
    assert_eq!(integrity(&old).unwrap(), "ok");
    assert_eq!(
        read_hashes(&old).unwrap().unwrap(),
        read_hashes(&new).unwrap().unwrap()
    );
    assert_eq!(
        std::fs::metadata(&old).unwrap().len(),
        u64::from(count) * 4096
    );
}
