//! Issue 4: cuts, failover, fencing and failback between two config-driven
//! agents on 127.0.0.1, with real hooks (shell commands writing marker files).

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// One host: its config, folder, state and log of hooks.
pub(crate) struct Host {
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) root: PathBuf,
    pub(crate) state: PathBuf,
    pub(crate) id: String,
}

impl Host {
    pub(crate) fn hooks_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("hooks.log")).unwrap_or_default()
    }

    pub(crate) fn epoch(&self) -> Option<serde_json::Value> {
        let p = self.state.join("app.epoch");
        std::fs::read(p)
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    pub(crate) fn start(&self) -> Agent {
        self.start_env(&[])
    }

    /// [`Host::start`] with extra environment variables (failpoints).
    pub(crate) fn start_env(&self, env: &[(&str, &str)]) -> Agent {
        // Commands need the control socket: ready once it answers.
        AgentCmd::config(&self.config)
            .envs(env)
            .log_append(&self.dir.join("agent.log"))
            .control(&self.dir.join("control.sock"), false)
            .start()
    }

    pub(crate) fn cli(&self, args: &[&str]) -> Output {
        let mut full: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        full.push("--config".as_ref());
        full.push(self.config.as_os_str());
        cli(&full)
    }

    pub(crate) fn status(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
    }

    /// Whether this host runs the folder as a source connected to its peer.
    pub(crate) fn source_connected(&self) -> bool {
        self.status()["folders"].as_array().is_some_and(|f| {
            f.iter()
                .any(|f| f["role"] == "source" && f["connected"] == true)
        })
    }
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two hosts: `a` the source, `b` the replica, each with a config naming the
/// other, the given hooks (TOML lines) and `banner.txt` as an overlay.
pub(crate) fn hosts(t: &Path, hooks_a: &str, hooks_b: &str) -> (Host, Host) {
    let (pa, pb) = (free_port(), free_port());
    let mk = |name: &str| {
        let dir = t.join(name);
        let root = dir.join("app");
        std::fs::create_dir_all(&root).unwrap();
        let id = keygen(&dir.join("id"));
        (dir, root, id)
    };
    let (da, ra, ia) = mk("a");
    let (db, rb, ib) = mk("b");
    let write = |dir: &Path,
                 root: &Path,
                 port: u16,
                 role: &str,
                 peer: &str,
                 peer_port: u16,
                 hooks: &str| {
        let log = dir.join("hooks.log");
        let body = format!(
            r#"[node]
identity = "{id}"
listen = "127.0.0.1:{port}"
control = "{ctl}"
state = "{state}"

[[peer]]
id = "{peer}"
address = "127.0.0.1:{peer_port}"

[[folder]]
name = "app"
path = "{root}"
role = "{role}"
peers = ["{peer}"]
overlay = ["banner.txt"]

[folder.hooks]
{hooks}
"#,
            id = dir.join("id").display(),
            ctl = dir.join("control.sock").display(),
            state = dir.join("state").display(),
            root = root.display(),
            hooks = hooks.replace("LOG", &log.display().to_string()),
        );
        let config = dir.join("understudy.toml");
        std::fs::write(&config, body).unwrap();
        config
    };
    let ca = write(&da, &ra, pa, "source", &ib, pb, hooks_a);
    let cb = write(&db, &rb, pb, "replica", &ia, pa, hooks_b);
    let host = |dir: PathBuf, config, root, id| Host {
        state: dir.join("state"),
        dir,
        config,
        root,
        id,
    };
    (host(da, ca, ra, ia), host(db, cb, rb, ib))
}

pub(crate) const HOOKS_A: &str = r#"stop_source = "echo stop_source >> LOG"
start_source = "echo start_source >> LOG"
stop_replica = "echo stop_replica >> LOG""#;
pub(crate) const HOOKS_B: &str = r#"start_replica = "echo start_replica >> LOG"
stop_source = "echo stop_source >> LOG"
start_source = "echo start_source >> LOG""#;

pub(crate) fn wait_for(what: &str, secs: u64, f: impl FnMut() -> bool) {
    eventually(what, Duration::from_secs(secs), f);
}

/// [`wait_for`], with `diag` (agent logs) in the failure message.
pub(crate) fn wait_or(what: &str, secs: u64, f: impl FnMut() -> bool, diag: impl Fn() -> String) {
    eventually_or(what, Duration::from_secs(secs), f, diag);
}

pub(crate) fn logs(hosts: &[&Host]) -> String {
    hosts
        .iter()
        .map(|h| {
            format!(
                "--- {}:\n{}",
                h.dir.display(),
                std::fs::read_to_string(h.dir.join("agent.log")).unwrap_or_default()
            )
        })
        .collect()
}

pub(crate) fn make_db(path: &Path, rows: i64) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
        .unwrap();
    c.execute_batch("CREATE TABLE IF NOT EXISTS t(k INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    c.execute(
        "INSERT INTO t(v) SELECT 'row' FROM (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < ?1) SELECT i FROM n)",
        [rows],
    )
    .unwrap();
}

pub(crate) fn rows(path: &Path) -> i64 {
    rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| c.query_row("SELECT count(*) FROM t", [], |r| r.get(0)))
        .unwrap_or(-1)
}

pub(crate) fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn cut_failover_fencing_and_failback() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), HOOKS_A, HOOKS_B);
    std::fs::write(a.root.join("config.xml"), "<primary/>").unwrap();
    std::fs::write(a.root.join("banner.txt"), "primary").unwrap();
    std::fs::write(b.root.join("banner.txt"), "you are on the backup server").unwrap();
    make_db(&a.root.join("library.db"), 5000);
    let mut agent_a = a.start();
    let _agent_b = b.start();
    wait_for("the first mirror", 30, || {
        rows(&b.root.join("library.db")) == 5000
    });

    // A cut: both root hashes, the writer stall, bytes shipped.
    make_db(&a.root.join("library.db"), 10);
    let out = a.cli(&["cut", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let cut: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cut["source_root"], cut["replica_root"], "{cut}");
    assert!(cut["cut_id"].as_u64().is_some() && cut["writer_stall_ms"].as_f64().is_some());
    assert!(cut["bytes_shipped"].as_u64().unwrap() > 0, "{cut}");
    assert_eq!(rows(&b.root.join("library.db")), 5010);
    assert_eq!(
        std::fs::read_to_string(b.root.join("banner.txt")).unwrap(),
        "you are on the backup server",
        "an overlay was overwritten by the mirror"
    );

    // Dry run: the plan, nothing changed.
    let out = a.cli(&["failover", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("promote the replica to epoch 1"),
        "{}",
        text(&out)
    );
    assert!(a.hooks_log().is_empty() && b.epoch().is_none());

    // Failover: stop hook here, final cut, promotion and start hook there.
    let out = a.cli(&["failover"]);
    assert!(out.status.success(), "{}", text(&out));
    // The demoted side may run its stop_replica hook too; never start_source.
    let log = a.hooks_log();
    assert!(
        log.starts_with("stop_source\n") && !log.contains("start_source"),
        "{log}"
    );
    wait_for("the replica's start hook", 10, || {
        b.hooks_log() == "start_replica\n"
    });
    let (ea, eb) = (a.epoch().unwrap(), b.epoch().unwrap());
    assert_eq!(
        (ea["role"].as_str(), ea["epoch"].as_u64()),
        (Some("replica"), Some(1))
    );
    assert_eq!(
        (eb["role"].as_str(), eb["epoch"].as_u64()),
        (Some("source"), Some(1))
    );

    // The promoted side now ships to the old source.
    wait_for("b to drive a", 30, || b.source_connected());
    std::fs::write(b.root.join("written-on-b"), "after the failover").unwrap();
    wait_for("b's change on a", 30, || {
        a.root.join("written-on-b").exists()
    });
    assert_eq!(
        std::fs::read_to_string(a.root.join("banner.txt")).unwrap(),
        "primary"
    );

    // Fencing: the old master comes back from an old disk image that still says
    // "source, epoch 0"; it is refused, told why, and takes the replica role.
    agent_a.kill9();
    std::fs::write(
        a.state.join("app.epoch"),
        format!(r#"{{"node":"{}","role":"source","epoch":0}}"#, a.id),
    )
    .unwrap();
    std::fs::write(a.root.join("config.xml"), "<stale old master/>").unwrap();
    let before_b = std::fs::read(b.root.join("config.xml")).unwrap();
    let _agent_a = a.start();
    wait_for("a to be fenced", 30, || {
        a.epoch()
            .is_some_and(|e| e["role"] == "replica" && e["epoch"] == 1)
    });
    let log = std::fs::read_to_string(a.dir.join("agent.log")).unwrap();
    assert!(log.contains("epoch 0") && log.contains("demoted"), "{log}");
    // The promoted side's data is untouched, and it repairs the old master.
    assert_eq!(std::fs::read(b.root.join("config.xml")).unwrap(), before_b);
    wait_or(
        "b to repair a",
        30,
        || std::fs::read(a.root.join("config.xml")).ok() == Some(before_b.clone()),
        || logs(&[&a, &b]),
    );

    // Failback: only what changed since the promotion moved; then the same
    // handover the other way.
    make_db(&b.root.join("library.db"), 7);
    let out = b.cli(&["failback", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(rows(&a.root.join("library.db")), 5017);
    wait_for("a promoted back", 10, || {
        a.epoch()
            .is_some_and(|e| e["role"] == "source" && e["epoch"] == 2)
    });
    assert!(
        b.epoch()
            .is_some_and(|e| e["role"] == "replica" && e["epoch"] == 2)
    );
    assert_eq!(
        std::fs::read_to_string(a.root.join("banner.txt")).unwrap(),
        "primary"
    );
    assert_eq!(
        std::fs::read_to_string(b.root.join("banner.txt")).unwrap(),
        "you are on the backup server"
    );
}

#[test]
fn failed_failovers_roll_back() {
    let t = tempfile::tempdir().unwrap();
    // A stop hook that fails: the source's application is started again.
    let (a, b) = hosts(
        &t.path().join("stop"),
        r#"stop_source = "echo stop_source >> LOG; echo cannot stop >&2; exit 3"
start_source = "echo start_source >> LOG""#,
        HOOKS_B,
    );
    std::fs::write(a.root.join("f"), "x").unwrap();
    let (_aa, _ab) = (a.start(), b.start());
    wait_for("connected", 30, || a.source_connected());
    let out = a.cli(&["failover"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("stop_source") && text(&out).contains("cannot stop"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("still the source at epoch 0"),
        "{}",
        text(&out)
    );
    assert_eq!(a.hooks_log(), "stop_source\nstart_source\n");
    assert!(b.epoch().is_none() && b.hooks_log().is_empty());

    // A start hook that fails on the replica: it rolls its promotion back, and
    // the source's application is started again.
    let (a, b) = hosts(
        &t.path().join("start"),
        HOOKS_A,
        r#"start_replica = "echo start_replica >> LOG; exit 4""#,
    );
    std::fs::write(a.root.join("f"), "x").unwrap();
    let (_aa, _ab) = (a.start(), b.start());
    wait_for("connected", 30, || a.source_connected());
    let out = a.cli(&["failover"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("start_replica"), "{}", text(&out));
    assert!(
        text(&out).contains("refused the promotion")
            && text(&out).contains("its peer:  the replica at epoch 0"),
        "{}",
        text(&out)
    );
    assert_eq!(a.hooks_log(), "stop_source\nstart_source\n");
    assert_eq!(b.hooks_log(), "start_replica\n");
    let eb = b.epoch().unwrap();
    assert_eq!(
        (eb["role"].as_str(), eb["epoch"].as_u64()),
        (Some("replica"), Some(0))
    );
    assert!(a.epoch().is_none(), "the source's state changed");
    // The source still ships to the replica.
    std::fs::write(a.root.join("after"), "y").unwrap();
    wait_for("mirroring to go on", 30, || b.root.join("after").exists());

    // An unreachable replica: nothing is stopped, nothing changes.
    let (a, b) = hosts(&t.path().join("gone"), HOOKS_A, HOOKS_B);
    let _aa = a.start();
    let out = a.cli(&["failover"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("not connected"), "{}", text(&out));
    assert!(a.hooks_log().is_empty() && b.epoch().is_none() && a.epoch().is_none());
}

fn counter(db: &Path) -> i64 {
    let c = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    assert_eq!(
        c.query_row("PRAGMA integrity_check", [], |r| r.get::<_, String>(0))
            .unwrap(),
        "ok",
        "{}",
        db.display()
    );
    c.query_row("SELECT n FROM counter WHERE id = 1", [], |r| r.get(0))
        .unwrap()
}

/// `sync-cli cut` while a writer commits to two databases in one transaction
/// each: the root hashes match, and the replica's two databases hold the same
/// counter, one the writer committed. The writer's worst commit latency over
/// the run is printed beside the cut's own lock window.
#[test]
fn cut_under_a_live_writer_is_consistent_across_databases() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), "", "");
    let wlog = t.path().join("writer.log");
    let mut writer = Command::new(bin("sqlite_writer"))
        .arg("--dir")
        .arg(&a.root)
        .arg("--log")
        .arg(&wlog)
        .args(["--rate", "300"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(t.path().join("writer.err")).unwrap())
        .spawn()
        .unwrap();
    wait_for("the writer's first commit", 20, || {
        std::fs::read_to_string(&wlog).is_ok_and(|l| l.lines().count() > 1)
    });
    let mut agent_a = a.start();
    let _agent_b = b.start();
    wait_for("the first mirror", 30, || {
        b.root.join("a.db").exists() && b.root.join("b.db").exists()
    });
    let mut stalls = Vec::new();
    for _ in 0..3 {
        let out = a.cli(&["cut", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let cut: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(cut["source_root"], cut["replica_root"], "{cut}");
        assert_eq!(cut["databases"], 2, "{cut}");
        stalls.push(cut["writer_stall_ms"].as_f64().unwrap());
    }
    // Freeze the replica where the last round left it, then look.
    agent_a.kill9();
    let (na, nb) = (counter(&b.root.join("a.db")), counter(&b.root.join("b.db")));
    assert_eq!(na, nb, "the replica's databases are at different cuts");
    let committed = std::fs::read_to_string(&wlog).unwrap();
    assert!(
        committed.lines().any(|l| l.trim() == na.to_string()),
        "counter {na} was never committed"
    );
    // SIGTERM: the writer prints its worst commit latency.
    Command::new("kill")
        .args(["-TERM", &writer.id().to_string()])
        .status()
        .unwrap();
    writer.wait().unwrap();
    let said = std::fs::read_to_string(t.path().join("writer.err")).unwrap();
    let worst = said
        .lines()
        .find(|l| l.starts_with("worst_commit_ms"))
        .unwrap_or("worst_commit_ms ?");
    println!("cut lock windows {stalls:?} ms; writer {worst} over the whole run");
    assert!(stalls.iter().all(|&s| s < 50.0), "{stalls:?}");
}
