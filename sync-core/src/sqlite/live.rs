//! The source side: a folder's live databases, cut together.

use super::wal::{WalPos, wal_frames};
use super::{HISTORY, all_hashes, db_hash, page_hash, read_page, require_dbpage, sql_err};
use crate::{Error, RelPath};
use rusqlite::{Connection, OpenFlags};
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

/// How long a cut waits for a database's writer before giving up for now (the
/// previous cut stands; the next round tries again).
pub const LOCK_WAIT: Duration = Duration::from_secs(1);

/// One live database on the source.
#[derive(Debug)]
struct LiveDb {
    path: PathBuf,
    locker: Connection,
    readers: [Connection; 2],
    /// Which reader holds the current snapshot.
    cur: usize,
    reading: [bool; 2],
    wal: WalPos,
    /// Pages named by the log frames committed before this cut (read under
    /// the cut's locks); `None` when the log could not be followed.
    frames: Option<BTreeSet<u32>>,
    wal_mode: bool,
    page_size: u32,
    hashes: Vec<[u8; 32]>,
    hash: [u8; 32],
    /// Whether `hashes` describe a snapshot (false until the first cut).
    known: bool,
    change_counter: [u8; 4],
    /// Hashes of recent cuts, each with the pages changed since.
    history: VecDeque<([u8; 32], BTreeSet<u32>)>,
}

impl LiveDb {
    fn open(path: &Path, busy: Duration) -> Result<Self, Error> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let open = |query_only: bool| -> Result<Connection, Error> {
            let c =
                Connection::open_with_flags(path, flags).map_err(|e| sql_err(path, "open", e))?;
            c.busy_timeout(busy)
                .map_err(|e| sql_err(path, "busy timeout", e))?;
            if query_only {
                c.execute_batch("PRAGMA query_only = 1")
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
        Ok(Self {
            path: path.to_path_buf(),
            readers: [open(true)?, open(true)?],
            locker,
            cur: 0,
            reading: [false; 2],
            wal: WalPos::default(),
            frames: None,
            wal_mode: false,
            page_size: 0,
            hashes: Vec::new(),
            hash: [0; 32],
            known: false,
            change_counter: [0; 4],
            history: VecDeque::new(),
        })
    }

    fn wal_path(&self) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push("-wal");
        PathBuf::from(p)
    }

    fn reader(&self) -> &Connection {
        &self.readers[self.cur]
    }

    /// Under the cut's locks: reads the log's new frame headers and opens a read
    /// transaction on the spare reader. The frames are read here, while no
    /// writer can append: a commit made after the release may land in log
    /// space already allocated (after a reset, or over a rolled-back tail) with
    /// the current salts, and must not be taken for part of this cut.
    fn begin_snapshot(&mut self) -> Result<(), Error> {
        // The -wal file is never locked by SQLite: reading it is safe (see the
        // module docs); the database file and -shm are never opened.
        let wal = self.wal_path();
        let limit = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        self.frames = wal_frames(&wal, &mut self.wal, limit);
        let spare = 1 - self.cur;
        if self.reading[spare] {
            let _ = self.readers[spare].execute_batch("COMMIT");
            self.reading[spare] = false;
        }
        let r = &self.readers[spare];
        r.execute_batch("BEGIN")
            .and_then(|()| r.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(())))
            .map_err(|e| sql_err(&self.path, "begin snapshot", e))?;
        self.reading[spare] = true;
        Ok(())
    }

    /// After the locks are released: the new snapshot becomes current, the old
    /// one is let go, and the pages changed between them are found.
    fn advance(&mut self) -> Result<usize, Error> {
        let old = self.cur;
        self.cur = 1 - self.cur;
        if self.reading[old] {
            let _ = self.readers[old].execute_batch("COMMIT");
            self.reading[old] = false;
        }
        let count: u32 = self
            .reader()
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(|e| sql_err(&self.path, "page count", e))?;
        let page_size: u32 = self
            .reader()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|e| sql_err(&self.path, "page size", e))?;
        let page1 = if count > 0 {
            read_page(self.reader(), &self.path, 1)?
        } else {
            Vec::new()
        };
        self.wal_mode = page1.get(18) == Some(&2);
        let counter: [u8; 4] = page1
            .get(24..28)
            .and_then(|b| b.try_into().ok())
            .unwrap_or_default();
        let frames = if self.wal_mode {
            self.frames.take()
        } else {
            self.wal = WalPos::default();
            None
        };
        let mut changed = BTreeSet::new();
        if !self.known || page_size != self.page_size {
            let (ps, hashes) = all_hashes(self.reader(), &self.path)?;
            changed.extend(1..=hashes.len() as u32);
            self.page_size = ps;
            self.hashes = hashes;
            self.history.clear();
        } else {
            let candidates: Option<BTreeSet<u32>> = match frames {
                Some(f) => Some(f),
                None if !self.wal_mode && counter == self.change_counter => Some(BTreeSet::new()),
                None => None,
            };
            let old_len = self.hashes.len() as u32;
            self.hashes.truncate(count as usize);
            self.hashes.resize(count as usize, [0; 32]);
            match candidates {
                Some(c) => {
                    // Pages past the old end are new whatever the log says.
                    for pgno in c.into_iter().chain(old_len + 1..=count) {
                        if pgno == 0 || pgno > count {
                            continue;
                        }
                        let h = page_hash(pgno, &read_page(self.reader(), &self.path, pgno)?);
                        if self.hashes[pgno as usize - 1] != h {
                            self.hashes[pgno as usize - 1] = h;
                            changed.insert(pgno);
                        }
                    }
                }
                None => {
                    let (_, hashes) = all_hashes(self.reader(), &self.path)?;
                    for (i, (a, b)) in self.hashes.iter().zip(&hashes).enumerate() {
                        if a != b {
                            changed.insert(i as u32 + 1);
                        }
                    }
                    self.hashes = hashes;
                }
            }
            if count < old_len {
                // truncated: page 1 (the header's page count) changed with it
                changed.insert(1);
            }
        }
        self.change_counter = counter;
        self.known = true;
        let hash = db_hash(self.page_size, &self.hashes);
        let n = changed.len();
        if hash != self.hash || self.history.is_empty() {
            for (_, set) in self.history.iter_mut() {
                set.extend(changed.iter().copied());
            }
            self.history.push_back((hash, BTreeSet::new()));
            while self.history.len() > HISTORY {
                self.history.pop_front();
            }
        }
        self.hash = hash;
        Ok(n)
    }

    fn end_round(&mut self) {
        // A rollback-journal reader blocks writers' commits: let it go now.
        if !self.wal_mode && self.reading[self.cur] {
            let _ = self.readers[self.cur].execute_batch("COMMIT");
            self.reading[self.cur] = false;
        }
    }
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
    /// was taken (the previous one stands) and the round should be retried.
    pub blocked: Option<String>,
}

/// A database's snapshot as the manifest shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// Page size.
    pub page_size: u32,
    /// Page count.
    pub pages: u32,
    /// Page Merkle hash.
    pub hash: [u8; 32],
}

/// Which pages a replica needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// It already holds the snapshot.
    Nothing,
    /// These pages (it holds a recent cut).
    Pages(Vec<u32>),
    /// Its page hashes are needed to tell.
    Hashes,
}

/// The live databases of a source folder.
#[derive(Debug)]
pub struct LiveSet {
    root: PathBuf,
    busy: Duration,
    dbs: BTreeMap<RelPath, LiveDb>,
}

impl LiveSet {
    /// An empty set for the folder at `root`; `busy` bounds each lock wait.
    #[must_use]
    pub fn new(root: &Path, busy: Duration) -> Self {
        Self {
            // SQLite opens databases by path, refusing symlinks on the way.
            root: std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
            busy,
            dbs: BTreeMap::new(),
        }
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

    /// Holds exactly the databases of `paths`: opens new ones, closes those
    /// gone. A database that cannot be opened is left out with its error.
    pub fn track<'a>(&mut self, paths: impl IntoIterator<Item = &'a RelPath>) -> Vec<Error> {
        let want: BTreeSet<&RelPath> = paths.into_iter().collect();
        self.dbs.retain(|p, _| want.contains(p));
        self.add(want)
    }

    /// Also holds the databases of `paths` (those not held yet are opened).
    pub fn add<'a>(&mut self, paths: impl IntoIterator<Item = &'a RelPath>) -> Vec<Error> {
        let mut errors = Vec::new();
        for p in paths {
            if !self.dbs.contains_key(p) {
                match LiveDb::open(&crate::scan::abs(&self.root, p), self.busy) {
                    Ok(db) => {
                        self.dbs.insert(p.clone(), db);
                    }
                    Err(e) => errors.push(e),
                }
            }
        }
        errors
    }

    /// Drops a database (it vanished or stopped being one).
    pub fn forget(&mut self, path: &RelPath) {
        self.dbs.remove(path);
    }

    /// A consistent cut of every database: `BEGIN IMMEDIATE` on all in path
    /// order, a read transaction on each, the locks released; then the pages
    /// changed since the previous cut are found, from the new snapshots.
    pub fn cut(&mut self) -> Result<CutStats, Error> {
        let mut locked: Vec<&RelPath> = Vec::new();
        let mut first: Option<Instant> = None;
        let mut res = Ok(());
        let mut blocked = None;
        for (p, db) in self.dbs.iter_mut() {
            if let Err(e) = db.locker.execute_batch("BEGIN IMMEDIATE") {
                if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) {
                    blocked = Some(format!(
                        "database {}: its writer held the lock for over {} ms; cut postponed",
                        db.path.display(),
                        LOCK_WAIT.as_millis()
                    ));
                } else {
                    res = Err(sql_err(&db.path, "lock for the cut", e));
                }
                break;
            }
            first.get_or_insert_with(Instant::now);
            locked.push(p);
            if let Err(e) = db.begin_snapshot() {
                res = Err(e);
                break;
            }
        }
        let locked: BTreeSet<RelPath> = locked.into_iter().cloned().collect();
        for (p, db) in self.dbs.iter_mut() {
            if locked.contains(p) {
                let _ = db.locker.execute_batch("ROLLBACK");
            }
        }
        let stall = first.map(|t| t.elapsed()).unwrap_or_default();
        res?;
        if blocked.is_some() {
            return Ok(CutStats {
                stall,
                blocked,
                ..Default::default()
            });
        }
        let mut stats = CutStats {
            stall,
            ..Default::default()
        };
        for (p, db) in self.dbs.iter_mut() {
            let n = db.advance()?;
            if n > 0 {
                stats.changed.push(p.clone());
                stats.pages_changed += n;
            }
        }
        Ok(stats)
    }

    /// The current snapshot of `path`.
    #[must_use]
    pub fn snapshot(&self, path: &RelPath) -> Option<Snapshot> {
        self.dbs.get(path).filter(|d| d.known).map(|d| Snapshot {
            page_size: d.page_size,
            pages: d.hashes.len() as u32,
            hash: d.hash,
        })
    }

    /// What a replica holding `have` needs to reach the snapshot of `path`.
    #[must_use]
    pub fn need(&self, path: &RelPath, have: &[u8; 32]) -> Need {
        let Some(db) = self.dbs.get(path) else {
            return Need::Hashes;
        };
        if have == &db.hash {
            return Need::Nothing;
        }
        match db.history.iter().find(|(h, _)| h == have) {
            Some((_, set)) => Need::Pages(
                set.iter()
                    .copied()
                    .filter(|&p| p as usize <= db.hashes.len())
                    .collect(),
            ),
            None => Need::Hashes,
        }
    }

    /// The pages whose hashes differ from a replica's (`page_size` 0: it has
    /// no database).
    #[must_use]
    pub fn differing(&self, path: &RelPath, page_size: u32, theirs: &[[u8; 32]]) -> Vec<u32> {
        let Some(db) = self.dbs.get(path) else {
            return Vec::new();
        };
        let same_size = page_size == db.page_size;
        (0..db.hashes.len())
            .filter(|&i| !same_size || theirs.get(i) != Some(&db.hashes[i]))
            .map(|i| i as u32 + 1)
            .collect()
    }

    /// Page `pgno` of the current snapshot of `path`.
    pub fn page(&self, path: &RelPath, pgno: u32) -> Result<Vec<u8>, Error> {
        let db = self.dbs.get(path).ok_or_else(|| Error::Sqlite {
            path: path.to_string(),
            msg: "not a tracked database".into(),
        })?;
        read_page(db.reader(), &db.path, pgno)
    }

    /// The round is served: rollback-journal snapshots are released.
    pub fn end_round(&mut self) {
        for db in self.dbs.values_mut() {
            db.end_round();
        }
    }
}
