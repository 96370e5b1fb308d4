//! Alerts: `[[alert]]` webhooks told when a folder gets into trouble and when
//! it gets out.
//!
//! [`Watcher::observe`] is the decision, with no clock and no I/O: it takes a
//! status snapshot, every handover's progress and `now`, remembers what it
//! already said, and returns the [`Event`]s to send. [`Dispatch`] sends them:
//! one task per webhook behind a bounded queue (a full queue drops the event
//! and counts it), a rate limit, and retries with backoff; the agent's loops
//! never wait for a webhook.
//!
//! Events (a webhook's `events` list picks among them; all when absent):
//!
//! | event | when |
//! | --- | --- |
//! | `lag_high` / `lag_ok` | a source's lag went over its `max_lag_secs` / back under |
//! | `disconnected` / `connected` | no session for longer than `max_lag_secs` / one again |
//! | `round_failed` | a session ended on an error (at most one per [`FAILED_EVERY`] per folder) |
//! | `database_held` / `database_released` | the replica refuses a database another process holds open / applies it again |
//! | `fenced` | this node stopped being the folder's source without a handover of its own (another node was promoted) |
//! | `handover_started` / `handover_finished` / `handover_rolled_back` / `handover_failed` | a failover or failback on this node |
//!
//! A JSON webhook gets `{"event","folder","node","peer","message","time"}`
//! (`time` in RFC 3339, UTC); `format = "ntfy"` posts the message as plain
//! text with a `Title` header (ntfy and similar services).

mod send;

pub use send::{Dispatch, Target};

use crate::control::Status;
use crate::handover::Progress;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};

/// Every event name.
pub const EVENTS: &[&str] = &[
    "lag_high",
    "lag_ok",
    "disconnected",
    "connected",
    "round_failed",
    "database_held",
    "database_released",
    "fenced",
    "handover_started",
    "handover_finished",
    "handover_rolled_back",
    "handover_failed",
];

/// Seconds between two `round_failed` alerts of one folder.
pub const FAILED_EVERY: f64 = 300.0;

/// `[[alert]]`: one webhook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sink {
    /// `http://host[:port][/path]`.
    pub url: String,
    /// The events sent (all when empty).
    #[serde(default)]
    pub events: Vec<String>,
    /// The body's form.
    #[serde(default)]
    pub format: Format,
}

/// How an alert is posted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A JSON object.
    #[default]
    Json,
    /// Plain text with a `Title` header (ntfy).
    Ntfy,
}

impl Sink {
    /// The URL parsed and every event name known; errors name the field.
    pub fn check(&self) -> Result<()> {
        Target::parse(&self.url).map_err(|e| anyhow::anyhow!("url: {e}"))?;
        for e in &self.events {
            if !EVENTS.contains(&e.as_str()) {
                bail!("events: unknown event {e:?} (known: {})", EVENTS.join(", "));
            }
        }
        Ok(())
    }

    /// Whether this webhook wants `event`.
    #[must_use]
    pub fn wants(&self, event: &str) -> bool {
        self.events.is_empty() || self.events.iter().any(|e| e == event)
    }
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// One of [`EVENTS`].
    pub event: &'static str,
    /// The folder.
    pub folder: String,
    /// This node's id.
    pub node: String,
    /// The peer's id (empty when unknown).
    pub peer: String,
    /// What happened, in words.
    pub message: String,
    /// When it was decided (RFC 3339, UTC).
    pub time: String,
}

/// What was already said about one status row.
#[derive(Debug, Default)]
struct Memo {
    lag_high: bool,
    down_since: Option<f64>,
    down_told: bool,
    rounds_failed: Option<u64>,
    failed_told: Option<f64>,
    held: BTreeSet<String>,
}

/// What was already said about one folder's handovers and role.
#[derive(Debug, Default)]
struct FolderMemo {
    role: String,
    epoch: u64,
    /// The last handover seen: its id, and whether its end was told.
    handover: Option<(u64, bool)>,
    /// When a handover of this node was last seen running.
    handover_seen: Option<f64>,
}

/// The alert decision: feed it snapshots, get the events to send.
#[derive(Debug, Default)]
pub struct Watcher {
    rows: HashMap<String, Memo>,
    folders: HashMap<String, FolderMemo>,
}

/// Seconds a handover's end keeps a role change from counting as fencing.
const HANDOVER_QUIET: f64 = 60.0;

impl Watcher {
    /// The events `status` and `handovers` (every folder's current or last
    /// handover) call for at `now` (unix seconds); `max_lag` gives a folder's
    /// bound in seconds, also its disconnection grace.
    pub fn observe(
        &mut self,
        status: &Status,
        handovers: &[Progress],
        now: f64,
        max_lag: &dyn Fn(&str) -> f64,
    ) -> Vec<Event> {
        let mut out = Vec::new();
        let mut say = |event: &'static str, folder: &str, peer: &str, message: String| {
            out.push(Event {
                event,
                folder: folder.to_string(),
                node: status.node.clone(),
                peer: peer.to_string(),
                message: format!("folder {folder}: {message}"),
                time: rfc3339(now),
            });
        };
        for h in handovers.iter().filter(|h| !h.dry_run) {
            let m = self.folders.entry(h.folder.clone()).or_default();
            handover_events(m, h, now, &mut say);
        }
        let mut live = BTreeSet::new();
        for f in &status.folders {
            let bound = max_lag(&f.folder);
            let m = self.folders.entry(f.folder.clone()).or_default();
            let was_source = m.role == "source";
            if was_source && f.role == "replica" && f.epoch > m.epoch {
                let quiet = m.handover_seen.is_none_or(|t| now - t > HANDOVER_QUIET);
                if quiet {
                    say(
                        "fenced",
                        &f.folder,
                        &f.peer,
                        format!(
                            "this node was fenced at epoch {}: another node is the source now",
                            f.epoch
                        ),
                    );
                }
            }
            m.role.clone_from(&f.role);
            m.epoch = f.epoch;
            let key = format!(
                "{}\0{}\0{}",
                f.folder,
                f.role,
                if f.role == "source" {
                    f.peer.as_str()
                } else {
                    ""
                }
            );
            let r = self.rows.entry(key.clone()).or_default();
            live.insert(key);
            row_events(r, f, now, bound, &mut say);
        }
        self.rows.retain(|k, _| live.contains(k));
        out
    }
}

type Say<'a> = dyn FnMut(&'static str, &str, &str, String) + 'a;

fn handover_events(m: &mut FolderMemo, h: &Progress, now: f64, say: &mut Say<'_>) {
    let first = m.handover.is_none();
    let new = m.handover.is_none_or(|(id, _)| id != h.id);
    if h.running {
        m.handover_seen = Some(now);
    }
    if new {
        // A handover over before the agent looked was not seen happening.
        m.handover = Some((h.id, first && !h.running));
        if h.running {
            say(
                "handover_started",
                &h.folder,
                "",
                format!("{} started (step {})", h.kind, h.step),
            );
        }
    }
    let Some((_, told)) = &mut m.handover else {
        return;
    };
    if let Some(o) = h.outcome.as_ref().filter(|_| !h.running && !*told) {
        *told = true;
        m.handover_seen = Some(now);
        let why = o
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        let (event, what) = match o.step.as_str() {
            "done" => ("handover_finished", "completed"),
            "rolled_back" => ("handover_rolled_back", "rolled back"),
            _ => ("handover_failed", "failed"),
        };
        say(event, &h.folder, "", format!("{} {what}{why}", h.kind));
    }
}

fn row_events(
    m: &mut Memo,
    f: &crate::continuous::FolderStatus,
    now: f64,
    bound: f64,
    say: &mut Say<'_>,
) {
    let (folder, peer) = (f.folder.as_str(), f.peer.as_str());
    let over = f.role == "source" && f.lag_s > bound;
    if over && !m.lag_high {
        let msg = format!(
            "lag {:.1} s over {bound} s ({} entries pending)",
            f.lag_s, f.files_pending
        );
        say("lag_high", folder, peer, msg);
    } else if !over && m.lag_high {
        say(
            "lag_ok",
            folder,
            peer,
            format!("lag {:.1} s, within {bound} s again", f.lag_s),
        );
    }
    m.lag_high = over;
    let other = if f.role == "source" {
        "replica"
    } else {
        "source"
    };
    if f.connected {
        if m.down_told {
            let away = m.down_since.map_or(0.0, |t| now - t);
            say(
                "connected",
                folder,
                peer,
                format!("connected to its {other} again after {away:.0} s"),
            );
        }
        (m.down_since, m.down_told) = (None, false);
    } else {
        let since = *m.down_since.get_or_insert(now);
        if !m.down_told && now - since >= bound {
            m.down_told = true;
            let why = f
                .last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            let msg = format!("not connected to its {other} for {:.0} s{why}", now - since);
            say("disconnected", folder, peer, msg);
        }
    }
    if m.rounds_failed.is_some_and(|n| f.rounds_failed > n)
        && m.failed_told.is_none_or(|t| now - t >= FAILED_EVERY)
    {
        m.failed_told = Some(now);
        let why = f.last_error.as_deref().unwrap_or("no reason recorded");
        let msg = format!(
            "a round failed ({} since the agent started): {why}",
            f.rounds_failed
        );
        say("round_failed", folder, peer, msg);
    }
    m.rounds_failed = Some(f.rounds_failed);
    let held: BTreeSet<String> = f.held_databases.iter().cloned().collect();
    for db in held.difference(&m.held) {
        let msg = format!(
            "database {db} is held open by another process on the replica: its changes wait"
        );
        say("database_held", folder, peer, msg);
    }
    for db in m.held.difference(&held) {
        say(
            "database_released",
            folder,
            peer,
            format!("database {db} is applied again"),
        );
    }
    m.held = held;
}

/// Unix seconds now (0 before 1970).
#[must_use]
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `t` (unix seconds) as RFC 3339 in UTC, to the second (proleptic Gregorian;
/// also `sync-cli status`'s times).
#[must_use]
pub fn rfc3339(t: f64) -> String {
    let secs = t.max(0.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
