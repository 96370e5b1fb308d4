//! The replica's databases: staging pages against the announced hash,
//! the held-open check, and updates that never write through another name.

use super::direct::{DB_CHUNK, Gather};
use super::page_set::PageSet;
use super::round::start_writeback;
use super::*;
use crate::sqlite::{self, PageTable};
use crate::{Entry, Error, Kind, Manifest, Meta, RelPath};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::fs::File;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::Arc;

impl Replica {
    /// Records that the database at `path` was left alone because `holders`
    /// (another process) hold it open (see [`Replica::take_held`]).
    pub fn note_held(&self, path: &RelPath, holders: &str) {
        if let Ok(mut h) = self.held.lock() {
            h.push(proto::HeldDb {
                path: path.clone(),
                holders: holders.to_string(),
            });
        }
    }

    /// The databases left alone since the last call, with their holders.
    pub fn take_held(&self) -> Vec<proto::HeldDb> {
        self.held
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default()
    }

    /// The other processes holding the database at `path` (or its side files)
    /// open, as text, or `None`.
    pub fn db_holders(&self, path: &RelPath) -> Option<String> {
        let who = crate::holders::holders_of_db(&self.db_path(path)).unwrap_or_default();
        (!who.is_empty()).then(|| {
            who.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        })
    }

    pub(super) fn db_path(&self, path: &RelPath) -> PathBuf {
        crate::scan::abs(&self.canonical, path)
    }

    /// Pages are written in place only into a database with no other name (a
    /// hard link from outside the root, a `cp -al` snapshot): one that gained
    /// a link since it was staged is left alone (warning) and replaced whole
    /// next round.
    pub(super) fn linked_since_staged(&self, path: &RelPath) -> Result<bool, Error> {
        if !self.has_other_links(path)? {
            return Ok(false);
        }
        if let Ok(mut c) = self.db_cache.lock() {
            c.remove(path);
        }
        self.warn(format!(
            "{}: database has other hard links; not written in place, replaced by \
             a whole copy next round",
            self.display(path)
        ));
        Ok(true)
    }

    pub(super) fn update_db(&self, db: DbCommit) -> Result<(), Error> {
        let (dir, parent, name) = self.parent(&db.path)?;
        let shown = self.display(&db.path);
        let gone = |r: rustix::io::Result<()>| match r {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(Error::io("remove", &shown, e)),
        };
        if rustix::fs::statat(&dir, db.tmp.as_slice(), AtFlags::SYMLINK_NOFOLLOW).is_err() {
            return Ok(()); // carried out before a crash
        }
        if !db.full && self.linked_since_staged(&db.path)? {
            return gone(rustix::fs::unlinkat(
                &dir,
                db.tmp.as_slice(),
                AtFlags::empty(),
            ));
        }
        let held = |who: &str| {
            self.note_held(&db.path, who);
            self.warn(format!(
                "{shown}: database held open by {who}; not updated (the standby's \
                 application must be stopped), retried next round"
            ));
            gone(rustix::fs::unlinkat(
                &dir,
                db.tmp.as_slice(),
                AtFlags::empty(),
            ))
        };
        if let Some(who) = self.db_holders(&db.path) {
            return held(&who);
        }
        // A whole image replaces the file: SQLite's own EXCLUSIVE lock on the
        // old one is held across the side files' removal and the rename, so no
        // connection is using them (one that opened since the check above is
        // waited for, then the database is left alone) and none pairs the
        // old log with the new file. Pages written in place go through SQLite.
        let _lock = if db.full {
            match sqlite::lock_exclusive(&self.db_path(&db.path), HELD_WAIT)? {
                sqlite::Lock::Taken(x) => Some(x),
                sqlite::Lock::Busy => return held("another connection"),
                sqlite::Lock::NotDb => None,
            }
        } else {
            None
        };
        // A whole new database must not meet the old one's log; side files
        // that are not plain files (a planted symlink) are removed before
        // SQLite opens them by name.
        self.clear_sidecars(dir.as_fd(), name, db.full, &shown)?;
        if db.full {
            rustix::fs::renameat(&dir, db.tmp.as_slice(), &dir, name)
                .map_err(|e| Error::io("rename", &shown, e))?;
        } else {
            self.write_pages_in_place(dir.as_fd(), &db, &shown)?;
            gone(rustix::fs::unlinkat(
                &dir,
                db.tmp.as_slice(),
                AtFlags::empty(),
            ))?;
        }
        self.touch(parent);
        // SQLite's own writes: the file (synced by its checkpoint, but its
        // metadata is set below) and what is left of its log
        for side in [&b"-wal"[..], b"-journal"] {
            match RelPath::new([db.path.as_bytes(), side].concat()) {
                Ok(p) => self.dirty_file(p),
                Err(_) => self.dirty_whole(),
            }
        }
        let entry = Entry {
            path: db.path.clone(),
            kind: Kind::File {
                size: 0,
                hash: [0; 32],
            },
            meta: db.meta,
        };
        self.set_meta(&entry)?;
        if let Some(table) = db.table {
            self.cache_written(&db.path, dir.as_fd(), name, table);
        }
        Ok(())
    }

    /// Writes a staged run of pages into the database through SQLite.
    fn write_pages_in_place(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        db: &DbCommit,
        shown: &str,
    ) -> Result<(), Error> {
        let fd = rustix::fs::openat(
            dir,
            db.tmp.as_slice(),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open staged pages of", shown, e))?;
        let staged = File::from(fd);
        // Closed before SQLite opens the database: closing a descriptor of it
        // while SQLite's connection is open would drop every POSIX lock this
        // process holds on it (the read ahead it asked for goes on).
        if let Some(f) = open_db_at(dir, &db.path) {
            let runs = super::direct::prefetch(&staged, &f) as u64;
            self.read_ahead
                .fetch_add(runs, std::sync::atomic::Ordering::Relaxed);
        }
        let records = PageRecords {
            file: &staged,
            at: 0,
            shown,
        };
        #[cfg(test)]
        let records = tests::counting_db_fds(records, self.db_path(&db.path));
        sqlite::apply_pages(&self.db_path(&db.path), db.pages, records)?;
        Ok(())
    }

    /// Removes the side files (`-wal`, `-shm`, `-journal`) of the database
    /// `name` in `dir`: all of them, or (`all` false) those that are not
    /// regular files. A database's own are removed only under SQLite's
    /// EXCLUSIVE lock on it (or when it is not a database SQLite opens).
    pub(super) fn clear_sidecars(
        &self,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &[u8],
        all: bool,
        shown: &str,
    ) -> Result<(), Error> {
        for suffix in sqlite::SIDECARS {
            let side = [name, suffix].concat();
            if let Ok(st) = rustix::fs::statat(dir, side.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                && (all
                    || rustix::fs::FileType::from_raw_mode(st.st_mode)
                        != rustix::fs::FileType::RegularFile)
            {
                match rustix::fs::unlinkat(dir, side.as_slice(), AtFlags::empty()) {
                    Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                    Err(e) => return Err(Error::io("remove", shown, e)),
                }
            }
        }
        Ok(())
    }

    /// Takes the round's manifest's further names of its databases (links to
    /// a database entry): a database whose other names are all those is
    /// theirs to share, and is written in place (see [`Self::has_other_links`]).
    pub fn note_db_names(&self, planned: &Manifest) {
        let dbs: std::collections::HashSet<&RelPath> = planned
            .entries
            .iter()
            .filter(|e| matches!(e.kind, Kind::Database { .. }))
            .map(|e| &e.path)
            .collect();
        let mut names: std::collections::HashMap<RelPath, Vec<RelPath>> = Default::default();
        for e in &planned.entries {
            if let Kind::HardLink { target } = &e.kind
                && dbs.contains(target)
            {
                names
                    .entry(target.clone())
                    .or_default()
                    .push(e.path.clone());
            }
        }
        if let Ok(mut n) = self.db_names.lock() {
            *n = names;
        }
    }

    /// Whether the regular file at `path` has names other than the source's
    /// (st_nlink > 1 counting only the names [`Self::note_db_names`] took
    /// that are this inode here: a hard link from outside the root, a `cp
    /// -al` snapshot): such a file is replaced by a rename, never written in
    /// place.
    pub fn has_other_links(&self, path: &RelPath) -> Result<bool, Error> {
        let (dir, _, name) = self.parent(path)?;
        let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(false),
            Err(e) => return Err(Error::io("stat", self.display(path), e)),
        };
        if st.st_nlink <= 1
            || rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile
        {
            return Ok(false);
        }
        let names = match self.db_names.lock() {
            Ok(n) => n.get(path).cloned().unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let same = |n: &RelPath| -> bool {
            let Ok((d, _, nm)) = self.parent(n) else {
                return false;
            };
            rustix::fs::statat(&d, nm, AtFlags::SYMLINK_NOFOLLOW)
                .is_ok_and(|o| (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino))
        };
        let ours = names.iter().filter(|n| same(n)).count() as u64;
        Ok(st.st_nlink > 1 + ours)
    }

    /// Starts staging a database: pages on top of `base` (what the replica
    /// holds), or a whole new database when there is no usable base.
    pub fn stage_db(
        &self,
        path: &RelPath,
        base: Option<Arc<PageTable>>,
        page_size: u32,
        pages: u32,
    ) -> Result<StagedDb<'_>, Error> {
        // The count comes from the peer: bounded before the page table is sized.
        proto::check_db_bounds(page_size, pages)
            .map_err(|e| Error::invalid(self.display(path), e.to_string()))?;
        let base = base.filter(|b| b.page_size == page_size);
        let hashes = match &base {
            Some(b) => {
                let mut h = b.hashes.clone();
                h.resize(pages as usize, [0; 32]);
                h
            }
            None => vec![[0; 32]; pages as usize],
        };
        // pages past the old end must all arrive (all of them without a base)
        let missing = PageSet::range(b_len(&base).min(pages), pages);
        let (dir, tmp, file) = self.temp_beside(path)?;
        Ok(StagedDb {
            replica: self,
            dir,
            tmp,
            path: path.clone(),
            file,
            full: base.is_none(),
            page_size,
            hashes,
            missing,
            len: 0,
            done: false,
            direct: None,
        })
    }
}

/// How long a whole-image replacement waits for another connection to the
/// database it replaces.
const HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) fn db_stamp(st: &rustix::fs::Stat) -> DbStamp {
    (st.st_ino, st.st_size as u64, st.st_mtime, st.st_mtime_nsec)
}

pub(super) fn b_len(b: &Option<Arc<PageTable>>) -> u32 {
    b.as_ref().map_or(0, |b| b.hashes.len() as u32)
}

/// The database `path` in `dir`, open to read (never through a symlink).
fn open_db_at(dir: std::os::fd::BorrowedFd<'_>, path: &RelPath) -> Option<File> {
    let (_, name) = path.split_last()?;
    // (not waiting on a FIFO put in its place)
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    rustix::fs::openat(dir, name, flags, Mode::empty())
        .ok()
        .map(File::from)
}

/// Page records of a staging file: page number (4 bytes, big-endian), length (4
/// bytes) and the page image, one after another.
pub(super) struct PageRecords<'f> {
    file: &'f File,
    at: u64,
    shown: &'f str,
}

impl Iterator for PageRecords<'_> {
    type Item = Result<(u32, Vec<u8>), Error>;
    fn next(&mut self) -> Option<Self::Item> {
        let mut head = [0u8; 8];
        match self.file.read_exact_at(&mut head, self.at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) => return Some(Err(Error::io("read staged pages of", self.shown, e))),
        }
        let pgno = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if !proto::valid_page_size(len) {
            return Some(Err(Error::invalid(self.shown, "corrupt staged pages")));
        }
        let mut data = vec![0u8; len as usize];
        if let Err(e) = self.file.read_exact_at(&mut data, self.at + 8) {
            return Some(Err(Error::io("read staged pages of", self.shown, e)));
        }
        self.at += 8 + u64::from(len);
        Some(Ok((pgno, data)))
    }
}

/// A database update being received. Dropped without [`StagedDb::commit`], its
/// staging file is removed.
#[derive(Debug)]
pub struct StagedDb<'r> {
    replica: &'r Replica,
    dir: OwnedFd,
    tmp: Vec<u8>,
    path: RelPath,
    file: File,
    full: bool,
    page_size: u32,
    hashes: Vec<[u8; 32]>,
    /// Pages (from 0) that must still arrive.
    missing: PageSet,
    len: u64,
    done: bool,
    /// A whole new database's runs written past the page cache (see
    /// [`Gather`]): `None` until the first run, `Some(None)` when the file
    /// system takes no direct I/O.
    direct: Option<Option<Gather>>,
}

impl StagedDb<'_> {
    /// Whether the update is a whole new database (the replica had no usable one).
    #[must_use]
    pub fn is_full(&self) -> bool {
        self.full
    }

    /// Records page `pgno` (from 1).
    pub fn page(&mut self, pgno: u32, data: &[u8]) -> Result<(), Error> {
        self.pages(&[(pgno, data)])
    }

    /// Records a batch of pages (from 1), with one write per run of
    /// consecutive pages: a whole new database arrives as a few large writes,
    /// not one system call a page.
    pub fn pages<D: AsRef<[u8]>>(&mut self, batch: &[(u32, D)]) -> Result<(), Error> {
        let ps = self.page_size as usize;
        for (pgno, data) in batch {
            let (pgno, len) = (*pgno, data.as_ref().len());
            if pgno == 0 || pgno as usize > self.hashes.len() || len != ps {
                return Err(Error::invalid(
                    self.replica.display(&self.path),
                    format!(
                        "page {pgno} of {len} bytes for a database of {} pages of {}",
                        self.hashes.len(),
                        self.page_size
                    ),
                ));
            }
        }
        // (a page gathered for a direct write must not land over this one)
        self.settle_direct()?;
        let mut buf = Vec::new();
        let mut run = 0;
        while run < batch.len() {
            // a run of consecutive pages (full image), or the whole batch as
            // records (pages on top of a base)
            let mut end = run + 1;
            while end < batch.len() && (!self.full || batch[end].0 == batch[end - 1].0 + 1) {
                end += 1;
            }
            buf.clear();
            for (pgno, data) in &batch[run..end] {
                if !self.full {
                    buf.extend_from_slice(&pgno.to_be_bytes());
                    buf.extend_from_slice(&(ps as u32).to_be_bytes());
                }
                buf.extend_from_slice(data.as_ref());
            }
            let at = if self.full {
                u64::from(batch[run].0 - 1) * u64::from(self.page_size)
            } else {
                self.len
            };
            self.file
                .write_all_at(&buf, at)
                .map_err(|e| Error::io("write", self.replica.display(&self.path), e))?;
            start_writeback(&self.file, at, buf.len() as u64);
            if !self.full {
                self.len += buf.len() as u64;
            }
            run = end;
        }
        let pages: Vec<(u32, &[u8])> = batch.iter().map(|(p, d)| (*p, d.as_ref())).collect();
        let mut hashes = vec![[0; 32]; pages.len()];
        sqlite::page_hashes(&pages, &mut hashes);
        for ((pgno, _), hash) in pages.into_iter().zip(hashes) {
            self.noted(pgno, hash);
        }
        Ok(())
    }

    /// Records the consecutive pages `data` holds from page `first` on (a
    /// whole number of pages): a whole new database's run is written where
    /// it belongs in one write, straight from the buffer it came in.
    pub fn run(&mut self, first: u32, data: &[u8]) -> Result<(), Error> {
        let ps = self.page_size as usize;
        let pages = self.hashes.len() as u32;
        if proto::exchange::run_pages(first, data.len(), self.page_size, pages).is_none() {
            return Err(Error::invalid(
                self.replica.display(&self.path),
                format!(
                    "a run of {} bytes from page {first} for a database of {pages} pages of {ps}",
                    data.len(),
                ),
            ));
        }
        if !self.full {
            return self.pages(&(first..).zip(data.chunks(ps)).collect::<Vec<_>>());
        }
        let at = u64::from(first - 1) * u64::from(self.page_size);
        self.write_run(data, at)
            .map_err(|e| Error::io("write", self.replica.display(&self.path), e))?;
        // the run's pages are within the table: `run_pages` checked it
        let from = first as usize - 1;
        let n = data.len() / ps.max(1);
        let shown = self.replica.display(&self.path);
        let out = self.hashes.get_mut(from..from + n).ok_or_else(|| {
            Error::invalid(&shown, format!("a run from page {first} past the table"))
        })?;
        sqlite::page_hashes_into(data, ps, first, out);
        for pgno in first..first + n as u32 {
            self.missing.remove(&(pgno - 1));
        }
        Ok(())
    }

    /// Writes a whole new database's run at `at`: gathered and written past
    /// the page cache where the file system takes it, through the page cache
    /// otherwise.
    fn write_run(&mut self, data: &[u8], at: u64) -> std::io::Result<()> {
        let ps = self.page_size as usize;
        let (dir, tmp, file) = (&self.dir, self.tmp.as_slice(), &self.file);
        let direct = self
            .direct
            .get_or_insert_with(|| Gather::open((dir, tmp, file), ps, DB_CHUNK.max(ps)));
        if let Some(g) = direct {
            return g.put(data, at, &self.file);
        }
        self.file.write_all_at(data, at)?;
        start_writeback(&self.file, at, data.len() as u64);
        Ok(())
    }

    /// Writes what direct I/O still gathers (before anything else writes
    /// the file, and before it is installed).
    fn settle_direct(&mut self) -> Result<(), Error> {
        if let Some(Some(g)) = &mut self.direct {
            g.finish(&self.file)
                .map_err(|e| Error::io("write", self.replica.display(&self.path), e))?;
        }
        Ok(())
    }

    /// Page `pgno` is staged, of blake3 hash `hash`.
    fn noted(&mut self, pgno: u32, hash: [u8; 32]) {
        self.hashes[pgno as usize - 1] = hash;
        self.missing.remove(&(pgno - 1));
    }

    /// Checks the result against `hash` and queues the update for the round's
    /// commit ([`Replica::flush`]); `meta` is set on the database file then.
    pub fn commit(mut self, hash: &[u8; 32], meta: &Meta) -> Result<(), Error> {
        let shown = self.replica.display(&self.path);
        if let Some(m) = self.missing.first() {
            return Err(Error::Delta {
                path: shown,
                msg: format!("page {} never arrived", m + 1),
            });
        }
        let got = sqlite::db_hash(self.page_size, &self.hashes);

        if &got != hash {
            return Err(Error::Delta {
                path: shown,
                msg: format!(
                    "database hash {} does not match the source's {}",
                    crate::hex(&got[..8]),
                    crate::hex(&hash[..8])
                ),
            });
        }
        if self.full {
            self.settle_direct()?;
            self.replica.meta_fd(&self.file, meta, &shown)?;
        }
        self.done = true;
        let tmp = std::mem::take(&mut self.tmp);
        self.replica.unstage(&self.path, &tmp);
        self.replica.dirty_temp(&self.path, &tmp);
        let commit = DbCommit {
            path: self.path.clone(),
            tmp,
            full: self.full,
            pages: self.hashes.len() as u32,
            meta: meta.clone(),
            table: Some(Arc::new(PageTable {
                page_size: self.page_size,
                hash: got,
                hashes: std::mem::take(&mut self.hashes),
            })),
        };
        self.replica
            .pending
            .lock()
            .map_err(|_| Error::invalid(&shown, "pending list poisoned"))?
            .dbs
            .push(commit);
        Ok(())
    }
}

impl Drop for StagedDb<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = rustix::fs::unlinkat(&self.dir, self.tmp.as_slice(), AtFlags::empty());
            self.replica.unstage(&self.path, &self.tmp);
        }
    }
}

#[cfg(test)]
#[path = "db_tests.rs"]
pub(super) mod tests;
