//! Where a replica keeps its databases' page tables between processes
//! ([`sync_core::apply::Replica::keep_tables_in`]), and when it saves them.
//!
//! A fresh process would otherwise read and hash every database it holds
//! before it can offer its quick digest (a 1 GB database: seconds). The
//! tables live beside the replica's other private state: a configured
//! folder's in `{state}/{folder}.pages` (`[node] state`, or `sync-agent
//! replica --state`), `mirror`'s destination's in its `--state-dir` as
//! `replica-{key of the destination's path}.pages`. They are saved when a
//! session ends and, during a long session, at most once a
//! [`SAVE_EVERY`] after a round (not on every round of a continuous
//! session); a save that would change nothing writes nothing.

use super::replica::ReplicaFolder;
use anyhow::{Context as _, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use sync_core::apply::Replica;

/// A long session saves its tables at most this often.
pub const SAVE_EVERY: Duration = Duration::from_secs(60);

/// `{state_dir}/{folder}.pages`.
#[must_use]
pub fn file(state_dir: &Path, folder: &str) -> PathBuf {
    state_dir.join(format!("{folder}.pages"))
}

/// `{state_dir}/replica-{key}.pages`, the key derived from the canonical
/// path of `mirror`'s destination `dst` (which must exist).
pub fn mirror_file(state_dir: &Path, dst: &Path) -> Result<PathBuf> {
    use std::os::unix::ffi::OsStrExt as _;
    let canon =
        std::fs::canonicalize(dst).with_context(|| format!("destination {}", dst.display()))?;
    let key = blake3::hash(canon.as_os_str().as_bytes());
    Ok(state_dir.join(format!("replica-{}.pages", &key.to_hex()[..24])))
}

/// Saves `replica`'s tables on a blocking thread; a failure is logged (the
/// next process reads its databases again).
pub async fn save(replica: Arc<Replica>) {
    let t0 = Instant::now();
    match tokio::task::spawn_blocking(move || replica.save_tables()).await {
        Ok(Ok(written)) => {
            tracing::debug!(
                written,
                ms = t0.elapsed().as_millis(),
                "replica page tables saved"
            );
        }
        Ok(Err(e)) => tracing::warn!("{e}: the next start reads the replica's databases again"),
        Err(e) => tracing::warn!("saving the replica's page tables: {e}"),
    }
}

/// After a round of a session whose tables were last saved at `last`: a
/// save in the background when that is [`SAVE_EVERY`] ago.
pub fn after_round(folder: &ReplicaFolder, last: &mut Instant) {
    if last.elapsed() >= SAVE_EVERY {
        *last = Instant::now();
        tokio::spawn(save(folder.replica.clone()));
    }
}
