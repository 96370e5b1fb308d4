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
        tokio::task::spawn_blocking(move || read_whole(&p, WHOLE, &pr)).await??
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
    finish(send).await
}

/// Ends a stream of content and waits until the peer has read everything
/// before it is dropped.
async fn finish(mut send: quinn::SendStream) -> Result<()> {
    send.finish()?;
    let _ = send.stopped().await;
    Ok(())
}

/// Most bytes of frames a files request's reader hands over at once.
const BATCH_CHUNK: usize = 256 << 10;

/// Sends the small files of a files request one after another on one
/// stream: one blocking task reads them in order (each whole, never past its
/// entry's size: one that grew or went is announced as changed) and encodes
/// their frames, handed over a chunk at a time while the stream sends.
pub(super) async fn serve_files(
    mut send: quinn::SendStream,
    entries: Vec<Entry>,
    root: PathBuf,
    progress: Arc<Progress>,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let reader = tokio::task::spawn_blocking(move || {
        // the stream gave up: its error is the one reported
        read_batch(&root, &entries, &progress, &mut |b| {
            tx.blocking_send(b).is_ok()
        })
    });
    while let Some(frames) = rx.recv().await {
        wire::send_frames(&mut send, frames).await?;
    }
    reader.await??;
    finish(send).await
}

/// Reads the files of a files request in order and encodes their frames,
/// handed to `emit` [`BATCH_CHUNK`] bytes or more at a time (the rest at the
/// end) until it says the stream is gone. Each file is read whole and never
/// past its entry's size: one that grew, went or is no longer a regular file
/// is announced as changed.
fn read_batch(
    root: &Path,
    entries: &[Entry],
    progress: &Progress,
    emit: &mut dyn FnMut(Vec<u8>) -> bool,
) -> Result<()> {
    let mut out = Vec::new();
    for e in entries {
        // `proto::exchange::admit` let only small regular files through.
        let Kind::File { size, .. } = e.kind else {
            bail!("{}: not a regular file", e.path);
        };
        let path = sync_core::scan::abs(root, &e.path);
        let msgs = match read_whole(&path, size, progress)? {
            Whole::Messages(msgs) => msgs,
            Whole::Gone(why) => {
                tracing::debug!("{why}: announcing it as changed");
                vec![changed_end()]
            }
            Whole::Larger => {
                tracing::debug!("{}: grew since the scan: announcing it as changed", e.path);
                vec![changed_end()]
            }
        };
        for m in &msgs {
            proto::frame::encode(m, &mut out).context("encoding a message")?;
        }
        if out.len() >= BATCH_CHUNK && !emit(std::mem::take(&mut out)) {
            return Ok(());
        }
    }
    if !out.is_empty() {
        emit(out);
    }
    Ok(())
}

/// An end that cannot match the round's entry: the replica leaves its
/// version and the next round settles it.
fn changed_end() -> Message {
    Message::FileEnd {
        size: 0,
        hash: [0; 32],
    }
}

/// Gone or replaced since the scan: an end that cannot match the round's
/// entry, so the replica leaves its version and the next round settles it.
async fn announce_changed(mut send: quinn::SendStream, why: &str) -> Result<()> {
    tracing::debug!("{why}: announcing it as changed");
    wire::send(&mut send, &changed_end()).await?;
    finish(send).await
}

/// A small file read whole (at most one byte past `cap`) and encoded;
/// [`Whole::Larger`] past `cap`.
fn read_whole(path: &Path, cap: u64, progress: &Progress) -> Result<Whole> {
    let f = match sync_core::scan::open_regular(path) {
        Ok(f) => f,
        Err(e) => return Ok(Whole::Gone(e.to_string())),
    };
    let mut data = Vec::new();
    f.take(cap + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data.len() as u64 > cap {
        return Ok(Whole::Larger);
    }
    // The messages `encode` would make of it (literals of at most a chunk,
    // then the end), made of the bytes read: no window zeroed, no copy of a
    // small file (most of a first mirror's files).
    let (size, hash) = (data.len() as u64, *blake3::hash(&data).as_bytes());
    let mut msgs = Vec::with_capacity(data.len().div_ceil(delta::LITERAL_CHUNK) + 1);
    if data.len() <= delta::LITERAL_CHUNK {
        if !data.is_empty() {
            msgs.push(Message::Literal(data));
        }
    } else {
        msgs.extend(
            data.chunks(delta::LITERAL_CHUNK)
                .map(|c| Message::Literal(c.to_vec())),
        );
    }
    msgs.push(Message::FileEnd { size, hash });
    progress.bytes_done.fetch_add(size, Ordering::Relaxed);
    progress.files_done.fetch_add(1, Ordering::Relaxed);
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
            let Whole::Messages(msgs) = read_whole(&path, cap, &progress).unwrap() else {
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
            read_whole(&grown, WHOLE, &Progress::default()),
            Ok(Whole::Larger)
        ));
        let gone = d.path().join("gone");
        assert!(matches!(
            read_whole(&gone, WHOLE, &Progress::default()),
            Ok(Whole::Gone(_))
        ));
        std::os::unix::fs::symlink(d.path().join("small"), d.path().join("link")).unwrap();
        let link = d.path().join("link");
        assert!(matches!(
            read_whole(&link, WHOLE, &Progress::default()),
            Ok(Whole::Gone(_))
        ));
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
        read_batch(d.path(), &entries, &Progress::default(), &mut |c| {
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
        read_batch(d.path(), &entries, &Progress::default(), &mut |_| {
            calls += 1;
            false
        })
        .unwrap();
        assert_eq!(calls, 1);
    }
}
