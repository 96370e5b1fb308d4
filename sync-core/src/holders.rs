//! Which other processes hold a file open: the replica must not apply a database
//! under an application that has it open (the standby's app left running).
//!
//! Linux only: walks `/proc/*/fd/*`, `stat`s each descriptor through its magic
//! link and compares (device, inode) with the target's. Processes and descriptors
//! that vanish during the walk, or that we may not inspect, are skipped, so an
//! unprivileged agent sees only the processes of its own user ([`maybe_held`]
//! counts one it may not inspect as a possible holder). Our own process is
//! never reported. Memory mappings without an open descriptor are not seen.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A process holding a file open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id.
    pub pid: u32,
    /// Its command name (`/proc/PID/comm`, at most 15 bytes), empty if unknown.
    pub command: String,
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} ({})", self.pid, self.command)
    }
}

/// The suffixes of a database's companion files, in the order checked.
pub const DB_SIDE_SUFFIXES: [&str; 3] = ["-wal", "-shm", "-journal"];

/// The other processes that hold `path` open, by ascending pid.
///
/// # Errors
/// `path` cannot be `stat`ed (the error names it), or `/proc` cannot be read.
pub fn holders(path: &Path) -> io::Result<Vec<Holder>> {
    let id = file_id(path)?;
    scan_proc(&[id])
}

/// The other processes that hold the database `db` or one of its `-wal`, `-shm`
/// and `-journal` files (those that exist) open, one entry per process, by
/// ascending pid.
///
/// # Errors
/// `db` itself cannot be `stat`ed (the error names it), or `/proc` cannot be read.
pub fn holders_of_db(db: &Path) -> io::Result<Vec<Holder>> {
    let mut ids = vec![file_id(db)?];
    for suffix in DB_SIDE_SUFFIXES {
        match file_id(&sibling(db, suffix)) {
            Ok(id) => ids.push(id),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    scan_proc(&ids)
}

/// The other processes that hold open one of the files `ids` (device, inode)
/// names, by ascending pid: for a file that may no longer have the name it was
/// opened by (a database renamed away while open).
///
/// # Errors
/// `/proc` cannot be read.
pub fn holders_of_ids(ids: &[(u64, u64)]) -> io::Result<Vec<Holder>> {
    scan_proc(ids)
}

/// Whether a process other than ours holds one of the files `ids` open, or
/// might: also true when a process could not be inspected (another user's, to
/// an unprivileged agent), so that `false` means nobody does. Stops at the
/// first such process.
///
/// # Errors
/// `/proc` cannot be read.
pub fn maybe_held(ids: &[(u64, u64)]) -> io::Result<bool> {
    let me = std::process::id();
    for (pid, base) in processes()? {
        if pid != me && holds_any(&base, ids) != Fds::Free {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `db` with `suffix` appended to its file name (`library.db` → `library.db-wal`).
#[must_use]
pub fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = db.as_os_str().to_owned();
    s.push(suffix);
    s.into()
}

fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    std::fs::metadata(path)
        .map(|m| (m.dev(), m.ino()))
        .map_err(|e| io::Error::new(e.kind(), format!("stat {}: {e}", path.display())))
}

/// The processes in `/proc`: (pid, `/proc/PID`).
fn processes() -> io::Result<impl Iterator<Item = (u32, PathBuf)>> {
    let proc_dir = std::fs::read_dir("/proc")
        .map_err(|e| io::Error::new(e.kind(), format!("read /proc: {e}")))?;
    // An entry that vanished mid-walk is simply not there any more.
    Ok(proc_dir.flatten().filter_map(|entry| {
        let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
        Some((pid, entry.path()))
    }))
}

/// Walks `/proc` for processes other than ours with a descriptor on one of `ids`.
fn scan_proc(ids: &[(u64, u64)]) -> io::Result<Vec<Holder>> {
    let me = std::process::id();
    let mut found: BTreeMap<u32, String> = BTreeMap::new();
    for (pid, base) in processes()? {
        if pid == me || found.contains_key(&pid) {
            continue;
        }
        if holds_any(&base, ids) == Fds::Hold {
            found.insert(pid, command(&base));
        }
    }
    Ok(found
        .into_iter()
        .map(|(pid, command)| Holder { pid, command })
        .collect())
}

/// What a process's descriptors say about some files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fds {
    /// One of them is open.
    Hold,
    /// None is (or the process is gone).
    Free,
    /// The process may not be inspected.
    Unseen,
}

/// Whether the process at `/proc/PID` has a descriptor on one of `ids`.
fn holds_any(proc_pid: &Path, ids: &[(u64, u64)]) -> Fds {
    let fds = match std::fs::read_dir(proc_pid.join("fd")) {
        Ok(fds) => fds,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Fds::Free,
        Err(_) => return Fds::Unseen,
    };
    let held = fds.flatten().any(|fd| {
        // metadata() follows the magic link to the open file itself, also when
        // its name was unlinked or lies outside our mount namespace.
        std::fs::metadata(fd.path()).is_ok_and(|m| ids.contains(&(m.dev(), m.ino())))
    });
    if held { Fds::Hold } else { Fds::Free }
}

fn command(proc_pid: &Path) -> String {
    std::fs::read(proc_pid.join("comm"))
        .map(|b| {
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(&e.into_bytes()).into_owned())
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    /// Kills and reaps the child when the test ends, also on a failed assertion.
    struct Reap(Child);

    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A `sleep` holding `file` open on fd 3 (one process: `exec` replaces sh).
    fn hold(file: &Path) -> Reap {
        let child = Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$1\"; exec sleep 30")
            .arg("sh")
            .arg(file)
            .spawn()
            .unwrap();
        Reap(child)
    }

    /// Polls `f` until it reports `pid` as `sleep` (the child needs a moment
    /// to open the file, and then to exec).
    fn wait_for(pid: u32, f: impl Fn() -> Vec<Holder>) -> Vec<Holder> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = f();
            let ready = h.iter().any(|h| h.pid == pid && h.command == "sleep");
            if ready || Instant::now() > deadline {
                return h;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn finds_another_process_holding_the_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("library.db");
        std::fs::write(&f, b"x").unwrap();
        let child = hold(&f);
        let pid = child.0.id();
        let h = wait_for(pid, || holders(&f).unwrap());
        assert!(maybe_held(&[file_id(&f).unwrap()]).unwrap());
        let me = h.iter().find(|h| h.pid == pid);
        assert!(me.is_some(), "child {pid} not among {h:?}");
        let me = me.unwrap();
        assert_eq!(me.command, "sleep");
        assert_eq!(me.to_string(), format!("pid {pid} (sleep)"));
        assert!(h.iter().all(|h| h.pid != std::process::id()));

        // Once it is gone, nobody holds the file any more.
        drop(child);
        assert!(holders(&f).unwrap().iter().all(|h| h.pid != pid));
    }

    #[test]
    fn a_file_only_we_hold_has_no_holders() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("free.db");
        std::fs::write(&f, b"x").unwrap();
        let _ours = std::fs::File::open(&f).unwrap();
        assert_eq!(holders(&f).unwrap(), Vec::new());
        assert_eq!(holders_of_db(&f).unwrap(), Vec::new());
        // as root every process may be inspected: nobody else, for sure
        assert!(!maybe_held(&[file_id(&f).unwrap()]).unwrap());
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("absent.db");
        let e = holders(&f).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("absent.db"), "{e}");
        assert!(holders_of_db(&f).is_err());
    }

    #[test]
    fn a_holder_of_the_wal_holds_the_database() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("jellyfin.db");
        std::fs::write(&db, b"x").unwrap();
        let wal = sibling(&db, "-wal");
        assert_eq!(wal, d.path().join("jellyfin.db-wal"));
        std::fs::write(&wal, b"w").unwrap();
        std::fs::write(sibling(&db, "-shm"), b"s").unwrap();
        // Holding two of the files still yields one entry for the process.
        let child = Command::new("sh")
            .arg("-c")
            .arg("exec 3<\"$1-wal\" 4<\"$1-shm\"; exec sleep 30")
            .arg("sh")
            .arg(&db)
            .spawn()
            .unwrap();
        let child = Reap(child);
        let pid = child.0.id();
        let h = wait_for(pid, || holders_of_db(&db).unwrap());
        assert_eq!(h.iter().filter(|h| h.pid == pid).count(), 1, "{h:?}");
        assert!(holders(&db).unwrap().iter().all(|h| h.pid != pid));
    }
}
