//! The alert decision, fed made-up snapshots.

use super::*;
use crate::continuous::FolderStatus;

fn status(rows: Vec<FolderStatus>) -> Status {
    Status {
        node: "NODE".into(),
        folders: rows,
        ..Default::default()
    }
}

fn source(lag_s: f64, connected: bool) -> FolderStatus {
    FolderStatus {
        folder: "app".into(),
        role: "source".into(),
        peer: "PEER".into(),
        connected,
        lag_s,
        ..Default::default()
    }
}

fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.event).collect()
}

const BOUND: f64 = 2.0;

fn look(w: &mut Watcher, rows: Vec<FolderStatus>, now: f64) -> Vec<Event> {
    w.observe(&status(rows), &[], now, &|_| BOUND)
}

#[test]
fn lag_over_the_bound_is_told_once_and_its_recovery_once() {
    let mut w = Watcher::default();
    assert!(look(&mut w, vec![source(0.5, true)], 100.0).is_empty());
    let e = look(&mut w, vec![source(2.5, true)], 101.0);
    assert_eq!(names(&e), ["lag_high"]);
    assert_eq!(e[0].folder, "app");
    assert_eq!(e[0].node, "NODE");
    assert_eq!(e[0].peer, "PEER");
    assert!(
        e[0].message.contains("folder app: lag 2.5 s over 2 s"),
        "{}",
        e[0].message
    );
    assert_eq!(e[0].time, "1970-01-01T00:01:41Z");
    assert!(look(&mut w, vec![source(9.0, true)], 102.0).is_empty());
    assert_eq!(
        names(&look(&mut w, vec![source(0.0, true)], 103.0)),
        ["lag_ok"]
    );
    assert!(look(&mut w, vec![source(0.0, true)], 104.0).is_empty());
}

#[test]
fn a_disconnection_is_told_after_the_grace_and_the_reconnect_after_it() {
    let mut w = Watcher::default();
    look(&mut w, vec![source(0.0, true)], 10.0);
    let mut down = source(0.0, false);
    down.last_error = Some("replica unreachable".into());
    // a blip shorter than the grace is not news
    assert!(look(&mut w, vec![down.clone()], 11.0).is_empty());
    assert!(look(&mut w, vec![source(0.0, true)], 12.0).is_empty());
    assert!(look(&mut w, vec![down.clone()], 20.0).is_empty());
    let e = look(&mut w, vec![down.clone()], 22.5);
    assert_eq!(names(&e), ["disconnected"]);
    assert!(
        e[0].message.contains("replica unreachable"),
        "{}",
        e[0].message
    );
    assert!(look(&mut w, vec![down], 30.0).is_empty());
    let e = look(&mut w, vec![source(0.0, true)], 31.0);
    assert_eq!(names(&e), ["connected"]);
    assert!(e[0].message.contains("after 11 s"), "{}", e[0].message);
}

#[test]
fn failed_rounds_are_told_at_most_once_per_period() {
    let mut w = Watcher::default();
    let failed = |n: u64| FolderStatus {
        rounds_failed: n,
        last_error: Some("disk full".into()),
        ..source(0.0, true)
    };
    // failures before the agent looked are not news
    assert!(look(&mut w, vec![failed(3)], 0.0).is_empty());
    let e = look(&mut w, vec![failed(4)], 1.0);
    assert_eq!(names(&e), ["round_failed"]);
    assert!(e[0].message.contains("disk full"));
    assert!(look(&mut w, vec![failed(9)], 2.0).is_empty());
    assert_eq!(
        names(&look(&mut w, vec![failed(10)], 1.0 + FAILED_EVERY)),
        ["round_failed"]
    );
}

#[test]
fn held_databases_are_told_each_and_released_each() {
    let mut w = Watcher::default();
    let replica = |held: &[&str]| FolderStatus {
        folder: "app".into(),
        role: "replica".into(),
        connected: true,
        held_databases: held.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let e = look(&mut w, vec![replica(&["a.db"])], 0.0);
    assert_eq!(names(&e), ["database_held"]);
    assert!(e[0].message.contains("a.db"));
    assert_eq!(
        names(&look(&mut w, vec![replica(&["a.db", "b.db"])], 1.0)),
        ["database_held"]
    );
    let e = look(&mut w, vec![replica(&["b.db"])], 2.0);
    assert_eq!(names(&e), ["database_released"]);
    assert!(e[0].message.contains("a.db"));
}

fn handover(id: u64, running: bool, outcome: Option<&str>) -> Progress {
    Progress {
        folder: "app".into(),
        id,
        kind: "failover".into(),
        running,
        step: "final_cut".into(),
        outcome: outcome.map(|s| crate::handover::Outcome {
            ok: s == "done",
            step: s.into(),
            this_node: String::new(),
            peer: String::new(),
            error: (s != "done").then(|| "hook failed".into()),
        }),
        ..Default::default()
    }
}

#[test]
fn handovers_are_told_started_and_ended_and_a_demotion_by_one_is_no_fencing() {
    let mut w = Watcher::default();
    let at =
        |w: &mut Watcher, rows, h: &[Progress], now| w.observe(&status(rows), h, now, &|_| 30.0);
    let promoted = |role: &str, epoch| FolderStatus {
        role: role.into(),
        epoch,
        ..source(0.0, true)
    };
    // a handover that ended before the agent looked is not news
    assert!(
        at(
            &mut w,
            vec![promoted("source", 1)],
            &[handover(1, false, Some("done"))],
            0.0
        )
        .is_empty()
    );
    let e = at(
        &mut w,
        vec![promoted("source", 1)],
        &[handover(2, true, None)],
        1.0,
    );
    assert_eq!(names(&e), ["handover_started"]);
    let e = at(
        &mut w,
        vec![promoted("replica", 2)],
        &[handover(2, false, Some("done"))],
        2.0,
    );
    assert_eq!(names(&e), ["handover_finished"]);
    assert!(
        at(
            &mut w,
            vec![promoted("replica", 2)],
            &[handover(2, false, Some("done"))],
            3.0
        )
        .is_empty()
    );
    let e = at(
        &mut w,
        vec![promoted("replica", 2)],
        &[handover(3, true, None)],
        4.0,
    );
    assert_eq!(names(&e), ["handover_started"]);
    let e = at(
        &mut w,
        vec![promoted("replica", 2)],
        &[handover(3, false, Some("rolled_back"))],
        5.0,
    );
    assert_eq!(names(&e), ["handover_rolled_back"]);
    assert!(e[0].message.contains("hook failed"), "{}", e[0].message);
}

#[test]
fn losing_the_source_role_without_a_handover_is_fencing() {
    let mut w = Watcher::default();
    let row = |role: &str, epoch| FolderStatus {
        role: role.into(),
        epoch,
        ..source(0.0, true)
    };
    assert!(look(&mut w, vec![row("source", 1)], 0.0).is_empty());
    let e = look(&mut w, vec![row("replica", 2)], 1.0);
    assert_eq!(names(&e), ["fenced"]);
    assert!(e[0].message.contains("epoch 2"), "{}", e[0].message);
}

#[test]
fn webhook_urls_and_events_are_checked() {
    let t = Target::parse("http://127.0.0.1:8080/hook?x=1").unwrap();
    assert_eq!(
        (t.host.as_str(), t.port, t.path.as_str()),
        ("127.0.0.1", 8080, "/hook?x=1")
    );
    let t = Target::parse("http://[::1]/").unwrap();
    assert_eq!((t.host.as_str(), t.port), ("::1", 80));
    assert_eq!(Target::parse("http://ntfy.lan").unwrap().path, "/");
    for bad in [
        "https://ntfy.sh/x",
        "http://:80/",
        "http://h:99999/",
        "http://u:p@h/",
        "ftp://h",
    ] {
        assert!(Target::parse(bad).is_err(), "{bad}");
    }
    let sink = |events: &[&str]| Sink {
        url: "http://127.0.0.1:1/".into(),
        events: events.iter().map(|s| s.to_string()).collect(),
        format: Format::Json,
    };
    assert!(sink(&["lag_high", "fenced"]).check().is_ok());
    let e = sink(&["lag_hgih"]).check().unwrap_err().to_string();
    assert!(e.contains("lag_hgih") && e.contains("events"), "{e}");
    assert!(sink(&["fenced"]).wants("fenced") && !sink(&["fenced"]).wants("lag_high"));
    assert!(sink(&[]).wants("lag_high"));
}

#[test]
fn times_are_rfc3339_utc() {
    assert_eq!(rfc3339(0.0), "1970-01-01T00:00:00Z");
    assert_eq!(rfc3339(951_782_400.0), "2000-02-29T00:00:00Z");
    assert_eq!(rfc3339(1_796_271_845.9), "2026-12-03T04:24:05Z");
    assert_eq!(rfc3339(1_796_267_483.0), "2026-12-03T03:11:23Z");
}

fn event() -> Event {
    Event {
        event: "lag_high",
        folder: "app".into(),
        node: "NODE".into(),
        peer: "PEER".into(),
        message: "folder app: lag 3.0 s over 2 s".into(),
        time: rfc3339(0.0),
    }
}

/// Accepts one request on `l` and returns its head and body, answering 200.
async fn one_request(l: tokio::net::TcpListener) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut s, _) = l.accept().await.expect("accept");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.expect("read");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len || n == 0 {
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .expect("answer");
                return (head.to_string(), body.to_string());
            }
        }
        assert!(n > 0, "request cut short: {text}");
    }
}

#[tokio::test]
async fn an_ntfy_webhook_gets_the_message_as_text_with_a_title() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/alerts", l.local_addr().expect("addr"));
    let got = tokio::spawn(one_request(l));
    let t = Target::parse(&url).expect("url");
    send::post(&t, Format::Ntfy, &event())
        .await
        .expect("delivered");
    let (head, body) = got.await.expect("receiver");
    assert!(head.starts_with("POST /alerts HTTP/1.1"), "{head}");
    assert!(
        head.contains("title: understudy lag_high: app")
            || head.contains("Title: understudy lag_high: app"),
        "{head}"
    );
    assert_eq!(body, "folder app: lag 3.0 s over 2 s");
}

#[tokio::test]
async fn a_webhook_that_never_answers_costs_drops_not_waits() {
    // Accepts connections and reads nothing: every try waits for its timeout.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", l.local_addr().expect("addr"));
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sink = Sink {
        url,
        events: Vec::new(),
        format: Format::Json,
    };
    let d = Dispatch::start(vec![sink], dropped.clone(), std::sync::Arc::default());
    let started = std::time::Instant::now();
    for _ in 0..200 {
        d.send(&event());
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "send waited"
    );
    let n = dropped.load(std::sync::atomic::Ordering::Relaxed);
    // The queue holds 64 and the task may have taken one.
    assert!(
        (200 - send::QUEUE as u64 - 1..=200 - send::QUEUE as u64).contains(&n),
        "{n} dropped"
    );
    drop(l);
}
