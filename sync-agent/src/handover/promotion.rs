//! The replica's side of a promotion, made durable.
//!
//! A promotion persists the new epoch (from then on older sources are
//! refused), then runs the `start_replica` hook; if the hook fails the old
//! state is put back. `{state}/{folder}.promotion` is written before the new
//! epoch and removed once the hook has answered, so an agent killed in between
//! finds it at its next start ([`resume`]): the hook runs again, and a failure
//! rolls the promotion back as it would have been. Without it, such a node
//! would come back as the source with its application never started.

use crate::config::{Hook, Role};
use crate::session::replica::{Fence, ReplicaFolder};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What the marker holds: the state before the promotion, and its epoch.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The epoch promoted to.
    pub epoch: u64,
    /// This node's epoch before.
    pub before_epoch: u64,
    /// Whether it was the source before (never, for a replica; kept for the
    /// rollback to put back exactly what was).
    pub before_source: bool,
}

/// `{state_dir}/{folder}.promotion`.
#[must_use]
pub fn path(state_dir: &Path, folder: &str) -> PathBuf {
    state_dir.join(format!("{folder}.promotion"))
}

/// Writes the marker atomically.
///
/// # Errors
/// The write fails (the error names the file).
pub fn begin(state_dir: &Path, folder: &str, p: Pending) -> Result<()> {
    crate::epoch::check_name(folder)?;
    crate::epoch::create_state_dir(state_dir)?;
    let file = path(state_dir, folder);
    let json = serde_json::to_vec(&p).context("encoding the promotion marker")?;
    sync_core::apply::write_atomic(&file, |w| std::io::Write::write_all(w, &json))
        .with_context(|| format!("writing promotion marker {}", file.display()))
}

/// The marker of `folder`, if an earlier run left one.
///
/// # Errors
/// It cannot be read or parsed (the error names it).
pub fn load(state_dir: &Path, folder: &str) -> Result<Option<Pending>> {
    crate::epoch::check_name(folder)?;
    let file = path(state_dir, folder);
    match std::fs::read(&file) {
        Ok(t) => serde_json::from_slice(&t)
            .map(Some)
            .with_context(|| format!("promotion marker {} is corrupt", file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading promotion marker {}", file.display())),
    }
}

/// The epoch of a promotion in progress on `folder` (its marker is present):
/// until its hook has answered, sources are told to retry rather than fenced,
/// since a failing hook rolls the promotion back.
#[must_use]
pub fn pending(folder: &ReplicaFolder) -> Option<u64> {
    let dir = folder.state_dir.as_ref()?;
    load(dir, &folder.name).ok().flatten().map(|p| p.epoch)
}

fn end(folder: &ReplicaFolder, dir: &Path) {
    let file = path(dir, &folder.name);
    match std::fs::remove_file(&file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::error!(folder = %folder.name, "removing {}: {e}", file.display()),
    }
}

fn store(folder: &ReplicaFolder, dir: &Path, f: Fence) -> Result<()> {
    let st = crate::epoch::FolderState {
        role: if f.source {
            Role::Source
        } else {
            Role::Replica
        },
        epoch: f.epoch,
    };
    crate::epoch::store(dir, &folder.name, &folder.node, st)
}

/// Persists the promotion to `epoch` (marker first, then the epoch file and
/// the fence in memory), then runs `start_replica`; a failing hook puts
/// `before` back.
///
/// # Errors
/// Persisting fails, or the hook fails (then the error says whether the
/// rollback held).
pub async fn promote(folder: &ReplicaFolder, dir: &Path, before: Fence, epoch: u64) -> Result<()> {
    begin(
        dir,
        &folder.name,
        Pending {
            epoch,
            before_epoch: before.epoch,
            before_source: before.source,
        },
    )?;
    let promoted = Fence {
        epoch,
        source: true,
    };
    if let Err(e) = store(folder, dir, promoted) {
        end(folder, dir);
        return Err(e);
    }
    if let Ok(mut g) = folder.fence.lock() {
        *g = promoted;
    }
    sync_core::failpoint("promotion-before-start-replica");
    start_or_roll_back(folder, dir, before).await
}

async fn start_or_roll_back(folder: &ReplicaFolder, dir: &Path, before: Fence) -> Result<()> {
    let hook = Hook::StartReplica;
    let res = match folder.hooks.command(hook) {
        Some(cmd) => crate::hooks::run(hook.name(), cmd, &folder.name, folder.hooks.timeout())
            .await
            .map(drop),
        None => Ok(()),
    };
    let out = match res {
        Ok(()) => Ok(()),
        Err(e) => {
            if let Ok(mut g) = folder.fence.lock() {
                *g = before;
            }
            Err(match store(folder, dir, before) {
                Ok(()) => e.context(format!(
                    "promotion rolled back: this node stays a replica at epoch {}",
                    before.epoch
                )),
                Err(r) => e.context(format!(
                    "promotion rolled back, but restoring the epoch failed: {r:#}"
                )),
            })
        }
    };
    end(folder, dir);
    out
}

/// At agent start, before the folder is served: finishes a promotion an
/// earlier run left half-way (`start_replica` again, or the rollback).
///
/// # Errors
/// The marker cannot be read, or the hook failed (the promotion was then
/// rolled back, as the error says).
pub async fn resume(folder: &ReplicaFolder) -> Result<()> {
    let Some(dir) = folder.state_dir.clone() else {
        return Ok(());
    };
    let Some(p) = load(&dir, &folder.name)? else {
        return Ok(());
    };
    let now = folder.fence.lock().map(|g| *g).unwrap_or_default();
    let before = Fence {
        epoch: p.before_epoch,
        source: p.before_source,
    };
    if !(now.source && now.epoch == p.epoch) {
        // Killed before the new epoch was persisted: nothing happened.
        end(folder, &dir);
        return Ok(());
    }
    tracing::warn!(folder = %folder.name, epoch = p.epoch, "a promotion was interrupted before start_replica answered: running it again");
    start_or_roll_back(folder, &dir, before).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_names_itself() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path(), "jf").unwrap(), None);
        let p = Pending {
            epoch: 3,
            before_epoch: 2,
            before_source: false,
        };
        begin(d.path(), "jf", p).unwrap();
        assert_eq!(load(d.path(), "jf").unwrap(), Some(p));
        std::fs::write(path(d.path(), "jf"), b"{").unwrap();
        let e = format!("{:#}", load(d.path(), "jf").unwrap_err());
        assert!(e.contains("jf.promotion"), "{e}");
    }
}
