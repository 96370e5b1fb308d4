//! Tests of how long a cut holds its snapshots and what it reads: copies of
//! rollback-journal databases, partial cuts, read-ahead.

use super::tests::{assert_same, db, replica_hash, ship, ship_and_end, source, wal_source};
use super::*;
use crate::RelPath;
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

/// A changed rollback-journal database's snapshot is let go before its pages
/// are hashed: a writer that does not wait at all commits in the middle of the
/// cut's hashing, and the cut is still the state before that commit.
#[test]
fn a_rollback_journal_cut_lets_its_writer_commit_while_hashing() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = source(t.path(), false);
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    w.execute("UPDATE t SET v = x'01' WHERE k = 1", []).unwrap();
    let committed = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = committed.clone();
    let hook_src = src.clone();
    copy::BEFORE_HASHING.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |p: &Path| {
            assert_eq!(p.file_name(), hook_src.file_name());
            let c = Connection::open(&hook_src).unwrap();
            c.busy_timeout(Duration::ZERO).unwrap();
            seen.borrow_mut().push(
                c.execute("UPDATE t SET v = x'02' WHERE k = 2", [])
                    .map_err(|e| e.to_string()),
            );
        }));
    });
    let c = live.cut();
    copy::BEFORE_HASHING.with(|h| h.borrow_mut().take());
    let c = c.unwrap();
    assert_eq!(c.changed, vec![rel.clone()]);
    assert_eq!(
        *committed.borrow(),
        vec![Ok(1)],
        "the writer waited on the cut"
    );
    // the round is served from the cut: row 1 changed, row 2 not yet
    ship_and_end(&mut live, &rel, &dst);
    let row = |k: i64| -> Vec<u8> {
        Connection::open(&dst)
            .unwrap()
            .query_row("SELECT v FROM t WHERE k = ?1", [k], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(row(1), vec![1]);
    assert_ne!(row(2), vec![2]);
    // the next cut finds the writer's commit
    let c = live.cut().unwrap();
    assert_eq!(c.changed, vec![rel.clone()]);
    ship_and_end(&mut live, &rel, &dst);
    assert_eq!(row(2), vec![2]);
    assert_eq!(replica_hash(&dst), read_hashes(&src).unwrap().unwrap().hash);
}

/// A rollback-journal database found unchanged by its header holds no lock
/// after the cut; a page asked for later is read only if it still is the cut.
#[test]
fn an_unchanged_rollback_journal_cut_reads_pages_only_while_unchanged() {
    let t = tempfile::tempdir().unwrap();
    let (_, _, w, rel, mut live) = source(t.path(), false);
    w.busy_timeout(Duration::ZERO).unwrap();
    live.cut().unwrap();
    live.end_round();
    let c = live.cut().unwrap();
    assert!(c.changed.is_empty(), "{c:?}");
    live.release(true).unwrap();
    let pages = live.snapshot(&rel).unwrap().pages;
    let before: Vec<Vec<u8>> = (1..=pages).map(|p| live.page(&rel, p).unwrap()).collect();
    w.execute("UPDATE t SET v = randomblob(300)", []).unwrap();
    // a page the write changed is refused, one it left alone is served
    let mut refused = 0;
    for p in 1..=pages {
        match live.page(&rel, p) {
            Ok(page) => assert!(
                page_hash(p, &page) == page_hash(p, &before[p as usize - 1]),
                "page {p} served though changed"
            ),
            Err(e) => {
                assert!(e.to_string().contains("written since its cut"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(
        refused > 0 && refused < pages,
        "{refused} of {pages} refused"
    );
    live.end_round();
    live.cut().unwrap();
    assert_eq!(live.page(&rel, 2).unwrap().len(), before[1].len());
}

/// A partial round's cut opens no connection to a database nobody wrote since
/// the last cut; a replica a few cuts behind still gets its pages (read and
/// checked against the cut's hashes); a write during the cut makes it cut
/// every database again.
#[test]
fn a_partial_cut_leaves_quiet_databases_alone() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a.db"), t.path().join("b.db"));
    let (wa, wb) = (db(&a, false), db(&b, true));
    let (ra, rb) = (
        RelPath::new(b"a.db").unwrap(),
        RelPath::new(b"b.db").unwrap(),
    );
    let (da, db_) = (t.path().join("ra.db"), t.path().join("rb.db"));
    let mut live = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(Duration::ZERO);
    live.track([&ra, &rb]);
    // file times older than a clock tick when the cut stamps them
    let settle = || std::thread::sleep(Duration::from_millis(120));
    settle();
    live.cut().unwrap();
    ship(&live, &ra, &da);
    ship_and_end(&mut live, &rb, &db_);
    // b changes; the replica does not get it (it stays a cut behind)
    wb.execute("UPDATE t SET v = x'01' WHERE k < 50", [])
        .unwrap();
    settle();
    live.cut_partial().unwrap();
    live.end_round();
    // a changes, b is quiet: no connection to b, and its pages still served
    wa.execute("UPDATE t SET v = x'02' WHERE k = 9", [])
        .unwrap();
    let c = live.cut_partial().unwrap();
    assert_eq!(c.changed, vec![ra.clone()]);
    assert!(!live.connected(&rb), "a quiet database was connected to");
    ship(&live, &ra, &da);
    ship(&live, &rb, &db_);
    assert_same(&b, &db_);
    // a page written since the cut is refused rather than shipped
    wb.execute("UPDATE t SET v = randomblob(300)", []).unwrap();
    let pages = live.snapshot(&rb).unwrap().pages;
    assert!((1..=pages).any(|p| live.page(&rb, p).is_err()));
    live.end_round();
    settle();
    live.cut().unwrap();
    ship_and_end(&mut live, &rb, &db_);
    settle();
    // b written while a's pages are hashed (a rollback-journal copy): the
    // cut is taken again, and b's change is in it
    wa.execute("UPDATE t SET v = x'03' WHERE k = 9", [])
        .unwrap();
    let hook_b = b.clone();
    copy::BEFORE_HASHING.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |_: &Path| {
            let c = Connection::open(&hook_b).unwrap();
            c.execute("UPDATE t SET v = x'04' WHERE k = 1", []).unwrap();
        }));
    });
    let c = live.cut_partial();
    copy::BEFORE_HASHING.with(|h| h.borrow_mut().take());
    let c = c.unwrap();
    assert_eq!(c.changed, vec![ra.clone(), rb.clone()]);
    ship(&live, &ra, &da);
    ship_and_end(&mut live, &rb, &db_);
    assert_same(&a, &da);
    assert_same(&b, &db_);
}

/// A partial round reads ahead the pages changed since the oldest remembered
/// cut; a replica older than that still gets the others (read later and
/// checked against the cut's hashes), and a page written since is refused.
#[test]
fn a_replica_older_than_every_remembered_cut_is_still_served() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    // the replica stays at this cut while more than HISTORY are taken
    w.execute("UPDATE t SET v = randomblob(300) WHERE k < 400", [])
        .unwrap();
    for k in 0..=HISTORY as i64 {
        live.cut().unwrap();
        live.end_round();
        w.execute("UPDATE t SET v = randomblob(9) WHERE k = ?1", [1500 + k])
            .unwrap();
    }
    live.cut().unwrap();
    live.release(false).unwrap();
    let snap = live.snapshot(&rel).unwrap();
    assert!(live.read_ahead(&rel) < snap.pages as usize / 2);
    let have = read_hashes(&dst).unwrap().unwrap().hash;
    assert_eq!(live.need(&rel, &have), Need::Hashes);
    ship(&live, &rel, &dst);
    assert_same(&src, &dst);
    // pages written after the cut are refused, not served
    w.execute("UPDATE t SET v = randomblob(300)", []).unwrap();
    let refused = (1..=snap.pages)
        .filter(|&p| live.page(&rel, p).is_err())
        .count();
    assert!(refused > 0, "pages written after the cut were served");
    live.end_round();
}

/// A cut given up because a writer held its lock past [`LOCK_WAIT`] keeps
/// every database where the last cut left it: the next cut reads only the
/// log's frames since (no database has every page hashed), the frames the
/// given-up cut had read of the databases before the blocked one included.
#[test]
fn a_cut_given_up_on_a_held_lock_keeps_the_log_position() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a.db"), t.path().join("b.db"));
    let (da, db_) = (t.path().join("copy-a.db"), t.path().join("copy-b.db"));
    let (wa, wb) = (db(&a, true), db(&b, true));
    let (ra, rb) = (
        RelPath::new(b"a.db").unwrap(),
        RelPath::new(b"b.db").unwrap(),
    );
    let mut live = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(Duration::ZERO);
    live.track([&ra, &rb]);
    live.cut().unwrap();
    ship(&live, &ra, &da);
    ship_and_end(&mut live, &rb, &db_);
    // a committed, b's writer in the middle of a transaction: a's log is
    // read under its lock, then b's lock is never had
    wa.execute("UPDATE t SET v = randomblob(300) WHERE k = 7", [])
        .unwrap();
    wb.execute_batch("BEGIN IMMEDIATE; UPDATE t SET v = x'05' WHERE k = 3;")
        .unwrap();
    let c = live.cut_partial().unwrap();
    assert!(c.blocked.is_some(), "{c:?}");
    wb.execute_batch("COMMIT").unwrap();
    let hashed = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen = hashed.clone();
    copy::BEFORE_HASHING.with(|h| {
        *h.borrow_mut() = Some(Box::new(move |p: &Path| {
            seen.borrow_mut().push(p.to_path_buf());
        }));
    });
    let c = live.cut_partial();
    copy::BEFORE_HASHING.with(|h| h.borrow_mut().take());
    let c = c.unwrap();
    assert!(hashed.borrow().is_empty(), "every page hashed: {hashed:?}");
    assert_eq!(c.changed, vec![ra.clone(), rb.clone()]);
    assert!(c.pages_changed <= 8, "{c:?}");
    ship(&live, &ra, &da);
    ship_and_end(&mut live, &rb, &db_);
    assert_same(&a, &da);
    assert_same(&b, &db_);
}

/// A partial cut reads each changed page once: the read-ahead that lets its
/// snapshot go takes the pages the cut read to hash them.
#[test]
fn a_partial_cut_reads_each_changed_page_once() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    for k in [5, 900, 1800] {
        w.execute("UPDATE t SET v = randomblob(300) WHERE k = ?1", [k])
            .unwrap();
        live.cut_partial().unwrap();
        ship_and_end(&mut live, &rel, &dst);
    }
    w.execute(
        "UPDATE t SET v = randomblob(300) WHERE k BETWEEN 100 AND 1100",
        [],
    )
    .unwrap();
    PAGES_READ.with(|n| n.set(0));
    let c = live.cut_partial().unwrap();
    live.release(false).unwrap();
    let read = PAGES_READ.with(std::cell::Cell::get);
    assert!(c.pages_changed > 50, "{c:?}");
    assert!(live.read_ahead(&rel) >= c.pages_changed);
    // the pages of the three earlier cuts, and the log's candidates once
    assert!(
        read <= c.pages_changed as u64 + 8,
        "{read} pages read for {} changed",
        c.pages_changed
    );
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
}

/// An empty log counts as none: a connection that only opened the database
/// leaves it quiet (no connection at the next partial cut), while frames
/// committed and checkpointed away (the log truncated to nothing again) moved
/// the file, and the next partial cut sees the change.
#[test]
fn an_emptied_log_leaves_the_change_it_checkpointed_in_sight() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    w.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);").unwrap();
    drop(w);
    // file times older than a clock tick when the cut stamps them
    let settle = || std::thread::sleep(Duration::from_millis(120));
    settle();
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    settle();
    // only opened and read: quiet
    let r = Connection::open(&src).unwrap();
    r.query_row("SELECT count(*) FROM t", [], |_| Ok(()))
        .unwrap();
    drop(r);
    let c = live.cut_partial().unwrap();
    assert!(c.changed.is_empty(), "{c:?}");
    assert!(!live.connected(&rel), "a quiet database was connected to");
    live.end_round();
    // written, checkpointed and its log emptied: the file moved
    let w = Connection::open(&src).unwrap();
    w.execute_batch(
        "UPDATE t SET v = x'05' WHERE k = 3;
         PRAGMA wal_checkpoint(TRUNCATE);",
    )
    .unwrap();
    let log = std::fs::metadata(format!("{}-wal", src.display())).map_or(0, |m| m.len());
    assert_eq!(log, 0, "the log was not emptied");
    settle();
    let c = live.cut_partial().unwrap();
    assert_eq!(c.changed, vec![rel.clone()]);
    assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
}

/// A cut taken just after a writer's close checkpointed the log into the file
/// cannot vouch for the file's stamp: the next commit's cut compares every
/// page. [`LiveSet::restamp_due`] names such a database; cut again once it is
/// quiet, the next commit is read from its log frames alone.
#[test]
fn a_database_cut_again_once_quiet_has_its_next_commit_read_from_its_log() {
    use super::whole::FILE_PAGES;
    let file_pages = || FILE_PAGES.with(std::cell::Cell::take);
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    drop(w);
    // file times older than a clock tick when the cut stamps them
    let settle = || std::thread::sleep(Duration::from_millis(120));
    let closed_write = |sql: &str| {
        let w = Connection::open(&src).unwrap();
        w.execute_batch(sql).unwrap();
        // its close checkpoints the log into the file, just now
    };
    for cut_again in [false, true] {
        closed_write("UPDATE t SET v = x'01' WHERE k = 1;");
        live.cut().unwrap();
        ship_and_end(&mut live, &rel, &dst);
        // (a machine that stalled past a clock tick before the cut leaves a
        // stamp that vouches already: nothing to tell apart then)
        let fresh = live.restamp_due() == vec![rel.clone()];
        settle();
        if cut_again {
            live.cut_partial().unwrap();
            ship_and_end(&mut live, &rel, &dst);
            assert!(live.restamp_due().is_empty(), "cut again, quiet");
        }
        file_pages();
        // a commit by a writer that stays open: the file is not written
        let w = Connection::open(&src).unwrap();
        w.execute("UPDATE t SET v = randomblob(200) WHERE k % 50 = 0", [])
            .unwrap();
        let c = live.cut_partial().unwrap();
        assert_eq!(c.changed, vec![rel.clone()]);
        let whole = file_pages();
        if cut_again {
            assert_eq!(whole, 0, "the commit was read from its log alone");
        } else if fresh {
            assert!(whole > 0, "a stamp it could not trust: every page compared");
        }
        assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
        ship_and_end(&mut live, &rel, &dst);
        assert_same(&src, &dst);
        drop(w);
    }
}

/// A writer's commit checkpoints as soon as it ends, while the cut takes its
/// lock: the file is written after the cut asked for its lock, by frames of
/// the log's generation then (a new one since the last cut, which saw no
/// log), which the cut reads anyway. It reads them alone, not every page.
/// Should the log restart in between (new salts: a generation checkpointed
/// and reset unseen), every page is compared.
#[test]
fn a_checkpoint_while_the_cut_takes_its_lock_leaves_the_log_frames_to_tell() {
    use super::live::BEFORE_LOCK;
    use super::whole::FILE_PAGES;
    let file_pages = || FILE_PAGES.with(std::cell::Cell::take);
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    // file times older than a clock tick when the cut stamps them
    let settle = || std::thread::sleep(Duration::from_millis(120));
    let cases = [
        ("PRAGMA wal_checkpoint(PASSIVE);", false),
        (
            "PRAGMA wal_checkpoint(TRUNCATE); UPDATE t SET v = x'07' WHERE k = 5;",
            true,
        ),
    ];
    let mut w = Some(w);
    for (at_lock, restarted) in cases {
        // the last writer's close checkpointed and removed the log; the cut
        // sees no log, and a file it can vouch for
        drop(w.take());
        assert!(!super::conn::side_path(&src, "-wal").exists());
        settle();
        live.cut_partial().unwrap();
        ship_and_end(&mut live, &rel, &dst);
        settle();
        // a writer makes a new log and commits; it stays open
        let w2 = Connection::open(&src).unwrap();
        w2.execute("UPDATE t SET v = randomblob(300) WHERE k % 40 = 0", [])
            .unwrap();
        let before = std::fs::metadata(&src).unwrap().modified().unwrap();
        BEFORE_LOCK.with(|h| {
            *h.borrow_mut() = Some(Box::new(move |p: &Path| {
                Connection::open(p).unwrap().execute_batch(at_lock).unwrap();
            }));
        });
        file_pages();
        let c = live.cut_partial();
        BEFORE_LOCK.with(|h| h.borrow_mut().take());
        assert_eq!(c.unwrap().changed, vec![rel.clone()]);
        let after = std::fs::metadata(&src).unwrap().modified().unwrap();
        assert!(after > before, "the checkpoint did not write the file");
        let whole = file_pages();
        if restarted {
            assert!(
                whole > 0,
                "a restarted log cannot tell: every page compared"
            );
        } else {
            assert_eq!(whole, 0, "the log's frames told the change");
        }
        assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
        ship_and_end(&mut live, &rel, &dst);
        assert_same(&src, &dst);
        w = Some(w2);
    }
}

/// Before its lock a cut reads the log's salts, then the file's stamp. A
/// commit to the log the last cut read, checkpointed and reset, and a new
/// generation begun, all between those two reads, wrote the file before its
/// stamp was taken: the cut compares every page and finds both commits.
#[test]
fn a_log_reset_between_the_reads_before_the_lock_is_not_taken_for_a_checkpoint() {
    use super::waiting::BETWEEN_PRE_LOCK_READS;
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    // file times older than a clock tick when the cut stamps them
    let settle = || std::thread::sleep(Duration::from_millis(120));
    settle();
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    settle();
    BETWEEN_PRE_LOCK_READS.with(|h| {
        *h.borrow_mut() = Some(Box::new(|p: &Path| {
            Connection::open(p)
                .unwrap()
                .execute_batch(
                    "UPDATE t SET v = x'0c' WHERE k = 7;
                     PRAGMA wal_checkpoint(TRUNCATE);
                     UPDATE t SET v = x'0d' WHERE k = 1900;",
                )
                .unwrap();
        }));
    });
    let c = live.cut();
    BETWEEN_PRE_LOCK_READS.with(|h| h.borrow_mut().take());
    assert_eq!(c.unwrap().changed, vec![rel.clone()]);
    assert_eq!(live.snapshot(&rel).unwrap().hash, replica_hash(&src));
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
    drop(w);
}
