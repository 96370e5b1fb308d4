//! The replica's scan ahead, kept between sessions while its tree is quiet.
//!
//! A session's first round starts with the replica's scan of its own tree
//! ([`engine::prescan`]): its quick digest lets the source answer `RoundSame`
//! when nothing changed, its entries spare the round's plan a scan. An agent
//! serving a folder for months would scan the same tree at every session
//! (on the bench's `large` corpus 0.1-0.2 s of both cores, alongside the
//! source's own scan). Here a scan watches every directory it lists (inotify,
//! added through the very descriptor it lists, before the listing, as the
//! source's watcher does: [`crate::tree_watch`]), and what it saw is kept
//! after the session. The next session takes it without scanning when
//! nothing at all was reported since (a write, a metadata change, a name
//! made, removed or moved, a watch gone, the queue overflowed: the kernel
//! queues the event before the change's system call returns), the root's
//! path still leads to the directory scanned, no file system was mounted
//! or unmounted at or below it, and it is younger than [`MAX_AGE`]: what
//! inotify never reports (writes through a shared mapping, another host's
//! writes to a network file system, a write through a hard link made from
//! outside the tree after the scan) is found by a scan made at latest that
//! long after. After a session that changed
//! the tree the scan is made again at once, so the next session need not.
//!
//! Never kept: in `sync-cli mirror`'s replica (one session), on a network or
//! FUSE file system, when the tree needs more than [`WATCH_SHARE`] of the
//! user's inotify watches (the host's other watchers come first: the
//! watches are given back at once), when a watch fails, when a file of the
//! tree has a name outside it, and on a node that is the folder's source.

use super::replica::ReplicaFolder;
use inotify::{Inotify, WatchMask, Watches};
use rustix::fd::{AsFd, AsRawFd, BorrowedFd};
use rustix::fs::{AtFlags, Mode, OFlags};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use sync_core::engine::{self, Prescan};
use sync_core::scan::DirHook;

/// How long a quiet scan ahead is trusted.
pub const MAX_AGE: Duration = Duration::from_secs(3600);

/// The share of `fs.inotify.max_user_watches` a kept scan may hold (one
/// watch a directory): one in four.
pub const WATCH_SHARE: usize = 4;

/// What each directory is watched for: every change to it or to a name in
/// it (opens, reads and closes after reading are not changes).
fn mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::DELETE_SELF
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::MOVE_SELF
        | WatchMask::ONLYDIR
}

/// File systems whose changes can come from elsewhere, unseen by inotify
/// (`statfs`'s `f_type`): NFS, SMB/CIFS, FUSE, 9P, Ceph, AFS, Coda, GFS2,
/// OCFS2, GPFS, Lustre.
const SHARED_FS: [i64; 12] = [
    0x6969,
    0x517B,
    0xFF53_4D42,
    0xFE53_4D42,
    0x6573_5546,
    0x0102_1997,
    0x00C3_6400,
    0x5346_414F,
    0x7375_7245,
    0x0116_1970,
    0x7461_636F,
    0x4750_4653,
];
const LUSTRE: i64 = 0x0BD0_0BD0;

/// Whether the directory open as `fd` is on a file system changed only
/// through this kernel.
fn local(fd: BorrowedFd<'_>) -> bool {
    match rustix::fs::fstatfs(fd) {
        #[allow(clippy::unnecessary_cast)] // its type differs by target
        Ok(st) => {
            let t = st.f_type as i64;
            !SHARED_FS.contains(&t) && t != LUSTRE
        }
        Err(_) => false,
    }
}

/// The inotify watches of one scan: quiet while nothing was reported.
#[derive(Debug)]
pub struct Quiet {
    inotify: Mutex<Inotify>,
    watches: Mutex<Watches>,
    added: AtomicUsize,
    budget: usize,
    /// A directory went unwatched: nothing can be told.
    broken: AtomicBool,
    /// This process's mount table, open since before the scan (it polls
    /// `POLLPRI` once a file system was mounted or unmounted anywhere), and
    /// the mount points at or below the tree's root it listed then: a mount
    /// over a directory of the tree changes what its path shows, and
    /// inotify says nothing of it.
    mounts: Option<(std::fs::File, Vec<Vec<u8>>)>,
    root: std::path::PathBuf,
}

/// The mount points at or below `root` in this process's mount table (as
/// `/proc/self/mountinfo` writes them, `\040` for a space and so on).
fn mounts_below(table: &str, root: &Path) -> Vec<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    // (escaped as the table escapes its paths)
    let mut escaped = Vec::new();
    for &b in root.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => escaped.extend(format!("\\{b:03o}").bytes()),
            _ => escaped.push(b),
        }
    }
    let root = escaped.as_slice();
    let mut below: Vec<Vec<u8>> = table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.as_bytes().to_vec())
        .filter(|m| {
            m.starts_with(root)
                && (m.len() == root.len() || m.get(root.len()) == Some(&b'/') || root == b"/")
        })
        .collect();
    below.sort();
    below
}

/// This process's mount table, open, and the mount points at or below `root`.
fn mount_table(root: &Path) -> Option<(std::fs::File, Vec<Vec<u8>>)> {
    let mut f = std::fs::File::open("/proc/self/mountinfo").ok()?;
    let mut table = String::new();
    std::io::Read::read_to_string(&mut f, &mut table).ok()?;
    Some((f, mounts_below(&table, root)))
}

impl Quiet {
    /// Watches for at most `budget` directories of the tree at `root`.
    pub fn new(root: &Path, budget: usize) -> std::io::Result<Arc<Self>> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        let root = std::fs::canonicalize(root)?;
        let mounts = mount_table(&root);
        Ok(Arc::new(Self {
            inotify: Mutex::new(inotify),
            watches: Mutex::new(watches),
            added: AtomicUsize::new(0),
            budget,
            broken: AtomicBool::new(mounts.is_none()),
            mounts,
            root,
        }))
    }

    /// [`Self::new`] with this host's share ([`WATCH_SHARE`]).
    pub fn for_host(root: &Path) -> std::io::Result<Arc<Self>> {
        let max = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(8192);
        Self::new(root, max / WATCH_SHARE)
    }

    /// Watches the directory open as `fd` (a scan is about to list it).
    fn watch(&self, fd: BorrowedFd<'_>) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        if self.added.fetch_add(1, Ordering::Relaxed) >= self.budget || !local(fd) {
            self.broken.store(true, Ordering::Relaxed);
            return;
        }
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let added = match self.watches.lock() {
            Ok(mut w) => w.add(&link, mask()).is_ok(),
            Err(_) => false,
        };
        if !added {
            self.broken.store(true, Ordering::Relaxed);
        }
    }

    /// Whether the mount points at or below the tree's root are those of
    /// the scan (the table read again only once it changed).
    fn mounts_still(&self) -> bool {
        use rustix::event::{PollFd, PollFlags};
        let Some((m, then)) = &self.mounts else {
            return false;
        };
        let mut fds = [PollFd::new(m, PollFlags::PRI)];
        match rustix::event::poll(&mut fds, Some(&rustix::event::Timespec::default())) {
            Ok(_) if !fds[0].revents().intersects(PollFlags::PRI | PollFlags::ERR) => true,
            Ok(_) => mount_table(&self.root).is_some_and(|(_, now)| now == *then),
            Err(_) => false,
        }
    }

    /// The hook that watches each directory a scan lists.
    #[must_use]
    pub fn hook(self: &Arc<Self>) -> DirHook {
        let me = self.clone();
        DirHook(Arc::new(move |_: &Path, fd: BorrowedFd<'_>| me.watch(fd)))
    }

    /// Whether every directory the scan listed was watched and nothing was
    /// reported since. Once `false`, always (the events read are gone from
    /// the queue).
    #[must_use]
    pub fn still(&self) -> bool {
        if self.broken.load(Ordering::SeqCst) {
            return false;
        }
        let still = self.mounts_still()
            && match self.inotify.lock() {
                Ok(mut inotify) => match inotify.read_events(&mut [0u8; 4096]) {
                    Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
                    Ok(mut events) => match events.next() {
                        None => true,
                        Some(e) => {
                            tracing::debug!(mask = ?e.mask, name = ?e.name, "the replica's tree changed since its scan ahead");
                            false
                        }
                    },
                },
                Err(_) => false,
            };
        if !still {
            self.broken.store(true, Ordering::SeqCst);
        }
        still
    }
}

/// A scan ahead, its watches and when it was made.
#[derive(Debug)]
pub struct Ahead {
    pub pre: Prescan,
    quiet: Option<Arc<Quiet>>,
    at: Instant,
    /// The tree's root path and the directory it led to when scanned: a
    /// directory above it renamed, or a new one put in its place, moves no
    /// watch of the tree.
    root: (std::path::PathBuf, Option<(u64, u64)>),
}

/// The directory `path` leads to now.
fn dir_id(path: &Path) -> Option<(u64, u64)> {
    rustix::fs::stat(path).ok().map(|st| (st.st_dev, st.st_ino))
}

impl Ahead {
    /// Whether the tree is still as `pre` has it (see the module's doc).
    fn holds(&self) -> bool {
        self.at.elapsed() < MAX_AGE
            && self.root.1.is_some()
            && dir_id(&self.root.0) == self.root.1
            && self.quiet.as_ref().is_some_and(|q| q.still())
    }
}

/// A replica folder's kept scan ahead.
#[derive(Debug, Default)]
pub struct Kept {
    /// Scans are watched and kept (the agent's replica; not `mirror`'s).
    enabled: AtomicBool,
    slot: Mutex<Option<Ahead>>,
}

impl Kept {
    /// Scans ahead are watched and kept from now on.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::SeqCst)
    }

    /// The kept scan, while it holds (taken: a session's round may change
    /// the tree); a scan that no longer holds is dropped with its watches.
    pub fn take(&self) -> Option<Ahead> {
        let a = self.slot.lock().ok()?.take()?;
        a.holds().then_some(a)
    }

    /// Keeps `a` for the next session (with watches: otherwise nothing could
    /// tell it still holds).
    pub fn keep(&self, a: Ahead) {
        if self.enabled()
            && a.quiet.is_some()
            && let Ok(mut s) = self.slot.lock()
        {
            *s = Some(a);
        }
    }

    /// Drops the kept scan (this node became the folder's source).
    pub fn clear(&self) {
        if let Ok(mut s) = self.slot.lock() {
            s.take();
        }
    }

    /// Whether a kept scan holds (left kept).
    fn holds(&self) -> bool {
        self.slot
            .lock()
            .is_ok_and(|s| s.as_ref().is_some_and(Ahead::holds))
    }
}

/// Scans `folder`'s tree ahead of a round (blocking), watched when the
/// folder keeps its scans.
pub fn scan(folder: &ReplicaFolder) -> Result<Ahead, sync_core::Error> {
    let at = Instant::now();
    let root = folder.replica.root_path();
    let root_id = dir_id(root);
    let quiet = match folder.ahead.enabled() {
        true => Quiet::for_host(root).ok(),
        false => None,
    };
    let pre = prescan_watched(folder, quiet.as_ref())?;
    // Watches that cannot tell are given back now, not when the scan goes.
    let quiet = quiet.filter(|q| !q.broken.load(Ordering::Relaxed) && !linked_outside(root, &pre));
    Ok(Ahead {
        pre,
        quiet,
        at,
        root: (root.to_path_buf(), root_id),
    })
}

/// The folder's scan ahead, each directory watched by `quiet` first.
fn prescan_watched(
    folder: &ReplicaFolder,
    quiet: Option<&Arc<Quiet>>,
) -> Result<Prescan, sync_core::Error> {
    engine::prescan(
        &folder.replica,
        &folder.filter,
        folder.detect.clone(),
        &folder.sweep,
        &folder.ids,
        Some(&folder.scan_index),
        quiet.map(Quiet::hook),
    )
}

/// Whether a file of the tree has a name outside it: a write through that
/// name raises no event in the tree's directories (so a scan is not kept).
fn linked_outside(root: &Path, pre: &Prescan) -> bool {
    let names = &pre.report.multi_linked;
    if names.is_empty() {
        return false;
    }
    let Ok(root) = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()) else {
        return true;
    };
    let mut seen: HashMap<(u64, u64), (u64, u64)> = HashMap::new();
    for p in names {
        // (confined as every open beneath the replica's root)
        let st = p.split_last().and_then(|(dir, name)| {
            let d = sync_core::open_dir_beneath(root.as_fd(), &dir).ok()?;
            rustix::fs::statat(&d, name, AtFlags::SYMLINK_NOFOLLOW).ok()
        });
        let Some(st) = st else {
            return true;
        };
        let n = seen
            .entry((st.st_dev, st.st_ino))
            .or_insert((0, st.st_nlink));
        n.0 += 1;
    }
    seen.values().any(|(inside, links)| inside < links)
}

/// A long-lived replica's folders keep their scans ahead between sessions,
/// the first made now.
pub fn start(folders: &[Arc<ReplicaFolder>]) {
    for f in folders {
        f.ahead.enable();
        tokio::spawn(refresh(f.clone()));
    }
}

/// Makes sure `folder` keeps a scan that holds, for its next session: after
/// a session (which may have changed the tree) and when the agent starts.
/// Holds the folder meanwhile, as a session does (a session waiting for it
/// takes this scan).
pub async fn refresh(folder: Arc<ReplicaFolder>) {
    let source = |f: &ReplicaFolder| f.fence.lock().is_ok_and(|f| f.source);
    if !folder.ahead.enabled() || source(&folder) {
        return;
    }
    let _held = folder.lock.lock().await;
    if folder.ahead.holds() {
        return;
    }
    let f = folder.clone();
    let scanned = tokio::task::spawn_blocking(move || {
        // (what the last session touched is its own: forgotten, as the next
        // session's start would)
        f.replica.reset();
        let a = scan(&f)?;
        // A database this scan had to read may have touched its directory:
        // put back as scanned (the watches see it: scanned again next time).
        for dir in f.replica.touched_dirs() {
            if let Some((_, e)) = a.pre.dst.get(&dir) {
                f.replica.set_meta(e)?;
            }
        }
        f.replica.reset();
        Ok::<_, sync_core::Error>(a)
    })
    .await;
    match scanned {
        // (promoted meanwhile: the watches go with the scan)
        Ok(Ok(a)) if !source(&folder) => folder.ahead.keep(a),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(folder = %folder.name, "scanning ahead of the next session: {e}")
        }
        Err(e) => tracing::warn!(folder = %folder.name, "scanning ahead of the next session: {e}"),
    }
}

#[cfg(test)]
#[path = "replica_ahead_tests.rs"]
mod tests;
