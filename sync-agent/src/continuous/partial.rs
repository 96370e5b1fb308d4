//! Partial rounds: a debounced batch of watch events turned into a round
//! (changed entries, deletions, renames, and the cut of the databases).

use super::*;

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
pub(super) fn still_hot(root: &Path, p: &RelPath, since: Option<&Instant>, now_ns: i128) -> bool {
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

/// Builds a partial round from a batch.
#[allow(clippy::too_many_arguments)]
pub(super) fn partial_round(
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
        *stats = l.cut_partial()?;
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
pub(super) fn note_known(opts: &ScanOptions, live: &LiveSet) {
    if let Some(d) = &opts.databases
        && let Ok(mut k) = d.known.write()
    {
        *k = live.paths().cloned().collect();
    }
}
