//! The source side of a session: a round's databases, served as pages of its cut.

use super::Progress;
use crate::wire;
use anyhow::{Result, anyhow, bail};
use proto::{Entry, Kind, Message};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use sync_core::sqlite::{LiveSet, Need};

/// Brings a replica's database to the round's snapshot: the pages changed since
/// the cut it holds, or, when its state is unknown, those whose hashes differ.
pub(super) async fn serve_db(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    entry: Entry,
    have: [u8; 32],
    live: Arc<Mutex<LiveSet>>,
    progress: Arc<Progress>,
) -> Result<()> {
    let Kind::Database {
        page_size,
        pages,
        hash,
    } = entry.kind
    else {
        bail!(
            "replica asked for {} as a database; it is a {}",
            entry.path,
            entry.kind.name()
        );
    };
    let need = lock_live(&live)?.need(&entry.path, &have);
    let wanted: Vec<u32> = match need {
        Need::Nothing => Vec::new(),
        Need::Pages(p) => p,
        Need::Hashes => {
            wire::send(&mut send, &Message::DbNeedHashes).await?;
            let mut theirs: Vec<[u8; 32]> = Vec::new();
            // A replica holds at most MAX_DB_PAGES pages: more batches than
            // that takes are refused, not read forever.
            let most = (proto::MAX_DB_PAGES as usize).div_ceil(proto::MAX_HASHES_PER_BATCH) + 1;
            let mut batches = 0usize;
            let their_size = loop {
                match wire::expect_soon(&mut recv, "page hashes").await? {
                    Message::DbHashes {
                        page_size: ps,
                        hashes,
                        last,
                    } => {
                        batches += 1;
                        if batches > most {
                            bail!(
                                "replica sent more than {most} batches of page hashes for {} (at most {} pages)",
                                entry.path,
                                proto::MAX_DB_PAGES
                            );
                        }
                        // beyond our page count they do not matter: not kept
                        let room = (pages as usize).saturating_sub(theirs.len());
                        theirs.extend(hashes.into_iter().take(room));
                        if last {
                            break ps;
                        }
                    }
                    other => bail!("expected page hashes for {}, got {other:?}", entry.path),
                }
            };
            lock_live(&live)?.differing(&entry.path, their_size, &theirs)
        }
    };
    let sent = send_pages(&mut send, &live, &entry.path, page_size, wanted).await?;
    progress.bytes_done.fetch_add(sent, Ordering::Relaxed);
    wire::send(
        &mut send,
        &Message::DbEnd {
            page_size,
            pages,
            hash,
        },
    )
    .await?;
    send.finish()?;
    let _ = send.stopped().await;
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Sends the pages `wanted` of the cut of `path`, read on a blocking thread
/// while the batches before them are on the wire; the bytes sent.
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
    let budget =
        (PAGE_BATCH_BYTES / page_size.max(512) as usize).clamp(1, proto::MAX_PAGES_PER_BATCH);
    let (l, path) = (live.clone(), path.clone());
    let reader = tokio::task::spawn_blocking(move || -> Result<()> {
        for chunk in wanted.chunks(budget) {
            let batch = {
                let l = lock_live(&l)?;
                chunk
                    .iter()
                    .map(|&p| Ok((p, l.page(&path, p)?)))
                    .collect::<Result<Vec<_>>>()?
            };
            if tx.blocking_send(batch).is_err() {
                break;
            }
        }
        Ok(())
    });
    let mut sent = 0u64;
    while let Some(batch) = rx.recv().await {
        sent += batch.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        if let Err(e) = wire::send(send, &Message::DbPages(batch)).await {
            drop(rx);
            let _ = reader.await;
            return Err(e);
        }
    }
    reader.await??;
    Ok(sent)
}

/// Page bytes per `DbPages` frame: a fraction of the stream's flow-control
/// window, so that batches stream rather than stop and wait.
const PAGE_BATCH_BYTES: usize = 256 << 10;

pub(super) fn lock_live(l: &Mutex<LiveSet>) -> Result<std::sync::MutexGuard<'_, LiveSet>> {
    l.lock().map_err(|_| anyhow!("live database set poisoned"))
}
