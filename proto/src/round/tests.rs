//! The round state machines, message by message: the order, the bounds and
//! the end are each checked, with scripted hostile sequences.

use super::send::Batches;
use super::*;
use crate::{Kind, Message, Meta, ProtocolError, Xattr};

fn p(s: &str) -> RelPath {
    RelPath::new(s.as_bytes().to_vec()).expect("a valid test path")
}

fn file(path: &str) -> Entry {
    Entry {
        path: p(path),
        kind: Kind::File {
            size: 1,
            hash: [1; 32],
        },
        meta: Meta::default(),
    }
}

fn start(id: u64) -> Message {
    Message::RoundStart {
        id,
        full: false,
        checksum: false,
        verify: false,
    }
}

fn end(id: u64, entries: u64) -> Message {
    Message::RoundEnd {
        id,
        entries,
        root_hash: [7; 32],
    }
}

/// Feeds every message; the last one's outcome.
fn feed(a: &mut Assembler, msgs: Vec<Message>) -> Result<Option<Event>, ProtocolError> {
    let mut last = Ok(None);
    for m in msgs {
        last = a.handle(m);
        if last.is_err() {
            break;
        }
    }
    last
}

fn outgoing<'a>(
    entries: &'a [Entry],
    renamed: &'a [(RelPath, RelPath)],
    deleted: &'a [RelPath],
) -> Outgoing<'a> {
    Outgoing {
        id: 3,
        full: false,
        checksum: true,
        verify: true,
        entries,
        renamed,
        deleted,
        root_hash: [5; 32],
    }
}

#[test]
fn what_the_encoder_sends_the_assembler_rebuilds() {
    let entries = vec![file("a"), file("b"), file("c")];
    let renamed = vec![(p("x"), p("y"))];
    let deleted = vec![p("gone")];
    let out = outgoing(&entries, &renamed, &deleted);
    let mut a = Assembler::new();
    let ev = feed(&mut a, out.messages(vec![(1, b"bee".to_vec())]).collect());
    let Ok(Some(Event::Round(r))) = ev else {
        panic!("no round: {ev:?}");
    };
    assert_eq!((r.id, r.full, r.checksum, r.verify), (3, false, true, true));
    assert_eq!(r.entries, entries);
    assert_eq!(r.renamed, renamed);
    assert_eq!(r.deleted, deleted);
    assert_eq!(r.inline.get(&1).map(Vec::as_slice), Some(&b"bee"[..]));
    assert_eq!(r.root_hash, [5; 32]);
    assert_eq!(a.round_id(), None, "between rounds again");
}

#[test]
fn the_encoder_sends_the_frames_in_protocol_order() {
    let entries = vec![file("a")];
    let renamed = vec![(p("x"), p("y"))];
    let deleted = vec![p("gone")];
    let names: Vec<&str> = outgoing(&entries, &renamed, &deleted)
        .messages(vec![(0, vec![1])])
        .map(|m| m.name())
        .collect();
    assert_eq!(
        names,
        [
            "RoundStart",
            "Manifest",
            "Inline",
            "Renamed",
            "Deleted",
            "RoundEnd"
        ]
    );
    let empty: Vec<&str> = outgoing(&[], &[], &[])
        .messages(Vec::new())
        .map(|m| m.name())
        .collect();
    assert_eq!(empty, ["RoundStart", "RoundEnd"], "no empty batches");
}

#[test]
fn manifest_batches_close_at_the_entry_count() {
    let entries: Vec<Entry> = (0..crate::MAX_ENTRIES_PER_BATCH + 5)
        .map(|i| file(&format!("f{i}")))
        .collect();
    let sizes: Vec<usize> = Batches::new(&entries).map(|b| b.len()).collect();
    assert_eq!(sizes, [crate::MAX_ENTRIES_PER_BATCH, 5]);
}

#[test]
fn manifest_batches_close_at_the_byte_budget_and_stay_under_the_frame_limit() {
    let mut big = file("big");
    big.meta.xattrs = (0..15)
        .map(|i| Xattr {
            name: format!("user.x{i}").into_bytes(),
            value: vec![0; crate::MAX_XATTR_VALUE],
        })
        .collect();
    let entries = vec![big; 10];
    let batches: Vec<Vec<Entry>> = Batches::new(&entries).collect();
    assert!(batches.len() > 1, "one batch of {} MiB", 10 * 15 / 16);
    assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), 10);
    for b in batches {
        let mut buf = Vec::new();
        crate::frame::encode(&Message::Manifest(b), &mut buf).expect("encodes");
        assert!(buf.len() < crate::MAX_FRAME_LEN);
    }
}

#[test]
fn the_cost_bounds_the_encoded_size() {
    let mut e = file("some/deep/path/name");
    e.meta.xattrs = vec![Xattr {
        name: b"user.a".to_vec(),
        value: vec![9; 300],
    }];
    let mut buf = Vec::new();
    crate::frame::encode(&Message::Manifest(vec![e.clone()]), &mut buf).expect("encodes");
    assert!(
        wire_cost(&e) as usize >= buf.len(),
        "{} < {}",
        wire_cost(&e),
        buf.len()
    );
}

#[test]
fn a_promotion_between_rounds_is_an_event() {
    let mut a = Assembler::new();
    assert_eq!(
        a.handle(Message::Promote { epoch: 4 }),
        Ok(Some(Event::Promote { epoch: 4 }))
    );
}

#[test]
fn a_round_with_nothing_to_do_is_an_event_between_rounds_only() {
    let same = Message::RoundSame {
        id: 3,
        entries: 7,
        digest: [1; 32],
        root_hash: [2; 32],
    };
    let mut a = Assembler::new();
    assert_eq!(
        a.handle(same.clone()),
        Ok(Some(Event::Same {
            id: 3,
            entries: 7,
            digest: [1; 32],
            root_hash: [2; 32],
        }))
    );
    let e = feed(&mut Assembler::new(), vec![start(1), same]);
    assert_eq!(
        e,
        Err(ProtocolError::UnexpectedInRound {
            id: 1,
            got: "RoundSame"
        })
    );
}

#[test]
fn a_promotion_inside_a_round_is_refused() {
    let mut a = Assembler::new();
    let e = feed(&mut a, vec![start(1), Message::Promote { epoch: 4 }]);
    assert_eq!(
        e,
        Err(ProtocolError::UnexpectedInRound {
            id: 1,
            got: "Promote"
        })
    );
}

#[test]
fn anything_but_a_start_between_rounds_is_refused() {
    for m in [
        Message::Manifest(vec![file("a")]),
        end(1, 0),
        Message::Inline {
            index: 0,
            data: vec![],
        },
        Message::DbNeedHashes,
        Message::TreeDigest { digest: None },
        Message::Hello(crate::Hello::new(crate::Role::Source, "f")),
    ] {
        let name = m.name();
        let mut a = Assembler::new();
        assert_eq!(
            a.handle(m),
            Err(ProtocolError::ExpectedRound { got: name }),
            "{name}"
        );
    }
}

#[test]
fn a_start_inside_a_round_is_refused() {
    let mut a = Assembler::new();
    let e = feed(&mut a, vec![start(1), start(2)]);
    assert!(
        matches!(e, Err(ProtocolError::UnexpectedInRound { id: 1, got }) if got == "RoundStart")
    );
}

#[test]
fn transfer_messages_inside_a_round_are_refused() {
    for m in [
        Message::Literal(vec![1]),
        Message::FileEnd {
            size: 0,
            hash: [0; 32],
        },
        Message::DbPages(vec![]),
        Message::RoundDone {
            id: 1,
            summary: crate::ApplySummary::default(),
        },
    ] {
        let mut a = Assembler::new();
        assert!(feed(&mut a, vec![start(1), m]).is_err());
    }
}

#[test]
fn an_end_with_another_id_is_refused() {
    let mut a = Assembler::new();
    let e = feed(
        &mut a,
        vec![start(1), Message::Manifest(vec![file("a")]), end(2, 1)],
    );
    assert_eq!(
        e,
        Err(ProtocolError::BadEnd {
            id: 1,
            end: 2,
            announced: 1,
            carried: 1
        })
    );
}

#[test]
fn an_end_with_another_count_is_refused() {
    for announced in [0, 2, u64::MAX] {
        let mut a = Assembler::new();
        let e = feed(
            &mut a,
            vec![
                start(1),
                Message::Manifest(vec![file("a")]),
                end(1, announced),
            ],
        );
        let msg = e.expect_err("a wrong count").to_string();
        assert!(
            msg.contains(&format!("{announced} entries announced, 1 carried")),
            "{msg}"
        );
    }
}

#[test]
fn after_an_error_the_assembler_is_between_rounds() {
    let mut a = Assembler::new();
    assert!(feed(&mut a, vec![start(1), end(1, 5)]).is_err());
    assert_eq!(a.round_id(), None);
    assert!(matches!(
        feed(&mut a, vec![start(2), end(2, 0)]),
        Ok(Some(Event::Round(r))) if r.id == 2
    ));
}

#[test]
fn inline_content_beyond_the_entries_sent_is_refused() {
    let mut a = Assembler::new();
    let e = feed(
        &mut a,
        vec![
            start(1),
            Message::Manifest(vec![file("a")]),
            Message::Inline {
                index: 1,
                data: vec![0],
            },
        ],
    );
    assert_eq!(
        e,
        Err(ProtocolError::InlineOutOfRange {
            id: 1,
            index: 1,
            entries: 1
        })
    );
}

#[test]
fn too_many_entries_are_refused_as_soon_as_they_pass_the_bound() {
    let mut a = Assembler::new();
    a.handle(start(9)).expect("a start");
    let batch: Vec<RelPath> = (0..crate::MAX_ENTRIES_PER_BATCH)
        .map(|i| p(&format!("d{i}")))
        .collect();
    let mut sent = 0u64;
    let err = loop {
        match a.handle(Message::Deleted(batch.clone())) {
            Ok(None) => sent += batch.len() as u64,
            Ok(Some(e)) => panic!("an event: {e:?}"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        err,
        ProtocolError::TooManyEntries {
            id: 9,
            max: MAX_ROUND_ENTRIES
        }
    );
    assert!(sent <= MAX_ROUND_ENTRIES);
    assert!(err.to_string().contains("larger than"));
}

#[test]
fn database_page_tables_count_to_the_byte_budget_but_not_to_the_time_bound() {
    let db = Entry {
        path: p("app.db"),
        kind: Kind::Database {
            page_size: 65536,
            pages: crate::MAX_DB_PAGES,
            hash: [0; 32],
        },
        meta: Meta::default(),
    };
    let mut a = Assembler::new();
    a.handle(start(1)).expect("a start");
    a.handle(Message::Manifest(vec![db.clone()]))
        .expect("one table fits");
    assert_eq!(a.timed_bytes(), wire_cost(&db));
    // 2^24 pages × 33 bytes is 528 MiB: the second table passes 1 GiB.
    let e = a.handle(Message::Manifest(vec![db]));
    assert!(
        matches!(e, Err(ProtocolError::TooManyBytes { id: 1, .. })),
        "{e:?}"
    );
}

#[test]
fn inline_bytes_count_to_the_budget() {
    let mut a = Assembler::new();
    a.handle(start(1)).expect("a start");
    a.handle(Message::Manifest(vec![file("a")]))
        .expect("a batch");
    let before = a.timed_bytes();
    a.handle(Message::Inline {
        index: 0,
        data: vec![0; 1000],
    })
    .expect("inline");
    assert_eq!(a.timed_bytes() - before, inline_cost(&[0; 1000]));
}

#[test]
fn a_message_out_of_bounds_is_refused_by_the_assembler_with_its_validate_error() {
    // Messages that never went through a frame (an in-memory pair) are
    // checked too.
    let mut bad = file("a");
    bad.meta.mode = 0o170_755;
    let mut a = Assembler::new();
    let e = feed(&mut a, vec![start(1), Message::Manifest(vec![bad])]);
    assert_eq!(
        e,
        Err(ProtocolError::Invalid(crate::ValidateError::Entry {
            path: p("a"),
            why: crate::EntryError::Mode(0o170_755),
        }))
    );
    let e = a.handle(Message::Deleted(vec![RelPath::root()]));
    assert_eq!(
        e,
        Err(ProtocolError::Invalid(crate::ValidateError::RootDeleted))
    );
    assert_eq!(
        ProtocolError::from(crate::ValidateError::RootDeleted).code(),
        crate::ErrorCode::Protocol
    );
}

#[test]
fn every_protocol_error_is_a_protocol_code() {
    let e = ProtocolError::ExpectedRound { got: "Manifest" };
    assert_eq!(e.code(), crate::ErrorCode::Protocol);
}

#[test]
fn costs_of_deletions_and_renames_grow_with_their_paths() {
    assert!(deleted_cost(&p("aaaa")) > deleted_cost(&p("a")));
    assert!(renamed_cost(&(p("a"), p("bbbb"))) > renamed_cost(&(p("a"), p("b"))));
    assert_eq!(table_cost(&file("a")), 0);
}
