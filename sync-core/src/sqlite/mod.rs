//! Live SQLite databases: found by glob or header, never read raw, shipped as
//! pages of a consistent snapshot.
//!
//! **Source side** ([`LiveSet`]): nothing is held between cuts. A cut opens
//! two connections per database: a *locker* takes `BEGIN IMMEDIATE`, a
//! *reader* holds the read transaction pages are read from (through the
//! `sqlite_dbpage` virtual table: pages as SQLite sees them, WAL included). A
//! cut locks every database in path order, reads the log's new frame headers
//! and opens the read transaction under the locks, then releases the locks:
//! writers stall for that window only, and the lockers close at once. The
//! readers close when the round is served ([`LiveSet::end_round`]), so the
//! application's last close, a restore by rename, a journal-mode or page-size
//! change and the reset of its log happen as they would without the agent.
//!
//! Since no snapshot pins the log, it may be checkpointed and reset (or
//! deleted and made anew) between two cuts. The pages changed since the last
//! cut are those named by the committed frames appended since it, read straight
//! from the `-wal` file (which SQLite never locks), while the log's salts are
//! the ones the last cut saw; after a new generation they are all of its frames
//! when the database file is surely unwritten since (its stat, git's "racily
//! clean" rule), and otherwise every page is compared (`wal.rs`). A database
//! file replaced by another (a new inode) is compared whole.
//! Rollback-journal databases have no log, and their snapshot (a SHARED lock)
//! blocks every commit: right after the cut's locks, one found unchanged by
//! its header's file change counter (and its page size, page count and inode)
//! is let go at once; a changed one is copied whole into memory with big
//! sequential reads (up to [`COPY_BUDGET`] per cut) and let go, and its pages
//! are hashed and served from the copy (`copy.rs`). Only a changed database
//! past the budget keeps its snapshot while every page is hashed.
//!
//! The agent's connections never delete a log they did not create
//! (`SQLITE_FCNTL_PERSIST_WAL`): an application that lost its POSIX locks may
//! still be writing to it. Should their close be the last, a log with content
//! is checkpointed and truncated to nothing, never left whole beside a file a
//! restore may rename over it. Their own comings and goings (closes, `-shm`
//! traffic, side files made and removed) are not taken for commits by the
//! watcher (sync-agent's `continuous.rs`).
//!
//! The process that holds these connections never opens a database file (or its
//! `-shm`) with plain file I/O: closing any descriptor of a file drops all of the
//! process's POSIX locks on it (SQLite's "How To Corrupt" §2.2). Scans skip
//! known databases and their side files, and side files whose database is gone.
//!
//! A database file no cut opened yet (a new path, or a new inode) is opened
//! only when no other process holds it open, or once it and its log have been
//! quiet for [`SETTLE`] (`settle.rs`): an application building `new.db` to
//! rename it over `app.db` is not held at its close. Should a file move while a cut holds it all the same, the cut's
//! close does what the application's would have: it checkpoints the log into
//! the moved file when nothing else holds it (`moved.rs`).
//!
//! A partial round's cut ([`LiveSet::cut_partial`]) leaves alone a database
//! whose file and log are surely unwritten since the last cut (`idle.rs`).
//!
//! **Content hash**: blake3 of each page (page 1 with the change counter and the
//! version-valid-for fields zeroed: SQLite rewrites them on commit), then
//! [`db_hash`] over the page hashes: what both sides compare, and what the root
//! hash covers.
//!
//! **Replica side** ([`read_hashes`], [`apply_pages`]): pages are written inside
//! one SQLite transaction through `sqlite_dbpage`, so the database is openable at
//! every instant and a crash rolls back (or the cut journal rolls forward).

use crate::Error;
use rusqlite::Connection;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

/// The first 16 bytes of every SQLite database file.
pub const HEADER: &[u8; 16] = b"SQLite format 3\0";
/// Files that belong to a database and never travel raw.
pub const SIDECARS: [&[u8]; 3] = [b"-wal", b"-shm", b"-journal"];
/// Cut hashes remembered per database, so a replica that is a few cuts behind
/// still gets only the pages changed since what it holds.
pub(crate) const HISTORY: usize = 16;

/// The base name of a side file (`x.db-wal` → `x.db`), if `name` is one.
#[must_use]
pub fn sidecar_base(name: &[u8]) -> Option<&[u8]> {
    SIDECARS.iter().find_map(|s| {
        name.strip_suffix(*s)
            .filter(|b| !b.is_empty() && !b.ends_with(b"/"))
    })
}

/// Whether the file at `path`, named `name` like a side file whose database
/// is gone, is one by its content: empty, or a log or journal by its magic
/// number. A `-shm` is told by its size (empty, the 3 bytes SQLite truncates
/// it to, or whole 32 KiB regions): SQLite locks it, and a process holding a
/// connection must never open and close it (module docs).
#[must_use]
pub fn is_orphan_side_file(path: &Path, name: &[u8]) -> bool {
    if sidecar_base(name).is_none() {
        return false;
    }
    if name.ends_with(b"-shm") {
        return std::fs::symlink_metadata(path)
            .is_ok_and(|m| m.is_file() && (m.len() <= 3 || m.len().is_multiple_of(32768)));
    }
    let Ok(f) = crate::scan::open_regular(path) else {
        return false;
    };
    let mut head = [0u8; 8];
    match f.read_at(&mut head, 0) {
        Ok(0) => true,
        Ok(8) if name.ends_with(b"-wal") => {
            u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & !1 == 0x377f_0682
        }
        // a hot journal's magic, or a header zeroed by journal_mode=PERSIST
        Ok(8) => head == JOURNAL_MAGIC || head == [0; 8],
        _ => false,
    }
}

/// The first bytes of a rollback journal's header.
const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];

/// Whether `head` (the first bytes of a file) is a SQLite database header.
#[must_use]
pub fn is_header(head: &[u8]) -> bool {
    head.len() >= 16 && &head[..16] == HEADER
}

/// Whether the regular file at `path` starts with the SQLite header. Only for
/// files this process holds no connection to (see the module docs).
#[must_use]
pub fn sniff(path: &Path, size: u64) -> bool {
    if size < 512 {
        return false;
    }
    let Ok(f) = crate::scan::open_regular(path) else {
        return false;
    };
    let mut head = [0u8; 16];
    f.read_exact_at(&mut head, 0).is_ok() && is_header(&head)
}

/// The hash of page `pgno` (from 1).
#[must_use]
pub fn page_hash(pgno: u32, data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    if pgno == 1 && data.len() >= 100 {
        h.update(&data[..24]);
        h.update(&[0; 4]); // file change counter
        h.update(&data[28..92]);
        h.update(&[0; 8]); // version-valid-for, SQLite version
        h.update(&data[100..]);
    } else {
        h.update(data);
    }
    *h.finalize().as_bytes()
}

/// The content hash of a database: page size, page count and every page hash.
#[must_use]
pub fn db_hash(page_size: u32, hashes: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"understudy-sqlite-v1\0");
    h.update(&page_size.to_le_bytes());
    h.update(&(hashes.len() as u64).to_le_bytes());
    // In one call, not one a page: blake3 then hashes many chunks at once
    // (one 32-byte call at a time it compressed 64-byte blocks one by one:
    // a 1 GB database's table, 8 MiB, hashed at every cut and every restore,
    // was ~5% of a no-change push's samples).
    h.update(hashes.as_flattened());
    *h.finalize().as_bytes()
}

pub(crate) fn sql_err(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    Error::Sqlite {
        path: path.display().to_string(),
        msg: format!("{what}: {e}"),
    }
}

/// Checks that this build has `sqlite_dbpage` (the workspace enables it in
/// `.cargo/config.toml`).
pub(crate) fn require_dbpage(c: &Connection, path: &Path) -> Result<(), Error> {
    c.query_row(
        "SELECT count(*) FROM pragma_module_list WHERE name = 'sqlite_dbpage'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map_err(|e| sql_err(path, "list modules", e))
    .and_then(|n| {
        if n == 1 {
            Ok(())
        } else {
            Err(Error::Sqlite {
                path: path.display().to_string(),
                msg: "this build of SQLite lacks sqlite_dbpage \
                      (build with LIBSQLITE3_FLAGS=-DSQLITE_ENABLE_DBPAGE_VTAB)"
                    .into(),
            })
        }
    })
}

#[cfg(test)]
thread_local! {
    /// Pages read one by one on this thread (tests count reads with it).
    pub(super) static PAGES_READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub(crate) fn read_page(c: &Connection, path: &Path, pgno: u32) -> Result<Vec<u8>, Error> {
    #[cfg(test)]
    PAGES_READ.with(|n| n.set(n.get() + 1));
    c.prepare_cached("SELECT data FROM sqlite_dbpage WHERE pgno = ?1")
        .and_then(|mut s| s.query_row([pgno], |r| r.get::<_, Vec<u8>>(0)))
        .map_err(|e| sql_err(path, &format!("read page {pgno}"), e))
}

/// Page size and every page hash of the database `c` is connected to, read in
/// its current (read) transaction.
pub(crate) fn all_hashes(c: &Connection, path: &Path) -> Result<(u32, Vec<[u8; 32]>), Error> {
    let page_size: u32 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(|e| sql_err(path, "page size", e))?;
    let mut hashes = Vec::new();
    let mut stmt = c
        .prepare_cached("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
        .map_err(|e| sql_err(path, "read pages", e))?;
    let mut rows = stmt.query([]).map_err(|e| sql_err(path, "read pages", e))?;
    // Pages are read in order by SQLite and hashed in batches on every core.
    let size = (page_size as usize).max(1);
    let mut batch: Vec<u8> = Vec::with_capacity(size * HASH_BATCH);
    let mut read = 0usize;
    while let Some(row) = rows.next().map_err(|e| sql_err(path, "read pages", e))? {
        let pgno: u32 = row.get(0).map_err(|e| sql_err(path, "read pages", e))?;
        let data = row
            .get_ref(1)
            .and_then(|v| v.as_blob().map_err(Into::into))
            .map_err(|e| sql_err(path, "read pages", e))?;
        if pgno as usize != read + 1 || data.len() != size {
            return Err(Error::Sqlite {
                path: path.display().to_string(),
                msg: format!("page {pgno} out of order or not of the page size"),
            });
        }
        read += 1;
        batch.extend_from_slice(data);
        if batch.len() == size * HASH_BATCH {
            hash_batch(&mut hashes, &batch, size);
            batch.clear();
        }
    }
    hash_batch(&mut hashes, &batch, size);
    Ok((page_size, hashes))
}

/// The quick hash of a page: xxh3-64 with a seed of the cut state's own
/// (`LiveDb::quick_seed`). It only tells a cut which pages need their blake3
/// hash computed again, as rsync (3.2 on) uses xxh3 to tell files apart: a
/// page whose quick hash is the one the last cut recorded keeps that cut's
/// blake3 hash. xxh3 is not a cryptographic hash; the seed is random and
/// never leaves the host, so a collision cannot be built in advance, and page 1
/// (whose hash skips the change counter) is always hashed with blake3.
#[must_use]
pub(super) fn quick_hash(seed: u64, data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(data, seed)
}

/// A cut's previous page table, to hash a new snapshot against:
/// `strong[i]`, `quick[i]` describe page `i + 1` (`quick` is empty when
/// unknown).
#[derive(Debug, Clone, Copy)]
pub(super) struct Prior<'a> {
    pub strong: &'a [[u8; 32]],
    pub quick: &'a [u64],
    pub seed: u64,
}

impl Prior<'_> {
    /// Page `pgno`'s blake3 hash, should its quick hash `q` be the one
    /// recorded with it.
    fn strong_if_same(&self, pgno: u32, q: u64) -> Option<[u8; 32]> {
        let i = (pgno as usize).checked_sub(1)?;
        (pgno > 1 && self.quick.len() == self.strong.len() && self.quick.get(i) == Some(&q))
            .then(|| self.strong.get(i).copied())
            .flatten()
    }
}

/// The blake3 and quick hashes of the whole pages of `batch` (of `size`
/// bytes each, numbered from `first`), on every core, appended to `out`; a
/// page whose quick hash is `prior`'s keeps `prior`'s blake3 hash without
/// computing it. Returns how many pages were hashed with blake3.
pub(super) fn hash_pages(
    out: &mut Vec<([u8; 32], u64)>,
    batch: &[u8],
    size: usize,
    seed: u64,
    prior: Option<Prior<'_>>,
) -> u64 {
    use rayon::prelude::*;
    let first = out.len() as u32 + 1;
    let size = size.max(1);
    type Hashed = (Vec<([u8; 32], u64)>, u64);
    let groups: Vec<Hashed> = batch
        .par_chunks(size * HASH_GROUP)
        .enumerate()
        .map(|(g, pages)| {
            let mut hashed = Vec::with_capacity(HASH_GROUP);
            let at = first + (g * HASH_GROUP) as u32;
            let strong = hash_run(&mut hashed, pages, (size, at), seed, prior);
            (hashed, strong)
        })
        .collect();
    let mut strong = 0;
    for (hashed, n) in groups {
        out.extend(hashed);
        strong += n;
    }
    strong
}

/// [`hash_pages`] on this thread alone, for the pages of `batch` numbered
/// from `first`: the pages whose blake3 hash is computed are hashed many at
/// a time (`many`).
pub(super) fn hash_run(
    out: &mut Vec<([u8; 32], u64)>,
    batch: &[u8],
    (size, first): (usize, u32),
    seed: u64,
    prior: Option<Prior<'_>>,
) -> u64 {
    let prior = prior.filter(|p| p.seed == seed);
    let mut need: Vec<(u32, &[u8])> = Vec::new();
    let mut at = Vec::new();
    for (pgno, page) in (first..).zip(batch.chunks(size.max(1))) {
        let q = quick_hash(seed, page);
        match prior.and_then(|p| p.strong_if_same(pgno, q)) {
            Some(h) => out.push((h, q)),
            None => {
                at.push(out.len());
                need.push((pgno, page));
                out.push(([0; 32], q));
            }
        }
    }
    let mut strong = vec![[0; 32]; need.len()];
    many::page_hashes(&need, &mut strong);
    for (i, h) in at.into_iter().zip(strong) {
        out[i].0 = h;
    }
    need.len() as u64
}

/// The blake3 hashes of the whole pages of `data` (of `size` bytes each,
/// numbered from `first`) into `out` (one a page), many at a time.
pub(crate) fn page_hashes_into(data: &[u8], size: usize, first: u32, out: &mut [[u8; 32]]) {
    let pages: Vec<(u32, &[u8])> = (first..).zip(data.chunks_exact(size.max(1))).collect();
    many::page_hashes(&pages, out);
}

/// Pages a task of [`hash_pages`] and [`hash_batch`] hashes.
const HASH_GROUP: usize = 64;

/// Pages hashed at once by [`all_hashes`].
const HASH_BATCH: usize = 1024;

/// Appends the hashes of the whole pages of `batch` (of `size` bytes each),
/// numbered on from `hashes.len() + 1`.
pub(super) fn hash_batch(hashes: &mut Vec<[u8; 32]>, batch: &[u8], size: usize) {
    use rayon::prelude::*;
    let first = hashes.len() as u32 + 1;
    let size = size.max(1);
    let groups: Vec<Vec<[u8; 32]>> = batch
        .par_chunks(size * HASH_GROUP)
        .enumerate()
        .map(|(g, pages)| {
            let mut out = vec![[0; 32]; pages.len() / size];
            page_hashes_into(pages, size, first + (g * HASH_GROUP) as u32, &mut out);
            out
        })
        .collect();
    hashes.extend(groups.into_iter().flatten());
}

mod conn;
mod content;
mod copy;
mod idle;
mod live;
mod many;
mod waiting;
pub(crate) use many::page_hashes;
mod moved;
mod names;
mod persist;
mod replica;
mod serve;
mod settle;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_cut;
#[cfg(test)]
mod tests_moved;
#[cfg(test)]
mod tests_whole;
mod track;
mod wal;
mod whole;

pub use conn::CHECKPOINT_BYTES;
pub(crate) use conn::{FileStamp, RACY_NS, Seen};
pub use content::{content_snapshot, mark_by_content};
pub use copy::COPY_BUDGET;
pub use idle::RESTAMP_AFTER;
pub use live::{CutStats, LOCK_WAIT, LiveSet, RELEASE_BUDGET};
pub use replica::{
    Exclusive, Lock, PageTable, apply_pages, integrity, lock_exclusive, read_hashes,
};
pub use serve::{Need, Snapshot};
pub use settle::{SETTLE, SETTLE_MAX};

/// Gives the entries of live databases their snapshot (page size, count, hash):
/// a database is never shipped as a file.
pub fn mark_databases(entries: &mut [proto::Entry], live: &LiveSet) -> Result<(), Error> {
    for e in entries.iter_mut() {
        if live.contains(&e.path) {
            let snap = live.snapshot(&e.path).ok_or_else(|| Error::Sqlite {
                path: e.path.to_string(),
                msg: "no snapshot taken".into(),
            })?;
            e.kind = proto::Kind::Database {
                page_size: snap.page_size,
                pages: snap.pages,
                hash: snap.hash,
            };
        }
    }
    Ok(())
}
