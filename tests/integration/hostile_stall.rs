//! Stalled peers (issue 10, item 2): whole stages are bounded, not only frames;
//! sends are bounded; a new pinned peer preempts a stalled session. After each,
//! a well-behaved push succeeds.

use crate::hostile_peer::*;
use crate::util::*;
use proto::{Hello, Message, Role};
use std::sync::Arc;
use std::time::{Duration, Instant};
use sync_agent::{Identity, tls};

fn good_tree(t: &Target) -> std::path::PathBuf {
    let src = t.t.path().join("good");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("after"), b"served after the stall").unwrap();
    src
}

/// Valid manifest frames, one a second, with a 3 s stage deadline: each frame
/// is in time, the round is not.
#[tokio::test]
async fn trickling_peer_is_cut_off_within_the_round_bound() {
    let mut t = Target::start_with(&[("UNDERSTUDY_STAGE_DEADLINE_SECS", "3")]);
    let before = snapshot(&t.outside);
    let mut p = t.connect().await;
    p.hello().await;
    p.send(&round_start(1, false)).await;
    let started = Instant::now();
    let mut refusal = None;
    for i in 0..15 {
        p.send(&Message::Manifest(vec![dir(&format!("slow{i:02}"))]))
            .await;
        if let Ok(m) = tokio::time::timeout(Duration::from_secs(1), read_msg(&mut p.recv)).await {
            refusal = Some(m);
            break;
        }
    }
    let elapsed = started.elapsed();
    match refusal {
        Some(Some(Message::Error { message, .. })) => {
            assert!(message.contains("took longer than its bound"), "{message}")
        }
        other => panic!("a trickling peer was not cut off in {elapsed:?}: {other:?}"),
    }
    assert!(
        elapsed < Duration::from_secs(8),
        "cut off after {elapsed:?}"
    );
    p.refused = true;
    p.close().await;
    println!("trickling peer cut off after {elapsed:?}");
    t.wait_session_errors(1).await;
    t.assert_clean(&before);
    t.push_ok(&good_tree(&t)).await;
}

/// A peer whose receive window is tiny and who never reads: the replica's
/// error to it cannot be sent. Another pinned peer's push still succeeds.
#[tokio::test]
async fn non_reading_peer_does_not_block_the_replica() {
    let deaf = Identity::generate().unwrap();
    let mut t = Target::start_pinning(&[("UNDERSTUDY_STAGE_DEADLINE_SECS", "3")], &[deaf.id()]);
    let before = snapshot(&t.outside);
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut cc = tls::client_config(&deaf, t.id).unwrap();
    let mut tc = quinn::TransportConfig::default();
    tc.stream_receive_window(64u32.into());
    tc.receive_window(64u32.into());
    cc.transport_config(Arc::new(tc));
    ep.set_default_client_config(cc);
    let conn = ep
        .connect(t.addr(), tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(&Message::Hello(Hello::new(
        Role::Source,
        "default",
    ))))
    .await
    .unwrap();
    assert!(matches!(read_msg(&mut recv).await, Some(Message::Hello(_))));
    // A round end out of place: the replica's error names it at length, more
    // than the 64 bytes this peer will ever take.
    send.write_all(&encode(&Message::RoundEnd {
        id: 9,
        entries: 0,
        root_hash: [0xee; 32],
    }))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    t.push_ok(&good_tree(&t)).await;
    println!(
        "push beside a non-reading peer done in {:?}",
        started.elapsed()
    );
    assert!(t.root.join("after").exists());
    drop((send, recv));
    conn.close(0u32.into(), b"");
    t.assert_clean(&before);
}

/// A session stalled in the middle of a round (the stage deadline is 60 s):
/// a second pinned peer's session preempts it after 10 s of silence.
#[tokio::test]
async fn second_session_preempts_a_stalled_first() {
    let other = Identity::generate().unwrap();
    let mut t = Target::start_pinning(&[("UNDERSTUDY_STAGE_DEADLINE_SECS", "60")], &[other.id()]);
    let before = snapshot(&t.outside);
    let mut p = Peer::connect(&other, t.id, t.addr()).await;
    p.hello().await;
    p.send(&round_start(1, false)).await;
    p.send(&Message::Manifest(vec![dir("stalled")])).await;
    let started = Instant::now();
    t.push_ok(&good_tree(&t)).await;
    let waited = started.elapsed();
    println!("second session took the folder after {waited:?}");
    assert!(waited < Duration::from_secs(18), "{waited:?}");
    assert!(
        t.log().contains("preempting a stalled session"),
        "{}",
        t.log()
    );
    // The stalled peer was closed with a reason.
    let reason = tokio::time::timeout(ANSWER, p.conn.closed()).await.unwrap();
    assert!(format!("{reason}").contains("preempted"), "{reason}");
    assert!(!t.root.join("stalled").exists());
    t.assert_clean(&before);
}
