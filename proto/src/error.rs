//! Typed protocol errors: what broke the protocol, and the wire [`ErrorCode`]
//! the session ends with.

use crate::{ErrorCode, Message, ValidateError};

/// A message that breaks the round protocol (order, bounds, a bad end).
///
/// The text names the round and what was wrong; [`ProtocolError::code`] is
/// the code the session's `Error` frame carries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Between rounds, something other than `RoundStart` or `Promote`.
    #[error("expected a round, got {got}")]
    ExpectedRound {
        /// The message's name.
        got: &'static str,
    },
    /// Inside a round, a message that has no place there.
    #[error("expected the rest of round {id}, got {got}")]
    UnexpectedInRound {
        /// The round.
        id: u64,
        /// The message's name.
        got: &'static str,
    },
    /// More entries, deletions and renames than a round may carry.
    #[error("round {id} larger than {max} entries")]
    TooManyEntries {
        /// The round.
        id: u64,
        /// The bound.
        max: u64,
    },
    /// More bytes than a round may make the replica hold.
    #[error(
        "round {id} larger than {max} bytes of entries, inline content and database page tables"
    )]
    TooManyBytes {
        /// The round.
        id: u64,
        /// The bound.
        max: u64,
    },
    /// Inline content for an entry the round has not announced.
    #[error("round {id}: inline content for entry {index}, beyond the {entries} entries sent")]
    InlineOutOfRange {
        /// The round.
        id: u64,
        /// The index named.
        index: u64,
        /// Entries announced so far.
        entries: u64,
    },
    /// A `RoundEnd` that does not match the round.
    #[error(
        "round {id} ended as round {end} with {announced} entries announced, {carried} carried"
    )]
    BadEnd {
        /// The round.
        id: u64,
        /// The id the end named.
        end: u64,
        /// Entries the end announced.
        announced: u64,
        /// Entries the round carried.
        carried: u64,
    },
    /// A message out of the bounds [`Message::validate`] checks.
    #[error("{0}")]
    Invalid(#[from] ValidateError),
}

impl ProtocolError {
    /// The code a session ending on this error sends.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        ErrorCode::Protocol
    }
}

impl Message {
    /// The message's name, for errors (never its contents, which may be large).
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Error { .. } => "Error",
            Message::RoundStart { .. } => "RoundStart",
            Message::Manifest(_) => "Manifest",
            Message::ManifestPacked { .. } => "ManifestPacked",
            Message::Deleted(_) => "Deleted",
            Message::Renamed(_) => "Renamed",
            Message::RoundEnd { .. } => "RoundEnd",
            Message::FileRequest { .. } => "FileRequest",
            Message::Literal(_) => "Literal",
            Message::Delta(_) => "Delta",
            Message::FileEnd { .. } => "FileEnd",
            Message::RoundDone { .. } => "RoundDone",
            Message::Inline { .. } => "Inline",
            Message::DbRequest { .. } => "DbRequest",
            Message::DbNeedHashes => "DbNeedHashes",
            Message::DbHashes { .. } => "DbHashes",
            Message::DbPages(_) => "DbPages",
            Message::DbEnd { .. } => "DbEnd",
            Message::Promote { .. } => "Promote",
            Message::Promoted { .. } => "Promoted",
            Message::StageFile { .. } => "StageFile",
            Message::StageBasis { .. } => "StageBasis",
            Message::Staged { .. } => "Staged",
            Message::TreeDigest { .. } => "TreeDigest",
            Message::RoundSame { .. } => "RoundSame",
            Message::FilesRequest { .. } => "FilesRequest",
            Message::DbRun { .. } => "DbRun",
            Message::ScannedEnd { .. } => "ScannedEnd",
        }
    }
}
