//! Scripted sequences, fair and hostile, fed to the exchange machines.

use super::*;
use crate::{Entry, Kind, Message, Meta, RelPath};

fn entry(path: &str, kind: Kind) -> Entry {
    Entry {
        path: RelPath::new(path.as_bytes().to_vec()).expect("a valid path"),
        kind,
        meta: Meta::default(),
    }
}

fn file(size: u64) -> FileFetch {
    FileFetch::new(size, [7; 32], true)
}

fn end(size: u64, hash: [u8; 32]) -> Message {
    Message::FileEnd { size, hash }
}

// ---- a file ----

#[test]
fn literal_and_delta_then_the_entry_s_end_commit() {
    let mut f = file(10);
    assert_eq!(
        f.handle(Message::Literal(vec![1; 4])),
        Ok(FileStep::Literal(vec![1; 4]))
    );
    assert_eq!(
        f.handle(Message::Delta(vec![9; 2])),
        Ok(FileStep::Delta(vec![9; 2]))
    );
    assert_eq!(f.produced(6, 2), Ok(()));
    assert_eq!(f.figures(), (6, 4), "4 literal, 2 of the delta, 4 matched");
    assert!(f.stream_ended().is_err(), "not ended yet");
    assert_eq!(
        f.handle(end(10, [7; 32])),
        Ok(FileStep::Commit {
            hash: [7; 32],
            scanned: false
        })
    );
    assert_eq!(f.stream_ended(), Ok(()));
}

/// An end whose hash is the scan's (`ScannedEnd`) commits like a `FileEnd`,
/// marked so that content that is not that hash is left as changed; one
/// that is not the entry's, or announces what did not arrive, is treated as
/// a `FileEnd` would be.
#[test]
fn an_end_with_the_scans_hash_commits_marked() {
    let scanned = |size, hash| Message::ScannedEnd { size, hash };
    let mut f = file(3);
    f.handle(Message::Literal(vec![1; 3])).unwrap();
    assert_eq!(
        f.handle(scanned(3, [7; 32])),
        Ok(FileStep::Commit {
            hash: [7; 32],
            scanned: true
        })
    );
    assert_eq!(
        f.handle(scanned(3, [7; 32])),
        Err(ExchangeError::AfterEnd { got: "ScannedEnd" })
    );
    let mut f = file(3);
    f.handle(Message::Literal(vec![1; 3])).unwrap();
    assert_eq!(
        f.handle(scanned(3, [8; 32])),
        Ok(FileStep::Changed(Changed::Differs { now: 3, scanned: 3 }))
    );
    let mut f = file(3);
    assert!(matches!(
        f.handle(scanned(3, [7; 32])),
        Err(ExchangeError::ShortEnd { .. })
    ));
}

#[test]
fn content_after_the_end_is_refused() {
    let mut f = file(0);
    assert_eq!(
        f.handle(end(0, [7; 32])),
        Ok(FileStep::Commit {
            hash: [7; 32],
            scanned: false
        })
    );
    for late in [
        Message::Literal(vec![1]),
        end(0, [7; 32]),
        Message::DbNeedHashes,
    ] {
        let name = late.name();
        assert_eq!(f.handle(late), Err(ExchangeError::AfterEnd { got: name }));
    }
}

#[test]
fn an_end_announcing_other_than_what_arrived_is_refused() {
    let mut f = file(5);
    assert_eq!(
        f.handle(end(5, [7; 32])),
        Err(ExchangeError::ShortEnd {
            announced: 5,
            arrived: 0
        })
    );
}

#[test]
fn content_past_the_entry_s_size_leaves_the_file_as_it_was() {
    let mut f = file(4);
    assert!(matches!(
        f.handle(Message::Literal(vec![0; 4])),
        Ok(FileStep::Literal(_))
    ));
    assert_eq!(
        f.handle(Message::Literal(vec![0; 1])),
        Ok(FileStep::Changed(Changed::Grew { scanned: 4 }))
    );
    // and nothing more is taken
    assert!(matches!(
        f.handle(Message::Literal(vec![0])),
        Err(ExchangeError::AfterEnd { .. })
    ));
    let mut f = file(4);
    assert!(matches!(
        f.handle(Message::Delta(vec![1])),
        Ok(FileStep::Delta(_))
    ));
    assert_eq!(f.produced(5, 1), Err(Changed::Grew { scanned: 4 }));
}

#[test]
fn an_end_that_is_not_the_entry_s_leaves_the_file_as_it_was() {
    let mut f = file(2);
    f.handle(Message::Literal(vec![0; 2])).expect("content");
    assert_eq!(
        f.handle(end(2, [8; 32])),
        Ok(FileStep::Changed(Changed::Differs { now: 2, scanned: 2 }))
    );
    let mut f = file(3);
    f.handle(Message::Literal(vec![0; 2])).expect("content");
    assert_eq!(
        f.handle(end(2, [7; 32])),
        Ok(FileStep::Changed(Changed::Differs { now: 2, scanned: 3 }))
    );
}

#[test]
fn a_delta_without_a_basis_and_messages_of_other_streams_are_refused() {
    let mut f = FileFetch::new(10, [0; 32], false);
    assert_eq!(
        f.handle(Message::Delta(vec![1])),
        Err(ExchangeError::DeltaWithoutBasis)
    );
    for wrong in [
        Message::DbPages(vec![]),
        Message::RoundStart {
            id: 9,
            full: true,
            checksum: false,
            verify: false,
        },
        Message::Inline {
            index: 0,
            data: vec![],
        },
    ] {
        let got = wrong.name();
        assert_eq!(
            file(10).handle(wrong),
            Err(ExchangeError::Unexpected {
                want: "file content",
                got
            })
        );
    }
    assert!(FileFetch::more_follows(&Message::Literal(vec![])));
    assert!(!FileFetch::more_follows(&end(0, [0; 32])));
    assert!(!FileFetch::more_follows(&Message::DbNeedHashes));
}

// ---- a database ----

fn round() -> Vec<Entry> {
    vec![
        entry("", Kind::Dir),
        entry(
            "a.txt",
            Kind::File {
                size: 3,
                hash: [1; 32],
            },
        ),
        entry(
            "app.db",
            Kind::Database {
                page_size: 512,
                pages: 4,
                hash: [5; 32],
            },
        ),
        entry("d", Kind::Dir),
    ]
}

fn file_request(index: u64) -> Message {
    Message::FileRequest {
        index,
        signature: None,
    }
}

fn db_request(index: u64) -> Message {
    Message::DbRequest {
        index,
        have: [0; 32],
    }
}

#[test]
fn a_file_and_a_database_of_the_round_are_admitted() {
    let r = round();
    assert_eq!(
        admit(&r, Some(()), file_request(1)),
        Ok(Request::File {
            entry: &r[1],
            signature: None
        })
    );
    assert_eq!(
        admit(&r, Some("live"), db_request(2)),
        Ok(Request::Db {
            entry: &r[2],
            db: super::db_tests::DB,
            have: [0; 32],
            live: "live"
        })
    );
}

#[test]
fn requests_for_what_the_round_does_not_offer_are_refused() {
    let r = round();
    for i in [4u64, 1 << 40, u64::MAX] {
        assert_eq!(
            admit(&r, Some(()), file_request(i)),
            Err(ExchangeError::BeyondRound {
                index: i,
                entries: 4
            })
        );
        assert_eq!(
            admit(&r, Some(()), db_request(i)),
            Err(ExchangeError::BeyondRound {
                index: i,
                entries: 4
            })
        );
    }
    for (i, kind) in [(0u64, "directory"), (3, "directory"), (2, "database")] {
        let got = admit(&r, Some(()), file_request(i));
        assert_eq!(
            got,
            Err(ExchangeError::NotAFile {
                path: r[i as usize].path.clone(),
                kind
            })
        );
    }
    assert_eq!(
        admit(&r, Some(()), db_request(1)),
        Err(ExchangeError::NotADatabase {
            path: r[1].path.clone(),
            kind: "file"
        })
    );
    assert_eq!(
        admit::<()>(&r, None, db_request(2)),
        Err(ExchangeError::NoDatabases)
    );
    assert_eq!(
        admit(&r, Some(()), Message::DbNeedHashes),
        Err(ExchangeError::Unexpected {
            want: "a request",
            got: "DbNeedHashes"
        })
    );
}

/// A files request is admitted only whole: every index in the round, every
/// entry a regular file no larger than a batch takes, 1 to
/// [`crate::MAX_BATCH_FILES`] of them.
#[test]
fn a_files_request_names_only_small_regular_files_of_the_round() {
    let mut r = round();
    let big = crate::MAX_BATCH_FILE + 1;
    r.push(entry(
        "big",
        Kind::File {
            size: big,
            hash: [2; 32],
        },
    ));
    let files = |indexes: Vec<u64>| Message::FilesRequest { indexes };
    assert_eq!(
        admit(&r, Some(()), files(vec![1, 1])),
        Ok(Request::Files {
            entries: vec![&r[1], &r[1]]
        })
    );
    assert_eq!(
        admit(&r, Some(()), files(vec![1, 4])),
        Err(ExchangeError::TooLargeForBatch {
            path: r[4].path.clone(),
            size: big
        })
    );
    assert_eq!(
        admit(&r, Some(()), files(vec![1, 2])),
        Err(ExchangeError::NotAFile {
            path: r[2].path.clone(),
            kind: "database"
        })
    );
    assert_eq!(
        admit(&r, Some(()), files(vec![1, 9])),
        Err(ExchangeError::BeyondRound {
            index: 9,
            entries: 5
        })
    );
    for n in [0, crate::MAX_BATCH_FILES + 1] {
        assert_eq!(
            admit(&r, Some(()), files(vec![1; n])),
            Err(ExchangeError::Invalid(crate::ValidateError::BatchSize(n)))
        );
    }
}
