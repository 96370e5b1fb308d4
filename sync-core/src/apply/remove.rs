//! Removal on the replica: deletions recursing through held directory fds,
//! never following a symlink, and the sweep of our own temp files.

use super::{JOURNAL, Replica};
use crate::{Error, RelPath};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::os::fd::{AsFd, BorrowedFd};

impl Replica {
    /// Removes our temp files found by a scan. Only entries with exactly the
    /// shape of our names ([`crate::is_own_temp_name`]) that are not
    /// directories are removed; anything else with the prefix (a local user's
    /// directory or notes) is left alone with a warning, and an entry that
    /// cannot be removed is a warning too: never a failed round.
    pub fn sweep_temps(&self, temps: &[RelPath]) -> Result<usize, Error> {
        let mut n = 0;
        for t in temps {
            let Some((parent, name)) = t.split_last() else {
                continue;
            };
            if parent.is_root() && name == JOURNAL {
                continue;
            }
            // Being written or staged ahead by this session (the bulk lane).
            if self
                .staging
                .lock()
                .is_ok_and(|s| s.contains(&(parent.clone(), name.to_vec())))
            {
                continue;
            }
            if !crate::is_own_temp_name(name) {
                self.warn(format!(
                    "{}: not an understudy temp file (foreign name with the reserved \
                     prefix); left alone",
                    self.display(t)
                ));
                continue;
            }
            let Ok(dir) = self.dir(&parent) else {
                continue; // its directory went away or is a symlink
            };
            match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st)
                    if rustix::fs::FileType::from_raw_mode(st.st_mode)
                        == rustix::fs::FileType::Directory =>
                {
                    self.warn(format!(
                        "{}: a directory with a temp-file name, not ours; left alone",
                        self.display(t)
                    ));
                    continue;
                }
                // Ours are made by this agent's user: a file of that shape
                // owned by another user is theirs (a planted name, a local
                // user's file). (One of ours chowned to the source's owner
                // before a crash is left too: a warning, not a loss.)
                Ok(st) if st.st_uid != rustix::process::geteuid().as_raw() => {
                    self.warn(format!(
                        "{}: owned by uid {}, not this agent's: not our temp file; left alone",
                        self.display(t),
                        st.st_uid
                    ));
                    continue;
                }
                Ok(_) => {}
                Err(_) => continue,
            }
            match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
                Ok(()) => {
                    n += 1;
                    self.touch(parent);
                }
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => self.warn(format!("{}: temp file not removed: {e}", self.display(t))),
            }
        }
        Ok(n)
    }

    /// Removes `path` and everything below it, never following a symlink.
    pub fn remove_all(&self, path: &RelPath) -> Result<(), Error> {
        self.remove_all_but(path, &|_, _| false).map(|_| ())
    }

    /// Removes `path` and everything below it except the entries `keep`
    /// names (excluded and overlay paths: `keep(path, is_dir)`); a directory
    /// holding a kept entry is emptied of the rest and kept. Returns whether
    /// `path` is gone.
    pub fn remove_all_but(
        &self,
        path: &RelPath,
        keep: &dyn Fn(&RelPath, bool) -> bool,
    ) -> Result<bool, Error> {
        let (dir, parent, name) = match self.parent(path) {
            Ok(p) => p,
            // no parent directory: nothing to remove
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let gone = self.remove_at(dir.as_fd(), name, path, keep)?;
        self.touch(parent);
        Ok(gone)
    }

    fn remove_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        shown: &RelPath,
        keep: &dyn Fn(&RelPath, bool) -> bool,
    ) -> Result<bool, Error> {
        let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => return Ok(true),
            Err(e) => return Err(Error::io("stat", self.display(shown), e)),
        };
        let is_dir =
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
        if keep(shown, is_dir) {
            return Ok(false);
        }
        if !is_dir {
            return rustix::fs::unlinkat(dir, name, AtFlags::empty())
                .map(|()| true)
                .map_err(|e| Error::io("remove", self.display(shown), e));
        }
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open directory", self.display(shown), e))?;
        let mut names = Vec::new();
        let rd = rustix::fs::Dir::read_from(&sub)
            .map_err(|e| Error::io("read directory", self.display(shown), e))?;
        for de in rd {
            let de = de.map_err(|e| Error::io("read directory", self.display(shown), e))?;
            let n = de.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(n.to_vec());
            }
        }
        let mut all_gone = true;
        for n in names {
            let child = shown.join(&n).unwrap_or_else(|_| shown.clone());
            all_gone &= self.remove_at(sub.as_fd(), &n, &child, keep)?;
        }
        if !all_gone {
            self.touch(shown.clone());
            return Ok(false);
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
            .map(|()| true)
            .map_err(|e| Error::io("remove directory", self.display(shown), e))
    }
}
