//! Every bound `Message::validate` checks, one rule a test: the message at
//! the bound passes, one past it is refused with a text naming the field.

use crate::*;

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).expect("a valid test path")
}

fn entry(path: &str, kind: Kind) -> Entry {
    Entry {
        path: p(path),
        kind,
        meta: Meta::default(),
    }
}

fn file(path: &str) -> Entry {
    entry(
        path,
        Kind::File {
            size: 0,
            hash: [0; 32],
        },
    )
}

fn refused(m: &Message, needle: &str) {
    let e = m.validate().expect_err("refused").to_string();
    assert!(e.contains(needle), "{e} lacks {needle:?}");
}

fn one(e: Entry) -> Message {
    Message::Manifest(vec![e])
}

#[test]
fn a_hello_folder_name_is_at_most_255_bytes() {
    let mut h = Hello::new(Role::Source, &"f".repeat(255));
    assert!(Message::Hello(h.clone()).validate().is_ok());
    h.folder.push('f');
    refused(&Message::Hello(h), "folder name");
}

#[test]
fn a_hello_software_name_is_bounded() {
    let mut h = Hello::new(Role::Source, "f");
    h.software = "s".repeat(MAX_TEXT + 1);
    refused(&Message::Hello(h), "software name");
}

#[test]
fn error_texts_are_bounded() {
    let m = |n| Message::Error {
        code: ErrorCode::Other,
        message: "e".repeat(n),
    };
    assert!(m(MAX_TEXT).validate().is_ok());
    refused(&m(MAX_TEXT + 1), "error message");
}

#[test]
fn manifest_batches_are_bounded() {
    let batch = |n| Message::Manifest((0..n).map(|i| file(&format!("f{i}"))).collect());
    assert!(batch(MAX_ENTRIES_PER_BATCH).validate().is_ok());
    refused(&batch(MAX_ENTRIES_PER_BATCH + 1), "manifest batch");
}

#[test]
fn the_root_is_never_deleted() {
    refused(
        &Message::Deleted(vec![RelPath::root()]),
        "deletion of the root",
    );
    assert!(Message::Deleted(vec![p("a")]).validate().is_ok());
}

#[test]
fn deletion_batches_are_bounded() {
    let m = Message::Deleted(vec![p("a"); MAX_ENTRIES_PER_BATCH + 1]);
    refused(&m, "deletions in one batch");
}

#[test]
fn renames_of_into_or_onto_the_root_or_into_themselves_are_refused() {
    for (a, b) in [
        (RelPath::root(), p("a")),
        (p("a"), RelPath::root()),
        (p("a"), p("a/b")),
        (p("a"), p("a")),
    ] {
        refused(&Message::Renamed(vec![(a, b)]), "rename");
    }
    assert!(Message::Renamed(vec![(p("a"), p("ab"))]).validate().is_ok());
}

#[test]
fn rename_batches_are_bounded() {
    let m = Message::Renamed(vec![(p("a"), p("b")); MAX_ENTRIES_PER_BATCH + 1]);
    refused(&m, "renames in one batch");
}

#[test]
fn inline_content_is_at_most_64_kib() {
    let m = |n| Message::Inline {
        index: 0,
        data: vec![0; n],
    };
    assert!(m(MAX_INLINE).validate().is_ok());
    refused(&m(MAX_INLINE + 1), "inline content");
}

#[test]
fn page_hash_batches_are_bounded_and_name_a_valid_page_size() {
    let m = |page_size, n| Message::DbHashes {
        page_size,
        hashes: vec![[0; 32]; n],
        last: true,
    };
    assert!(m(0, 0).validate().is_ok(), "no database: page size 0");
    assert!(m(4096, 10).validate().is_ok());
    refused(&m(4096, MAX_HASHES_PER_BATCH + 1), "page hashes");
    refused(&m(1000, 1), "page size 1000");
}

#[test]
fn page_batches_are_bounded_and_hold_real_pages() {
    refused(&Message::DbPages(vec![(0, vec![0; 4096])]), "page 0");
    refused(&Message::DbPages(vec![(1, vec![0; 1000])]), "of 1000 bytes");
    let many = vec![(1, vec![0; 512]); MAX_PAGES_PER_BATCH + 1];
    refused(&Message::DbPages(many), "pages in one batch");
    assert!(Message::DbPages(vec![(1, vec![0; 512])]).validate().is_ok());
}

#[test]
fn a_database_end_is_within_the_database_bounds() {
    let m = |page_size, pages| Message::DbEnd {
        page_size,
        pages,
        hash: [0; 32],
    };
    assert!(m(4096, 3).validate().is_ok());
    refused(&m(4095, 3), "database end");
    refused(&m(512, MAX_DB_PAGES + 1), "pages");
}

#[test]
fn a_promotion_error_text_is_bounded() {
    let m = Message::Promoted {
        epoch: 1,
        error: "e".repeat(MAX_TEXT + 1),
    };
    refused(&m, "promotion error");
}

#[test]
fn a_round_summary_carries_at_most_1000_warnings_of_bounded_text() {
    let mut summary = ApplySummary {
        warnings: vec![String::new(); 1001],
        ..Default::default()
    };
    let m = |s: &ApplySummary| Message::RoundDone {
        id: 1,
        summary: s.clone(),
    };
    refused(&m(&summary), "1000 warnings");
    summary.warnings = vec!["w".repeat(MAX_TEXT + 1)];
    refused(&m(&summary), "warning");
    summary.warnings.clear();
    let held = |holders: String| HeldDb {
        path: p("a.db"),
        holders,
    };
    summary.held = vec![held("pid 7 (app)".into()); MAX_SUMMARY_LINES];
    assert!(m(&summary).validate().is_ok());
    summary.held.push(held("pid 7 (app)".into()));
    assert_eq!(
        m(&summary).validate(),
        Err(ValidateError::TooManyHeld(MAX_SUMMARY_LINES + 1))
    );
    summary.held = vec![held("p".repeat(MAX_TEXT + 1))];
    refused(&m(&summary), "held database's holders");
}

#[test]
fn symlink_targets_are_non_empty_bounded_and_without_nul() {
    let link = |t: Vec<u8>| one(entry("l", Kind::Symlink { target: t }));
    assert!(link(b"x".to_vec()).validate().is_ok());
    assert!(link(vec![b'x'; MAX_LINK_TARGET]).validate().is_ok());
    for bad in [
        Vec::new(),
        vec![b'x'; MAX_LINK_TARGET + 1],
        b"a\0b".to_vec(),
    ] {
        refused(&link(bad), "symlink target");
    }
}

#[test]
fn a_hard_link_names_another_entry() {
    refused(
        &one(entry("h", Kind::HardLink { target: p("h") })),
        "hard link",
    );
    let to_root = entry(
        "h",
        Kind::HardLink {
            target: RelPath::root(),
        },
    );
    refused(&one(to_root), "hard link");
}

#[test]
fn the_root_is_a_directory() {
    let mut root = file("x");
    root.path = RelPath::root();
    refused(&one(root), "root must be a directory");
    let mut dir = entry("x", Kind::Dir);
    dir.path = RelPath::root();
    assert!(one(dir).validate().is_ok());
}

#[test]
fn modes_have_no_bits_beyond_0o7777() {
    let mut e = file("f");
    e.meta.mode = 0o7777;
    assert!(one(e.clone()).validate().is_ok());
    e.meta.mode = 0o10000;
    refused(&one(e), "mode");
}

#[test]
fn mtime_nanoseconds_are_below_a_second() {
    let mut e = file("f");
    e.meta.mtime_nsec = 999_999_999;
    assert!(one(e.clone()).validate().is_ok());
    e.meta.mtime_nsec = 1_000_000_000;
    refused(&one(e), "nanoseconds");
}

#[test]
fn xattrs_are_bounded_in_count() {
    let mut e = file("f");
    e.meta.xattrs = (0..=MAX_XATTRS)
        .map(|i| Xattr {
            name: format!("user.{i}").into_bytes(),
            value: Vec::new(),
        })
        .collect();
    refused(&one(e), "xattrs");
}

#[test]
fn xattr_names_are_non_empty_bounded_and_without_nul() {
    for name in [
        Vec::new(),
        vec![b'n'; MAX_XATTR_NAME + 1],
        b"user.\0".to_vec(),
    ] {
        let mut e = file("f");
        e.meta.xattrs = vec![Xattr {
            name,
            value: Vec::new(),
        }];
        refused(&one(e), "xattr name");
    }
}

#[test]
fn xattr_values_and_totals_are_bounded() {
    let mut e = file("f");
    e.meta.xattrs = vec![Xattr {
        name: b"user.v".to_vec(),
        value: vec![0; MAX_XATTR_VALUE + 1],
    }];
    refused(&one(e.clone()), "xattr value");
    e.meta.xattrs = (0..17)
        .map(|i| Xattr {
            name: format!("user.{i:02}").into_bytes(),
            value: vec![0; MAX_XATTR_VALUE],
        })
        .collect();
    refused(&one(e), "bytes of xattrs");
}

#[test]
fn page_sizes_are_powers_of_two_from_512_to_65536() {
    let valid: Vec<u32> = (0..=17)
        .map(|s| 1u32 << s)
        .filter(|&n| valid_page_size(n))
        .collect();
    assert_eq!(valid, [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]);
    assert!(!valid_page_size(0) && !valid_page_size(4097));
}

#[test]
fn database_bounds_name_the_field() {
    assert!(check_db_bounds(4096, 1).is_ok());
    let e = check_db_bounds(100, 1).expect_err("page size");
    assert_eq!(e, DbBoundsError::PageSize(100));
    assert!(e.to_string().contains("page size 100"), "{e}");
    let e = check_db_bounds(512, MAX_DB_PAGES + 1).expect_err("pages");
    assert_eq!(e, DbBoundsError::Pages(MAX_DB_PAGES + 1));
    assert!(e.to_string().contains("pages"), "{e}");
}

#[test]
fn database_entries_are_checked_in_manifests() {
    let db = entry(
        "app.db",
        Kind::Database {
            page_size: 3000,
            pages: 1,
            hash: [0; 32],
        },
    );
    refused(&one(db), "entry app.db");
}
