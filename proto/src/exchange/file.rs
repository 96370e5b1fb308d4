//! The replica's side of one file: `FileRequest` sent, then `Literal` and
//! `Delta` frames and one `FileEnd`.

use super::ExchangeError;
use crate::Message;

/// Why a file is left as it was: it changed at the source since the scan
/// (not a protocol error; the next round sends it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Changed {
    /// Content that is not what the scan hashed, under a
    /// [`Message::ScannedEnd`] (checked by the replica as it commits).
    #[error("its content is not what was scanned")]
    Content,
    /// More content than the entry's size.
    #[error("more than the {scanned} bytes scanned")]
    Grew {
        /// The entry's size.
        scanned: u64,
    },
    /// An end of another size or hash than the entry's.
    #[error("{now} bytes now, {scanned} when scanned")]
    Differs {
        /// The size the end announced.
        now: u64,
        /// The entry's size.
        scanned: u64,
    },
}

/// What to do with a message of the file's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileStep {
    /// Write these bytes next.
    Literal(Vec<u8>),
    /// Apply this delta to the basis, tell [`FileFetch::produced`] how much
    /// it made, then write that.
    Delta(Vec<u8>),
    /// The file is complete and is the round's: commit it with this hash.
    Commit {
        /// Its blake3.
        hash: [u8; 32],
        /// The source took the hash from its scan ([`Message::ScannedEnd`]):
        /// content that does not match it changed since ([`Changed::Content`]),
        /// where under a `FileEnd` it is an error.
        scanned: bool,
    },
    /// Leave the file as it was (drop what was staged).
    Changed(Changed),
}

/// One file being received, against its manifest entry's size and hash.
///
/// Refuses (an [`ExchangeError`]) anything but content then one end, a delta
/// when no basis was offered, an end whose size is not what arrived, and
/// anything after the end; content past the entry's size or an end that is
/// not the entry's is [`FileStep::Changed`].
#[derive(Debug, Clone)]
pub struct FileFetch {
    size: u64,
    hash: [u8; 32],
    basis: bool,
    produced: u64,
    literal: u64,
    matched: u64,
    ended: bool,
}

impl FileFetch {
    /// A file of `size` bytes and blake3 `hash`; `basis` when the request
    /// carried a signature (so deltas may come).
    #[must_use]
    pub fn new(size: u64, hash: [u8; 32], basis: bool) -> Self {
        Self {
            size,
            hash,
            basis,
            produced: 0,
            literal: 0,
            matched: 0,
            ended: false,
        }
    }

    /// Whether the stream has more to say after `msg` (content); the end, or
    /// anything else, is the last message fed.
    #[must_use]
    pub fn more_follows(msg: &Message) -> bool {
        matches!(msg, Message::Literal(_) | Message::Delta(_))
    }

    /// Feeds one message.
    ///
    /// # Errors
    /// See [`FileFetch`].
    pub fn handle(&mut self, msg: Message) -> Result<FileStep, ExchangeError> {
        msg.validate()?;
        if self.ended {
            return Err(ExchangeError::AfterEnd { got: msg.name() });
        }
        match msg {
            Message::Literal(data) => {
                let n = data.len() as u64;
                if let Err(why) = self.grow(n) {
                    return Ok(FileStep::Changed(why));
                }
                self.literal += n;
                Ok(FileStep::Literal(data))
            }
            Message::Delta(_) if !self.basis => Err(ExchangeError::DeltaWithoutBasis),
            Message::Delta(d) => Ok(FileStep::Delta(d)),
            Message::FileEnd { size, hash } | Message::ScannedEnd { size, hash } => {
                let scanned = matches!(msg, Message::ScannedEnd { .. });
                self.ended = true;
                if size != self.produced {
                    return Err(ExchangeError::ShortEnd {
                        announced: size,
                        arrived: self.produced,
                    });
                }
                if size != self.size || hash != self.hash {
                    return Ok(FileStep::Changed(Changed::Differs {
                        now: size,
                        scanned: self.size,
                    }));
                }
                Ok(FileStep::Commit { hash, scanned })
            }
            other => Err(ExchangeError::Unexpected {
                want: "file content",
                got: other.name(),
            }),
        }
    }

    /// A delta of `delta` bytes made `out` bytes.
    ///
    /// # Errors
    /// [`Changed::Grew`] when that takes the file past the entry's size:
    /// leave it as it was.
    pub fn produced(&mut self, out: u64, delta: u64) -> Result<(), Changed> {
        self.grow(out)?;
        let literal = delta.min(out);
        self.literal += literal;
        self.matched += out - literal;
        Ok(())
    }

    fn grow(&mut self, n: u64) -> Result<(), Changed> {
        self.produced = self.produced.saturating_add(n);
        if self.produced > self.size {
            self.ended = true;
            return Err(Changed::Grew { scanned: self.size });
        }
        Ok(())
    }

    /// Bytes that crossed as literal data, and bytes rebuilt from the basis.
    #[must_use]
    pub fn figures(&self) -> (u64, u64) {
        (self.literal, self.matched)
    }

    /// The stream ended here.
    ///
    /// # Errors
    /// [`ExchangeError::EndedEarly`] before the file's end.
    pub fn stream_ended(&self) -> Result<(), ExchangeError> {
        if self.ended {
            Ok(())
        } else {
            Err(ExchangeError::EndedEarly("file"))
        }
    }
}
