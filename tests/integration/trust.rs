//! Issue 10, item 9: what grants trust (the config, the identity, the state
//! directory) must be owned by root and not writable by others, all the way up
//! (sshd's StrictModes). Real files owned by uid 1000, real 0777 directories.

use crate::util::*;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::{Path, PathBuf};

struct Setup {
    t: tempfile::TempDir,
    id: PathBuf,
    peer: String,
    root: PathBuf,
    state: PathBuf,
}

fn setup() -> Setup {
    let t = tempfile::tempdir().unwrap();
    let (_, peer, id, _) = identities(t.path());
    let root = t.path().join("dst");
    let state = t.path().join("state");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    Setup {
        t,
        id,
        peer,
        root,
        state,
    }
}

impl Setup {
    /// Writes a replica config at `at` (its directory must exist).
    fn config(&self, at: &Path) -> PathBuf {
        let body = format!(
            "[node]\nidentity = \"{}\"\nlisten = \"127.0.0.1:0\"\nstate = \"{}\"\n\n[[peer]]\nid = \"{peer}\"\n\n[[folder]]\nname = \"f\"\npath = \"{}\"\nrole = \"replica\"\npeers = [\"{peer}\"]\nfailover = false\n",
            self.id.display(),
            self.state.display(),
            self.root.display(),
            peer = self.peer
        );
        std::fs::write(at, body).unwrap();
        at.to_path_buf()
    }
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs the agent on `cfg`: it must refuse to start (exit 2) with every word.
fn refused(cfg: &Path, words: &[&str]) {
    let mut child = std::process::Command::new(bin("sync-agent"))
        .arg("--config")
        .arg(cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent started with {}", cfg.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    for w in words {
        assert!(e.contains(w), "error lacks {w:?}: {e}");
    }
}

/// The agent on `cfg` starts (it listens), then is stopped.
fn starts(cfg: &Path) {
    let agent = AgentCmd::config(cfg).start();
    assert!(!agent.addr.is_empty());
}

#[test]
fn config_owned_by_another_user_is_refused() {
    let s = setup();
    let cfg = s.config(&s.t.path().join("agent.toml"));
    starts(&cfg);
    chown(&cfg, Some(1000), Some(1000)).unwrap();
    refused(
        &cfg,
        &[
            &cfg.display().to_string(),
            "owned by uid 1000",
            "chown root",
        ],
    );
}

#[test]
fn config_in_a_world_writable_directory_is_refused() {
    let s = setup();
    let dir = s.t.path().join("etc");
    std::fs::create_dir(&dir).unwrap();
    let cfg = s.config(&dir.join("agent.toml"));
    starts(&cfg);
    chmod(&dir, 0o777);
    refused(
        &cfg,
        &[
            &format!("config {}", cfg.display()),
            &format!("its directory {} is writable", dir.display()),
            "mode 777",
            &format!("chmod go-w {}", dir.display()),
        ],
    );
    // Group-writable only, and a grandparent: named too.
    chmod(&dir, 0o755);
    chmod(s.t.path(), 0o770);
    refused(
        &cfg,
        &[&format!(
            "its directory {} is writable by its group",
            s.t.path().display()
        )],
    );
    chmod(s.t.path(), 0o700);
    // A directory owned by another user, even when not writable by others.
    chown(&dir, Some(1000), None).unwrap();
    refused(
        &cfg,
        &[&format!(
            "its directory {} is owned by uid 1000",
            dir.display()
        )],
    );
}

#[test]
fn sticky_directory_is_fine_only_for_our_own_entries() {
    let s = setup();
    let sticky = s.t.path().join("tmp");
    std::fs::create_dir(&sticky).unwrap();
    chmod(&sticky, 0o1777);
    let cfg = s.config(&sticky.join("agent.toml"));
    starts(&cfg);
    // The same file, owned by someone else, in the sticky directory.
    chown(&cfg, Some(1000), None).unwrap();
    refused(&cfg, &["owned by uid 1000"]);
    // Our file in another user's directory under the sticky one.
    let theirs = sticky.join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    let cfg = s.config(&theirs.join("agent.toml"));
    chown(&theirs, Some(1000), None).unwrap();
    refused(
        &cfg,
        &[&format!(
            "its directory {} is owned by uid 1000",
            theirs.display()
        )],
    );
}

#[test]
fn key_owned_by_another_user_or_readable_is_refused() {
    let s = setup();
    let cfg = s.config(&s.t.path().join("agent.toml"));
    let key = s.id.join("key.pem");
    chown(&key, Some(1000), None).unwrap();
    refused(
        &cfg,
        &[&format!("key {} is owned by uid 1000", key.display())],
    );
    chown(&key, Some(0), None).unwrap();
    chmod(&key, 0o640);
    refused(
        &cfg,
        &[
            &format!("key {}", key.display()),
            "readable by group or others",
        ],
    );
    chmod(&key, 0o600);
    let cert = s.id.join("cert.pem");
    chmod(&cert, 0o666);
    refused(
        &cfg,
        &[&format!("certificate {}", cert.display()), "writable"],
    );
    chmod(&cert, 0o644);
    starts(&cfg);
}

#[test]
fn world_writable_identity_directory_is_refused_by_agent_and_cli() {
    let s = setup();
    let cfg = s.config(&s.t.path().join("agent.toml"));
    chmod(&s.id, 0o777);
    refused(
        &cfg,
        &[
            &format!("identity directory {} is writable", s.id.display()),
            "mode 777",
        ],
    );
    let out = cli(&["id".as_ref(), "--dir".as_ref(), s.id.as_os_str()]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("identity directory"), "{e}");
    // The flag-driven agent too.
    let out = run(std::process::Command::new(bin("sync-agent"))
        .args(["replica", "--listen", "127.0.0.1:0", "--allow", &s.peer])
        .arg("--root")
        .arg(&s.root)
        .arg("--identity")
        .arg(&s.id));
    assert_eq!(out.status.code(), Some(2));
    chmod(&s.id, 0o755);
    chown(&s.id, Some(1000), None).unwrap();
    refused(&cfg, &["identity directory", "owned by uid 1000"]);
}

#[test]
fn world_writable_state_directory_is_refused() {
    let s = setup();
    let cfg = s.config(&s.t.path().join("agent.toml"));
    chmod(&s.state, 0o777);
    refused(
        &cfg,
        &[&format!(
            "state directory {} is writable",
            s.state.display()
        )],
    );
    chmod(&s.state, 0o755);
    chown(&s.state, Some(1000), None).unwrap();
    refused(&cfg, &["state directory", "owned by uid 1000"]);
}
