//! A pinned but hostile source answering the replica's request for many small
//! files at once (`FilesRequest`) against a real `sync-agent replica`: content
//! past a file's size, a delta, a stream cut short are refused with an error
//! naming the file, and nothing of the round is installed; a file whose end
//! is not the scan's, or whose content is not the scan's hash its
//! `ScannedEnd` names, is left as it was while the others land.

use crate::hostile_peer::*;
use crate::util::*;
use proto::Message;

/// Five new small files, in the round's order.
fn files() -> Vec<(String, Vec<u8>)> {
    (0..5)
        .map(|i| (format!("b{i}"), format!("content of file {i}").into_bytes()))
        .collect()
}

fn end(data: &[u8]) -> Message {
    Message::FileEnd {
        size: data.len() as u64,
        hash: *blake3::hash(data).as_bytes(),
    }
}

/// A partial round of [`files`]; the replica asks for them on one stream and
/// gets `answer`; returns the replica's answer to the round.
async fn batch_case(t: &Target, answer: Vec<Message>) -> Message {
    let entries = files().iter().map(|(n, d)| file(n, d)).collect();
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(1, false, entries)).await;
    let (mut send, indexes) = p.next_files_request().await;
    assert_eq!(indexes, vec![0, 1, 2, 3, 4], "all five on one stream");
    for m in &answer {
        let _ = send.write_all(&encode(m)).await;
    }
    let _ = send.finish();
    let m = p.expect().await;
    p.close().await;
    m
}

#[tokio::test]
async fn hostile_batches_refused_or_discarded() {
    let mut t = Target::start();
    let before = snapshot(&t.outside);
    let f = files();
    let first = [Message::Literal(f[0].1.clone()), end(&f[0].1)];
    let cases: Vec<(&str, Vec<Message>, &str)> = vec![
        (
            "more than the file's size",
            [
                &first[..],
                &[Message::Literal(b"content of file 1, and more".to_vec())],
            ]
            .concat(),
            "more content than",
        ),
        (
            "a delta",
            [&first[..], &[Message::Delta(vec![0x72, 0x73, 2, 0x36, 0])]].concat(),
            "delta without a basis",
        ),
        ("cut short", first.to_vec(), "closed the stream"),
        (
            "another stream's message",
            [&first[..], &[Message::DbNeedHashes]].concat(),
            "expected file content",
        ),
    ];
    for (n, (case, answer, why)) in cases.into_iter().enumerate() {
        let m = batch_case(&t, answer).await;
        let Message::Error { message, .. } = m else {
            panic!("{case}: the replica answered {m:?}");
        };
        assert!(message.contains(why), "{case}: {message}");
        assert!(message.contains("b1"), "{case}: names the file: {message}");
        t.wait_session_errors(n + 1).await;
        t.assert_clean(&before);
        let landed: Vec<_> = std::fs::read_dir(&t.root).unwrap().collect();
        assert!(landed.is_empty(), "{case}: installed {landed:?}");
    }

    // File 2 changed at the source since its scan: left out, the rest land.
    // File 3 too, sent with the scan's hash (`ScannedEnd`: the source did
    // not hash it) over other content of the same size.
    let mut answer = Vec::new();
    for (i, (_, d)) in f.iter().enumerate() {
        let sent = match i {
            2 => b"changed since".to_vec(),
            3 => d.iter().rev().copied().collect(),
            _ => d.clone(),
        };
        answer.push(Message::Literal(sent.clone()));
        answer.push(match i {
            3 | 4 => Message::ScannedEnd {
                size: d.len() as u64,
                hash: *blake3::hash(d).as_bytes(),
            },
            _ => end(&sent),
        });
    }
    let m = batch_case(&t, answer).await;
    let Message::RoundDone { summary, .. } = m else {
        panic!("a changed file: the replica answered {m:?}");
    };
    assert_eq!(summary.files_transferred, 3);
    for changed in ["b2", "b3"] {
        assert!(
            summary.warnings.iter().any(|w| w.contains(changed)),
            "{changed}: {:?}",
            summary.warnings
        );
    }
    for (i, (name, data)) in f.iter().enumerate() {
        let got = std::fs::read(t.root.join(name)).ok();
        assert_eq!(got.as_ref(), (i != 2 && i != 3).then_some(data), "{name}");
    }
    t.assert_clean(&before);
    t.still_applies().await;
}
