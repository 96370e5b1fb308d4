//! Walking a tree into a [`Manifest`].

pub use crate::db_detect::DbDetect;
use crate::filter::Filter;
use crate::index::{HashIndex, Stamp};
use crate::{Entry, Error, Kind, Manifest, RelPath, fsat, meta};
use rayon::prelude::*;
use rustix::fd::{AsFd, BorrowedFd, OwnedFd};
use rustix::fs::{FileType, OFlags};
use std::ffi::{CStr, CString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// How to scan.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Compute blake3 content hashes (the source does; a replica deciding by size
    /// and mtime need not).
    pub hash: bool,
    /// Record further names of an inode as [`Kind::HardLink`].
    pub hard_links: bool,
    /// Paths left out entirely.
    pub filter: Filter,
    /// How live SQLite databases are told (`None`: they are plain files).
    pub databases: Option<std::sync::Arc<DbDetect>>,
    /// Called with each directory's path and the descriptor it is open as
    /// just before its names are listed (a watcher adds its watch there,
    /// through the descriptor: a change after the listing raises an event).
    /// Not called for excluded directories.
    pub on_dir: Option<DirHook>,
}

/// A call made before a directory is listed ([`ScanOptions::on_dir`]).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct DirHook(pub std::sync::Arc<dyn Fn(&Path, BorrowedFd<'_>) + Send + Sync>);

impl std::fmt::Debug for DirHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirHook")
    }
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            hash: true,
            hard_links: true,
            filter: Filter::default(),
            databases: None,
            on_dir: None,
        }
    }
}

/// What a scan found beside the manifest.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Our own temp files met in the tree (swept by a replica, skipped by a source).
    pub temp_files: Vec<RelPath>,
    /// Files whose content was read and hashed (index misses).
    pub hashed: Vec<(RelPath, Stamp, [u8; 32])>,
    /// Bytes read to hash them.
    pub bytes_hashed: u64,
    /// A scan that does not hash, given an index: each entry's stamp (`None`
    /// but for regular files), in the manifest's order, for
    /// [`HashIndex::remember_stamps`] with the manifest's entries.
    pub stamps: Vec<Option<Stamp>>,
    /// Regular files with more than one name (link count > 1).
    pub multi_linked: std::collections::HashSet<RelPath>,
    /// Live SQLite databases (listed as files with a zero hash, never read).
    pub databases: Vec<RelPath>,
    /// Excluded paths met (the topmost: an excluded directory is not
    /// entered), with whether each is a directory; a replica's full round
    /// sweeps or reports them (`delete_excluded`).
    pub excluded: Vec<(RelPath, bool)>,
}

/// Scans `root` into a manifest.
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<Manifest, Error> {
    scan_with(root, opts, None).map(|(m, _)| m)
}

/// Scans `root` into a manifest and a report, reusing hashes from `index` for
/// files whose stamp it remembers.
pub fn scan_with(
    root: &Path,
    opts: &ScanOptions,
    index: Option<&HashIndex>,
) -> Result<(Manifest, ScanReport), Error> {
    let st = fs::metadata(root).map_err(|e| Error::io("stat", root.display(), e))?;
    if !st.is_dir() {
        return Err(Error::invalid(root.display(), "not a directory"));
    }
    // The walk visits children in sorted order, so entries are in manifest order.
    let (entries, report) = scan_subtree(root, &RelPath::root(), opts, index)?;
    Ok((Manifest { entries }, report))
}

/// The entry at `rel` alone (not its subtree), or `None` when it does not exist
/// or is excluded.
pub fn entry_at(
    root: &Path,
    rel: &RelPath,
    opts: &ScanOptions,
    index: Option<&HashIndex>,
) -> Result<(Option<Entry>, ScanReport), Error> {
    let mut w = Walker::new(root, opts, index);
    w.visit(rel)?;
    let (mut entries, report) = w.finish()?;
    Ok((entries.pop(), report))
}

/// `rel` and everything below it, in manifest order (empty when absent or
/// excluded).
pub fn scan_subtree(
    root: &Path,
    rel: &RelPath,
    opts: &ScanOptions,
    index: Option<&HashIndex>,
) -> Result<(Vec<Entry>, ScanReport), Error> {
    let mut w = Walker::new(root, opts, index);
    if w.visit(rel)? == Some(true) {
        w.walk_pooled(rel)?;
    }
    w.finish()
}

/// blake3 of a file's content, read (not mapped: a live file may shrink under us).
pub fn hash_file(path: &Path) -> Result<[u8; 32], Error> {
    #[cfg(test)]
    par::tests::count_pool_hash();
    let f = open_regular(path)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)
        .map_err(|e| Error::io("read", path.display(), e))?;
    Ok(*h.finalize().as_bytes())
}

/// The absolute path of `rel` under `root`.
#[must_use]
pub fn abs(root: &Path, rel: &RelPath) -> PathBuf {
    if rel.is_root() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(rel.as_bytes()))
    }
}

/// Nanoseconds since the epoch, now.
#[must_use]
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Files hashed at once (on every core) by a scan's end.
const HASH_CHUNK: usize = 4096;

/// Directories deeper than this are walked without holding their parent's
/// file descriptor open across a subdirectory (reopened from the root after
/// it): a walk holds at most this many directories open.
const FD_DEPTH: usize = 64;

thread_local! {
    /// Scratch space for `getdents64`, one per thread (walkers of subtrees
    /// walked apart are many).
    static DIRBUF: std::cell::RefCell<Vec<std::mem::MaybeUninit<u8>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// A test's hook into the walk.
#[cfg(test)]
type Hook = Box<dyn FnMut(&str, &RelPath) + Send>;

struct Walker<'o> {
    root: PathBuf,
    root_fd: Option<OwnedFd>,
    opts: &'o ScanOptions,
    /// Hashes, and which files had no xattrs, at stamps seen before.
    index: Option<&'o HashIndex>,
    entries: Vec<Entry>,
    stamps: Vec<Option<Stamp>>,
    /// Entries (by index) that are regular files with further names, and
    /// their inodes: [`Walker::finish`] makes all but the first a link.
    links: Vec<(usize, (u64, u64))>,
    /// Whether subtrees near the root may be walked on other threads.
    parallel: bool,
    /// Subtrees walked apart, by the index of the entry they go before.
    pending: Vec<(usize, Walker<'o>)>,
    temp_files: Vec<RelPath>,
    multi_linked: std::collections::HashSet<RelPath>,
    databases: Vec<RelPath>,
    excluded: Vec<(RelPath, bool)>,
    /// Scratch space for `listxattrat`.
    xattr_list: Vec<u8>,
    /// Test hook, called with `("names", dir)` once a directory is listed,
    /// with `("stat", dir)` before a subdirectory is opened and with
    /// `("xattrs", path)` before an entry's xattrs are listed.
    #[cfg(test)]
    hook: Option<Hook>,
}

/// Whether an error met opening or reading `path` means it is gone (or is
/// no longer a directory): the next scan sees what took its place.
fn vanished(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

impl<'o> Walker<'o> {
    fn new(root: &Path, opts: &'o ScanOptions, index: Option<&'o HashIndex>) -> Self {
        // Sized for the tree the index knows (files are most entries).
        let hint = index.map_or(0, |ix| ix.len() + ix.len() / 2);
        Self::with_capacity(root, opts, index, hint)
    }

    fn with_capacity(
        root: &Path,
        opts: &'o ScanOptions,
        index: Option<&'o HashIndex>,
        hint: usize,
    ) -> Self {
        Self {
            root: root.to_path_buf(),
            root_fd: None,
            opts,
            index,
            entries: Vec::with_capacity(hint),
            stamps: Vec::with_capacity(hint),
            links: Vec::new(),
            parallel: true,
            pending: Vec::new(),
            temp_files: Vec::new(),
            multi_linked: Default::default(),
            databases: Vec::new(),
            excluded: Vec::new(),
            xattr_list: Vec::new(),
            #[cfg(test)]
            hook: None,
        }
    }

    #[cfg(test)]
    fn hook(&mut self, step: &str, path: &RelPath) {
        if let Some(h) = self.hook.as_mut() {
            h(step, path);
        }
    }

    #[cfg(not(test))]
    fn hook(&mut self, _step: &str, _path: &RelPath) {}

    fn push(&mut self, e: Entry, stamp: Option<Stamp>) {
        self.entries.push(e);
        self.stamps.push(stamp);
    }

    /// Hashes files (reusing the index), returning entries and the report.
    fn finish(mut self) -> Result<(Vec<Entry>, ScanReport), Error> {
        let index = self.index;
        self.flatten();
        self.link_names();
        let mut report = ScanReport {
            temp_files: std::mem::take(&mut self.temp_files),
            multi_linked: std::mem::take(&mut self.multi_linked),
            databases: std::mem::take(&mut self.databases),
            excluded: std::mem::take(&mut self.excluded),
            ..Default::default()
        };
        if !self.opts.hash {
            if index.is_some() {
                // the walk's own list, beside the entries (not a list of
                // their paths again: 39 MB at 300,000 files)
                self.stamps.shrink_to_fit();
                report.stamps = std::mem::take(&mut self.stamps);
            }
            return Ok((self.entries, report));
        }
        let mut todo: Vec<usize> = Vec::new();
        for (i, e) in self.entries.iter_mut().enumerate() {
            if let (Kind::File { hash, .. }, Some(stamp)) = (&mut e.kind, self.stamps[i]) {
                match index.and_then(|ix| ix.lookup(&e.path, &stamp)) {
                    Some(h) => *hash = h,
                    None => todo.push(i),
                }
            }
        }
        let mut vanished = Vec::new();
        // sized once: collected by doubling it peaked at twice its size
        report.hashed.reserve_exact(todo.len());
        // A chunk at a time: the results of every file at once (with room for
        // an error each) were 30 MB beside the list at 300,000 files.
        for chunk in todo.chunks(HASH_CHUNK) {
            let root = &self.root;
            let entries = &self.entries;
            let hash_all = || -> Vec<Result<[u8; 32], Error>> {
                chunk
                    .par_iter()
                    .map(|&i| hash_file(&abs(root, &entries[i].path)))
                    .collect()
            };
            let hashes = match par::hash_pool() {
                Some(pool) => pool.install(hash_all),
                None => hash_all(),
            };
            for (&i, h) in chunk.iter().zip(hashes) {
                let h = match h {
                    Ok(h) => h,
                    // vanished since the walk: left out, seen as gone
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                        vanished.push(i);
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                let e = &mut self.entries[i];
                if let Kind::File { hash, size } = &mut e.kind {
                    *hash = h;
                    report.bytes_hashed += *size;
                    if let Some(stamp) = self.stamps[i] {
                        report.hashed.push((e.path.clone(), stamp, h));
                    }
                }
            }
        }
        // Drop vanished files and what names them as a hard-link target.
        let mut entries = self.entries;
        if !vanished.is_empty() {
            let gone: std::collections::HashSet<RelPath> =
                vanished.iter().map(|&i| entries[i].path.clone()).collect();
            entries.retain(|e| {
                !gone.contains(&e.path)
                    && !matches!(&e.kind, Kind::HardLink { target } if gone.contains(target))
            });
        }
        Ok((entries, report))
    }

    /// The root directory, opened (following a symlink) on first use.
    fn root_fd(&mut self) -> Result<BorrowedFd<'_>, Error> {
        let fd = match self.root_fd.take() {
            Some(fd) => fd,
            None => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
                rustix::fs::open(&self.root, flags, rustix::fs::Mode::empty()).map_err(|e| {
                    Error::io("open directory", self.root.display(), io::Error::from(e))
                })?
            }
        };
        let fd: &OwnedFd = self.root_fd.insert(fd);
        Ok(fd.as_fd())
    }

    /// The directory `dir` (below the root, never through a symlink);
    /// `None` when it is gone or is not a directory.
    fn open_dir(&mut self, dir: &RelPath) -> Result<Option<OwnedFd>, Error> {
        let root = self.root_fd()?;
        match fsat::open_dir_beneath(root, dir) {
            Ok(fd) => Ok(Some(fd)),
            Err(e) if vanished(&e) => Ok(None),
            Err(e) => Err(Error::io(
                "open directory",
                abs(&self.root, dir).display(),
                e,
            )),
        }
    }

    /// Adds the entry at `path`; `Some(is_dir)` when it exists and is included.
    fn visit(&mut self, path: &RelPath) -> Result<Option<bool>, Error> {
        let Some((parent, name)) = path.split_last() else {
            return self.visit_root();
        };
        let Some(dir) = self.open_dir(&parent)? else {
            return Ok(None);
        };
        let name =
            CString::new(name).map_err(|e| Error::invalid(path.to_string(), e.to_string()))?;
        self.visit_at(dir.as_fd(), path, &name)
    }

    /// Adds the entry `path`, named `name` in the open directory `dir`;
    /// `Some(is_dir)` when it exists and is included.
    fn visit_at(
        &mut self,
        dir: BorrowedFd<'_>,
        path: &RelPath,
        name: &CStr,
    ) -> Result<Option<bool>, Error> {
        if crate::is_temp_name(name.to_bytes()) {
            self.temp_files.push(path.clone());
            return Ok(None);
        }
        let st = match fsat::stat_at(dir, name) {
            Ok(st) => st,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
                return Ok(None);
            }
            Err(e) => return Err(Error::io("stat", abs(&self.root, path).display(), e)),
        };
        let is_dir = st.kind == FileType::Directory;
        if self.opts.filter.excludes(path, is_dir) {
            self.excluded.push((path.clone(), is_dir));
            return Ok(None);
        }
        let db = self.opts.databases.as_deref();
        if !is_dir && db.is_some_and(|d| d.is_sidecar(&self.root, path)) {
            return Ok(None);
        }
        let mut m = st.meta();
        let bare = st.kind == FileType::RegularFile
            && self.index.is_some_and(|ix| ix.bare(path, &st.stamp()));
        if !bare {
            self.hook("xattrs", path);
        }
        let p = || abs(&self.root, path);
        if !bare {
            m.xattrs = match meta::read_xattrs_at(dir, name, p, &mut self.xattr_list) {
                Ok(x) => x,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(e),
            };
        }
        let mut stamp = None;
        let kind = match st.kind {
            FileType::Directory => Kind::Dir,
            FileType::RegularFile => {
                if st.nlink > 1 {
                    self.multi_linked.insert(path.clone());
                }
                if self.opts.hard_links && st.nlink > 1 {
                    self.links.push((self.entries.len(), (st.dev, st.ino)));
                }
                if db.is_some_and(|d| d.is_db(&self.root, path, st.size, (st.dev, st.ino))) {
                    self.databases.push(path.clone());
                } else {
                    stamp = Some(st.stamp());
                }
                Kind::File {
                    size: st.size,
                    hash: [0; 32],
                }
            }
            FileType::Symlink => match fsat::readlink_at(dir, name) {
                Ok(target) => Kind::Symlink { target },
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io("readlink", p().display(), e)),
            },
            FileType::Fifo => Kind::Fifo,
            FileType::Socket => Kind::Socket,
            FileType::CharacterDevice => Kind::CharDev { rdev: st.rdev },
            FileType::BlockDevice => Kind::BlockDev { rdev: st.rdev },
            FileType::Unknown => return Err(Error::invalid(p().display(), "unknown file type")),
        };
        self.push(
            Entry {
                path: path.clone(),
                kind,
                meta: m,
            },
            stamp,
        );
        Ok(Some(is_dir))
    }

    /// Adds the root: a directory, followed (it may be a symlink to one).
    fn visit_root(&mut self) -> Result<Option<bool>, Error> {
        let st = fs::metadata(&self.root).map_err(|e| Error::io("stat", self.root.display(), e))?;
        let mut m = meta::from_stat(&st);
        m.xattrs = meta::read_xattrs(&self.root)?;
        self.push(
            Entry {
                path: RelPath::root(),
                kind: Kind::Dir,
                meta: m,
            },
            None,
        );
        Ok(Some(true))
    }

    /// Walks the directory `dir` (below the root, never through a symlink).
    fn walk(&mut self, dir: &RelPath) -> Result<(), Error> {
        match self.open_dir(dir)? {
            Some(fd) => self.walk_dir(dir, fd),
            None if dir.is_root() => Err(Error::io(
                "open directory",
                self.root.display(),
                io::Error::from_raw_os_error(libc::ENOENT),
            )),
            None => Ok(()),
        }
    }

    /// Adds what is below `dir`, open as `fd`, in manifest order.
    fn walk_dir(&mut self, dir: &RelPath, fd: OwnedFd) -> Result<(), Error> {
        if let Some(DirHook(h)) = &self.opts.on_dir {
            h(&abs(&self.root, dir), fd.as_fd());
        }
        let names = match DIRBUF.with_borrow_mut(|buf| fsat::read_names(fd.as_fd(), buf)) {
            Ok(n) => n,
            // removed while we walked: it will be seen as gone
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !dir.is_root() => return Ok(()),
            Err(e) => {
                return Err(Error::io(
                    "read directory",
                    abs(&self.root, dir).display(),
                    e,
                ));
            }
        };
        self.hook("names", dir);
        // grown a directory at a time, not by doubling (a walker's lists are
        // held twice while the walk's subtrees are put together)
        self.entries.reserve(names.len());
        self.stamps.reserve(names.len());
        if self.parallel && dir.depth() < par::DEPTH {
            return self.walk_dir_par(dir, fd, &names);
        }
        // Deep down, the directory is closed while a subdirectory is walked.
        let deep = dir.depth() >= FD_DEPTH;
        let mut fd = Some(fd);
        for i in 0..names.len() {
            let (name, cname) = names.get(i);
            let path = par::child(dir, name)?;
            let dfd = match fd.take() {
                Some(f) => f,
                None => match self.open_dir(dir)? {
                    Some(f) => f,
                    None => return Ok(()),
                },
            };
            if self.visit_at(dfd.as_fd(), &path, cname)? != Some(true) {
                fd = Some(dfd);
                continue;
            }
            self.hook("stat", &path);
            let child = fsat::open_dir_at(dfd.as_fd(), cname);
            if deep {
                // closed before the subdirectory is walked, not after
                drop(dfd);
            } else {
                fd = Some(dfd);
            }
            match child {
                Ok(child) => self.walk_dir(&path, child)?,
                // replaced since its stat: the next scan sees what took its place
                Err(e) if vanished(&e) => {}
                Err(e) => {
                    return Err(Error::io(
                        "open directory",
                        abs(&self.root, &path).display(),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }
}

#[path = "scan_par.rs"]
mod par;

#[path = "scan_open.rs"]
mod open;
pub use open::{open_regular, open_regular_stat};

#[cfg(test)]
#[path = "scan_tests.rs"]
mod walk_tests;
