//! The name a database with several names in the tree is opened through.
//!
//! A manifest names an inode by its first name and makes the others links
//! to it (`scan`), the same on both ends. SQLite, though, keeps a database's
//! log, its lock file and its hot journal by the name the database was
//! opened with: a cut through another name would miss the log's commits,
//! and its read lock would not hold off the application's checkpoints (a
//! torn copy). So the cut opens the first name with a `-wal`, `-journal` or
//! `-shm` beside it (the one the application uses), else the first.

use super::conn::side_path;
use super::live::LiveSet;
use crate::{Entry, Kind, RelPath};
use std::collections::BTreeMap;

impl LiveSet {
    /// Learns, from a manifest's links to the databases `dbs` (a scan's,
    /// sorted), the name each database with several names is opened
    /// through; a database held through another name than that is let go
    /// (its next cut opens the right one). Call before [`LiveSet::track`].
    pub fn name_from(&mut self, entries: &[Entry], dbs: &[RelPath]) {
        let mut names: BTreeMap<&RelPath, Vec<&RelPath>> = BTreeMap::new();
        for e in entries {
            if let Kind::HardLink { target } = &e.kind
                && dbs.binary_search(target).is_ok()
            {
                names.entry(target).or_default().push(&e.path);
            }
        }
        let mut opened_as = BTreeMap::new();
        for (first, others) in names {
            let beside = |p: &RelPath| {
                let db = crate::scan::abs(self.root(), p);
                ["-wal", "-journal", "-shm"]
                    .iter()
                    .any(|s| side_path(&db, s).symlink_metadata().is_ok())
            };
            let used = std::iter::once(first).chain(others).find(|p| beside(p));
            if let Some(used) = used.filter(|&u| u != first) {
                opened_as.insert(first.clone(), used.clone());
            }
        }
        let moved: Vec<RelPath> = self
            .paths()
            .filter(|p| self.opened_as.get(*p) != opened_as.get(*p))
            .cloned()
            .collect();
        for p in moved {
            self.forget(&p);
        }
        self.opened_as = opened_as;
    }
}
