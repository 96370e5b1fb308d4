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
pub(crate) const RACY_NS: i128 = 50_000_000;

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
    /// When that read transaction (the snapshot) began.
    pub since: Option<std::time::Instant>,
    /// The log as it stood before these connections opened (`None`: there
    /// was none, and the one they made is theirs to remove).
    wal_at_open: Option<FileStamp>,
    /// The database's directory as it stood before they opened.
    dir: Option<DirBefore>,
    /// The database file both connections opened (device, inode): should it
    /// be renamed away or replaced while they hold it, their close finishes
    /// what the application's own close would have done (`moved.rs`).
    pub(super) opened: (u64, u64),
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
        let dir = DirBefore::of(path);
        let before = FileStamp::of(path);
        let open = |query_only: bool| -> Result<Connection, Error> {
            let c =
                Connection::open_with_flags(path, flags).map_err(|e| sql_err(path, "open", e))?;
            c.busy_timeout(busy)
                .map_err(|e| sql_err(path, "busy timeout", e))?;
            persist_wal(&c, path, wal_at_open.is_some())?;
            if query_only {
                // (no memory-mapped reads: the whole compare's workers read
                // through this handle's `xRead` at once, `whole.rs`)
                c.execute_batch("PRAGMA query_only = 1; PRAGMA mmap_size = 0")
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
        let reader = open(true)?;
        // Which file the two connections hold: the one at the path before and
        // after they opened, which neither of them has seen move since.
        let opened = before
            .filter(|b| FileStamp::of(path).is_some_and(|a| a.same_file(b)))
            .filter(|_| !super::moved::has_moved(&locker) && !super::moved::has_moved(&reader))
            .ok_or_else(|| Error::Sqlite {
                path: path.display().to_string(),
                msg: "replaced while it was being opened".into(),
            })?;
        Ok(Self {
            reader,
            locker: Some(locker),
            reading: false,
            since: None,
            wal_at_open,
            dir,
            opened: opened.id(),
        })
    }

    /// Ends the snapshot and closes both connections. A log past
    /// [`CHECKPOINT_BYTES`] is checkpointed first. Should this close be the
    /// database's last, a log that was there before the cut is never deleted
    /// and, with content, truncated (a stale log beside a database restored
    /// by rename would be replayed into it); one the cut made is removed, as
    /// SQLite does.
    pub fn close(mut self, path: &Path) {
        self.end_read(path);
        drop(self.locker.take());
        if super::moved::has_moved(&self.reader) {
            // SQLite's close will neither checkpoint nor remove the log of a
            // file that moved: what that close would have done is done here.
            self.after_move(path);
            if let Err((_, e)) = self.reader.close() {
                tracing::debug!("closing {}: {e}", path.display());
            }
            return;
        }
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
        if let Some(d) = self.dir.take() {
            d.restore();
        }
    }
}

/// Directories with more entries than this are not listed to tell whether
/// their times may be put back (their times are then left as they are).
const DIR_LIST_MAX: usize = 4096;

/// A database's directory before connections to it opened: the side files
/// they make and remove (a log and `-shm` beside a database that had none)
/// move its times, which are put back once they are closed when its entries
/// are the same as before (the scan that listed it, and a replica mirroring
/// it, see what the application left).
#[derive(Debug)]
pub(crate) struct DirBefore {
    dir: PathBuf,
    mtime: (i64, i64),
    names: Vec<std::ffi::OsString>,
}

impl DirBefore {
    /// The directory holding the database at `db` (`None`: unreadable, or
    /// too big to list).
    pub fn of(db: &Path) -> Option<Self> {
        let dir = db.parent()?.to_path_buf();
        let m = std::fs::symlink_metadata(&dir).ok()?;
        Some(Self {
            names: list(&dir)?,
            mtime: (m.mtime(), m.mtime_nsec()),
            dir,
        })
    }

    /// Puts the directory's modification time back if it moved while its
    /// entries stayed the same.
    pub fn restore(self) {
        let Ok(m) = std::fs::symlink_metadata(&self.dir) else {
            return;
        };
        if (m.mtime(), m.mtime_nsec()) == self.mtime || list(&self.dir) != Some(self.names) {
            return;
        }
        let flags = rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::RDONLY
            | rustix::fs::OFlags::CLOEXEC;
        let Ok(fd) = rustix::fs::open(&self.dir, flags, rustix::fs::Mode::empty()) else {
            return;
        };
        let t = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 0,
                tv_nsec: rustix::fs::UTIME_OMIT,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: self.mtime.0,
                tv_nsec: self.mtime.1,
            },
        };
        if let Err(e) = rustix::fs::futimens(&fd, &t) {
            tracing::debug!("putting back the times of {}: {e}", self.dir.display());
        }
    }
}

/// The sorted names in `dir` (`None`: unreadable, or past [`DIR_LIST_MAX`]).
fn list(dir: &Path) -> Option<Vec<std::ffi::OsString>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(dir).ok()? {
        names.push(e.ok()?.file_name());
        if names.len() > DIR_LIST_MAX {
            return None;
        }
    }
    names.sort();
    Some(names)
}

impl Conns {
    /// Ends the read transaction, if any: the snapshot is let go (and how
    /// long it was held is logged, for `benches/stall.py`).
    pub fn end_read(&mut self, path: &Path) {
        if self.reading {
            let _ = self.reader.execute_batch("COMMIT");
            self.reading = false;
            if let Some(t) = self.since.take() {
                let held_us = t.elapsed().as_micros() as u64;
                tracing::debug!(held_us, "snapshot of {} let go", path.display());
            }
        }
    }
}

/// Sets (or clears) `SQLITE_FCNTL_PERSIST_WAL` on `c`'s main database: its
/// close never deletes the log (SQLite's own flag for processes that share a
/// log with others they cannot see).
#[allow(unsafe_code)]
pub(crate) fn persist_wal(c: &Connection, path: &Path, persist: bool) -> Result<(), Error> {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

    /// The stamp of what `st` describes (a stat made through a directory
    /// descriptor).
    pub fn from_stat(st: &rustix::fs::Stat) -> Self {
        let ns = |s: i64, n: i128| i128::from(s) * 1_000_000_000 + n;
        Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: ns(st.st_mtime, i128::from(st.st_mtime_nsec)),
            ctime_ns: ns(st.st_ctime, i128::from(st.st_ctime_nsec)),
        }
    }

    /// The stamp with its ctime taken for its mtime (for a file whose
    /// ctime moves without a write).
    pub fn without_ctime(self) -> Self {
        Self {
            ctime_ns: self.mtime_ns,
            ..self
        }
    }

    /// The file's device and inode.
    pub fn id(&self) -> (u64, u64) {
        (self.dev, self.ino)
    }

    /// The later of its mtime and ctime (ns since the Unix epoch): when it
    /// was last written, as far as anyone can tell (a ctime cannot be set).
    pub fn changed_ns(self) -> i128 {
        self.mtime_ns.max(self.ctime_ns)
    }

    /// Whether `other` is the same file (device and inode).
    pub fn same_file(&self, other: &Self) -> bool {
        (self.dev, self.ino) == (other.dev, other.ino)
    }
}

/// A database file's stamp as a cut saw it, under its lock.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
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

    /// A WAL database with no log: a cut's connections make one (and a
    /// `-shm`) and remove them; the directory's mtime is what it was.
    #[test]
    fn a_cut_leaves_its_databases_directory_times_as_they_were() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("d");
        std::fs::create_dir(&dir).expect("mkdir");
        let db = dir.join("a.db");
        let c = Connection::open(&db).expect("open");
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .expect("wal");
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .expect("write");
        c.close().expect("close");
        assert!(!side_path(&db, "-wal").exists());
        let old = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 5,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1_000_000_000,
                tv_nsec: 7,
            },
        };
        rustix::fs::utimensat(rustix::fs::CWD, &dir, &old, rustix::fs::AtFlags::empty())
            .expect("utimensat");
        let conns = Conns::open(&db, Duration::from_secs(1), |_| false).expect("conns");
        conns
            .reader
            .execute_batch("BEGIN; SELECT * FROM t;")
            .expect("read");
        assert!(
            side_path(&db, "-wal").exists(),
            "no log made: nothing tested"
        );
        conns.close(&db);
        assert!(!side_path(&db, "-wal").exists());
        let m = std::fs::metadata(&dir).expect("stat");
        assert_eq!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 7));
        // a change of the application's own (a new entry) is not undone
        let conns = Conns::open(&db, Duration::from_secs(1), |_| false).expect("conns");
        std::fs::write(dir.join("other"), b"x").expect("write");
        conns.close(&db);
        let m = std::fs::metadata(&dir).expect("stat");
        assert_ne!((m.mtime(), m.mtime_nsec()), (1_000_000_000, 7));
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
