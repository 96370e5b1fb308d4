//! Lag that tells the truth (DESIGN.md §2 invariant 11), and the health check
//! built on it.
//!
//! [`LagTracker`] is a small state machine with no clock and no I/O: the source
//! loop feeds it the instants changes were seen, rounds starting, rounds
//! applied (with what is still held back) and rounds failing; it answers with
//! the instant of the oldest change the replica has not applied. Lag is that
//! instant's age, computed whenever status is read, so it keeps growing while
//! the loop is stuck in a round, a reconnect backoff or a replica that refuses a
//! held database.
//!
//! [`check`] turns a status snapshot into the problems `sync-cli status
//! --check` reports (not connected, lag over the bound, held database).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use sync_agent::lag::LagTracker;
//! let t0 = Instant::now();
//! let mut lag: LagTracker<&str> = LagTracker::default();
//! lag.seen(t0);
//! lag.round_started(t0 + Duration::from_millis(5), false);
//! lag.round_failed(); // the replica went away: the change is still pending
//! assert_eq!(lag.oldest(), Some(t0));
//! lag.round_started(t0 + Duration::from_secs(9), true);
//! lag.round_applied(std::iter::empty());
//! assert_eq!(lag.oldest(), None);
//! ```

use crate::continuous::FolderStatus;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The oldest change the replica has not applied, fed by the source loop.
///
/// Call [`seen`](Self::seen) for every change noticed (a watch event, a
/// database commit: a `-wal` write), [`round_started`](Self::round_started)
/// just before a round takes its changes, then either
/// [`round_applied`](Self::round_applied) once the replica acknowledged it or
/// [`round_failed`](Self::round_failed) when the round or the session ended
/// without it.
#[derive(Debug, Clone)]
pub struct LagTracker<K: Ord> {
    /// The oldest change seen since the round in flight started (or since the
    /// last round ended, when none is in flight): no round covers it yet.
    fresh: Option<Instant>,
    /// The round in flight.
    in_flight: Option<InFlight>,
    /// Changes a round left behind (a file still being written, a database
    /// the replica holds open), each with the instant it has been pending since.
    left_behind: BTreeMap<K, Instant>,
}

/// A round on its way.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// When it started.
    started: Instant,
    /// The oldest change it covers.
    covers: Option<Instant>,
}

impl<K: Ord> Default for LagTracker<K> {
    fn default() -> Self {
        Self {
            fresh: None,
            in_flight: None,
            left_behind: BTreeMap::new(),
        }
    }
}

fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl<K: Ord + Clone> LagTracker<K> {
    /// A tracker for a source that does not know yet what its replica holds
    /// (the agent just started): pending since `now` until a full round is
    /// applied.
    #[must_use]
    pub fn unknown_since(now: Instant) -> Self {
        Self {
            fresh: Some(now),
            ..Self::default()
        }
    }

    /// A change was seen at `at`.
    pub fn seen(&mut self, at: Instant) {
        self.fresh = earliest(self.fresh, Some(at));
    }

    /// A round starts at `now` and covers every change seen so far. `unknown`:
    /// a full round whose outcome cannot be foreseen (after a start, a
    /// reconnect, a lost watch event): pending from `now` at the latest even
    /// if no change was seen.
    pub fn round_started(&mut self, now: Instant, unknown: bool) {
        // A round that never ended (the caller lost it) is still pending.
        let before = self.in_flight.take().and_then(|r| r.covers);
        let mut covers = earliest(before, self.fresh.take());
        if unknown {
            covers = earliest(covers, Some(now));
        }
        self.in_flight = Some(InFlight {
            started: now,
            covers,
        });
    }

    /// The round in flight was applied by the replica; `left_behind` are the
    /// changes it left behind (held back by the source, refused by the
    /// replica). A key left behind before keeps the instant it was first
    /// pending; a new one is pending
    /// since the oldest change the round covered.
    pub fn round_applied(&mut self, left_behind: impl IntoIterator<Item = K>) {
        let round = self.in_flight.take();
        let since = round.map(|r| r.covers.unwrap_or(r.started));
        let mut old = std::mem::take(&mut self.left_behind);
        for k in left_behind {
            let t = old.remove(&k).or(since).or(self.fresh);
            if let Some(t) = t {
                self.left_behind.insert(k, t);
            }
        }
    }

    /// The round in flight did not complete (an error, the session ended):
    /// what it covered is still pending.
    pub fn round_failed(&mut self) {
        if let Some(r) = self.in_flight.take() {
            self.fresh = earliest(self.fresh, r.covers);
        }
    }

    /// The instant of the oldest change the replica has not applied.
    #[must_use]
    pub fn oldest(&self) -> Option<Instant> {
        let behind = self.left_behind.values().min().copied();
        earliest(
            earliest(self.fresh, self.in_flight.and_then(|r| r.covers)),
            behind,
        )
    }

    /// Its age at `now` (zero when nothing is pending).
    #[must_use]
    pub fn lag(&self, now: Instant) -> Duration {
        self.oldest()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// What rounds left behind, with the instant each has been pending since.
    pub fn left_behind(&self) -> impl Iterator<Item = (&K, Instant)> {
        self.left_behind.iter().map(|(k, t)| (k, *t))
    }
}

/// One reason a folder is unhealthy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// The folder.
    pub folder: String,
    /// What is wrong, for a human.
    pub what: String,
}

/// The problems of a status snapshot: a folder without a session, a source
/// whose lag is over `max_lag_s`, a database the replica holds open and
/// refuses to update. An empty list means healthy.
#[must_use]
pub fn check(folders: &[FolderStatus], max_lag_s: f64) -> Vec<Problem> {
    let mut out = Vec::new();
    for f in folders {
        let mut say = |what: String| {
            out.push(Problem {
                folder: f.folder.clone(),
                what,
            });
        };
        if !f.connected {
            let why = f
                .last_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            say(format!("not connected to its {}{why}", peer_word(f)));
        }
        if f.role == "source" && f.lag_s > max_lag_s {
            say(format!(
                "lag {:.1} s over {max_lag_s} s ({} entries pending)",
                f.lag_s, f.files_pending
            ));
        }
        for db in &f.held_databases {
            say(format!(
                "held database {db}: the replica does not update it while another process holds it open"
            ));
        }
    }
    out
}

fn peer_word(f: &FolderStatus) -> &'static str {
    if f.role == "replica" {
        "source"
    } else {
        "replica"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn nothing_seen_means_no_lag() {
        let t0 = Instant::now();
        let l: LagTracker<&str> = LagTracker::default();
        assert_eq!(l.oldest(), None);
        assert_eq!(l.lag(at(t0, 5000)), Duration::ZERO);
    }

    #[test]
    fn a_change_is_pending_until_the_round_that_covers_it_is_applied() {
        let t0 = Instant::now();
        let mut l: LagTracker<&str> = LagTracker::default();
        l.seen(t0);
        l.seen(at(t0, 50));
        assert_eq!(l.lag(at(t0, 100)), Duration::from_millis(100));
        l.round_started(at(t0, 100), false);
        // a frozen replica: the round never ends, lag keeps growing
        assert_eq!(l.lag(at(t0, 9000)), Duration::from_millis(9000));
        l.round_applied([]);
        assert_eq!(l.oldest(), None);
    }

    #[test]
    fn changes_seen_during_a_round_stay_pending_after_it() {
        let t0 = Instant::now();
        let mut l: LagTracker<&str> = LagTracker::default();
        l.seen(t0);
        l.round_started(at(t0, 10), false);
        l.seen(at(t0, 20));
        l.round_applied([]);
        assert_eq!(l.oldest(), Some(at(t0, 20)));
    }

    #[test]
    fn a_failed_round_keeps_its_oldest_change_across_the_reconnect() {
        let t0 = Instant::now();
        let mut l: LagTracker<&str> = LagTracker::default();
        l.seen(at(t0, 100));
        l.round_started(at(t0, 200), false);
        l.seen(at(t0, 300));
        l.round_failed();
        assert_eq!(l.oldest(), Some(at(t0, 100)));
        // away: more commits are seen, the oldest stays
        l.seen(at(t0, 4000));
        assert_eq!(l.lag(at(t0, 8100)), Duration::from_millis(8000));
        // the reconnect's full round covers all of it
        l.round_started(at(t0, 9000), true);
        assert_eq!(l.oldest(), Some(at(t0, 100)));
        l.round_applied([]);
        assert_eq!(l.oldest(), None);
    }

    #[test]
    fn a_full_round_of_unknown_outcome_is_pending_from_its_start() {
        let t0 = Instant::now();
        let mut l: LagTracker<&str> = LagTracker::default();
        l.round_started(t0, true);
        assert_eq!(l.lag(at(t0, 2500)), Duration::from_millis(2500));
        l.round_applied([]);
        assert_eq!(l.lag(at(t0, 3000)), Duration::ZERO);
        // a periodic rescan with nothing seen claims nothing
        l.round_started(at(t0, 4000), false);
        assert_eq!(l.oldest(), None);
    }

    #[test]
    fn an_agent_that_just_started_is_pending_until_its_first_round() {
        let t0 = Instant::now();
        let mut l: LagTracker<&str> = LagTracker::unknown_since(t0);
        // the replica is unreachable for a while
        assert_eq!(l.lag(at(t0, 7000)), Duration::from_secs(7));
        l.round_started(at(t0, 7000), true);
        assert_eq!(l.oldest(), Some(t0));
        l.round_applied([]);
        assert_eq!(l.oldest(), None);
    }

    #[test]
    fn a_held_database_keeps_the_instant_it_was_first_pending() {
        let t0 = Instant::now();
        let mut l: LagTracker<&str> = LagTracker::default();
        l.seen(t0);
        l.round_started(at(t0, 100), false);
        l.round_applied(["a.db"]);
        assert_eq!(l.oldest(), Some(t0));
        // offered again and again, refused each time: the age grows
        for i in 1..40 {
            l.seen(at(t0, i * 250));
            l.round_started(at(t0, i * 250 + 10), false);
            l.round_applied(["a.db"]);
        }
        assert_eq!(l.lag(at(t0, 10_000)), Duration::from_secs(10));
        assert_eq!(l.left_behind().collect::<Vec<_>>(), vec![(&"a.db", t0)]);
        // freed: applied at last
        l.round_started(at(t0, 10_100), false);
        l.round_applied([]);
        assert_eq!(l.oldest(), None);
    }

    #[test]
    fn a_key_left_behind_by_a_round_that_covered_no_change_dates_from_its_start() {
        let t0 = Instant::now();
        let mut l: LagTracker<&str> = LagTracker::default();
        l.round_started(t0, false);
        l.round_applied(["a.db"]);
        assert_eq!(l.oldest(), Some(t0));
    }

    #[test]
    fn a_round_started_twice_keeps_the_first_ones_changes() {
        let t0 = Instant::now();
        let mut l: LagTracker<&str> = LagTracker::default();
        l.seen(t0);
        l.round_started(at(t0, 10), false);
        l.round_started(at(t0, 20), false);
        assert_eq!(l.oldest(), Some(t0));
    }

    fn folder(role: &str, connected: bool, lag_s: f64) -> FolderStatus {
        FolderStatus {
            folder: "jf".into(),
            role: role.into(),
            connected,
            lag_s,
            ..Default::default()
        }
    }

    #[test]
    fn check_names_each_problem() {
        assert!(check(&[folder("source", true, 1.0)], 30.0).is_empty());
        let p = check(&[folder("source", true, 31.5)], 30.0);
        assert_eq!(p.len(), 1);
        assert!(p[0].what.contains("lag 31.5 s over 30 s"), "{p:?}");
        let mut f = folder("source", false, 0.0);
        f.last_error = Some("replica 127.0.0.1:1 unreachable".into());
        let p = check(&[f], 30.0);
        assert!(
            p[0].what
                .starts_with("not connected to its replica: replica 127.0.0.1:1")
        );
        let mut f = folder("replica", true, 0.0);
        f.held_databases = vec!["data/library.db".into()];
        let p = check(&[f], 30.0);
        assert_eq!(p[0].folder, "jf");
        assert!(p[0].what.starts_with("held database data/library.db"));
        // a replica's lag is its source's to judge
        assert!(check(&[folder("replica", true, 99.0)], 30.0).is_empty());
    }
}
