//! Sessions: a hello each way, then rounds (see [`proto::Message`]).
//!
//! [`source::SourceSession`] drives rounds from the source; [`replica::run`]
//! applies them on the replica. A one-shot push is one full round.

mod files_lane;
pub mod replica;
pub mod replica_ahead;
mod replica_batch;
mod replica_fetch;
mod replica_lanes;
mod replica_round;
pub mod replica_stage;
pub mod replica_tables;
pub mod source;
mod source_db;

use serde::Serialize;
use std::sync::atomic::AtomicU64;

/// Files fetched at once, each on its own stream.
pub const PARALLEL_FILES: usize = 16;

/// Files up to this size with no delta are handled whole at both ends: the
/// source reads and encodes one in one blocking task and sends its frames
/// after; the replica receives it before one blocking task writes it. No
/// thread is woken per frame (most of a first mirror's files are this small).
pub(crate) const WHOLE_FILE: u64 = 256 << 10;
pub use proto::round::{DB_PAGE_BYTES, MANIFEST_FRAME_BYTES, MAX_ROUND_BYTES, MAX_ROUND_ENTRIES};

/// What a push did, as `--json` prints it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Entries in the source manifest (all kinds).
    pub entries_total: u64,
    /// Regular files in the source.
    pub files_total: u64,
    /// Files whose content was sent.
    pub files_transferred: u64,
    /// Entries removed on the replica.
    pub files_deleted: u64,
    /// Entries whose metadata alone was updated.
    pub meta_updated: u64,
    /// Directories, links and special files made.
    pub others_created: u64,
    /// Sum of the source's regular file sizes.
    pub bytes_total: u64,
    /// Content bytes sent literally.
    pub bytes_literal: u64,
    /// Content bytes rebuilt from the replica's basis.
    pub bytes_matched: u64,
    /// UDP payload bytes this side sent.
    pub bytes_sent_wire: u64,
    /// UDP payload bytes this side received.
    pub bytes_received_wire: u64,
    /// Seconds from start (scan included) to the replica's acknowledgement.
    pub elapsed_s: f64,
    /// Seconds spent scanning the source.
    pub scan_s: f64,
    /// Bytes read to hash files (index misses).
    pub bytes_hashed: u64,
    /// The source's root hash.
    pub source_root: String,
    /// Whether the replica's tree already had the source's quick digest (the
    /// round was `RoundSame`: no manifest crossed, nothing was applied).
    pub unchanged: bool,
    /// What the replica could not preserve.
    pub warnings: Vec<String>,
}

/// The replica databases a round found held open, each as `path: holders`
/// (from the round's `held` data; nothing is read back out of warning text).
#[must_use]
pub fn held_databases(applied: &proto::ApplySummary) -> Vec<String> {
    applied.held.iter().map(ToString::to_string).collect()
}

/// Live counters a progress display can poll.
#[derive(Debug, Default)]
pub struct Progress {
    /// Entries scanned (set once the scan ends).
    pub entries: AtomicU64,
    /// Content bytes read and sent so far.
    pub bytes_done: AtomicU64,
    /// Files completed.
    pub files_done: AtomicU64,
    /// Manifest entries sent to the replica (rounds of a continuous session
    /// add up; its status resets this at each full round).
    pub entries_sent: AtomicU64,
    /// Content bytes in the scanned tree (set once the scan ends; what a first
    /// mirror sends at most).
    pub bytes_total: AtomicU64,
}

/// This host's wall clock in ms since the Unix epoch, for hellos.
#[must_use]
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
