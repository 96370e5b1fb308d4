//! The CLI's own surface: keygen, id, help. (Also makes cargo build the binary
//! for the black-box tests in `tests/`.)

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn cli() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sync-cli"))
}

#[test]
fn keygen_then_id() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("id");
    let out = cli().args(["keygen", "--dir"]).arg(&dir).output().unwrap();
    assert!(out.status.success());
    let id = String::from_utf8(out.stdout).unwrap();
    assert_eq!(id.lines().count(), 1, "node id alone on stdout");
    let mode = std::fs::metadata(dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let again = cli().args(["id", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), id);
    let twice = cli().args(["keygen", "--dir"]).arg(&dir).output().unwrap();
    assert_eq!(twice.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&twice.stderr).contains("refusing to replace"));
}

#[test]
fn help_lists_commands() {
    let out = cli().arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for c in ["keygen", "id", "mirror", "push", "verify", "Exit codes"] {
        assert!(text.contains(c), "--help lacks {c}");
    }
}
