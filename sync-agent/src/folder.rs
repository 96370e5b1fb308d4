//! The role supervisor: runs one folder in the role its fencing state says,
//! switching when a failover promotes or demotes this node.

use crate::config::Role;
use crate::continuous::{Command, FolderStatus, Outcome};
use crate::plan::FolderPlan;
use crate::session::replica::Fence;
use anyhow::{Result, bail};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

/// Runs one folder in the role its fencing state says, switching when a
/// failover promotes or demotes this node.
pub async fn supervise(
    f: FolderPlan,
    statuses: Vec<Arc<Mutex<FolderStatus>>>,
    mut commands: mpsc::Receiver<Command>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut local = f.fence;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let now = if f.replica.is_some() {
            current_fence(&f)
        } else {
            local
        };
        if now.source {
            match run_as_source(&f, &statuses, &mut commands, &stop, now).await? {
                Outcome::Stopped => return Ok(()),
                Outcome::Demoted { epoch } => local = demote(&f, &statuses, epoch).await?,
            }
        } else if !wait_as_replica(&f, &mut commands, &mut stop, now).await {
            return Ok(());
        }
    }
}

/// The fencing state the replica side holds (it changes on a promotion), or
/// the planned one.
fn current_fence(f: &FolderPlan) -> Fence {
    f.replica
        .as_ref()
        .and_then(|r| r.fence.lock().ok().map(|g| *g))
        .unwrap_or(f.fence)
}

/// Runs the folder's source loops at `now.epoch` until stopped or demoted:
/// the first peer drives handovers; more peers each get a copy.
async fn run_as_source(
    f: &FolderPlan,
    statuses: &[Arc<Mutex<FolderStatus>>],
    commands: &mut mpsc::Receiver<Command>,
    stop: &watch::Receiver<bool>,
    now: Fence,
) -> Result<Outcome> {
    let Some((first, rest)) = f.sources.split_first() else {
        bail!(
            "folder {}: this node is its source but no peer has an address",
            f.name
        );
    };
    let (sub_stop_tx, sub_stop) = watch::channel(false);
    let mut others = tokio::task::JoinSet::new();
    for (cfg, st) in rest.iter().zip(statuses.iter().skip(1)) {
        let mut cfg = cfg.clone();
        cfg.epoch = now.epoch;
        let (st, s) = (st.clone(), sub_stop.clone());
        others.spawn(async move {
            let (_tx, mut rx) = mpsc::channel(1);
            crate::continuous::run_source(cfg, st, s, &mut rx).await
        });
    }
    let mut cfg = first.clone();
    cfg.epoch = now.epoch;
    let status = statuses.first().cloned().unwrap_or_default();
    let stop_first = {
        let mut stop = stop.clone();
        let sub = sub_stop_tx.clone();
        tokio::spawn(async move {
            let _ = stop.wait_for(|s| *s).await;
            let _ = sub.send(true);
        })
    };
    let outcome = crate::continuous::run_source(cfg, status, sub_stop.clone(), commands).await;
    let _ = sub_stop_tx.send(true);
    stop_first.abort();
    while others.join_next().await.is_some() {}
    outcome
}

/// This node lost the source role at `epoch`: persists it, stops the app and
/// hands the fencing state to the replica side; returns the new state.
async fn demote(
    f: &FolderPlan,
    statuses: &[Arc<Mutex<FolderStatus>>],
    epoch: u64,
) -> Result<Fence> {
    for s in statuses {
        if let Ok(mut s) = s.lock() {
            s.connected = false;
        }
    }
    let st = crate::epoch::FolderState {
        role: Role::Replica,
        epoch,
    };
    if let Some(dir) = &f.state_dir {
        let node = f
            .sources
            .first()
            .map(|s| s.identity.id().to_string())
            .unwrap_or_default();
        crate::epoch::store(dir, &f.name, &node, st)?;
    }
    // The app is stopped before the replica side takes
    // sessions: the new source's first round (and, after a
    // fencing, the copy of what only this node held) never
    // races the app's last writes.
    if let Some(r) = &f.replica
        && let Some(cmd) = r.hooks.command(crate::config::Hook::StopReplica)
        && let Err(e) = crate::hooks::run("stop_replica", cmd, &f.name, r.hooks.timeout()).await
    {
        tracing::error!(folder = %f.name, "{e:#}");
    }
    let local = Fence {
        epoch,
        source: false,
    };
    if let Some(r) = &f.replica
        && let Ok(mut g) = r.fence.lock()
    {
        *g = local;
    }
    tracing::warn!(folder = %f.name, epoch, "this node is now the folder's replica");
    Ok(local)
}

/// As the replica, waits for a promotion (true) or the stop (false),
/// refusing the source's commands meanwhile.
async fn wait_as_replica(
    f: &FolderPlan,
    commands: &mut mpsc::Receiver<Command>,
    stop: &mut watch::Receiver<bool>,
    now: Fence,
) -> bool {
    let Some(r) = f.replica.clone() else {
        tracing::error!(folder = %f.name, "this node is now the folder's replica, but [node] listen is not set: not serving it");
        let _ = stop.wait_for(|s| *s).await;
        return false;
    };
    tokio::select! {
        () = r.promoted.notified() => {}
        _ = stop.wait_for(|s| *s) => return false,
        Some(c) = commands.recv() => {
            let why = format!(
                "folder {}: this node is its replica (epoch {}); run this on the source's host",
                f.name, now.epoch
            );
            match c {
                Command::Cut(reply) => { let _ = reply.send(Err(why)); }
                Command::Promote { reply, .. } => { let _ = reply.send(Err(crate::handover::PromoteFailure::NotSent(why))); }
            }
        }
    }
    true
}
