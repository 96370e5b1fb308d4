//! The source's continuous loop: watch, debounce, ship rounds; reconnect with
//! backoff and resume with a full round (only differences move).
//!
//! One loop per folder, as in Syncthing's `folder.go`: arms for debounced watch
//! batches, a periodic full rescan, watcher overflow or error (→ full rescan), and
//! shutdown. notify's callback only `try_send`s; when the channel is full, or the
//! kernel queue overflowed (an event with the rescan flag), the folder is marked
//! for a full rescan: events are never dropped silently.

use crate::identity::{Identity, NodeId};
use crate::lag::LagTracker;
use crate::session::Progress;
use crate::session::source::{Fenced, Round, SourceSession};
use crate::tree_watch::TreeWatcher;
use anyhow::{Context, Result};
use notify::{EventKind, RecursiveMode, Watcher};
use proto::{Entry, Kind, RelPath};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use sync_core::filter::Filter;
use sync_core::index::HashIndex;
use sync_core::scan::ScanOptions;
use sync_core::sqlite::{CutStats, LiveSet, RESTAMP_AFTER};
use tokio::sync::{Notify, mpsc, watch};

mod backoff;
mod bulk;
mod drive;
mod inotify;
mod partial;
#[cfg(test)]
mod partial_tests;
mod progress;
use backoff::{Backoff, connect_session, pause};
use drive::drive;
use inotify::{rel, start_watch};
use partial::{note_known, partial_round};
use progress::{
    PartialSummary, content_bytes, log_full_end, log_full_start, publish_held, start_full_progress,
};

/// A source folder's settings.
#[derive(Debug, Clone)]
pub struct SourceFolder {
    /// Folder name (as the replica knows it).
    pub name: String,
    /// Root directory.
    pub root: PathBuf,
    /// Excludes.
    pub filter: Filter,
    /// Our identity.
    pub identity: Identity,
    /// The replica's id.
    pub peer: NodeId,
    /// The replica's address (a host name is resolved at each connect).
    pub addr: crate::addr::PeerAddr,
    /// Where the hash index lives (`None`: in memory).
    pub index_path: Option<PathBuf>,
    /// Quiet time that ends a batch of watch events.
    pub debounce: Duration,
    /// Period of the safety full rescan.
    pub rescan_every: Duration,
    /// Database globs (headers are recognised anyway).
    pub sqlite: Filter,
    /// This node's fencing epoch for the folder (sent in the hello).
    pub epoch: u64,
    /// Where this node's fencing state is persisted.
    pub state_dir: Option<PathBuf>,
    /// Cap on the bytes/s of content sent to the peer (`bwlimit`).
    pub bwlimit: Option<crate::bwlimit::ByteRate>,
}

/// What the operator asks of a running source folder (through the control
/// socket).
#[derive(Debug)]
pub enum Command {
    /// A consistent cut shipped as a full round, verified by both root hashes.
    Cut(tokio::sync::oneshot::Sender<Result<CutReport, String>>),
    /// Hand the folder over: the replica becomes the source at `epoch`; on
    /// success this node takes the replica role.
    Promote {
        /// The new epoch.
        epoch: u64,
        /// The answer, typed: the handover decides on it.
        reply: tokio::sync::oneshot::Sender<Result<(), crate::handover::PromoteFailure>>,
    },
}

/// What `sync-cli cut` prints.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CutReport {
    /// The folder.
    pub folder: String,
    /// The cut's id (the round that carried it).
    pub cut_id: u64,
    /// How long database writers were locked out, in ms.
    pub writer_stall_ms: f64,
    /// Databases in the cut.
    pub databases: u64,
    /// Database pages changed since the previous cut.
    pub pages_changed: u64,
    /// UDP bytes sent to the replica by the cut's round.
    pub bytes_shipped: u64,
    /// The source's root hash at the cut.
    pub source_root: String,
    /// The replica's root hash after applying it (from a fresh scan).
    pub replica_root: String,
    /// Whether they match.
    pub matched: bool,
    /// The fencing epoch the cut was shipped at.
    pub epoch: u64,
    /// Wall time of the whole cut, in ms.
    pub elapsed_ms: f64,
    /// What the replica reported (what it could not preserve; on a mismatch,
    /// the first differences).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Replica databases another process holds open, each with its holders
    /// (`library.db: pid 42 (jellyfin)`).
    #[serde(default)]
    pub held: Vec<String>,
    /// What the replica's `parity` command printed, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_parity: Option<String>,
}

/// How a source loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Asked to stop.
    Stopped,
    /// The folder was handed over, or the peer fenced us: this node is now a
    /// replica at `epoch`.
    Demoted {
        /// The epoch adopted.
        epoch: u64,
    },
}

/// What `sync-cli status` shows for a folder.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FolderStatus {
    /// Folder name.
    pub folder: String,
    /// `source` or `replica`.
    pub role: String,
    /// The peer's node id.
    pub peer: String,
    /// Whether a session is up.
    pub connected: bool,
    /// Seconds the oldest change the replica has not applied has waited
    /// (database commits included; 0 when caught up): it grows while the
    /// replica is away, frozen or refusing a held database, and during a full
    /// round (see [`crate::lag`]). Computed when the status is read.
    pub lag_s: f64,
    /// When the oldest change the replica has not applied was seen (seconds
    /// since the epoch).
    pub pending_since_unix: Option<f64>,
    /// Bytes of file content in the unshipped changes (known once scanned).
    pub lag_bytes: u64,
    /// Paths changed and not yet applied on the replica.
    pub files_pending: u64,
    /// Rounds applied.
    pub rounds: u64,
    /// Full rounds (start, reconnect, rescan) among them.
    pub full_rounds: u64,
    /// Sessions that ended on an error with their round unapplied.
    #[serde(default)]
    pub rounds_failed: u64,
    /// When the last round was applied (seconds since the epoch).
    pub last_applied_unix: Option<f64>,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// Root hash after the last full round.
    pub root_hash: String,
    /// Watcher notes (overflows, limits).
    pub watcher: Option<String>,
    /// Entries in the last full round.
    pub entries_last_full: u64,
    /// Files whose content went inline with partial rounds (no request each).
    pub files_inline_total: u64,
    /// Files whose content the replica requested in partial rounds.
    pub files_requested_total: u64,
    /// Bytes read to hash files in the last full round (index misses).
    pub bytes_hashed_last_full: u64,
    /// UDP bytes sent to the replica by the last full round.
    pub wire_bytes_last_full: u64,
    /// Live SQLite databases shipped from cuts.
    pub databases: u64,
    /// Longest writer stall of the cuts so far, in ms.
    pub max_writer_stall_ms: f64,
    /// The writer stalls of the cuts so far.
    #[serde(default)]
    pub writer_stall: crate::metrics::StallHistogram,
    /// This node's fencing epoch for the folder.
    pub epoch: u64,
    /// UDP bytes sent to the replica since the agent started (QUIC included).
    pub wire_bytes_total: u64,
    /// Database pages the replica wrote since the agent started.
    pub db_pages_total: u64,
    /// Databases the replica refuses to update because another process holds
    /// them open there (their changes count in the lag).
    #[serde(default)]
    pub held_databases: Vec<String>,
    /// The full round in progress, if any (a first mirror, a reconnect, a
    /// rescan, a cut).
    #[serde(default)]
    pub full_round: Option<FullRoundProgress>,
    /// Replica rows: the epoch of the source whose rounds are applied.
    #[serde(default)]
    pub source_epoch: Option<u64>,
    /// Replica rows: seconds since the last round was applied.
    #[serde(default)]
    pub last_applied_age_s: Option<f64>,
    /// The live counters of the session's transfers; read when the status is
    /// (they fill `full_round`).
    #[serde(skip)]
    pub progress: Option<Arc<Progress>>,
    /// Where what only this node held was kept aside when it came back
    /// fenced (`{state}/diverged/...`), if it ever did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged: Option<String>,
    /// Source rows: whether the connected replica said it could serve as the
    /// source if promoted (its hello); `None` before the first session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_promotable: Option<bool>,
    /// Source rows: the replica's software and version (its hello).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_software: Option<String>,
    /// Source rows: the replica's clock minus this host's, in ms, when the
    /// session began (within half a round trip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_clock_skew_ms: Option<i64>,
    /// Replica rows: excluded paths present on the replica, as its last full
    /// round found them (`delete_excluded` off); `None` before a full round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded_leftovers: Option<ExcludedLeftovers>,
}

/// Excluded paths present on a replica (mirrored before an exclude was added).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExcludedLeftovers {
    /// How many (the topmost of each excluded subtree).
    pub count: u64,
    /// The first few, relative to the folder root.
    pub first: Vec<String>,
    /// Removed by the last full round (`delete_excluded`).
    pub swept: u64,
}

/// How far the full round in progress is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FullRoundProgress {
    /// When it started (seconds since the epoch).
    pub started_unix: f64,
    /// Entries in its manifest (0 while the source is still scanning).
    pub entries_total: u64,
    /// Manifest entries sent to the replica so far.
    pub entries_sent: u64,
    /// Bytes of file content in the tree (what a first mirror moves at most).
    pub bytes_total: u64,
    /// Content bytes sent so far (files the replica lacks or has older).
    pub bytes_sent: u64,
    /// Files whose content was sent so far.
    pub files_sent: u64,
}

/// Shared status of one folder.
pub type SharedStatus = Arc<Mutex<FolderStatus>>;

fn set(status: &SharedStatus, f: impl FnOnce(&mut FolderStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

enum WatchMsg {
    /// Paths that changed; `created` when they (may) have appeared anew.
    Paths(Vec<PathBuf>, bool),
    Rename(PathBuf, PathBuf),
}

struct Watch {
    watcher: TreeWatcher,
    /// A directory may be unwatched: poll (see [`crate::watch_limit`]).
    degraded: crate::watch_limit::Degraded,
    /// When a degraded folder polls next (a deadline: events do not delay it).
    next_poll: tokio::time::Instant,
    rx: mpsc::Receiver<WatchMsg>,
    wake: Arc<Notify>,
    rescan: Arc<AtomicBool>,
    /// When the first event since the last [`Watch::take_first`] arrived: ns
    /// after `base`, plus one (0: none). Set by the callback after it queued
    /// the event, so an event drained from `rx` was noted before, or is noted
    /// after (lag then errs on the long side).
    first: Arc<AtomicU64>,
    base: Instant,
}

/// Publishes the oldest unapplied change (status computes its age when read).
fn publish_lag(status: &SharedStatus, lag: &LagTracker<RelPath>) {
    let now = Instant::now();
    let since = lag
        .oldest()
        .and_then(|t| unix_now().map(|u| u - now.saturating_duration_since(t).as_secs_f64()));
    set(status, |s| {
        s.pending_since_unix = since;
        s.lag_s = lag.lag(now).as_secs_f64();
        if since.is_none() {
            s.lag_bytes = 0;
            s.files_pending = 0;
        }
    });
}

/// What the replica holds, as far as the source knows (manifest order).
type Known = BTreeMap<RelPath, Entry>;

/// A partial round (`None` when only a full round will do) and the paths held
/// back for a later one.
type Partial = (Option<Round>, Vec<RelPath>);

/// One debounced batch of watch events.
#[derive(Debug, Default)]
struct Batch {
    /// Paths that changed.
    dirty: BTreeSet<RelPath>,
    /// Paths that (may) have appeared anew.
    created: BTreeSet<RelPath>,
    /// Renames, in the order seen.
    renames: Vec<(RelPath, RelPath)>,
}

/// What the replica's hello said of itself, for status and `doctor`.
fn note_peer(status: &SharedStatus, session: &SourceSession) {
    let promotable = session.peer_promotable();
    let (software, skew) = session.peer_build();
    set(status, |s| {
        s.peer_promotable = Some(promotable);
        s.peer_software = Some(software);
        s.peer_clock_skew_ms = skew;
    });
}

/// Runs a source folder until `shutdown` turns true, or until it is demoted
/// (handed over, or fenced by a peer with a newer epoch).
pub async fn run_source(
    mut cfg: SourceFolder,
    status: SharedStatus,
    mut shutdown: watch::Receiver<bool>,
    commands: &mut mpsc::Receiver<Command>,
) -> Result<Outcome> {
    // Watch events carry absolute paths.
    cfg.root = std::fs::canonicalize(&cfg.root)
        .with_context(|| format!("folder {} root {}", cfg.name, cfg.root.display()))?;
    set(&status, |s| {
        s.folder = cfg.name.clone();
        s.role = "source".into();
        s.peer = cfg.peer.to_string();
    });
    let (mut w, opts) = watch_and_scan(&cfg, &status)?;
    let index = Arc::new(Mutex::new(open_index(&cfg)?));
    // Held across sessions: a replica that reconnects a few cuts behind gets
    // only the pages changed since what it holds.
    let live = Arc::new(Mutex::new(LiveSet::new(&cfg.root, crate::DB_BUSY)));
    set(&status, |s| s.epoch = cfg.epoch);
    // What the replica holds is unknown until the first full round is applied.
    let mut lag = LagTracker::unknown_since(Instant::now());
    publish_lag(&status, &lag);
    let progress = Arc::new(Progress::default());
    set(&status, |s| s.progress = Some(progress.clone()));
    let mut backoff = Backoff::new();
    while !*shutdown.borrow() {
        set(&status, |s| s.connected = false);
        let session = connect_session(&cfg, &progress, &mut w, &mut lag, &status).await;
        let (endpoint, mut session) = match session {
            Ok(s) => s,
            Err(e) if e.downcast_ref::<Fenced>().is_some() => {
                return demote_fenced(&cfg, &status, &e);
            }
            Err(e) => {
                let delay = backoff.delay;
                tracing::warn!(folder = %cfg.name, "replica {} unreachable: {e:#}; retrying in {delay:?}", cfg.addr);
                set(&status, |s| s.last_error = Some(format!("{e:#}")));
                let why = format!(
                    "folder {}: replica {} is unreachable: {e:#}",
                    cfg.name, cfg.addr
                );
                let cmds = Some(&mut *commands);
                pause(delay, &mut shutdown, &mut w, &mut lag, &status, cmds, &why).await;
                backoff.grow();
                continue;
            }
        };
        note_peer(&status, &session);
        set(&status, |s| {
            s.connected = true;
            s.last_error = None;
        });
        tracing::info!(folder = %cfg.name, peer = %cfg.peer, "connected to replica {}", cfg.addr);
        let began = Instant::now();
        let res = drive(
            &cfg,
            &mut session,
            &mut w,
            &index,
            &opts,
            &status,
            &mut shutdown,
            &live,
            commands,
            &mut lag,
        )
        .await;
        // Whatever the session left unapplied is still pending.
        lag.round_failed();
        publish_lag(&status, &lag);
        set(&status, |s| s.full_round = None);
        if let Ok(Some(epoch)) = res {
            session.close().await;
            endpoint.close(0u32.into(), b"");
            return Ok(Outcome::Demoted { epoch });
        }
        if let Err(e) = &res {
            tracing::warn!(folder = %cfg.name, "session ended: {e:#}");
            set(&status, |s| {
                s.last_error = Some(format!("{e:#}"));
                s.rounds_failed += 1;
            });
            // A session that fails at once again and again must not spin.
            if Backoff::waits_after(began.elapsed()) {
                let delay = backoff.delay;
                pause(delay, &mut shutdown, &mut w, &mut lag, &status, None, "").await;
                backoff.grow();
            }
        }
        session.close().await;
        endpoint.close(0u32.into(), b"");
        backoff.session_ended(res.is_ok(), began.elapsed());
    }
    Ok(Outcome::Stopped)
}

/// The folder's watcher (its root only) and how it is scanned: each scan
/// watches the directories it lists before it lists them; the watcher's own
/// walks leave out what the scans do.
fn watch_and_scan(cfg: &SourceFolder, status: &SharedStatus) -> Result<(Watch, ScanOptions)> {
    let mut opts = scan_options(cfg);
    let w = start_watch(&cfg.root, status, opts.databases.clone())?;
    opts.on_dir = Some(w.watcher.dir_hook());
    w.watcher.exclude(cfg.filter.clone());
    Ok((w, opts))
}

/// How the folder is scanned: its excludes, its databases by glob.
fn scan_options(cfg: &SourceFolder) -> ScanOptions {
    ScanOptions {
        filter: cfg.filter.clone(),
        databases: Some(Arc::new(sync_core::scan::DbDetect {
            globs: cfg.sqlite.clone(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The folder's hash index (its state directory made), or one in memory.
fn open_index(cfg: &SourceFolder) -> Result<HashIndex> {
    Ok(match &cfg.index_path {
        Some(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating state directory {}", dir.display()))?;
            }
            HashIndex::open(p).with_context(|| format!("hash index {}", p.display()))?
        }
        None => HashIndex::in_memory(),
    })
}

/// The peer fenced us (its epoch is newer): this node takes the replica role.
fn demote_fenced(cfg: &SourceFolder, status: &SharedStatus, e: &anyhow::Error) -> Result<Outcome> {
    let epoch = e.downcast_ref::<Fenced>().map_or(cfg.epoch, |f| f.epoch);
    tracing::error!(folder = %cfg.name, "{e:#}; taking the replica role at epoch {epoch}");
    // Before the role changes: what only this node holds is kept
    // aside before the new source's first repair round.
    if let Some(dir) = &cfg.state_dir {
        crate::diverged::mark(dir, &cfg.name, epoch)?;
    }
    set(status, |s| s.last_error = Some(format!("{e:#}")));
    Ok(Outcome::Demoted { epoch })
}

/// A watch event while no session is up: the change is pending from its
/// instant (the next session's full round ships it; the queue is emptied so
/// it cannot overflow meanwhile).
fn note_away(w: &mut Watch, lag: &mut LagTracker<RelPath>, status: &SharedStatus) {
    w.note(lag);
    while w.rx.try_recv().is_ok() {}
    publish_lag(status, lag);
}

/// A degraded folder's poll: retries the watch, notes the outcome (the caller
/// rescans either way).
fn poll_unwatched(w: &mut Watch, root: &Path, status: &SharedStatus) {
    w.next_poll = tokio::time::Instant::now() + crate::watch_limit::POLL;
    let note = match crate::watch_limit::retry(&mut w.watcher, root, &w.degraded) {
        Ok(n) => {
            tracing::info!(root = %root.display(), "watcher: {n}");
            n
        }
        Err(n) => {
            tracing::debug!(root = %root.display(), "watcher: {n}");
            n
        }
    };
    set(status, |s| s.watcher = Some(note));
}

/// The replica was promoted: this node's demotion is persisted.
fn persist_demotion(cfg: &SourceFolder, epoch: u64) {
    if let Some(dir) = &cfg.state_dir {
        let st = crate::epoch::FolderState {
            role: crate::config::Role::Replica,
            epoch,
        };
        if let Err(e) = crate::epoch::store(dir, &cfg.name, &cfg.identity.id().to_string(), st) {
            // The peer is the source all the same; the
            // handover retries persisting the demotion.
            tracing::error!(folder = %cfg.name, "the replica was promoted, but persisting this node's demotion failed: {e:#}");
        }
    }
}

fn refuse(c: Command, why: &str) {
    match c {
        Command::Cut(reply) => {
            let _ = reply.send(Err(why.to_string()));
        }
        Command::Promote { reply, .. } => {
            let _ = reply.send(Err(crate::handover::PromoteFailure::NotSent(
                why.to_string(),
            )));
        }
    }
}

fn unix_now() -> Option<f64> {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_watcher_keeps_the_instant_of_the_first_event_until_taken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = std::fs::canonicalize(dir.path()).expect("canonical root");
        let status = SharedStatus::default();
        let mut w = start_watch(&root, &status, None).expect("watch");
        let before = Instant::now();
        std::fs::write(root.join("app.db-wal"), b"commit").expect("write");
        tokio::time::timeout(Duration::from_secs(5), w.wake.notified())
            .await
            .expect("an event");
        std::fs::write(root.join("later"), b"x").expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut lag = LagTracker::default();
        w.note(&mut lag);
        let first = lag.oldest().expect("noted");
        assert!(first >= before && first <= Instant::now());
        // taken: the next look finds nothing new
        assert_eq!(w.take_first(), None);
        while w.rx.try_recv().is_ok() {}
        // a commit while the replica is away counts from its instant
        lag.round_started(Instant::now(), false);
        lag.round_failed();
        assert_eq!(lag.oldest(), Some(first));
    }
}
