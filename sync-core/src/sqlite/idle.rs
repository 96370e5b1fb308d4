//! Partial rounds leave out the databases nobody wrote since the last cut.
//!
//! A database whose file and log both have the stamps the last cut took under
//! its lock (and times old enough then: git's racily-clean rule) is surely
//! unwritten since: its content at this cut's instant is the last cut's, so no
//! connection is opened to it. Should it be written while the cut is taken, the
//! cut is taken again with every database. Should the round ask for one of its
//! pages (a replica a few cuts behind), the page is read in a short read
//! transaction and served only if its hash is the cut's; so is a page a
//! partial round did not read ahead before letting a snapshot go (a replica
//! at a state older than every remembered cut).
//!
//! A cut taken within a clock tick of a write to the database file (its own
//! close's checkpoint, an application's) cannot vouch for the file's stamp:
//! the next cut would compare every page, on the path of the next commit.
//! [`LiveSet::restamp_due`] names such databases; the agent cuts them again
//! once they are quiet ([`RESTAMP_AFTER`]), and the next commit is then read
//! from its log frames alone.

use super::conn::{Conns, FileStamp, Seen, side_path};
use super::live::{CutStats, LiveDb, LiveSet};
use crate::{Error, RelPath};

/// Whether a log stamped `then` by the cut that took `seen`, and `now` now,
/// is surely unwritten since. The log's ctime moves when a connection opens
/// it (SQLite running as root hands it to the database's owner): its mtime,
/// size and inode tell its writes. An empty log is as good as none (each
/// connection that opens a database whose log is gone makes an empty one):
/// frames it held in between were checkpointed into the database file, whose
/// stamp then moved, or rolled back.
pub(super) fn log_unchanged(seen: Seen, then: Option<FileStamp>, now: Option<FileStamp>) -> bool {
    let log = |s: Option<FileStamp>| s.filter(|s| s.size > 0).map(FileStamp::without_ctime);
    let then = Seen {
        stamp: log(then),
        at_ns: seen.at_ns,
    };
    then.unchanged(log(now))
}

/// The stamp a cut keeps of a database file stamped `now` whose log went
/// from `old_log` to `log`: the last one (`seen`) while it still vouches for
/// both (later checks answer alike, and a saved cut state stays byte for
/// byte the same), else `now`, taken at this instant.
pub(super) fn next_seen(
    seen: Option<Seen>,
    now: Option<FileStamp>,
    old_log: Option<FileStamp>,
    log: Option<FileStamp>,
) -> Seen {
    match seen {
        Some(s) if s.unchanged(now) && log_unchanged(s, old_log, log) => s,
        _ => Seen {
            stamp: now,
            at_ns: crate::scan::now_ns(),
        },
    }
}

impl LiveDb {
    /// Whether the database file and its log are surely unwritten since the
    /// last cut.
    pub(super) fn quiet(&self) -> bool {
        let Some(seen) = self.seen.filter(|_| self.has_snapshot) else {
            return false;
        };
        let wal_now = FileStamp::of(&side_path(&self.path, "-wal"));
        seen.unchanged(FileStamp::of(&self.path)) && log_unchanged(seen, self.wal_seen, wal_now)
    }

    /// Page `pgno` of a database left out of the cut, or not read ahead
    /// before its snapshot was let go, read now in a short read transaction of
    /// a connection opened for it.
    pub(super) fn lazy_page(&self, pgno: u32) -> Result<Vec<u8>, Error> {
        let mut lazy = self.lazy.borrow_mut();
        if lazy.is_none() {
            let mut c = Conns::open(&self.path, self.busy, |_| false)?;
            drop(c.locker.take());
            *lazy = Some(c);
        }
        match lazy.as_ref() {
            Some(c) => self.validated_page(&c.reader, pgno),
            None => Err(self.written_since(pgno)),
        }
    }

    /// Page `pgno` read in a short read transaction on `r`, if it still is
    /// the cut's (its hash is).
    pub(super) fn validated_page(
        &self,
        r: &rusqlite::Connection,
        pgno: u32,
    ) -> Result<Vec<u8>, Error> {
        r.execute_batch("BEGIN")
            .map_err(|e| super::sql_err(&self.path, "begin read", e))?;
        let page = super::read_page(r, &self.path, pgno);
        let _ = r.execute_batch("COMMIT");
        let page = page?;
        let want = pgno
            .checked_sub(1)
            .and_then(|i| self.hashes.get(i as usize));
        if want == Some(&super::page_hash(pgno, &page)) {
            Ok(page)
        } else {
            Err(self.written_since(pgno))
        }
    }

    fn written_since(&self, pgno: u32) -> Error {
        Error::Sqlite {
            path: self.path.display().to_string(),
            msg: format!("page {pgno} was written since its cut: the next round ships it"),
        }
    }
}

/// How long after a round the databases [`LiveSet::restamp_due`] names are
/// cut again: past [`super::RACY_NS`], and long enough that a burst of writes
/// is over.
pub const RESTAMP_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

impl LiveSet {
    /// The databases a cut has seen whose next cut could not trust their
    /// stamps: written since their last cut, or cut too soon after a write
    /// for their file times to tell a later one. Each is worth a cut once
    /// quiet, so that the next commit's cut is read from the log alone.
    pub fn restamp_due(&self) -> Vec<RelPath> {
        self.dbs
            .iter()
            .filter(|(_, d)| d.has_snapshot && !d.quiet())
            .map(|(p, _)| p.clone())
            .collect()
    }

    /// A cut for a partial round: like [`LiveSet::cut`], but a database surely
    /// unwritten since the last cut gets no connection (its snapshot stands,
    /// and [`CutStats::changed`] leaves it out).
    pub fn cut_partial(&mut self) -> Result<CutStats, Error> {
        for db in self.dbs_mut() {
            let quiet = db.quiet();
            db.end_round();
            db.idle = quiet;
        }
        let mut stats = self.cut_marked(true)?;
        if stats.blocked.is_some() || self.dbs_mut().all(|d| !d.idle || d.quiet()) {
            return Ok(stats);
        }
        // Written while the cut was taken: its state at the cut's instant is
        // not known, so the cut is taken again with every database.
        self.end_round();
        let again = self.cut_marked(true)?;
        for p in again.changed {
            if !stats.changed.contains(&p) {
                stats.changed.push(p);
            }
        }
        stats.changed.sort();
        stats.pages_changed += again.pages_changed;
        stats.stall += again.stall;
        stats.dropped.extend(again.dropped);
        stats.pending = again.pending;
        stats.blocked = again.blocked;
        Ok(stats)
    }
}

#[cfg(test)]
impl LiveSet {
    /// Whether `path` has a connection (its cut's, or one opened for a page).
    pub(super) fn connected(&self, path: &crate::RelPath) -> bool {
        self.dbs
            .get(path)
            .is_some_and(|d| d.conns.is_some() || d.lazy.borrow().is_some())
    }

    /// How many pages of `path` were read ahead.
    pub(super) fn read_ahead(&self, path: &crate::RelPath) -> usize {
        self.dbs
            .get(path)
            .and_then(|d| d.cache.as_ref())
            .map_or(0, |c| c.len())
    }
}
