//! The persistent hash index: `(dev, inode, size, mtime, ctime)` → blake3, so
//! that a restart over an unchanged tree rehashes nothing.
//!
//! Kept in SQLite (one table, one row per regular file). The whole table is
//! loaded into memory at open (30,000 rows take milliseconds) and changes are
//! written back in one transaction by [`HashIndex::save`]. A file whose ctime is
//! within [`RACY_NS`] of the moment it was hashed is not remembered ("racily
//! clean", as git calls it): a write in the same timestamp tick would not change
//! its stamp.

use crate::{Error, RelPath};
use std::borrow::Cow;
use std::path::Path;

/// The rows by path: in a list of their own, with a table of 8-byte
/// positions to find them (an `IndexMap`), not in a hash table's
/// power-of-two slots (300,000 rows: 36 MB, not 51 MB).
type Rows = indexmap::IndexMap<Box<[u8]>, Row, foldhash::fast::RandomState>;

/// Stamps younger than this when hashed are not cached (timestamps are coarse).
pub const RACY_NS: i128 = 2_000_000_000;

/// A scan's list of hashed files is shrunk each time this many of them went
/// into the index ([`HashIndex::remember_scan`]).
const SHRINK_EVERY: usize = 1 << 15;

/// Rows dirtied since the last save that are also listed by key
/// ([`HashIndex::few`]), so that a save of a few changes (a continuous
/// partial round's) neither walks every row for the flags nor sorts them.
const FEW: usize = 4096;

/// What identifies a file's content without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
    /// Size.
    pub size: u64,
    /// mtime in ns.
    pub mtime_ns: i128,
    /// ctime in ns.
    pub ctime_ns: i128,
}

impl Stamp {
    /// The stamp of a `stat` result.
    #[must_use]
    pub fn of(st: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: st.dev(),
            ino: st.ino(),
            size: st.size(),
            mtime_ns: i128::from(st.mtime()) * 1_000_000_000 + i128::from(st.mtime_nsec()),
            ctime_ns: i128::from(st.ctime()) * 1_000_000_000 + i128::from(st.ctime_nsec()),
        }
    }
}

/// A [`Stamp`] as the index keeps it: times in 64-bit nanoseconds (years
/// 1677 to 2262; a stamp outside is not remembered). A row is 80 bytes, not
/// 112: at 300,000 files the map's table is 48 MB, not 67 MB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Packed {
    fn of(s: &Stamp) -> Option<Self> {
        Some(Self {
            dev: s.dev,
            ino: s.ino,
            size: s.size,
            mtime_ns: i64::try_from(s.mtime_ns).ok()?,
            ctime_ns: i64::try_from(s.ctime_ns).ok()?,
        })
    }
}

/// What is remembered of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Row {
    stamp: Packed,
    /// The content's blake3 (a scan that does not hash keeps no rows:
    /// [`HashIndex::remember_stamps`]).
    hash: [u8; 32],
    /// The file had no mirrored xattrs at this stamp. Setting or removing an
    /// xattr (an ACL too) moves the ctime, so while the stamp holds the scan
    /// need not list them.
    bare: bool,
    /// Changed since the last save (a flag in the row's padding, not a set of
    /// the paths beside the map: a first scan's set of every path was 15 MB
    /// at 300,000 files).
    dirty: bool,
}

/// The index, in memory, backed by a SQLite file (or by nothing).
#[derive(Debug)]
pub struct HashIndex {
    /// In a mutex only so that the index is `Sync` (a parallel scan shares
    /// it); only [`HashIndex::save`] uses it, with `&mut self`.
    conn: Option<std::sync::Mutex<rusqlite::Connection>>,
    map: Rows,
    /// Paths forgotten since the last save (changed rows are marked
    /// [`Row::dirty`] in `map`).
    gone: foldhash::HashSet<Box<[u8]>>,
    /// Rows marked dirty since the last save (at most).
    dirty: usize,
    /// Their keys while they are at most [`FEW`]; `None` once more were (a
    /// save then sorts the rows and writes those flagged).
    few: Option<Vec<Box<[u8]>>>,
    /// Of a scan that does not hash (a replica's,
    /// [`HashIndex::remember_stamps`]): a keyed digest of `(path, stamp)`
    /// of each file it saw with no xattrs, 16 bytes a file in place of a
    /// row and its path (300,000 files: 9 MB, not 57 MB, held between
    /// sessions).
    bare: foldhash::HashSet<u128>,
    /// The digests' keys, random per index: no path and stamp can be made to
    /// stand for another's.
    keys: (std::hash::RandomState, std::hash::RandomState),
}

/// An index written before `bare` existed gets the column (its rows read as
/// not bare until a scan sees them again).
fn add_bare_column(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    let has = conn
        .prepare("SELECT 1 FROM pragma_table_info('files') WHERE name = 'bare'")?
        .exists([])?;
    if !has {
        conn.execute_batch("ALTER TABLE files ADD COLUMN bare INTEGER")?;
    }
    Ok(())
}

fn db_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::invalid(path.display(), format!("hash index: {e}"))
}

impl HashIndex {
    /// An index kept only in memory.
    #[must_use]
    pub fn in_memory() -> Self {
        Self {
            conn: None,
            map: Rows::default(),
            gone: foldhash::HashSet::default(),
            dirty: 0,
            few: Some(Vec::new()),
            bare: foldhash::HashSet::default(),
            keys: Default::default(),
        }
    }

    /// Opens (creating) the index at `path` and loads it.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let conn = rusqlite::Connection::open(path).map_err(|e| db_err(path, e))?;
        // A small page cache: the table is read once, front to back.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA cache_size=-256;
             CREATE TABLE IF NOT EXISTS files (
                path BLOB PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER,
                mtime_ns TEXT, ctime_ns TEXT, hash BLOB, bare INTEGER) WITHOUT ROWID;",
        )
        .map_err(|e| db_err(path, e))?;
        add_bare_column(&conn).map_err(|e| db_err(path, e))?;
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM files", [], |r| r.get(0))
            .map_err(|e| db_err(path, e))?;
        // Sized once: growing rehashes and touches twice the memory.
        let mut map = Rows::with_capacity_and_hasher(
            usize::try_from(rows).unwrap_or(0),
            foldhash::fast::RandomState::default(),
        );
        {
            let mut stmt = conn
                .prepare("SELECT path, dev, ino, size, mtime_ns, ctime_ns, hash, bare FROM files")
                .map_err(|e| db_err(path, e))?;
            let mut rows = stmt.query([]).map_err(|e| db_err(path, e))?;
            // Read in place: no allocation per row but the key.
            while let Some(r) = rows.next().map_err(|e| db_err(path, e))? {
                let int = |i| r.get_ref(i).ok().and_then(|v| v.as_i64().ok());
                let text = |i| r.get_ref(i).ok().and_then(|v| v.as_str().ok());
                let (Some(p), Some(dev), Some(ino), Some(size), Some(m), Some(c), Some(h)) = (
                    r.get_ref(0).ok().and_then(|v| v.as_blob().ok()),
                    int(1),
                    int(2),
                    int(3),
                    text(4).and_then(|t| t.parse().ok()),
                    text(5).and_then(|t| t.parse().ok()),
                    r.get_ref(6).ok().and_then(|v| v.as_blob().ok()),
                ) else {
                    continue; // a damaged row is only a cache miss
                };
                let Ok(hash) = <[u8; 32]>::try_from(h) else {
                    continue;
                };
                let Some(stamp) = Packed::of(&Stamp {
                    dev: dev as u64,
                    ino: ino as u64,
                    size: size as u64,
                    mtime_ns: m,
                    ctime_ns: c,
                }) else {
                    continue;
                };
                let bare = int(7) == Some(1);
                let dirty = false;
                map.insert(
                    p.into(),
                    Row {
                        stamp,
                        hash,
                        bare,
                        dirty,
                    },
                );
            }
        }
        Ok(Self {
            conn: Some(std::sync::Mutex::new(conn)),
            map,
            gone: foldhash::HashSet::default(),
            dirty: 0,
            few: Some(Vec::new()),
            bare: foldhash::HashSet::default(),
            keys: Default::default(),
        })
    }

    /// The remembered hash of `path`, if its stamp is unchanged.
    #[must_use]
    pub fn lookup(&self, path: &RelPath, stamp: &Stamp) -> Option<[u8; 32]> {
        let stamp = Packed::of(stamp)?;
        self.map
            .get(path.as_bytes())
            .filter(|r| r.stamp == stamp)
            .map(|r| r.hash)
    }

    /// Whether `path` had no mirrored xattrs when it had this stamp (then it
    /// has none now: an xattr change moves the ctime).
    #[must_use]
    pub fn bare(&self, path: &RelPath, stamp: &Stamp) -> bool {
        let Some(stamp) = Packed::of(stamp) else {
            return false;
        };
        let row = self.map.get(path.as_bytes());
        row.is_some_and(|r| r.bare && r.stamp == stamp)
            || (!self.bare.is_empty() && self.bare.contains(&self.digest(path, &stamp)))
    }

    /// The keyed digest of `(path, stamp)` (two SipHash-1-3 under random keys).
    fn digest(&self, path: &RelPath, s: &Packed) -> u128 {
        use std::hash::{BuildHasher as _, Hasher as _};
        let half = |k: &std::hash::RandomState| {
            let mut h = k.build_hasher();
            h.write(path.as_bytes());
            for v in [s.dev, s.ino, s.size, s.mtime_ns as u64, s.ctime_ns as u64] {
                h.write_u64(v);
            }
            h.finish()
        };
        (u128::from(half(&self.keys.0)) << 64) | u128::from(half(&self.keys.1))
    }

    /// Remembers a hash computed at `now_ns` (skipped when racily clean).
    pub fn record(&mut self, path: &RelPath, stamp: Stamp, hash: [u8; 32], now_ns: i128) {
        self.put(Cow::Borrowed(path.as_bytes()), stamp, hash, now_ns);
    }

    /// [`HashIndex::record`] of a path, copied only if a row is added (one
    /// owned, a scan's, is kept as the key as it is).
    fn put(&mut self, path: Cow<'_, [u8]>, stamp: Stamp, hash: [u8; 32], now_ns: i128) {
        let packed = Packed::of(&stamp);
        let (Some(stamp), false) = (
            packed,
            now_ns - stamp.ctime_ns.max(stamp.mtime_ns) < RACY_NS,
        ) else {
            self.remove(&path);
            return;
        };
        let row = Row {
            stamp,
            hash,
            bare: false,
            dirty: true,
        };
        match self.map.get_mut(&path[..]) {
            Some(r) if r.stamp == stamp && r.hash == hash => return,
            Some(r) => *r = row,
            None => {
                self.gone.remove(&path[..]);
                self.map.insert(path.to_vec().into_boxed_slice(), row);
            }
        }
        self.note_dirty(&path);
    }

    /// Counts a row dirtied (and lists its key while they are few).
    fn note_dirty(&mut self, path: &[u8]) {
        self.dirty += 1;
        if let Some(few) = &mut self.few {
            if few.len() < FEW {
                few.push(path.into());
            } else {
                self.few = None;
            }
        }
    }

    /// Drops the row of `path` (its key kept as forgotten, for the save).
    fn remove(&mut self, path: &[u8]) {
        if let Some((key, _)) = self.map.swap_remove_entry(path) {
            self.gone.insert(key);
        }
    }

    /// Forgets a path.
    pub fn forget(&mut self, path: &RelPath) {
        self.remove(path.as_bytes());
    }

    /// Keeps only the paths for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        let gone = self.map.extract_if(.., |k, _| !keep(k));
        self.gone.extend(gone.map(|(k, _)| k));
    }

    /// After a full scan: remembers the hashes it computed (`hashed`, as
    /// [`crate::scan::ScanReport::hashed`]) and which files had no xattrs,
    /// and forgets every path not in `manifest`. Call [`HashIndex::save`] to
    /// write it.
    ///
    /// A row left is at the stamp this scan saw (a hit matched it, a miss
    /// was recorded with it), and the scan read the xattrs after that stamp:
    /// an xattr changed since moved the ctime, so `bare` holds for the stamp.
    pub fn remember_scan(
        &mut self,
        hashed: Vec<(RelPath, Stamp, [u8; 32])>,
        manifest: &crate::Manifest,
        now_ns: i128,
    ) {
        // Sized once (see `remember_stamps`): a first scan of 300,000 files
        // grew both maps by doubling to a 170 MB peak.
        self.map
            .reserve(hashed.len().saturating_sub(self.map.len()));
        // The scan's paths become the keys (not copied: 300,000 files, 10 MB),
        // and the list gives its memory back as the rows take theirs (both
        // whole at once were 36 MB more).
        let mut hashed = hashed;
        while let Some((p, s, h)) = hashed.pop() {
            self.put(Cow::Owned(p.into()), s, h, now_ns);
            if hashed.len().is_multiple_of(SHRINK_EVERY) {
                hashed.shrink_to_fit();
            }
        }
        let mut files = 0;
        for e in &manifest.entries {
            let proto::Kind::File { hash, .. } = &e.kind else {
                continue;
            };
            let Some(r) = self.map.get_mut(e.path.as_bytes()) else {
                continue;
            };
            files += 1;
            let bare = e.meta.xattrs.is_empty();
            if r.hash == *hash && r.bare != bare {
                r.bare = bare;
                r.dirty = true;
                self.note_dirty(e.path.as_bytes());
            }
        }
        // Every row named a file of the manifest: none to forget.
        if files < self.map.len() {
            let live: foldhash::HashSet<&[u8]> = (manifest.entries.iter())
                .filter(|e| matches!(e.kind, proto::Kind::File { .. }))
                .map(|e| e.path.as_bytes())
                .collect();
            self.retain(|p| live.contains(p));
        }
    }

    /// After a full scan that does not hash (a replica's): remembers which
    /// files had no xattrs at their stamp (`entries` and, beside them, their
    /// `stamps`, as [`crate::scan::ScanReport::stamps`]; racily clean ones
    /// are skipped), and forgets everything else, rows with hashes too (an
    /// index of such scans gives no hash).
    pub fn remember_stamps(
        &mut self,
        entries: &[proto::Entry],
        stamps: &[Option<Stamp>],
        now_ns: i128,
    ) {
        let kept_at = |s: &Stamp| now_ns - s.ctime_ns.max(s.mtime_ns) >= RACY_NS;
        let bare: foldhash::HashSet<u128> = (entries.iter().zip(stamps))
            .filter_map(|(e, s)| s.as_ref().map(|s| (e, s)))
            .filter(|(e, s)| e.meta.xattrs.is_empty() && kept_at(s))
            .filter_map(|(e, s)| Packed::of(s).map(|s| self.digest(&e.path, &s)))
            .collect();
        self.map = Rows::default();
        self.bare = bare;
    }

    /// Number of remembered files (with a hash, or seen bare by a scan that
    /// does not hash).
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len() + self.bare.len()
    }

    /// Whether nothing is remembered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty() && self.bare.is_empty()
    }

    /// Writes the changes since the last save in one transaction.
    pub fn save(&mut self) -> Result<(), Error> {
        let conn = (self.conn.as_mut()).map(|m| {
            m.get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        });
        let Some(conn) = conn else {
            (self.dirty, self.few) = (0, Some(Vec::new()));
            self.gone.clear();
            return Ok(());
        };
        if self.dirty == 0 && self.gone.is_empty() {
            return Ok(());
        }
        // A few rows changed: their keys, in order. Many (a first scan): the
        // rows themselves put in key order (not listed aside: 7 MB at
        // 300,000 rows), those flagged written.
        // (left `None` until the save succeeds: one that fails is written
        // again, whole, by the next)
        let mut few = self.few.take();
        match &mut few {
            Some(keys) => {
                keys.sort_unstable();
                keys.dedup();
            }
            None => self.map.sort_unstable_keys(),
        }
        let path = Path::new("index");
        let tx = conn.transaction().map_err(|e| db_err(path, e))?;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO files VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .map_err(|e| db_err(path, e))?;
            let mut del = tx
                .prepare_cached("DELETE FROM files WHERE path = ?1")
                .map_err(|e| db_err(path, e))?;
            // In key order: each write lands at the table's right edge,
            // within the small page cache (a set's order spilled it: 30,000
            // rows took 164 ms). Forgotten paths first: one recorded again
            // since is put back after.
            let mut gone: Vec<&[u8]> = self.gone.iter().map(|p| &p[..]).collect();
            gone.sort_unstable();
            for p in gone {
                del.execute([p]).map_err(|e| db_err(path, e))?;
            }
            let mut write = |p: &[u8], r: &Row| {
                let s = r.stamp;
                put.execute(rusqlite::params![
                    p,
                    s.dev as i64,
                    s.ino as i64,
                    s.size as i64,
                    s.mtime_ns.to_string(),
                    s.ctime_ns.to_string(),
                    r.hash.to_vec(),
                    i64::from(r.bare)
                ])
            };
            match &few {
                // (a key forgotten since is in `gone`)
                Some(keys) => (keys.iter())
                    .filter_map(|k| self.map.get(k).map(|r| (k, r)))
                    .try_for_each(|(k, r)| write(k, r).map(drop)),
                None => (self.map.iter())
                    .filter(|(_, r)| r.dirty)
                    .try_for_each(|(k, r)| write(k, r).map(drop)),
            }
            .map_err(|e| db_err(path, e))?;
        }
        tx.commit().map_err(|e| db_err(path, e))?;
        self.gone.clear();
        self.few = Some(Vec::new());
        match few {
            Some(keys) => (keys.iter()).for_each(|k| {
                if let Some(r) = self.map.get_mut(k) {
                    r.dirty = false;
                }
            }),
            None => self.map.values_mut().for_each(|r| r.dirty = false),
        }
        self.dirty = 0;
        Ok(())
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
