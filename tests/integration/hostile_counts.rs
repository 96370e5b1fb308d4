//! Absurd counts and sizes from a pinned source, in every message type that
//! carries one (on the control stream and on a database stream) (issue 10, item 1): each is refused before anything is sized
//! from it, the error names the field, the agent stays alive and small, and a
//! well-behaved push succeeds afterwards.

use crate::hostile_peer::*;
use crate::util::*;
use proto::{Entry, Kind, Message, RelPath};
use std::time::{Duration, Instant};

fn db(path: &str, page_size: u32, pages: u32) -> Entry {
    Entry {
        path: RelPath::new(path.as_bytes()).unwrap(),
        kind: Kind::Database {
            page_size,
            pages,
            hash: [9; 32],
        },
        meta: meta(0o644),
    }
}

fn good_tree(t: &Target) -> std::path::PathBuf {
    let src = t.t.path().join("good");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("after"), b"served after the counts").unwrap();
    src
}

/// Sends `frames` after a hello and returns the replica's refusal.
async fn refusal(t: &Target, frames: &[u8]) -> String {
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(frames).await;
    let m = p.expect().await;
    p.close().await;
    match m {
        Message::Error { message, .. } => message,
        other => panic!("the replica answered {other:?}"),
    }
}

/// A partial round announcing `entries` whose one database stream is answered
/// with `answer`; returns the replica's refusal.
async fn db_refusal(
    t: &Target,
    entries: Vec<Entry>,
    answer: Vec<Message>,
    wait: Duration,
) -> String {
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(1, false, entries)).await;
    let (mut send, mut recv) = tokio::time::timeout(ANSWER, p.conn.accept_bi())
        .await
        .expect("no database request (hang)")
        .expect("connection lost");
    let req = read_msg(&mut recv).await;
    assert!(matches!(req, Some(Message::DbRequest { .. })), "{req:?}");
    for m in &answer {
        if send.write_all(&encode(m)).await.is_err() {
            break;
        }
    }
    // Removing a large sparse staging file can take the filesystem a while.
    let m = tokio::time::timeout(wait, read_msg(&mut p.recv))
        .await
        .expect("the replica did not answer (hang)")
        .expect("the replica closed without answering");
    p.refused = true;
    p.close().await;
    match m {
        Message::Error { message, .. } => message,
        other => panic!("the replica answered {other:?}"),
    }
}

fn frames(msgs: &[Message]) -> Vec<u8> {
    msgs.iter().flat_map(encode).collect()
}

/// Control-stream frames with absurd counts, and what the refusal must say.
fn control_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let many = proto::MAX_ENTRIES_PER_BATCH + 1;
    let path = |i: usize| RelPath::new(format!("p{i}").as_bytes()).unwrap();
    let start = round_start(1, false);
    vec![
        (
            "database of u32::MAX pages of 64 KiB",
            frames(&[
                start.clone(),
                Message::Manifest(vec![db("a.db", 65536, u32::MAX)]),
            ]),
            "entry a.db: database of 4294967295 pages",
        ),
        (
            "database of 50,000,000 pages of 512 B",
            frames(&[
                start.clone(),
                Message::Manifest(vec![db("a.db", 512, 50_000_000)]),
            ]),
            "entry a.db: database of 50000000 pages",
        ),
        (
            "two largest databases in one round",
            frames(&[
                start.clone(),
                Message::Manifest(vec![
                    db("a.db", 512, proto::MAX_DB_PAGES),
                    db("b.db", 512, proto::MAX_DB_PAGES),
                ]),
                Message::RoundEnd {
                    id: 1,
                    entries: 2,
                    root_hash: [0; 32],
                },
            ]),
            "database page tables",
        ),
        (
            "manifest batch over the bound",
            frames(&[
                start.clone(),
                Message::Manifest((0..many).map(|i| dir(&format!("d{i}"))).collect()),
            ]),
            "manifest batch of 4097 entries",
        ),
        (
            "deletions over the bound",
            frames(&[
                start.clone(),
                Message::Deleted((0..many).map(path).collect()),
            ]),
            "4097 deletions",
        ),
        (
            "renames over the bound",
            frames(&[
                start.clone(),
                Message::Renamed((0..many).map(|i| (path(i), path(i + many))).collect()),
            ]),
            "4097 renames",
        ),
        (
            "round end announcing u64::MAX entries",
            frames(&[
                start.clone(),
                Message::Manifest(vec![dir("x")]),
                Message::RoundEnd {
                    id: 1,
                    entries: u64::MAX,
                    root_hash: [0; 32],
                },
            ]),
            "18446744073709551615 entries announced",
        ),
        (
            "inline content over the bound",
            frames(&[
                start.clone(),
                Message::Inline {
                    index: u64::MAX,
                    data: vec![0; proto::MAX_INLINE + 1],
                },
            ]),
            "inline content of 65537 bytes",
        ),
        (
            "database end of u32::MAX pages on the control stream",
            frames(&[
                start.clone(),
                Message::DbEnd {
                    page_size: 65536,
                    pages: u32::MAX,
                    hash: [0; 32],
                },
            ]),
            "database end: database of 4294967295 pages",
        ),
    ]
}

#[tokio::test]
async fn absurd_counts_on_the_control_stream_are_refused() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let control = control_cases();
    for (what, bytes, want) in control {
        let msg = refusal(&t, &bytes).await;
        assert!(msg.contains(want), "{what}: {msg}");
        assert!(t.alive(), "{what}: the agent died:\n{}", t.log());
    }
    let rss = t.peak_rss_kib();
    println!(
        "absurd counts on the control stream: all refused, replica peak RSS {} MiB",
        rss >> 10
    );
    assert!(rss < 256 << 10, "peak RSS {} MiB", rss >> 10);
    t.assert_clean(&before);
    t.push_ok(&good_tree(&t)).await;
    assert!(t.root.join("after").exists());
}

/// On a database stream: pages, page numbers and the end.
#[tokio::test]
async fn absurd_counts_on_a_database_stream_are_refused() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let small = || vec![db("app.db", 512, 4)];
    let page = |n: u32| (n, vec![0u8; 512]);
    let streams: Vec<(&str, Vec<Message>, &str)> = vec![
        (
            "a batch over the bound",
            vec![Message::DbPages((1..=1025).map(page).collect())],
            "1025 pages in one batch",
        ),
        (
            "page u32::MAX",
            vec![Message::DbPages(vec![page(u32::MAX)])],
            "page 4294967295 of 512 bytes for a database of 4 pages",
        ),
        (
            "the same page, over and over",
            vec![Message::DbPages(vec![
                page(1),
                page(1),
                page(1),
                page(1),
                page(1),
            ])],
            "more pages sent than the 4 the database has",
        ),
        (
            "a run from page u32::MAX",
            vec![Message::DbRun {
                first: u32::MAX,
                data: vec![0; 1024],
            }],
            "page 4294967295 of 1024 bytes for a database of 4 pages",
        ),
        (
            "a run past the database's end",
            vec![Message::DbRun {
                first: 3,
                data: vec![0; 3 * 512],
            }],
            "page 3 of 1536 bytes for a database of 4 pages",
        ),
        (
            "a run of part of a page",
            vec![Message::DbRun {
                first: 1,
                data: vec![0; 700],
            }],
            "page 1 of 700 bytes",
        ),
        (
            "runs over the same pages, over and over",
            vec![
                Message::DbRun {
                    first: 1,
                    data: vec![0; 4 * 512],
                },
                Message::DbRun {
                    first: 1,
                    data: vec![0; 512],
                },
            ],
            "more pages sent than the 4 the database has",
        ),
        (
            "an end of u32::MAX pages",
            vec![Message::DbEnd {
                page_size: 512,
                pages: u32::MAX,
                hash: [0; 32],
            }],
            "database of 4294967295 pages",
        ),
        (
            "an end that does not match the round",
            vec![Message::DbEnd {
                page_size: 512,
                pages: 5,
                hash: [9; 32],
            }],
            "does not match the round",
        ),
    ];
    for (what, answer, want) in streams {
        let msg = db_refusal(&t, small(), answer, ANSWER).await;
        assert!(msg.contains(want), "{what}: {msg}");
        assert!(t.alive(), "{what}: the agent died:\n{}", t.log());
    }
    let rss = t.peak_rss_kib();
    println!(
        "absurd counts on a database stream: all refused, replica peak RSS {} MiB",
        rss >> 10
    );
    assert!(rss < 256 << 10, "peak RSS {} MiB", rss >> 10);
    t.assert_clean(&before);
    t.push_ok(&good_tree(&t)).await;
    assert!(t.root.join("after").exists());
}

/// The largest database a round may announce (MAX_DB_PAGES pages of 512 B),
/// whose page table the source then makes the replica fill: one page in every
/// 128 touches every 4 KiB of the table. Peak RSS is the bound's price.
#[tokio::test]
async fn largest_allowed_database_announcement() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let started = Instant::now();
    let pages = proto::MAX_DB_PAGES;
    let batches: Vec<Message> = (1..=pages)
        .step_by(128)
        .collect::<Vec<u32>>()
        .chunks(proto::MAX_PAGES_PER_BATCH)
        .map(|c| Message::DbPages(c.iter().map(|&n| (n, vec![1u8; 512])).collect()))
        .chain([Message::DbEnd {
            page_size: 512,
            pages,
            hash: [9; 32],
        }])
        .collect();
    let msg = db_refusal(
        &t,
        vec![db("big.db", 512, pages)],
        batches,
        Duration::from_secs(180),
    )
    .await;
    assert!(msg.contains("never arrived"), "{msg}");
    let rss = t.peak_rss_kib();
    println!(
        "largest allowed database ({pages} pages of 512 B, every 128th sent): refused in {:?}, replica peak RSS {} MiB",
        started.elapsed(),
        rss >> 10
    );
    // 32 bytes a page of hashes (512 MiB) and a bit a page; nothing more.
    let table = (u64::from(pages) * sync_agent::session::DB_PAGE_BYTES) >> 10;
    assert!(rss < table + (128 << 10), "peak RSS {} MiB", rss >> 10);
    t.assert_clean(&before);
    t.push_ok(&good_tree(&t)).await;
}
