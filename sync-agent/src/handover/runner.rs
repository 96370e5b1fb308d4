//! The glue: carries out a [`Machine`]'s actions on the agent's tokio runtime
//! (hooks, the folder's source loop for cuts and the promotion, the state
//! files) and feeds their results back.
//!
//! Decisions read persisted state, never a status that may be stale: whether
//! this node is the source comes from its epoch file, and `start_source` is
//! never run while that file says replica.

use super::machine::{Action, Event, Machine, Outcome, Peer, PromoteFailure};
use super::preflight::{ask_cut, preflight};
use super::record::{self, Kind, Record};
use crate::config::{Hook, Hooks, Role};
use crate::continuous::{Command, SharedStatus};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long the preflight waits for the replica to be connected (right after a
/// handover the new source takes a moment to reach its replica).
pub const CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long a cut may take before it counts as failed.
pub const CUT_TIMEOUT: Duration = Duration::from_secs(300);
/// Poll period while waiting on the peer or the source loop.
pub(super) const POLL: Duration = Duration::from_millis(250);

/// One folder's handover context, shared by the control socket and the task
/// that runs a handover.
#[derive(Debug)]
pub struct Folder {
    /// The folder.
    pub name: String,
    /// Its hooks.
    pub hooks: Hooks,
    /// Where the epoch and the handover record live (`None`: no handovers).
    pub state_dir: Option<PathBuf>,
    /// This node's id (written in the epoch file).
    pub node: String,
    /// The role the config gives, used while no epoch file exists.
    pub configured: Role,
    /// Commands to the folder's source loop.
    pub commands: mpsc::Sender<Command>,
    /// The first source loop's status (connected, last error).
    pub status: Option<SharedStatus>,
    /// The replica side's fence, updated when this node takes the replica role.
    pub fence: Option<Arc<crate::session::replica::ReplicaFolder>>,
    /// The current or last handover.
    progress: Mutex<Progress>,
}

/// A handover as the CLI and `status` see it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// The folder.
    pub folder: String,
    /// Which handover of this agent's life (1, 2, …).
    pub id: u64,
    /// failover or failback.
    pub kind: String,
    /// A dry run.
    pub dry_run: bool,
    /// Different `parity` outputs do not refuse it (`--ignore-parity`).
    #[serde(default)]
    pub ignore_parity: bool,
    /// Still running.
    pub running: bool,
    /// The step it is at.
    pub step: String,
    /// When it began (seconds since the Unix epoch).
    pub started_unix: u64,
    /// Progress lines, in order.
    pub lines: Vec<String>,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

/// Why a handover was not started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refused {
    /// One is running already (in this agent, or persisted).
    #[error("folder {folder}: a {kind} is already in progress (step {step}); nothing was done")]
    Busy {
        /// The folder.
        folder: String,
        /// The running one's kind.
        kind: String,
        /// Its step.
        step: String,
    },
    /// The folder's failover lock is held (or cannot be taken); the message
    /// names the lock file.
    #[error("{0}; nothing was done")]
    Locked(String),
    /// This node is not the folder's source.
    #[error(
        "folder {folder}: this node is its replica at epoch {epoch}; run the handover on the source's host"
    )]
    NotSource {
        /// The folder.
        folder: String,
        /// This node's epoch.
        epoch: u64,
    },
    /// A failback at epoch 0.
    #[error(
        "folder {0}: epoch 0, this node was never promoted: nothing to fail back (use failover)"
    )]
    NothingToFailBack(String),
    /// No state directory, or it cannot be read or locked.
    #[error("folder {folder}: {why}")]
    State {
        /// The folder.
        folder: String,
        /// Why.
        why: String,
    },
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Folder {
    /// A context for `name`.
    #[allow(clippy::too_many_arguments)]
    #[must_use]
    pub fn new(
        name: &str,
        hooks: Hooks,
        state_dir: Option<PathBuf>,
        node: String,
        configured: Role,
        commands: mpsc::Sender<Command>,
        status: Option<SharedStatus>,
        fence: Option<Arc<crate::session::replica::ReplicaFolder>>,
    ) -> Self {
        Self {
            name: name.to_string(),
            hooks,
            state_dir,
            node,
            configured,
            commands,
            status,
            fence,
            progress: Mutex::new(Progress::default()),
        }
    }

    /// The current or last handover, its lines from `from` on.
    #[must_use]
    pub fn progress(&self, from: usize) -> Progress {
        let mut p = self.progress.lock().map(|p| p.clone()).unwrap_or_default();
        p.lines = p.lines.split_off(from.min(p.lines.len()));
        p
    }

    fn line(&self, l: String) {
        tracing::info!(folder = %self.name, "handover: {l}");
        if let Ok(mut p) = self.progress.lock() {
            p.lines.push(l);
        }
    }

    fn set_step(&self, step: String) {
        if let Ok(mut p) = self.progress.lock() {
            p.step = step;
        }
    }

    /// Whether the current handover goes on when the `parity` outputs differ.
    pub(super) fn ignore_parity(&self) -> bool {
        self.progress.lock().is_ok_and(|p| p.ignore_parity)
    }

    /// This node's role and epoch for the folder, from its epoch file.
    pub(super) fn local(&self) -> Result<(Role, u64), String> {
        let Some(dir) = &self.state_dir else {
            return Ok((self.configured, 0));
        };
        match crate::epoch::load(dir, &self.name) {
            Ok(Some(st)) => Ok((st.role, st.epoch)),
            Ok(None) => Ok((self.configured, 0)),
            Err(e) => Err(format!("{e:#}")),
        }
    }
}

/// Starts a handover of `f` on its own task; returns its id at once.
///
/// # Errors
/// [`Refused`]: one is in progress, this node is not the source, or the state
/// directory is missing or unusable. Nothing was done then.
pub fn start(
    f: &Arc<Folder>,
    kind: Kind,
    dry_run: bool,
    ignore_parity: bool,
) -> Result<u64, Refused> {
    let state_err = |why: String| Refused::State {
        folder: f.name.clone(),
        why,
    };
    let dir = f.state_dir.clone().ok_or_else(|| {
        state_err("[node] state is not set (the fencing epoch and the handover live there)".into())
    })?;
    let mut p = f
        .progress
        .lock()
        .map_err(|_| state_err("progress lock poisoned".into()))?;
    if p.running {
        return Err(Refused::Busy {
            folder: f.name.clone(),
            kind: p.kind.clone(),
            step: p.step.clone(),
        });
    }
    if let Some(rec) = record::load(&dir, &f.name).map_err(|e| state_err(format!("{e:#}")))? {
        return Err(Refused::Busy {
            folder: f.name.clone(),
            kind: rec.kind.to_string(),
            step: rec.step.to_string(),
        });
    }
    let (role, epoch) = f.local().map_err(state_err)?;
    if role != Role::Source {
        return Err(Refused::NotSource {
            folder: f.name.clone(),
            epoch,
        });
    }
    if kind == Kind::Failback && epoch == 0 {
        return Err(Refused::NothingToFailBack(f.name.clone()));
    }
    let lock = crate::epoch::FailoverLock::acquire(&dir, &f.name)
        .map_err(|e| Refused::Locked(format!("{e:#}")))?;
    let now = now_unix();
    *p = Progress {
        folder: f.name.clone(),
        id: p.id + 1,
        kind: kind.to_string(),
        dry_run,
        ignore_parity,
        running: true,
        step: "preflight".into(),
        started_unix: now,
        lines: Vec::new(),
        outcome: None,
    };
    let id = p.id;
    drop(p);
    let mut m = Machine::new(&f.name, kind, epoch, now, dry_run);
    let acts = m.start();
    tokio::spawn(drive(f.clone(), m, acts, lock));
    Ok(id)
}

/// Takes up a handover persisted by an earlier run of the agent, if any.
///
/// # Errors
/// The record cannot be read (the error names the file).
pub fn resume(f: &Arc<Folder>) -> anyhow::Result<bool> {
    let Some(dir) = f.state_dir.clone() else {
        return Ok(false);
    };
    let Some(rec) = record::load(&dir, &f.name)? else {
        return Ok(false);
    };
    tracing::warn!(folder = %f.name, step = %rec.step, "an interrupted {} is taken up again", rec.kind);
    let lock = crate::epoch::FailoverLock::acquire(&dir, &f.name)?;
    if let Ok(mut p) = f.progress.lock() {
        *p = Progress {
            folder: f.name.clone(),
            id: p.id + 1,
            kind: rec.kind.to_string(),
            dry_run: false,
            // Taken up past its preflight: the parity check already passed.
            ignore_parity: false,
            running: true,
            step: rec.step.to_string(),
            started_unix: rec.started_unix,
            lines: Vec::new(),
            outcome: None,
        };
    }
    let (m, acts) = Machine::resume(rec);
    tokio::spawn(drive(f.clone(), m, acts, lock));
    Ok(true)
}

/// Carries out actions until the machine finishes.
async fn drive(
    f: Arc<Folder>,
    mut m: Machine,
    acts: Vec<Action>,
    _lock: crate::epoch::FailoverLock,
) {
    let mut queue: VecDeque<Action> = acts.into();
    while let Some(a) = queue.pop_front() {
        let ev = match a {
            Action::Report(l) => {
                f.line(l);
                None
            }
            Action::Persist(rec) => persist(&f, &rec).err().map(|e| {
                queue.clear();
                f.line(format!("cannot persist step {}: {e}", rec.step));
                Event::PersistFailed(e)
            }),
            Action::Preflight => Some(Event::Preflight(preflight(&f).await)),
            Action::RunHook(h) => Some(run_hook(&f, h).await),
            Action::TakeCut => Some(Event::Cut(cut(&f).await)),
            Action::SendPromote { epoch } => {
                sync_core::failpoint("handover-before-promote");
                let answer = promote(&f, epoch).await;
                if answer.is_ok() {
                    sync_core::failpoint("handover-after-promote");
                }
                Some(Event::Promotion(answer))
            }
            Action::ObservePeer { epoch } => Some(observe(&f, &mut m, epoch).await),
            Action::BecomeReplica { epoch } => {
                Some(Event::Demoted(become_replica(&f, epoch).await))
            }
            Action::Clear => {
                if let Some(dir) = &f.state_dir
                    && let Err(e) = record::clear(dir, &f.name)
                {
                    f.line(format!("warning: {e:#}"));
                }
                None
            }
            Action::Finish(o) => {
                finish(&f, o);
                None
            }
        };
        if let Some(ev) = ev {
            queue.extend(m.handle(ev));
        }
    }
    if !m.finished() {
        finish(
            &f,
            Outcome {
                step: "failed".into(),
                error: Some("the handover stopped without an outcome (a bug)".into()),
                ..Default::default()
            },
        );
    }
}

fn finish(f: &Folder, o: Outcome) {
    match &o.error {
        Some(e) => tracing::error!(folder = %f.name, step = %o.step, "handover: {e}"),
        None => tracing::info!(folder = %f.name, step = %o.step, "handover over"),
    }
    if let Ok(mut p) = f.progress.lock() {
        p.step = o.step.clone();
        p.running = false;
        p.outcome = Some(o);
    }
}

fn persist(f: &Folder, rec: &Record) -> Result<(), String> {
    f.set_step(rec.step.to_string());
    let dir = f
        .state_dir
        .as_ref()
        .ok_or_else(|| "no state directory".to_string())?;
    record::store(dir, rec).map_err(|e| format!("{e:#}"))
}

async fn run_hook(f: &Folder, hook: Hook) -> Event {
    if hook == Hook::StartSource {
        match f.local() {
            Ok((Role::Replica, epoch)) => return Event::RestartRefused { epoch },
            Ok(_) => {}
            Err(e) => {
                return Event::Hook {
                    hook,
                    result: Err(format!(
                        "cannot tell this node's role, start_source not run: {e}"
                    )),
                };
            }
        }
    }
    let result = match f.hooks.command(hook) {
        None => {
            f.line(format!("{hook}: not configured, skipped"));
            Ok(())
        }
        Some(cmd) => match crate::hooks::run(hook.name(), cmd, &f.name, f.hooks.timeout()).await {
            Ok(o) => {
                f.line(format!(
                    "{hook}: ran {cmd:?} in {:.1} s",
                    o.elapsed.as_secs_f64()
                ));
                Ok(())
            }
            Err(e) => {
                f.line(format!("{hook}: FAILED: {e:#}"));
                Err(format!("{e:#}"))
            }
        },
    };
    if hook == Hook::StopSource {
        sync_core::failpoint("handover-after-stop-source");
    }
    Event::Hook { hook, result }
}

async fn cut(f: &Folder) -> Result<String, String> {
    let c = ask_cut(f).await?;
    if !c.held.is_empty() {
        return Err(format!(
            "replica databases held open: {}",
            c.held.join("; ")
        ));
    }
    if !c.matched {
        return Err(format!(
            "root hashes differ: source {} replica {}{}",
            c.source_root,
            c.replica_root,
            c.warnings
                .first()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        ));
    }
    Ok(format!(
        "cut {}: roots match {} (writer stall {:.3} ms, {} bytes)",
        c.cut_id, c.source_root, c.writer_stall_ms, c.bytes_shipped
    ))
}

async fn promote(f: &Folder, epoch: u64) -> Result<(), PromoteFailure> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    f.commands
        .send(Command::Promote { epoch, reply })
        .await
        .map_err(|_| {
            PromoteFailure::NotSent(format!("folder {}: its source loop is not running", f.name))
        })?;
    rx.await
        .map_err(|_| PromoteFailure::Lost("the source loop ended during the promotion".into()))?
}

/// Waits until the peer's epoch is known: this node demoted (the peer's hello
/// fenced it, or the source loop persisted the demotion), or a cut at the old
/// epoch succeeded (the peer still takes this node as its source).
async fn observe(f: &Folder, m: &mut Machine, epoch: u64) -> Event {
    loop {
        if let Ok((Role::Replica, e)) = f.local()
            && e >= epoch
        {
            return Event::Peer(Peer::Promoted { epoch: e });
        }
        if let Ok(Ok(c)) = tokio::time::timeout(Duration::from_secs(30), ask_cut(f)).await
            && c.epoch < epoch
        {
            return Event::Peer(Peer::NotPromoted);
        }
        for a in m.handle(Event::Tick {
            now_unix: now_unix(),
        }) {
            if let Action::Report(l) = a {
                f.line(l);
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The source loop persists the demotion itself when the promotion succeeds
/// (or when the peer fences it); wait for that, else write it here.
async fn become_replica(f: &Folder, epoch: u64) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match f.local() {
            Ok((Role::Replica, e)) if e >= epoch => return Ok(()),
            _ if Instant::now() >= deadline => break,
            _ => tokio::time::sleep(POLL).await,
        }
    }
    let dir = f.state_dir.as_ref().ok_or("no state directory")?;
    let st = crate::epoch::FolderState {
        role: Role::Replica,
        epoch,
    };
    crate::epoch::store(dir, &f.name, &f.node, st).map_err(|e| format!("{e:#}"))?;
    if let Some(r) = &f.fence
        && let Ok(mut g) = r.fence.lock()
    {
        *g = crate::session::replica::Fence {
            epoch,
            source: false,
        };
    }
    Ok(())
}
