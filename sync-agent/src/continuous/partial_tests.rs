//! Batch expansion, hot-file deferral and debouncing, with the clock passed in.

use super::drive::{debounce_over, fold_round};
use super::partial::{Expanded, HOT_SIZE, MAX_DEFER, expand, still_hot};
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
