use super::*;

fn folder(root: &Path) -> Arc<ReplicaFolder> {
    let f = crate::replica_folder("f", root, Default::default(), vec![]).expect("folder");
    f.ahead.enable();
    f
}

fn tree() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().expect("temp dir");
    let root = t.path().join("root");
    std::fs::create_dir_all(root.join("a/b")).expect("mkdir");
    std::fs::write(root.join("a/b/f"), b"one").expect("write");
    std::fs::write(root.join("top"), b"top").expect("write");
    (t, root)
}

/// Scans and keeps; whether the next session would take it.
fn kept_after(root: &Path, change: impl FnOnce(&Path)) -> bool {
    let f = folder(root);
    let a = scan(&f).expect("scan");
    assert!(a.pre.digest.is_some());
    f.ahead.keep(a);
    change(root);
    f.ahead.take().is_some()
}

#[test]
fn a_quiet_tree_keeps_its_scan() {
    let (_t, root) = tree();
    assert!(kept_after(&root, |_| {}));
    // reads and opens are no change
    assert!(kept_after(&root, |r| {
        std::fs::read(r.join("a/b/f")).expect("read");
        std::fs::read_dir(r.join("a")).expect("list").for_each(drop);
    }));
}

/// A change made to a tree, named.
type Change = (&'static str, Box<dyn Fn(&Path)>);

#[test]
fn any_change_anywhere_in_the_tree_drops_it() {
    use std::os::unix::fs::PermissionsExt;
    let changes: Vec<Change> = vec![
        (
            "write",
            Box::new(|r| std::fs::write(r.join("a/b/f"), b"two").expect("write")),
        ),
        (
            "create",
            Box::new(|r| std::fs::write(r.join("a/new"), b"").expect("create")),
        ),
        (
            "remove",
            Box::new(|r| std::fs::remove_file(r.join("top")).expect("rm")),
        ),
        (
            "rename",
            Box::new(|r| std::fs::rename(r.join("a/b/f"), r.join("a/g")).expect("mv")),
        ),
        (
            "mkdir",
            Box::new(|r| std::fs::create_dir(r.join("a/b/c")).expect("mkdir")),
        ),
        (
            "chmod",
            Box::new(|r| {
                std::fs::set_permissions(r.join("a/b/f"), std::fs::Permissions::from_mode(0o600))
                    .expect("chmod")
            }),
        ),
        (
            "xattr",
            Box::new(|r| xattr::set(r.join("a/b/f"), "user.k", b"v").expect("xattr")),
        ),
        (
            "times",
            Box::new(|r| {
                let f = std::fs::File::options()
                    .write(true)
                    .open(r.join("a/b/f"))
                    .expect("open");
                f.set_modified(std::time::SystemTime::UNIX_EPOCH)
                    .expect("utimes")
            }),
        ),
        (
            "link",
            Box::new(|r| std::fs::hard_link(r.join("top"), r.join("a/b/l")).expect("link")),
        ),
        (
            "root moved",
            Box::new(|r| {
                std::fs::rename(r, r.with_extension("old")).expect("mv root");
                std::fs::create_dir(r).expect("mkdir root");
            }),
        ),
    ];
    for (what, change) in changes {
        let (_t, root) = tree();
        assert!(!kept_after(&root, change), "{what}: the scan was kept");
    }
}

#[test]
fn a_change_once_seen_is_never_forgotten() {
    let (_t, root) = tree();
    let f = folder(&root);
    let a = scan(&f).expect("scan");
    let q = a.quiet.clone().expect("watched");
    f.ahead.keep(a);
    assert!(f.ahead.holds());
    std::fs::write(root.join("top"), b"changed").expect("write");
    // the check that read the event leaves the scan kept (a refresh whose
    // scan fails leaves it there): it still does not hold
    assert!(!f.ahead.holds());
    assert!(!q.still(), "the event was read, and forgotten");
    assert!(f.ahead.take().is_none());
}

#[test]
fn a_tree_with_a_file_linked_from_outside_keeps_no_scan() {
    let (t, root) = tree();
    // names inside only: kept
    std::fs::hard_link(root.join("top"), root.join("a/top2")).expect("link");
    assert!(kept_after(&root, |_| {}));
    // one more name outside: a write through it raises no event in the tree
    std::fs::hard_link(root.join("top"), t.path().join("outside")).expect("link");
    let f = folder(&root);
    let a = scan(&f).expect("scan");
    assert!(a.quiet.is_none(), "watched though linked from outside");
    f.ahead.keep(a);
    assert!(f.ahead.take().is_none());
}

#[test]
fn a_scan_older_than_max_age_or_past_the_watch_share_is_not_kept() {
    let (_t, root) = tree();
    let f = folder(&root);
    let mut a = scan(&f).expect("scan");
    a.at = Instant::now().checked_sub(MAX_AGE).expect("long ago");
    f.ahead.keep(a);
    assert!(f.ahead.take().is_none(), "kept past its age");
    // three directories, room for two watches
    let q = Quiet::new(&root, 2).expect("inotify");
    let pre = prescan_watched(&f, Some(&q)).expect("scan");
    f.ahead.keep(Ahead {
        pre,
        quiet: Some(q),
        at: Instant::now(),
        root: (root.clone(), dir_id(&root)),
    });
    assert!(f.ahead.take().is_none(), "kept with a directory unwatched");
}

/// What moves no watch of the tree but changes what its paths show: the
/// root's path led elsewhere (a directory above it renamed, another put in
/// its place), or a file system mounted over a directory of the tree.
#[test]
fn a_root_path_led_elsewhere_or_a_mount_in_the_tree_drops_it() {
    let (t, root) = tree();
    assert!(!kept_after(&root, |r| {
        let up = r.parent().expect("parent");
        std::fs::rename(up, up.with_extension("moved")).expect("mv parent");
        std::fs::create_dir_all(r).expect("a new root");
        std::fs::write(r.join("top"), b"another tree").expect("write");
    }));
    drop(t);
    let (_t, root) = tree();
    let mounted = root.join("a/b");
    let mounted2 = &mounted;
    let run = |args: &[&std::ffi::OsStr]| {
        let st = std::process::Command::new(args[0])
            .args(&args[1..])
            .status();
        assert!(st.expect("run").success(), "{args:?}");
    };
    assert!(!kept_after(&root, |_| {
        run(&[
            "mount".as_ref(),
            "-t".as_ref(),
            "tmpfs".as_ref(),
            "tmpfs".as_ref(),
            mounted2.as_os_str(),
        ]);
    }));
    run(&["umount".as_ref(), "-l".as_ref(), mounted.as_os_str()]);
}

#[test]
fn mirrors_replica_and_a_source_node_keep_nothing() {
    let (_t, root) = tree();
    let f = crate::replica_folder("f", &root, Default::default(), vec![]).expect("folder");
    let a = scan(&f).expect("scan");
    assert!(a.quiet.is_none(), "watched though not kept");
    f.ahead.keep(a);
    assert!(f.ahead.take().is_none());
    let f = folder(&root);
    f.fence.lock().expect("fence").source = true;
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(refresh(f.clone()));
    assert!(f.ahead.take().is_none(), "a source node scanned ahead");
    f.fence.lock().expect("fence").source = false;
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(refresh(f.clone()));
    assert!(f.ahead.take().is_some(), "the replica kept no scan");
}

#[test]
fn only_mount_points_at_or_below_the_root_count() {
    let table = "22 1 8:1 / / rw - ext4 /dev/vda rw\n\
                 30 22 0:5 / /srv/rep rw - tmpfs tmpfs rw\n\
                 31 22 0:6 / /srv/replica rw - tmpfs tmpfs rw\n\
                 32 31 0:7 / /srv/replica/a\\040b rw - tmpfs tmpfs rw\n\
                 33 22 0:8 / /srv/replica2 rw - tmpfs tmpfs rw\n";
    let below = mounts_below(table, Path::new("/srv/replica"));
    assert_eq!(
        below,
        [b"/srv/replica".to_vec(), b"/srv/replica/a\\040b".to_vec()]
    );
    assert_eq!(mounts_below(table, Path::new("/")).len(), 5);
    // a root whose name the table escapes
    let below = mounts_below(table, Path::new("/srv/replica/a b"));
    assert_eq!(below, [b"/srv/replica/a\\040b".to_vec()]);
}
