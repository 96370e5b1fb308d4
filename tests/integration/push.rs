//! `sync-agent replica` + `sync-cli push`: pinning, versions, and a real push.

use crate::util::*;
use std::path::Path;
use std::process::Command;

fn push(
    src: &Path,
    addr: &str,
    identity: &Path,
    peer: &str,
    extra: &[&str],
) -> std::process::Output {
    run(Command::new(bin("sync-cli"))
        .arg("push")
        .arg(src)
        .args(["--to", addr, "--peer", peer, "--json"])
        .arg("--identity")
        .arg(identity)
        .args(extra))
}

struct Setup {
    _t: tempfile::TempDir,
    src: std::path::PathBuf,
    dst: std::path::PathBuf,
    a: std::path::PathBuf,
    a_id: String,
    b: std::path::PathBuf,
    b_id: String,
}

fn setup() -> Setup {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(src.join("sub/file"), random_bytes(300_000, 3)).unwrap();
    std::fs::write(dst.join("old"), b"replica data").unwrap();
    let (a, b) = (t.path().join("id-a"), t.path().join("id-b"));
    let (a_id, b_id) = (keygen(&a), keygen(&b));
    Setup {
        _t: t,
        src,
        dst,
        a,
        a_id,
        b,
        b_id,
    }
}

#[test]
fn push_to_a_pinned_replica() {
    let s = setup();
    let agent = replica(&s.dst, &s.b, &s.a_id, &[]);
    let out = push(&s.src, &agent.addr, &s.a, &s.b_id, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for k in [
        "files_total",
        "files_transferred",
        "bytes_total",
        "bytes_sent_wire",
        "elapsed_s",
    ] {
        assert!(sum.get(k).is_some(), "summary lacks {k}: {sum}");
    }
    assert_eq!(sum["files_transferred"], 1);
    assert_identical(&s.src, &s.dst);
    // `id` prints what keygen printed
    let id = cli(&["id".as_ref(), "--dir".as_ref(), s.a.as_os_str()]);
    assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), s.a_id);
}

#[test]
fn wrong_peer_id_is_refused() {
    let s = setup();
    let agent = replica(&s.dst, &s.b, &s.a_id, &[]);
    // We expect the replica to be A (it is B): the source refuses the server.
    let out = push(&s.src, &agent.addr, &s.a, &s.a_id, &[]);
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    // In words (issue 13), not a rustls debug dump, and without colour codes.
    let said = format!("presented id {}, expected {}", s.b_id, s.a_id);
    assert!(e.contains(&said), "{e}");
    assert!(!e.contains("OtherError") && !e.contains('\u{1b}'), "{e}");
    // An unpinned source (B pushing to a replica that allows only A) is refused too.
    let out = push(&s.src, &agent.addr, &s.b, &s.b_id, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(s.dst.join("old")).unwrap(), b"replica data");
    assert!(!s.dst.join("sub").exists());
}

#[test]
fn other_protocol_version_is_refused() {
    let s = setup();
    let agent = replica(&s.dst, &s.b, &s.a_id, &[]);
    let out = push(
        &s.src,
        &agent.addr,
        &s.a,
        &s.b_id,
        &["--protocol-version", "99"],
    );
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    let ours = format!("version {}", proto::PROTOCOL_VERSION);
    assert!(e.contains("version 99") && e.contains(&ours), "{e}");
    assert_eq!(std::fs::read(s.dst.join("old")).unwrap(), b"replica data");
    assert!(!s.dst.join("sub").exists());
}

/// A re-run of `push` with its state directory reads only what changed: no
/// unchanged file is hashed again, and a replica at the pushed cut of a
/// database is sent the changed pages without asking for its page hashes
/// (which `--no-state` does: it received those hashes).
#[test]
fn a_rerun_with_its_state_reads_and_exchanges_only_what_changed() {
    let s = setup();
    let state = s._t.path().join("state");
    let db = s.src.join("app.db");
    let c = wal_table(&db, 8000, 1000);
    let pages: u32 = c.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
    let pages = u64::from(pages);
    // Stamps younger than 2 s are not trusted (a write in the same tick
    // would not move them): let them age, as any real tree's have.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let agent = replica(&s.dst, &s.b, &s.a_id, &[]);
    let with_state = ["--state-dir".as_ref(), state.as_os_str()];
    let run = |extra: &[&std::ffi::OsStr]| -> serde_json::Value {
        let extra: Vec<&str> = extra.iter().map(|a| a.to_str().unwrap()).collect();
        let out = push(&s.src, &agent.addr, &s.a, &s.b_id, &extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = run(&with_state);
    assert_eq!(first["bytes_hashed"], 300_000, "{first}");
    let again = run(&with_state);
    assert_eq!(
        again["bytes_hashed"], 0,
        "unchanged files hashed again: {again}"
    );
    assert_eq!(again["unchanged"], true, "{again}");
    assert_eq!(again["files_transferred"], 0);
    let plain = run(&["--no-state".as_ref()]);
    assert_eq!(plain["bytes_hashed"], 300_000, "{plain}");

    // one row changed: with the state, the source knows which pages
    c.execute("UPDATE t SET v = randomblob(1000) WHERE k = 4000", [])
        .unwrap();
    let changed = run(&with_state);
    assert_eq!(changed["unchanged"], false, "{changed}");
    c.execute("UPDATE t SET v = randomblob(1000) WHERE k = 10", [])
        .unwrap();
    let asked = run(&["--no-state".as_ref()]);
    let (got_changed, got_asked) = (
        changed["bytes_received_wire"].as_u64().unwrap(),
        asked["bytes_received_wire"].as_u64().unwrap(),
    );
    assert!(
        got_changed + pages * 32 / 2 < got_asked,
        "with its state the source still received {got_changed} bytes \
         (without: {got_asked}; the page hashes are {} bytes)",
        pages * 32
    );
    // the replica holds the source's rows (the files' times move when the
    // writer closes: compared by content)
    let rows = |c: &rusqlite::Connection| -> (i64, Vec<u8>, Vec<u8>) {
        c.query_row(
            "SELECT (SELECT count(*) FROM t), (SELECT v FROM t WHERE k = 10), \
             (SELECT v FROM t WHERE k = 4000)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap()
    };
    let replica = rusqlite::Connection::open(s.dst.join("app.db")).unwrap();
    assert!(rows(&c) == rows(&replica), "the replica's rows differ");
    assert_eq!(
        std::fs::read(s.src.join("sub/file")).unwrap(),
        std::fs::read(s.dst.join("sub/file")).unwrap()
    );
}

#[test]
fn a_push_of_a_tree_the_replica_has_sends_no_manifest() {
    let s = setup();
    for d in 0..30 {
        std::fs::create_dir_all(s.src.join(format!("d{d}"))).unwrap();
        for f in 0..100 {
            let p = s.src.join(format!("d{d}/file-{f}.conf"));
            std::fs::write(p, format!("value = {d}{f}\n")).unwrap();
        }
    }
    let agent = replica(&s.dst, &s.b, &s.a_id, &[]);
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = push(&s.src, &agent.addr, &s.a, &s.b_id, extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let first = run(&["--no-state"]);
    assert_eq!(first["unchanged"], false, "{first}");
    let again = run(&["--no-state"]);
    assert_eq!(again["unchanged"], true, "{again}");
    // the same tree compared by content: the whole manifest crosses
    let checked = run(&["--no-state", "--checksum"]);
    assert_eq!(checked["unchanged"], false, "{checked}");
    let (same, full) = (
        again["bytes_sent_wire"].as_u64().unwrap(),
        checked["bytes_sent_wire"].as_u64().unwrap(),
    );
    // Both runs pay the connection's own cost (handshake, and over loopback
    // one 65,000-byte MTU probe: sync_agent::udp::Datagrams); the manifest
    // is what the second adds.
    assert!(
        same * 2 < full && full - same > 60_000,
        "unchanged: {same} bytes sent, with the manifest {full}"
    );
    // a change on the replica's side alone: a full round puts it back
    std::fs::write(s.dst.join("d7/file-3.conf"), b"edited on the standby\n").unwrap();
    let repaired = run(&["--no-state"]);
    assert_eq!(repaired["unchanged"], false, "{repaired}");
    assert_eq!(repaired["files_transferred"], 1, "{repaired}");
    assert_eq!(
        std::fs::read(s.dst.join("d7/file-3.conf")).unwrap(),
        b"value = 73\n"
    );
    assert_eq!(run(&["--no-state"])["unchanged"], true);
}

#[test]
fn push_with_a_bwlimit_keeps_to_its_rate_and_refuses_a_bad_one() {
    let s = setup();
    // 1.5 MiB more: at 512K/s the content takes about 3 s
    std::fs::write(s.src.join("more"), random_bytes(1_300_000, 4)).unwrap();
    let agent = replica(&s.dst, &s.b, &s.a_id, &[]);
    let bad = push(&s.src, &agent.addr, &s.a, &s.b_id, &["--bwlimit", "10X"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("bwlimit"));
    let t0 = std::time::Instant::now();
    let out = push(&s.src, &agent.addr, &s.a, &s.b_id, &["--bwlimit", "512K"]);
    let took = t0.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a floor, not a throughput figure: less the bucket's 100 ms burst
    assert!(took > 2.5, "1.5 MiB at 512K/s took {took:.2} s");
    assert_identical(&s.src, &s.dst);
}

/// A restarted `sync-agent replica --state DIR` takes its databases' page
/// tables from the state its last run saved: its first session offers the
/// quick digest without reading a database (a no-change push is
/// `unchanged`); the same restart without the state reads it.
#[test]
fn a_restarted_replica_with_its_state_does_not_read_its_databases_again() {
    let s = setup();
    let c = rusqlite::Connection::open(s.src.join("app.db")).unwrap();
    c.execute_batch(
        "PRAGMA journal_mode=WAL; CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
         INSERT INTO t SELECT i, randomblob(300) FROM n;",
    )
    .unwrap();
    drop(c);
    let base = s.dst.parent().unwrap().to_path_buf();
    let (state, push_state) = (base.join("rep-state"), base.join("push-state"));
    let state_arg = ["--state", state.to_str().unwrap()];
    let push_args = ["--state-dir", push_state.to_str().unwrap()];
    let first = AgentCmd::replica(&s.dst, &s.b, &s.a_id, "127.0.0.1:0")
        .args(&state_arg)
        .start();
    let out = push(&s.src, &first.addr, &s.a, &s.b_id, &push_args);
    assert!(out.status.success(), "{out:?}");
    // saved once the session ended
    let tables = state.join("default.pages");
    eventually(
        "the page tables saved",
        std::time::Duration::from_secs(10),
        || tables.exists(),
    );
    drop(first);
    for (with_state, reads) in [(false, 1), (true, 0)] {
        let log = base.join(format!("replica-{with_state}.log"));
        let agent = AgentCmd::replica(&s.dst, &s.b, &s.a_id, "127.0.0.1:0")
            .args(if with_state { &state_arg[..] } else { &[] })
            .envs(&[("UNDERSTUDY_LOG", "debug")])
            .log(&log)
            .start();
        let out = push(&s.src, &agent.addr, &s.a, &s.b_id, &push_args);
        assert!(out.status.success(), "{out:?}");
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["unchanged"], true, "{summary}");
        drop(agent);
        let said = std::fs::read_to_string(&log).unwrap();
        let scanned = said
            .lines()
            .find(|l| l.contains("replica scanned ahead"))
            .unwrap_or_else(|| panic!("no scan line:\n{said}"));
        assert!(
            scanned.contains(&format!("databases_read={reads}")),
            "state {with_state}: {scanned}"
        );
    }
}

/// `mirror` keeps its destination's page tables in its `--state-dir`: a
/// no-change re-run reads no database of the destination (a fresh replica
/// in the process would read them all), and a database written on the
/// destination since is read again.
#[test]
fn a_mirror_rerun_takes_the_destinations_page_tables_from_its_state() {
    let s = setup();
    let c = rusqlite::Connection::open(s.src.join("app.db")).unwrap();
    c.execute_batch(
        "CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 500)
         INSERT INTO t SELECT i, randomblob(300) FROM n;",
    )
    .unwrap();
    drop(c);
    let state = s.dst.parent().unwrap().join("mirror-state");
    let mirror = |expect_reads: u32, unchanged: bool| {
        let out = run(Command::new(bin("sync-cli"))
            .env("UNDERSTUDY_LOG", "debug")
            .arg("mirror")
            .args([&s.src, &s.dst])
            .arg("--json")
            .arg("--state-dir")
            .arg(&state));
        assert!(out.status.success(), "{out:?}");
        let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(summary["unchanged"], unchanged, "{summary}");
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        let scanned = said
            .lines()
            .find(|l| l.contains("replica scanned ahead"))
            .unwrap_or_else(|| panic!("no scan line:\n{said}"));
        assert!(
            scanned.contains(&format!("databases_read={expect_reads}")),
            "{scanned}"
        );
    };
    mirror(0, false);
    mirror(0, true);
    // a local write on the destination: read again, and repaired
    let c = rusqlite::Connection::open(s.dst.join("app.db")).unwrap();
    c.execute("UPDATE t SET v = x'00' WHERE k = 3", []).unwrap();
    drop(c);
    mirror(1, false);
    mirror(0, true);
}

/// A rerun with its state cuts the databases the last run knew while it
/// scans. When the tree's databases are no longer those, the push is still
/// the tree's: a database turned into a plain file arrives as that file
/// (not taken for a database, nor left out), a new database arrives, a
/// deleted one is deleted, and the databases kept are whole.
#[test]
fn a_rerun_whose_databases_changed_pushes_the_tree_as_it_is() {
    let s = setup();
    let state = s._t.path().join("state");
    let make = |name: &str, rows: i64| {
        let c = rusqlite::Connection::open(s.src.join(name)).unwrap();
        c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
        c.execute_batch("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        c.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < ?1)
             INSERT INTO t SELECT i, randomblob(500) FROM n",
            [rows],
        )
        .unwrap();
    };
    for (name, rows) in [("kept.db", 300), ("flat.db", 200), ("gone.db", 100)] {
        make(name, rows);
    }
    let agent = replica(&s.dst, &s.b, &s.a_id, &[]);
    let args = ["--state-dir", state.to_str().unwrap()];
    // whether the cut taken while scanning stood (the debug log says when not)
    let stood = || -> bool {
        let out = run(Command::new(bin("sync-cli"))
            .env("UNDERSTUDY_LOG", "sync_agent=debug")
            .arg("push")
            .arg(&s.src)
            .args(["--to", &agent.addr, "--peer", &s.b_id, "--json"])
            .arg("--identity")
            .arg(&s.a)
            .args(args));
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        !log.contains("cut again")
    };
    stood();
    assert!(stood(), "the same databases, cut again");
    let count = |p: &Path| -> i64 {
        rusqlite::Connection::open(p)
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(count(&s.dst.join("flat.db")), 200);
    // a database replaced by a plain file of a database's size, one deleted,
    // one made
    let plain = random_bytes(8192, 9);
    std::fs::write(s.src.join("flat.db.new"), &plain).unwrap();
    std::fs::rename(s.src.join("flat.db.new"), s.src.join("flat.db")).unwrap();
    std::fs::remove_file(s.src.join("gone.db")).unwrap();
    make("new.db", 50);
    rusqlite::Connection::open(s.src.join("kept.db"))
        .unwrap()
        .execute("DELETE FROM t WHERE k > 250", [])
        .unwrap();
    assert!(!stood(), "other databases, and the first cut stood");
    assert_eq!(std::fs::read(s.dst.join("flat.db")).unwrap(), plain);
    assert!(!s.dst.join("gone.db").exists());
    assert_eq!(count(&s.dst.join("new.db")), 50);
    assert_eq!(count(&s.dst.join("kept.db")), 250);
    assert!(stood(), "the state that push left");
    assert_eq!(std::fs::read(s.dst.join("flat.db")).unwrap(), plain);
    assert_eq!(count(&s.dst.join("kept.db")), 250);
}

/// A live database with a second name in the tree (a hard link, here one
/// that sorts first) is pushed through the name SQLite uses: its log's
/// commits arrive, and the replica has one inode under both names, updated
/// in place by the next push (its names are all the source's).
#[test]
fn a_hard_linked_live_database_arrives_whole_under_both_names() {
    use std::os::unix::fs::MetadataExt;
    let s = setup();
    std::fs::create_dir_all(s.src.join("z")).unwrap();
    let live = s.src.join("z/live.db");
    let c = rusqlite::Connection::open(&live).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    c.execute_batch("PRAGMA wal_autocheckpoint=0; CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let add = |rows: i64| {
        c.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < ?1)
             INSERT INTO t(v) SELECT randomblob(300) FROM n",
            [rows],
        )
        .unwrap();
    };
    add(200);
    std::fs::hard_link(&live, s.src.join("a-link.db")).unwrap();
    let agent = replica(&s.dst, &s.b, &s.a_id, &[]);
    let count = |p: &Path| -> i64 {
        let c = rusqlite::Connection::open(p).unwrap();
        c.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap()
    };
    let ino = |p: &str| std::fs::metadata(s.dst.join(p)).unwrap().ino();
    // with saved state: the second push must not cut it early through the
    // name the scan is told
    let state = s._t.path().join("state");
    let args = ["--state-dir", state.to_str().unwrap()];
    let mut first = None;
    for rows in [200, 300] {
        let out = push(&s.src, &agent.addr, &s.a, &s.b_id, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // the commits still in the log arrived: the cut went through the
        // name whose log it is
        assert_eq!(count(&s.dst.join("z/live.db")), rows);
        assert_eq!(ino("a-link.db"), ino("z/live.db"), "one inode, two names");
        first.get_or_insert(ino("z/live.db"));
        assert_eq!(first, Some(ino("z/live.db")), "updated in place");
        add(100);
    }
    // a third name on the replica, outside its root (a `cp -al` snapshot):
    // never written through; both names inside still one inode
    let outside = s._t.path().join("outside.db");
    std::fs::hard_link(s.dst.join("z/live.db"), &outside).unwrap();
    let before = std::fs::read(&outside).unwrap();
    let out = push(&s.src, &agent.addr, &s.a, &s.b_id, &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&outside).unwrap() == before,
        "written through"
    );
    assert_eq!(count(&s.dst.join("z/live.db")), 400);
    assert_eq!(ino("a-link.db"), ino("z/live.db"));
    drop(c);
}
