//! Keeping aside what only a returning old master held.
//!
//! A node that was the folder's source, died, and comes back after its standby
//! was promoted is fenced and repaired as a replica by a full round. Before
//! that round replaces or removes anything, [`capture`] copies every file,
//! database and symlink the round's [`Plan`] would replace or delete into a
//! directory of the agent's state (`{state}/diverged/{folder}-{epoch}-{unix}/`),
//! under the same relative paths, with a `MANIFEST` saying what differed and
//! why (`changed`: the new source has other content there; `deleted`: the new
//! source has nothing there).
//!
//! Reads go through the replica's root fd, never following a symlink
//! (`openat2` beneath the root with `O_NOFOLLOW`); writes go through an fd of
//! the capture directory, component by component, with no symlink followed
//! either. Databases are copied with `VACUUM INTO` from a read transaction (a
//! consistent copy that includes what a hot `-wal` holds), written under a
//! temp name at the capture root and renamed into place by fd. Files whose
//! content equals the source's (only their metadata differs) are not kept.

use crate::apply::Replica;
use crate::plan::Plan;
use crate::{Entry, Error, Kind, Manifest, RelPath};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

/// Why an entry was kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// The new source holds something else at this path.
    Changed,
    /// The new source holds nothing at this path.
    Deleted,
}

impl Why {
    fn name(self) -> &'static str {
        match self {
            Why::Changed => "changed",
            Why::Deleted => "deleted",
        }
    }
}

/// One entry kept aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// Its path, relative to the folder root (and to the capture directory).
    pub path: RelPath,
    /// `file`, `database`, `symlink`, `dir` or `special` (listed, not copied).
    pub kind: &'static str,
    /// Why.
    pub why: Why,
    /// Bytes copied.
    pub bytes: u64,
}

/// What [`capture`] kept.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// The entries, in path order.
    pub kept: Vec<Kept>,
}

/// The non-directory entries of `dst` that applying `plan` (from `src`) would
/// replace or remove, with why; directories only when a whole subtree goes.
fn affected<'d>(src: &Manifest, dst: &'d Manifest, plan: &Plan) -> Vec<(&'d Entry, Why)> {
    let mut out: Vec<(&Entry, Why)> = Vec::new();
    let mut seen: HashSet<&RelPath> = HashSet::new();
    let why = |p: &RelPath| {
        if src.get(p).is_some() {
            Why::Changed
        } else {
            Why::Deleted
        }
    };
    for top in &plan.delete {
        // A subtree follows its top entry in manifest order.
        let Some((at, _)) = dst.get(top) else {
            continue;
        };
        for e in dst.entries[at..]
            .iter()
            .take_while(|e| e.path.starts_with(top))
        {
            if seen.insert(&e.path) {
                out.push((e, why(&e.path)));
            }
        }
    }
    let replaced = plan
        .fetch
        .iter()
        .map(|f| f.index)
        .chain(plan.dbs.iter().copied())
        .chain(plan.create.iter().copied())
        .chain(plan.hardlink.iter().copied());
    for i in replaced {
        if let Some((_, d)) = dst.get(&src.entries[i].path)
            && d.kind != Kind::Dir
            && seen.insert(&d.path)
        {
            out.push((d, Why::Changed));
        }
    }
    out.sort_by(|a, b| crate::manifest::path_cmp(&a.0.path, &b.0.path));
    out
}

/// Copies aside, into the new directory `into` (its parent must exist and
/// belong to the agent), what applying `plan` would replace or remove in
/// `replica`, and writes `into/MANIFEST` (its first lines are `header`).
/// Creates nothing when nothing would be lost; then `kept` is empty.
///
/// # Errors
/// Any read or write fails (named with its path): the caller must not apply
/// the round.
pub fn capture(
    replica: &Replica,
    src: &Manifest,
    dst: &Manifest,
    plan: &Plan,
    into: &Path,
    header: &str,
) -> Result<Captured, Error> {
    let todo = affected(src, dst, plan);
    if todo.is_empty() {
        return Ok(Captured::default());
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(into)
        .map_err(|e| Error::io("create directory", into.display(), e))?;
    let base = rustix::fs::open(
        into,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|e| Error::io("open directory", into.display(), e))?;
    let filled = fill(replica, src, todo, base, into, header);
    if filled.is_err() {
        // Nothing was applied: the originals are all still in the tree, and
        // the next round captures again into a new directory.
        let _ = std::fs::remove_dir_all(into);
    }
    filled
}

fn fill(
    replica: &Replica,
    src: &Manifest,
    todo: Vec<(&Entry, Why)>,
    base: OwnedFd,
    into: &Path,
    header: &str,
) -> Result<Captured, Error> {
    let mut out = Captured::default();
    for (e, why) in todo {
        if let Some(k) = keep(replica, src, e, why, &base, into)? {
            out.kept.push(k);
        }
    }
    let mut text = String::from(header);
    text.push_str("# why\tkind\tbytes\tpath\n");
    for k in &out.kept {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            k.why.name(),
            k.kind,
            k.bytes,
            k.path
        ));
    }
    write_new(&base, b"MANIFEST", text.as_bytes(), into)?;
    File::from(base)
        .sync_all()
        .map_err(|e| Error::io("fsync", into.display(), e))?;
    Ok(out)
}

/// Copies one entry; `None` when it needs no keeping (same content).
fn keep(
    replica: &Replica,
    src: &Manifest,
    e: &Entry,
    why: Why,
    base: &OwnedFd,
    into: &Path,
) -> Result<Option<Kept>, Error> {
    let shown = |p: &RelPath| format!("{}", crate::scan::abs(replica.root_path(), p).display());
    let Some((parent, name)) = e.path.split_last() else {
        return Ok(None);
    };
    let kept = |kind, bytes| Kept {
        path: e.path.clone(),
        kind,
        why,
        bytes,
    };
    if e.kind == Kind::Dir {
        dest_dir(base, &e.path, into)?;
        return Ok(Some(kept("dir", 0)));
    }
    let dir = match replica.dir(&parent) {
        Ok(d) => d,
        Err(err) if err.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
        Err(err) => return Err(err),
    };
    let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(err) => return Err(Error::io("stat", shown(&e.path), err)),
    };
    match rustix::fs::FileType::from_raw_mode(st.st_mode) {
        rustix::fs::FileType::Symlink => {
            let target = rustix::fs::readlinkat(&dir, name, Vec::new())
                .map_err(|err| Error::io("read link", shown(&e.path), err))?;
            let to = dest_dir(base, &parent, into)?;
            rustix::fs::symlinkat(&target, &to, name).map_err(|err| {
                Error::io(
                    "create symlink",
                    into.join(e.path.to_string()).display(),
                    err,
                )
            })?;
            Ok(Some(kept("symlink", 0)))
        }
        rustix::fs::FileType::RegularFile => {
            let fd = rustix::fs::openat(
                &dir,
                name,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
                Mode::empty(),
            )
            .map_err(|err| Error::io("open", shown(&e.path), err))?;
            let mut file = File::from(fd);
            let mut head = [0u8; 16];
            let n = file
                .read(&mut head)
                .map_err(|err| Error::io("read", shown(&e.path), err))?;
            drop(file);
            // An empty main file beside a `-wal` is a database whose pages all
            // sit in the log: SQLite reads it, a plain copy would lose them.
            let wal = [name, b"-wal"].concat();
            let log_only = n == 0
                && rustix::fs::statat(&dir, wal.as_slice(), AtFlags::SYMLINK_NOFOLLOW).is_ok();
            if crate::sqlite::is_header(&head[..n]) || log_only {
                match copy_db(replica, src, e, why, base, into) {
                    Ok(b) => Ok(b.map(|b| kept("database", b))),
                    Err(err) => {
                        tracing::warn!(path = %e.path, "SQLite cannot copy it ({err}); kept raw with its -wal/-journal");
                        let b = copy_db_raw(replica, e, &dir, base, into)?;
                        Ok(Some(kept("database-raw", b)))
                    }
                }
            } else {
                copy_file(replica, src, e, &dir, base, into).map(|b| b.map(|b| kept("file", b)))
            }
        }
        _ => Ok(Some(kept("special", 0))),
    }
}

/// The directory `rel` under the capture directory, made as needed, never
/// through a symlink.
fn dest_dir(base: &OwnedFd, rel: &RelPath, into: &Path) -> Result<OwnedFd, Error> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let mut cur = rustix::fs::openat(base, ".", flags, Mode::empty())
        .map_err(|e| Error::io("open directory", into.display(), e))?;
    for c in rel.components() {
        let shown = || into.join(rel.to_string()).display().to_string();
        match rustix::fs::mkdirat(&cur, c, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(Error::io("create directory", shown(), e)),
        }
        cur = rustix::fs::openat(&cur, c, flags, Mode::empty())
            .map_err(|e| Error::io("open directory", shown(), e))?;
    }
    Ok(cur)
}

/// A new file `name` in `dir` holding `data`, fsynced.
fn write_new(dir: &OwnedFd, name: &[u8], data: &[u8], shown: &Path) -> Result<(), Error> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| Error::io("create", shown.display(), e))?;
    let mut f = File::from(fd);
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("write", shown.display(), e))
}

/// Copies `name` of `dir` (never following a symlink) to a new file `name` of
/// `to_dir`; returns its size and blake3 hash. The copy is fsynced.
fn copy_raw(
    dir: &OwnedFd,
    name: &[u8],
    shown: &str,
    to_dir: &OwnedFd,
    dest: &Path,
) -> Result<(u64, [u8; 32]), Error> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(|err| Error::io("open", shown, err))?;
    let mut from = File::from(fd);
    let out = rustix::fs::openat(
        to_dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|err| Error::io("create", dest.display(), err))?;
    let mut to = File::from(out);
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = from
            .read(&mut buf)
            .map_err(|err| Error::io("read", shown, err))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])
            .map_err(|err| Error::io("write", dest.display(), err))?;
        bytes += n as u64;
    }
    to.sync_all()
        .map_err(|err| Error::io("fsync", dest.display(), err))?;
    Ok((bytes, *hasher.finalize().as_bytes()))
}

fn copy_file(
    replica: &Replica,
    src: &Manifest,
    e: &Entry,
    dir: &OwnedFd,
    base: &OwnedFd,
    into: &Path,
) -> Result<Option<u64>, Error> {
    let (parent, name) = e.path.split_last().unwrap_or((RelPath::root(), b""));
    let shown = format!(
        "{}",
        crate::scan::abs(replica.root_path(), &e.path).display()
    );
    let to_dir = dest_dir(base, &parent, into)?;
    let dest = into.join(e.path.to_string());
    let (bytes, hash) = copy_raw(dir, name, &shown, &to_dir, &dest)?;
    let same = matches!(
        src.get(&e.path).map(|(_, s)| &s.kind),
        Some(Kind::File { size, hash: h }) if *size == bytes && *h == hash
    );
    if same {
        rustix::fs::unlinkat(&to_dir, name, AtFlags::empty())
            .map_err(|err| Error::io("remove", dest.display(), err))?;
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// A database SQLite cannot copy (corrupt, not really one): the file and its
/// `-wal` / `-journal` as they are, so that nothing is lost either way.
fn copy_db_raw(
    replica: &Replica,
    e: &Entry,
    dir: &OwnedFd,
    base: &OwnedFd,
    into: &Path,
) -> Result<u64, Error> {
    let (parent, name) = e.path.split_last().unwrap_or((RelPath::root(), b""));
    let to_dir = dest_dir(base, &parent, into)?;
    let mut total = 0;
    for suffix in [&b""[..], b"-wal", b"-journal"] {
        let side = [name, suffix].concat();
        let Ok(st) = rustix::fs::statat(dir, side.as_slice(), AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            continue;
        }
        let rel = String::from_utf8_lossy(&side).into_owned();
        let shown = crate::scan::abs(replica.root_path(), &e.path)
            .with_file_name(&rel)
            .display()
            .to_string();
        let dest = into.join(e.path.to_string()).with_file_name(&rel);
        total += copy_raw(dir, &side, &shown, &to_dir, &dest)?.0;
    }
    Ok(total)
}

fn copy_db(
    replica: &Replica,
    src: &Manifest,
    e: &Entry,
    why: Why,
    base: &OwnedFd,
    into: &Path,
) -> Result<Option<u64>, Error> {
    if why == Why::Changed
        && let Some((_, s)) = src.get(&e.path)
        && let Kind::Database { hash, .. } = s.kind
        && replica.page_table(&e.path)?.is_some_and(|h| h.hash == hash)
    {
        return Ok(None);
    }
    let (parent, name) = e.path.split_last().unwrap_or((RelPath::root(), b""));
    let from = crate::scan::abs(replica.root_path(), &e.path);
    let tmp = format!(".db-{}.tmp", rand::random::<u64>());
    let tmp_path = into.join(&tmp);
    let dest = into.join(e.path.to_string());
    let sql = |what: &str, err: rusqlite::Error| Error::Sqlite {
        path: from.display().to_string(),
        msg: format!("{what}: {err}"),
    };
    let c = rusqlite::Connection::open_with_flags(
        &from,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .map_err(|err| sql("open", err))?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|err| sql("busy timeout", err))?;
    let to = tmp_path
        .to_str()
        .ok_or_else(|| Error::invalid(tmp_path.display(), "not UTF-8: SQLite cannot name it"))?;
    if let Err(err) = c.execute("VACUUM INTO ?1", [to]) {
        let _ = rustix::fs::unlinkat(base, tmp.as_bytes(), AtFlags::empty());
        return Err(sql("copy (VACUUM INTO)", err));
    }
    drop(c);
    let to_dir = dest_dir(base, &parent, into)?;
    rustix::fs::renameat(base, tmp.as_bytes(), &to_dir, name)
        .map_err(|err| Error::io("rename", dest.display(), err))?;
    let bytes = rustix::fs::statat(&to_dir, name, AtFlags::SYMLINK_NOFOLLOW)
        .map(|st| st.st_size as u64)
        .map_err(|err| Error::io("stat", dest.display(), err))?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::{ScanOptions, scan_with};

    fn m(root: &Path) -> Manifest {
        let opts = ScanOptions {
            hash: true,
            databases: Some(std::sync::Arc::default()),
            ..Default::default()
        };
        scan_with(root, &opts, None).unwrap().0
    }

    /// A source tree and a replica tree that differ in every way a capture
    /// cares about; returns them and the raw bytes of `bad.db`.
    fn trees(t: &Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
        let (s, d) = (t.join("src"), t.join("dst"));
        for r in [&s, &d] {
            std::fs::create_dir_all(r.join("sub")).unwrap();
            std::fs::write(r.join("same"), "same").unwrap();
        }
        std::fs::write(s.join("changed"), "new").unwrap();
        std::fs::write(d.join("changed"), "mine").unwrap();
        std::fs::write(d.join("sub/only-here"), "only mine").unwrap();
        std::fs::create_dir_all(d.join("gone/deep")).unwrap();
        std::fs::write(d.join("gone/deep/f"), "deep").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", d.join("link")).unwrap();
        // A header and garbage: SQLite cannot copy it; kept raw.
        let mut bad = b"SQLite format 3\0".to_vec();
        bad.extend([7u8; 100]);
        std::fs::write(d.join("bad.db"), &bad).unwrap();
        // Same content, other mtime: not kept.
        std::fs::write(d.join("same"), "same").unwrap();
        (s, d, bad)
    }

    #[test]
    fn keeps_what_the_round_replaces_or_deletes_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let (s, d, bad) = trees(t.path());
        // Committed rows only in the WAL, the writer still connected.
        let c = rusqlite::Connection::open(d.join("app.db")).unwrap();
        c.execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (42);")
            .unwrap();
        let (src, dst) = (m(&s), m(&d));
        let plan = crate::plan::plan(&src, &dst, true);
        let replica = Replica::open(&d).unwrap();
        let into = t.path().join("kept");
        let got = capture(&replica, &src, &dst, &plan, &into, "# test\n").unwrap();
        drop(c);
        let list: Vec<(String, &str, Why)> = got
            .kept
            .iter()
            .map(|k| (k.path.to_string(), k.kind, k.why))
            .collect();
        assert_eq!(
            list,
            vec![
                ("app.db".into(), "database", Why::Deleted),
                ("bad.db".into(), "database-raw", Why::Deleted),
                ("changed".into(), "file", Why::Changed),
                ("gone".into(), "dir", Why::Deleted),
                ("gone/deep".into(), "dir", Why::Deleted),
                ("gone/deep/f".into(), "file", Why::Deleted),
                ("link".into(), "symlink", Why::Deleted),
                ("sub/only-here".into(), "file", Why::Deleted),
            ]
        );
        assert_eq!(
            std::fs::read_to_string(into.join("changed")).unwrap(),
            "mine"
        );
        assert_eq!(
            std::fs::read_to_string(into.join("gone/deep/f")).unwrap(),
            "deep"
        );
        assert_eq!(
            std::fs::read_link(into.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(!into.join("same").exists());
        let n: i64 = rusqlite::Connection::open(into.join("app.db"))
            .unwrap()
            .query_row("SELECT x FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 42, "the copy holds what only the WAL had");
        let manifest = std::fs::read_to_string(into.join("MANIFEST")).unwrap();
        assert!(manifest.starts_with("# test\n"), "{manifest}");
        assert!(
            manifest.contains("changed\tfile\t4\tchanged\n"),
            "{manifest}"
        );
        assert!(
            manifest.contains("deleted\tfile\t9\tsub/only-here\n"),
            "{manifest}"
        );
        // Nothing left behind at the root but the kept tree and the MANIFEST.
        let mut names: Vec<String> = std::fs::read_dir(&into)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "MANIFEST", "app.db", "bad.db", "changed", "gone", "link", "sub"
            ]
        );
        assert_eq!(std::fs::read(into.join("bad.db")).unwrap(), bad);

        // Nothing to lose: no directory at all.
        let plan = crate::plan::plan(&src, &src, true);
        let none = t.path().join("none");
        assert!(
            capture(&replica, &src, &src, &plan, &none, "")
                .unwrap()
                .kept
                .is_empty()
        );
        assert!(!none.exists());
    }
}
