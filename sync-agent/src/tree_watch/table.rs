//! The watches and the directories they stand for.
//!
//! A watch is added through a descriptor of the very directory (its
//! `/proc/self/fd` link), never by a path resolved again: a symlink swapped
//! in above a directory between its open and its watch cannot send the
//! watch elsewhere. Directories are opened below the tree's root without
//! following any symlink (`openat2`), as the scan opens them.

use inotify::{WatchDescriptor, WatchMask, Watches};
use proto::RelPath;
use rustix::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use rustix::fs::{FileType, OFlags};
use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use sync_core::filter::Filter;

/// What a directory is watched for (`top`: the watched tree's own root,
/// whose removal and move are reported too), added to what it is watched
/// for already; only a directory.
pub(super) fn mask(top: bool) -> WatchMask {
    let mut m = WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ONLYDIR
        | WatchMask::MASK_ADD;
    if top {
        m |= WatchMask::DELETE_SELF | WatchMask::MOVE_SELF;
    }
    m
}

/// Whether an error adding a watch or opening or listing a directory means
/// it is gone or is no longer a directory (a later event or scan sees what
/// took its place).
pub(super) fn vanished(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENOTDIR | libc::ELOOP)
    )
}

/// `e`, met watching `path`, in notify's terms (the watch limit as
/// [`notify::ErrorKind::MaxFilesWatch`], as notify reports it).
pub(super) fn watch_error(e: io::Error, path: &Path) -> notify::Error {
    let e = if e.raw_os_error() == Some(libc::ENOSPC) {
        notify::Error::new(notify::ErrorKind::MaxFilesWatch)
    } else if e.kind() == io::ErrorKind::NotFound {
        notify::Error::path_not_found()
    } else {
        notify::Error::io(e)
    };
    e.add_path(path.to_path_buf())
}

/// `p` below `root`, as a path of the tree.
fn rel(root: &Path, p: &Path) -> Option<RelPath> {
    let r = p.strip_prefix(root).ok()?;
    RelPath::new(r.as_os_str().as_bytes()).ok()
}

/// The tree's root, opened for the walks and checks beneath it, each its
/// own (held between them, it would keep the application's volume busy and
/// name a tree replaced by rename).
fn open_root(root: &Path) -> io::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
    Ok(rustix::fs::open(root, flags, rustix::fs::Mode::empty())?)
}

/// The name through which the directory open as `fd` is watched (not
/// resolved again by its path).
pub(super) fn fd_link(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// Whether `dir` leads to the directory open as `fd` now, beneath `root`
/// without a symlink.
pub(super) fn names(root: Option<&Path>, dir: &Path, fd: BorrowedFd<'_>) -> bool {
    let Some(root) = root else {
        return false;
    };
    let Some(here) = rel(root, dir) else {
        return false;
    };
    let Ok(root_fd) = open_root(root) else {
        return false;
    };
    let Ok(named) = sync_core::open_dir_beneath(root_fd.as_fd(), &here) else {
        return false;
    };
    match (rustix::fs::fstat(&named), rustix::fs::fstat(fd)) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}

pub(super) struct Table {
    watches: Watches,
    /// The directory each watch stands for.
    pub(super) dirs: HashMap<WatchDescriptor, PathBuf>,
    /// The watch of each directory, in path order (a directory's subtree
    /// right after it).
    by_path: BTreeMap<PathBuf, WatchDescriptor>,
    /// The tree (the first path [`notify::Watcher::watch`] was given). Not
    /// held open: an idle agent keeps nothing of the application's tree
    /// open (a descriptor would keep its file system from being unmounted,
    /// and name a tree replaced by rename).
    pub(super) root: Option<PathBuf>,
    /// `/proc` is not there: watches are added by name.
    no_proc: bool,
    /// What of the tree is not watched (the folder's excludes).
    pub(super) filter: Filter,
    /// Moves on whenever the reader (or the watcher's own API) changes the
    /// watches: a scan's hook that looked at a directory outside the lock
    /// trusts what it saw only while this has not moved.
    moved: u64,
}

/// What a scan's hook learnt of a directory before taking the table's lock:
/// its watch, and (when it was not watched under that name) whether the name
/// led to it, when the table's count of the reader's changes was `moved`.
pub(super) struct Looked {
    pub(super) wd: WatchDescriptor,
    pub(super) named: Option<bool>,
    pub(super) moved: u64,
}

impl Table {
    pub(super) fn new(watches: Watches) -> Self {
        Self {
            watches,
            dirs: HashMap::new(),
            by_path: BTreeMap::new(),
            root: None,
            no_proc: false,
            filter: Filter::default(),
            moved: 0,
        }
    }

    /// What a scan's hook needs to look at a directory without the lock:
    /// the tree's root, a handle to add watches with, whether `dir` is
    /// watched under that name already, and the generation. `None` without
    /// `/proc` (watches are added by name, under the lock).
    pub(super) fn outlook(&self, dir: &Path) -> Option<(PathBuf, Watches, bool, u64)> {
        let root = self.root.clone().filter(|_| !self.no_proc)?;
        let known = self.by_path.contains_key(dir);
        Some((root, self.watches.clone(), known, self.moved))
    }

    /// Records the watch added to `dir` (open as `fd`) under a scan's name
    /// (not the reader's), by a scan's hook outside the lock or by
    /// [`Self::add_fd`]: a directory watched already under that name is left
    /// as it is, and another name is taken only while it leads to this
    /// directory, checked again unless it was checked and nothing moved
    /// since.
    pub(super) fn record_looked(&mut self, dir: &Path, fd: BorrowedFd<'_>, looked: Looked) {
        let known = self.dirs.get(&looked.wd);
        if known.is_some_and(|k| k == dir) {
            return;
        }
        let named = match looked.named.filter(|_| looked.moved == self.moved) {
            Some(n) => n,
            None => names(self.root.as_deref(), dir, fd),
        };
        if !named {
            if known.is_none() {
                // (its directory is elsewhere: watched where it is seen)
                let _ = self.watches.remove(looked.wd);
            }
            return;
        }
        self.record(looked.wd, dir);
    }

    /// Watches the directory open as `fd`, named `dir`. `rename`: the name
    /// is the reader's, current (its own walk); otherwise a scan's, which may
    /// be older than the events the reader has applied (the scan walks on
    /// through descriptors below a directory moved meanwhile): a directory
    /// watched already under that name is left as it is, and another name
    /// is taken only while it still leads to this directory (a watch of a
    /// directory it no longer names is dropped, unless it was watched
    /// before: the reader's name for it stands).
    pub(super) fn add_fd(
        &mut self,
        dir: &Path,
        fd: BorrowedFd<'_>,
        top: bool,
        rename: bool,
    ) -> io::Result<()> {
        let link = fd_link(fd);
        let wd = match self.no_proc {
            false => match self.watches.add(&link, mask(top)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && !Path::new(&link).exists() => {
                    self.no_proc = true;
                    self.watches.add(dir, mask(top) | WatchMask::DONT_FOLLOW)?
                }
                r => r?,
            },
            // no /proc: by its name, never through a symlink at its end
            true => self.watches.add(dir, mask(top) | WatchMask::DONT_FOLLOW)?,
        };
        if rename {
            self.record(wd, dir);
        } else {
            let moved = self.moved;
            let looked = Looked {
                wd,
                named: None,
                moved,
            };
            self.record_looked(dir, fd, looked);
        }
        Ok(())
    }

    /// Watch `wd` stands for `dir`; a watch that stood for `dir` before
    /// (its directory is elsewhere now, or gone) is dropped.
    fn record(&mut self, wd: WatchDescriptor, dir: &Path) {
        if let Some(old) = self.dirs.insert(wd.clone(), dir.to_path_buf())
            && old != dir
            && self.by_path.get(&old) == Some(&wd)
        {
            self.by_path.remove(&old);
        }
        if let Some(other) = self.by_path.insert(dir.to_path_buf(), wd.clone())
            && other != wd
            && self.dirs.get(&other).is_some_and(|d| d == dir)
        {
            self.dirs.remove(&other);
            let _ = self.watches.remove(other);
        }
    }

    /// The kernel dropped watch `wd` (its directory is gone, or it was
    /// removed).
    pub(super) fn ignored(&mut self, wd: &WatchDescriptor) {
        self.moved += 1;
        if let Some(dir) = self.dirs.remove(wd)
            && self.by_path.get(&dir) == Some(wd)
        {
            self.by_path.remove(&dir);
        }
    }

    /// Makes `root` the tree, unless there is one.
    pub(super) fn set_root(&mut self, root: &Path) {
        if self.root.is_none() {
            self.root = Some(root.to_path_buf());
        }
    }

    /// Watches `top` and every directory below it that the folder does not
    /// exclude, opened beneath the root without following a symlink; those
    /// gone meanwhile are skipped, but for the root itself (`is_root`: what
    /// [`notify::Watcher::watch`] was asked for).
    pub(super) fn add_tree(&mut self, top: &Path, is_root: bool) -> notify::Result<()> {
        self.moved += 1;
        let Some(root) = self.root.clone() else {
            return Err(notify::Error::generic("no tree watched").add_path(top.to_path_buf()));
        };
        let Some(top_rel) = rel(&root, top) else {
            let e = notify::Error::generic("not below the watched tree");
            return Err(e.add_path(top.to_path_buf()));
        };
        let root_fd = match open_root(&root) {
            Ok(fd) => fd,
            Err(e) if !is_root && vanished(&e) => return Ok(()),
            Err(e) => return Err(watch_error(e, &root)),
        };
        if !is_root && self.filter.excludes(&top_rel, true) {
            return Ok(());
        }
        let mut stack = vec![top_rel.clone()];
        while let Some(here) = stack.pop() {
            let path = sync_core::scan::abs(&root, &here);
            let is_top = is_root && here == top_rel;
            let fd = match sync_core::open_dir_beneath(root_fd.as_fd(), &here) {
                Ok(fd) => fd,
                Err(e) if vanished(&e) && !is_top => continue,
                Err(e) => return Err(watch_error(e, &path)),
            };
            match self.add_fd(&path, fd.as_fd(), is_top, true) {
                Ok(()) => {}
                Err(e) if vanished(&e) && !is_top => continue,
                Err(e) => return Err(watch_error(e, &path)),
            }
            self.subdirs(&here, fd, &mut stack)
                .map_err(|e| notify::Error::io(e).add_path(path))?;
        }
        Ok(())
    }

    /// Pushes the subdirectories of `here` (open as `fd`) not excluded.
    fn subdirs(&self, here: &RelPath, fd: OwnedFd, out: &mut Vec<RelPath>) -> io::Result<()> {
        let mut listing = match rustix::fs::Dir::read_from(&fd) {
            Ok(l) => l,
            Err(e) if vanished(&e.into()) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        while let Some(entry) = listing.read() {
            let entry = match entry {
                Ok(e) => e,
                Err(e) if vanished(&e.into()) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let is_dir = match entry.file_type() {
                FileType::Unknown => rustix::fs::statat(
                    &fd,
                    entry.file_name(),
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )
                .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory),
                t => t == FileType::Directory,
            };
            let Ok(child) = here.join(name) else {
                continue;
            };
            if is_dir && !self.filter.excludes(&child, true) {
                out.push(child);
            }
        }
        Ok(())
    }

    /// Drops the watches of `top` and of every directory below it; how many.
    pub(super) fn remove_under(&mut self, top: &Path) -> usize {
        self.moved += 1;
        let gone: Vec<(PathBuf, WatchDescriptor)> = self
            .by_path
            .range(top.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(top))
            .map(|(p, wd)| (p.clone(), wd.clone()))
            .collect();
        for (p, wd) in &gone {
            self.by_path.remove(p);
            if self.dirs.get(wd) == Some(p) {
                self.dirs.remove(wd);
                // (removed with its directory already: nothing to undo)
                let _ = self.watches.remove(wd.clone());
            }
        }
        gone.len()
    }
}
