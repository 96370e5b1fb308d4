//! The inotify bridge: the watcher's events turned into dirty paths and renames,
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
    let degraded = crate::watch_limit::Degraded::default();
    let (w, r, st, f) = (wake.clone(), rescan.clone(), status.clone(), first.clone());
    let dg = degraded.clone();
    let root_dir = root.to_path_buf();
    let handler = move |res: notify::Result<notify::Event>| {
        match res {
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
        base,
    })
}

/// The watcher of `root` calling `handler`: the root only, until a scan
/// lists the directories below it ([`TreeWatcher::dir_hook`]).
fn watch_tree(root: &Path, handler: impl notify::EventHandler) -> Result<TreeWatcher> {
    // Symlinks are mirrored as links, never followed: not into the tree twice,
    // not out of it (the watcher never follows one).
    let mut watcher = TreeWatcher::new(handler, notify::Config::default())
        .context("starting the inotify watcher")?;
    watcher
        .watch(root, RecursiveMode::NonRecursive)
        .map_err(|e| {
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
}
