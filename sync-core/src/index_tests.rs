//! Tests of the persistent hash index.

use super::*;

fn stamp(size: u64) -> Stamp {
    Stamp {
        dev: 1,
        ino: 2,
        size,
        mtime_ns: 10,
        ctime_ns: 20,
    }
}

/// [`HashIndex::remember_stamps`] of files `(path, stamp, bare)`: a scan's
/// entries (with an xattr unless bare) and their stamps beside them.
fn remember(ix: &mut HashIndex, files: &[(&RelPath, Stamp, bool)], now: i128) {
    let entries: Vec<proto::Entry> = (files.iter())
        .map(|(p, s, bare)| proto::Entry {
            path: (*p).clone(),
            kind: proto::Kind::File {
                size: s.size,
                hash: [0; 32],
            },
            meta: proto::Meta {
                xattrs: (!bare)
                    .then(|| proto::Xattr {
                        name: b"user.x".to_vec(),
                        value: Vec::new(),
                    })
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
        })
        .collect();
    let stamps: Vec<Option<Stamp>> = files.iter().map(|f| Some(f.1)).collect();
    ix.remember_stamps(&entries, &stamps, now);
}

#[test]
fn persists_and_matches_stamps() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("index.db");
    let p = RelPath::new(&b"a/b"[..]).unwrap();
    let now = 100 * RACY_NS;
    {
        let mut ix = HashIndex::open(&db).unwrap();
        ix.record(&p, stamp(5), [9; 32], now);
        ix.save().unwrap();
    }
    let ix = HashIndex::open(&db).unwrap();
    assert_eq!(ix.lookup(&p, &stamp(5)), Some([9; 32]));
    assert_eq!(ix.lookup(&p, &stamp(6)), None);
}

/// Rows are kept compact (80 bytes: times in 64-bit nanoseconds), and a
/// stamp those cannot hold is not remembered, never matched by another.
#[test]
fn rows_are_compact_and_stamps_past_them_are_not_remembered() {
    assert!(
        std::mem::size_of::<Row>() <= 80,
        "{}",
        std::mem::size_of::<Row>()
    );
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("index.db");
    let (p, q) = (
        RelPath::new(&b"far"[..]).unwrap(),
        RelPath::new(&b"near"[..]).unwrap(),
    );
    let far = Stamp {
        mtime_ns: i128::from(i64::MAX) + 1,
        ..stamp(5)
    };
    let wrapped = Stamp {
        mtime_ns: i128::from(i64::MIN),
        ..stamp(5)
    };
    let now = i128::from(i64::MAX) * 4;
    {
        let mut ix = HashIndex::open(&db).unwrap();
        ix.record(&p, far, [1; 32], now);
        ix.record(&q, stamp(5), [2; 32], now);
        assert_eq!(ix.lookup(&p, &far), None);
        assert_eq!(ix.lookup(&p, &wrapped), None);
        ix.save().unwrap();
    }
    let mut stamps = HashIndex::in_memory();
    remember(&mut stamps, &[(&p, far, true)], now);
    assert!(!stamps.bare(&p, &far) && stamps.is_empty());
    let ix = HashIndex::open(&db).unwrap();
    assert_eq!(ix.lookup(&p, &far), None);
    assert_eq!(ix.lookup(&q, &stamp(5)), Some([2; 32]));
}

#[test]
fn damaged_rows_are_only_cache_misses() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("index.db");
    let p = RelPath::new(&b"good"[..]).unwrap();
    {
        let mut ix = HashIndex::open(&db).unwrap();
        ix.record(&p, stamp(5), [9; 32], 100 * RACY_NS);
        ix.save().unwrap();
    }
    let conn = rusqlite::Connection::open(&db).unwrap();
    let ok = [9u8; 32].to_vec();
    for (path, dev, mtime, hash) in [
        (
            &b"short-hash"[..],
            rusqlite::types::Value::Integer(1),
            "10",
            vec![1u8; 3],
        ),
        (
            b"bad-mtime",
            rusqlite::types::Value::Integer(1),
            "x",
            ok.clone(),
        ),
        (
            b"text-dev",
            rusqlite::types::Value::Text("abc".into()),
            "10",
            ok.clone(),
        ),
    ] {
        conn.execute(
            "INSERT INTO files VALUES (?1, ?2, 2, 5, ?3, '20', ?4, 0)",
            rusqlite::params![path, dev, mtime, hash],
        )
        .unwrap();
    }
    drop(conn);
    let ix = HashIndex::open(&db).unwrap();
    assert_eq!(ix.len(), 1);
    assert_eq!(ix.lookup(&p, &stamp(5)), Some([9; 32]));
}

/// Which files had no xattrs survives a save, and an index written
/// before the column existed opens with its rows read as not bare.
#[test]
fn bare_files_persist_and_an_old_index_opens() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("index.db");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE files (path BLOB PRIMARY KEY, dev INTEGER, ino INTEGER,
            size INTEGER, mtime_ns TEXT, ctime_ns TEXT, hash BLOB) WITHOUT ROWID;
         INSERT INTO files VALUES (x'6f6c64', 1, 2, 5, '10', '20', zeroblob(32));",
    )
    .unwrap();
    drop(conn);
    let (old, p) = (
        RelPath::new(&b"old"[..]).unwrap(),
        RelPath::new(&b"f"[..]).unwrap(),
    );
    let file = |path: &RelPath| proto::Entry {
        path: path.clone(),
        kind: proto::Kind::File {
            size: 5,
            hash: [0; 32],
        },
        meta: proto::Meta::default(),
    };
    let manifest = crate::Manifest {
        entries: vec![file(&p), file(&old)],
    };
    {
        let mut ix = HashIndex::open(&db).unwrap();
        assert_eq!(ix.lookup(&old, &stamp(5)), Some([0; 32]));
        assert!(!ix.bare(&old, &stamp(5)), "an old row read as bare");
        ix.remember_scan(
            vec![(p.clone(), stamp(5), [0; 32])],
            &manifest,
            100 * RACY_NS,
        );
        assert!(ix.bare(&p, &stamp(5)) && ix.bare(&old, &stamp(5)));
        assert!(!ix.bare(&p, &stamp(6)), "bare at another stamp");
        ix.save().unwrap();
    }
    let ix = HashIndex::open(&db).unwrap();
    assert!(ix.bare(&p, &stamp(5)) && ix.bare(&old, &stamp(5)));
}

/// A scan forgets the rows of paths it no longer has as files: gone, or
/// now another kind of entry.
#[test]
fn a_scan_forgets_what_is_no_longer_a_file() {
    let mut ix = HashIndex::in_memory();
    let now = 100 * RACY_NS;
    let [a, b, c] = ["a", "b", "c"].map(|p| RelPath::new(p.as_bytes()).unwrap());
    for p in [&a, &b, &c] {
        ix.record(p, stamp(5), [0; 32], now);
    }
    let entry = |path: &RelPath, kind| proto::Entry {
        path: path.clone(),
        kind,
        meta: proto::Meta::default(),
    };
    let file = proto::Kind::File {
        size: 5,
        hash: [0; 32],
    };
    let m = crate::Manifest {
        entries: vec![entry(&a, file.clone()), entry(&b, proto::Kind::Dir)],
    };
    ix.remember_scan(vec![], &m, now);
    assert_eq!(ix.len(), 1);
    assert_eq!(ix.lookup(&a, &stamp(5)), Some([0; 32]));
    let all = crate::Manifest {
        entries: vec![entry(&a, file)],
    };
    ix.remember_scan(vec![], &all, now);
    assert_eq!(ix.len(), 1, "a full match forgot a row");
}

/// A scan that does not hash remembers stamps and bare files but gives
/// no hash, skips racily clean files and forgets what it no longer saw.
#[test]
fn an_unhashed_scan_remembers_stamps_and_no_hashes() {
    let mut ix = HashIndex::in_memory();
    let now = 100 * RACY_NS;
    let [a, b, c] = ["a", "b", "c"].map(|p| RelPath::new(p.as_bytes()).unwrap());
    let young = Stamp {
        ctime_ns: now - 1,
        ..stamp(5)
    };
    ix.record(&a, stamp(5), [7; 32], now);
    remember(
        &mut ix,
        &[
            (&a, stamp(5), true),
            (&b, stamp(5), false),
            (&c, young, true),
        ],
        now,
    );
    assert_eq!(ix.len(), 1, "only the bare file that is not racily clean");
    assert!(ix.bare(&a, &stamp(5)) && !ix.bare(&b, &stamp(5)) && !ix.bare(&c, &young));
    assert!(!ix.bare(&a, &stamp(6)), "another stamp of the same path");
    assert!(!ix.bare(&b, &stamp(5)) && !ix.bare(&c, &stamp(5)));
    assert_eq!(
        ix.lookup(&a, &stamp(5)),
        None,
        "a hash from a scan that hashed nothing"
    );
    remember(&mut ix, &[(&b, stamp(6), true)], now);
    assert_eq!(ix.len(), 1);
    assert!(ix.bare(&b, &stamp(6)) && !ix.bare(&a, &stamp(5)));
}

#[test]
fn racily_clean_files_are_not_cached() {
    let mut ix = HashIndex::in_memory();
    let p = RelPath::new(&b"f"[..]).unwrap();
    ix.record(&p, stamp(1), [1; 32], 21);
    assert_eq!(ix.lookup(&p, &stamp(1)), None);
}

/// What changed since the last save is written, and only that: a path
/// forgotten and recorded again before a save keeps its new row; one
/// forgotten stays gone.
#[test]
fn a_save_writes_changed_and_forgotten_rows_in_any_order() {
    let d = tempfile::tempdir().unwrap();
    let db = d.path().join("index.db");
    let [a, b, c] = ["a", "b", "c"].map(|p| RelPath::new(p.as_bytes()).unwrap());
    let now = 100 * RACY_NS;
    {
        let mut ix = HashIndex::open(&db).unwrap();
        for (p, h) in [(&a, 1), (&b, 2), (&c, 3)] {
            ix.record(p, stamp(5), [h; 32], now);
        }
        ix.save().unwrap();
        ix.forget(&a);
        ix.record(&a, stamp(6), [4; 32], now);
        ix.forget(&b);
        ix.save().unwrap();
        ix.save().unwrap();
    }
    let mut ix = HashIndex::open(&db).unwrap();
    assert_eq!(ix.lookup(&a, &stamp(6)), Some([4; 32]));
    assert_eq!(ix.lookup(&a, &stamp(5)), None);
    assert_eq!(ix.lookup(&b, &stamp(5)), None);
    assert_eq!(ix.lookup(&c, &stamp(5)), Some([3; 32]));
    assert_eq!(ix.len(), 2);
    // More rows changed than are listed by key: the rows are sorted in
    // place and those flagged written; then one of them (a few, listed),
    // and one forgotten.
    let n = FEW + 10;
    let many: Vec<RelPath> = (0..n)
        .map(|i| RelPath::new(format!("m{}", n - i).into_bytes()).unwrap())
        .collect();
    for (i, p) in many.iter().enumerate() {
        ix.record(p, stamp(i as u64), [i as u8; 32], now);
    }
    assert!(ix.few.is_none(), "more than FEW rows were listed");
    ix.save().unwrap();
    ix.record(&many[7], stamp(99), [99; 32], now);
    assert_eq!(ix.few.as_ref().map(Vec::len), Some(1));
    ix.forget(&many[8]);
    ix.save().unwrap();
    // the same hash at the same stamp changes nothing
    ix.record(&many[9], stamp(9), [9; 32], now);
    assert_eq!((ix.dirty, ix.few.as_ref().map(Vec::len)), (0, Some(0)));
    drop(ix);
    let ix = HashIndex::open(&db).unwrap();
    assert_eq!(ix.len(), 2 + n - 1);
    for (i, p) in many.iter().enumerate() {
        let want = match i {
            7 => ix.lookup(p, &stamp(99)) == Some([99; 32]),
            8 => ix.lookup(p, &stamp(8)).is_none(),
            _ => ix.lookup(p, &stamp(i as u64)) == Some([i as u8; 32]),
        };
        assert!(want, "{p}");
    }
    assert_eq!(ix.lookup(&c, &stamp(5)), Some([3; 32]));
}
