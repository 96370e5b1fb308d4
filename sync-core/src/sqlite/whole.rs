//! Every page hash of a snapshot, read from the database file in large chunks
//! through SQLite's own handle of the file while the chunks before are hashed
//! on every core.
//!
//! `sqlite_dbpage` hands pages over one row at a time: a 4 KiB `pread`, a
//! copy into SQLite's page cache, another into the row's blob and one more
//! into the batch hashed (a 1 GB database: about 0.5 s of one core before
//! any hashing). The file is read instead with the VFS's `xRead` on the
//! handle SQLite holds (no descriptor of ours is opened or closed: that would
//! drop the process's POSIX locks), page by page as `sqlite_dbpage` sees it:
//! the pending-byte page as zeros, pages past the file's end as zeros.
//!
//! A snapshot's page is the file's, unless a log frame up to the snapshot's
//! end names it: those pages (the *overlay*, every page named by a frame of
//! the log's generation as it stood under the cut's lock: `wal::log_pages`)
//! are read through `sqlite_dbpage`. The file's other pages do not move while
//! the read transaction is open:
//! - a reader that reads no frame holds `WAL_READ_LOCK(0)`, which a
//!   checkpointer takes before it writes any page;
//! - a reader that does read frames keeps the log from being reset (a restart
//!   takes every other read lock), so its frames stay; a checkpoint copies
//!   only frames up to the oldest reader's end, pages of the overlay, and
//!   shrinks the file only when it copied the whole log, which such a reader
//!   keeps it from.
//!
//! Each page's quick hash (`super::quick_hash`) is computed too; a page whose
//! quick hash is the one the last cut recorded keeps that cut's blake3 hash.

use super::{Prior, read_page};
use crate::Error;
use rusqlite::{Connection, ffi};
use std::collections::{BTreeMap, BTreeSet};
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
    /// Pages this thread served straight from a database file (tests count
    /// them).
    pub(super) static SERVED_PAGES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Pages a cut on this thread hashed with blake3 (tests count them).
    pub(super) static STRONG_PAGES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Adds to this thread's count of pages hashed with blake3 (tests).
pub(super) fn count_strong(_n: u64) {
    #[cfg(test)]
    STRONG_PAGES.with(|c| c.set(c.get() + _n));
}

/// The page table a cut compares against, and how many bytes of the pages
/// whose hash differs may be kept for the round's read-ahead.
pub(super) struct Keep<'a> {
    pub prior: Prior<'a>,
    pub budget: &'a mut u64,
}

/// Pages kept by number.
pub(super) type Pages = BTreeMap<u32, Vec<u8>>;

/// A snapshot's page table, and the changed pages kept.
#[derive(Debug, Default)]
pub(super) struct Hashed {
    pub strong: Vec<[u8; 32]>,
    /// Empty when not computed.
    pub quick: Vec<u64>,
    pub fresh: Pages,
}

/// The hashes of pages `1..=count` of the snapshot `c`'s read transaction
/// holds: the pages of `overlay` through `sqlite_dbpage`, every other page
/// straight from the file (see the module docs); the same as
/// [`super::all_hashes`] would give. With `keep`, also the pages whose hash
/// is not the old one, while its budget lasts.
pub(super) fn file_hashes(
    c: &Connection,
    path: &Path,
    page_size: u32,
    count: u32,
    seed: u64,
    overlay: &BTreeSet<u32>,
    keep: Option<Keep<'_>>,
) -> Result<Hashed, Error> {
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
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(1);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    std::thread::scope(|s| {
        // Chunk k is hashed (on every core) while chunk k + 1 is read.
        let hasher = s.spawn(move || {
            let mut keep = keep;
            let (mut out, mut fresh, mut strong) =
                (Vec::with_capacity(count as usize), Pages::new(), 0);
            for buf in full_rx {
                let from = out.len();
                strong +=
                    super::hash_pages(&mut out, &buf, size, seed, keep.as_ref().map(|k| k.prior));
                if let Some(k) = keep.as_mut() {
                    for (at, page) in (from..).zip(buf.chunks(size)) {
                        let new = out.get(at).map(|h| &h.0);
                        if k.prior.strong.get(at) != new && *k.budget >= size as u64 {
                            *k.budget -= size as u64;
                            fresh.insert(at as u32 + 1, page.to_vec());
                        }
                    }
                }
                let _ = empty_tx.send(buf);
            }
            let (strong_hashes, quick) = out.into_iter().unzip();
            (
                Hashed {
                    strong: strong_hashes,
                    quick,
                    fresh,
                },
                strong,
            )
        });
        let mut first = 1u32;
        while first <= count {
            let n = per_chunk.min(count - first + 1);
            let mut buf = empty_rx.try_recv().unwrap_or_default();
            buf.resize(n as usize * size, 0);
            read_run(c, path, file, (size, first), &mut buf, overlay)?;
            if full_tx.send(buf).is_err() {
                break;
            }
            first += n;
        }
        drop(full_tx);
        let (hashed, strong) = hasher
            .join()
            .map_err(|_| fail("hashing the pages failed".into()))?;
        count_strong(strong);
        if hashed.strong.len() != count as usize {
            return Err(fail(format!(
                "hashed {} pages of {count}",
                hashed.strong.len()
            )));
        }
        Ok(hashed)
    })
}

/// Fills `buf` (a whole number of pages of `size` bytes) with the
/// snapshot's pages from `first` on, as `sqlite_dbpage` shows them in the
/// read transaction `c` holds: from the
/// database file through SQLite's handle `file` (see the module docs), the
/// pages of `overlay` through `sqlite_dbpage`, the pending-byte page as zeros.
pub(super) fn read_run(
    c: &Connection,
    path: &Path,
    file: *mut ffi::sqlite3_file,
    (size, first): (usize, u32),
    buf: &mut [u8],
    overlay: &BTreeSet<u32>,
) -> Result<(), Error> {
    let fail = |msg: String| Error::Sqlite {
        path: path.display().to_string(),
        msg,
    };
    let n = u32::try_from(buf.len() / size).map_err(|_| fail("run too long".into()))?;

    read_at(file, buf, u64::from(first.saturating_sub(1)) * size as u64).map_err(&fail)?;
    for &p in overlay.range(first..first.saturating_add(n)) {
        let at = (p - first) as usize * size;
        let page = read_page(c, path, p)?;
        if page.len() != size {
            return Err(fail(format!("page {p} is not of the page size")));
        }
        buf[at..at + size].copy_from_slice(&page);
    }
    let pending = u32::try_from(PENDING_BYTE / size as u64 + 1).unwrap_or(u32::MAX);
    if (first..first.saturating_add(n)).contains(&pending) {
        let at = (pending - first) as usize * size;
        buf[at..at + size].fill(0);
    }
    Ok(())
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
