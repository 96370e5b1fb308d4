//! One content exchange's message-level state machines, with no I/O: what a
//! replica pulls on a stream of its own after the round's manifest.
//!
//! - [`admit`]: the source's admission of a request (`FileRequest`,
//!   `FilesRequest` or `DbRequest`): the index is in the round, the entry is of the kind asked.
//! - [`file::FileFetch`]: the replica's side of `Literal`/`Delta`* then
//!   `FileEnd`: order, sizes never past the entry's, the end.
//! - [`batch::BatchFetch`]: the replica's side of a `FilesRequest`: each
//!   file's `Literal`* then `FileEnd`, one after another.
//! - [`db::DbFetch`]: the replica's side of (`DbNeedHashes` ↔ `DbHashes`*),
//!   `DbPages`*, `DbEnd`: order, pages never more than announced, the end.
//! - [`db::HashCollector`]: the source's side of the replica's `DbHashes`.
//!
//! Each is fed one message at a time and says what to do (write, apply a
//! delta, send hashes, commit, leave the file as it was); the agent's
//! session files are glue that reads frames, feeds them and does it.

pub mod admit;
pub mod batch;
pub mod db;
pub mod file;

pub use admit::{DbGeometry, Request, admit};
pub use batch::{BatchFetch, BatchStep};
pub use db::{
    DbFetch, DbStep, HashCollector, MAX_RUN_BYTES, MIN_RUN_BYTES, hash_batches, page_messages,
    pages_per_batch, run_pages,
};
pub use file::{Changed, FileFetch, FileStep};

use crate::{MAX_DB_PAGES, ValidateError};

/// A message that breaks a content exchange (order, counts, sizes, the end,
/// or a request for something the round does not offer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExchangeError {
    /// A message that has no place in this exchange.
    #[error("expected {want}, got {got}")]
    Unexpected {
        /// What the exchange expected.
        want: &'static str,
        /// The message's name.
        got: &'static str,
    },
    /// A message after the exchange's end.
    #[error("{got} after the end")]
    AfterEnd {
        /// The message's name.
        got: &'static str,
    },
    /// The stream ended before the exchange's end.
    #[error("stream ended before the {0} was complete")]
    EndedEarly(&'static str),
    /// A delta when the replica sent no signature of a basis.
    #[error("delta without a basis")]
    DeltaWithoutBasis,
    /// A `FileEnd` whose size is not what arrived.
    #[error("source announced {announced} bytes, {arrived} arrived")]
    ShortEnd {
        /// The size the end announced.
        announced: u64,
        /// The bytes that arrived.
        arrived: u64,
    },
    /// More pages than the database has (a page sent twice).
    #[error("more pages sent than the {0} the database has")]
    TooManyPages(u32),
    /// Page 0, a page beyond the database, or of another size.
    #[error("page {number} of {len} bytes for a database of {pages} pages of {page_size}")]
    BadPage {
        /// The page number.
        number: u32,
        /// Its length.
        len: usize,
        /// The database's pages.
        pages: u32,
        /// Its page size.
        page_size: u32,
    },
    /// `DbNeedHashes` twice, or after pages.
    #[error("the source asked for page hashes twice or after pages")]
    HashesAgain,
    /// A `DbEnd` that is not the round's entry.
    #[error("the source's database end does not match the round")]
    EndMismatch,
    /// More batches of page hashes than a database of [`MAX_DB_PAGES`] takes.
    #[error("replica sent more than {0} batches of page hashes (at most {MAX_DB_PAGES} pages)")]
    TooManyHashBatches(usize),
    /// A request for an index the round does not have.
    #[error("replica asked for entry {index}, beyond the round of {entries} entries")]
    BeyondRound {
        /// The index asked for.
        index: u64,
        /// The round's entries.
        entries: usize,
    },
    /// A file request for an entry that is not a regular file.
    #[error("replica asked for {path} which is not a regular file (a {kind})")]
    NotAFile {
        /// The entry.
        path: crate::RelPath,
        /// What it is.
        kind: &'static str,
    },
    /// A files request naming a file larger than [`crate::MAX_BATCH_FILE`].
    #[error(
        "replica asked for {path} ({size} bytes) in a files request (at most {} each)",
        crate::MAX_BATCH_FILE
    )]
    TooLargeForBatch {
        /// The entry.
        path: crate::RelPath,
        /// Its size.
        size: u64,
    },
    /// More content for a file of a files request than its entry's size (the
    /// source checks each before it sends it).
    #[error("more content than the {size} bytes of {path} in a files request")]
    BatchOverrun {
        /// The entry.
        path: crate::RelPath,
        /// Its size.
        size: u64,
    },
    /// A database request for an entry that is not a database.
    #[error("replica asked for {path} as a database; it is a {kind}")]
    NotADatabase {
        /// The entry.
        path: crate::RelPath,
        /// What it is.
        kind: &'static str,
    },
    /// A database request in a round with no databases.
    #[error("replica asked for a database; none in the round")]
    NoDatabases,
    /// A message out of the bounds [`crate::Message::validate`] checks.
    #[error("{0}")]
    Invalid(#[from] ValidateError),
}

#[cfg(test)]
mod db_tests;
#[cfg(test)]
mod tests;
