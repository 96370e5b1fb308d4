//! Scripted sequences, fair and hostile, fed to the exchange machines.

use super::*;
use crate::{Entry, Kind, MAX_HASHES_PER_BATCH, Message, Meta, RelPath};

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
        Ok(FileStep::Commit { hash: [7; 32] })
    );
    assert_eq!(f.stream_ended(), Ok(()));
}

#[test]
fn content_after_the_end_is_refused() {
    let mut f = file(0);
    assert_eq!(
        f.handle(end(0, [7; 32])),
        Ok(FileStep::Commit { hash: [7; 32] })
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

const DB: DbGeometry = DbGeometry {
    page_size: 512,
    pages: 4,
    hash: [5; 32],
};

fn page(n: u32) -> (u32, Vec<u8>) {
    (n, vec![0; 512])
}

fn db_end(pages: u32) -> Message {
    Message::DbEnd {
        page_size: 512,
        pages,
        hash: [5; 32],
    }
}

#[test]
fn hashes_then_pages_then_the_round_s_end_commit() {
    let mut d = DbFetch::new(DB);
    assert_eq!(d.handle(Message::DbNeedHashes), Ok(DbStep::SendHashes));
    assert_eq!(
        d.handle(Message::DbPages(vec![page(1), page(4)])),
        Ok(DbStep::Pages(vec![page(1), page(4)]))
    );
    assert_eq!(
        d.handle(Message::DbPages(vec![page(2)])),
        Ok(DbStep::Pages(vec![page(2)]))
    );
    assert_eq!(d.received(), 3);
    assert!(d.stream_ended().is_err());
    assert_eq!(d.handle(db_end(4)), Ok(DbStep::Commit));
    assert_eq!(d.stream_ended(), Ok(()));
    assert_eq!(
        d.handle(Message::DbPages(vec![page(3)])),
        Err(ExchangeError::AfterEnd { got: "DbPages" })
    );
}

#[test]
fn more_pages_than_announced_are_refused_even_repeated() {
    let mut d = DbFetch::new(DB);
    assert_eq!(
        d.handle(Message::DbPages(vec![page(1); 5])),
        Err(ExchangeError::TooManyPages(4))
    );
    let mut d = DbFetch::new(DB);
    for _ in 0..4 {
        d.handle(Message::DbPages(vec![page(1)]))
            .expect("within the count");
    }
    assert_eq!(
        d.handle(Message::DbPages(vec![page(1)])),
        Err(ExchangeError::TooManyPages(4))
    );
}

#[test]
fn a_page_beyond_the_database_or_of_another_size_is_refused() {
    for (n, len) in [(5u32, 512usize), (u32::MAX, 512), (2, 1024)] {
        let got = DbFetch::new(DB).handle(Message::DbPages(vec![(n, vec![0; len])]));
        assert_eq!(
            got,
            Err(ExchangeError::BadPage {
                number: n,
                len,
                pages: 4,
                page_size: 512
            })
        );
        let text = got.expect_err("refused").to_string();
        assert!(text.contains(&format!(
            "page {n} of {len} bytes for a database of 4 pages"
        )));
    }
    // page 0 is out of the message's own bounds
    assert!(matches!(
        DbFetch::new(DB).handle(Message::DbPages(vec![page(0)])),
        Err(ExchangeError::Invalid(_))
    ));
}

fn run(first: u32, pages: usize) -> Message {
    Message::DbRun {
        first,
        data: vec![first as u8; pages * 512],
    }
}

#[test]
fn runs_of_pages_are_staged_counted_and_bounded() {
    let mut d = DbFetch::new(DB);
    assert_eq!(
        d.handle(run(1, 2)),
        Ok(DbStep::Run {
            first: 1,
            data: vec![1; 1024]
        })
    );
    d.handle(Message::DbPages(vec![page(4)])).expect("a page");
    assert_eq!(d.received(), 3);
    // no hashes once pages began
    assert_eq!(
        d.handle(Message::DbNeedHashes),
        Err(ExchangeError::HashesAgain)
    );
    // the last page again: counted, over the database's four
    d.handle(run(3, 1)).expect("the fourth page received");
    assert_eq!(d.handle(run(4, 1)), Err(ExchangeError::TooManyPages(4)));
    assert_eq!(d.handle(db_end(4)), Ok(DbStep::Commit));
    assert_eq!(
        d.handle(run(1, 1)),
        Err(ExchangeError::AfterEnd { got: "DbRun" })
    );
}

#[test]
fn a_run_past_the_database_or_of_partial_pages_is_refused() {
    let bad = |first: u32, len: usize| {
        let got = DbFetch::new(DB).handle(Message::DbRun {
            first,
            data: vec![0; len],
        });
        assert_eq!(
            got,
            Err(ExchangeError::BadPage {
                number: first,
                len,
                pages: 4,
                page_size: 512
            }),
            "page {first}, {len} bytes"
        );
    };
    // past the end: from page 4 two pages, from page 5 one, from the last
    // number a page size's worth
    bad(4, 1024);
    bad(5, 512);
    bad(u32::MAX, 512);
    // more pages than the database has at all (page-size multiple)
    bad(1, 5 * 512);
    // not a whole number of the database's pages (1024 is a page size, and
    // a multiple of 512 with 1,536 not one of 1024)
    let big = DbGeometry {
        page_size: 1024,
        pages: 4,
        hash: [5; 32],
    };
    assert!(matches!(
        DbFetch::new(big).handle(Message::DbRun {
            first: 1,
            data: vec![0; 1536]
        }),
        Err(ExchangeError::BadPage { len: 1536, .. })
    ));
    // page 0, nothing, or not even whole 512-byte pages: the message's own
    // bounds
    for (first, len) in [(0u32, 512usize), (1, 0), (1, 700)] {
        assert!(
            matches!(
                DbFetch::new(DB).handle(Message::DbRun {
                    first,
                    data: vec![0; len]
                }),
                Err(ExchangeError::Invalid(_))
            ),
            "page {first}, {len} bytes"
        );
    }
}

#[test]
fn hashes_asked_twice_or_after_pages_are_refused() {
    let mut d = DbFetch::new(DB);
    d.handle(Message::DbNeedHashes).expect("once");
    assert_eq!(
        d.handle(Message::DbNeedHashes),
        Err(ExchangeError::HashesAgain)
    );
    let mut d = DbFetch::new(DB);
    d.handle(Message::DbPages(vec![])).expect("an empty batch");
    assert_eq!(
        d.handle(Message::DbNeedHashes),
        Err(ExchangeError::HashesAgain)
    );
}

#[test]
fn an_end_that_is_not_the_round_s_entry_is_refused() {
    for bad in [
        db_end(5),
        db_end(3),
        Message::DbEnd {
            page_size: 1024,
            pages: 4,
            hash: [5; 32],
        },
        Message::DbEnd {
            page_size: 512,
            pages: 4,
            hash: [6; 32],
        },
    ] {
        assert_eq!(
            DbFetch::new(DB).handle(bad),
            Err(ExchangeError::EndMismatch)
        );
    }
    assert_eq!(
        DbFetch::new(DB).handle(Message::Literal(vec![1])),
        Err(ExchangeError::Unexpected {
            want: "database pages",
            got: "Literal"
        })
    );
}

// ---- page hashes, both sides ----

#[test]
fn page_hashes_travel_in_marked_batches_and_are_collected() {
    for n in [0usize, 1, MAX_HASHES_PER_BATCH, MAX_HASHES_PER_BATCH + 3] {
        let ours: Vec<[u8; 32]> = (0..n).map(|i| [(i % 251) as u8; 32]).collect();
        let batches: Vec<Message> = hash_batches(4096, &ours).collect();
        assert_eq!(
            batches.len(),
            n.div_ceil(MAX_HASHES_PER_BATCH).max(1),
            "{n}"
        );
        let mut c = HashCollector::new(u32::MAX);
        let mut got = None;
        for (i, b) in batches.into_iter().enumerate() {
            assert!(got.is_none(), "{n}: batch {i} after the last");
            got = c.handle(b).expect("fair batches");
        }
        assert_eq!(got, Some((4096, ours)), "{n}");
    }
}

#[test]
fn hashes_past_our_page_count_are_dropped_and_batches_are_bounded() {
    let mut c = HashCollector::new(2);
    let got = c
        .handle(hash_batches(512, &[[1; 32]; 5]).next().expect("a batch"))
        .expect("fair");
    assert_eq!(got, Some((512, vec![[1; 32]; 2])));
    assert_eq!(
        c.handle(Message::DbNeedHashes),
        Err(ExchangeError::AfterEnd {
            got: "DbNeedHashes"
        })
    );
    let mut c = HashCollector::new(4);
    let empty = || Message::DbHashes {
        page_size: 512,
        hashes: vec![],
        last: false,
    };
    for _ in 0..HashCollector::MOST_BATCHES {
        assert_eq!(c.handle(empty()), Ok(None));
    }
    assert_eq!(
        c.handle(empty()),
        Err(ExchangeError::TooManyHashBatches(
            HashCollector::MOST_BATCHES
        ))
    );
    assert!(matches!(
        HashCollector::new(4).handle(Message::DbPages(vec![])),
        Err(ExchangeError::Unexpected { .. })
    ));
}

#[test]
fn pages_per_batch_stays_within_the_bounds() {
    assert_eq!(pages_per_batch(512), 256);
    assert_eq!(pages_per_batch(4096), 32);
    assert_eq!(pages_per_batch(65536), 2);
    assert_eq!(pages_per_batch(0), 256);
    assert!((1..=crate::MAX_PAGES_PER_BATCH).contains(&pages_per_batch(512)));
}

// ---- admission ----

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
            db: DB,
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
