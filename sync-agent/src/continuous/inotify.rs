//! The inotify bridge: notify's events turned into dirty paths and renames,
//! without the noise of the databases' own connections.

use super::*;

impl Watch {
    /// The instant of the first event since the last call, if any.
    pub(super) fn take_first(&self) -> Option<Instant> {
        match self.first.swap(0, Ordering::SeqCst) {
            0 => None,
            n => Some(self.base + Duration::from_nanos(n - 1)),
        }
    }

    /// Notes the first pending event's instant in `lag` (call before draining
    /// `rx`).
    pub(super) fn note(&self, lag: &mut LagTracker<RelPath>) {
        if let Some(t) = self.take_first() {
            lag.seen(t);
        }
    }
}

/// Now, as ns after `base` plus one (0 stands for never).
fn since(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

/// The watcher's callback is quiet this long: what setting it up raised is read.
const SETUP_QUIET: Duration = Duration::from_millis(30);

/// At most this long is waited for that.
const SETUP_WAIT: Duration = Duration::from_secs(1);

impl Watch {
    /// Waits until the watcher has read what setting it up raised, then
    /// forgets the full rescan it asked for (an overflow of the kernel's
    /// queue; a watch error also leaves the folder polled). notify adds the
    /// watches first and reads their events after (its own walk opens every
    /// directory), so a tree of ten to twenty thousand directories or more
    /// overflows the queue (16,384 events by default) before a single event
    /// is read (the `large` bench corpus, 16,800 directories, did); that
    /// overflow, read after the first full round had begun, asked for a
    /// second full round of the whole tree at every start. Whatever it dropped happened before the first full round's
    /// scan, which sees it. A watcher still busy after [`SETUP_WAIT`] keeps
    /// its overflow (a second round, as before).
    pub(super) async fn settle_setup(&self) {
        let started = Instant::now();
        loop {
            // (the setup's events are read only once it is done: no event
            // yet is no quiet, and none before this wait began counts)
            let quiet = match self.last.load(Ordering::SeqCst) {
                0 => started.elapsed(),
                n => self
                    .base
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(n - 1))
                    .min(started.elapsed()),
            };
            if quiet >= SETUP_QUIET || started.elapsed() >= SETUP_WAIT {
                break;
            }
            tokio::time::sleep(SETUP_QUIET - quiet).await;
        }
        if self.rescan.swap(false, Ordering::SeqCst) {
            tracing::debug!(
                "a full rescan asked for while the watches were set up (an overflow of the \
                 kernel's queue, a watch error): the first full round scans after it"
            );
        }
    }
}

/// Whether an event on `path` is one a held database's connections raise by
/// being opened and closed (ours at every cut included), rather than a sign
/// of a commit: a commit writes the log (WAL) or the database file (rollback
/// journal), and a replacement creates, removes or renames the database
/// file; closes, `-shm` traffic and side files coming and going say nothing.
pub(super) fn connection_noise(
    root: &Path,
    dbs: &sync_core::scan::DbDetect,
    ev: &notify::Event,
) -> bool {
    use notify::event::ModifyKind;
    let held = |p: &RelPath| dbs.known.read().is_ok_and(|k| k.contains(p));
    !ev.need_rescan()
        && !ev.paths.is_empty()
        && ev.paths.iter().all(|path| {
            let Some(rel) = rel(root, path) else {
                return false;
            };
            let Some((dir, name)) = rel.split_last() else {
                return false;
            };
            match sync_core::sqlite::sidecar_base(name).and_then(|b| dir.join(b).ok()) {
                Some(base) if held(&base) => {
                    !(name.ends_with(b"-wal")
                        && matches!(
                            ev.kind,
                            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any)
                        ))
                }
                Some(_) => false,
                None => held(&rel) && matches!(ev.kind, EventKind::Access(_)),
            }
        })
}

pub(super) fn start_watch(
    root: &Path,
    status: &SharedStatus,
    dbs: Option<Arc<sync_core::scan::DbDetect>>,
) -> Result<Watch> {
    let (tx, rx) = mpsc::channel::<WatchMsg>(16384);
    let mut coalesce = Coalesce::default();
    let wake = Arc::new(Notify::new());
    let rescan = Arc::new(AtomicBool::new(false));
    let (first, base) = (Arc::new(AtomicU64::new(0)), Instant::now());
    let last = Arc::new(AtomicU64::new(0));
    let seen = last.clone();
    let degraded = crate::watch_limit::Degraded::default();
    let (w, r, st, f) = (wake.clone(), rescan.clone(), status.clone(), first.clone());
    let dg = degraded.clone();
    let root_dir = root.to_path_buf();
    let handler = move |res: notify::Result<notify::Event>| {
        seen.store(since(base), Ordering::SeqCst);
        match res {
            // Opens say nothing (notify watches them, and every file the
            // agent reads raises one: tens of thousands in a first round);
            // ignored before any path is looked at.
            Ok(ev) if is_open(&ev) => return,
            Ok(ev) => {
                tracing::trace!(?ev, "watch event");
                if dbs
                    .as_deref()
                    .is_some_and(|d| connection_noise(&root_dir, d, &ev))
                {
                    return;
                }
                if ev.need_rescan() {
                    tracing::warn!("inotify queue overflowed: full rescan");
                    set(&st, |s| {
                        s.watcher = Some("kernel event queue overflowed; rescanned".into())
                    });
                    r.store(true, Ordering::SeqCst);
                } else {
                    use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
                    let msg = match ev.kind {
                        // our own reads raise open/close events: only a closed writer matters
                        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                            Some(WatchMsg::Paths(ev.paths, false))
                        }
                        EventKind::Create(_)
                        | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                            Some(WatchMsg::Paths(ev.paths, true))
                        }
                        EventKind::Access(_) => None,
                        EventKind::Modify(ModifyKind::Name(RenameMode::Both))
                            if ev.paths.len() == 2 =>
                        {
                            Some(WatchMsg::Rename(ev.paths[0].clone(), ev.paths[1].clone()))
                        }
                        _ => Some(WatchMsg::Paths(ev.paths, false)),
                    };
                    let Some(m) = msg else { return };
                    let queued = tx.max_capacity() - tx.capacity();
                    if coalesce.admit(&m, queued)
                        && tx.try_send(m).is_err()
                        && !r.swap(true, Ordering::SeqCst)
                    {
                        tracing::warn!("watch event queue full: full rescan");
                    }
                }
            }
            Err(e) => {
                // Something under the root may be unwatched from now on.
                let note = crate::watch_limit::error_note(&e);
                tracing::error!("watcher: {note}");
                set(&st, |s| s.watcher = Some(note));
                dg.set();
                r.store(true, Ordering::SeqCst);
            }
        }
        let _ = f.compare_exchange(0, since(base), Ordering::SeqCst, Ordering::SeqCst);
        w.notify_one();
    };
    let watcher = watch_tree(root, handler)?;
    Ok(Watch {
        watcher,
        degraded,
        next_poll: tokio::time::Instant::now(),
        rx,
        wake,
        rescan,
        first,
        last,
        base,
    })
}

/// Whether `ev` is a file or directory being opened (no rescan asked).
fn is_open(ev: &notify::Event) -> bool {
    use notify::event::AccessKind;
    !ev.need_rescan() && matches!(ev.kind, EventKind::Access(AccessKind::Open(_)))
}

/// A recursive watch of `root` calling `handler`.
fn watch_tree(
    root: &Path,
    handler: impl notify::EventHandler,
) -> Result<notify::RecommendedWatcher> {
    // Symlinks are mirrored as links, never followed: not into the tree twice,
    // not out of it.
    let mut watcher = notify::RecommendedWatcher::new(
        handler,
        notify::Config::default().with_follow_symlinks(false),
    )
    .context("starting the inotify watcher")?;
    watcher.watch(root, RecursiveMode::Recursive).map_err(|e| {
        let hint = if matches!(&e.kind, notify::ErrorKind::MaxFilesWatch) {
            ": inotify watch limit reached: raise fs.inotify.max_user_watches"
        } else {
            ""
        };
        anyhow::anyhow!("watching {}: {e}{hint}", root.display())
    })?;
    Ok(watcher)
}

/// Drops a change message identical to the last one queued while that one
/// still waits in the queue: a large file being written raises a write event
/// per `write(2)` (131,072 for a 1 GiB `head -c`), which would fill the queue
/// and force a full rescan, whose round then carries the large file itself
/// and holds every small change behind it for seconds. Nothing is lost: the
/// last message sent is the newest in the queue, so while the queue is not
/// empty it is still there, and the path is read after it is taken out,
/// which is after the dropped event.
#[derive(Debug, Default)]
struct Coalesce {
    last: Option<Vec<PathBuf>>,
}

impl Coalesce {
    /// Whether `m` is to be queued, with `queued` messages in the queue.
    fn admit(&mut self, m: &WatchMsg, queued: usize) -> bool {
        match m {
            WatchMsg::Paths(paths, false) => {
                if queued > 0 && self.last.as_ref() == Some(paths) {
                    return false;
                }
                self.last = Some(paths.clone());
            }
            _ => self.last = None,
        }
        true
    }
}

pub(super) fn rel(root: &Path, p: &Path) -> Option<RelPath> {
    let r = p.strip_prefix(root).ok()?;
    RelPath::new(r.as_os_str().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tree large enough that setting up its watches overflows the
    /// kernel's queue: the overflow is noted, then forgotten once the setup's
    /// events are read, and a change after it is seen.
    #[tokio::test]
    async fn an_overflow_while_the_watches_are_set_up_asks_for_no_second_round() {
        let queue: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(16384);
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for i in 0..(queue + queue / 4).min(60_000) {
            std::fs::create_dir(root.join(format!("d{i}"))).unwrap();
        }
        let status = SharedStatus::default();
        let mut w = start_watch(&root, &status, None).unwrap();
        w.settle_setup().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let note = status.lock().unwrap().watcher.clone();
        assert!(
            note.is_some_and(|n| n.contains("overflowed")),
            "the setup did not overflow"
        );
        assert!(
            !w.rescan.load(Ordering::SeqCst),
            "a second full round is asked for"
        );
        while w.rx.try_recv().is_ok() {}
        std::fs::write(root.join("d7/after"), b"x").unwrap();
        let m = tokio::time::timeout(Duration::from_secs(5), w.rx.recv()).await;
        assert!(matches!(m, Ok(Some(WatchMsg::Paths(p, _))) if p == [root.join("d7/after")]));
    }

    #[test]
    fn a_repeated_change_is_queued_once_while_it_waits() {
        let mut c = Coalesce::default();
        let (a, b) = (PathBuf::from("/r/big"), PathBuf::from("/r/small"));
        let write = |p: &PathBuf| WatchMsg::Paths(vec![p.clone()], false);
        assert!(c.admit(&write(&a), 0));
        // still queued: the same change again is dropped
        assert!(!c.admit(&write(&a), 1));
        assert!(!c.admit(&write(&a), 5));
        // taken out of the queue: queued again
        assert!(c.admit(&write(&a), 0));
        // another path, then the first again: both queued
        assert!(c.admit(&write(&b), 1));
        assert!(c.admit(&write(&a), 2));
        // creations and renames are never dropped, and end a run
        let created = WatchMsg::Paths(vec![a.clone()], true);
        assert!(c.admit(&created, 3));
        assert!(c.admit(&created, 4));
        assert!(c.admit(&write(&a), 5));
        assert!(c.admit(&WatchMsg::Rename(a.clone(), b.clone()), 6));
        assert!(c.admit(&write(&a), 7));
    }

    /// Only plain opens are dropped unread: a closed writer, a creation and
    /// an overflow flagged on any event still count.
    #[test]
    fn only_opens_are_dropped_before_their_paths_are_read() {
        use notify::event::{AccessKind, AccessMode, CreateKind, Flag};
        let open = notify::Event::new(EventKind::Access(AccessKind::Open(AccessMode::Any)));
        assert!(is_open(&open));
        assert!(!is_open(&open.clone().set_flag(Flag::Rescan)));
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(!is_open(&notify::Event::new(closed)));
        assert!(!is_open(&notify::Event::new(EventKind::Create(
            CreateKind::File
        ))));
    }
}
