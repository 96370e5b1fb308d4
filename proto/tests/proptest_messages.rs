//! Property tests of the framing (issue 5): arbitrary messages round-trip,
//! the decoder agrees with `Message::validate`, and mutated or arbitrary frames
//! never panic the decoder. `frames.rs` holds the hand-written cases.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use proptest::prelude::*;
use proto::frame::{self, FrameError, HEADER_LEN};
use proto::*;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// A valid path: 0 to 6 components of 1 to 12 bytes, no `/` or NUL, never `.`
/// or `..` (names are any other bytes, not UTF-8).
fn rel_path() -> impl Strategy<Value = RelPath> {
    proptest::collection::vec(
        proptest::collection::vec(1u8..=255, 1..12).prop_map(|mut c| {
            for b in c.iter_mut() {
                if *b == b'/' {
                    *b = b'_';
                }
            }
            if c == b"." || c == b".." {
                c.push(b'x');
            }
            c
        }),
        0..6,
    )
    .prop_map(|cs| RelPath::new(cs.join(&b'/')).unwrap())
}

fn non_root() -> impl Strategy<Value = RelPath> {
    (rel_path(), proptest::collection::vec(b'a'..=b'z', 1..8))
        .prop_map(|(p, n)| p.join(&n).unwrap())
}

fn xattr() -> impl Strategy<Value = Xattr> {
    (proptest::collection::vec(1u8..=255, 1..40), bytes(300))
        .prop_map(|(name, value)| Xattr { name, value })
}

fn meta() -> impl Strategy<Value = Meta> {
    (
        0u32..=0o7777,
        any::<u32>(),
        any::<u32>(),
        any::<i64>(),
        0u32..1_000_000_000,
        proptest::collection::vec(xattr(), 0..4),
    )
        .prop_map(|(mode, uid, gid, mtime_sec, mtime_nsec, xattrs)| Meta {
            mode,
            uid,
            gid,
            mtime_sec,
            mtime_nsec,
            xattrs,
        })
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(size, hash)| Kind::File { size, hash }),
        Just(Kind::Dir),
        proptest::collection::vec(1u8..=255, 1..100).prop_map(|target| Kind::Symlink { target }),
        non_root().prop_map(|target| Kind::HardLink { target }),
        Just(Kind::Fifo),
        Just(Kind::Socket),
        any::<u64>().prop_map(|rdev| Kind::CharDev { rdev }),
        any::<u64>().prop_map(|rdev| Kind::BlockDev { rdev }),
        (page_size(), 0..=proto::MAX_DB_PAGES, any::<[u8; 32]>()).prop_map(
            |(page_size, pages, hash)| {
                Kind::Database {
                    page_size,
                    pages,
                    hash,
                }
            }
        ),
    ]
}

/// A valid SQLite page size.
fn page_size() -> impl Strategy<Value = u32> {
    (9u32..=16).prop_map(|s| 1 << s)
}

/// A valid entry: the root is a directory; a hard link is not to itself.
fn entry() -> impl Strategy<Value = Entry> {
    (rel_path(), kind(), meta()).prop_map(|(path, kind, meta)| {
        let kind = match kind {
            _ if path.is_root() => Kind::Dir,
            Kind::HardLink { target } if target == path => Kind::Fifo,
            k => k,
        };
        Entry { path, kind, meta }
    })
}

fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[ -~é\n]{0,60}").unwrap()
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::UnsupportedVersion),
        Just(ErrorCode::Protocol),
        Just(ErrorCode::Apply),
        Just(ErrorCode::Source),
        Just(ErrorCode::Other),
        Just(ErrorCode::Fenced),
    ]
}

/// Valid messages of every type.
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![files_and_rounds(), databases_and_roles()]
}

/// Databases, fencing and promotion (protocol version 2).
fn databases_and_roles() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<bool>(), text(), text(), any::<u32>(), any::<u64>()).prop_map(
            |(src, folder, sw, v, epoch)| {
                let mut h = Hello::new(if src { Role::Source } else { Role::Replica }, &folder)
                    .with_epoch(epoch);
                h.software = sw;
                h.version = v;
                Message::Hello(h)
            }
        ),
        (any::<u64>(), any::<[u8; 32]>())
            .prop_map(|(index, have)| Message::DbRequest { index, have }),
        Just(Message::DbNeedHashes),
        (
            prop_oneof![Just(0u32), page_size()],
            proptest::collection::vec(any::<[u8; 32]>(), 0..20),
            any::<bool>()
        )
            .prop_map(|(page_size, hashes, last)| Message::DbHashes {
                page_size,
                hashes,
                last
            }),
        proptest::collection::vec((1u32.., any::<u8>()), 0..3).prop_map(|pages| {
            Message::DbPages(pages.into_iter().map(|(n, b)| (n, vec![b; 512])).collect())
        }),
        (page_size(), 0..=proto::MAX_DB_PAGES, any::<[u8; 32]>()).prop_map(
            |(page_size, pages, hash)| {
                Message::DbEnd {
                    page_size,
                    pages,
                    hash,
                }
            }
        ),
        any::<u64>().prop_map(|epoch| Message::Promote { epoch }),
        (any::<u64>(), text()).prop_map(|(epoch, error)| Message::Promoted { epoch, error }),
        proptest::option::of(any::<[u8; 32]>()).prop_map(|digest| Message::TreeDigest { digest }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<[u8; 32]>()
        )
            .prop_map(|(id, entries, digest, root_hash)| Message::RoundSame {
                id,
                entries,
                digest,
                root_hash
            }),
        proptest::collection::vec(any::<u64>(), 1..=proto::MAX_BATCH_FILES)
            .prop_map(|indexes| Message::FilesRequest { indexes }),
    ]
}

/// Files and rounds.
fn files_and_rounds() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
            |(id, full, checksum, verify)| Message::RoundStart {
                id,
                full,
                checksum,
                verify,
            }
        ),
        (error_code(), text()).prop_map(|(code, message)| Message::Error { code, message }),
        proptest::collection::vec(entry(), 0..8).prop_map(Message::Manifest),
        proptest::collection::vec(non_root(), 0..8).prop_map(Message::Deleted),
        proptest::collection::vec((non_root(), non_root()), 0..8).prop_map(|pairs| {
            Message::Renamed(
                pairs
                    .into_iter()
                    .filter(|(a, b)| !b.starts_with(a))
                    .collect(),
            )
        }),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>()).prop_map(|(id, entries, root_hash)| {
            Message::RoundEnd {
                id,
                entries,
                root_hash,
            }
        }),
        (any::<u64>(), proptest::option::of(bytes(200)))
            .prop_map(|(index, signature)| Message::FileRequest { index, signature }),
        bytes(2000).prop_map(Message::Literal),
        bytes(2000).prop_map(Message::Delta),
        (any::<u64>(), any::<[u8; 32]>()).prop_map(|(size, hash)| Message::FileEnd { size, hash }),
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(text(), 0..4)
        )
            .prop_map(|(id, n, warnings)| Message::RoundDone {
                id,
                summary: ApplySummary {
                    files_transferred: n,
                    bytes_literal: n / 3,
                    warnings,
                    ..Default::default()
                },
            }),
        (any::<u64>(), bytes(2000)).prop_map(|(index, data)| Message::Inline { index, data }),
    ]
}

fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    frame::encode(msg, &mut buf).unwrap();
    buf
}

/// Whatever decodes re-encodes to a frame that decodes to the same message,
/// within bounds.
fn check_decoded(buf: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(Some((msg, used))) = frame::decode(buf) {
        prop_assert!(used <= buf.len());
        prop_assert!(msg.validate().is_ok());
        let again = encode(&msg);
        let (back, n) = frame::decode(&again).unwrap().unwrap();
        prop_assert_eq!(n, again.len());
        prop_assert_eq!(back, msg);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn valid_messages_round_trip(msg in message()) {
        prop_assert_eq!(msg.validate(), Ok(()));
        let buf = encode(&msg);
        let (back, used) = frame::decode(&buf).unwrap().unwrap();
        prop_assert_eq!(&back, &msg);
        prop_assert_eq!(used, buf.len());
        // a strict prefix is incomplete, never an error
        let cut = buf.len() / 2;
        prop_assert_eq!(frame::decode(&buf[..cut]).unwrap(), None);
        // two frames back to back decode one at a time
        let mut two = buf.clone();
        two.extend_from_slice(&buf);
        let (first, n) = frame::decode(&two).unwrap().unwrap();
        prop_assert_eq!(n, buf.len());
        prop_assert_eq!(first, msg);
    }

    /// Out of bounds on purpose (huge modes, nanoseconds, xattrs): the decoder
    /// refuses exactly what `validate` refuses.
    #[test]
    fn decoder_agrees_with_validate(
        e in entry(),
        mode in any::<u32>(),
        nsec in any::<u32>(),
        name_len in 0usize..300,
        value_len in prop_oneof![0usize..10, (MAX_XATTR_VALUE - 2)..(MAX_XATTR_VALUE + 2)],
        target in bytes(5000),
    ) {
        let mut e = e;
        e.meta.mode = mode;
        e.meta.mtime_nsec = nsec;
        e.meta.xattrs = vec![Xattr { name: vec![b'u'; name_len], value: vec![0; value_len] }];
        if !e.path.is_root() && target.len() % 3 == 0 {
            e.kind = Kind::Symlink { target };
        }
        let msg = Message::Manifest(vec![e]);
        let valid = msg.validate();
        let decoded = frame::decode(&encode(&msg));
        match valid {
            Ok(()) => prop_assert_eq!(decoded.unwrap().unwrap().0, msg),
            Err(why) => prop_assert_eq!(decoded, Err(FrameError::Invalid(why))),
        }
    }

    /// Valid frames with bytes flipped, cut out or put in: never a panic, and
    /// whatever still decodes is a valid message.
    #[test]
    fn mutated_frames_never_panic(
        msg in message(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    ) {
        let mut buf = encode(&msg);
        for (at, byte, op) in edits {
            if buf.len() <= HEADER_LEN {
                break;
            }
            let i = HEADER_LEN + at.index(buf.len() - HEADER_LEN);
            match op {
                0 => buf[i] ^= byte | 1,
                1 => { buf.remove(i); }
                _ => buf.insert(i, byte),
            }
        }
        // keep the header honest so that the body is what gets parsed
        let len = (buf.len() - HEADER_LEN) as u32;
        buf[..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        check_decoded(&buf)?;
    }

    /// Arbitrary bodies behind an honest header (a random header mostly says
    /// "incomplete" or "too large", so the body parser is exercised here).
    #[test]
    fn arbitrary_bodies_never_panic(body in bytes(2048)) {
        let mut buf = (body.len() as u32).to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        check_decoded(&buf)?;
    }

    /// Any bytes as a path: validated without a panic; what is accepted keeps
    /// its bytes, its components and its order against its parent.
    #[test]
    fn arbitrary_paths(raw in proptest::collection::vec(prop_oneof![Just(b'/'), Just(b'.'), Just(0u8), any::<u8>()], 0..300)) {
        if let Ok(p) = RelPath::new(raw.clone()) {
            prop_assert_eq!(p.as_bytes(), &raw[..]);
            prop_assert_eq!(p.components().collect::<Vec<_>>().join(&b'/'), raw.clone());
            prop_assert!(p.components().all(|c| !c.is_empty() && c != b"." && c != b".." && !c.contains(&0)));
            let _ = p.to_string();
            if let Some((parent, name)) = p.split_last() {
                prop_assert!(parent < p);
                prop_assert!(p.starts_with(&parent));
                prop_assert_eq!(parent.join(name).unwrap(), p.clone());
            }
        }
    }
}
