//! A source's cut state kept across processes: what the last cut saw of each
//! database (its page hashes, its file's stamp, where its log was read to,
//! and the recent cuts' hashes with the pages changed since).
//!
//! A long-running agent keeps this in memory from one cut to the next. A
//! one-shot `push` saves it after its round and restores it into its next
//! run's [`LiveSet`], so that run's cut is what a second cut in one process
//! would be: an unchanged database is not read again, a changed one is
//! compared page by page against the saved hashes, and a replica still at the
//! pushed state gets only the changed pages, with no page hashes exchanged.
//! The same stamps and log checks that make an in-memory state trustworthy
//! between two cuts decide here (no process watches the file between two
//! cuts in either case); anything they cannot vouch for is read again.

use super::conn::Seen;
use super::db_hash;
use super::live::LiveSet;
use super::wal::WalPos;
use crate::{Error, RelPath};
use std::collections::BTreeSet;

/// Bumped when the saved layout changes: an older file is ignored.
/// 2: the page table as one byte string (format 1 carried each hash as a
/// 32-element tuple: 60-80 ms to decode the 263k pages of a 1 GB database).
/// 3: each page's quick hash and their seed (`whole.rs`).
const FORMAT: u32 = 3;

/// The file's layout; it borrows the page tables both ways (from the set when
/// saving, from the read bytes when restoring), so neither copies them twice.
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved<'a> {
    format: u32,
    /// The folder's root, as the set knows it (canonical).
    #[serde(borrow, with = "serde_bytes")]
    root: &'a [u8],
    #[serde(borrow)]
    dbs: Vec<SavedDb<'a>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedDb<'a> {
    path: RelPath,
    page_size: u32,
    /// The page hashes, 32 bytes each, in page order.
    #[serde(borrow, with = "serde_bytes")]
    pages: &'a [u8],
    /// The pages' quick hashes, 8 bytes each (little-endian), in page order,
    /// or none.
    #[serde(with = "serde_bytes")]
    quick: Vec<u8>,
    quick_seed: u64,
    hash: [u8; 32],
    change_counter: [u8; 4],
    wal_mode: bool,
    wal: WalPos,
    seen: Option<Seen>,
    settled_id: Option<(u64, u64)>,
    history: Vec<([u8; 32], Vec<u32>)>,
}

fn root_bytes(set: &LiveSet) -> &[u8] {
    use std::os::unix::ffi::OsStrExt;
    set.root().as_os_str().as_bytes()
}

impl LiveSet {
    /// What the last cut saw of every database it knows, to be given to
    /// [`LiveSet::restore`] in a later process. Call between rounds.
    pub fn save(&self) -> Result<Vec<u8>, Error> {
        let dbs = self
            .dbs
            .iter()
            .filter(|(_, d)| d.has_snapshot)
            .map(|(p, d)| SavedDb {
                path: p.clone(),
                page_size: d.page_size,
                pages: d.hashes.as_flattened(),
                quick: d.quick.iter().flat_map(|q| q.to_le_bytes()).collect(),
                quick_seed: d.quick_seed,
                hash: d.hash,
                change_counter: d.change_counter,
                wal_mode: d.wal_mode,
                wal: d.wal,
                seen: d.seen,
                settled_id: d.settled_id,
                history: d
                    .history
                    .iter()
                    .map(|(h, s)| (*h, s.iter().copied().collect()))
                    .collect(),
            })
            .collect();
        let saved = Saved {
            format: FORMAT,
            root: root_bytes(self),
            dbs,
        };
        // One allocation of the right size: the tables are most of it.
        let tables: usize = saved
            .dbs
            .iter()
            .map(|d| d.pages.len() + d.quick.len() + 64)
            .sum();
        let mut out = Vec::with_capacity(tables + 4096);
        bincode::serde::encode_into_std_write(&saved, &mut out, bincode::config::standard())
            .map_err(|e| Error::invalid(self.root().display(), format!("saving cut state: {e}")))?;
        Ok(out)
    }

    /// Takes back what [`LiveSet::save`] wrote, for the databases this set
    /// holds (tracked, not cut yet); others are ignored. A state of another
    /// root or format restores nothing; an entry whose page hashes do not
    /// give its hash is skipped. How many databases were restored.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        self.restore_with(bytes, false)
    }

    /// [`LiveSet::restore`], the set first holding every database the state
    /// knows (a set that holds nothing yet: it may be cut while the tree is
    /// scanned, the scan told these paths are databases).
    pub fn restore_tracking(&mut self, bytes: &[u8]) -> Result<usize, Error> {
        self.restore_with(bytes, true)
    }

    fn restore_with(&mut self, bytes: &[u8], track: bool) -> Result<usize, Error> {
        let shown = self.root().display().to_string();
        let cfg = bincode::config::standard().with_limit::<{ 1 << 30 }>();
        let (saved, _): (Saved<'_>, usize) =
            bincode::serde::borrow_decode_from_slice(bytes, cfg)
                .map_err(|e| Error::invalid(&shown, format!("saved cut state: {e}")))?;
        if saved.format != FORMAT || saved.root != root_bytes(self) {
            return Ok(0);
        }
        if track {
            self.add(saved.dbs.iter().map(|d| &d.path));
        }
        let mut n = 0;
        for s in saved.dbs {
            let Some(db) = self.dbs.get_mut(&s.path) else {
                continue;
            };
            let (hashes, rest) = s.pages.as_chunks::<32>();
            let (quick, quick_rest) = s.quick.as_chunks::<8>();
            let sound = db.conns.is_none()
                && !db.has_snapshot
                && rest.is_empty()
                && quick_rest.is_empty()
                && (quick.is_empty() || quick.len() == hashes.len())
                && proto::valid_page_size(s.page_size)
                && hashes.len() <= proto::MAX_DB_PAGES as usize
                && db_hash(s.page_size, hashes) == s.hash
                && s.history.len() <= super::HISTORY;
            if !sound {
                continue;
            }
            db.page_size = s.page_size;
            db.hashes = hashes.to_vec();
            // A quick hash saved wrong matches a page's content by chance
            // only (one in 2^64): it costs that page hashed again.
            db.quick = quick.iter().map(|q| u64::from_le_bytes(*q)).collect();
            db.quick_seed = s.quick_seed;
            db.hash = s.hash;
            db.change_counter = s.change_counter;
            db.wal_mode = s.wal_mode;
            db.wal = s.wal;
            db.seen = s.seen;
            db.settled_id = s.settled_id;
            db.history = s
                .history
                .into_iter()
                .map(|(h, pages)| (h, pages.into_iter().collect::<BTreeSet<u32>>()))
                .collect();
            db.has_snapshot = true;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{assert_same, ship_and_end, source};
    use super::super::{LiveSet, Need};
    use std::time::Duration;

    /// Restored in a new process, the state of the last cut lets a replica
    /// still at that cut be brought up by the changed pages alone (no page
    /// hashes asked for), and the new cut is the one a fresh set finds.
    fn restored_cut_sends_only_changed_pages(wal: bool) {
        let t = tempfile::tempdir().unwrap();
        let (src, dst, w, rel, mut live) = source(t.path(), wal);
        live.cut().unwrap();
        ship_and_end(&mut live, &rel, &dst);
        let pushed = live.snapshot(&rel).unwrap().hash;
        let saved = live.save().unwrap();
        drop(live);
        w.execute("UPDATE t SET v = randomblob(300) WHERE k = 1000", [])
            .unwrap();

        let mut next = fresh_from(t.path(), &rel);
        assert_eq!(next.restore(&saved).unwrap(), 1);
        let c = next.cut().unwrap();
        assert!(c.pages_changed >= 1 && c.pages_changed <= 4, "{c:?}");
        match next.need(&rel, &pushed) {
            Need::Pages(p) => assert!(!p.is_empty() && p.len() <= 4, "{p:?}"),
            other => panic!("a replica at the pushed cut needs {other:?}"),
        }
        let mut plain = fresh_from(t.path(), &rel);
        plain.cut().unwrap();
        assert_eq!(next.snapshot(&rel), plain.snapshot(&rel));
        plain.end_round();
        ship_and_end(&mut next, &rel, &dst);
        assert_same(&src, &dst);
    }

    /// A database nobody wrote since the saved cut saves the same bytes
    /// again (a push need not rewrite its state); a write changes them.
    #[test]
    fn an_unwritten_database_saves_the_same_state() {
        for wal in [true, false] {
            let t = tempfile::tempdir().unwrap();
            let (_src, _dst, w, rel, mut live) = source(t.path(), wal);
            drop(w); // the app is idle: no connection of its own
            std::thread::sleep(Duration::from_millis(120)); // past the racy window
            live.cut().unwrap();
            live.end_round();
            let saved = live.save().unwrap();
            drop(live);
            let again = |saved: &[u8]| {
                let mut next = fresh_from(t.path(), &rel);
                assert_eq!(next.restore(saved).unwrap(), 1);
                next.cut().unwrap();
                next.end_round();
                next.save().unwrap()
            };
            assert!(
                again(&saved) == saved,
                "an unchanged cut saved other bytes (wal {wal})"
            );
            let w = rusqlite::Connection::open(t.path().join("a.db")).unwrap();
            w.execute("UPDATE t SET v = x'05' WHERE k = 3", []).unwrap();
            drop(w);
            assert!(
                again(&saved) != saved,
                "a write left the saved state as it was"
            );
        }
    }

    /// A new process's set, holding `rel` of the folder at `root`.
    fn fresh_from(root: &std::path::Path, rel: &crate::RelPath) -> LiveSet {
        let mut l = LiveSet::new(root, Duration::from_secs(5)).with_settle(Duration::ZERO);
        l.track([rel]);
        l
    }

    #[test]
    fn a_restored_wal_cut_sends_only_the_changed_pages() {
        restored_cut_sends_only_changed_pages(true);
    }

    #[test]
    fn a_restored_rollback_journal_cut_sends_only_the_changed_pages() {
        restored_cut_sends_only_changed_pages(false);
    }

    /// A database replaced by another file (a restore by rename) after the
    /// state was saved is read whole again: its cut is the new file's.
    #[test]
    fn a_database_replaced_since_the_save_is_read_again() {
        let t = tempfile::tempdir().unwrap();
        let (src, _dst, w, rel, mut live) = source(t.path(), true);
        live.cut().unwrap();
        live.end_round();
        let saved = live.save().unwrap();
        drop((live, w));
        let other = t.path().join("other.db");
        let o = super::super::tests::db(&other, true);
        o.execute("UPDATE t SET v = x'00' WHERE k = 7", []).unwrap();
        drop(o);
        for side in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{side}", src.display()));
        }
        std::fs::rename(&other, &src).unwrap();
        let mut next = fresh_from(t.path(), &rel);
        next.restore(&saved).unwrap();
        next.cut().unwrap();
        let mut plain = fresh_from(t.path(), &rel);
        plain.cut().unwrap();
        assert_eq!(next.snapshot(&rel), plain.snapshot(&rel));
    }

    /// Garbage, another folder's state and a tampered page table restore
    /// nothing: the next cut reads the database as a first cut would.
    #[test]
    fn bad_or_foreign_state_restores_nothing() {
        let t = tempfile::tempdir().unwrap();
        let (_src, _dst, _w, rel, mut live) = source(t.path(), true);
        live.cut().unwrap();
        live.end_round();
        let saved = live.save().unwrap();
        let mut next = fresh_from(t.path(), &rel);
        assert!(next.restore(b"not a state").is_err());
        let elsewhere = tempfile::tempdir().unwrap();
        let mut foreign = fresh_from(elsewhere.path(), &rel);
        assert_eq!(foreign.restore(&saved).unwrap(), 0);
        // a flipped byte inside the page table: its hash no longer matches
        let mut tampered = saved.clone();
        let at = tampered.len() / 2;
        tampered[at] ^= 0x55;
        if let Ok(n) = next.restore(&tampered) {
            assert_eq!(
                n, 0,
                "a page table that does not give its hash was restored"
            );
        }
        assert_eq!(next.restore(&saved).unwrap(), 1);
        assert_eq!(
            next.restore(&saved).unwrap(),
            0,
            "restored over a known state"
        );
    }
}
