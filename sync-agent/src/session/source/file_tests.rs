//! Tests of serving a round's files (`file.rs`).

use super::*;

fn streamed(path: &Path) -> Vec<Message> {
    let (tx, mut rx) = mpsc::channel(1024);
    encode_file(path, (None, None), tx, &Progress::default()).unwrap();
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

/// A small file goes out as the stream would send it: the same literals
/// and end; one that grew past the bound since the scan is streamed, one
/// that is gone is announced as changed.
#[test]
fn a_small_file_is_read_whole_into_the_messages_a_stream_sends() {
    let d = tempfile::tempdir().unwrap();
    let chunk = delta::LITERAL_CHUNK;
    let cases: [(&str, Vec<u8>); 5] = [
        ("empty", Vec::new()),
        ("small", (0..70_000u32).map(|i| (i % 251) as u8).collect()),
        ("at-bound", vec![9u8; WHOLE as usize]),
        ("a-chunk-and-a-byte", vec![7u8; chunk + 1]),
        (
            "chunks",
            (0..5 * chunk / 2).map(|i| (i % 241) as u8).collect(),
        ),
    ];
    for (name, data) in &cases {
        let path = d.path().join(name);
        std::fs::write(&path, data).unwrap();
        let progress = Progress::default();
        let cap = WHOLE.max(data.len() as u64);
        let Whole::Messages(msgs) = read_whole(&path, cap, None, &progress).unwrap() else {
            panic!("{name}: not read whole");
        };
        assert_eq!(msgs, streamed(&path), "{name}");
        let sent: Vec<u8> = msgs
            .iter()
            .filter_map(|m| match m {
                Message::Literal(l) => Some(l.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(&sent, data, "{name}");
        let end = Message::FileEnd {
            size: data.len() as u64,
            hash: *blake3::hash(data).as_bytes(),
        };
        assert_eq!(msgs.last(), Some(&end), "{name}");
        assert_eq!(progress.files_done.load(Ordering::Relaxed), 1);
        assert_eq!(
            progress.bytes_done.load(Ordering::Relaxed),
            data.len() as u64
        );
    }
    let grown = d.path().join("grown");
    std::fs::write(&grown, vec![1u8; WHOLE as usize + 1]).unwrap();
    assert!(matches!(
        read_whole(&grown, WHOLE, None, &Progress::default()),
        Ok(Whole::Larger)
    ));
    let gone = d.path().join("gone");
    assert!(matches!(
        read_whole(&gone, WHOLE, None, &Progress::default()),
        Ok(Whole::Gone(_))
    ));
    std::os::unix::fs::symlink(d.path().join("small"), d.path().join("link")).unwrap();
    let link = d.path().join("link");
    assert!(matches!(
        read_whole(&link, WHOLE, None, &Progress::default()),
        Ok(Whole::Gone(_))
    ));
}

/// The end a small or streamed file's messages close with.
fn end_of(msgs: &[Message]) -> Message {
    msgs.last().cloned().unwrap()
}

/// A file whose inode has not changed since before the scan (its ctime
/// earlier than `since`) is sent with the scan's hash, not hashed again:
/// a stand-in hash that is not the content's comes back in its
/// `ScannedEnd`.
/// Changed at or after `since`, or of another size than scanned, it is
/// hashed as it is read; the same for a file streamed.
#[test]
fn a_file_unchanged_since_the_scan_is_sent_with_the_scans_hash() {
    use std::os::unix::fs::MetadataExt as _;
    let d = tempfile::tempdir().unwrap();
    let small: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    let large: Vec<u8> = (0..3 * delta::LITERAL_CHUNK as u32 + 7)
        .map(|i| (i % 247) as u8)
        .collect();
    let stand_in = [7u8; 32];
    for (name, data) in [("small", &small), ("large", &large)] {
        let path = d.path().join(name);
        std::fs::write(&path, data).unwrap();
        let st = std::fs::metadata(&path).unwrap();
        let ctime = i128::from(st.ctime()) * 1_000_000_000 + i128::from(st.ctime_nsec());
        let real = *blake3::hash(data).as_bytes();
        let size = data.len() as u64;
        let hashed = Message::FileEnd { size, hash: real };
        let cases = [
            (
                "unchanged since",
                ctime + 1,
                size,
                Message::ScannedEnd {
                    size,
                    hash: stand_in,
                },
            ),
            ("changed at the scan's start", ctime, size, hashed.clone()),
            ("of another size", ctime + 1, size + 1, hashed.clone()),
        ];
        for (case, since, scanned_size, want) in cases {
            let s = Scanned {
                size: scanned_size,
                hash: stand_in,
                since,
            };
            let whole = match read_whole(&path, u64::MAX - 1, Some(&s), &Progress::default()) {
                Ok(Whole::Messages(m)) => end_of(&m),
                _ => panic!("{name}, {case}: not read whole"),
            };
            let (tx, mut rx) = mpsc::channel(1024);
            encode_file(&path, (None, Some(s)), tx, &Progress::default()).unwrap();
            let streamed: Vec<Message> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
            for (how, end) in [("whole", whole), ("streamed", end_of(&streamed))] {
                assert_eq!(end, want, "{name}, {case}, {how}");
            }
        }
    }
    // an entry of a round whose scan's start is unknown is always hashed
    let e = Entry {
        path: proto::RelPath::new(b"small".to_vec()).unwrap(),
        kind: Kind::File {
            size: small.len() as u64,
            hash: stand_in,
        },
        meta: proto::Meta::default(),
    };
    assert!(Scanned::of(&e, None).is_none());
    let s = Scanned::of(&e, Some(1_000 * SCAN_MARGIN_NS)).unwrap();
    assert_eq!(
        (s.size, s.hash, s.since),
        (small.len() as u64, stand_in, 999 * SCAN_MARGIN_NS)
    );
}

/// Frames as a stream carries them, decoded.
fn decode_all(mut buf: &[u8]) -> Vec<Message> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let header: [u8; proto::frame::HEADER_LEN] =
            buf[..proto::frame::HEADER_LEN].try_into().unwrap();
        let len = proto::frame::frame_len(header).unwrap();
        let body = &buf[proto::frame::HEADER_LEN..proto::frame::HEADER_LEN + len];
        out.push(proto::frame::decode_body(body).unwrap());
        buf = &buf[proto::frame::HEADER_LEN + len..];
    }
    out
}

/// A files request's frames, read as the replica's machine reads them:
/// each file as it was scanned is committed with its content; one that
/// grew, went or became a symlink since the scan is announced as changed
/// and the next follows; the frames are handed over in chunks of at least
/// BATCH_CHUNK bytes, and reading stops when the stream is gone.
#[test]
fn a_files_request_is_read_in_order_and_checked_against_the_scan() {
    let d = tempfile::tempdir().unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 249) as u8).collect();
    let scanned: Vec<(&str, Vec<u8>)> = vec![
        ("a", b"alpha".to_vec()),
        ("grew", b"short".to_vec()),
        ("gone", b"gone".to_vec()),
        ("link", b"was a file".to_vec()),
        ("empty", Vec::new()),
        ("big1", big.clone()),
        ("big2", big.clone()),
        ("big3", big.clone()),
    ];
    for (name, data) in &scanned {
        std::fs::write(d.path().join(name), data).unwrap();
    }
    std::fs::write(d.path().join("grew"), b"short and then some").unwrap();
    std::fs::remove_file(d.path().join("gone")).unwrap();
    std::fs::remove_file(d.path().join("link")).unwrap();
    std::os::unix::fs::symlink(d.path().join("a"), d.path().join("link")).unwrap();
    let entries: Vec<Entry> = scanned
        .iter()
        .map(|(name, data)| Entry {
            path: proto::RelPath::new(name.as_bytes().to_vec()).unwrap(),
            kind: Kind::File {
                size: data.len() as u64,
                hash: *blake3::hash(data).as_bytes(),
            },
            meta: proto::Meta::default(),
        })
        .collect();
    let mut chunks = Vec::new();
    read_batch(d.path(), (&entries, None), &Progress::default(), &mut |c| {
        chunks.push(c);
        true
    })
    .unwrap();
    assert!(chunks.len() >= 2, "{} chunks", chunks.len());
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.len() >= BATCH_CHUNK)
    );
    let expect = entries
        .iter()
        .map(|e| match e.kind {
            Kind::File { size, hash } => (e.path.clone(), size, hash),
            _ => unreachable!(),
        })
        .collect();
    let mut fetch = proto::exchange::BatchFetch::new(expect);
    let mut got: Vec<(usize, &str, Vec<u8>)> = Vec::new();
    let mut data = Vec::new();
    for m in decode_all(&chunks.concat()) {
        match fetch.handle(m).unwrap() {
            (_, proto::exchange::BatchStep::Literal(l)) => data.extend(l),
            (at, proto::exchange::BatchStep::Commit { .. }) => {
                got.push((at, "commit", std::mem::take(&mut data)));
            }
            (at, proto::exchange::BatchStep::Changed(_)) => {
                got.push((at, "changed", std::mem::take(&mut data)));
            }
        }
    }
    assert!(fetch.done());
    let want = vec![
        (0, "commit", b"alpha".to_vec()),
        (1, "changed", Vec::new()),
        (2, "changed", Vec::new()),
        (3, "changed", Vec::new()),
        (4, "commit", Vec::new()),
        (5, "commit", big.clone()),
        (6, "commit", big.clone()),
        (7, "commit", big),
    ];
    assert_eq!(got, want);
    // the stream gone after the first chunk: nothing more is read
    let mut calls = 0;
    read_batch(
        d.path(),
        (&entries, None),
        &Progress::default(),
        &mut |_| {
            calls += 1;
            false
        },
    )
    .unwrap();
    assert_eq!(calls, 1);
}
