//! The engine's pure steps: the round checks, the exclusion map, splitting
//! inline content from pulls, and the loopback content source.

use super::content::{ContentSource, Loopback, pull, split_inline};
use super::pair::rel;
use super::*;
use crate::plan::Fetch;
use std::path::Path;

fn file(path: &str, data: &[u8]) -> Entry {
    Entry {
        path: rel(path),
        kind: Kind::File {
            size: data.len() as u64,
            hash: *blake3::hash(data).as_bytes(),
        },
        meta: proto::Meta::default(),
    }
}

fn partial(entries: Vec<Entry>) -> Round {
    Round {
        src: Manifest { entries },
        ..Round::default()
    }
}

#[test]
fn a_sorted_partial_round_passes_the_checks() {
    let r = partial(vec![file("a", b""), file("b", b"")]);
    assert!(check(&r, Path::new("/srv")).is_ok());
}

#[test]
fn duplicate_paths_count_as_unsorted() {
    let r = partial(vec![file("a", b""), file("a", b"")]);
    assert!(matches!(check(&r, Path::new("/srv")), Err(RoundError::Unsorted(p)) if p == rel("a")));
}

#[test]
fn reserved_names_are_refused_in_renames_too() {
    let mut r = partial(Vec::new());
    r.renamed = vec![(rel("a"), rel("d/.understudy.tmp.1"))];
    assert!(matches!(
        check(&r, Path::new("/srv")),
        Err(RoundError::Reserved(_))
    ));
}

#[test]
fn a_full_round_is_checked_as_a_tree_not_for_order_alone() {
    let mut r = partial(vec![file("a", b"")]);
    r.full = true;
    let e = check(&r, Path::new("/srv")).expect_err("no root entry");
    assert!(matches!(e, RoundError::Structure(_)), "{e}");
}

#[test]
fn the_path_bound_depends_on_the_root() {
    let long = rel(&vec!["x".repeat(200); 20].join("/"));
    let r = partial(vec![Entry {
        path: long,
        ..file("x", b"")
    }]);
    assert!(check(&r, Path::new("/")).is_ok(), "4019 bytes under /");
    let deep = format!("/{}", "r".repeat(100));
    let e = check(&r, Path::new(&deep)).expect_err("too long under a deep root");
    assert!(e.to_string().contains("at most 4095"), "{e}");
}

#[test]
fn a_partial_round_always_compares_content() {
    let mut r = partial(Vec::new());
    assert!(r.compares_content());
    r.full = true;
    assert!(!r.compares_content());
    r.checksum = true;
    assert!(r.compares_content());
}

#[test]
fn excluded_entries_are_dropped_and_indexes_map_back() {
    let src = Manifest {
        entries: vec![file("a", b""), file("b.tmp", b""), file("c", b"")],
    };
    let filter = crate::filter::Filter::new(&["*.tmp".to_string()]).expect("a filter");
    let (kept, planned) = keep(src, &filter);
    assert_eq!(kept, [0, 2]);
    let names: Vec<String> = planned.entries.iter().map(|e| e.path.to_string()).collect();
    assert_eq!(names, ["a", "c"]);
}

#[test]
fn inline_content_is_matched_by_round_index_and_the_rest_is_pulled() {
    let plan = crate::plan::Plan {
        fetch: vec![
            Fetch {
                index: 0,
                basis: false,
            },
            Fetch {
                index: 1,
                basis: true,
            },
        ],
        ..Default::default()
    };
    // planned 0 is round entry 0, planned 1 is round entry 2
    let mut inline: HashMap<u64, Vec<u8>> = [(2, b"two".to_vec()), (9, b"x".to_vec())].into();
    let (inlined, pulled) = split_inline(&plan, &[0, 2], &mut inline);
    assert_eq!(inlined, vec![(1, b"two".to_vec())]);
    assert_eq!(pulled.iter().map(|f| f.index).collect::<Vec<_>>(), [0]);
    assert!(inline.contains_key(&9), "what no fetch asked for stays");
}

#[test]
fn the_loopback_serves_only_what_matches_the_round() {
    let t = tempfile::tempdir().expect("a temp dir");
    std::fs::write(t.path().join("f"), b"content").expect("write");
    let l = Loopback { root: t.path() };
    assert_eq!(
        l.content(0, &file("f", b"content")),
        Some(b"content".to_vec())
    );
    assert_eq!(l.content(0, &file("f", b"older")), None, "changed since");
    assert_eq!(l.content(0, &file("gone", b"")), None);
    std::os::unix::fs::symlink("f", t.path().join("s")).expect("symlink");
    assert_eq!(
        l.content(0, &file("s", b"content")),
        None,
        "never through a link"
    );
    let planned = Manifest {
        entries: vec![file("f", b"content"), file("gone", b"")],
    };
    let fetches = [
        Fetch {
            index: 0,
            basis: false,
        },
        Fetch {
            index: 1,
            basis: false,
        },
    ];
    assert_eq!(
        pull(&l, &planned, &[0, 1], &fetches),
        vec![(0, b"content".to_vec())]
    );
}

#[test]
fn verified_figures_join_the_summary() {
    let mut s = ApplySummary::default();
    let v = Verified {
        root: [3; 32],
        differences: vec!["after the cut: x".into()],
        held_by: vec![(rel("app.db"), "pid 7".into())],
    };
    add_verified(&mut s, v.clone(), false);
    assert_eq!(s.root_hash, Some([3; 32]));
    assert_eq!(s.warnings, ["held open on the replica: app.db: pid 7"]);
    let held = proto::HeldDb {
        path: rel("app.db"),
        holders: "pid 7".into(),
    };
    assert_eq!(s.held, [held]);
    add_verified(&mut s, v, true);
    assert_eq!(s.held.len(), 1, "named once");
    assert!(s.warnings.iter().any(|w| w.starts_with("after the cut")));
}

#[test]
fn kept_directories_leave_the_replica_manifest() {
    let own = Manifest {
        entries: vec![
            Entry {
                path: RelPath::root(),
                kind: Kind::Dir,
                meta: proto::Meta::default(),
            },
            Entry {
                path: rel("empty"),
                kind: Kind::Dir,
                meta: proto::Meta::default(),
            },
            Entry {
                path: rel("keep"),
                kind: Kind::Dir,
                meta: proto::Meta::default(),
            },
            file("keep/x.cache", b""),
        ],
    };
    let planned = Manifest {
        entries: vec![Entry {
            path: RelPath::root(),
            kind: Kind::Dir,
            meta: proto::Meta::default(),
        }],
    };
    let out = without_kept_dirs(own, &planned);
    let names: Vec<String> = out.entries.iter().map(|e| e.path.to_string()).collect();
    assert_eq!(names, [".", "keep", "keep/x.cache"]);
}

/// Directories' metadata goes depth by depth, the deepest first: every
/// directory comes after all that lies below it, whatever order the plan
/// listed them in.
#[test]
fn directories_are_finished_after_everything_below_them() {
    let dir = |p: &str| Entry {
        path: rel(p),
        kind: Kind::Dir,
        meta: proto::Meta::default(),
    };
    let s = Manifest {
        entries: std::iter::once(Entry {
            path: RelPath::root(),
            ..dir("a")
        })
        .chain(
            ["a", "a/b", "a/b/c", "a/d", "e", "e/f"]
                .into_iter()
                .map(dir),
        )
        .collect(),
    };
    // as the plan lists them (deepest first by path order), and shuffled
    for dirs in [vec![6, 5, 4, 3, 2, 1, 0], vec![0, 1, 5, 2, 6, 4, 3]] {
        let order: Vec<usize> = deepest_first(&s, &dirs)
            .into_iter()
            .map(|(_, i)| i)
            .collect();
        for (at, &i) in order.iter().enumerate() {
            for &j in &order[at + 1..] {
                assert!(
                    !s.entries[j].path.starts_with(&s.entries[i].path),
                    "{} before {} below it",
                    s.entries[i].path,
                    s.entries[j].path
                );
            }
        }
        assert_eq!(order.len(), dirs.len());
    }
}

/// The plan's directories are made depth by depth: a parent before its
/// children even when the plan lists the children first (made all at once on
/// every core, a child would meet no parent).
#[test]
fn directories_are_made_after_their_parents_whatever_the_order() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::open(d.path()).unwrap();
    let dir = |p: &str| Entry {
        path: rel(p),
        kind: Kind::Dir,
        meta: proto::Meta::default(),
    };
    let paths = ["a/b/c/d", "a/b/c", "a/b", "a", "e/f", "e", "a/g"];
    let s = Manifest {
        entries: paths.into_iter().map(dir).collect(),
    };
    let dirs: Vec<usize> = (0..paths.len()).collect();
    make_dirs(&r, &s, &dirs).unwrap();
    for p in paths {
        assert!(d.path().join(p).is_dir(), "{p} not made");
    }
}

/// A round's databases need only their own directories to begin their
/// transfer: `make_early` does the deletions and makes those (a prefix of a
/// name is not a parent), `make_rest` the others and the other entries.
#[test]
fn a_database_waits_only_for_its_own_directories() {
    let d = tempfile::tempdir().unwrap();
    let r = Replica::open(d.path()).unwrap();
    std::fs::write(d.path().join("gone"), b"old").unwrap();
    let dir = |p: &str| Entry {
        path: rel(p),
        kind: Kind::Dir,
        meta: proto::Meta::default(),
    };
    let link = Entry {
        path: rel("l"),
        kind: Kind::Symlink {
            target: b"a".to_vec(),
        },
        meta: proto::Meta::default(),
    };
    let s = Manifest {
        entries: vec![
            dir("a"),
            dir("a/b"),
            file("a/b/app.db", b""),
            dir("a/bb"),
            dir("c"),
            link,
        ],
    };
    let mut plan = Plan {
        delete: vec![rel("gone")],
        mkdir: vec![0, 1, 3, 4],
        dbs: vec![2],
        create: vec![5],
        ..Plan::default()
    };
    let mut sum = ApplySummary::default();
    make_early(&r, &s, &mut plan, &Filter::default(), &mut sum).unwrap();
    assert!(!d.path().join("gone").exists(), "deletions come first");
    assert!(d.path().join("a/b").is_dir());
    for p in ["a/bb", "c", "l"] {
        assert!(
            d.path().join(p).symlink_metadata().is_err(),
            "{p} made early"
        );
    }
    assert_eq!(plan.mkdir, [3, 4]);
    assert_eq!(make_rest(&r, &s, &plan.mkdir, &plan.create).unwrap(), 3);
    for p in ["a/bb", "c"] {
        assert!(d.path().join(p).is_dir(), "{p} not made");
    }
    assert!(d.path().join("l").is_symlink());
    assert_eq!(sum.others_created, 2);
}
