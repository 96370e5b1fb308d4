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
