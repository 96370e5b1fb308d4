//! One round's transaction on the replica: staged temp files made durable
//! ([`super::durable`]), the journal, and the renames and database updates it
//! lists.

use super::direct::{DIRECT_MIN, FILE_CHUNK, Gather};
use super::*;
use crate::{Error, Meta, RelPath};
use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt as _;

impl Replica {
    /// A new temp file (mode 0600, never an existing name) in `path`'s
    /// directory, recorded as staging: its directory, name and file.
    pub(super) fn temp_beside(&self, path: &RelPath) -> Result<(OwnedFd, Vec<u8>, File), Error> {
        let (dir, parent, _) = self.parent(path)?;
        self.temp_in(dir, parent, path)
    }

    /// A new temp file (mode 0600) in `dir` (the directory `parent`), for
    /// `path`, recorded as staging: its directory, name and file.
    pub(super) fn temp_in(
        &self,
        dir: OwnedFd,
        parent: RelPath,
        path: &RelPath,
    ) -> Result<(OwnedFd, Vec<u8>, File), Error> {
        let tmp = temp_name();
        // the temp file's name must be durable before a journal names it
        self.dirty_dir(parent.clone());
        if let Ok(mut s) = self.staging.lock() {
            s.insert((parent, tmp.clone()));
        }
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_slice(),
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Error::io("create temp file for", self.display(path), e))?;
        Ok((dir, tmp, File::from(fd)))
    }

    /// Starts writing new content for `path` into a temp file beside it.
    pub fn stage(&self, path: &RelPath) -> Result<Staged<'_>, Error> {
        let (dir, tmp, file) = self.temp_beside(path)?;
        Ok(Staged::new(self, dir, tmp, path.clone(), file))
    }

    /// Carries out the round: every staged file is made durable (with what
    /// the round changed so far: [`Replica::sync_dirty`]), the journal is
    /// written, then renames and database updates run, and the journal is
    /// removed.
    pub fn flush(&self) -> Result<(), Error> {
        let batch = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => {
                return Err(Error::invalid(
                    self.root_path.display(),
                    "pending list poisoned",
                ));
            }
        };
        if batch.renames.is_empty() && batch.dbs.is_empty() {
            return Ok(());
        }
        // A lone database update is one SQLite transaction, durable by itself:
        // its staged pages need no sync first.
        let lone_db = batch.renames.is_empty() && batch.dbs.len() == 1 && !batch.dbs[0].full;
        if !lone_db {
            self.sync_dirty()?;
        }
        crate::failpoint("synced");
        let journal = Journal {
            renames: batch.renames,
            dbs: batch.dbs,
        };
        // One rename is atomic by itself; a database update is one SQLite
        // transaction (or one rename).
        if journal.renames.len() + journal.dbs.len() == 1 {
            return self.carry_out(journal, false);
        }
        // The journal lives in the root: its creation and removal must not
        // move the root's mtime when the round does not.
        let root_times = rustix::fs::fstat(&self.root).ok();
        if let Err(e) = self.write_journal(&journal) {
            // Nothing was carried out: remove what was staged.
            for (p, t) in journal
                .renames
                .iter()
                .map(|(p, t)| (p, t))
                .chain(journal.dbs.iter().map(|d| (&d.path, &d.tmp)))
            {
                if let Some((parent, _)) = p.split_last()
                    && let Ok(dir) = self.dir(&parent)
                {
                    let _ = rustix::fs::unlinkat(&dir, t.as_slice(), AtFlags::empty());
                }
            }
            return Err(e);
        }
        crate::failpoint("journaled");
        self.carry_out(journal, true)?;
        let root_touched = self
            .touched
            .lock()
            .map(|t| t.contains(&RelPath::root()))
            .unwrap_or(true);
        if let (Some(st), false) = (root_times, root_touched) {
            let t = Timestamps {
                last_access: Timespec {
                    tv_sec: 0,
                    tv_nsec: rustix::fs::UTIME_OMIT,
                },
                last_modification: ts(st.st_mtime, st.st_mtime_nsec as u32),
            };
            let _ = rustix::fs::utimensat(&self.root, ".", &t, AtFlags::empty());
        }
        Ok(())
    }

    pub(super) fn write_journal(&self, j: &Journal) -> Result<(), Error> {
        let bytes = bincode::serde::encode_to_vec(j, bincode::config::standard())
            .map_err(|e| Error::invalid(self.root_path.display(), format!("journal: {e}")))?;
        let tmp = temp_name();
        let shown = self.root_path.display();
        let fd = rustix::fs::openat(
            &self.root,
            tmp.as_slice(),
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| Error::io("create journal", &shown, e))?;
        let f = File::from(fd);
        let written = f
            .write_all_at(&bytes, 0)
            .and_then(|()| f.sync_data())
            .map_err(|e| Error::io("write journal", &shown, e))
            .and_then(|()| {
                rustix::fs::renameat(&self.root, tmp.as_slice(), &self.root, JOURNAL)
                    .map_err(|e| Error::io("rename journal", &shown, e))
            })
            .and_then(|()| {
                rustix::fs::fsync(&self.root).map_err(|e| Error::io("fsync", &shown, e))
            });
        if written.is_err() {
            let _ = rustix::fs::unlinkat(&self.root, tmp.as_slice(), AtFlags::empty());
        }
        written
    }

    /// Renames and database updates of a journal; idempotent, so a journal
    /// found after a crash is simply carried out again.
    pub(super) fn carry_out(&self, mut j: Journal, journaled: bool) -> Result<(), Error> {
        self.rename_all(&mut j.renames)?;
        for db in j.dbs {
            self.update_db(db)?;
        }
        if !journaled {
            return Ok(());
        }
        crate::failpoint("before-final-sync");
        // The renames and updates are durable before the journal goes.
        self.sync_dirty()?;
        match rustix::fs::unlinkat(&self.root, JOURNAL, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {
                self.dirty_dir(RelPath::root());
                Ok(())
            }
            Err(e) => Err(Error::io("remove journal", self.root_path.display(), e)),
        }
    }

    /// Renames staged files into place: by directory (sorted in place, a
    /// stable sort: a path staged twice keeps its order; a list of parents
    /// beside the renames was 25 MB at 300,000 files), each directory opened
    /// once for all its renames, the directories on every core (a first
    /// mirror renames 30,000 files in 16,800 directories: 0.65 s one by one
    /// on this machine).
    fn rename_all(&self, renames: &mut [(RelPath, Vec<u8>)]) -> Result<(), Error> {
        use rayon::prelude::*;
        // the root has no parent: refused before anything is renamed
        if let Some((root, _)) = renames.iter().find(|(p, _)| p.is_root()) {
            self.split(root)?;
        }
        fn parent(p: &RelPath) -> Option<&[u8]> {
            p.split_last_bytes().map(|(parent, _)| parent)
        }
        renames.sort_by(|a, b| parent(&a.0).cmp(&parent(&b.0)));
        renames
            .chunk_by(|a, b| parent(&a.0) == parent(&b.0))
            .collect::<Vec<_>>()
            .par_iter()
            .try_for_each(|group| self.rename_in(group))
    }

    /// Renames the staged files of one directory.
    fn rename_in(&self, group: &[(RelPath, Vec<u8>)]) -> Result<(), Error> {
        let Some((parent, _)) = group.first().and_then(|(p, _)| p.split_last()) else {
            return Ok(());
        };
        let dir = self.dir(&parent)?;
        let mut renamed = false;
        let mut done = Ok(());
        for (path, tmp) in group {
            let name = path.split_last_bytes().map_or(&[][..], |(_, name)| name);
            match rustix::fs::renameat(&dir, tmp.as_slice(), &dir, name) {
                Ok(()) => {
                    renamed = true;
                    crate::failpoint("renamed");
                }
                // done before the crash
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => {
                    done = Err(Error::io("rename", self.display(path), e));
                    break;
                }
            }
        }
        if renamed {
            self.touch(parent);
        }
        done
    }

    /// The directories this session changed (their mtimes moved) and has not
    /// yet put back.
    #[must_use]
    pub fn touched_dirs(&self) -> Vec<RelPath> {
        self.touched
            .lock()
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Starts a new session: forgets what earlier sessions touched or staged
    /// (an aborted session's temp files are swept by the next full scan).
    /// What they changed and did not sync yet is synced by the next round.
    pub fn reset(&self) {
        if let Ok(mut t) = self.touched.lock() {
            t.clear();
        }
        if let Ok(mut p) = self.pending.lock() {
            *p = Pending::default();
        }
        if let Ok(mut s) = self.staging.lock() {
            s.clear();
        }
        let _ = self.take_warnings();
    }

    /// Gives up a failed run: removes every temp file still being written or
    /// waiting for its rename, so the destination holds only what it held before
    /// (plus whole files renamed by earlier batches).
    pub fn abort(&self) {
        let staged = self
            .staging
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let pending = self
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        let pending = pending
            .renames
            .into_iter()
            .chain(pending.dbs.into_iter().map(|d| (d.path, d.tmp)))
            .filter_map(|(path, tmp)| path.split_last().map(|(parent, _)| (parent, tmp)));
        for (parent, tmp) in staged.into_iter().chain(pending) {
            if let Ok(dir) = self.dir(&parent) {
                let _ = rustix::fs::unlinkat(&dir, tmp.as_slice(), AtFlags::empty());
            }
        }
    }

    pub(super) fn unstage(&self, path: &RelPath, tmp: &[u8]) {
        if let (Some((parent, _)), Ok(mut s)) = (path.split_last(), self.staging.lock()) {
            s.remove(&(parent, tmp.to_vec()));
        }
    }

    /// Flushes what is staged and makes everything the round changed
    /// durable: its renames, directories and metadata.
    pub fn finish(&self) -> Result<(), Error> {
        self.flush()?;
        self.sync_dirty()
    }

    pub(super) fn queue(&self, path: RelPath, tmp: Vec<u8>) -> Result<(), Error> {
        self.dirty_temp(&path, &tmp);
        self.pending
            .lock()
            .map_err(|_| Error::invalid(self.root_path.display(), "pending list poisoned"))?
            .renames
            .push((path, tmp));
        Ok(())
    }
}

/// New content being written beside its target. Dropped without
/// [`Staged::commit`], the temp file is removed.
#[derive(Debug)]
pub struct Staged<'r> {
    pub(super) replica: &'r Replica,
    dir: OwnedFd,
    pub(super) tmp: Vec<u8>,
    pub(super) path: RelPath,
    pub(super) file: File,
    pub(super) hasher: blake3::Hasher,
    pub(super) len: u64,
    /// Where the bytes written end: short of `len` when the content ends
    /// in a hole, which only the truncate at the end makes.
    pub(super) end: u64,
    /// Bytes whose writeback was started ([`Staged::pace`]).
    pub(super) started: u64,
    /// A large file's content on its way past the page cache
    /// ([`Staged::sized`]).
    pub(super) direct: Option<Gather>,
    pub(super) done: bool,
}

impl<'r> Staged<'r> {
    pub(super) fn new(
        replica: &'r Replica,
        dir: OwnedFd,
        tmp: Vec<u8>,
        path: RelPath,
        file: File,
    ) -> Self {
        Self {
            replica,
            dir,
            tmp,
            path,
            file,
            hasher: blake3::Hasher::new(),
            len: 0,
            end: 0,
            started: 0,
            direct: None,
            done: false,
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Writes of staged content this thread made (tests count them).
    static WRITES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Staged<'_> {
    /// The staged file will hold `size` bytes: at [`DIRECT_MIN`] or more its
    /// content is written past the page cache where the file system takes
    /// direct I/O (see [`Gather`]). Call before the first write.
    #[must_use]
    pub fn sized(mut self, size: u64) -> Self {
        if size >= DIRECT_MIN && self.len == 0 {
            let chunk = usize::try_from(size)
                .map_or(FILE_CHUNK, |n| n.min(FILE_CHUNK))
                .next_multiple_of(HOLE_BLOCK);
            let file = (&self.dir, self.tmp.as_slice(), &self.file);
            self.direct = Gather::open(file, HOLE_BLOCK, chunk);
        }
        self
    }

    /// Appends bytes; aligned all-zero blocks become holes. Each run of
    /// blocks between holes is one write: one system call a 4 KiB block
    /// cost a first mirror's replica a fifth of its CPU (the calls, and the
    /// kernel zeroing the rest of each new large folio it only began).
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        self.hasher.update(data);
        let (mut at, mut run) = (0, 0);
        while at < data.len() {
            let in_block = ((self.len + at as u64) % HOLE_BLOCK as u64) as usize;
            let n = (HOLE_BLOCK - in_block).min(data.len() - at);
            let piece = &data[at..at + n];
            if in_block == 0 && n == HOLE_BLOCK && piece.iter().all(|&b| b == 0) {
                self.write_run(&data[run..at], run)?;
                run = at + n;
            }
            at += n;
        }
        self.write_run(&data[run..], run)?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Writes `bytes`, which lie `from` bytes past the end of what was
    /// written before this call.
    fn write_run(&mut self, bytes: &[u8], from: usize) -> Result<(), Error> {
        if bytes.is_empty() {
            return Ok(());
        }
        let at = self.len + from as u64;
        #[cfg(test)]
        WRITES.with(|n| n.set(n.get() + 1));
        match &mut self.direct {
            Some(g) => g.put(bytes, at, &self.file),
            None => self.file.write_all_at(bytes, at),
        }
        .map_err(|e| Error::io("write", self.replica.display(&self.path), e))?;
        self.end = at + bytes.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes what direct I/O still gathers, and gives the (new, empty-born)
    /// temp file its length when its content ends in a hole; every other one
    /// has it already (a truncate was a metadata update per file: 3% of a
    /// replica's first mirror).
    pub(super) fn size_to_len(&mut self, shown: &str) -> Result<(), Error> {
        if let Some(g) = &mut self.direct {
            g.finish(&self.file)
                .map_err(|e| Error::io("write", shown, e))?;
        }
        if self.end == self.len {
            return Ok(());
        }
        rustix::fs::ftruncate(&self.file, self.len).map_err(|e| Error::io("truncate", shown, e))
    }

    /// The blake3 of what was written so far.
    #[must_use]
    pub fn content_hash(&self) -> [u8; 32] {
        *self.hasher.finalize().as_bytes()
    }

    /// Checks the content against `hash`, sets `meta` on the fd and queues the
    /// rename into place (done by [`Replica::flush`]).
    pub fn commit(mut self, hash: &[u8; 32], meta: &Meta) -> Result<(), Error> {
        crate::failpoint("temp-written");
        let shown_path = self.replica.display(&self.path);
        let got = *self.hasher.finalize().as_bytes();
        if &got != hash {
            return Err(Error::Delta {
                path: shown_path,
                msg: format!(
                    "content hash {} does not match the source's {}",
                    crate::hex(&got[..8]),
                    crate::hex(&hash[..8])
                ),
            });
        }
        self.size_to_len(&shown_path)?;
        // (content written directly has nothing to write back)
        if self.len >= 1 << 20 && self.direct.is_none() {
            start_writeback(&self.file, 0, 0);
        }
        self.replica.meta_fd(&self.file, meta, &shown_path)?;
        self.done = true;
        let tmp = std::mem::take(&mut self.tmp);
        self.replica.unstage(&self.path, &tmp);
        self.replica.queue(self.path.clone(), tmp)
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = rustix::fs::unlinkat(&self.dir, self.tmp.as_slice(), AtFlags::empty());
            self.replica.unstage(&self.path, &self.tmp);
        }
    }
}

/// Starts writing back `len` bytes of `file` from `offset` (0: to the end)
/// without waiting: the round's sync then finds most of the data already on
/// disk instead of flushing the whole round at its end, and the disk works
/// while the network does. Best effort: an error only means the sync does
/// all the work, as before.
pub(super) fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    writeback(file, offset, len, libc::SYNC_FILE_RANGE_WRITE);
}

/// Writes back `len` bytes of `file` from `offset` and waits until they are
/// written (not durable: no metadata, no device cache flush). Best effort.
pub(super) fn wait_writeback(file: &std::fs::File, offset: u64, len: u64) {
    let all = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    writeback(file, offset, len, all);
}

#[allow(unsafe_code)]
fn writeback(file: &std::fs::File, offset: u64, len: u64, flags: libc::c_uint) {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range only reads its integer arguments; the fd is
    // open for as long as `file` is borrowed; the flags only start and wait
    // for writeback of the file's own pages.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off, n, flags);
    }
}

#[cfg(test)]
#[path = "round_tests.rs"]
mod tests;
