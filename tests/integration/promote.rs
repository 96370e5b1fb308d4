//! Issue 9: the master host dies; `sync-cli promote` on the standby; the old
//! master returns fenced, keeps what only it held under `{state}/diverged/`,
//! and becomes a faithful replica of the new master. Two config-driven agents
//! on 127.0.0.1 with hooks that log.

use crate::failover::{HOOKS_A, Host, hosts, make_db, rows, text, wait_for, wait_or};
use crate::util::*;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The master's hooks: its app writes a last file as it is stopped, slowly,
/// when the node is fenced (`ROOTDIR` is its folder).
const HOOKS_A_SLOW_STOP: &str = r#"stop_source = "echo stop_source >> LOG"
start_source = "echo start_source >> LOG"
stop_replica = "sleep 3; echo last words > ROOTDIR/last-words.txt; echo stop_replica >> LOG""#;

/// The standby's hooks: `start_replica` also records when it ran (ns).
const HOOKS_B: &str = r#"start_replica = "echo start_replica >> LOG; date +%s%N > LOG.t"
stop_source = "echo stop_source >> LOG"
start_source = "echo start_source >> LOG""#;

fn agent_logs(hosts: &[&Host]) -> String {
    crate::failover::logs(hosts)
}

/// The replica entry of a host's status.
fn replica_entry(h: &Host) -> serde_json::Value {
    h.status()["folders"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["role"] == "replica").cloned())
        .unwrap_or(serde_json::Value::Null)
}

fn capture_dirs(h: &Host) -> Vec<PathBuf> {
    std::fs::read_dir(h.state.join("diverged"))
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

fn now_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The writer's counter in `db`, after an integrity check.
fn counter(db: &Path) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok", "{}", db.display());
    c.query_row("SELECT n FROM counter WHERE id = 1", [], |r| r.get(0))
        .unwrap()
}

/// Rows of `library.db` under `root`, read with a plain connection.
fn db_rows(root: &Path) -> i64 {
    rows(&root.join("library.db"))
}

/// The app: a live writer committing to `a.db` and `b.db` under `root`.
fn start_writer(root: &Path, wlog: &Path) -> std::process::Child {
    let writer = std::process::Command::new(bin("sqlite_writer"))
        .arg("--dir")
        .arg(root)
        .arg("--log")
        .arg(wlog)
        .args(["--rate", "300"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the writer's first commit", 20, || {
        std::fs::read_to_string(wlog).is_ok_and(|l| l.lines().count() > 1)
    });
    writer
}

/// SIGKILL of the master's agent, then of its app 300 ms later; then more
/// writes to its tree. Returns the writer's last logged commit.
fn kill_master(a: &Host, agent: &mut Agent, writer: &mut std::process::Child, wlog: &Path) -> i64 {
    agent.kill9();
    std::thread::sleep(Duration::from_millis(300));
    writer.kill().unwrap();
    writer.wait().unwrap();
    make_db(&a.root.join("library.db"), 7);
    std::fs::write(a.root.join("config.xml"), "<only on a/>").unwrap();
    std::fs::write(a.root.join("only-a.txt"), "written during the outage").unwrap();
    assert_eq!(db_rows(&a.root), 107);
    std::fs::read_to_string(wlog)
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .max()
        .unwrap()
}

/// `sync-cli promote` on `b`: succeeds at epoch 1; returns the time from the
/// command's start to its start hook running.
fn promote(b: &Host) -> Duration {
    let t0 = now_ns();
    let out = b.cli(&["promote", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let ans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (ans["ok"].as_bool(), ans["epoch"].as_u64()),
        (Some(true), Some(1)),
        "{ans}"
    );
    assert_eq!(b.hooks_log(), "start_replica\n");
    let hook_ns: u128 = std::fs::read_to_string(b.dir.join("hooks.log.t"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let eb = b.epoch().unwrap();
    assert_eq!(
        (eb["role"].as_str(), eb["epoch"].as_u64()),
        (Some("source"), Some(1))
    );
    Duration::from_nanos((hook_ns.saturating_sub(t0)) as u64)
}

/// What only the old master held is under its diverged/ directory, named by
/// status and log; the marker is gone.
fn check_kept(a: &Host, last_logged: i64) {
    let dirs = capture_dirs(a);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let kept = &dirs[0];
    let name = kept.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.starts_with("app-1-"), "{name}");
    let read = |p: &str| std::fs::read_to_string(kept.join(p)).unwrap();
    assert_eq!(read("config.xml"), "<only on a/>");
    assert_eq!(read("only-a.txt"), "written during the outage");
    // Written by the app as its stop hook ran at the fencing: the repair
    // (and the copy) waited for the hook.
    assert_eq!(read("last-words.txt"), "last words\n");
    assert_eq!(db_rows(kept), 107, "the old master's database writes");
    // The app's commits after the standby's last round, kept whole (the hot
    // WAL of a killed writer included).
    let kept_counter = counter(&kept.join("a.db"));
    assert!(
        kept_counter >= last_logged,
        "{kept_counter} < {last_logged}"
    );
    assert_eq!(counter(&kept.join("b.db")), kept_counter);
    assert!(!kept.join("notes/keep.txt").exists(), "kept what both had");
    let manifest = read("MANIFEST");
    for line in [
        "changed\tfile\t12\tconfig.xml",
        "deleted\tfile\t25\tonly-a.txt",
        "deleted\tfile\t11\tlast-words.txt",
        "\tlibrary.db\n",
        "changed\tdatabase\t",
        "\ta.db\n",
    ] {
        assert!(manifest.contains(line), "{line:?} not in\n{manifest}");
    }
    assert!(
        !a.state.join("app.diverged-pending").exists(),
        "the marker stays after the capture"
    );
    let shown = kept.display().to_string();
    assert_eq!(replica_entry(a)["diverged"], shown);
    let log = std::fs::read_to_string(a.dir.join("agent.log")).unwrap();
    assert!(log.contains(&shown), "{log}");
    let human = text(&a.cli(&["status"]));
    assert!(human.contains(&shown), "{human}");
}

/// The promoted standby serves as source and takes writes.
fn new_master_writes(b: &Host) {
    wait_for("b to run as source", 10, || {
        b.status()["folders"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["role"] == "source"))
    });
    make_db(&b.root.join("library.db"), 50);
    std::fs::write(b.root.join("config.xml"), "<b is the master now/>").unwrap();
    std::fs::write(b.root.join("new-on-b.txt"), "after the promotion").unwrap();
    assert_eq!(db_rows(&b.root), 150);
}

/// The must-hold scenario of issue 9.
#[test]
fn issue9_promote_when_master_dead_then_old_master_returns_fenced_and_keeps_its_writes() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), HOOKS_A_SLOW_STOP, HOOKS_B);
    let cfg = std::fs::read_to_string(&a.config).unwrap();
    let cfg = cfg.replace("ROOTDIR", &a.root.display().to_string());
    std::fs::write(&a.config, cfg).unwrap();
    // The standby reaches the old master by host name, resolved at each connect.
    let cfg = std::fs::read_to_string(&b.config).unwrap();
    let cfg = cfg.replace("address = \"127.0.0.1:", "address = \"localhost:");
    std::fs::write(&b.config, cfg).unwrap();
    std::fs::write(a.root.join("config.xml"), "<primary/>").unwrap();
    std::fs::create_dir(a.root.join("notes")).unwrap();
    std::fs::write(a.root.join("notes/keep.txt"), "shared").unwrap();
    make_db(&a.root.join("library.db"), 100);
    let wlog = t.path().join("writer.log");
    let mut writer = start_writer(&a.root, &wlog);
    let mut agent_a = a.start();
    let _agent_b = b.start();
    wait_or(
        "the first mirror",
        30,
        || db_rows(&b.root) == 100 && b.root.join("a.db").exists(),
        || agent_logs(&[&a, &b]),
    );

    // While the source is connected, promote is refused: exit 2, pointing at
    // failover; no hook ran, no epoch persisted.
    wait_for("a connected", 30, || a.source_connected());
    let out = b.cli(&["promote"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("failover") && said.contains("connected"),
        "{said}"
    );
    assert!(b.hooks_log().is_empty() && b.epoch().is_none());

    // The master dies with writes its standby never got; the standby notices
    // (QUIC idle timeout) and is promoted.
    let last_logged = kill_master(&a, &mut agent_a, &mut writer, &wlog);
    wait_or(
        "b to see its source gone",
        30,
        || replica_entry(&b)["connected"] == false,
        || agent_logs(&[&b]),
    );
    let b_counter = counter(&b.root.join("a.db"));
    assert!(
        b_counter < last_logged,
        "nothing unreplicated ({b_counter})"
    );
    let promote_to_hook = promote(&b);

    new_master_writes(&b);

    // The old master restarts with its old config (role source, epoch 0).
    let t1 = Instant::now();
    let _agent_a = a.start();
    let fenced = |e: serde_json::Value| e["role"] == "replica" && e["epoch"] == 1;
    wait_or(
        "a to be fenced",
        30,
        || a.epoch().is_some_and(fenced),
        || agent_logs(&[&a, &b]),
    );
    let fenced_after = t1.elapsed();
    let repaired = || {
        db_rows(&a.root) == 150
            && std::fs::read(a.root.join("config.xml")).ok()
                == Some(b"<b is the master now/>".to_vec())
            && !a.root.join("only-a.txt").exists()
    };
    wait_or("a repaired by b", 60, repaired, || agent_logs(&[&a, &b]));
    let converged_after = t1.elapsed();
    // Converged by both root hashes: a cut from the new master.
    let out = b.cli(&["cut", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let cut: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cut["source_root"], cut["replica_root"], "{cut}");
    assert_eq!(cut["epoch"], 1, "{cut}");
    assert!(a.root.join("new-on-b.txt").exists());
    assert_eq!(db_rows(&b.root), 150, "a write of the new master was lost");
    assert_eq!(counter(&a.root.join("a.db")), counter(&b.root.join("a.db")));
    assert!(a.hooks_log().contains("stop_replica"), "{}", a.hooks_log());
    assert_eq!(b.hooks_log(), "start_replica\n", "b's app was restarted");
    check_kept(&a, last_logged);

    // A later round captures nothing more.
    std::fs::write(b.root.join("later.txt"), "x").unwrap();
    wait_for("later.txt on a", 30, || a.root.join("later.txt").exists());
    assert_eq!(capture_dirs(&a).len(), 1);

    println!(
        "promote -> standby's start hook: {:.0} ms; old master restart -> fenced: {:.2} s, -> converged: {:.2} s",
        promote_to_hook.as_secs_f64() * 1e3,
        fenced_after.as_secs_f64(),
        converged_after.as_secs_f64()
    );
}

#[test]
fn issue9_standby_without_its_peers_address_is_a_config_error() {
    let t = tempfile::tempdir().unwrap();
    let (_a, b) = hosts(t.path(), "", "");
    let cfg = std::fs::read_to_string(&b.config).unwrap();
    let no_addr: String = cfg
        .lines()
        .filter(|l| !l.starts_with("address"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&b.config, &no_addr).unwrap();
    let out = run(std::process::Command::new(bin("sync-agent"))
        .arg("--config")
        .arg(&b.config));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("folder app") && e.contains("address") && e.contains("failover = false"),
        "{e}"
    );
    // Never promoted: no address needed.
    std::fs::write(
        &b.config,
        no_addr.replace("overlay = [", "failover = false\noverlay = ["),
    )
    .unwrap();
    let _agent = AgentCmd::config(&b.config).start();
}

/// Issue 9, protocol level: a pinned source sends crafted `Promote`s to a
/// config-driven standby. Refused (nothing persisted, no hook): a node that
/// cannot serve as source (`failover = false`, no peer address), an epoch
/// more than one step ahead, `u64::MAX`, and a hello past the highest epoch.
/// One step ahead on a promotable node is accepted (the bounds are not a wall).
#[tokio::test]
async fn issue9_promote_bounds_from_a_pinned_source() {
    use crate::hostile_peer::Peer;
    use proto::{Hello, Message, Role};
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), "", HOOKS_B);
    let me = sync_agent::Identity::load(&a.dir.join("id")).unwrap();
    let them: sync_agent::NodeId = b.id.parse().unwrap();
    let no_promote = |h: &Host| {
        assert!(h.epoch().is_none(), "an epoch was persisted");
        assert!(h.hooks_log().is_empty(), "a hook ran: {}", h.hooks_log());
    };
    // A session: hello at `epoch`, then `msg`; the replica's answer.
    async fn ask(
        me: &sync_agent::Identity,
        them: sync_agent::NodeId,
        addr: &str,
        epoch: u64,
        msg: Option<Message>,
    ) -> Message {
        let mut p = Peer::connect(me, them, addr.parse().unwrap()).await;
        p.send(&Message::Hello(
            Hello::new(Role::Source, "app").with_epoch(epoch),
        ))
        .await;
        let hello = p.expect().await;
        let Some(msg) = msg else {
            return hello;
        };
        assert!(matches!(hello, Message::Hello(_)), "{hello:?}");
        p.send(&msg).await;
        p.expect().await
    }
    let refused = |m: Message, words: &[&str]| match m {
        Message::Promoted { error, .. } if !error.is_empty() => {
            for w in words {
                assert!(error.contains(w), "{w:?} not in {error}");
            }
        }
        other => panic!("not refused: {other:?}"),
    };

    // failover = false, and no address for its peer: never promoted.
    let cfg = std::fs::read_to_string(&b.config).unwrap();
    let never: String = cfg
        .lines()
        .filter(|l| !l.starts_with("address"))
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        .replace("overlay = [", "failover = false\noverlay = [");
    std::fs::write(&b.config, never).unwrap();
    let agent = b.start();
    let m = ask(
        &me,
        them,
        &agent.addr,
        0,
        Some(Message::Promote { epoch: 1 }),
    )
    .await;
    refused(m, &["cannot serve"]);
    no_promote(&b);
    drop(agent);

    // Promotable: too far ahead, u64::MAX, a hello past the bound.
    std::fs::write(&b.config, &cfg).unwrap();
    let agent = b.start();
    for epoch in [2, 1 << 40, u64::MAX] {
        let m = ask(&me, them, &agent.addr, 0, Some(Message::Promote { epoch })).await;
        refused(m, &["epoch"]);
        no_promote(&b);
    }
    let m = ask(&me, them, &agent.addr, u64::MAX, None).await;
    assert!(
        matches!(&m, Message::Error { message, .. } if message.contains("epoch")),
        "{m:?}"
    );
    no_promote(&b);
    // One step: accepted, persisted, hook ran.
    let m = ask(
        &me,
        them,
        &agent.addr,
        0,
        Some(Message::Promote { epoch: 1 }),
    )
    .await;
    assert!(
        matches!(&m, Message::Promoted { epoch: 1, error } if error.is_empty()),
        "{m:?}"
    );
    let e = b.epoch().unwrap();
    assert_eq!(
        (e["role"].as_str(), e["epoch"].as_u64()),
        (Some("source"), Some(1))
    );
    assert_eq!(b.hooks_log(), "start_replica\n");
}

/// Issue 9: the old master was fenced (marker and epoch file written) and its
/// agent restarted before the new master's first repair: the repair that
/// follows the restart still keeps aside what only it held.
#[test]
fn issue9_capture_marker_survives_a_restart_before_the_repair() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), HOOKS_A, HOOKS_B);
    std::fs::write(a.root.join("config.xml"), "<a before the fence/>").unwrap();
    std::fs::write(a.root.join("only-a.txt"), "mine").unwrap();
    std::fs::write(b.root.join("config.xml"), "<b, the master/>").unwrap();
    for (h, role) in [(&a, "replica"), (&b, "source")] {
        std::fs::create_dir_all(&h.state).unwrap();
        std::fs::write(
            h.state.join("app.epoch"),
            format!(r#"{{"node":"{}","role":"{role}","epoch":1}}"#, h.id),
        )
        .unwrap();
    }
    std::fs::write(a.state.join("app.diverged-pending"), "{\"epoch\":1}\n").unwrap();
    let (_agent_a, _agent_b) = (a.start(), b.start());
    wait_or(
        "a repaired by b",
        30,
        || {
            std::fs::read(a.root.join("config.xml")).ok() == Some(b"<b, the master/>".to_vec())
                && !a.root.join("only-a.txt").exists()
        },
        || agent_logs(&[&a, &b]),
    );
    let dirs = capture_dirs(&a);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    assert_eq!(
        std::fs::read_to_string(dirs[0].join("config.xml")).unwrap(),
        "<a before the fence/>"
    );
    assert_eq!(
        std::fs::read_to_string(dirs[0].join("only-a.txt")).unwrap(),
        "mine"
    );
    assert!(!a.state.join("app.diverged-pending").exists());
}
