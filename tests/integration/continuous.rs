//! Issue 3: two agent processes on 127.0.0.1 keep a replica in step.

use crate::util::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn step(p: &Pair, script: &str) {
    sh(&format!("cd {} && {script}", p.src.display()));
    wait_converged(&p.src, &p.dst, 20, &[]);
}

#[test]
fn every_kind_of_change_reaches_the_replica() {
    let p = pair();
    std::fs::write(p.src.join("before"), b"existed before the agents").unwrap();
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let _src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &[]);
    wait_converged(&p.src, &p.dst, 20, &[]);
    step(&p, "echo hello > new-file");
    step(&p, "mkdir -p a/b/c && echo x > a/b/c/f");
    step(&p, "mv new-file a/renamed");
    step(&p, "mv a moved-dir");
    step(&p, "rm moved-dir/renamed");
    step(&p, "chmod 4750 before");
    step(&p, "chown 1234:5678 before");
    step(&p, "setfattr -n user.color -v blue before");
    step(&p, "setfacl -m u:1000:rwx before");
    step(&p, "setfacl -d -m g:1001:rx moved-dir");
    step(&p, "touch -d '2020-01-02 03:04:05.123456789' before");
    // editor-style save, swaps and replaced directories, each in one batch
    step(
        &p,
        "mv before before~ && cp -p before~ before && rm before~",
    );
    step(
        &p,
        "mkdir -p sw/a sw/b && echo A > sw/a/f && echo B > sw/b/f",
    );
    step(&p, "mv sw/a sw/t && mv sw/b sw/a && mv sw/t sw/b");
    step(&p, "mkdir -p rd/d && echo old > rd/d/y");
    step(&p, "rm -rf rd/d && mkdir rd/d && echo new > rd/d/new");
    step(
        &p,
        "mkdir -p ro/a ro/d && echo x > ro/a/x && echo y > ro/d/y",
    );
    step(&p, "rm -rf ro/d && mv ro/a ro/d");
    step(
        &p,
        "mkdir -p gone/sub && echo z > gone/sub/z && mv gone moved-away && rm moved-away/sub/z",
    );
    step(&p, "ln -s moved-dir link && ln before hard && mkfifo fifo");
    step(&p, "rm -r moved-dir");
    step(&p, "head -c 3000000 /dev/urandom > big && echo tail >> big");
    assert_identical(&p.src, &p.dst);
}

#[test]
fn small_files_travel_inline_with_the_round() {
    let p = pair();
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let control = p.t.path().join("control.sock");
    let _src = source(
        &p.src,
        &p.sid,
        &p.r_id,
        &rep.addr,
        &["--control", control.to_str().unwrap()],
    );
    wait_converged(&p.src, &p.dst, 20, &[]);
    step(
        &p,
        "echo small > a && head -c 60000 /dev/urandom > b && head -c 300000 /dev/urandom > big",
    );
    let st = agent_status(&p, &control);
    let f = &st["folders"][0];
    assert!(f["files_inline_total"].as_u64().unwrap() >= 2, "{st}");
    assert!(
        f["files_requested_total"].as_u64().unwrap() >= 1,
        "the big file is requested: {st}"
    );
}

#[test]
fn burst_of_ten_thousand_files_misses_nothing() {
    let p = pair_on_tmpfs();
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let _src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &[]);
    wait_converged(&p.src, &p.dst, 20, &[]);
    let started = Instant::now();
    for d in 0..100 {
        let dir = p.src.join(format!("d{d:03}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f:03}")), format!("file {d} {f}\n")).unwrap();
        }
    }
    wait_converged(&p.src, &p.dst, 120, &[]);
    eprintln!(
        "10,000 files converged {:.2} s after the burst began",
        started.elapsed().as_secs_f64()
    );
    assert_identical(&p.src, &p.dst);
}

#[test]
fn kill9_of_either_agent_during_a_burst_converges() {
    let p = pair_on_tmpfs();
    let mut rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let addr = rep.addr.clone();
    let mut src = source(&p.src, &p.sid, &p.r_id, &addr, &[]);
    wait_converged(&p.src, &p.dst, 20, &[]);
    for round in 0..4u64 {
        let dir = p.src.join(format!("burst{round}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..400 {
            let data = random_bytes(if f % 50 == 0 { 2 << 20 } else { 3000 }, round * 1000 + f);
            std::fs::write(dir.join(format!("f{f}")), data).unwrap();
            if f == 150 + round * 60 {
                if round % 2 == 0 {
                    src.kill9();
                    src = source(&p.src, &p.sid, &p.r_id, &addr, &[]);
                } else {
                    rep.kill9();
                    rep = replica_on(&p.dst, &p.rid, &p.s_id, &addr, &[]);
                }
            }
        }
    }
    wait_converged(&p.src, &p.dst, 60, &[]);
    // the next full round of a restarted replica sweeps temp files; a session is
    // up, so they are gone
    assert!(
        temp_files(&p.dst).is_empty(),
        "temp files left: {:?}",
        temp_files(&p.dst)
    );
    assert_identical(&p.src, &p.dst);
    drop(rep);
}

#[test]
fn replica_gone_for_ten_seconds_then_back() {
    let p = pair();
    let mut rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let addr = rep.addr.clone();
    let _src = source(&p.src, &p.sid, &p.r_id, &addr, &[]);
    wait_converged(&p.src, &p.dst, 20, &[]);
    rep.kill9();
    let until = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while Instant::now() < until {
        std::fs::write(p.src.join(format!("while-away-{n}")), format!("{n}")).unwrap();
        if n % 5 == 0 && n > 0 {
            std::fs::remove_file(p.src.join(format!("while-away-{}", n - 5))).unwrap();
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let _rep = replica_on(&p.dst, &p.rid, &p.s_id, &addr, &[]);
    wait_converged(&p.src, &p.dst, 30, &[]);
    assert_identical(&p.src, &p.dst);
}

/// Restores a sysctl on drop.
#[test]
fn excludes_hold_on_both_sides() {
    let p = pair();
    sh(&format!(
        "mkdir -p {0}/cache/img {0}/log && echo keep > {0}/cache/replica-own && echo k > {0}/log/l",
        p.dst.display()
    ));
    sh(&format!(
        "mkdir -p {0}/cache/img && echo never > {0}/cache/img/x && echo data > {0}/data.xml",
        p.src.display()
    ));
    let ex = ["--exclude", "cache/", "--exclude", "/log"];
    let rep = replica(&p.dst, &p.rid, &p.s_id, &ex);
    let _src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &ex);
    let patterns = vec!["cache/".to_string(), "/log".to_string()];
    wait_converged(&p.src, &p.dst, 20, &patterns);
    step_excluded(
        &p,
        "echo more > cache/img/y && echo changed > data.xml && rm -r cache/img",
        &patterns,
    );
    assert_eq!(
        std::fs::read(p.dst.join("cache/replica-own")).unwrap(),
        b"keep\n"
    );
    assert_eq!(std::fs::read(p.dst.join("log/l")).unwrap(), b"k\n");
    assert!(
        !p.dst.join("cache/img/x").exists() && !p.dst.join("cache/img/y").exists(),
        "an excluded path was written"
    );
    assert_eq!(std::fs::read(p.dst.join("data.xml")).unwrap(), b"changed\n");
}

fn step_excluded(p: &Pair, script: &str, patterns: &[String]) {
    sh(&format!("cd {} && {script}", p.src.display()));
    wait_converged(&p.src, &p.dst, 20, patterns);
}

fn agent_config(dir: &Path, body: &str) -> std::process::Output {
    let cfg = dir.join("agent.toml");
    std::fs::write(&cfg, body).unwrap();
    run(std::process::Command::new(bin("sync-agent"))
        .arg("--config")
        .arg(&cfg))
}

#[test]
fn bad_configs_are_named_and_nothing_runs() {
    let p = pair();
    let good = format!(
        "[node]\nidentity = \"{id}\"\nlisten = \"127.0.0.1:0\"\n\n[[peer]]\nid = \"{peer}\"\n\n[[folder]]\nname = \"jf\"\npath = \"{dst}\"\nrole = \"replica\"\npeers = [\"{peer}\"]\nprofile = \"jellyfin\"\n",
        id = p.rid.display(),
        peer = p.s_id,
        dst = p.dst.display()
    );
    let cases = [
        (good.replace("role =", "rol ="), vec!["rol", "line"]),
        (
            good.replace(
                &format!("peers = [\"{}\"]", p.s_id),
                &format!("peers = [\"{}\"]", p.r_id),
            ),
            vec!["not declared", &p.r_id],
        ),
        (
            good.replace(
                &format!("path = \"{}\"", p.dst.display()),
                "path = \"/nonexistent/folder\"",
            ),
            vec!["/nonexistent/folder", "folder jf"],
        ),
        (
            good.replacen(
                &format!("identity = \"{}\"", p.rid.display()),
                "identity = \"/nonexistent/id\"",
                1,
            ),
            vec!["/nonexistent/id"],
        ),
        (
            good.replace("profile = \"jellyfin\"", "profile = \"emby\""),
            vec!["unknown profile", "emby", "plex"],
        ),
    ];
    for (body, words) in cases {
        let out = agent_config(p.t.path(), &body);
        assert_eq!(out.status.code(), Some(2), "{body}");
        let e = String::from_utf8_lossy(&out.stderr);
        for w in words {
            assert!(e.contains(w), "error lacks {w:?}: {e}");
        }
        assert_eq!(
            std::fs::read_dir(&p.dst).unwrap().count(),
            0,
            "something was written"
        );
    }
}

#[test]
fn restart_over_an_unchanged_tree_rehashes_nothing() {
    let p = pair_on_tmpfs();
    for d in 0..30 {
        let dir = p.src.join(format!("d{d}"));
        std::fs::create_dir(&dir).unwrap();
        for f in 0..100 {
            std::fs::write(dir.join(format!("f{f}")), random_bytes(2000, d * 100 + f)).unwrap();
        }
    }
    // hashes of files younger than the timestamp granularity margin are not kept
    std::thread::sleep(Duration::from_millis(2200));
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let state = p.t.path().join("state");
    let control = p.t.path().join("control.sock");
    let args = [
        "--state",
        state.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ];
    let mut src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &args);
    wait_converged(&p.src, &p.dst, 30, &[]);
    let status = || agent_status(&p, &control);
    // a full round is counted once its index is saved
    let first = eventually(
        "the first full round counted",
        Duration::from_secs(20),
        || {
            let s = status();
            (s["folders"][0]["full_rounds"].as_u64() == Some(1)).then_some(s)
        },
    );
    assert!(
        first["folders"][0]["bytes_hashed_last_full"]
            .as_u64()
            .unwrap()
            >= 3000 * 2000,
        "{first}"
    );
    src.kill9();
    let _src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &args);
    let deadline = Instant::now() + Duration::from_secs(20);
    let again = loop {
        let s = status();
        if s["folders"][0]["full_rounds"].as_u64() == Some(1) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "no full round after restart: {s}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let f = &again["folders"][0];
    assert_eq!(
        f["bytes_hashed_last_full"], 0,
        "restart rehashed files: {again}"
    );
    assert!(f["entries_last_full"].as_u64().unwrap() > 3000);
    // no content, and no manifest either: the replica's tree has the
    // source's quick digest (`RoundSame`)
    assert!(
        f["wire_bytes_last_full"].as_u64().unwrap() < 60_000,
        "{again}"
    );
}

/// The source's state directory is full: its hash index cannot be saved.
/// That is told, and the mirror goes on (the index is only a cache).
#[test]
fn a_full_state_directory_leaves_the_mirror_going() {
    let p = pair();
    for f in 0..3000u64 {
        let dir = p.src.join(format!("d{}", f / 100));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{:0>120}", f)), random_bytes(64, f)).unwrap();
    }
    // hashes of files younger than the timestamp granularity margin are not
    // kept: these are, and do not fit
    std::thread::sleep(Duration::from_millis(2200));
    let fs = Tmpfs::new("size=96k,mode=0700");
    let state = fs.path().join("state");
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let log = p.t.path().join("source.log");
    let _src = AgentCmd::source(&p.src, &p.sid, &p.r_id, &rep.addr)
        .args(&["--state", state.to_str().unwrap()])
        .log(&log)
        .start();
    eventually_or(
        "the trees to converge",
        Duration::from_secs(30),
        || root_hash(&p.src, &[]) == root_hash(&p.dst, &[]),
        || std::fs::read_to_string(&log).unwrap_or_default(),
    );
    // told once the round is over (the save is waited for after it)
    eventually_or(
        "the failed save told",
        Duration::from_secs(10),
        || std::fs::read_to_string(&log).is_ok_and(|l| l.contains("saving the hash index")),
        || std::fs::read_to_string(&log).unwrap_or_default(),
    );
}

/// The replica's disk fills up during an apply: the round fails cleanly (no
/// temp file, the old versions intact), the source retries with backoff, and
/// once there is room again the trees converge.
#[test]
fn disk_full_on_the_replica_is_retried_until_there_is_room() {
    let p = pair();
    let fs = Tmpfs::new("size=4m");
    let dst = fs.path();
    let rep = replica(dst, &p.rid, &p.s_id, &[]);
    std::fs::write(p.src.join("keep"), random_bytes(100_000, 1)).unwrap();
    let _src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &[]);
    wait_converged(&p.src, dst, 20, &[]);
    // Two files that cannot both fit, and a change to one that does, each
    // renamed into place whole: a file caught mid-write at the source would
    // reach the replica as it was, partial, however the replica applies it.
    let put = |name: &str, data: Vec<u8>| {
        let tmp = p.t.path().join(format!("{name}.new"));
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, p.src.join(name)).unwrap();
    };
    let (keep1, keep2) = (random_bytes(100_000, 1), random_bytes(100_000, 2));
    let bigs = [
        ("big1", random_bytes(2_500_000, 3)),
        ("big2", random_bytes(2_500_000, 4)),
    ];
    put("keep", keep2.clone());
    for (name, data) in &bigs {
        put(name, data.clone());
    }
    // Rounds fail for a while; meanwhile the replica holds whole files only.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let keep = std::fs::read(dst.join("keep")).unwrap();
        assert!(keep == keep1 || keep == keep2, "keep is torn");
        for (big, data) in &bigs {
            if let Ok(b) = std::fs::read(dst.join(big)) {
                assert!(b == *data, "{big} is partial ({} bytes)", b.len());
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !(dst.join("big1").exists() && dst.join("big2").exists()),
        "both fit after all: the test proves nothing"
    );
    // Room again: the source's retries get through.
    std::fs::remove_file(p.src.join("big2")).unwrap();
    wait_converged(&p.src, dst, 30, &[]);
    assert!(temp_files(dst).is_empty(), "{:?}", temp_files(dst));
}

/// The agents' logs in files: words without colour escapes, and none of
/// notify's lines about the watches of removed directories.
#[test]
fn logs_in_files_are_plain_and_quiet() {
    let p = pair();
    let rlog = p.t.path().join("replica.log");
    let rep = replica_logged(&p.dst, &p.rid, &p.s_id, &rlog, &[]);
    let slog = p.t.path().join("source.log");
    let src = AgentCmd::source(&p.src, &p.sid, &p.r_id, &rep.addr)
        .log(&slog)
        .start();
    wait_converged(&p.src, &p.dst, 20, &[]);
    for i in 0..20 {
        std::fs::create_dir_all(p.src.join(format!("d{i}/e"))).unwrap();
        std::fs::write(p.src.join(format!("d{i}/e/f")), b"x").unwrap();
    }
    wait_converged(&p.src, &p.dst, 20, &[]);
    for i in 0..20 {
        std::fs::remove_dir_all(p.src.join(format!("d{i}"))).unwrap();
    }
    wait_converged(&p.src, &p.dst, 20, &[]);
    drop(src);
    let (s, r) = (
        std::fs::read_to_string(&slog).unwrap(),
        std::fs::read_to_string(&rlog).unwrap(),
    );
    assert!(s.contains("connected to replica"), "{s}");
    assert!(
        !s.contains('\x1b') && !r.contains('\x1b'),
        "escape codes:\n{s}\n{r}"
    );
    assert!(!s.contains("unable to remove watch"), "{s}");
}

/// Issue 10 item 11: partial rounds that create entries in the root (several
/// renames: the round's journal comes and goes in the root) and update
/// databases in it (their updates make and remove side files there) leave the
/// replica root's mtime equal to the source's, without waiting for a full round.
#[test]
fn partial_rounds_in_the_root_keep_its_mtime() {
    let p = pair();
    let open = |name: &str, wal: bool| {
        let c = rusqlite::Connection::open(p.src.join(name)).unwrap();
        if wal {
            c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
                .unwrap();
        }
        c.execute_batch("CREATE TABLE t(k INTEGER PRIMARY KEY, v BLOB)")
            .unwrap();
        c
    };
    let (wal, journal) = (open("wal.db", true), open("journal.db", false));
    // a WAL database its application opens and closes (no log between)
    open("closed.db", true).close().unwrap();
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let _src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &[]);
    // databases compare by content: `verify`, not the raw root hash. The
    // property under test is the root's mtime, not how fast the first round
    // lands: the deadline allows for a loaded CI (20 s was missed once there).
    let deadline = Instant::now() + Duration::from_secs(60);
    while cli(&["verify".as_ref(), p.src.as_os_str(), p.dst.as_os_str()])
        .status
        .code()
        != Some(0)
    {
        assert!(Instant::now() < deadline, "not converged");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mtime = |d: &Path| {
        let m = std::fs::metadata(d).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        (m.mtime(), m.mtime_nsec())
    };
    let settle = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(3);
        while mtime(&p.dst) != mtime(&p.src) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(mtime(&p.dst), mtime(&p.src), "{what}");
    };
    for round in 0..3 {
        sh(&format!(
            "cd {} && echo a > r{round}a && echo b > r{round}b && mkdir r{round}d && echo c > r{round}d/c",
            p.src.display()
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !p.dst.join(format!("r{round}d/c")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        settle(&format!("entries, round {round}"));
        let closed = rusqlite::Connection::open(p.src.join("closed.db")).unwrap();
        for c in [&wal, &journal, &closed] {
            c.execute("INSERT INTO t VALUES (?1, randomblob(100))", [round])
                .unwrap();
        }
        closed.close().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        settle(&format!("databases, round {round}"));
    }
}
