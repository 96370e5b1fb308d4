//! A database compared by its content, as a cut sees it, rather than by its
//! bytes: SQLite rewrites its header counters, and a live database's latest
//! commits may still be in its log. What `sync-cli verify` compares.

use super::conn::{DirBefore, FileStamp, side_path};
use super::serve::Snapshot;
use super::{all_hashes, db_hash, sql_err};
use crate::{Error, Manifest, RelPath};
use proto::Kind;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::Duration;

/// The content of the database at `path` as a cut would ship it (its log
/// included), read in one read transaction: page size, page count and
/// [`db_hash`]. `None` when SQLite cannot read it as a database. Like the
/// agent's, the connection never deletes a log it did not make, and the
/// directory's times are put back after its own side files come and go.
pub fn content_snapshot(path: &Path) -> Result<Option<Snapshot>, Error> {
    let wal_existed = FileStamp::of(&side_path(path, "-wal")).is_some();
    let dir = DirBefore::of(path);
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_NOFOLLOW;
    let c = Connection::open_with_flags(path, flags).map_err(|e| sql_err(path, "open", e))?;
    let read = (|| {
        c.busy_timeout(Duration::from_secs(5))
            .map_err(|e| sql_err(path, "busy timeout", e))?;
        super::conn::persist_wal(&c, path, wal_existed)?;
        c.execute_batch("PRAGMA query_only = 1; BEGIN")
            .map_err(|e| sql_err(path, "begin", e))?;
        let hashes = all_hashes(&c, path);
        let _ = c.execute_batch("COMMIT");
        hashes
    })();
    let _ = c.close();
    if let Some(d) = dir {
        d.restore();
    }
    match read {
        Ok((page_size, hashes)) => Ok(Some(Snapshot {
            page_size,
            pages: hashes.len() as u32,
            hash: db_hash(page_size, &hashes),
        })),
        Err(Error::Sqlite { msg, .. }) if msg.contains("not a database") => Ok(None),
        Err(e) => Err(e),
    }
}

/// Gives each of `databases` (found by a scan of `root` into `m`) its content
/// snapshot in place of its bytes, so two trees whose databases hold the same
/// pages compare equal whatever their header counters and logs; one SQLite
/// cannot read is hashed as a plain file.
pub fn mark_by_content(root: &Path, m: &mut Manifest, databases: &[RelPath]) -> Result<(), Error> {
    for e in m.entries.iter_mut().filter(|e| databases.contains(&e.path)) {
        let path = crate::scan::abs(root, &e.path);
        e.kind = match content_snapshot(&path)? {
            Some(s) => Kind::Database {
                page_size: s.page_size,
                pages: s.pages,
                hash: s.hash,
            },
            None => match e.kind {
                Kind::File { size, .. } => Kind::File {
                    size,
                    hash: crate::scan::hash_file(&path)?,
                },
                ref k => k.clone(),
            },
        };
    }
    Ok(())
}
