//! A pinned but hostile source against a real `sync-agent replica`: bad paths,
//! symlinks planted to write through, bad deltas and contents. Each is refused or
//! discarded, clean: an error naming the entry (and the peer in the agent's
//! log), no panic or hang, no temp file, the old version intact, the sentinel
//! directory outside the root unchanged, and the agent still serving.

use crate::hostile_peer::*;
use crate::util::*;
use proto::{Entry, Kind, Message, RelPath};

/// Sends `frames` after a hello and returns the replica's answer.
async fn one_session(t: &Target, frames: &[u8]) -> Message {
    let mut p = t.connect().await;
    assert!(matches!(p.hello().await, Message::Hello(_)));
    p.send_raw(frames).await;
    let m = p.expect().await;
    p.close().await;
    m
}

fn error_text(m: Message, case: &str) -> String {
    match m {
        Message::Error { message, .. } => message,
        other => panic!("{case}: the replica answered {other:?}"),
    }
}

#[tokio::test]
async fn hostile_entries_refused_clean() {
    let mut t = Target::start();
    std::fs::write(t.root.join("keep"), b"replica data").unwrap();
    let before = snapshot(&t.outside);
    let placeholder = b"PLACEHOLDER-NAME".to_vec();
    let deep = "a/".repeat(10_000) + "x";
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", b"../x".to_vec()),
        ("absolute", b"/etc/x".to_vec()),
        ("dotdot inside", b"a/../../x".to_vec()),
        ("NUL", b"a\0b".to_vec()),
        ("empty component", b"a//b".to_vec()),
        ("trailing slash", b"a/".to_vec()),
        ("dot component", b"./ab".to_vec()),
        ("dot", b".".to_vec()),
        ("5 KB name", vec![b'n'; 5000]),
        ("256-byte component", vec![b'n'; 256]),
        ("10,000-deep path", deep.into_bytes()),
    ];
    let mut n = 0;
    for (case, bad) in &cases {
        // as an entry path, a hard-link target and a deletion
        let entry = file(std::str::from_utf8(&placeholder).unwrap(), b"x");
        let link = Entry {
            path: RelPath::new(&b"link"[..]).unwrap(),
            kind: Kind::HardLink {
                target: RelPath::new(placeholder.clone()).unwrap(),
            },
            meta: meta(0o644),
        };
        let start = encode(&round_start(1, false));
        for m in [
            Message::Manifest(vec![entry]),
            Message::Manifest(vec![file("keep", b"x"), link]),
            Message::Deleted(vec![RelPath::new(placeholder.clone()).unwrap()]),
            Message::Renamed(vec![(
                RelPath::new(&b"keep"[..]).unwrap(),
                RelPath::new(placeholder.clone()).unwrap(),
            )]),
        ] {
            let mut frames = start.clone();
            frames.extend(splice(&encode(&m), &placeholder, bad));
            let msg = error_text(one_session(&t, &frames).await, case);
            assert!(msg.contains("malformed"), "{case}: {msg}");
            n += 1;
            let line = t.wait_session_errors(n).await;
            assert!(line.contains("malformed"), "{case}: {line}");
            t.assert_clean(&before);
            assert_eq!(std::fs::read(t.root.join("keep")).unwrap(), b"replica data");
            assert_eq!(std::fs::read_dir(&t.root).unwrap().count(), 1, "{case}");
        }
    }
    assert_eq!(n, cases.len() * 4);
    // A reserved temp name and a symlink target with NUL are refused by name.
    let mut bad_target = symlink("s", b"tgt");
    if let Kind::Symlink { target } = &mut bad_target.kind {
        target[1] = 0;
    }
    for (case, entries, needle) in [
        (
            "temp name",
            vec![file(".understudy.tmp.0123456789abcdef", b"x")],
            "reserved",
        ),
        (
            "NUL in a symlink target",
            vec![bad_target],
            "symlink target",
        ),
    ] {
        let msg = error_text(one_session(&t, &round(1, false, entries)).await, case);
        assert!(msg.contains(needle), "{case}: {msg}");
        t.assert_clean(&before);
    }
    t.still_applies().await;
}

/// `d -> outside` (standing in for `d -> /`: a bug must not write to the real
/// /etc) followed by `d/etc/x`, in the same round and in later ones, as a file,
/// inline content, a hard link, a rename target, a deletion and a metadata
/// change: never written through.
#[tokio::test]
async fn symlinked_directory_never_written_through() {
    let mut t = Target::start();
    std::fs::write(t.root.join("keep"), b"replica data").unwrap();
    let before = snapshot(&t.outside);
    let target = t.outside.as_os_str().as_encoded_bytes().to_vec();
    let x = b"written through the symlink".to_vec();

    // 1. a full round: d/etc under a symlink is refused by the structure check
    let entries = vec![
        dir(""),
        symlink("d", &target),
        dir("d/etc"),
        file("d/etc/x", &x),
        file("keep", b"replica data"),
    ];
    let msg = error_text(one_session(&t, &round(1, true, entries)).await, "full");
    assert!(msg.contains("d/etc"), "{msg}");
    t.assert_clean(&before);

    // 2. the same partial round: the symlink, then content below it (inline)
    let mut frames = round(1, false, vec![symlink("d", &target), file("d/etc/x", &x)]);
    let end = frames.split_off(frames.len() - encode(&end_of(1, 2)).len());
    frames.extend(encode(&Message::Inline {
        index: 1,
        data: x.clone(),
    }));
    frames.extend(end);
    let msg = error_text(one_session(&t, &frames).await, "same round");
    assert!(msg.contains("d/etc"), "{msg}");
    let line = t.wait_session_errors(2).await;
    assert!(line.contains("d/etc"), "{line}");
    t.assert_clean(&before);

    // 3. a later round plants the symlink alone (that is allowed: symlinks are
    // mirrored) ...
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(1, false, vec![symlink("d", &target)]))
        .await;
    assert!(matches!(p.expect().await, Message::RoundDone { .. }));
    p.close().await;
    assert!(
        std::fs::symlink_metadata(t.root.join("d"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // ... and the rounds after it try to write through it
    let link = Entry {
        path: RelPath::new(&b"d/etc/x"[..]).unwrap(),
        kind: Kind::HardLink {
            target: RelPath::new(&b"keep"[..]).unwrap(),
        },
        meta: meta(0o644),
    };
    let mut chmod = file("d/etc/passwd", b"root:x:0:0");
    chmod.meta.mode = 0o666;
    let later: Vec<(&str, Vec<u8>)> = vec![
        (
            "file below the symlink",
            round(2, false, vec![file("d/etc/x", &x)]),
        ),
        ("hard link below the symlink", round(2, false, vec![link])),
        ("metadata below the symlink", round(2, false, vec![chmod])),
        ("deletion below the symlink", {
            let mut f = encode(&round_start(2, false));
            f.extend(encode(&Message::Deleted(vec![
                RelPath::new(&b"d/etc/passwd"[..]).unwrap(),
            ])));
            f.extend(encode(&end_of(2, 0)));
            f
        }),
        ("rename below the symlink", {
            let mut f = encode(&round_start(2, false));
            f.extend(encode(&Message::Renamed(vec![
                (
                    RelPath::new(&b"d/etc/passwd"[..]).unwrap(),
                    RelPath::new(&b"stolen"[..]).unwrap(),
                ),
                (
                    RelPath::new(&b"keep"[..]).unwrap(),
                    RelPath::new(&b"d/etc/x"[..]).unwrap(),
                ),
            ])));
            f.extend(encode(&end_of(2, 0)));
            f
        }),
    ];
    for (case, frames) in later {
        let mut p = t.connect().await;
        p.hello().await;
        let x = x.clone();
        // content asked for is served: the replica may only stage it in the root
        let serving = p.serve_requests(move |_, _| {
            vec![
                Message::Literal(x.clone()),
                Message::FileEnd {
                    size: x.len() as u64,
                    hash: *blake3::hash(&x).as_bytes(),
                },
            ]
        });
        p.send_raw(&frames).await;
        // Either refused, or asks for content it can only stage inside the root.
        let answer = match p.recv().await {
            Some(m) => m,
            None => panic!("{case}: closed without answering"),
        };
        serving.abort();
        p.close().await;
        if let Message::Error { message, .. } = &answer {
            assert!(message.contains("d/etc"), "{case}: {message}");
        }
        t.assert_clean(&before);
        assert!(!t.root.join("stolen").exists(), "{case}");
        assert_eq!(std::fs::read(t.root.join("keep")).unwrap(), b"replica data");
    }
}

fn end_of(id: u64, entries: u64) -> Message {
    Message::RoundEnd {
        id,
        entries,
        root_hash: [0; 32],
    }
}

/// A partial round's planning stats and hashes `d/etc/passwd` through a planted
/// symlink `d`: whether the replica asks for content, fails or says "done"
/// tells a hostile source whether a file outside the root exists and whether
/// it has a guessed content and metadata.
#[tokio::test]
async fn partial_round_does_not_look_through_a_symlinked_parent() {
    use std::os::unix::fs::MetadataExt;
    let t = Target::start();
    let target = t.outside.as_os_str().as_encoded_bytes().to_vec();
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(1, false, vec![symlink("d", &target)]))
        .await;
    assert!(matches!(p.expect().await, Message::RoundDone { .. }));
    p.close().await;
    // The source guesses the content and metadata of the file outside.
    let secret = t.outside.join("etc/passwd");
    let st = std::fs::metadata(&secret).unwrap();
    let mut guess = file("d/etc/passwd", &std::fs::read(&secret).unwrap());
    guess.meta.mode = st.mode() & 0o7777;
    guess.meta.uid = st.uid();
    guess.meta.gid = st.gid();
    guess.meta.mtime_sec = st.mtime();
    guess.meta.mtime_nsec = st.mtime_nsec() as u32;
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(2, false, vec![guess])).await;
    let answer = p.expect().await;
    p.close().await;
    assert!(
        matches!(answer, Message::Error { .. }),
        "the replica confirmed a guess about a file outside its root: {answer:?}"
    );
}

/// A file the replica has, and the source's crafted content for it.
async fn content_case(
    t: &mut Target,
    case: &str,
    answer: impl FnOnce(&[u8], Option<Vec<u8>>) -> Vec<Message>,
) -> Message {
    let old = random_bytes(64 << 10, 1);
    std::fs::write(t.root.join("f"), &old).unwrap();
    let new = random_bytes(64 << 10, 2);
    let before = snapshot(&t.outside);
    let mut p = t.connect().await;
    p.hello().await;
    p.send_raw(&round(1, false, vec![file("f", &new)])).await;
    let req = p.next_request().await;
    assert_eq!(req.index, 0, "{case}");
    let msgs = answer(&new, req.signature.clone());
    req.answer(&msgs).await;
    let m = p.expect().await;
    p.close().await;
    t.assert_clean(&before);
    assert_eq!(
        std::fs::read(t.root.join("f")).unwrap(),
        old,
        "{case}: the old version must be intact"
    );
    m
}

/// A delta: magic, then commands.
fn delta(cmds: &[u8]) -> Vec<u8> {
    [&0x7273_0236u32.to_be_bytes()[..], cmds, &[0]].concat()
}

/// COPY with 8-byte offset and length.
fn copy(offset: u64, len: u64) -> Vec<u8> {
    [&[0x54u8][..], &offset.to_be_bytes(), &len.to_be_bytes()].concat()
}

#[tokio::test]
async fn hostile_contents_refused_or_discarded() {
    let mut t = Target::start();
    let mut cases = 0;
    let mut failed = 0;
    // copies out of the basis
    for (case, cmds) in BAD_DELTAS {
        let m = content_case(&mut t, case, |_, sig| {
            assert!(sig.is_some(), "the replica has a basis");
            vec![Message::Delta(delta(&cmds()))]
        })
        .await;
        error_text(m, case);
        failed += 1;
        t.wait_session_errors(failed).await;
        cases += 1;
    }
    // a delta producing more than its window
    let m = content_case(&mut t, "output past the window", |_, _| {
        let mut cmds = Vec::new();
        for _ in 0..65 {
            cmds.extend(copy(0, 64 << 10));
        }
        vec![Message::Delta(delta(&cmds))]
    })
    .await;
    error_text(m, "window");
    failed += 1;
    t.wait_session_errors(failed).await;
    cases += 1;
    // content past the announced size: discarded with a warning naming the file
    let m = content_case(&mut t, "past the announced size", |new, _| {
        vec![
            Message::Literal(new.to_vec()),
            Message::Literal(vec![0; 10]),
            Message::FileEnd {
                size: new.len() as u64 + 10,
                hash: [0; 32],
            },
        ]
    })
    .await;
    match m {
        Message::RoundDone { summary, .. } => {
            assert!(
                summary.warnings.iter().any(|w| w.starts_with("f: changed")),
                "{summary:?}"
            );
            assert_eq!(summary.files_transferred, 0);
        }
        other => panic!("{other:?}"),
    }
    cases += 1;
    // content that applies but hashes wrong, announced with the manifest's hash
    let m = content_case(&mut t, "wrong blake3", |new, _| {
        one_byte_off(new, |size, hash| Message::FileEnd { size, hash })
    })
    .await;
    let msg = error_text(m, "wrong blake3");
    assert!(msg.contains("/f") && msg.contains("hash"), "{msg}");
    failed += 1;
    let line = t.wait_session_errors(failed).await;
    assert!(line.contains("/f") && line.contains("hash"), "{line}");
    cases += 1;
    // the same content under a ScannedEnd (the source took the hash from its
    // scan): changed since the scan, left as it was with a warning
    let m = content_case(&mut t, "not the scan's content", |new, _| {
        one_byte_off(new, |size, hash| Message::ScannedEnd { size, hash })
    })
    .await;
    match m {
        Message::RoundDone { summary, .. } => {
            assert!(
                summary.warnings.iter().any(|w| w.starts_with("f: changed")),
                "{summary:?}"
            );
            assert_eq!(summary.files_transferred, 0);
        }
        other => panic!("not the scan's content: {other:?}"),
    }
    cases += 1;
    // a FileEnd announcing more than arrived, a delta without a basis request,
    // a control message on a file stream
    for (case, msgs) in [
        (
            "short content",
            vec![Message::FileEnd {
                size: 5,
                hash: [0; 32],
            }],
        ),
        (
            "control message on a file stream",
            vec![round_start(9, true)],
        ),
        ("stream ends early", vec![Message::Literal(vec![1; 10])]),
    ] {
        let m = content_case(&mut t, case, |_, _| msgs).await;
        error_text(m, case);
        failed += 1;
        t.wait_session_errors(failed).await;
        cases += 1;
    }
    assert_eq!(cases, 11);
    let src = t.t.path().join("good");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("f"), b"good").unwrap();
    t.push_ok(&src).await;
}

type Cmds = fn() -> Vec<u8>;
const BAD_DELTAS: [(&str, Cmds); 4] = [
    ("copy past the basis", || copy(64 << 10, 100)),
    ("copy overflowing u64", || copy(u64::MAX - 1, 16)),
    ("zero-length copy", || copy(0, 0)),
    ("unknown command", || vec![0x60]),
];

/// The refusal of a bad delta names the entry and the cause, to the peer and
/// in the log.
#[tokio::test]
async fn bad_delta_refusal_names_entry_and_cause() {
    let mut t = Target::start();
    for (n, (case, cmds)) in BAD_DELTAS.into_iter().enumerate() {
        let m = content_case(&mut t, case, |_, _| vec![Message::Delta(delta(&cmds()))]).await;
        let msg = error_text(m, case);
        assert!(msg.contains("f: bad delta"), "{case}: {msg}");
        let line = t.wait_session_errors(n + 1).await;
        assert!(line.contains("f: bad delta"), "{case}: {line}");
    }
}

/// The same attacks on a file the replica does not have (no basis: the
/// file is received whole before it is written): content past the
/// announced size, or not the scan's under a `ScannedEnd` (the source did
/// not hash it), is discarded with a warning, a wrong hash, a short end, a
/// delta with no basis, a control message and an early end are refused,
/// and nothing is left at the path or as a temp file.
#[tokio::test]
async fn hostile_contents_of_a_new_file_refused_or_discarded() {
    let mut t = Target::start();
    let new = random_bytes(20_000, 3);
    let wrong = {
        let mut w = new.clone();
        w[100] ^= 1;
        w
    };
    let end = |size: usize, hash: [u8; 32]| Message::FileEnd {
        size: size as u64,
        hash,
    };
    let good = *blake3::hash(&new).as_bytes();
    let cases: Vec<(&str, Vec<Message>, bool)> = vec![
        (
            "past the announced size",
            vec![
                Message::Literal(new.clone()),
                Message::Literal(vec![0; 10]),
                end(new.len() + 10, [0; 32]),
            ],
            false,
        ),
        (
            "wrong blake3",
            vec![Message::Literal(wrong.clone()), end(new.len(), good)],
            true,
        ),
        (
            "not the scan's content, under the scan's hash",
            vec![
                Message::Literal(wrong),
                Message::ScannedEnd {
                    size: new.len() as u64,
                    hash: good,
                },
            ],
            false,
        ),
        ("short content", vec![end(5, [0; 32])], true),
        (
            "delta with no basis",
            vec![Message::Delta(delta(&[]))],
            true,
        ),
        ("control message", vec![round_start(9, true)], true),
        (
            "stream ends early",
            vec![Message::Literal(new[..10].to_vec())],
            true,
        ),
    ];
    let mut failed = 0;
    for (case, msgs, refused) in cases {
        let before = snapshot(&t.outside);
        let mut p = t.connect().await;
        p.hello().await;
        p.send_raw(&round(1, false, vec![file("n", &new)])).await;
        let req = p.next_request().await;
        assert!(req.signature.is_none(), "{case}: no basis");
        req.answer(&msgs).await;
        let m = p.expect().await;
        p.close().await;
        t.assert_clean(&before);
        assert!(!t.root.join("n").exists(), "{case}: written");
        if refused {
            let msg = error_text(m, case);
            assert!(msg.contains("n:") || msg.contains("of n"), "{case}: {msg}");
            failed += 1;
            t.wait_session_errors(failed).await;
        } else {
            match m {
                Message::RoundDone { summary, .. } => {
                    assert!(summary.warnings.iter().any(|w| w.starts_with("n: changed")));
                    assert_eq!(summary.files_transferred, 0, "{case}");
                }
                other => panic!("{case}: {other:?}"),
            }
        }
    }
    let src = t.t.path().join("good");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("n"), &new).unwrap();
    t.push_ok(&src).await;
    assert_eq!(std::fs::read(t.root.join("n")).unwrap(), new);
}

/// `new` with one byte flipped as a literal, then the end `end` makes of
/// `new`'s own size and hash.
fn one_byte_off(new: &[u8], end: impl Fn(u64, [u8; 32]) -> Message) -> Vec<Message> {
    let mut wrong = new.to_vec();
    wrong[100] ^= 1;
    vec![
        Message::Literal(wrong),
        end(new.len() as u64, *blake3::hash(new).as_bytes()),
    ]
}
