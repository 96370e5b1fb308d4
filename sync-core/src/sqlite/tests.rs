//! Tests of the source and replica sides together.

use super::*;
use crate::RelPath;
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

fn db(path: &Path, wal: bool) -> Connection {
    let c = Connection::open(path).unwrap();
    if wal {
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
    }
    c.execute_batch(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 2000)
         INSERT INTO t SELECT i, randomblob(300) FROM n;",
    )
    .unwrap();
    c
}

fn replica_hash(path: &Path) -> [u8; 32] {
    read_hashes(path).unwrap().unwrap().hash
}

#[test]
fn sidecars_are_named() {
    assert_eq!(sidecar_base(b"a.db-wal"), Some(&b"a.db"[..]));
    assert_eq!(sidecar_base(b"a.db-journal"), Some(&b"a.db"[..]));
    assert_eq!(sidecar_base(b"-wal"), None);
    assert_eq!(sidecar_base(b"a.db"), None);
}

fn ship(live: &LiveSet, rel: &RelPath, dst: &Path) {
    let have = read_hashes(dst).unwrap();
    let pages = match have {
        None => (1..=live.snapshot(rel).unwrap().pages).collect(),
        Some(h) => match live.need(rel, &h.hash) {
            Need::Nothing => Vec::new(),
            Need::Pages(p) => p,
            Need::Hashes => live.differing(rel, h.page_size, &h.hashes),
        },
    };
    let snap = live.snapshot(rel).unwrap();
    if !dst.exists() {
        let f = std::fs::File::create(dst).unwrap();
        for p in &pages {
            f.write_all_at(
                &live.page(rel, *p).unwrap(),
                u64::from(*p - 1) * u64::from(snap.page_size),
            )
            .unwrap();
        }
    } else {
        apply_pages(
            dst,
            snap.pages,
            pages.into_iter().map(|p| Ok((p, live.page(rel, p)?))),
        )
        .unwrap();
    }
    assert_eq!(replica_hash(dst), snap.hash);
    assert_eq!(integrity(dst).unwrap(), "ok");
}

fn ship_and_end(live: &mut LiveSet, rel: &RelPath, dst: &Path) {
    ship(live, rel, dst);
    live.end_round();
}

fn cut_follows_writes(wal: bool) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("a.db");
    let dst = t.path().join("copy.db");
    let w = db(&src, wal);
    let rel = RelPath::new(b"a.db").unwrap();
    let mut live = LiveSet::new(t.path(), Duration::from_secs(5));
    assert!(live.track([&rel]).is_empty());
    let first = live.cut().unwrap();
    assert_eq!(first.changed, vec![rel.clone()]);
    ship_and_end(&mut live, &rel, &dst);
    let before = live.snapshot(&rel).unwrap();
    // a small change: few pages, found without hashing every page
    w.execute("UPDATE t SET v = randomblob(300) WHERE k = 1000", [])
        .unwrap();
    let c = live.cut().unwrap();
    assert!(c.pages_changed >= 1 && c.pages_changed <= 4, "{c:?}");
    let after = live.snapshot(&rel).unwrap();
    assert_ne!(before.hash, after.hash);
    match live.need(&rel, &before.hash) {
        Need::Pages(p) => assert_eq!(p.len(), c.pages_changed),
        other => panic!("{other:?}"),
    }
    ship_and_end(&mut live, &rel, &dst);
    // growth and shrink (VACUUM rewrites and truncates)
    w.execute_batch("DELETE FROM t WHERE k > 100; VACUUM;")
        .unwrap();
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    let n: i64 = Connection::open(&dst)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 100);
    // nothing changed: nothing to ship
    let c = live.cut().unwrap();
    assert!(c.changed.is_empty(), "{c:?}");
}

#[test]
fn wal_cuts_ship_changed_pages() {
    cut_follows_writes(true);
}

#[test]
fn rollback_journal_cuts_ship_changed_pages() {
    cut_follows_writes(false);
}

#[test]
fn a_cut_waits_for_a_writer_and_sees_its_commit_whole() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("a.db");
    let w = db(&src, true);
    let rel = RelPath::new(b"a.db").unwrap();
    let mut live = LiveSet::new(t.path(), Duration::from_secs(5));
    live.track([&rel]);
    live.cut().unwrap();
    w.execute_batch("BEGIN IMMEDIATE; UPDATE t SET v = x'00' WHERE k = 1;")
        .unwrap();
    let done = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut l2 = LiveSet::new(t.path(), Duration::from_secs(5));
            l2.track([&rel]);
            l2.cut().unwrap();
            let v = l2.page(&rel, 1).unwrap();
            (v.len(), l2.snapshot(&rel).unwrap())
        });
        std::thread::sleep(Duration::from_millis(100));
        w.execute_batch("COMMIT").unwrap();
        h.join().unwrap()
    });
    assert_eq!(done.0, 4096);
    live.cut().unwrap();
    assert_eq!(live.snapshot(&rel).unwrap(), done.1);
}
