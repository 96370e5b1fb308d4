//! A pinned but hostile replica against a source: signatures with a zero block
//! size, absurd strong-hash sizes, 10^6 blocks sharing one weak hash, requests
//! for entries that are not regular files of the round. The source refuses
//! each request without content and without a hang, and keeps serving the
//! others.

use crate::hostile_peer::*;
use crate::util::*;
use proto::{Kind, Message};
use std::time::Instant;

/// A signature header: magic, block size, strong-hash size.
fn header(block: u32, strong: u32) -> Vec<u8> {
    [
        &0x7273_0136u32.to_be_bytes()[..],
        &block.to_be_bytes(),
        &strong.to_be_bytes(),
    ]
    .concat()
}

#[tokio::test]
async fn hostile_signatures_and_requests_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("dir")).unwrap();
    let big = random_bytes(256 << 10, 5);
    std::fs::write(src.join("big"), &big).unwrap();
    std::fs::write(src.join("zeros"), vec![0u8; 4 << 20]).unwrap();
    let h = HostileReplica::start(&src);
    let (conn, mut ctl, entries) = h.accept_round().await;
    let index = |name: &str| {
        entries
            .iter()
            .position(|e| e.path.as_bytes() == name.as_bytes())
            .unwrap() as u64
    };
    let (big_i, zeros_i, dir_i) = (index("big"), index("zeros"), index("dir"));
    assert!(matches!(entries[big_i as usize].kind, Kind::File { .. }));

    // A valid signature's blocks with a hostile header.
    let blocks = |strong: usize, n: usize| vec![0x5au8; (4 + strong) * n];
    let cases: Vec<(&str, u64, Option<Vec<u8>>)> = vec![
        (
            "block size 0",
            big_i,
            Some([header(0, 8), blocks(8, 64)].concat()),
        ),
        (
            "block size 1",
            big_i,
            Some([header(1, 8), blocks(8, 64)].concat()),
        ),
        (
            "block size 2^31",
            big_i,
            Some([header(1 << 31, 8), blocks(8, 1)].concat()),
        ),
        (
            "strong hash 17",
            big_i,
            Some([header(4096, 17), blocks(17, 64)].concat()),
        ),
        (
            "strong hash 0",
            big_i,
            Some([header(4096, 0), blocks(0, 64)].concat()),
        ),
        ("strong hash 2^32-1", big_i, Some(header(4096, u32::MAX))),
        (
            "truncated blocks",
            big_i,
            Some([header(4096, 8), vec![1; 13]].concat()),
        ),
        ("short header", big_i, Some(vec![0x72, 0x73, 1])),
        (
            "unknown magic",
            big_i,
            Some([&[0u8; 4][..], &header(4096, 8)[4..]].concat()),
        ),
        ("a directory", dir_i, None),
        ("the root", 0, None),
        ("beyond the round", entries.len() as u64, None),
        ("u64::MAX", u64::MAX, None),
    ];
    assert_eq!(cases.len(), 13);
    let mut asks: Vec<(&str, Message)> = cases
        .into_iter()
        .map(|(case, index, signature)| (case, Message::FileRequest { index, signature }))
        .collect();
    // Files requests: refused whole if one index is not a small regular file
    // of the round, or they name none or too many.
    let files = |indexes: Vec<u64>| Message::FilesRequest { indexes };
    asks.extend([
        ("a directory among files", files(vec![big_i, dir_i])),
        ("a file over the batch bound", files(vec![big_i, zeros_i])),
        ("beyond the round", files(vec![big_i, entries.len() as u64])),
        ("none", files(vec![])),
        ("too many", files(vec![big_i; proto::MAX_BATCH_FILES + 1])),
    ]);
    for (case, m) in &asks {
        let got = request_msg(&conn, m)
            .await
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert!(
            !got.iter()
                .any(|m| matches!(m, Message::Literal(_) | Message::Delta(_))),
            "{case}: the source sent content: {got:?}"
        );
    }
    // A fair one: each file's content then its end, in the order asked.
    let got = request_msg(&conn, &files(vec![big_i, big_i]))
        .await
        .unwrap();
    let ends = got
        .iter()
        .filter(|m| matches!(m, Message::FileEnd { .. }))
        .count();
    let sent: usize = got
        .iter()
        .map(|m| match m {
            Message::Literal(l) => l.len(),
            _ => 0,
        })
        .sum();
    assert_eq!((ends, sent), (2, 2 * big.len()));

    // 10^6 blocks sharing the weak hash of the zero file's blocks, each with
    // another strong hash: the source's diff stays linear (fast_rsync caps CRC
    // collisions) and the answer rebuilds the file.
    let zero_crc = {
        let sig = sync_core::delta::signature(&[0u8; 512]);
        sig[12..16].to_vec()
    };
    let mut sig = header(512, 8);
    sig.reserve(12 << 20);
    for b in 0u64..1_000_000 {
        sig.extend_from_slice(&zero_crc);
        sig.extend_from_slice(&(b | 1 << 63).to_be_bytes());
    }
    let started = Instant::now();
    let got = request(&conn, zeros_i, Some(sig)).await.unwrap();
    let took = started.elapsed();
    let mut out = Vec::new();
    for m in &got {
        match m {
            Message::Delta(d) => {
                sync_core::delta::apply_delta(&[], d, &mut out, sync_core::delta::WINDOW).unwrap();
            }
            Message::Literal(l) => out.extend_from_slice(l),
            _ => {}
        }
    }
    assert_eq!(out.len(), 4 << 20, "{got:?}");
    assert!(
        took.as_secs() < 15,
        "10^6 colliding blocks took {took:?} to diff 4 MiB"
    );
    println!("10^6 blocks with one weak hash: 4 MiB diffed in {took:?}");

    // Still serving: the plain request gets the whole file.
    let got = request(&conn, big_i, None).await.unwrap();
    let content: Vec<u8> = got
        .iter()
        .filter_map(|m| match m {
            Message::Literal(l) => Some(l.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(content, big);
    assert!(matches!(got.last(), Some(Message::FileEnd { .. })));

    // The replica gives up: the push ends with its error, without a panic.
    ctl.send
        .write_all(&encode(&Message::Error {
            code: proto::ErrorCode::Apply,
            message: "hostile replica gives up".into(),
        }))
        .await
        .unwrap();
    let res = tokio::time::timeout(ANSWER, h.push).await.unwrap().unwrap();
    let e = format!("{:#}", res.unwrap_err());
    assert!(e.contains("hostile replica gives up"), "{e}");
}

/// A hostile replica answering the source's request for page hashes with
/// endless batches: the source stops after the most batches `MAX_DB_PAGES`
/// takes and ends the stream, instead of reading them forever.
#[tokio::test]
async fn endless_page_hash_batches_refused() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let c = rusqlite::Connection::open(src.join("app.db")).unwrap();
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    let h = HostileReplica::start(&src);
    let (conn, _ctl, entries) = h.accept_round().await;
    let db = entries
        .iter()
        .position(|e| matches!(e.kind, Kind::Database { .. }))
        .expect("the database in the round") as u64;
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let req = Message::DbRequest {
        index: db,
        have: [7; 32],
    };
    send.write_all(&encode(&req)).await.unwrap();
    let asked = read_msg(&mut recv).await;
    assert!(matches!(asked, Some(Message::DbNeedHashes)), "{asked:?}");
    let batch = encode(&Message::DbHashes {
        page_size: 4096,
        hashes: Vec::new(),
        last: false,
    });
    let most = (proto::MAX_DB_PAGES as usize).div_ceil(proto::MAX_HASHES_PER_BATCH) + 1;
    for _ in 0..most + 10 {
        if send.write_all(&batch).await.is_err() {
            break;
        }
    }
    let got = tokio::time::timeout(ANSWER, read_msg(&mut recv))
        .await
        .expect("the source kept reading page hashes (hang)");
    assert!(got.is_none(), "the source answered {got:?}");
}
