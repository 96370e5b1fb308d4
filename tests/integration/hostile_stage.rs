//! A pinned but hostile source against a real `sync-agent replica`, on the
//! bulk lane's stage streams (`StageFile`, content, `FileEnd`): a stream that
//! breaks the protocol ends the session, as a broken control stream does (an
//! `Error` on the stream, the connection closed, the log naming the peer and
//! the stream); content that outgrows its announced size is what an honest
//! source sends for a file that grew while it was read: that stage alone is
//! refused, the session goes on. Nothing is left behind either way.

use crate::hostile_peer::*;
use crate::util::*;
use proto::{ErrorCode, Message, RelPath};

fn stage_file(path: &str, size: u64) -> Message {
    Message::StageFile {
        path: RelPath::new(path.as_bytes()).unwrap(),
        size,
    }
}

fn end(data: &[u8]) -> Message {
    Message::FileEnd {
        size: data.len() as u64,
        hash: *blake3::hash(data).as_bytes(),
    }
}

/// Opens a stage stream after a hello, sends `first`, and (when `then` is
/// not empty) reads the basis and sends `then`: the replica's answer.
async fn stage(p: &mut Peer, first: &[u8], then: &[Message]) -> Message {
    let (mut send, mut recv) = p.conn.open_bi().await.unwrap();
    send.write_all(first).await.unwrap();
    if !then.is_empty() {
        let basis = tokio::time::timeout(ANSWER, read_msg(&mut recv)).await;
        assert!(
            matches!(basis, Ok(Some(Message::StageBasis { .. }))),
            "{basis:?}"
        );
        for m in then {
            let _ = send.write_all(&encode(m)).await;
        }
    }
    let answer = tokio::time::timeout(ANSWER, read_msg(&mut recv))
        .await
        .expect("the replica did not answer the stage stream");
    answer.unwrap_or(Message::Error {
        code: ErrorCode::Other,
        message: "stream ended with no answer".into(),
    })
}

/// Waits until the log names `n` failed sessions with our peer on a stage
/// stream (the control loop then logs the closed connection too); returns
/// the last such line.
async fn stage_errors(t: &Target, n: usize) -> String {
    let deadline = tokio::time::Instant::now() + ANSWER;
    loop {
        let errs: Vec<String> = t
            .session_errors()
            .into_iter()
            .filter(|l| l.contains("stage stream"))
            .collect();
        if errs.len() >= n {
            return errs[n - 1].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent logged {} failed stage streams, not {n}:\n{}",
            errs.len(),
            t.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_stage_stream_that_breaks_the_protocol_ends_the_session() {
    let mut t = Target::start();
    std::fs::write(t.root.join("keep"), b"replica data").unwrap();
    let before = snapshot(&t.outside);
    let data = b"staged content".to_vec();
    let placeholder = "PLACEHOLDER-NAME";
    let cases: Vec<(&str, Vec<u8>, Vec<Message>, &str)> = vec![
        (
            "content before the file",
            encode(&Message::Literal(data.clone())),
            vec![],
            "expected a file to stage",
        ),
        (
            "a path outside the root",
            splice(
                &encode(&stage_file(placeholder, 14)),
                placeholder.as_bytes(),
                b"../x",
            ),
            vec![],
            "malformed",
        ),
        (
            "a stage for the root, not a file",
            encode(&Message::StageFile {
                path: RelPath::root(),
                size: 14,
            }),
            vec![],
            "the root",
        ),
        (
            "a file message out of order",
            encode(&stage_file("big.bin", 14)),
            vec![Message::Literal(data.clone()), stage_file("big.bin", 14)],
            "expected file content",
        ),
        (
            "an end that does not add up",
            encode(&stage_file("big.bin", 14)),
            vec![Message::Literal(data[..4].to_vec()), end(&data)],
            "the end says 14 bytes, 4 arrived",
        ),
        (
            "a delta with no basis offered",
            encode(&stage_file("big.bin", 14)),
            vec![Message::Delta(vec![1, 2, 3])],
            "delta without a basis",
        ),
    ];
    for (n, (case, first, then, needle)) in cases.iter().enumerate() {
        let mut p = t.connect().await;
        assert!(matches!(p.hello().await, Message::Hello(_)), "{case}");
        match stage(&mut p, first, then).await {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::Protocol, "{case}: {message}");
                assert!(message.contains(needle), "{case}: {message}");
            }
            other => panic!("{case}: the replica answered {other:?}"),
        }
        // the whole session ends, not just the stream
        tokio::time::timeout(ANSWER, p.conn.closed())
            .await
            .unwrap_or_else(|_| panic!("{case}: the session stayed open"));
        let line = stage_errors(&t, n + 1).await;
        assert!(line.contains(needle), "{case}: {line}");
        t.assert_clean(&before);
        assert_eq!(std::fs::read(t.root.join("keep")).unwrap(), b"replica data");
    }
    t.still_applies().await;
}

#[tokio::test]
async fn content_beyond_the_announced_size_drops_the_stage_not_the_session() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let mut p = t.connect().await;
    assert!(matches!(p.hello().await, Message::Hello(_)));
    let data = vec![7u8; 5000];
    let answer = stage(
        &mut p,
        &encode(&stage_file("big.bin", 100)),
        &[Message::Literal(data.clone()), end(&data)],
    )
    .await;
    match answer {
        Message::Error { code, message } => {
            assert_eq!(code, ErrorCode::Apply, "{message}");
            assert!(message.contains("more than the 100 bytes"), "{message}");
        }
        other => panic!("the replica answered {other:?}"),
    }
    // the session goes on: a round is applied
    p.send_raw(&round(1, false, vec![])).await;
    assert!(
        matches!(p.expect().await, Message::RoundDone { id: 1, .. }),
        "{}",
        t.log()
    );
    p.close().await;
    assert!(t.session_errors().is_empty(), "{}", t.log());
    t.assert_clean(&before);
}
