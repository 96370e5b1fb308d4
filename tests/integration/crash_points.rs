//! The replica killed at each step of an apply (`UNDERSTUDY_FAILPOINT` aborts the
//! agent there, as `kill -9` would): after a restart every file is entirely old
//! or entirely new, and the whole round is one or the other (the cut journal),
//! and the next round leaves no temp file.

use crate::util::*;
use std::path::Path;
use std::process::Command;

/// Each step, and whether the round is in after a restart (the journal was
/// written, so the restart rolls it forward) or not.
const STEPS: [(&str, bool); 6] = [
    ("temp-written", false),
    ("metadata", false),
    ("synced", false),
    ("journaled", true),
    ("renamed", true),
    ("before-final-sync", true),
];

const FILES: [&str; 4] = ["a", "b", "sub/c", "sub/deeper/d"];

fn write_version(root: &Path, v: u64) {
    for (i, f) in FILES.iter().enumerate() {
        let p = root.join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(
            &p,
            random_bytes(20_000 + 7_000 * i + v as usize, v * 10 + i as u64),
        )
        .unwrap();
    }
}

fn version_of(root: &Path) -> Vec<Option<u64>> {
    FILES
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let got = std::fs::read(root.join(f)).ok()?;
            [1u64, 2]
                .into_iter()
                .find(|&v| got == random_bytes(20_000 + 7_000 * i + v as usize, v * 10 + i as u64))
        })
        .collect()
}

fn push(src: &Path, addr: &str, identity: &Path, peer: &str) -> std::process::Output {
    run(Command::new(bin("sync-cli"))
        .arg("push")
        .arg(src)
        .args(["--to", addr, "--peer", peer])
        .arg("--identity")
        .arg(identity))
}

#[test]
fn replica_killed_at_each_step_of_an_apply_keeps_one_whole_round() {
    for (step, rolled_forward) in STEPS {
        let t = tempfile::tempdir().unwrap();
        let (src, dst) = (t.path().join("src"), t.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        let (sid, s_id, rid, r_id) = identities(t.path());
        write_version(&src, 1);
        {
            let rep = replica(&dst, &rid, &s_id, &[]);
            assert!(push(&src, &rep.addr, &sid, &r_id).status.success());
        }
        assert_eq!(version_of(&dst), vec![Some(1); FILES.len()]);

        write_version(&src, 2);
        let log = t.path().join("replica.log");
        let mut rep = replica_logged(&dst, &rid, &s_id, &log, &[("UNDERSTUDY_FAILPOINT", step)]);
        let mut pushing = Command::new(bin("sync-cli"))
            .arg("push")
            .arg(&src)
            .args(["--to", &rep.addr, "--peer", &r_id])
            .arg("--identity")
            .arg(&sid)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let status = rep.child.wait().unwrap();
        assert!(!status.success(), "{step}: the replica did not die");
        // The push would wait for the connection's idle timeout: not needed.
        let _ = pushing.kill();
        let _ = pushing.wait();
        let said = std::fs::read_to_string(&log).unwrap();
        assert!(
            said.contains(&format!("failpoint {step}")),
            "{step}: {said}"
        );

        // Restart: a journal is rolled forward; nothing in between is possible.
        let rep = replica(&dst, &rid, &s_id, &[]);
        let want = if rolled_forward { 2 } else { 1 };
        assert_eq!(
            version_of(&dst),
            vec![Some(want); FILES.len()],
            "{step}: after the restart the round must be wholly {}",
            if rolled_forward { "in" } else { "out" }
        );
        assert!(!dst.join(".understudy.tmp.journal").exists(), "{step}");
        // The next round completes and sweeps what the crash left.
        let out = push(&src, &rep.addr, &sid, &r_id);
        assert!(
            out.status.success(),
            "{step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(version_of(&dst), vec![Some(2); FILES.len()], "{step}");
        assert!(
            temp_files(&dst).is_empty(),
            "{step}: {:?}",
            temp_files(&dst)
        );
        assert_identical(&src, &dst);
    }
}
