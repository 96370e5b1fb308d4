//! The replica's page tables saved for the next process: a fresh process (a
//! restarted agent, the next `mirror`) takes a database's table from here
//! instead of reading and hashing the whole database, when the stamps saved
//! with it still vouch for the file ([`super::tables`]).
//!
//! The file is a cache in a private state directory: written whole
//! (temp file, fsync, rename, fsync of the directory), read with a bound on
//! its size, each table checked against its whole-database hash; a missing,
//! corrupt, foreign (another root, another format) or oversized file only
//! costs the databases a full read. It is rewritten only when what it would
//! hold changed.

use super::Replica;
use super::tables::{Proof, Stamps, stamps_at};
use crate::sqlite::{PageTable, RACY_NS, db_hash};
use crate::{Error, RelPath};
use std::collections::{BTreeMap, HashMap};
use std::io::{Read as _, Write};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bumped when the layout changes: a file of another format is ignored.
const FORMAT: u32 = 1;
/// A file larger than this is not read (the largest database's table is
/// 512 MiB).
const LIMIT: u64 = 1 << 30;

/// A saved table: its stamps, when they were taken, the table.
type Saved = (Stamps, i128, Arc<PageTable>);

/// Where the tables are kept and what the file holds.
#[derive(Debug, Default)]
pub(super) struct Store {
    file: Option<PathBuf>,
    /// Whether the file was read (it is, on first need: see
    /// [`Replica::load_tables`]).
    loaded: bool,
    /// Tables loaded and not asked for yet in this process.
    saved: HashMap<RelPath, Saved>,
    /// What the file holds (stamps, their time, table hash), to tell whether
    /// a save would change it.
    on_disk: BTreeMap<RelPath, (Stamps, i128, [u8; 32])>,
}

#[derive(serde::Serialize)]
struct Out<'a> {
    format: u32,
    #[serde(with = "serde_bytes")]
    root: &'a [u8],
    dbs: Vec<OutDb<'a>>,
}

#[derive(serde::Serialize)]
struct OutDb<'a> {
    path: &'a RelPath,
    stamps: &'a Stamps,
    at_ns: i128,
    page_size: u32,
    hash: &'a [u8; 32],
    /// The page hashes, one after another (one byte string, not a
    /// sequence of arrays: 263k pages encode in a copy).
    #[serde(with = "serde_bytes")]
    hashes: &'a [u8],
}

#[derive(serde::Deserialize)]
struct In {
    format: u32,
    #[serde(with = "serde_bytes")]
    root: Vec<u8>,
    dbs: Vec<InDb>,
}

#[derive(serde::Deserialize)]
struct InDb {
    path: RelPath,
    stamps: Stamps,
    at_ns: i128,
    page_size: u32,
    hash: [u8; 32],
    #[serde(with = "serde_bytes")]
    hashes: Vec<u8>,
}

impl InDb {
    /// The table, when it is one (sizes in bounds, its hashes give its hash).
    fn table(self) -> Option<(RelPath, Saved)> {
        let n = self.hashes.len() / 32;
        let sound = proto::valid_page_size(self.page_size)
            && self.hashes.len().is_multiple_of(32)
            && n <= proto::MAX_DB_PAGES as usize
            && self.stamps[0].is_some();
        if !sound {
            return None;
        }
        let hashes: Vec<[u8; 32]> = self
            .hashes
            .chunks_exact(32)
            .filter_map(|c| <[u8; 32]>::try_from(c).ok())
            .collect();
        if hashes.len() != n || db_hash(self.page_size, &hashes) != self.hash {
            return None;
        }
        let table = PageTable {
            page_size: self.page_size,
            hashes,
            hash: self.hash,
        };
        Some((self.path, (self.stamps, self.at_ns, Arc::new(table))))
    }
}

fn root_bytes(r: &Replica) -> &[u8] {
    use std::os::unix::ffi::OsStrExt as _;
    r.canonical.as_os_str().as_bytes()
}

/// The tables `file` holds for the replica rooted at `root` (sound ones only).
fn read(file: &Path, root: &[u8]) -> Result<Vec<(RelPath, Saved)>, String> {
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.to_string()),
    };
    if f.metadata().map_err(|e| e.to_string())?.len() > LIMIT {
        return Err(format!("larger than {LIMIT} bytes"));
    }
    // Read as it decodes: no copy of the whole file in memory.
    let mut r = std::io::BufReader::with_capacity(1 << 16, f.take(LIMIT));
    let cfg = bincode::config::standard().with_limit::<{ LIMIT as usize }>();
    let saved: In = bincode::serde::decode_from_std_read(&mut r, cfg).map_err(|e| e.to_string())?;
    if saved.format != FORMAT || saved.root != root {
        return Ok(Vec::new());
    }
    Ok(saved.dbs.into_iter().filter_map(InDb::table).collect())
}

impl Replica {
    /// Keeps this replica's page tables in `file` (in a private state
    /// directory) from now on: the tables it holds are taken on first need
    /// (or by [`Replica::load_tables`]), and a database whose stamps still
    /// vouch for its table is not read again ([`Replica::page_table`]).
    pub fn keep_tables_in(&self, file: PathBuf) {
        if let Ok(mut s) = self.tables.lock() {
            *s = Store {
                file: Some(file),
                ..Store::default()
            };
        }
    }

    /// Reads the file given to [`Replica::keep_tables_in`] unless it was
    /// read already: how many tables it gave. A file that cannot be used is
    /// logged and ignored (the databases are read again).
    pub fn load_tables(&self) -> usize {
        let Some(file) = self
            .tables
            .lock()
            .ok()
            .filter(|s| !s.loaded)
            .and_then(|s| s.file.clone())
        else {
            return 0;
        };
        let loaded = read(&file, root_bytes(self)).unwrap_or_else(|e| {
            tracing::warn!(
                "page tables {}: {e}: the replica's databases are read again",
                file.display()
            );
            Vec::new()
        });
        let Ok(mut s) = self.tables.lock() else {
            return 0;
        };
        if s.loaded || s.file.as_ref() != Some(&file) {
            return 0;
        }
        let n = loaded.len();
        s.on_disk = loaded
            .iter()
            .map(|(p, (st, at, t))| (p.clone(), (*st, *at, t.hash)))
            .collect();
        s.saved = loaded.into_iter().collect();
        s.loaded = true;
        n
    }

    /// The saved table of `path` (`name` in `dir`), when its stamps vouch
    /// for the file as it is; taken out of the loaded set either way.
    pub(super) fn saved_table(
        &self,
        path: &RelPath,
        dir: std::os::fd::BorrowedFd<'_>,
        name: &[u8],
    ) -> Option<(Arc<PageTable>, Proof)> {
        self.load_tables();
        let (stamps, at_ns, table) = self.tables.lock().ok()?.saved.remove(path)?;
        let now = stamps_at(dir, name);
        Proof::holds(&stamps, at_ns, &now).then_some((table, Proof::Seen { stamps, at_ns }))
    }

    /// Saves the page tables whose stamps vouch for the files as they are
    /// now into the file given to [`Replica::keep_tables_in`] (nothing
    /// without one), unless it holds them already: `true` when it was
    /// written. A table of a database this replica just wrote waits until
    /// its stamps are old enough to vouch ([`RACY_NS`], at most 52 ms).
    pub fn save_tables(&self) -> Result<bool, Error> {
        let _one = self.saving.lock();
        // (what the file holds is kept while it vouches)
        self.load_tables();
        let Some(file) = self.tables.lock().ok().and_then(|s| s.file.clone()) else {
            return Ok(false);
        };
        let candidates = self.candidates();
        wait_until_old(&candidates);
        let mut keep: BTreeMap<RelPath, Saved> = BTreeMap::new();
        let mut vouched = Vec::new();
        for (path, (proof, table)) in candidates {
            let Ok((dir, _, name)) = self.parent(&path) else {
                continue;
            };
            let at = crate::scan::now_ns();
            let now = stamps_at(dir.as_fd(), name);
            let (stamps, at_ns) = match &proof {
                Proof::Seen { stamps, at_ns } => (*stamps, *at_ns),
                Proof::Written(stamps) => (*stamps, at),
            };
            if !Proof::holds(&stamps, at_ns, &now) {
                continue;
            }
            if matches!(proof, Proof::Written(_)) {
                vouched.push((path.clone(), proof, Proof::Seen { stamps, at_ns }));
            }
            keep.insert(path, (stamps, at_ns, table));
        }
        if let Ok(mut c) = self.db_cache.lock() {
            for (path, was, now) in vouched {
                if let Some(e) = c.get_mut(&path)
                    && e.proof.as_ref() == Some(&was)
                {
                    e.proof = Some(now);
                }
            }
        }
        let ident: BTreeMap<_, _> = keep
            .iter()
            .map(|(p, (st, at, t))| (p.clone(), (*st, *at, t.hash)))
            .collect();
        {
            let Ok(mut s) = self.tables.lock() else {
                return Ok(false);
            };
            s.saved.retain(|p, _| keep.contains_key(p));
            if s.on_disk == ident {
                return Ok(false);
            }
        }
        write_atomic(&file, |w| encode(root_bytes(self), &keep, w))
            .map_err(|e| Error::io("save page tables", file.display(), e))?;
        if let Ok(mut s) = self.tables.lock() {
            s.on_disk = ident;
        }
        Ok(true)
    }

    /// What a save may hold: tables loaded and not asked for, and those
    /// this process holds with a proof (newer).
    fn candidates(&self) -> BTreeMap<RelPath, (Proof, Arc<PageTable>)> {
        let mut all: BTreeMap<RelPath, (Proof, Arc<PageTable>)> = self
            .tables
            .lock()
            .map(|s| {
                s.saved
                    .iter()
                    .map(|(p, (stamps, at_ns, t))| {
                        let proof = Proof::Seen {
                            stamps: *stamps,
                            at_ns: *at_ns,
                        };
                        (p.clone(), (proof, t.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(c) = self.db_cache.lock() {
            for (p, e) in c.iter() {
                if let Some(proof) = &e.proof {
                    all.insert(p.clone(), (proof.clone(), e.table.clone()));
                }
            }
        }
        all
    }
}

/// Sleeps until the stamps of the databases this replica just wrote are old
/// enough to vouch for them.
fn wait_until_old(candidates: &BTreeMap<RelPath, (Proof, Arc<PageTable>)>) {
    let newest = candidates
        .values()
        .filter_map(|(p, _)| match p {
            Proof::Written(s) => Some(s),
            Proof::Seen { .. } => None,
        })
        .flat_map(|s| s.iter().flatten().map(|f| f.changed_ns()))
        .max();
    if let Some(t) = newest {
        let margin = 1_000_000;
        let wait = (t + RACY_NS + margin - crate::scan::now_ns()).clamp(0, RACY_NS + 2 * margin);
        std::thread::sleep(std::time::Duration::from_nanos(wait as u64));
    }
}

/// Writes the tables of `keep` to `w` as the file holds them.
fn encode(root: &[u8], keep: &BTreeMap<RelPath, Saved>, w: &mut impl Write) -> std::io::Result<()> {
    let dbs = keep
        .iter()
        .map(|(path, (stamps, at_ns, t))| OutDb {
            path,
            stamps,
            at_ns: *at_ns,
            page_size: t.page_size,
            hash: &t.hash,
            hashes: t.hashes.as_flattened(),
        })
        .collect();
    let out = Out {
        format: FORMAT,
        root,
        dbs,
    };
    bincode::serde::encode_into_std_write(&out, w, bincode::config::standard())
        .map(|_| ())
        .map_err(std::io::Error::other)
}

/// Replaces `file` with what `fill` writes: a temp file beside it (mode
/// 0600), fsync, rename over, fsync of the directory (created, mode 0700,
/// when missing). The state files of both crates are written by it.
pub fn write_atomic(
    file: &Path,
    fill: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let suffix = crate::hex(&rand::random::<[u8; 6]>());
    let tmp = dir.join(format!(".{name}.tmp.{}.{suffix}", std::process::id()));
    let written = (|| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 16, &f);
        fill(&mut w)?;
        w.flush()?;
        drop(w);
        f.sync_data()?;
        std::fs::rename(&tmp, file)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
