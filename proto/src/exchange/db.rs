//! One database: the replica's side (`DbRequest` sent, then maybe
//! `DbNeedHashes` ↔ `DbHashes`*, then `DbPages`* and `DbEnd`), and the
//! source's collection of the replica's page hashes.

use super::{DbGeometry, ExchangeError};
use crate::{MAX_DB_PAGES, MAX_HASHES_PER_BATCH, MAX_PAGES_PER_BATCH, Message};

/// What to do with a message of the database's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DbStep {
    /// Send our page hashes ([`hash_batches`]).
    SendHashes,
    /// Stage these pages (numbers within the database, each once at most
    /// counted, of the database's page size).
    Pages(Vec<(u32, Vec<u8>)>),
    /// Stage these consecutive pages from page `first` (within the
    /// database, counted, a whole number of its pages).
    Run {
        /// Number of the first page.
        first: u32,
        /// Their images, one after another.
        data: Vec<u8>,
    },
    /// The pages are complete and the end is the round's: commit.
    Commit,
}

/// One database being received, against its manifest entry.
///
/// Refuses (an [`ExchangeError`]) `DbNeedHashes` twice or after pages, more
/// pages than the database has, a page number beyond it or of another size,
/// an end that is not the entry's, anything else, and anything after the end.
#[derive(Debug, Clone)]
pub struct DbFetch {
    db: DbGeometry,
    received: u64,
    /// Hashes were asked, or pages began: no `DbNeedHashes` any more.
    past_hashes: bool,
    ended: bool,
}

impl DbFetch {
    /// A database announced as `db`.
    #[must_use]
    pub fn new(db: DbGeometry) -> Self {
        Self {
            db,
            received: 0,
            past_hashes: false,
            ended: false,
        }
    }

    /// Feeds one message.
    ///
    /// # Errors
    /// See [`DbFetch`].
    pub fn handle(&mut self, msg: Message) -> Result<DbStep, ExchangeError> {
        msg.validate()?;
        if self.ended {
            return Err(ExchangeError::AfterEnd { got: msg.name() });
        }
        let DbGeometry {
            page_size,
            pages,
            hash,
        } = self.db;
        match msg {
            Message::DbNeedHashes => {
                if self.past_hashes {
                    return Err(ExchangeError::HashesAgain);
                }
                self.past_hashes = true;
                Ok(DbStep::SendHashes)
            }
            Message::DbPages(batch) => {
                // Each page once at most: a source repeating pages is refused.
                if self.received + batch.len() as u64 > u64::from(pages) {
                    return Err(ExchangeError::TooManyPages(pages));
                }
                let bad = |(n, d): &&(u32, Vec<u8>)| {
                    *n == 0 || *n > pages || d.len() != page_size as usize
                };
                if let Some((number, d)) = batch.iter().find(bad) {
                    return Err(ExchangeError::BadPage {
                        number: *number,
                        len: d.len(),
                        pages,
                        page_size,
                    });
                }
                self.received += batch.len() as u64;
                self.past_hashes = true;
                Ok(DbStep::Pages(batch))
            }
            Message::DbRun { first, data } => {
                let Some(count) = run_pages(first, data.len(), page_size, pages) else {
                    return Err(ExchangeError::BadPage {
                        number: first,
                        len: data.len(),
                        pages,
                        page_size,
                    });
                };
                let count = u64::from(count);
                if self.received + count > u64::from(pages) {
                    return Err(ExchangeError::TooManyPages(pages));
                }
                self.received += count;
                self.past_hashes = true;
                Ok(DbStep::Run { first, data })
            }
            Message::DbEnd {
                page_size: ps,
                pages: count,
                hash: h,
            } => {
                if (ps, count, h) != (page_size, pages, hash) {
                    return Err(ExchangeError::EndMismatch);
                }
                self.ended = true;
                Ok(DbStep::Commit)
            }
            other => Err(ExchangeError::Unexpected {
                want: "database pages",
                got: other.name(),
            }),
        }
    }

    /// Pages received so far.
    #[must_use]
    pub fn received(&self) -> u64 {
        self.received
    }

    /// The stream ended here.
    ///
    /// # Errors
    /// [`ExchangeError::EndedEarly`] before the database's end.
    pub fn stream_ended(&self) -> Result<(), ExchangeError> {
        if self.ended {
            Ok(())
        } else {
            Err(ExchangeError::EndedEarly("database"))
        }
    }
}

/// How many pages a run of `len` bytes from page `first` holds in a
/// database of `pages` pages of `page_size`: `None` unless it is a whole,
/// non-zero number of pages, from page 1 on, its last within the database.
#[must_use]
pub fn run_pages(first: u32, len: usize, page_size: u32, pages: u32) -> Option<u32> {
    let size = page_size as usize;
    let count = u32::try_from(len.checked_div(size)?).ok()?;
    let last = u64::from(first) + u64::from(count).checked_sub(1)?;
    (first > 0 && len.is_multiple_of(size) && last <= u64::from(pages)).then_some(count)
}

/// Our page hashes as `DbHashes` batches, in page order, the last one marked
/// (one empty batch for none).
pub fn hash_batches(page_size: u32, hashes: &[[u8; 32]]) -> impl Iterator<Item = Message> + '_ {
    let n = hashes.len().div_ceil(MAX_HASHES_PER_BATCH).max(1);
    (0..n).map(move |i| {
        let from = (i * MAX_HASHES_PER_BATCH).min(hashes.len());
        let to = ((i + 1) * MAX_HASHES_PER_BATCH).min(hashes.len());
        Message::DbHashes {
            page_size,
            hashes: hashes[from..to].to_vec(),
            last: i + 1 == n,
        }
    })
}

/// Pages per batch (a `DbPages`, or the pages a source reads at once and
/// sends as `DbRun`s) for a page size: about 128 KiB (a fraction of a
/// stream's flow-control window, so batches stream rather than stop and
/// wait; small enough that a run is still in the CPU's cache as it is
/// decoded, written and hashed: a 1 GiB first copy took 15% less of the
/// replica's CPU than with 256 KiB, and 1 MiB 45% more), at most
/// [`MAX_PAGES_PER_BATCH`].
#[must_use]
pub fn pages_per_batch(page_size: u32) -> usize {
    ((128 << 10) / page_size.max(512) as usize).clamp(1, MAX_PAGES_PER_BATCH)
}

/// Runs shorter than this travel numbered, together in `DbPages`, rather
/// than each as a `DbRun` (pages changed here and there in a database, as an
/// application's commits change them: a frame each would cost a frame's work
/// each): 8 pages of 4 KiB, one of 32 KiB.
pub const MIN_RUN_BYTES: usize = 32 << 10;

/// Most bytes of page images in one message [`page_messages`] makes (a
/// quarter of the frame limit; a longer run is cut at a page boundary).
pub const MAX_RUN_BYTES: usize = crate::MAX_FRAME_LEN / 4;

/// The messages that carry `runs` (each its first page number and the
/// pages' images one after another, `page_size` bytes each): a run of
/// [`MIN_RUN_BYTES`] or more (or a whole page, if larger) as `DbRun`s of at
/// most [`MAX_RUN_BYTES`], the pages of the shorter ones together in
/// `DbPages` batches (first) of at most [`MAX_PAGES_PER_BATCH`] pages and
/// [`MAX_RUN_BYTES`].
#[must_use]
pub fn page_messages(page_size: u32, runs: Vec<(u32, Vec<u8>)>) -> Vec<Message> {
    let size = page_size.max(1) as usize;
    let per = (MAX_RUN_BYTES / size).clamp(1, MAX_PAGES_PER_BATCH);
    let mut scattered = Vec::new();
    let mut long = Vec::new();
    for (first, data) in runs {
        if data.len() < MIN_RUN_BYTES.max(size) {
            scattered.extend((first..).zip(data.chunks(size).map(<[u8]>::to_vec)));
        } else if data.len() <= per * size {
            long.push(Message::DbRun { first, data });
        } else {
            long.extend(
                (first..)
                    .step_by(per)
                    .zip(data.chunks(per * size))
                    .map(|(first, d)| Message::DbRun {
                        first,
                        data: d.to_vec(),
                    }),
            );
        }
    }
    let mut out = Vec::with_capacity(long.len() + 1);
    while !scattered.is_empty() {
        let rest = scattered.split_off(scattered.len().min(per));
        out.push(Message::DbPages(std::mem::replace(&mut scattered, rest)));
    }
    out.extend(long);
    out
}

/// The replica's page size (0: it has no database) and page hashes.
pub type TheirHashes = (u32, Vec<[u8; 32]>);

/// The source's side of `DbNeedHashes`: the replica's `DbHashes` batches,
/// bounded in number (a database has at most [`MAX_DB_PAGES`] pages), hashes
/// past our own page count dropped as they arrive.
#[derive(Debug, Clone)]
pub struct HashCollector {
    ours: usize,
    batches: usize,
    theirs: Vec<[u8; 32]>,
    done: bool,
}

impl HashCollector {
    /// Most batches a replica may send.
    pub const MOST_BATCHES: usize = (MAX_DB_PAGES as usize).div_ceil(MAX_HASHES_PER_BATCH) + 1;

    /// Collects for a database of which we have `pages` pages.
    #[must_use]
    pub fn new(pages: u32) -> Self {
        Self {
            ours: pages as usize,
            batches: 0,
            theirs: Vec::new(),
            done: false,
        }
    }

    /// Feeds one message: `Some((their page size, their hashes))` after the
    /// last batch.
    ///
    /// # Errors
    /// More than [`Self::MOST_BATCHES`] batches, anything but `DbHashes`, and
    /// anything after the last batch.
    pub fn handle(&mut self, msg: Message) -> Result<Option<TheirHashes>, ExchangeError> {
        msg.validate()?;
        if self.done {
            return Err(ExchangeError::AfterEnd { got: msg.name() });
        }
        let Message::DbHashes {
            page_size,
            hashes,
            last,
        } = msg
        else {
            return Err(ExchangeError::Unexpected {
                want: "page hashes",
                got: msg.name(),
            });
        };
        self.batches += 1;
        if self.batches > Self::MOST_BATCHES {
            return Err(ExchangeError::TooManyHashBatches(Self::MOST_BATCHES));
        }
        // beyond our page count they do not matter: not kept
        let room = self.ours.saturating_sub(self.theirs.len());
        self.theirs.extend(hashes.into_iter().take(room));
        if !last {
            return Ok(None);
        }
        self.done = true;
        Ok(Some((page_size, std::mem::take(&mut self.theirs))))
    }
}
