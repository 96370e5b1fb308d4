//! Tests of the source and replica sides together.

use super::*;
use crate::RelPath;
use rusqlite::Connection;
use std::path::Path;
use std::time::Duration;

pub(super) fn db(path: &Path, wal: bool) -> Connection {
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

pub(super) fn replica_hash(path: &Path) -> [u8; 32] {
    read_hashes(path).unwrap().unwrap().hash
}

#[test]
fn sidecars_are_named() {
    assert_eq!(sidecar_base(b"a.db-wal"), Some(&b"a.db"[..]));
    assert_eq!(sidecar_base(b"a.db-journal"), Some(&b"a.db"[..]));
    assert_eq!(sidecar_base(b"-wal"), None);
    assert_eq!(sidecar_base(b"a.db"), None);
}

pub(super) fn ship(live: &LiveSet, rel: &RelPath, dst: &Path) {
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
    // as a round serves them: in batches, read from the file at once
    let served = live.pages(rel, &pages).unwrap();
    for (p, page) in served.iter().step_by(7) {
        assert_eq!(page, &live.page(rel, *p).unwrap(), "page {p}");
    }
    if !dst.exists() {
        let f = std::fs::File::create(dst).unwrap();
        for (p, page) in &served {
            f.write_all_at(page, u64::from(*p - 1) * u64::from(snap.page_size))
                .unwrap();
        }
    } else {
        apply_pages(dst, snap.pages, served.into_iter().map(Ok)).unwrap();
    }
    assert_eq!(replica_hash(dst), snap.hash);
    assert_eq!(integrity(dst).unwrap(), "ok");
}

pub(super) fn ship_and_end(live: &mut LiveSet, rel: &RelPath, dst: &Path) {
    ship(live, rel, dst);
    live.end_round();
}

fn cut_follows_writes(wal: bool) {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("a.db");
    let dst = t.path().join("copy.db");
    let w = db(&src, wal);
    let rel = RelPath::new(b"a.db").unwrap();
    let mut live = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(Duration::ZERO);
    live.track([&rel]);
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
    let mut live = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(Duration::ZERO);
    live.track([&rel]);
    live.cut().unwrap();
    w.execute_batch("BEGIN IMMEDIATE; UPDATE t SET v = x'00' WHERE k = 1;")
        .unwrap();
    let done = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut l2 = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(Duration::ZERO);
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

/// A WAL source database `a.db` with its rows, tracked by a live set, and
/// where its replica copy goes.
pub(super) fn wal_source(t: &Path) -> Source {
    source(t, true)
}

/// A source database, its replica's path, its writer, its path in the
/// folder and the live set tracking it.
pub(super) type Source = (
    std::path::PathBuf,
    std::path::PathBuf,
    Connection,
    RelPath,
    LiveSet,
);

/// [`wal_source`], or a rollback-journal one.
pub(super) fn source(t: &Path, wal: bool) -> Source {
    let (src, dst) = (t.join("a.db"), t.join("copy.db"));
    let w = db(&src, wal);
    let rel = RelPath::new(b"a.db").unwrap();
    let mut live = LiveSet::new(t, Duration::from_secs(5)).with_settle(Duration::ZERO);
    live.track([&rel]);
    (src, dst, w, rel, live)
}

/// Source and replica hold the same content (a fresh connection's view of
/// the source, not the live set's).
pub(super) fn assert_same(src: &Path, dst: &Path) {
    let a = read_hashes(src).unwrap().unwrap();
    let b = read_hashes(dst).unwrap().unwrap();
    assert_eq!(a.page_size, b.page_size);
    assert_eq!(a.hashes.len(), b.hashes.len());
    assert!(a.hash == b.hash, "replica differs from the source");
}

fn side(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_os_string();
    p.push(suffix);
    p.into()
}

#[test]
fn no_connection_outlives_its_round() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    // The application leaves WAL mode and changes its page size at once, with
    // no busy wait: nobody else holds the database.
    w.busy_timeout(Duration::ZERO).unwrap();
    let mode: String = w
        .query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
    w.execute_batch("PRAGMA page_size=8192; VACUUM;").unwrap();
    let mode: String = w
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    w.execute("UPDATE t SET v = randomblob(10) WHERE k = 7", [])
        .unwrap();
    live.cut().unwrap();
    // (a replica takes another page size as a whole new image)
    std::fs::remove_file(&dst).unwrap();
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
    assert_eq!(read_hashes(&dst).unwrap().unwrap().page_size, 8192);
}

/// A backup restored by rename (the application closed, `mv new.db a.db`):
/// the source stays intact and the replica gets the restored content, whether
/// the application closed before a cut or while a round was being served.
fn restore_by_rename(close_during_round: bool) {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    w.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    // frames in the log that only the application's last close checkpoints
    w.execute("UPDATE t SET v = randomblob(300) WHERE k < 500", [])
        .unwrap();
    live.cut().unwrap();
    ship(&live, &rel, &dst);
    if close_during_round {
        drop(w);
        live.end_round();
    } else {
        live.end_round();
        drop(w);
    }
    let new = t.path().join("new.db");
    let n = Connection::open(&new).unwrap();
    n.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    n.execute_batch("CREATE TABLE r(x); INSERT INTO r VALUES ('restored');")
        .unwrap();
    drop(n);
    std::fs::rename(&new, &src).unwrap();
    let wal = std::fs::metadata(side(&src, "-wal")).map_or(0, |m| m.len());
    assert_eq!(
        wal, 0,
        "a log with frames stays beside the restored database"
    );
    assert_eq!(integrity(&src).unwrap(), "ok");
    let x: String = Connection::open(&src)
        .unwrap()
        .query_row("SELECT x FROM r", [], |r| r.get(0))
        .unwrap();
    assert_eq!(x, "restored");
    // The next cut sees another file: every page compared, the restored
    // content shipped.
    let c = live.cut().unwrap();
    assert_eq!(c.changed, vec![rel.clone()]);
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
}

#[test]
fn a_backup_restored_by_rename_after_a_round_leaves_the_source_intact() {
    restore_by_rename(false);
}

#[test]
fn a_backup_restored_by_rename_during_a_round_leaves_the_source_intact() {
    restore_by_rename(true);
}

#[test]
fn the_log_resets_between_cuts_and_stays_small() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    let mut biggest = 0;
    // ~150 frames a transaction, 120 transactions: 70 MB of log were it never
    // reset (a snapshot pinned from one cut to the next forbids it).
    for i in 0..120 {
        w.execute("UPDATE t SET v = randomblob(300)", []).unwrap();
        live.cut().unwrap();
        if i % 10 == 0 {
            ship(&live, &rel, &dst);
        }
        live.end_round();
        biggest = biggest.max(std::fs::metadata(side(&src, "-wal")).map_or(0, |m| m.len()));
    }
    assert!(biggest < 16 << 20, "the log grew to {biggest} bytes");
    live.cut().unwrap();
    ship_and_end(&mut live, &rel, &dst);
    assert_same(&src, &dst);
}

/// The application's checkpoints, log resets, closes, reopenings and
/// VACUUMs between cuts never make a cut miss a change, whole or partial
/// (which leaves a quiet database alone): after every cut the replica equals
/// the source.
#[test]
fn cuts_follow_every_way_the_log_can_move() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, w, rel, mut live) = wal_source(t.path());
    let mut w = Some(w);
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut idle = 0;
    for _ in 0..60 {
        for _ in 0..next(4) {
            let c = w.get_or_insert_with(|| Connection::open(&src).unwrap());
            match next(7) {
                0 => c
                    .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                    .unwrap(),
                1 => c
                    .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                    .unwrap(),
                2 => c
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                    .unwrap(),
                3 => drop(w.take()),
                4 => c.execute_batch("VACUUM").unwrap(),
                _ => {
                    let k = next(2000) as i64;
                    c.execute(
                        "UPDATE t SET v = randomblob(300) WHERE k BETWEEN ?1 AND ?1 + 20",
                        [k],
                    )
                    .unwrap();
                }
            }
        }
        if next(3) == 0 {
            // file times older than a clock tick: the next partial cut may
            // find the database quiet and leave it alone
            std::thread::sleep(Duration::from_millis(60));
        }
        if next(2) == 0 {
            live.cut().unwrap();
        } else {
            live.cut_partial().unwrap();
            idle += usize::from(!live.connected(&rel));
        }
        ship_and_end(&mut live, &rel, &dst);
        assert_same(&src, &dst);
    }
    assert!(idle > 0, "no partial cut left the database alone");
}

#[test]
fn side_files_left_by_a_vanished_database_are_never_mirrored() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    // what `mv new.db app.db` leaves behind when new.db was used in WAL mode
    let mut wal = vec![0u8; 32 + 24 + 4096];
    wal[..4].copy_from_slice(&0x377f_0682u32.to_be_bytes());
    std::fs::write(root.join("new.db-wal"), &wal).unwrap();
    std::fs::write(root.join("new.db-shm"), vec![0u8; 32768]).unwrap();
    std::fs::write(root.join("gone.db-journal"), []).unwrap();
    // files that only look like side files by name
    std::fs::write(root.join("notes-journal"), b"dear diary").unwrap();
    std::fs::write(root.join("odd-shm"), b"12345").unwrap();
    let opts = crate::scan::ScanOptions {
        databases: Some(std::sync::Arc::new(crate::scan::DbDetect::default())),
        ..Default::default()
    };
    let m = crate::scan::scan(root, &opts).unwrap();
    let names: Vec<String> = m.entries.iter().map(|e| e.path.to_string()).collect();
    assert_eq!(names, [".", "notes-journal", "odd-shm"], "{names:?}");
}

/// Once the pages a round may ask for are read ahead, the snapshot is gone:
/// a rollback-journal writer commits at once (no busy wait) while the round
/// is still being served, and the round is served from what was read.
#[test]
fn a_released_cut_blocks_no_writer_and_still_serves_its_round() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("a.db"), t.path().join("copy.db"));
    let w = db(&src, false);
    w.busy_timeout(Duration::ZERO).unwrap();
    let rel = RelPath::new(b"a.db").unwrap();
    let mut live = LiveSet::new(t.path(), Duration::from_secs(5)).with_settle(Duration::ZERO);
    live.track([&rel]);
    live.cut().unwrap();
    live.release(false).unwrap();
    // a first cut: every page read ahead
    w.execute("UPDATE t SET v = x'01' WHERE k = 1", []).unwrap();
    ship_and_end(&mut live, &rel, &dst);
    let shipped = live.snapshot(&rel).unwrap();
    assert_ne!(read_hashes(&src).unwrap().unwrap().hash, shipped.hash);
    live.cut().unwrap();
    live.release(false).unwrap();
    w.execute("UPDATE t SET v = x'02' WHERE k = 2", []).unwrap();
    // the replica holds the previous cut: the pages changed since are there
    ship(&live, &rel, &dst);
    // a replica at an unknown state may need any page: not this round's
    let mut far = Vec::new();
    for p in 1..=live.snapshot(&rel).unwrap().pages {
        if live.page(&rel, p).is_err() {
            far.push(p);
        }
    }
    // a rollback-journal database's cut is copied whole (`copy.rs`): any
    // page is served without holding the snapshot
    assert!(far.is_empty(), "pages {far:?} not served");
    live.end_round();
    // a full round reads every page ahead
    live.cut().unwrap();
    live.release(true).unwrap();
    w.execute("UPDATE t SET v = x'03' WHERE k = 3", []).unwrap();
    for p in far {
        live.page(&rel, p).unwrap();
    }
    ship_and_end(&mut live, &rel, &dst);
}

/// A database's hash is the one peers and saved states already hold: the
/// same bytes as one update a page hash (it goes to blake3 in one call now).
#[test]
fn a_database_hash_is_its_pages_hashes_in_order() {
    let hashes: Vec<[u8; 32]> = (0u32..5000)
        .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect();
    let mut h = blake3::Hasher::new();
    h.update(b"understudy-sqlite-v1\0");
    h.update(&4096u32.to_le_bytes());
    h.update(&5000u64.to_le_bytes());
    for p in &hashes {
        h.update(p);
    }
    assert_eq!(db_hash(4096, &hashes), *h.finalize().as_bytes());
    assert_ne!(db_hash(4096, &hashes[1..]), db_hash(4096, &hashes));
}
