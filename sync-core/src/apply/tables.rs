//! The replica's database page tables: kept in memory by the file's stat, and
//! vouched for by stamps that may be saved for the next process
//! ([`tables_file`](super::tables_file)).
//!
//! A page table is what a round compares and stages pages against, and what
//! the quick digest counts a database by; learning it means reading and
//! hashing the whole database. In one process a table is reused while the
//! file's (inode, size, mtime) stays. To outlive the process it needs a
//! proof: the full stamps (device, inode, size, mtime, ctime) of the file and
//! of its `-wal` and `-journal` (absent, or as they were), taken at a moment
//! when their times were older than that moment by `RACY_NS` — the rule of
//! the source's cut state (`Seen::unchanged`): any write after the stamps
//! moves a time, so stamps found the same later prove the file unwritten.

use super::{Replica, db::db_stamp};
use crate::sqlite::{self, FileStamp, PageTable, Seen};
use crate::{Error, RelPath};
use rustix::fs::AtFlags;
use std::fs::File;
use std::os::fd::{AsFd as _, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// The stamps of a database file, its `-wal` and its `-journal` (`None`:
/// no such file).
pub(super) type Stamps = [Option<FileStamp>; 3];

/// The side files whose content SQLite reads as the database's (a log) or
/// rolls back into it (a hot journal).
const SIDES: [&[u8]; 2] = [b"-wal", b"-journal"];

/// Why a cached table describes its database beyond this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Proof {
    /// `stamps`, taken at `at_ns` when their times were old enough: the table
    /// describes the files as long as their stamps are these.
    Seen { stamps: Stamps, at_ns: i128 },
    /// The stamps right after this replica wrote the table's content
    /// itself: vouched for once they are old enough and still the same.
    Written(Stamps),
}

impl Proof {
    /// Whether files now stamped `now` are surely unwritten since the proof.
    pub(super) fn holds(stamps: &Stamps, at_ns: i128, now: &Stamps) -> bool {
        stamps
            .iter()
            .zip(now)
            .all(|(s, n)| Seen { stamp: *s, at_ns }.unchanged(*n))
    }
}

/// A page table held in memory.
#[derive(Debug)]
pub(super) struct Cached {
    /// The file's (inode, size, mtime) when the table was learned or kept.
    pub stamp: super::DbStamp,
    pub table: Arc<PageTable>,
    /// `None`: nothing vouches for it beyond this process.
    pub proof: Option<Proof>,
}

/// The stamps of `name` in `dir` and of its side files.
pub(super) fn stamps_at(dir: BorrowedFd<'_>, name: &[u8]) -> Stamps {
    let at = |n: &[u8]| {
        rustix::fs::statat(dir, n, AtFlags::SYMLINK_NOFOLLOW)
            .ok()
            .map(|st| FileStamp::from_stat(&st))
    };
    let side = |s: &[u8]| at(&[name, s].concat());
    [at(name), side(SIDES[0]), side(SIDES[1])]
}

impl Replica {
    /// The database the replica holds at `path` (page hashes cached by inode,
    /// size and mtime, or taken from the saved tables when their stamps
    /// vouch for them), or `None` when there is none SQLite can open.
    pub fn page_table(&self, path: &RelPath) -> Result<Option<Arc<PageTable>>, Error> {
        let (dir, parent, name) = self.parent(path)?;
        let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(Error::io("stat", self.display(path), e)),
        };
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Ok(None);
        }
        let stamp = db_stamp(&st);
        if let Ok(c) = self.db_cache.lock()
            && let Some(e) = c.get(path)
            && e.stamp == stamp
        {
            return Ok(Some(e.table.clone()));
        }
        if let Some((table, proof)) = self.saved_table(path, dir.as_fd(), name) {
            self.cache(path, stamp, table.clone(), Some(proof));
            return Ok(Some(table));
        }
        // SQLite may create and remove side files beside it: the directory's
        // mtime is put back with the round's directories.
        self.touch(parent);
        let at_ns = crate::scan::now_ns();
        let before = stamps_at(dir.as_fd(), name);
        self.db_reads.fetch_add(1, Ordering::Relaxed);
        let table = sqlite::read_hashes(&self.db_path(path))?.map(Arc::new);
        let after = stamps_at(dir.as_fd(), name);
        // Vouched for only when nothing moved while it was read, and the
        // stamps taken before were old enough.
        let proof = Proof::holds(&before, at_ns, &after).then_some(Proof::Seen {
            stamps: before,
            at_ns,
        });
        if let Some(h) = &table {
            self.cache(path, stamp, h.clone(), proof);
        }
        Ok(table)
    }

    /// How many times a database was read whole to learn its page table
    /// (what the saved tables spare a new process).
    pub fn databases_read(&self) -> u64 {
        self.db_reads.load(Ordering::Relaxed)
    }

    /// How many runs of database pages were read ahead of the updates
    /// that overwrote them (see `direct::prefetch`).
    #[must_use]
    pub fn runs_read_ahead(&self) -> u64 {
        self.read_ahead.load(Ordering::Relaxed)
    }

    fn cache(
        &self,
        path: &RelPath,
        stamp: super::DbStamp,
        table: Arc<PageTable>,
        proof: Option<Proof>,
    ) {
        if let Ok(mut c) = self.db_cache.lock() {
            c.insert(
                path.clone(),
                Cached {
                    stamp,
                    table,
                    proof,
                },
            );
        }
    }

    /// The table of a database this replica has just written (`name` in
    /// `dir`, its metadata set): kept under its stat, with the stamps it has
    /// now as its proof once they are old enough.
    pub(super) fn cache_written(
        &self,
        path: &RelPath,
        dir: BorrowedFd<'_>,
        name: &[u8],
        table: Arc<PageTable>,
    ) {
        if let Ok(st) = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            let proof = Proof::Written(stamps_at(dir, name));
            self.cache(path, db_stamp(&st), table, Some(proof));
        }
    }

    /// A file whose metadata was just set through `f` (its stat `before`
    /// that): a page table cached for that stat describes it still (only its
    /// times or owner moved), and is kept under its new stat, so the next
    /// round does not hash every page again. Its proof holds on as this
    /// replica's own write when it vouched for the file as it was.
    pub(super) fn keep_db_table(&self, path: &RelPath, before: &rustix::fs::Stat, f: &File) {
        let Ok(mut c) = self.db_cache.lock() else {
            return;
        };
        if let (Some(e), Ok(after)) = (c.get_mut(path), rustix::fs::fstat(f))
            && e.stamp == db_stamp(before)
        {
            e.stamp = db_stamp(&after);
            let was = Some(FileStamp::from_stat(before));
            e.proof = match e.proof.take() {
                Some(Proof::Seen { stamps, .. } | Proof::Written(stamps)) if stamps[0] == was => {
                    Some(Proof::Written([
                        Some(FileStamp::from_stat(&after)),
                        stamps[1],
                        stamps[2],
                    ]))
                }
                _ => None,
            };
        }
    }
}

#[cfg(test)]
#[path = "tables_tests.rs"]
mod tests;
