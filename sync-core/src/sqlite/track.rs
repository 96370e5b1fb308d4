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
        // The snapshot reads every page from the file when the log held no
        // frame under the cut's lock (`whole.rs`).
        let direct = !wal_mode || self.wal_seen.is_some_and(|s| s.size == 0);
        let changed = if !self.has_snapshot || page_size != self.page_size {
            self.page_size = page_size;
            self.hashes = self.cut_hashes(count, direct, None)?.0;
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
            self.changed_pages(count, candidates, direct, keep)?
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
    /// `direct`: every page may be read straight from the file (`whole.rs`).
    pub(super) fn changed_pages(
        &mut self,
        count: u32,
        candidates: Option<BTreeSet<u32>>,
        direct: bool,
        keep: &mut u64,
    ) -> Result<BTreeSet<u32>, Error> {
        let mut changed = BTreeSet::new();
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
                    let page = self.cut_page(pgno)?;
                    let h = page_hash(pgno, &page);
                    if self.hashes[pgno as usize - 1] != h {
                        self.hashes[pgno as usize - 1] = h;
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
                let keep = super::whole::Keep {
                    old: &self.hashes,
                    budget: keep,
                };
                let (hashes, fresh) = self.cut_hashes(count, direct, Some(keep))?;
                self.fresh.extend(fresh);
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
        Ok(changed)
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
