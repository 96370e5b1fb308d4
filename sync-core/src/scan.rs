//! Walking a tree into a [`Manifest`].

use crate::filter::Filter;
use crate::index::{HashIndex, Stamp};
use crate::{Entry, Error, Kind, Manifest, RelPath, meta};
use rayon::prelude::*;
use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// How to scan.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// Compute blake3 content hashes (the source does; a replica deciding by size
    /// and mtime need not).
    pub hash: bool,
    /// Record further names of an inode as [`Kind::HardLink`].
    pub hard_links: bool,
    /// Paths left out entirely.
    pub filter: Filter,
    /// How live SQLite databases are told (`None`: they are plain files).
    pub databases: Option<std::sync::Arc<DbDetect>>,
}

/// How a scan tells live SQLite databases: configured globs, databases this
/// process already holds, and the header of files whose size is a multiple of
/// 512. A database is listed in [`ScanReport::databases`] and never read; its
/// `-wal`, `-shm` and `-journal` files are left out of the manifest.
#[derive(Debug, Default)]
pub struct DbDetect {
    /// Configured database paths (gitignore-style patterns).
    pub globs: Filter,
    /// Databases held open by this process: never opened with plain file I/O.
    pub known: std::sync::RwLock<std::collections::HashSet<RelPath>>,
}

impl DbDetect {
    /// Whether the regular file `rel` (of `size` bytes) is a database.
    #[must_use]
    pub fn is_db(&self, root: &Path, rel: &RelPath, size: u64) -> bool {
        if self.known.read().is_ok_and(|k| k.contains(rel)) {
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
        let Some((dir, name)) = rel.split_last() else {
            return false;
        };
        let Some(base) = crate::sqlite::sidecar_base(name).and_then(|b| dir.join(b).ok()) else {
            return false;
        };
        match fs::symlink_metadata(abs(root, &base)) {
            Ok(st) if st.is_file() => self.is_db(root, &base, st.len()),
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

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            hash: true,
            hard_links: true,
            filter: Filter::default(),
            databases: None,
        }
    }
}

/// What a scan found beside the manifest.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Our own temp files met in the tree (swept by a replica, skipped by a source).
    pub temp_files: Vec<RelPath>,
    /// Files whose content was read and hashed (index misses).
    pub hashed: Vec<(RelPath, Stamp, [u8; 32])>,
    /// Bytes read to hash them.
    pub bytes_hashed: u64,
    /// Regular files with more than one name (link count > 1).
    pub multi_linked: std::collections::HashSet<RelPath>,
    /// Live SQLite databases (listed as files with a zero hash, never read).
    pub databases: Vec<RelPath>,
    /// Excluded paths met (the topmost: an excluded directory is not
    /// entered), with whether each is a directory; a replica's full round
    /// sweeps or reports them (`delete_excluded`).
    pub excluded: Vec<(RelPath, bool)>,
}

/// Scans `root` into a manifest.
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<Manifest, Error> {
    scan_with(root, opts, None).map(|(m, _)| m)
}

/// Scans `root` into a manifest and a report, reusing hashes from `index` for
/// files whose stamp it remembers.
pub fn scan_with(
    root: &Path,
    opts: &ScanOptions,
    index: Option<&HashIndex>,
) -> Result<(Manifest, ScanReport), Error> {
    let st = fs::metadata(root).map_err(|e| Error::io("stat", root.display(), e))?;
    if !st.is_dir() {
        return Err(Error::invalid(root.display(), "not a directory"));
    }
    // The walk visits children in sorted order, so entries are in manifest order.
    let (entries, report) = scan_subtree(root, &RelPath::root(), opts, index)?;
    Ok((Manifest { entries }, report))
}

/// The entry at `rel` alone (not its subtree), or `None` when it does not exist
/// or is excluded.
pub fn entry_at(
    root: &Path,
    rel: &RelPath,
    opts: &ScanOptions,
    index: Option<&HashIndex>,
) -> Result<(Option<Entry>, ScanReport), Error> {
    let mut w = Walker::new(root, opts);
    w.visit(rel)?;
    let (mut entries, report) = w.finish(index)?;
    Ok((entries.pop(), report))
}

/// `rel` and everything below it, in manifest order (empty when absent or
/// excluded).
pub fn scan_subtree(
    root: &Path,
    rel: &RelPath,
    opts: &ScanOptions,
    index: Option<&HashIndex>,
) -> Result<(Vec<Entry>, ScanReport), Error> {
    let mut w = Walker::new(root, opts);
    if w.visit(rel)? == Some(true) {
        w.walk_dir(rel)?;
    }
    w.finish(index)
}

/// blake3 of a file's content, read (not mapped: a live file may shrink under us).
pub fn hash_file(path: &Path) -> Result<[u8; 32], Error> {
    let f = open_regular(path)?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)
        .map_err(|e| Error::io("read", path.display(), e))?;
    Ok(*h.finalize().as_bytes())
}

/// Opens a regular file for reading without following a final symlink and
/// without blocking on a fifo swapped in since the scan.
pub fn open_regular(path: &Path) -> Result<fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| Error::io("open", path.display(), e))?;
    let st = f
        .metadata()
        .map_err(|e| Error::io("stat", path.display(), e))?;
    if !st.is_file() {
        return Err(Error::io(
            "open",
            path.display(),
            io::Error::from_raw_os_error(libc::ENOENT),
        ));
    }
    Ok(f)
}

/// The absolute path of `rel` under `root`.
#[must_use]
pub fn abs(root: &Path, rel: &RelPath) -> PathBuf {
    if rel.is_root() {
        root.to_path_buf()
    } else {
        root.join(std::ffi::OsStr::from_bytes(rel.as_bytes()))
    }
}

/// Nanoseconds since the epoch, now.
#[must_use]
pub fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

struct Walker<'o> {
    root: PathBuf,
    opts: &'o ScanOptions,
    entries: Vec<Entry>,
    stamps: Vec<Option<Stamp>>,
    inodes: HashMap<(u64, u64), RelPath>,
    temp_files: Vec<RelPath>,
    multi_linked: std::collections::HashSet<RelPath>,
    databases: Vec<RelPath>,
    excluded: Vec<(RelPath, bool)>,
}

impl<'o> Walker<'o> {
    fn new(root: &Path, opts: &'o ScanOptions) -> Self {
        Self {
            root: root.to_path_buf(),
            opts,
            entries: Vec::new(),
            stamps: Vec::new(),
            inodes: HashMap::new(),
            temp_files: Vec::new(),
            multi_linked: Default::default(),
            databases: Vec::new(),
            excluded: Vec::new(),
        }
    }

    fn push(&mut self, e: Entry, stamp: Option<Stamp>) {
        self.entries.push(e);
        self.stamps.push(stamp);
    }

    /// Hashes files (reusing the index), returning entries and the report.
    fn finish(mut self, index: Option<&HashIndex>) -> Result<(Vec<Entry>, ScanReport), Error> {
        let mut report = ScanReport {
            temp_files: std::mem::take(&mut self.temp_files),
            multi_linked: std::mem::take(&mut self.multi_linked),
            databases: std::mem::take(&mut self.databases),
            excluded: std::mem::take(&mut self.excluded),
            ..Default::default()
        };
        if !self.opts.hash {
            return Ok((self.entries, report));
        }
        let mut todo: Vec<usize> = Vec::new();
        for (i, e) in self.entries.iter_mut().enumerate() {
            if let (Kind::File { hash, .. }, Some(stamp)) = (&mut e.kind, self.stamps[i]) {
                match index.and_then(|ix| ix.lookup(&e.path, &stamp)) {
                    Some(h) => *hash = h,
                    None => todo.push(i),
                }
            }
        }
        let root = &self.root;
        let hashes: Vec<Result<[u8; 32], Error>> = todo
            .par_iter()
            .map(|&i| hash_file(&abs(root, &self.entries[i].path)))
            .collect();
        let mut vanished = Vec::new();
        for (&i, h) in todo.iter().zip(hashes) {
            let h = match h {
                Ok(h) => h,
                // vanished since the walk: left out, seen as gone
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    vanished.push(i);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let e = &mut self.entries[i];
            if let Kind::File { hash, size } = &mut e.kind {
                *hash = h;
                report.bytes_hashed += *size;
                if let Some(stamp) = self.stamps[i] {
                    report.hashed.push((e.path.clone(), stamp, h));
                }
            }
        }
        // Drop vanished files and what names them as a hard-link target.
        let mut entries = self.entries;
        if !vanished.is_empty() {
            let gone: std::collections::HashSet<RelPath> =
                vanished.iter().map(|&i| entries[i].path.clone()).collect();
            entries.retain(|e| {
                !gone.contains(&e.path)
                    && !matches!(&e.kind, Kind::HardLink { target } if gone.contains(target))
            });
        }
        Ok((entries, report))
    }

    /// Adds the entry at `path`; `Some(is_dir)` when it exists and is included.
    fn visit(&mut self, path: &RelPath) -> Result<Option<bool>, Error> {
        if path.is_root() {
            return self.visit_root();
        }
        if path
            .split_last()
            .is_some_and(|(_, n)| crate::is_temp_name(n))
        {
            self.temp_files.push(path.clone());
            return Ok(None);
        }
        let p = abs(&self.root, path);
        let st = match fs::symlink_metadata(&p) {
            Ok(st) => st,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
            Err(e) => return Err(Error::io("stat", p.display(), e)),
        };
        let ft = st.file_type();
        if self.opts.filter.excludes(path, ft.is_dir()) {
            self.excluded.push((path.clone(), ft.is_dir()));
            return Ok(None);
        }
        let db = self.opts.databases.as_deref();
        if !ft.is_dir() && db.is_some_and(|d| d.is_sidecar(&self.root, path)) {
            return Ok(None);
        }
        let mut m = meta::from_stat(&st);
        m.xattrs = match meta::read_xattrs(&p) {
            Ok(x) => x,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut stamp = None;
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            if st.nlink() > 1 {
                self.multi_linked.insert(path.clone());
            }
            let key = (st.dev(), st.ino());
            match self.inodes.get(&key) {
                Some(first) if self.opts.hard_links => Kind::HardLink {
                    target: first.clone(),
                },
                _ => {
                    if self.opts.hard_links && st.nlink() > 1 {
                        self.inodes.insert(key, path.clone());
                    }
                    if db.is_some_and(|d| d.is_db(&self.root, path, st.len())) {
                        self.databases.push(path.clone());
                    } else {
                        stamp = Some(Stamp::of(&st));
                    }
                    Kind::File {
                        size: st.len(),
                        hash: [0; 32],
                    }
                }
            }
        } else if ft.is_symlink() {
            let t = match fs::read_link(&p) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io("readlink", p.display(), e)),
            };
            Kind::Symlink {
                target: t.as_os_str().as_bytes().to_vec(),
            }
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_socket() {
            Kind::Socket
        } else if ft.is_char_device() {
            Kind::CharDev { rdev: st.rdev() }
        } else if ft.is_block_device() {
            Kind::BlockDev { rdev: st.rdev() }
        } else {
            return Err(Error::invalid(p.display(), "unknown file type"));
        };
        let is_dir = kind == Kind::Dir;
        self.push(
            Entry {
                path: path.clone(),
                kind,
                meta: m,
            },
            stamp,
        );
        Ok(Some(is_dir))
    }

    /// Adds the root: a directory, followed (it may be a symlink to one).
    fn visit_root(&mut self) -> Result<Option<bool>, Error> {
        let st = fs::metadata(&self.root).map_err(|e| Error::io("stat", self.root.display(), e))?;
        let mut m = meta::from_stat(&st);
        m.xattrs = meta::read_xattrs(&self.root)?;
        self.push(
            Entry {
                path: RelPath::root(),
                kind: Kind::Dir,
                meta: m,
            },
            None,
        );
        Ok(Some(true))
    }

    fn walk_dir(&mut self, dir: &RelPath) -> Result<(), Error> {
        let dpath = abs(&self.root, dir);
        let rd = match fs::read_dir(&dpath) {
            Ok(rd) => rd,
            // removed while we walked: it will be seen as gone
            Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.is_root() => return Ok(()),
            Err(e) => return Err(Error::io("read directory", dpath.display(), e)),
        };
        let mut names: Vec<Vec<u8>> = Vec::new();
        for de in rd {
            let de = de.map_err(|e| Error::io("read directory", dpath.display(), e))?;
            names.push(de.file_name().as_bytes().to_vec());
        }
        names.sort();
        for name in names {
            let path = dir.join(&name).map_err(|e| {
                Error::invalid(
                    format!("{}/{}", dir, String::from_utf8_lossy(&name)),
                    e.to_string(),
                )
            })?;
            if self.visit(&path)? == Some(true) {
                self.walk_dir(&path)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_spares_rehashing_and_sees_changes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("sub")).unwrap();
        std::fs::write(d.path().join("sub/a"), b"one").unwrap();
        std::fs::write(d.path().join("b"), b"two").unwrap();
        let opts = ScanOptions::default();
        let mut ix = HashIndex::in_memory();
        let (m1, r1) = scan_with(d.path(), &opts, Some(&ix)).unwrap();
        assert_eq!(r1.hashed.len(), 2);
        // pretend the hashes are old enough to be trusted
        for (p, s, h) in r1.hashed {
            ix.record(&p, s, h, now_ns() + 10 * crate::index::RACY_NS);
        }
        let (m2, r2) = scan_with(d.path(), &opts, Some(&ix)).unwrap();
        assert!(r2.hashed.is_empty(), "unchanged files were rehashed");
        assert_eq!(m1, m2);
        std::fs::write(d.path().join("b"), b"TWO").unwrap();
        let (m3, r3) = scan_with(d.path(), &opts, Some(&ix)).unwrap();
        assert_eq!(r3.hashed.len(), 1);
        assert_ne!(m2.root_hash(), m3.root_hash());
    }

    #[test]
    fn excluded_paths_are_not_scanned() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("cache/x")).unwrap();
        std::fs::write(d.path().join("cache/x/f"), b"1").unwrap();
        std::fs::write(d.path().join("keep"), b"1").unwrap();
        let opts = ScanOptions {
            filter: Filter::new(&["cache/".into()]).unwrap(),
            ..Default::default()
        };
        let m = scan(d.path(), &opts).unwrap();
        let paths: Vec<String> = m.entries.iter().map(|e| e.path.to_string()).collect();
        assert_eq!(paths, [".", "keep"]);
        let (sub, _) =
            scan_subtree(d.path(), &RelPath::new(&b"cache"[..]).unwrap(), &opts, None).unwrap();
        assert!(sub.is_empty());
    }
}
