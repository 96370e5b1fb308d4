//! What a round asks of the source's cut: a database's snapshot, the pages a
//! replica needs, and the pages themselves.

use super::live::LiveSet;
use crate::{Error, RelPath};

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

impl LiveSet {
    /// The current snapshot of `path`.
    #[must_use]
    pub fn snapshot(&self, path: &RelPath) -> Option<Snapshot> {
        self.dbs
            .get(path)
            .filter(|d| d.has_snapshot)
            .map(|d| Snapshot {
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
        db.page(pgno)
    }
}
