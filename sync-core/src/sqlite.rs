//! Live SQLite databases: found by glob or header, never read raw, shipped as
//! pages of a consistent snapshot.
//!
//! **Source side** ([`LiveSet`]): every database of a folder is held open by two
//! kinds of connection. A *locker* takes `BEGIN IMMEDIATE` for a cut; *readers*
//! hold read transactions, which are the snapshots pages are read from (through
//! the `sqlite_dbpage` virtual table: pages as SQLite sees them, WAL included).
//! A cut locks every database in path order, opens a new read transaction on
//! each, and releases the locks: writers stall for that window only. The
//! previous cut's readers are released only after the new ones hold, so a WAL
//! database's log can never be reset behind our back between two cuts (a reset
//! needs every reader on read mark 0 and a fully checkpointed log, and a reader
//! on mark 0 forbids checkpointing): the pages written since the last cut are
//! exactly those named by the frame headers appended since then, read straight
//! from the `-wal` file (which SQLite never locks). Rollback-journal databases
//! have no log: their file change counter tells whether anything changed, and
//! then every page is hashed again; their readers block writers' commits, so
//! [`LiveSet::end_round`] ends them as soon as the round is served.
//!
//! The process that holds these connections never opens a database file (or its
//! `-shm`) with plain file I/O: closing any descriptor of a file drops all of the
//! process's POSIX locks on it (SQLite's "How To Corrupt" §2.2). Scans skip
//! known databases and their side files.
//!
//! **Content hash**: blake3 of each page (page 1 with the change counter and the
//! version-valid-for fields zeroed: SQLite rewrites them on commit), then
//! [`db_hash`] over the page hashes: what both sides compare, and what the root
//! hash covers.
//!
//! **Replica side** ([`read_hashes`], [`apply_pages`]): pages are written inside
//! one SQLite transaction through `sqlite_dbpage`, so the database is openable at
//! every instant and a crash rolls back (or the cut journal rolls forward).

use crate::{Error, RelPath};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The first 16 bytes of every SQLite database file.
pub const HEADER: &[u8; 16] = b"SQLite format 3\0";
/// Files that belong to a database and never travel raw.
pub const SIDECARS: [&[u8]; 3] = [b"-wal", b"-shm", b"-journal"];
/// Cut hashes remembered per database, so a replica that is a few cuts behind
/// still gets only the pages changed since what it holds.
const HISTORY: usize = 16;

/// The base name of a side file (`x.db-wal` → `x.db`), if `name` is one.
#[must_use]
pub fn sidecar_base(name: &[u8]) -> Option<&[u8]> {
    SIDECARS.iter().find_map(|s| {
        name.strip_suffix(*s)
            .filter(|b| !b.is_empty() && !b.ends_with(b"/"))
    })
}

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
    for p in hashes {
        h.update(p);
    }
    *h.finalize().as_bytes()
}

fn sql_err(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    Error::Sqlite {
        path: path.display().to_string(),
        msg: format!("{what}: {e}"),
    }
}

/// Checks that this build has `sqlite_dbpage` (the workspace enables it in
/// `.cargo/config.toml`).
fn require_dbpage(c: &Connection, path: &Path) -> Result<(), Error> {
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

fn read_page(c: &Connection, path: &Path, pgno: u32) -> Result<Vec<u8>, Error> {
    c.prepare_cached("SELECT data FROM sqlite_dbpage WHERE pgno = ?1")
        .and_then(|mut s| s.query_row([pgno], |r| r.get::<_, Vec<u8>>(0)))
        .map_err(|e| sql_err(path, &format!("read page {pgno}"), e))
}

/// Page size and every page hash of the database `c` is connected to, read in
/// its current (read) transaction.
fn all_hashes(c: &Connection, path: &Path) -> Result<(u32, Vec<[u8; 32]>), Error> {
    let page_size: u32 = c
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .map_err(|e| sql_err(path, "page size", e))?;
    let mut hashes = Vec::new();
    let mut stmt = c
        .prepare_cached("SELECT pgno, data FROM sqlite_dbpage ORDER BY pgno")
        .map_err(|e| sql_err(path, "read pages", e))?;
    let mut rows = stmt.query([]).map_err(|e| sql_err(path, "read pages", e))?;
    while let Some(row) = rows.next().map_err(|e| sql_err(path, "read pages", e))? {
        let pgno: u32 = row.get(0).map_err(|e| sql_err(path, "read pages", e))?;
        let data = row
            .get_ref(1)
            .and_then(|v| v.as_blob().map_err(Into::into))
            .map_err(|e| sql_err(path, "read pages", e))?;
        if pgno as usize != hashes.len() + 1 {
            return Err(Error::Sqlite {
                path: path.display().to_string(),
                msg: format!("page {pgno} out of order"),
            });
        }
        hashes.push(page_hash(pgno, data));
    }
    Ok((page_size, hashes))
}

/// Where we are in a database's write-ahead log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WalPos {
    /// Salts of the log generation read so far.
    salts: Option<[u8; 8]>,
    /// Next frame (from 0) not yet read.
    next: u64,
}

/// Pages named by the committed frames of `wal` from `pos` up to `limit` bytes
/// (the log's size while writers were locked out); advances `pos` to just past
/// the last commit frame. `None` when the log cannot be followed (then every
/// page is compared).
fn wal_frames(wal: &Path, pos: &mut WalPos, limit: u64) -> Option<BTreeSet<u32>> {
    let mut f = match std::fs::File::open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // No log: nothing since the last cut unless one existed then.
            return pos.salts.is_none().then(BTreeSet::new);
        }
        Err(_) => return None,
    };
    let mut hdr = [0u8; 32];
    if limit < 32 || f.read_exact(&mut hdr).is_err() {
        return pos.salts.is_none().then(BTreeSet::new);
    }
    let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if magic & !1 != 0x377f_0682 {
        return None;
    }
    let page_size = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let page_size = if page_size == 1 { 65536 } else { page_size };
    if !proto::valid_page_size(page_size) {
        return None;
    }
    let mut salts = [0u8; 8];
    salts.copy_from_slice(&hdr[16..24]);
    // A new generation: our held snapshot kept the old one from being reset
    // while it had frames we had not read (module docs), so all of the new
    // one's frames are new to us.
    let start = if pos.salts == Some(salts) {
        pos.next
    } else {
        0
    };
    let frame = 24 + u64::from(page_size);
    let (mut pages, mut txn) = (BTreeSet::new(), Vec::new());
    let mut next = start;
    let mut i = start;
    let mut fh = [0u8; 24];
    while 32 + (i + 1) * frame <= limit {
        if f.read_exact_at(&mut fh, 32 + i * frame).is_err() || fh[8..16] != salts {
            break;
        }
        txn.push(u32::from_be_bytes([fh[0], fh[1], fh[2], fh[3]]));
        i += 1;
        if fh[4..8] != [0; 4] {
            // a commit frame ends a transaction
            pages.extend(txn.drain(..));
            next = i;
        }
    }
    *pos = WalPos {
        salts: Some(salts),
        next,
    };
    Some(pages)
}

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

/// A replica's database as it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
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
pub fn read_hashes(path: &Path) -> Result<Option<Held>, Error> {
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
        Ok((page_size, hashes)) => Ok(Some(Held {
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
    tx.execute_batch("SELECT count(*) FROM sqlite_schema")
        .map_err(|e| sql_err(path, "begin", e))?;
    let mut n = 0u64;
    {
        let mut put = tx
            .prepare("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")
            .map_err(|e| sql_err(path, "write pages", e))?;
        for p in pages {
            let (pgno, data) = p?;
            put.execute(rusqlite::params![pgno, data])
                .map_err(|e| sql_err(path, &format!("write page {pgno}"), e))?;
            n += 1;
        }
        let now: u32 = tx
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(|e| sql_err(path, "page count", e))?;
        if now > count {
            tx.execute(
                "INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, NULL)",
                [count + 1],
            )
            .map_err(|e| sql_err(path, "truncate", e))?;
        }
    }
    tx.commit().map_err(|e| sql_err(path, "commit", e))?;
    // The last connection's close checkpoints a WAL database and removes its log.
    c.close().map_err(|(_, e)| sql_err(path, "close", e))?;
    Ok(n)
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
mod tests {
    use super::*;

    fn db(path: &Path, wal: bool) -> Connection {
        let c = Connection::open(path).unwrap();
        if wal {
            c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
                .unwrap();
        }
        c.execute_batch(
            "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 2000)
             INSERT INTO t SELECT i, randomblob(300) FROM n;",
        )
        .unwrap();
        c
    }

    fn replica_hash(path: &Path) -> [u8; 32] {
        read_hashes(path).unwrap().unwrap().hash
    }

    #[test]
    fn sidecars_are_named() {
        assert_eq!(sidecar_base(b"a.db-wal"), Some(&b"a.db"[..]));
        assert_eq!(sidecar_base(b"a.db-journal"), Some(&b"a.db"[..]));
        assert_eq!(sidecar_base(b"-wal"), None);
        assert_eq!(sidecar_base(b"a.db"), None);
    }

    fn ship(live: &LiveSet, rel: &RelPath, dst: &Path) {
        let have = read_hashes(dst).unwrap();
        let pages = match have {
            None => (1..=live.snapshot(rel).unwrap().pages).collect(),
            Some(h) => match live.need(rel, &h.hash) {
                Need::Nothing => Vec::new(),
                Need::Pages(p) => p,
                Need::Hashes => live.differing(rel, h.page_size, &h.hashes),
            },
        };
        let snap = live.snapshot(rel).unwrap();
        if !dst.exists() {
            let f = std::fs::File::create(dst).unwrap();
            for p in &pages {
                f.write_all_at(
                    &live.page(rel, *p).unwrap(),
                    u64::from(*p - 1) * u64::from(snap.page_size),
                )
                .unwrap();
            }
        } else {
            apply_pages(
                dst,
                snap.pages,
                pages.into_iter().map(|p| Ok((p, live.page(rel, p)?))),
            )
            .unwrap();
        }
        assert_eq!(replica_hash(dst), snap.hash);
        assert_eq!(integrity(dst).unwrap(), "ok");
    }

    fn ship_and_end(live: &mut LiveSet, rel: &RelPath, dst: &Path) {
        ship(live, rel, dst);
        live.end_round();
    }

    fn cut_follows_writes(wal: bool) {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("a.db");
        let dst = t.path().join("copy.db");
        let w = db(&src, wal);
        let rel = RelPath::new(b"a.db").unwrap();
        let mut live = LiveSet::new(t.path(), Duration::from_secs(5));
        assert!(live.track([&rel]).is_empty());
        let first = live.cut().unwrap();
        assert_eq!(first.changed, vec![rel.clone()]);
        ship_and_end(&mut live, &rel, &dst);
        let before = live.snapshot(&rel).unwrap();
        // a small change: few pages, found without hashing every page
        w.execute("UPDATE t SET v = randomblob(300) WHERE k = 1000", [])
            .unwrap();
        let c = live.cut().unwrap();
        assert!(c.pages_changed >= 1 && c.pages_changed <= 4, "{c:?}");
        let after = live.snapshot(&rel).unwrap();
        assert_ne!(before.hash, after.hash);
        match live.need(&rel, &before.hash) {
            Need::Pages(p) => assert_eq!(p.len(), c.pages_changed),
            other => panic!("{other:?}"),
        }
        ship_and_end(&mut live, &rel, &dst);
        // growth and shrink (VACUUM rewrites and truncates)
        w.execute_batch("DELETE FROM t WHERE k > 100; VACUUM;")
            .unwrap();
        live.cut().unwrap();
        ship_and_end(&mut live, &rel, &dst);
        let n: i64 = Connection::open(&dst)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 100);
        // nothing changed: nothing to ship
        let c = live.cut().unwrap();
        assert!(c.changed.is_empty(), "{c:?}");
    }

    #[test]
    fn wal_cuts_ship_changed_pages() {
        cut_follows_writes(true);
    }

    #[test]
    fn rollback_journal_cuts_ship_changed_pages() {
        cut_follows_writes(false);
    }

    #[test]
    fn a_cut_waits_for_a_writer_and_sees_its_commit_whole() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("a.db");
        let w = db(&src, true);
        let rel = RelPath::new(b"a.db").unwrap();
        let mut live = LiveSet::new(t.path(), Duration::from_secs(5));
        live.track([&rel]);
        live.cut().unwrap();
        w.execute_batch("BEGIN IMMEDIATE; UPDATE t SET v = x'00' WHERE k = 1;")
            .unwrap();
        let done = std::thread::scope(|s| {
            let h = s.spawn(|| {
                let mut l2 = LiveSet::new(t.path(), Duration::from_secs(5));
                l2.track([&rel]);
                l2.cut().unwrap();
                let v = l2.page(&rel, 1).unwrap();
                (v.len(), l2.snapshot(&rel).unwrap())
            });
            std::thread::sleep(Duration::from_millis(100));
            w.execute_batch("COMMIT").unwrap();
            h.join().unwrap()
        });
        assert_eq!(done.0, 4096);
        live.cut().unwrap();
        assert_eq!(live.snapshot(&rel).unwrap(), done.1);
    }
}
