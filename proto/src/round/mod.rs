//! One round's message-level state machines, with no I/O and no clock.
//!
//! - [`send::Outgoing`]: the source's encoder, the frame sequence of a round
//!   (`RoundStart`, `Manifest` batches, `Inline`, `Renamed`, `Deleted`,
//!   `RoundEnd`).
//! - [`recv::Assembler`]: the replica's assembler, fed one message at a time;
//!   it enforces order and the round's bounds and checks the `RoundEnd`.
//!
//! Both sides price an entry with the one [`wire_cost`].

pub mod recv;
pub mod send;

use crate::{Entry, Kind, RelPath};

pub use recv::{Assembler, Event, Incoming};
pub use send::Outgoing;

/// Bytes of manifest entries per frame, priced by [`wire_cost`] (well under
/// the frame limit).
pub const MANIFEST_FRAME_BYTES: usize = 4 << 20;
/// Most entries a replica accepts in one round.
pub const MAX_ROUND_ENTRIES: u64 = 5_000_000;
/// Most bytes of paths, targets, xattrs, inline content and database page
/// tables a replica accepts in one round.
pub const MAX_ROUND_BYTES: u64 = 1 << 30;
/// Bytes of replica memory a database page costs while it is staged (its
/// 32-byte hash and a bit of the missing-page map), charged to
/// [`MAX_ROUND_BYTES`] when the round announces the database.
pub const DB_PAGE_BYTES: u64 = 33;

/// What an entry costs: an upper bound of its encoded size and of what the
/// replica holds for it while the round is assembled. The source batches
/// manifest frames by it, the replica charges it to the round's budget.
#[must_use]
pub fn wire_cost(e: &Entry) -> u64 {
    let target = match &e.kind {
        Kind::Symlink { target } => target.len(),
        Kind::HardLink { target } => target.as_bytes().len(),
        _ => 0,
    };
    let xattrs: usize = e
        .meta
        .xattrs
        .iter()
        .map(|x| x.name.len() + x.value.len() + 48)
        .sum();
    (e.path.as_bytes().len() + target + xattrs + 128) as u64
}

/// The page table a database entry's staging holds on the replica (its page
/// count is validated ≤ `MAX_DB_PAGES`); 0 for other kinds.
#[must_use]
pub fn table_cost(e: &Entry) -> u64 {
    match e.kind {
        Kind::Database { pages, .. } => u64::from(pages) * DB_PAGE_BYTES,
        _ => 0,
    }
}

/// What one deletion costs the round's budget.
#[must_use]
pub fn deleted_cost(p: &RelPath) -> u64 {
    p.as_bytes().len() as u64 + 24
}

/// What one rename costs the round's budget.
#[must_use]
pub fn renamed_cost((a, b): &(RelPath, RelPath)) -> u64 {
    (a.as_bytes().len() + b.as_bytes().len()) as u64 + 48
}

/// What one inline content costs the round's budget.
#[must_use]
pub fn inline_cost(data: &[u8]) -> u64 {
    data.len() as u64 + 64
}

#[cfg(test)]
mod tests;
