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

/// The index, in memory, backed by a SQLite file (or by nothing).
#[derive(Debug)]
pub struct HashIndex {
    conn: Option<rusqlite::Connection>,
    map: foldhash::HashMap<Vec<u8>, (Stamp, [u8; 32])>,
    changed: foldhash::HashMap<Vec<u8>, Option<(Stamp, [u8; 32])>>,
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
            changed: foldhash::HashMap::default(),
        }
    }

    /// Opens (creating) the index at `path` and loads it.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let conn = rusqlite::Connection::open(path).map_err(|e| db_err(path, e))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS files (
                path BLOB PRIMARY KEY, dev INTEGER, ino INTEGER, size INTEGER,
                mtime_ns TEXT, ctime_ns TEXT, hash BLOB) WITHOUT ROWID;",
        )
        .map_err(|e| db_err(path, e))?;
        let mut map = foldhash::HashMap::default();
        {
            let mut stmt = conn
                .prepare("SELECT path, dev, ino, size, mtime_ns, ctime_ns, hash FROM files")
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
                let stamp = Stamp {
                    dev: dev as u64,
                    ino: ino as u64,
                    size: size as u64,
                    mtime_ns: m,
                    ctime_ns: c,
                };
                map.insert(p.to_vec(), (stamp, hash));
            }
        }
        Ok(Self {
            conn: Some(conn),
            map,
            changed: foldhash::HashMap::default(),
        })
    }

    /// The remembered hash of `path`, if its stamp is unchanged.
    #[must_use]
    pub fn lookup(&self, path: &RelPath, stamp: &Stamp) -> Option<[u8; 32]> {
        self.map
            .get(path.as_bytes())
            .filter(|(s, _)| s == stamp)
            .map(|(_, h)| *h)
    }

    /// Remembers a hash computed at `now_ns` (skipped when racily clean).
    pub fn record(&mut self, path: &RelPath, stamp: Stamp, hash: [u8; 32], now_ns: i128) {
        if now_ns - stamp.ctime_ns.max(stamp.mtime_ns) < RACY_NS {
            self.forget(path);
            return;
        }
        if self.map.get(path.as_bytes()) == Some(&(stamp, hash)) {
            return;
        }
        self.map.insert(path.as_bytes().to_vec(), (stamp, hash));
        self.changed
            .insert(path.as_bytes().to_vec(), Some((stamp, hash)));
    }

    /// Forgets a path.
    pub fn forget(&mut self, path: &RelPath) {
        if self.map.remove(path.as_bytes()).is_some() {
            self.changed.insert(path.as_bytes().to_vec(), None);
        }
    }

    /// Keeps only the paths for which `keep` is true.
    pub fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        let gone: Vec<Vec<u8>> = self.map.keys().filter(|k| !keep(k)).cloned().collect();
        for k in gone {
            self.map.remove(&k);
            self.changed.insert(k, None);
        }
    }

    /// After a full scan: remembers the hashes it computed (`hashed`, as
    /// [`crate::scan::ScanReport::hashed`]) and forgets every path not in
    /// `manifest`. Call [`HashIndex::save`] to write it.
    pub fn remember_scan(
        &mut self,
        hashed: &[(RelPath, Stamp, [u8; 32])],
        manifest: &crate::Manifest,
        now_ns: i128,
    ) {
        for (p, s, h) in hashed {
            self.record(p, *s, *h, now_ns);
        }
        let live: foldhash::HashSet<&[u8]> =
            manifest.entries.iter().map(|e| e.path.as_bytes()).collect();
        self.retain(|p| live.contains(p));
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
        let Some(conn) = self.conn.as_mut() else {
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
                .prepare_cached("INSERT OR REPLACE INTO files VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)")
                .map_err(|e| db_err(path, e))?;
            let mut del = tx
                .prepare_cached("DELETE FROM files WHERE path = ?1")
                .map_err(|e| db_err(path, e))?;
            for (p, v) in self.changed.drain() {
                match v {
                    Some((s, h)) => put
                        .execute(rusqlite::params![
                            p,
                            s.dev as i64,
                            s.ino as i64,
                            s.size as i64,
                            s.mtime_ns.to_string(),
                            s.ctime_ns.to_string(),
                            h.to_vec()
                        ])
                        .map_err(|e| db_err(path, e))?,
                    None => del.execute([p]).map_err(|e| db_err(path, e))?,
                };
            }
        }
        tx.commit().map_err(|e| db_err(path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64) -> Stamp {
        Stamp {
            dev: 1,
            ino: 2,
            size,
            mtime_ns: 10,
            ctime_ns: 20,
        }
    }

    #[test]
    fn persists_and_matches_stamps() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("index.db");
        let p = RelPath::new(&b"a/b"[..]).unwrap();
        let now = 100 * RACY_NS;
        {
            let mut ix = HashIndex::open(&db).unwrap();
            ix.record(&p, stamp(5), [9; 32], now);
            ix.save().unwrap();
        }
        let ix = HashIndex::open(&db).unwrap();
        assert_eq!(ix.lookup(&p, &stamp(5)), Some([9; 32]));
        assert_eq!(ix.lookup(&p, &stamp(6)), None);
    }

    #[test]
    fn damaged_rows_are_only_cache_misses() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("index.db");
        let p = RelPath::new(&b"good"[..]).unwrap();
        {
            let mut ix = HashIndex::open(&db).unwrap();
            ix.record(&p, stamp(5), [9; 32], 100 * RACY_NS);
            ix.save().unwrap();
        }
        let conn = rusqlite::Connection::open(&db).unwrap();
        let ok = [9u8; 32].to_vec();
        for (path, dev, mtime, hash) in [
            (
                &b"short-hash"[..],
                rusqlite::types::Value::Integer(1),
                "10",
                vec![1u8; 3],
            ),
            (
                b"bad-mtime",
                rusqlite::types::Value::Integer(1),
                "x",
                ok.clone(),
            ),
            (
                b"text-dev",
                rusqlite::types::Value::Text("abc".into()),
                "10",
                ok.clone(),
            ),
        ] {
            conn.execute(
                "INSERT INTO files VALUES (?1, ?2, 2, 5, ?3, '20', ?4)",
                rusqlite::params![path, dev, mtime, hash],
            )
            .unwrap();
        }
        drop(conn);
        let ix = HashIndex::open(&db).unwrap();
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.lookup(&p, &stamp(5)), Some([9; 32]));
    }

    #[test]
    fn racily_clean_files_are_not_cached() {
        let mut ix = HashIndex::in_memory();
        let p = RelPath::new(&b"f"[..]).unwrap();
        ix.record(&p, stamp(1), [1; 32], 21);
        assert_eq!(ix.lookup(&p, &stamp(1)), None);
    }
}
