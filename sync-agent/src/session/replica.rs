//! The replica side of a session: rounds applied under the folder's root.

use super::replica_fetch::{fetch_db, fetch_file};
use super::{DB_PAGE_BYTES, MAX_ROUND_BYTES, MAX_ROUND_ENTRIES, PARALLEL_FILES};
use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::{ApplySummary, Entry, ErrorCode, Hello, Kind, Message, RelPath, Role};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt as _;
use std::sync::Arc;
use sync_core::Manifest;
use sync_core::apply::Replica;
use sync_core::filter::Filter;
use sync_core::scan::{DbDetect, ScanOptions};
use tokio::sync::Semaphore;

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
    /// Whether this node can serve as the folder's source (a peer address,
    /// `failover` not off): a promotion of a node that cannot is refused.
    pub promotable: bool,
    /// The latest directory where what only this node held was kept aside
    /// when it came back fenced (`{state}/diverged/...`), for status.
    pub diverged: std::sync::Mutex<Option<std::path::PathBuf>>,
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

    /// How long since the peer was last heard from.
    pub fn idle(&self) -> std::time::Duration {
        self.0.lock().map(|t| t.elapsed()).unwrap_or_default()
    }
}

/// A session whose peer sent nothing for this long (10 s, or the stage
/// deadline when shorter) gives the folder up to a new session of a pinned
/// peer, which closes it.
pub fn preempt_idle() -> std::time::Duration {
    std::time::Duration::from_secs(10).min(wire::stage_deadline())
}

/// A folder's fencing state in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fence {
    /// The epoch this node holds.
    pub epoch: u64,
    /// Whether this node is now the folder's source (promoted).
    pub source: bool,
}

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

/// A round as received.
#[derive(Debug)]
struct Incoming {
    id: u64,
    full: bool,
    checksum: bool,
    verify: bool,
    entries: Vec<Entry>,
    deleted: Vec<RelPath>,
    renamed: Vec<(RelPath, RelPath)>,
    inline: HashMap<u64, Vec<u8>>,
    root_hash: [u8; 32],
}

/// Serves one connection: hello, then rounds until the source ends the session.
pub async fn run(conn: quinn::Connection, folders: Arc<Folders>) -> Result<()> {
    let mut served = None;
    let res = run_inner(&conn, &folders, &mut served).await;
    // Forget this connection as the folder's current session, and close it.
    if let Some(folder) = served
        && let Ok(mut cur) = folder.current.lock()
        && cur
            .as_ref()
            .is_some_and(|(_, c)| c.stable_id() == conn.stable_id())
    {
        *cur = None;
    }
    conn.close(0u32.into(), b"bye");
    res
}

async fn run_inner(
    conn: &quinn::Connection,
    folders: &Folders,
    served: &mut Option<Arc<ReplicaFolder>>,
) -> Result<()> {
    let peer_id = crate::tls::peer_id(conn);
    let peer = peer_id
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    // A connection that opens no control stream, or says no hello, in time
    // gives its slot back.
    let hello = tokio::time::timeout(wire::hello_deadline(), async {
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
    })??;
    let (mut ctl_send, mut ctl_recv, first) = hello;
    let folder = match first {
        Message::Hello(h) => {
            let refusal = match h.check() {
                Err(e) => Some((ErrorCode::UnsupportedVersion, e.to_string())),
                Ok(()) if h.role != Role::Source => {
                    Some((ErrorCode::Protocol, "peer is not a source".to_string()))
                }
                Ok(()) if h.epoch > crate::promotion::MAX_EPOCH => Some((
                    ErrorCode::Protocol,
                    format!(
                        "epoch {} is past the highest epoch {}",
                        h.epoch,
                        crate::promotion::MAX_EPOCH
                    ),
                )),
                Ok(()) => match pick(folders, &h.folder) {
                    None => Some((
                        ErrorCode::Other,
                        format!("this replica serves no folder named {:?}", h.folder),
                    )),
                    Some(f)
                        if !f.allowed.is_empty()
                            && !peer_id.is_some_and(|p| f.allowed.contains(&p)) =>
                    {
                        Some((
                            ErrorCode::Other,
                            format!("peer {peer} may not push into folder {:?}", f.name),
                        ))
                    }
                    Some(f) if crate::handover::promotion::pending(f).is_some() => Some((
                        ErrorCode::Other,
                        format!(
                            "folder {:?}: a promotion is in progress on this node; retry",
                            f.name
                        ),
                    )),
                    Some(f) => {
                        let fence = f.fence.lock().map(|g| *g).unwrap_or_default();
                        if h.epoch < fence.epoch || fence.source {
                            Some((
                                ErrorCode::Fenced,
                                format!(
                                    "folder {:?}: this node is {} at epoch {}; peer {peer} pushes at epoch {}: {}",
                                    f.name,
                                    if fence.source {
                                        "the source"
                                    } else {
                                        "a replica"
                                    },
                                    fence.epoch,
                                    h.epoch,
                                    if h.epoch < fence.epoch {
                                        "its epoch is older, it was demoted by a failover and must take the replica role"
                                    } else {
                                        "two sources at one epoch; refusing"
                                    }
                                ),
                            ))
                        } else {
                            None
                        }
                    }
                },
            };
            if let Some((code, message)) = refusal {
                if code == ErrorCode::Fenced
                    && let Some(f) = pick(folders, &h.folder)
                {
                    // Our hello first: it carries the epoch the fenced side adopts.
                    let fence = f.fence.lock().map(|g| *g).unwrap_or_default();
                    let role = if fence.source {
                        Role::Source
                    } else {
                        Role::Replica
                    };
                    let ours = Hello::new(role, &f.name).with_epoch(fence.epoch);
                    wire::send(&mut ctl_send, &Message::Hello(ours)).await?;
                }
                wire::send(
                    &mut ctl_send,
                    &Message::Error {
                        code,
                        message: message.clone(),
                    },
                )
                .await?;
                let _ = ctl_send.finish();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), ctl_send.stopped())
                    .await;
                bail!("peer {peer}: {message}");
            }
            let f = pick(folders, &h.folder)
                .cloned()
                .ok_or_else(|| anyhow!("folder vanished"))?;
            if let Ok(mut st) = f.stats.lock() {
                st.source_epoch = Some(h.epoch);
            }
            adopt(&f, h.epoch, &peer);
            (f, h.epoch)
        }
        other => bail!("peer {peer} opened with {other:?} instead of a hello"),
    };
    let (folder, their_epoch) = folder;
    let epoch = folder.fence.lock().map(|g| g.epoch).unwrap_or_default();
    wire::send(
        &mut ctl_send,
        &Message::Hello(Hello::new(Role::Replica, &folder.name).with_epoch(epoch)),
    )
    .await?;
    *served = Some(folder.clone());
    let _guard = take_folder(&folder, conn, peer_id, &peer).await;
    folder.activity.touch();
    // A local promotion (`sync-cli promote`) may have run while this session
    // waited for the folder: then this source is fenced.
    let now = folder.fence.lock().map(|g| *g).unwrap_or_default();
    if now.source || now.epoch > their_epoch {
        let e = anyhow!(
            "folder {:?}: this node was promoted to epoch {} while the session waited; \
             peer {peer} at epoch {their_epoch} is fenced",
            folder.name,
            now.epoch
        );
        return fail(conn, &mut ctl_send, &folder, e, ErrorCode::Fenced, &peer).await;
    }
    folder.replica.reset();
    tracing::info!(%peer, folder = %folder.name, "source connected");
    loop {
        let round = match read_round(&mut ctl_recv, &folder.activity).await {
            Ok(Some(Ok(r))) => r,
            Ok(Some(Err(epoch))) => {
                let error = match promote(&folder, epoch).await {
                    Ok(()) => String::new(),
                    Err(e) => format!("{e:#}"),
                };
                wire::send(
                    &mut ctl_send,
                    &Message::Promoted {
                        epoch,
                        error: error.clone(),
                    },
                )
                .await?;
                if error.is_empty() {
                    folder.promoted.notify_waiters();
                    folder.promoted.notify_one();
                    // A source no longer: this session is over once the old
                    // source has read the answer and closed.
                    let _ = ctl_send.finish();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                        while let Ok(Some(_)) = wire::recv(&mut ctl_recv).await {}
                    })
                    .await;
                    return Ok(());
                }
                continue;
            }
            Ok(None) => break,
            Err(e) => {
                return fail(conn, &mut ctl_send, &folder, e, ErrorCode::Protocol, &peer).await;
            }
        };
        let (id, full) = (round.id, round.full);
        match apply_round(conn, &folder, round).await {
            Ok(summary) => {
                if let Ok(mut t) = folder.last_applied.lock() {
                    *t = Some(std::time::SystemTime::now());
                }
                if let Ok(mut w) = folder.last_warning.lock() {
                    *w = (!summary.warnings.is_empty()).then(|| summary.warnings.join("; "));
                }
                if let Ok(mut st) = folder.stats.lock() {
                    st.rounds += 1;
                    st.full_rounds += u64::from(full);
                    st.held = summary.held.iter().map(ToString::to_string).collect();
                }
                wire::send(&mut ctl_send, &Message::RoundDone { id, summary }).await?;
                if full {
                    crate::trim_heap();
                }
            }
            Err(e) => return fail(conn, &mut ctl_send, &folder, e, ErrorCode::Apply, &peer).await,
        }
    }
    let _ = ctl_send.finish();
    Ok(())
}

/// Where to keep aside what this node alone holds, when it was fenced and
/// this is its first repair: `(state dir, capture dir, epoch)`.
fn divergence_target(
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
    if epoch <= g.epoch || g.source {
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

/// The next round, or a promotion request (its epoch), or the end.
async fn read_round(
    ctl: &mut quinn::RecvStream,
    activity: &Activity,
) -> Result<Option<std::result::Result<Incoming, u64>>> {
    let first = wire::recv(ctl).await?;
    activity.touch();
    let (id, full, checksum, verify) = match first {
        None => return Ok(None),
        Some(Message::RoundStart {
            id,
            full,
            checksum,
            verify,
        }) => (id, full, checksum, verify),
        Some(Message::Promote { epoch }) => return Ok(Some(Err(epoch))),
        Some(other) => bail!("expected a round, got {other:?}"),
    };
    let mut r = Incoming {
        id,
        full,
        checksum,
        verify,
        entries: Vec::new(),
        deleted: Vec::new(),
        renamed: Vec::new(),
        inline: HashMap::new(),
        root_hash: [0; 32],
    };
    let mut bytes = 0u64;
    // The whole round is bounded in time too, growing with what it carried
    // (database page tables aside: their pages come later, on their own stages).
    let (mut stage, mut tables, mut timed) = (wire::Stage::new(format!("round {id}"), 0), 0, 0);
    loop {
        stage.grow((bytes - tables).saturating_sub(timed));
        timed = bytes - tables;
        let count = (r.entries.len() + r.deleted.len() + r.renamed.len()) as u64;
        if count > MAX_ROUND_ENTRIES {
            bail!("round {id} larger than {MAX_ROUND_ENTRIES} entries");
        }
        if bytes > MAX_ROUND_BYTES {
            bail!(
                "round {id} larger than {MAX_ROUND_BYTES} bytes of entries, inline content and database page tables"
            );
        }
        let msg = stage.expect(ctl, "the rest of the round").await?;
        activity.touch();
        match msg {
            Message::Manifest(b) => {
                for e in &b {
                    let (entry, table) = entry_cost(e);
                    bytes += entry + table;
                    tables += table;
                }
                r.entries.extend(b);
            }
            Message::Deleted(b) => {
                bytes += b
                    .iter()
                    .map(|p| p.as_bytes().len() as u64 + 24)
                    .sum::<u64>();
                r.deleted.extend(b);
            }
            Message::Renamed(b) => {
                bytes += b
                    .iter()
                    .map(|(a, c)| (a.as_bytes().len() + c.as_bytes().len()) as u64 + 48)
                    .sum::<u64>();
                r.renamed.extend(b);
            }
            Message::Inline { index, data } => {
                bytes += data.len() as u64 + 64;
                r.inline.insert(index, data);
            }
            Message::RoundEnd {
                id: end,
                entries,
                root_hash,
            } => {
                if end != id || entries != r.entries.len() as u64 {
                    bail!(
                        "round {id} ended as round {end} with {entries} entries announced, {} carried",
                        r.entries.len()
                    );
                }
                r.root_hash = root_hash;
                return Ok(Some(Ok(r)));
            }
            other => bail!("expected the rest of round {id}, got {other:?}"),
        }
    }
}

/// What an entry costs the round's byte budget: its own bytes, and the page
/// table a database's staging holds (validated ≤ `MAX_DB_PAGES`).
fn entry_cost(e: &Entry) -> (u64, u64) {
    let target = match &e.kind {
        Kind::Symlink { target } => target.len(),
        Kind::HardLink { target } => target.as_bytes().len(),
        _ => 0,
    };
    let xattrs: usize = e
        .meta
        .xattrs
        .iter()
        .map(|x| x.name.len() + x.value.len() + 48)
        .sum();
    let table = match e.kind {
        Kind::Database { pages, .. } => u64::from(pages) * DB_PAGE_BYTES,
        _ => 0,
    };
    (
        (e.path.as_bytes().len() + target + xattrs + 128) as u64,
        table,
    )
}

async fn apply_round(
    conn: &quinn::Connection,
    folder: &Arc<ReplicaFolder>,
    round: Incoming,
) -> Result<ApplySummary> {
    let src = Manifest {
        entries: round.entries,
    };
    if round.full {
        src.check_structure().context("manifest from the source")?;
        if src.root_hash() != round.root_hash {
            bail!("manifest does not match its announced root hash");
        }
    } else {
        if let Some(w) = src.entries.windows(2).find(|w| w[0].path >= w[1].path) {
            bail!("round entries not sorted at {}", w[1].path);
        }
        let reserved = |p: &RelPath| {
            p.split_last()
                .is_some_and(|(_, n)| sync_core::is_temp_name(n))
        };
        let named = src
            .entries
            .iter()
            .map(|e| &e.path)
            .chain(round.deleted.iter())
            .chain(round.renamed.iter().flat_map(|(a, b)| [a, b]));
        if let Some(p) = named.clone().find(|p| reserved(p)) {
            bail!("entry {p}: name uses the reserved temp-file prefix");
        }
    }
    // The replica's own scans go by absolute path: an entry whose path with
    // the root would pass PATH_MAX could be made (relative `openat2`) but
    // never scanned again, wedging the folder. Refused before anything is made.
    let root_len = folder.replica.root_path().as_os_str().len() + 1;
    if let Some(p) = src
        .entries
        .iter()
        .map(|e| &e.path)
        .chain(round.deleted.iter())
        .chain(round.renamed.iter().flat_map(|(a, b)| [a, b]))
        .find(|p| root_len + p.as_bytes().len() >= libc::PATH_MAX as usize)
    {
        let mut shown = p.to_string();
        sync_core::apply::truncate(&mut shown, 200);
        bail!(
            "entry {shown}: path too long for this replica root ({} bytes with the root, at most {})",
            root_len + p.as_bytes().len(),
            libc::PATH_MAX - 1
        );
    }
    // Excluded entries are dropped; `kept` maps what is planned back to the
    // round's indexes, which the source serves.
    let filter = &folder.filter;
    let kept: Vec<usize> = (0..src.entries.len())
        .filter(|&i| !filter.excludes(&src.entries[i].path, src.entries[i].kind == Kind::Dir))
        .collect();
    let planned = Arc::new(Manifest {
        entries: kept.iter().map(|&i| src.entries[i].clone()).collect(),
    });
    let (r, s, f) = (folder.replica.clone(), planned.clone(), filter.clone());
    let detect = folder.detect.clone();
    let (full, deleted, renamed, mut inline) =
        (round.full, round.deleted, round.renamed, round.inline);
    // A partial round (a few paths) always compares content; a full round does
    // when asked (rsync -c), by size and mtime otherwise, as rsync does.
    let checksum = round.checksum || !full;
    let capture = divergence_target(folder, full)?;
    let name = folder.name.clone();
    let (dst, plan, mut summary, captured) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut sum = ApplySummary::default();
        let opts = ScanOptions {
            hash: checksum,
            hard_links: false,
            filter: f.clone(),
            databases: Some(detect),
        };
        // Excludes are matched with the replica's own kind of the entry.
        let excluded = |p: &RelPath| {
            let is_dir = std::fs::symlink_metadata(sync_core::scan::abs(r.root_path(), p))
                .map(|m| m.is_dir())
                .unwrap_or(false);
            f.excludes(p, is_dir)
        };
        for (from, to) in renamed.iter().filter(|(a, b)| !excluded(a) && !excluded(b)) {
            r.rename(from, to);
        }
        // Excluded and overlay entries are never deleted, not even with their
        // parent: a directory holding one is emptied of the rest and kept.
        let keep = |p: &RelPath, is_dir: bool| f.excludes(p, is_dir);
        for p in deleted.iter().filter(|p| !excluded(p)) {
            if !r.remove_all_but(p, &keep)? {
                tracing::info!("{p}: kept, it holds excluded or overlay entries");
            }
            sum.entries_deleted += 1;
        }
        let mut linked = std::collections::HashSet::new();
        let dst = if full {
            let (dst, report) = sync_core::scan::scan_with(r.root_path(), &opts, None)?;
            let swept = r.sweep_temps(&report.temp_files)?;
            if swept > 0 {
                tracing::info!(swept, "removed temp files left by an interrupted run");
            }
            linked = report.multi_linked;
            dst
        } else {
            let mut entries = Vec::with_capacity(s.entries.len());
            for e in &s.entries {
                // Only through real directories: a symlinked parent (planted by
                // an earlier round) is never looked through, so nothing outside
                // the root is stat'ed or hashed; the entry counts as absent.
                if let Some((parent, _)) = e.path.split_last()
                    && r.dir(&parent).is_err()
                {
                    continue;
                }
                let (d, report) = sync_core::scan::entry_at(r.root_path(), &e.path, &opts, None)?;
                linked.extend(report.multi_linked);
                entries.extend(d);
            }
            Manifest { entries }
        };
        let mut plan = sync_core::plan::plan_with_links(&s, &dst, checksum, &linked);
        // The first repair after this node was fenced: what it alone holds is
        // copied aside before anything is replaced or deleted.
        let captured = match &capture {
            Some((state, into, epoch)) => {
                let header = format!(
                    "# understudy: what this node held when it came back fenced, before the\n\
                     # repair by the folder's new source (epoch {epoch}). folder {name}, root {}\n",
                    r.root_path().display()
                );
                let c = sync_core::diverged::capture(&r, &s, &dst, &plan, into, &header)
                    .with_context(|| {
                        format!("folder {name}: keeping aside what only this node held")
                    })?;
                crate::diverged::clear(state, &name)?;
                Some((into.clone(), c.kept.len()))
            }
            None => None,
        };
        delete_keeping(&r, &s, &mut plan, &keep, &mut sum)?;
        for &i in &plan.mkdir {
            r.mkdir(&s.entries[i].path)?;
            sum.others_created += 1;
        }
        for &i in &plan.create {
            r.create(&s.entries[i])?;
            sum.others_created += 1;
        }
        Ok((dst, plan, sum, captured))
    })
    .await??;
    if let Some((into, n)) = captured {
        if n == 0 {
            tracing::info!(folder = %folder.name, "fenced and repaired: this node held nothing the new source lacks");
        } else {
            tracing::warn!(folder = %folder.name, kept = n, dir = %into.display(), "fenced: what only this node held is kept aside (see its MANIFEST)");
            if let Ok(mut d) = folder.diverged.lock() {
                *d = Some(into);
            }
        }
    }

    // Content that came with the round is written first; the rest is pulled.
    let (mut pulled, mut inlined) = (Vec::new(), Vec::new());
    for f in plan.fetch.iter().copied() {
        match inline.remove(&(kept[f.index] as u64)) {
            Some(data) => inlined.push((f.index, data)),
            None => pulled.push(f),
        }
    }
    if !inlined.is_empty() {
        let (r, s) = (folder.replica.clone(), planned.clone());
        let (files, bytes) = tokio::task::spawn_blocking(move || -> Result<(u64, u64)> {
            let (mut files, mut bytes) = (0, 0);
            for (i, data) in inlined {
                let e = &s.entries[i];
                let Kind::File { hash, .. } = e.kind else {
                    continue;
                };
                let mut staged = r.stage(&e.path)?;
                staged.write(&data)?;
                staged.commit(&hash, &e.meta)?;
                files += 1;
                bytes += data.len() as u64;
            }
            Ok((files, bytes))
        })
        .await??;
        summary.files_transferred += files;
        summary.files_inline += files;
        summary.bytes_literal += bytes;
    }
    // Content, in parallel; stop starting transfers once one has failed.
    let sem = Arc::new(Semaphore::new(PARALLEL_FILES));
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed: Option<anyhow::Error> = None;
    type Done = std::result::Result<Result<Option<(u64, u64)>>, tokio::task::JoinError>;
    fn add(done: Done, summary: &mut ApplySummary, failed: &mut Option<anyhow::Error>) {
        match done.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(Some((lit, matched))) => {
                summary.files_transferred += 1;
                summary.bytes_literal += lit;
                summary.bytes_matched += matched;
            }
            Ok(None) => {}
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    for f in pulled {
        let permit = sem.clone().acquire_owned().await?;
        let (conn, r, entry) = (
            conn.clone(),
            folder.replica.clone(),
            planned.entries[f.index].clone(),
        );
        let (index, activity) = (kept[f.index] as u64, folder.activity.clone());
        tasks.spawn(async move {
            let res = fetch_file(conn, r, entry, index, f.basis, activity).await;
            drop(permit);
            res
        });
        while let Some(done) = tasks.try_join_next() {
            add(done, &mut summary, &mut failed);
        }
        if failed.is_some() {
            break;
        }
    }
    // Every transfer ends (and its writer with it) before the round does.
    while let Some(done) = tasks.join_next().await {
        add(done, &mut summary, &mut failed);
    }
    if let Some(e) = failed {
        return Err(e);
    }
    // Databases, one at a time, staged for the commit below.
    for &i in &plan.dbs {
        let entry = planned.entries[i].clone();
        let current = dst.get(&entry.path).map(|(_, d)| d.meta.clone());
        let (r, activity) = (folder.replica.clone(), &folder.activity);
        if let Some(pages) = fetch_db(conn, r, entry, kept[i] as u64, current, activity).await? {
            summary.databases_applied += 1;
            summary.db_pages += pages;
        }
    }

    // Renames into place, links, metadata, directories, durability.
    let (r, s) = (folder.replica.clone(), planned.clone());
    let mut summary = tokio::task::spawn_blocking(move || -> Result<ApplySummary> {
        r.flush()?;
        for &i in &plan.hardlink {
            let e = &s.entries[i];
            if let Kind::HardLink { target } = &e.kind {
                r.hardlink(&e.path, target)?;
                summary.others_created += 1;
            }
        }
        for &i in &plan.meta {
            r.set_meta(&s.entries[i])?;
            summary.meta_updated += 1;
        }
        for &i in &plan.dirs {
            let e = &s.entries[i];
            r.finish_dir(e, dst.get(&e.path).map(|(_, d)| &d.meta))?;
        }
        r.finish()?;
        summary.warnings = r.take_warnings();
        summary.held = r.take_held();
        Ok(summary)
    })
    .await??;
    if round.verify {
        let (r, d, f) = (
            folder.replica.clone(),
            folder.detect.clone(),
            folder.filter.clone(),
        );
        let p = planned.clone();
        let (root, differences, held_by) = tokio::task::spawn_blocking(move || -> Result<_> {
            let (own, dbs) = own_manifest(&r, d, f)?;
            let own = without_kept_dirs(own, &p);
            // A cut says which databases another process holds open (the
            // standby's application running), changed or not: a handover's
            // preflight refuses on it.
            let held_by: Vec<(RelPath, String)> = dbs
                .into_iter()
                .filter_map(|p| r.db_holders(&p).map(|who| (p, who)))
                .collect();
            // Say what differs, so that a failed cut explains itself.
            let differences: Vec<String> = sync_core::manifest::diff(&p, &own)
                .iter()
                .take(5)
                .map(|d| format!("after the cut: {d}"))
                .collect();
            Ok((own.root_hash(), differences, held_by))
        })
        .await??;
        summary.root_hash = Some(root);
        for (p, who) in held_by {
            summary
                .warnings
                .push(format!("{}{p}: {who}", super::HELD_PREFIX));
            if !summary.held.contains(&p) {
                summary.held.push(p);
            }
        }
        if round.full {
            summary.warnings.extend(differences);
        }
    }
    Ok(summary)
}

/// Removes what the plan deletes, keeping excluded and overlay entries
/// (`keep`); a type change that would destroy them is refused for that path
/// with a warning and dropped from the plan, so the rest of the round applies.
fn delete_keeping(
    r: &Replica,
    s: &Manifest,
    plan: &mut sync_core::plan::Plan,
    keep: &dyn Fn(&RelPath, bool) -> bool,
    sum: &mut ApplySummary,
) -> Result<()> {
    let mut refused = std::collections::HashSet::new();
    for p in &plan.delete {
        let gone = r.remove_all_but(p, keep)?;
        sum.entries_deleted += 1;
        let Some((_, e)) = s.get(p).filter(|(_, e)| !gone && e.kind != Kind::Dir) else {
            continue;
        };
        r.warn(format!(
            "{}: not replaced by a {}: the directory holds excluded or overlay entries",
            r.root_path()
                .join(std::ffi::OsStr::from_bytes(p.as_bytes()))
                .display(),
            e.kind.name()
        ));
        refused.insert(p.clone());
    }
    if !refused.is_empty() {
        let ok = |i: &usize| !refused.contains(&s.entries[*i].path);
        plan.fetch.retain(|f| ok(&f.index));
        plan.dbs.retain(ok);
        plan.create.retain(ok);
        plan.hardlink.retain(ok);
        plan.meta.retain(ok);
    }
    Ok(())
}

/// `own` without the directories the source no longer has that were kept
/// only for the excluded or overlay entries they hold (which no manifest
/// lists): the cut's root hash is the source's.
fn without_kept_dirs(own: Manifest, planned: &Manifest) -> Manifest {
    let mut kept: Vec<Entry> = Vec::with_capacity(own.entries.len());
    for e in own.entries.into_iter().rev() {
        let holds_something = kept
            .last()
            .is_some_and(|next| next.path != e.path && next.path.starts_with(&e.path));
        if e.kind == Kind::Dir && !holds_something && planned.get(&e.path).is_none() {
            continue;
        }
        kept.push(e);
    }
    kept.reverse();
    Manifest { entries: kept }
}

/// The replica's own manifest from a fresh scan of its tree (databases by
/// their page hashes), whose root hash is compared with the source's after a cut.
fn own_manifest(
    r: &Replica,
    detect: Arc<DbDetect>,
    filter: Filter,
) -> Result<(Manifest, Vec<RelPath>)> {
    let opts = ScanOptions {
        databases: Some(detect),
        filter,
        ..Default::default()
    };
    let (mut m, report) = sync_core::scan::scan_with(r.root_path(), &opts, None)?;
    for p in &report.databases {
        let held = r.db_held(p)?;
        if let (Some(i), Some(h)) = (m.entries.iter().position(|e| &e.path == p), held) {
            m.entries[i].kind = Kind::Database {
                page_size: h.page_size,
                pages: h.hashes.len() as u32,
                hash: h.hash,
            };
        }
    }
    Ok((m, report.databases))
}
