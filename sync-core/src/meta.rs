//! Reading metadata from a tree, and the attribute names that carry ACLs.

use crate::{Error, Meta, Xattr};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The xattr that holds a POSIX access ACL.
pub const ACL_ACCESS: &[u8] = b"system.posix_acl_access";
/// The xattr that holds a directory's POSIX default ACL.
pub const ACL_DEFAULT: &[u8] = b"system.posix_acl_default";

/// Base metadata from a `stat` result (xattrs left empty).
#[must_use]
pub fn from_stat(st: &std::fs::Metadata) -> Meta {
    Meta {
        mode: st.mode() & 0o7777,
        uid: st.uid(),
        gid: st.gid(),
        mtime_sec: st.mtime(),
        mtime_nsec: u32::try_from(st.mtime_nsec()).unwrap_or(0),
        xattrs: Vec::new(),
    }
}

/// Every extended attribute of `path` (not following a final symlink), of every
/// namespace the process can read, sorted by name. POSIX ACLs come as
/// [`ACL_ACCESS`] / [`ACL_DEFAULT`], exactly as the kernel stores them.
pub fn read_xattrs(path: &Path) -> Result<Vec<Xattr>, Error> {
    use std::os::unix::ffi::OsStrExt;
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listxattr", path.display(), e)),
    };
    let mut out = Vec::new();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(value)) => out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            }),
            // vanished between list and get
            Ok(None) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => {
                return Err(Error::io(
                    "getxattr",
                    format!("{} {:?}", path.display(), name),
                    e,
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// [`read_xattrs`] of the entry `name` in the open directory `dir`, with
/// `listxattrat`/`getxattrat` (no path resolved but `name`, no symlink
/// followed); by `path` (the same entry, also named in errors) where the
/// kernel lacks them (`path` is only built then, or for an error). `list` is
/// scratch space kept between calls.
pub(crate) fn read_xattrs_at(
    dir: rustix::fd::BorrowedFd<'_>,
    name: &std::ffi::CStr,
    path: impl Fn() -> std::path::PathBuf,
    list: &mut Vec<u8>,
) -> Result<Vec<Xattr>, Error> {
    match crate::fsat::list_xattrs_at(dir, name, list) {
        Ok(true) => {}
        Ok(false) => return read_xattrs(&path()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("listxattr", path().display(), e)),
    }
    let mut out = Vec::new();
    for attr in list.split_inclusive(|&b| b == 0) {
        let Ok(attr) = std::ffi::CStr::from_bytes_with_nul(attr) else {
            continue; // no trailing NUL: not a name
        };
        match crate::fsat::get_xattr_at(dir, name, attr) {
            Ok(Some(value)) => out.push(Xattr {
                name: attr.to_bytes().to_vec(),
                value,
            }),
            Ok(None) => return read_xattrs(&path()),
            // vanished between list and get
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => {
                return Err(Error::io(
                    "getxattr",
                    format!("{} {:?}", path().display(), attr),
                    e,
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether an xattr name is the kind the replica should try to keep exactly as
/// the source has it. `security.selinux` is labelled by the replica's own policy.
#[must_use]
pub fn is_mirrored_xattr(name: &[u8]) -> bool {
    name != b"security.selinux"
}
