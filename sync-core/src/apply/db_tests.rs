//! Whole database images replacing a replica's database under other
//! connections (readers that opened it after the held-open check).

use super::*;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

fn make_db(path: &Path, rows: u32, tag: &str) {
    let c = Connection::open(path).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    c.execute_batch(&format!(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {rows})
         INSERT INTO t SELECT i, '{tag}' || hex(randomblob(100)) FROM n;"
    ))
    .unwrap();
}

/// Stages the database at `src` as a whole new image of `rel` and commits it.
pub(crate) fn replace_whole(r: &Replica, rel: &RelPath, src: &Path) {
    let table = sqlite::read_hashes(src).unwrap().unwrap();
    let c = Connection::open(src).unwrap();
    let mut staged = r
        .stage_db(rel, None, table.page_size, table.hashes.len() as u32)
        .unwrap();
    assert!(staged.is_full());
    let mut s = c.prepare("SELECT pgno, data FROM sqlite_dbpage").unwrap();
    let mut rows = s.query([]).unwrap();
    while let Some(row) = rows.next().unwrap() {
        let (pgno, data): (u32, Vec<u8>) = (row.get(0).unwrap(), row.get(1).unwrap());
        staged.page(pgno, &data).unwrap();
    }
    let meta = crate::meta::from_stat(&std::fs::metadata(src).unwrap());
    staged.commit(&table.hash, &meta).unwrap();
    r.flush().unwrap();
}

fn tag_of(path: &Path) -> rusqlite::Result<String> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    c.query_row("SELECT substr(v, 1, 1) FROM t WHERE k = 1", [], |r| {
        r.get(0)
    })
}

/// A connection the held-open check could not see (ours: it skips its own
/// process) keeps the file it reads: the image is not renamed over it, and
/// lands once it is closed.
#[test]
fn a_whole_image_is_never_renamed_over_an_open_connection() {
    let t = tempfile::tempdir().unwrap();
    let (root, src) = (t.path().join("root"), t.path().join("src.db"));
    std::fs::create_dir(&root).unwrap();
    make_db(&root.join("app.db"), 500, "A");
    make_db(&src, 50, "B");
    let r = Replica::open(&root).unwrap();
    let rel = RelPath::new(b"app.db").unwrap();
    let reader = Connection::open(root.join("app.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let n: u32 = reader
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 500);
    replace_whole(&r, &rel, &src);
    let held = r.take_held();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].path, rel);
    assert_eq!(held[0].holders, "another connection");
    reader.execute_batch("COMMIT").unwrap();
    drop(reader);
    assert_eq!(tag_of(&root.join("app.db")).unwrap(), "A");
    replace_whole(&r, &rel, &src);
    assert!(r.take_held().is_empty());
    assert_eq!(tag_of(&root.join("app.db")).unwrap(), "B");
    assert_eq!(sqlite::integrity(&root.join("app.db")).unwrap(), "ok");
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".understudy"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A reader opening the replica's database every few milliseconds while
/// whole images of different databases replace it never sees a malformed
/// database: each read sees one image whole.
#[test]
fn readers_never_see_a_torn_database_while_whole_images_replace_it() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let srcs: Vec<_> = [("A", 800), ("B", 30), ("C", 300)]
        .iter()
        .map(|(tag, rows)| {
            let p = t.path().join(format!("{tag}.db"));
            make_db(&p, *rows, tag);
            p
        })
        .collect();
    std::fs::copy(&srcs[0], root.join("app.db")).unwrap();
    let r = Replica::open(&root).unwrap();
    let rel = RelPath::new(b"app.db").unwrap();
    let (stop, reads) = (AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let db = root.join("app.db");
            while !stop.load(Ordering::Relaxed) {
                if let Ok(c) = Connection::open_with_flags(&db, OpenFlags::SQLITE_OPEN_READ_ONLY) {
                    match c.query_row("PRAGMA quick_check", [], |r| r.get::<_, String>(0)) {
                        Ok(v) => assert_eq!(v, "ok", "a reader saw a torn database"),
                        Err(rusqlite::Error::SqliteFailure(e, m))
                            if e.code == rusqlite::ErrorCode::DatabaseCorrupt
                                || e.code == rusqlite::ErrorCode::NotADatabase =>
                        {
                            panic!("a reader saw a torn database: {e} {m:?}")
                        }
                        Err(_) => {} // busy: the image is being replaced
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
        for i in 0..30 {
            replace_whole(&r, &rel, &srcs[i % srcs.len()]);
            let _ = r.take_held();
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
    });
    assert!(reads.load(Ordering::Relaxed) > 10);
    assert_eq!(sqlite::integrity(&root.join("app.db")).unwrap(), "ok");
}

/// A rename hint (from a hostile or older source) never moves a database by
/// name, nor moves anything onto one: its log would be left behind or meet
/// the moved-in file. Plain files still move.
#[test]
fn a_rename_hint_never_moves_a_database_or_onto_one() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    std::fs::create_dir(&root).unwrap();
    make_db(&root.join("a.db"), 100, "A");
    make_db(&root.join("b.db"), 100, "B");
    // b.db's log still holds a commit (its writer has not closed)
    let w = Connection::open(root.join("b.db")).unwrap();
    w.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    w.execute("UPDATE t SET v = 'B-later' WHERE k = 1", [])
        .unwrap();
    assert!(std::fs::metadata(root.join("b.db-wal")).unwrap().len() > 0);
    std::fs::write(root.join("notes.txt"), b"plain").unwrap();
    std::fs::write(root.join("c.db"), b"not a database at all, a plain file").unwrap();
    let r = Replica::open(&root).unwrap();
    let p = |n: &[u8]| RelPath::new(n).unwrap();
    assert!(
        !r.rename(&p(b"a.db"), &p(b"b.db")),
        "a database moved onto one"
    );
    assert!(!r.rename(&p(b"a.db"), &p(b"moved.db")), "a database moved");
    assert!(
        !r.rename(&p(b"notes.txt"), &p(b"b.db")),
        "a file moved onto a database"
    );
    assert!(r.rename(&p(b"notes.txt"), &p(b"notes2.txt")));
    assert!(
        r.rename(&p(b"c.db"), &p(b"d.db")),
        "a plain file with a database's name"
    );
    drop(w);
    assert_eq!(tag_of(&root.join("a.db")).unwrap(), "A");
    let c = Connection::open(root.join("b.db")).unwrap();
    let v: String = c
        .query_row("SELECT v FROM t WHERE k = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, "B-later");
    assert_eq!(sqlite::integrity(&root.join("b.db")).unwrap(), "ok");
}

/// The temp sweep removes only what this agent's user made: a file of the
/// exact shape of our temp names owned by another user is kept, with a
/// warning.
#[test]
fn the_temp_sweep_keeps_a_foreign_users_file_of_our_shape() {
    let t = tempfile::tempdir().unwrap();
    let ours = ".understudy.tmp.0123456789abcdef";
    let theirs = ".understudy.tmp.fedcba9876543210";
    std::fs::write(t.path().join(ours), b"left by a crash").unwrap();
    std::fs::write(t.path().join(theirs), b"a local user's").unwrap();
    let me = rustix::process::geteuid().as_raw();
    let other = if me == 4242 { 4243 } else { 4242 };
    std::os::unix::fs::chown(t.path().join(theirs), Some(other), None).unwrap();
    let r = Replica::open(t.path()).unwrap();
    let p = |n: &str| RelPath::new(n.as_bytes()).unwrap();
    let n = r.sweep_temps(&[p(ours), p(theirs)]).unwrap();
    assert_eq!(n, 1);
    assert!(!t.path().join(ours).exists());
    assert_eq!(
        std::fs::read(t.path().join(theirs)).unwrap(),
        b"a local user's"
    );
    let w = r.take_warnings();
    assert!(
        w.iter()
            .any(|w| w.contains(theirs) && w.contains(&format!("uid {other}"))),
        "{w:?}"
    );
}

/// Metadata set on a database whose content the replica holds already (the
/// source's own checkpoint moved its mtime) keeps its cached page table: the
/// next round does not hash every page again. A write still misses it.
#[test]
fn a_metadata_change_keeps_a_databases_cached_page_table() {
    let t = tempfile::tempdir().unwrap();
    let db = t.path().join("app.db");
    make_db(&db, 300, "A");
    let r = Replica::open(t.path()).unwrap();
    let rel = RelPath::new(b"app.db").unwrap();
    let first = r.page_table(&rel).unwrap().unwrap();
    let mut meta = crate::meta::from_stat(&std::fs::metadata(&db).unwrap());
    meta.mtime_sec -= 1000;
    let entry = Entry {
        path: rel.clone(),
        kind: Kind::Database {
            page_size: first.page_size,
            pages: first.hashes.len() as u32,
            hash: first.hash,
        },
        meta: meta.clone(),
    };
    r.set_meta(&entry).unwrap();
    let now = crate::meta::from_stat(&std::fs::metadata(&db).unwrap());
    assert_eq!(now.mtime_sec, meta.mtime_sec, "the mtime was not set");
    let again = r.page_table(&rel).unwrap().unwrap();
    assert!(Arc::ptr_eq(&first, &again), "the page table was read again");
    Connection::open(&db)
        .unwrap()
        .execute("UPDATE t SET v = 'changed' WHERE k = 1", [])
        .unwrap();
    let changed = r.page_table(&rel).unwrap().unwrap();
    assert_ne!(changed.hash, first.hash);
}

/// The pages of `path` as its file holds them (no log: checkpointed).
fn image_of(path: &Path) -> Vec<u8> {
    let c = Connection::open(path).unwrap();
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    drop(c);
    std::fs::read(path).unwrap()
}

/// An empty replica root and a source database beside it (300 rows tagged
/// "B"): the root, the source, its page table and its checkpointed image.
fn source_image(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, PageTable, Vec<u8>) {
    let (root, src) = (dir.join("root"), dir.join("src.db"));
    std::fs::create_dir(&root).unwrap();
    make_db(&src, 300, "B");
    let table = sqlite::read_hashes(&src).unwrap().unwrap();
    let image = image_of(&src);
    (root, src, table, image)
}

/// Pages staged as runs land as they would page by page: a whole new image
/// in runs out of order, then an update of the changed pages on top of it;
/// a run past the database, of a partial page or from page 0 is refused,
/// naming the database.
#[test]
fn runs_of_pages_stage_a_whole_image_and_an_update() {
    let t = tempfile::tempdir().unwrap();
    let (root, src, table, image) = source_image(t.path());
    let r = Replica::open(&root).unwrap();
    let rel = RelPath::new(b"app.db").unwrap();
    let (ps, n) = (table.page_size as usize, table.hashes.len());
    assert_eq!(image.len(), n * ps);
    assert!(n >= 8, "{n} pages");
    let mut staged = r.stage_db(&rel, None, table.page_size, n as u32).unwrap();
    assert!(staged.is_full());
    for (first, len) in [(1u32, ps + 100), (n as u32, 2 * ps), (0, ps), (1, 0)] {
        let e = staged
            .run(first, &vec![0; len])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("app.db"), "{e}");
    }
    let half = n / 2;
    staged.run(half as u32 + 1, &image[half * ps..]).unwrap();
    staged.run(1, &image[..ps]).unwrap();
    staged.run(2, &image[ps..half * ps]).unwrap();
    let meta = crate::meta::from_stat(&std::fs::metadata(&src).unwrap());
    staged.commit(&table.hash, &meta).unwrap();
    r.flush().unwrap();
    assert_eq!(std::fs::read(root.join("app.db")).unwrap(), image);
    assert_eq!(tag_of(&root.join("app.db")).unwrap(), "B");

    // changed rows: the pages that differ, as runs, on top of the replica's
    let c = Connection::open(&src).unwrap();
    c.execute_batch("UPDATE t SET v = 'C' || substr(v, 2) WHERE k <= 40 OR k > 280")
        .unwrap();
    drop(c);
    let (after, image) = (sqlite::read_hashes(&src).unwrap().unwrap(), image_of(&src));
    let base = r.page_table(&rel).unwrap().expect("the staged database");
    let changed: Vec<u32> = (1..=after.hashes.len() as u32)
        .filter(|&p| base.hashes.get(p as usize - 1) != Some(&after.hashes[p as usize - 1]))
        .collect();
    assert!(!changed.is_empty() && changed.len() < after.hashes.len());
    let pages = after.hashes.len() as u32;
    let mut staged = r
        .stage_db(&rel, Some(base), after.page_size, pages)
        .unwrap();
    assert!(!staged.is_full());
    // consecutive changed pages in one run each
    let mut rest = &changed[..];
    while let Some(&first) = rest.first() {
        let k = rest
            .iter()
            .zip(first..)
            .take_while(|(p, q)| **p == *q)
            .count();
        let (a, b) = ((first as usize - 1) * ps, (first as usize - 1 + k) * ps);
        staged.run(first, &image[a..b]).unwrap();
        rest = &rest[k..];
    }
    let meta = crate::meta::from_stat(&std::fs::metadata(&src).unwrap());
    assert_eq!(r.runs_read_ahead(), 0);
    staged.commit(&after.hash, &meta).unwrap();
    r.flush().unwrap();
    // the pages it overwrote were read ahead first, through a descriptor
    // closed before SQLite opened the database
    assert!(r.runs_read_ahead() > 0);
    assert_eq!(DB_FDS_MAX.load(Ordering::Relaxed), 1, "descriptors held");
    assert_eq!(tag_of(&root.join("app.db")).unwrap(), "C");
    assert_eq!(sqlite::integrity(&root.join("app.db")).unwrap(), "ok");
    assert_eq!(
        sqlite::read_hashes(&root.join("app.db"))
            .unwrap()
            .unwrap()
            .hash,
        after.hash
    );
}

/// A whole image whose runs repeat some pages and skip others is never
/// installed: the commit names the page that never arrived, and nothing
/// is left at the database's path.
#[test]
fn a_whole_image_with_a_page_never_sent_is_refused_at_commit() {
    let t = tempfile::tempdir().unwrap();
    let (root, src, table, image) = source_image(t.path());
    let r = Replica::open(&root).unwrap();
    let rel = RelPath::new(b"app.db").unwrap();
    let (ps, n) = (table.page_size as usize, table.hashes.len());
    let mut staged = r.stage_db(&rel, None, table.page_size, n as u32).unwrap();
    // every page but the last, the first half twice
    staged.run(1, &image[..(n / 2) * ps]).unwrap();
    staged.run(1, &image[..(n - 1) * ps]).unwrap();
    let meta = crate::meta::from_stat(&std::fs::metadata(&src).unwrap());
    let e = staged
        .commit(&table.hash, &meta)
        .expect_err("refused")
        .to_string();
    assert!(e.contains(&format!("page {n} never arrived")), "{e}");
    r.flush().unwrap();
    assert!(!root.join("app.db").exists());
}

/// The most descriptors of a database this process held at once while
/// SQLite wrote pages into it in place (any test's update).
static DB_FDS_MAX: AtomicU64 = AtomicU64::new(0);

/// `records`, counting at each the descriptors this process holds of the
/// database at `path`: SQLite's own, and any other would drop its POSIX
/// locks when closed.
pub(super) fn counting_db_fds<I: Iterator>(
    records: I,
    path: std::path::PathBuf,
) -> impl Iterator<Item = I::Item> {
    use std::os::unix::fs::MetadataExt as _;
    let id = std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok();
    records.inspect(move |_| {
        let held = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::metadata(e.ok()?.path()).ok())
            .filter(|m| Some((m.dev(), m.ino())) == id)
            .count();
        DB_FDS_MAX.fetch_max(held as u64, Ordering::Relaxed);
    })
}

/// Commits `staged`, the database whose source is `src`, checked against `hash`.
fn commit_whole(staged: StagedDb<'_>, src: &Path, hash: &[u8; 32]) {
    let meta = crate::meta::from_stat(&std::fs::metadata(src).unwrap());
    staged.commit(hash, &meta).unwrap();
}

/// A whole new database's runs are written past the page cache where the
/// file system takes direct I/O (the staging file has no page in it once
/// they are written), and land byte for byte.
#[test]
fn a_whole_new_database_is_written_past_the_page_cache() {
    let t = tempfile::tempdir().unwrap();
    let (root, src, table, image) = source_image(t.path());
    let r = Replica::open(&root).unwrap();
    let (ps, n) = (table.page_size as usize, table.hashes.len());
    let mut staged = r
        .stage_db(
            &RelPath::new(b"app.db").unwrap(),
            None,
            table.page_size,
            n as u32,
        )
        .unwrap();
    for (i, run) in image.chunks(4 * ps).enumerate() {
        staged.run(1 + 4 * i as u32, run).unwrap();
    }
    let direct = staged.direct.as_ref().is_some_and(Option::is_some);
    let fd: std::os::fd::OwnedFd = std::fs::File::create(t.path().join("probe"))
        .unwrap()
        .into();
    let takes = super::super::direct::dio_align(&fd).is_some();
    assert_eq!(
        direct, takes,
        "direct I/O used where the file system takes it"
    );
    commit_whole(staged, &src, &table.hash);
    r.flush().unwrap();
    let cached = super::super::direct::resident(&std::fs::File::open(root.join("app.db")).unwrap());
    if takes {
        assert_eq!(
            cached, 0,
            "{cached} of {n} pages went through the page cache"
        );
    } else {
        eprintln!(
            "no direct I/O on {}: the page cache path only",
            t.path().display()
        );
    }
    assert_eq!(std::fs::read(root.join("app.db")).unwrap(), image);
    assert_eq!(sqlite::integrity(&root.join("app.db")).unwrap(), "ok");
}

/// A whole new database's runs are gathered before they are written: a run
/// out of order, one with a page that comes again on its own later (its
/// gathered copy must not land over the later one): the database lands byte
/// for byte.
#[test]
fn gathered_runs_land_in_any_order_and_a_later_page_wins() {
    let t = tempfile::tempdir().unwrap();
    let (root, src, table, image) = source_image(t.path());
    let r = Replica::open(&root).unwrap();
    let (ps, n) = (table.page_size as usize, table.hashes.len());
    let rel = RelPath::new(b"app.db").unwrap();
    let mut staged = r.stage_db(&rel, None, table.page_size, n as u32).unwrap();
    // pages 3.. in runs of 2, each pair swapped; pages 1-2 last, page 1's
    // first copy garbled, then sent again right
    let runs: Vec<(usize, usize)> = (3..=n).step_by(2).map(|f| (f, (f + 1).min(n))).collect();
    for pair in runs.chunks(2) {
        for &(f, l) in pair.iter().rev() {
            staged.run(f as u32, &image[(f - 1) * ps..l * ps]).unwrap();
        }
    }
    let mut head = image[..2 * ps].to_vec();
    head[200] ^= 0xff;
    staged.run(1, &head).unwrap();
    staged.page(1, &image[..ps]).unwrap();
    commit_whole(staged, &src, &table.hash);
    r.flush().unwrap();
    assert!(std::fs::read(root.join("app.db")).unwrap() == image);
    assert_eq!(sqlite::integrity(&root.join("app.db")).unwrap(), "ok");
}

/// A database whose pages are smaller than the direct-I/O alignment (here:
/// 4 KiB asked for a database of 1 KiB pages) takes the page cache, its runs
/// starting and ending anywhere: it lands whole.
#[test]
fn pages_smaller_than_the_direct_io_alignment_take_the_page_cache() {
    let t = tempfile::tempdir().unwrap();
    let (root, src) = (t.path().join("root"), t.path().join("src.db"));
    std::fs::create_dir(&root).unwrap();
    let c = Connection::open(&src).unwrap();
    c.execute_batch(
        "PRAGMA page_size=1024; CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 200)
         INSERT INTO t SELECT i, hex(randomblob(100)) FROM n;",
    )
    .unwrap();
    drop(c);
    let table = sqlite::read_hashes(&src).unwrap().unwrap();
    let image = image_of(&src);
    assert_eq!(table.page_size, 1024);
    let r = Replica::open(&root).unwrap();
    let rel = RelPath::new(b"app.db").unwrap();
    let n = table.hashes.len();
    let mut staged = r.stage_db(&rel, None, 1024, n as u32).unwrap();
    super::super::direct::TEST_ALIGN.with(|a| a.set(4096));
    // runs of 4, 4, 3 and 5 pages: the first two of each four on 4 KiB
    // boundaries, the others starting or ending off one
    let mut first = 1;
    for len in [4, 4, 3, 5].iter().cycle() {
        if first > n {
            break;
        }
        let end = (first + len - 1).min(n);
        staged
            .run(first as u32, &image[(first - 1) * 1024..end * 1024])
            .unwrap();
        first = end + 1;
    }
    super::super::direct::TEST_ALIGN.with(|a| a.set(1));
    assert!(
        matches!(staged.direct, Some(None)),
        "pages smaller than the alignment written directly"
    );
    commit_whole(staged, &src, &table.hash);
    r.flush().unwrap();
    assert_eq!(std::fs::read(root.join("app.db")).unwrap(), image);
    assert_eq!(sqlite::integrity(&root.join("app.db")).unwrap(), "ok");
}

/// An update of a database that is not in the page cache has the pages it
/// overwrites read ahead, all at once, before SQLite's pager reads them one
/// after another: each run of the staged page numbers, and nothing else.
#[test]
fn the_pages_an_update_overwrites_are_read_ahead() {
    use super::super::direct::{prefetch, resident};
    let t = tempfile::tempdir().unwrap();
    let db = t.path().join("app.db");
    std::fs::write(&db, vec![7u8; 64 * 4096]).unwrap();
    let f = std::fs::File::open(&db).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    if resident(&f) != 0 {
        eprintln!(
            "{} keeps its pages cached: nothing to read ahead",
            t.path().display()
        );
        return;
    }
    let mut records = Vec::new();
    for pgno in [3u32, 4, 5, 10] {
        records.extend(pgno.to_be_bytes());
        records.extend(4096u32.to_be_bytes());
        records.extend([1u8; 4096]);
    }
    let staged = t.path().join("staged");
    std::fs::write(&staged, records).unwrap();
    assert_eq!(prefetch(&std::fs::File::open(&staged).unwrap(), &f), 2);
    let t0 = std::time::Instant::now();
    while resident(&f) < 4 && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(resident(&f), 4, "the pages read ahead");
}
