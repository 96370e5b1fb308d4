//! Every page hash of a snapshot, read from the database file through
//! SQLite's own handle of the file by one worker a core, each hashing what it
//! read while it is still in its cache.
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

/// Bytes of a worker's run (a whole number of pages; small in tests, so
/// that their databases span many runs).
const CHUNK: usize = if cfg!(test) { 32 << 10 } else { 4 << 20 };

/// Bytes a worker reads at a time, then hashes while they are in its cache
/// (a whole number of pages; small in tests, so that a run takes several).
const READ: usize = if cfg!(test) { 8 << 10 } else { 256 << 10 };

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
///
/// The file is read and hashed in runs of [`CHUNK`] bytes by one worker a
/// core, each reading its run through the VFS and hashing it while it is
/// still in the core's cache (a reader thread handing 4 MiB buffers to
/// hashers read 1 GB in ~100 ms on this project's 2-core machine; two
/// workers, ~45 ms). This thread alone uses the connection: it reads the
/// overlay's pages of each run before handing the run out, and takes the
/// runs' hashes back in order.
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
    let file = Handle(file);
    let size = (page_size as usize).max(512);
    let per_chunk = (CHUNK / size).max(1) as u32;
    let runs = count.div_ceil(per_chunk) as usize;
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 4));
    let prior = keep.as_ref().map(|k| k.prior);
    // what may be kept of the changed pages, taken by the workers as they
    // find them
    let budget = std::sync::atomic::AtomicU64::new(keep.as_ref().map_or(0, |k| *k.budget));
    let mut got = Gathered::new(count);
    let (job_tx, job_rx) = mpsc::channel::<Job>();
    let (done_tx, done_rx) = mpsc::channel::<Result<Done, String>>();
    let job_rx = std::sync::Mutex::new(job_rx);
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (jobs, done, file, budget) = (&job_rx, done_tx.clone(), &file, &budget);
            s.spawn(move || {
                // one buffer a worker, filled and hashed while in its cache
                let mut buf = Vec::new();
                while let Some(job) = next_job(jobs) {
                    // a panic is an error of this run: the others go on,
                    // and nothing waits for a result that never comes
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        work(file, (size, seed), (prior, budget), &mut buf, job)
                    }))
                    .unwrap_or_else(|_| Err("a page hasher panicked".into()));
                    if done.send(res).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        let (mut sent, mut pending) = (0usize, BTreeMap::new());
        while got.runs < runs {
            // at most two runs a worker in flight: memory stays bounded
            if sent < runs && sent - got.runs < 2 * workers {
                let first = sent as u32 * per_chunk + 1;
                let n = per_chunk.min(count - first + 1);
                let job = Job::new(c, (path, overlay), (sent, first, n), size)?;
                job_tx
                    .send(job)
                    .map_err(|_| fail("the page hashers stopped".into()))?;
                sent += 1;
                continue;
            }
            let done = done_rx
                .recv()
                .map_err(|_| fail("the page hashers stopped".into()))?
                .map_err(&fail)?;
            pending.insert(done.index, done);
            while let Some(done) = pending.remove(&got.runs) {
                got.take(done);
            }
        }
        drop(job_tx);
        Ok(())
    })?;
    if let Some(k) = keep {
        *k.budget = budget.into_inner();
    }
    count_strong(got.strong);
    if got.out.len() != count as usize {
        return Err(fail(format!("hashed {} pages of {count}", got.out.len())));
    }
    let (strong, quick) = got.out.into_iter().unzip();
    Ok(Hashed {
        strong,
        quick,
        fresh: got.fresh,
    })
}

/// SQLite's handle of a database file, shared by the workers of
/// [`file_hashes`] for its `xRead` alone.
struct Handle(*mut ffi::sqlite3_file);

// SAFETY: the handle belongs to a connection `file_hashes` borrows for as
// long as the workers run (they are scoped to it). The unix VFS's `xRead`
// is a `pread` of the file's descriptor at the offset given (memory mapping
// is off: `Conns::open` sets the reader's `mmap_size` to 0), which any number
// of threads may call at once (a short read at the file's end also stores 0
// as the handle's last error, a plain int); nothing else of the handle is
// used off its thread.
#[allow(unsafe_code)]
unsafe impl Send for Handle {}
// SAFETY: as above: shared only to call `xRead`.
#[allow(unsafe_code)]
unsafe impl Sync for Handle {}

/// The next run for a worker (`None`: no more).
fn next_job(jobs: &std::sync::Mutex<mpsc::Receiver<Job>>) -> Option<Job> {
    // the lock is let go before the run is worked on
    let rx = jobs.lock().ok()?;
    rx.recv().ok()
}

/// A run of pages to read and hash, with the overlay's pages in it.
struct Job {
    index: usize,
    first: u32,
    n: u32,
    overlay: Vec<(u32, Vec<u8>)>,
}

impl Job {
    /// Run `index`, of `n` pages from `first`, with the overlay's pages in
    /// it read through SQLite.
    fn new(
        c: &Connection,
        (path, overlay): (&Path, &BTreeSet<u32>),
        (index, first, n): (usize, u32, u32),
        size: usize,
    ) -> Result<Self, Error> {
        let pages = (overlay.range(first..first + n))
            .map(|&p| Ok((p, overlay_page(c, path, p, size)?)))
            .collect::<Result<_, Error>>()?;
        Ok(Self {
            index,
            first,
            n,
            overlay: pages,
        })
    }
}

/// A run read and hashed: its hashes, and its pages whose hash is not the
/// old one, as many as the budget allowed.
struct Done {
    index: usize,
    hashes: Vec<([u8; 32], u64)>,
    strong: u64,
    fresh: Vec<(u32, Vec<u8>)>,
}

/// A worker's part: reads the run from the file into `buf` ([`READ`] bytes
/// at a time), lays the overlay's pages and the pending-byte page over it,
/// hashes it, and keeps
/// the pages whose hash is not `prior`'s while `budget` lasts.
fn work(
    file: &Handle,
    (size, seed): (usize, u64),
    (prior, budget): (Option<Prior<'_>>, &std::sync::atomic::AtomicU64),
    buf: &mut Vec<u8>,
    job: Job,
) -> Result<Done, String> {
    use std::sync::atomic::Ordering;
    let (mut hashes, mut fresh, mut strong) = (Vec::with_capacity(job.n as usize), Vec::new(), 0);
    let mut overlay = job.overlay.into_iter().peekable();
    let per_read = (READ / size).max(1) as u32;
    let end = job.first + job.n;
    for first in (job.first..end).step_by(per_read as usize) {
        let n = per_read.min(end - first);
        buf.resize(n as usize * size, 0);
        read_at(file.0, buf, u64::from(first - 1) * size as u64)?;
        while let Some((p, page)) = overlay.next_if(|(p, _)| *p < first + n) {
            let at = (p - first) as usize * size;
            buf[at..at + size].copy_from_slice(&page);
        }
        zero_pending(buf, first, size);
        let from = hashes.len();
        strong += super::hash_run(&mut hashes, buf, (size, first), seed, prior);
        let Some(prior) = prior else { continue };
        for ((pgno, page), h) in (first..).zip(buf.chunks(size)).zip(&hashes[from..]) {
            let old = prior.strong.get(pgno as usize - 1);
            let take = |b: u64| b.checked_sub(size as u64);
            if old != Some(&h.0)
                && budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, take)
                    .is_ok()
            {
                fresh.push((pgno, page.to_vec()));
            }
        }
    }
    Ok(Done {
        index: job.index,
        hashes,
        strong,
        fresh,
    })
}

/// The runs' hashes taken back in order, and the changed pages kept.
struct Gathered {
    runs: usize,
    out: Vec<([u8; 32], u64)>,
    strong: u64,
    fresh: Pages,
}

impl Gathered {
    fn new(count: u32) -> Self {
        Self {
            runs: 0,
            out: Vec::with_capacity(count as usize),
            strong: 0,
            fresh: Pages::new(),
        }
    }

    /// The next run's hashes and kept pages.
    fn take(&mut self, done: Done) {
        self.out.extend(done.hashes);
        self.strong += done.strong;
        self.fresh.extend(done.fresh);
        self.runs += 1;
    }
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
        buf[at..at + size].copy_from_slice(&overlay_page(c, path, p, size)?);
    }
    zero_pending(buf, first, size);
    Ok(())
}

/// Page `p` of the snapshot `c` reads, through `sqlite_dbpage` (a page of
/// the log's), checked to be of the page `size`.
fn overlay_page(c: &Connection, path: &Path, p: u32, size: usize) -> Result<Vec<u8>, Error> {
    let page = read_page(c, path, p)?;
    if page.len() != size {
        return Err(Error::Sqlite {
            path: path.display().to_string(),
            msg: format!("page {p} is not of the page size"),
        });
    }
    Ok(page)
}

/// Zeros the pending-byte page, should it be among the pages of `buf` (from
/// `first`, of `size` bytes each).
fn zero_pending(buf: &mut [u8], first: u32, size: usize) {
    let n = u32::try_from(buf.len() / size).unwrap_or(u32::MAX);
    let pending = u32::try_from(PENDING_BYTE / size as u64 + 1).unwrap_or(u32::MAX);
    if (first..first.saturating_add(n)).contains(&pending) {
        let at = (pending - first) as usize * size;
        buf[at..at + size].fill(0);
    }
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
