//! How a scan tells live SQLite databases and their side files.

use crate::RelPath;
use crate::filter::Filter;
use crate::scan::abs;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::fs;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

/// How a scan tells live SQLite databases: configured globs, databases this
/// process already holds, and the header of files whose size is a multiple of
/// 512. A database is listed in [`crate::scan::ScanReport::databases`] and never read; its
/// `-wal`, `-shm` and `-journal` files are left out of the manifest.
#[derive(Debug, Default)]
pub struct DbDetect {
    /// Configured database paths (gitignore-style patterns).
    pub globs: Filter,
    /// Databases held open by this process: never opened with plain file I/O.
    pub known: std::sync::RwLock<std::collections::HashSet<RelPath>>,
    /// The files (device, inode) of databases this process holds or is about
    /// to: another name of one (a hard link) is taken for a database unread,
    /// since closing a descriptor of it would drop the process's POSIX locks.
    pub known_files: std::sync::RwLock<std::collections::HashSet<(u64, u64)>>,
}

impl DbDetect {
    /// Whether the regular file `rel` (of `size` bytes; the file `id`, device
    /// and inode) is a database.
    #[must_use]
    pub fn is_db(&self, root: &Path, rel: &RelPath, size: u64, id: (u64, u64)) -> bool {
        if self.known.read().is_ok_and(|k| k.contains(rel))
            || self.known_files.read().is_ok_and(|k| k.contains(&id))
        {
            return true;
        }
        // A configured path is a database once it has a database's header; any
        // other file is one when its size is a multiple of 512 and its header
        // says so.
        let configured = self.globs.excludes(rel, false);
        (configured || size.is_multiple_of(512)) && crate::sqlite::sniff(&abs(root, rel), size)
    }

    /// Whether `rel` is a side file (`-wal`, `-shm`, `-journal`) of a database,
    /// or one left behind by a database that is gone.
    #[must_use]
    pub fn is_sidecar(&self, root: &Path, rel: &RelPath) -> bool {
        // The name alone first: most are no side file's.
        let bytes = rel.as_bytes();
        let name = &bytes[bytes.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1)..];
        if rel.is_root() || crate::sqlite::sidecar_base(name).is_none() {
            return false;
        }
        let Some((dir, name)) = rel.split_last() else {
            return false;
        };
        let Some(base) = crate::sqlite::sidecar_base(name).and_then(|b| dir.join(b).ok()) else {
            return false;
        };
        match fs::symlink_metadata(abs(root, &base)) {
            Ok(st) if st.is_file() => {
                use std::os::unix::fs::MetadataExt as _;
                self.is_db(root, &base, st.len(), (st.dev(), st.ino()))
            }
            // An orphan (its database renamed or deleted away: a backup
            // restored by rename leaves `new.db-wal` behind): never mirrored
            // when it is one by its content.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::sqlite::is_orphan_side_file(&abs(root, rel), name)
            }
            _ => false,
        }
    }
}

/// Whether `name` in `dir` is a SQLite database (by its header) or has a
/// database's side files beside it.
pub(crate) fn db_like(dir: std::os::fd::BorrowedFd<'_>, name: &[u8]) -> bool {
    let sidecar = crate::sqlite::SIDECARS.iter().any(|suffix| {
        let side = [name, suffix].concat();
        rustix::fs::statat(dir, side.as_slice(), AtFlags::SYMLINK_NOFOLLOW).is_ok()
    });
    let Ok(fd) = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) else {
        return sidecar;
    };
    let mut head = [0u8; 16];
    let is_db = rustix::fs::fstat(&fd)
        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
        && std::fs::File::from(fd).read_exact_at(&mut head, 0).is_ok()
        && &head == b"SQLite format 3\0";
    sidecar || is_db
}
