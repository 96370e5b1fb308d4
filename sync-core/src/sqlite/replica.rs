//! The replica side: page hashes of its copy, pages written in one transaction.

use super::{all_hashes, db_hash, require_dbpage, sql_err};
use crate::Error;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::time::Duration;

/// A replica database's page table as it stands: page size, page hashes, and
/// their hash (what a database exchange compares and stages against).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTable {
    /// Page size.
    pub page_size: u32,
    /// Page hashes.
    pub hashes: Vec<[u8; 32]>,
    /// Their [`db_hash`].
    pub hash: [u8; 32],
}

fn open_replica_db(path: &Path) -> Result<Connection, Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let c = Connection::open_with_flags(path, flags).map_err(|e| sql_err(path, "open", e))?;
    c.busy_timeout(Duration::from_secs(5))
        .map_err(|e| sql_err(path, "busy timeout", e))?;
    require_dbpage(&c, path)?;
    Ok(c)
}

/// Page hashes of the database at `path` (a replica's own copy), or `None`
/// when it is not a database SQLite can open.
pub fn read_hashes(path: &Path) -> Result<Option<PageTable>, Error> {
    let c = match open_replica_db(path) {
        Ok(c) => c,
        Err(_) => return Ok(None),
    };
    let tx = c
        .unchecked_transaction()
        .map_err(|e| sql_err(path, "begin", e))?;
    let res = all_hashes(&tx, path);
    drop(tx);
    match res {
        Ok((page_size, hashes)) => Ok(Some(PageTable {
            page_size,
            hash: db_hash(page_size, &hashes),
            hashes,
        })),
        // not a database after all (a plain file with a SQLite-like name)
        Err(_) => Ok(None),
    }
}

/// Writes `pages` (page number and image, read from `pages`) into the database
/// at `path` and truncates it to `count` pages, in one SQLite transaction.
pub fn apply_pages(
    path: &Path,
    count: u32,
    pages: impl Iterator<Item = Result<(u32, Vec<u8>), Error>>,
) -> Result<u64, Error> {
    let c = open_replica_db(path)?;
    // The close below checkpoints and syncs; the round's own syncfs and the cut
    // journal cover the instant between commit and close.
    c.execute_batch("PRAGMA synchronous = NORMAL")
        .map_err(|e| sql_err(path, "synchronous", e))?;
    let tx = c
        .unchecked_transaction()
        .map_err(|e| sql_err(path, "begin", e))?;
    // The size is read before any page is written: a new page 1 may describe
    // a database SQLite cannot read back until the transaction is whole (one
    // emptied to a single page reads as malformed in between).
    let before: u32 = tx
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(|e| sql_err(path, "page count", e))?;
    // (the header's 4 bytes; SQLite shows them signed)
    let cookie = tx
        .query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))
        .map_err(|e| sql_err(path, "schema version", e))? as u32;
    let mut n = 0u64;
    {
        let mut put = tx
            .prepare("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")
            .map_err(|e| sql_err(path, "write pages", e))?;
        // Page 1 goes last (see below).
        let mut first = None;
        for p in pages {
            let (pgno, data) = p?;
            if pgno == 1 {
                first = Some(data);
                n += 1;
                continue;
            }
            put.execute(rusqlite::params![pgno, data])
                .map_err(|e| sql_err(path, &format!("write page {pgno}"), e))?;
            n += 1;
        }
        // Once page 1 has a new schema cookie, the next statement rereads
        // the schema through the old page's parse (and finds the database
        // malformed when the schema moved on the page), and the truncation
        // must be the last page write (a page written after it cancels it).
        // So page 1 goes in last with the old cookie, then the truncation,
        // then the new cookie through SQLite's own header update.
        let new_cookie = first
            .as_ref()
            .and_then(|d| d.get(40..44))
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        if let Some(mut data) = first {
            if let Some(head) = data.get_mut(40..44) {
                head.copy_from_slice(&cookie.to_be_bytes());
            }
            put.execute(rusqlite::params![1, data])
                .map_err(|e| sql_err(path, "write page 1", e))?;
        }
        if before > count {
            put.execute(rusqlite::params![count + 1, None::<Vec<u8>>])
                .map_err(|e| sql_err(path, "truncate", e))?;
        }
        if let Some(new) = new_cookie.filter(|n| *n != cookie) {
            tx.execute_batch(&format!("PRAGMA schema_version = {}", new as i32))
                .map_err(|e| sql_err(path, "schema version", e))?;
        }
    }
    tx.commit().map_err(|e| sql_err(path, "commit", e))?;
    // The last connection's close checkpoints a WAL database and removes its log.
    c.close().map_err(|(_, e)| sql_err(path, "close", e))?;
    Ok(n)
}

/// SQLite's EXCLUSIVE lock on a replica database, held while its file is
/// replaced by a whole new image and its side files are removed: no other
/// connection is reading or writing it meanwhile, and none can begin.
#[derive(Debug)]
pub struct Exclusive {
    _c: Connection,
}

/// What [`lock_exclusive`] found.
#[derive(Debug)]
pub enum Lock {
    /// No other connection has the database open; none can start until the
    /// lock is dropped.
    Taken(Exclusive),
    /// Another connection holds it (after waiting `wait`).
    Busy,
    /// Not a database SQLite can open (a plain file with a database's name).
    NotDb,
}

/// Takes SQLite's own EXCLUSIVE lock on the database at `path`, waiting up to
/// `wait` for other connections to finish. Nothing is written: the connection
/// uses `locking_mode=EXCLUSIVE` before its first access (so it never maps the
/// `-shm`), and its close after the file was renamed over neither checkpoints
/// nor removes anything (SQLite sees the database moved).
pub fn lock_exclusive(path: &Path, wait: Duration) -> Result<Lock, Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let c = match Connection::open_with_flags(path, flags) {
        Ok(c) => c,
        Err(_) => return Ok(Lock::NotDb),
    };
    c.busy_timeout(wait)
        .map_err(|e| sql_err(path, "busy timeout", e))?;
    c.query_row("PRAGMA locking_mode=EXCLUSIVE", [], |_| Ok(()))
        .map_err(|e| sql_err(path, "locking mode", e))?;
    // A write transaction takes the file's EXCLUSIVE lock in either journal
    // mode (in WAL mode because of the locking mode); reading the schema makes
    // it real.
    let begun = c
        .execute_batch("BEGIN EXCLUSIVE")
        .and_then(|()| c.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(())));
    match begun {
        Ok(()) => Ok(Lock::Taken(Exclusive { _c: c })),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Ok(Lock::Busy)
        }
        Err(_) => Ok(Lock::NotDb),
    }
}

/// `PRAGMA integrity_check` of the database at `path`: `"ok"` when sound.
pub fn integrity(path: &Path) -> Result<String, Error> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| sql_err(path, "open", e))?;
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .optional()
        .map_err(|e| sql_err(path, "integrity_check", e))
        .map(|s: Option<String>| s.unwrap_or_default())
}

#[cfg(test)]
#[path = "replica_tests.rs"]
mod tests;
