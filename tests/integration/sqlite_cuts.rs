//! What the source agent's cuts read of a live database, told by its debug
//! log: a commit is read from its log frames, not by comparing every page of
//! the file, even when the last cut came just after a writer's checkpoint wrote the
//! file (its stamp then too fresh to vouch for it).

use crate::util::*;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::Duration;

const CUT_LINE: &str = "log read under the cut's lock";

/// The source agent's lines about its cuts' log reads.
fn cut_lines(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(CUT_LINE))
        .map(str::to_owned)
        .collect()
}

/// The value of row `k`, read as an application would (`None` while it
/// cannot be read).
fn value(db: &Path, k: i64) -> Option<Vec<u8>> {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    c.query_row("SELECT v FROM t WHERE k = ?1", [k], |r| r.get(0))
        .ok()
}

#[test]
fn a_commit_after_a_checkpoint_is_cut_from_its_log_frames() {
    let p = pair();
    let db = p.src.join("app.db");
    drop(wal_table(&db, 3000, 300));
    let rlog = p.t.path().join("replica.log");
    let rep = AgentCmd::replica(&p.dst, &p.rid, &p.s_id, "127.0.0.1:0")
        .log(&rlog)
        .start();
    let slog = p.t.path().join("source.log");
    let _src = AgentCmd::source(&p.src, &p.sid, &p.r_id, &rep.addr)
        .envs(&[("UNDERSTUDY_LOG", "debug")])
        .log(&slog)
        .start();
    let diag = || std::fs::read_to_string(&slog).unwrap_or_default();
    let replica_db = p.dst.join("app.db");
    eventually_or(
        "the first mirror",
        Duration::from_secs(30),
        || value(&replica_db, 1) == value(&db, 1),
        diag,
    );
    std::thread::sleep(Duration::from_millis(300));
    // A writer commits and checkpoints its log into the file (emptied), and
    // stays open: the agent's cut follows within moments, and nothing stirs
    // after it.
    let before = cut_lines(&slog).len();
    let w = Connection::open(&db).unwrap();
    w.execute_batch("UPDATE t SET v = x'0a' WHERE k = 1; PRAGMA wal_checkpoint(TRUNCATE);")
        .unwrap();
    eventually_or(
        "a cut after the checkpoint",
        Duration::from_secs(10),
        || cut_lines(&slog).len() > before,
        diag,
    );
    // (the cut again comes 250 ms after that round)
    std::thread::sleep(Duration::from_secs(2));
    // It commits again: a new generation of the log, the file unwritten.
    let before = cut_lines(&slog).len();
    w.execute("UPDATE t SET v = x'0b' WHERE k % 30 = 0", [])
        .unwrap();
    let line = eventually_or(
        "the commit's cut",
        Duration::from_secs(10),
        || cut_lines(&slog).get(before).cloned(),
        diag,
    );
    assert!(
        line.contains("frames="),
        "the commit was not read from its log frames: {line}"
    );
    drop(w);
    eventually_or(
        "the replica to hold the commit",
        Duration::from_secs(20),
        || value(&replica_db, 30) == Some(vec![0x0b]) && value(&replica_db, 1) == Some(vec![0x0a]),
        diag,
    );
}
