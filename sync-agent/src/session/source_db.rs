//! The source side of a session: a round's databases, served as pages of its cut.

use super::Progress;
use crate::wire;
use anyhow::{Result, anyhow};
use proto::exchange::{DbGeometry, HashCollector, pages_per_batch};
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
    let mut sent = 0u64;
    for chunk in wanted.chunks(pages_per_batch(db.page_size)) {
        let (l, path, chunk) = (live.clone(), path.clone(), chunk.to_vec());
        let batch = tokio::task::spawn_blocking(move || -> Result<Vec<(u32, Vec<u8>)>> {
            let l = l
                .lock()
                .map_err(|_| anyhow!("live database set poisoned"))?;
            chunk
                .into_iter()
                .map(|p| Ok((p, l.page(&path, p)?)))
                .collect()
        })
        .await??;
        sent += batch.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        wire::send(&mut send, &Message::DbPages(batch)).await?;
    }
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

pub(super) fn lock_live(l: &Mutex<LiveSet>) -> Result<std::sync::MutexGuard<'_, LiveSet>> {
    l.lock().map_err(|_| anyhow!("live database set poisoned"))
}
