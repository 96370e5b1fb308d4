//! Durability of a round by what it changed: an `fsync` of each file it
//! wrote and each directory whose entries or metadata changed, instead of a
//! `syncfs` of the whole file system, which would also wait for every other
//! dirty page on it (a gigabyte being written on this host, a large file
//! being staged by the bulk lane) and make small rounds wait seconds.
//!
//! [`Replica`] records what each operation changes ([`Dirty`]); the round's
//! two sync points ([`Replica::flush`] before its journal, [`Replica::finish`]
//! at its end) turn that into a [`SyncPlan`] ([`plan`], a plain function)
//! and carry it out. A round that changed more than [`MAX_EACH`] paths, or
//! something an `fsync` by path cannot reach (a symlink's or a special
//! file's inode), falls back to one `syncfs`.

use super::Replica;
use crate::{Error, RelPath};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::collections::BTreeSet;

/// Above this many paths to sync, one `syncfs` is cheaper than an `fsync`
/// each.
pub(super) const MAX_EACH: usize = 64;

impl Replica {
    /// Starts, on a thread of its own, the `syncfs` this round's sync will be
    /// anyway ([`Replica::sync_plan`] is [`SyncPlan::Whole`]: more than
    /// [`MAX_EACH`] paths, or one no `fsync` reaches) and returns at once;
    /// `None`, doing nothing, when the round's sync is an `fsync` of its own
    /// paths (a small round never waits behind the whole file system) or the
    /// thread could not start. Called once a round's files are in while its
    /// databases still arrive, so that the files' writeback overlaps the
    /// transfer instead of waiting for the round's end (a first mirror's last
    /// sync spent 0.6 s writing back its small files, which start none of
    /// their own). It makes nothing durable sooner than the round needs: the
    /// round still syncs at its end.
    pub fn start_sync(&self) -> Option<std::thread::JoinHandle<()>> {
        if self.sync_plan() != SyncPlan::Whole {
            return None;
        }
        let fd = self.root.try_clone().ok()?;
        std::thread::Builder::new()
            .name("sync-ahead".into())
            .spawn(move || {
                if let Err(e) = rustix::fs::syncfs(&fd) {
                    tracing::debug!("syncfs ahead of the round's end: {e}");
                }
            })
            .ok()
    }
}

/// What a round changed so far that is not yet durable.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Dirty {
    /// Directories whose entries (or own metadata) changed.
    pub(super) dirs: BTreeSet<RelPath>,
    /// Files written or whose metadata changed in place (temp files
    /// included, by their own name).
    pub(super) files: BTreeSet<RelPath>,
    /// Something no `fsync` by path reaches changed: the whole file system
    /// is synced.
    pub(super) whole: bool,
}

impl Dirty {
    /// Whether nothing needs syncing.
    pub(super) fn is_empty(&self) -> bool {
        self.dirs.is_empty() && self.files.is_empty() && !self.whole
    }

    /// Records `p` (a directory or a file); past [`MAX_EACH`] paths the
    /// whole file system is synced and no more paths are kept (a large
    /// round's list would only cost memory).
    fn add(&mut self, p: RelPath, dir: bool) {
        if self.whole {
            return;
        }
        if dir {
            self.dirs.insert(p);
        } else {
            self.files.insert(p);
        }
        if self.dirs.len() + self.files.len() > MAX_EACH {
            self.everything();
        }
    }

    /// The whole file system is to be synced.
    fn everything(&mut self) {
        *self = Self {
            whole: true,
            ..Self::default()
        };
    }
}

/// How a round's changes are made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncPlan {
    /// Nothing changed.
    Nothing,
    /// One `syncfs` of the replica's file system.
    Whole,
    /// An `fsync` of each, in order: files first, then directories, deepest
    /// first (a directory after the entries below it), the root last.
    Each(Vec<SyncTarget>),
}

/// One path to `fsync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncTarget {
    /// Beneath the root.
    pub path: RelPath,
    /// A directory (else a regular file).
    pub dir: bool,
}

/// The plan for `d`: an `fsync` of each path when there are at most
/// [`MAX_EACH`] and nothing needs the whole file system.
pub(super) fn plan(d: &Dirty) -> SyncPlan {
    if d.whole || d.dirs.len() + d.files.len() > MAX_EACH {
        return SyncPlan::Whole;
    }
    if d.is_empty() {
        return SyncPlan::Nothing;
    }
    let files = d
        .files
        .iter()
        .filter(|p| !d.dirs.contains(*p))
        .map(|p| SyncTarget {
            path: p.clone(),
            dir: false,
        });
    let mut dirs: Vec<&RelPath> = d.dirs.iter().collect();
    // deepest first; the root (no component) last
    dirs.sort_by(|a, b| b.depth().cmp(&a.depth()).then_with(|| a.cmp(b)));
    let dirs = dirs.into_iter().map(|p| SyncTarget {
        path: p.clone(),
        dir: true,
    });
    SyncPlan::Each(files.chain(dirs).collect())
}

impl Replica {
    /// Records a directory whose entries changed in this round.
    pub(super) fn dirty_dir(&self, dir: RelPath) {
        if let Ok(mut d) = self.dirty.lock() {
            d.add(dir, true);
        }
    }

    /// Records a file written or changed in place in this round.
    pub(super) fn dirty_file(&self, path: RelPath) {
        if let Ok(mut d) = self.dirty.lock() {
            d.add(path, false);
        }
    }

    /// Records a staged temp file (`tmp` beside `path`).
    pub(super) fn dirty_temp(&self, path: &RelPath, tmp: &[u8]) {
        match path.split_last().map(|(parent, _)| parent.join(tmp)) {
            Some(Ok(p)) => self.dirty_file(p),
            _ => self.dirty_whole(),
        }
    }

    /// Records a change no `fsync` by path reaches.
    pub(super) fn dirty_whole(&self) {
        if let Ok(mut d) = self.dirty.lock() {
            d.everything();
        }
    }

    /// The plan for what this round changed so far (for tests and the
    /// debug log).
    #[must_use]
    pub fn sync_plan(&self) -> SyncPlan {
        self.dirty
            .lock()
            .map(|d| plan(&d))
            .unwrap_or(SyncPlan::Whole)
    }

    /// Makes what this round changed so far durable, and forgets it.
    pub(super) fn sync_dirty(&self) -> Result<(), Error> {
        let taken = self
            .dirty
            .lock()
            .map(|mut d| std::mem::take(&mut *d))
            .unwrap_or(Dirty {
                whole: true,
                ..Dirty::default()
            });
        let started = std::time::Instant::now();
        let (n, res) = match plan(&taken) {
            SyncPlan::Nothing => return Ok(()),
            SyncPlan::Whole => (0, self.syncfs()),
            SyncPlan::Each(targets) => (targets.len(), self.fsync_each(&targets)),
        };
        tracing::debug!(
            paths = n,
            ms = started.elapsed().as_millis() as u64,
            "synced (0 paths: syncfs)"
        );
        res
    }

    /// `fsync` of each target in turn; one that is not a file or directory
    /// we can open makes it a `syncfs` after all.
    fn fsync_each(&self, targets: &[SyncTarget]) -> Result<(), Error> {
        for t in targets {
            if !self.fsync_one(t)? {
                return self.syncfs();
            }
        }
        Ok(())
    }

    /// One `syncfs` of the replica's file system.
    pub(super) fn syncfs(&self) -> Result<(), Error> {
        rustix::fs::syncfs(&self.root).map_err(|e| Error::io("syncfs", self.root_path.display(), e))
    }

    /// `fsync` of one path; `Ok(false)` when it is neither a regular file
    /// nor a directory any more (a symlink or a special file took its
    /// place). A path that is gone needs nothing: its removal is recorded
    /// in its directory, which is synced too.
    fn fsync_one(&self, t: &SyncTarget) -> Result<bool, Error> {
        let fd = if t.dir {
            match self.dir(&t.path) {
                Ok(fd) => fd,
                Err(e) if gone(e.raw_os_error()) => return Ok(true),
                Err(e) => return Err(e),
            }
        } else {
            let (dir, _, name) = match self.parent(&t.path) {
                Ok(p) => p,
                Err(e) if gone(e.raw_os_error()) => return Ok(true),
                Err(e) => return Err(e),
            };
            match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {}
                Ok(_) => return Ok(false),
                Err(rustix::io::Errno::NOENT) => return Ok(true),
                Err(e) => return Err(Error::io("stat", self.display(&t.path), e)),
            }
            match rustix::fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => fd,
                Err(rustix::io::Errno::NOENT) => return Ok(true),
                Err(rustix::io::Errno::LOOP) => return Ok(false),
                Err(e) => return Err(Error::io("open", self.display(&t.path), e)),
            }
        };
        rustix::fs::fsync(&fd).map_err(|e| Error::io("fsync", self.display(&t.path), e))?;
        Ok(true)
    }
}

/// Whether an error opening a directory means it is gone or no longer a
/// directory (its parent, also synced, records that).
fn gone(errno: Option<i32>) -> bool {
    matches!(
        errno,
        Some(libc::ENOENT) | Some(libc::ENOTDIR) | Some(libc::ELOOP)
    )
}

#[cfg(test)]
mod tests {
    use super::super::bulk::tests::meta;
    use super::*;
    use crate::{Entry, Kind};

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    fn each(targets: &[(&str, bool)]) -> SyncPlan {
        SyncPlan::Each(
            targets
                .iter()
                .map(|(s, dir)| SyncTarget {
                    path: if s.is_empty() { RelPath::root() } else { p(s) },
                    dir: *dir,
                })
                .collect(),
        )
    }

    /// The one temp file in `dir` (beneath the replica root `root`).
    fn temp_in(root: &std::path::Path, dir: &str) -> String {
        let names: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.as_bytes().starts_with(crate::TEMP_PREFIX))
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let rel = std::path::Path::new(dir).join(&names[0]);
        rel.to_str().unwrap().to_string()
    }

    /// A sync ahead of the round's end runs only when the round's own sync
    /// is a `syncfs`: a round of a few files never syncs the file system.
    #[test]
    fn only_a_round_synced_whole_syncs_ahead() {
        let t = tempfile::tempdir().unwrap();
        let r = Replica::open(t.path()).unwrap();
        let commit = |i: usize| {
            let mut s = r.stage(&p(&format!("f{i}"))).unwrap();
            s.write(b"x").unwrap();
            s.commit(blake3::hash(b"x").as_bytes(), &meta()).unwrap();
        };
        (0..2).for_each(commit);
        assert!(r.start_sync().is_none(), "{:?}", r.sync_plan());
        (2..=MAX_EACH).for_each(commit);
        assert_eq!(r.sync_plan(), SyncPlan::Whole);
        r.start_sync().expect("started").join().unwrap();
    }

    #[test]
    fn the_plan_is_files_then_directories_deepest_first_and_bounded() {
        let mut d = Dirty::default();
        assert_eq!(plan(&d), SyncPlan::Nothing);
        for dir in ["", "a", "a/b", "c"] {
            d.add(
                if dir.is_empty() {
                    RelPath::root()
                } else {
                    p(dir)
                },
                true,
            );
        }
        d.add(p("a/b/f"), false);
        // a directory whose metadata changed is synced once, as a directory
        d.add(p("c"), false);
        assert_eq!(
            plan(&d),
            each(&[
                ("a/b/f", false),
                ("a/b", true),
                ("a", true),
                ("c", true),
                ("", true)
            ])
        );
        // past the bound: the whole file system, and the list is dropped
        for i in 0..MAX_EACH {
            d.add(p(&format!("f{i}")), false);
        }
        assert_eq!(plan(&d), SyncPlan::Whole);
        assert!(d.whole && d.files.is_empty() && d.dirs.is_empty());
        d.add(p("g"), false);
        assert!(d.files.is_empty());
    }

    #[test]
    fn a_round_syncs_what_it_wrote_before_its_rename_and_what_it_changed_after() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("old")).unwrap();
        std::fs::write(d.path().join("old/x"), b"gone").unwrap();
        std::fs::write(d.path().join("y"), b"meta only").unwrap();
        let r = Replica::open(d.path()).unwrap();
        assert_eq!(r.sync_plan(), SyncPlan::Nothing);
        // what the prepare phase and the content do
        r.mkdir(&p("a")).unwrap();
        r.mkdir(&p("a/b")).unwrap();
        let mut s = r.stage(&p("a/b/new")).unwrap();
        s.write(b"new content").unwrap();
        s.commit(blake3::hash(b"new content").as_bytes(), &meta())
            .unwrap();
        r.remove_all(&p("old/x")).unwrap();
        // before the rename: the temp file, and every directory on the way
        // to it and whose entries changed
        let tmp = temp_in(d.path(), "a/b");
        assert_eq!(
            r.sync_plan(),
            each(&[
                (&tmp, false),
                ("a/b", true),
                ("a", true),
                ("old", true),
                ("", true)
            ])
        );
        r.flush().unwrap();
        assert_eq!(
            std::fs::read(d.path().join("a/b/new")).unwrap(),
            b"new content"
        );
        // after it: the directory of the new name
        assert_eq!(r.sync_plan(), each(&[("a/b", true)]));
        let y = Entry {
            path: p("y"),
            kind: Kind::File {
                size: 9,
                hash: *blake3::hash(b"meta only").as_bytes(),
            },
            meta: meta(),
        };
        r.set_meta(&y).unwrap();
        assert_eq!(r.sync_plan(), each(&[("y", false), ("a/b", true)]));
        r.finish().unwrap();
        assert_eq!(r.sync_plan(), SyncPlan::Nothing);
    }

    #[test]
    fn a_journaled_round_syncs_its_renames_before_the_journal_goes() {
        let d = tempfile::tempdir().unwrap();
        let r = Replica::open(d.path()).unwrap();
        for name in ["one", "two"] {
            let mut s = r.stage(&p(name)).unwrap();
            s.write(name.as_bytes()).unwrap();
            s.commit(blake3::hash(name.as_bytes()).as_bytes(), &meta())
                .unwrap();
        }
        r.flush().unwrap();
        assert_eq!(std::fs::read(d.path().join("two")).unwrap(), b"two");
        // the renames were synced before the journal's removal; that
        // removal is the root's, synced at the end
        assert_eq!(r.sync_plan(), each(&[("", true)]));
        r.finish().unwrap();
        assert_eq!(r.sync_plan(), SyncPlan::Nothing);
    }

    #[test]
    fn what_no_fsync_reaches_syncs_the_whole_file_system() {
        let d = tempfile::tempdir().unwrap();
        let r = Replica::open(d.path()).unwrap();
        let link = Entry {
            path: p("l"),
            kind: Kind::Symlink {
                target: b"t".to_vec(),
            },
            meta: meta(),
        };
        r.create(&link).unwrap();
        assert_eq!(r.sync_plan(), SyncPlan::Whole);
        r.finish().unwrap();
        assert_eq!(r.sync_plan(), SyncPlan::Nothing);
    }
}
