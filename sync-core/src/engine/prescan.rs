//! The replica's scan made ahead of a session's first full round, while the
//! source scans its own tree: the round's [`super::prepare`] takes it instead
//! of scanning again, and its quick digest ([`crate::digest`]) goes to the
//! source, which sends `RoundSame` instead of its manifest when its own tree
//! has the same one ([`same`]).

use super::leftovers::{self, Leftovers, Sweep};
use crate::apply::Replica;
use crate::filter::Filter;
use crate::idmap::IdMap;
use crate::index::HashIndex;
use crate::scan::{DbDetect, DirHook, ScanOptions, ScanReport};
use crate::{Error, Manifest};
use proto::{ApplySummary, Kind, RelPath};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The replica's own tree, scanned ahead.
#[derive(Debug)]
pub struct Prescan {
    /// Its entries as a full round's scan has them (every name of a
    /// multi-linked file a file of its own, databases as files).
    pub dst: Manifest,
    /// What the scan met besides.
    pub report: ScanReport,
    /// The quick digest of the tree, in the source's terms (links as
    /// [`Kind::HardLink`], databases by the page hash held); `None` when a
    /// full round would do something the digest cannot show: a temp file or
    /// an excluded leftover to sweep, a database with no page table or with
    /// other names, a file linked from outside the tree, owners mapped by
    /// the folder's id maps (the tree's owners are this host's, the
    /// source's digest has its own).
    pub digest: Option<[u8; 32]>,
}

/// Scans the replica's tree (no content hashes) and takes its quick digest;
/// `index` (kept from the last scan ahead) spares listing the xattrs of files
/// whose stamps it holds as bare, and learns this scan's; `on_dir` is called
/// before each directory is listed (the agent watches it).
pub fn prescan(
    r: &Replica,
    filter: &Filter,
    detect: Arc<DbDetect>,
    sweep: &Sweep,
    ids: &IdMap,
    index: Option<&std::sync::Mutex<HashIndex>>,
    on_dir: Option<DirHook>,
) -> Result<Prescan, Error> {
    let opts = ScanOptions {
        hash: false,
        hard_links: true,
        filter: filter.clone(),
        databases: Some(detect.clone()),
        on_dir,
    };
    let t0 = std::time::Instant::now();
    let mut index = index.and_then(|m| m.lock().ok());
    let (mut dst, report) = crate::scan::scan_with(r.root_path(), &opts, index.as_deref())?;
    if let Some(ix) = index.as_deref_mut() {
        ix.remember_stamps(&dst.entries, &report.stamps, crate::scan::now_ns());
    }
    drop(index);
    let scanned = t0.elapsed();
    let comparable = ids.is_empty() && links_inside(&dst, &report);
    let digest = if comparable && nothing_to_sweep(r, &report, &detect, sweep) {
        database_kinds(r, &report)?
            .map(|kinds| crate::digest::quick_root_with(&dst.entries, &kinds))
    } else {
        None
    };
    tracing::debug!(
        entries = dst.entries.len(),
        scan_ms = scanned.as_millis(),
        digest_ms = (t0.elapsed() - scanned).as_millis(),
        offered = digest.is_some(),
        databases_read = r.databases_read(),
        "replica scanned ahead"
    );
    // The plan compares each name as a file of its own (as a full round's
    // scan has them).
    let files: HashMap<RelPath, Kind> = dst
        .entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::File { .. }) && report.multi_linked.contains(&e.path))
        .map(|e| (e.path.clone(), e.kind.clone()))
        .collect();
    for e in &mut dst.entries {
        if let Kind::HardLink { target } = &e.kind
            && let Some(k) = files.get(target)
        {
            e.kind = k.clone();
        }
    }
    Ok(Prescan {
        dst,
        report,
        digest,
    })
}

/// Whether a full round would sweep nothing: no temp file, no excluded
/// leftover to remove.
fn nothing_to_sweep(r: &Replica, report: &ScanReport, detect: &DbDetect, sweep: &Sweep) -> bool {
    if !report.temp_files.is_empty() {
        return false;
    }
    if !sweep.delete {
        return true;
    }
    let root = r.root_path();
    report.excluded.iter().all(|(p, is_dir)| {
        sweep.overlays.excludes(p, *is_dir) || (!is_dir && detect.is_sidecar(root, p))
    })
}

/// Whether every multi-linked file has all its names in the tree (a leader
/// of the names recorded as links, or one of them): a file linked from
/// outside is rewritten by every full round, which the digest cannot show.
fn links_inside(dst: &Manifest, report: &ScanReport) -> bool {
    let mut leaders: HashSet<&RelPath> = HashSet::new();
    let mut linked: HashSet<&RelPath> = HashSet::new();
    for e in &dst.entries {
        if let Kind::HardLink { target } = &e.kind {
            leaders.insert(target);
            linked.insert(&e.path);
        }
    }
    report
        .multi_linked
        .iter()
        .all(|p| leaders.contains(p) || linked.contains(p))
}

/// Each database's kind as the source would send it, from the page table the
/// replica holds; `None` when one has none or has other names.
fn database_kinds(
    r: &Replica,
    report: &ScanReport,
) -> Result<Option<HashMap<RelPath, Kind>>, Error> {
    let mut kinds = HashMap::new();
    for p in &report.databases {
        if report.multi_linked.contains(p) {
            return Ok(None);
        }
        let Some(t) = r.page_table(p)? else {
            return Ok(None);
        };
        let Ok(pages) = u32::try_from(t.hashes.len()) else {
            return Ok(None);
        };
        kinds.insert(
            p.clone(),
            Kind::Database {
                page_size: t.page_size,
                pages,
                hash: t.hash,
            },
        );
    }
    Ok(Some(kinds))
}

/// A full round with nothing to do (`RoundSame`): checks the source's digest
/// against the prescan's, puts back the mtimes of directories the prescan's
/// database reads touched, and counts the excluded leftovers.
pub fn same(
    r: &Replica,
    pre: &Prescan,
    digest: &[u8; 32],
    detect: &DbDetect,
    sweep: &Sweep,
) -> Result<(ApplySummary, Leftovers), Error> {
    if pre.digest.as_ref() != Some(digest) {
        return Err(Error::invalid(
            r.root_path().display(),
            "the source says the trees are the same, but this replica's scan differs",
        ));
    }
    for dir in r.touched_dirs() {
        if let Some((_, e)) = pre.dst.get(&dir) {
            r.set_meta(e)?;
        }
    }
    let found = leftovers::sweep_or_count(r, &pre.report.excluded, detect, sweep)?;
    Ok((ApplySummary::default(), found))
}
