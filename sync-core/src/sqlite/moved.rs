//! A database renamed away or replaced while a cut's connections held it.
//!
//! An application that restores a backup by rename builds `new.db` (WAL),
//! closes it and runs `mv new.db app.db`. Its close checkpoints the log into
//! the file and removes it only when that close is the database's last (SQLite
//! tells by taking an EXCLUSIVE lock on the database file; in WAL mode every
//! connection holds a SHARED lock on it for its whole life). Should a cut hold
//! the file at that moment, the close is not the last and leaves the frames in
//! `new.db-wal`; once the file has moved, SQLite's close of the cut's
//! connection sees that (`SQLITE_FCNTL_HAS_MOVED`) and neither checkpoints nor
//! removes the log, so the restored rows would stay stranded in a log nobody
//! pairs with `app.db`. The mirror case: an application closing `app.db` while
//! a cut holds it, then renaming a restored file over it, leaves the old log
//! with its frames beside the new file, and SQLite would replay them into it
//! ("How To Corrupt An SQLite Database File" §1–2: a log must never meet a
//! database it does not belong to).
//!
//! So when the cut's last connection closes on a file that moved, it does what
//! the application's close would have done, under the same rule SQLite uses to
//! decide it: an EXCLUSIVE lock on the database file, taken through the
//! connection's own file handle (never a descriptor of ours: closing one would
//! drop the process's POSIX locks, §2.2). Granted, no other connection in any
//! process holds that file (each would hold its SHARED lock), and none can
//! start reading it until we let go. A process that lost its POSIX locks would
//! not show in the lock, so `/proc` is also asked whether any other process
//! holds the file, its log or its `-shm` open; if one does, nothing is done
//! and a warning names it. Otherwise `PRAGMA wal_checkpoint(TRUNCATE)` through
//! our connection copies the frames into the file it has open (the moved one,
//! wherever its name now is: the restored database, or an unlinked old file)
//! and empties the log, so no frames are stranded and no stale log is left
//! beside a replacement. The emptied log and `-shm` stay under their old names
//! (removing them by name could remove another database's, made there since):
//! SQLite takes an empty log for none and rebuilds a `-shm`.

use super::conn::{Conns, FileStamp, side_path};
use rusqlite::{Connection, ffi};
use std::path::Path;
use std::time::Duration;

/// How long the checkpoint of a moved database's log may wait on a lock of
/// its log (no other process holds it, so it should not wait at all).
const MOVED_BUSY: Duration = Duration::from_millis(200);

/// Whether the database file `c` has open is no longer at the name it was
/// opened by (renamed away, replaced or deleted): SQLite's own test, the one
/// that makes its close skip the checkpoint. `false` when it cannot tell.
#[allow(unsafe_code)]
pub(super) fn has_moved(c: &Connection) -> bool {
    let mut moved: std::ffi::c_int = 0;
    // SAFETY: `handle()` is the live sqlite3* of `c`, used on this thread
    // only while `c` is borrowed; the name is a NUL-terminated literal and the
    // argument points to an int, as SQLITE_FCNTL_HAS_MOVED requires.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            c.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_HAS_MOVED,
            (&raw mut moved).cast(),
        )
    };
    rc == ffi::SQLITE_OK && moved != 0
}

/// SQLite's own handle of the main database file of `c` (`None`: it has
/// none). Valid while `c` is open, for use on `c`'s thread between its
/// statements.
#[allow(unsafe_code)]
pub(super) fn main_file(c: &Connection) -> Option<*mut ffi::sqlite3_file> {
    let mut file: *mut ffi::sqlite3_file = std::ptr::null_mut();
    // SAFETY: `handle()` is the live sqlite3* of `c`, used on this thread
    // only while `c` is borrowed; SQLITE_FCNTL_FILE_POINTER writes one
    // pointer to the argument, which points to a pointer.
    let rc = unsafe {
        ffi::sqlite3_file_control(
            c.handle(),
            c"main".as_ptr(),
            ffi::SQLITE_FCNTL_FILE_POINTER,
            (&raw mut file).cast(),
        )
    };
    (rc == ffi::SQLITE_OK && !file.is_null()).then_some(file)
}

/// Takes (`lock`) or lowers to (`!lock`) the lock `level` on the main
/// database file of `c` through SQLite's own handle of it (its VFS's
/// `xLock`/`xUnlock`, as the pager does). The VFS's answer code.
#[allow(unsafe_code)]
fn vfs_lock(c: &Connection, level: std::ffi::c_int, lock: bool) -> std::ffi::c_int {
    let Some(file) = main_file(c) else {
        return ffi::SQLITE_ERROR;
    };
    // SAFETY: `file` is the open sqlite3_file of `c`'s main database, which
    // stays open while `c` is borrowed; its methods are SQLite's VFS's.
    let methods = unsafe { (*file).pMethods.as_ref() };
    let f = methods.and_then(|m| if lock { m.xLock } else { m.xUnlock });
    match f {
        // SAFETY: `file` is valid (above); called on the connection's own
        // thread, between its statements, with one of SQLite's lock levels.
        Some(f) => unsafe { f(file, level) },
        None => ffi::SQLITE_ERROR,
    }
}

impl Conns {
    /// The database at `path` moved while these connections held it, and they
    /// are about to close: the log of the file they hold is checkpointed into
    /// it and emptied, when no one else holds the file or the log (module
    /// docs). Called with the locker closed and no read transaction open.
    pub(super) fn after_move(&mut self, path: &Path) {
        let wal = side_path(path, "-wal");
        // A log with no frames strands nothing and pairs with nothing.
        let Some(log) = FileStamp::of(&wal).filter(|s| s.size > 0) else {
            return;
        };
        let shm = FileStamp::of(&side_path(path, "-shm"));
        let ids: Vec<(u64, u64)> = [Some(self.opened), Some(log.id()), shm.map(|s| s.id())]
            .into_iter()
            .flatten()
            .collect();
        match crate::holders::holders_of_ids(&ids) {
            Ok(h) if h.is_empty() => {}
            Ok(h) => {
                let h: Vec<String> = h.iter().map(ToString::to_string).collect();
                tracing::warn!(
                    "database {} was renamed away or replaced while a cut held it, and {} \
                     still holds it or its log {}: left as it is (that log may hold frames \
                     of the moved file)",
                    path.display(),
                    h.join(", "),
                    wal.display()
                );
                return;
            }
            Err(e) => {
                tracing::warn!(
                    "database {} was renamed away or replaced while a cut held it; who \
                     else holds it or its log {} is unknown ({e}): left as it is",
                    path.display(),
                    wal.display()
                );
                return;
            }
        }
        // SHARED first (a no-op when the pager holds it already, as a WAL
        // connection that has read does), then EXCLUSIVE: SQLite's own test
        // of a last close. BUSY: another connection (ours or the
        // application's) still holds the file, and its close is the last.
        let granted = vfs_lock(&self.reader, ffi::SQLITE_LOCK_SHARED, true) == ffi::SQLITE_OK
            && vfs_lock(&self.reader, ffi::SQLITE_LOCK_EXCLUSIVE, true) == ffi::SQLITE_OK;
        let done = granted.then(|| {
            let _ = self.reader.busy_timeout(MOVED_BUSY);
            let _ = self.reader.execute_batch("PRAGMA query_only = 0");
            self.reader
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                })
        });
        // Back to the SHARED lock the pager thinks it holds (also from the
        // PENDING lock a refused EXCLUSIVE leaves); its close lets go of it.
        vfs_lock(&self.reader, ffi::SQLITE_LOCK_SHARED, false);
        match done {
            None => tracing::debug!(
                "database {} moved while a cut held it; another connection holds it still",
                path.display()
            ),
            Some(Ok(0)) => tracing::info!(
                "database {} was renamed away or replaced while a cut held it: its log {} \
                 checkpointed into the moved file and emptied, as the application's own \
                 close would have",
                path.display(),
                wal.display()
            ),
            Some(Ok(_)) => tracing::warn!(
                "database {} was renamed away or replaced while a cut held it: its log {} \
                 could not be checkpointed (busy) and keeps its frames",
                path.display(),
                wal.display()
            ),
            Some(Err(e)) => tracing::warn!(
                "database {} was renamed away or replaced while a cut held it: \
                 checkpointing its log {}: {e}",
                path.display(),
                wal.display()
            ),
        }
    }
}
