//! A source's progress as status shows it: content bytes, held databases,
//! the full round in progress.

use super::*;

/// Bytes of file content among `entries`.
pub(super) fn content_bytes(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .map(|e| match e.kind {
            Kind::File { size, .. } => size,
            _ => 0,
        })
        .sum()
}

/// Names the databases the replica refused in status.
pub(super) fn publish_held(status: &SharedStatus, refused: &BTreeSet<RelPath>) {
    set(status, |s| {
        s.held_databases = refused.iter().map(ToString::to_string).collect();
    });
}

/// A full round begins: its progress shows in status from now on, counted by
/// the session's transfer counters (reset here).
pub(super) fn start_full_progress(status: &SharedStatus) {
    set(status, |s| {
        if let Some(p) = &s.progress {
            p.entries.store(0, Ordering::Relaxed);
            p.entries_sent.store(0, Ordering::Relaxed);
            p.bytes_done.store(0, Ordering::Relaxed);
            p.files_done.store(0, Ordering::Relaxed);
        }
        s.full_round = Some(FullRoundProgress {
            started_unix: unix_now().unwrap_or_default(),
            ..Default::default()
        });
    });
}

/// Logs a full round's start at INFO: what it ships.
pub(super) fn log_full_start(folder: &str, entries: u64, bytes_total: u64) {
    tracing::info!(folder, entries, bytes_total, "full round started");
}

/// Logs a full round's end at INFO: entries, content bytes sent of the
/// total, how long it took and the rate.
pub(super) fn log_full_end(status: &SharedStatus, entries: u64, bytes_total: u64, took: Duration) {
    let (folder, bytes_done) = status.lock().map_or((String::new(), 0), |s| {
        let done = s
            .progress
            .as_ref()
            .map_or(0, |p| p.bytes_done.load(Ordering::Relaxed));
        (s.folder.clone(), done)
    });
    let secs = took.as_secs_f64();
    let rate_mib_s = bytes_done as f64 / secs.max(1e-3) / (1 << 20) as f64;
    tracing::info!(
        folder,
        entries,
        bytes_done,
        bytes_total,
        duration_s = format!("{secs:.2}"),
        rate_mib_s = format!("{rate_mib_s:.1}"),
        "full round applied"
    );
}

/// Partial rounds since the last summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct PartialTotals {
    /// Rounds applied.
    pub rounds: u64,
    /// Entries they carried.
    pub entries: u64,
    /// Content bytes they carried.
    pub bytes: u64,
}

/// Partial rounds, summarised at most once per `every` instead of a line
/// each: the first round is told at once, later ones once `every` has passed
/// since the last summary.
#[derive(Debug)]
pub(super) struct PartialSummary {
    every: Duration,
    last: Option<Instant>,
    totals: PartialTotals,
}

impl PartialSummary {
    /// A summary told at most every `every`.
    pub(super) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            totals: PartialTotals::default(),
        }
    }

    /// Counts a round applied at `now`; the totals to tell when a summary is
    /// due (they start again from zero).
    pub(super) fn record(
        &mut self,
        now: Instant,
        entries: u64,
        bytes: u64,
    ) -> Option<PartialTotals> {
        self.totals.rounds += 1;
        self.totals.entries += entries;
        self.totals.bytes += bytes;
        let due = self
            .last
            .is_none_or(|l| now.saturating_duration_since(l) >= self.every);
        if !due {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.totals))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_rounds_are_told_at_once_then_at_most_every_period() {
        let t0 = Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut sum = PartialSummary::new(Duration::from_secs(10));
        let one = |entries, bytes| PartialTotals {
            rounds: 1,
            entries,
            bytes,
        };
        assert_eq!(sum.record(s(0), 2, 100), Some(one(2, 100)));
        assert_eq!(sum.record(s(1), 3, 10), None);
        assert_eq!(sum.record(s(9), 1, 5), None);
        let due = PartialTotals {
            rounds: 3,
            entries: 5,
            bytes: 20,
        };
        assert_eq!(sum.record(s(10), 1, 5), Some(due));
        assert_eq!(sum.record(s(11), 4, 4), None);
        assert_eq!(
            sum.record(s(25), 1, 1),
            Some(PartialTotals {
                rounds: 2,
                entries: 5,
                bytes: 5,
            })
        );
    }
}
