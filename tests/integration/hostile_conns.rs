//! A pinned peer opening thousands of connections with no control stream
//! (issue 10, item 3): the replica holds at most `MAX_CONNECTIONS_PER_PEER`
//! of one peer, refuses the rest with a reason, times out those that say no
//! hello, gives the memory back, and serves another pinned peer meanwhile.

use crate::hostile_peer::*;
use crate::util::*;
use std::time::{Duration, Instant};
use sync_agent::limits::{MAX_CONNECTIONS_PER_PEER, REFUSED_CODE};
use sync_agent::{Identity, tls};

/// Connections opened by the flooding peer (`UNDERSTUDY_TEST_FLOOD` to
/// measure with more).
fn flood_size() -> usize {
    std::env::var("UNDERSTUDY_TEST_FLOOD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn refused(c: &quinn::Connection) -> bool {
    matches!(
        c.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(a))
            if a.error_code == REFUSED_CODE.into()
                && String::from_utf8_lossy(&a.reason).contains("too many connections")
    )
}

#[tokio::test]
async fn connection_flood_is_capped_refused_and_forgotten() {
    let flooder = Identity::generate().unwrap();
    let mut t = Target::start_pinning(&[("UNDERSTUDY_STAGE_DEADLINE_SECS", "3")], &[flooder.id()]);
    let before = snapshot(&t.outside);
    let started = Instant::now();
    let flood = flood_size();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(tls::client_config(&flooder, t.id).unwrap());
    let (addr, mut conns, mut failed) = (t.addr(), Vec::new(), 0usize);
    for chunk in (0..flood).collect::<Vec<_>>().chunks(50) {
        let mut set = tokio::task::JoinSet::new();
        for _ in chunk {
            let connecting = ep.connect(addr, tls::SERVER_NAME).unwrap();
            set.spawn(async move { tokio::time::timeout(ANSWER, connecting).await });
        }
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                Ok(Ok(c)) => conns.push(c),
                _ => failed += 1,
            }
        }
    }
    // Meanwhile another pinned peer is served.
    let src = t.t.path().join("good");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("during"), b"pushed during the flood").unwrap();
    t.push_ok(&src).await;
    assert!(t.root.join("during").exists());
    // Every connection ends: refused at once, or closed for saying no hello
    // within the deadline (3 s here) after holding one of the peer's slots, so
    // at most 8 are admitted every 3 s.
    for c in &conns {
        let _ = tokio::time::timeout(ANSWER, c.closed()).await;
    }
    assert!(conns.iter().all(|c| c.close_reason().is_some()));
    let n_refused = conns.iter().filter(|c| refused(c)).count();
    // Admitted: closed by the replica for saying no hello (the rest were
    // refused, or lost to a reset or a timeout under load).
    let admitted = conns
        .iter()
        .filter(|c| {
            matches!(c.close_reason(),
                Some(quinn::ConnectionError::ApplicationClosed(a)) if a.error_code == 0u32.into())
        })
        .count();
    let flood_s = started.elapsed().as_secs();
    assert!(
        n_refused >= flood / 2,
        "only {n_refused} of {flood} refused"
    );
    let most = MAX_CONNECTIONS_PER_PEER * (flood_s as usize / 3 + 2);
    assert!(
        admitted <= most,
        "{admitted} connections admitted in {flood_s} s (at most {most})"
    );
    let peak = t.peak_rss_kib();
    let conns_len = conns.len();
    drop(conns);
    ep.close(0u32.into(), b"");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = rss_kib(t.agent.child.id());
    println!(
        "{flood} connections from one pinned peer in {:?}: {n_refused} refused, {admitted} admitted and timed out, \
         {failed} failed to connect, {} reset or timed out; \
         replica peak RSS {} MiB, {} MiB after",
        started.elapsed(),
        conns_len - n_refused - admitted,
        peak >> 10,
        now >> 10
    );
    assert!(peak < 64 << 10, "peak RSS {} MiB", peak >> 10);
    assert!(t.log().contains("too many connections from this peer"));
    assert!(
        t.log()
            .contains("opened no control stream or sent no hello")
    );
    t.assert_clean(&before);
    // And after the flood.
    std::fs::write(src.join("after"), b"after").unwrap();
    t.push_ok(&src).await;
}
