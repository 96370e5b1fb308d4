//! Every page hash of a snapshot that SQLite itself reads from the database
//! file alone, read in large chunks through SQLite's own handle of the file
//! while the chunks before are hashed on every core.
//!
//! `sqlite_dbpage` hands pages over one row at a time: a 4 KiB `pread`, a
//! copy into SQLite's page cache, another into the row's blob and one more
//! into the batch hashed (a 1 GB database: about 0.5 s of one core before
//! any hashing). When the snapshot reads no page from the log (a WAL
//! database whose log held no frame under the cut's lock, or a
//! rollback-journal database under its SHARED lock), the database file holds
//! exactly the snapshot's pages, and no checkpoint writes into it while the
//! read transaction is open (a checkpointer takes `WAL_READ_LOCK(0)`, which
//! such a reader holds, before it writes a page). The file is read with the
//! VFS's `xRead` on the handle SQLite holds (no descriptor of ours is opened
//! or closed: that would drop the process's POSIX locks), page by page as
//! `sqlite_dbpage` sees it: the pending-byte page as zeros, pages past the
//! file's end as zeros.

use crate::Error;
use rusqlite::{Connection, ffi};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc;

/// Bytes read at a time (a whole number of pages).
const CHUNK: usize = 4 << 20;

/// SQLite's pending byte: the page holding it is never used, and
/// `sqlite_dbpage` shows it as zeros.
const PENDING_BYTE: u64 = 0x4000_0000;

#[cfg(test)]
thread_local! {
    /// Pages this thread hashed straight from a database file (tests count
    /// them).
    pub(super) static FILE_PAGES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The page hashes a cut compares against, and how many bytes of the pages
/// whose hash differs may be kept for the round's read-ahead.
pub(super) struct Keep<'a> {
    pub old: &'a [[u8; 32]],
    pub budget: &'a mut u64,
}

/// Pages kept by number.
pub(super) type Pages = BTreeMap<u32, Vec<u8>>;

/// The hashes of pages `1..=count` of `c`'s main database file, read in the
/// read transaction `c` holds, which must read no page from a log (see the
/// module docs): the same as [`super::all_hashes`] would give. With `keep`,
/// also the pages whose hash is not the old one, while its budget lasts.
pub(super) fn file_hashes(
    c: &Connection,
    path: &Path,
    page_size: u32,
    count: u32,
    keep: Option<Keep<'_>>,
) -> Result<(Vec<[u8; 32]>, Pages), Error> {
    let fail = |msg: String| Error::Sqlite {
        path: path.display().to_string(),
        msg,
    };
    if c.is_autocommit() {
        return Err(fail("no read transaction to hash the file in".into()));
    }
    #[cfg(test)]
    FILE_PAGES.with(|n| n.set(n.get() + u64::from(count)));
    let file = super::moved::main_file(c).ok_or_else(|| fail("no file handle".into()))?;
    let size = (page_size as usize).max(512);
    let per_chunk = (CHUNK / size).max(1) as u32;
    let pending = u32::try_from(PENDING_BYTE / size as u64 + 1).unwrap_or(u32::MAX);
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        // Chunk k is hashed (on every core) while chunk k + 1 is read.
        let hasher = s.spawn(move || {
            let (mut hashes, mut fresh, mut keep) =
                (Vec::with_capacity(count as usize), Pages::new(), keep);
            for buf in full_rx {
                let from = hashes.len();
                super::hash_batch(&mut hashes, &buf, size);
                if let Some(k) = keep.as_mut() {
                    for (at, page) in (from..).zip(buf.chunks(size)) {
                        if k.old.get(at) != hashes.get(at) && *k.budget >= size as u64 {
                            *k.budget -= size as u64;
                            fresh.insert(at as u32 + 1, page.to_vec());
                        }
                    }
                }
                let _ = empty_tx.send(buf);
            }
            (hashes, fresh)
        });
        let mut first = 1u32;
        while first <= count {
            let n = per_chunk.min(count - first + 1);
            let mut buf = empty_rx.try_recv().unwrap_or_default();
            buf.resize(n as usize * size, 0);
            read_at(file, &mut buf, u64::from(first - 1) * size as u64).map_err(&fail)?;
            if (first..first + n).contains(&pending) {
                let at = (pending - first) as usize * size;
                buf[at..at + size].fill(0);
            }
            if full_tx.send(buf).is_err() {
                break;
            }
            first += n;
        }
        drop(full_tx);
        let (hashes, fresh) = hasher
            .join()
            .map_err(|_| fail("hashing the pages failed".into()))?;
        if hashes.len() != count as usize {
            return Err(fail(format!("hashed {} pages of {count}", hashes.len())));
        }
        Ok((hashes, fresh))
    })
}

/// Fills `buf` from byte `at` of `file` through its VFS's `xRead`: bytes
/// past the end of the file read as zeros (as SQLite's pager takes them).
#[allow(unsafe_code)]
pub(super) fn read_at(file: *mut ffi::sqlite3_file, buf: &mut [u8], at: u64) -> Result<(), String> {
    // SAFETY: `file` is the open sqlite3_file of a connection the caller
    // borrows, used on that connection's thread; its methods are its VFS's.
    let read = unsafe { (*file).pMethods.as_ref() }
        .and_then(|m| m.xRead)
        .ok_or_else(|| "the file handle cannot read".to_string())?;
    let n = std::ffi::c_int::try_from(buf.len()).map_err(|_| "read too large".to_string())?;
    let off = ffi::sqlite3_int64::try_from(at).map_err(|_| format!("offset {at} too large"))?;
    // SAFETY: `buf` is `n` writable bytes; `file` is valid (above) and read
    // while the connection's read transaction holds its lock, as SQLite's
    // pager does.
    let rc = unsafe { read(file, buf.as_mut_ptr().cast(), n, off) };
    // A short read is zero-filled by the VFS, as the pager takes it.
    if rc != ffi::SQLITE_OK && rc != ffi::SQLITE_IOERR_SHORT_READ {
        return Err(format!("read at byte {at} failed (code {rc})"));
    }
    Ok(())
}
