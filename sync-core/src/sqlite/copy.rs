//! A rollback-journal database's cut, let go in milliseconds.
//!
//! Such a database has no log: its snapshot is a SHARED lock on the file, and
//! while it is held no writer can commit. So right after the cut's locks are
//! released, each rollback-journal snapshot is either found unchanged (the
//! header's file change counter, page size and page count as the last cut saw
//! them, the same inode) and let go at once, or copied whole into memory with
//! big sequential reads through SQLite's own file handle (no descriptor of ours
//! is opened or closed on the file: that would drop the process's POSIX locks)
//! and let go. Hashing, comparing and serving the round then read the copy.
//! Only a changed database past [`COPY_BUDGET`] keeps its snapshot for that.
//!
//! The pages of an unchanged database are read, should a round ask for them,
//! each in a short read transaction, and served only if their hash still is
//! the cut's (`idle.rs`).

use super::live::LiveDb;
use super::whole::{Hashed, Keep, Pages};
use super::{read_page, sql_err};
use crate::Error;
use rusqlite::Connection;
use std::collections::BTreeSet;
use std::path::Path;

/// Bytes of rollback-journal databases a cut may copy into memory so as to let
/// their snapshots go before hashing (over all of a cut's databases).
pub const COPY_BUDGET: u64 = 64 << 20;

/// Reads through SQLite's file handle go this many bytes at a time.
const READ_CHUNK: usize = 1 << 20;

/// A snapshot's page count, page size and first page.
#[derive(Debug, Clone)]
pub(super) struct Head {
    pub count: u32,
    pub page_size: u32,
    pub page1: Vec<u8>,
}

impl Head {
    /// Read in `c`'s current read transaction.
    pub fn read(c: &Connection, path: &Path) -> Result<Self, Error> {
        let count: u32 = c
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(|e| sql_err(path, "page count", e))?;
        let page_size: u32 = c
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|e| sql_err(path, "page size", e))?;
        let page1 = if count > 0 {
            read_page(c, path, 1)?
        } else {
            Vec::new()
        };
        Ok(Self {
            count,
            page_size,
            page1,
        })
    }

    /// Whether the database is in WAL mode (its header's read/write versions).
    pub fn wal_mode(&self) -> bool {
        self.page1.get(18) == Some(&2)
    }

    /// The file change counter.
    pub fn counter(&self) -> [u8; 4] {
        self.page1
            .get(24..28)
            .and_then(|b| b.try_into().ok())
            .unwrap_or_default()
    }
}

/// A test's callback (see `BEFORE_HASHING`).
#[cfg(test)]
pub(super) type Hook = Box<dyn FnMut(&Path)>;

#[cfg(test)]
thread_local! {
    /// Called with the database's path when a cut starts finding its changed
    /// pages: tests check there which locks are still held.
    pub(super) static BEFORE_HASHING: std::cell::RefCell<Option<Hook>> =
        const { std::cell::RefCell::new(None) };
}

impl LiveDb {
    /// After the cut's locks are released: a rollback-journal snapshot is let
    /// go, unchanged or copied (when it fits in what is left of `budget`,
    /// which it uses up). WAL snapshots (which block no writer) stay.
    pub(super) fn detach(&mut self, budget: &mut u64) -> Result<(), Error> {
        let Some(c) = self.conns.as_ref().filter(|c| c.reading) else {
            return Ok(());
        };
        let head = Head::read(&c.reader, &self.path)?;
        if head.wal_mode() {
            self.head = Some(head);
            return Ok(());
        }
        let unchanged = self.has_snapshot
            && !self.wal_mode
            && !self.replaced
            && head.counter() == self.change_counter
            && head.page_size == self.page_size
            && head.count as usize == self.hashes.len();
        let bytes = u64::from(head.count) * u64::from(head.page_size);
        if !unchanged {
            if bytes > *budget {
                self.head = Some(head);
                return Ok(());
            }
            match copy_file(&c.reader, &self.path, bytes as usize) {
                Ok(copy) => {
                    *budget -= bytes;
                    self.copy = Some(copy);
                }
                Err(e) => {
                    // hashed under the snapshot instead, as before
                    tracing::debug!("{e}");
                    self.head = Some(head);
                    return Ok(());
                }
            }
        }
        self.head = Some(head);
        self.end_snapshot();
        Ok(())
    }

    /// Ends the read transaction (the connections stay, holding no lock).
    fn end_snapshot(&mut self) {
        if let Some(c) = self.conns.as_mut() {
            c.end_read(&self.path);
        }
    }

    /// Page `pgno` as this cut took it: from the copy, the open snapshot, or,
    /// for a database found unchanged, a short read transaction that checks it
    /// still is.
    pub(super) fn cut_page(&self, pgno: u32) -> Result<Vec<u8>, Error> {
        if let Some(copy) = &self.copy {
            let ps = self.page_size as usize;
            let at = (pgno as usize).wrapping_sub(1).wrapping_mul(ps);
            return copy
                .get(at..at.saturating_add(ps))
                .filter(|_| pgno > 0)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| Error::Sqlite {
                    path: self.path.display().to_string(),
                    msg: format!("page {pgno} is past the end of the cut"),
                });
        }
        match &self.conns {
            Some(c) if c.reading => read_page(&c.reader, &self.path, pgno),
            Some(c) => self.validated_page(&c.reader, pgno),
            None if self.idle => self.lazy_page(pgno),
            None => Err(Error::Sqlite {
                path: self.path.display().to_string(),
                msg: "no snapshot open (its cut was postponed, or its round is over)".into(),
            }),
        }
    }

    /// Every page hash of the cut (`count` pages), from the copy or the open
    /// snapshot: straight from the file but for the pages of `overlay`
    /// (`whole.rs`), or, without one, through `sqlite_dbpage`. With `keep`,
    /// pages whose quick hash did not change keep their blake3 hash, and the
    /// changed ones are kept while its budget lasts.
    pub(super) fn cut_hashes(
        &self,
        count: u32,
        overlay: Option<&BTreeSet<u32>>,
        keep: Option<Keep<'_>>,
    ) -> Result<Hashed, Error> {
        #[cfg(test)]
        BEFORE_HASHING.with(|h| {
            if let Some(f) = h.borrow_mut().as_mut() {
                f(&self.path);
            }
        });
        let seed = self.quick_seed;
        match (&self.copy, overlay) {
            (Some(copy), _) => {
                let size = self.page_size.max(1) as usize;
                let mut out = Vec::with_capacity(copy.len() / size);
                let strong = super::hash_pages(&mut out, copy, size, seed, keep.map(|k| k.prior));
                super::whole::count_strong(strong);
                let (strong, quick) = out.into_iter().unzip();
                Ok(Hashed {
                    strong,
                    quick,
                    fresh: Pages::new(),
                })
            }
            (None, Some(overlay)) => {
                let r = super::live::reader_of(&self.conns, &self.path)?;
                super::whole::file_hashes(r, &self.path, self.page_size, count, seed, overlay, keep)
            }
            (None, None) => {
                let r = super::live::reader_of(&self.conns, &self.path)?;
                let (_, strong) = super::all_hashes(r, &self.path)?;
                super::whole::count_strong(strong.len() as u64);
                Ok(Hashed {
                    strong,
                    ..Hashed::default()
                })
            }
        }
    }
}

/// The first `len` bytes of the main database file of `c`, read in its
/// current transaction through SQLite's own handle of the file.
fn copy_file(c: &Connection, path: &Path, len: usize) -> Result<Vec<u8>, Error> {
    let fail = |msg: String| Error::Sqlite {
        path: path.display().to_string(),
        msg,
    };
    let file = super::moved::main_file(c).ok_or_else(|| fail("no file handle".into()))?;
    let mut buf = vec![0u8; len];
    for (i, chunk) in buf.chunks_mut(READ_CHUNK).enumerate() {
        super::whole::read_at(file, chunk, (i * READ_CHUNK) as u64).map_err(fail)?;
    }
    Ok(buf)
}
