//! The replica side of a session: many small files pulled on one stream
//! (`FilesRequest`), read off it one after another and written by one
//! blocking task, instead of a stream, a request and a task each.

use super::replica::Activity;
use super::replica_fetch::{End, changed_text, commit_end};
use crate::wire;
use anyhow::{Context, Result, bail};
use proto::exchange::{BatchFetch, BatchStep, Changed};
use proto::{Entry, Kind, Message};
use std::sync::Arc;
use sync_core::apply::Replica;
use tokio::sync::mpsc;

/// Most files pulled on one stream (at most [`proto::MAX_BATCH_FILES`]).
pub(super) const BATCH_FILES: usize = 128;
/// A batch is sent once its files' sizes reach this.
pub(super) const BATCH_BYTES: u64 = 1 << 20;
/// Files whose content waits for the writer, read but not yet written.
const QUEUED: usize = 4;

/// What pulling content brought: files installed, bytes that crossed as
/// literal data, bytes rebuilt from a basis.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Got {
    pub files: u64,
    pub literal: u64,
    pub matched: u64,
}

/// One file's content and end as the writer takes them, or why it is left
/// as it was.
type Content = std::result::Result<(Vec<u8>, End), Changed>;

/// Pulls the small regular files `files` (entries of the round with their
/// indexes in it, none with a basis) on one stream: each staged (a path the
/// replica refuses fails before its content is awaited), its content read as
/// [`BatchFetch`] admits it and handed to the writer whole, committed with
/// its entry's metadata. A file that changed at the source is left as it was.
pub(super) async fn fetch_batch(
    conn: quinn::Connection,
    replica: Arc<Replica>,
    files: Vec<(Entry, u64)>,
    activity: Activity,
) -> Result<Got> {
    let mut expect = Vec::with_capacity(files.len());
    for (e, _) in &files {
        let Kind::File { size, hash } = e.kind else {
            bail!("{}: content for a {}", e.path, e.kind.name());
        };
        expect.push((e.path.clone(), size, hash));
    }
    let total = expect.iter().map(|(_, s, _)| *s).sum();
    let indexes = files.iter().map(|(_, i)| *i).collect();
    let entries: Vec<Entry> = files.into_iter().map(|(e, _)| e).collect();
    let first = expect
        .first()
        .map(|(p, _, _)| p.to_string())
        .unwrap_or_default();
    let stage = wire::Stage::new(format!("{} files from {first}", entries.len()), total);
    let (mut send, mut recv) = conn.open_bi().await.context("opening a files stream")?;
    wire::send(&mut send, &Message::FilesRequest { indexes }).await?;
    let _ = send.finish();
    let (tx, rx) = mpsc::channel::<Content>(QUEUED);
    let writer = super::files_lane::spawn(move || write_batch(&replica, &entries, rx));
    let mut fetch = BatchFetch::new(expect);
    let reading = async {
        let mut data = Vec::new();
        let mut what = (usize::MAX, String::new());
        let named =
            |f: &BatchFetch, at: usize| f.path(at).map(|p| p.to_string()).unwrap_or_default();
        while !fetch.done() {
            if what.0 != fetch.position() {
                let at = fetch.position();
                what = (at, format!("the rest of {}", named(&fetch, at)));
            }
            let msg = tokio::select! {
                m = stage.expect(&mut recv, &what.1) => m?,
                // the writer gave up: its error is the one to report
                () = tx.closed() => return Ok(()),
            };
            activity.touch();
            let at = fetch.position();
            let (_, step) = match fetch.handle(msg) {
                Ok(s) => s,
                Err(e) => bail!("{}: {e}", named(&fetch, at)),
            };
            let done = match step {
                BatchStep::Literal(d) => {
                    data.extend_from_slice(&d);
                    continue;
                }
                BatchStep::Commit { hash, scanned } => {
                    Ok((std::mem::take(&mut data), (hash, scanned)))
                }
                BatchStep::Changed(why) => {
                    data.clear();
                    Err(why)
                }
            };
            if tx.send(done).await.is_err() {
                return Ok(());
            }
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    drop(tx);
    // The writer ends (each file committed or its temp file removed) before
    // we return; a failure of its own names the file and comes first.
    let written = writer.await??;
    reading.with_context(|| format!("files stream from the source ({first} first)"))?;
    Ok(written)
}

/// Stages, writes and commits each file of a batch in order as its content
/// arrives (see [`fetch_batch`]).
fn write_batch(
    replica: &Replica,
    entries: &[Entry],
    mut rx: mpsc::Receiver<Content>,
) -> Result<Got> {
    let mut got = Got::default();
    for e in entries {
        let mut staged = replica.stage(&e.path)?;
        // the reader gave up: its error is the one reported
        let Some(content) = rx.blocking_recv() else {
            return Ok(got);
        };
        match content {
            Ok((data, end)) => {
                staged.write(&data)?;
                if commit_end(replica, staged, end, (&e.path, &e.meta))? {
                    got.files += 1;
                    got.literal += data.len() as u64;
                }
            }
            Err(why) => replica.warn(changed_text(&e.path, why)),
        }
    }
    Ok(got)
}
