//! The source's side of a push before anything is sent: the tree scanned
//! (hashes from the saved index) and its databases cut together (from the
//! saved cut state), what was learned saved back to the index.
//!
//! The databases the last run cut are cut while the tree is scanned: the
//! scan is told their paths and their files (device, inode) are databases,
//! so it never opens one with plain file I/O, under that name or another
//! (that would drop the cut's POSIX locks: `sync_core::sqlite`). The early
//! cut stands when the scan finds exactly those databases. Otherwise it is
//! let go, and the tree is scanned and cut again as without a saved state:
//! what the scan was told may be wrong (a path no longer a database, a hard
//! link, an inode used again). A database with several names is not cut
//! early (the name it is opened through comes from the scan:
//! `LiveSet::name_from`), and with no early cut the one scan stands.

use crate::DB_BUSY;
use crate::push_state::PushState;
use anyhow::{Result, anyhow, bail};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use sync_core::filter::Filter;
use sync_core::scan::{DbDetect, ScanOptions, ScanReport};
use sync_core::sqlite::{CutStats, LiveSet};
use sync_core::{Manifest, RelPath};

/// A cut, with what it did.
type Cut = (LiveSet, CutStats);

/// What [`scan_and_cut`] gives: the manifest, the scan's report, the cut,
/// and the hash index being saved (to wait for before the push ends).
pub(crate) type ScanCut = (
    Manifest,
    ScanReport,
    Arc<Mutex<LiveSet>>,
    Option<tokio::task::JoinHandle<Result<()>>>,
);

/// Scans `src` and cuts its databases (see the module docs).
pub(crate) fn scan_and_cut(
    src: &Path,
    filter: Filter,
    saved: Option<&PushState>,
    mut index: Option<sync_core::index::HashIndex>,
) -> Result<ScanCut> {
    let t0 = Instant::now();
    let mut early = LiveSet::new(src, DB_BUSY);
    if let Some(s) = saved {
        s.restore_tracking(&mut early);
    }
    use std::os::unix::fs::MetadataExt as _;
    let mut known: Vec<RelPath> = early.paths().cloned().collect();
    let mut files: Vec<(u64, u64, u64)> = known
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(sync_core::scan::abs(src, p)).ok())
        .map(|m| (m.dev(), m.ino(), m.nlink()))
        .collect();
    // A database with other names may be opened through one of them
    // (`LiveSet::name_from`), which the scan tells: no early cut.
    if files.iter().any(|&(_, _, links)| links > 1) {
        (known, files) = (Vec::new(), Vec::new());
        early = LiveSet::new(src, DB_BUSY);
    }
    let files: Vec<(u64, u64)> = files.into_iter().map(|(d, i, _)| (d, i)).collect();
    let scan = |known: &[RelPath], files: &[(u64, u64)]| {
        let detect = DbDetect::default();
        if let (Ok(mut k), Ok(mut f)) = (detect.known.write(), detect.known_files.write()) {
            k.extend(known.iter().cloned());
            f.extend(files.iter().copied());
        }
        let opts = ScanOptions {
            filter: filter.clone(),
            databases: Some(Arc::new(detect)),
            ..Default::default()
        };
        sync_core::scan::scan_with(src, &opts, index.as_ref())
    };
    let (scanned, early) = std::thread::scope(|s| {
        let cutting = (!known.is_empty()).then(|| {
            s.spawn(move || {
                let stats = early.cut();
                (early, stats)
            })
        });
        let scanned = scan(&known, &files);
        let early = cutting.map(|c| c.join().map_err(|_| anyhow!("the cut panicked")));
        (scanned, early)
    });
    let (mut m, mut report) = scanned?;
    let scan_ms = t0.elapsed().as_millis();
    let (live, stats) = match early.transpose()? {
        Some((live, Ok(stats))) if stands(&live, &stats, &report) => (live, stats),
        // no cut ran during the scan: the scan was told nothing, and stands
        None => cut(src, saved, &m, &report.databases)?,
        early => {
            tracing::debug!("the databases are not the last run's: scan and cut again");
            // its connections close before any file is opened again
            drop(early);
            (m, report) = scan(&[], &[])?;
            cut(src, saved, &m, &report.databases)?
        }
    };
    if let Some(why) = stats.blocked {
        bail!("{why}");
    }
    m.entries.retain(|e| !stats.dropped.contains(&e.path));
    crate::session::source::mark_databases(&mut m.entries, &live)?;
    let saving = index.take().map(|mut ix| {
        // what the scan freed goes back before the index grows by its rows
        sync_core::trim_heap();
        ix.remember_scan(
            std::mem::take(&mut report.hashed),
            &m,
            sync_core::scan::now_ns(),
        );
        crate::index_save::save_index(&Arc::new(Mutex::new(ix)))
    });
    tracing::debug!(
        scan_ms,
        done_ms = t0.elapsed().as_millis(),
        hashed = report.bytes_hashed,
        pages_changed = stats.pages_changed,
        "source scanned and cut"
    );
    Ok((m, report, Arc::new(Mutex::new(live)), saving))
}

/// Whether a cut taken while the tree was scanned stands: it cut exactly the
/// databases the scan found, none of them gone or no longer a database.
fn stands(live: &LiveSet, stats: &CutStats, report: &ScanReport) -> bool {
    let cut: BTreeSet<&RelPath> = live.paths().collect();
    let found: BTreeSet<&RelPath> = report.databases.iter().collect();
    stats.dropped.is_empty() && stats.pending.is_empty() && cut == found
}

/// The databases `dbs` cut together, from the saved cut state.
fn cut(src: &Path, saved: Option<&PushState>, m: &Manifest, dbs: &[RelPath]) -> Result<Cut> {
    let mut live = LiveSet::new(src, DB_BUSY);
    live.name_from(&m.entries, dbs);
    live.track(dbs);
    if let Some(s) = saved {
        s.restore(&mut live);
    }
    let stats = live.cut()?;
    Ok((live, stats))
}
