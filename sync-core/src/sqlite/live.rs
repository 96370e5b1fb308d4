//! The source side: a folder's live databases, cut together.

use super::conn::{Conns, FileStamp, Seen, side_path};
use super::copy::{COPY_BUDGET, Head};
use super::idle::next_seen;
use super::sql_err;
use super::wal::{WalPos, wal_frames};
use crate::{Error, RelPath};
use rusqlite::Connection;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Retries a busy lock every 100 µs for the first 0.1 s (a writer committing
/// in a tight loop leaves gaps of microseconds), then every 2 ms (a long
/// transaction: waking 10,000 times a second would only burn CPU), for about
/// [`LOCK_WAIT`] in all.
fn spin(n: i32) -> bool {
    const FAST: i32 = 800;
    if n < FAST {
        std::thread::sleep(Duration::from_micros(100));
        return true;
    }
    std::thread::sleep(Duration::from_millis(2));
    u128::from((n - FAST).unsigned_abs()) * 2 < LOCK_WAIT.as_millis()
}

#[cfg(test)]
thread_local! {
    /// Called with the database's path just before a cut asks for its lock
    /// (tests write or checkpoint there).
    pub(super) static BEFORE_LOCK: std::cell::RefCell<Option<super::copy::Hook>> =
        const { std::cell::RefCell::new(None) };

}

/// Bytes of pages a cut may read ahead so as to let its snapshots go before
/// its round is served ([`LiveSet::release`]).
pub const RELEASE_BUDGET: u64 = 32 << 20;

/// How long a cut waits for a database's writer before giving up for now (the
/// previous cut stands; the next round tries again).
pub const LOCK_WAIT: Duration = Duration::from_secs(1);

/// One live database on the source: what the last cut saw of it. Connections
/// exist only from a cut to the end of the round that ships it.
#[derive(Debug)]
pub(super) struct LiveDb {
    pub(super) path: PathBuf,
    pub(super) busy: Duration,
    pub(super) conns: Option<Conns>,
    /// Pages of the current snapshot read ahead of its round (`Some` once
    /// the snapshot itself was let go: [`LiveSet::release`]).
    pub(super) cache: Option<BTreeMap<u32, Vec<u8>>>,
    /// Pages this cut found changed, as read to hash them (at most
    /// [`RELEASE_BUDGET`] bytes over all databases): [`LiveSet::release`]
    /// does not read them twice.
    pub(super) fresh: BTreeMap<u32, Vec<u8>>,
    /// A rollback-journal database's whole file as this cut took it
    /// (`copy.rs`).
    pub(super) copy: Option<Vec<u8>>,
    /// The cut's page count, page size and first page, when read already.
    pub(super) head: Option<Head>,
    /// Whether the file is another one than the last cut's (a new inode).
    pub(super) replaced: bool,
    /// The log as the last cut saw it, under its lock.
    pub(super) wal_seen: Option<FileStamp>,
    /// Left out of this (partial) cut: surely unwritten since the last one
    /// (`idle.rs`).
    pub(super) idle: bool,
    /// Left out of this (partial) cut: a file no cut opened yet, not quiet
    /// for long enough (`settle.rs`).
    pub(super) pending: bool,
    /// The file (device, inode) a cut opened last.
    pub(super) settled_id: Option<(u64, u64)>,
    /// Another file, and since when it waits to be quiet.
    pub(super) pending_since: Option<((u64, u64), Instant)>,
    /// A connection opened, should the round ask for a page of an idle
    /// database, to read it in short read transactions.
    pub(super) lazy: std::cell::RefCell<Option<Conns>>,
    /// The pages of the open snapshot not to be read from the file when it
    /// is served (`serve.rs`), once worked out; `Some(None)`: the log cannot
    /// tell.
    pub(super) served_overlay: std::cell::RefCell<Option<Option<BTreeSet<u32>>>>,
    pub(super) wal: WalPos,
    /// The database file as the last cut saw it, under its lock.
    pub(super) seen: Option<Seen>,
    /// Where the log, the file and the log's stamp stood before this cut's
    /// snapshot moved them: a cut that is given up goes back to them.
    pub(super) before: Option<(WalPos, Option<Seen>, Option<FileStamp>)>,
    /// Pages named by the log frames committed before this cut (read under
    /// the cut's locks); `None` when the log could not tell.
    pub(super) frames: Option<BTreeSet<u32>>,
    /// The file's stamp and the log's salts just before this cut asked for
    /// its lock ([`super::waiting::checkpointed_while_waiting`]).
    pub(super) pre_lock: Option<(Option<FileStamp>, Option<[u8; 8]>)>,
    pub(super) wal_mode: bool,
    pub(super) page_size: u32,
    pub(super) hashes: Vec<[u8; 32]>,
    /// Each page's quick hash with `hashes` (empty when not known): a page
    /// whose quick hash did not change keeps its blake3 hash (`whole.rs`).
    pub(super) quick: Vec<u64>,
    /// The seed of `quick`: random, and kept with it.
    pub(super) quick_seed: u64,
    pub(super) hash: [u8; 32],
    /// Whether `hashes` describe a snapshot (false until the first cut).
    pub(super) has_snapshot: bool,
    pub(super) change_counter: [u8; 4],
    /// Hashes of recent cuts, each with the pages changed since.
    pub(super) history: VecDeque<([u8; 32], BTreeSet<u32>)>,
}

impl LiveDb {
    pub(super) fn new(path: &Path, busy: Duration) -> Self {
        Self {
            path: path.to_path_buf(),
            busy,
            conns: None,
            cache: None,
            fresh: BTreeMap::new(),
            copy: None,
            head: None,
            replaced: false,
            wal_seen: None,
            idle: false,
            pending: false,
            settled_id: None,
            pending_since: None,
            lazy: std::cell::RefCell::new(None),
            served_overlay: std::cell::RefCell::new(None),
            wal: WalPos::default(),
            seen: None,
            before: None,
            frames: None,
            pre_lock: None,
            wal_mode: false,
            page_size: 0,
            hashes: Vec::new(),
            quick: Vec::new(),
            quick_seed: rand::random(),
            hash: [0; 32],
            has_snapshot: false,
            change_counter: [0; 4],
            history: VecDeque::new(),
        }
    }

    /// Opens this cut's connections (before any lock is taken: opening is
    /// not part of the writers' stall).
    fn connect(&mut self) -> Result<(), Error> {
        // A snapshot still open from an earlier cut gives way to the new one.
        self.end_round();
        let c = Conns::open(&self.path, self.busy, spin)?;
        self.settled_id = Some(c.opened);
        self.conns = Some(c);
        Ok(())
    }

    pub(super) fn reader(&self) -> Result<&Connection, Error> {
        reader_of(&self.conns, &self.path)
    }

    /// Takes this cut's lock (`BEGIN IMMEDIATE`, retried for [`LOCK_WAIT`]).
    fn lock(&self) -> Result<(), rusqlite::Error> {
        match self.conns.as_ref().and_then(|c| c.locker.as_ref()) {
            Some(l) => l.execute_batch("BEGIN IMMEDIATE"),
            None => Err(rusqlite::Error::InvalidQuery),
        }
    }

    /// Ends the lock and closes the locker.
    fn unlock(&mut self) {
        if let Some(l) = self.conns.as_mut().and_then(|c| c.locker.take()) {
            let _ = l.execute_batch("ROLLBACK");
        }
    }

    /// Under the cut's locks: reads the log's new frame headers and opens the
    /// read transaction pages are read from. The frames are read here, while
    /// no writer can append: a commit made after the release may land in log
    /// space already allocated (after a reset, or over a rolled-back tail) with
    /// the current salts, and must not be taken for part of this cut.
    fn begin_snapshot(&mut self) -> Result<(), Error> {
        // The -wal file is never locked by SQLite: reading it is safe (see the
        // module docs); the database file and -shm are never opened.
        let now = FileStamp::of(&self.path);
        self.before = Some((self.wal, self.seen, self.wal_seen));
        let seen = self.seen.take();
        let replaced = seen.is_some_and(|s| s.replaced_by(now));
        let base_unchanged = seen.is_some_and(|s| s.unchanged(now));
        let wal = side_path(&self.path, "-wal");
        self.wal_seen = FileStamp::of(&wal);
        let limit = self.wal_seen.map_or(0, |s| s.size);
        let pre_lock = self.pre_lock.take();
        let checkpointed =
            !base_unchanged && super::waiting::checkpointed_while_waiting(pre_lock, seen, &wal);
        let frames = wal_frames(&wal, &mut self.wal, limit, base_unchanged || checkpointed);
        tracing::debug!(
            db = %self.path.display(),
            log_bytes = limit,
            frames = frames.as_ref().map(BTreeSet::len),
            base_unchanged,
            checkpointed,
            replaced,
            written_ms_ago = now.map(|n| (crate::scan::now_ns() - n.changed_ns()) / 1_000_000),
            "log read under the cut's lock"
        );
        // A database restored by rename is another file: compare every page.
        self.frames = if replaced { None } else { frames };
        self.replaced = replaced;
        let old_log = self.before.and_then(|(_, _, log)| log);
        self.seen = Some(next_seen(seen, now, old_log, self.wal_seen));
        let path = self.path.clone();
        let c = self.conns.as_mut().ok_or_else(|| Error::Sqlite {
            path: path.display().to_string(),
            msg: "not connected".into(),
        })?;
        c.reader
            .execute_batch("BEGIN")
            .and_then(|()| {
                c.reader
                    .query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
            })
            .map_err(|e| sql_err(&path, "begin snapshot", e))?;
        c.reading = true;
        c.since = Some(Instant::now());
        self.served_overlay.replace(None);
        Ok(())
    }

    /// The round is served (or the cut postponed): the snapshot, the
    /// connections and the pages read ahead are let go.
    pub(super) fn end_round(&mut self) {
        self.cache = None;
        self.served_overlay.replace(None);
        self.fresh = BTreeMap::new();
        self.copy = None;
        self.head = None;
        self.idle = false;
        self.pending = false;
        for c in [self.conns.take(), self.lazy.get_mut().take()]
            .into_iter()
            .flatten()
        {
            c.close(&self.path);
        }
    }
}

impl Drop for LiveDb {
    fn drop(&mut self) {
        self.end_round();
    }
}

/// Whether no file stands at `path` any more.
fn vanished(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

/// The connection pages are read from (split from `LiveDb` so the hashes can
/// be updated while it is borrowed).
pub(super) fn reader_of<'c>(
    conns: &'c Option<Conns>,
    path: &Path,
) -> Result<&'c Connection, Error> {
    conns
        .as_ref()
        .map(|c| &c.reader)
        .ok_or_else(|| Error::Sqlite {
            path: path.display().to_string(),
            msg: "no snapshot open (its cut was postponed, or its round is over)".into(),
        })
}

/// What a cut did.
#[derive(Debug, Clone, Default)]
pub struct CutStats {
    /// How long writers were locked out (from the first lock to the release).
    pub stall: Duration,
    /// Databases whose content changed since the previous cut.
    pub changed: Vec<RelPath>,
    /// Pages changed, over all databases.
    pub pages_changed: usize,
    /// Set when a database's writer held its lock past [`LOCK_WAIT`]: no cut
    /// was taken (the previous one stands, with no snapshot to read pages
    /// from) and the round should be retried.
    pub blocked: Option<String>,
    /// Databases that vanished or stopped being databases: no longer held.
    pub dropped: Vec<RelPath>,
    /// Databases left out of this (partial) cut: files no cut opened yet,
    /// still being written (`settle.rs`). Neither cut nor shipped as files:
    /// offer them again soon.
    pub pending: Vec<RelPath>,
}

/// The live databases of a source folder.
#[derive(Debug)]
pub struct LiveSet {
    root: PathBuf,
    busy: Duration,
    /// How long a file no cut opened yet must be quiet (`settle.rs`).
    pub(super) settle: Duration,
    pub(super) dbs: BTreeMap<RelPath, LiveDb>,
    /// Databases opened through another of their names (`names.rs`).
    pub(super) opened_as: BTreeMap<RelPath, RelPath>,
}

impl LiveSet {
    pub(super) fn dbs_mut(&mut self) -> impl Iterator<Item = &mut LiveDb> {
        self.dbs.values_mut()
    }

    /// An empty set for the folder at `root`; `busy` bounds each lock wait.
    #[must_use]
    pub fn new(root: &Path, busy: Duration) -> Self {
        Self {
            // SQLite opens databases by path, refusing symlinks on the way.
            root: std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
            busy,
            settle: super::settle::SETTLE,
            dbs: BTreeMap::new(),
            opened_as: BTreeMap::new(),
        }
    }

    /// The same set, with files no cut opened yet waiting to be quiet for
    /// `settle` (zero: opened at once) instead of [`super::SETTLE`].
    #[must_use]
    pub fn with_settle(mut self, settle: Duration) -> Self {
        self.settle = settle;
        self
    }

    /// The folder's root (canonical).
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The databases held.
    pub fn paths(&self) -> impl Iterator<Item = &RelPath> {
        self.dbs.keys()
    }

    /// Whether `path` is held.
    #[must_use]
    pub fn contains(&self, path: &RelPath) -> bool {
        self.dbs.contains_key(path)
    }

    /// Holds exactly the databases of `paths` (no connection is opened
    /// before a cut).
    pub fn track<'a>(&mut self, paths: impl IntoIterator<Item = &'a RelPath>) {
        let want: BTreeSet<&RelPath> = paths.into_iter().collect();
        self.dbs.retain(|p, _| want.contains(p));
        self.add(want);
    }

    /// Also holds the databases of `paths`.
    pub fn add<'a>(&mut self, paths: impl IntoIterator<Item = &'a RelPath>) {
        for p in paths {
            if !self.dbs.contains_key(p) {
                let opened = self.opened_as.get(p).unwrap_or(p);
                let db = LiveDb::new(&crate::scan::abs(&self.root, opened), self.busy);
                self.dbs.insert(p.clone(), db);
            }
        }
    }

    /// Drops a database (it vanished or stopped being one).
    pub fn forget(&mut self, path: &RelPath) {
        if let Some(mut db) = self.dbs.remove(path) {
            db.end_round();
        }
    }

    /// A consistent cut of every database: connections opened, `BEGIN
    /// IMMEDIATE` on all in path order, a read transaction on each, the locks
    /// released; then the pages changed since the previous cut are found, from
    /// the new snapshots. The snapshots are held until [`LiveSet::end_round`].
    /// A database that vanished, or is no longer one, leaves the set
    /// ([`CutStats::dropped`]).
    /// A database no cut opened yet is waited for until it is quiet (at
    /// most [`super::SETTLE_MAX`], `settle.rs`).
    pub fn cut(&mut self) -> Result<CutStats, Error> {
        self.wait_settled();
        self.cut_marked(false)
    }

    /// [`LiveSet::cut`] of the databases not marked idle; with `gate`, those
    /// not settled are left out too ([`CutStats::pending`]).
    pub(super) fn cut_marked(&mut self, gate: bool) -> Result<CutStats, Error> {
        let mut stats = CutStats::default();
        if let Err(e) = self.connect_all(gate, &mut stats) {
            self.abandon();
            return Err(e);
        }
        let (stall, res) = self.lock_and_snapshot(&mut stats.dropped);
        stats.stall = stall;
        for p in &stats.dropped {
            self.forget(p);
        }
        match res {
            Err(e) => {
                self.abandon();
                return Err(e);
            }
            Ok(Some(why)) => {
                // Nothing of this cut is kept: each database stands where
                // the last cut left it (its log position too, so the next
                // cut reads only the frames since, not every page).
                for db in self.dbs.values_mut() {
                    db.end_round();
                    db.rewind();
                }
                stats.blocked = Some(why);
                return Ok(stats);
            }
            Ok(None) => {}
        }
        // Rollback-journal snapshots block their writers: let go before hashing.
        let mut budget = COPY_BUDGET;
        let detached = self
            .dbs
            .values_mut()
            .try_for_each(|db| db.detach(&mut budget));
        if let Err(e) = detached {
            self.abandon();
            return Err(e);
        }
        let mut failed = None;
        let mut keep = RELEASE_BUDGET;
        for (p, db) in self.dbs.iter_mut().filter(|(_, d)| !d.idle && !d.pending) {
            match db.advance(&mut keep) {
                Ok(0) => {}
                Ok(n) => {
                    stats.changed.push(p.clone());
                    stats.pages_changed += n;
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            self.abandon();
            return Err(e);
        }
        Ok(stats)
    }

    /// Opens every database's connections; those whose file is gone are
    /// listed as dropped, and with `gate` those not settled (or replaced
    /// while being opened) as pending.
    fn connect_all(&mut self, gate: bool, stats: &mut CutStats) -> Result<(), Error> {
        let (settle, now) = (self.settle, Instant::now());
        for (p, db) in self.dbs.iter_mut().filter(|(_, d)| !d.idle) {
            if gate && !db.settled(settle, now) {
                db.pending = true;
                stats.pending.push(p.clone());
                continue;
            }
            if let Err(e) = db.connect() {
                if vanished(&db.path) {
                    stats.dropped.push(p.clone());
                    continue;
                }
                if gate && db.settled_id != super::conn::FileStamp::of(&db.path).map(|s| s.id()) {
                    // replaced while being opened: not settled
                    db.pending = true;
                    stats.pending.push(p.clone());
                    continue;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Locks every database in path order and opens its snapshot, then
    /// releases the locks: the writers' stall, and `Some(why)` when a writer
    /// held its lock past [`LOCK_WAIT`]. Files that are not databases are
    /// listed in `gone`.
    fn lock_and_snapshot(
        &mut self,
        gone: &mut Vec<RelPath>,
    ) -> (Duration, Result<Option<String>, Error>) {
        let mut first: Option<Instant> = None;
        let mut out = Ok(None);
        // Before any lock is taken (not in the writers' stall of the
        // databases locked first): what a checkpoint while the cut waits is
        // told against (`checkpointed_while_waiting`).
        for (p, db) in self.dbs.iter_mut() {
            db.pre_lock = (!(gone.contains(p) || db.idle || db.pending))
                .then(|| super::waiting::pre_lock(&db.path));
        }
        for (p, db) in self.dbs.iter_mut() {
            if db.pre_lock.is_none() {
                continue;
            }
            #[cfg(test)]
            BEFORE_LOCK.with(|h| {
                if let Some(f) = h.borrow_mut().as_mut() {
                    f(&db.path);
                }
            });
            if let Err(e) = db.lock() {
                match e.sqlite_error_code() {
                    Some(rusqlite::ErrorCode::DatabaseBusy) => {
                        out = Ok(Some(format!(
                            "database {}: its writer held the lock for over {} ms; cut postponed",
                            db.path.display(),
                            LOCK_WAIT.as_millis()
                        )));
                        break;
                    }
                    Some(rusqlite::ErrorCode::NotADatabase) => {
                        gone.push(p.clone());
                        continue;
                    }
                    _ if vanished(&db.path) => {
                        gone.push(p.clone());
                        continue;
                    }
                    _ => {
                        out = Err(sql_err(&db.path, "lock for the cut", e));
                        break;
                    }
                }
            }
            first.get_or_insert_with(Instant::now);
            if let Err(e) = db.begin_snapshot() {
                // renamed or deleted since it was opened: the next round sees
                // what stands there now
                if vanished(&db.path) {
                    gone.push(p.clone());
                    continue;
                }
                out = Err(e);
                break;
            }
        }
        for db in self.dbs.values_mut() {
            db.unlock();
        }
        (first.map(|t| t.elapsed()).unwrap_or_default(), out)
    }

    /// A cut that did not complete: connections closed, and what was read of
    /// the logs forgotten (the next cut compares every page).
    fn abandon(&mut self) {
        for db in self.dbs.values_mut() {
            db.end_round();
            db.forget_position();
        }
    }

    /// Lets every snapshot of the cut go as soon as the pages its round may
    /// ask for are read ahead (at most [`RELEASE_BUDGET`] bytes over all
    /// databases; a database past it keeps its snapshot until
    /// [`LiveSet::end_round`]). `all`: a replica at an unknown state may ask
    /// for any page (a full round); otherwise it holds one of the remembered
    /// cuts (a partial round). A rollback-journal snapshot blocks its
    /// writers' commits and a WAL snapshot its log's reset: neither then
    /// waits on the network or on the replica's disk.
    pub fn release(&mut self, all: bool) -> Result<(), Error> {
        let mut budget = RELEASE_BUDGET;
        for db in self.dbs.values_mut() {
            db.release(all, &mut budget)?;
        }
        Ok(())
    }

    /// The round is served: rollback-journal snapshots are released.
    pub fn end_round(&mut self) {
        for db in self.dbs.values_mut() {
            db.end_round();
        }
    }
}
