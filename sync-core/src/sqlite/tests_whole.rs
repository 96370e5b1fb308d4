//! Tests of a cut that compares every page straight from the database file
//! (`whole.rs`): it must find exactly what `sqlite_dbpage` would.

use super::tests::{assert_same, replica_hash, ship_and_end, wal_source};
use super::whole::FILE_PAGES;
use super::*;
use super::{Prior, conn, copy, hash_pages, wal, whole};
use rusqlite::Connection;
use std::path::Path;

fn file_pages() -> u64 {
    FILE_PAGES.with(std::cell::Cell::take)
}

fn log(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push("-wal");
    p.into()
}

/// A WAL source with no writer left open, cut and shipped once.
fn shipped(
    t: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    crate::RelPath,
    LiveSet,
) {
    let (src, dst, w, rel, mut live) = wal_source(t);
    drop(w);
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    (src, dst, rel, live)
}

/// A writer that changed, grew, then shrank the database and checkpointed
/// it on its close (the log that named the pages is gone): each cut hashes
/// every page straight from the file, and finds what a fresh connection
/// sees; the replica ends up the same.
#[test]
fn a_database_checkpointed_between_cuts_is_hashed_from_its_file() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, rel, mut live) = shipped(t.path());
    file_pages();
    let steps = [
        // changed and grown
        "UPDATE t SET v = randomblob(300) WHERE k % 7 = 0;
         WITH RECURSIVE n(i) AS (SELECT 2001 UNION ALL SELECT i+1 FROM n WHERE i < 2600)
         INSERT INTO t SELECT i, randomblob(300) FROM n;",
        // truncated
        "DELETE FROM t WHERE k > 300; VACUUM;",
        // one byte of one row
        "UPDATE t SET v = x'00' WHERE k = 150;",
    ];
    for sql in steps {
        let w = Connection::open(&src).unwrap();
        w.execute_batch(sql).unwrap();
        drop(w);
        assert!(!log(&src).exists(), "the writer's close kept its log");
        let c = live.cut().unwrap();
        assert_eq!(c.changed, vec![rel.clone()], "{sql}");
        let snap = live.snapshot(&rel).unwrap();
        assert_eq!(file_pages(), u64::from(snap.pages), "{sql}");
        assert_eq!(snap.hash, replica_hash(&src), "{sql}");
        assert_eq!(
            live.dbs[&rel].hashes,
            read_hashes(&src).unwrap().unwrap().hashes
        );
        // the pages this cut found changed were kept as read: the read-ahead
        // reads only those an older remembered cut needs besides (from the
        // file, or through SQLite)
        let since = live.dbs[&rel].history.front().unwrap().1.clone();
        let older = since.iter().filter(|&&p| p <= snap.pages).count() - c.pages_changed;
        PAGES_READ.with(|n| n.set(0));
        whole::SERVED_PAGES.with(|n| n.set(0));
        live.release(false).unwrap();
        let read = PAGES_READ.with(std::cell::Cell::get) + whole::SERVED_PAGES.with(|n| n.get());
        assert_eq!(read, older as u64, "{sql}");
        ship_and_end(&mut live, &rel, &dst);
        assert_same(&src, &dst);
    }
}

/// A snapshot that reads pages from its log (a writer's commits not yet
/// checkpointed) is hashed from the file but for the pages the log names,
/// which are read through SQLite; with those pages taken from the file
/// instead, its hash would be another.
#[test]
fn a_log_with_frames_overlays_the_file() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    w.execute_batch(
        "PRAGMA wal_autocheckpoint = 0; PRAGMA wal_checkpoint(TRUNCATE);
         UPDATE t SET v = randomblob(300) WHERE k % 3 = 0;",
    )
    .unwrap();
    let in_log = wal::log_pages(&log(&src), std::fs::metadata(log(&src)).unwrap().len()).unwrap();
    assert!(!in_log.is_empty());
    file_pages();
    PAGES_READ.with(|n| n.set(0));
    live.cut().unwrap();
    let snap = live.snapshot(&rel).unwrap();
    assert_eq!(file_pages(), u64::from(snap.pages));
    // and page 1, for the header
    assert_eq!(
        PAGES_READ.with(std::cell::Cell::get),
        in_log.len() as u64 + 1
    );
    assert_eq!(snap.hash, replica_hash(&src));
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
    // the file's own pages differ from the snapshot's where the log names them
    let file = std::fs::read(&src).unwrap();
    let page = |p: u32| &file[(p as usize - 1) * 4096..p as usize * 4096];
    let last = live.dbs[&rel].hashes.clone();
    assert!(
        in_log
            .iter()
            .any(|&p| page_hash(p, page(p)) != last[p as usize - 1])
    );
    // the file is written by a checkpoint, the log keeps new frames: every
    // page is compared, the log's through SQLite
    w.execute_batch(
        "PRAGMA wal_checkpoint(TRUNCATE);
         UPDATE t SET v = randomblob(300) WHERE k % 5 = 0;
         PRAGMA wal_checkpoint(PASSIVE);
         UPDATE t SET v = x'01' WHERE k = 7;",
    )
    .unwrap();
    let c = live.cut().unwrap();
    assert_eq!(c.changed, vec![rel.clone()]);
    assert_eq!(file_pages(), u64::from(live.snapshot(&rel).unwrap().pages));
    assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
}

/// While a cut hashes a snapshot that reads from its log, the writer commits
/// more and checkpoints: the cut is still the snapshot's state.
#[test]
fn commits_and_checkpoints_while_hashing_leave_the_cut_alone() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    w.execute_batch("PRAGMA wal_autocheckpoint = 0;").unwrap();
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    // the log is checkpointed and written anew: the next cut compares all
    w.execute_batch(
        "UPDATE t SET v = randomblob(300) WHERE k % 4 = 0;
         PRAGMA wal_checkpoint(TRUNCATE);
         UPDATE t SET v = randomblob(300) WHERE k % 6 = 0;",
    )
    .unwrap();
    let expected = std::rc::Rc::new(std::cell::Cell::new([0u8; 32]));
    let (seen, hook_src) = (expected.clone(), src.clone());
    copy::BEFORE_HASHING.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |_: &Path| {
            seen.set(replica_hash(&hook_src));
            let c = Connection::open(&hook_src).unwrap();
            c.execute_batch(
                "PRAGMA wal_checkpoint(PASSIVE);
                 UPDATE t SET v = randomblob(300) WHERE k % 5 = 0;
                 DELETE FROM t WHERE k > 1500;
                 PRAGMA wal_checkpoint(PASSIVE);",
            )
            .unwrap();
        }));
    });
    file_pages();
    let c = live.cut();
    copy::BEFORE_HASHING.with(|h| h.borrow_mut().take());
    assert_eq!(c.unwrap().changed, vec![rel.clone()]);
    assert!(file_pages() > 0);
    assert_eq!(live.snapshot(&rel).unwrap().hash, expected.get());
    ship_and_end(&mut live, &rel, &dst);
    let c = live.cut().unwrap();
    assert_eq!(c.changed, vec![rel.clone()]);
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
}

fn strong_pages() -> u64 {
    whole::STRONG_PAGES.with(std::cell::Cell::take)
}

/// A cut that compares every page computes blake3 only for the pages whose
/// quick hash moved (and page 1); a page changed and changed back between
/// two such cuts, with a cut from the log in between, is still found.
#[test]
fn a_whole_compare_rehashes_only_what_changed() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, rel, mut live) = shipped(t.path());
    let pages = u64::from(live.snapshot(&rel).unwrap().pages);
    assert!(pages > 100);
    let original: Vec<u8> = Connection::open(&src)
        .unwrap()
        .query_row("SELECT v FROM t WHERE k = 150", [], |r| r.get(0))
        .unwrap();
    strong_pages();
    file_pages();
    // a checkpoint on close: every page compared, two or three rehashed
    Connection::open(&src)
        .unwrap()
        .execute_batch("UPDATE t SET v = x'00' WHERE k = 150;")
        .unwrap();
    // past the racy window: the next cut trusts the file's stamp
    std::thread::sleep(std::time::Duration::from_nanos(2 * conn::RACY_NS as u64));
    let c = live.cut().unwrap();
    assert_eq!(file_pages(), pages);
    assert!(strong_pages() <= 3, "blake3 of more than the changed pages");
    assert!(c.pages_changed >= 1);
    assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
    ship_and_end(&mut live, &rel, &dst);
    // changed back through the log (the pages the log names are rehashed)
    let hook = Connection::open(&src).unwrap();
    hook.execute("UPDATE t SET v = ?1 WHERE k = 150", [&original])
        .unwrap();
    let c = live.cut().unwrap();
    assert_eq!(file_pages(), 0, "a cut from the log reads no whole file");
    assert!(c.pages_changed >= 1);
    ship_and_end(&mut live, &rel, &dst);
    // and changed again, checkpointed on close: the page's content is what
    // it was two cuts ago, its hash is not the last cut's
    hook.execute("UPDATE t SET v = x'00' WHERE k = 150", [])
        .unwrap();
    drop(hook);
    assert!(!log(&src).exists());
    let c = live.cut().unwrap();
    assert_eq!(file_pages(), pages);
    assert!(c.pages_changed >= 1, "{c:?}");
    assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
}

/// A page table's quick hashes vouch only for the pages whose content gives
/// them, under their own seed: a wrong one, or another seed, and blake3 is
/// computed.
#[test]
fn quick_hashes_vouch_only_for_their_own_content() {
    let pages: Vec<u8> = (0..8 * 512).map(|i| (i % 251) as u8).collect();
    let (seed, size) = (7, 512);
    let mut first = Vec::new();
    assert_eq!(hash_pages(&mut first, &pages, size, seed, None), 8);
    let (strong, mut quick): (Vec<[u8; 32]>, Vec<u64>) = first.iter().copied().unzip();
    fn with<'a>(strong: &'a [[u8; 32]], quick: &'a [u64], seed: u64) -> Option<Prior<'a>> {
        Some(Prior {
            strong,
            quick,
            seed,
        })
    }
    let mut again = Vec::new();
    // all but page 1 vouched for
    assert_eq!(
        hash_pages(&mut again, &pages, size, seed, with(&strong, &quick, seed)),
        1
    );
    assert_eq!(again, first);
    again.clear();
    assert_eq!(
        hash_pages(
            &mut again,
            &pages,
            size,
            seed + 1,
            with(&strong, &quick, seed)
        ),
        8
    );
    quick[3] ^= 1;
    again.clear();
    assert_eq!(
        hash_pages(&mut again, &pages, size, seed, with(&strong, &quick, seed)),
        2
    );
    assert_eq!(again[3].0, strong[3]);
    // a table of another length vouches for nothing
    again.clear();
    assert_eq!(
        hash_pages(
            &mut again,
            &pages,
            size,
            seed,
            with(&strong, &quick[..4], seed)
        ),
        8
    );
}

/// A cut state saved and restored in another set keeps its quick hashes:
/// that set's whole compare computes blake3 only for what changed.
#[test]
fn a_restored_state_keeps_its_quick_hashes() {
    let t = tempfile::tempdir().unwrap();
    let (src, _dst, rel, live) = shipped(t.path());
    let saved = live.save().unwrap();
    drop(live);
    Connection::open(&src)
        .unwrap()
        .execute_batch("UPDATE t SET v = x'00' WHERE k = 150;")
        .unwrap();
    let mut next =
        LiveSet::new(t.path(), std::time::Duration::from_secs(5)).with_settle(Default::default());
    next.track([&rel]);
    assert_eq!(next.restore(&saved).unwrap(), 1);
    strong_pages();
    file_pages();
    let c = next.cut().unwrap();
    assert_eq!(c.changed, vec![rel.clone()]);
    assert!(file_pages() > 0, "not a whole compare");
    assert!(strong_pages() <= 3, "blake3 of more than the changed pages");
    assert_eq!(next.snapshot(&rel).unwrap().hash, replica_hash(&src));
}

/// A snapshot that reads from its log is served from the file in runs of
/// pages while the writer commits more and checkpoints after the cut: what
/// arrives is still the snapshot.
#[test]
fn pages_served_while_the_writer_checkpoints_are_the_snapshots() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    w.execute_batch("PRAGMA wal_autocheckpoint = 0;").unwrap();
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    w.execute_batch("UPDATE t SET v = randomblob(300) WHERE k % 4 = 0;")
        .unwrap();
    live.cut().unwrap();
    let expected = live.snapshot(&rel).unwrap().hash;
    let c = Connection::open(&src).unwrap();
    c.execute_batch(
        "UPDATE t SET v = randomblob(300) WHERE k % 3 = 0;
         PRAGMA wal_checkpoint(PASSIVE);
         DELETE FROM t WHERE k > 1000;
         PRAGMA wal_checkpoint(PASSIVE);",
    )
    .unwrap();
    let all: Vec<u32> = (1..=live.snapshot(&rel).unwrap().pages).collect();
    let served = live.pages(&rel, &all).unwrap();
    let one_by_one: Vec<(u32, Vec<u8>)> = all
        .iter()
        .map(|&p| (p, live.page(&rel, p).unwrap()))
        .collect();
    assert!(
        served == one_by_one,
        "a page served differs from sqlite_dbpage's"
    );
    // as runs: the same bytes, all pages in runs one after another, and
    // for pages here and there a run per stretch of consecutive ones
    let ps = live.snapshot(&rel).unwrap().page_size as usize;
    let whole: Vec<u8> = one_by_one.iter().flat_map(|(_, d)| d.clone()).collect();
    let mut next = 1;
    let mut joined = Vec::new();
    for (first, run) in live.runs(&rel, &all).unwrap() {
        assert_eq!(first, next);
        next += (run.len() / ps) as u32;
        joined.extend_from_slice(&run);
    }
    assert!(joined == whole);
    let some: Vec<u32> = all.iter().copied().filter(|p| p % 5 < 2).collect();
    let runs = live.runs(&rel, &some).unwrap();
    assert_eq!(
        runs.len(),
        some.iter().filter(|p| *p % 5 == 0 || **p == 1).count()
    );
    for (first, run) in &runs {
        let at = (*first as usize - 1) * ps;
        assert!(
            run[..] == whole[at..at + run.len()],
            "the run from page {first}"
        );
    }
    ship_and_end(&mut live, &rel, &dst);
    assert_eq!(replica_hash(&dst), expected);
    drop(w);
}
