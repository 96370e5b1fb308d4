//! The source's bulk lane: large files travel on streams of their own, staged
//! on the replica ahead of the round that carries them, so rounds of small
//! changes and database cuts never queue behind a large transfer.
//!
//! [`Lane`] decides, with the clock passed in: a large regular file (at least
//! [`BULK_SIZE`]) whose content changed is held out of the round (it stays
//! pending in the lag) and sent by a job ([`spawn_job`]); once the replica has
//! staged it, and the file is still what was sent (same stamp), the next round
//! carries its entry, with the hash the job computed (no second read), and the
//! replica installs the staged copy with that round's renames: atomic, in the
//! round's order among renames and deletions. A file still being written is
//! held first (hot-file deferral); one that changed while it was sent is sent
//! again; a failed job is retried after [`RETRY`]. Databases never take this
//! lane (they travel as cuts), and nor do full rounds, which carry everything.

use super::*;
use crate::bwlimit::Limiter;
use crate::wire;
use anyhow::bail;
use std::collections::HashMap;
use sync_core::index::Stamp;

/// Files at least this large take the bulk lane.
pub(super) const BULK_SIZE: u64 = partial::HOT_SIZE;
/// A failed job is tried again after this long.
pub(super) const RETRY: Duration = Duration::from_secs(1);
/// Jobs at once (the replica stages at most this many; more wait).
pub(super) const PARALLEL: usize = crate::session::replica_stage::MAX_STAGING;

/// A large file's state in the lane.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Job {
    /// Queued or being sent, as it stood at `stamp`.
    Sending(Stamp),
    /// Staged on the replica as it stood at `stamp`, hashing to the hash.
    Staged(Stamp, [u8; 32]),
    /// The last try failed at this instant.
    Failed(Instant),
}

/// Where a changed path goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Route {
    /// Into the round, as any change.
    Round,
    /// Into the round, with the content staged ahead (stamp and hash).
    Staged(Stamp, [u8; 32]),
    /// Held back for a later round (pending meanwhile).
    Hold,
    /// Held back, and sent on the bulk lane now.
    Send(Stamp),
}

/// What a partial round saw of a path: its stamp (`None`: not a regular
/// file, or gone), whether it is still being written, whether it is a
/// database, and whether the replica holds the same size and mtime.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seen {
    pub(super) stamp: Option<Stamp>,
    pub(super) hot: bool,
    pub(super) database: bool,
    pub(super) unchanged: bool,
}

/// The bulk lane's state for a session.
#[derive(Debug, Clone, Default)]
pub(super) struct Lane {
    jobs: HashMap<RelPath, Job>,
}

impl Lane {
    /// Where `p` goes, seen as `s`, at `now`.
    pub(super) fn route(&self, p: &RelPath, s: &Seen, now: Instant) -> Route {
        if s.hot {
            return Route::Hold;
        }
        let Some(stamp) = s.stamp else {
            return Route::Round;
        };
        if s.database || s.unchanged || stamp.size < BULK_SIZE {
            return Route::Round;
        }
        match self.jobs.get(p) {
            Some(Job::Staged(at, hash)) if *at == stamp => Route::Staged(stamp, *hash),
            Some(Job::Sending(_)) => Route::Hold,
            Some(Job::Failed(t)) if now.saturating_duration_since(*t) < RETRY => Route::Hold,
            _ => Route::Send(stamp),
        }
    }

    /// A job for `p` as it stood at `stamp` starts.
    pub(super) fn start(&mut self, p: RelPath, stamp: Stamp) {
        self.jobs.insert(p, Job::Sending(stamp));
    }

    /// A job ended: staged as `Ok((stamp, hash))` (the stamp after the read
    /// matched the one before), or failed.
    pub(super) fn done(&mut self, p: RelPath, r: Result<(Stamp, [u8; 32])>, now: Instant) {
        let job = match r {
            Ok((stamp, hash)) => Job::Staged(stamp, hash),
            Err(e) => {
                tracing::debug!(path = %p, "bulk lane: {e:#}");
                Job::Failed(now)
            }
        };
        self.jobs.insert(p, job);
    }

    /// A round carrying `p` was applied: its stage, if any, was used.
    pub(super) fn landed(&mut self, p: &RelPath) {
        if matches!(self.jobs.get(p), Some(Job::Staged(..))) {
            self.jobs.remove(p);
        }
    }

    /// Jobs queued or being sent.
    #[cfg(test)]
    pub(super) fn sending(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| matches!(j, Job::Sending(_)))
            .count()
    }
}

/// Looks at `p` for [`Lane::route`]: a stat, hot-file deferral, the
/// database test, and what the replica holds.
pub(super) fn seen(
    root: &Path,
    p: &RelPath,
    opts: &ScanOptions,
    known: &Known,
    since: Option<&Instant>,
    clock: partial::Clock,
) -> Seen {
    let hot = partial::still_hot(root, p, since, clock.now, clock.now_ns);
    let st = std::fs::symlink_metadata(sync_core::scan::abs(root, p)).ok();
    let stamp = st.filter(|m| m.is_file()).map(|m| Stamp::of(&m));
    let database = stamp.is_some_and(|s| {
        s.size >= BULK_SIZE
            && opts
                .databases
                .as_ref()
                .is_some_and(|d| d.is_db(root, p, s.size, (s.dev, s.ino)))
    });
    let unchanged = stamp.is_some_and(|s| match known.get(p) {
        Some(Entry {
            kind: Kind::File { size, .. },
            meta,
            ..
        }) => {
            *size == s.size
                && i128::from(meta.mtime_sec) * 1_000_000_000 + i128::from(meta.mtime_nsec)
                    == s.mtime_ns
        }
        _ => false,
    });
    Seen {
        stamp,
        hot,
        database,
        unchanged,
    }
}

/// The entry of a file staged ahead, with the hash the job computed (the
/// stamp is the same, so the content is what was sent).
pub(super) fn staged_entry(
    root: &Path,
    p: &RelPath,
    opts: &ScanOptions,
    stamp: Stamp,
    hash: [u8; 32],
) -> Result<Option<Entry>> {
    let mut ix = HashIndex::in_memory();
    // Not the folder's index: this hash holds for this stamp only because the
    // job read the file between two equal stats, after it had been quiet.
    ix.record(p, stamp, hash, i128::MAX);
    Ok(sync_core::scan::entry_at(root, p, opts, Some(&ix))?.0)
}

/// What a job reports: the path, and its stamp and hash once staged.
pub(super) type JobDone = (RelPath, Result<(Stamp, [u8; 32])>);

/// Sends `p` (as it stood at `stamp`) to be staged on the replica, on a
/// stream of its own under the session's `bwlimit`; reports on `done`.
pub(super) fn spawn_job(
    jobs: &mut tokio::task::JoinSet<()>,
    conn: quinn::Connection,
    root: PathBuf,
    (p, stamp): (RelPath, Stamp),
    limit: Option<Limiter>,
    done: mpsc::UnboundedSender<JobDone>,
) {
    jobs.spawn(crate::bwlimit::scope(limit, async move {
        let r = send_stage(&conn, &root, &p, stamp).await;
        let _ = done.send((p, r));
    }));
}

async fn send_stage(
    conn: &quinn::Connection,
    root: &Path,
    p: &RelPath,
    stamp: Stamp,
) -> Result<(Stamp, [u8; 32])> {
    let (mut send, mut recv) = conn.open_bi().await.context("opening a bulk stream")?;
    let msg = Message::StageFile {
        path: p.clone(),
        size: stamp.size,
    };
    wire::send(&mut send, &msg).await?;
    let signature = match wire::expect_soon(&mut recv, "the replica's basis").await? {
        Message::StageBasis { signature } => signature,
        Message::Error { message, .. } => bail!("{p}: the replica refused to stage it: {message}"),
        other => bail!("{p}: expected a basis, got {}", other.name()),
    };
    let path = sync_core::scan::abs(root, p);
    let (tx, mut rx) = mpsc::channel::<Message>(2);
    let progress = Arc::new(crate::session::Progress::default());
    let reader = tokio::task::spawn_blocking(move || {
        crate::session::source::encode_file(&path, (signature, None), tx, &progress)
    });
    let mut end = None;
    while let Some(msg) = rx.recv().await {
        if let Message::FileEnd { size, hash } = &msg {
            end = Some((*size, *hash));
        }
        wire::send(&mut send, &msg).await?;
    }
    reader.await??;
    let (size, hash) = end.ok_or_else(|| anyhow::anyhow!("{p}: no end sent"))?;
    let after = std::fs::symlink_metadata(sync_core::scan::abs(root, p))
        .map(|m| Stamp::of(&m))
        .with_context(|| format!("{p}: stat after sending"))?;
    match wire::expect_soon(&mut recv, "the replica's stage").await? {
        Message::Staged { size: s, hash: h } if (s, h) == (size, hash) => {}
        Message::Error { message, .. } => bail!("{p}: the replica did not stage it: {message}"),
        other => bail!("{p}: expected the stage, got {}", other.name()),
    }
    let _ = send.finish();
    if after != stamp || size != stamp.size {
        bail!("{p}: changed while it was sent");
    }
    Ok((stamp, hash))
}

use proto::Message;

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(size: u64, mtime_ns: i128) -> Stamp {
        Stamp {
            dev: 1,
            ino: 2,
            size,
            mtime_ns,
            ctime_ns: mtime_ns,
        }
    }

    fn seen(s: Option<Stamp>) -> Seen {
        Seen {
            stamp: s,
            hot: false,
            database: false,
            unchanged: false,
        }
    }

    fn p(s: &str) -> RelPath {
        RelPath::new(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn small_files_databases_and_unchanged_content_go_with_the_round() {
        let (lane, now) = (Lane::default(), Instant::now());
        let small = stamp(BULK_SIZE - 1, 1);
        assert_eq!(lane.route(&p("a"), &seen(Some(small)), now), Route::Round);
        let big = stamp(BULK_SIZE, 1);
        let db = Seen {
            database: true,
            ..seen(Some(big))
        };
        assert_eq!(lane.route(&p("a.db"), &db, now), Route::Round);
        let chmod = Seen {
            unchanged: true,
            ..seen(Some(big))
        };
        assert_eq!(lane.route(&p("b"), &chmod, now), Route::Round);
        // gone, a directory: the round says so
        assert_eq!(lane.route(&p("c"), &seen(None), now), Route::Round);
    }

    #[test]
    fn a_large_change_is_held_sent_then_carried_with_its_staged_hash() {
        let (mut lane, now) = (Lane::default(), Instant::now());
        let path = p("media/big.mkv");
        let s1 = stamp(1 << 30, 10);
        // still being written: held, nothing sent
        let hot = Seen {
            hot: true,
            ..seen(Some(s1))
        };
        assert_eq!(lane.route(&path, &hot, now), Route::Hold);
        // quiet: sent on the lane, held from the round meanwhile
        assert_eq!(lane.route(&path, &seen(Some(s1)), now), Route::Send(s1));
        lane.start(path.clone(), s1);
        assert_eq!(lane.sending(), 1);
        assert_eq!(lane.route(&path, &seen(Some(s1)), now), Route::Hold);
        // staged: the next round carries it with the job's hash
        lane.done(path.clone(), Ok((s1, [9; 32])), now);
        assert_eq!(lane.sending(), 0);
        assert_eq!(
            lane.route(&path, &seen(Some(s1)), now),
            Route::Staged(s1, [9; 32])
        );
        // changed since: sent again, not carried with a stale hash
        let s2 = stamp(1 << 30, 11);
        assert_eq!(lane.route(&path, &seen(Some(s2)), now), Route::Send(s2));
        // landed: forgotten
        lane.landed(&path);
        assert_eq!(lane.route(&path, &seen(Some(s1)), now), Route::Send(s1));
    }

    #[test]
    fn a_failed_job_is_retried_after_a_pause() {
        let (mut lane, t0) = (Lane::default(), Instant::now());
        let path = p("big");
        let s = stamp(BULK_SIZE * 2, 5);
        lane.start(path.clone(), s);
        lane.done(path.clone(), Err(anyhow::anyhow!("stream reset")), t0);
        assert_eq!(lane.route(&path, &seen(Some(s)), t0), Route::Hold);
        let later = t0 + RETRY;
        assert_eq!(lane.route(&path, &seen(Some(s)), later), Route::Send(s));
        // a landed round does not forget a job that is not staged
        lane.start(path.clone(), s);
        lane.landed(&path);
        assert_eq!(lane.sending(), 1);
    }
}
