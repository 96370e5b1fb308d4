//! Promotion bounds, and `sync-cli promote`: a standby whose master is dead
//! takes the folder over.
//!
//! A promotion asked by the source (`Promote` on the wire, during a failover)
//! and one asked locally both end in [`crate::session::replica`]'s `promote`:
//! the new epoch is persisted (role source) before the `start_replica` hook
//! runs, and put back if the hook fails. The bounds here keep a hostile or
//! buggy pinned source from promoting a node that could not serve as the
//! source, or from jumping the epoch so far that no later promotion fits.

use crate::session::replica::{Fence, ReplicaFolder};
use anyhow::{Result, bail};
use std::sync::Arc;

/// How long the source must have been silent before `promote` takes its
/// folder: twice its longest reconnect backoff (5 s). A source that is alive
/// but between sessions (a failed round, a restart of this agent) reconnects
/// within that; promoting then would run this host's app while the master's
/// still runs, until the master comes back fenced.
pub const SOURCE_QUIET: std::time::Duration = std::time::Duration::from_secs(10);

/// Refuses a promotion of `folder` while its source was heard from (or this
/// agent started) less than [`SOURCE_QUIET`] ago.
///
/// # Errors
/// The refusal, naming the folder and how long to wait.
pub fn check_quiet(folder: &str, idle: std::time::Duration) -> Result<()> {
    if idle < SOURCE_QUIET {
        bail!(
            "folder {folder:?}: its source was heard from {:.1} s ago (or this agent started \
             then): a live source between sessions reconnects within 5 s, so promote waits until \
             it has been silent for {} s; run it again in {:.0} s (for a planned switchover run \
             `sync-cli failover` on the source's host)",
            idle.as_secs_f64(),
            SOURCE_QUIET.as_secs(),
            (SOURCE_QUIET - idle).as_secs_f64().ceil()
        );
    }
    Ok(())
}

/// The highest epoch a promotion may reach: `u64::MAX` is never used, so that
/// "past every epoch seen" always exists.
pub const MAX_EPOCH: u64 = proto::handshake::MAX_EPOCH;

/// The epoch one step past `seen`, or an error naming the folder when the
/// epochs are exhausted.
pub fn next_epoch(folder: &str, seen: u64) -> Result<u64> {
    match seen.checked_add(1) {
        Some(e) if e <= MAX_EPOCH => Ok(e),
        _ => bail!(
            "folder {folder:?}: epoch {seen} has no successor (at most {MAX_EPOCH}): promotion refused"
        ),
    }
}

/// Whether a promotion of `folder` from `before` to `epoch` is allowed: the
/// node must be able to serve as the source (peer addresses, `failover` not
/// off), and `epoch` must be exactly one step past the epoch it holds.
///
/// # Errors
/// The refusal, naming the folder and the epochs.
pub fn check(folder: &ReplicaFolder, before: Fence, epoch: u64) -> Result<()> {
    if !folder.promotable {
        bail!(
            "folder {:?}: this node cannot serve as the folder's source (failover = false, or \
             no peer address in its config): promotion refused",
            folder.name
        );
    }
    if epoch <= before.epoch {
        bail!(
            "folder {:?}: promotion to epoch {epoch}, but this node already holds epoch {}",
            folder.name,
            before.epoch
        );
    }
    let next = next_epoch(&folder.name, before.epoch)?;
    if epoch > next {
        bail!(
            "folder {:?}: promotion to epoch {epoch} is more than one step past epoch {} that \
             this node holds: refused",
            folder.name,
            before.epoch
        );
    }
    Ok(())
}

/// `sync-cli promote`: this standby becomes the folder's source at the epoch
/// past every epoch it has seen, while its old source is gone. Refused while a
/// source is connected (a planned handover is `sync-cli failover`, run on the
/// source's host). On success the supervisor is woken and serves the folder as
/// its source; returns the new epoch.
///
/// # Errors
/// Refused (connected source, already the source, not promotable, no state
/// directory), or the `start_replica` hook failed and the promotion was rolled
/// back.
pub async fn promote_standby(folder: &Arc<ReplicaFolder>) -> Result<u64> {
    // The session lock is held for a whole session: while a source is
    // connected it is taken. Holding it here keeps a source that connects
    // during the promotion from applying anything (it is fenced once it gets
    // the lock).
    let Ok(_session) = folder.lock.try_lock() else {
        bail!(
            "folder {:?}: its source is connected to this node: promote is for a standby whose \
             master is dead; for a planned switchover run `sync-cli failover` on the source's host",
            folder.name
        );
    };
    let before = folder.fence.lock().map(|g| *g).unwrap_or_default();
    if before.source {
        bail!(
            "folder {:?}: this node is already its source (epoch {})",
            folder.name,
            before.epoch
        );
    }
    check_quiet(&folder.name, folder.activity.idle())?;
    let epoch = next_epoch(&folder.name, before.epoch)?;
    crate::session::replica::promote(folder, epoch).await?;
    folder.promoted.notify_waiters();
    folder.promoted.notify_one();
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder(promotable: bool, epoch: u64) -> (tempfile::TempDir, Arc<ReplicaFolder>) {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let f = crate::replica_folder_with(
            "jf",
            &root,
            sync_core::filter::Filter::default(),
            Vec::new(),
            crate::ReplicaSettings {
                state_dir: Some(d.path().join("state")),
                node: "n".into(),
                hooks: crate::config::Hooks {
                    start_replica: Some(format!("echo ran >> {}/hook.log", d.path().display())),
                    ..Default::default()
                },
                fence: Fence {
                    epoch,
                    source: false,
                },
                promotable,
                ..Default::default()
            },
        )
        .unwrap();
        // Its source long silent (see `SOURCE_QUIET`).
        f.activity
            .backdate(SOURCE_QUIET + std::time::Duration::from_secs(1));
        (d, f)
    }

    #[test]
    fn bounds() {
        let (_d, f) = folder(true, 3);
        let at = |e| Fence {
            epoch: e,
            source: false,
        };
        check(&f, at(3), 4).unwrap();
        for (held, to) in [(3, 3), (3, 2), (3, 5), (3, u64::MAX), (MAX_EPOCH, u64::MAX)] {
            assert!(check(&f, at(held), to).is_err(), "{held} -> {to}");
        }
        assert!(next_epoch("jf", MAX_EPOCH).is_err());
        assert!(next_epoch("jf", u64::MAX).is_err());
        let (_d, f) = folder(false, 3);
        let e = format!("{:#}", check(&f, at(3), 4).unwrap_err());
        assert!(e.contains("cannot serve") && e.contains("jf"), "{e}");
    }

    #[tokio::test]
    async fn promote_standby_persists_then_runs_the_hook() {
        let (d, f) = folder(true, 2);
        assert_eq!(promote_standby(&f).await.unwrap(), 3);
        let st = crate::epoch::load(&d.path().join("state"), "jf")
            .unwrap()
            .unwrap();
        assert_eq!((st.role, st.epoch), (crate::config::Role::Source, 3));
        assert_eq!(
            std::fs::read_to_string(d.path().join("hook.log")).unwrap(),
            "ran\n"
        );
        let e = format!("{:#}", promote_standby(&f).await.unwrap_err());
        assert!(e.contains("already its source"), "{e}");

        // A connected source (the session lock held): refused, nothing run.
        let (d, f) = folder(true, 0);
        let held = f.lock.lock().await;
        let e = format!("{:#}", promote_standby(&f).await.unwrap_err());
        assert!(e.contains("failover") && e.contains("connected"), "{e}");
        drop(held);
        assert!(
            crate::epoch::load(&d.path().join("state"), "jf")
                .unwrap()
                .is_none()
        );
        assert!(!d.path().join("hook.log").exists());

        // The start hook fails: rolled back, still a replica at its epoch.
        let (d, f) = folder(true, 5);
        let mut hooks = f.hooks.clone();
        hooks.start_replica = Some("echo cannot start >&2; exit 3".into());
        let f = Arc::new(crate::session::replica::ReplicaFolder {
            hooks,
            ..Arc::into_inner(f).unwrap()
        });
        let e = format!("{:#}", promote_standby(&f).await.unwrap_err());
        assert!(e.contains("rolled back") && e.contains("epoch 5"), "{e}");
        let st = crate::epoch::load(&d.path().join("state"), "jf")
            .unwrap()
            .unwrap();
        assert_eq!((st.role, st.epoch), (crate::config::Role::Replica, 5));
        assert_eq!(
            *f.fence.lock().unwrap(),
            Fence {
                epoch: 5,
                source: false
            }
        );

        // A source heard from moments ago (alive, between sessions): refused
        // with how long to wait; nothing persisted, no hook.
        let (d, f) = folder(true, 0);
        f.activity.touch();
        let e = format!("{:#}", promote_standby(&f).await.unwrap_err());
        assert!(e.contains("heard from") && e.contains("\"jf\""), "{e}");
        assert!(
            crate::epoch::load(&d.path().join("state"), "jf")
                .unwrap()
                .is_none()
        );
        assert!(!d.path().join("hook.log").exists());

        // Not promotable, or epochs exhausted: nothing persisted, no hook.
        for (promotable, epoch) in [(false, 0), (true, MAX_EPOCH)] {
            let (d, f) = folder(promotable, epoch);
            assert!(promote_standby(&f).await.is_err());
            assert!(
                crate::epoch::load(&d.path().join("state"), "jf")
                    .unwrap()
                    .is_none()
            );
            assert!(!d.path().join("hook.log").exists());
        }
    }
}
