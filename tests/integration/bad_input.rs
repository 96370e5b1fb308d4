//! Issue 2, "Bad input": a clear error naming the cause, a non-zero exit, and the
//! destination as it was.

use crate::util::*;
use std::ffi::OsStr;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn missing_source() {
    let t = tempfile::tempdir().unwrap();
    let out = cli(&[
        "mirror".as_ref(),
        t.path().join("nope").as_os_str(),
        t.path().join("dst").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(e.contains("nope") && e.contains("No such file"), "{e}");
}

#[test]
fn unwritable_destination() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("new"), b"new").unwrap();
    let fs = Tmpfs::new("size=4m");
    std::fs::write(fs.path().join("keep"), b"old").unwrap();
    sh(&format!("mount -o remount,ro {}", fs.path().display()));
    let out = cli(&["mirror".as_ref(), src.as_os_str(), fs.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("Read-only file system"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(fs.path().join("keep")).unwrap(), b"old");
}

#[test]
fn full_destination_disk() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let fs = Tmpfs::new("size=2m");
    let old = random_bytes(600 << 10, 7);
    std::fs::write(fs.path().join("db"), &old).unwrap();
    std::fs::write(src.join("db"), random_bytes(700 << 10, 8)).unwrap();
    std::fs::write(src.join("huge"), random_bytes(4 << 20, 9)).unwrap();
    let out = cli(&["mirror".as_ref(), src.as_os_str(), fs.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("No space left on device"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read(fs.path().join("db")).unwrap(),
        old,
        "old version must be intact"
    );
    assert!(!fs.path().join("huge").exists());
    assert!(
        temp_files(fs.path()).is_empty(),
        "temp files left: {:?}",
        temp_files(fs.path())
    );
}

#[test]
fn source_is_a_file() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("f"), b"x").unwrap();
    let out = cli(&[
        OsStr::new("mirror"),
        t.path().join("f").as_os_str(),
        t.path().join("d").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("not a directory"), "{}", stderr(&out));
}

/// A tree deeper than the process may hold descriptors (1,100 levels under
/// `ulimit -n 1024`, systemd's default soft limit) is mirrored whole: the
/// walks close deep directories before they descend.
#[test]
fn a_tree_deeper_than_the_descriptor_limit_is_mirrored() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    let mut deep = src.clone();
    for i in 0..1100 {
        if i % 100 == 0 {
            std::fs::create_dir_all(&deep).unwrap();
            std::fs::write(deep.join(format!("f{i}")), i.to_string()).unwrap();
        }
        deep.push("d");
    }
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("bottom"), b"deep").unwrap();
    let mirror = || {
        let out = run(std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -n 1024 && exec \"$0\" mirror \"$1\" \"$2\" --json")
            .arg(bin("sync-cli"))
            .arg(&src)
            .arg(&dst));
        assert!(out.status.success(), "{}", stderr(&out));
    };
    mirror();
    let bottom = dst.join(deep.strip_prefix(&src).unwrap()).join("bottom");
    assert_eq!(std::fs::read(bottom).unwrap(), b"deep");
    // and again, with nothing to do: the replica's scan goes as deep
    mirror();
}
