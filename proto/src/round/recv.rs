//! The replica's round assembler: messages in, a checked round out.

use super::{
    MAX_ROUND_BYTES, MAX_ROUND_ENTRIES, deleted_cost, inline_cost, renamed_cost, table_cost,
    wire_cost,
};
use crate::{Entry, Message, ProtocolError, RelPath};
use std::collections::HashMap;

/// A round as received, complete and within bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Incoming {
    /// Round number.
    pub id: u64,
    /// Whether the round carries the whole manifest.
    pub full: bool,
    /// Compare regular files by content hash.
    pub checksum: bool,
    /// Report the replica's root hash after the round.
    pub verify: bool,
    /// The manifest entries, in the order received.
    pub entries: Vec<Entry>,
    /// Paths removed.
    pub deleted: Vec<RelPath>,
    /// Renames, applied first.
    pub renamed: Vec<(RelPath, RelPath)>,
    /// Content that came with the round, by entry index.
    pub inline: HashMap<u64, Vec<u8>>,
    /// The source's root hash after the round.
    pub root_hash: [u8; 32],
}

/// What a message completed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A whole round, ended by a matching `RoundEnd`.
    Round(Incoming),
    /// Between rounds, the source asks this replica to take the folder at
    /// `epoch`.
    Promote {
        /// The new epoch.
        epoch: u64,
    },
    /// Between rounds, a full round with nothing to do: the source's tree has
    /// the quick digest this replica offered (`TreeDigest`).
    Same {
        /// Round number.
        id: u64,
        /// Entries of the source's tree.
        entries: u64,
        /// The digest both trees have.
        digest: [u8; 32],
        /// The source's root hash.
        root_hash: [u8; 32],
    },
}

/// A round being assembled, with what it costs so far.
#[derive(Debug)]
struct Building {
    round: Incoming,
    bytes: u64,
    tables: u64,
}

/// Assembles rounds from the control stream's messages, one at a time.
///
/// Between rounds it takes `RoundStart`, `RoundSame` or `Promote`; inside a round
/// `Manifest`, `Deleted`, `Renamed`, `Inline` and `RoundEnd`. Anything else,
/// a round past [`MAX_ROUND_ENTRIES`] or [`MAX_ROUND_BYTES`], inline content
/// for an entry not announced, or an end that does not match the round is a
/// [`ProtocolError`]; after an error the assembler is between rounds again.
#[derive(Debug, Default)]
pub struct Assembler {
    building: Option<Building>,
}

impl Assembler {
    /// An assembler between rounds.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of the round being assembled, if any.
    #[must_use]
    pub fn round_id(&self) -> Option<u64> {
        self.building.as_ref().map(|b| b.round.id)
    }

    /// Bytes the round carried so far, database page tables aside (their pages
    /// come later, on stages of their own): what the round's time bound grows by.
    #[must_use]
    pub fn timed_bytes(&self) -> u64 {
        self.building.as_ref().map_or(0, |b| b.bytes - b.tables)
    }

    /// Feeds one message: `Ok(Some(_))` when it completed a round or was a
    /// promotion request, `Ok(None)` when the round goes on.
    pub fn handle(&mut self, msg: Message) -> Result<Option<Event>, ProtocolError> {
        // Decoded frames are checked already; messages from elsewhere (an
        // in-memory pair) are not.
        msg.validate()?;
        let Some(mut b) = self.building.take() else {
            return start(msg).map(|started| match started {
                Ok(b) => {
                    self.building = Some(b);
                    None
                }
                Err(event) => Some(event),
            });
        };
        if let Message::RoundEnd {
            id: end,
            entries,
            root_hash,
        } = msg
        {
            let carried = b.round.entries.len() as u64;
            if end != b.round.id || entries != carried {
                return Err(ProtocolError::BadEnd {
                    id: b.round.id,
                    end,
                    announced: entries,
                    carried,
                });
            }
            b.round.root_hash = root_hash;
            return Ok(Some(Event::Round(b.round)));
        }
        b.add(msg)?;
        b.check()?;
        self.building = Some(b);
        Ok(None)
    }
}

/// Between rounds: a round starts (`Ok(Ok)`), or a message completes alone
/// (`Ok(Err(event))`: a promotion request, a round with nothing to do).
fn start(msg: Message) -> Result<Result<Building, Event>, ProtocolError> {
    match msg {
        Message::RoundStart {
            id,
            full,
            checksum,
            verify,
        } => Ok(Ok(Building {
            round: Incoming {
                id,
                full,
                checksum,
                verify,
                ..Incoming::default()
            },
            bytes: 0,
            tables: 0,
        })),
        Message::Promote { epoch } => Ok(Err(Event::Promote { epoch })),
        Message::RoundSame {
            id,
            entries,
            digest,
            root_hash,
        } => Ok(Err(Event::Same {
            id,
            entries,
            digest,
            root_hash,
        })),
        other => Err(ProtocolError::ExpectedRound { got: other.name() }),
    }
}

impl Building {
    fn add(&mut self, msg: Message) -> Result<(), ProtocolError> {
        let r = &mut self.round;
        match msg {
            Message::Manifest(batch) => {
                for e in &batch {
                    let table = table_cost(e);
                    self.bytes += wire_cost(e) + table;
                    self.tables += table;
                }
                r.entries.extend(batch);
            }
            Message::Deleted(batch) => {
                self.bytes += batch.iter().map(deleted_cost).sum::<u64>();
                r.deleted.extend(batch);
            }
            Message::Renamed(batch) => {
                self.bytes += batch.iter().map(renamed_cost).sum::<u64>();
                r.renamed.extend(batch);
            }
            Message::Inline { index, data } => {
                let entries = r.entries.len() as u64;
                if index >= entries {
                    return Err(ProtocolError::InlineOutOfRange {
                        id: r.id,
                        index,
                        entries,
                    });
                }
                self.bytes += inline_cost(&data);
                r.inline.insert(index, data);
            }
            other => {
                return Err(ProtocolError::UnexpectedInRound {
                    id: r.id,
                    got: other.name(),
                });
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ProtocolError> {
        let r = &self.round;
        let id = r.id;
        let count = (r.entries.len() + r.deleted.len() + r.renamed.len()) as u64;
        if count > MAX_ROUND_ENTRIES {
            return Err(ProtocolError::TooManyEntries {
                id,
                max: MAX_ROUND_ENTRIES,
            });
        }
        if self.bytes > MAX_ROUND_BYTES {
            return Err(ProtocolError::TooManyBytes {
                id,
                max: MAX_ROUND_BYTES,
            });
        }
        Ok(())
    }
}
