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

use super::conn::{Conns, FileStamp, Seen, side_path};
use super::live::{CutStats, LiveDb, LiveSet};
use crate::Error;

impl LiveDb {
    /// Whether the database file and its log are surely unwritten since the
    /// last cut.
    pub(super) fn quiet(&self) -> bool {
        let Some(seen) = self.seen.filter(|_| self.has_snapshot) else {
            return false;
        };
        // The log's ctime moves when a connection opens it (SQLite running as
        // root hands it to the database's owner): its mtime, size and inode
        // tell its writes.
        let wal = Seen {
            stamp: self.wal_seen.map(FileStamp::without_ctime),
            at_ns: seen.at_ns,
        };
        let wal_now = FileStamp::of(&side_path(&self.path, "-wal")).map(FileStamp::without_ctime);
        seen.unchanged(FileStamp::of(&self.path)) && wal.unchanged(wal_now)
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

impl LiveSet {
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
