//! Issue 13: `sync-cli doctor` on a healthy pair, and on a folder that holds
//! an unexcluded `transcodes/`.

use crate::failover::{Host, hosts, logs, wait_or};

fn doctor(h: &Host) -> (i32, Vec<serde_json::Value>) {
    let out = h.cli(&["doctor", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json: {e}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let checks = v["checks"].as_array().cloned().unwrap_or_default();
    (out.status.code().unwrap_or(-1), checks)
}

fn named<'a>(checks: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    checks
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {checks:?}"))
}

#[test]
fn issue13_doctor_on_a_healthy_pair_and_an_unexcluded_transcodes_dir() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), "", "");
    std::fs::write(a.root.join("config.xml"), "<x/>").unwrap();
    let _agent_a = a.start();
    let _agent_b = b.start();
    wait_or(
        "a connected",
        30,
        || a.source_connected(),
        || logs(&[&a, &b]),
    );

    let (code, checks) = doctor(&a);
    assert_eq!(code, 0, "{checks:#?}");
    assert!(checks.len() >= 8, "{checks:#?}");
    for c in &checks {
        assert!(
            ["ok", "warn", "fail"].contains(&c["status"].as_str().unwrap()),
            "{c}"
        );
        assert!(!c["detail"].as_str().unwrap().is_empty(), "{c}");
    }
    for name in [
        "inotify:app",
        "xattrs:app",
        "acl:app",
        "mtime_ns:app",
        "fs_type:app",
        "free_space:app",
        "pid_namespace",
        "config",
    ] {
        named(&checks, name);
    }
    assert_eq!(named(&checks, "excludes:app")["status"], "ok");
    assert_eq!(named(&checks, "agent")["status"], "ok", "{checks:#?}");
    assert_eq!(named(&checks, "peer:app")["status"], "ok", "{checks:#?}");
    // The replica's hello says its build and its clock: same build, and a
    // clock on this machine, so no skew to speak of.
    assert_eq!(
        named(&checks, "peer-version:app")["status"],
        "ok",
        "{checks:#?}"
    );
    assert_eq!(named(&checks, "clock:app")["status"], "ok", "{checks:#?}");
    assert!(
        named(&checks, "inotify:app")["detail"]
            .as_str()
            .unwrap()
            .contains("max_user_watches")
    );

    std::fs::create_dir_all(a.root.join("transcodes/x")).unwrap();
    let (code, checks) = doctor(&a);
    assert_eq!(code, 0, "a warning is no failure: {checks:#?}");
    let ex = named(&checks, "excludes:app");
    assert_eq!(ex["status"], "warn", "{ex}");
    assert!(
        ex["detail"].as_str().unwrap().contains("transcodes/"),
        "{ex}"
    );

    // A config others can write fails the check (exit 1), and the rest still runs.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&a.config, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, checks) = doctor(&a);
    assert_eq!(code, 1, "{checks:#?}");
    assert_eq!(named(&checks, "config")["status"], "fail");
    named(&checks, "inotify:app");
}
