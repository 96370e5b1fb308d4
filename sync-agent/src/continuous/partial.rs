//! Partial rounds: a debounced batch of watch events turned into a round
//! (changed entries, deletions, renames, and the cut of the databases).

use super::*;
use bulk::{Lane, Route};

pub(super) fn remove_subtree(known: &mut Known, p: &RelPath) {
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
pub(super) const HOT_SIZE: u64 = 8 << 20;

/// ...that is, while their mtime is this recent...
pub(super) const HOT_AGE_NS: i128 = 500_000_000;

/// ...but never longer than this (a database file is never closed).
pub(super) const MAX_DEFER: Duration = Duration::from_secs(5);

/// Whether a big file is still being written and may wait for the next round:
/// shipping a growing 1 GiB file every 100 ms would hash and send it many times.
/// `since` is when it was first held back, `now` and `now_ns` the clock.
pub(super) fn still_hot(
    root: &Path,
    p: &RelPath,
    since: Option<&Instant>,
    now: Instant,
    now_ns: i128,
) -> bool {
    use std::os::unix::fs::MetadataExt;
    if since.is_some_and(|t| now.saturating_duration_since(*t) >= MAX_DEFER) {
        return false;
    }
    let Ok(st) = std::fs::symlink_metadata(sync_core::scan::abs(root, p)) else {
        return false;
    };
    let mtime = i128::from(st.mtime()) * 1_000_000_000 + i128::from(st.mtime_nsec());
    st.is_file() && st.size() >= HOT_SIZE && now_ns - mtime < HOT_AGE_NS
}

/// A batch expanded to the paths a partial round looks at.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Expanded {
    /// Every path to look at (with the parents of changed ones).
    pub(super) paths: BTreeSet<RelPath>,
    /// Paths sent as they are, whatever `known` says.
    pub(super) forced: BTreeSet<RelPath>,
    /// Renames kept (their source is on the replica).
    pub(super) renamed: Vec<(RelPath, RelPath)>,
    /// Where the kept renames landed.
    pub(super) targets: Vec<RelPath>,
}

impl Expanded {
    /// Whether the replica holds `p` (known, or moved there by a kept rename).
    fn on_replica(&self, known: &Known, p: &RelPath) -> bool {
        known.contains_key(p) || self.targets.iter().any(|t| p.starts_with(t))
    }
}

/// Expands a batch: a changed side file stands for its database; a rename
/// involving a database becomes both names sent as they stand; renames are kept
/// when their source is on the replica; parents of changed paths join (their
/// mtime moved).
pub(super) fn expand(batch: Batch, known: &Known, opts: &ScanOptions) -> Expanded {
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
    Expanded {
        paths,
        forced,
        renamed,
        targets,
    }
}

/// What looking at a batch's paths found.
#[derive(Debug, Default)]
struct Scanned {
    changed: Vec<Entry>,
    deleted: Vec<RelPath>,
    hashed: Vec<(RelPath, sync_core::index::Stamp, [u8; 32])>,
    held: Vec<RelPath>,
    dbs_seen: Vec<RelPath>,
    /// Directories seen unchanged: sent anyway when something inside them
    /// changes, so the replica can put back the mtime its own writes moved.
    dirs: BTreeMap<RelPath, Entry>,
    /// A name of a multiply linked file changed: only a full scan sees the
    /// whole link group.
    full_needed: bool,
    /// Large files to send on the bulk lane (held from this round).
    sends: Vec<(RelPath, sync_core::index::Stamp)>,
}

/// The clock a partial round reads: for hot-file deferral.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    /// Monotonic now.
    pub(super) now: Instant,
    /// Wall-clock now, ns since the epoch (compared with mtimes).
    pub(super) now_ns: i128,
}

/// Looks at each path of the batch against what the replica holds.
fn scan_paths(
    root: &Path,
    opts: &ScanOptions,
    ix: &HashIndex,
    known: &Known,
    ex: &Expanded,
    deferred: &std::collections::HashMap<RelPath, Instant>,
    (clock, lane): (Clock, &Lane),
) -> Result<Scanned> {
    let mut out = Scanned::default();
    let mut covered: Option<RelPath> = None;
    for p in ex.paths.iter().cloned() {
        if covered.as_ref().is_some_and(|c| p.starts_with(c)) {
            continue;
        }
        let live_db = opts
            .databases
            .as_ref()
            .is_some_and(|d| d.known.read().is_ok_and(|k| k.contains(&p)));
        let mut staged = None;
        if !live_db {
            let seen = super::bulk::seen(root, &p, opts, known, deferred.get(&p), clock);
            match lane.route(&p, &seen, clock.now) {
                Route::Round => {}
                Route::Staged(stamp, hash) => staged = Some((stamp, hash)),
                Route::Hold => {
                    out.held.push(p);
                    continue;
                }
                Route::Send(stamp) => {
                    out.sends.push((p.clone(), stamp));
                    out.held.push(p);
                    continue;
                }
            }
        }
        let (entry, report) = match staged {
            Some((stamp, hash)) => {
                // the folder's index keeps it too, unless it is racy
                out.hashed.push((p.clone(), stamp, hash));
                let e = super::bulk::staged_entry(root, &p, opts, stamp, hash)?;
                (e, Default::default())
            }
            None => sync_core::scan::entry_at(root, &p, opts, Some(ix))?,
        };
        out.hashed.extend(report.hashed);
        out.dbs_seen.extend(report.databases);
        if !report.multi_linked.is_empty() {
            out.full_needed = true;
            return Ok(out);
        }
        let force = ex.forced.contains(&p);
        match entry {
            None => {
                if ex.on_replica(known, &p) {
                    out.deleted.push(p.clone());
                    covered = Some(p);
                }
            }
            Some(e)
                if e.kind == Kind::Dir
                    && (force || known.get(&p).is_none_or(|k| k.kind != Kind::Dir)) =>
            {
                new_dir(root, opts, ix, known, (&p, &ex.renamed), force, &mut out)?;
                if out.full_needed {
                    return Ok(out);
                }
                covered = Some(p);
            }
            Some(e) => {
                if force || known.get(&p) != Some(&e) {
                    out.changed.push(e);
                } else if e.kind == Kind::Dir {
                    out.dirs.insert(p, e);
                }
            }
        }
    }
    Ok(out)
}

/// A new directory: its content may predate the watch on it, so it is
/// scanned whole; what the replica still holds below it and the source no
/// longer has is deleted (the directory was replaced, not just created).
/// What the replica held below the source of a rename landing in `p` lands
/// there with the rename, and is deleted there too when the source no longer
/// has it (`mv gone moved; rm moved/z` in one batch).
fn new_dir(
    root: &Path,
    opts: &ScanOptions,
    ix: &HashIndex,
    known: &Known,
    (p, renamed): (&RelPath, &[(RelPath, RelPath)]),
    force: bool,
    out: &mut Scanned,
) -> Result<()> {
    let (sub, report) = sync_core::scan::scan_subtree(root, p, opts, Some(ix))?;
    out.hashed.extend(report.hashed);
    out.dbs_seen.extend(report.databases);
    if !report.multi_linked.is_empty() {
        out.full_needed = true;
        return Ok(());
    }
    let present: BTreeSet<&RelPath> = sub.iter().map(|e| &e.path).collect();
    let under = |base: &RelPath, to: &RelPath| -> Vec<RelPath> {
        known
            .range(base.clone()..)
            .take_while(|(k, _)| k.starts_with(base))
            .filter_map(|(k, _)| moved(k, base, to))
            .collect()
    };
    let mut held: BTreeSet<RelPath> = under(p, p).into_iter().collect();
    for (a, b) in renamed.iter().filter(|(_, b)| b.starts_with(p)) {
        held.extend(under(a, b));
    }
    let mut gone: Option<RelPath> = None;
    for k in held {
        if !present.contains(&k) && !gone.as_ref().is_some_and(|g| k.starts_with(g)) {
            out.deleted.push(k.clone());
            gone = Some(k);
        }
    }
    out.changed.extend(
        sub.into_iter()
            .filter(|e| force || known.get(&e.path) != Some(e)),
    );
    Ok(())
}

/// `k` (below `base`) as it stands below `to`.
fn moved(k: &RelPath, base: &RelPath, to: &RelPath) -> Option<RelPath> {
    let rest = &k.as_bytes()[base.as_bytes().len()..];
    let rest = rest.strip_prefix(b"/").unwrap_or(rest);
    match (to.is_root(), rest.is_empty()) {
        (_, true) => Some(to.clone()),
        (true, false) => RelPath::new(rest.to_vec()).ok(),
        (false, false) => RelPath::new([to.as_bytes(), b"/", rest].concat()).ok(),
    }
}

/// Closes every connection the live set holds before the tree is looked
/// at: a scan opens files, and closing a descriptor of a database inode
/// drops the POSIX locks this process holds on it (another name of a held
/// database, a file renamed over one); nor does a snapshot outlive the round
/// it was taken for (it would keep the application's log from being reset).
pub(super) fn let_go(live: &Mutex<LiveSet>) {
    if let Ok(mut l) = live.lock() {
        l.end_round();
    }
}

/// Builds a partial round from a batch; the large files it holds back to send
/// on the bulk lane are added to `sends`.
#[allow(clippy::too_many_arguments)]
pub(super) fn partial_round(
    root: &Path,
    opts: &ScanOptions,
    index: &Mutex<HashIndex>,
    known: &Known,
    batch: Batch,
    deferred: &std::collections::HashMap<RelPath, Instant>,
    live: &Arc<Mutex<LiveSet>>,
    (stats, lane, sends): (
        &mut CutStats,
        &Lane,
        &mut Vec<(RelPath, sync_core::index::Stamp)>,
    ),
) -> Result<Partial> {
    let_go(live);
    let ex = expand(batch, known, opts);
    let clock = Clock {
        now: Instant::now(),
        now_ns: sync_core::scan::now_ns(),
    };
    let ix = index
        .lock()
        .map_err(|_| anyhow::anyhow!("index lock poisoned"))?;
    let mut sc = scan_paths(root, opts, &ix, known, &ex, deferred, (clock, lane))?;
    drop(ix);
    sends.append(&mut sc.sends);
    if sc.full_needed {
        return Ok((None, sc.held));
    }
    let parents: BTreeSet<RelPath> = sc
        .changed
        .iter()
        .map(|e| &e.path)
        .chain(sc.deleted.iter())
        .filter_map(|p| p.split_last().map(|(d, _)| d))
        .collect();
    sc.changed
        .extend(parents.iter().filter_map(|p| sc.dirs.remove(p)));
    if let Ok(mut ix) = index.lock() {
        for (p, s, h) in std::mem::take(&mut sc.hashed) {
            ix.record(&p, s, h, clock.now_ns);
        }
    }
    if !cut_databases(root, opts, index, live, &mut sc, stats)? {
        return Ok((None, sc.held));
    }
    let mut changed = sc.changed;
    changed.sort_by(|a, b| a.path.cmp(&b.path));
    changed.dedup_by(|a, b| a.path == b.path);
    let round = Round {
        full: false,
        entries: Arc::new(changed),
        deleted: sc.deleted,
        renamed: ex.renamed,
        live: Some(live.clone()),
        ..Default::default()
    };
    Ok((Some(round), sc.held))
}

/// The cut: every database at one instant; those that changed join the
/// round. `false` when only a full scan will do (a database vanished or was
/// replaced by something else).
fn cut_databases(
    root: &Path,
    opts: &ScanOptions,
    index: &Mutex<HashIndex>,
    live: &Mutex<LiveSet>,
    sc: &mut Scanned,
    stats: &mut CutStats,
) -> Result<bool> {
    let mut l = live
        .lock()
        .map_err(|_| anyhow::anyhow!("live database set poisoned"))?;
    let gone: Vec<RelPath> = l
        .paths()
        .filter(|p| sc.deleted.iter().any(|d| p.starts_with(d)))
        .cloned()
        .collect();
    for p in &gone {
        l.forget(p);
    }
    l.add(&sc.dbs_seen);
    note_known(opts, &l);
    let t0 = Instant::now();
    *stats = l.cut_partial()?;
    let cut = t0.elapsed();
    if !stats.dropped.is_empty() {
        note_known(opts, &l);
        return Ok(false);
    }
    if !stats.pending.is_empty() {
        // Databases still being written that no cut opened yet: neither cut
        // nor shipped as files this time; offered again soon, pending in the
        // lag meanwhile.
        sc.changed.retain(|e| !stats.pending.contains(&e.path));
        sc.held.extend(stats.pending.iter().cloned());
    }
    if let Some(why) = &stats.blocked {
        // No cut this time: the databases wait for the next round (the
        // replica keeps the previous cut); the rest of the batch goes now.
        tracing::debug!("{why}");
        let dbs: BTreeSet<RelPath> = l.paths().cloned().collect();
        sc.changed.retain(|e| !dbs.contains(&e.path));
        sc.held.extend(dbs);
    }
    let have: BTreeSet<RelPath> = sc.changed.iter().map(|e| e.path.clone()).collect();
    let ix = index
        .lock()
        .map_err(|_| anyhow::anyhow!("index lock poisoned"))?;
    for p in stats.changed.iter().filter(|p| !have.contains(*p)) {
        if let (Some(e), _) = sync_core::scan::entry_at(root, p, opts, Some(&ix))? {
            sc.changed.push(e);
        }
    }
    drop(ix);
    crate::session::source::mark_databases(&mut sc.changed, &l)?;
    // The replica holds a recent cut: its pages are read now and the
    // snapshots let go before the round waits on the network.
    let t1 = Instant::now();
    l.release(false)?;
    if !stats.changed.is_empty() || stats.blocked.is_some() {
        tracing::debug!(
            cut_ms = cut.as_secs_f64() * 1e3,
            stall_ms = stats.stall.as_secs_f64() * 1e3,
            release_ms = t1.elapsed().as_secs_f64() * 1e3,
            pages_changed = stats.pages_changed,
            blocked = stats.blocked.is_some(),
            "partial round cut"
        );
    }
    Ok(true)
}

/// Tells the scanner which databases this process holds (never read raw).
pub(super) fn note_known(opts: &ScanOptions, live: &LiveSet) {
    if let Some(d) = &opts.databases
        && let Ok(mut k) = d.known.write()
    {
        *k = live.paths().cloned().collect();
    }
}

/// Whether a batch has collected long enough (100 ms from its start) at `now`.
pub(super) fn debounce_over(started: Instant, now: Instant) -> bool {
    now.saturating_duration_since(started) >= Duration::from_millis(100)
}

/// Whether a batch being collected is done before its 100 ms: after a wait
/// (`woken`) whose events were all of files held back from earlier rounds
/// (`stirred` is `Some(false)`: a large file still being written; `None`, no
/// event at all, is no reason), when it holds a path of its own (`fresh`; a
/// batch of held-back files alone would otherwise start a round every few
/// milliseconds while they are written).
pub(super) fn settled(woken: bool, stirred: Option<bool>, fresh: bool) -> bool {
    woken && stirred == Some(false) && fresh
}

/// What the replica holds after an applied partial round.
pub(super) fn fold_round(known: &mut Known, round: &Round) {
    for p in &round.deleted {
        remove_subtree(known, p);
    }
    for (a, b) in &round.renamed {
        // what moved is re-sent under its new name in the same round
        remove_subtree(known, a);
        remove_subtree(known, b);
    }
    for e in round.entries.iter() {
        if e.kind != Kind::Dir {
            remove_subtree(known, &e.path);
        }
        known.insert(e.path.clone(), e.clone());
    }
}
