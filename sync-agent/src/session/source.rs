//! The source side of a session.

use super::{MANIFEST_FRAME_BYTES, Progress};
use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::{ApplySummary, Entry, Hello, Kind, Message, RelPath, Role};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use sync_core::delta::{self, Chunk, Encoder};
use tokio::sync::mpsc;

/// One round to ship.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// Whether `entries` is the whole tree.
    pub full: bool,
    /// Entries (sorted); for a full round, every entry.
    pub entries: Arc<Vec<Entry>>,
    /// Paths removed (partial rounds).
    pub deleted: Vec<RelPath>,
    /// Renames seen, applied first.
    pub renamed: Vec<(RelPath, RelPath)>,
    /// Root hash after the round (full rounds).
    pub root_hash: [u8; 32],
    /// Ask the replica to compare files by content hash (rsync -c).
    pub checksum: bool,
}

/// An open session on the source side.
#[derive(Debug)]
pub struct SourceSession {
    conn: quinn::Connection,
    ctl_send: quinn::SendStream,
    /// Control-stream messages, read by a task of their own (a frame read is not
    /// cancel-safe, so it never races in a `select!`).
    ctl_rx: mpsc::Receiver<Result<Option<Message>>>,
    root: PathBuf,
    next_id: u64,
    progress: Arc<Progress>,
}

impl SourceSession {
    /// Says hello on a new control stream and checks the replica's answer.
    pub async fn open(
        conn: quinn::Connection,
        root: PathBuf,
        folder: &str,
        version: u32,
        progress: Arc<Progress>,
    ) -> Result<Self> {
        let (mut ctl_send, mut ctl_recv) =
            conn.open_bi().await.context("opening the control stream")?;
        let mut hello = Hello::new(Role::Source, folder);
        hello.version = version;
        wire::send(&mut ctl_send, &Message::Hello(hello)).await?;
        match wire::expect_soon(&mut ctl_recv, "the replica's hello").await? {
            Message::Hello(h) => {
                h.check()
                    .map_err(|e| anyhow!("replica refused the handshake: {e}"))?;
                if h.role != Role::Replica {
                    bail!("peer is not serving as a replica");
                }
            }
            Message::Error { message, .. } => bail!("replica refused the session: {message}"),
            other => bail!("replica sent {other:?} instead of a hello"),
        }
        let (tx, ctl_rx) = mpsc::channel(4);
        tokio::spawn(async move {
            loop {
                let m = wire::recv(&mut ctl_recv).await;
                let end = !matches!(m, Ok(Some(_)));
                if tx.send(m).await.is_err() || end {
                    break;
                }
            }
        });
        Ok(Self {
            conn,
            ctl_send,
            ctl_rx,
            root,
            next_id: 1,
            progress,
        })
    }

    /// The connection.
    #[must_use]
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Ships one round and serves the replica's content requests until it
    /// reports the round applied.
    pub async fn round(&mut self, round: &Round) -> Result<ApplySummary> {
        let id = self.next_id;
        self.next_id += 1;
        let s = &mut self.ctl_send;
        wire::send(
            s,
            &Message::RoundStart {
                id,
                full: round.full,
                checksum: round.checksum,
            },
        )
        .await?;
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for e in round.entries.iter() {
            batch_bytes += e.path.as_bytes().len()
                + 64
                + match &e.kind {
                    Kind::Symlink { target } => target.len(),
                    Kind::HardLink { target } => target.as_bytes().len(),
                    _ => 0,
                }
                + e.meta
                    .xattrs
                    .iter()
                    .map(|x| x.name.len() + x.value.len() + 8)
                    .sum::<usize>();
            batch.push(e.clone());
            if batch.len() >= proto::MAX_ENTRIES_PER_BATCH || batch_bytes >= MANIFEST_FRAME_BYTES {
                wire::send(s, &Message::Manifest(std::mem::take(&mut batch))).await?;
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            wire::send(s, &Message::Manifest(batch)).await?;
        }
        if !round.full {
            // Small files travel with the round: no request per file on the hot path.
            let (entries, root) = (round.entries.clone(), self.root.clone());
            let inline =
                tokio::task::spawn_blocking(move || inline_contents(&root, &entries)).await?;
            for (index, data) in inline {
                wire::send(s, &Message::Inline { index, data }).await?;
            }
        }
        for chunk in round.renamed.chunks(proto::MAX_ENTRIES_PER_BATCH) {
            wire::send(s, &Message::Renamed(chunk.to_vec())).await?;
        }
        for chunk in round.deleted.chunks(proto::MAX_ENTRIES_PER_BATCH) {
            wire::send(s, &Message::Deleted(chunk.to_vec())).await?;
        }
        let end = Message::RoundEnd {
            id,
            entries: round.entries.len() as u64,
            root_hash: round.root_hash,
        };
        wire::send(s, &end).await?;

        let mut serving = tokio::task::JoinSet::new();
        let reply = loop {
            tokio::select! {
                msg = self.ctl_rx.recv() => break msg,
                incoming = self.conn.accept_bi() => {
                    let (send, recv) = incoming.map_err(|e| anyhow!("connection to the replica lost: {e}"))?;
                    let (entries, root, progress) = (round.entries.clone(), self.root.clone(), self.progress.clone());
                    serving.spawn(async move {
                        if let Err(e) = serve_file(send, recv, entries, root, progress).await {
                            tracing::warn!("serving a file: {e:#}");
                        }
                    });
                }
            }
        };
        serving.abort_all();
        match reply {
            Some(Ok(Some(Message::RoundDone { id: done, summary }))) if done == id => Ok(summary),
            Some(Ok(Some(Message::Error { code, message }))) => {
                bail!("replica failed ({code:?}): {message}")
            }
            Some(Ok(Some(other))) => {
                bail!("replica sent {other:?} instead of finishing round {id}")
            }
            Some(Err(e)) => Err(e),
            Some(Ok(None)) | None => bail!("replica closed the session during round {id}"),
        }
    }

    /// Ends the session cleanly.
    pub async fn close(mut self) {
        let _ = self.ctl_send.finish();
        // The replica closes once it has read the end of the control stream.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.conn.closed()).await;
        self.conn.close(0u32.into(), b"done");
    }
}

/// Most bytes of inline content per round.
const INLINE_BUDGET: usize = 4 << 20;
/// Most inline files per round: inline content travels on the one control
/// stream; a burst moves faster pulled on parallel streams.
const INLINE_FILES: usize = 64;

/// The content of the round's small files, read now and kept only when it still
/// matches the entry's hash.
fn inline_contents(root: &Path, entries: &[Entry]) -> Vec<(u64, Vec<u8>)> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut budget = INLINE_BUDGET;
    for (i, e) in entries.iter().enumerate() {
        let Kind::File { size, hash } = e.kind else {
            continue;
        };
        if out.len() >= INLINE_FILES {
            break;
        }
        if size as usize > proto::MAX_INLINE || size as usize > budget {
            continue;
        }
        let Ok(mut f) = sync_core::scan::open_regular(&sync_core::scan::abs(root, &e.path)) else {
            continue;
        };
        let mut data = Vec::with_capacity(size as usize);
        if f.by_ref()
            .take(proto::MAX_INLINE as u64 + 1)
            .read_to_end(&mut data)
            .is_err()
        {
            continue;
        }
        if data.len() as u64 == size && *blake3::hash(&data).as_bytes() == hash {
            budget -= data.len();
            out.push((i as u64, data));
        }
    }
    out
}

/// Sends one requested file: its entry must be a regular file of the round, so
/// the replica can never name anything else.
async fn serve_file(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    entries: Arc<Vec<Entry>>,
    root: PathBuf,
    progress: Arc<Progress>,
) -> Result<()> {
    let (index, signature) = match wire::expect_soon(&mut recv, "a file request").await? {
        Message::FileRequest { index, signature } => (index, signature),
        other => bail!("expected a file request, got {other:?}"),
    };
    let entry = usize::try_from(index)
        .ok()
        .and_then(|i| entries.get(i))
        .ok_or_else(|| anyhow!("replica asked for entry {index}, beyond the round"))?;
    if !matches!(entry.kind, Kind::File { .. }) {
        bail!(
            "replica asked for {} which is not a regular file",
            entry.path
        );
    }
    let path = sync_core::scan::abs(&root, &entry.path);
    if let Err(e) = sync_core::scan::open_regular(&path) {
        // Gone or replaced since the scan: an end that cannot match the round's
        // entry, so the replica leaves its version and the next round settles it.
        tracing::debug!("{e}: announcing it as changed");
        wire::send(
            &mut send,
            &Message::FileEnd {
                size: 0,
                hash: [0; 32],
            },
        )
        .await?;
        send.finish()?;
        let _ = send.stopped().await;
        return Ok(());
    }
    let (tx, mut rx) = mpsc::channel::<Message>(2);
    let reader = tokio::task::spawn_blocking(move || encode_file(&path, signature, tx, &progress));
    while let Some(msg) = rx.recv().await {
        wire::send(&mut send, &msg).await?;
    }
    reader.await??;
    send.finish()?;
    // Wait until the peer has read everything before the stream is dropped.
    let _ = send.stopped().await;
    Ok(())
}
fn encode_file(
    path: &Path,
    signature: Option<Vec<u8>>,
    tx: mpsc::Sender<Message>,
    progress: &Progress,
) -> Result<()> {
    use std::io::Read;
    let sig = signature
        .map(delta::parse_signature)
        .transpose()
        .with_context(|| format!("signature for {}", path.display()))?;
    let mut f = sync_core::scan::open_regular(path)?;
    let mut enc = Encoder::new(sig.as_ref());
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
        if tx.blocking_send(msg).is_err() {
            bail!(
                "stream to the replica closed while sending {}",
                path.display()
            );
        }
        if got < want {
            break;
        }
    }
    let end = Message::FileEnd {
        size,
        hash: *hasher.finalize().as_bytes(),
    };
    if tx.blocking_send(end).is_err() {
        bail!(
            "stream to the replica closed while sending {}",
            path.display()
        );
    }
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}
