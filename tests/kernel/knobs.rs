//! Tests that change kernel-wide inotify limits (`/proc/sys/fs/inotify/*`):
//! while one runs, every other process's new watches or queues feel it, so
//! they live in a test binary of their own (cargo runs test binaries one at a
//! time) and take [`KNOBS`] (one at a time within it).

use crate::util::*;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Held by each test for as long as it changes a knob.
static KNOBS: Mutex<()> = Mutex::new(());

/// Puts a kernel knob back as it was when dropped.
struct Sysctl(&'static str, String);
impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0, &self.1);
    }
}

#[test]
fn inotify_queue_overflow_triggers_a_rescan() {
    let _one = KNOBS.lock().unwrap_or_else(|e| e.into_inner());
    let p = pair();
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let knob = "/proc/sys/fs/inotify/max_queued_events";
    let old = std::fs::read_to_string(knob).unwrap();
    let guard = Sysctl(knob, old);
    std::fs::write(knob, "32").unwrap();
    let control = p.t.path().join("control.sock");
    let src = source(
        &p.src,
        &p.sid,
        &p.r_id,
        &rep.addr,
        &["--control", control.to_str().unwrap()],
    );
    // The queue's size is fixed when the watcher starts, before the first
    // round: once converged, the knob can go back.
    wait_converged(&p.src, &p.dst, 20, &[]);
    drop(guard);
    let before = agent_status(&p, &control)["folders"][0]["full_rounds"]
        .as_u64()
        .unwrap();
    // Many events while the agent cannot read them (stopped): the kernel's
    // queue of 32 overflows whatever the scheduler does.
    sh(&format!("kill -STOP {}", src.child.id()));
    std::fs::write(p.src.join("big"), random_bytes(64 << 20, 5)).unwrap();
    for i in 0..2000 {
        std::fs::write(p.src.join(format!("f{i}")), b"x").unwrap();
    }
    sh(&format!("kill -CONT {}", src.child.id()));
    wait_converged(&p.src, &p.dst, 60, &[]);
    let st = agent_status(&p, &control);
    let f = &st["folders"][0];
    assert_eq!(f["connected"], true, "{st}");
    assert!(
        f["full_rounds"].as_u64().unwrap() > before,
        "no rescan after the overflow: {st}"
    );
    assert!(
        f["watcher"].as_str().unwrap_or("").contains("overflow"),
        "{st}"
    );
}

/// Issue 10 item 10: the watch limit reached after start. A new directory's
/// watch cannot be added; its later files must still arrive within seconds
/// (polling), not at the 10-minute rescan, and status must say so.
#[test]
fn watch_limit_reached_at_run_time_polls_the_unwatched_directory() {
    let _one = KNOBS.lock().unwrap_or_else(|e| e.into_inner());
    let p = pair();
    let rep = replica(&p.dst, &p.rid, &p.s_id, &[]);
    let control = p.t.path().join("control.sock");
    let _src = source(
        &p.src,
        &p.sid,
        &p.r_id,
        &rep.addr,
        &["--control", control.to_str().unwrap()],
    );
    wait_converged(&p.src, &p.dst, 20, &[]);
    let knob = "/proc/sys/fs/inotify/max_user_watches";
    let old = std::fs::read_to_string(knob).unwrap();
    let names: Vec<String> = (0..4).map(|i| format!("new/f{i}")).collect();
    let note;
    {
        // Kept short: every root process's new watches fail while it holds.
        let _guard = Sysctl(knob, old);
        std::fs::write(knob, "1").unwrap();
        std::fs::create_dir(p.src.join("new")).unwrap();
        for (i, n) in names.iter().enumerate() {
            std::thread::sleep(Duration::from_millis(700));
            std::fs::write(p.src.join(n), format!("file {i}")).unwrap();
        }
        let t0 = Instant::now();
        while !names.iter().all(|n| {
            std::fs::read(p.dst.join(n)).is_ok_and(|b| b == std::fs::read(p.src.join(n)).unwrap())
        }) {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "files under the unwatched directory still missing after 10 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let st = agent_status(&p, &control);
        note = st["folders"][0]["watcher"]
            .as_str()
            .unwrap_or("")
            .to_string();
    }
    assert!(
        note.contains("watch limit reached") && note.contains("polling"),
        "{note}"
    );
    // With room again, the watch is retried and the note says so.
    let t0 = Instant::now();
    loop {
        let st = agent_status(&p, &control);
        let n = st["folders"][0]["watcher"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if n.contains("watched again") {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{n}");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::write(p.src.join("new/later"), b"later").unwrap();
    wait_converged(&p.src, &p.dst, 20, &[]);
}
