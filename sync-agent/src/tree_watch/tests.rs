use super::*;
use notify::Watcher;
use rustix::fd::AsFd;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use sync_core::scan::ScanOptions;

type Rx = mpsc::Receiver<notify::Result<Event>>;

/// A watcher of `root` (its root only), handing its events to a channel.
fn watcher(root: &Path) -> (TreeWatcher, Rx) {
    let (tx, rx) = mpsc::channel();
    let mut w = TreeWatcher::new(tx, notify::Config::default()).expect("watcher");
    w.watch(root, RecursiveMode::NonRecursive).expect("watch");
    (w, rx)
}

/// Scans `root` as the source does, its directories watched by `w`.
fn scan(root: &Path, w: &TreeWatcher) {
    let opts = ScanOptions {
        on_dir: Some(w.dir_hook()),
        ..Default::default()
    };
    sync_core::scan::scan(root, &opts).expect("scan");
}

/// Waits up to 5 s for an event `pred` accepts.
fn wait_for(rx: &Rx, pred: impl Fn(&Event) -> bool) -> Event {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Ok(ev)) if pred(&ev) => return ev,
            Ok(_) => {}
            Err(e) => panic!("no such event: {e}"),
        }
    }
}

/// The events of the next 300 ms.
fn drain(rx: &Rx) -> Vec<Event> {
    let end = Instant::now() + Duration::from_millis(300);
    let mut out = Vec::new();
    while let Ok(ev) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        out.extend(ev.ok());
    }
    out
}

fn about(p: PathBuf) -> impl Fn(&Event) -> bool {
    move |ev| ev.paths.contains(&p)
}

fn tree(dirs: &[&str]) -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().expect("tempdir");
    let root = std::fs::canonicalize(d.path()).expect("root");
    for dir in dirs {
        std::fs::create_dir_all(root.join(dir)).expect("mkdir");
    }
    (d, root)
}

/// Until a scan lists them, directories below the root are not watched; the
/// scan watches every one it lists, and a change there is reported by path.
/// Reading a file raises nothing (notify's backend reports every open).
#[test]
fn a_scan_watches_the_directories_it_lists_and_reads_raise_nothing() {
    let (_d, root) = tree(&["a/b/c", "x"]);
    std::fs::write(root.join("a/b/seen"), b"1").unwrap();
    let (w, rx) = watcher(&root);
    assert_eq!(w.watched(), 1);
    std::fs::write(root.join("a/b/c/before"), b"1").unwrap();
    scan(&root, &w);
    assert_eq!(w.watched(), 5, "root, a, a/b, a/b/c, x");
    std::fs::write(root.join("a/b/c/f"), b"1").unwrap();
    let ev = wait_for(&rx, about(root.join("a/b/c/f")));
    assert!(matches!(ev.kind, EventKind::Create(CreateKind::File)));
    wait_for(&rx, |e| {
        e.paths == [root.join("a/b/c/f")]
            && e.kind == EventKind::Access(AccessKind::Close(AccessMode::Write))
    });
    drain(&rx);
    assert_eq!(std::fs::read(root.join("a/b/seen")).unwrap(), b"1");
    let _ = std::fs::read_dir(root.join("a/b/c")).unwrap().count();
    let noise = drain(&rx);
    assert!(noise.is_empty(), "reads raised {noise:?}");
}

/// A directory made after the scan, and one moved in whole with
/// subdirectories, are watched before their event is handed on: a write
/// right after it is reported.
#[test]
fn directories_that_appear_are_watched_before_they_are_reported() {
    let (_d, root) = tree(&[]);
    let (_o, outside) = tree(&["t/u/v"]);
    let (w, rx) = watcher(&root);
    scan(&root, &w);
    std::fs::create_dir(root.join("n")).unwrap();
    let ev = wait_for(&rx, about(root.join("n")));
    assert!(matches!(ev.kind, EventKind::Create(CreateKind::Folder)));
    std::fs::write(root.join("n/f"), b"1").unwrap();
    wait_for(&rx, about(root.join("n/f")));
    std::fs::rename(outside.join("t"), root.join("t")).unwrap();
    let ev = wait_for(&rx, about(root.join("t")));
    assert_eq!(ev.kind, EventKind::Modify(ModifyKind::Name(RenameMode::To)));
    std::fs::write(root.join("t/u/v/f"), b"1").unwrap();
    wait_for(&rx, about(root.join("t/u/v/f")));
    assert_eq!(w.watched(), 5, "root, n, t, t/u, t/u/v");
}

/// A directory moved out of the tree stops reporting (under its old path);
/// one renamed inside is reported by both names, then by its new path; a
/// removed one leaves no watch behind.
#[test]
fn directories_moved_away_renamed_or_removed_leave_their_watches() {
    let (_d, root) = tree(&["m/k", "p/q", "gone/deep"]);
    let (_o, outside) = tree(&[]);
    let (w, rx) = watcher(&root);
    scan(&root, &w);
    assert_eq!(w.watched(), 7);
    std::fs::rename(root.join("m"), outside.join("m")).unwrap();
    wait_for(&rx, about(root.join("m")));
    std::fs::write(outside.join("m/k/f"), b"1").unwrap();
    let late = drain(&rx);
    assert!(
        !late
            .iter()
            .any(|e| e.paths.iter().any(|p| p.starts_with(root.join("m")))),
        "a directory moved out still reports: {late:?}"
    );
    std::fs::rename(root.join("p"), root.join("r")).unwrap();
    let both = wait_for(&rx, |e| {
        e.kind == EventKind::Modify(ModifyKind::Name(RenameMode::Both))
    });
    assert_eq!(both.paths, [root.join("p"), root.join("r")]);
    std::fs::write(root.join("r/q/f"), b"1").unwrap();
    let ev = wait_for(&rx, |e| e.paths.iter().any(|p| p.ends_with("q/f")));
    assert_eq!(ev.paths, [root.join("r/q/f")]);
    std::fs::remove_dir_all(root.join("gone")).unwrap();
    wait_for(&rx, about(root.join("gone")));
    drain(&rx);
    assert_eq!(w.watched(), 3, "root, r, r/q");
}

/// More events than the kernel queues while the handler is busy: the
/// overflow is handed on as a rescan, and events after it still come.
#[test]
fn an_overflow_is_handed_on_as_a_rescan() {
    let queue: usize = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16384);
    let (_d, root) = tree(&[]);
    let (gate_tx, gate) = mpsc::channel::<()>();
    let (tx, rx) = mpsc::channel();
    let mut first = true;
    let handler = move |ev: notify::Result<Event>| {
        if std::mem::take(&mut first) {
            let _ = gate.recv();
        }
        let _ = tx.send(ev);
    };
    let mut w = TreeWatcher::new(handler, notify::Config::default()).expect("watcher");
    w.watch(&root, RecursiveMode::NonRecursive).expect("watch");
    std::fs::write(root.join("first"), b"").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..queue + 100 {
        std::fs::File::create(root.join(format!("f{i}"))).unwrap();
    }
    gate_tx.send(()).unwrap();
    wait_for(&rx, notify::Event::need_rescan);
    drain(&rx);
    std::fs::write(root.join("after"), b"1").unwrap();
    wait_for(&rx, about(root.join("after")));
}

/// The descriptor of `p`, a directory.
fn open_dir(p: &Path) -> rustix::fd::OwnedFd {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    rustix::fs::open(p, flags, rustix::fs::Mode::empty()).expect("open")
}

/// A watch the kernel refuses for its limit is reported as notify's limit
/// (what the degraded poll tells apart); a directory gone before the
/// watcher walks it is no error, but for the tree asked for; the hook
/// outlives its watcher harmlessly.
#[test]
fn errors_are_named_and_a_gone_directory_is_none() {
    let e = watch_error(
        io::Error::from_raw_os_error(libc::ENOSPC),
        Path::new("/r/d"),
    );
    assert!(crate::watch_limit::is_limit(&e));
    assert_eq!(e.paths, [PathBuf::from("/r/d")]);
    let e = watch_error(
        io::Error::from_raw_os_error(libc::ENOENT),
        Path::new("/r/x"),
    );
    assert!(matches!(e.kind, notify::ErrorKind::PathNotFound));
    let (_d, root) = tree(&["a"]);
    let (mut w, rx) = watcher(&root);
    let hook = w.dir_hook();
    let a = open_dir(&root.join("a"));
    (hook.0)(&root.join("a"), a.as_fd());
    assert_eq!(w.watched(), 2);
    assert!(drain(&rx).is_empty(), "no error");
    let nowhere = root.join("nowhere");
    assert!(w.watch(&nowhere, RecursiveMode::Recursive).is_err());
    let elsewhere = tempfile::tempdir().unwrap();
    assert!(w.watch(elsewhere.path(), RecursiveMode::Recursive).is_err());
    w.unwatch(&root.join("a")).expect("unwatch");
    assert!(w.unwatch(&root.join("a")).is_err());
    drop(w);
    (hook.0)(&root.join("a"), a.as_fd());
    // appeared and went before the watcher walked it: nothing to watch
    let ino = Inotify::init().expect("inotify");
    let mut t = Table::new(ino.watches());
    t.root = Some(root.clone());
    assert!(t.add_tree(&nowhere, false).is_ok());
    assert!(t.add_tree(&nowhere, true).is_err());
    assert!(t.add_tree(&root, true).is_ok());
    assert_eq!(t.dirs.len(), 2);
}

/// A symlink swapped in above a directory between the scan's open of it
/// and its watch cannot send the watch to the link's target: the watch is
/// the open directory's, and the target's own watch still reports under
/// its own path.
#[test]
fn a_watch_goes_to_the_directory_opened_not_to_a_path_resolved_again() {
    let (_d, root) = tree(&["a/s", "b/s"]);
    let (w, rx) = watcher(&root);
    scan(&root, &w);
    let hook = w.dir_hook();
    let opened = open_dir(&root.join("a/s"));
    std::fs::rename(root.join("a"), root.join("a.old")).unwrap();
    std::os::unix::fs::symlink(root.join("b"), root.join("a")).unwrap();
    (hook.0)(&root.join("a/s"), opened.as_fd());
    drain(&rx);
    std::fs::write(root.join("b/s/f"), b"1").unwrap();
    let ev = wait_for(&rx, |e| e.paths.iter().any(|p| p.ends_with("s/f")));
    assert_eq!(ev.paths, [root.join("b/s/f")]);
    std::fs::write(root.join("a.old/s/g"), b"1").unwrap();
    let ev = wait_for(&rx, |e| e.paths.iter().any(|p| p.ends_with("s/g")));
    assert_eq!(ev.paths, [root.join("a.old/s/g")]);
}

/// A scan walks on through descriptors below a directory moved while it
/// walks, and names what it finds there by the old path: such a name is not
/// taken for a directory it no longer leads to, and the directory is
/// watched under the name the scan finds it by where it went.
#[test]
fn a_scan_behind_a_move_names_no_directory_by_its_old_path() {
    let (_d, root) = tree(&["x/a/b", "z"]);
    let (mut w, rx) = watcher(&root);
    scan(&root, &w);
    let hook = w.dir_hook();
    // the scan holds x/a/b/c open; x/a is moved to z, where no scan has
    // been yet (no watch: no event of its arrival)
    std::fs::create_dir(root.join("x/a/b/c")).unwrap();
    wait_for(&rx, about(root.join("x/a/b/c")));
    let opened = open_dir(&root.join("x/a/b/c"));
    w.unwatch(&root.join("z")).expect("unwatch");
    std::fs::rename(root.join("x/a"), root.join("z/a")).unwrap();
    wait_for(&rx, about(root.join("x/a")));
    drain(&rx);
    assert_eq!(w.watched(), 2, "root, x");
    (hook.0)(&root.join("x/a/b/c"), opened.as_fd());
    assert_eq!(w.watched(), 2, "no watch under a name that leads nowhere");
    (hook.0)(&root.join("z/a/b/c"), opened.as_fd());
    assert_eq!(w.watched(), 3);
    std::fs::write(root.join("z/a/b/c/f"), b"1").unwrap();
    let ev = wait_for(&rx, |e| e.paths.iter().any(|p| p.ends_with("c/f")));
    assert_eq!(ev.paths, [root.join("z/a/b/c/f")]);
    // moved out of the tree (once the scan has been there): a scan's old
    // name adds no watch there
    scan(&root, &w);
    let (_o, outside) = tree(&[]);
    std::fs::rename(root.join("z/a"), outside.join("a")).unwrap();
    wait_for(&rx, about(root.join("z/a")));
    drain(&rx);
    let left = w.watched();
    (hook.0)(&root.join("z/a/b/c"), opened.as_fd());
    assert_eq!(w.watched(), left);
    std::fs::write(outside.join("a/b/c/g"), b"1").unwrap();
    let late = drain(&rx);
    assert!(late.is_empty(), "{late:?}");
}

/// A tree moved in is walked as the scan walks: excluded directories and
/// symlinks to directories (in the tree or out of it) are not watched.
#[test]
fn a_tree_moved_in_is_watched_but_for_excludes_and_symlinks() {
    let (_d, root) = tree(&[]);
    let (_o, outside) = tree(&["t/keep/deep", "t/node_modules/x/y", "far/away"]);
    std::os::unix::fs::symlink(outside.join("far"), outside.join("t/out")).unwrap();
    std::os::unix::fs::symlink("keep", outside.join("t/in")).unwrap();
    let (w, rx) = watcher(&root);
    w.exclude(Filter::new(&["node_modules/".into()]).unwrap());
    scan(&root, &w);
    std::fs::rename(outside.join("t"), root.join("t")).unwrap();
    wait_for(&rx, about(root.join("t")));
    assert_eq!(w.watched(), 4, "root, t, t/keep, t/keep/deep");
    std::fs::write(root.join("t/keep/deep/f"), b"1").unwrap();
    wait_for(&rx, about(root.join("t/keep/deep/f")));
    drain(&rx);
    std::fs::create_dir(root.join("t/node_modules/x/z")).unwrap();
    std::fs::write(outside.join("far/away/f"), b"1").unwrap();
    let late = drain(&rx);
    assert!(late.is_empty(), "{late:?}");
}

/// What each kind of inotify event is handed on as, and what it does to the
/// watches (sans kernel).
#[test]
fn each_event_means_what_notify_says_and_changes_the_watches() {
    let p = Path::new("/r/d");
    let mut from = None;
    let kinds = |evs: &[Event]| evs.iter().map(|e| e.kind).collect::<Vec<_>>();
    let (evs, c) = meaning(EventMask::CREATE | EventMask::ISDIR, 0, p, &mut from);
    assert_eq!(kinds(&evs), [EventKind::Create(CreateKind::Folder)]);
    assert_eq!(c, Some(Change::Watch(p.into())));
    let (evs, c) = meaning(EventMask::CREATE, 0, p, &mut from);
    assert_eq!(kinds(&evs), [EventKind::Create(CreateKind::File)]);
    assert_eq!(c, None);
    let (_, c) = meaning(EventMask::DELETE | EventMask::ISDIR, 0, p, &mut from);
    assert_eq!(c, Some(Change::Unwatch(p.into())));
    let (evs, c) = meaning(EventMask::MOVED_FROM | EventMask::ISDIR, 7, p, &mut from);
    assert_eq!(
        kinds(&evs),
        [EventKind::Modify(ModifyKind::Name(RenameMode::From))]
    );
    assert_eq!(c, Some(Change::Unwatch(p.into())));
    let to = Path::new("/r/e");
    let (evs, c) = meaning(EventMask::MOVED_TO | EventMask::ISDIR, 7, to, &mut from);
    assert_eq!(evs[1].paths, [p.to_path_buf(), to.to_path_buf()]);
    assert_eq!(evs[1].tracker(), Some(7));
    assert_eq!(c, Some(Change::Watch(to.into())));
    assert!(from.is_none());
    // moved in from outside: no pair
    let (evs, _) = meaning(EventMask::MOVED_TO, 8, to, &mut from);
    assert_eq!(
        kinds(&evs),
        [EventKind::Modify(ModifyKind::Name(RenameMode::To))]
    );
    for (mask, kind) in [
        (
            EventMask::MODIFY,
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
        ),
        (
            EventMask::CLOSE_WRITE,
            EventKind::Access(AccessKind::Close(AccessMode::Write)),
        ),
        (
            EventMask::ATTRIB,
            EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
        ),
        (
            EventMask::DELETE_SELF,
            EventKind::Remove(RemoveKind::Folder),
        ),
    ] {
        let (evs, c) = meaning(mask, 0, p, &mut from);
        assert_eq!((kinds(&evs), c), (vec![kind], None));
    }
}

/// A file system unmounted from under the tree asks for a full round: what
/// its mount point hid is in the tree now, and nothing else says so.
#[test]
fn an_unmount_under_the_tree_asks_for_a_rescan() {
    let (_d, root) = tree(&["m"]);
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(root.join("m"))
        .status()
        .expect("mount");
    assert!(mounted.success(), "mounting a tmpfs (tests run as root)");
    /// Unmounts it however the test ends.
    struct Mounted(PathBuf);
    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let guard = Mounted(root.join("m"));
    std::fs::create_dir(root.join("m/inside")).unwrap();
    let (w, rx) = watcher(&root);
    scan(&root, &w);
    drain(&rx);
    drop(guard);
    wait_for(&rx, notify::Event::need_rescan);
}

/// A name taken by another directory drops the watch of the one that had
/// it (moved elsewhere or gone): no watch is left that no name leads to,
/// whose events would later drop the new directory's watches.
#[test]
fn a_name_taken_by_another_directory_drops_the_old_watch() {
    let (_d, root) = tree(&["p"]);
    let ino = Inotify::init().expect("inotify");
    let mut t = Table::new(ino.watches());
    t.set_root(&root);
    let old = open_dir(&root.join("p"));
    t.add_fd(&root.join("p"), old.as_fd(), false, true).unwrap();
    std::fs::rename(root.join("p"), root.join("q")).unwrap();
    std::fs::create_dir(root.join("p")).unwrap();
    let new = open_dir(&root.join("p"));
    t.add_fd(&root.join("p"), new.as_fd(), false, false)
        .unwrap();
    assert_eq!(t.dirs.len(), 1, "{:?}", t.dirs);
    assert_eq!(t.remove_under(&root.join("p")), 1);
    assert!(t.dirs.is_empty());
}

/// Once set up and between scans, the watcher holds nothing of the tree
/// open (an idle agent must not keep the application's volume from being
/// unmounted, nor keep a tree replaced by rename alive).
#[test]
fn the_watcher_holds_no_descriptor_of_the_tree() {
    let (_d, root) = tree(&["a", "a/b"]);
    let (w, rx) = watcher(&root);
    scan(&root, &w);
    std::fs::create_dir(root.join("a/c")).unwrap();
    wait_for(&rx, about(root.join("a/c")));
    let held: Vec<PathBuf> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(&root))
        .collect();
    assert!(held.is_empty(), "the watcher holds {held:?}");
    assert_eq!(w.watched(), 4);
}

/// A scan's hook checks a new directory's name outside the table's lock; if
/// the reader changed the watches before the hook records it (a rename it
/// applied), the name is checked again: a directory moved away meanwhile
/// is not recorded under the name the scan had for it.
#[test]
fn a_name_checked_before_the_reader_moved_something_is_checked_again() {
    let (_d, root) = tree(&["x/d", "y"]);
    let (w, _rx) = watcher(&root);
    scan(&root, &w);
    let dir = root.join("x/d/e");
    // (held first: the reader must not take the new directory's event in
    // between and watch it itself)
    let mut t = w.shared.table();
    std::fs::create_dir(&dir).unwrap();
    let opened = open_dir(&dir);
    let (found, mut watches, known, moved) = t.outlook(&dir).expect("/proc");
    assert_eq!(found, root);
    assert!(!known);
    let link = table::fd_link(opened.as_fd());
    let wd = watches.add(&link, table::mask(false)).expect("watch");
    let named = Some(table::names(Some(&root), &dir, opened.as_fd()));
    assert_eq!(named, Some(true));
    // moved away before the hook takes the lock, and the reader applied it
    std::fs::rename(root.join("x/d"), root.join("y/d")).unwrap();
    t.remove_under(&root.join("x/d"));
    let before = t.dirs.len();
    let looked = table::Looked {
        wd: wd.clone(),
        named,
        moved,
    };
    t.record_looked(&dir, opened.as_fd(), looked);
    assert_eq!(t.dirs.len(), before, "recorded under the name it lost");
    // with nothing moved since the check, the check stands
    let dir2 = root.join("y/d/e");
    let (_, _, _, now) = t.outlook(&dir2).expect("/proc");
    let looked = table::Looked {
        wd,
        named: Some(true),
        moved: now,
    };
    t.record_looked(&dir2, opened.as_fd(), looked);
    assert_eq!(t.dirs.len(), before + 1);
}
