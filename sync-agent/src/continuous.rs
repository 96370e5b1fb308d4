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
use sync_core::sqlite::{CutStats, LiveSet};
use tokio::sync::{Notify, mpsc, watch};

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
    watcher: notify::RecommendedWatcher,
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

impl Watch {
    /// The instant of the first event since the last call, if any.
    fn take_first(&self) -> Option<Instant> {
        match self.first.swap(0, Ordering::SeqCst) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }

    /// Notes the first pending event's instant in `lag` (call before draining
    /// `rx`).
    fn note(&self, lag: &mut LagTracker<RelPath>) {
        if let Some(t) = self.take_first() {
            lag.seen(t);
        }
    }
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

/// Whether an event on `path` is one a held database's connections raise by
/// being opened and closed (ours at every cut included), rather than a sign
/// of a commit: a commit writes the log (WAL) or the database file (rollback
/// journal), and a replacement creates, removes or renames the database
/// file; closes, `-shm` traffic and side files coming and going say nothing.
fn connection_noise(root: &Path, dbs: &sync_core::scan::DbDetect, ev: &notify::Event) -> bool {
    use notify::event::ModifyKind;
    let held = |p: &RelPath| dbs.known.read().is_ok_and(|k| k.contains(p));
    !ev.need_rescan()
        && !ev.paths.is_empty()
        && ev.paths.iter().all(|path| {
            let Some(rel) = rel(root, path) else {
                return false;
            };
            let Some((dir, name)) = rel.split_last() else {
                return false;
            };
            match sync_core::sqlite::sidecar_base(name).and_then(|b| dir.join(b).ok()) {
                Some(base) if held(&base) => {
                    !(name.ends_with(b"-wal")
                        && matches!(
                            ev.kind,
                            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any)
                        ))
                }
                Some(_) => false,
                None => held(&rel) && matches!(ev.kind, EventKind::Access(_)),
            }
        })
}

fn start_watch(
    root: &Path,
    status: &SharedStatus,
    dbs: Option<Arc<sync_core::scan::DbDetect>>,
) -> Result<Watch> {
    let (tx, rx) = mpsc::channel::<WatchMsg>(16384);
    let wake = Arc::new(Notify::new());
    let rescan = Arc::new(AtomicBool::new(false));
    let (first, base) = (Arc::new(AtomicU64::new(0)), Instant::now());
    let degraded = crate::watch_limit::Degraded::default();
    let (w, r, st, f) = (wake.clone(), rescan.clone(), status.clone(), first.clone());
    let dg = degraded.clone();
    let root_dir = root.to_path_buf();
    let handler = move |res: notify::Result<notify::Event>| {
        match res {
            Ok(ev) => {
                tracing::trace!(?ev, "watch event");
                if dbs
                    .as_deref()
                    .is_some_and(|d| connection_noise(&root_dir, d, &ev))
                {
                    return;
                }
                if ev.need_rescan() {
                    tracing::warn!("inotify queue overflowed: full rescan");
                    set(&st, |s| {
                        s.watcher = Some("kernel event queue overflowed; rescanned".into())
                    });
                    r.store(true, Ordering::SeqCst);
                } else {
                    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
                    let msg = match ev.kind {
                        // our own reads raise open/close events: only a closed writer matters
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                            Some(WatchMsg::Paths(ev.paths, false))
                        }
                        EventKind::Create(_)
                        | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                            Some(WatchMsg::Paths(ev.paths, true))
                        }
                        EventKind::Access(_) => None,
                        EventKind::Modify(ModifyKind::Name(RenameMode::Both))
                            if ev.paths.len() == 2 =>
                        {
                            Some(WatchMsg::Rename(ev.paths[0].clone(), ev.paths[1].clone()))
                        }
                        _ => Some(WatchMsg::Paths(ev.paths, false)),
                    };
                    let Some(m) = msg else { return };
                    if tx.try_send(m).is_err() {
                        r.store(true, Ordering::SeqCst);
                    }
                }
            }
            Err(e) => {
                // Something under the root may be unwatched from now on.
                let note = crate::watch_limit::error_note(&e);
                tracing::error!("watcher: {note}");
                set(&st, |s| s.watcher = Some(note));
                dg.set();
                r.store(true, Ordering::SeqCst);
            }
        }
        let ns = u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        let _ = f.compare_exchange(0, ns + 1, Ordering::SeqCst, Ordering::SeqCst);
        w.notify_one();
    };
    // Symlinks are mirrored as links, never followed: not into the tree twice,
    // not out of it.
    let mut watcher = notify::RecommendedWatcher::new(
        handler,
        notify::Config::default().with_follow_symlinks(false),
    )
    .context("starting the inotify watcher")?;
    watcher.watch(root, RecursiveMode::Recursive).map_err(|e| {
        let hint = if matches!(&e.kind, notify::ErrorKind::MaxFilesWatch) {
            ": inotify watch limit reached: raise fs.inotify.max_user_watches"
        } else {
            ""
        };
        anyhow::anyhow!("watching {}: {e}{hint}", root.display())
    })?;
    Ok(Watch {
        watcher,
        degraded,
        next_poll: tokio::time::Instant::now(),
        rx,
        wake,
        rescan,
        first,
        base,
    })
}

fn rel(root: &Path, p: &Path) -> Option<RelPath> {
    let r = p.strip_prefix(root).ok()?;
    RelPath::new(r.as_os_str().as_bytes()).ok()
}

/// What the replica holds, as far as the source knows (manifest order).
type Known = BTreeMap<RelPath, Entry>;

fn remove_subtree(known: &mut Known, p: &RelPath) {
    let gone: Vec<RelPath> = known
        .range(p.clone()..)
        .take_while(|(k, _)| k.starts_with(p))
        .map(|(k, _)| k.clone())
        .collect();
    for k in gone {
        known.remove(&k);
    }
}

/// Files at least this large are held back while they are being written...
const HOT_SIZE: u64 = 8 << 20;
/// ...that is, while their mtime is this recent...
const HOT_AGE_NS: i128 = 500_000_000;
/// ...but never longer than this (a database file is never closed).
const MAX_DEFER: Duration = Duration::from_secs(5);

/// Whether a big file is still being written and may wait for the next round:
/// shipping a growing 1 GiB file every 100 ms would hash and send it many times.
fn still_hot(root: &Path, p: &RelPath, since: Option<&Instant>, now_ns: i128) -> bool {
    use std::os::unix::fs::MetadataExt;
    if since.is_some_and(|t| t.elapsed() >= MAX_DEFER) {
        return false;
    }
    let Ok(st) = std::fs::symlink_metadata(sync_core::scan::abs(root, p)) else {
        return false;
    };
    let mtime = i128::from(st.mtime()) * 1_000_000_000 + i128::from(st.mtime_nsec());
    st.is_file() && st.size() >= HOT_SIZE && now_ns - mtime < HOT_AGE_NS
}

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

/// Builds a partial round from a batch.
#[allow(clippy::too_many_arguments)]
fn partial_round(
    root: &Path,
    opts: &ScanOptions,
    index: &Mutex<HashIndex>,
    known: &Known,
    batch: Batch,
    deferred: &std::collections::HashMap<RelPath, Instant>,
    live: &Arc<Mutex<LiveSet>>,
    stats: &mut CutStats,
) -> Result<Partial> {
    let Batch {
        mut dirty,
        mut created,
        renames,
    } = batch;
    // A database's log or journal changed: the database did.
    let sidecar_bases: Vec<RelPath> = dirty
        .iter()
        .filter_map(|p| {
            let (dir, name) = p.split_last()?;
            dir.join(sync_core::sqlite::sidecar_base(name)?).ok()
        })
        .collect();
    dirty.extend(sidecar_bases);
    // A database never moves by rename on the replica: the side files of the
    // name it lands on would pair with another file there (a restore by
    // `mv new.db app.db`). Both names are sent as they stand instead: the
    // replica deletes one and takes the other as a database update.
    let is_db = |p: &RelPath| {
        known
            .get(p)
            .is_some_and(|e| matches!(e.kind, Kind::Database { .. }))
            || opts
                .databases
                .as_ref()
                .is_some_and(|d| d.known.read().is_ok_and(|k| k.contains(p)))
    };
    let (db_renames, renames): (Vec<_>, Vec<_>) =
        renames.into_iter().partition(|(a, b)| is_db(a) || is_db(b));
    for (a, b) in db_renames {
        dirty.insert(a);
        dirty.insert(b.clone());
        created.insert(b);
    }
    // Renames are kept when their source is on the replica: known, or moved
    // there by an earlier rename of the batch (`mv a t; mv b a; mv t b`).
    let mut targets: Vec<RelPath> = Vec::new();
    let renamed: Vec<(RelPath, RelPath)> = renames
        .into_iter()
        .filter(|(a, b)| {
            let keep = known.contains_key(a) || targets.iter().any(|t| a.starts_with(t));
            if keep {
                targets.push(b.clone());
            }
            keep
        })
        .collect();
    let on_replica =
        |p: &RelPath| known.contains_key(p) || targets.iter().any(|t| p.starts_with(t));
    // Paths that appeared anew or took part in a rename are sent as they are,
    // whatever `known` says (the replica's copy moved, or was replaced); a
    // directory among them is scanned whole (files made in it before its watch
    // existed raised no event).
    let mut forced: BTreeSet<RelPath> = created;
    for (a, b) in &renamed {
        forced.insert(a.clone());
        forced.insert(b.clone());
    }
    let mut paths = dirty;
    paths.extend(forced.iter().cloned());
    // A changed entry changes its parent's mtime too.
    let parents: Vec<RelPath> = paths
        .iter()
        .filter_map(|p| p.split_last().map(|(d, _)| d))
        .collect();
    paths.extend(parents);
    let ix = index
        .lock()
        .map_err(|_| anyhow::anyhow!("index lock poisoned"))?;
    let now = sync_core::scan::now_ns();
    let mut changed: Vec<Entry> = Vec::new();
    let mut deleted = Vec::new();
    let mut hashed = Vec::new();
    let mut covered: Option<RelPath> = None;
    // Directories seen unchanged: sent anyway when something inside them changes,
    // so the replica can put back the mtime its own writes moved.
    let mut dirs: BTreeMap<RelPath, Entry> = BTreeMap::new();
    let mut held = Vec::new();
    let mut dbs_seen: Vec<RelPath> = Vec::new();
    for p in paths {
        if covered.as_ref().is_some_and(|c| p.starts_with(c)) {
            continue;
        }
        let live_db = opts
            .databases
            .as_ref()
            .is_some_and(|d| d.known.read().is_ok_and(|k| k.contains(&p)));
        if !live_db && still_hot(root, &p, deferred.get(&p), now) {
            held.push(p);
            continue;
        }
        let (entry, report) = sync_core::scan::entry_at(root, &p, opts, Some(&ix))?;
        hashed.extend(report.hashed);
        dbs_seen.extend(report.databases);
        if !report.multi_linked.is_empty() {
            // A name of a multiply linked file changed: only a full scan sees the
            // whole link group.
            return Ok((None, held));
        }
        let force = forced.contains(&p);
        match entry {
            None => {
                if on_replica(&p) {
                    deleted.push(p.clone());
                    covered = Some(p);
                }
            }
            Some(e)
                if e.kind == Kind::Dir
                    && (force || known.get(&p).is_none_or(|k| k.kind != Kind::Dir)) =>
            {
                // A new directory: its content may predate the watch on it.
                let (sub, report) = sync_core::scan::scan_subtree(root, &p, opts, Some(&ix))?;
                hashed.extend(report.hashed);
                dbs_seen.extend(report.databases);
                if !report.multi_linked.is_empty() {
                    return Ok((None, held));
                }
                // What the replica still holds below it and the source no
                // longer has (the directory was replaced, not just created).
                let present: BTreeSet<&RelPath> = sub.iter().map(|e| &e.path).collect();
                let mut gone: Option<RelPath> = None;
                for (k, _) in known
                    .range(p.clone()..)
                    .take_while(|(k, _)| k.starts_with(&p))
                {
                    if !present.contains(k) && !gone.as_ref().is_some_and(|g| k.starts_with(g)) {
                        deleted.push(k.clone());
                        gone = Some(k.clone());
                    }
                }
                changed.extend(
                    sub.into_iter()
                        .filter(|e| force || known.get(&e.path) != Some(e)),
                );
                covered = Some(p);
            }
            Some(e) => {
                if force || known.get(&p) != Some(&e) {
                    changed.push(e);
                } else if e.kind == Kind::Dir {
                    dirs.insert(p, e);
                }
            }
        }
    }
    drop(ix);
    let parents: BTreeSet<RelPath> = changed
        .iter()
        .map(|e| &e.path)
        .chain(deleted.iter())
        .filter_map(|p| p.split_last().map(|(d, _)| d))
        .collect();
    changed.extend(parents.iter().filter_map(|p| dirs.remove(p)));
    if let Ok(mut ix) = index.lock() {
        for (p, s, h) in hashed {
            ix.record(&p, s, h, now);
        }
    }
    // The cut: every database at one instant; those that changed join the round.
    {
        let mut l = live
            .lock()
            .map_err(|_| anyhow::anyhow!("live database set poisoned"))?;
        let gone: Vec<RelPath> = l
            .paths()
            .filter(|p| deleted.iter().any(|d| p.starts_with(d)))
            .cloned()
            .collect();
        for p in &gone {
            l.forget(p);
        }
        l.add(&dbs_seen);
        note_known(opts, &l);
        *stats = l.cut()?;
        if !stats.dropped.is_empty() {
            // A database vanished or was replaced by something else: only a
            // full scan tells what stands there now.
            note_known(opts, &l);
            return Ok((None, held));
        }
        if let Some(why) = &stats.blocked {
            // No cut this time: the databases wait for the next round (the
            // replica keeps the previous cut); the rest of the batch goes now.
            tracing::debug!("{why}");
            let dbs: BTreeSet<RelPath> = l.paths().cloned().collect();
            changed.retain(|e| !dbs.contains(&e.path));
            held.extend(dbs);
        }
        let have: BTreeSet<RelPath> = changed.iter().map(|e| e.path.clone()).collect();
        let ix = index
            .lock()
            .map_err(|_| anyhow::anyhow!("index lock poisoned"))?;
        for p in stats.changed.iter().filter(|p| !have.contains(*p)) {
            if let (Some(e), _) = sync_core::scan::entry_at(root, p, opts, Some(&ix))? {
                changed.push(e);
            }
        }
        drop(ix);
        crate::session::source::mark_databases(&mut changed, &l)?;
        // The replica holds a recent cut: its pages are read now and the
        // snapshots let go before the round waits on the network.
        l.release(false)?;
    }
    changed.sort_by(|a, b| a.path.cmp(&b.path));
    changed.dedup_by(|a, b| a.path == b.path);
    let round = Round {
        full: false,
        entries: Arc::new(changed),
        deleted,
        renamed,
        live: Some(live.clone()),
        ..Default::default()
    };
    Ok((Some(round), held))
}

/// Tells the scanner which databases this process holds (never read raw).
fn note_known(opts: &ScanOptions, live: &LiveSet) {
    if let Some(d) = &opts.databases
        && let Ok(mut k) = d.known.write()
    {
        *k = live.paths().cloned().collect();
    }
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
    let opts = ScanOptions {
        filter: cfg.filter.clone(),
        databases: Some(Arc::new(sync_core::scan::DbDetect {
            globs: cfg.sqlite.clone(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut w = start_watch(&cfg.root, &status, opts.databases.clone())?;
    let index = Arc::new(Mutex::new(match &cfg.index_path {
        Some(p) => {
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating state directory {}", dir.display()))?;
            }
            HashIndex::open(p).with_context(|| format!("hash index {}", p.display()))?
        }
        None => HashIndex::in_memory(),
    }));
    // Held across sessions: a replica that reconnects a few cuts behind gets
    // only the pages changed since what it holds.
    let live = Arc::new(Mutex::new(LiveSet::new(&cfg.root, crate::DB_BUSY)));
    set(&status, |s| s.epoch = cfg.epoch);
    // What the replica holds is unknown until the first full round is applied.
    let mut lag = LagTracker::unknown_since(Instant::now());
    publish_lag(&status, &lag);
    let progress = Arc::new(Progress::default());
    set(&status, |s| s.progress = Some(progress.clone()));
    let mut backoff = Duration::from_millis(100);
    while !*shutdown.borrow() {
        set(&status, |s| s.connected = false);
        let connecting = async {
            let to = cfg.addr.resolve().await?;
            let (endpoint, conn) = crate::connect(&cfg.identity, cfg.peer, to).await?;
            let s = SourceSession::open(
                conn,
                cfg.root.clone(),
                &cfg.name,
                proto::PROTOCOL_VERSION,
                cfg.epoch,
                progress.clone(),
            )
            .await?;
            Ok::<_, anyhow::Error>((endpoint, s))
        };
        // A connect to a vanished replica takes the idle timeout: changes
        // meanwhile are pending from their instant.
        tokio::pin!(connecting);
        let session = loop {
            tokio::select! {
                r = &mut connecting => break r,
                () = w.wake.notified() => note_away(&mut w, &mut lag, &status),
            }
        };
        let (endpoint, mut session) = match session {
            Ok(s) => s,
            Err(e) if e.downcast_ref::<Fenced>().is_some() => {
                let epoch = e.downcast_ref::<Fenced>().map_or(cfg.epoch, |f| f.epoch);
                tracing::error!(folder = %cfg.name, "{e:#}; taking the replica role at epoch {epoch}");
                // Before the role changes: what only this node holds is kept
                // aside before the new source's first repair round.
                if let Some(dir) = &cfg.state_dir {
                    crate::diverged::mark(dir, &cfg.name, epoch)?;
                }
                set(&status, |s| s.last_error = Some(format!("{e:#}")));
                return Ok(Outcome::Demoted { epoch });
            }
            Err(e) => {
                tracing::warn!(folder = %cfg.name, "replica {} unreachable: {e:#}; retrying in {backoff:?}", cfg.addr);
                set(&status, |s| s.last_error = Some(format!("{e:#}")));
                let deadline = tokio::time::sleep(backoff);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        () = &mut deadline => break,
                        _ = shutdown.changed() => break,
                        () = w.wake.notified() => note_away(&mut w, &mut lag, &status),
                        Some(c) = commands.recv() => refuse(c, &format!("folder {}: replica {} is unreachable: {e:#}", cfg.name, cfg.addr)),
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        };
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
            set(&status, |s| s.last_error = Some(format!("{e:#}")));
            // A session that fails at once again and again (a file we cannot read,
            // a full replica disk) must not spin: back off as for a failed connect.
            if began.elapsed() < Duration::from_secs(30) {
                let deadline = tokio::time::sleep(backoff);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        () = &mut deadline => break,
                        _ = shutdown.changed() => break,
                        () = w.wake.notified() => note_away(&mut w, &mut lag, &status),
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        session.close().await;
        endpoint.close(0u32.into(), b"");
        if res.is_ok() || began.elapsed() >= Duration::from_secs(30) {
            backoff = Duration::from_millis(100);
        }
    }
    Ok(Outcome::Stopped)
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

/// Rounds until shutdown (`None`) or a handover (`Some(epoch)`).
#[allow(clippy::too_many_arguments)]
async fn drive(
    cfg: &SourceFolder,
    session: &mut SourceSession,
    w: &mut Watch,
    index: &Arc<Mutex<HashIndex>>,
    opts: &ScanOptions,
    status: &SharedStatus,
    shutdown: &mut watch::Receiver<bool>,
    live: &Arc<Mutex<LiveSet>>,
    commands: &mut mpsc::Receiver<Command>,
    lag: &mut LagTracker<RelPath>,
) -> Result<Option<u64>> {
    let mut known: Known = BTreeMap::new();
    let mut full = true;
    // Whether the next full round may find changes no event announced (a new
    // session, a lost event): then it is pending from its start at the latest.
    let mut unknown = true;
    // Databases the replica refused in the last round (held open there).
    let mut refused: BTreeSet<RelPath> = BTreeSet::new();
    let mut cut_reply: Option<tokio::sync::oneshot::Sender<Result<CutReport, String>>> = None;
    let mut wire_seen = 0u64;
    let mut account = |session: &SourceSession, applied: &proto::ApplySummary| {
        let now = session.connection().stats().udp_tx.bytes;
        let sent = now.saturating_sub(wire_seen);
        wire_seen = now;
        set(status, |s| {
            s.wire_bytes_total += sent;
            s.db_pages_total += applied.db_pages;
        });
    };
    let mut last_full = Instant::now();
    let mut deferred: std::collections::HashMap<RelPath, Instant> = Default::default();
    loop {
        if full {
            deferred.clear();
            // Changes from here on are caught by later rounds; the scan sees
            // everything before.
            w.note(lag);
            w.rescan.store(false, Ordering::SeqCst);
            while w.rx.try_recv().is_ok() {}
            lag.round_started(Instant::now(), std::mem::take(&mut unknown));
            publish_lag(status, lag);
            start_full_progress(status);
            let (root, o, ix, l) = (cfg.root.clone(), opts.clone(), index.clone(), live.clone());
            let started = Instant::now();
            let manifest = tokio::task::spawn_blocking(
                move || -> Result<(sync_core::Manifest, u64, CutStats)> {
                    let guard = ix
                        .lock()
                        .map_err(|_| anyhow::anyhow!("index lock poisoned"))?;
                    let (mut m, report) = sync_core::scan::scan_with(&root, &o, Some(&guard))?;
                    drop(guard);
                    // The cut: every database frozen at one instant.
                    let mut l = l
                        .lock()
                        .map_err(|_| anyhow::anyhow!("live database set poisoned"))?;
                    l.track(&report.databases);
                    note_known(&o, &l);
                    let stats = l.cut()?;
                    // Gone since the scan (deleted, renamed away, or no longer
                    // databases): the next round sees what took their place.
                    m.entries.retain(|e| !stats.dropped.contains(&e.path));
                    note_known(&o, &l);
                    crate::session::source::mark_databases(&mut m.entries, &l)?;
                    l.release(true)?;
                    drop(l);
                    let now = sync_core::scan::now_ns();
                    let mut ix = ix
                        .lock()
                        .map_err(|_| anyhow::anyhow!("index lock poisoned"))?;
                    for (p, s, h) in report.hashed {
                        ix.record(&p, s, h, now);
                    }
                    let live: std::collections::HashSet<&[u8]> =
                        m.entries.iter().map(|e| e.path.as_bytes()).collect();
                    ix.retain(|p| live.contains(p));
                    ix.save()?;
                    Ok((m, report.bytes_hashed, stats))
                },
            )
            .await??;
            let (manifest, bytes_hashed, stats) = manifest;
            if let Some(why) = &stats.blocked {
                // The previous cut of the databases stands; a requested cut waits
                // for the operator to try again.
                tracing::info!(folder = %cfg.name, "{why}");
                if let Some(r) = cut_reply.take() {
                    let _ = r.send(Err(why.clone()));
                }
            }
            let wire_before = session.connection().stats().udp_tx.bytes;
            let root_hash = manifest.root_hash();
            let databases = manifest
                .entries
                .iter()
                .filter(|e| matches!(e.kind, Kind::Database { .. }))
                .count() as u64;
            let round = Round {
                full: true,
                entries: Arc::new(manifest.entries),
                root_hash,
                verify: cut_reply.is_some(),
                live: Some(live.clone()),
                ..Default::default()
            };
            let bytes_total = content_bytes(&round.entries);
            set(status, |s| {
                s.files_pending = round.entries.len() as u64;
                if let Some(f) = &mut s.full_round {
                    f.entries_total = round.entries.len() as u64;
                    f.bytes_total = bytes_total;
                }
            });
            let cut_id = session.next_round_id();
            let applied = session.round(&round).await;
            if let Ok(mut l) = live.lock() {
                l.end_round();
            }
            let applied = match applied {
                Ok(a) => a,
                Err(e) => {
                    if let Some(r) = cut_reply.take() {
                        let _ = r.send(Err(format!("{e:#}")));
                    }
                    return Err(e);
                }
            };
            account(session, &applied);
            for p in &applied.held {
                deferred.entry(p.clone()).or_insert_with(Instant::now);
            }
            if stats.blocked.is_some() {
                // The databases went at their previous cut: still pending, and
                // offered again soon.
                if let Ok(l) = live.lock() {
                    for p in l.paths() {
                        deferred.entry(p.clone()).or_insert_with(Instant::now);
                    }
                }
            }
            lag.round_applied(deferred.keys().cloned());
            refused = applied.held.iter().cloned().collect();
            if let Some(r) = cut_reply.take() {
                let replica_root = applied
                    .root_hash
                    .map(|h| sync_core::hex(&h))
                    .unwrap_or_default();
                let source_root = sync_core::hex(&root_hash);
                let _ = r.send(Ok(CutReport {
                    folder: cfg.name.clone(),
                    cut_id,
                    writer_stall_ms: stats.stall.as_secs_f64() * 1e3,
                    databases,
                    pages_changed: stats.pages_changed as u64,
                    bytes_shipped: session.connection().stats().udp_tx.bytes - wire_before,
                    matched: replica_root == source_root,
                    source_root,
                    replica_root,
                    epoch: cfg.epoch,
                    elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                    warnings: applied.warnings.clone(),
                    held: crate::session::held_databases(&applied),
                }));
            }
            let wire_after = session.connection().stats().udp_tx.bytes;
            let entries = Arc::try_unwrap(round.entries).unwrap_or_else(|shared| (*shared).clone());
            known = entries.into_iter().map(|e| (e.path.clone(), e)).collect();
            // A full round's transient buffers (scan, hashing, QUIC send
            // buffers) are freed by now; hand the pages back to the system so an
            // idle agent stays small.
            crate::trim_heap();
            full = false;
            last_full = Instant::now();
            publish_lag(status, lag);
            publish_held(status, &refused);
            set(status, |s| {
                s.rounds += 1;
                s.full_rounds += 1;
                s.root_hash = sync_core::hex(&root_hash);
                s.entries_last_full = known.len() as u64;
                s.bytes_hashed_last_full = bytes_hashed;
                s.wire_bytes_last_full = wire_after - wire_before;
                s.databases = databases;
                s.max_writer_stall_ms = s.max_writer_stall_ms.max(stats.stall.as_secs_f64() * 1e3);
                s.full_round = None;
                s.last_applied_unix = unix_now();
            });
            continue;
        }
        // Wait for changes, a rescan, or shutdown.
        let until_rescan = cfg.rescan_every.saturating_sub(last_full.elapsed());
        tracing::trace!(?until_rescan, "waiting for changes");
        let tick = if deferred.is_empty() {
            until_rescan
        } else {
            Duration::from_millis(250)
        };
        tokio::select! {
            () = w.wake.notified() => {},
            () = tokio::time::sleep(tick), if !deferred.is_empty() => {},
            () = tokio::time::sleep(until_rescan) => { full = true; continue; },
            () = tokio::time::sleep_until(w.next_poll), if w.degraded.is_set() => {
                poll_unwatched(w, &cfg.root, status);
                (full, unknown) = (true, true);
                continue;
            },
            _ = shutdown.changed() => return Ok(None),
            e = session.connection().closed() => {
                return Err(anyhow::anyhow!("connection to the replica lost: {e}"));
            }
            Some(c) = commands.recv() => match c {
                Command::Cut(reply) => {
                    cut_reply = Some(reply);
                    full = true;
                    continue;
                }
                Command::Promote { epoch, reply } => {
                    match session.promote(epoch).await {
                        Ok(()) => {
                            if let Some(dir) = &cfg.state_dir {
                                let st = crate::epoch::FolderState { role: crate::config::Role::Replica, epoch };
                                if let Err(e) = crate::epoch::store(dir, &cfg.name, &cfg.identity.id().to_string(), st) {
                                    // The peer is the source all the same; the
                                    // handover retries persisting the demotion.
                                    tracing::error!(folder = %cfg.name, "the replica was promoted, but persisting this node's demotion failed: {e:#}");
                                }
                            }
                            let _ = reply.send(Ok(()));
                            return Ok(Some(epoch));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                    }
                }
            },
        }
        // Debounce: collect until the events pause, at most 100 ms.
        let started = Instant::now();
        w.note(lag);
        publish_lag(status, lag);
        let mut dirty: BTreeSet<RelPath> = deferred.keys().cloned().collect();
        let mut created: BTreeSet<RelPath> = BTreeSet::new();
        let mut renames = Vec::new();
        loop {
            w.note(lag);
            while let Ok(m) = w.rx.try_recv() {
                match m {
                    WatchMsg::Paths(ps, new) => {
                        for p in ps.iter().filter_map(|p| rel(&cfg.root, p)) {
                            if new {
                                created.insert(p.clone());
                            }
                            dirty.insert(p);
                        }
                    }
                    WatchMsg::Rename(a, b) => {
                        if let (Some(a), Some(b)) = (rel(&cfg.root, &a), rel(&cfg.root, &b)) {
                            renames.push((a, b));
                        }
                    }
                }
            }
            if started.elapsed() >= Duration::from_millis(100) {
                break;
            }
            let quiet = tokio::time::timeout(cfg.debounce, w.wake.notified())
                .await
                .is_err();
            if quiet && w.rx.is_empty() {
                break;
            }
        }
        tracing::trace!(
            dirty = dirty.len(),
            renames = renames.len(),
            "batch collected"
        );
        if w.rescan.swap(false, Ordering::SeqCst) {
            full = true;
            unknown = true;
            continue;
        }
        // The round covers every change noted so far.
        lag.round_started(Instant::now(), false);
        if dirty.is_empty() && renames.is_empty() {
            lag.round_applied(std::iter::empty());
            publish_lag(status, lag);
            continue;
        }
        set(status, |s| s.files_pending = dirty.len() as u64);
        let (root, o, ix, k) = (
            cfg.root.clone(),
            opts.clone(),
            index.clone(),
            std::mem::take(&mut known),
        );
        let held_before = std::mem::take(&mut deferred);
        let l = live.clone();
        let (round, k, held_before, stats) = tokio::task::spawn_blocking(move || {
            let batch = Batch {
                dirty,
                created,
                renames,
            };
            let mut stats = CutStats::default();
            let r = partial_round(&root, &o, &ix, &k, batch, &held_before, &l, &mut stats);
            (r, k, held_before, stats)
        })
        .await?;
        set(status, |s| {
            s.max_writer_stall_ms = s.max_writer_stall_ms.max(stats.stall.as_secs_f64() * 1e3)
        });
        known = k;
        let (round, held) = round?;
        for p in held {
            let since = held_before.get(&p).copied().unwrap_or_else(Instant::now);
            deferred.insert(p, since);
        }
        let Some(round) = round else {
            full = true;
            continue;
        };
        if round.entries.is_empty() && round.deleted.is_empty() && round.renamed.is_empty() {
            lag.round_applied(deferred.keys().cloned());
            refused.retain(|p| deferred.contains_key(p));
            publish_lag(status, lag);
            publish_held(status, &refused);
            continue;
        }
        let bytes = content_bytes(&round.entries);
        set(status, |s| {
            s.lag_bytes = bytes;
            s.files_pending = (round.entries.len() + round.deleted.len()) as u64;
        });
        let applied = session.round(&round).await;
        if let Ok(mut l) = live.lock() {
            l.end_round();
        }
        let applied = applied?;
        account(session, &applied);
        // Databases the replica could not update (held open there) are offered
        // again soon, not at the next change.
        for p in &applied.held {
            deferred.entry(p.clone()).or_insert_with(Instant::now);
        }
        lag.round_applied(deferred.keys().cloned());
        refused = applied.held.iter().cloned().collect();
        set(status, |s| {
            s.files_inline_total += applied.files_inline;
            s.files_requested_total += applied.files_transferred - applied.files_inline;
        });
        for p in &round.deleted {
            remove_subtree(&mut known, p);
        }
        for (a, b) in &round.renamed {
            // what moved is re-sent under its new name in the same round
            remove_subtree(&mut known, a);
            remove_subtree(&mut known, b);
        }
        for e in round.entries.iter() {
            if e.kind != Kind::Dir {
                remove_subtree(&mut known, &e.path);
            }
            known.insert(e.path.clone(), e.clone());
        }
        tracing::debug!(folder = %cfg.name, entries = round.entries.len(), deleted = round.deleted.len(), lag_s = lag.lag(Instant::now()).as_secs_f64(), "round applied");
        let ix = index.clone();
        let saved = tokio::task::spawn_blocking(move || match ix.lock() {
            Ok(mut i) => i.save().map_err(anyhow::Error::from),
            Err(_) => Err(anyhow::anyhow!("index lock poisoned")),
        })
        .await?;
        if let Err(e) = saved {
            tracing::warn!(folder = %cfg.name, "saving the hash index: {e:#}");
        }
        set(status, |s| {
            s.rounds += 1;
            s.files_pending = 0;
            s.lag_bytes = 0;
            s.last_applied_unix = unix_now();
        });
        publish_lag(status, lag);
        publish_held(status, &refused);
    }
}

/// Bytes of file content among `entries`.
fn content_bytes(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .map(|e| match e.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        })
        .sum()
}

/// Names the databases the replica refused in status.
fn publish_held(status: &SharedStatus, refused: &BTreeSet<RelPath>) {
    set(status, |s| {
        s.held_databases = refused.iter().map(ToString::to_string).collect();
    });
}

/// A full round begins: its progress shows in status from now on, counted by
/// the session's transfer counters (reset here).
fn start_full_progress(status: &SharedStatus) {
    set(status, |s| {
        if let Some(p) = &s.progress {
            p.entries.store(0, Ordering::Relaxed);
            p.entries_sent.store(0, Ordering::Relaxed);
            p.bytes_done.store(0, Ordering::Relaxed);
            p.files_done.store(0, Ordering::Relaxed);
        }
        s.full_round = Some(FullRoundProgress {
            started_unix: unix_now().unwrap_or_default(),
            ..Default::default()
        });
    });
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
