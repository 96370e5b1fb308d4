//! Issue 9: the agent runs handovers from persisted state. A killed CLI, a
//! killed agent, a second handover while one runs, back-to-back handovers both
//! ways and a held replica database: the application runs on exactly one host
//! throughout, checked by replaying one log every host's hooks append to.

use crate::failover::{Host, hosts, make_db, rows, text, wait_for, wait_or};
use crate::util::*;
use std::path::Path;
use std::process::Command;

/// Every hook on both hosts appends `NAME up|down HOOK` to `apps`;
/// `stop_source` sleeps `stop_s` seconds after saying so (a window to kill the
/// CLI in).
fn app_hooks(apps: &Path, name: &str, stop_s: f64) -> String {
    let log = apps.display();
    format!(
        r#"stop_source = "echo {name} down stop_source >> {log}; sleep {stop_s}"
start_source = "echo {name} up start_source >> {log}"
start_replica = "echo {name} up start_replica >> {log}"
stop_replica = "echo {name} down stop_replica >> {log}""#
    )
}

/// Two hosts wired to one apps log; `a` runs the application at first.
fn pair(t: &Path, stop_s: f64) -> (Host, Host, std::path::PathBuf) {
    std::fs::create_dir_all(t).unwrap();
    let apps = t.join("apps.log");
    std::fs::write(&apps, "a up\n").unwrap();
    let (a, b) = hosts(
        t,
        &app_hooks(&apps, "a", stop_s),
        &app_hooks(&apps, "b", stop_s),
    );
    std::fs::write(a.root.join("config.xml"), "<app/>").unwrap();
    (a, b, apps)
}

/// Replays the apps log: never two up at once. Returns who is up at the end.
fn replay(apps: &Path) -> Vec<String> {
    let log = std::fs::read_to_string(apps).unwrap();
    let mut up = std::collections::BTreeSet::new();
    for (n, line) in log.lines().enumerate() {
        let mut w = line.split(' ');
        match (w.next(), w.next()) {
            (Some(h), Some("up")) => up.insert(h.to_string()),
            (Some(h), Some("down")) => up.remove(h),
            _ => panic!("bad line {line:?}"),
        };
        assert!(up.len() <= 1, "two apps running after line {n}:\n{log}");
    }
    up.into_iter().collect()
}

/// Who is the source, when both persisted states agree (same epoch, one
/// source, one replica); `None` while they do not.
fn agreed_source<'h>(a: &'h Host, b: &'h Host) -> Option<&'h Host> {
    let role = |h: &Host| {
        h.epoch().map(|e| {
            (
                e["role"].as_str().unwrap_or("").to_string(),
                e["epoch"].as_u64(),
            )
        })
    };
    // Before any handover there is no epoch file: the configured roles hold.
    let (ra, rb) = (
        role(a).unwrap_or(("source".into(), Some(0))),
        role(b).unwrap_or(("replica".into(), Some(0))),
    );
    match (ra.0.as_str(), rb.0.as_str()) {
        ("source", "replica") if ra.1 == rb.1 => Some(a),
        ("replica", "source") if ra.1 == rb.1 => Some(b),
        _ => None,
    }
}

/// Exactly one application up, on the host both sides agree is the source,
/// and no handover record left.
fn settled(a: &Host, b: &Host, apps: &Path) -> bool {
    let up = replay(apps);
    let done = !a.state.join("app.handover").exists() && !b.state.join("app.handover").exists();
    done && up.len() == 1
        && agreed_source(a, b).is_some_and(|s| {
            let name = if std::ptr::eq(s, a) { "a" } else { "b" };
            up[0] == name
        })
}

fn source_of<'h>(a: &'h Host, b: &'h Host) -> &'h Host {
    agreed_source(a, b).expect("both sides agree who the source is")
}

#[test]
fn killed_cli_leaves_the_app_on_exactly_one_host() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, apps) = pair(t.path(), 1.5);
    let (_aa, _ab) = (a.start(), b.start());
    for sig in ["KILL", "HUP", "INT"] {
        let src = source_of(&a, &b);
        wait_for("the source to reach its replica", 30, || {
            src.source_connected()
        });
        let downs = |l: &str| l.lines().filter(|l| l.ends_with(" stop_source")).count();
        let before = downs(&std::fs::read_to_string(&apps).unwrap());
        let mut cli = Command::new(bin("sync-cli"))
            .args(["failover", "--config"])
            .arg(&src.config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // stop_source has run (it sleeps now): kill the CLI.
        wait_for("stop_source", 30, || {
            downs(&std::fs::read_to_string(&apps).unwrap()) > before
        });
        Command::new("kill")
            .args([&format!("-{sig}"), &cli.id().to_string()])
            .status()
            .unwrap();
        let _ = cli.wait();
        wait_or(
            &format!("one app and agreement after SIG{sig}"),
            30,
            || settled(&a, &b, &apps),
            || {
                format!(
                    "{}\n{}",
                    std::fs::read_to_string(&apps).unwrap(),
                    crate::failover::logs(&[&a, &b])
                )
            },
        );
        assert!(
            !std::ptr::eq(source_of(&a, &b), src),
            "SIG{sig}: the handover did not complete"
        );
    }
}

#[test]
fn killed_agent_resumes_or_rolls_back() {
    let t = tempfile::tempdir().unwrap();
    // Killed right after stop_source: the promotion was never sent → rolled
    // back, the application started again here.
    let (a, b, apps) = pair(&t.path().join("stop"), 0.0);
    let _ab = b.start();
    let mut aa = a.start_env(&[("UNDERSTUDY_FAILPOINT", "handover-after-stop-source")]);
    wait_for("connected", 30, || a.source_connected());
    let out = a.cli(&["failover"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("lost contact with the agent"),
        "{}",
        text(&out)
    );
    let _ = aa.child.wait();
    let rec = std::fs::read_to_string(a.state.join("app.handover")).unwrap();
    assert!(rec.contains("\"step\":\"stop_source\""), "{rec}");
    assert_eq!(
        replay(&apps),
        Vec::<String>::new(),
        "the app is down while the agent is"
    );
    let _aa = a.start();
    wait_or(
        "the rollback",
        30,
        || settled(&a, &b, &apps),
        || crate::failover::logs(&[&a, &b]),
    );
    assert!(std::ptr::eq(source_of(&a, &b), &a));
    assert!(b.epoch().is_none());
    assert!(!std::fs::read_to_string(&apps).unwrap().contains("b up"));

    // Killed with the promotion persisted as the next step but not sent: at
    // restart the peer still takes this node at epoch 0 → rolled back.
    let (a, b, apps) = pair(&t.path().join("unsent"), 0.0);
    let _ab = b.start();
    let mut aa = a.start_env(&[("UNDERSTUDY_FAILPOINT", "handover-before-promote")]);
    wait_for("connected", 30, || a.source_connected());
    let out = a.cli(&["failover"]);
    assert!(!out.status.success(), "{}", text(&out));
    let _ = aa.child.wait();
    let rec = std::fs::read_to_string(a.state.join("app.handover")).unwrap();
    assert!(rec.contains("\"step\":\"promote\""), "{rec}");
    let _aa = a.start();
    wait_or(
        "the rollback after asking the peer",
        30,
        || settled(&a, &b, &apps),
        || crate::failover::logs(&[&a, &b]),
    );
    assert!(std::ptr::eq(source_of(&a, &b), &a));
    assert!(b.epoch().is_none());
    assert!(!std::fs::read_to_string(&apps).unwrap().contains("b up"));
    let log = std::fs::read_to_string(a.dir.join("agent.log")).unwrap();
    assert!(log.contains("the peer was not promoted"), "{log}");

    // The replica killed after persisting its new epoch, before start_replica:
    // the old source waits (its application stays stopped), the replica runs
    // start_replica at restart, and the handover completes.
    let (a, b, apps) = pair(&t.path().join("replica"), 0.0);
    let _aa = a.start();
    let mut ab = b.start_env(&[("UNDERSTUDY_FAILPOINT", "promotion-before-start-replica")]);
    wait_for("connected", 30, || a.source_connected());
    let cli = Command::new(bin("sync-cli"))
        .args(["failover", "--config"])
        .arg(&a.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _ = ab.child.wait();
    assert!(b.state.join("app.promotion").exists());
    assert_eq!(replay(&apps), Vec::<String>::new());
    let _ab = b.start();
    let out = cli.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    wait_or(
        "the handover to complete",
        30,
        || settled(&a, &b, &apps),
        || crate::failover::logs(&[&a, &b]),
    );
    assert!(std::ptr::eq(source_of(&a, &b), &b));
    assert!(!b.state.join("app.promotion").exists());

    // Killed once the promotion was answered: completed at restart.
    let (a, b, apps) = pair(&t.path().join("promote"), 0.0);
    let _ab = b.start();
    let mut aa = a.start_env(&[("UNDERSTUDY_FAILPOINT", "handover-after-promote")]);
    wait_for("connected", 30, || a.source_connected());
    let out = a.cli(&["failover"]);
    assert!(!out.status.success(), "{}", text(&out));
    let _ = aa.child.wait();
    let rec = std::fs::read_to_string(a.state.join("app.handover")).unwrap();
    assert!(rec.contains("\"step\":\"promote\""), "{rec}");
    let _aa = a.start();
    wait_or(
        "the handover to complete",
        30,
        || settled(&a, &b, &apps),
        || crate::failover::logs(&[&a, &b]),
    );
    assert!(std::ptr::eq(source_of(&a, &b), &b));
}

#[test]
fn a_second_handover_while_one_runs_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, apps) = pair(t.path(), 3.0);
    let (_aa, _ab) = (a.start(), b.start());
    wait_for("connected", 30, || a.source_connected());
    let first = Command::new(bin("sync-cli"))
        .args(["failover", "--config"])
        .arg(&a.config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("stop_source", 30, || {
        std::fs::read_to_string(&apps).unwrap().contains("a down")
    });
    for kind in ["failover", "failback"] {
        let out = a.cli(&[kind]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains("already in progress"), "{}", text(&out));
    }
    let st = a.cli(&["status"]);
    assert!(
        text(&st).contains("handover in progress: failover of folder app"),
        "{}",
        text(&st)
    );
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // The handover ends once the old source has persisted its new role; its
    // `stop_replica` hook runs right after, maybe after the CLI returned: the
    // hooks log is taken once that last hook of the first handover has run.
    wait_for("the old source's stop_replica hook", 30, || {
        std::fs::read_to_string(&apps)
            .unwrap()
            .contains("a down stop_replica")
    });
    // Run again at once on the old source: it is the replica now, whatever a
    // status read a moment ago said; nothing runs.
    let before = std::fs::read_to_string(&apps).unwrap();
    let out = a.cli(&["failover"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("this node is its replica at epoch 1"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&apps).unwrap(), before);
    assert_eq!(before.matches("stop_source").count(), 1, "{before}");
    wait_for("settled", 30, || settled(&a, &b, &apps));
}

#[test]
fn back_to_back_handovers_alternate_with_one_app() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, apps) = pair(t.path(), 0.0);
    let (_aa, _ab) = (a.start(), b.start());
    for round in 0..20 {
        let src = source_of(&a, &b);
        let kind = if round % 2 == 0 {
            "failover"
        } else {
            "failback"
        };
        // No wait for the new source to connect: the preflight does that.
        let out = src.cli(&[kind]);
        assert!(out.status.success(), "round {round}: {}", text(&out));
        assert!(!std::ptr::eq(source_of(&a, &b), src), "round {round}");
        replay(&apps);
    }
    wait_for("settled", 30, || settled(&a, &b, &apps));
    assert_eq!(a.epoch().unwrap()["epoch"], 20);
    assert!(std::ptr::eq(source_of(&a, &b), &a));
}

/// Both hosts' operators start a failover at the same instant: the one on the
/// source hands over, the one on the replica is refused by its persisted
/// state (never by a stale status), and at no instant do two apps run.
#[test]
fn handovers_started_at_once_from_both_hosts_leave_one_app() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, apps) = pair(t.path(), 0.0);
    let (_aa, _ab) = (a.start(), b.start());
    for round in 0..4 {
        let before = source_of(&a, &b);
        let ep = |h: &Host| h.epoch().and_then(|v| v["epoch"].as_u64()).unwrap_or(0);
        let epoch = ep(before);
        let (oa, ob) = std::thread::scope(|s| {
            let ha = s.spawn(|| a.cli(&["failover"]));
            let hb = s.spawn(|| b.cli(&["failover"]));
            (ha.join().unwrap(), hb.join().unwrap())
        });
        let ok = [&oa, &ob].iter().filter(|o| o.status.success()).count();
        assert_eq!(ok, 1, "round {round}: a: {}\nb: {}", text(&oa), text(&ob));
        replay(&apps);
        wait_for("settled", 30, || settled(&a, &b, &apps));
        let after = source_of(&a, &b);
        assert!(!std::ptr::eq(after, before), "round {round}: no handover");
        assert_eq!(ep(after), epoch + 1);
    }
}

#[test]
fn held_replica_database_refuses_before_stop_source() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, apps) = pair(t.path(), 0.0);
    make_db(&a.root.join("library.db"), 100);
    let (_aa, _ab) = (a.start(), b.start());
    wait_for("the first mirror", 30, || {
        rows(&b.root.join("library.db")) == 100
    });
    // The standby's application left running: it holds the database open.
    let mut holder = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "exec 3<{}; exec sleep 60",
            b.root.join("library.db").display()
        ))
        .spawn()
        .unwrap();
    let pid = holder.id();
    wait_for("the holder", 10, || {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
    });
    let want = format!("library.db: pid {pid} (sleep)");
    let dry = a.cli(&["failover", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(2), "{}", text(&dry));
    assert!(
        text(&dry).contains("[FAIL] replica databases not held open") && text(&dry).contains(&want),
        "{}",
        text(&dry)
    );
    let out = a.cli(&["failover"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // The human error names the database and the process.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&want), "{err}");
    assert_eq!(
        std::fs::read_to_string(&apps).unwrap(),
        "a up\n",
        "a hook ran"
    );
    assert!(a.epoch().is_none() && b.epoch().is_none());
    // A failback at epoch 0 has nothing to return: refused, nothing runs.
    let out = a.cli(&["failback"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("nothing to fail back"),
        "{}",
        text(&out)
    );
    assert_eq!(std::fs::read_to_string(&apps).unwrap(), "a up\n");
    let _ = holder.kill();
    let _ = holder.wait();
    let dry = a.cli(&["failover", "--dry-run"]);
    assert!(dry.status.success(), "{}", text(&dry));
    assert!(
        text(&dry).contains("[ok] replica databases not held open"),
        "{}",
        text(&dry)
    );
}

/// A replica whose config says it cannot serve (`failover = false`) says so
/// in its hello: the source's preflight refuses the handover before
/// `stop_source` runs, naming the cause, instead of rolling back after the
/// promotion is refused.
#[test]
fn replica_that_cannot_be_promoted_refuses_in_preflight() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, apps) = pair(t.path(), 0.0);
    let cfg = std::fs::read_to_string(&b.config).unwrap();
    std::fs::write(
        &b.config,
        cfg.replace("overlay = [", "failover = false\noverlay = ["),
    )
    .unwrap();
    let (_aa, _ab) = (a.start(), b.start());
    wait_for("the first mirror", 30, || {
        b.root.join("config.xml").exists()
    });
    let dry = a.cli(&["failover", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(2), "{}", text(&dry));
    assert!(
        text(&dry).contains("[FAIL] replica can serve as the source")
            && text(&dry).contains("failover = false"),
        "{}",
        text(&dry)
    );
    let out = a.cli(&["failover"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be promoted"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&apps).unwrap(),
        "a up\n",
        "a hook ran"
    );
    assert!(a.epoch().is_none() && b.epoch().is_none());
}

/// Issue 12's parity guard: both hosts run their folder's `parity` command
/// (the app's version) at the preflight cut. Different outputs refuse the
/// handover before any hook runs, showing both; `--ignore-parity` overrides;
/// equal outputs proceed.
#[test]
fn parity_outputs_that_differ_refuse_the_handover_before_any_hook() {
    let t = tempfile::tempdir().unwrap();
    let (a, b, apps) = pair(t.path(), 0.0);
    for (h, v) in [(&a, "jellyfin 10.10.3"), (&b, "jellyfin 10.9.11")] {
        let version = h.dir.join("version");
        std::fs::write(&version, format!("{v}\n")).unwrap();
        let cfg = std::fs::read_to_string(&h.config).unwrap().replace(
            "overlay = [",
            &format!("parity = \"cat {}\"\noverlay = [", version.display()),
        );
        std::fs::write(&h.config, cfg).unwrap();
    }
    let (_aa, _ab) = (a.start(), b.start());
    wait_for("the first mirror", 30, || {
        b.root.join("config.xml").exists()
    });
    let dry = a.cli(&["failover", "--dry-run"]);
    assert_eq!(dry.status.code(), Some(2), "{}", text(&dry));
    for want in [
        "[FAIL] app versions match (parity)",
        "jellyfin 10.10.3",
        "jellyfin 10.9.11",
    ] {
        assert!(text(&dry).contains(want), "{want}: {}", text(&dry));
    }
    let out = a.cli(&["failover"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("jellyfin 10.9.11"), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&apps).unwrap(),
        "a up\n",
        "a hook ran"
    );
    assert!(a.epoch().is_none() && b.epoch().is_none());
    let ignored = a.cli(&["failover", "--dry-run", "--ignore-parity"]);
    assert!(ignored.status.success(), "{}", text(&ignored));
    assert!(
        text(&ignored).contains("ignored (--ignore-parity)"),
        "{}",
        text(&ignored)
    );
    // The standby upgraded to the master's version: the handover proceeds.
    std::fs::write(b.dir.join("version"), "jellyfin 10.10.3\n").unwrap();
    let out = a.cli(&["failover"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(replay(&apps), ["b"]);
}
