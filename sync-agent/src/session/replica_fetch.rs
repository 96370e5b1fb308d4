//! The replica side of a session: fetching and staging a round's files and databases.

use super::replica::*;
use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::{Entry, Kind, Message};
use std::sync::Arc;
use sync_core::apply::Replica;
use sync_core::delta;
use tokio::sync::mpsc;

/// Brings one database to the round's snapshot: `have` up, pages down (after
/// our page hashes, if the source asks), staged for the round's commit.
/// `None` when nothing was needed or the database is held by another process.
pub(super) async fn fetch_db(
    conn: &quinn::Connection,
    replica: Arc<Replica>,
    entry: Entry,
    index: u64,
    current: Option<proto::Meta>,
    activity: &Activity,
) -> Result<Option<u64>> {
    let Kind::Database {
        page_size,
        pages,
        hash,
    } = entry.kind
    else {
        bail!("{}: not a database", entry.path);
    };
    let (r, p) = (replica.clone(), entry.path.clone());
    let (held, holders, linked) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((r.db_held(&p)?, r.db_holders(&p), r.has_other_links(&p)?))
    })
    .await??;
    // A database with other names (hard links from outside the root, a
    // `cp -al` snapshot) is never written in place, its metadata included:
    // the whole image is staged and renamed over.
    let held = held.filter(|_| !linked);
    if held.as_ref().is_some_and(|h| h.hash == hash) {
        if current.as_ref() != Some(&entry.meta) {
            let (r, e) = (replica.clone(), entry.clone());
            tokio::task::spawn_blocking(move || r.set_meta(&e)).await??;
        }
        return Ok(None);
    }
    if let Some(who) = holders {
        replica.note_held(&entry.path, &who);
        replica.warn(format!(
            "{}: database held open by {who}; not updated (the standby's application \
             must be stopped), retried next round",
            entry.path
        ));
        tracing::warn!(db = %entry.path, holders = %who, "database held open by another process; not applying under it");
        return Ok(None);
    }
    let (mut send, mut recv) = conn.open_bi().await.context("opening a database stream")?;
    let have = held.as_ref().map_or([0; 32], |h| h.hash);
    wire::send(&mut send, &Message::DbRequest { index, have }).await?;
    let (tx, rx) = mpsc::channel::<Message>(4);
    let (r, e, base) = (replica.clone(), entry.clone(), held.clone());
    let writer = tokio::task::spawn_blocking(move || write_db(&r, &e, base, rx));
    // The whole database is bounded in time: its size at the least rate.
    let stage = wire::Stage::new(
        format!("database {}", entry.path),
        u64::from(page_size) * u64::from(pages),
    );
    let reading = async {
        loop {
            let msg = tokio::select! {
                m = stage.expect(&mut recv, "database pages") => m?,
                // the writer gave up: its error is the one to report
                () = tx.closed() => return Ok(()),
            };
            activity.touch();
            match msg {
                Message::DbNeedHashes => send_hashes(&mut send, held.as_deref()).await?,
                Message::DbPages(_) | Message::DbEnd { .. } => {
                    let end = matches!(msg, Message::DbEnd { .. });
                    if tx.send(msg).await.is_err() || end {
                        return Ok::<(), anyhow::Error>(());
                    }
                }
                other => bail!("{}: expected database pages, got {other:?}", entry.path),
            }
        }
    }
    .await;
    let _ = send.finish();
    drop(tx);
    let written = writer.await?;
    // A reader that failed first (a malformed or late frame) holds the cause;
    // the writer then only saw its input end. Otherwise the writer's error
    // names the cause.
    reading.with_context(|| format!("{}: database stream from the source", entry.path))?;
    written.map(Some)
}

/// Our page hashes, in batches, the last one marked (one empty batch for none).
pub(super) async fn send_hashes(
    send: &mut quinn::SendStream,
    held: Option<&sync_core::sqlite::Held>,
) -> Result<()> {
    let hashes = held.map(|h| h.hashes.as_slice()).unwrap_or(&[]);
    let page_size = held.map_or(0, |h| h.page_size);
    let mut chunks = hashes.chunks(proto::MAX_HASHES_PER_BATCH).peekable();
    if chunks.peek().is_none() {
        let m = Message::DbHashes {
            page_size,
            hashes: Vec::new(),
            last: true,
        };
        return wire::send(send, &m).await;
    }
    while let Some(c) = chunks.next() {
        let last = chunks.peek().is_none();
        let m = Message::DbHashes {
            page_size,
            hashes: c.to_vec(),
            last,
        };
        wire::send(send, &m).await?;
    }
    Ok(())
}

/// Stages the pages of one database as they arrive and commits it at its end.
pub(super) fn write_db(
    r: &Replica,
    e: &Entry,
    base: Option<Arc<sync_core::sqlite::Held>>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<u64> {
    let Kind::Database {
        page_size,
        pages,
        hash,
    } = e.kind
    else {
        bail!("{}: not a database", e.path);
    };
    let mut staged = r.stage_db(&e.path, base, page_size, pages)?;
    let mut n = 0u64;
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Message::DbPages(batch) => {
                // Each page once at most: a source repeating pages is refused.
                if n + batch.len() as u64 > u64::from(pages) {
                    bail!(
                        "{}: more pages sent than the {pages} the database has",
                        e.path
                    );
                }
                for (pgno, data) in batch {
                    staged.page(pgno, &data)?;
                    n += 1;
                }
            }
            Message::DbEnd {
                page_size: ps,
                pages: count,
                hash: h,
            } => {
                if (ps, count, h) != (page_size, pages, hash) {
                    bail!(
                        "{}: the source's database end does not match the round",
                        e.path
                    );
                }
                staged.commit(&hash, &e.meta)?;
                return Ok(n);
            }
            other => bail!("{}: unexpected {other:?}", e.path),
        }
    }
    bail!("{}: stream ended before the database was complete", e.path)
}

/// Pulls one file: signature of our basis up, content down, staged and checked.
pub(super) async fn fetch_file(
    conn: quinn::Connection,
    replica: Arc<Replica>,
    entry: Entry,
    index: u64,
    basis: bool,
    activity: Activity,
) -> Result<Option<(u64, u64)>> {
    let (r, path) = (replica.clone(), entry.path.clone());
    let basis = if basis {
        tokio::task::spawn_blocking(move || -> Result<_> {
            Ok(match r.open_basis(&path)? {
                Some(map) if map.len() as u64 >= delta::MIN_DELTA_SIZE => {
                    let sig = delta::signature(&map);
                    Some((map, sig))
                }
                _ => None,
            })
        })
        .await??
    } else {
        None
    };
    let (map, signature) = match basis {
        Some((m, s)) => (Some(m), Some(s)),
        None => (None, None),
    };
    let (mut send, mut recv) = conn.open_bi().await.context("opening a file stream")?;
    wire::send(&mut send, &Message::FileRequest { index, signature }).await?;
    let _ = send.finish();

    // The whole file is bounded in time: its size at the least rate.
    let size = match entry.kind {
        Kind::File { size, .. } => size,
        _ => 0,
    };
    let stage = wire::Stage::new(format!("file {}", entry.path), size);
    let (tx, rx) = mpsc::channel::<Message>(2);
    let writer =
        tokio::task::spawn_blocking(move || write_file(&replica, &entry, map.as_deref(), rx));
    let reading = async {
        loop {
            let msg = tokio::select! {
                m = stage.expect(&mut recv, "file content") => m?,
                // the writer gave up: its error is the one to report
                () = tx.closed() => return Ok(()),
            };
            activity.touch();
            let end = matches!(msg, Message::FileEnd { .. });
            if !matches!(
                msg,
                Message::Literal(_) | Message::Delta(_) | Message::FileEnd { .. }
            ) {
                bail!("expected file content, got {msg:?}");
            }
            if tx.send(msg).await.is_err() || end {
                return Ok(());
            }
        }
    }
    .await;
    // The writer ends (committing or removing its temp file) before we return;
    // its error names the entry and the cause, so it comes first.
    drop(tx);
    let written = writer.await?;
    let written = written?;
    reading?;
    Ok(written)
}
pub(super) fn write_file(
    replica: &Replica,
    entry: &Entry,
    basis: Option<&[u8]>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<Option<(u64, u64)>> {
    let Kind::File {
        size: want_size,
        hash: want_hash,
    } = entry.kind
    else {
        bail!("{}: content for a {}", entry.path, entry.kind.name());
    };
    // A file that changed at the source since it was scanned is not installed
    // with the scan's metadata: it is left as it was and the next round sends it.
    let changed = |why: String| {
        replica.warn(format!("{}: changed at the source during transfer ({why}); left as it was, sent again next round", entry.path));
        Ok(None)
    };
    let mut staged = replica.stage(&entry.path)?;
    let (mut literal, mut matched) = (0u64, 0u64);
    let mut out = Vec::new();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Message::Literal(data) => {
                literal += data.len() as u64;
                staged.write(&data)?;
            }
            Message::Delta(d) => {
                let base = basis.ok_or_else(|| anyhow!("{}: delta without a basis", entry.path))?;
                out.clear();
                delta::apply_delta(base, &d, &mut out, delta::WINDOW)
                    .map_err(|e| anyhow!("{}: {e}", entry.path))?;
                let lit = (d.len() as u64).min(out.len() as u64);
                literal += lit;
                matched += out.len() as u64 - lit;
                staged.write(&out)?;
            }
            Message::FileEnd { size, hash } => {
                if size != staged.len() {
                    bail!(
                        "{}: source announced {size} bytes, {} arrived",
                        entry.path,
                        staged.len()
                    );
                }
                if size != want_size || hash != want_hash {
                    return changed(format!("{size} bytes now, {want_size} when scanned"));
                }
                staged.commit(&hash, &entry.meta)?;
                return Ok(Some((literal, matched)));
            }
            other => bail!("unexpected {other:?}"),
        }
        if staged.len() > want_size {
            return changed(format!("more than the {want_size} bytes scanned"));
        }
    }
    bail!("{}: stream ended before the file was complete", entry.path)
}
