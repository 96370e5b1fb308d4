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
use std::path::Path;

/// Stamps younger than this when hashed are not cached (timestamps are coarse).
pub const RACY_NS: i128 = 2_000_000_000;

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
    /// `None` in the index of a scan that does not hash (a replica's).
    hash: Option<[u8; 32]>,
    /// The file had no mirrored xattrs at this stamp. Setting or removing an
    /// xattr (an ACL too) moves the ctime, so while the stamp holds the scan
    /// need not list them.
    bare: bool,
}

/// The index, in memory, backed by a SQLite file (or by nothing).
#[derive(Debug)]
pub struct HashIndex {
    /// In a mutex only so that the index is `Sync` (a parallel scan shares
    /// it); only [`HashIndex::save`] uses it, with `&mut self`.
    conn: Option<std::sync::Mutex<rusqlite::Connection>>,
    map: foldhash::HashMap<Box<[u8]>, Row>,
    /// Paths whose row changed since the last save: their row in `map`, or
    /// none (forgotten). Paths only, not rows (a first scan's log of every
    /// row doubled the index's memory).
    changed: foldhash::HashSet<Box<[u8]>>,
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
            map: foldhash::HashMap::default(),
            changed: foldhash::HashSet::default(),
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
        let mut map = foldhash::HashMap::default();
        // Sized once: growing rehashes and touches twice the memory.
        map.reserve(usize::try_from(rows).unwrap_or(0));
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
                let hash = Some(hash);
                map.insert(p.into(), Row { stamp, hash, bare });
            }
        }
        Ok(Self {
            conn: Some(std::sync::Mutex::new(conn)),
            map,
            changed: foldhash::HashSet::default(),
        })
    }

    /// The remembered hash of `path`, if its stamp is unchanged.
    #[must_use]
    pub fn lookup(&self, path: &RelPath, stamp: &Stamp) -> Option<[u8; 32]> {
        let stamp = Packed::of(stamp)?;
        self.map
            .get(path.as_bytes())
            .filter(|r| r.stamp == stamp)
            .and_then(|r| r.hash)
    }

    /// Whether `path` had no mirrored xattrs when it had this stamp (then it
    /// has none now: an xattr change moves the ctime).
    #[must_use]
    pub fn bare(&self, path: &RelPath, stamp: &Stamp) -> bool {
        let stamp = Packed::of(stamp);
        self.map
            .get(path.as_bytes())
            .is_some_and(|r| r.bare && Some(r.stamp) == stamp)
    }

    /// Remembers a hash computed at `now_ns` (skipped when racily clean).
    pub fn record(&mut self, path: &RelPath, stamp: Stamp, hash: [u8; 32], now_ns: i128) {
        let packed = Packed::of(&stamp);
        let (Some(stamp), false) = (
            packed,
            now_ns - stamp.ctime_ns.max(stamp.mtime_ns) < RACY_NS,
        ) else {
            self.forget(path);
            return;
        };
        let old = self.map.get(path.as_bytes());
        if old.is_some_and(|r| r.stamp == stamp && r.hash == Some(hash)) {
            return;
        }
        let row = Row {
            stamp,
            hash: Some(hash),
            bare: false,
        };
        self.map.insert(path.as_bytes().into(), row);
        self.changed.insert(path.as_bytes().into());
    }

    /// Forgets a path.
    pub fn forget(&mut self, path: &RelPath) {
        if self.map.remove(path.as_bytes()).is_some() {
            self.changed.insert(path.as_bytes().into());
        }
    }

    /// Keeps only the paths for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        let gone: Vec<Box<[u8]>> = self.map.keys().filter(|k| !keep(k)).cloned().collect();
        for k in gone {
            self.map.remove(&k);
            self.changed.insert(k);
        }
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
        hashed: &[(RelPath, Stamp, [u8; 32])],
        manifest: &crate::Manifest,
        now_ns: i128,
    ) {
        // Sized once (see `remember_stamps`): a first scan of 300,000 files
        // grew both maps by doubling to a 170 MB peak.
        self.map
            .reserve(hashed.len().saturating_sub(self.map.len()));
        self.changed.reserve(hashed.len());
        for (p, s, h) in hashed {
            self.record(p, *s, *h, now_ns);
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
            if r.hash == Some(*hash) && r.bare != bare {
                r.bare = bare;
                self.changed.insert(e.path.as_bytes().into());
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

    /// After a full scan that does not hash (a replica's): remembers each
    /// file's stamp and whether it had xattrs (`files`, as
    /// [`crate::scan::ScanReport::stamps`]; racily clean ones are skipped), and
    /// forgets every other path. Rows remembered so give no hash.
    pub fn remember_stamps(&mut self, files: &[(RelPath, Stamp, bool)], now_ns: i128) {
        // Sized once: growing by doubling holds the old table and the new
        // one at once (300,000 files: a peak of 101 MB for a 67 MB table).
        self.map.reserve(files.len().saturating_sub(self.map.len()));
        let kept_at = |s: &Stamp| now_ns - s.ctime_ns.max(s.mtime_ns) >= RACY_NS;
        let mut kept = 0;
        for (p, stamp, bare) in files {
            let Some(packed) = Packed::of(stamp).filter(|_| kept_at(stamp)) else {
                continue;
            };
            kept += 1;
            let row = Row {
                stamp: packed,
                hash: None,
                bare: *bare,
            };
            if self.map.get(p.as_bytes()) != Some(&row) {
                self.map.insert(p.as_bytes().into(), row);
            }
        }
        if kept < self.map.len() {
            let live: foldhash::HashSet<&[u8]> = (files.iter())
                .filter(|(_, s, _)| kept_at(s) && Packed::of(s).is_some())
                .map(|(p, _, _)| p.as_bytes())
                .collect();
            self.map.retain(|p, _| live.contains(&p[..]));
        }
    }

    /// Number of remembered files.
    #[must_use]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is remembered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Writes the changes since the last save in one transaction.
    pub fn save(&mut self) -> Result<(), Error> {
        let conn = (self.conn.as_mut()).map(|m| {
            m.get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        });
        let Some(conn) = conn else {
            self.changed.clear();
            return Ok(());
        };
        if self.changed.is_empty() {
            return Ok(());
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
            // In key order: each insert lands at the table's right edge,
            // within the small page cache (a set's order spilled it: 30,000
            // rows took 164 ms).
            let mut paths: Vec<_> = self.changed.drain().collect();
            paths.sort_unstable();
            for p in paths {
                match self.map.get(&p) {
                    Some(&Row {
                        stamp: s,
                        hash: Some(h),
                        bare,
                    }) => put
                        .execute(rusqlite::params![
                            p,
                            s.dev as i64,
                            s.ino as i64,
                            s.size as i64,
                            s.mtime_ns.to_string(),
                            s.ctime_ns.to_string(),
                            h.to_vec(),
                            i64::from(bare)
                        ])
                        .map_err(|e| db_err(path, e))?,
                    // a row of a scan that does not hash is not kept
                    Some(_) | None => del.execute([&p[..]]).map_err(|e| db_err(path, e))?,
                };
            }
        }
        tx.commit().map_err(|e| db_err(path, e))
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
