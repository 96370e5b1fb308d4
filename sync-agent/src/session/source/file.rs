//! Serving one requested file of a round. A small one with no delta asked
//! for is read whole by one blocking task and its messages sent after: no
//! wake of the sender per message, one open. A larger one, or one the
//! replica sent a signature for, is streamed as it is read.

use crate::session::{Progress, WHOLE_FILE as WHOLE};
use crate::wire;
use anyhow::{Context, Result, bail};
use proto::{Entry, Kind, Message};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use sync_core::delta::{self, Chunk, Encoder};
use tokio::sync::mpsc;

/// What reading a small file found.
enum Whole {
    /// Gone or replaced since the scan: why.
    Gone(String),
    /// Its messages, the end included.
    Messages(Vec<Message>),
    /// Grown past [`WHOLE`] since the scan: streamed instead.
    Larger,
}

/// Sends one requested file: its entry must be a regular file of the round, so
/// the replica can never name anything else.
pub(super) async fn serve_file(
    mut send: quinn::SendStream,
    entry: Entry,
    signature: Option<Vec<u8>>,
    root: PathBuf,
    progress: Arc<Progress>,
) -> Result<()> {
    // `proto::exchange::admit` let only a regular file of the round through.
    let path = sync_core::scan::abs(&root, &entry.path);
    let small = matches!(entry.kind, Kind::File { size, .. } if size <= WHOLE);
    let whole = if small && signature.is_none() {
        let (p, pr) = (path.clone(), progress.clone());
        tokio::task::spawn_blocking(move || read_whole(&p, &pr)).await??
    } else {
        Whole::Larger
    };
    match whole {
        Whole::Messages(msgs) => {
            for m in &msgs {
                wire::send(&mut send, m).await?;
            }
        }
        Whole::Gone(why) => return announce_changed(send, &why).await,
        Whole::Larger => {
            if let Err(e) = sync_core::scan::open_regular(&path) {
                return announce_changed(send, &e.to_string()).await;
            }
            let (tx, mut rx) = mpsc::channel::<Message>(2);
            let reader =
                tokio::task::spawn_blocking(move || encode_file(&path, signature, tx, &progress));
            while let Some(msg) = rx.recv().await {
                wire::send(&mut send, &msg).await?;
            }
            reader.await??;
        }
    }
    send.finish()?;
    // Wait until the peer has read everything before the stream is dropped.
    let _ = send.stopped().await;
    Ok(())
}

/// Gone or replaced since the scan: an end that cannot match the round's
/// entry, so the replica leaves its version and the next round settles it.
async fn announce_changed(mut send: quinn::SendStream, why: &str) -> Result<()> {
    tracing::debug!("{why}: announcing it as changed");
    let end = Message::FileEnd {
        size: 0,
        hash: [0; 32],
    };
    wire::send(&mut send, &end).await?;
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

/// A small file read whole (at most one byte past [`WHOLE`]) and encoded.
fn read_whole(path: &Path, progress: &Progress) -> Result<Whole> {
    let f = match sync_core::scan::open_regular(path) {
        Ok(f) => f,
        Err(e) => return Ok(Whole::Gone(e.to_string())),
    };
    let mut data = Vec::new();
    f.take(WHOLE + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data.len() as u64 > WHOLE {
        return Ok(Whole::Larger);
    }
    let mut msgs = Vec::new();
    encode(
        data.as_slice(),
        Encoder::new(None),
        path,
        progress,
        &mut |m| {
            msgs.push(m);
            Ok(())
        },
    )?;
    Ok(Whole::Messages(msgs))
}

/// Streams the file at `path` as messages into `tx`: literals, or a delta
/// against `signature`, then its end.
pub(crate) fn encode_file(
    path: &Path,
    signature: Option<Vec<u8>>,
    tx: mpsc::Sender<Message>,
    progress: &Progress,
) -> Result<()> {
    let sig = signature
        .map(delta::parse_signature)
        .transpose()
        .with_context(|| format!("signature for {}", path.display()))?;
    let f = sync_core::scan::open_regular(path)?;
    encode(f, Encoder::new(sig.as_ref()), path, progress, &mut |msg| {
        if tx.blocking_send(msg).is_err() {
            bail!(
                "stream to the replica closed while sending {}",
                path.display()
            );
        }
        Ok(())
    })
}

/// The messages of `f`'s content (read to its end) as `enc` makes them,
/// each handed to `emit`, the end (size and hash) last.
fn encode(
    mut f: impl Read,
    mut enc: Encoder<'_>,
    path: &Path,
    progress: &Progress,
    emit: &mut dyn FnMut(Message) -> Result<()>,
) -> Result<()> {
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buf = Vec::new();
    loop {
        let want = enc.window();
        buf.resize(want, 0);
        let mut got = 0;
        while got < want {
            match f.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
        if got == 0 {
            break;
        }
        let data = &buf[..got];
        hasher.update(data);
        size += got as u64;
        let msg = match enc.encode(data) {
            Chunk::Literal(l) => Message::Literal(l),
            Chunk::Delta(d) => Message::Delta(d),
        };
        progress.bytes_done.fetch_add(got as u64, Ordering::Relaxed);
        emit(msg)?;
        if got < want {
            break;
        }
    }
    emit(Message::FileEnd {
        size,
        hash: *hasher.finalize().as_bytes(),
    })?;
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(path: &Path) -> Vec<Message> {
        let (tx, mut rx) = mpsc::channel(1024);
        encode_file(path, None, tx, &Progress::default()).unwrap();
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// A small file goes out as the stream would send it: the same literals
    /// and end; one that grew past the bound since the scan is streamed, one
    /// that is gone is announced as changed.
    #[test]
    fn a_small_file_is_read_whole_into_the_messages_a_stream_sends() {
        let d = tempfile::tempdir().unwrap();
        let cases: [(&str, Vec<u8>); 3] = [
            ("empty", Vec::new()),
            ("small", (0..70_000u32).map(|i| (i % 251) as u8).collect()),
            ("at-bound", vec![9u8; WHOLE as usize]),
        ];
        for (name, data) in &cases {
            let path = d.path().join(name);
            std::fs::write(&path, data).unwrap();
            let progress = Progress::default();
            let Whole::Messages(msgs) = read_whole(&path, &progress).unwrap() else {
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
            read_whole(&grown, &Progress::default()),
            Ok(Whole::Larger)
        ));
        let gone = d.path().join("gone");
        assert!(matches!(
            read_whole(&gone, &Progress::default()),
            Ok(Whole::Gone(_))
        ));
        std::os::unix::fs::symlink(d.path().join("small"), d.path().join("link")).unwrap();
        let link = d.path().join("link");
        assert!(matches!(
            read_whole(&link, &Progress::default()),
            Ok(Whole::Gone(_))
        ));
    }
}
