//! Do no harm at the source (DESIGN §2.13): the agent's connections to the
//! application's databases exist only while a cut needs them, so what the
//! application does to its own database works as it does without the agent:
//! restoring a backup by rename, leaving WAL mode, letting its log reset; and
//! an application that lost its locks never has its log deleted under it.

use crate::util::*;
use rusqlite::{Connection, OpenFlags};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use sync_core::RelPath;
use sync_core::sqlite::LiveSet;

fn side(db: &Path, suffix: &str) -> PathBuf {
    let mut p = db.as_os_str().to_os_string();
    p.push(suffix);
    p.into()
}

fn wal_len(db: &Path) -> u64 {
    std::fs::metadata(side(db, "-wal")).map_or(0, |m| m.len())
}

fn rows(db: &Path, sql: &str) -> Option<Vec<String>> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let mut s = c.prepare(sql).ok()?;
    s.query_map([], |r| r.get::<_, String>(0))
        .ok()?
        .collect::<Result<Vec<_>, _>>()
        .ok()
}

/// Waits until `f` holds, or panics naming `what` after `secs`.
fn eventually(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not after {secs} s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_log_is_never_deleted_under_an_application_that_lost_its_locks() {
    let t = tempfile::tempdir().unwrap();
    let db = t.path().join("app.db");
    let mut holder = Command::new(bin("sqlite_holder"))
        .arg(&db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let log = std::fs::metadata(side(&db, "-wal")).unwrap();
    // A cut, its round over: our connections close last (the holder's locks
    // are gone, so SQLite thinks nobody else has the database open).
    let rel = RelPath::new(b"app.db").unwrap();
    let mut live = LiveSet::new(t.path(), Duration::from_secs(5));
    live.track([&rel]);
    live.cut().unwrap();
    live.end_round();
    drop(live);
    use std::os::unix::fs::MetadataExt;
    let now = std::fs::metadata(side(&db, "-wal")).expect("the application's log was deleted");
    assert_eq!(now.ino(), log.ino(), "the application's log was replaced");
    // The application goes on writing through its connection; anyone opening
    // the database sees it.
    let mut stdin = holder.stdin.take().unwrap();
    writeln!(stdin, "after").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "wrote");
    let seen = rows(&db, "SELECT x FROM t ORDER BY rowid").unwrap();
    assert_eq!(seen, ["before", "after"]);
    drop(stdin);
    assert!(holder.wait().unwrap().success());
}

struct Live {
    _t: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    _agents: (Agent, Agent),
}

/// A source and a replica agent over `src` holding `app.db` (WAL) as made by
/// `make`, converged.
fn agents(make: impl FnOnce(&Path)) -> Live {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    make(&src.join("app.db"));
    let (sid, s_id, rid, r_id) = identities(t.path());
    let rep = replica(&dst, &rid, &s_id, &[]);
    let s = source(&src, &sid, &r_id, &rep.addr, &[]);
    let db = dst.join("app.db");
    eventually(30, "first mirror of app.db", || {
        rows(&db, "SELECT count(*) || '' FROM t").is_some()
    });
    Live {
        _t: t,
        src,
        dst,
        _agents: (rep, s),
    }
}

fn app_db(path: &Path) {
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

#[test]
fn with_the_agent_running_a_restore_by_rename_and_a_journal_mode_change_work() {
    let l = agents(app_db);
    let db = l.src.join("app.db");
    // The application writes, then closes for the restore.
    let app = Connection::open(&db).unwrap();
    app.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    for i in 0..50 {
        app.execute(
            "UPDATE t SET v = hex(randomblob(200)) WHERE k % 50 = ?1",
            [i],
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    let last: String = app
        .query_row("SELECT v FROM t WHERE k = 49", [], |r| r.get(0))
        .unwrap();
    // Once the agent is idle it holds nothing: the application's close is the
    // last, and it checkpoints and removes its log as it would alone.
    let rep = l.dst.join("app.db");
    eventually(30, "the last update on the replica", || {
        rows(&rep, "SELECT v FROM t WHERE k = 49").is_some_and(|r| r == [last.clone()])
    });
    // (reading the replica's copy above made it refuse updates for a moment;
    // the source re-offers it within 250 ms)
    std::thread::sleep(Duration::from_millis(1500));
    drop(app);
    // (the agent's own cut, raised by that close's checkpoint, may be making
    // an empty log of its own at this instant: only frames would do harm)
    assert_eq!(wal_len(&db), 0, "the application's last close left its log");
    let new = l.src.join("new.db");
    let n = Connection::open(&new).unwrap();
    n.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    n.execute_batch(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT); INSERT INTO t VALUES (1, 'restored');",
    )
    .unwrap();
    drop(n);
    std::fs::rename(&new, &db).unwrap();
    assert_eq!(wal_len(&db), 0, "a stale log beside the restored database");
    assert_eq!(sync_core::sqlite::integrity(&db).unwrap(), "ok");
    // Had the agent held new.db open at the application's close (so that
    // close was not the last and did not checkpoint) and let go only after
    // the mv, the restored rows would have stayed in new.db-wal.
    assert_eq!(
        rows(&db, "SELECT v FROM t"),
        Some(vec!["restored".to_string()]),
        "the restore lost its rows at the source (new.db's log left behind)"
    );
    eventually(30, "the restored database on the replica", || {
        rows(&rep, "SELECT v FROM t").is_some_and(|r| r == ["restored"])
    });
    // No side file of new.db travelled.
    std::thread::sleep(Duration::from_millis(300));
    for s in ["new.db-wal", "new.db-shm"] {
        assert!(!l.dst.join(s).exists(), "{s} mirrored");
    }
    // The application leaves WAL mode while the agent runs (it failed 20 times
    // in 20 over 10 s when the agent held its connections).
    let app = Connection::open(&db).unwrap();
    app.busy_timeout(Duration::from_secs(2)).unwrap();
    let started = Instant::now();
    let mode: String = app
        .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete", "took {:?}", started.elapsed());
    app.execute("UPDATE t SET v = 'rollback mode' WHERE k = 1", [])
        .unwrap();
    drop(app);
    eventually(30, "the change made in rollback mode", || {
        rows(&rep, "SELECT v FROM t").is_some_and(|r| r == ["rollback mode"])
    });
    assert_eq!(sync_core::sqlite::integrity(&db).unwrap(), "ok");
}

#[test]
fn with_the_agent_running_the_log_of_a_busy_writer_stays_small() {
    let l = agents(app_db);
    let db = l.src.join("app.db");
    let app = Connection::open(&db).unwrap();
    let (mut biggest, mut pages_written) = (0u64, 0u64);
    let started = Instant::now();
    let mut i = 0;
    // ~10 pages a commit, ~3 MB/s for 10 s (the outside run's writer): 30 MB
    // of log were it never reset (a snapshot pinned from one cut to the next
    // forbids the reset); some 4 MB without the agent.
    while started.elapsed() < Duration::from_secs(10) {
        app.execute(
            "UPDATE t SET v = hex(randomblob(200)) WHERE k % 100 = ?1",
            [i % 100],
        )
        .unwrap();
        pages_written += 10;
        i += 1;
        biggest = biggest.max(wal_len(&db));
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!(
        "log at most {:.1} MB over {} commits (~{} MB of pages written)",
        biggest as f64 / 1e6,
        i,
        pages_written * 4096 / 1_000_000
    );
    assert!(biggest < 12 << 20, "the log grew to {biggest} bytes");
    let last: String = app
        .query_row("SELECT v FROM t WHERE k = 100", [], |r| r.get(0))
        .unwrap();
    drop(app);
    eventually(30, "the last commit on the replica", || {
        rows(&l.dst.join("app.db"), "SELECT v FROM t WHERE k = 100")
            .is_some_and(|r| r == [last.clone()])
    });
}

/// Once the source is idle, its agent holds nothing of a database open: no
/// snapshot pins the application's log (a TRUNCATE checkpoint is not kept
/// busy) and no connection of the agent is left on the file, even for a
/// database larger than what a round reads ahead (whose snapshot stays open
/// while its round is served), after rounds that shipped nothing.
#[test]
fn an_idle_agent_holds_no_database_open() {
    let l = agents(|p| {
        app_db(p);
        // past the 32 MiB a round reads ahead of a snapshot it then lets go
        Connection::open(p)
            .unwrap()
            .execute_batch(
                "CREATE TABLE pad(b BLOB);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 10000)
                 INSERT INTO pad SELECT randomblob(4000) FROM n;",
            )
            .unwrap();
    });
    let db = l.src.join("app.db");
    let app = Connection::open(&db).unwrap();
    app.execute("UPDATE t SET v = 'x' WHERE k = 1", []).unwrap();
    eventually(30, "the commit on the replica", || {
        rows(&l.dst.join("app.db"), "SELECT v FROM t WHERE k = 1").is_some_and(|r| r == ["x"])
    });
    // rounds with nothing to ship while the database is still recent (it is
    // cut again each time): a file made and removed at once
    for _ in 0..5 {
        std::fs::write(l.src.join("noise"), b"n").unwrap();
        std::fs::remove_file(l.src.join("noise")).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(1));
    let pid = l._agents.1.child.id();
    let held: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(&l.src))
        .collect();
    assert!(held.is_empty(), "the idle source agent holds {held:?}");
    let (busy, _, _): (i64, i64, i64) = app
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert_eq!(
        busy, 0,
        "a reader of the agent's kept the log from being reset"
    );
}
