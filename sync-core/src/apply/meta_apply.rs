//! Metadata on the replica: owner, xattrs (POSIX ACLs included), mode and
//! times, set in the order of [`super::order`] so that no state in between
//! grants more than the old or the new one.

use super::{Replica, gid, order, os, times, uid};
use crate::{Error, Kind, Meta, meta};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The old and new [`order::Perms`] of a metadata change, and whether the
/// access ACL changes.
fn perms(
    st: &rustix::fs::Stat,
    old_acl: Option<&[u8]>,
    m: &Meta,
) -> (order::Perms, order::Perms, bool) {
    let new_acl = m
        .xattrs
        .iter()
        .find(|x| x.name == meta::ACL_ACCESS)
        .map(|x| x.value.as_slice());
    let old = order::Perms {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        acl: old_acl.is_some(),
    };
    let new = order::Perms {
        mode: m.mode & 0o7777,
        uid: m.uid,
        gid: m.gid,
        acl: new_acl.is_some(),
    };
    (old, new, old_acl != new_acl)
}

impl Replica {
    /// Owner, xattrs (ACLs included), mode and mtime on an open file or
    /// directory, in the order of [`order::steps`]: no state in between grants
    /// more than the old or the new one.
    pub(super) fn meta_fd(&self, f: &File, m: &Meta, shown_path: &str) -> Result<(), Error> {
        use xattr::FileExt as _;
        let st = rustix::fs::fstat(f).map_err(|e| Error::io("stat", shown_path, e))?;
        let existing: Vec<Vec<u8>> = match f.list_xattr() {
            Ok(names) => names
                .map(|n| std::os::unix::ffi::OsStrExt::as_bytes(n.as_os_str()).to_vec())
                .collect(),
            Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
            Err(e) => return Err(Error::io("listxattr", shown_path, e)),
        };
        let old_acl = existing
            .iter()
            .any(|n| n == meta::ACL_ACCESS)
            .then(|| f.get_xattr(os(meta::ACL_ACCESS)).ok().flatten())
            .flatten();
        let (old, new, acl_changes) = perms(&st, old_acl.as_deref(), m);
        let steps = order::steps(&old, &new, acl_changes);
        if !steps.contains(&order::Step::Chown) {
            crate::failpoint("metadata");
        }
        for step in steps {
            match step {
                order::Step::Chmod(mode) => rustix::fs::fchmod(f, Mode::from_raw_mode(mode))
                    .map_err(|e| Error::io("chmod", shown_path, e))?,
                order::Step::Chown => {
                    if let Err(e) = rustix::fs::fchown(f, Some(uid(m.uid)), Some(gid(m.gid))) {
                        self.not_preserved(shown_path, "owner", e.into())?;
                    }
                    // killed with the new owner and the interim mode
                    crate::failpoint("metadata");
                }
                order::Step::Xattrs => self.xattrs_fd(f, &existing, m, shown_path)?,
            }
        }
        rustix::fs::futimens(f, &times(m)).map_err(|e| Error::io("set times", shown_path, e))?;
        Ok(())
    }

    /// Removes the mirrored xattrs `m` does not have and sets those it has.
    fn xattrs_fd(
        &self,
        f: &File,
        existing: &[Vec<u8>],
        m: &Meta,
        shown_path: &str,
    ) -> Result<(), Error> {
        use xattr::FileExt as _;
        for name in existing {
            if meta::is_mirrored_xattr(name)
                && !m.xattrs.iter().any(|x| &x.name == name)
                && let Err(e) = f.remove_xattr(os(name))
            {
                self.not_preserved(
                    shown_path,
                    &format!("removal of xattr {}", String::from_utf8_lossy(name)),
                    e,
                )?;
            }
        }
        for x in &m.xattrs {
            if !meta::is_mirrored_xattr(&x.name) {
                continue;
            }
            if existing.contains(&x.name)
                && f.get_xattr(os(&x.name)).ok().flatten().as_ref() == Some(&x.value)
            {
                continue;
            }
            if let Err(e) = f.set_xattr(os(&x.name), &x.value) {
                self.not_preserved(
                    shown_path,
                    &format!("xattr {}", String::from_utf8_lossy(&x.name)),
                    e,
                )?;
            }
        }
        Ok(())
    }

    /// The same for a symlink or special file, by name in its held parent.
    pub(super) fn meta_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        kind: &Kind,
        m: &Meta,
        shown_path: &str,
    ) -> Result<(), Error> {
        // A special file is pinned with O_PATH first (chmodat would follow a
        // symlink swapped in at `name`) and changed through its /proc link.
        let pinned = if matches!(kind, Kind::Symlink { .. }) {
            None
        } else {
            Some(self.pin_special(dir, name, kind, shown_path)?)
        };
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io("stat", shown_path, e))?;
        // l*xattr through the held parent's /proc link: the parent cannot be
        // swapped, and the leaf is not followed.
        let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        p.push(os(name));
        let old_acl = xattr::get(&p, os(meta::ACL_ACCESS)).ok().flatten();
        let (old, new, acl_changes) = perms(&st, old_acl.as_deref(), m);
        for step in order::steps(&old, &new, acl_changes) {
            match step {
                order::Step::Chmod(mode) => {
                    if let Some(fd) = &pinned {
                        rustix::fs::chmod(
                            format!("/proc/self/fd/{}", fd.as_raw_fd()),
                            Mode::from_raw_mode(mode),
                        )
                        .map_err(|e| Error::io("chmod", shown_path, e))?;
                    }
                }
                order::Step::Chown => {
                    if let Err(e) = rustix::fs::chownat(
                        dir,
                        name,
                        Some(uid(m.uid)),
                        Some(gid(m.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    ) {
                        self.not_preserved(shown_path, "owner", e.into())?;
                    }
                }
                order::Step::Xattrs => self.xattrs_at(&p, m, shown_path)?,
            }
        }
        rustix::fs::utimensat(dir, name, &times(m), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::io("set times", shown_path, e))?;
        Ok(())
    }

    fn xattrs_at(&self, p: &Path, m: &Meta, shown_path: &str) -> Result<(), Error> {
        let existing: Vec<Vec<u8>> = match xattr::list(p) {
            Ok(names) => names
                .map(|n| std::os::unix::ffi::OsStrExt::as_bytes(n.as_os_str()).to_vec())
                .collect(),
            Err(_) => Vec::new(),
        };
        for n in &existing {
            if meta::is_mirrored_xattr(n)
                && !m.xattrs.iter().any(|x| &x.name == n)
                && let Err(e) = xattr::remove(p, os(n))
            {
                self.not_preserved(
                    shown_path,
                    &format!("removal of xattr {}", String::from_utf8_lossy(n)),
                    e,
                )?;
            }
        }
        for x in m.xattrs.iter().filter(|x| meta::is_mirrored_xattr(&x.name)) {
            if let Err(e) = xattr::set(p, os(&x.name), &x.value) {
                self.not_preserved(
                    shown_path,
                    &format!("xattr {}", String::from_utf8_lossy(&x.name)),
                    e,
                )?;
            }
        }
        Ok(())
    }

    /// The special file at `name`, pinned with `O_PATH|O_NOFOLLOW` and checked
    /// to be the kind expected.
    fn pin_special(
        &self,
        dir: BorrowedFd<'_>,
        name: &[u8],
        kind: &Kind,
        shown_path: &str,
    ) -> Result<OwnedFd, Error> {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| Error::io("open", shown_path, e))?;
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::io("stat", shown_path, e))?;
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        let expected = match kind {
            Kind::Fifo => rustix::fs::FileType::Fifo,
            Kind::Socket => rustix::fs::FileType::Socket,
            Kind::CharDev { .. } => rustix::fs::FileType::CharacterDevice,
            Kind::BlockDev { .. } => rustix::fs::FileType::BlockDevice,
            _ => {
                return Err(Error::invalid(
                    shown_path,
                    format!("unexpected {}", kind.name()),
                ));
            }
        };
        if ft != expected {
            return Err(Error::invalid(
                shown_path,
                format!("changed under us: expected a {}", kind.name()),
            ));
        }
        Ok(fd)
    }

    /// Records what the filesystem refused to keep (EPERM, ENOTSUP): a warning that
    /// reaches the operator, not a silent loss. Other errors are failures.
    pub(super) fn not_preserved(
        &self,
        shown_path: &str,
        what: &str,
        e: std::io::Error,
    ) -> Result<(), Error> {
        match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::ENOTSUP) | Some(libc::EACCES) | Some(libc::EINVAL) => {
                self.warn(format!("{shown_path}: {what} not preserved: {e}"));
                Ok(())
            }
            _ => Err(Error::io("set metadata", shown_path, e)),
        }
    }
}
