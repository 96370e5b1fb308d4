//! Round trips, truncation, oversize and hostile inputs for the framing.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use proptest::prelude::*;
use proto::frame::{self, FrameError, HEADER_LEN, MAX_FRAME_LEN};
use proto::*;

fn sample_entry() -> Entry {
    Entry {
        path: RelPath::new(&b"dir/\xffname with space"[..]).unwrap(),
        kind: Kind::File {
            size: 12,
            hash: [7; 32],
        },
        meta: Meta {
            mode: 0o4755,
            uid: 99,
            gid: 100,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 123_456_789,
            xattrs: vec![Xattr {
                name: b"user.empty".to_vec(),
                value: vec![],
            }],
        },
    }
}

fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello::new(Role::Source, "jellyfin")),
        Message::RoundStart {
            id: 7,
            full: true,
            checksum: false,
            verify: false,
        },
        Message::Deleted(vec![RelPath::new(&b"gone/x"[..]).unwrap()]),
        Message::Renamed(vec![(
            RelPath::new(&b"a"[..]).unwrap(),
            RelPath::new(&b"b/c"[..]).unwrap(),
        )]),
        Message::RoundEnd {
            id: 7,
            entries: 1,
            root_hash: [1; 32],
        },
        Message::Error {
            code: ErrorCode::Apply,
            message: "disk full".into(),
        },
        Message::Manifest(vec![sample_entry()]),
        Message::FileRequest {
            index: 3,
            signature: Some(vec![1, 2, 3]),
        },
        Message::FileRequest {
            index: 4,
            signature: None,
        },
        Message::Literal(vec![0; 100]),
        Message::Inline {
            index: 2,
            data: b"small file".to_vec(),
        },
        Message::Delta(vec![9; 10]),
        Message::FileEnd {
            size: 100,
            hash: [2; 32],
        },
        Message::RoundDone {
            id: 7,
            summary: ApplySummary {
                files_transferred: 1,
                ..Default::default()
            },
        },
    ]
}

#[test]
fn round_trip_every_message() {
    for msg in all_messages() {
        let mut buf = Vec::new();
        frame::encode(&msg, &mut buf).unwrap();
        let (back, used) = frame::decode(&buf).unwrap().unwrap();
        assert_eq!(back, msg);
        assert_eq!(used, buf.len());
        // every strict prefix is "incomplete", never an error or a panic
        for cut in 0..buf.len() {
            assert_eq!(
                frame::decode(&buf[..cut]).unwrap(),
                None,
                "prefix {cut} of {msg:?}"
            );
        }
    }
}

/// A peer's summary naming more held databases than the bound, or holders
/// text past it, is refused by the decoder, not handed on.
#[test]
fn hostile_held_databases_in_a_summary_are_refused_on_decode() {
    let held = |n: usize, holders: &str| Message::RoundDone {
        id: 1,
        summary: ApplySummary {
            held: vec![
                HeldDb {
                    path: RelPath::new(&b"app.db"[..]).unwrap(),
                    holders: holders.into(),
                };
                n
            ],
            ..Default::default()
        },
    };
    let decode = |m: &Message| {
        let mut buf = Vec::new();
        frame::encode(m, &mut buf).unwrap();
        frame::decode(&buf).map(|d| d.map(|(m, _)| m))
    };
    let fine = held(2, "pid 42 (jellyfin)");
    assert_eq!(decode(&fine), Ok(Some(fine)));
    for bad in [
        held(MAX_SUMMARY_LINES + 1, "pid 42 (jellyfin)"),
        held(1, &"x".repeat(MAX_TEXT + 1)),
    ] {
        assert!(
            matches!(decode(&bad), Err(FrameError::Invalid(_))),
            "{:?}",
            decode(&bad).map(|_| ())
        );
    }
}

#[test]
fn oversize_header_refused_before_allocation() {
    let header = ((MAX_FRAME_LEN + 1) as u32).to_be_bytes();
    assert_eq!(
        frame::frame_len(header),
        Err(FrameError::TooLarge(MAX_FRAME_LEN + 1))
    );
    let mut buf = header.to_vec();
    buf.extend_from_slice(&[0; 16]);
    assert!(matches!(frame::decode(&buf), Err(FrameError::TooLarge(_))));
}

#[test]
fn oversize_message_not_encoded() {
    let msg = Message::Literal(vec![0; MAX_FRAME_LEN + 1]);
    let mut buf = vec![1, 2];
    assert!(matches!(
        frame::encode(&msg, &mut buf),
        Err(FrameError::TooLarge(_))
    ));
    assert_eq!(buf, vec![1, 2]);
}

#[test]
fn unknown_type_refused() {
    let mut buf = vec![0, 0, 0, 1];
    buf.push(200); // variant index far past the last message type
    assert_eq!(frame::decode(&buf), Err(FrameError::UnknownType));
}

#[test]
fn hostile_path_in_manifest_refused() {
    // Encode a manifest whose entry path is `../x` by building the bytes by hand:
    // serialize a good one and patch the path bytes.
    let mut e = sample_entry();
    e.path = RelPath::new(&b"aa/x"[..]).unwrap();
    let mut buf = Vec::new();
    frame::encode(&Message::Manifest(vec![e]), &mut buf).unwrap();
    let at = buf.windows(4).position(|w| w == b"aa/x").unwrap();
    buf[at..at + 2].copy_from_slice(b"..");
    assert!(matches!(frame::decode(&buf), Err(FrameError::Malformed(_))));
}

#[test]
fn bounds_checked_on_decode() {
    let mut e = sample_entry();
    e.meta.xattrs = vec![Xattr {
        name: b"user.big".to_vec(),
        value: vec![0; MAX_XATTR_VALUE + 1],
    }];
    let mut buf = Vec::new();
    frame::encode(&Message::Manifest(vec![e]), &mut buf).unwrap();
    assert!(matches!(
        frame::decode(&buf),
        Err(FrameError::Invalid(ValidateError::Entry {
            why: EntryError::XattrValue(_),
            ..
        }))
    ));

    let mut e = sample_entry();
    e.meta.mode = 0o170755;
    buf.clear();
    frame::encode(&Message::Manifest(vec![e]), &mut buf).unwrap();
    assert!(matches!(
        frame::decode(&buf),
        Err(FrameError::Invalid(ValidateError::Entry {
            why: EntryError::Mode(0o170755),
            ..
        }))
    ));
}

#[test]
fn deleting_the_root_or_renaming_into_itself_refused() {
    for msg in [
        Message::Deleted(vec![RelPath::root()]),
        Message::Renamed(vec![(
            RelPath::new(&b"a"[..]).unwrap(),
            RelPath::new(&b"a/b"[..]).unwrap(),
        )]),
    ] {
        let mut buf = Vec::new();
        frame::encode(&msg, &mut buf).unwrap();
        assert!(
            matches!(frame::decode(&buf), Err(FrameError::Invalid(_))),
            "{msg:?}"
        );
    }
}

#[test]
fn trailing_bytes_refused() {
    let mut buf = Vec::new();
    frame::encode(&Message::Literal(vec![1]), &mut buf).unwrap();
    buf.push(0);
    let len = (buf.len() - HEADER_LEN) as u32;
    buf[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(frame::decode(&buf), Err(FrameError::Malformed(_))));
}

#[test]
fn handshake_refuses_other_versions() {
    let mut h = Hello::new(Role::Source, "default");
    assert!(h.check().is_ok());
    h.version = PROTOCOL_VERSION + 1;
    let err = h.check().unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("version {}", PROTOCOL_VERSION + 1)),
        "{err}"
    );
    h.magic = *b"RSYNCD: ";
    assert_eq!(h.check(), Err(HandshakeError::UnknownMagic));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = frame::decode(&bytes);
        let _ = frame::decode_body(&bytes);
    }

    #[test]
    fn literal_round_trip(data in proptest::collection::vec(any::<u8>(), 0..4096), idx in any::<u64>()) {
        for msg in [Message::Literal(data.clone()), Message::FileRequest { index: idx, signature: Some(data.clone()) }] {
            let mut buf = Vec::new();
            frame::encode(&msg, &mut buf).unwrap();
            prop_assert_eq!(frame::decode(&buf).unwrap().unwrap().0, msg);
        }
    }
}

/// Every database size a peer announces (in a manifest entry or a database
/// end) is checked against its bound before anything is sized from it, and
/// the refusal names the field.
#[test]
fn database_counts_beyond_their_bounds_are_refused() {
    let db = |page_size: u32, pages: u32| Entry {
        path: RelPath::new(&b"app.db"[..]).unwrap(),
        kind: Kind::Database {
            page_size,
            pages,
            hash: [0; 32],
        },
        meta: Meta::default(),
    };
    let end = |page_size: u32, pages: u32| Message::DbEnd {
        page_size,
        pages,
        hash: [0; 32],
    };
    for (ps, pages) in [
        (65536, u32::MAX),
        (512, 50_000_000),
        (512, MAX_DB_PAGES + 1),
    ] {
        let m = Message::Manifest(vec![db(ps, pages)]);
        let err = m.validate().unwrap_err().to_string();
        assert!(err.contains("app.db") && err.contains("pages"), "{err}");
        let mut buf = Vec::new();
        frame::encode(&m, &mut buf).unwrap();
        assert!(matches!(
            frame::decode(&buf),
            Err(FrameError::Invalid(e)) if e.to_string().contains("pages")
        ));
        let err = end(ps, pages).validate().unwrap_err().to_string();
        assert!(
            err.contains("database end") && err.contains("pages"),
            "{err}"
        );
    }
    // The largest allowed announcement passes.
    Message::Manifest(vec![db(65536, MAX_DB_PAGES)])
        .validate()
        .unwrap();
    end(512, MAX_DB_PAGES).validate().unwrap();
    assert!(u64::from(MAX_DB_PAGES) * u64::from(MAX_PAGE_SIZE) <= MAX_DB_BYTES);
}
