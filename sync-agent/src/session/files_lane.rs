//! The replica's files lane at a lower CPU priority than its databases.
//!
//! A round's files and its databases arrive at once, on streams of their own
//! (`replica_lanes`). On a first mirror the databases are the long pole: a
//! 1 GB database arrives on one stream and is written by one thread, while
//! sixteen streams of small files keep as many writer threads busy. Shared
//! evenly, the database got a third of a core and was still arriving, alone,
//! long after the files were in (0.6-0.7 s of a 4 s push, a core idle).
//! The files' writers therefore run on threads of their own, [`FILES_NICE`]
//! steps below the rest of the agent: the database's writer and the
//! connection that feeds it come first, and the files take the CPU they
//! leave. Nothing is starved: a nice value weighs a thread's share, it does
//! not stop it.
//!
//! The threads keep their priority for life (an agent without
//! `CAP_SYS_NICE` could not raise it back), so the files lane has a runtime
//! of its own whose blocking threads are lowered as they start; everything
//! else stays on the agent's own runtime.

use std::sync::OnceLock;
use tokio::runtime::Runtime;

/// How many steps of nice below the agent the files lane runs (CFS weighs a
/// thread ten steps lower about a tenth as much).
pub(crate) const FILES_NICE: i32 = 10;

/// The files lane's runtime (`None` when it could not be built: the files
/// then run on the agent's own blocking threads, at its priority).
static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();

/// Runs the blocking `f` on a files-lane thread.
pub(crate) fn spawn<F, R>(f: F) -> tokio::task::JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    match RUNTIME.get_or_init(build) {
        Some(rt) => rt.spawn_blocking(f),
        None => tokio::task::spawn_blocking(f),
    }
}

fn build() -> Option<Runtime> {
    let base = rustix::process::getpriority_process(None).unwrap_or(0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("files-lane")
        .on_thread_start(move || lower(base))
        .build()
        .map_err(|e| tracing::warn!("files lane at the agent's priority: {e}"))
        .ok()
}

/// Lowers the calling thread to [`FILES_NICE`] below `base`.
fn lower(base: i32) {
    let nice = base.saturating_add(FILES_NICE).min(19);
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        tracing::debug!("files lane thread at the agent's priority: {e}");
    }
}

/// Which lanes of a round are still running, to start the round's sync
/// ahead when the first of the two ends: the files' writeback then overlaps
/// what is left of the other lane, not the round's end.
#[derive(Debug)]
pub(super) struct Running {
    files: std::sync::atomic::AtomicBool,
    dbs: std::sync::atomic::AtomicBool,
}

impl Running {
    /// Both lanes running (the databases' only if the round has any).
    pub(super) fn new(dbs: bool) -> Self {
        Self {
            files: true.into(),
            dbs: dbs.into(),
        }
    }

    /// The files lane (else the databases') ended, well or not: whether
    /// the round's sync starts ahead now (it ended well and the other is
    /// still running).
    pub(super) fn ended(&self, files: bool, ok: bool) -> bool {
        use std::sync::atomic::Ordering::AcqRel;
        let (mine, other) = if files {
            (&self.files, &self.dbs)
        } else {
            (&self.dbs, &self.files)
        };
        let was = mine.swap(false, AcqRel);
        // the other's flag is read after this one is cleared: of two lanes
        // ending at once, at most one sees the other running
        was && ok && other.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice_here() -> i32 {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).expect("nice")
    }

    /// The files lane's work runs FILES_NICE below the agent; the agent's
    /// own blocking work (a database's writer) at the agent's priority.
    #[tokio::test]
    async fn the_files_lane_runs_below_the_databases() {
        let base = rustix::process::getpriority_process(None).expect("nice");
        let files = spawn(nice_here).await.expect("files lane");
        let dbs = tokio::task::spawn_blocking(nice_here)
            .await
            .expect("blocking");
        assert_eq!(files, (base + FILES_NICE).min(19));
        assert_eq!(dbs, base);
        // a second task on the lane: still lowered (threads are reused)
        assert_eq!(spawn(nice_here).await.expect("again"), files);
    }

    /// The sync starts ahead when the first lane ends well while the other
    /// runs; not when the second ends, not after a failure, not for a
    /// round with no databases.
    #[test]
    fn the_sync_starts_ahead_when_the_first_lane_ends() {
        let r = Running::new(true);
        assert!(r.ended(false, true), "databases first");
        assert!(!r.ended(true, true), "then the files: nothing running");
        let r = Running::new(true);
        assert!(r.ended(true, true), "files first");
        assert!(!r.ended(false, true));
        let r = Running::new(true);
        assert!(!r.ended(true, false), "the files failed");
        assert!(!r.ended(false, true), "the files are no longer running");
        let r = Running::new(false);
        assert!(!r.ended(true, true), "no databases");
    }
}
