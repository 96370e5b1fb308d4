//! The source's admission of a replica's request: only an entry of the
//! current round, and only of the kind asked for, is ever served.

use super::ExchangeError;
use crate::{Entry, Kind, Message};

/// A database's geometry and snapshot hash, as the round's entry announced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DbGeometry {
    /// Page size in bytes.
    pub page_size: u32,
    /// Page count.
    pub pages: u32,
    /// Page Merkle hash of the snapshot.
    pub hash: [u8; 32],
}

impl DbGeometry {
    /// The geometry of a database entry; `None` for other kinds.
    #[must_use]
    pub fn of(e: &Entry) -> Option<Self> {
        match e.kind {
            Kind::Database {
                page_size,
                pages,
                hash,
            } => Some(Self {
                page_size,
                pages,
                hash,
            }),
            _ => None,
        }
    }
}

/// A request admitted: what to serve.
#[derive(Debug, PartialEq, Eq)]
pub enum Request<'a, L> {
    /// The content of a regular file of the round.
    File {
        /// Its entry.
        entry: &'a Entry,
        /// The replica's basis signature, if it has one.
        signature: Option<Vec<u8>>,
    },
    /// The contents of small regular files of the round, in this order.
    Files {
        /// Their entries.
        entries: Vec<&'a Entry>,
    },
    /// A database of the round, brought to its snapshot.
    Db {
        /// Its entry.
        entry: &'a Entry,
        /// Its geometry.
        db: DbGeometry,
        /// The page Merkle hash the replica holds (zeros for none).
        have: [u8; 32],
        /// The round's databases (`databases` as given).
        live: L,
    },
}

/// Admits the first message of a replica's stream against the round's
/// `entries`; `databases` are the round's live databases, if it has any.
///
/// # Errors
/// Anything but a `FileRequest`, `FilesRequest` or `DbRequest`, an index
/// beyond the round, a file request for anything but a regular file (or, in a
/// files request, one over [`crate::MAX_BATCH_FILE`]), a database request for
/// anything but a database or in a round without databases.
pub fn admit<L>(
    entries: &[Entry],
    databases: Option<L>,
    msg: Message,
) -> Result<Request<'_, L>, ExchangeError> {
    msg.validate()?;
    let entry = |index: u64| {
        usize::try_from(index)
            .ok()
            .and_then(|i| entries.get(i))
            .ok_or(ExchangeError::BeyondRound {
                index,
                entries: entries.len(),
            })
    };
    let file = |index: u64| {
        let entry = entry(index)?;
        match entry.kind {
            Kind::File { size, .. } => Ok((entry, size)),
            _ => Err(ExchangeError::NotAFile {
                path: entry.path.clone(),
                kind: entry.kind.name(),
            }),
        }
    };
    match msg {
        Message::FileRequest { index, signature } => {
            let (entry, _) = file(index)?;
            Ok(Request::File { entry, signature })
        }
        Message::FilesRequest { indexes } => {
            let entries = indexes
                .into_iter()
                .map(|i| match file(i)? {
                    (e, size) if size > crate::MAX_BATCH_FILE => {
                        Err(ExchangeError::TooLargeForBatch {
                            path: e.path.clone(),
                            size,
                        })
                    }
                    (e, _) => Ok(e),
                })
                .collect::<Result<_, _>>()?;
            Ok(Request::Files { entries })
        }
        Message::DbRequest { index, have } => {
            let live = databases.ok_or(ExchangeError::NoDatabases)?;
            let entry = entry(index)?;
            let db = DbGeometry::of(entry).ok_or_else(|| ExchangeError::NotADatabase {
                path: entry.path.clone(),
                kind: entry.kind.name(),
            })?;
            Ok(Request::Db {
                entry,
                db,
                have,
                live,
            })
        }
        other => Err(ExchangeError::Unexpected {
            want: "a request",
            got: other.name(),
        }),
    }
}
