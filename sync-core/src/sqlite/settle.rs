//! A database the agent has not held before waits until it is quiet.
//!
//! An application that restores by rename builds `new.db`, closes it and
//! renames it over `app.db` within milliseconds. Should a cut hold `new.db` at
//! that close, the close is not the last and does not checkpoint (`moved.rs`
//! repairs that when the cut lets go; better never to be there). So a cut
//! opens a database file it has not opened before (a new path, or a new inode
//! at a known path: a restore, a delete and recreate) only once the file and
//! its log have been quiet for [`SETTLE`]: their ctimes (which no application
//! can set back, unlike mtimes) are that old. Until then a partial round
//! leaves it out ([`CutStats::pending`](super::CutStats::pending): it is
//! neither cut nor shipped as a file, and the agent offers it again, counted
//! as pending in its lag), and a full cut waits for it. A database written
//! without pause (an application's working database at the agent's start)
//! is opened all the same after [`SETTLE_MAX`].

use super::conn::{FileStamp, side_path};
use super::live::{LiveDb, LiveSet};
use std::time::{Duration, Instant};

/// How long a database file the agent has not held before, and its log, must
/// be unchanged before a cut opens it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// How long a database may keep a cut waiting for it to be quiet: after that
/// it is opened all the same (should it then be renamed while the cut holds
/// it, the cut's close finishes the application's: `moved.rs`).
pub const SETTLE_MAX: Duration = Duration::from_secs(5);

/// How often a full cut looks again at databases it waits for.
const SETTLE_POLL: Duration = Duration::from_millis(50);

impl LiveDb {
    /// Whether a cut may open the database now (`now`: the monotonic clock):
    /// the file at its path is the one a cut opened last, or it and its log
    /// have been quiet for `settle`, or it has waited [`SETTLE_MAX`]. A path
    /// with no file is let through (the cut finds it gone).
    pub(super) fn settled(&mut self, settle: Duration, now: Instant) -> bool {
        let Some(db) = FileStamp::of(&self.path) else {
            return true;
        };
        if settle.is_zero() || self.settled_id == Some(db.id()) {
            return true;
        }
        let since = match self.pending_since {
            Some((id, t)) if id == db.id() => t,
            _ => {
                self.pending_since = Some((db.id(), now));
                now
            }
        };
        let wal = FileStamp::of(&side_path(&self.path, "-wal"));
        let last = [Some(db), wal]
            .into_iter()
            .flatten()
            .map(FileStamp::changed_ns)
            .max()
            .unwrap_or_default();
        let quiet = crate::scan::now_ns() - last >= settle.as_nanos() as i128;
        quiet || now.saturating_duration_since(since) >= SETTLE_MAX
    }
}

impl LiveSet {
    /// Waits (at most [`SETTLE_MAX`]) until every database may be opened.
    pub(super) fn wait_settled(&mut self) {
        let started = Instant::now();
        let settle = self.settle;
        while started.elapsed() < SETTLE_MAX
            && self.dbs_mut().any(|d| !d.settled(settle, Instant::now()))
        {
            std::thread::sleep(SETTLE_POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RelPath;
    use rusqlite::Connection;

    fn write(path: &std::path::Path, v: &str) {
        let c = Connection::open(path).expect("open");
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .expect("wal");
        c.execute_batch("CREATE TABLE IF NOT EXISTS t(v TEXT)")
            .expect("create");
        c.execute("INSERT INTO t VALUES (?1)", [v]).expect("insert");
    }

    /// A database no cut opened yet is left out of a partial cut until it
    /// is quiet (no connection, no snapshot: pending), then cut; a file
    /// renamed over it waits again while the old snapshot stands; writes to
    /// a file a cut opened before never make it wait.
    #[test]
    fn a_new_or_replaced_database_waits_until_quiet() {
        let t = tempfile::tempdir().expect("tempdir");
        let db = t.path().join("app.db");
        write(&db, "a");
        let p = RelPath::new(b"app.db").expect("path");
        let hour = Duration::from_secs(3600);
        let mut live = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(hour);
        live.track([&p]);
        let stats = live.cut_partial().expect("cut");
        assert_eq!(stats.pending, std::slice::from_ref(&p));
        assert!(stats.changed.is_empty());
        assert!(!live.connected(&p), "a new database was opened");
        assert!(live.snapshot(&p).is_none());
        live.settle = Duration::from_nanos(1);
        let stats = live.cut_partial().expect("cut");
        assert!(stats.pending.is_empty());
        let first = live.snapshot(&p).expect("cut once quiet");
        live.end_round();
        // written since through a file a cut opened: cut at once
        live.settle = hour;
        write(&db, "b");
        let stats = live.cut_partial().expect("cut");
        assert!(stats.pending.is_empty());
        assert_eq!(stats.changed, std::slice::from_ref(&p));
        let second = live.snapshot(&p).expect("snapshot");
        assert_ne!(first, second);
        live.end_round();
        // restored by rename: another file, which waits; the last cut stands
        let new = t.path().join("new.db");
        write(&new, "restored");
        std::fs::rename(&new, &db).expect("mv");
        let stats = live.cut_partial().expect("cut");
        assert_eq!(stats.pending, std::slice::from_ref(&p));
        assert!(!live.connected(&p));
        assert_eq!(live.snapshot(&p), Some(second));
        live.settle = Duration::from_nanos(1);
        let stats = live.cut_partial().expect("cut");
        assert_eq!(stats.changed, std::slice::from_ref(&p));
        assert_ne!(live.snapshot(&p), Some(second));
    }
}
