//! The source's hash index, saved on a blocking thread while a round goes
//! (the agents' rounds, a push): it is a cache (a failed save is told, not
//! fatal: the next one writes it whole again), and a first round's 30,000
//! rows took 23-30 ms that the replica spent waiting for the round.

use anyhow::Result;
use std::sync::{Arc, Mutex};
use sync_core::index::HashIndex;

/// Starts saving the index.
pub(crate) fn save_index(ix: &Arc<Mutex<HashIndex>>) -> tokio::task::JoinHandle<Result<()>> {
    let ix = ix.clone();
    tokio::task::spawn_blocking(move || match ix.lock() {
        Ok(mut i) => i.save().map_err(anyhow::Error::from),
        Err(_) => Err(anyhow::anyhow!("index lock poisoned")),
    })
}

/// Waits for a save [`save_index`] started; tells one that failed.
pub(crate) async fn index_saved(folder: &str, saving: tokio::task::JoinHandle<Result<()>>) {
    match saving.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(folder, "saving the hash index: {e:#}"),
        Err(e) => tracing::warn!(folder, "saving the hash index: {e}"),
    }
}
