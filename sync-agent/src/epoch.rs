//! Persisted per-folder fencing state: which role this node plays for a folder
//! and at which epoch, in `{state}/{folder}.epoch`.
//!
//! A promotion raises the epoch by one; a replica refuses changes from a source
//! with an older epoch. The file is one JSON object, e.g.
//! `{"node":"<node id>","role":"replica","epoch":3}` (`node` is for humans only),
//! replaced atomically (temp file, fsync, rename, fsync of the directory), so a
//! crash leaves the old state or the new one.
//!
//! [`FailoverLock`] keeps two failovers or failbacks of one folder from running
//! at once on a host.

use crate::config::Role;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// A folder's fencing state on this node.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderState {
    /// The role this node plays for the folder.
    pub role: Role,
    /// The folder's epoch as this node knows it.
    pub epoch: u64,
}

/// The file as written: the state plus the node id, for humans.
#[derive(Serialize, Deserialize)]
struct OnDisk {
    #[serde(default)]
    node: String,
    #[serde(flatten)]
    state: FolderState,
}

/// `{state_dir}/{folder}.epoch`.
#[must_use]
pub fn path(state_dir: &Path, folder: &str) -> PathBuf {
    state_dir.join(format!("{folder}.epoch"))
}

/// The lock file of [`FailoverLock`]: `{state_dir}/{folder}.failover.lock`.
#[must_use]
pub fn lock_path(state_dir: &Path, folder: &str) -> PathBuf {
    state_dir.join(format!("{folder}.failover.lock"))
}

/// A folder name must be a single plain file-name component to name state files.
pub(crate) fn check_name(folder: &str) -> Result<()> {
    if folder.is_empty()
        || folder == "."
        || folder == ".."
        || folder.contains('/')
        || folder.contains('\0')
    {
        bail!("folder name {folder:?} cannot name a state file");
    }
    Ok(())
}

/// The persisted state of `folder`; `None` when none was stored yet.
///
/// # Errors
/// The file cannot be read, or does not hold a state (the error names the file).
pub fn load(state_dir: &Path, folder: &str) -> Result<Option<FolderState>> {
    check_name(folder)?;
    let p = path(state_dir, folder);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading epoch file {}", p.display())),
    };
    let d: OnDisk = serde_json::from_slice(&text).with_context(|| {
        format!(
            "epoch file {} is corrupt (expected {{\"node\": …, \"role\": \"source\"|\"replica\", \"epoch\": N}})",
            p.display()
        )
    })?;
    Ok(Some(d.state))
}

/// Persists `st` for `folder` atomically, creating `state_dir` (mode 0700) if
/// missing. `node` is this node's id, recorded for humans.
///
/// # Errors
/// Any step of the write fails (the error names the file).
pub fn store(state_dir: &Path, folder: &str, node: &str, st: FolderState) -> Result<()> {
    check_name(folder)?;
    create_state_dir(state_dir)?;
    let p = path(state_dir, folder);
    let mut json = serde_json::to_vec(&OnDisk {
        node: node.to_string(),
        state: st,
    })
    .context("encoding the epoch state")?;
    json.push(b'\n');

    sync_core::apply::write_atomic(&p, |w| w.write_all(&json))
        .with_context(|| format!("writing epoch file {}", p.display()))
}

pub(crate) fn create_state_dir(state_dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))
}

/// An exclusive `flock` on `{state}/{folder}.failover.lock`, released when
/// dropped (or when the process dies). The lock file itself stays.
#[derive(Debug)]
pub struct FailoverLock {
    _file: File,
    path: PathBuf,
}

impl FailoverLock {
    /// Takes the lock without waiting.
    ///
    /// # Errors
    /// Another failover or failback of `folder` holds it, or the lock file cannot
    /// be opened.
    pub fn acquire(state_dir: &Path, folder: &str) -> Result<Self> {
        check_name(folder)?;
        create_state_dir(state_dir)?;
        let path = lock_path(state_dir, folder);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(rustix::io::Errno::WOULDBLOCK) => bail!(
                "another failover/failback of folder {folder} is running (lock {} held)",
                path.display()
            ),
            Err(e) => {
                Err(std::io::Error::from(e)).with_context(|| format!("locking {}", path.display()))
            }
        }
    }

    /// The lock file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_is_none_and_store_load_round_trips() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        assert_eq!(load(&state, "jf").unwrap(), None);
        let st = FolderState {
            role: Role::Replica,
            epoch: 7,
        };
        store(&state, "jf", "node-a", st).unwrap();
        assert_eq!(load(&state, "jf").unwrap(), Some(st));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&state).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);

        let text = std::fs::read_to_string(path(&state, "jf")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["node"], "node-a");
        assert_eq!(v["role"], "replica");
        assert_eq!(v["epoch"], 7);

        // Replaced, not appended; no temp file left behind; other folders apart.
        let st2 = FolderState {
            role: Role::Source,
            epoch: 8,
        };
        store(&state, "jf", "node-a", st2).unwrap();
        assert_eq!(load(&state, "jf").unwrap(), Some(st2));
        assert_eq!(load(&state, "other").unwrap(), None);
        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["jf.epoch".to_string()]);
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path(), "jf");
        assert_eq!(p, d.path().join("jf.epoch"));
        for bad in [
            &b"{\"role\":\"source\",\"epo"[..],
            b"",
            b"{\"role\":\"master\",\"epoch\":1}",
        ] {
            std::fs::write(&p, bad).unwrap();
            let e = format!("{:#}", load(d.path(), "jf").unwrap_err());
            assert!(e.contains(&p.display().to_string()), "{e}");
        }
    }

    #[test]
    fn bad_folder_names_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let st = FolderState {
            role: Role::Source,
            epoch: 1,
        };
        for bad in ["", "..", "a/b"] {
            assert!(store(d.path(), bad, "n", st).is_err(), "{bad:?}");
            assert!(load(d.path(), bad).is_err(), "{bad:?}");
            assert!(FailoverLock::acquire(d.path(), bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn failover_lock_is_exclusive_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let first = FailoverLock::acquire(&state, "jf").unwrap();
        assert_eq!(first.path(), lock_path(&state, "jf"));
        let e = FailoverLock::acquire(&state, "jf").unwrap_err().to_string();
        assert!(
            e.contains("another failover/failback of folder jf is running")
                && e.contains("jf.failover.lock"),
            "{e}"
        );
        // Another folder has its own lock.
        let _other = FailoverLock::acquire(&state, "music").unwrap();
        drop(first);
        let _again = FailoverLock::acquire(&state, "jf").unwrap();
    }
}
