//! Races on the replica (issue 5): a thread of the test swaps directories and
//! files for symlinks to a sentinel directory outside the root while a mirror
//! runs; hard links from the replica to outside files. Nothing outside the root
//! changes, whatever the mirror itself reports. The sentinel is a directory of
//! the test's own, never `/`.

use crate::util::*;
use std::os::unix::fs::{MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

struct Setup {
    _t: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    outside: PathBuf,
}

fn setup() -> Setup {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, outside) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("outside"),
    );
    for d in [&src, &dst, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    sh(&format!(
        "cd {o} && mkdir -p sub/deeper && echo sentinel > sentinel && echo deep > sub/deeper/f \
         && chmod 640 sentinel && chown 4321:4321 sentinel sub",
        o = outside.display()
    ));
    Setup {
        _t: t,
        src,
        dst,
        outside,
    }
}

/// Runs `swap` in a loop on another thread while `work` runs; returns how many
/// swaps happened during the work.
fn racing(swap: impl Fn() + Send + 'static, work: impl FnOnce()) -> usize {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let racer = {
        let (stop, count) = (stop.clone(), count.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                swap();
                count.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The racer is running (a thread may be slow to get going on a loaded
    // machine) before the work starts; only swaps during the work count.
    eventually("the racer's first swap", Duration::from_secs(10), || {
        count.load(Ordering::Relaxed) > 0
    });
    let base = count.load(Ordering::Relaxed);
    work();
    stop.store(true, Ordering::Relaxed);
    racer.join().unwrap();
    count.load(Ordering::Relaxed) - base
}

/// `sync-cli mirror`, which may fail under the race but must not crash.
fn mirror_racing(src: &Path, dst: &Path) {
    let out = cli(&["mirror".as_ref(), src.as_os_str(), dst.as_os_str()]);
    assert!(
        matches!(out.status.code(), Some(0 | 2 | 3)),
        "mirror crashed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Swaps `path` with a symlink to `to` and back (the real entry parked at
/// `path.real`).
fn swapper(path: PathBuf, to: PathBuf) -> impl Fn() + Send + 'static {
    move || {
        let parked = path.with_extension("real");
        if std::fs::rename(&path, &parked).is_ok() {
            let _ = symlink(&to, &path);
            std::thread::yield_now();
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::rename(&parked, &path);
        }
    }
}

#[test]
fn parent_directory_swapped_for_a_symlink_during_transfer() {
    let s = setup();
    std::fs::create_dir_all(s.src.join("d")).unwrap();
    for i in 0..300 {
        std::fs::write(s.src.join(format!("d/f{i:03}")), random_bytes(20 << 10, i)).unwrap();
    }
    std::fs::create_dir_all(s.dst.join("d")).unwrap();
    let before = snapshot(&s.outside);
    let mut swaps = 0;
    for round in 0..3u64 {
        if round > 0 {
            sh(&format!(
                "cd {} && for f in d/f0*; do echo {round} >> $f; done",
                s.src.display()
            ));
        }
        swaps += racing(swapper(s.dst.join("d"), s.outside.clone()), || {
            mirror_racing(&s.src, &s.dst)
        });
        assert_eq!(
            snapshot(&s.outside),
            before,
            "round {round}: the outside changed"
        );
    }
    assert!(swaps > 10, "the race never ran ({swaps} swaps)");
    // Without the race, the mirror converges.
    let _ = std::fs::remove_file(s.dst.join("d"));
    mirror_ok(&s.src, &s.dst);
    assert_identical(&s.src, &s.dst);
    assert!(temp_files(&s.dst).is_empty());
}

#[test]
fn leaf_swapped_for_a_symlink_before_metadata() {
    let s = setup();
    for i in 0..500 {
        std::fs::write(s.src.join(format!("f{i:03}")), format!("file {i}")).unwrap();
    }
    mirror_ok(&s.src, &s.dst);
    // Only the metadata changes: mode and owner are set on the replica's files.
    sh(&format!(
        "cd {} && chmod 600 f* && chown 77:77 f*",
        s.src.display()
    ));
    let before = snapshot(&s.outside);
    let swaps = racing(
        {
            let (dst, target) = (s.dst.clone(), s.outside.join("sentinel"));
            let n = AtomicUsize::new(0);
            move || {
                let i = n.fetch_add(7, Ordering::Relaxed) % 500;
                swapper(dst.join(format!("f{i:03}")), target.clone())()
            }
        },
        || mirror_racing(&s.src, &s.dst),
    );
    assert!(swaps > 10, "the race never ran ({swaps} swaps)");
    assert_eq!(snapshot(&s.outside), before, "the outside changed");
}

#[test]
fn hard_link_to_an_outside_file_is_replaced_not_written() {
    let s = setup();
    let target = s.outside.join("sentinel");
    // content differs
    std::fs::hard_link(&target, s.dst.join("h")).unwrap();
    std::fs::write(s.src.join("h"), b"new content from the source").unwrap();
    // same content and mtime, another mode and owner
    std::fs::write(s.outside.join("twin"), b"same bytes").unwrap();
    std::fs::hard_link(s.outside.join("twin"), s.dst.join("m")).unwrap();
    sh(&format!(
        "cd {src} && printf 'same bytes' > m && touch -r {o}/twin m && chown 99:99 m && chmod 4755 m",
        src = s.src.display(),
        o = s.outside.display()
    ));
    let before = snapshot(&s.outside);
    mirror_ok(&s.src, &s.dst);
    let after = snapshot(&s.outside);
    // the outside inodes lost their second name and nothing else
    let strip = |v: Vec<Snap>| -> Vec<Snap> {
        v.into_iter()
            .map(|(p, m, u, g, i, _, c)| (p, m, u, g, i, 0, c))
            .collect()
    };
    assert_eq!(
        strip(after),
        strip(before.clone()),
        "an outside inode changed"
    );
    assert_eq!(std::fs::metadata(&target).unwrap().nlink(), 1);
    assert_eq!(
        std::fs::metadata(s.outside.join("twin")).unwrap().nlink(),
        1
    );
    assert_eq!(
        std::fs::read(s.dst.join("h")).unwrap(),
        b"new content from the source"
    );
    assert_eq!(
        std::fs::metadata(s.dst.join("m")).unwrap().mode() & 0o7777,
        0o4755
    );
    assert_identical(&s.src, &s.dst);
}

#[test]
fn recursive_delete_racing_a_subdirectory_swapped_for_a_symlink() {
    let s = setup();
    std::fs::write(s.src.join("kept"), b"kept").unwrap();
    let before = snapshot(&s.outside);
    let mut swaps = 0;
    for _ in 0..4 {
        // the source has no `gone`: the mirror deletes it recursively
        sh(&format!(
            "mkdir -p {d}/gone/sub/a/b && cd {d}/gone/sub && for i in $(seq 1 400); do echo $i > f$i; done && cp f1 a/b/x",
            d = s.dst.display()
        ));
        swaps += racing(swapper(s.dst.join("gone/sub"), s.outside.clone()), || {
            mirror_racing(&s.src, &s.dst)
        });
        assert_eq!(snapshot(&s.outside), before, "the outside changed");
    }
    assert!(swaps > 10, "the race never ran ({swaps} swaps)");
    let _ = std::fs::remove_file(s.dst.join("gone/sub"));
    mirror_ok(&s.src, &s.dst);
    assert!(!s.dst.join("gone").exists());
    assert_eq!(snapshot(&s.outside), before);
}
