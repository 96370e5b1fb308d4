//! Issue 14: small changes are never queued behind a large file. A large file
//! travels on the bulk lane (staged on the replica ahead of its round) while
//! rounds of small changes go on; it counts in the lag until it lands.

use crate::util::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Whether the replica root holds a staged temp file (a bulk transfer).
fn staging(dst: &Path) -> bool {
    std::fs::read_dir(dst).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .as_encoded_bytes()
            .starts_with(sync_core::TEMP_PREFIX)
    })
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_small_write_lands_while_a_large_file_is_in_flight() {
    let p = pair();
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let control = p.t.path().join("control.sock");
    // the bwlimit keeps the large file in flight for seconds
    let args = ["--control", control.to_str().unwrap(), "--bwlimit", "8M"];
    let _src = source(&p.src, &p.sid, &p.r_id, &rep.addr, &args);
    wait_converged(&p.src, &p.dst, 20, &[]);
    // Written beside the tree and renamed in: a scan never sees it half
    // written (an empty or partial big.bin would land at once as a small file).
    let beside = p.t.path().join("big.bin");
    std::fs::write(&beside, random_bytes(48 << 20, 7)).unwrap();
    std::fs::rename(&beside, p.src.join("big.bin")).unwrap();
    wait_for("the large file's transfer to start", 20, || staging(&p.dst));
    std::fs::write(p.src.join("small.txt"), b"after the large file").unwrap();
    let small = p.dst.join("small.txt");
    wait_for("the small write on the replica", 20, || {
        std::fs::read(&small).is_ok_and(|b| b == b"after the large file")
    });
    assert!(
        !p.dst.join("big.bin").exists(),
        "the small write waited for the large file"
    );
    // the large file is still pending, and the lag says so
    let st = agent_status(&p, &control);
    assert!(
        !st["folders"][0]["pending_since_unix"].is_null(),
        "lag forgot the large file in flight: {st}"
    );
    wait_converged(&p.src, &p.dst, 60, &[]);
    assert_identical(&p.src, &p.dst);
    assert!(!staging(&p.dst), "a staged copy was left behind");
    wait_for("the lag to clear", 10, || {
        agent_status(&p, &control)["folders"][0]["pending_since_unix"].is_null()
    });
}
