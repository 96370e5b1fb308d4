//! The replica's round engine: the synchronous phases of applying one
//! round, with no network, no tokio and no clock.
//!
//! A round, once assembled by [`proto::round::Assembler`], goes through:
//! [`check`] (before anything is made), [`keep`] (excluded entries dropped),
//! [`prepare`] (renames, explicit deletions, the replica's own scan, the plan),
//! [`make`] (the plan's deletions, directories, other entries), contents
//! ([`write_whole`] for content at hand; the agent pulls the rest over
//! QUIC, the tests' [`content::Loopback`] reads it from the source tree),
//! [`finish`] (renames into place, links, metadata, directories, durability),
//! and [`verify`] when the round asks for the replica's root hash.

mod check;
pub mod content;
pub mod leftovers;
pub mod prescan;

pub use check::{RoundError, check};
pub use leftovers::{Leftovers, Sweep};
pub use prescan::{Prescan, prescan, same};

use crate::apply::Replica;
use crate::filter::Filter;
use crate::idmap::{Direction, IdMap};
use crate::plan::Plan;
use crate::scan::{DbDetect, ScanOptions};
use crate::{Error, Manifest};
use proto::round::Incoming;
use proto::{ApplySummary, Entry, Kind, RelPath};
use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt as _;
use std::sync::Arc;

/// A received round, its entries as a manifest.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// Round number.
    pub id: u64,
    /// Whether `src` is the whole tree.
    pub full: bool,
    /// Compare regular files by content hash (full rounds; partial rounds always do).
    pub checksum: bool,
    /// Report the replica's root hash after the round.
    pub verify: bool,
    /// The round's entries.
    pub src: Manifest,
    /// Paths removed.
    pub deleted: Vec<RelPath>,
    /// Renames, applied first.
    pub renamed: Vec<(RelPath, RelPath)>,
    /// Content that came with the round, by entry index.
    pub inline: HashMap<u64, Vec<u8>>,
    /// The source's root hash after the round.
    pub root_hash: [u8; 32],
}

impl From<Incoming> for Round {
    fn from(r: Incoming) -> Self {
        Self {
            id: r.id,
            full: r.full,
            checksum: r.checksum,
            verify: r.verify,
            src: Manifest { entries: r.entries },
            deleted: r.deleted,
            renamed: r.renamed,
            inline: r.inline,
            root_hash: r.root_hash,
        }
    }
}

impl Round {
    /// Whether files are compared by content: a partial round (a few paths)
    /// always does; a full round when asked (rsync -c), by size and mtime
    /// otherwise, as rsync does.
    #[must_use]
    pub fn compares_content(&self) -> bool {
        self.checksum || !self.full
    }

    /// The entries' owners and ACL qualifiers mapped to this host's ids
    /// (`uid_map`, `gid_map`), once [`check`] has matched the source's root
    /// hash on them as sent: the plan then compares this host's ids with its
    /// tree.
    pub fn map_ids(&mut self, ids: &IdMap) {
        if ids.is_empty() {
            return;
        }
        for e in &mut self.src.entries {
            e.meta = ids.meta(&e.meta, Direction::ToLocal);
        }
    }
}

/// Drops excluded entries: the planned manifest, and for each of its entries
/// its index in the round (which the source serves). The round's manifest
/// is taken and filtered in place: a copy beside it held every entry twice
/// for the whole round (a first mirror of 300,000 files: ~60 MB).
#[must_use]
pub fn keep(mut src: Manifest, filter: &Filter) -> (Vec<usize>, Manifest) {
    let mut kept = Vec::with_capacity(src.entries.len());
    let mut i = 0;
    src.entries.retain(|e| {
        let keep = !filter.excludes(&e.path, e.kind == Kind::Dir);
        if keep {
            kept.push(i);
        }
        i += 1;
        keep
    });
    (kept, src)
}

/// What [`prepare`] needs besides the replica and the planned manifest.
#[derive(Debug)]
pub struct Prepare<'a> {
    /// Excludes (never written, never deleted).
    pub filter: &'a Filter,
    /// How databases are told.
    pub detect: Arc<DbDetect>,
    /// Whether the round is full.
    pub full: bool,
    /// Whether files are compared by content.
    pub checksum: bool,
    /// The round's renames.
    pub renamed: &'a [(RelPath, RelPath)],
    /// The round's deletions.
    pub deleted: &'a [RelPath],
    /// What a full round does with excluded leftovers.
    pub sweep: &'a Sweep,
}

/// What [`prepare`] found: the replica's own manifest, the plan, and on a
/// full round the excluded leftovers.
#[derive(Debug)]
pub struct Prepared {
    /// The replica's own entries (of the tree, or of the planned paths).
    pub dst: Manifest,
    /// From them to the planned manifest.
    pub plan: Plan,
    /// Excluded paths present on the replica (full rounds).
    pub leftovers: Option<Leftovers>,
}

/// Renames and explicit deletions (excluded paths left alone), then the
/// replica's own manifest (a scan of the tree for a full round, or the
/// [`Prescan`] made ahead of it when the round compares by size and mtime; of
/// the planned paths for a partial one; a full round sweeps or counts
/// excluded leftovers), and the plan from it to `s`.
pub fn prepare(
    r: &Replica,
    s: &Manifest,
    p: &Prepare<'_>,
    prescanned: Option<Prescan>,
    sum: &mut ApplySummary,
) -> Result<Prepared, Error> {
    // a database whose other names are the round's links is written in place
    r.note_db_names(s);
    let f = p.filter;
    let opts = ScanOptions {
        hash: p.checksum,
        hard_links: false,
        filter: f.clone(),
        databases: Some(p.detect.clone()),
        on_dir: None,
    };
    // Excludes are matched with the replica's own kind of the entry.
    let excluded = |path: &RelPath| {
        let is_dir = std::fs::symlink_metadata(crate::scan::abs(r.root_path(), path))
            .map(|m| m.is_dir())
            .unwrap_or(false);
        f.excludes(path, is_dir)
    };
    for (from, to) in p
        .renamed
        .iter()
        .filter(|(a, b)| !excluded(a) && !excluded(b))
    {
        r.rename(from, to);
    }
    // Excluded and overlay entries are never deleted, not even with their
    // parent: a directory holding one is emptied of the rest and kept.
    let keep = |path: &RelPath, is_dir: bool| f.excludes(path, is_dir);
    for path in p.deleted.iter().filter(|path| !excluded(path)) {
        if !r.remove_all_but(path, &keep)? {
            tracing::info!("{path}: kept, it holds excluded or overlay entries");
        }
        sum.entries_deleted += 1;
    }
    let mut leftovers = None;
    let (dst, linked) = if p.full {
        let (dst, report) = match prescanned.filter(|_| !p.checksum && p.renamed.is_empty()) {
            Some(pre) if p.deleted.is_empty() => (pre.dst, pre.report),
            _ => crate::scan::scan_with(r.root_path(), &opts, None)?,
        };
        let swept = r.sweep_temps(&report.temp_files)?;
        if swept > 0 {
            tracing::info!(swept, "removed temp files left by an interrupted run");
        }
        let found = leftovers::sweep_or_count(r, &report.excluded, &p.detect, p.sweep)?;
        sum.entries_deleted += found.swept;
        leftovers = Some(found);
        (dst, report.multi_linked)
    } else {
        own_entries(r, s, &opts)?
    };
    let plan = crate::plan::plan_with_links(s, &dst, p.checksum, &linked);
    Ok(Prepared {
        dst,
        plan,
        leftovers,
    })
}

/// The replica's own entries at the planned paths of a partial round, and
/// which of them have other links.
fn own_entries(
    r: &Replica,
    s: &Manifest,
    opts: &ScanOptions,
) -> Result<(Manifest, std::collections::HashSet<RelPath>), Error> {
    let mut linked = std::collections::HashSet::new();
    let mut entries = Vec::with_capacity(s.entries.len());
    for e in &s.entries {
        // Only through real directories: a symlinked parent (planted by an
        // earlier round) is never looked through, so nothing outside the root
        // is stat'ed or hashed; the entry counts as absent.
        if let Some((parent, _)) = e.path.split_last()
            && r.dir(&parent).is_err()
        {
            continue;
        }
        let (d, report) = crate::scan::entry_at(r.root_path(), &e.path, opts, None)?;
        linked.extend(report.multi_linked);
        entries.extend(d);
    }
    Ok((Manifest { entries }, linked))
}

/// The plan's deletions (excluded and overlay entries kept), then its
/// directories and its other entries (links, specials).
pub fn make(
    r: &Replica,
    s: &Manifest,
    plan: &mut Plan,
    filter: &Filter,
    sum: &mut ApplySummary,
) -> Result<(), Error> {
    make_early(r, s, plan, filter, sum)?;
    sum.others_created += make_rest(r, s, &plan.mkdir, &plan.create)?;
    Ok(())
}

/// What the round's databases need before their transfer begins: the
/// plan's deletions (excluded and overlay entries kept), then the
/// directories they lie in. Those leave `plan.mkdir`; [`make_rest`] makes
/// the others, while a large database arrives.
pub fn make_early(
    r: &Replica,
    s: &Manifest,
    plan: &mut Plan,
    filter: &Filter,
    sum: &mut ApplySummary,
) -> Result<(), Error> {
    let keep = |p: &RelPath, is_dir: bool| filter.excludes(p, is_dir);
    delete_keeping(r, s, plan, &keep, sum)?;
    let mut above = std::collections::HashSet::new();
    for &i in &plan.dbs {
        let mut p = s.entries[i].path.clone();
        while let Some((parent, _)) = p.split_last() {
            if !above.insert(parent.clone()) {
                break;
            }
            p = parent;
        }
    }
    let (early, rest) = std::mem::take(&mut plan.mkdir)
        .into_iter()
        .partition::<Vec<usize>, _>(|&i| above.contains(&s.entries[i].path));
    make_dirs(r, s, &early)?;
    sum.others_created += early.len() as u64;
    plan.mkdir = rest;
    Ok(())
}

/// The rest of [`make`] after [`make_early`]: the directories `mkdir`,
/// then the other entries `create` (links, specials); how many were made.
pub fn make_rest(
    r: &Replica,
    s: &Manifest,
    mkdir: &[usize],
    create: &[usize],
) -> Result<u64, Error> {
    make_dirs(r, s, mkdir)?;
    for &i in create {
        r.create(&s.entries[i])?;
    }
    Ok((mkdir.len() + create.len()) as u64)
}

/// Writes whole contents of planned entries (`(index in s, content)`),
/// staged and checked against their hash: `(files, bytes)` written.
pub fn write_whole(
    r: &Replica,
    s: &Manifest,
    contents: Vec<(usize, Vec<u8>)>,
) -> Result<(u64, u64), Error> {
    let (mut files, mut bytes) = (0, 0);
    for (i, data) in contents {
        let e = &s.entries[i];
        let Kind::File { hash, .. } = e.kind else {
            continue;
        };
        let mut staged = r.stage(&e.path)?.sized(data.len() as u64);
        staged.write(&data)?;
        staged.commit(&hash, &e.meta)?;
        files += 1;
        bytes += data.len() as u64;
    }
    Ok((files, bytes))
}

/// Renames into place, links, metadata, directories, durability; the
/// replica's warnings and held databases go into the summary.
pub fn finish(
    r: &Replica,
    s: &Manifest,
    plan: &Plan,
    dst: &Manifest,
    mut summary: ApplySummary,
) -> Result<ApplySummary, Error> {
    let t0 = std::time::Instant::now();
    r.flush()?;
    let flushed = t0.elapsed();
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
    let t1 = std::time::Instant::now();
    finish_dirs(r, s, &plan.dirs, dst)?;
    let dirs = t1.elapsed();
    r.finish()?;
    tracing::debug!(
        flush_ms = flushed.as_millis() as u64,
        dirs = plan.dirs.len(),
        dirs_ms = dirs.as_millis() as u64,
        total_ms = t0.elapsed().as_millis() as u64,
        "round finished"
    );
    summary.warnings = r.take_warnings();
    summary.held = r.take_held();
    Ok(summary)
}

/// Sets the metadata of the directories `dirs` (deepest first): those of
/// one depth on every core, depth by depth, so that no directory's mode is
/// set before what lies below it is done (setting a directory's metadata does
/// not move its parent's mtime). A first mirror has 16,800.
fn finish_dirs(r: &Replica, s: &Manifest, dirs: &[usize], dst: &Manifest) -> Result<(), Error> {
    use rayon::prelude::*;
    let deepest_first = deepest_first(s, dirs);
    for level in deepest_first.chunk_by(|a, b| a.0 == b.0) {
        level.par_iter().try_for_each(|&(_, i)| {
            let e = &s.entries[i];
            r.finish_dir(e, dst.get(&e.path).map(|(_, d)| &d.meta))
        })?;
    }
    Ok(())
}

/// Makes the directories `dirs` (indices in `s`) depth by depth, each depth
/// on every core: a directory after its parent, whatever order `dirs` lists
/// them in (a first mirror of 16,800 directories made one by one kept one
/// core busy for ~0.5 s while the source waited).
fn make_dirs(r: &Replica, s: &Manifest, dirs: &[usize]) -> Result<(), Error> {
    use rayon::prelude::*;
    let mut shallowest_first = deepest_first(s, dirs);
    shallowest_first.reverse();
    for level in shallowest_first.chunk_by(|a, b| a.0 == b.0) {
        level
            .par_iter()
            .try_for_each(|&(_, i)| r.mkdir(&s.entries[i].path))?;
    }
    Ok(())
}

/// `(depth, index)` of the directories `dirs`, the deepest first (a
/// directory after everything below it; `dirs`' order kept within a depth).
fn deepest_first(s: &Manifest, dirs: &[usize]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = dirs
        .iter()
        .map(|&i| (s.entries[i].path.depth(), i))
        .collect();
    out.sort_by_key(|&(depth, _)| std::cmp::Reverse(depth));
    out
}

/// What a verified round found on the replica after it.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    /// The replica's root hash, from a fresh scan.
    pub root: [u8; 32],
    /// The first differences from the planned manifest.
    pub differences: Vec<String>,
    /// Databases another process holds open, with the holders.
    pub held_by: Vec<(RelPath, String)>,
}

/// The replica's own root hash after a round (its owners and ACL
/// qualifiers mapped back to the source's ids by `ids`, so that it is the
/// source's), what differs from `planned`, and which databases another
/// process holds open (a handover's preflight refuses on it).
pub fn verify(
    r: &Replica,
    detect: Arc<DbDetect>,
    filter: Filter,
    planned: &Manifest,
    ids: &IdMap,
) -> Result<Verified, Error> {
    let (own, dbs) = own_manifest(r, detect, filter)?;
    let own = without_kept_dirs(own, planned);
    let held_by = dbs
        .into_iter()
        .filter_map(|p| r.db_holders(&p).map(|who| (p, who)))
        .collect();
    // Say what differs, so that a failed cut explains itself.
    let differences = crate::manifest::diff(planned, &own)
        .iter()
        .take(5)
        .map(|d| format!("after the cut: {d}"))
        .collect();
    let root = if ids.is_empty() {
        own.root_hash()
    } else {
        let entries = own.entries.iter().map(|e| Entry {
            meta: ids.meta(&e.meta, Direction::ToRemote),
            ..e.clone()
        });
        Manifest {
            entries: entries.collect(),
        }
        .root_hash()
    };
    Ok(Verified {
        root,
        differences,
        held_by,
    })
}

/// Adds what [`verify`] found to the round's summary: the root hash, each
/// held database with its holders (once, and a warning for people), and on a
/// full round the differences.
pub fn add_verified(summary: &mut ApplySummary, v: Verified, full: bool) {
    summary.root_hash = Some(v.root);
    for (path, holders) in v.held_by {
        summary
            .warnings
            .push(format!("held open on the replica: {path}: {holders}"));
        if !summary.held.iter().any(|h| h.path == path) {
            summary.held.push(proto::HeldDb { path, holders });
        }
    }
    if full {
        summary.warnings.extend(v.differences);
    }
}

/// Removes what the plan deletes, keeping excluded and overlay entries
/// (`keep`); a type change that would destroy them is refused for that path
/// with a warning and dropped from the plan, so the rest of the round applies.
pub fn delete_keeping(
    r: &Replica,
    s: &Manifest,
    plan: &mut Plan,
    keep: &dyn Fn(&RelPath, bool) -> bool,
    sum: &mut ApplySummary,
) -> Result<(), Error> {
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
pub fn without_kept_dirs(own: Manifest, planned: &Manifest) -> Manifest {
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
pub fn own_manifest(
    r: &Replica,
    detect: Arc<DbDetect>,
    filter: Filter,
) -> Result<(Manifest, Vec<RelPath>), Error> {
    let opts = ScanOptions {
        databases: Some(detect),
        filter,
        ..Default::default()
    };
    let (mut m, report) = crate::scan::scan_with(r.root_path(), &opts, None)?;
    for p in &report.databases {
        let table = r.page_table(p)?;
        if let (Some(i), Some(h)) = (m.entries.iter().position(|e| &e.path == p), table) {
            m.entries[i].kind = Kind::Database {
                page_size: h.page_size,
                pages: h.hashes.len() as u32,
                hash: h.hash,
            };
        }
    }
    Ok((m, report.databases))
}

#[cfg(test)]
mod pair;
#[cfg(test)]
mod pair_tests;
#[cfg(test)]
mod pair_tests_digest;
#[cfg(test)]
mod pair_tests_excluded;
#[cfg(test)]
mod unit_tests;
