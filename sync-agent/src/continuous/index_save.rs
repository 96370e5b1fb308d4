//! The source's hash index, saved on a blocking thread while a round goes:
//! it is a cache (a failed save is told, not fatal: the next one writes it
//! whole again), and a first full round's 30,000 rows took 23-30 ms that
//! the replica spent waiting for the round.

use super::*;

/// Starts saving the index.
pub(super) fn save_index(ix: &Arc<Mutex<HashIndex>>) -> tokio::task::JoinHandle<Result<()>> {
    let ix = ix.clone();
    tokio::task::spawn_blocking(move || match ix.lock() {
        Ok(mut i) => i.save().map_err(anyhow::Error::from),
        Err(_) => Err(anyhow::anyhow!("index lock poisoned")),
    })
}

/// Waits for a save [`save_index`] started; tells one that failed.
pub(super) async fn index_saved(folder: &str, saving: tokio::task::JoinHandle<Result<()>>) {
    match saving.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(folder, "saving the hash index: {e:#}"),
        Err(e) => tracing::warn!(folder, "saving the hash index: {e}"),
    }
}
