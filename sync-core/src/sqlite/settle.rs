//! A database the agent has not held before is opened only when no one is
//! writing it.
//!
//! An application that restores by rename builds `new.db`, closes it and
//! renames it over `app.db` within milliseconds. Should a cut hold `new.db` at
//! that close, the close is not the last and does not checkpoint (`moved.rs`
//! repairs that when the cut lets go; better never to be there). So a cut
//! opens a database file it has not opened before (a new path, or a new inode
//! at a known path: a restore, a delete and recreate) only once
//! - no other process holds it, its log, its `-shm` or its rollback journal
//!   open (`/proc`, [`crate::holders::maybe_held`]: a process that may not be
//!   inspected counts as a holder), twice [`SETTLE_RECHECK`] apart, with the
//!   stamps of the file, its log and its journal unchanged between: nobody
//!   is writing it and there is no close to race; or
//! - the file and its log have been quiet for [`SETTLE`]: their ctimes (which
//!   no application can set back, unlike mtimes) are that old; or
//! - it has waited [`SETTLE_MAX`]: a database written without pause (an
//!   application's working database at the agent's start) is opened all the
//!   same.
//!
//! Until then a partial round leaves it out
//! ([`CutStats::pending`](super::CutStats::pending): it is neither cut nor
//! shipped as a file, and the agent offers it again, counted as pending in its
//! lag), and a full cut waits for it.

use super::conn::{FileStamp, side_path};
use super::live::{LiveDb, LiveSet};
use std::time::{Duration, Instant};

/// How long a database file the agent has not held before, and its log, must
/// be unchanged before a cut opens it while another process holds it.
pub const SETTLE: Duration = Duration::from_secs(1);

/// How long a database may keep a cut waiting for it to be quiet: after that
/// it is opened all the same (should it then be renamed while the cut holds
/// it, the cut's close finishes the application's: `moved.rs`).
pub const SETTLE_MAX: Duration = Duration::from_secs(5);

/// How far apart the two looks at a database's holders are, between which
/// its stamps must not move, before a cut opens a file no process holds.
pub const SETTLE_RECHECK: Duration = Duration::from_millis(20);

/// How often a full cut looks again at databases it waits for.
const SETTLE_POLL: Duration = Duration::from_millis(50);

impl LiveDb {
    /// Whether a cut may open the database now (`now`: the monotonic clock):
    /// the file at its path is the one a cut opened last, or nobody holds it,
    /// or it and its log have been quiet for `settle`, or it has waited
    /// [`SETTLE_MAX`] (module docs). A path with no file is let through (the
    /// cut finds it gone).
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
        let stamps = self.stamps();
        let last = stamps
            .iter()
            .flatten()
            .map(|s| s.changed_ns())
            .max()
            .unwrap_or_default();
        let quiet = crate::scan::now_ns() - last >= settle.as_nanos() as i128;
        quiet || now.saturating_duration_since(since) >= SETTLE_MAX || self.unheld(stamps)
    }

    /// The stamps of the database file, its log and its rollback journal.
    fn stamps(&self) -> [Option<FileStamp>; 3] {
        [
            FileStamp::of(&self.path),
            FileStamp::of(&side_path(&self.path, "-wal")),
            FileStamp::of(&side_path(&self.path, "-journal")),
        ]
    }

    /// Whether no other process holds the database or a side file open, at
    /// two looks [`SETTLE_RECHECK`] apart between which `before` (its
    /// [`LiveDb::stamps`]) held still.
    fn unheld(&self, before: [Option<FileStamp>; 3]) -> bool {
        let free = |stamps: &[Option<FileStamp>; 3]| {
            let shm = FileStamp::of(&side_path(&self.path, "-shm"));
            let ids: Vec<(u64, u64)> = stamps
                .iter()
                .chain([&shm])
                .flatten()
                .map(FileStamp::id)
                .collect();
            crate::holders::maybe_held(&ids).is_ok_and(|held| !held)
        };
        if !free(&before) {
            return false;
        }
        std::thread::sleep(SETTLE_RECHECK);
        let after = self.stamps();
        after == before && free(&after)
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
    use std::path::Path;
    use std::process::{Child, Command};

    fn write(path: &Path, v: &str) {
        let c = Connection::open(path).expect("open");
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .expect("wal");
        c.execute_batch("CREATE TABLE IF NOT EXISTS t(v TEXT)")
            .expect("create");
        c.execute("INSERT INTO t VALUES (?1)", [v]).expect("insert");
    }

    /// Another process holding `file` open (a `sleep` with it on fd 3),
    /// killed and reaped on drop; returned once `/proc` shows it.
    struct Holder(Child);

    impl Holder {
        fn of(file: &Path) -> Self {
            let child = Command::new("sh")
                .arg("-c")
                .arg("exec 3<\"$1\"; exec sleep 60")
                .arg("sh")
                .arg(file)
                .spawn()
                .expect("spawn a holder");
            let h = Self(child);
            let id = FileStamp::of(file).expect("held file").id();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !crate::holders::holders_of_ids(&[id])
                .expect("/proc")
                .iter()
                .any(|p| p.pid == h.0.id())
            {
                assert!(Instant::now() < deadline, "the holder never held it");
                std::thread::sleep(Duration::from_millis(10));
            }
            h
        }
    }

    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A database no cut opened yet, held open by another process, is left
    /// out of a partial cut until it is quiet (no connection, no snapshot:
    /// pending), then cut; a file renamed over it, held, waits again while
    /// the old snapshot stands, and is cut at once when let go; writes to a
    /// file a cut opened before never make it wait.
    #[test]
    fn a_new_or_replaced_database_held_open_waits_until_quiet_or_let_go() {
        let t = tempfile::tempdir().expect("tempdir");
        let db = t.path().join("app.db");
        write(&db, "a");
        let p = RelPath::new(b"app.db").expect("path");
        let hour = Duration::from_secs(3600);
        let mut live = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(hour);
        live.track([&p]);
        let holder = Holder::of(&db);
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
        drop(holder);
        // written since through a file a cut opened: cut at once
        live.settle = hour;
        write(&db, "b");
        let stats = live.cut_partial().expect("cut");
        assert!(stats.pending.is_empty());
        assert_eq!(stats.changed, std::slice::from_ref(&p));
        let second = live.snapshot(&p).expect("snapshot");
        assert_ne!(first, second);
        live.end_round();
        // restored by rename, held: another file, which waits; the last cut
        // stands
        let new = t.path().join("new.db");
        write(&new, "restored");
        let holder = Holder::of(&new);
        std::fs::rename(&new, &db).expect("mv");
        let stats = live.cut_partial().expect("cut");
        assert_eq!(stats.pending, std::slice::from_ref(&p));
        assert!(!live.connected(&p));
        assert_eq!(live.snapshot(&p), Some(second));
        // its holder gone, it is cut at once, not an hour later
        drop(holder);
        let stats = live.cut_partial().expect("cut");
        assert!(stats.pending.is_empty());
        assert_eq!(stats.changed, std::slice::from_ref(&p));
        assert_ne!(live.snapshot(&p), Some(second));
    }

    /// A database no other process holds open is cut at once, however
    /// recently written, by a full cut and a partial one alike.
    #[test]
    fn a_new_database_nobody_holds_is_cut_at_once() {
        let t = tempfile::tempdir().expect("tempdir");
        let (a, b) = (
            RelPath::new(b"a.db").expect("path"),
            RelPath::new(b"b.db").expect("path"),
        );
        write(&t.path().join("a.db"), "a");
        let hour = Duration::from_secs(3600);
        let mut live = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(hour);
        live.track([&a]);
        let started = Instant::now();
        let stats = live.cut().expect("cut");
        assert!(started.elapsed() < SETTLE, "{:?}", started.elapsed());
        assert_eq!(stats.changed, std::slice::from_ref(&a));
        live.end_round();
        write(&t.path().join("b.db"), "b");
        live.add([&b]);
        let stats = live.cut_partial().expect("cut");
        assert!(stats.pending.is_empty(), "{:?}", stats.pending);
        assert_eq!(stats.changed, std::slice::from_ref(&b));
        assert!(live.snapshot(&b).is_some());
    }

    /// The re-check: stamps that moved between the two looks (a write by a
    /// process that opened and closed the file meanwhile) are not let through.
    #[test]
    fn a_database_written_during_the_recheck_is_not_unheld() {
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("c.db");
        write(&path, "c");
        let mut db = LiveDb::new(&path, Duration::from_secs(5));
        let before = db.stamps();
        assert!(db.unheld(before), "nobody holds it");
        write(&path, "d");
        assert_ne!(db.stamps(), before);
        assert!(!db.unheld(before));
        let _holder = Holder::of(&path);
        assert!(!db.unheld(db.stamps()), "held");
        assert!(!db.settled(Duration::from_secs(3600), Instant::now()));
    }
}
