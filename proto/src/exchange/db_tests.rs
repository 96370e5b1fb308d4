//! Scripted sequences, fair and hostile, fed to a database's exchange
//! machines: the replica's `DbFetch`, the source's `HashCollector`, and the
//! messages pages travel in.

use super::*;
use crate::{MAX_HASHES_PER_BATCH, Message};

pub(super) const DB: DbGeometry = DbGeometry {
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

/// Pages changed here and there travel together, numbered; long runs as
/// runs; every page once, through the replica's machine.
#[test]
fn short_runs_travel_together_and_long_ones_as_runs() {
    const PS: usize = 4096;
    let run = |first: u32, n: usize| (first, vec![first as u8; n * PS]);
    let runs = vec![run(1, 1), run(3, 2), run(10, 8), run(30, 7), run(40, 20)];
    let msgs = page_messages(PS as u32, runs);
    let scattered: Vec<u32> = [1, 3, 4].into_iter().chain(30..37).collect();
    match &msgs[..] {
        [
            Message::DbPages(p),
            Message::DbRun { first: 10, data: a },
            Message::DbRun { first: 40, data: b },
        ] => {
            assert_eq!(p.iter().map(|(n, _)| *n).collect::<Vec<_>>(), scattered);
            assert!(p.iter().all(|(n, d)| d.len() == PS && d[0] != 0 && *n > 0));
            assert_eq!((a.len(), b.len()), (8 * PS, 20 * PS));
        }
        other => panic!("{:?}", other.iter().map(Message::name).collect::<Vec<_>>()),
    }
    let mut d = DbFetch::new(DbGeometry {
        page_size: PS as u32,
        pages: 59,
        hash: [5; 32],
    });
    for m in msgs {
        d.handle(m).expect("within the database");
    }
    assert_eq!(d.received(), 10 + 8 + 20);
    // many scattered pages: batches within the bounds, each page once
    let many: Vec<(u32, Vec<u8>)> = (0..3000u32).map(|i| (2 * i + 1, vec![1; 512])).collect();
    let msgs = page_messages(512, many);
    let mut seen = Vec::new();
    for m in &msgs {
        let Message::DbPages(p) = m else {
            panic!("{}", m.name())
        };
        assert!(p.len() <= crate::MAX_PAGES_PER_BATCH);
        seen.extend(p.iter().map(|(n, _)| *n));
    }
    assert_eq!(seen, (0..3000u32).map(|i| 2 * i + 1).collect::<Vec<_>>());
    assert!(page_messages(512, Vec::new()).is_empty());
}

/// Whatever a caller hands over, no message outgrows its bound: a run
/// longer than `MAX_RUN_BYTES` is cut at page boundaries, scattered pages
/// of 64 KiB go a few at a time, and one such page is a run of its own.
#[test]
fn page_messages_stay_within_the_frame() {
    let long = page_messages(4096, vec![(7, vec![3; 1500 * 4096])]);
    let cut: Vec<(u32, usize)> = long
        .iter()
        .map(|m| match m {
            Message::DbRun { first, data } => (*first, data.len()),
            other => panic!("{}", other.name()),
        })
        .collect();
    assert_eq!(cut, [(7, MAX_RUN_BYTES), (7 + 1024, 476 * 4096)]);
    let big: Vec<(u32, Vec<u8>)> = (0..100u32).map(|i| (3 * i + 1, vec![2; 65536])).collect();
    let msgs = page_messages(65536, big);
    assert_eq!(msgs.len(), 100, "each 64 KiB page a run of its own");
    assert!(
        msgs.iter()
            .all(|m| matches!(m, Message::DbRun { data, .. } if data.len() == 65536))
    );
    let small: Vec<(u32, Vec<u8>)> = (0..3000u32).map(|i| (2 * i + 1, vec![1; 4096])).collect();
    for m in page_messages(4096, small) {
        let Message::DbPages(p) = &m else {
            panic!("{}", m.name())
        };
        assert!(p.len() * 4096 <= MAX_RUN_BYTES);
        let mut frame = Vec::new();
        crate::frame::encode(&m, &mut frame).expect("within the frame limit");
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
