//! The connections a cut opens to an application's database, and the file
//! stamps that tell whether a database was written between two cuts.
//!
//! Nothing here is held across idle time: a cut opens its connections, the
//! round that ships it reads pages from them, and [`Conns::close`] lets them
//! go. An application that closes its last connection, restores a backup by
//! rename, leaves WAL mode or changes its page size then finds the database as
//! it would without the agent.

use super::{require_dbpage, sql_err};
use crate::Error;
use rusqlite::{Connection, OpenFlags};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Past this size a log is checkpointed (PASSIVE: never waiting on, nor
/// blocking, the application) when a round is done with it, as Litestream
/// does: an application that checkpoints rarely still gets its log reset.
pub const CHECKPOINT_BYTES: u64 = 16 << 20;

/// Times within this much of the moment a stamp was taken are not trusted:
/// file times move in clock ticks, so a write in the same tick would leave
/// them equal (git's "racily clean" entries).
const RACY_NS: i128 = 50_000_000;

/// `path` with `suffix` appended (`x.db` → `x.db-wal`).
pub(crate) fn side_path(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(suffix);
    PathBuf::from(p)
}

/// One cut's connections to a database.
#[derive(Debug)]
pub(crate) struct Conns {
    /// Takes `BEGIN IMMEDIATE` for the cut; closed as soon as the cut is taken.
    pub locker: Option<Connection>,
    /// Holds the snapshot pages are read from until the round is served.
    pub reader: Connection,
    /// Whether `reader` is in a read transaction.
    pub reading: bool,
    /// The log as it stood before these connections opened (`None`: there
    /// was none, and the one they made is theirs to remove).
    wal_at_open: Option<FileStamp>,
}

impl Conns {
    /// Opens the locker and the reader of a cut of the database at `path`.
    pub fn open(path: &Path, busy: Duration, spin: fn(i32) -> bool) -> Result<Self, Error> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        // A log that exists is the application's: never delete it (its
        // process may have lost its POSIX locks and still be writing to it).
        let wal_at_open = FileStamp::of(&side_path(path, "-wal"));
        let open = |query_only: bool| -> Result<Connection, Error> {
            let c =
                Connection::open_with_flags(path, flags).map_err(|e| sql_err(path, "open", e))?;
            c.busy_timeout(busy)
                .map_err(|e| sql_err(path, "busy timeout", e))?;
            persist_wal(&c, path, wal_at_open.is_some())?;
            if query_only {
                c.execute_batch("PRAGMA query_only = 1")
                    .map_err(|e| sql_err(path, "query_only", e))?;
            }
            Ok(c)
        };
        let mut locker = open(false)?;
        // Retry the cut's lock every 100 µs rather than SQLite's default steps
        // (up to 100 ms): a writer committing in a tight loop leaves gaps of
        // microseconds, and a cut must not starve behind it.
        locker
            .busy_handler(Some(spin))
            .map_err(|e| sql_err(path, "busy handler", e))?;
        require_dbpage(&locker, path)?;
        Ok(Self {
            reader: open(true)?,
            locker: Some(locker),
            reading: false,
            wal_at_open,
        })
    }

    /// Ends the snapshot and closes both connections. A log past
    /// [`CHECKPOINT_BYTES`] is checkpointed first. Should this close be the
    /// database's last, a log that was there before the cut is never deleted
    /// and, with content, truncated (a stale log beside a database restored
    /// by rename would be replayed into it); one the cut made is removed, as
    /// SQLite does.
    pub fn close(mut self, path: &Path) {
        if self.reading {
            let _ = self.reader.execute_batch("COMMIT");
            self.reading = false;
        }
        drop(self.locker.take());
        let now = FileStamp::of(&side_path(path, "-wal"));
        let theirs = matches!((self.wal_at_open, now), (Some(a), Some(b)) if a.same_file(&b));
        if let Err(e) = persist_wal(&self.reader, path, theirs) {
            tracing::debug!("{e}");
        }
        let wal = now.map_or(0, |s| s.size);
        if wal > CHECKPOINT_BYTES {
            let _ = self
                .reader
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        }
        if theirs && wal > 0 {
            let _ = self
                .reader
                .query_row("PRAGMA journal_size_limit = 0", [], |_| Ok(()));
        }
        if let Err((_, e)) = self.reader.close() {
            tracing::debug!("closing {}: {e}", path.display());
        }
    }
}

/// Sets (or clears) `SQLITE_FCNTL_PERSIST_WAL` on `c`'s main database: its
/// close never deletes the log (SQLite's own flag for processes that share a
/// log with others they cannot see).
#[allow(unsafe_code)]
fn persist_wal(c: &Connection, path: &Path, persist: bool) -> Result<(), Error> {
    let mut on: std::ffi::c_int = persist.into();
    // SAFETY: `handle()` is the live sqlite3* of `c`, used on this thread
    // only while `c` is borrowed; the name is a NUL-terminated literal and the
    // argument points to an int, as SQLITE_FCNTL_PERSIST_WAL requires.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_file_control(
            c.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_FCNTL_PERSIST_WAL,
            (&raw mut on).cast(),
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(Error::Sqlite {
            path: path.display().to_string(),
            msg: format!("setting SQLITE_FCNTL_PERSIST_WAL failed (code {rc})"),
        })
    }
}

/// What a stat of a file says about its identity and its last write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStamp {
    dev: u64,
    ino: u64,
    pub size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    /// The stamp of the file at `path` (`None`: no file there).
    pub fn of(path: &Path) -> Option<Self> {
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(Self {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }

    /// Whether `other` is the same file (device and inode).
    pub fn same_file(&self, other: &Self) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// A database file's stamp as a cut saw it, under its lock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seen {
    pub stamp: Option<FileStamp>,
    /// When the stamp was taken (ns since the Unix epoch).
    pub at_ns: i128,
}

impl Seen {
    /// Whether the file is surely unwritten since: the same stamp, with times
    /// old enough at the time it was taken that a later write would have
    /// moved them.
    pub fn unchanged(&self, now: Option<FileStamp>) -> bool {
        now == self.stamp
            && self
                .stamp
                .is_none_or(|s| s.mtime_ns.max(s.ctime_ns) < self.at_ns - RACY_NS)
    }

    /// Whether the file at the path is another one than the stamp's.
    pub fn replaced_by(&self, now: Option<FileStamp>) -> bool {
        match (self.stamp, now) {
            (Some(a), Some(b)) => !a.same_file(&b),
            (a, b) => a.is_some() != b.is_some(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(mtime_ns: i128) -> FileStamp {
        FileStamp {
            dev: 1,
            ino: 2,
            size: 4096,
            mtime_ns,
            ctime_ns: mtime_ns,
        }
    }

    #[test]
    fn a_stamp_is_trusted_only_when_old_enough_when_taken() {
        let s = stamp(1_000_000_000);
        let old = Seen {
            stamp: Some(s),
            at_ns: 2_000_000_000,
        };
        assert!(old.unchanged(Some(s)));
        assert!(!old.unchanged(Some(stamp(1_000_000_001))));
        assert!(!old.unchanged(None));
        // taken within the same clock tick as the last write: a second write
        // in that tick would leave the same times, so it proves nothing
        let racy = Seen {
            stamp: Some(s),
            at_ns: 1_000_000_000 + RACY_NS / 2,
        };
        assert!(!racy.unchanged(Some(s)));
        let none = Seen {
            stamp: None,
            at_ns: 5,
        };
        assert!(none.unchanged(None));
    }

    #[test]
    fn replacement_is_a_new_inode_or_a_file_appearing_or_vanishing() {
        let s = stamp(1);
        let seen = Seen {
            stamp: Some(s),
            at_ns: 10,
        };
        assert!(!seen.replaced_by(Some(stamp(99))));
        let mut other = s;
        other.ino = 3;
        assert!(seen.replaced_by(Some(other)));
        assert!(seen.replaced_by(None));
    }

    #[test]
    fn persist_wal_keeps_the_log_of_the_last_connection() {
        let t = tempfile::tempdir().expect("tempdir");
        let db = t.path().join("a.db");
        let c = Connection::open(&db).expect("open");
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .expect("wal");
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .expect("write");
        persist_wal(&c, &db, true).expect("persist");
        c.close().expect("close");
        assert!(side_path(&db, "-wal").exists(), "log deleted on close");
        // without the flag the last close removes it
        let c = Connection::open(&db).expect("open");
        c.execute_batch("INSERT INTO t VALUES (2);").expect("write");
        c.close().expect("close");
        assert!(!side_path(&db, "-wal").exists());
    }
}
