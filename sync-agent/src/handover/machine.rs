//! The handover state machine: pure, no I/O, no tokio.
//!
//! [`Machine`] takes [`Event`]s (a hook finished, a cut's result, the
//! promotion's answer, what was observed of the peer, the time) and returns
//! [`Action`]s for the glue in [`super::runner`] to carry out, in order. Every
//! action with a side effect is preceded by an [`Action::Persist`] of the step
//! about to be taken, so that a killed agent resumes from the file
//! ([`Machine::resume`]) and ends completed or rolled back:
//!
//! ```text
//! Preflight → StopSource → FinalCut → Promote → Demote → Done
//!                 │            │         │ refused / peer not promoted
//!                 └────────────┴─────────┴──→ RollingBack → RolledBack | Failed
//! ```
//!
//! The rules that keep one application running: `start_source` runs only on a
//! rollback, and a rollback is only chosen while the peer is known not to have
//! been promoted; an answer that was lost is resolved by observing the peer's
//! epoch (its hello, or its fencing of this node), never by guessing.

use super::record::{Kind, Record, Step};
use crate::config::Hook;

/// The check results of a preflight, each named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    /// What was checked, e.g. "replica connected".
    pub name: String,
    /// Whether it passed.
    pub ok: bool,
    /// What was found (on failure: the real cause, naming the thing).
    pub detail: String,
}

/// The replica's answer to a promotion, typed so the rollback decision never
/// depends on message text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PromoteFailure {
    /// The replica answered no and stayed a replica at its old epoch.
    #[error("the replica refused the promotion: {0}")]
    Refused(String),
    /// The promotion was never sent (no session): the replica is unchanged.
    #[error("the promotion was not sent: {0}")]
    NotSent(String),
    /// No usable answer: the replica may or may not have been promoted.
    #[error("the promotion's answer was lost: {0}")]
    Lost(String),
}

/// What was learnt of the peer after a promotion's answer was lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The peer holds the new epoch (it fenced this node, or this node's
    /// persisted state already says replica at that epoch).
    Promoted {
        /// The epoch it holds.
        epoch: u64,
    },
    /// The peer accepted this node as its source at the old epoch after the
    /// promotion was sent: it was not promoted.
    NotPromoted,
}

/// An input of the machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The preflight's checks, all of them.
    Preflight(Vec<Check>),
    /// A hook ended (`Ok` also when it is not configured).
    Hook {
        /// Which.
        hook: Hook,
        /// Its result; the error names the hook and its output.
        result: Result<(), String>,
    },
    /// `start_source` was not run: this node's persisted state says it is a
    /// replica now.
    RestartRefused {
        /// The epoch at which it is a replica.
        epoch: u64,
    },
    /// The final cut: `Ok` with a one-line summary when both roots matched.
    Cut(Result<String, String>),
    /// The promotion's answer.
    Promotion(Result<(), PromoteFailure>),
    /// What was observed of the peer.
    Peer(Peer),
    /// This node's demotion was persisted (or could not be).
    Demoted(Result<(), String>),
    /// An [`Action::Persist`] failed; the actions after it were not run.
    PersistFailed(String),
    /// Time passes (seconds since the Unix epoch), while waiting on the peer.
    Tick {
        /// Now.
        now_unix: u64,
    },
}

/// An output of the machine, carried out in order by the glue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Run the preflight checks and answer [`Event::Preflight`].
    Preflight,
    /// Write the record atomically before what follows; on failure answer
    /// [`Event::PersistFailed`] and skip the rest.
    Persist(Record),
    /// Run a hook and answer [`Event::Hook`] (or [`Event::RestartRefused`]
    /// for `start_source` on a node that is a replica).
    RunHook(Hook),
    /// Take the final cut and answer [`Event::Cut`].
    TakeCut,
    /// Send the promotion and answer [`Event::Promotion`].
    SendPromote {
        /// The replica's new epoch.
        epoch: u64,
    },
    /// Find out whether the peer holds `epoch` and answer [`Event::Peer`];
    /// [`Event::Tick`]s meanwhile.
    ObservePeer {
        /// The epoch the promotion asked for.
        epoch: u64,
    },
    /// Persist this node as the folder's replica at `epoch` and answer
    /// [`Event::Demoted`].
    BecomeReplica {
        /// The epoch.
        epoch: u64,
    },
    /// Remove the persisted record (the handover is over).
    Clear,
    /// A progress line for the operator.
    Report(String),
    /// The handover is over.
    Finish(Outcome),
}

/// How a handover ended, and where each side stands.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    /// Completed (or, for a dry run, every check passed).
    pub ok: bool,
    /// The final step: done, rolled_back or failed.
    pub step: String,
    /// This node's state.
    pub this_node: String,
    /// The peer's state.
    pub peer: String,
    /// Why it did not complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One handover of one folder.
#[derive(Debug, Clone)]
pub struct Machine {
    rec: Record,
    dry_run: bool,
    /// Why the handover is being rolled back.
    why: Option<String>,
    /// When waiting on the peer began, and when it was last reported.
    waiting: Option<(u64, u64)>,
    finished: bool,
}

/// Seconds between "still waiting for the peer" lines.
pub const WAIT_REPORT_S: u64 = 10;

impl Machine {
    /// A new handover of `folder` by this node, the source at `from_epoch`.
    #[must_use]
    pub fn new(folder: &str, kind: Kind, from_epoch: u64, now_unix: u64, dry_run: bool) -> Self {
        Self {
            rec: Record {
                folder: folder.to_string(),
                kind,
                step: Step::Preflight,
                from_epoch,
                to_epoch: from_epoch + 1,
                started_unix: now_unix,
                error: None,
            },
            dry_run,
            why: None,
            waiting: None,
            finished: false,
        }
    }

    /// The first actions: the preflight.
    #[must_use]
    pub fn start(&mut self) -> Vec<Action> {
        vec![
            Action::Report(format!(
                "{} of folder {}: preflight (this node is the source at epoch {})",
                self.rec.kind, self.rec.folder, self.rec.from_epoch
            )),
            Action::Preflight,
        ]
    }

    /// Takes up a handover persisted by an agent that stopped half-way.
    #[must_use]
    pub fn resume(rec: Record) -> (Self, Vec<Action>) {
        let mut m = Self {
            rec,
            dry_run: false,
            why: Some("the agent stopped during the handover".into()),
            waiting: None,
            finished: false,
        };
        let head = Action::Report(format!(
            "resuming the {} of folder {} interrupted at step {}",
            m.rec.kind, m.rec.folder, m.rec.step
        ));
        let mut acts = vec![head];
        acts.extend(match m.rec.step {
            // Nothing was stopped yet (the record is first written before stop_source).
            Step::Preflight => {
                let mut acts = vec![Action::Clear];
                acts.extend(m.finish_unchanged("the agent stopped during the preflight"));
                acts
            }
            // stop_source may have run, the promotion was never sent.
            Step::StopSource | Step::FinalCut | Step::RollingBack => m.roll_back(),
            // Sent, answer unknown: the peer says.
            Step::Promote => m.observe(),
            Step::Demote => m.demote(),
            Step::Done | Step::RolledBack | Step::Failed => {
                m.finished = true;
                vec![Action::Clear]
            }
        });
        (m, acts)
    }

    /// The persisted record as it stands.
    #[must_use]
    pub fn record(&self) -> &Record {
        &self.rec
    }

    /// Whether a [`Action::Finish`] was returned.
    #[must_use]
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Feeds one event; returns what to do next.
    #[must_use]
    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        if self.finished {
            return Vec::new();
        }
        match (self.rec.step, ev) {
            (_, Event::PersistFailed(e)) => self.persist_failed(e),
            (Step::Preflight, Event::Preflight(checks)) => self.preflight(checks),
            (
                Step::StopSource,
                Event::Hook {
                    hook: Hook::StopSource,
                    result,
                },
            ) => match result {
                Ok(()) => self.persist_then(Step::FinalCut, vec![Action::TakeCut]),
                Err(e) => self.fail_and_roll_back(e),
            },
            (Step::FinalCut, Event::Cut(Ok(summary))) => {
                let epoch = self.rec.to_epoch;
                let mut acts = vec![Action::Report(format!("final cut: {summary}"))];
                acts.extend(self.persist_then(Step::Promote, vec![Action::SendPromote { epoch }]));
                acts
            }
            (Step::FinalCut, Event::Cut(Err(e))) => {
                self.fail_and_roll_back(format!("final cut failed: {e}"))
            }
            (Step::Promote, ev) => self.at_promote(ev),
            (Step::Demote, Event::Demoted(Ok(()))) => self.finish(true, Step::Done, None),
            (Step::Demote, Event::Demoted(Err(e))) => self.finish(
                false,
                Step::Failed,
                Some(format!(
                    "the peer is the source at epoch {}, but persisting this node's demotion failed: {e}",
                    self.rec.to_epoch
                )),
            ),
            (Step::RollingBack, ev) => self.at_rolling_back(ev),
            (_, ev) => self.ignored(&ev),
        }
    }

    /// At [`Step::Promote`]: the answer, or what the peer showed.
    fn at_promote(&mut self, ev: Event) -> Vec<Action> {
        match ev {
            Event::Promotion(Ok(())) => {
                let mut acts = vec![Action::Report(format!(
                    "the replica is the source at epoch {} (its start_replica hook ran)",
                    self.rec.to_epoch
                ))];
                acts.extend(self.demote());
                acts
            }
            Event::Promotion(Err(PromoteFailure::Refused(e))) => {
                self.fail_and_roll_back(format!("the replica refused the promotion: {e}"))
            }
            Event::Promotion(Err(PromoteFailure::NotSent(e))) => {
                self.fail_and_roll_back(format!("the promotion was not sent: {e}"))
            }
            Event::Promotion(Err(PromoteFailure::Lost(e))) => {
                let mut acts = vec![Action::Report(format!(
                    "the promotion's answer was lost ({e}): asking the peer which epoch it holds"
                ))];
                acts.extend(self.observe());
                acts
            }
            Event::Peer(Peer::Promoted { epoch }) => {
                self.waiting = None;
                self.rec.to_epoch = self.rec.to_epoch.max(epoch);
                let mut acts = vec![Action::Report(format!(
                    "the peer holds epoch {epoch}: it was promoted"
                ))];
                acts.extend(self.demote());
                acts
            }
            Event::Peer(Peer::NotPromoted) => {
                self.waiting = None;
                self.fail_and_roll_back(format!(
                    "the peer was not promoted (it still accepts this node at epoch {})",
                    self.rec.from_epoch
                ))
            }
            Event::Tick { now_unix } => self.tick(now_unix),
            ev => self.ignored(&ev),
        }
    }

    /// At [`Step::RollingBack`]: what became of `start_source`.
    fn at_rolling_back(&mut self, ev: Event) -> Vec<Action> {
        let why = self.why.clone().unwrap_or_default();
        match ev {
            Event::Hook {
                hook: Hook::StartSource,
                result: Ok(()),
            } => {
                let why = self.why.clone();
                self.finish(false, Step::RolledBack, why)
            }
            Event::Hook {
                hook: Hook::StartSource,
                result: Err(e),
            } => self.finish(
                false,
                Step::Failed,
                Some(format!("{why}; rolling back, start_source FAILED: {e}")),
            ),
            Event::RestartRefused { epoch } => self.finish(
                false,
                Step::Failed,
                Some(format!(
                    "{why}; start_source NOT run: this node is the replica at epoch {epoch} now"
                )),
            ),
            ev => self.ignored(&ev),
        }
    }

    /// A record could not be written: carry on with what is safe.
    fn persist_failed(&mut self, e: String) -> Vec<Action> {
        let why = format!("cannot persist the handover state: {e}");
        match self.rec.step {
            // stop_source has not run: its record comes first.
            Step::Preflight | Step::StopSource => self.finish_unchanged(&why),
            // stop_source ran; the promotion is persisted before it goes out,
            // so it was not sent.
            Step::FinalCut | Step::Promote => self.fail_and_roll_back(why),
            // The peer is the source: demote all the same.
            Step::Demote => vec![Action::BecomeReplica {
                epoch: self.rec.to_epoch,
            }],
            Step::RollingBack => vec![Action::RunHook(Hook::StartSource)],
            Step::Done | Step::RolledBack | Step::Failed => Vec::new(),
        }
    }

    fn ignored(&self, ev: &Event) -> Vec<Action> {
        vec![Action::Report(format!(
            "ignored {ev:?} at step {} (a bug: please report it)",
            self.rec.step
        ))]
    }

    fn preflight(&mut self, checks: Vec<Check>) -> Vec<Action> {
        let mut acts: Vec<Action> = checks
            .iter()
            .map(|c| {
                Action::Report(format!(
                    "  [{}] {}: {}",
                    if c.ok { "ok" } else { "FAIL" },
                    c.name,
                    c.detail
                ))
            })
            .collect();
        let failed: Vec<String> = checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| format!("{}: {}", c.name, c.detail))
            .collect();
        if !failed.is_empty() {
            acts.extend(self.finish_unchanged(&format!("preflight failed: {}", failed.join("; "))));
            return acts;
        }
        if self.dry_run {
            acts.extend(self.plan());
            self.finished = true;
            acts.push(Action::Finish(Outcome {
                ok: true,
                step: "dry_run".into(),
                this_node: format!(
                    "the source at epoch {}: nothing changed",
                    self.rec.from_epoch
                ),
                peer: format!(
                    "the replica at epoch {}: nothing changed",
                    self.rec.from_epoch
                ),
                error: None,
            }));
            return acts;
        }
        acts.extend(self.persist_then(Step::StopSource, vec![Action::RunHook(Hook::StopSource)]));
        acts
    }

    fn plan(&self) -> Vec<Action> {
        let (from, to) = (self.rec.from_epoch, self.rec.to_epoch);
        [
            format!("{} plan (dry run, nothing changed):", self.rec.kind),
            "1. stop_source hook on this node".to_string(),
            "2. final cut; both root hashes must match".to_string(),
            format!(
                "3. promote the replica to epoch {to} (it persists the epoch, then runs its start_replica hook)"
            ),
            format!("4. this node becomes the replica at epoch {to}"),
            format!(
                "on any failure before 3 completes: start_source here, and both stay at epoch {from}"
            ),
        ]
        .into_iter()
        .map(Action::Report)
        .collect()
    }

    /// Persists `step`, then `then`.
    fn persist_then(&mut self, step: Step, then: Vec<Action>) -> Vec<Action> {
        self.rec.step = step;
        let mut acts = vec![Action::Persist(self.rec.clone())];
        acts.extend(then);
        acts
    }

    fn observe(&mut self) -> Vec<Action> {
        self.rec.step = Step::Promote;
        vec![Action::ObservePeer {
            epoch: self.rec.to_epoch,
        }]
    }

    fn demote(&mut self) -> Vec<Action> {
        let epoch = self.rec.to_epoch;
        self.persist_then(Step::Demote, vec![Action::BecomeReplica { epoch }])
    }

    fn tick(&mut self, now: u64) -> Vec<Action> {
        let (since, last) = *self.waiting.get_or_insert((now, now));
        if now.saturating_sub(last) < WAIT_REPORT_S {
            return Vec::new();
        }
        self.waiting = Some((since, now));
        vec![Action::Report(format!(
            "still waiting for the peer ({} s): the application stays stopped on this node until \
             the peer says whether it holds epoch {}",
            now.saturating_sub(since),
            self.rec.to_epoch
        ))]
    }

    fn fail_and_roll_back(&mut self, why: String) -> Vec<Action> {
        let mut acts = vec![Action::Report(format!("FAILED: {why}"))];
        self.why = Some(why);
        acts.extend(self.roll_back());
        acts
    }

    fn roll_back(&mut self) -> Vec<Action> {
        let mut acts = vec![Action::Report(
            "rolling back: start_source on this node (the replica stays as it was)".into(),
        )];
        acts.extend(self.persist_then(Step::RollingBack, vec![Action::RunHook(Hook::StartSource)]));
        acts
    }

    /// Over before anything was stopped.
    fn finish_unchanged(&mut self, why: &str) -> Vec<Action> {
        self.why = Some(why.to_string());
        self.rec.step = Step::Preflight;
        self.finish(false, Step::Failed, Some(why.to_string()))
    }

    fn finish(&mut self, ok: bool, step: Step, error: Option<String>) -> Vec<Action> {
        let changed = self.rec.step != Step::Preflight;
        self.rec.step = step;
        self.finished = true;
        let (from, to) = (self.rec.from_epoch, self.rec.to_epoch);
        let (this_node, peer) = match step {
            Step::Done => (
                format!("the replica at epoch {to}"),
                format!("the source at epoch {to}"),
            ),
            Step::RolledBack => (
                format!(
                    "still the source at epoch {from}; its application was started again (start_source)"
                ),
                format!("the replica at epoch {from}, unchanged"),
            ),
            _ if !changed => (
                format!(
                    "still the source at epoch {from}; its application was not stopped: nothing changed"
                ),
                format!("the replica at epoch {from}, unchanged"),
            ),
            _ => (
                "see the error: the application may be stopped on this node".to_string(),
                "check `sync-cli status` on the peer's host".to_string(),
            ),
        };
        let mut acts = Vec::new();
        if changed {
            acts.push(Action::Clear);
        }
        acts.push(Action::Finish(Outcome {
            ok,
            step: step.to_string(),
            this_node,
            peer,
            error,
        }));
        acts
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
