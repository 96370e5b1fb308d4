//! The walk near the root, on every core: a directory's own children are
//! stat'ed first, then its subdirectories' subtrees are walked as tasks (each
//! by a walker of its own, opened from the directory's descriptor). Once the
//! walk is done they are put back after their directories' entries, each
//! entry moved once ([`Walker::flatten`]), so the manifest is the one a
//! single walk gives. Further names of an inode become links afterwards, in
//! manifest order ([`Walker::link_names`]).

use super::{Walker, abs, vanished};
use crate::index::Stamp;
use crate::{Error, Kind, RelPath, fsat};
use proto::Entry;
use rayon::prelude::*;
use rustix::fd::{AsFd, OwnedFd};

/// A walk's entries in manifest order, put together once.
struct Flat {
    entries: Vec<Entry>,
    stamps: Vec<Option<Stamp>>,
    links: Vec<(usize, (u64, u64))>,
    /// Entries moved when the heap was last trimmed.
    trimmed: usize,
}

/// Entries moved between two trims of the heap while the walk's subtrees are
/// put together (~10 MB of them with their stamps).
const TRIM_EVERY: usize = 50_000;

/// Subdirectories of directories shallower than this are walked as tasks
/// (a tree's bulk is rarely right below its root).
pub(super) const DEPTH: usize = 3;

/// Threads that walk at once, at most: each holds up to
/// [`super::FD_DEPTH`] directories open, and a tree as deep as a local user
/// cares to make must not run a many-core host out of descriptors.
pub(super) const THREADS: usize = 4;

// Half of the common default limit of 1,024 descriptors at most.
const _: () = assert!(THREADS * super::FD_DEPTH <= 512);

/// The walk's own threads (not the global pool's, one per core); `None`
/// when none could be made.
pub(super) fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores.clamp(1, THREADS))
            .thread_name(|i| format!("scan-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// Files hashed at once by a scan, at most: a file not in the page cache
/// keeps its thread waiting for the disk, so more files than cores are read
/// at once (measured on a first push of the `large` corpus, its files half
/// out of the cache: two threads spent 0.38 of their 0.8 s waiting).
pub(super) const HASH_THREADS: usize = 8;

/// The scan's hashing threads (`None` when none could be made: the global
/// pool hashes).
pub(super) fn hash_pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(HASH_THREADS)
            .thread_name(|i| format!("hash-{i}"))
            .build()
            .ok()
    })
    .as_ref()
}

/// The path of `name` in `dir` (an error names it when it is no path).
pub(super) fn child(dir: &RelPath, name: &[u8]) -> Result<RelPath, Error> {
    dir.join(name).map_err(|e| {
        Error::invalid(
            format!("{}/{}", dir, String::from_utf8_lossy(name)),
            e.to_string(),
        )
    })
}

impl Walker<'_> {
    /// [`Walker::walk`] on the walk's pool (with no pool, one walks).
    pub(super) fn walk_pooled(&mut self, dir: &RelPath) -> Result<(), Error> {
        match pool() {
            Some(pool) => pool.install(|| self.walk(dir)),
            None => {
                self.parallel = false;
                self.walk(dir)
            }
        }
    }

    /// [`Walker::walk_dir`] with `dir`'s subtrees walked in parallel.
    pub(super) fn walk_dir_par(
        &mut self,
        dir: &RelPath,
        fd: OwnedFd,
        names: &fsat::Names,
    ) -> Result<(), Error> {
        // (where its subtree goes, its path, its name's index)
        let mut subdirs = Vec::new();
        for i in 0..names.len() {
            let (name, cname) = names.get(i);
            let path = child(dir, name)?;
            if self.visit_at(fd.as_fd(), &path, cname)? == Some(true) {
                subdirs.push((self.entries.len(), path, i));
            }
        }
        if subdirs.is_empty() {
            return Ok(());
        }
        let (root, opts, index, parent) = (&self.root, self.opts, self.index, fd.as_fd());
        let subs = subdirs
            .into_par_iter()
            .map(|(at, path, i)| {
                let mut w = Walker::with_capacity(root, opts, index, 0);
                let (_, cname) = names.get(i);
                match fsat::open_dir_at(parent, cname) {
                    Ok(child) => w.walk_dir(&path, child)?,
                    // replaced since its stat: the next scan sees what took its place
                    Err(e) if vanished(&e) => {}
                    Err(e) => {
                        return Err(Error::io("open directory", abs(root, &path).display(), e));
                    }
                }
                Ok((at, w))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        for (at, mut w) in subs {
            self.temp_files.append(&mut w.temp_files);
            self.multi_linked
                .extend(std::mem::take(&mut w.multi_linked));
            self.databases.append(&mut w.databases);
            self.excluded.append(&mut w.excluded);
            self.pending.push((at, w));
        }
        Ok(())
    }

    /// Puts the subtrees walked apart in place among the entries, each
    /// entry moved once, when there are any.
    pub(super) fn flatten(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let total = self.count();
        let mut flat = Flat {
            entries: Vec::with_capacity(total),
            stamps: Vec::with_capacity(total),
            links: Vec::new(),
            trimmed: 0,
        };
        let me = Walker {
            entries: std::mem::take(&mut self.entries),
            stamps: std::mem::take(&mut self.stamps),
            links: std::mem::take(&mut self.links),
            pending: std::mem::take(&mut self.pending),
            ..Walker::with_capacity(&self.root, self.opts, self.index, 0)
        };
        me.flatten_into(&mut flat);
        (self.entries, self.stamps, self.links) = (flat.entries, flat.stamps, flat.links);
    }

    /// Entries with those of the subtrees walked apart.
    fn count(&self) -> usize {
        self.entries.len() + self.pending.iter().map(|(_, w)| w.count()).sum::<usize>()
    }

    /// Appends this walker's entries to `out`, each subtree walked apart
    /// before the entry it was found in front of. Every [`TRIM_EVERY`]
    /// entries moved, the pages the subtrees' freed lists held go back to
    /// the system: they are small blocks glibc keeps, and the whole list
    /// built beside them peaked at twice its size (300,000 files: 60 MB more).
    fn flatten_into(self, out: &mut Flat) {
        let mut pending = self.pending.into_iter().peekable();
        let mut links = self.links.into_iter().peekable();
        for (i, (e, s)) in self.entries.into_iter().zip(self.stamps).enumerate() {
            while let Some((_, sub)) = pending.next_if(|(at, _)| *at == i) {
                sub.flatten_into(out);
            }
            if let Some((_, key)) = links.next_if(|(l, _)| *l == i) {
                out.links.push((out.entries.len(), key));
            }
            out.entries.push(e);
            out.stamps.push(s);
        }
        for (_, sub) in pending {
            sub.flatten_into(out);
        }
        // this walker's lists are freed here, when `out` moved past them
        if out.entries.len() >= out.trimmed + TRIM_EVERY {
            out.trimmed = out.entries.len();
            crate::trim_heap();
        }
    }

    /// Makes every name of a multi-linked inode after its first (in
    /// manifest order) a link to the first, and puts the lists the walk
    /// kept in manifest order. (A database is opened through another of its
    /// names when that is the one SQLite uses: `sqlite::LiveSet::name_from`.)
    pub(super) fn link_names(&mut self) {
        self.temp_files.sort_unstable();
        self.databases.sort_unstable();
        self.excluded.sort_unstable();
        let mut first: foldhash::HashMap<(u64, u64), RelPath> = Default::default();
        let mut linked = Vec::new();
        for (i, key) in std::mem::take(&mut self.links) {
            let e = &mut self.entries[i];
            match first.get(&key) {
                Some(target) => {
                    e.kind = Kind::HardLink {
                        target: target.clone(),
                    };
                    self.stamps[i] = None;
                    linked.push(e.path.clone());
                }
                None => {
                    first.insert(key, e.path.clone());
                }
            }
        }
        // A further name is a link, never a database of its own.
        if !linked.is_empty() {
            linked.sort_unstable();
            self.databases.retain(|p| linked.binary_search(p).is_err());
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The walk's threads are capped: each may hold a deep tree's directories
    /// open, and a many-core host must not run out of descriptors.
    #[test]
    fn the_walk_runs_on_a_few_threads_at_most() {
        let pool = pool().expect("the walk's pool");
        assert!((1..=THREADS).contains(&pool.current_num_threads()));
    }

    /// Files a scan's hashing pool hashed (any test's scan).
    static HASHED_ON_POOL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    /// Counts a file hashed, when on the hashing pool.
    pub(in crate::scan) fn count_pool_hash() {
        let name = std::thread::current().name().map(str::to_owned);
        if name.is_some_and(|n| n.starts_with("hash-")) {
            HASHED_ON_POOL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A scan hashes its files on its own pool, more threads than cores: a file
    /// out of the page cache keeps its thread waiting for the disk.
    #[test]
    fn files_are_hashed_on_the_scans_hashing_threads() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..40 {
            std::fs::write(d.path().join(format!("f{i}")), format!("{i}")).unwrap();
        }
        let before = HASHED_ON_POOL.load(std::sync::atomic::Ordering::Relaxed);
        let (m, _) =
            crate::scan::scan_with(d.path(), &crate::scan::ScanOptions::default(), None).unwrap();
        assert_eq!(m.entries.len(), 41);
        let after = HASHED_ON_POOL.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            after - before >= 40,
            "{} files hashed on the pool",
            after - before
        );
        let pool = hash_pool().expect("the hashing pool");
        assert_eq!(pool.current_num_threads(), HASH_THREADS);
    }
}
