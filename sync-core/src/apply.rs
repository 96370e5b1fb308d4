//! The replica side: confined, atomic apply.
//!
//! Every operation starts from the replica root's directory fd. A parent directory
//! is opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)`, so no symlink in the replica (whatever put it there) is
//! ever followed and nothing outside the root is reached; the leaf is then handled
//! with `*at` calls that do not follow it either. Symlinks are mirrored as symlinks.
//!
//! Content is written to a temp file named [`crate::TEMP_PREFIX`]`…` in the target's
//! own directory, its blake3 is checked against what the source announced, owner,
//! xattrs (POSIX ACLs included), mode and mtime are set on the open fd, and the temp
//! file is renamed over the target. Renames are batched behind one sync, so the
//! data of every renamed file is durable before its name points at it (LiteFS
//! `store.go` does temp, fsync, rename, fsync dir per file; a batch gives the same
//! guarantee for hundreds of files at the cost of two syncs). The sync is an
//! `fsync` of each file the round wrote and each directory it changed
//! ([`durable`]), or one `syncfs` for a round that changed more than 64 paths
//! (a `syncfs` also waits for every other dirty page of the file system, such
//! as a large file being written on the same host). A crash leaves only
//! temp files, which [`Replica::sweep_temps`] removes at the next start.
//!
//! A round is applied all-or-nothing (a consistent cut): everything is staged
//! first (files as temp files, database pages in staging files), one sync
//! makes it durable, then a journal listing every rename and database update is
//! written and made durable, and only then are they carried out. A crash before
//! the journal leaves the previous cut (and temp files, swept); a crash after it
//! is rolled forward by [`Replica::open`]. Databases are updated inside one
//! SQLite transaction each (pages through `sqlite_dbpage`), or replaced whole by
//! a rename when the replica had none; the agent never updates a database that
//! another process holds open.

mod bulk;
pub use bulk::Kept;
mod db;
mod direct;
use crate::db_detect::db_like;
pub use direct::DIRECT_MIN;
mod durable;
pub use durable::{SyncPlan, SyncTarget};
mod meta_apply;
mod page_set;
mod remove;
mod round;
pub use round::Staged;
pub mod order;
mod tables;
mod tables_file;
pub use tables_file::write_atomic;

use crate::sqlite::PageTable;
use crate::{Entry, Error, Kind, Meta, RelPath};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;

/// The cut journal: written before a round's renames and database updates, and
/// rolled forward at the next open when present.
pub const JOURNAL: &[u8] = b".understudy.tmp.journal";
/// Zero blocks of this size (aligned) are left as holes.
const HOLE_BLOCK: usize = 4096;

/// A replica root, held open.
#[derive(Debug)]
pub struct Replica {
    root: OwnedFd,
    root_path: PathBuf,
    touched: Mutex<BTreeSet<RelPath>>,
    warnings: Mutex<Vec<String>>,
    pending: Mutex<Pending>,
    /// Temp files being written: (parent, name).
    staging: Mutex<BTreeSet<(RelPath, Vec<u8>)>>,
    /// Page hashes of the replica's databases, by (inode, size, mtime).
    db_cache: Mutex<std::collections::HashMap<RelPath, tables::Cached>>,
    /// Where the page tables are saved for the next process, and what it holds.
    tables: Mutex<tables_file::Store>,
    /// One save at a time.
    saving: Mutex<()>,
    /// Databases read whole to learn their page tables.
    db_reads: std::sync::atomic::AtomicU64,
    /// Runs of database pages read ahead of the updates overwriting them.
    read_ahead: std::sync::atomic::AtomicU64,
    /// The root as SQLite opens it (no symlink on the way).
    canonical: PathBuf,
    /// Databases left alone this round because another process holds them.
    held: Mutex<Vec<proto::HeldDb>>,
    /// What this round changed that is not yet durable.
    dirty: Mutex<durable::Dirty>,
    /// The round's further names of each database (the source's links).
    db_names: Mutex<std::collections::HashMap<RelPath, Vec<RelPath>>>,
}

type DbStamp = (u64, u64, i64, u64);

#[derive(Debug, Default)]
struct Pending {
    renames: Vec<(RelPath, Vec<u8>)>,
    dbs: Vec<DbCommit>,
}

/// A staged database update, as the journal records it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct DbCommit {
    path: RelPath,
    tmp: Vec<u8>,
    /// The staging file is the whole new database (else page records).
    full: bool,
    pages: u32,
    meta: Meta,
    #[serde(skip)]
    table: Option<Arc<PageTable>>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Journal {
    renames: Vec<(RelPath, Vec<u8>)>,
    dbs: Vec<DbCommit>,
}

fn temp_name() -> Vec<u8> {
    let mut n = crate::TEMP_PREFIX.to_vec();
    let suffix = crate::hex(&rand::random::<[u8; crate::TEMP_SUFFIX_LEN / 2]>());
    n.extend_from_slice(suffix.as_bytes());
    debug_assert!(crate::is_own_temp_name(&n));
    n
}

fn ts(sec: i64, nsec: u32) -> Timespec {
    Timespec {
        tv_sec: sec,
        tv_nsec: i64::from(nsec) as _,
    }
}

fn times(m: &Meta) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: ts(m.mtime_sec, m.mtime_nsec),
    }
}

impl Replica {
    /// Opens the replica root (which must exist and be a directory).
    pub fn open(root: &Path) -> Result<Self, Error> {
        let fd = rustix::fs::open(
            root,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open replica root", root.display(), e))?;
        let r = Self {
            root: fd,
            root_path: root.to_path_buf(),
            touched: Mutex::default(),
            warnings: Mutex::default(),
            pending: Mutex::default(),
            staging: Mutex::default(),
            db_cache: Mutex::default(),
            tables: Mutex::default(),
            saving: Mutex::default(),
            db_reads: std::sync::atomic::AtomicU64::new(0),
            read_ahead: std::sync::atomic::AtomicU64::new(0),
            canonical: std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
            held: Mutex::default(),
            dirty: Mutex::default(),
            db_names: Mutex::default(),
        };
        r.roll_forward()?;
        Ok(r)
    }

    /// Completes a round whose journal was written before a crash.
    fn roll_forward(&self) -> Result<(), Error> {
        let mut buf = Vec::new();
        match rustix::fs::openat(
            &self.root,
            JOURNAL,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                use std::io::Read as _;
                File::from(fd)
                    .read_to_end(&mut buf)
                    .map_err(|e| Error::io("read journal", self.root_path.display(), e))?;
            }
            Err(rustix::io::Errno::NOENT) => return Ok(()),
            Err(e) => return Err(Error::io("open journal", self.root_path.display(), e)),
        }
        let journal: Journal = bincode::serde::decode_from_slice(&buf, bincode::config::standard())
            .map(|(j, _)| j)
            .map_err(|e| Error::invalid(self.root_path.display(), format!("journal: {e}")))?;
        tracing::info!(
            renames = journal.renames.len(),
            databases = journal.dbs.len(),
            "rolling forward the cut journal of an interrupted round"
        );
        // Renames done before the crash are not known: the whole file
        // system is synced before the journal goes.
        self.dirty_whole();
        self.carry_out(journal, true)
    }

    /// The root as given.
    #[must_use]
    pub fn root_path(&self) -> &Path {
        &self.root_path
    }

    fn display(&self, rel: &RelPath) -> String {
        format!("{}", crate::scan::abs(&self.root_path, rel).display())
    }

    /// Opens a directory beneath the root, following no symlink on the way.
    pub fn dir(&self, rel: &RelPath) -> Result<OwnedFd, Error> {
        crate::fsat::open_dir_beneath(self.root.as_fd(), rel)
            .map_err(|e| Error::io("open directory", self.display(rel), e))
    }

    fn parent<'p>(&self, path: &'p RelPath) -> Result<(OwnedFd, RelPath, &'p [u8]), Error> {
        let (parent, name) = self.split(path)?;
        Ok((self.dir(&parent)?, parent, name))
    }

    /// `path`'s parent and name (an error for the root).
    fn split<'p>(&self, path: &'p RelPath) -> Result<(RelPath, &'p [u8]), Error> {
        path.split_last()
            .ok_or_else(|| Error::invalid(self.display(path), "the root has no parent"))
    }

    /// Records a directory whose entries changed (its metadata is set at
    /// the end of the round, and it is synced).
    fn touch(&self, dir: RelPath) {
        self.dirty_dir(dir.clone());
        if let Ok(mut t) = self.touched.lock() {
            t.insert(dir);
        }
    }

    /// Records something that could not be preserved or done, for the summary.
    pub fn warn(&self, mut w: String) {
        tracing::warn!("{w}");
        truncate(&mut w, 1000);
        if let Ok(mut ws) = self.warnings.lock()
            && ws.len() < 1000
        {
            ws.push(w);
        }
    }

    /// What could not be preserved so far (taken, so each is reported once).
    pub fn take_warnings(&self) -> Vec<String> {
        self.warnings
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default()
    }

    /// Creates a directory (owner-only until its metadata is set at the end).
    pub fn mkdir(&self, path: &RelPath) -> Result<(), Error> {
        let (dir, parent, name) = self.parent(path)?;
        match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(Error::io("create directory", self.display(path), e)),
        }
        self.touch(parent);
        self.touch(path.clone());
        Ok(())
    }

    /// Creates a symlink or special file at a temp name, sets its metadata, renames
    /// it over `entry.path`.
    pub fn create(&self, entry: &Entry) -> Result<(), Error> {
        let (dir, parent, name) = self.parent(&entry.path)?;
        let tmp = temp_name();
        let shown_path = self.display(&entry.path);
        let made = match &entry.kind {
            Kind::Symlink { target } => {
                rustix::fs::symlinkat(target.as_slice(), &dir, tmp.as_slice())
            }
            Kind::Fifo | Kind::Socket | Kind::CharDev { .. } | Kind::BlockDev { .. } => {
                let (ft, dev) = match entry.kind {
                    Kind::Fifo => (rustix::fs::FileType::Fifo, 0),
                    Kind::Socket => (rustix::fs::FileType::Socket, 0),
                    Kind::CharDev { rdev } => (rustix::fs::FileType::CharacterDevice, rdev),
                    Kind::BlockDev { rdev } => (rustix::fs::FileType::BlockDevice, rdev),
                    _ => unreachable!("matched above"),
                };
                rustix::fs::mknodat(&dir, tmp.as_slice(), ft, Mode::from_raw_mode(0o600), dev)
            }
            other => {
                return Err(Error::invalid(
                    &shown_path,
                    format!("cannot create a {} this way", other.name()),
                ));
            }
        };
        made.map_err(|e| Error::io("create", &shown_path, e))?;
        let res = self
            .meta_at(dir.as_fd(), &tmp, &entry.kind, &entry.meta, &shown_path)
            .and_then(|()| {
                rustix::fs::renameat(&dir, tmp.as_slice(), &dir, name)
                    .map_err(|e| Error::io("rename", &shown_path, e))
            });
        if res.is_err() {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_slice(), AtFlags::empty());
        }
        res?;
        // A symlink or special file cannot be opened to be synced.
        self.dirty_whole();
        self.touch(parent);
        Ok(())
    }

    /// Renames `from` to `to` when `from` exists and `to`'s parent is a directory
    /// (a hint from the source's watcher: when it cannot be done, the round's
    /// entries make the tree right anyway). Returns whether it was done.
    pub fn rename(&self, from: &RelPath, to: &RelPath) -> bool {
        let (Ok((fdir, fparent, fname)), Ok((tdir, tparent, tname))) =
            (self.parent(from), self.parent(to))
        else {
            return false;
        };
        if crate::is_temp_name(fname) || crate::is_temp_name(tname) {
            return false;
        }
        // A database moved by name would leave its log behind, or meet the
        // target's: its entry brings it whole instead.
        if db_like(fdir.as_fd(), fname) || db_like(tdir.as_fd(), tname) {
            tracing::debug!("rename {from} -> {to} not done: a database");
            return false;
        }
        match rustix::fs::renameat(&fdir, fname, &tdir, tname) {
            Ok(()) => {
                self.touch(fparent);
                self.touch(tparent);
                true
            }
            Err(e) => {
                tracing::debug!("rename {from} -> {to} not done: {e}");
                false
            }
        }
    }

    /// Makes `path` another name of `target` (both beneath the root).
    pub fn hardlink(&self, path: &RelPath, target: &RelPath) -> Result<(), Error> {
        let (tdir, _, tname) = self.parent(target)?;
        let (dir, parent, name) = self.parent(path)?;
        let tst = rustix::fs::statat(&tdir, tname, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io("stat", self.display(target), e))?;
        if let Ok(st) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
            && (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino)
        {
            return Ok(());
        }
        let tmp = temp_name();
        rustix::fs::linkat(&tdir, tname, &dir, tmp.as_slice(), AtFlags::empty())
            .map_err(|e| Error::io("link", self.display(path), e))?;
        if let Err(e) = rustix::fs::renameat(&dir, tmp.as_slice(), &dir, name) {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_slice(), AtFlags::empty());
            return Err(Error::io("rename", self.display(path), e));
        }
        // its link count
        self.dirty_file(target.clone());
        self.touch(parent);
        Ok(())
    }

    /// Sets the metadata of an existing entry.
    pub fn set_meta(&self, entry: &Entry) -> Result<(), Error> {
        let shown_path = self.display(&entry.path);
        match entry.kind {
            Kind::Dir => {
                let fd = self.dir(&entry.path)?;
                self.dirty_dir(entry.path.clone());
                self.meta_fd(&File::from(fd), &entry.meta, &shown_path)
            }
            Kind::File { .. } | Kind::Database { .. } => {
                let (dir, _, name) = self.parent(&entry.path)?;
                let fd = rustix::fs::openat(
                    &dir,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
                    Mode::empty(),
                )
                .map_err(|e| Error::io("open", &shown_path, e))?;
                let st = rustix::fs::fstat(&fd).map_err(|e| Error::io("stat", &shown_path, e))?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode)
                    != rustix::fs::FileType::RegularFile
                {
                    return Err(Error::invalid(
                        &shown_path,
                        "changed under us: expected a regular file",
                    ));
                }
                self.dirty_file(entry.path.clone());
                let f = File::from(fd);
                self.meta_fd(&f, &entry.meta, &shown_path)
                    .map(|()| self.keep_db_table(&entry.path, &st, &f))
            }
            Kind::HardLink { .. } => Ok(()),
            _ => {
                let (dir, _, name) = self.parent(&entry.path)?;
                self.dirty_whole();
                self.meta_at(dir.as_fd(), name, &entry.kind, &entry.meta, &shown_path)
            }
        }
    }

    /// Sets a directory's metadata when it differs from `current` or the directory
    /// was changed during this run (its mtime moved).
    pub fn finish_dir(&self, entry: &Entry, current: Option<&Meta>) -> Result<(), Error> {
        let touched = self
            .touched
            .lock()
            .map(|t| t.contains(&entry.path))
            .unwrap_or(true);
        if touched || current != Some(&entry.meta) {
            self.set_meta(entry)?;
        }
        Ok(())
    }

    /// The replica's current regular file at `path`, mapped, as a delta basis.
    pub fn open_basis(&self, path: &RelPath) -> Result<Option<memmap2::Mmap>, Error> {
        let (dir, _, name) = self.parent(path)?;
        let fd = match rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT) | Err(rustix::io::Errno::LOOP) => return Ok(None),
            Err(e) => return Err(Error::io("open basis", self.display(path), e)),
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::io("stat", self.display(path), e))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
            || st.st_size == 0
        {
            return Ok(None);
        }
        let file = File::from(fd);
        // SAFETY: the map is read-only and private to this process; the replica root
        // is written only by this agent (a cold standby), so the file is neither
        // truncated nor rewritten while mapped; the result is checked with blake3
        // before use, so a concurrent change could only fail the transfer.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| Error::io("map basis", self.display(path), e))?;
        Ok(Some(map))
    }
}

/// Cuts `s` to at most `max` bytes at a character boundary.
pub fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max.saturating_sub(3);
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
        s.push_str("...");
    }
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    std::os::unix::ffi::OsStrExt::from_bytes(b)
}
fn uid(u: u32) -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(u)
}
fn gid(g: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(g)
}
