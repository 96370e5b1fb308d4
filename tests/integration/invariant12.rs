//! Issue 10, invariant 12 ("nothing grants more in between") and the temp-name
//! sweep, black-box: replica databases hard-linked from outside the root,
//! metadata changes watched by another uid, foreign entries with temp-like
//! names, excluded paths under a directory the source removed.

use crate::util::*;
use rusqlite::Connection;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn rows(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap()
}

fn add_rows(db: &Path, n: i64) {
    let c = Connection::open(db).unwrap();
    for i in 0..n {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("row {i:04} {}", "x".repeat(200))],
        )
        .unwrap();
    }
}

#[test]
fn database_hard_linked_from_outside_is_replaced_not_written() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst, outside) = (
        t.path().join("src"),
        t.path().join("dst"),
        t.path().join("outside"),
    );
    for d in [&src, &dst, &outside] {
        std::fs::create_dir_all(d).unwrap();
    }
    for (name, mode) in [("a.db", "WAL"), ("b.db", "DELETE")] {
        let c = Connection::open(src.join(name)).unwrap();
        c.execute_batch(&format!(
            "PRAGMA journal_mode={mode}; CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);"
        ))
        .unwrap();
        drop(c);
        add_rows(&src.join(name), 50);
    }
    mirror_ok(&src, &dst);
    for name in ["a.db", "b.db"] {
        assert_eq!(rows(&dst.join(name)), 50);
        std::fs::hard_link(dst.join(name), outside.join(name)).unwrap();
    }
    let before: Vec<Vec<u8>> = ["a.db", "b.db"]
        .iter()
        .map(|n| std::fs::read(outside.join(n)).unwrap())
        .collect();
    for name in ["a.db", "b.db"] {
        add_rows(&src.join(name), 30);
    }
    mirror_ok(&src, &dst);
    for (i, name) in ["a.db", "b.db"].iter().enumerate() {
        assert!(
            std::fs::read(outside.join(name)).unwrap() == before[i],
            "{name}: the outside copy was written through its hard link"
        );
        assert_eq!(
            rows(&dst.join(name)),
            80,
            "{name}: the replica has the new rows"
        );
        assert_eq!(
            std::fs::metadata(dst.join(name)).unwrap().nlink(),
            1,
            "{name}"
        );
        assert_eq!(
            std::fs::metadata(outside.join(name)).unwrap().nlink(),
            1,
            "{name}"
        );
    }
    // Unlinked now: the next change is applied in place again, as usual.
    add_rows(&src.join("a.db"), 5);
    let ino = std::fs::metadata(dst.join("a.db")).unwrap().ino();
    mirror_ok(&src, &dst);
    assert_eq!(rows(&dst.join("a.db")), 85);
    assert_eq!(std::fs::metadata(dst.join("a.db")).unwrap().ino(), ino);
    assert!(temp_files(&dst).is_empty());
}

/// `sync-cli mirror` that must complete (warnings allowed: exit 0 or 3).
fn mirror_done(src: &Path, dst: &Path) -> serde_json::Value {
    let out = cli(&[
        "mirror".as_ref(),
        src.as_os_str(),
        dst.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "mirror failed ({:?}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("summary JSON")
}

#[test]
fn foreign_entries_with_temp_like_names_are_kept_and_never_wedge() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(src.join("sub/a"), b"one").unwrap();
    sh(&format!("chown 4242:4242 {}/sub", src.display()));
    mirror_ok(&src, &dst);
    // A local user who owns `sub` on the replica; and a temp file of ours
    // left by a crash.
    sh(&format!(
        "cd {d}/sub && mkdir .understudy.tmp.mine && echo mine > .understudy.tmp.mine/f \
         && echo notes > .understudy.tmp.notes && chown -R 4242:4242 .understudy.tmp.mine .understudy.tmp.notes \
         && echo crash > .understudy.tmp.0123456789abcdef",
        d = dst.display()
    ));
    for round in 0..2 {
        std::fs::write(src.join("sub/a"), format!("round {round}")).unwrap();
        let s = mirror_done(&src, &dst);
        assert_eq!(
            std::fs::read_to_string(dst.join("sub/a")).unwrap(),
            format!("round {round}"),
            "{s}"
        );
        assert_eq!(
            std::fs::read_to_string(dst.join("sub/.understudy.tmp.mine/f")).unwrap(),
            "mine\n"
        );
        assert_eq!(
            std::fs::read_to_string(dst.join("sub/.understudy.tmp.notes")).unwrap(),
            "notes\n"
        );
        assert!(!dst.join("sub/.understudy.tmp.0123456789abcdef").exists());
        assert!(
            s.to_string().contains(".understudy.tmp.mine"),
            "warned: {s}"
        );
    }
}

#[test]
fn metadata_change_never_opens_the_file_to_the_new_group() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    for d in [&src, &dst] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(src.join("f"), b"secret").unwrap();
    sh(&format!(
        "chmod 755 {t} {s} {d} && chown 0:0 {s}/f && chmod 640 {s}/f",
        t = t.path().display(),
        s = src.display(),
        d = dst.display()
    ));
    mirror_ok(&src, &dst);
    sh(&format!(
        "chown 0:4242 {s}/f && chmod 600 {s}/f",
        s = src.display()
    ));
    // An observer as uid/gid 4242 opens the replica's file in a loop.
    let stop = t.path().join("stop");
    let observer = std::process::Command::new("setpriv")
        .args(["--reuid=4242", "--regid=4242", "--clear-groups", "sh", "-c"])
        .arg(format!(
            "n=0; while [ ! -e {stop} ]; do if cat {f} >/dev/null 2>&1; then n=$((n+1)); fi; done; echo $n",
            stop = stop.display(),
            f = dst.join("f").display()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The replica stops right after the chown, as a kill would: the state in
    // between stays for the observer to try.
    let out = run(std::process::Command::new(bin("sync-cli"))
        .args(["mirror".as_ref(), src.as_os_str(), dst.as_os_str()])
        .env("UNDERSTUDY_FAILPOINT", "metadata"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failpoint metadata"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::write(&stop, b"").unwrap();
    let seen = observer.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout).trim(),
        "0",
        "uid/gid 4242 opened the file while its metadata changed"
    );
    mirror_ok(&src, &dst);
    let m = std::fs::metadata(dst.join("f")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 4242, 0o600));
}

#[test]
fn excluded_paths_survive_their_parent_removed_or_turned_into_a_file() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&dst).unwrap();
    sh(&format!(
        "mkdir -p {s}/config {s}/other && echo sys > {s}/config/system.xml && echo x > {s}/other/x",
        s = src.display()
    ));
    let (a, b) = (t.path().join("id-a"), t.path().join("id-b"));
    let (a_id, b_id) = (keygen(&a), keygen(&b));
    let ex = [
        "--exclude",
        "/config/branding.xml",
        "--exclude",
        "/other/keep.xml",
    ];
    let agent = replica(&dst, &b, &a_id, &ex);
    let push = || {
        run(std::process::Command::new(bin("sync-cli"))
            .arg("push")
            .arg(&src)
            .args(["--to", &agent.addr, "--peer", &b_id, "--json", "--identity"])
            .arg(&a)
            .args(ex))
    };
    assert!(push().status.success());
    std::fs::write(dst.join("config/branding.xml"), b"backup server").unwrap();
    std::fs::write(dst.join("other/keep.xml"), b"mine").unwrap();
    sh(&format!(
        "cd {s} && rm -r config other && echo now-a-file > other && echo new > new.txt",
        s = src.display()
    ));
    let out = push();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(dst.join("config/branding.xml")).unwrap(),
        b"backup server"
    );
    assert!(
        !dst.join("config/system.xml").exists(),
        "the rest is removed"
    );
    assert_eq!(std::fs::read(dst.join("other/keep.xml")).unwrap(), b"mine");
    assert!(!dst.join("other/x").exists());
    assert_eq!(
        std::fs::read(dst.join("new.txt")).unwrap(),
        b"new\n",
        "the rest of the round applies"
    );
    assert!(
        text.contains("other"),
        "the refused type change is a warning: {text}"
    );
    // Later rounds keep them too, and do not fail.
    let again = push();
    assert!(matches!(again.status.code(), Some(0 | 3)));
    assert_eq!(
        std::fs::read(dst.join("config/branding.xml")).unwrap(),
        b"backup server"
    );
    assert_eq!(std::fs::read(dst.join("other/keep.xml")).unwrap(), b"mine");
}

/// Waits until `ok()` holds; panics with `what` after `secs`.
fn wait_for(secs: u64, what: &str, ok: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "not after {secs} s: {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn excluded_paths_survive_their_parent_removed_with_continuous_agents() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&dst).unwrap();
    sh(&format!(
        "mkdir -p {s}/config {s}/other && echo sys > {s}/config/system.xml && echo x > {s}/other/x \
         && mkdir -p {d}/config {d}/other && echo banner > {d}/config/branding.xml && echo mine > {d}/other/keep.xml",
        s = src.display(),
        d = dst.display()
    ));
    let (sid, s_id, rid, r_id) = identities(t.path());
    let ex = [
        "--exclude",
        "/config/branding.xml",
        "--exclude",
        "/other/keep.xml",
    ];
    let patterns = vec![
        "/config/branding.xml".to_string(),
        "/other/keep.xml".to_string(),
    ];
    let rep = replica(&dst, &rid, &s_id, &ex);
    let _src = source(&src, &sid, &r_id, &rep.addr, &ex);
    wait_converged(&src, &dst, 30, &patterns);
    sh(&format!(
        "cd {s} && rm -r config other && echo now-a-file > other && echo new > new.txt",
        s = src.display()
    ));
    wait_for(30, "the round applied", || {
        std::fs::read(dst.join("new.txt")).is_ok_and(|b| b == b"new\n")
            && !dst.join("config/system.xml").exists()
            && !dst.join("other/x").exists()
    });
    assert_eq!(
        std::fs::read(dst.join("config/branding.xml")).unwrap(),
        b"banner\n"
    );
    assert_eq!(
        std::fs::read(dst.join("other/keep.xml")).unwrap(),
        b"mine\n"
    );
    // Not wedged: later changes still arrive, the kept paths stay.
    std::fs::write(src.join("new.txt"), b"newer").unwrap();
    wait_for(30, "a later change", || {
        std::fs::read(dst.join("new.txt")).is_ok_and(|b| b == b"newer")
    });
    assert_eq!(
        std::fs::read(dst.join("config/branding.xml")).unwrap(),
        b"banner\n"
    );
    assert_eq!(
        std::fs::read(dst.join("other/keep.xml")).unwrap(),
        b"mine\n"
    );
}

/// The continuous agents keep a live database with a second name in the tree
/// (one that sorts first): each commit reaches the replica through the name
/// SQLite uses, and both names stay one inode there, written in place.
#[test]
fn agents_keep_a_hard_linked_live_database_linked() {
    let p = pair();
    std::fs::create_dir_all(p.src.join("z")).unwrap();
    let live = p.src.join("z/live.db");
    let c = Connection::open(&live).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE t(k INTEGER PRIMARY KEY, v TEXT);",
    )
    .unwrap();
    std::fs::hard_link(&live, p.src.join("a-link.db")).unwrap();
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let _src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &[]);
    let (dst_live, dst_link) = (p.dst.join("z/live.db"), p.dst.join("a-link.db"));
    let ino = |f: &Path| std::fs::metadata(f).map(|m| m.ino()).ok();
    let mut first = None;
    for n in 1..=3 {
        c.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("row {n} {}", "x".repeat(200))],
        )
        .unwrap();
        eventually(
            &format!("{n} rows under both names"),
            std::time::Duration::from_secs(20),
            || {
                ino(&dst_live).is_some()
                    && ino(&dst_live) == ino(&dst_link)
                    && Connection::open(&dst_live)
                        .and_then(|d| d.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
                        .is_ok_and(|k: i64| k == n)
            },
        );
        first.get_or_insert(ino(&dst_live));
        assert_eq!(first, Some(ino(&dst_live)), "written in place");
    }
    drop(c);
}
