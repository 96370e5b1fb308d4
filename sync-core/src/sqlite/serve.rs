//! What a round asks of the source's cut: a database's snapshot, the pages a
//! replica needs, and the pages themselves.

use super::live::{LiveDb, LiveSet, reader_of};
use super::read_page;
use crate::{Error, RelPath};
use std::collections::BTreeMap;

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

impl LiveDb {
    /// Reads ahead the pages a replica holding any remembered cut can ask for
    /// (every page when `all`, or when there is no remembered cut to go by)
    /// and lets the snapshot go, when they fit in `budget` (which they use
    /// up); otherwise the snapshot stays open for the round. A replica at
    /// another state gets its other pages read later and checked
    /// (`idle.rs`).
    pub(super) fn release(&mut self, all: bool, budget: &mut u64) -> Result<(), Error> {
        if self.conns.is_none() || self.cache.is_some() {
            return Ok(());
        }
        if self.copy.is_some() {
            // the round is served from the copy
            if let Some(c) = self.conns.take() {
                c.close(&self.path);
            }
            return Ok(());
        }
        if self.conns.as_ref().is_some_and(|c| !c.reading) {
            // found unchanged: pages are read, if asked for, in short read
            // transactions that check it still is
            return Ok(());
        }
        let count = self.hashes.len() as u32;
        let pages: Vec<u32> = match self.history.front() {
            Some((_, since)) if !all && self.history.len() > 1 => {
                since.iter().copied().filter(|&p| p <= count).collect()
            }
            _ => (1..=count).collect(),
        };
        let bytes = pages.len() as u64 * u64::from(self.page_size);
        if bytes > *budget {
            return Ok(());
        }
        *budget -= bytes;
        let r = reader_of(&self.conns, &self.path)?;
        let mut fresh = std::mem::take(&mut self.fresh);
        let mut cache = BTreeMap::new();
        for p in pages {
            let page = match fresh.remove(&p) {
                Some(page) => page,
                None => read_page(r, &self.path, p)?,
            };
            cache.insert(p, page);
        }
        if let Some(c) = self.conns.take() {
            c.close(&self.path);
        }
        self.cache = Some(cache);
        Ok(())
    }

    /// Page `pgno` of the current snapshot.
    pub(super) fn page(&self, pgno: u32) -> Result<Vec<u8>, Error> {
        match &self.cache {
            Some(c) => match c.get(&pgno) {
                Some(p) => Ok(p.clone()),
                None => self.lazy_page(pgno),
            },
            None => self.cut_page(pgno),
        }
    }
}
