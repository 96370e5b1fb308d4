//! A database renamed away or replaced while a cut holds it (`moved.rs`):
//! both interleavings of a restore by rename, taken step by step.

use super::conn::{Conns, side_path};
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

/// An application's connection to a WAL database that never checkpoints on
/// its own (its frames stay in the log until a close checkpoints them).
fn app(path: &Path) -> Connection {
    let c = Connection::open(path).expect("open");
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .expect("wal");
    c.execute_batch("PRAGMA wal_autocheckpoint = 0;")
        .expect("autocheckpoint");
    c
}

/// A cut's connections to `path`, having read it as a cut does (so they hold
/// its SHARED lock and its log open), with their snapshot let go.
fn cut(path: &Path) -> Conns {
    let mut c = Conns::open(path, Duration::from_secs(1), |_| false).expect("conns");
    drop(c.locker.take());
    c.reader
        .execute_batch("BEGIN; SELECT count(*) FROM sqlite_schema;")
        .expect("read");
    c.reading = true;
    c.end_read(path);
    c
}

/// The application building `new.db` (one row), a cut holding it.
fn building(new: &Path) -> (Connection, Conns) {
    let a = app(new);
    a.execute_batch(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'one');",
    )
    .expect("write");
    let conns = cut(new);
    (a, conns)
}

fn wal_len(db: &Path) -> u64 {
    std::fs::metadata(side_path(db, "-wal")).map_or(0, |m| m.len())
}

fn values(db: &Path) -> Vec<String> {
    let c = Connection::open(db).expect("open");
    let mut s = c.prepare("SELECT v FROM t ORDER BY k").expect("prepare");
    s.query_map([], |r| r.get::<_, String>(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// The cut holds `new.db` when the application closes it, then `mv new.db
/// app.db`: SQLite's close of the cut's connection would see the file moved
/// and leave the restored rows in `new.db-wal`.
#[test]
fn a_database_renamed_away_while_a_cut_holds_it_keeps_its_rows() {
    let t = tempfile::tempdir().expect("tempdir");
    let (new, db) = (t.path().join("new.db"), t.path().join("app.db"));
    let (a, conns) = building(&new);
    a.execute_batch("INSERT INTO t VALUES (2, 'restored');")
        .expect("write");
    a.close().expect("close");
    assert!(wal_len(&new) > 0, "the close checkpointed: nothing tested");
    std::fs::rename(&new, &db).expect("mv");
    conns.close(&new);
    assert_eq!(wal_len(&new), 0, "frames left in new.db-wal");
    assert!(!side_path(&db, "-wal").exists());
    assert_eq!(super::integrity(&db).expect("integrity"), "ok");
    assert_eq!(values(&db), ["one", "restored"]);
}

/// The cut holds `app.db` when the application closes it (its last
/// connection), then a restored file is renamed over it: the old log, frames
/// and all, must not be left beside the new file.
#[test]
fn a_database_replaced_while_a_cut_holds_it_opens_with_its_own_content() {
    let t = tempfile::tempdir().expect("tempdir");
    let (new, db) = (t.path().join("new.db"), t.path().join("app.db"));
    let a = app(&db);
    a.execute_batch(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
         INSERT INTO t SELECT i, hex(randomblob(100)) FROM n;",
    )
    .expect("write");
    let conns = cut(&db);
    a.execute_batch("UPDATE t SET v = 'old' WHERE k % 7 = 0;")
        .expect("write");
    a.close().expect("close");
    assert!(wal_len(&db) > 0, "the close checkpointed: nothing tested");
    let n = Connection::open(&new).expect("open");
    n.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .expect("wal");
    n.execute_batch(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'restored');",
    )
    .expect("write");
    n.close().expect("close");
    std::fs::rename(&new, &db).expect("mv");
    conns.close(&db);
    assert_eq!(wal_len(&db), 0, "the old log left beside the restored file");
    assert_eq!(super::integrity(&db).expect("integrity"), "ok");
    assert_eq!(values(&db), ["restored"]);
}

/// Another process holds the moved file's log: nothing is done to it.
#[test]
fn a_moved_database_whose_log_another_process_holds_is_left_alone() {
    let t = tempfile::tempdir().expect("tempdir");
    let (new, db) = (t.path().join("new.db"), t.path().join("app.db"));
    let (a, conns) = building(&new);
    a.execute_batch("INSERT INTO t VALUES (2, 'two');")
        .expect("write");
    a.close().expect("close");
    let wal = side_path(&new, "-wal");
    let frames = wal_len(&new);
    let mut holder = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3<\"$1\"; echo ready; exec sleep 30")
        .arg("sh")
        .arg(&wal)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = std::io::BufReader::new(holder.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("ready");
    std::fs::rename(&new, &db).expect("mv");
    conns.close(&new);
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(
        wal_len(&new),
        frames,
        "a log another process holds was changed"
    );
}
