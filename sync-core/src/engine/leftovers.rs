//! Excluded leftovers: paths a folder's excludes match that are present on
//! the replica (mirrored before the exclude was added, or the standby's own).
//! A full round's own scan meets them (never an extra walk); with
//! `delete_excluded` they are removed (rsync's `--delete-excluded`), else
//! counted for status. Overlays are each host's own and never swept, nor are
//! the side files of SQLite databases (`-wal`, `-shm`: a `*.db-shm` exclude
//! must not pull the index from under a process that has the database open).

use crate::apply::Replica;
use crate::filter::Filter;
use crate::scan::DbDetect;
use crate::{Error, RelPath};

/// At most this many leftovers are named.
pub const NAMED: usize = 5;

/// What a full round found excluded on the replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Excluded paths present after the round (the topmost of each subtree).
    pub count: u64,
    /// The first of them.
    pub first: Vec<RelPath>,
    /// Excluded paths removed by the round.
    pub swept: u64,
}

/// How a folder treats its excluded leftovers.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    /// Remove them (`delete_excluded`).
    pub delete: bool,
    /// The folder's overlays, as excludes: never removed.
    pub overlays: Filter,
}

/// Sweeps (with `sweep.delete`) or counts the excluded paths a full round's
/// scan met (`excluded`: path and whether a directory).
pub fn sweep_or_count(
    r: &Replica,
    excluded: &[(RelPath, bool)],
    detect: &DbDetect,
    sweep: &Sweep,
) -> Result<Leftovers, Error> {
    let root = r.root_path().to_path_buf();
    let keep = |p: &RelPath, is_dir: bool| {
        sweep.overlays.excludes(p, is_dir) || (!is_dir && detect.is_sidecar(&root, p))
    };
    let mut out = Leftovers::default();
    for (p, is_dir) in excluded.iter().filter(|(p, d)| !keep(p, *d)) {
        if sweep.delete {
            if r.remove_all_but(p, &keep)? {
                out.swept += 1;
                tracing::info!("{p}: excluded, removed from the replica (delete_excluded)");
                continue;
            }
            // A directory kept for an overlay inside: not a leftover itself.
            if *is_dir {
                continue;
            }
        }
        out.count += 1;
        if out.first.len() < NAMED {
            out.first.push(p.clone());
        }
    }
    Ok(out)
}
