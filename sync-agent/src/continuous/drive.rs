//! One session's loop: full rounds, debounced partial rounds, cuts and
//! promotions asked for over the control socket.

use super::*;

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
pub(super) fn content_bytes(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .map(|e| match e.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        })
        .sum()
}

/// Names the databases the replica refused in status.
pub(super) fn publish_held(status: &SharedStatus, refused: &BTreeSet<RelPath>) {
    set(status, |s| {
        s.held_databases = refused.iter().map(ToString::to_string).collect();
    });
}

/// A full round begins: its progress shows in status from now on, counted by
/// the session's transfer counters (reset here).
pub(super) fn start_full_progress(status: &SharedStatus) {
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
