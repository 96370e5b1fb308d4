//! The replica side of a session: fetching and staging a round's files and databases.

use super::replica::*;
use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::exchange::{DbFetch, DbGeometry, DbStep, FileFetch, FileStep};
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
    let Some(db) = DbGeometry::of(&entry) else {
        bail!("{}: not a database", entry.path);
    };
    let (r, p) = (replica.clone(), entry.path.clone());
    let t0 = std::time::Instant::now();
    let (table, holders, linked) = tokio::task::spawn_blocking(move || -> Result<_> {
        Ok((r.page_table(&p)?, r.db_holders(&p), r.has_other_links(&p)?))
    })
    .await??;
    let looked = t0.elapsed();
    // A database with other names (hard links from outside the root, a
    // `cp -al` snapshot) is never written in place, its metadata included:
    // the whole image is staged and renamed over.
    let table = table.filter(|_| !linked);
    if table.as_ref().is_some_and(|h| h.hash == db.hash) {
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
    let have = table.as_ref().map_or([0; 32], |h| h.hash);
    wire::send(&mut send, &Message::DbRequest { index, have }).await?;
    let (tx, rx) = mpsc::channel::<DbStep>(4);
    let (r, e, base) = (replica.clone(), entry.clone(), table.clone());
    let writer = tokio::task::spawn_blocking(move || write_db(&r, &e, db, base, rx));
    // The whole database is bounded in time: its size at the least rate.
    let stage = wire::Stage::new(
        format!("database {}", entry.path),
        u64::from(db.page_size) * u64::from(db.pages),
    );
    let mut fetch = DbFetch::new(db);
    let mut hashes_asked = false;
    let reading = async {
        loop {
            let msg = tokio::select! {
                m = stage.expect(&mut recv, "database pages") => m?,
                // the writer gave up: its error is the one to report
                () = tx.closed() => return Ok(()),
            };
            activity.touch();
            match fetch
                .handle(msg)
                .map_err(|e| anyhow!("{}: {e}", entry.path))?
            {
                DbStep::SendHashes => {
                    hashes_asked = true;
                    send_hashes(&mut send, table.as_deref()).await?;
                }
                step => {
                    let end = step == DbStep::Commit;
                    if tx.send(step).await.is_err() || end {
                        return Ok::<(), anyhow::Error>(());
                    }
                }
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
    tracing::debug!(
        db = %entry.path,
        looked_ms = looked.as_secs_f64() * 1e3,
        fetched_ms = (t0.elapsed() - looked).as_secs_f64() * 1e3,
        hashes_asked,
        "database staged"
    );
    written.map(Some)
}

/// Our page hashes, in batches, the last one marked (one empty batch for none).
pub(super) async fn send_hashes(
    send: &mut quinn::SendStream,
    table: Option<&sync_core::sqlite::PageTable>,
) -> Result<()> {
    let hashes = table.map(|h| h.hashes.as_slice()).unwrap_or(&[]);
    let page_size = table.map_or(0, |h| h.page_size);
    for m in proto::exchange::hash_batches(page_size, hashes) {
        wire::send(send, &m).await?;
    }
    Ok(())
}

/// Stages the pages of one database as [`DbFetch`] admits them and commits
/// it at its end.
pub(super) fn write_db(
    r: &Replica,
    e: &Entry,
    db: DbGeometry,
    base: Option<Arc<sync_core::sqlite::PageTable>>,
    mut rx: mpsc::Receiver<DbStep>,
) -> Result<u64> {
    let mut staged = r.stage_db(&e.path, base, db.page_size, db.pages)?;
    let mut n = 0u64;
    while let Some(step) = rx.blocking_recv() {
        match step {
            DbStep::Pages(batch) => {
                staged.pages(&batch)?;
                n += batch.len() as u64;
            }
            DbStep::Run { first, data } => {
                staged.run(first, &data)?;
                n += u64::from(
                    proto::exchange::run_pages(first, data.len(), db.page_size, db.pages)
                        .unwrap_or(0),
                );
            }
            DbStep::Commit => {
                staged.commit(&db.hash, &e.meta)?;
                return Ok(n);
            }
            DbStep::SendHashes => bail!("{}: hashes are the reader's to send", e.path),
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
        super::files_lane::spawn(move || -> Result<_> {
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
    if map.is_none() && size <= super::WHOLE_FILE {
        return fetch_small(&mut recv, &stage, replica, entry, &activity).await;
    }
    let (tx, rx) = mpsc::channel::<Message>(2);
    let writer = super::files_lane::spawn(move || write_file(&replica, &entry, map.as_deref(), rx));
    let reading = async {
        loop {
            let msg = tokio::select! {
                m = stage.expect(&mut recv, "file content") => m?,
                // the writer gave up: its error is the one to report
                () = tx.closed() => return Ok(()),
            };
            activity.touch();
            // The writer's FileFetch judges each message; the first that is
            // not content is the last one read.
            let end = !FileFetch::more_follows(&msg);
            if tx.send(msg).await.is_err() || end {
                return Ok::<(), anyhow::Error>(());
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

/// What a small file's stream brought: its content and hash, or why it is
/// left as it was; with the transfer's figures.
type Small = (
    std::result::Result<(Vec<u8>, End), proto::exchange::Changed>,
    (u64, u64),
);

/// A small file with no basis: staged at once on a blocking thread (a path
/// the replica refuses fails before any content is awaited), its content read
/// off the stream as [`FileFetch`] admits it (never past the entry's size),
/// then handed over whole: one wake of the writer, not one per frame.
async fn fetch_small(
    recv: &mut quinn::RecvStream,
    stage: &wire::Stage,
    replica: Arc<Replica>,
    entry: Entry,
    activity: &Activity,
) -> Result<Option<(u64, u64)>> {
    let (tx, rx) = tokio::sync::oneshot::channel::<Small>();
    let (path, e) = (entry.path.clone(), entry.clone());
    let mut writer = super::files_lane::spawn(move || -> Result<Option<(u64, u64)>> {
        let mut staged = replica.stage(&e.path)?;
        // the reader gave up: its error is the one reported
        let Ok((content, figures)) = rx.blocking_recv() else {
            return Ok(None);
        };
        match content {
            Ok((data, end)) => {
                staged.write(&data)?;
                let committed = commit_end(&replica, staged, end, (&e.path, &e.meta))?;
                Ok(committed.then_some(figures))
            }
            Err(why) => {
                replica.warn(changed_text(&e.path, why));
                Ok(None)
            }
        }
    });
    let read = tokio::select! {
        r = read_small(recv, stage, &entry, activity) => r,
        // ended before its content: staging failed
        w = &mut writer => return w?,
    };
    match read {
        Ok(small) => {
            let _ = tx.send(small);
            writer.await?
        }
        Err(e) => {
            drop(tx);
            writer.await??;
            Err(e).with_context(|| format!("receiving {path}"))
        }
    }
}

/// A small file's content off its stream (see [`fetch_small`]).
async fn read_small(
    recv: &mut quinn::RecvStream,
    stage: &wire::Stage,
    entry: &Entry,
    activity: &Activity,
) -> Result<Small> {
    let Kind::File { size, hash } = entry.kind else {
        bail!("{}: content for a {}", entry.path, entry.kind.name());
    };
    let named = |e: proto::exchange::ExchangeError| anyhow!("{}: {e}", entry.path);
    let mut fetch = FileFetch::new(size, hash, false);
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    let what = format!("the rest of {}", entry.path);
    let end = loop {
        let msg = stage.expect(recv, &what).await?;
        activity.touch();
        match fetch.handle(msg).map_err(named)? {
            FileStep::Literal(d) => data.extend_from_slice(&d),
            // FileFetch admits a delta only when a basis was offered.
            FileStep::Delta(_) => bail!("{}: a delta with no basis", entry.path),
            FileStep::Commit { hash, scanned } => {
                break Ok((std::mem::take(&mut data), (hash, scanned)));
            }
            FileStep::Changed(why) => break Err(why),
        }
    };
    Ok((end, fetch.figures()))
}

/// A file's end as the source sent it: the hash to commit with, and whether
/// it is the scan's (`Message::ScannedEnd`).
pub(super) type End = ([u8; 32], bool);

/// Commits `staged` (`path`'s content) with its end's hash and `meta`; `false`
/// when the end is the scan's and the content is not it: changed since the
/// scan, left as it was with a warning (under a `FileEnd` a content that is
/// not the end's hash is an error, from [`Staged::commit`]).
pub(super) fn commit_end(
    replica: &Replica,
    staged: sync_core::apply::Staged<'_>,
    (hash, scanned): End,
    (path, meta): (&proto::RelPath, &proto::Meta),
) -> Result<bool> {
    if scanned && staged.content_hash() != hash {
        replica.warn(changed_text(path, proto::exchange::Changed::Content));
        return Ok(false);
    }
    staged.commit(&hash, meta)?;
    Ok(true)
}

/// The warning for a file that changed at the source while it was sent.
pub(super) fn changed_text(path: &proto::RelPath, why: proto::exchange::Changed) -> String {
    format!(
        "{path}: changed at the source during transfer ({why}); left as it was, sent again next round"
    )
}

/// Rebuilds what `delta` describes against `basis` into `out` (cleared
/// first): the one place a file's or a stage's delta is applied.
pub(super) fn rebuild(
    path: &proto::RelPath,
    basis: &[u8],
    delta: &[u8],
    out: &mut Vec<u8>,
) -> Result<()> {
    out.clear();
    delta::apply_delta(basis, delta, out, delta::WINDOW).map_err(|e| anyhow!("{path}: {e}"))
}

/// Stages one file's content as [`FileFetch`] admits it and commits it at
/// its end (`None`: changed at the source, left as it was).
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
    let changed = |why: proto::exchange::Changed| {
        replica.warn(changed_text(&entry.path, why));
        Ok(None)
    };
    let named = |e: proto::exchange::ExchangeError| anyhow!("{}: {e}", entry.path);
    let mut fetch = FileFetch::new(want_size, want_hash, basis.is_some());
    let mut staged = replica.stage(&entry.path)?.sized(want_size);
    let mut out = Vec::new();
    while let Some(msg) = rx.blocking_recv() {
        match fetch.handle(msg).map_err(named)? {
            FileStep::Literal(data) => staged.write(&data)?,
            FileStep::Delta(d) => {
                // FileFetch admits a delta only when a basis was offered.
                rebuild(&entry.path, basis.unwrap_or_default(), &d, &mut out)?;
                if let Err(why) = fetch.produced(out.len() as u64, d.len() as u64) {
                    return changed(why);
                }
                staged.write(&out)?;
            }
            FileStep::Commit { hash, scanned } => {
                let committed =
                    commit_end(replica, staged, (hash, scanned), (&entry.path, &entry.meta))?;
                return Ok(committed.then(|| fetch.figures()));
            }
            FileStep::Changed(why) => return changed(why),
        }
    }
    fetch.stream_ended().map_err(named)?;
    bail!("{}: the file's stream ended after its end", entry.path)
}
