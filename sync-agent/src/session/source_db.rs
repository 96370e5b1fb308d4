//! The source side of a session: a round's databases, served as pages of its cut.

use super::Progress;
use crate::wire;
use anyhow::{Result, anyhow};
use proto::exchange::{DbGeometry, HashCollector, page_messages, pages_per_batch};
use proto::{Message, RelPath};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use sync_core::sqlite::{LiveSet, Need};

/// Brings a replica's database to the round's snapshot: the pages changed since
/// the cut it holds, or, when its state is unknown, those whose hashes differ.
pub(super) async fn serve_db(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    (path, db): (RelPath, DbGeometry),
    have: [u8; 32],
    live: Arc<Mutex<LiveSet>>,
    progress: Arc<Progress>,
) -> Result<()> {
    let need = lock_live(&live)?.need(&path, &have);
    let wanted: Vec<u32> = match need {
        Need::Nothing => Vec::new(),
        Need::Pages(p) => p,
        Need::Hashes => {
            wire::send(&mut send, &Message::DbNeedHashes).await?;
            // A replica holds at most MAX_DB_PAGES pages: more batches than
            // that takes are refused, not read forever.
            let mut hashes = HashCollector::new(db.pages);
            let (their_size, theirs) = loop {
                let msg = wire::expect_soon(&mut recv, "page hashes").await?;
                if let Some(done) = hashes.handle(msg).map_err(|e| anyhow!("{path}: {e}"))? {
                    break done;
                }
            };
            lock_live(&live)?.differing(&path, their_size, &theirs)
        }
    };
    let sent = send_pages(&mut send, &live, &path, db.page_size, wanted).await?;
    progress.bytes_done.fetch_add(sent, Ordering::Relaxed);
    wire::send(
        &mut send,
        &Message::DbEnd {
            page_size: db.page_size,
            pages: db.pages,
            hash: db.hash,
        },
    )
    .await?;
    send.finish()?;
    let _ = send.stopped().await;
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Sends the pages `wanted` of the cut of `path`, read on a blocking thread
/// while the runs before them are on the wire; the bytes sent. Long runs of
/// consecutive pages travel as [`Message::DbRun`]s (a buffer read at once,
/// sent and written as it is), pages here and there together
/// ([`page_messages`]).
async fn send_pages(
    send: &mut quinn::SendStream,
    live: &Arc<Mutex<LiveSet>>,
    path: &proto::RelPath,
    page_size: u32,
    wanted: Vec<u32>,
) -> Result<u64> {
    // Batches are small next to the
    // stream's flow-control window, so several are in flight at once.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(u32, Vec<u8>)>>(4);
    let budget = pages_per_batch(page_size);
    let (l, path) = (live.clone(), path.clone());
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        for chunk in wanted.chunks(budget) {
            let runs = lock_live(&l)?.runs(&path, chunk)?;
            if tx.blocking_send(runs).is_err() {
                break;
            }
        }
        Ok(())
    });
    let mut sent = 0u64;
    while let Some(runs) = rx.recv().await {
        sent += runs.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        for m in page_messages(page_size, runs) {
            if let Err(e) = wire::send(send, &m).await {
                drop(rx);
                let _ = reader.await;
                return Err(e);
            }
        }
    }
    reader.await??;
    Ok(sent)
}

pub(super) fn lock_live(l: &Mutex<LiveSet>) -> Result<std::sync::MutexGuard<'_, LiveSet>> {
    l.lock().map_err(|_| anyhow!("live database set poisoned"))
}
