//! What changed since the last cut: the pages the log names, or every page
//! compared, recorded in the history a replica's state is matched against.

use super::copy::Head;
use super::live::*;
use super::wal::WalPos;
use super::{HISTORY, db_hash, page_hash};
use crate::Error;
use std::collections::BTreeSet;

impl LiveDb {
    /// After the locks are released: the pages changed since the previous cut
    /// are found from the new snapshot (those read, while `keep` lasts, kept
    /// for the read-ahead).
    pub(super) fn advance(&mut self, keep: &mut u64) -> Result<usize, Error> {
        let head = match self.head.take() {
            Some(h) => h,
            None => Head::read(self.reader()?, &self.path)?,
        };
        let (count, page_size) = (head.count, head.page_size);
        let (wal_mode, counter) = (head.wal_mode(), head.counter());
        let frames = if wal_mode {
            self.frames.take()
        } else {
            self.wal = WalPos::default();
            None
        };
        let changed = if !self.has_snapshot || page_size != self.page_size {
            self.page_size = page_size;
            let overlay = self.overlay(wal_mode);
            let hashed = self.cut_hashes(count, overlay.as_ref(), None)?;
            (self.hashes, self.quick) = (hashed.strong, hashed.quick);
            self.history.clear();
            (1..=self.hashes.len() as u32).collect()
        } else {
            // A journal-mode switch rewrites the header: compare everything.
            let candidates = match frames {
                Some(f) if wal_mode == self.wal_mode => Some(f),
                None if !wal_mode
                    && !self.wal_mode
                    && !self.replaced
                    && counter == self.change_counter =>
                {
                    Some(BTreeSet::new())
                }
                _ => None,
            };
            self.changed_pages(count, candidates, wal_mode, keep)?
        };
        self.wal_mode = wal_mode;
        self.change_counter = counter;
        self.has_snapshot = true;
        self.before = None;
        Ok(self.record(changed))
    }

    /// Rehashes the pages among `candidates` (every page when `None`) and
    /// those past the old end; returns the pages whose hash changed. Changed
    /// pages read one by one are kept in `fresh` while `keep` bytes last.
    /// The quick hashes are kept up to date with the blake3 ones.
    pub(super) fn changed_pages(
        &mut self,
        count: u32,
        candidates: Option<BTreeSet<u32>>,
        wal_mode: bool,
        keep: &mut u64,
    ) -> Result<BTreeSet<u32>, Error> {
        let mut changed = BTreeSet::new();
        let old_len = self.hashes.len() as u32;
        self.hashes.truncate(count as usize);
        self.hashes.resize(count as usize, [0; 32]);
        if self.quick.len() != old_len as usize {
            self.quick.clear();
        } else {
            self.quick.resize(count as usize, 0);
        }
        match candidates {
            Some(c) => {
                // Pages past the old end are new whatever the log says.
                for pgno in c.into_iter().chain(old_len + 1..=count) {
                    if pgno == 0 || pgno > count {
                        continue;
                    }
                    let page = self.cut_page(pgno)?;
                    let h = page_hash(pgno, &page);
                    if self.hashes[pgno as usize - 1] != h {
                        self.hashes[pgno as usize - 1] = h;
                        if let Some(q) = self.quick.get_mut(pgno as usize - 1) {
                            *q = super::quick_hash(self.quick_seed, &page);
                        }
                        changed.insert(pgno);
                        // kept for the read-ahead (`LiveSet::release`)
                        if let Some(left) = keep.checked_sub(page.len() as u64) {
                            *keep = left;
                            self.fresh.insert(pgno, page);
                        }
                    }
                }
            }
            None => {
                // the changed pages read to hash them are kept, as above
                let overlay = self.overlay(wal_mode);
                let keep = super::whole::Keep {
                    prior: super::Prior {
                        strong: &self.hashes[..old_len.min(count) as usize],
                        quick: &self.quick[..self.quick.len().min(old_len.min(count) as usize)],
                        seed: self.quick_seed,
                    },
                    budget: keep,
                };
                let hashed = self.cut_hashes(count, overlay.as_ref(), Some(keep))?;
                self.fresh.extend(hashed.fresh);
                for (i, (a, b)) in self.hashes.iter().zip(&hashed.strong).enumerate() {
                    if a != b {
                        changed.insert(i as u32 + 1);
                    }
                }
                (self.hashes, self.quick) = (hashed.strong, hashed.quick);
            }
        }
        if count < old_len {
            // truncated: page 1 (the header's page count) changed with it
            changed.insert(1);
        }
        Ok(changed)
    }

    /// The pages of this cut's snapshot not to be read from the database
    /// file (`whole.rs`): those the log may hold; `None` when the log cannot
    /// tell (every page is then read through SQLite).
    pub(super) fn overlay(&self, wal_mode: bool) -> Option<BTreeSet<u32>> {
        if !wal_mode {
            return Some(BTreeSet::new());
        }
        let limit = self.wal_seen.map_or(0, |s| s.size);
        super::wal::log_pages(&super::conn::side_path(&self.path, "-wal"), limit)
    }

    /// Records the new content hash in the history; returns how many pages
    /// changed.
    pub(super) fn record(&mut self, changed: BTreeSet<u32>) -> usize {
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
        n
    }

    /// Forgets where the log was: the next cut compares every page.
    pub(super) fn forget_position(&mut self) {
        self.seen = None;
        self.wal = WalPos::default();
        self.frames = None;
        self.before = None;
    }

    /// A cut given up before it read any page (a writer held its lock): the
    /// database stands where the last cut left it, log position included, so
    /// the next cut reads the frames committed since that one (those this
    /// cut had read too) rather than every page.
    pub(super) fn rewind(&mut self) {
        if let Some((wal, seen, wal_seen)) = self.before.take() {
            (self.wal, self.seen, self.wal_seen) = (wal, seen, wal_seen);
        }
        self.frames = None;
    }
}
