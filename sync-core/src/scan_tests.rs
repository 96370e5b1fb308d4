//! The walk by directory file descriptors: symlinks below the root are never
//! followed, entries that vanish mid-walk are skipped, deep trees are walked
//! whole, and xattrs read by `listxattrat`/`getxattrat` are exactly those the
//! path-based reader gives.

use super::*;
use std::os::unix::fs::symlink;
use std::process::Command;

fn rel(s: &str) -> RelPath {
    RelPath::new(s.as_bytes()).expect("a relative path")
}

fn paths(entries: &[Entry]) -> Vec<String> {
    entries.iter().map(|e| e.path.to_string()).collect()
}

/// Scans `root` whole with `hook` called as the walk goes.
fn scan_hooked(root: &Path, hook: impl FnMut(&str, &RelPath) + Send + 'static) -> Vec<Entry> {
    scan_indexed(root, None, hook)
}

/// Scans `root` whole with `index` and `hook`.
fn scan_indexed(
    root: &Path,
    index: Option<&HashIndex>,
    hook: impl FnMut(&str, &RelPath) + Send + 'static,
) -> Vec<Entry> {
    let opts = ScanOptions::default();
    let mut w = Walker::new(root, &opts, index);
    // the hook sees the walk as one thread makes it
    w.parallel = false;
    w.hook = Some(Box::new(hook));
    assert_eq!(w.visit(&RelPath::root()).expect("root"), Some(true));
    w.walk(&RelPath::root()).expect("walk");
    w.finish().expect("finish").0
}

#[test]
fn entries_vanished_between_readdir_and_stat_are_skipped() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().to_path_buf();
    fs::create_dir_all(root.join("d/sub")).expect("mkdir");
    fs::write(root.join("d/a"), b"a").expect("write");
    fs::write(root.join("d/b"), b"b").expect("write");
    fs::write(root.join("d/sub/f"), b"f").expect("write");
    let r = root.clone();
    let entries = scan_hooked(&root, move |step, p| {
        if step == "names" && p.as_bytes() == b"d" {
            fs::remove_file(r.join("d/b")).expect("rm");
            fs::remove_dir_all(r.join("d/sub")).expect("rm -r");
        }
    });
    assert_eq!(paths(&entries), [".", "d", "d/a"]);
}

#[test]
fn a_directory_swapped_for_a_symlink_after_its_stat_is_not_followed() {
    let d = tempfile::tempdir().expect("tempdir");
    let outside = tempfile::tempdir().expect("tempdir");
    fs::write(outside.path().join("secret"), b"s").expect("write");
    let root = d.path().to_path_buf();
    fs::create_dir_all(root.join("d/sub")).expect("mkdir");
    fs::write(root.join("d/sub/f"), b"f").expect("write");
    fs::write(root.join("d/z"), b"z").expect("write");
    let (r, o) = (root.clone(), outside.path().to_path_buf());
    let entries = scan_hooked(&root, move |step, p| {
        if step == "stat" && p.as_bytes() == b"d/sub" {
            fs::remove_dir_all(r.join("d/sub")).expect("rm -r");
            symlink(&o, r.join("d/sub")).expect("symlink");
        }
    });
    // `d/sub` was a directory when stat'ed; what replaced it is not entered,
    // and the walk goes on with its siblings.
    assert_eq!(paths(&entries), [".", "d", "d/sub", "d/z"]);
}

#[test]
fn paths_below_a_symlinked_directory_are_not_scanned() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path();
    fs::create_dir_all(root.join("real/x")).expect("mkdir");
    fs::write(root.join("real/x/f"), b"f").expect("write");
    fs::write(root.join("real/g"), b"g").expect("write");
    symlink("real", root.join("link")).expect("symlink");
    let opts = ScanOptions::default();
    let m = scan(root, &opts).expect("scan");
    assert_eq!(
        paths(&m.entries),
        [".", "link", "real", "real/g", "real/x", "real/x/f"]
    );
    let (sub, _) = scan_subtree(root, &rel("link/x"), &opts, None).expect("subtree");
    assert!(
        sub.is_empty(),
        "walked through a symlink: {:?}",
        paths(&sub)
    );
    let (e, _) = entry_at(root, &rel("link/g"), &opts, None).expect("entry");
    assert!(e.is_none(), "stat'ed through a symlink: {e:?}");
    let (e, _) = entry_at(root, &rel("real/g"), &opts, None).expect("entry");
    assert!(matches!(
        e,
        Some(Entry {
            kind: Kind::File { size: 1, .. },
            ..
        })
    ));
    let (sub, _) = scan_subtree(root, &rel("real/x"), &opts, None).expect("subtree");
    assert_eq!(paths(&sub), ["real/x", "real/x/f"]);
}

#[test]
fn a_root_that_is_a_symlink_is_followed() {
    let d = tempfile::tempdir().expect("tempdir");
    fs::create_dir(d.path().join("tree")).expect("mkdir");
    fs::write(d.path().join("tree/f"), b"f").expect("write");
    symlink("tree", d.path().join("root")).expect("symlink");
    let m = scan(&d.path().join("root"), &ScanOptions::default()).expect("scan");
    assert_eq!(paths(&m.entries), [".", "f"]);
}

#[test]
fn trees_deeper_than_the_held_descriptors_are_walked_whole() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut dir = d.path().to_path_buf();
    let mut want = vec![".".to_string()];
    let mut rel = String::new();
    // At every level: a file before the subdirectory and one after it, so
    // the walk goes on in a directory after walking a subdirectory.
    for _ in 0..FD_DEPTH + 4 {
        fs::write(dir.join("a"), b"a").expect("write");
        fs::write(dir.join("z"), b"z").expect("write");
        dir.push("m");
        fs::create_dir(&dir).expect("mkdir");
        let sep = if rel.is_empty() { "" } else { "/" };
        want.push(format!("{rel}{sep}a"));
        want.push(format!("{rel}{sep}m"));
        rel = format!("{rel}{sep}m");
    }
    let m = scan(d.path(), &ScanOptions::default()).expect("scan");
    let mut want: Vec<RelPath> = want
        .iter()
        .map(|p| {
            if p == "." {
                RelPath::root()
            } else {
                self::rel(p)
            }
        })
        .collect();
    for p in want.clone() {
        if p.as_bytes().ends_with(b"a") {
            let (dir, _) = p.split_last().expect("a parent");
            want.push(dir.join(b"z").expect("a path"));
        }
    }
    want.sort();
    let got: Vec<&RelPath> = m.entries.iter().map(|e| &e.path).collect();
    assert_eq!(got, want.iter().collect::<Vec<_>>());
}

fn run(cmd: &mut Command) {
    let st = cmd.status().expect("run");
    assert!(st.success(), "{cmd:?}");
}

/// A tree with ACLs (access and default), user.* and trusted.* xattrs on
/// files, directories and symlinks, and an xattr list and value longer than
/// the first buffers.
fn xattr_tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path();
    fs::create_dir(root.join("dir")).expect("mkdir");
    fs::write(root.join("dir/f"), b"f").expect("write");
    fs::write(root.join("plain"), b"p").expect("write");
    fs::write(root.join("many"), b"m").expect("write");
    symlink("plain", root.join("link")).expect("symlink");
    run(Command::new("setfacl")
        .args(["-m", "u:1234:rw,g:2345:r"])
        .arg(root.join("dir/f")));
    run(Command::new("setfacl")
        .args(["-d", "-m", "u:1234:rx"])
        .arg(root.join("dir")));
    run(Command::new("setfacl")
        .args(["-m", "u:1234:rx"])
        .arg(root.join("dir")));
    xattr::set(root.join("dir/f"), "user.comment", b"hello").expect("setxattr");
    xattr::set(root.join("dir"), "trusted.tag", b"\0binary\xff").expect("setxattr");
    xattr::set(root.join("link"), "trusted.on-link", b"l").expect("setxattr");
    xattr::set(root.join("plain"), "user.big", &vec![7u8; 3_000]).expect("setxattr");
    for i in 0..40 {
        let name = format!("user.a-rather-long-attribute-name-number-{i:03}");
        xattr::set(root.join("many"), name, b"").expect("setxattr");
    }
    d
}

/// Every entry's xattrs read in `dir` by name, against the path reader's.
fn check_xattrs_at(root: &Path) {
    let top = fsat::open_dir_at(
        rustix::fs::CWD,
        &CString::new(root.as_os_str().as_bytes()).expect("c"),
    )
    .expect("open root");
    let sub = fsat::open_dir_at(top.as_fd(), c"dir").expect("open dir");
    let mut list = Vec::new();
    let cases: [(BorrowedFd<'_>, &CStr, &str); 5] = [
        (top.as_fd(), c"dir", "dir"),
        (sub.as_fd(), c"f", "dir/f"),
        (top.as_fd(), c"link", "link"),
        (top.as_fd(), c"plain", "plain"),
        (top.as_fd(), c"many", "many"),
    ];
    for (dir, name, path) in cases {
        let p = root.join(path);
        let at = meta::read_xattrs_at(dir, name, || p.clone(), &mut list).expect("xattrs at");
        let by_path = meta::read_xattrs(&p).expect("xattrs by path");
        assert_eq!(at, by_path, "{path}");
        assert!(!at.is_empty(), "{path} has xattrs");
    }
    let mut names = |path: &str| -> Vec<Vec<u8>> {
        meta::read_xattrs_at(
            top.as_fd(),
            &CString::new(path).expect("c"),
            || root.join(path),
            &mut list,
        )
        .expect("xattrs")
        .into_iter()
        .map(|x| x.name)
        .collect()
    };
    assert_eq!(
        names("dir"),
        [meta::ACL_ACCESS, meta::ACL_DEFAULT, b"trusted.tag"]
    );
    assert_eq!(names("link"), [b"trusted.on-link"]);
    assert_eq!(names("many").len(), 40);
}

#[test]
fn xattrs_read_at_a_directory_are_the_path_reader_s() {
    let d = xattr_tree();
    check_xattrs_at(d.path());
}

#[test]
fn xattrs_fall_back_to_paths_without_listxattrat() {
    let d = xattr_tree();
    fsat::NO_XATTRAT_HERE.set(true);
    check_xattrs_at(d.path());
    fsat::NO_XATTRAT_HERE.set(false);
}

#[test]
fn a_scan_reads_the_same_xattrs_with_and_without_listxattrat() {
    let d = xattr_tree();
    let opts = ScanOptions::default();
    let at = scan(d.path(), &opts).expect("scan");
    fsat::NO_XATTRAT_HERE.set(true);
    let by_path = scan(d.path(), &opts).expect("scan");
    fsat::NO_XATTRAT_HERE.set(false);
    assert_eq!(at, by_path);
    let f = at.get(&rel("dir/f")).expect("dir/f").1;
    let names: Vec<&[u8]> = f.meta.xattrs.iter().map(|x| &x.name[..]).collect();
    assert_eq!(names, [meta::ACL_ACCESS, b"user.comment"]);
}

#[test]
fn stat_at_gives_what_std_s_stat_gives() {
    use std::os::unix::fs::MetadataExt;
    let d = xattr_tree();
    let root = d.path();
    let top = fsat::open_dir_at(
        rustix::fs::CWD,
        &CString::new(root.as_os_str().as_bytes()).expect("c"),
    )
    .expect("open root");
    let dev = fsat::open_dir_at(rustix::fs::CWD, c"/dev").expect("open /dev");
    let cases: [(BorrowedFd<'_>, &CStr, PathBuf); 4] = [
        (top.as_fd(), c"dir", root.join("dir")),
        (top.as_fd(), c"plain", root.join("plain")),
        (top.as_fd(), c"link", root.join("link")),
        (dev.as_fd(), c"null", PathBuf::from("/dev/null")),
    ];
    for (dir, name, path) in cases {
        let at = fsat::stat_at(dir, name).expect("stat at");
        let st = fs::symlink_metadata(&path).expect("stat");
        assert_eq!(at.meta(), meta::from_stat(&st), "{}", path.display());
        assert_eq!(at.stamp(), Stamp::of(&st), "{}", path.display());
        assert_eq!((at.nlink, at.rdev), (st.nlink() as u32, st.rdev()));
        assert_eq!(at.kind, FileType::from_raw_mode(st.mode()));
    }
}

/// The paths whose xattrs a scan with `index` lists, and its entries.
fn listed(root: &Path, index: &HashIndex) -> (Vec<String>, Vec<Entry>) {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let entries = scan_indexed(root, Some(index), move |step, p| {
        if step == "xattrs" {
            s.lock().expect("lock").push(p.to_string());
        }
    });
    let seen = seen.lock().expect("lock").clone();
    (seen, entries)
}

/// Files the index knows as bare at their stamp are not asked for xattrs;
/// an xattr or ACL set since moves the ctime, and the next scan lists it.
#[test]
fn files_known_bare_at_their_stamp_skip_the_xattr_listing() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path();
    fs::create_dir(root.join("d")).expect("mkdir");
    for f in ["d/a", "d/b", "c"] {
        fs::write(root.join(f), f).expect("write");
    }
    xattr::set(root.join("d/b"), "user.k", b"v").expect("setxattr");
    let mut ix = HashIndex::in_memory();
    let (m, r) = scan_with(root, &ScanOptions::default(), Some(&ix)).expect("scan");
    // as if hashed long ago: the stamps are trusted
    ix.remember_scan(r.hashed.clone(), &m, now_ns() + 10 * crate::index::RACY_NS);
    let (seen, entries) = listed(root, &ix);
    assert_eq!(seen, ["d", "d/b"], "bare files were listed");
    assert_eq!(entries, m.entries, "the skip changed the manifest");

    // past the coarse clock's tick, as the index's racy rule ensures in use
    std::thread::sleep(std::time::Duration::from_millis(50));
    xattr::set(root.join("d/a"), "user.new", b"1").expect("setxattr");
    let status = Command::new("setfacl")
        .args(["-m", "u:65534:r"])
        .arg(root.join("c"))
        .status()
        .expect("setfacl");
    assert!(status.success());
    let (seen, entries) = listed(root, &ix);
    assert_eq!(seen, ["c", "d", "d/a", "d/b"]);
    let xattrs = |p: &str| {
        let e = entries.iter().find(|e| e.path.to_string() == p);
        e.map(|e| {
            e.meta
                .xattrs
                .iter()
                .map(|x| x.name.clone())
                .collect::<Vec<_>>()
        })
    };
    assert_eq!(xattrs("d/a"), Some(vec![b"user.new".to_vec()]));
    assert_eq!(xattrs("c"), Some(vec![b"system.posix_acl_access".to_vec()]));
}

/// Scans `root` with `opts`, on one thread or near the root on every core.
fn scan_with_threads(root: &Path, opts: &ScanOptions, parallel: bool) -> (Vec<Entry>, ScanReport) {
    let mut w = Walker::new(root, opts, None);
    w.parallel = parallel;
    assert_eq!(w.visit(&RelPath::root()).expect("root"), Some(true));
    w.walk(&RelPath::root()).expect("walk");
    w.finish().expect("finish")
}

/// The walk near the root on every core gives the manifest and report of
/// one thread's walk: subtrees put back in order, names of an inode linked
/// to the first in manifest order across subtrees, databases, temp files
/// and excluded paths listed in manifest order.
#[test]
fn the_parallel_walk_gives_the_single_threaded_walks_manifest() {
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path();
    for dir in ["a/b/c/d/e", "a/b2", "a-b/x", "z/y/x/w", "empty", "skip/me"] {
        fs::create_dir_all(root.join(dir)).expect("mkdir");
    }
    for (i, f) in [
        "a/1",
        "a/b/c/d/e/2",
        "a-b/x/3",
        "z/y/x/w/4",
        "z/5",
        "skip/me/6",
    ]
    .iter()
    .enumerate()
    {
        fs::write(root.join(f), vec![b'x'; i * 10]).expect("write");
    }
    // one inode named in three subtrees, the first name deepest
    fs::write(root.join("a/b/c/d/e/linked"), b"l").expect("write");
    fs::hard_link(root.join("a/b/c/d/e/linked"), root.join("a-b/x/l2")).expect("link");
    fs::hard_link(root.join("a/b/c/d/e/linked"), root.join("z/l3")).expect("link");
    symlink("../a/1", root.join("z/y/s")).expect("symlink");
    fs::write(root.join("a/b2/.understudy.tmp.0123456789abcdef"), b"t").expect("write");
    fs::write(root.join("z/y/.understudy.tmp.fedcba9876543210"), b"t").expect("write");
    for db in ["a/b/app.db", "a/zz.db", "z/y/x/other.db"] {
        let c = rusqlite::Connection::open(root.join(db)).expect("db");
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .expect("sql");
    }
    let opts = ScanOptions {
        filter: crate::filter::Filter::new(&["skip/".into(), "a/b/c/d/e/2".into()])
            .expect("filter"),
        databases: Some(std::sync::Arc::new(DbDetect::default())),
        ..Default::default()
    };
    let (one, r1) = scan_with_threads(root, &opts, false);
    let (par, rp) = scan_with_threads(root, &opts, true);
    assert_eq!(paths(&par), paths(&one));
    assert_eq!(par, one);
    let link = |e: &[Entry], p: &str| e.iter().find(|e| e.path == rel(p)).map(|e| e.kind.clone());
    assert!(matches!(
        link(&par, "a/b/c/d/e/linked"),
        Some(Kind::File { .. })
    ));
    for p in ["a-b/x/l2", "z/l3"] {
        assert_eq!(
            link(&par, p),
            Some(Kind::HardLink {
                target: rel("a/b/c/d/e/linked")
            })
        );
    }
    assert_eq!(
        rp.databases,
        [rel("a/b/app.db"), rel("a/zz.db"), rel("z/y/x/other.db")]
    );
    assert_eq!(rp.databases, r1.databases);
    assert_eq!(rp.temp_files, r1.temp_files);
    assert_eq!(rp.temp_files.len(), 2);
    assert_eq!(rp.excluded, r1.excluded);
    assert_eq!(rp.multi_linked, r1.multi_linked);
    let hashed = |r: &ScanReport| {
        r.hashed
            .iter()
            .map(|h| (h.0.clone(), h.2))
            .collect::<Vec<_>>()
    };
    assert_eq!(hashed(&rp), hashed(&r1));
}

/// Any name of a file the process holds as a database (a hard link) is taken
/// for one without being read: closing a descriptor of it would drop the
/// holder's POSIX locks. (The file here has no database header: read, it
/// would not be one.)
#[test]
fn every_name_of_a_held_database_is_one_unread() {
    use std::os::unix::fs::MetadataExt as _;
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("held.db"), vec![7u8; 1024]).unwrap();
    std::fs::hard_link(t.path().join("held.db"), t.path().join("other.db")).unwrap();
    std::fs::write(t.path().join("plain"), vec![7u8; 1024]).unwrap();
    let scan = |files: &[(u64, u64)]| {
        let detect = DbDetect::default();
        detect.known_files.write().unwrap().extend(files);
        // (each name listed: with hard links, further names become links)
        let opts = ScanOptions {
            databases: Some(std::sync::Arc::new(detect)),
            hard_links: false,
            ..Default::default()
        };
        let (_, report) = scan_with(t.path(), &opts, None).unwrap();
        report.databases
    };
    assert!(scan(&[]).is_empty());
    let m = std::fs::metadata(t.path().join("held.db")).unwrap();
    assert_eq!(
        scan(&[(m.dev(), m.ino())]),
        vec![rel("held.db"), rel("other.db")]
    );
}

#[test]
fn index_spares_rehashing_and_sees_changes() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::fs::write(d.path().join("sub/a"), b"one").unwrap();
    std::fs::write(d.path().join("b"), b"two").unwrap();
    let opts = ScanOptions::default();
    let mut ix = HashIndex::in_memory();
    let (m1, r1) = scan_with(d.path(), &opts, Some(&ix)).unwrap();
    assert_eq!(r1.hashed.len(), 2);
    // pretend the hashes are old enough to be trusted
    for (p, s, h) in r1.hashed {
        ix.record(&p, s, h, now_ns() + 10 * crate::index::RACY_NS);
    }
    let (m2, r2) = scan_with(d.path(), &opts, Some(&ix)).unwrap();
    assert!(r2.hashed.is_empty(), "unchanged files were rehashed");
    assert_eq!(m1, m2);
    std::fs::write(d.path().join("b"), b"TWO").unwrap();
    let (m3, r3) = scan_with(d.path(), &opts, Some(&ix)).unwrap();
    assert_eq!(r3.hashed.len(), 1);
    assert_ne!(m2.root_hash(), m3.root_hash());
}

#[test]
fn excluded_paths_are_not_scanned() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("cache/x")).unwrap();
    std::fs::write(d.path().join("cache/x/f"), b"1").unwrap();
    std::fs::write(d.path().join("keep"), b"1").unwrap();
    let opts = ScanOptions {
        filter: Filter::new(&["cache/".into()]).unwrap(),
        ..Default::default()
    };
    let m = scan(d.path(), &opts).unwrap();
    let paths: Vec<String> = m.entries.iter().map(|e| e.path.to_string()).collect();
    assert_eq!(paths, [".", "keep"]);
    let (sub, _) =
        scan_subtree(d.path(), &RelPath::new(&b"cache"[..]).unwrap(), &opts, None).unwrap();
    assert!(sub.is_empty());
}

/// Options leaving `cache/` out, calling `hook` before each listing.
fn without_cache(hook: impl Fn(&Path, BorrowedFd<'_>) + Send + Sync + 'static) -> ScanOptions {
    ScanOptions {
        filter: Filter::new(&["cache/".into()]).unwrap(),
        on_dir: Some(super::DirHook(std::sync::Arc::new(hook))),
        ..Default::default()
    }
}

/// A watcher's hook is called for every directory the walk lists, before it
/// lists it (deep ones and those walked on other threads too), and for no
/// excluded directory; a subtree's scan calls it for the subtree's own.
#[test]
fn every_directory_listed_is_announced_before_its_names() {
    use std::sync::{Arc, Mutex};
    let d = tempfile::tempdir().unwrap();
    let root = d.path().to_path_buf();
    for dir in ["a/b/c/d/e/f", "g/h", "cache/x", "i"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join("a/b/file"), b"1").unwrap();
    let seen = Arc::new(Mutex::new(Vec::<PathBuf>::new()));
    let log = seen.clone();
    let opts = without_cache(move |p: &Path, fd: BorrowedFd<'_>| {
        // the descriptor is the directory named
        let st = rustix::fs::fstat(fd).unwrap();
        let named = fs::symlink_metadata(p).unwrap();
        assert_eq!(st.st_ino, std::os::unix::fs::MetadataExt::ino(&named));
        log.lock().unwrap().push(p.to_path_buf());
    });
    let m = scan(&root, &opts).unwrap();
    let mut dirs: Vec<PathBuf> = m
        .entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::Dir))
        .map(|e| abs(&root, &e.path))
        .collect();
    let mut got = std::mem::take(&mut *seen.lock().unwrap());
    dirs.sort();
    got.sort();
    assert_eq!(got, dirs, "each directory listed, once; none excluded");
    assert!(!got.iter().any(|p| p.starts_with(root.join("cache"))));
    // before the listing: the hook and the walk's own record one sequence
    let order = Arc::new(Mutex::new(Vec::<String>::new()));
    let o = order.clone();
    let opts = without_cache(move |p: &Path, _: BorrowedFd<'_>| {
        o.lock().unwrap().push(format!("dir {}", p.display()));
    });
    let mut w = Walker::new(&root, &opts, None);
    w.parallel = false;
    let (o2, r2) = (order.clone(), root.clone());
    w.hook = Some(Box::new(move |step: &str, p: &RelPath| {
        if step == "names" {
            o2.lock()
                .unwrap()
                .push(format!("names {}", abs(&r2, p).display()));
        }
    }));
    w.visit(&RelPath::root()).unwrap();
    w.walk(&RelPath::root()).unwrap();
    let listed = std::mem::take(&mut *order.lock().unwrap());
    assert_eq!(listed.len(), 2 * dirs.len(), "{listed:?}");
    for pair in listed.chunks(2) {
        let dir = pair[0].strip_prefix("dir ").expect("the hook first");
        assert_eq!(pair[1], format!("names {dir}"));
    }
    let (sub, _) = scan_subtree(&root, &RelPath::new(&b"g"[..]).unwrap(), &opts, None).unwrap();
    assert_eq!(sub.len(), 2);
    let g = |d: &str| format!("dir {}", root.join(d).display());
    assert_eq!(*order.lock().unwrap(), [g("g"), g("g/h")]);
}
