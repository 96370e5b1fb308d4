//! Serving one requested file of a round. A small one with no delta asked
//! for is read whole by one blocking task and its messages sent after: no
//! wake of the sender per message, one open. A larger one, or one the
//! replica sent a signature for, is streamed as it is read.
//!
//! A file whose inode has not changed since before the round's scan began
//! (its ctime earlier by [`SCAN_MARGIN_NS`], and it stays so while it is
//! read) holds what the scan hashed: it ends with a `ScannedEnd` carrying the
//! entry's hash and the content is not hashed again (a first mirror's source
//! hashed every byte twice). The replica checks the content against that
//! hash; one that does not match changed since the scan and is left as it
//! was. Any other file is hashed as it is read and ends with a `FileEnd`.

use crate::session::{Progress, WHOLE_FILE as WHOLE};
use crate::wire;
use anyhow::{Context, Result, bail};
use proto::{Entry, Kind, Message};
use std::io::Read;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use sync_core::delta::{self, Chunk, Encoder};
use tokio::sync::mpsc;

/// How far before the scan's start a file's ctime must lie for its content
/// to be taken as the scan's: past a coarse clock's tick, a file system's
/// timestamp granularity and a file server's clock a little behind ours. A
/// file changed with its times unmoved all the same (through a shared
/// writable mapping whose pages were already dirty) fails the replica's
/// check against the scan's hash and is left as it was with a warning, as
/// one found changed here is.
pub(crate) const SCAN_MARGIN_NS: i128 = 5_000_000_000;

/// What the round's scan found of a file, and since when the file must not
/// have changed for its content to be the scan's.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scanned {
    pub size: u64,
    pub hash: [u8; 32],
    /// Wall-clock nanoseconds: the scan's start less [`SCAN_MARGIN_NS`].
    pub since: i128,
}

impl Scanned {
    /// The entry's size and hash, when the round says when its scan began.
    pub(crate) fn of(entry: &Entry, scan_began: Option<i128>) -> Option<Self> {
        match (&entry.kind, scan_began) {
            (&Kind::File { size, hash }, Some(t)) => Some(Self {
                size,
                hash,
                since: t - SCAN_MARGIN_NS,
            }),
            _ => None,
        }
    }

    /// Whether `st` is the file as the scan hashed it: of the scanned size,
    /// its inode (content, size, metadata) unchanged since before the scan.
    fn holds(&self, st: &std::fs::Metadata) -> bool {
        let ctime = i128::from(st.ctime()) * 1_000_000_000 + i128::from(st.ctime_nsec());
        st.len() == self.size && ctime < self.since
    }

    /// Whether the file open as `f` still holds (see [`Scanned::holds`]).
    fn still_holds(&self, f: &std::fs::File) -> bool {
        f.metadata().is_ok_and(|m| self.holds(&m))
    }
}

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
    (entry, scan_began): (Entry, Option<i128>),
    signature: Option<Vec<u8>>,
    root: PathBuf,
    progress: Arc<Progress>,
) -> Result<()> {
    // `proto::exchange::admit` let only a regular file of the round through.
    let path = sync_core::scan::abs(&root, &entry.path);
    let small = matches!(entry.kind, Kind::File { size, .. } if size <= WHOLE);
    let scanned = Scanned::of(&entry, scan_began);
    let whole = if small && signature.is_none() {
        let (p, pr) = (path.clone(), progress.clone());
        tokio::task::spawn_blocking(move || read_whole(&p, WHOLE, scanned.as_ref(), &pr)).await??
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
            let reader = tokio::task::spawn_blocking(move || {
                encode_file(&path, (signature, scanned), tx, &progress)
            });
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
    (entries, scan_began): (Vec<Entry>, Option<i128>),
    root: PathBuf,
    progress: Arc<Progress>,
) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
    let reader = tokio::task::spawn_blocking(move || {
        // the stream gave up: its error is the one reported
        read_batch(&root, (&entries, scan_began), &progress, &mut |b| {
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
    (entries, scan_began): (&[Entry], Option<i128>),
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
        let scanned = Scanned::of(e, scan_began);
        let msgs = match read_whole(&path, size, scanned.as_ref(), progress)? {
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
/// [`Whole::Larger`] past `cap`. It ends with a `ScannedEnd` (the scan's
/// hash) when the file is still as `scanned` found it (see the module docs),
/// else with a `FileEnd` (the hash of what was read).
fn read_whole(
    path: &Path,
    cap: u64,
    scanned: Option<&Scanned>,
    progress: &Progress,
) -> Result<Whole> {
    let (f, st) = match sync_core::scan::open_regular_stat(path) {
        Ok(f) => f,
        Err(e) => return Ok(Whole::Gone(e.to_string())),
    };
    let scanned = scanned.filter(|s| s.holds(&st));
    // sized by the open's fstat (one byte more tells a grown file): no
    // regrowth and copy on the way to 256 KiB
    let hint = usize::try_from(st.len().min(cap)).unwrap_or(0);
    let mut data = Vec::with_capacity(hint + 1);
    (&f).take(cap + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data.len() as u64 > cap {
        return Ok(Whole::Larger);
    }
    // The messages `encode` would make of it (literals of at most a chunk,
    // then the end), made of the bytes read: no window zeroed, no copy of a
    // small file (most of a first mirror's files).
    let size = data.len() as u64;
    let end = match scanned {
        Some(s) if size == s.size && s.still_holds(&f) => {
            Message::ScannedEnd { size, hash: s.hash }
        }
        _ => Message::FileEnd {
            size,
            hash: *blake3::hash(&data).as_bytes(),
        },
    };
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
    msgs.push(end);
    progress.bytes_done.fetch_add(size, Ordering::Relaxed);
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(Whole::Messages(msgs))
}

/// Streams the file at `path` as messages into `tx`: literals, or a delta
/// against `signature`, then its end.
pub(crate) fn encode_file(
    path: &Path,
    (signature, scanned): (Option<Vec<u8>>, Option<Scanned>),
    tx: mpsc::Sender<Message>,
    progress: &Progress,
) -> Result<()> {
    let sig = signature
        .map(delta::parse_signature)
        .transpose()
        .with_context(|| format!("signature for {}", path.display()))?;
    let (f, st) = sync_core::scan::open_regular_stat(path)?;
    let scanned = scanned.filter(|s| s.holds(&st));
    let enc = Encoder::new(sig.as_ref());
    encode(&f, (enc, scanned), path, progress, &mut |msg| {
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
/// each handed to `emit`, the end (size and hash) last. With `scanned` (the
/// file held what the scan hashed when it was opened) the content is not
/// hashed: it ends with a `ScannedEnd` (the scan's hash) if the file still
/// holds it at the end, else a `FileEnd` whose hash cannot match the entry
/// (the replica leaves its version; the next round sends the file again).
fn encode(
    mut f: &std::fs::File,
    (mut enc, scanned): (Encoder<'_>, Option<Scanned>),
    path: &Path,
    progress: &Progress,
    emit: &mut dyn FnMut(Message) -> Result<()>,
) -> Result<()> {
    let mut hasher = scanned.is_none().then(blake3::Hasher::new);
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
        if let Some(h) = hasher.as_mut() {
            h.update(data);
        }
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
    emit(match (hasher, scanned) {
        (Some(h), _) => Message::FileEnd {
            size,
            hash: *h.finalize().as_bytes(),
        },
        (None, Some(s)) if size == s.size && s.still_holds(f) => {
            Message::ScannedEnd { size, hash: s.hash }
        }
        // changed while it was read: an end that cannot match the entry
        (None, _) => Message::FileEnd {
            size,
            hash: [0; 32],
        },
    })?;
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;
