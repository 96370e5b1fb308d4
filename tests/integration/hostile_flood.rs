//! Floods from a pinned peer: endless manifests, 64 KiB xattr values, the
//! deepest tree the protocol allows, thousands of streams, a trickle. Memory and
//! time stay bounded, the session is closed, the agent serves the next peer.
//! Each test prints the replica's peak RSS (VmHWM) for docs/SECURITY.md.

use crate::hostile_peer::*;
use crate::util::*;
use proto::{Entry, Message, RelPath, Xattr};
use std::time::{Duration, Instant};

fn good_tree(t: &Target) -> std::path::PathBuf {
    let src = t.t.path().join("good");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("after"), b"served after the flood").unwrap();
    src
}

/// Streams `frame` after a round start until the replica refuses; returns the
/// refusal and how many frames went.
async fn flood(p: &mut Peer, frame: &[u8], max: usize) -> (String, usize) {
    p.send(&round_start(1, false)).await;
    let mut sent = 0;
    while sent < max {
        if p.send.write_all(frame).await.is_err() {
            break;
        }
        sent += 1;
    }
    match p.expect().await {
        Message::Error { message, .. } => (message, sent),
        other => panic!("the replica answered {other:?}"),
    }
}

#[tokio::test]
async fn ten_million_entries_announced() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let started = Instant::now();
    let mut p = t.connect().await;
    p.hello().await;
    // The smallest entries: directories with 7-byte names; 10^7 of them would
    // be 2,442 batches of 4,096. The names are scrambled so that a packed
    // batch stays large on the wire: the sender then feels the replica's
    // refusal through flow control (a batch of look-alike names packs so
    // small that the whole flood fits in the windows before the refusal
    // arrives; the replica refuses at the same entry either way).
    let batch: Vec<Entry> = (0..proto::MAX_ENTRIES_PER_BATCH as u64)
        .map(|i| {
            dir(&format!(
                "{:07x}",
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 36
            ))
        })
        .collect();
    let frame = encode(&Message::Manifest(batch));
    let (msg, sent) = flood(
        &mut p,
        &frame,
        10_000_000 / proto::MAX_ENTRIES_PER_BATCH + 1,
    )
    .await;
    p.close().await;
    assert!(msg.contains("larger than"), "{msg}");
    assert!(
        sent < 10_000_000 / proto::MAX_ENTRIES_PER_BATCH,
        "refused only after {sent} batches"
    );
    let rss = t.peak_rss_kib();
    println!(
        "10^7 entries announced: refused after {} entries in {:?}, replica peak RSS {} MiB",
        sent * proto::MAX_ENTRIES_PER_BATCH,
        started.elapsed(),
        rss >> 10
    );
    t.assert_clean(&before);
    t.push_ok(&good_tree(&t)).await;
    assert!(t.root.join("after").exists());
}

#[tokio::test]
async fn xattr_values_of_64_kib() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let started = Instant::now();
    let mut p = t.connect().await;
    p.hello().await;
    // 15 values of 64 KiB per entry (the 1 MiB per entry limit), 15 entries
    // per frame (the 16 MiB frame limit).
    let xattrs: Vec<Xattr> = (0..15)
        .map(|i| Xattr {
            name: format!("user.flood{i:02}").into_bytes(),
            value: vec![i as u8; proto::MAX_XATTR_VALUE],
        })
        .collect();
    let batch: Vec<Entry> = (0..15)
        .map(|i| {
            let mut e = dir(&format!("x{i:02}"));
            e.meta.xattrs = xattrs.clone();
            e
        })
        .collect();
    let frame = encode(&Message::Manifest(batch));
    assert!(frame.len() < proto::MAX_FRAME_LEN);
    let (msg, sent) = flood(&mut p, &frame, 200).await;
    p.close().await;
    assert!(msg.contains("larger than"), "{msg}");
    let rss = t.peak_rss_kib();
    println!(
        "64 KiB xattr values: refused after {} MiB in {:?}, replica peak RSS {} MiB",
        (sent * frame.len()) >> 20,
        started.elapsed(),
        rss >> 10
    );
    t.assert_clean(&before);
    t.push_ok(&good_tree(&t)).await;
}

/// The deepest directory chain a path may name (2,048 components of `a`,
/// 4,095 bytes): made by a hostile source, then removed by a full round. The
/// replica's scan and recursive delete must not overflow their stacks.
#[tokio::test]
async fn deepest_tree_made_and_removed() {
    // 1,900 levels: the absolute path on the replica stays under PATH_MAX
    deep_tree(1900).await;
}

/// At the very limit (2,048 components, 4,095 bytes): with the root's own path
/// in front, past PATH_MAX; the replica refuses it cleanly before making
/// anything (its scans go by absolute path), and the folder is not wedged.
#[tokio::test]
async fn deepest_tree_at_the_path_limit() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let mut entries = vec![dir("")];
    let mut path = String::new();
    for _ in 0..2048 {
        if !path.is_empty() {
            path.push('/');
        }
        path.push('a');
        entries.push(dir(&path));
    }
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(1, true, entries)).await;
    let m = p.expect().await;
    p.close().await;
    match m {
        Message::Error { message, .. } => {
            assert!(
                message.contains("too long for this replica root"),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(!t.root.join("a").exists());
    // The folder still serves.
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(2, true, vec![dir("")])).await;
    let m = p.expect().await;
    p.close().await;
    assert!(matches!(m, Message::RoundDone { .. }), "{m:?}");
    t.assert_clean(&before);
}

async fn deep_tree(depth: usize) {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let mut entries = vec![dir("")];
    let mut path = String::new();
    for _ in 0..depth {
        if !path.is_empty() {
            path.push('/');
        }
        path.push('a');
        entries.push(dir(&path));
    }
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(1, true, entries)).await;
    let m = p.expect().await;
    p.close().await;
    assert!(matches!(m, Message::RoundDone { .. }), "{m:?}");
    // (the whole path is over PATH_MAX from /: count the levels with find)
    let levels = sh(&format!("find {} -type d | wc -l", t.root.display()));
    assert_eq!(levels.trim(), format!("{}", depth + 1));
    // Past the limit is refused on decode.
    let too_deep = "a/".repeat(2048) + "a";
    assert!(RelPath::new(too_deep.as_bytes()).is_err());
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(2, true, vec![dir("")])).await;
    let m = p.expect().await;
    p.close().await;
    assert!(matches!(m, Message::RoundDone { .. }), "{m:?}");
    assert!(!t.root.join("a").exists());
    println!(
        "{depth}-deep tree made and removed, replica peak RSS {} MiB",
        t.peak_rss_kib() >> 10
    );
    t.assert_clean(&before);
}

/// 10,000 streams opened by a source, each left hanging inside its first
/// frame (a whole malformed frame on a stream would end the session: a
/// stage stream that breaks the protocol does): QUIC's stream limit stops
/// them, the session goes on.
#[tokio::test]
async fn ten_thousand_streams() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let mut p = t.connect().await;
    p.hello().await;
    let (mut opened, mut blocked) = (0, 0);
    let mut streams = Vec::new();
    for _ in 0..10_000 {
        match tokio::time::timeout(Duration::from_millis(20), p.conn.open_bi()).await {
            Ok(Ok((mut s, r))) => {
                // two bytes of a frame's four-byte length: an open stream, unfinished
                let _ = s.write_all(&[0, 0]).await;
                streams.push((s, r));
                opened += 1;
            }
            Ok(Err(e)) => panic!("connection lost: {e}"),
            Err(_) => {
                blocked += 1;
                if blocked >= 10 {
                    break;
                }
            }
        }
    }
    assert!(opened <= 64, "{opened} streams open at once");
    // The session still works.
    p.send_raw(&round(1, false, vec![dir("still-serving")]))
        .await;
    let m = p.expect().await;
    assert!(matches!(m, Message::RoundDone { .. }), "{m:?}");
    p.close().await;
    println!(
        "10,000 streams: {opened} opened, the rest blocked by the stream limit; replica peak RSS {} MiB",
        t.peak_rss_kib() >> 10
    );
    t.assert_clean(&before);
    t.push_ok(&good_tree(&t)).await;
}

/// A peer sending one byte a second, in the middle of a frame: closed after the
/// stage deadline, and the folder served again.
#[tokio::test]
async fn one_byte_a_second() {
    let mut t = Target::start_with(&[("UNDERSTUDY_STAGE_DEADLINE_SECS", "2")]);
    let before = snapshot(&t.outside);
    let mut p = t.connect().await;
    p.hello().await;
    let mut frames = encode(&round_start(1, false));
    frames.extend(encode(&Message::Manifest(vec![dir("slow")])));
    let started = Instant::now();
    let mut closed = false;
    for b in frames {
        if p.send.write_all(&[b]).await.is_err() {
            closed = true;
            break;
        }
        if let Ok(Some(m)) =
            tokio::time::timeout(Duration::from_secs(1), read_msg(&mut p.recv)).await
        {
            assert!(matches!(m, Message::Error { .. }), "{m:?}");
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickling peer was never closed");
    assert!(started.elapsed() < Duration::from_secs(15));
    t.wait_session_errors(1).await;
    t.assert_clean(&before);
    t.push_ok(&good_tree(&t)).await;
}
