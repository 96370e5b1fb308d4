//! A peer that is pinned but sends crafted frames: the replica refuses them with a
//! clear error and changes nothing on disk.

use proto::frame;
use proto::{Entry, Hello, Kind, Message, Meta, RelPath, Role};
use sync_agent::{Identity, tls};

/// Connects to a replica serving `dst`, says hello, sends `frames` raw on the
/// control stream, and returns what the replica answered.
async fn send_raw(dst: &std::path::Path, frames: Vec<u8>) -> Message {
    let (me, replica_id) = (Identity::generate().unwrap(), Identity::generate().unwrap());
    let server = tls::server("127.0.0.1:0".parse().unwrap(), &replica_id, vec![me.id()]).unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let folder =
        sync_agent::replica_folder("default", dst, Default::default(), Vec::new()).unwrap();
    let folders = std::collections::HashMap::from([("default".to_string(), folder)]);
    let serving = tokio::spawn(sync_agent::accept_sessions(
        server,
        std::sync::Arc::new(folders),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(tls::client_config(&me, replica_id.id()).unwrap());
    let conn = ep.connect(addr, tls::SERVER_NAME).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut hello = Vec::new();
    frame::encode(
        &Message::Hello(Hello::new(Role::Source, "default")),
        &mut hello,
    )
    .unwrap();
    send.write_all(&hello).await.unwrap();
    send.write_all(&frames).await.unwrap();
    let mut got = Vec::new();
    let answer = loop {
        let mut buf = [0u8; 4096];
        match recv.read(&mut buf).await {
            Ok(Some(n)) => got.extend_from_slice(&buf[..n]),
            _ => panic!("replica closed without answering"),
        }
        // skip the replica's hello and its tree digest, return the next message
        let mut at = 0;
        let mut first = true;
        let mut next = None;
        while let Some((m, used)) = frame::decode(&got[at..]).unwrap() {
            at += used;
            match m {
                Message::Hello(_) if first => {}
                Message::TreeDigest { .. } => {}
                m => {
                    next = Some(m);
                    break;
                }
            }
            first = false;
        }
        if let Some(m) = next {
            break m;
        }
    };
    conn.close(0u32.into(), b"");
    let _ = stop.send(());
    let _ = serving.await;
    answer
}

fn entry(path: &[u8], kind: Kind) -> Entry {
    Entry {
        path: RelPath::new(path).unwrap(),
        kind,
        meta: Meta {
            mode: 0o644,
            ..Default::default()
        },
    }
}

/// A full round's first frames: its start and one manifest batch.
fn round_start(manifest: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    let start = Message::RoundStart {
        id: 1,
        full: true,
        checksum: false,
        verify: false,
    };
    frame::encode(&start, &mut buf).unwrap();
    frame::encode(manifest, &mut buf).unwrap();
    buf
}

fn manifest_with_path(bad: &[u8]) -> Vec<u8> {
    // Encode a valid manifest with a placeholder name of the same length, then patch
    // the bytes: the encoder refuses to build a bad path, a hostile peer does not.
    let placeholder = vec![b'Q'; bad.len()];
    let m = Message::Manifest(vec![
        entry(b"", Kind::Dir),
        entry(
            &placeholder,
            Kind::File {
                size: 1,
                hash: [0; 32],
            },
        ),
    ]);
    let mut buf = round_start(&m);
    let at = buf
        .windows(placeholder.len())
        .position(|w| w == placeholder.as_slice())
        .unwrap();
    buf[at..at + bad.len()].copy_from_slice(bad);
    buf
}

#[tokio::test]
async fn hostile_paths_are_refused_and_nothing_changes() {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join("keep"), b"replica data").unwrap();
    for bad in [
        &b"../x"[..],
        b"/etc/x",
        b"a/../../x",
        b"a\0b",
        b"a//b",
        b"./ab",
    ] {
        match send_raw(&dst, manifest_with_path(bad)).await {
            Message::Error { message, .. } => {
                assert!(message.contains("malformed"), "{bad:?}: {message}")
            }
            other => panic!("{bad:?}: replica answered {other:?}"),
        }
        assert_eq!(std::fs::read(dst.join("keep")).unwrap(), b"replica data");
        assert_eq!(
            std::fs::read_dir(&dst).unwrap().count(),
            1,
            "{bad:?} changed the replica"
        );
    }
}

#[tokio::test]
async fn oversize_frame_and_bad_structure_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let dst = t.path().join("dst");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(dst.join("keep"), b"replica data").unwrap();
    // a header announcing 4 GiB
    match send_raw(&dst, vec![0xff, 0xff, 0xff, 0xff]).await {
        Message::Error { message, .. } => assert!(message.contains("exceeds"), "{message}"),
        other => panic!("replica answered {other:?}"),
    }
    // a file under a parent that is not a directory, then the end of the manifest
    let m = Message::Manifest(vec![
        entry(b"", Kind::Dir),
        entry(
            b"f",
            Kind::File {
                size: 1,
                hash: [0; 32],
            },
        ),
        entry(
            b"f/x",
            Kind::File {
                size: 1,
                hash: [0; 32],
            },
        ),
    ]);
    let mut buf = round_start(&m);
    frame::encode(
        &Message::RoundEnd {
            id: 1,
            entries: 3,
            root_hash: [0; 32],
        },
        &mut buf,
    )
    .unwrap();
    match send_raw(&dst, buf).await {
        Message::Error { message, .. } => assert!(
            message.contains("f/x") && message.contains("parent"),
            "{message}"
        ),
        other => panic!("replica answered {other:?}"),
    }
    assert_eq!(std::fs::read_dir(&dst).unwrap().count(), 1);
}
