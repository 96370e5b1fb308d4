//! The replica side of a session: rounds applied under the folder's root.

use super::replica_round::{Next, apply_round, apply_same, offer_digest, read_round};
use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::handshake::{self, FolderView, Refusal};
use proto::{ErrorCode, Hello, Message, Role};
use std::collections::HashMap;
use std::sync::Arc;
use sync_core::apply::Replica;
use sync_core::filter::Filter;
use sync_core::scan::DbDetect;

/// A folder this replica serves.
#[derive(Debug)]
pub struct ReplicaFolder {
    /// Its name (as sources say in their hello).
    pub name: String,
    /// Its root, held open.
    pub replica: Arc<Replica>,
    /// Paths neither written nor deleted.
    pub filter: Filter,
    /// Peers allowed to push into this folder (empty: any pinned peer).
    pub allowed: Vec<crate::NodeId>,
    /// One session at a time per folder.
    pub lock: tokio::sync::Mutex<()>,
    /// When the last round was applied, for status.
    pub last_applied: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// The connection of the session in progress: a source that reconnects
    /// supersedes its own stale session instead of waiting for it to time out.
    pub current: std::sync::Mutex<Option<(Option<crate::NodeId>, quinn::Connection)>>,
    /// How databases are told (globs and headers).
    pub detect: Arc<DbDetect>,
    /// Fencing: this node's epoch for the folder and whether it was promoted.
    pub fence: std::sync::Mutex<Fence>,
    /// Where the epoch is persisted (`None`: not persisted; promotion refused).
    pub state_dir: Option<std::path::PathBuf>,
    /// This node's id, written beside the epoch for humans.
    pub node: String,
    /// Hooks (`start_replica` runs at promotion).
    pub hooks: crate::config::Hooks,
    /// Woken when the folder is promoted: the agent starts its source loop.
    pub promoted: tokio::sync::Notify,
    /// The last round's warnings (a database held open by another process...),
    /// for status.
    pub last_warning: std::sync::Mutex<Option<String>>,
    /// When the session holding the folder last heard from its peer: a session
    /// silent for [`preempt_idle`] is preempted by a new one.
    pub activity: Activity,
    /// Rounds applied and the source's epoch, for status.
    pub stats: std::sync::Mutex<ReplicaStats>,
    /// Large files the session's source staged ahead of their rounds.
    pub stages: std::sync::Mutex<super::replica_stage::Stages>,
    /// Whether this node can serve as the folder's source (a peer address,
    /// `failover` not off): a promotion of a node that cannot is refused.
    pub promotable: bool,
    /// The latest directory where what only this node held was kept aside
    /// when it came back fenced (`{state}/diverged/...`), for status.
    pub diverged: std::sync::Mutex<Option<std::path::PathBuf>>,
    /// `uid_map`/`gid_map`: the source's owners and ACL qualifiers to this
    /// host's ids (and back for the root hash).
    pub ids: sync_core::idmap::IdMap,
    /// What full rounds do with excluded leftovers (`delete_excluded`).
    pub sweep: sync_core::engine::Sweep,
    /// The stamps of the files its last scan ahead saw, and which had no
    /// xattrs: the next one skips listing theirs while a stamp holds.
    pub scan_index: std::sync::Mutex<sync_core::index::HashIndex>,
    /// Its scan ahead, kept between sessions while its tree is quiet.
    pub ahead: super::replica_ahead::Kept,
}

/// What a replica folder's status row shows besides its fence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// The epoch of the source of the current (or last) session.
    pub source_epoch: Option<u64>,
    /// Rounds applied since the agent started.
    pub rounds: u64,
    /// Full rounds among them.
    pub full_rounds: u64,
    /// Databases the last round left alone because another process holds them
    /// open here.
    pub held: Vec<String>,
    /// Excluded paths present here, as the last full round found them.
    pub leftovers: Option<sync_core::engine::Leftovers>,
}

/// When a session last heard from its peer (shared with its transfers).
#[derive(Debug, Clone)]
pub struct Activity(Arc<std::sync::Mutex<std::time::Instant>>);

impl Default for Activity {
    fn default() -> Self {
        Self(Arc::new(std::sync::Mutex::new(std::time::Instant::now())))
    }
}

impl Activity {
    /// The peer was heard from now.
    pub fn touch(&self) {
        if let Ok(mut t) = self.0.lock() {
            *t = std::time::Instant::now();
        }
    }

    /// How long since the peer was last heard from (since the agent started,
    /// when it never was).
    pub fn idle(&self) -> std::time::Duration {
        self.0.lock().map(|t| t.elapsed()).unwrap_or_default()
    }

    /// Moves the last contact `by` into the past (tests of what a quiet
    /// source allows).
    #[cfg(test)]
    pub(crate) fn backdate(&self, by: std::time::Duration) {
        if let Ok(mut t) = self.0.lock()
            && let Some(then) = t.checked_sub(by)
        {
            *t = then;
        }
    }
}

/// A session whose peer sent nothing for this long (10 s, or the stage
/// deadline when shorter) gives the folder up to a new session of a pinned
/// peer, which closes it.
pub fn preempt_idle() -> std::time::Duration {
    std::time::Duration::from_secs(10).min(wire::stage_deadline())
}

/// A folder's fencing state in memory.
pub use proto::handshake::Fence;

/// The folders of a replica; a replica with a single folder accepts any name.
pub type Folders = HashMap<String, Arc<ReplicaFolder>>;

fn pick<'f>(folders: &'f Folders, name: &str) -> Option<&'f Arc<ReplicaFolder>> {
    folders.get(name).or_else(|| {
        if folders.len() == 1 {
            folders.values().next()
        } else {
            None
        }
    })
}

/// A round as received (assembled and checked by [`proto::round::Assembler`]).
pub(super) use proto::round::Incoming;

/// Serves one connection: hello, then rounds until the source ends the session.
pub async fn run(conn: quinn::Connection, folders: Arc<Folders>) -> Result<()> {
    let mut in_session = None;
    let res = run_inner(&conn, &folders, &mut in_session).await;
    // Forget this connection as the folder's current session, and close it.
    if let Some(folder) = &in_session
        && let Ok(mut cur) = folder.current.lock()
        && cur
            .as_ref()
            .is_some_and(|(_, c)| c.stable_id() == conn.stable_id())
    {
        *cur = None;
    }
    conn.close(0u32.into(), b"bye");
    // The peer is not kept waiting for the page tables' save.
    if let Some(folder) = in_session {
        super::replica_tables::save(folder.replica.clone()).await;
        // Scanned again now if the session changed the tree, so the next
        // one need not.
        tokio::spawn(super::replica_ahead::refresh(folder));
    }
    res
}

async fn run_inner(
    conn: &quinn::Connection,
    folders: &Folders,
    in_session: &mut Option<Arc<ReplicaFolder>>,
) -> Result<()> {
    let peer_id = crate::tls::peer_id(conn);
    let peer = peer_id
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    let (mut ctl_send, mut ctl_recv, first) = first_frame(conn, &peer).await?;
    let h = match first {
        Message::Hello(h) => h,
        other => bail!("peer {peer} opened with {other:?} instead of a hello"),
    };
    let found = pick(folders, &h.folder);
    let view = found.map(|f| FolderView {
        name: &f.name,
        peer_allowed: f.allowed.is_empty() || peer_id.is_some_and(|p| f.allowed.contains(&p)),
        promotion_pending: crate::handover::promotion::pending(f).is_some(),
        fence: f.fence.lock().map(|g| *g).unwrap_or_default(),
        promotable: f.promotable,
    });
    let their_epoch = match handshake::admit(&h, &peer, view) {
        Ok(admitted) => admitted.epoch,
        Err(refusal) => return refuse(&mut ctl_send, &peer, refusal).await,
    };
    let folder = found.cloned().ok_or_else(|| anyhow!("folder vanished"))?;
    if let Ok(mut st) = folder.stats.lock() {
        st.source_epoch = Some(their_epoch);
    }
    adopt(&folder, their_epoch, &peer);
    let epoch = folder.fence.lock().map(|g| g.epoch).unwrap_or_default();
    wire::send(
        &mut ctl_send,
        &Message::Hello(
            Hello::new(Role::Replica, &folder.name)
                .with_epoch(epoch)
                .with_promotable(folder.promotable)
                .sent_at(super::unix_ms()),
        ),
    )
    .await?;
    *in_session = Some(folder.clone());
    let _guard = take_folder(&folder, conn, peer_id, &peer).await;
    folder.activity.touch();
    // A local promotion (`sync-cli promote`) may have run while this session
    // waited for the folder: then this source is fenced.
    let now = folder.fence.lock().map(|g| *g).unwrap_or_default();
    if let Err(r) = handshake::recheck(&folder.name, &peer, now, their_epoch) {
        let code = r.code();
        return fail(conn, &mut ctl_send, &folder, r.into(), code, &peer).await;
    }
    folder.replica.reset();
    tracing::info!(%peer, folder = %folder.name, "source connected");
    apply_rounds(conn, &folder, &mut ctl_send, &mut ctl_recv, &peer).await
}

/// The control stream and its first frame: a connection that opens no control
/// stream, or says no hello, in time gives its slot back.
async fn first_frame(
    conn: &quinn::Connection,
    peer: &str,
) -> Result<(quinn::SendStream, quinn::RecvStream, Message)> {
    tokio::time::timeout(wire::hello_deadline(), async {
        let (s, mut r) = conn
            .accept_bi()
            .await
            .context("waiting for the control stream")?;
        let m = wire::expect(&mut r, "a hello").await?;
        Ok::<_, anyhow::Error>((s, r, m))
    })
    .await
    .map_err(|_| {
        anyhow!(
            "peer {peer} opened no control stream or sent no hello within {} s",
            wire::hello_deadline().as_secs()
        )
    })?
}

/// Says why the source is refused (after our hello when it is fenced: it
/// carries the epoch the fenced side adopts) and ends the session.
async fn refuse(ctl_send: &mut quinn::SendStream, peer: &str, refusal: Refusal) -> Result<()> {
    if let Some(ours) = refusal.reply_hello() {
        wire::send(ctl_send, &Message::Hello(ours)).await?;
    }
    let message = refusal.to_string();
    let code = refusal.code();
    wire::send(
        ctl_send,
        &Message::Error {
            code,
            message: message.clone(),
        },
    )
    .await?;
    let _ = ctl_send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), ctl_send.stopped()).await;
    bail!("peer {peer}: {message}");
}

/// Rounds and promotion requests until the source ends the session.
async fn apply_rounds(
    conn: &quinn::Connection,
    folder: &Arc<ReplicaFolder>,
    ctl_send: &mut quinn::SendStream,
    ctl_recv: &mut quinn::RecvStream,
    peer: &str,
) -> Result<()> {
    // The bulk lane: large files staged on streams of their own while
    // rounds go on; dropped with the session.
    let stager = tokio::spawn(super::replica_stage::accept_stages(
        conn.clone(),
        folder.clone(),
        peer.to_string(),
    ));
    let res = apply_rounds_inner(conn, folder, ctl_send, ctl_recv, peer).await;
    stager.abort();
    let left = folder
        .stages
        .lock()
        .map(|mut s| s.drain())
        .unwrap_or_default();
    for k in &left {
        folder.replica.discard(k);
    }
    res
}

/// [`apply_rounds`] without the bulk lane's setup and cleanup.
async fn apply_rounds_inner(
    conn: &quinn::Connection,
    folder: &Arc<ReplicaFolder>,
    ctl_send: &mut quinn::SendStream,
    ctl_recv: &mut quinn::RecvStream,
    peer: &str,
) -> Result<()> {
    let mut prescanned = offer_digest(folder, ctl_send).await?;
    let mut saved = std::time::Instant::now();
    loop {
        let (id, full, applied) = match read_round(ctl_recv, &folder.activity).await {
            Ok(Some(Next::Round(round))) => {
                let (id, full) = (round.id, round.full);
                tracing::debug!(folder = %folder.name, round = id, entries = round.entries.len(), "round received");
                // The scan made ahead serves the session's first round only.
                let pre = prescanned.take().filter(|_| full).map(|a| a.pre);
                (id, full, apply_round(conn, folder, round, pre).await)
            }
            Ok(Some(Next::Same { id, digest })) => {
                let (applied, back) = apply_same(folder, prescanned.take(), id, digest).await;
                prescanned = back;
                (id, true, applied)
            }
            Ok(Some(Next::Promote(epoch))) => {
                if answer_promotion(folder, epoch, ctl_send, ctl_recv).await? {
                    return Ok(());
                }
                continue;
            }
            Ok(None) => break,
            Err(e) => return fail(conn, ctl_send, folder, e, ErrorCode::Protocol, peer).await,
        };
        match applied {
            Ok(summary) => {
                record_round(folder, full, &summary);
                super::replica_tables::after_round(folder, &mut saved);
                wire::send(ctl_send, &Message::RoundDone { id, summary }).await?;
                if full {
                    sync_core::trim_heap();
                }
            }
            Err(e) => return fail(conn, ctl_send, folder, e, ErrorCode::Apply, peer).await,
        }
    }
    // A scan no round consumed is kept while the tree stays quiet.
    if let Some(a) = prescanned {
        folder.ahead.keep(a);
    }
    let _ = ctl_send.finish();
    Ok(())
}

/// Runs a promotion the source asked for and answers it; `true` when this
/// node is now the source (the session is over).
async fn answer_promotion(
    folder: &ReplicaFolder,
    epoch: u64,
    ctl_send: &mut quinn::SendStream,
    ctl_recv: &mut quinn::RecvStream,
) -> Result<bool> {
    let error = match promote(folder, epoch).await {
        Ok(()) => String::new(),
        Err(e) => format!("{e:#}"),
    };
    wire::send(
        ctl_send,
        &Message::Promoted {
            epoch,
            error: error.clone(),
        },
    )
    .await?;
    if !error.is_empty() {
        return Ok(false);
    }
    folder.promoted.notify_waiters();
    folder.promoted.notify_one();
    // A source no longer: this session is over once the old source has read
    // the answer and closed.
    let _ = ctl_send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while let Ok(Some(_)) = wire::recv(ctl_recv).await {}
    })
    .await;
    Ok(true)
}

/// A round applied, for status.
fn record_round(folder: &ReplicaFolder, full: bool, summary: &proto::ApplySummary) {
    if let Ok(mut t) = folder.last_applied.lock() {
        *t = Some(std::time::SystemTime::now());
    }
    if let Ok(mut w) = folder.last_warning.lock() {
        *w = (!summary.warnings.is_empty()).then(|| summary.warnings.join("; "));
    }
    if let Ok(mut st) = folder.stats.lock() {
        st.rounds += 1;
        st.full_rounds += u64::from(full);
        st.held = summary.held.iter().map(|h| h.path.to_string()).collect();
    }
}

/// Where to keep aside what this node alone holds, when it was fenced and
/// this is its first repair: `(state dir, capture dir, epoch)`.
pub(super) fn divergence_target(
    folder: &ReplicaFolder,
    full: bool,
) -> Result<Option<(std::path::PathBuf, std::path::PathBuf, u64)>> {
    let Some(state) = &folder.state_dir else {
        return Ok(None);
    };
    let Some(epoch) = crate::diverged::pending(state, &folder.name)? else {
        return Ok(None);
    };
    if !full {
        bail!(
            "folder {:?}: this node was fenced and keeps aside what only it holds during its \
             first full round; a partial round comes first: refused",
            folder.name
        );
    }
    let into = crate::diverged::target(state, &folder.name, epoch)?;
    Ok(Some((state.clone(), into, epoch)))
}

/// A source at a newer epoch than this replica holds is the folder's source
/// now (a failover this node missed): its epoch is adopted and persisted, so
/// that a later promotion of this node goes past it.
fn adopt(folder: &ReplicaFolder, epoch: u64, peer: &str) {
    let Ok(mut g) = folder.fence.lock() else {
        return;
    };
    if !g.adopts(epoch) {
        return;
    }
    if let Some(dir) = &folder.state_dir {
        let st = crate::epoch::FolderState {
            role: crate::config::Role::Replica,
            epoch,
        };
        if let Err(e) = crate::epoch::store(dir, &folder.name, &folder.node, st) {
            tracing::warn!(folder = %folder.name, "adopting epoch {epoch} of peer {peer}: {e:#}");
        }
    }
    tracing::info!(folder = %folder.name, %peer, "adopted the source's epoch {epoch} (was {})", g.epoch);
    g.epoch = epoch;
}

async fn fail(
    conn: &quinn::Connection,
    ctl_send: &mut quinn::SendStream,
    folder: &ReplicaFolder,
    e: anyhow::Error,
    code: ErrorCode,
    peer: &str,
) -> Result<()> {
    let r = folder.replica.clone();
    let _ = tokio::task::spawn_blocking(move || r.abort()).await;
    let mut message = format!("{e:#}");
    // The frame's text bound: a long path must not make the error malformed.
    sync_core::apply::truncate(&mut message, proto::MAX_TEXT);
    // A peer that does not read is not waited for long.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        wire::send(ctl_send, &Message::Error { code, message }),
    )
    .await;
    let _ = ctl_send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
    Err(e.context(format!("session with peer {peer}, folder {}", folder.name)))
}

/// Promotion: the epoch persisted first (from then on older sources are
/// refused), then the `start_replica` hook; if the hook fails, the old state is
/// put back and the replica stays as it was (durably: see
/// [`crate::handover::promotion`]). Bounds: [`crate::promotion::check`].
pub(crate) async fn promote(folder: &ReplicaFolder, epoch: u64) -> Result<()> {
    let Some(dir) = folder.state_dir.clone() else {
        bail!(
            "folder {:?}: this replica has no state directory ([node] state) to persist an epoch in",
            folder.name
        );
    };
    let before = folder.fence.lock().map(|g| *g).unwrap_or_default();
    crate::promotion::check(folder, before, epoch)?;
    crate::handover::promotion::promote(folder, &dir, before, epoch).await?;
    folder.ahead.clear();
    tracing::info!(folder = %folder.name, epoch, "promoted: this node is now the folder's source");
    Ok(())
}

/// Waits for the folder: the same peer reconnecting supersedes its own stale
/// session at once; a session of another peer is waited for, and preempted
/// once its peer has been silent for [`preempt_idle`] (a stalled peer cannot
/// hold the folder).
async fn take_folder<'f>(
    folder: &'f ReplicaFolder,
    conn: &quinn::Connection,
    peer_id: Option<crate::NodeId>,
    peer: &str,
) -> tokio::sync::MutexGuard<'f, ()> {
    loop {
        let holder = folder.current.lock().ok().and_then(|c| c.clone());
        if let Some((p, old)) = holder
            && old.stable_id() != conn.stable_id()
        {
            let idle = folder.activity.idle();
            if p == peer_id {
                old.close(1u32.into(), b"superseded by a new session");
            } else if idle >= preempt_idle() {
                tracing::warn!(%peer, folder = %folder.name, idle_s = idle.as_secs(), "preempting a stalled session of another peer");
                old.close(1u32.into(), b"preempted: stalled while another peer waited");
            }
        }
        tokio::select! {
            g = folder.lock.lock() => {
                if let Ok(mut c) = folder.current.lock() {
                    *c = Some((peer_id, conn.clone()));
                }
                return g;
            }
            () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
        }
    }
}
