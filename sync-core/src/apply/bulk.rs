//! Content staged ahead of a round (the agent's bulk lane): a large file is
//! written to a temp file in the root while rounds of small changes go on;
//! the round that carries its entry installs it like any staged file.
//!
//! Nothing is installed here: [`Replica::prestage`] writes a temp file in the
//! root (recorded as staging, so [`Replica::abort`] removes it, and named as
//! the replica's own temp files, so a crash leaves only what the next full
//! round sweeps); [`Staged::keep`] checks and syncs it; [`Replica::adopt`]
//! moves it beside its target and queues the rename with the round's others,
//! behind the round's sync and journal (all-or-nothing, never torn).

use super::*;
use crate::{Error, Meta, RelPath};
use rustix::fs::{Mode, OFlags};
use std::fs::File;

/// Content staged ahead of its round, checked against what the source
/// announced at its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The temp file's name, in the root.
    pub tmp: Vec<u8>,
    /// Its size.
    pub size: u64,
    /// Its blake3.
    pub hash: [u8; 32],
}

impl Replica {
    /// Starts staging content for `path` ahead of a round: a temp file in the
    /// root (the target's directory may not exist yet).
    pub fn prestage(&self, path: &RelPath) -> Result<Staged<'_>, Error> {
        let root = RelPath::root();
        let dir = self.dir(&root)?;
        let (dir, tmp, file) = self.temp_in(dir, root, path)?;
        Ok(Staged::new(self, dir, tmp, path.clone(), file))
    }

    /// Installs content staged ahead of this round at `path` with `meta`:
    /// moved beside its target and queued for the round's renames. `false`
    /// when it is gone (swept by a full round, another file system below
    /// the root): the round then fetches the file as usual.
    pub fn adopt(&self, kept: &Kept, path: &RelPath, meta: &Meta) -> Result<bool, Error> {
        let root = RelPath::root();
        let (dir, parent, _) = self.parent(path)?;
        let tmp = temp_name();
        if let Ok(mut s) = self.staging.lock() {
            s.insert((parent.clone(), tmp.clone()));
        }
        let unstage = |p: &RelPath, t: &[u8]| {
            if let Ok(mut s) = self.staging.lock() {
                s.remove(&(p.clone(), t.to_vec()));
            }
        };
        match rustix::fs::renameat(&self.root, kept.tmp.as_slice(), &dir, tmp.as_slice()) {
            Ok(()) => {
                unstage(&root, &kept.tmp);
                // moved: both names durable before a journal names it
                self.dirty_dir(root.clone());
                self.dirty_dir(parent.clone());
            }
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::XDEV) => {
                unstage(&parent, &tmp);
                return Ok(false);
            }
            Err(e) => {
                unstage(&parent, &tmp);
                return Err(Error::io("move staged content for", self.display(path), e));
            }
        }
        let shown = self.display(path);
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_slice(),
            OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open staged content for", &shown, e))?;
        let file = File::from(fd);
        let st = rustix::fs::fstat(&file).map_err(|e| Error::io("stat", &shown, e))?;
        if st.st_size as u64 != kept.size {
            return Err(Error::invalid(shown, "staged content changed size"));
        }
        self.meta_fd(&file, meta, &shown)?;
        unstage(&parent, &tmp);
        self.queue(path.clone(), tmp)?;
        Ok(true)
    }

    /// Removes content staged ahead of a round that no round will carry.
    pub fn discard(&self, kept: &Kept) {
        let _ = rustix::fs::unlinkat(
            &self.root,
            kept.tmp.as_slice(),
            rustix::fs::AtFlags::empty(),
        );
        if let Ok(mut s) = self.staging.lock() {
            s.remove(&(RelPath::root(), kept.tmp.clone()));
        }
    }
}

/// Content staged ahead is written back as it arrives, and waited for once
/// it lies this far behind the last byte: a gigabyte arriving at network
/// speed never piles up as dirty pages (which a `syncfs` would wait for) nor
/// goes to the disk in bursts (which every round's `fsync` would queue
/// behind), and it costs no journal commit until it is kept.
pub const WRITEBACK_BEHIND: u64 = 8 << 20;
/// Writeback of a stage is started in steps of this many bytes.
const WRITEBACK_STEP: u64 = 1 << 20;

impl Staged<'_> {
    /// Makes what was written so far durable.
    pub fn sync(&self) -> Result<(), Error> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync", self.replica.display(&self.path), e))
    }

    /// Paces the writeback of content staged ahead (call after each write):
    /// starts it for what arrived since the last step, and waits for what
    /// lies [`WRITEBACK_BEHIND`] bytes back.
    pub fn pace(&mut self) {
        // (content written directly leaves no dirty pages behind)
        if self.direct.is_some() || self.len - self.started < WRITEBACK_STEP {
            return;
        }
        round::start_writeback(&self.file, self.started, self.len - self.started);
        // (pages already written back cost nothing to wait for)
        let behind = self.started.saturating_sub(WRITEBACK_BEHIND);
        if behind > 0 {
            round::wait_writeback(&self.file, 0, behind);
        }
        self.started = self.len;
    }

    /// Content staged ahead of its round: checked against `hash` and made
    /// durable; kept in the root (still recorded as staging) until
    /// [`Replica::adopt`] or [`Replica::discard`].
    pub fn keep(mut self, hash: &[u8; 32]) -> Result<Kept, Error> {
        let got = *self.hasher.finalize().as_bytes();
        if &got != hash {
            return Err(Error::Delta {
                path: self.replica.display(&self.path),
                msg: "staged content does not match the source's hash".into(),
            });
        }
        let shown = self.replica.display(&self.path);
        self.size_to_len(&shown)?;
        self.sync()?;
        self.done = true;
        Ok(Kept {
            tmp: std::mem::take(&mut self.tmp),
            size: self.len,
            hash: got,
        })
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Metadata for tests' files.
    pub(in crate::apply) fn meta() -> Meta {
        Meta {
            mode: 0o640,
            uid: 0,
            gid: 0,
            mtime_sec: 1_700_000_000,
            mtime_nsec: 5,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn staged_ahead_content_is_installed_only_by_the_round_that_adopts_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("media")).unwrap();
        std::fs::write(d.path().join("media/big.bin"), b"old").unwrap();
        let r = Replica::open(d.path()).unwrap();
        let path = RelPath::new(b"media/big.bin".to_vec()).unwrap();
        let data = vec![7u8; 300_000];
        let mut s = r.prestage(&path).unwrap();
        s.write(&data).unwrap();
        let kept = s.keep(blake3::hash(&data).as_bytes()).unwrap();
        // staged, not installed
        assert_eq!(
            std::fs::read(d.path().join("media/big.bin")).unwrap(),
            b"old"
        );
        assert!(
            d.path()
                .join(std::str::from_utf8(&kept.tmp).unwrap())
                .exists()
        );
        assert!(r.adopt(&kept, &path, &meta()).unwrap());
        // queued behind the round's flush
        assert_eq!(
            std::fs::read(d.path().join("media/big.bin")).unwrap(),
            b"old"
        );
        r.finish().unwrap();
        assert_eq!(std::fs::read(d.path().join("media/big.bin")).unwrap(), data);
        use std::os::unix::fs::MetadataExt;
        let st = std::fs::metadata(d.path().join("media/big.bin")).unwrap();
        assert_eq!((st.mode() & 0o7777, st.mtime_nsec()), (0o640, 5));
        // nothing left behind
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "{left:?}");
        // gone content is not adopted: the round fetches it instead
        assert!(!r.adopt(&kept, &path, &meta()).unwrap());
    }

    #[test]
    fn wrong_content_is_not_kept_and_an_aborted_session_leaves_no_stage() {
        let d = tempfile::tempdir().unwrap();
        let r = Replica::open(d.path()).unwrap();
        let path = RelPath::new(b"big.bin".to_vec()).unwrap();
        let mut s = r.prestage(&path).unwrap();
        s.write(b"abc").unwrap();
        assert!(s.keep(&[0; 32]).is_err());
        let mut s = r.prestage(&path).unwrap();
        s.write(b"abc").unwrap();
        let kept = s.keep(blake3::hash(b"abc").as_bytes()).unwrap();
        let tmp = d.path().join(std::str::from_utf8(&kept.tmp).unwrap());
        // a full round's sweep leaves this session's stages alone
        let found = RelPath::new(kept.tmp.clone()).unwrap();
        assert_eq!(r.sweep_temps(&[found]).unwrap(), 0);
        assert!(tmp.exists());
        r.abort();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
