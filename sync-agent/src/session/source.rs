//! The source side of a session.

use super::Progress;
use crate::handover::PromoteFailure;
use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::exchange::Request;
use proto::handshake::{self, Answer};
use proto::round::Outgoing;
use proto::{ApplySummary, Entry, Hello, Kind, Message, RelPath, Role};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use sync_core::sqlite::LiveSet;
use tokio::sync::mpsc;

use super::source_db::serve_db;

mod file;
mod same;
pub(crate) use file::encode_file;
use file::{serve_file, serve_files};
pub use sync_core::sqlite::mark_databases;

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
    /// Ask the replica for its own root hash after the round.
    pub verify: bool,
    /// The live databases whose snapshots the round's database entries are.
    pub live: Option<Arc<Mutex<LiveSet>>>,
    /// The entries' quick digest (`sync_core::digest::quick_root`), when the
    /// caller computed it; else the session does when it needs it.
    pub quick_digest: Option<[u8; 32]>,
    /// When the scan that made `entries` began (wall-clock nanoseconds,
    /// `sync_core::scan::now_ns` taken before it): a file unchanged since
    /// well before is sent with its entry's hash, not hashed again
    /// (`file::Scanned`). `None`: every file is hashed as it is sent.
    pub scan_began: Option<i128>,
}

impl Round {
    /// Whether it brings nothing: no entry, deletion or rename.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.deleted.is_empty() && self.renamed.is_empty()
    }
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
    /// The replica's epoch, from its hello.
    peer_epoch: u64,
    /// Whether the replica said it could be promoted, from its hello.
    peer_promotable: bool,
    /// The replica's software and version, from its hello.
    peer_software: String,
    /// The replica's clock minus ours when its hello arrived, in ms (within
    /// half a round trip); `None` when it did not say its time.
    peer_clock_skew_ms: Option<i64>,
    /// The cap on the content streams' bytes/s (`bwlimit`), if any.
    limit: Option<crate::bwlimit::Limiter>,
    /// The replica's quick digest of its tree (`TreeDigest`, once per
    /// session), once it came.
    digest: Option<Option<[u8; 32]>>,
    /// Whether the last round was sent as `RoundSame` (nothing to do).
    last_same: bool,
}

impl SourceSession {
    /// Says hello on a new control stream and checks the replica's answer.
    pub async fn open(
        conn: quinn::Connection,
        root: PathBuf,
        folder: &str,
        version: u32,
        epoch: u64,
        progress: Arc<Progress>,
    ) -> Result<Self> {
        let (mut ctl_send, mut ctl_recv) =
            conn.open_bi().await.context("opening the control stream")?;
        let mut hello = Hello::new(Role::Source, folder)
            .with_epoch(epoch)
            .sent_at(super::unix_ms());
        hello.version = version;
        wire::send(&mut ctl_send, &Message::Hello(hello)).await?;
        let (peer_epoch, peer_promotable, peer_software, peer_clock_skew_ms) =
            match wire::expect_soon(&mut ctl_recv, "the replica's hello").await? {
                Message::Hello(h) => {
                    let answer = handshake::judge_answer(&h, epoch)
                        .map_err(|e| anyhow!("replica refused the handshake: {e}"))?;
                    match answer {
                        Answer::Accepted { epoch } => {
                            let skew = (h.sent_unix_ms > 0).then(|| {
                                i64::try_from(
                                    i128::from(h.sent_unix_ms) - i128::from(super::unix_ms()),
                                )
                                .unwrap_or(i64::MAX)
                            });
                            (epoch, h.promotable, h.software.clone(), skew)
                        }
                        Answer::FencedBy { epoch: theirs } => {
                            // Fenced: the peer's hello carries its epoch, then why.
                            let message = refusal_text(&mut ctl_recv, &h).await;
                            return Err(Fenced {
                                epoch: theirs,
                                message,
                            }
                            .into());
                        }
                        Answer::Claimed { epoch: theirs, .. } => {
                            // A peer that still believes it is the source at an epoch no
                            // newer than ours is a stale master: it is fenced when its own
                            // loop reaches us; we retry.
                            let message = refusal_text(&mut ctl_recv, &h).await;
                            bail!(
                                "peer claims the folder at epoch {theirs} (ours is {epoch}): {message}"
                            );
                        }
                    }
                }
                Message::Error { message, .. } => bail!("replica refused the session: {message}"),
                other => bail!("replica sent {other:?} instead of a hello"),
            };
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
            peer_epoch,
            peer_promotable,
            peer_software,
            peer_clock_skew_ms,
            limit: None,
            digest: None,
            last_same: false,
        })
    }

    /// Caps the bytes/s of the session's content streams (`bwlimit`).
    #[must_use]
    pub fn with_bwlimit(mut self, rate: Option<crate::bwlimit::ByteRate>) -> Self {
        self.limit = rate.map(crate::bwlimit::Limiter::new);
        self
    }

    /// The session's `bwlimit`, shared by its content streams.
    #[must_use]
    pub fn bwlimit(&self) -> Option<crate::bwlimit::Limiter> {
        self.limit.clone()
    }

    /// The replica's epoch, as its hello said.
    #[must_use]
    pub fn peer_epoch(&self) -> u64 {
        self.peer_epoch
    }

    /// Whether the replica said it could serve as the source if promoted.
    #[must_use]
    pub fn peer_promotable(&self) -> bool {
        self.peer_promotable
    }

    /// The replica's software and version, and its clock skew in ms.
    #[must_use]
    pub fn peer_build(&self) -> (String, Option<i64>) {
        (self.peer_software.clone(), self.peer_clock_skew_ms)
    }

    /// The id the next round will have.
    #[must_use]
    pub fn next_round_id(&self) -> u64 {
        self.next_id
    }

    /// Asks the replica to become the folder's source at `epoch` (after a final
    /// cut); it runs its start hook and answers. Between rounds only.
    ///
    /// # Errors
    /// Typed for the handover's decision: [`PromoteFailure::Refused`] when the
    /// replica answered no (it stays a replica at its old epoch),
    /// [`PromoteFailure::Lost`] when there is no usable answer (it may have
    /// been promoted: only its epoch tells).
    pub async fn promote(&mut self, epoch: u64) -> Result<(), PromoteFailure> {
        let lost = |why: String| PromoteFailure::Lost(why);
        wire::send(&mut self.ctl_send, &Message::Promote { epoch })
            .await
            .map_err(|e| lost(format!("sending the promotion: {e:#}")))?;
        let reply = tokio::time::timeout(PROMOTE_TIMEOUT, async {
            loop {
                let reply = self.ctl_rx.recv().await;
                if let Some(reply) = self.unless_digest(reply) {
                    return reply;
                }
            }
        })
        .await
        .map_err(|_| lost("the replica did not answer the promotion".into()))?;
        match reply {
            Some(Ok(Some(Message::Promoted { epoch: e, error }))) if error.is_empty() => {
                if e != epoch {
                    return Err(lost(format!(
                        "replica promoted itself to epoch {e}, not {epoch}"
                    )));
                }
                Ok(())
            }
            Some(Ok(Some(Message::Promoted { error, .. }))) => Err(PromoteFailure::Refused(error)),
            Some(Ok(Some(Message::Error { message, .. }))) => {
                Err(lost(format!("replica failed the promotion: {message}")))
            }
            Some(Ok(Some(other))) => Err(lost(format!(
                "replica answered the promotion with {other:?}"
            ))),
            Some(Err(e)) => Err(lost(format!("{e:#}"))),
            Some(Ok(None)) | None => Err(lost(
                "replica closed the session during the promotion".into(),
            )),
        }
    }

    /// The connection.
    #[must_use]
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Whether the last round was answered without its manifest: the
    /// replica's tree had the source's quick digest.
    #[must_use]
    pub fn last_round_same(&self) -> bool {
        self.last_same
    }

    /// Ships one round and serves the replica's content requests until it
    /// reports the round applied.
    pub async fn round(&mut self, round: &Round) -> Result<ApplySummary> {
        let id = self.next_id;
        self.next_id += 1;
        self.last_same = self.send_same(id, round).await?;
        if !self.last_same {
            self.send_round(id, round).await?;
        }
        self.serve_round(id, round).await
    }

    /// A round's messages: its start, manifest, inline contents and end.
    async fn send_round(&mut self, id: u64, round: &Round) -> Result<()> {
        let s = &mut self.ctl_send;
        let out = Outgoing {
            id,
            full: round.full,
            checksum: round.checksum,
            verify: round.verify,
            entries: &round.entries,
            renamed: &round.renamed,
            deleted: &round.deleted,
            root_hash: round.root_hash,
        };
        for msg in out.head() {
            let n = match &msg {
                Message::Manifest(b) => b.len() as u64,
                _ => 0,
            };
            wire::send(s, &msg).await?;
            self.progress.entries_sent.fetch_add(n, Ordering::Relaxed);
        }
        let inline = if round.full {
            Vec::new()
        } else {
            // Small files travel with the round: no request per file on the hot path.
            let (entries, root) = (round.entries.clone(), self.root.clone());
            tokio::task::spawn_blocking(move || inline_contents(&root, &entries)).await?
        };
        for msg in out.tail(inline) {
            wire::send(s, &msg).await?;
        }
        Ok(())
    }

    /// Serves the replica's content requests until it reports round `id`
    /// applied.
    async fn serve_round(&mut self, id: u64, round: &Round) -> Result<ApplySummary> {
        let mut serving = tokio::task::JoinSet::new();
        // A replica may open many streams; at most this many are served at once
        // (each may hold a signature index and a window of the file).
        let slots = Arc::new(tokio::sync::Semaphore::new(super::PARALLEL_FILES));
        let reply = loop {
            tokio::select! {
                msg = self.ctl_rx.recv() => if let Some(msg) = self.unless_digest(msg) {
                    break msg;
                },
                // A served stream's task is freed when it ends (a finished
                // task's memory stays until it is joined: thousands of files).
                Some(_) = serving.join_next(), if !serving.is_empty() => {}
                incoming = self.conn.accept_bi() => {
                    let (send, recv) = incoming.map_err(|e| anyhow!("connection to the replica lost: {e}"))?;
                    let (entries, root, progress) = (round.entries.clone(), self.root.clone(), self.progress.clone());
                    let (live, began) = (round.live.clone(), round.scan_began);
                    let slots = slots.clone();
                    let limit = self.limit.clone();
                    serving.spawn(crate::bwlimit::scope(limit, async move {
                        let Ok(_slot) = slots.acquire_owned().await else { return };
                        if let Err(e) = serve(send, recv, (entries, began), root, live, progress).await {
                            tracing::warn!("serving the replica: {e:#}");
                        }
                    }));
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

    /// Ends the session cleanly; `true` when the replica closed the
    /// connection (nothing is left to deliver to it).
    pub async fn close(mut self) -> bool {
        let _ = self.ctl_send.finish();
        // The replica closes once it has read the end of the control stream.
        let why = tokio::time::timeout(std::time::Duration::from_secs(5), self.conn.closed()).await;
        tracing::debug!(?why, "session closed");
        self.conn.close(0u32.into(), b"done");
        matches!(why, Ok(quinn::ConnectionError::ApplicationClosed(_)))
    }
}

/// Why a peer refused us: its `Error` frame, or what its hello says.
async fn refusal_text(ctl_recv: &mut quinn::RecvStream, h: &Hello) -> String {
    match wire::expect_soon(ctl_recv, "the replica's answer").await {
        Ok(Message::Error { message, .. }) => message,
        _ => handshake::claim_text(h.role, h.epoch),
    }
}

/// How long a replica may take to promote itself (its start hook included).
const PROMOTE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

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

/// The replica's demand, on a stream of its own: a file or a database.
async fn serve(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (entries, scan_began): (Arc<Vec<Entry>>, Option<i128>),
    root: PathBuf,
    live: Option<Arc<Mutex<LiveSet>>>,
    progress: Arc<Progress>,
) -> Result<()> {
    let msg = wire::expect_soon(&mut recv, "a request").await?;
    match proto::exchange::admit(&entries, live, msg)? {
        Request::File { entry, signature } => {
            let entry = (entry.clone(), scan_began);
            serve_file(send, entry, signature, root, progress).await
        }
        Request::Files { entries } => {
            let entries = entries.into_iter().cloned().collect();
            serve_files(send, (entries, scan_began), root, progress).await
        }
        Request::Db {
            entry,
            db,
            have,
            live,
        } => {
            let path = entry.path.clone();
            serve_db(send, recv, (path, db), have, live, progress).await
        }
    }
}

/// The peer refused us because its epoch is newer than ours (a failover
/// promoted it): this node must take the replica role.
#[derive(Debug)]
pub struct Fenced {
    /// The peer's epoch, which this node adopts.
    pub epoch: u64,
    /// The peer's explanation.
    pub message: String,
}

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fenced by the peer (epoch {}): {}",
            self.epoch, self.message
        )
    }
}

impl std::error::Error for Fenced {}
