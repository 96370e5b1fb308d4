//! What a round asks of the source's cut: a database's snapshot, the pages a
//! replica needs, and the pages themselves.

use super::live::{LiveDb, LiveSet, reader_of};
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
        self.tracked(path)?.page(pgno)
    }

    /// Pages `wanted` of the current snapshot of `path`, as [`Self::page`]
    /// gives each: pages that follow one another are read from the file at
    /// once while the snapshot is open (see [`LiveDb::pages`]).
    #[cfg(test)]
    pub fn pages(&self, path: &RelPath, wanted: &[u32]) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        self.tracked(path)?.pages(wanted)
    }

    /// [`Self::pages`] as runs: each consecutive stretch of `wanted` as its
    /// first page number and the pages' images one after another (as
    /// [`proto::Message::DbRun`] carries them), read without a buffer per
    /// page.
    pub fn runs(&self, path: &RelPath, wanted: &[u32]) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        self.tracked(path)?.runs(wanted)
    }

    fn tracked(&self, path: &RelPath) -> Result<&LiveDb, Error> {
        self.dbs.get(path).ok_or_else(|| Error::Sqlite {
            path: path.to_string(),
            msg: "not a tracked database".into(),
        })
    }
}

/// Most pages [`LiveDb::pages`] reads from the file at once.
const RUN_PAGES: usize = 1024;

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
        reader_of(&self.conns, &self.path)?;
        let mut cache = std::mem::take(&mut self.fresh);
        cache.retain(|p, _| pages.binary_search(p).is_ok());
        let missing: Vec<u32> = pages
            .into_iter()
            .filter(|p| !cache.contains_key(p))
            .collect();
        cache.extend(self.pages(&missing)?);
        if let Some(c) = self.conns.take() {
            c.close(&self.path);
        }
        self.cache = Some(cache);
        Ok(())
    }

    /// Pages `wanted` of the open snapshot. Runs of consecutive pages are
    /// read from the database file in one `xRead` of SQLite's own handle, but
    /// for the pages the log of the snapshot names, read through
    /// `sqlite_dbpage`: while the read transaction is open no other page of
    /// the file moves (the argument of `whole.rs`). With no open snapshot
    /// (pages read ahead, a copy, an idle database) or a log that cannot
    /// tell, page by page as [`Self::page`].
    pub(super) fn pages(&self, wanted: &[u32]) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        let size = (self.page_size as usize).max(1);
        let mut out = Vec::with_capacity(wanted.len());
        for (first, run) in self.runs(wanted)? {
            out.extend((first..).zip(run.chunks(size).map(<[u8]>::to_vec)));
        }
        Ok(out)
    }

    /// [`Self::pages`] as runs of consecutive pages, each its first number
    /// and the images one after another.
    pub(super) fn runs(&self, wanted: &[u32]) -> Result<Vec<(u32, Vec<u8>)>, Error> {
        let one_by_one = || {
            let mut out: Vec<(u32, Vec<u8>)> = Vec::new();
            for &p in wanted {
                append_page(&mut out, self.page_size, p, self.page(p)?);
            }
            Ok(out)
        };
        let reader = match &self.conns {
            Some(c) if c.reading && self.cache.is_none() && self.copy.is_none() => &c.reader,
            _ => return one_by_one(),
        };
        if self.served_overlay.borrow().is_none() {
            self.served_overlay
                .replace(Some(self.overlay(self.wal_mode)));
        }
        let cached = self.served_overlay.borrow();
        let (Some(Some(overlay)), Some(file)) = (cached.as_ref(), super::moved::main_file(reader))
        else {
            return one_by_one();
        };
        let size = self.page_size as usize;
        if size == 0 {
            return one_by_one();
        }
        let count = self.hashes.len() as u32;
        let mut out = Vec::new();
        let mut rest = wanted;
        while let Some(&first) = rest.first() {
            let run = rest
                .iter()
                .zip(first..)
                .take_while(|&(&p, q)| p == q && p >= 1 && p <= count)
                .take(RUN_PAGES)
                .count();
            if run == 0 {
                append_page(&mut out, self.page_size, first, self.page(first)?);
                rest = &rest[1..];
                continue;
            }
            let mut buf = vec![0u8; run * size];
            super::whole::read_run(reader, &self.path, file, (size, first), &mut buf, overlay)?;
            #[cfg(test)]
            super::whole::SERVED_PAGES.with(|n| n.set(n.get() + run as u64));
            out.push((first, buf));
            rest = &rest[run..];
        }
        Ok(out)
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

/// Adds page `pgno` to `runs`: at the end of the last run when it follows
/// it, else as a run of its own (its buffer, not a copy).
fn append_page(runs: &mut Vec<(u32, Vec<u8>)>, page_size: u32, pgno: u32, page: Vec<u8>) {
    if let Some((first, run)) = runs.last_mut()
        && page_size > 0
        && page.len() == page_size as usize
        && u64::from(*first) + (run.len() / page_size as usize) as u64 == u64::from(pgno)
    {
        run.extend_from_slice(&page);
        return;
    }
    runs.push((pgno, page));
}
