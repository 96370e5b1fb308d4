//! A replica agent keeps its scan ahead between pushes while its tree is
//! quiet (`sync-agent/src/session/replica_ahead.rs`): a no-change push does
//! not scan the replica again, and whatever changes the replica's tree
//! meanwhile is still found and repaired by the next push.

use crate::util::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn push(src: &Path, addr: &str, identity: &Path, peer: &str) -> serde_json::Value {
    let out = run(Command::new(bin("sync-cli"))
        .arg("push")
        .arg(src)
        .args(["--to", addr, "--peer", peer, "--json"])
        .arg("--identity")
        .arg(identity));
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).expect("summary")
}

/// How many scans ahead the replica made, and how many it took as kept.
fn scans(log: &Path) -> (usize, usize) {
    let said = std::fs::read_to_string(log).unwrap_or_default();
    (
        said.matches("replica scanned ahead").count(),
        said.matches("scan ahead kept").count(),
    )
}

/// A change made behind the source's back, named.
type Tamper<'a> = (&'static str, Box<dyn Fn() + 'a>);

#[test]
fn a_quiet_replica_is_not_scanned_again_and_a_changed_one_is_repaired() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    for d in 0..20 {
        std::fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
        for f in 0..5 {
            let p = src.join(format!("d{d}/f{f}"));
            std::fs::write(p, random_bytes(2000 + d * 10 + f, (d * 5 + f) as u64)).unwrap();
        }
    }
    std::fs::create_dir_all(&dst).unwrap();
    let (a, b) = (t.path().join("id-a"), t.path().join("id-b"));
    let (a_id, b_id) = (keygen(&a), keygen(&b));
    let log = t.path().join("replica.log");
    let agent = AgentCmd::replica(&dst, &b, &a_id, "127.0.0.1:0")
        .envs(&[("UNDERSTUDY_LOG", "debug")])
        .log(&log)
        .start();
    assert_eq!(push(&src, &agent.addr, &a, &b_id)["files_transferred"], 100);
    assert_identical(&src, &dst);
    // Unchanged twice: the second at the latest takes the scan kept.
    for _ in 0..2 {
        assert_eq!(push(&src, &agent.addr, &a, &b_id)["unchanged"], true);
    }
    let (made, kept) = scans(&log);
    assert!(kept >= 1, "no push took a kept scan: {made} made");
    let made_before = made;
    assert_eq!(push(&src, &agent.addr, &a, &b_id)["unchanged"], true);
    assert_eq!(
        scans(&log),
        (made_before, kept + 1),
        "a quiet replica scanned again"
    );

    // Changed on the replica behind the source's back: each is found.
    let tampers: Vec<Tamper> = vec![
        (
            "content",
            Box::new(|| std::fs::write(dst.join("d3/f1"), b"not the source's").unwrap()),
        ),
        (
            "mode",
            Box::new(|| {
                std::fs::set_permissions(dst.join("d7/f2"), std::fs::Permissions::from_mode(0o600))
                    .unwrap()
            }),
        ),
        (
            "removed",
            Box::new(|| std::fs::remove_file(dst.join("d9/f4")).unwrap()),
        ),
        (
            "added",
            Box::new(|| std::fs::write(dst.join("d19/extra"), b"x").unwrap()),
        ),
    ];
    for (what, tamper) in tampers {
        tamper();
        let sum = push(&src, &agent.addr, &a, &b_id);
        assert_eq!(sum["unchanged"], false, "{what}: {sum}");
        assert_identical(&src, &dst);
    }
}
