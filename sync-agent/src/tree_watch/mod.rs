//! The source's watcher of its tree: inotify, with the watches added by the
//! scans themselves.
//!
//! It is a [`notify::Watcher`] (notify's events and error kinds, so the
//! agent's handler reads it as it read notify's inotify backend) made for a
//! tree the agent scans anyway. notify's backend walks the whole tree before
//! the first scan (a stat of every entry, and of every directory again) and
//! watches opens, so every file the first round reads raises an event: on the
//! `large` bench corpus (30,000 files, 16,800 directories) 0.65 s of the
//! source's CPU in the first round, what made the agents' first round slower
//! than a push (benches/README.md). Here:
//! - a scan adds a directory's watch just before it lists the directory's
//!   names ([`TreeWatcher::dir_hook`] as
//!   [`sync_core::scan::ScanOptions::on_dir`]), through the descriptor it
//!   holds: a change made after the listing raises an event, one made before
//!   is in the listing, and the first round makes no walk of its own;
//! - a directory that appears later (created, moved in) is watched, with every
//!   directory below it, before its event is handed on, so the scan the event
//!   asks for misses nothing (the walk opens directories as the scan does,
//!   never through a symlink, and leaves out the folder's excludes); a
//!   directory moved away or removed loses its watches (moved out of the
//!   tree, it would go on reporting under its old path);
//! - opens and reads are not watched; writes, closes after writing,
//!   creations, removals, renames and metadata changes are;
//! - an overflow of the kernel's queue is an event flagged
//!   [`notify::event::Flag::Rescan`], as notify's, and so is a file system
//!   unmounted from under the tree (notify's backend says nothing of it).

use inotify::{EventMask, Inotify};
use notify::event::{
    AccessKind, AccessMode, CreateKind, DataChange, Flag, MetadataKind, ModifyKind, RemoveKind,
    RenameMode,
};
use notify::{Event, EventHandler, EventKind, RecursiveMode};
use rustix::fd::{AsFd, BorrowedFd};
use rustix::fs::OFlags;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use sync_core::filter::Filter;
use sync_core::scan::DirHook;
use table::{vanished, watch_error};

/// What an event does to the watches.
#[derive(Debug, PartialEq)]
enum Change {
    /// A directory appeared: it and its subdirectories are watched.
    Watch(PathBuf),
    /// A directory left: its watches and its subdirectories' go.
    Unwatch(PathBuf),
}

/// What one inotify event on `path` says, in notify's terms (the events
/// notify's inotify backend hands on for it, but opens), and what it does to
/// the watches. `from` is the last directory entry moved away, paired with
/// the entry moved in with the same cookie.
fn meaning(
    mask: EventMask,
    cookie: u32,
    path: &Path,
    from: &mut Option<(u32, PathBuf)>,
) -> (Vec<Event>, Option<Change>) {
    let dir = mask.contains(EventMask::ISDIR);
    let (created, removed) = match dir {
        true => (CreateKind::Folder, RemoveKind::Folder),
        false => (CreateKind::File, RemoveKind::File),
    };
    // a directory's change to the watches
    let of_dir = |c: fn(PathBuf) -> Change| dir.then(|| c(path.to_path_buf()));
    let on = |kind| Event::new(kind).add_path(path.to_path_buf());
    let renamed = |mode| EventKind::Modify(ModifyKind::Name(mode));
    let (mut evs, mut change) = (Vec::new(), None);
    let tracker = cookie as usize;
    if mask.contains(EventMask::MOVED_FROM) {
        evs.push(on(renamed(RenameMode::From)).set_tracker(tracker));
        *from = Some((cookie, path.to_path_buf()));
        change = of_dir(Change::Unwatch);
    } else if mask.contains(EventMask::MOVED_TO) {
        evs.push(on(renamed(RenameMode::To)).set_tracker(tracker));
        if let Some((_, old)) = from.take_if(|(c, _)| *c == cookie) {
            let both = Event::new(renamed(RenameMode::Both)).set_tracker(tracker);
            evs.push(both.add_path(old).add_path(path.to_path_buf()));
        }
        change = of_dir(Change::Watch);
    }
    if mask.contains(EventMask::MOVE_SELF) {
        evs.push(on(renamed(RenameMode::From)));
    }
    if mask.contains(EventMask::CREATE) {
        evs.push(on(EventKind::Create(created)));
        change = of_dir(Change::Watch);
    }
    if mask.contains(EventMask::DELETE) {
        evs.push(on(EventKind::Remove(removed)));
        change = of_dir(Change::Unwatch);
    }
    if mask.contains(EventMask::DELETE_SELF) {
        evs.push(on(EventKind::Remove(RemoveKind::Folder)));
    }
    if mask.contains(EventMask::MODIFY) {
        evs.push(on(EventKind::Modify(ModifyKind::Data(DataChange::Any))));
    }
    if mask.contains(EventMask::CLOSE_WRITE) {
        evs.push(on(EventKind::Access(AccessKind::Close(AccessMode::Write))));
    }
    if mask.contains(EventMask::ATTRIB) {
        evs.push(on(EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::Any,
        ))));
    }
    (evs, change)
}

/// What the watcher, its scans' hooks and its reader share.
struct Shared {
    table: Mutex<Table>,
    handler: Mutex<Box<dyn EventHandler>>,
    /// An error was handed on (or returned by a walk of the whole tree)
    /// since the tree was last watched whole: the next ones are not (past
    /// the watch limit, every directory of a scan would report one).
    failed: AtomicBool,
}

impl Shared {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hand_on(&self, evs: Vec<notify::Result<Event>>) {
        if evs.is_empty() {
            return;
        }
        let mut h = self.handler.lock().unwrap_or_else(|p| p.into_inner());
        for ev in evs {
            h.handle_event(ev);
        }
    }

    /// Hands `e` on, unless an error was since the tree was last watched whole.
    fn report(&self, e: notify::Error) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            self.hand_on(vec![Err(e)]);
        }
    }

    /// Watches `dir`, open as `fd` (a scan is about to list it). The watch
    /// is added, and a directory not watched under that name has its name
    /// checked, outside the table's lock (the scan's threads would queue on
    /// it); under it, the name is checked again if the reader changed the
    /// watches meanwhile (a rename it applied may have moved the directory).
    fn watch_dir(&self, dir: &Path, fd: BorrowedFd<'_>) {
        let outlook = self.table().outlook(dir);
        let res = match outlook {
            None => self.table().add_fd(dir, fd, false, false),
            Some((root, mut watches, known, moved)) => {
                match watches.add(table::fd_link(fd), table::mask(false)) {
                    Ok(wd) => {
                        let named = (!known).then(|| table::names(Some(&root), dir, fd));
                        let looked = table::Looked { wd, named, moved };
                        self.table().record_looked(dir, fd, looked);
                        Ok(())
                    }
                    // (again under the lock, as before: a /proc gone, an
                    // error to report)
                    Err(_) => self.table().add_fd(dir, fd, false, false),
                }
            }
        };
        match res {
            Ok(()) => {}
            Err(e) if vanished(&e) => {}
            Err(e) => self.report(watch_error(e, dir)),
        }
    }

    /// The events read in one go, their paths resolved, with the watches
    /// they add or drop changed before they are handed on.
    fn take<'a>(
        &self,
        events: impl Iterator<Item = inotify::Event<&'a std::ffi::OsStr>>,
        from: &mut Option<(u32, PathBuf)>,
    ) -> (Vec<notify::Result<Event>>, Option<notify::Error>) {
        let mut t = self.table();
        let (mut out, mut changes) = (Vec::new(), Vec::new());
        for ev in events {
            // Events lost, or a file system unmounted from under a watched
            // directory (what it hid is in the tree now, unannounced): a
            // full round.
            if ev
                .mask
                .intersects(EventMask::Q_OVERFLOW | EventMask::UNMOUNT)
            {
                out.push(Ok(Event::new(EventKind::Other).set_flag(Flag::Rescan)));
            }
            if ev.mask.contains(EventMask::Q_OVERFLOW) {
                continue;
            }
            if ev.mask.contains(EventMask::IGNORED) {
                t.ignored(&ev.wd);
                continue;
            }
            let Some(dir) = t.dirs.get(&ev.wd) else {
                continue;
            };
            let path = match ev.name {
                Some(name) => dir.join(name),
                None => dir.clone(),
            };
            let (evs, change) = meaning(ev.mask, ev.cookie, &path, from);
            out.extend(evs.into_iter().map(Ok));
            changes.extend(change);
        }
        let mut error = None;
        for c in changes {
            match c {
                Change::Unwatch(p) => {
                    t.remove_under(&p);
                }
                Change::Watch(p) => {
                    if let Err(e) = t.add_tree(&p, false) {
                        error.get_or_insert(e);
                    }
                }
            }
        }
        (out, error)
    }
}

/// A wait for or a read of the kernel's events failed: reported (the folder
/// is rescanned), then tried again after a pause, never given up (a reader
/// gone would leave the folder unwatched with nothing to say so).
fn failed(shared: &Shared, e: io::Error) {
    shared.report(notify::Error::io(e));
    std::thread::sleep(std::time::Duration::from_millis(100));
}

/// Reads the kernel's events until `stop` is closed.
fn read_loop(mut inotify: Inotify, stop: io::PipeReader, shared: &Shared) {
    use rustix::event::{PollFd, PollFlags};
    let mut buf = vec![0u8; 64 * 1024];
    let mut from = None;
    loop {
        let mut fds = [
            PollFd::new(&inotify, PollFlags::IN),
            PollFd::new(&stop, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                failed(shared, e.into());
                continue;
            }
        }
        if !fds[1].revents().is_empty() {
            return;
        }
        loop {
            let (evs, error) = match inotify.read_events(&mut buf) {
                Ok(events) => shared.take(events, &mut from),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    failed(shared, e);
                    break;
                }
            };
            if let Some(e) = error {
                shared.report(e);
            }
            if evs.is_empty() {
                break;
            }
            shared.hand_on(evs);
        }
    }
}

/// The watcher (see the module's documentation). Dropping it stops its
/// reader thread.
pub struct TreeWatcher {
    shared: Arc<Shared>,
    stop: Option<io::PipeWriter>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for TreeWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TreeWatcher").finish_non_exhaustive()
    }
}

impl TreeWatcher {
    /// The hook a scan calls before it lists a directory: the directory is
    /// watched from then on (an error is handed to the event handler).
    #[must_use]
    pub fn dir_hook(&self) -> DirHook {
        let shared = self.shared.clone();
        DirHook(Arc::new(move |dir: &Path, fd: BorrowedFd<'_>| {
            shared.watch_dir(dir, fd);
        }))
    }

    /// Leaves what `filter` excludes unwatched when the watcher walks a
    /// tree itself (a directory moved in, the degraded poll's retry); the
    /// scans never list it.
    pub fn exclude(&self, filter: Filter) {
        self.shared.table().filter = filter;
    }

    /// How many directories are watched.
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.shared.table().dirs.len()
    }
}

impl notify::Watcher for TreeWatcher {
    /// A watcher handing its events to `event_handler` (`config` says
    /// nothing it needs: symlinks are never followed).
    fn new<F: EventHandler>(event_handler: F, _config: notify::Config) -> notify::Result<Self> {
        let inotify = Inotify::init().map_err(notify::Error::io)?;
        let (stop_rx, stop) = io::pipe().map_err(notify::Error::io)?;
        let shared = Arc::new(Shared {
            table: Mutex::new(Table::new(inotify.watches())),
            handler: Mutex::new(Box::new(event_handler)),
            failed: AtomicBool::new(false),
        });
        let s = shared.clone();
        let reader = std::thread::Builder::new()
            .name("inotify".into())
            .spawn(move || read_loop(inotify, stop_rx, &s))
            .map_err(notify::Error::io)?;
        Ok(Self {
            shared,
            stop: Some(stop),
            reader: Some(reader),
        })
    }

    /// Watches `path` (reported removed or moved itself too) and, when
    /// recursive, every directory below it (walked now: the degraded poll's
    /// retry; the source's scans add their own as they go).
    fn watch(&mut self, path: &Path, mode: RecursiveMode) -> notify::Result<()> {
        let mut t = self.shared.table();
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        t.set_root(path);
        match mode {
            RecursiveMode::Recursive => {
                // a failed walk is the caller's to report: the errors of
                // the scans until the next try are that one again
                let res = t.add_tree(path, true);
                self.shared.failed.store(res.is_err(), Ordering::SeqCst);
                res
            }
            RecursiveMode::NonRecursive => {
                let fd = rustix::fs::open(path, flags, rustix::fs::Mode::empty())
                    .map_err(|e| watch_error(e.into(), path))?;
                t.add_fd(path, fd.as_fd(), true, true)
                    .map_err(|e| watch_error(e, path))
            }
        }
    }

    fn unwatch(&mut self, path: &Path) -> notify::Result<()> {
        match self.shared.table().remove_under(path) {
            0 => Err(notify::Error::watch_not_found().add_path(path.to_path_buf())),
            _ => Ok(()),
        }
    }

    fn kind() -> notify::WatcherKind {
        notify::WatcherKind::Inotify
    }
}

impl Drop for TreeWatcher {
    fn drop(&mut self) {
        // closing the pipe wakes the reader, which returns
        drop(self.stop.take());
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

mod table;
use table::Table;

#[cfg(test)]
mod tests;
