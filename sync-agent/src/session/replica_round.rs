//! The replica side of a session: reading a round from the peer and applying it.

use super::PARALLEL_FILES;
use super::replica::*;
use super::replica_fetch::{fetch_db, fetch_file};
use crate::wire;
use anyhow::{Context, Result, bail};
use proto::round::{Assembler, Event};
use proto::{ApplySummary, Entry, Kind, RelPath};
use std::os::unix::ffi::OsStrExt as _;
use std::sync::Arc;
use sync_core::Manifest;
use sync_core::apply::Replica;
use sync_core::filter::Filter;
use sync_core::scan::{DbDetect, ScanOptions};
use tokio::sync::Semaphore;

/// The next round, or a promotion request (its epoch), or the end. The
/// messages go through [`Assembler`], which checks their order, the round's
/// bounds and its end; this glue adds the time bound, growing with what the
/// round carried.
pub(super) async fn read_round(
    ctl: &mut quinn::RecvStream,
    activity: &Activity,
) -> Result<Option<std::result::Result<Incoming, u64>>> {
    let Some(first) = wire::recv(ctl).await? else {
        return Ok(None);
    };
    activity.touch();
    let mut asm = Assembler::new();
    let mut event = asm.handle(first)?;
    let id = asm.round_id().unwrap_or_default();
    let (mut stage, mut timed) = (wire::Stage::new(format!("round {id}"), 0), 0);
    loop {
        match event {
            Some(Event::Round(r)) => return Ok(Some(Ok(r))),
            Some(Event::Promote { epoch }) => return Ok(Some(Err(epoch))),
            None => {}
        }
        stage.grow(asm.timed_bytes().saturating_sub(timed));
        timed = asm.timed_bytes();
        let msg = stage.expect(ctl, "the rest of the round").await?;
        activity.touch();
        event = asm.handle(msg)?;
    }
}

pub(super) async fn apply_round(
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
pub(super) fn delete_keeping(
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
pub(super) fn without_kept_dirs(own: Manifest, planned: &Manifest) -> Manifest {
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
pub(super) fn own_manifest(
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
