//! The replica's side of a `FilesRequest`: for each file asked, in the order
//! asked, `Literal` frames then one `FileEnd`.

use super::{Changed, ExchangeError, FileFetch, FileStep};
use crate::{Message, RelPath};

/// What to do with a message of a files request's stream, for the file at
/// the position [`BatchFetch::handle`] returns with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchStep {
    /// Write these bytes next.
    Literal(Vec<u8>),
    /// The file is complete and is the round's: commit it with this hash
    /// (`scanned`: see [`FileStep::Commit`]).
    Commit {
        /// Its blake3.
        hash: [u8; 32],
        /// The hash is the scan's ([`Message::ScannedEnd`]).
        scanned: bool,
    },
    /// Leave the file as it was (drop what was staged).
    Changed(Changed),
}

/// The small files of one `FilesRequest` being received, one after another,
/// each against its entry's path, size and hash.
///
/// Each file is a [`FileFetch`] with no basis: a delta is refused, an end
/// that is not the entry's is [`BatchStep::Changed`] and the next file
/// begins. More content than a file's entry announced is refused
/// ([`ExchangeError::BatchOverrun`]): the source checks each file's size
/// before it sends it, so only a broken or hostile source sends that, and
/// nothing after it could be told apart from the next file.
#[derive(Debug, Clone)]
pub struct BatchFetch {
    files: Vec<(RelPath, u64, [u8; 32])>,
    at: usize,
    current: Option<FileFetch>,
}

impl BatchFetch {
    /// The files asked for, in order: `(path, size, blake3)` as the round's
    /// entries have them.
    #[must_use]
    pub fn new(files: Vec<(RelPath, u64, [u8; 32])>) -> Self {
        let current = files.first().map(|(_, s, h)| FileFetch::new(*s, *h, false));
        Self {
            files,
            at: 0,
            current,
        }
    }

    /// Feeds one message: the position (in the request) of the file it is
    /// about, and what to do.
    ///
    /// # Errors
    /// See [`BatchFetch`] and [`FileFetch`]; anything after the last file's
    /// end is [`ExchangeError::AfterEnd`].
    pub fn handle(&mut self, msg: Message) -> Result<(usize, BatchStep), ExchangeError> {
        let at = self.at;
        let (Some(fetch), Some((path, size, _))) = (self.current.as_mut(), self.files.get(at))
        else {
            msg.validate()?;
            return Err(ExchangeError::AfterEnd { got: msg.name() });
        };
        let step = match fetch.handle(msg)? {
            FileStep::Literal(d) => return Ok((at, BatchStep::Literal(d))),
            // FileFetch admits no delta without a basis; kept total all the same.
            FileStep::Delta(_) => return Err(ExchangeError::DeltaWithoutBasis),
            FileStep::Changed(Changed::Grew { .. }) => {
                return Err(ExchangeError::BatchOverrun {
                    path: path.clone(),
                    size: *size,
                });
            }
            FileStep::Changed(why) => BatchStep::Changed(why),
            FileStep::Commit { hash, scanned } => BatchStep::Commit { hash, scanned },
        };
        self.at += 1;
        self.current = self
            .files
            .get(self.at)
            .map(|(_, s, h)| FileFetch::new(*s, *h, false));
        Ok((at, step))
    }

    /// The position of the file the next message is about (the number of
    /// files asked for once all have ended).
    #[must_use]
    pub fn position(&self) -> usize {
        self.at
    }

    /// The path of the file at `at` in the request.
    #[must_use]
    pub fn path(&self, at: usize) -> Option<&RelPath> {
        self.files.get(at).map(|(p, _, _)| p)
    }

    /// Whether every file asked for has had its end.
    #[must_use]
    pub fn done(&self) -> bool {
        self.at >= self.files.len()
    }

    /// The stream ended here.
    ///
    /// # Errors
    /// [`ExchangeError::EndedEarly`] before the last file's end.
    pub fn stream_ended(&self) -> Result<(), ExchangeError> {
        if self.done() {
            Ok(())
        } else {
            Err(ExchangeError::EndedEarly("files request"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    /// A stand-in for a content hash (the machine only compares them).
    fn h(d: &[u8]) -> [u8; 32] {
        let mut x = [0u8; 32];
        x[..8].copy_from_slice(&(d.len() as u64).to_le_bytes());
        for (i, b) in d.iter().enumerate() {
            x[8 + i % 24] ^= *b;
        }
        x
    }

    fn file(name: &str, data: &[u8]) -> (RelPath, u64, [u8; 32]) {
        (path(name), data.len() as u64, h(data))
    }

    fn end(data: &[u8]) -> Message {
        Message::FileEnd {
            size: data.len() as u64,
            hash: h(data),
        }
    }

    /// Files come one after another, each its literals then its end; an empty
    /// one is its end alone; nothing may follow the last.
    #[test]
    fn files_are_received_in_the_order_asked() {
        let (a, b, c) = (b"alpha".as_slice(), b"".as_slice(), b"charlie".as_slice());
        let mut f = BatchFetch::new(vec![file("a", a), file("b", b), file("c", c)]);
        let feed = [
            Message::Literal(b"al".to_vec()),
            Message::Literal(b"pha".to_vec()),
            end(a),
            end(b),
            Message::Literal(c.to_vec()),
            end(c),
        ];
        let steps: Vec<_> = feed.into_iter().map(|m| f.handle(m).unwrap()).collect();
        let commit = |d: &[u8]| BatchStep::Commit {
            hash: h(d),
            scanned: false,
        };
        assert_eq!(
            steps,
            vec![
                (0, BatchStep::Literal(b"al".to_vec())),
                (0, BatchStep::Literal(b"pha".to_vec())),
                (0, commit(a)),
                (1, commit(b)),
                (2, BatchStep::Literal(c.to_vec())),
                (2, commit(c)),
            ]
        );
        assert!(f.done());
        f.stream_ended().unwrap();
        assert_eq!(
            f.handle(Message::Literal(b"x".to_vec())),
            Err(ExchangeError::AfterEnd { got: "Literal" })
        );
    }

    /// A file that changed at the source (its end is not the entry's) is left
    /// as it was, and the next file is received as usual.
    #[test]
    fn a_changed_file_is_left_and_the_next_follows() {
        let mut f = BatchFetch::new(vec![file("a", b"old"), file("b", b"bee")]);
        assert_eq!(
            f.handle(Message::Literal(b"new".to_vec())).unwrap(),
            (0, BatchStep::Literal(b"new".to_vec()))
        );
        assert_eq!(
            f.handle(end(b"new")).unwrap(),
            (
                0,
                BatchStep::Changed(Changed::Differs { now: 3, scanned: 3 })
            )
        );
        // gone at the source: an empty end that cannot match
        let gone = Message::FileEnd {
            size: 0,
            hash: [0; 32],
        };
        assert_eq!(
            f.handle(gone).unwrap(),
            (
                1,
                BatchStep::Changed(Changed::Differs { now: 0, scanned: 3 })
            )
        );
        assert!(f.done());
    }

    /// What a broken or hostile source sends is refused, naming the file:
    /// more than its entry's size, a delta, an end that is not what arrived,
    /// another message, the stream ending before the last file.
    #[test]
    fn a_hostile_batch_is_refused() {
        let files = vec![file("ok", b"fine"), file("dir/small", b"abc")];
        let mut f = BatchFetch::new(files.clone());
        f.handle(Message::Literal(b"fine".to_vec())).unwrap();
        f.handle(end(b"fine")).unwrap();
        assert_eq!(
            f.handle(Message::Literal(b"abcd".to_vec())),
            Err(ExchangeError::BatchOverrun {
                path: path("dir/small"),
                size: 3
            })
        );
        let mut f = BatchFetch::new(files.clone());
        assert_eq!(
            f.handle(Message::Delta(vec![1, 2])),
            Err(ExchangeError::DeltaWithoutBasis)
        );
        let mut f = BatchFetch::new(files.clone());
        f.handle(Message::Literal(b"fi".to_vec())).unwrap();
        assert_eq!(
            f.handle(end(b"fine")),
            Err(ExchangeError::ShortEnd {
                announced: 4,
                arrived: 2
            })
        );
        let mut f = BatchFetch::new(files.clone());
        assert!(matches!(
            f.handle(Message::DbNeedHashes),
            Err(ExchangeError::Unexpected { .. })
        ));
        let mut f = BatchFetch::new(files);
        f.handle(Message::Literal(b"fine".to_vec())).unwrap();
        f.handle(end(b"fine")).unwrap();
        assert_eq!(
            f.stream_ended(),
            Err(ExchangeError::EndedEarly("files request"))
        );
    }
}
