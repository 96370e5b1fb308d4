//! One session's loop: full rounds, debounced partial rounds, cuts and
//! promotions asked for over the control socket.
//!
//! [`drive`] is a thin loop over the steps of [`Driver`]: a full round
//! ([`Driver::full_round`]), waiting for something to do ([`Driver::wait`]),
//! collecting a debounced batch ([`Driver::collect`]) and shipping it
//! ([`Driver::partial`]).

use super::*;
use crate::index_save::{index_saved, save_index};
use partial::fold_round;

#[path = "collect.rs"]
mod collect;

/// A cut's answer channel.
type CutReply = tokio::sync::oneshot::Sender<Result<CutReport, String>>;

/// What woke the loop between rounds.
enum Wake {
    /// Changes to collect.
    Changes,
    /// Back to the top of the loop (a full round may be due).
    Again,
    /// The session ends: shutdown (`None`) or a handover (`Some(epoch)`).
    Exit(Option<u64>),
}

/// A full round's figures for status.
struct FullFigures {
    root_hash: [u8; 32],
    bytes_hashed: u64,
    wire_before: u64,
    databases: u64,
    stall: Duration,
}

/// A debounced batch of watch events.
struct Collected {
    dirty: BTreeSet<RelPath>,
    created: BTreeSet<RelPath>,
    renames: Vec<(RelPath, RelPath)>,
    /// Nothing but databases cut again once quiet ([`Driver::plan_restamp`]).
    restamp_only: bool,
}

/// One session's loop state and what it works with.
struct Driver<'a> {
    cfg: &'a SourceFolder,
    session: &'a mut SourceSession,
    w: &'a mut Watch,
    index: &'a Arc<Mutex<HashIndex>>,
    opts: &'a ScanOptions,
    status: &'a SharedStatus,
    shutdown: &'a mut watch::Receiver<bool>,
    live: &'a Arc<Mutex<LiveSet>>,
    commands: &'a mut mpsc::Receiver<Command>,
    lag: &'a mut LagTracker<RelPath>,
    known: Known,
    full: bool,
    /// Whether the next full round may find changes no event announced (a new
    /// session, a lost event): then it is pending from its start at the latest.
    unknown: bool,
    /// Databases the replica refused in the last round (held open there).
    refused: BTreeSet<RelPath>,
    cut_reply: Option<CutReply>,
    wire_seen: u64,
    last_full: Instant,
    deferred: std::collections::HashMap<RelPath, Instant>,
    /// Partial rounds, told at INFO in summaries.
    partials: PartialSummary,
    /// The bulk lane: large files staged on the replica ahead of their round.
    lane: bulk::Lane,
    /// Large files waiting for a bulk job.
    queued: std::collections::VecDeque<(RelPath, sync_core::index::Stamp)>,
    /// Bulk jobs running (aborted with the session).
    jobs: tokio::task::JoinSet<()>,
    job_tx: mpsc::UnboundedSender<bulk::JobDone>,
    job_rx: mpsc::UnboundedReceiver<bulk::JobDone>,
    /// Databases to cut again once quiet, and when ([`Driver::plan_restamp`]):
    /// once due, the next batch starts with them.
    restamp: Option<(Instant, Vec<RelPath>)>,
}

/// Rounds until shutdown (`None`) or a handover (`Some(epoch)`).
#[allow(clippy::too_many_arguments)]
pub(super) async fn drive(
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
    let (job_tx, job_rx) = mpsc::unbounded_channel();
    let mut d = Driver {
        cfg,
        session,
        w,
        index,
        opts,
        status,
        shutdown,
        live,
        commands,
        lag,
        known: BTreeMap::new(),
        full: true,
        unknown: true,
        refused: BTreeSet::new(),
        cut_reply: None,
        wire_seen: 0,
        last_full: Instant::now(),
        deferred: Default::default(),
        partials: PartialSummary::new(Duration::from_secs(10)),
        lane: Default::default(),
        queued: Default::default(),
        jobs: tokio::task::JoinSet::new(),
        job_tx,
        job_rx,
        restamp: None,
    };
    loop {
        if d.full {
            d.full_round().await?;
            d.plan_restamp(true);
            continue;
        }
        match d.wait().await? {
            Wake::Changes => {}
            Wake::Again => continue,
            Wake::Exit(r) => return Ok(r),
        }
        if let Some(batch) = d.collect().await {
            let lone = batch.restamp_only;
            d.partial(batch).await?;
            d.plan_restamp(!lone);
        }
    }
}

/// A full round's scan: the manifest, the bytes hashed, the cut's figures,
/// the root hash and the quick digest.
type Scanned = (sync_core::Manifest, u64, CutStats, ([u8; 32], [u8; 32]));

/// The full round's scan and cut: the manifest (databases marked with their
/// snapshots), the bytes hashed, the cut's figures; the index updated.
fn scan_and_cut(
    root: &Path,
    o: &ScanOptions,
    ix: &Mutex<HashIndex>,
    l: &Mutex<LiveSet>,
) -> Result<(sync_core::Manifest, u64, CutStats)> {
    let guard = ix
        .lock()
        .map_err(|_| anyhow::anyhow!("index lock poisoned"))?;
    super::partial::let_go(l);
    let (mut m, report) = sync_core::scan::scan_with(root, o, Some(&guard))?;
    drop(guard);
    // The cut: every database frozen at one instant.
    let mut l = l
        .lock()
        .map_err(|_| anyhow::anyhow!("live database set poisoned"))?;
    l.name_from(&m.entries, &report.databases);
    l.track(&report.databases);
    note_known(o, &l);
    let stats = l.cut()?;
    // Gone since the scan (deleted, renamed away, or no longer
    // databases): the next round sees what took their place.
    m.entries.retain(|e| !stats.dropped.contains(&e.path));
    note_known(o, &l);
    crate::session::source::mark_databases(&mut m.entries, &l)?;
    l.release(true)?;
    drop(l);
    let now = sync_core::scan::now_ns();
    let mut ix = ix
        .lock()
        .map_err(|_| anyhow::anyhow!("index lock poisoned"))?;
    // saved while the round goes (`Driver::full_round`)
    ix.remember_scan(report.hashed, &m, now);
    Ok((m, report.bytes_hashed, stats))
}

impl Driver<'_> {
    /// Counts the wire bytes and database pages of an applied round.
    fn account(&mut self, applied: &proto::ApplySummary) {
        let stats = self.session.connection().stats();
        let now = stats.udp_tx.bytes;
        let sent = now.saturating_sub(self.wire_seen);
        self.wire_seen = now;
        tracing::debug!(
            sent,
            lost_bytes = stats.path.lost_bytes,
            lost_packets = stats.path.lost_packets,
            rtt_us = stats.path.rtt.as_micros(),
            "wire of the round (loss counted since the session began)"
        );
        set(self.status, |s| {
            s.wire_bytes_total += sent;
            s.db_pages_total += applied.db_pages;
        });
    }

    /// A full round's scan and cut, with the root hash and the quick digest
    /// (taken at once), on a blocking thread; a cut that failed part way
    /// lets its snapshots go.
    async fn scan_full(&self) -> Result<Scanned> {
        let (root, o, ix, l) = (
            self.cfg.root.clone(),
            self.opts.clone(),
            self.index.clone(),
            self.live.clone(),
        );
        let scanned = tokio::task::spawn_blocking(move || {
            let (m, hashed, stats) = scan_and_cut(&root, &o, &ix, &l)?;
            let digests = sync_core::digest::root_and_quick(&m);
            Ok((m, hashed, stats, digests))
        })
        .await;
        match scanned.map_err(anyhow::Error::from) {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) | Err(e) => {
                super::partial::let_go(self.live);
                Err(e)
            }
        }
    }

    /// A full round: scan, cut, ship, and answer a cut asked for.
    async fn full_round(&mut self) -> Result<()> {
        let (cfg, status) = (self.cfg, self.status);
        self.deferred.clear();
        // Changes from here on are caught by later rounds; the scan sees
        // everything before.
        self.w.note(self.lag);
        self.w.rescan.store(false, Ordering::SeqCst);
        while self.w.rx.try_recv().is_ok() {}
        self.lag
            .round_started(Instant::now(), std::mem::take(&mut self.unknown));
        publish_lag(status, self.lag);
        start_full_progress(status);
        let started = Instant::now();
        let scan_began = sync_core::scan::now_ns();
        let (manifest, bytes_hashed, stats, (root_hash, quick)) = self.scan_full().await?;
        if let Some(why) = &stats.blocked {
            self.cut_blocked(why);
        }
        let wire_before = self.session.connection().stats().udp_tx.bytes;
        let databases = manifest
            .entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Database { .. }))
            .count() as u64;
        let round = Round {
            full: true,
            entries: Arc::new(manifest.entries),
            root_hash,
            quick_digest: Some(quick),
            verify: self.cut_reply.is_some(),
            live: Some(self.live.clone()),
            scan_began: Some(scan_began),
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
        let entries = round.entries.len() as u64;
        log_full_start(&cfg.name, entries, bytes_total);
        let cut_id = self.session.next_round_id();
        let saving = save_index(self.index);
        let applied = self.session.round(&round).await;
        index_saved(&cfg.name, saving).await;
        if let Ok(mut l) = self.live.lock() {
            l.end_round();
        }
        let applied = match applied {
            Ok(a) => a,
            Err(e) => {
                if let Some(r) = self.cut_reply.take() {
                    let _ = r.send(Err(format!("{e:#}")));
                }
                return Err(e);
            }
        };
        self.account(&applied);
        log_full_end(status, entries, bytes_total, started.elapsed());
        self.defer_after_full(&applied, &stats);
        if let Some(r) = self.cut_reply.take() {
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
                bytes_shipped: self.session.connection().stats().udp_tx.bytes - wire_before,
                matched: replica_root == source_root,
                source_root,
                replica_root,
                epoch: cfg.epoch,
                elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
                warnings: applied.warnings.clone(),
                held: crate::session::held_databases(&applied),
                replica_parity: applied.parity.clone(),
            }));
        }
        let figures = FullFigures {
            root_hash,
            bytes_hashed,
            wire_before,
            databases,
            stall: stats.stall,
        };
        self.record_full(round.entries, figures);
        Ok(())
    }

    /// The cut was blocked: the previous cut of the databases stands; a
    /// requested cut waits for the operator to try again.
    fn cut_blocked(&mut self, why: &str) {
        tracing::info!(folder = %self.cfg.name, "{why}");
        if let Some(r) = self.cut_reply.take() {
            let _ = r.send(Err(why.to_string()));
        }
    }

    /// A full round applied: what the replica holds, and status.
    fn record_full(&mut self, entries: Arc<Vec<Entry>>, f: FullFigures) {
        let status = self.status;
        let wire_after = self.session.connection().stats().udp_tx.bytes;
        let entries = Arc::try_unwrap(entries).unwrap_or_else(|shared| (*shared).clone());
        self.known = entries.into_iter().map(|e| (e.path.clone(), e)).collect();
        // A full round's transient buffers (scan, hashing, QUIC send
        // buffers) are freed by now; hand the pages back to the system so an
        // idle agent stays small.
        sync_core::trim_heap();
        self.full = false;
        self.last_full = Instant::now();
        publish_lag(status, self.lag);
        publish_held(status, &self.refused);
        let known = self.known.len() as u64;
        set(status, |s| {
            s.rounds += 1;
            s.full_rounds += 1;
            s.root_hash = sync_core::hex(&f.root_hash);
            s.entries_last_full = known;
            s.bytes_hashed_last_full = f.bytes_hashed;
            s.wire_bytes_last_full = wire_after - f.wire_before;
            s.databases = f.databases;
            s.max_writer_stall_ms = s.max_writer_stall_ms.max(f.stall.as_secs_f64() * 1e3);
            s.writer_stall.observe(f.stall);
            s.full_round = None;
            s.last_applied_unix = unix_now();
        });
    }

    /// After a full round: the databases the replica held, and all of them
    /// when the cut was blocked, are offered again soon.
    fn defer_after_full(&mut self, applied: &proto::ApplySummary, stats: &CutStats) {
        for h in &applied.held {
            self.deferred
                .entry(h.path.clone())
                .or_insert_with(Instant::now);
        }
        if stats.blocked.is_some() {
            // The databases went at their previous cut: still pending, and
            // offered again soon.
            if let Ok(l) = self.live.lock() {
                for p in l.paths() {
                    self.deferred.entry(p.clone()).or_insert_with(Instant::now);
                }
            }
        }
        self.lag.round_applied(self.deferred.keys().cloned());
        self.refused = applied.held.iter().map(|h| h.path.clone()).collect();
    }

    /// After a round: the databases whose next cut could not trust their
    /// stamps (written since, or cut within a clock tick of a write) are cut
    /// again [`RESTAMP_AFTER`] later if nothing comes first, so that the next
    /// commit's cut reads its log frames and not every page. Not after a
    /// round of those alone: a database whose times never vouch for it (set
    /// in the future) is not cut over and over.
    fn plan_restamp(&mut self, allowed: bool) {
        let due = match allowed.then(|| self.live.lock()) {
            Some(Ok(l)) => l.restamp_due(),
            _ => Vec::new(),
        };
        if !due.is_empty() {
            tracing::debug!(databases = due.len(), "databases to cut again once quiet");
        }
        self.restamp = (!due.is_empty()).then(|| (Instant::now() + RESTAMP_AFTER, due));
    }

    /// Waits for changes, a rescan, a command, or shutdown.
    async fn wait(&mut self) -> Result<Wake> {
        let cfg = self.cfg;
        let until_rescan = cfg.rescan_every.saturating_sub(self.last_full.elapsed());
        tracing::trace!(?until_rescan, "waiting for changes");
        let tick = if self.deferred.is_empty() {
            until_rescan
        } else {
            Duration::from_millis(250)
        };
        let restamp_at = self.restamp.as_ref().map_or_else(Instant::now, |r| r.0);
        let w = &mut *self.w;
        tokio::select! {
            () = w.wake.notified() => Ok(Wake::Changes),
            () = tokio::time::sleep_until(restamp_at.into()), if self.restamp.is_some() => {
                Ok(Wake::Changes)
            }
            Some((p, r)) = self.job_rx.recv() => {
                // staged (or failed): the next round carries it (or it is sent again)
                self.lane.done(p, r, Instant::now());
                self.pump();
                Ok(Wake::Changes)
            }
            () = tokio::time::sleep(tick), if !self.deferred.is_empty() => Ok(Wake::Changes),
            () = tokio::time::sleep(until_rescan) => {
                self.full = true;
                Ok(Wake::Again)
            },
            () = tokio::time::sleep_until(w.next_poll), if w.degraded.is_set() => {
                poll_unwatched(w, &cfg.root, self.status);
                (self.full, self.unknown) = (true, true);
                Ok(Wake::Again)
            },
            _ = self.shutdown.changed() => Ok(Wake::Exit(None)),
            e = self.session.connection().closed() => {
                Err(anyhow::anyhow!("connection to the replica lost: {e}"))
            }
            Some(c) = self.commands.recv() => match c {
                Command::Cut(reply) => {
                    self.cut_reply = Some(reply);
                    self.full = true;
                    Ok(Wake::Again)
                }
                Command::Promote { epoch, reply } => {
                    match self.session.promote(epoch).await {
                        Ok(()) => {
                            persist_demotion(cfg, epoch);
                            let _ = reply.send(Ok(()));
                            Ok(Wake::Exit(Some(epoch)))
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            Ok(Wake::Again)
                        }
                    }
                }
            },
        }
    }

    /// A partial round of a collected batch: built on a blocking thread,
    /// shipped, and folded into what the replica is known to hold.
    async fn partial(&mut self, c: Collected) -> Result<()> {
        let (root, o, ix, k) = (
            self.cfg.root.clone(),
            self.opts.clone(),
            self.index.clone(),
            std::mem::take(&mut self.known),
        );
        let held_before = std::mem::take(&mut self.deferred);
        let (l, lane) = (self.live.clone(), self.lane.clone());
        let (round, k, held_before, stats, sends) = tokio::task::spawn_blocking(move || {
            let batch = Batch {
                dirty: c.dirty,
                created: c.created,
                renames: c.renames,
            };
            let (mut stats, mut sends) = (CutStats::default(), Vec::new());
            let bulk = (&mut stats, &lane, &mut sends);
            let r = partial_round(&root, &o, &ix, &k, batch, &held_before, &l, bulk);
            (r, k, held_before, stats, sends)
        })
        .await?;
        for (p, stamp) in sends {
            self.lane.start(p.clone(), stamp);
            self.queued.push_back((p, stamp));
        }
        self.pump();
        set(self.status, |s| {
            s.max_writer_stall_ms = s.max_writer_stall_ms.max(stats.stall.as_secs_f64() * 1e3);
            s.writer_stall.observe(stats.stall);
        });
        self.known = k;
        // Only a round that ships keeps its snapshots, until it is applied.
        let ships = matches!(&round, Ok((Some(r), _)) if !r.is_empty());
        if !ships {
            super::partial::let_go(self.live);
        }
        let (round, held) = round?;
        for p in held {
            let since = held_before.get(&p).copied().unwrap_or_else(Instant::now);
            self.deferred.insert(p, since);
        }
        let Some(round) = round else {
            self.full = true;
            return Ok(());
        };
        if round.is_empty() {
            self.lag.round_applied(self.deferred.keys().cloned());
            self.refused.retain(|p| self.deferred.contains_key(p));
            publish_lag(self.status, self.lag);
            publish_held(self.status, &self.refused);
            return Ok(());
        }
        self.ship_partial(round).await
    }

    /// Ships a partial round and records what the replica now holds.
    async fn ship_partial(&mut self, round: Round) -> Result<()> {
        let (cfg, status) = (self.cfg, self.status);
        let bytes = content_bytes(&round.entries);
        set(status, |s| {
            s.lag_bytes = bytes;
            s.files_pending = (round.entries.len() + round.deleted.len()) as u64;
        });
        let applied = self.session.round(&round).await;
        if let Ok(mut l) = self.live.lock() {
            l.end_round();
        }
        let applied = applied?;
        self.account(&applied);
        // Databases the replica could not update (held open there) are offered
        // again soon, not at the next change.
        for h in &applied.held {
            self.deferred
                .entry(h.path.clone())
                .or_insert_with(Instant::now);
        }
        self.lag.round_applied(self.deferred.keys().cloned());
        self.refused = applied.held.iter().map(|h| h.path.clone()).collect();
        set(status, |s| {
            s.files_inline_total += applied.files_inline;
            s.files_requested_total += applied.files_transferred - applied.files_inline;
        });
        fold_round(&mut self.known, &round);
        for e in round.entries.iter() {
            self.lane.landed(&e.path);
        }
        tracing::debug!(folder = %cfg.name, entries = round.entries.len(), deleted = round.deleted.len(), lag_s = self.lag.lag(Instant::now()).as_secs_f64(), "round applied");
        let carried = (round.entries.len() + round.deleted.len() + round.renamed.len()) as u64;
        if let Some(t) = self.partials.record(Instant::now(), carried, bytes) {
            tracing::info!(folder = %cfg.name, rounds = t.rounds, entries = t.entries, bytes = t.bytes, "partial rounds applied");
        }
        index_saved(&cfg.name, save_index(self.index)).await;
        set(status, |s| {
            s.rounds += 1;
            s.files_pending = 0;
            s.lag_bytes = 0;
            s.last_applied_unix = unix_now();
        });
        publish_lag(status, self.lag);
        publish_held(status, &self.refused);
        Ok(())
    }
}

impl Driver<'_> {
    /// Starts queued bulk jobs, [`bulk::PARALLEL`] at most at once.
    fn pump(&mut self) {
        while self.jobs.try_join_next().is_some() {}
        while self.jobs.len() < bulk::PARALLEL {
            let Some(job) = self.queued.pop_front() else {
                break;
            };
            let conn = self.session.connection().clone();
            let (root, limit) = (self.cfg.root.clone(), self.session.bwlimit());
            bulk::spawn_job(&mut self.jobs, conn, root, job, limit, self.job_tx.clone());
        }
    }
}
