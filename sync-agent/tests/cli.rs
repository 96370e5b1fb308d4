//! The agent binary's refusals. (Also makes cargo build the binary for the
//! black-box tests in `tests/`.)

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::process::Command;

#[test]
fn replica_without_identity_names_the_directory() {
    let t = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sync-agent"))
        .args(["replica", "--listen", "127.0.0.1:0", "--allow", "AAAA"])
        .arg("--root")
        .arg(t.path())
        .arg("--identity")
        .arg(t.path().join("missing-id"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("missing-id") && e.contains("keygen"), "{e}");
}

#[test]
fn sigterm_stops_a_replica_cleanly() {
    use std::io::{BufRead, BufReader};
    let t = tempfile::tempdir().unwrap();
    let id = t.path().join("id");
    let out = Command::new(env!("CARGO_BIN_EXE_sync-agent"))
        .args(["--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    // an identity, as `sync-cli keygen` writes it
    let key = sync_agent::Identity::create(&id).unwrap().id().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sync-agent"))
        .args(["replica", "--listen", "127.0.0.1:0", "--allow", &key])
        .arg("--root")
        .arg(t.path())
        .arg("--identity")
        .arg(&id)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("listening 127.0.0.1:"), "{line}");
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM must stop the agent cleanly"
    );
}
