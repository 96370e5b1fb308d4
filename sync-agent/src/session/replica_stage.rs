//! The replica side of the bulk lane: large files staged ahead of the round
//! that carries them, on streams the source opens while rounds go on.
//!
//! A stage installs nothing: it leaves a checked, synced temp file in the root
//! ([`sync_core::apply::Kept`]). A round whose entry for that path has the same
//! size and hash adopts it ([`take_staged`]) instead of fetching the file, so
//! the rename happens with the round's others, behind its `syncfs` and journal.
//! Bounds: [`MAX_STAGING`] transfers at once, [`MAX_KEPT`] staged files kept
//! (the oldest is dropped), each transfer timed like a file of a round; all
//! dropped when the session ends.
//!
//! A stage stream that breaks the protocol ([`Violation`]: a malformed frame,
//! messages out of order, a stage for the root, a delta with no basis
//! offered, an end that does not add up) ends the session, as a broken
//! control stream does: the stream gets an `Error`, the connection is closed
//! and the log names the peer and the stream. Content that merely outgrows
//! its announced size, or does not hash as announced, is what an honest
//! source sends for a file changed while it was read, and so is a stream that
//! ends early (its read failed) or a path this replica excludes: that stage
//! is refused and dropped, the session goes on.

use super::replica::ReplicaFolder;
use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::{ApplySummary, Kind, Message, RelPath};
use std::collections::BTreeMap;
use std::sync::Arc;
use sync_core::Manifest;
use sync_core::apply::{Kept, Replica};
use sync_core::delta;
use sync_core::plan::Fetch;
use tokio::sync::mpsc;

/// Most stages written at once (more streams are refused).
pub const MAX_STAGING: usize = 2;
/// Most staged files kept waiting for their round.
pub const MAX_KEPT: usize = 8;

/// What the bulk lane staged in this session, by path, with the order kept.
#[derive(Debug, Default)]
pub struct Stages {
    kept: BTreeMap<RelPath, (u64, Kept, u64)>,
    next: u64,
    writing: usize,
}

impl Stages {
    /// Keeps `k` for `path` (literal bytes `lit`); returns what it displaces:
    /// an older stage of the path, and the oldest when over [`MAX_KEPT`].
    pub fn keep(&mut self, path: RelPath, k: Kept, lit: u64) -> Vec<Kept> {
        self.next += 1;
        let mut out: Vec<Kept> = self
            .kept
            .insert(path, (self.next, k, lit))
            .map(|(_, old, _)| old)
            .into_iter()
            .collect();
        while self.kept.len() > MAX_KEPT {
            let oldest = self
                .kept
                .iter()
                .min_by_key(|(_, (n, _, _))| *n)
                .map(|(p, _)| p.clone());
            if let Some((_, old, _)) = oldest.and_then(|p| self.kept.remove(&p)) {
                out.push(old);
            }
        }
        out
    }

    /// The stage of `path` if it holds `size` bytes hashing to `hash`; a
    /// stage of the path with other content is dropped (second: to remove).
    pub fn take(
        &mut self,
        path: &RelPath,
        size: u64,
        hash: &[u8; 32],
    ) -> (Option<(Kept, u64)>, Option<Kept>) {
        match self.kept.remove(path) {
            Some((_, k, lit)) if k.size == size && &k.hash == hash => (Some((k, lit)), None),
            Some((_, k, _)) => (None, Some(k)),
            None => (None, None),
        }
    }

    /// Everything kept, taken (the session ended).
    pub fn drain(&mut self) -> Vec<Kept> {
        std::mem::take(&mut self.kept)
            .into_values()
            .map(|(_, k, _)| k)
            .collect()
    }
}

/// A stage stream broke the protocol: the session ends.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Violation(String);

/// Refuses a stage stream for breaking the protocol.
fn violation(what: impl Into<String>) -> anyhow::Error {
    Violation(what.into()).into()
}

/// Serves the source's stage streams until the connection ends; one that
/// breaks the protocol closes the connection.
pub(super) async fn accept_stages(
    conn: quinn::Connection,
    folder: Arc<ReplicaFolder>,
    peer: String,
) {
    while let Ok((mut send, recv)) = conn.accept_bi().await {
        let (conn, peer, id) = (conn.clone(), peer.clone(), send.id());
        let folder = folder.clone();
        let slot = folder.stages.lock().ok().and_then(|mut s| {
            (s.writing < MAX_STAGING).then(|| {
                s.writing += 1;
            })
        });
        tokio::spawn(async move {
            if slot.is_none() {
                let message = format!("more than {MAX_STAGING} files staged at once");
                let _ = wire::send(
                    &mut send,
                    &Message::Error {
                        code: proto::ErrorCode::Protocol,
                        message,
                    },
                )
                .await;
                let _ = send.finish();
                return;
            }
            match stage(&folder, send, recv).await {
                Ok(()) => {}
                Err(e) if broke_protocol(&e) => {
                    tracing::error!(
                        "session with peer {peer}, folder {}: stage stream {id}: {e:#}; closing the session",
                        folder.name
                    );
                    conn.close(1u32.into(), b"stage stream broke the protocol");
                }
                Err(e) => {
                    tracing::warn!(folder = %folder.name, "staging a file ahead of its round: {e:#}");
                }
            }
            if let Ok(mut s) = folder.stages.lock() {
                s.writing -= 1;
            }
        });
    }
}

/// One stage: the basis's signature up, content down, checked, kept.
async fn stage(
    folder: &Arc<ReplicaFolder>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<()> {
    let first = match wire::expect_soon(&mut recv, "a file to stage").await {
        Ok(m) => m,
        Err(e) => return refuse(send, e).await,
    };
    let (path, size) = match first {
        Message::StageFile { path, size } => (path, size),
        other => {
            let e = format!("expected a file to stage, got {}", other.name());
            return refuse(send, violation(e)).await;
        }
    };
    if path.is_root() {
        return refuse(send, violation("a stage for the root, not a file")).await;
    }
    // (the replica's own excludes, which an honest source may not share)
    if folder.filter.excludes(&path, false) {
        return refuse(send, anyhow!("{path}: excluded here, not staged")).await;
    }
    let r = folder.replica.clone();
    let p = path.clone();
    let basis = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok(match r.open_basis(&p)? {
            Some(map) if map.len() as u64 >= delta::MIN_DELTA_SIZE => {
                let sig = delta::signature(&map);
                Some((map, sig))
            }
            _ => None,
        })
    })
    .await??;
    let (map, signature) = basis.map_or((None, None), |(m, s)| (Some(m), Some(s)));
    wire::send(&mut send, &Message::StageBasis { signature }).await?;
    let timer = wire::Stage::new(format!("staging {path}"), size);
    let (tx, rx) = mpsc::channel::<Message>(2);
    let (r, p) = (folder.replica.clone(), path.clone());
    // a large file staged ahead is a file: on the files lane, below the
    // databases, beside the small files it must not starve
    let writer = super::files_lane::spawn(move || write_stage(&r, (&p, size), map.as_deref(), rx));
    let reading = async {
        loop {
            let msg = tokio::select! {
                m = timer.expect(&mut recv, "staged content") => m?,
                () = tx.closed() => return Ok(()),
            };
            folder.activity.touch();
            let end = matches!(msg, Message::FileEnd { .. });
            if !matches!(
                msg,
                Message::Literal(_) | Message::Delta(_) | Message::FileEnd { .. }
            ) {
                return Err(violation(format!(
                    "{path}: expected file content, got {}",
                    msg.name()
                )));
            }
            if tx.send(msg).await.is_err() || end {
                return Ok::<(), anyhow::Error>(());
            }
        }
    }
    .await;
    drop(tx);
    // A reader that failed first (a malformed or late frame) holds the cause.
    let written = writer.await?;
    if let Err(e) = reading {
        return refuse(send, e).await;
    }
    let (kept, lit) = match written {
        Ok(k) => k,
        Err(e) => return refuse(send, e).await,
    };
    let (size, hash) = (kept.size, kept.hash);
    let dropped = folder
        .stages
        .lock()
        .map_err(|_| anyhow!("stages poisoned"))?
        .keep(path, kept, lit);
    for k in &dropped {
        folder.replica.discard(k);
    }
    wire::send(&mut send, &Message::Staged { size, hash }).await?;
    let _ = send.finish();
    Ok(())
}

/// Whether a stage failed by breaking the protocol (a malformed frame
/// included), not by a change at the source or a local error.
fn broke_protocol(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.is::<Violation>() || c.is::<proto::frame::FrameError>())
}

/// Tells the source why its stage is refused (on its stream) and returns the
/// cause.
async fn refuse(mut send: quinn::SendStream, e: anyhow::Error) -> Result<()> {
    let code = if broke_protocol(&e) {
        proto::ErrorCode::Protocol
    } else {
        proto::ErrorCode::Apply
    };
    let mut message = format!("{e:#}");
    sync_core::apply::truncate(&mut message, proto::MAX_TEXT);
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        wire::send(&mut send, &Message::Error { code, message }),
    )
    .await;
    let _ = send.finish();
    if code == proto::ErrorCode::Protocol {
        // the session is closed next: the error reaches the peer first
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), send.stopped()).await;
    }
    Err(e)
}

/// Writes a stage as its content arrives, no more than the `size` announced:
/// `(kept, literal bytes)`.
fn write_stage(
    r: &Replica,
    (path, size): (&RelPath, u64),
    basis: Option<&[u8]>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<(Kept, u64)> {
    let mut staged = r.prestage(path)?.sized(size);
    let (mut literal, mut out) = (0u64, Vec::new());
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Message::Literal(data) => {
                literal += data.len() as u64;
                staged.write(&data)?;
            }
            Message::Delta(d) => {
                let base =
                    basis.ok_or_else(|| violation(format!("{path}: delta without a basis")))?;
                super::replica_fetch::rebuild(path, base, &d, &mut out)?;
                literal += (d.len() as u64).min(out.len() as u64);
                staged.write(&out)?;
            }
            Message::FileEnd { size, hash } => {
                if size != staged.len() {
                    return Err(violation(format!(
                        "{path}: the end says {size} bytes, {} arrived",
                        staged.len()
                    )));
                }
                return Ok((staged.keep(&hash)?, literal));
            }
            other => return Err(violation(format!("{path}: unexpected {}", other.name()))),
        }
        if staged.len() > size {
            bail!("{path}: more than the {size} bytes announced (changed at the source)");
        }
        // written back as it arrives, never in bursts that rounds' syncs
        // would queue behind
        staged.pace();
    }
    // (an honest source whose read failed ends its stream early too)
    bail!("{path}: stream ended before the staged file was complete")
}

/// The round's files that were staged ahead with the same content are
/// adopted (queued like fetched files); the others are returned, to fetch.
pub(super) async fn take_staged(
    folder: &Arc<ReplicaFolder>,
    planned: &Arc<Manifest>,
    pulled: Vec<Fetch>,
    summary: &mut ApplySummary,
) -> Result<Vec<Fetch>> {
    let mut adopt = Vec::new();
    let mut rest = Vec::new();
    {
        let mut st = folder
            .stages
            .lock()
            .map_err(|_| anyhow!("stages poisoned"))?;
        if st.kept.is_empty() {
            return Ok(pulled);
        }
        for f in pulled {
            let e = &planned.entries[f.index];
            let (hit, stale) = match e.kind {
                Kind::File { size, hash } => st.take(&e.path, size, &hash),
                _ => (None, None),
            };
            if let Some(k) = stale {
                tracing::info!(folder = %folder.name, path = %e.path, "staged copy is not the round's content; fetching it in the round");
                folder.replica.discard(&k);
            }
            match hit {
                Some(k) => adopt.push((f, k)),
                None => rest.push(f),
            }
        }
    }
    let (r, p) = (folder.replica.clone(), planned.clone());
    let (adopted, fetch) = tokio::task::spawn_blocking(move || -> Result<_> {
        let (mut done, mut fetch) = (Vec::new(), Vec::new());
        for (f, (k, lit)) in adopt {
            let e = &p.entries[f.index];
            if r.adopt(&k, &e.path, &e.meta)
                .with_context(|| format!("{}: installing what was staged", e.path))?
            {
                done.push((k.size, lit));
            } else {
                tracing::info!(path = %e.path, "staged copy gone; fetching it in the round");
                fetch.push(f);
            }
        }
        Ok((done, fetch))
    })
    .await??;
    for (size, lit) in adopted {
        summary.files_transferred += 1;
        summary.bytes_literal += lit;
        summary.bytes_matched += size.saturating_sub(lit);
    }
    rest.extend(fetch);
    Ok(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(n: u8, size: u64) -> Kept {
        Kept {
            tmp: vec![n],
            size,
            hash: [n; 32],
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    /// Feeds `msgs` to a stage of `size` bytes announced.
    fn staged(r: &Replica, size: u64, msgs: Vec<Message>) -> Result<(Kept, u64)> {
        let (tx, rx) = mpsc::channel(msgs.len().max(1));
        for m in msgs {
            tx.try_send(m).unwrap();
        }
        drop(tx);
        write_stage(r, (&p("big.bin"), size), None, rx)
    }

    #[test]
    fn a_stage_is_checked_and_never_outgrows_what_was_announced() {
        let d = tempfile::tempdir().unwrap();
        let r = Replica::open(d.path()).unwrap();
        let data = vec![3u8; 5000];
        let end = |n: usize, h: &[u8]| Message::FileEnd {
            size: n as u64,
            hash: *blake3::hash(h).as_bytes(),
        };
        let ok = staged(
            &r,
            5000,
            vec![Message::Literal(data.clone()), end(5000, &data)],
        );
        let (k, lit) = ok.unwrap();
        assert_eq!((k.size, lit), (5000, 5000));
        // more than announced: refused before the end, the temp file removed
        let over = staged(
            &r,
            100,
            vec![Message::Literal(data.clone()), end(5000, &data)],
        );
        assert!(format!("{:#}", over.unwrap_err()).contains("announced"));
        // a wrong hash, a short stream
        assert!(
            staged(
                &r,
                5000,
                vec![Message::Literal(data.clone()), end(5000, b"x")]
            )
            .is_err()
        );
        assert!(staged(&r, 5000, vec![Message::Literal(data.clone())]).is_err());
        r.discard(&k);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn stages_are_bounded_replaced_by_path_and_taken_only_when_they_match() {
        let mut s = Stages::default();
        assert!(s.keep(p("a"), kept(1, 10), 10).is_empty());
        // a newer stage of the same path displaces the older
        assert_eq!(s.keep(p("a"), kept(2, 10), 10), vec![kept(1, 10)]);
        for i in 0..MAX_KEPT as u8 - 1 {
            assert!(s.keep(p(&format!("f{i}")), kept(10 + i, 5), 5).is_empty());
        }
        // one over: the oldest goes
        assert_eq!(s.keep(p("z"), kept(99, 1), 1), vec![kept(2, 10)]);
        assert_eq!(s.take(&p("a"), 10, &[2; 32]), (None, None));
        // other content: dropped, not adopted
        assert_eq!(s.take(&p("z"), 1, &[0; 32]), (None, Some(kept(99, 1))));
        assert_eq!(
            s.take(&p("f0"), 5, &[10; 32]),
            (Some((kept(10, 5), 5)), None)
        );
        assert_eq!(s.drain().len(), MAX_KEPT - 2);
    }
}
