//! Walking a tree into a [`Manifest`].

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
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            hash: true,
            hard_links: true,
        }
    }
}

/// What a scan found beside the manifest.
#[derive(Debug, Default)]
pub struct ScanReport {
    /// Our own temp files met in the tree (swept by a replica, skipped by a source).
    pub temp_files: Vec<RelPath>,
}

/// Scans `root` into a manifest.
pub fn scan(root: &Path, opts: &ScanOptions) -> Result<Manifest, Error> {
    scan_with_report(root, opts).map(|(m, _)| m)
}

/// Scans `root` into a manifest and a report.
pub fn scan_with_report(root: &Path, opts: &ScanOptions) -> Result<(Manifest, ScanReport), Error> {
    let st = fs::metadata(root).map_err(|e| Error::io("stat", root.display(), e))?;
    if !st.is_dir() {
        return Err(Error::invalid(root.display(), "not a directory"));
    }
    let mut w = Walker {
        root: root.to_path_buf(),
        opts: opts.clone(),
        entries: Vec::new(),
        inodes: HashMap::new(),
        report: ScanReport::default(),
    };
    let mut m = meta::from_stat(&st);
    m.xattrs = meta::read_xattrs(root)?;
    w.entries.push(Entry {
        path: RelPath::root(),
        kind: Kind::Dir,
        meta: m,
    });
    w.walk_dir(&RelPath::root())?;
    let mut entries = w.entries;
    if opts.hash {
        let root = &w.root;
        entries
            .par_iter_mut()
            .try_for_each(|e| -> Result<(), Error> {
                if let Kind::File { hash, .. } = &mut e.kind {
                    let p = abs(root, &e.path);
                    *hash = hash_file(&p)?;
                }
                Ok(())
            })?;
    }
    // The walk visits children in sorted order, so entries are in manifest order.
    Ok((Manifest { entries }, w.report))
}

/// blake3 of a file's content, read (not mapped: a live file may shrink under us).
pub fn hash_file(path: &Path) -> Result<[u8; 32], Error> {
    let f = fs::File::open(path).map_err(|e| Error::io("open", path.display(), e))?;
    let mut h = blake3::Hasher::new();
    h.update_reader(f)
        .map_err(|e| Error::io("read", path.display(), e))?;
    Ok(*h.finalize().as_bytes())
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

struct Walker {
    root: PathBuf,
    opts: ScanOptions,
    entries: Vec<Entry>,
    inodes: HashMap<(u64, u64), RelPath>,
    report: ScanReport,
}

impl Walker {
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
            if crate::is_temp_name(&name) {
                self.report.temp_files.push(path);
                continue;
            }
            let p = abs(&self.root, &path);
            let st = match fs::symlink_metadata(&p) {
                Ok(st) => st,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("stat", p.display(), e)),
            };
            let mut m = meta::from_stat(&st);
            m.xattrs = match meta::read_xattrs(&p) {
                Ok(x) => x,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            };
            let ft = st.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                let key = (st.dev(), st.ino());
                match self.inodes.get(&key) {
                    Some(first) if self.opts.hard_links => Kind::HardLink {
                        target: first.clone(),
                    },
                    _ => {
                        if self.opts.hard_links && st.nlink() > 1 {
                            self.inodes.insert(key, path.clone());
                        }
                        Kind::File {
                            size: st.len(),
                            hash: [0; 32],
                        }
                    }
                }
            } else if ft.is_symlink() {
                let t = fs::read_link(&p).map_err(|e| Error::io("readlink", p.display(), e))?;
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
            self.entries.push(Entry {
                path: path.clone(),
                kind,
                meta: m,
            });
            if is_dir {
                self.walk_dir(&path)?;
            }
        }
        Ok(())
    }
}
