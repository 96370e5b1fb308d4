//! A session's first full round with nothing to do: the replica's quick
//! digest of its tree (`TreeDigest`) against the round's (`RoundSame`).

use super::{Round, SourceSession};
use crate::wire;
use anyhow::{Result, bail};
use proto::Message;
use std::sync::atomic::Ordering;

/// What the control stream's reader hands up.
type Reply = Option<Result<Option<Message>>>;

impl SourceSession {
    /// A reply from the replica, unless it is the tree digest it sends once
    /// before anything else (kept when no round waited for it).
    pub(super) fn unless_digest(&mut self, reply: Reply) -> Option<Reply> {
        match reply {
            Some(Ok(Some(Message::TreeDigest { digest }))) if self.digest.is_none() => {
                self.digest = Some(digest);
                None
            }
            reply => Some(reply),
        }
    }

    /// The replica's quick digest, waiting for it if it has not come (it is
    /// the first thing a replica sends after its hello).
    pub(super) async fn replica_digest(&mut self) -> Result<Option<[u8; 32]>> {
        if let Some(d) = self.digest {
            return Ok(d);
        }
        match self.ctl_rx.recv().await {
            Some(Ok(Some(Message::TreeDigest { digest }))) => {
                self.digest = Some(digest);
                Ok(digest)
            }
            Some(Ok(Some(Message::Error { code, message }))) => {
                bail!("replica failed ({code:?}): {message}")
            }
            Some(Ok(Some(other))) => bail!(
                "replica sent {} where its tree digest belongs",
                other.name()
            ),
            Some(Err(e)) => Err(e),
            Some(Ok(None)) | None => bail!("replica closed the session before its tree digest"),
        }
    }

    /// Sends a session's first full round as `RoundSame` when the replica's
    /// tree has the round's quick digest; `true` when it did.
    pub(super) async fn send_same(&mut self, id: u64, round: &Round) -> Result<bool> {
        if id != 1 || !round.full || round.checksum || round.verify {
            return Ok(false);
        }
        let ours = match round.quick_digest {
            Some(d) => d,
            None => {
                let entries = round.entries.clone();
                tokio::task::spawn_blocking(move || sync_core::digest::quick_root(&entries)).await?
            }
        };
        if self.replica_digest().await? != Some(ours) {
            return Ok(false);
        }
        let same = Message::RoundSame {
            id,
            entries: round.entries.len() as u64,
            digest: ours,
            root_hash: round.root_hash,
        };
        wire::send(&mut self.ctl_send, &same).await?;
        self.progress
            .entries_sent
            .fetch_add(round.entries.len() as u64, Ordering::Relaxed);
        Ok(true)
    }
}
