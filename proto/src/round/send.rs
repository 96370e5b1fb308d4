//! The source's round encoder: a round's frames, in order.

use super::{MANIFEST_FRAME_BYTES, wire_cost};
use crate::{Entry, MAX_ENTRIES_PER_BATCH, Message, RelPath};

/// One round to send, borrowed from its owner.
#[derive(Debug, Clone, Copy)]
pub struct Outgoing<'a> {
    /// Round number.
    pub id: u64,
    /// Whether `entries` is the whole tree.
    pub full: bool,
    /// Ask the replica to compare files by content hash.
    pub checksum: bool,
    /// Ask the replica for its own root hash after the round.
    pub verify: bool,
    /// The entries, sorted; for a full round, every entry.
    pub entries: &'a [Entry],
    /// Renames, applied first.
    pub renamed: &'a [(RelPath, RelPath)],
    /// Paths removed.
    pub deleted: &'a [RelPath],
    /// The root hash after the round.
    pub root_hash: [u8; 32],
}

impl<'a> Outgoing<'a> {
    /// `RoundStart`, then the manifest in batches of at most
    /// [`MAX_ENTRIES_PER_BATCH`] entries and about [`MANIFEST_FRAME_BYTES`].
    pub fn head(&self) -> impl Iterator<Item = Message> + 'a {
        let start = Message::RoundStart {
            id: self.id,
            full: self.full,
            checksum: self.checksum,
            verify: self.verify,
        };
        std::iter::once(start).chain(Batches::new(self.entries).map(Message::Manifest))
    }

    /// After the manifest: the inline contents (by entry index), the renames,
    /// the deletions, and the `RoundEnd` that counts the entries.
    pub fn tail(&self, inline: Vec<(u64, Vec<u8>)>) -> impl Iterator<Item = Message> + 'a {
        let end = Message::RoundEnd {
            id: self.id,
            entries: self.entries.len() as u64,
            root_hash: self.root_hash,
        };
        inline
            .into_iter()
            .map(|(index, data)| Message::Inline { index, data })
            .chain(
                self.renamed
                    .chunks(MAX_ENTRIES_PER_BATCH)
                    .map(|c| Message::Renamed(c.to_vec())),
            )
            .chain(
                self.deleted
                    .chunks(MAX_ENTRIES_PER_BATCH)
                    .map(|c| Message::Deleted(c.to_vec())),
            )
            .chain(std::iter::once(end))
    }

    /// The whole round: [`Self::head`] then [`Self::tail`].
    pub fn messages(&self, inline: Vec<(u64, Vec<u8>)>) -> impl Iterator<Item = Message> + 'a {
        self.head().chain(self.tail(inline))
    }
}

/// Manifest batches: a batch closes at [`MAX_ENTRIES_PER_BATCH`] entries or
/// once its [`wire_cost`] reaches [`MANIFEST_FRAME_BYTES`].
#[derive(Debug)]
pub struct Batches<'a> {
    rest: &'a [Entry],
}

impl<'a> Batches<'a> {
    /// The batches of `entries`.
    #[must_use]
    pub fn new(entries: &'a [Entry]) -> Self {
        Self { rest: entries }
    }
}

impl Iterator for Batches<'_> {
    type Item = Vec<Entry>;

    fn next(&mut self) -> Option<Vec<Entry>> {
        if self.rest.is_empty() {
            return None;
        }
        let mut bytes = 0u64;
        let mut n = 0;
        while n < self.rest.len() && n < MAX_ENTRIES_PER_BATCH {
            bytes += wire_cost(&self.rest[n]);
            n += 1;
            if bytes >= MANIFEST_FRAME_BYTES as u64 {
                break;
            }
        }
        let (batch, rest) = self.rest.split_at(n);
        self.rest = rest;
        Some(batch.to_vec())
    }
}
