//! Batch expansion, hot-file deferral and debouncing, with the clock passed in.

use super::partial::{Expanded, HOT_SIZE, MAX_DEFER, expand, still_hot};
use super::partial::{debounce_over, fold_round, settled};
use super::*;

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).expect("a valid test path")
}

fn file(path: &str) -> Entry {
    Entry {
        path: p(path),
        kind: Kind::File {
            size: 1,
            hash: [0; 32],
        },
        meta: proto::Meta::default(),
    }
}

fn known(paths: &[&str]) -> Known {
    paths.iter().map(|s| (p(s), file(s))).collect()
}

fn set(paths: &[&str]) -> BTreeSet<RelPath> {
    paths.iter().map(|s| p(s)).collect()
}

#[test]
fn a_changed_side_file_stands_for_its_database_and_parents_join() {
    let batch = Batch {
        dirty: set(&["d/app.db-wal"]),
        ..Default::default()
    };
    let ex = expand(batch, &Known::new(), &ScanOptions::default());
    // one level of parents: the changed paths' own
    assert_eq!(ex.paths, set(&["d", "d/app.db", "d/app.db-wal"]));
    assert!(ex.forced.is_empty() && ex.renamed.is_empty());
}

#[test]
fn renames_are_kept_only_from_what_the_replica_holds() {
    let batch = Batch {
        renames: vec![(p("a"), p("b")), (p("x"), p("y"))],
        ..Default::default()
    };
    let ex = expand(batch, &known(&["a"]), &ScanOptions::default());
    assert_eq!(ex.renamed, vec![(p("a"), p("b"))]);
    assert_eq!(ex.forced, set(&["a", "b"]));
    assert_eq!(ex.targets, vec![p("b")]);
}

#[test]
fn a_chain_of_renames_through_a_temp_name_is_kept() {
    // mv a t; mv b a; mv t b
    let batch = Batch {
        renames: vec![(p("a"), p("t")), (p("b"), p("a")), (p("t"), p("b"))],
        ..Default::default()
    };
    let ex = expand(batch, &known(&["a", "b"]), &ScanOptions::default());
    assert_eq!(ex.renamed.len(), 3, "{ex:?}");
}

#[test]
fn a_database_rename_becomes_both_names_sent_as_they_stand() {
    let mut k = known(&[]);
    let mut db = file("app.db");
    db.kind = Kind::Database {
        page_size: 4096,
        pages: 1,
        hash: [0; 32],
    };
    k.insert(p("app.db"), db);
    let batch = Batch {
        renames: vec![(p("new.db"), p("app.db"))],
        ..Default::default()
    };
    let ex = expand(batch, &k, &ScanOptions::default());
    assert!(ex.renamed.is_empty());
    assert_eq!(ex.forced, set(&["app.db"]));
    assert!(ex.paths.contains(&p("new.db")) && ex.paths.contains(&p("app.db")));
    assert_eq!(Expanded::default().paths.len(), 0);
}

#[test]
fn a_big_file_written_just_now_is_hot_until_the_deferral_ends() {
    let t = tempfile::tempdir().expect("a temp dir");
    let f = std::fs::File::create(t.path().join("big")).expect("create");
    f.set_len(HOT_SIZE).expect("size");
    let now = Instant::now();
    let now_ns = sync_core::scan::now_ns();
    assert!(still_hot(t.path(), &p("big"), None, now, now_ns));
    // held back since `now`: still hot just before the bound, not at it
    let later = now + MAX_DEFER;
    assert!(still_hot(
        t.path(),
        &p("big"),
        Some(&now),
        later - Duration::from_millis(1),
        now_ns
    ));
    assert!(!still_hot(t.path(), &p("big"), Some(&now), later, now_ns));
    // written a second ago: cold
    assert!(!still_hot(
        t.path(),
        &p("big"),
        None,
        now,
        now_ns + 1_000_000_000
    ));
    // small files are never held back
    std::fs::write(t.path().join("small"), b"x").expect("write");
    assert!(!still_hot(t.path(), &p("small"), None, now, now_ns));
    assert!(!still_hot(t.path(), &p("gone"), None, now, now_ns));
}

#[test]
fn a_batch_collects_for_at_most_100_ms() {
    let start = Instant::now();
    assert!(!debounce_over(start, start));
    assert!(!debounce_over(start, start + Duration::from_millis(99)));
    assert!(debounce_over(start, start + Duration::from_millis(100)));
}

/// A small write beside a large file being written ships once only the large
/// file's events come, not after the 100 ms they would keep the batch open; a
/// batch of held-back files alone waits, and a file of the batch's own still
/// being written (or a burst still arriving) goes on collecting.
#[test]
fn a_batch_of_its_own_is_not_held_open_by_held_back_files() {
    assert!(
        settled(true, Some(false), true),
        "small write beside a large one"
    );
    assert!(
        !settled(true, Some(false), false),
        "a held-back large file alone"
    );
    assert!(
        !settled(true, Some(true), true),
        "its own files still written"
    );
    assert!(!settled(true, None, true), "a wake with no event");
    assert!(!settled(false, Some(false), true), "before any wait");
}

#[test]
fn an_applied_round_folds_into_what_the_replica_holds() {
    let mut k = known(&["a", "d", "d/x", "d/y", "old"]);
    let round = Round {
        entries: Arc::new(vec![file("n"), file("d")]),
        deleted: vec![p("old")],
        renamed: vec![(p("a"), p("b"))],
        ..Default::default()
    };
    fold_round(&mut k, &round);
    let names: Vec<String> = k.keys().map(ToString::to_string).collect();
    // d became a file: what was below it is gone; a moved away, b is re-sent
    assert_eq!(names, ["d", "n"]);
}

/// A tree at `root` with `dirs` and the replica's view of `rename` kept.
fn renamed_dir_round(root: &Path, k: &Known, dirty: &[&str], rename: (&str, &str)) -> Round {
    let batch = Batch {
        dirty: set(dirty),
        renames: vec![(p(rename.0), p(rename.1))],
        ..Default::default()
    };
    let index = Mutex::new(HashIndex::in_memory());
    let live = Arc::new(Mutex::new(LiveSet::new(root, Duration::from_secs(1))));
    let mut stats = CutStats::default();
    let deferred = Default::default();
    let opts = ScanOptions::default();
    let lane = (&mut stats, &Default::default(), &mut Vec::new());
    let (round, held) =
        partial_round(root, &opts, &index, k, batch, &deferred, &live, lane).expect("a round");
    assert!(held.is_empty());
    round.expect("a partial round")
}

#[test]
fn a_renamed_directory_loses_what_was_deleted_below_it_in_the_same_batch() {
    // mkdir -p gone/sub && echo z > gone/sub/z   (shipped: the replica holds it)
    // mv gone moved-away && rm moved-away/sub/z  (one batch)
    let t = tempfile::tempdir().expect("a temp dir");
    let root = t.path();
    std::fs::create_dir_all(root.join("moved-away/sub")).expect("mkdir");
    let mut k = known(&["gone/sub/z"]);
    for d in ["", "gone", "gone/sub"] {
        let mut e = file(d);
        e.kind = Kind::Dir;
        k.insert(p(d), e);
    }
    let round = renamed_dir_round(
        root,
        &k,
        &["moved-away/sub/z", "moved-away/sub"],
        ("gone", "moved-away"),
    );
    assert_eq!(round.renamed, vec![(p("gone"), p("moved-away"))]);
    assert!(
        round.deleted.contains(&p("moved-away/sub/z")),
        "the rename brings z along on the replica: {:?}",
        round.deleted
    );
}

#[test]
fn a_directory_moved_into_a_new_one_loses_what_was_deleted_below_it() {
    // the replica holds a/x/z; mkdir n && mv a/x n/x && rm n/x/z
    let t = tempfile::tempdir().expect("a temp dir");
    let root = t.path();
    std::fs::create_dir_all(root.join("n/x")).expect("mkdir");
    std::fs::create_dir_all(root.join("a")).expect("mkdir");
    let mut k = known(&["a/x/z"]);
    for d in ["", "a", "a/x"] {
        let mut e = file(d);
        e.kind = Kind::Dir;
        k.insert(p(d), e);
    }
    let round = renamed_dir_round(root, &k, &["n", "n/x/z"], ("a/x", "n/x"));
    assert!(round.deleted.contains(&p("n/x/z")), "{:?}", round.deleted);
    assert!(!round.deleted.contains(&p("n/x")), "{:?}", round.deleted);
}

/// A database written just now that no cut opened yet is neither cut nor
/// shipped as a file: the round leaves it out and holds it for later (while
/// another process holds it open: one nobody holds is cut at once).
#[test]
fn a_database_still_being_written_is_held_not_shipped() {
    use std::os::unix::fs::MetadataExt as _;
    let t = tempfile::tempdir().expect("a temp dir");
    let root = t.path();
    let c = rusqlite::Connection::open(root.join("new.db")).expect("open");
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .expect("wal");
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .expect("write");
    drop(c);
    // Its application (another process) holds it open, as while building it.
    let mut holder = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 3<new.db; exec sleep 60")
        .current_dir(root)
        .spawn()
        .expect("a holder");
    let id = std::fs::metadata(root.join("new.db")).expect("new.db");
    let id = (id.dev(), id.ino());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sync_core::holders::holders_of_ids(&[id])
        .expect("/proc")
        .iter()
        .any(|h| h.pid == holder.id())
    {
        assert!(std::time::Instant::now() < deadline, "never held");
        std::thread::sleep(Duration::from_millis(10));
    }
    let batch = Batch {
        dirty: set(&["new.db"]),
        created: set(&["new.db"]),
        ..Default::default()
    };
    let index = Mutex::new(HashIndex::in_memory());
    let hour = Duration::from_secs(3600);
    let live = LiveSet::new(root, Duration::from_secs(1)).with_settle(hour);
    let live = Arc::new(Mutex::new(live));
    let mut stats = CutStats::default();
    let opts = ScanOptions {
        databases: Some(Arc::new(sync_core::scan::DbDetect::default())),
        ..Default::default()
    };
    let (round, held) = partial_round(
        root,
        &opts,
        &index,
        &Known::new(),
        batch,
        &Default::default(),
        &live,
        (&mut stats, &Default::default(), &mut Vec::new()),
    )
    .expect("a round");
    assert_eq!(held, [p("new.db")]);
    let round = round.expect("a partial round");
    assert!(
        round.entries.iter().all(|e| e.path != p("new.db")),
        "shipped: {:?}",
        round.entries
    );
    let _ = holder.kill();
    let _ = holder.wait();
}
