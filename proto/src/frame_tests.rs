//! Packed manifest batches: smaller on the wire, the same above the frame
//! layer, and a hostile packed frame is refused before it costs memory.

use super::*;
use crate::{Entry, Kind, Meta, RelPath};

/// 32 bytes that do not compress (as content hashes do not).
fn noise(seed: u64) -> [u8; 32] {
    let mut x = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    std::array::from_fn(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x >> 24) as u8
    })
}

fn batch(n: usize) -> Vec<Entry> {
    (0..n)
        .map(|i| Entry {
            path: RelPath::new(format!(
                "metadata/library/{:02x}/item-{i:06}/poster.jpg",
                i % 256
            ))
            .expect("a valid path"),
            kind: Kind::File {
                size: 20_000 + i as u64,
                hash: noise(i as u64),
            },
            meta: Meta {
                mode: 0o644,
                uid: 1000,
                gid: 1000,
                mtime_sec: 1_700_000_000,
                mtime_nsec: 0,
                xattrs: Vec::new(),
            },
        })
        .collect()
}

fn frame_of(msg: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out).expect("encodes");
    out
}

/// A raw frame of `msg` exactly as given (no packing).
fn raw_frame(msg: &Message) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(msg, config()).expect("encodes");
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    out
}

#[test]
fn a_manifest_batch_travels_packed_and_arrives_as_it_was() {
    let m = Message::Manifest(batch(4096));
    let packed = frame_of(&m);
    let plain = raw_frame(&m);
    assert!(
        packed.len() * 2 < plain.len(),
        "packed {} bytes, plain {}",
        packed.len(),
        plain.len()
    );
    let (back, used) = decode(&packed).expect("decodes").expect("complete");
    assert_eq!(used, packed.len());
    assert_eq!(back, m);
    // a small batch travels as it is, and so do other messages
    let small = Message::Manifest(batch(3));
    assert_eq!(frame_of(&small), raw_frame(&small));
}

fn refused(msg: &Message, needle: &str) {
    let e = decode(&raw_frame(msg)).expect_err("refused").to_string();
    assert!(e.contains(needle), "{e} lacks {needle:?}");
}

#[test]
fn hostile_packed_manifests_are_refused() {
    let raw = bincode::serde::encode_to_vec(batch(100), config()).expect("encodes");
    let data = zstd::bulk::compress(&raw, 3).expect("compresses");
    // announcing more than a frame may hold: refused before inflating
    refused(
        &Message::ManifestPacked {
            raw_len: (MAX_FRAME_LEN + 1) as u32,
            data: data.clone(),
        },
        "over the",
    );
    // inflating past what it announced (a bomb): refused at the bound
    refused(
        &Message::ManifestPacked {
            raw_len: (raw.len() / 2) as u32,
            data: data.clone(),
        },
        "packed manifest",
    );
    // inflating to less than announced
    refused(
        &Message::ManifestPacked {
            raw_len: raw.len() as u32 + 10,
            data: data.clone(),
        },
        "not the",
    );
    // not zstd at all
    refused(
        &Message::ManifestPacked {
            raw_len: 100,
            data: vec![7; 100],
        },
        "packed manifest",
    );
    // a well-formed pack whose entries break a bound: validated as a manifest
    let mut bad = batch(10);
    bad[3].kind = Kind::Symlink { target: Vec::new() };
    let raw = bincode::serde::encode_to_vec(&bad, config()).expect("encodes");
    refused(
        &Message::ManifestPacked {
            raw_len: raw.len() as u32,
            data: zstd::bulk::compress(&raw, 3).expect("compresses"),
        },
        "malformed",
    );
}

/// A run of pages travels as its bytes once (not a length and a copy per
/// page), its frame is written into a buffer sized for it from the start,
/// and it arrives as it was sent.
#[test]
fn a_run_of_pages_travels_as_one_buffer() {
    let data: Vec<u8> = (0..64 * 4096u32).map(|i| (i % 251) as u8).collect();
    let m = Message::DbRun {
        first: 7,
        data: data.clone(),
    };
    assert_eq!(payload_len(&m), data.len());
    let mut out = Vec::new();
    encode(&m, &mut out).expect("encodes");
    // tag, page number, length: a few bytes beyond the images
    assert!(
        out.len() - data.len() <= HEADER_LEN + 16,
        "{} bytes",
        out.len()
    );
    assert!(
        out.capacity() <= out.len() + 64 + HEADER_LEN,
        "grown past its size"
    );
    assert_eq!(&out[out.len() - data.len()..], &data[..]);
    let (back, used) = decode(&out).expect("decodes").expect("complete");
    assert_eq!((back, used), (m, out.len()));
    // the same pages one by one cost a length each
    let pages = Message::DbPages(
        data.chunks(4096)
            .zip(7u32..)
            .map(|(d, n)| (n, d.to_vec()))
            .collect(),
    );
    assert!(frame_of(&pages).len() > out.len() + 64 * 3);
}

/// The newest message type (the last variant) travels and arrives as it was
/// sent; a tag past it is named an unknown type, not garbage.
#[test]
fn the_last_message_type_is_known_and_the_next_is_not() {
    let m = Message::ScannedEnd {
        size: 12,
        hash: [5; 32],
    };
    let out = frame_of(&m);
    assert_eq!(decode(&out).expect("decodes"), Some((m, out.len())));
    let mut body = Vec::new();
    bincode::encode_into_std_write(
        crate::message::MESSAGE_TYPES,
        &mut body,
        bincode::config::standard(),
    )
    .unwrap();
    assert_eq!(decode_body(&body), Err(FrameError::UnknownType));
}

fn enc<T: serde::Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
}

/// Byte strings encode exactly as the sequences of `u8` they replaced: the
/// wire format is unchanged, only read and written in one copy.
#[test]
fn byte_fields_encode_as_sequences_of_u8() {
    let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let as_seq = enc(&data);
    let lit = enc(&Message::Literal(data.clone()));
    assert_eq!(&lit[lit.len() - as_seq.len()..], &as_seq[..]);
    let pages = vec![(7u32, data.clone()), (9, vec![1, 2, 3])];
    let db = enc(&Message::DbPages(pages.clone()));
    let seq = enc(&pages);
    assert_eq!(&db[db.len() - seq.len()..], &seq[..]);
    let path = RelPath::new(b"a/b.txt".to_vec()).unwrap();
    assert_eq!(enc(&path), enc(&b"a/b.txt".to_vec()));
    let back: (Message, usize) =
        bincode::serde::decode_from_slice(&db, bincode::config::standard()).unwrap();
    assert_eq!(back.0, Message::DbPages(pages));
}
