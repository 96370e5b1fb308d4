//! Issue 9: lag tells the truth (DESIGN.md §2 invariant 11) and `sync-cli status
//! --check` says so. Lag is the age of the oldest change the replica has not
//! applied: it grows while the replica is away, while it refuses a database
//! held open there, and during a full mirror.

use crate::util::*;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

struct Setup {
    t: tempfile::TempDir,
    src: PathBuf,
    dst: PathBuf,
    sid: PathBuf,
    s_id: String,
    rid: PathBuf,
    r_id: String,
    /// The source agent's control socket.
    control: PathBuf,
}

fn setup() -> Setup {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dst).unwrap();
    let (sid, s_id, rid, r_id) = identities(t.path());
    let control = t.path().join("source.sock");
    Setup {
        t,
        src,
        dst,
        sid,
        s_id,
        rid,
        r_id,
        control,
    }
}

fn start_source(s: &Setup, addr: &str) -> Agent {
    AgentCmd::source(&s.src, &s.sid, &s.r_id, addr)
        .control(&s.control, true)
        .start()
}

/// The first folder's row.
fn row(control: &Path) -> serde_json::Value {
    socket_status(control)
        .map(|s| s["folders"][0].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// `sync-cli status --check --max-lag S` against `control`: exit code and
/// stdout.
fn check(dir: &Path, identity: &Path, control: &Path, max_lag: &str) -> (i32, String) {
    let cfg = dir.join("check.toml");
    let body = format!(
        "[node]\nidentity = \"{}\"\ncontrol = \"{}\"\n",
        identity.display(),
        control.display()
    );
    std::fs::write(&cfg, body).unwrap();
    let out = cli(&[
        "status".as_ref(),
        "--config".as_ref(),
        cfg.as_os_str(),
        "--check".as_ref(),
        "--max-lag".as_ref(),
        max_lag.as_ref(),
    ]);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code().unwrap_or(-1), text)
}

/// A WAL database with one table, as an application makes it.
fn create_db(path: &Path) -> Connection {
    let c = Connection::open(path).unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);")
        .unwrap();
    insert(&c);
    c
}

fn insert(c: &Connection) {
    c.execute("INSERT INTO t(v) VALUES (randomblob(500))", [])
        .unwrap();
}

/// Rows in a replica database (read-only, briefly), `None` if unreadable.
fn rows(path: &Path) -> Option<i64> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)).ok()
}

/// Waits until `cond` holds of the source's row; panics with it after `secs`.
fn wait_row(control: &Path, secs: u64, what: &str, cond: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let r = row(control);
        if cond(&r) {
            return;
        }
        assert!(Instant::now() < deadline, "{what} after {secs} s: {r}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Connected, a full round applied, nothing pending.
fn caught_up(r: &serde_json::Value) -> bool {
    r["connected"] == true
        && r["full_rounds"].as_u64() >= Some(1)
        && r["pending_since_unix"].is_null()
}

fn lag_of(r: &serde_json::Value) -> f64 {
    r["lag_s"].as_f64().unwrap_or(f64::MAX)
}

#[test]
fn replica_away_while_databases_change_lag_grows_and_check_fails() {
    let s = setup();
    let db = s.src.join("app.db");
    let c = create_db(&db);
    let mut rep = replica(&s.dst, &s.rid, &s.s_id, &[]);
    let addr = rep.addr.clone();
    let _src = start_source(&s, &addr);
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows(&s.dst.join("app.db")) != Some(1) {
        assert!(
            Instant::now() < deadline,
            "app.db never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_row(&s.control, 20, "not caught up", caught_up);

    // Killed; once the source has noticed (QUIC idle timeout), nothing is
    // pending yet: nothing changed.
    rep.kill9();
    wait_row(&s.control, 30, "the source never noticed", |r| {
        r["connected"] == false
    });
    let r = row(&s.control);
    assert!(lag_of(&r) < 1.0, "lag with nothing changed: {r}");
    // Away for 8 s while only the database changes (commits: -wal writes).
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        insert(&c);
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = row(&s.control);
    let lag = lag_of(&r);
    eprintln!("source lag after 8 s of commits with the replica away: {lag:.2} s");
    assert!(lag >= 6.0, "lag {lag} s after 8 s away: {r}");
    let (code, out) = check(s.t.path(), &s.sid, &s.control, "5");
    assert_eq!(code, 1, "--check passed with the replica away:\n{out}");
    assert!(
        out.contains("UNHEALTHY") && out.contains("over 5 s"),
        "{out}"
    );

    // Back: the replica catches up, lag returns near 0, --check passes.
    let _rep = replica_on(&s.dst, &s.rid, &s.s_id, &addr, &[]);
    let want: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    // Until the reconnect's full round is applied, the oldest commit made while
    // away (8 s old and more) is still what lag counts from.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = row(&s.control);
        if r["full_rounds"].as_u64() >= Some(2) {
            break;
        }
        assert!(lag_of(&r) >= 8.0, "lag dropped before the catch-up: {r}");
        assert!(Instant::now() < deadline, "no full round after 30 s: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(rows(&s.dst.join("app.db")), Some(want));
    wait_row(&s.control, 20, "lag did not return near 0", |r| {
        r["connected"] == true && lag_of(r) < 1.0
    });
    eprintln!("lag once caught up: {:.3} s", lag_of(&row(&s.control)));
    let (code, out) = check(s.t.path(), &s.sid, &s.control, "5");
    assert_eq!(code, 0, "--check failed once caught up:\n{out}");
    assert!(out.contains("healthy"), "{out}");
}

#[test]
fn lag_counts_during_a_first_full_mirror() {
    let s = setup();
    let (dirs, files, size) = (20u64, 100u64, 8192usize);
    for d in 0..dirs {
        let dir = s.src.join(format!("d{d:02}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..files {
            std::fs::write(
                dir.join(format!("f{f:03}")),
                random_bytes(size, d * 1000 + f),
            )
            .unwrap();
        }
    }
    let rep = replica(&s.dst, &s.rid, &s.s_id, &[]);
    let _src = start_source(&s, &rep.addr);
    // Sample the status throughout the first full round.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, control) = (done.clone(), s.control.clone());
        std::thread::spawn(move || {
            let mut during = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let r = row(&control);
                if r["full_round"].is_object() {
                    during.push(r);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            during
        })
    };
    wait_converged(&s.src, &s.dst, 60, &[]);
    done.store(true, Ordering::SeqCst);
    let during = sampler.join().unwrap();
    assert!(!during.is_empty(), "no sample saw the full round");
    eprintln!(
        "{} samples during the first full round; the last: lag {:.3} s, {}",
        during.len(),
        lag_of(&during[during.len() - 1]),
        during[during.len() - 1]["full_round"]
    );
    for r in &during {
        assert!(lag_of(r) > 0.0, "lag 0 during the full round: {r}");
    }
    let total = dirs * files;
    assert!(
        during
            .iter()
            .any(|r| r["full_round"]["entries_total"].as_u64() > Some(total)
                && r["full_round"]["bytes_total"].as_u64() == Some(total * size as u64)),
        "no sample showed the round's totals: {}",
        during[during.len() - 1]
    );
    for r in &during {
        let f = &r["full_round"];
        let (sent, total) = (f["entries_sent"].as_u64(), f["entries_total"].as_u64());
        assert!(sent <= total || total == Some(0), "{f}");
    }
    wait_row(&s.control, 10, "the full round still shows", |r| {
        r["full_round"].is_null() && lag_of(r) < 1.0 && r["full_rounds"] == 1
    });
}

#[test]
fn replica_database_held_open_makes_source_lag_grow() {
    let s = setup();
    let db = s.src.join("app.db");
    let c = create_db(&db);
    let rcontrol = s.t.path().join("replica.sock");
    let rep = replica(
        &s.dst,
        &s.rid,
        &s.s_id,
        &["--control", rcontrol.to_str().unwrap()],
    );
    let _src = start_source(&s, &rep.addr);
    let replica_db = s.dst.join("app.db");
    let deadline = Instant::now() + Duration::from_secs(30);
    while rows(&replica_db).is_none() {
        assert!(
            Instant::now() < deadline,
            "app.db never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_row(&s.control, 20, "not caught up", caught_up);

    // The standby's application opens the database; the source keeps committing.
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3<'{}'; exec sleep 60", replica_db.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        insert(&c);
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = row(&s.control);
    let lag = lag_of(&r);
    eprintln!("source lag after 6 s with app.db held on the replica: {lag:.2} s");
    assert!(lag >= 4.0, "lag {lag} s with app.db held for 6 s: {r}");
    assert_eq!(r["held_databases"], serde_json::json!(["app.db"]), "{r}");
    assert_eq!(r["connected"], true, "{r}");
    let (code, out) = check(s.t.path(), &s.sid, &s.control, "60");
    assert_eq!(code, 1, "--check passed with app.db held:\n{out}");
    assert!(out.contains("held database app.db"), "{out}");
    let out = cli(&[
        "status".as_ref(),
        "--config".as_ref(),
        s.t.path().join("check.toml").as_os_str(),
        "--check".as_ref(),
        "--json".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["check"]["healthy"], false, "{v}");
    assert_eq!(v["check"]["max_lag_s"], 30.0, "{v}");
    assert!(
        v["check"]["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["what"]
                .as_str()
                .unwrap_or("")
                .starts_with("held database app.db")),
        "{v}"
    );
    // The replica's own row: rounds, the source's epoch, the last apply, the held database.
    let rr = row(&rcontrol);
    assert_eq!(rr["role"], "replica", "{rr}");
    assert!(rr["rounds"].as_u64() > Some(1), "{rr}");
    assert!(rr["full_rounds"].as_u64() >= Some(1), "{rr}");
    assert!(rr["source_epoch"].is_u64(), "{rr}");
    assert!(rr["last_applied_age_s"].as_f64() < Some(5.0), "{rr}");
    assert_eq!(rr["held_databases"], serde_json::json!(["app.db"]), "{rr}");
    let (code, out) = check(s.t.path(), &s.rid, &rcontrol, "60");
    assert_eq!(
        code, 1,
        "the replica's --check passed with app.db held:\n{out}"
    );

    // Freed: applied at last, lag back near 0.
    holder.kill().unwrap();
    holder.wait().unwrap();
    insert(&c);
    wait_row(
        &s.control,
        20,
        "lag stayed up after the holder exited",
        |r| lag_of(r) < 1.0 && r["held_databases"] == serde_json::json!([]),
    );
    let (code, out) = check(s.t.path(), &s.sid, &s.control, "5");
    assert_eq!(code, 0, "--check failed once freed:\n{out}");
}

#[test]
fn frozen_replica_lag_grows_while_connected() {
    let s = setup();
    let c = create_db(&s.src.join("app.db"));
    let rep = replica(&s.dst, &s.rid, &s.s_id, &[]);
    let _src = start_source(&s, &rep.addr);
    wait_row(&s.control, 30, "not caught up", caught_up);
    // SIGSTOP: the session stays up (well within the idle timeout), rounds
    // are not acknowledged.
    sh(&format!("kill -STOP {}", rep.child.id()));
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        insert(&c);
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = row(&s.control);
    sh(&format!("kill -CONT {}", rep.child.id()));
    eprintln!(
        "source lag after 5 s of commits to a frozen replica: {:.2} s",
        lag_of(&r)
    );
    assert_eq!(r["connected"], true, "{r}");
    assert!(lag_of(&r) >= 4.0, "{r}");
    wait_row(&s.control, 20, "lag stayed up after SIGCONT", |r| {
        r["connected"] == true && lag_of(r) < 1.0
    });
}

#[test]
fn status_check_exits_2_when_the_agent_is_unreachable() {
    let s = setup();
    let gone = s.t.path().join("no-agent.sock");
    let (code, out) = check(s.t.path(), &s.sid, &gone, "30");
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("is sync-agent running?"), "{out}");
    let bad = s.t.path().join("bad.toml");
    std::fs::write(&bad, "[node\n").unwrap();
    let out = cli(&[
        "status".as_ref(),
        "--config".as_ref(),
        bad.as_os_str(),
        "--check".as_ref(),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// A source and a replica over `app.db` with `1 + extra` rows of `size`
/// bytes, converged: the writer's connection and the agents.
fn held_setup(extra: u32, size: u32) -> (Setup, Connection, Agent, Agent) {
    let s = setup();
    let c = create_db(&s.src.join("app.db"));
    c.execute_batch(&format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {extra})
         INSERT INTO t(v) SELECT randomblob({size}) FROM n WHERE {extra} > 0;"
    ))
    .unwrap();
    let rep = replica(&s.dst, &s.rid, &s.s_id, &[]);
    let src = start_source(&s, &rep.addr);
    let deadline = Instant::now() + Duration::from_secs(60);
    while rows(&s.dst.join("app.db")) != Some(1 + i64::from(extra)) {
        assert!(
            Instant::now() < deadline,
            "app.db never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    (s, c, rep, src)
}

/// Waits until `done`, at most 3 s after `freed`; says how long it took.
fn caught_up_after(freed: Instant, done: impl Fn() -> bool) {
    while !done() {
        assert!(
            freed.elapsed() < Duration::from_secs(3),
            "the replica stayed behind for 3 s after the holder let go"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("caught up {:?} after the holder let go", freed.elapsed());
}

/// A database the replica skipped while another process held it is offered
/// again once freed, though the source's writer has stopped (issue 10 item
/// 12: 43 commits behind for more than 30 s).
#[test]
fn a_database_skipped_while_held_catches_up_once_freed_without_new_commits() {
    let (s, c, rep, src) = held_setup(0, 0);
    let replica_db = s.dst.join("app.db");
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg(format!("exec 3<'{}'; exec sleep 60", replica_db.display()))
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        insert(&c);
        std::thread::sleep(Duration::from_millis(100));
    }
    // The writer stops; a full round (a new source session, as after a cut
    // or a reconnect) offers the database again and the replica skips it.
    drop(src);
    let _src = start_source(&s, &rep.addr);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rows(&replica_db), Some(1), "applied under a holder");
    holder.kill().unwrap();
    holder.wait().unwrap();
    caught_up_after(Instant::now(), || rows(&replica_db) == Some(6));
}

/// The same when the replica skips the database at its commit (a process
/// opened it while its pages were on the way): the source served the pages,
/// but the database still counts as not applied.
#[test]
fn a_database_skipped_at_its_commit_catches_up_once_freed() {
    let (s, c, rep, src) = held_setup(3000, 4000);
    let replica_db = s.dst.join("app.db");
    std::thread::sleep(Duration::from_millis(500));
    // One commit rewriting every row (some 12 MB of pages to stage), sent by
    // a full round (a new session, as after a reconnect or a cut).
    drop(src);
    c.execute("UPDATE t SET v = randomblob(4000)", []).unwrap();
    let _src = start_source(&s, &rep.addr);
    // The pages are being staged: the held-open check at the fetch is past.
    let staging = Instant::now();
    let holder = loop {
        let temp = std::fs::read_dir(&s.dst).unwrap().any(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".understudy.tmp")
        });
        if temp {
            break std::fs::File::open(&replica_db).unwrap();
        }
        assert!(staging.elapsed() < Duration::from_secs(20), "never staged");
        std::thread::sleep(Duration::from_millis(1));
    };
    std::thread::sleep(Duration::from_millis(1500));
    let row = |c: &Connection| -> Option<Vec<u8>> {
        c.query_row("SELECT v FROM t WHERE id = 77", [], |r| r.get(0))
            .ok()
    };
    let want = row(&c).unwrap();
    let seen = || {
        Connection::open_with_flags(&replica_db, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()
            .and_then(|r| row(&r))
    };
    assert_ne!(seen(), Some(want.clone()), "applied under a holder");
    drop(holder);
    caught_up_after(Instant::now(), || seen() == Some(want.clone()));
}
