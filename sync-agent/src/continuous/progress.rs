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
