//! Issue 13: the operator's surface of two config-driven agents on 127.0.0.1:
//! `/health`, `/health/{folder}/active`, `/metrics`, the status page, and an
//! alert webhook told when the replica goes away.

use crate::failover::{Host, hosts, logs, make_db, wait_or};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The lag bound of the test folder: small, so the test is quick.
const MAX_LAG: u64 = 2;

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Adds `[node] http`, the folder's `max_lag_secs` and `tail` (TOML) to a
/// host's config; returns the HTTP address.
fn serve_http(h: &Host, tail: &str) -> String {
    let addr = format!("127.0.0.1:{}", free_tcp_port());
    let body = std::fs::read_to_string(&h.config).unwrap();
    let body = body
        .replacen("[node]\n", &format!("[node]\nhttp = \"{addr}\"\n"), 1)
        .replacen(
            "overlay = [",
            &format!("max_lag_secs = {MAX_LAG}\noverlay = ["),
            1,
        );
    std::fs::write(&h.config, format!("{body}\n{tail}")).unwrap();
    addr
}

/// One GET: (status code, body); `None` while nothing listens.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let code = raw.split(' ').nth(1)?.parse().ok()?;
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

fn code(addr: &str, path: &str) -> u16 {
    get(addr, path).map_or(0, |(c, _)| c)
}

/// A metric sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Checks `text` is Prometheus/OpenMetrics text: comments, then samples
/// `name{label="value",...} number`, ending with `# EOF`; returns the samples.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "{text}");
    for l in lines {
        if let Some(c) = l.strip_prefix("# ") {
            let kind = c.split(' ').next().unwrap();
            assert!(["HELP", "TYPE", "UNIT", "EOF"].contains(&kind), "{l}");
            continue;
        }
        let (series, value) = l
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {l}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {l}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let inner = rest.strip_suffix('}').unwrap_or_else(|| panic!("{l}"));
                let labels = inner
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p.split_once("=\"").unwrap_or_else(|| panic!("{l}"));
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n, labels)
            }
            None => (series, Vec::new()),
        };
        let ok_name = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
        assert!(ok_name && name.starts_with("understudy_"), "{l}");
        out.push((name.to_string(), labels, value));
    }
    out
}

fn lag_of(addr: &str) -> f64 {
    let (_, text) = get(addr, "/metrics").unwrap_or_default();
    parse_metrics(&text)
        .into_iter()
        .find(|(n, l, _)| {
            n == "understudy_lag_seconds" && l.iter().any(|(k, v)| k == "folder" && v == "app")
        })
        .map_or(-1.0, |(_, _, v)| v)
}

/// A webhook receiver: every POST body, answered 200.
fn webhook() -> (String, mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut r = BufReader::new(s);
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; len.min(1 << 16)];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            let _ = r
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            if tx
                .send(String::from_utf8_lossy(&body).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
    (url, rx)
}

/// `/metrics` of a source parses, names the folder, its peer and role; `/`
/// shows the folder.
fn metrics_and_page_of_a_source(http_a: &str, peer: &str) {
    let (c, text) = get(http_a, "/metrics").unwrap();
    assert_eq!(c, 200);
    let samples = parse_metrics(&text);
    let lag = samples
        .iter()
        .find(|(n, l, _)| {
            n == "understudy_lag_seconds" && l.contains(&("folder".into(), "app".into()))
        })
        .unwrap_or_else(|| panic!("no lag of app in\n{text}"));
    assert!(lag.1.contains(&("peer".into(), peer.to_string())), "{text}");
    assert!(samples.iter().any(|(n, l, v)| n == "understudy_role"
        && l.contains(&("role".into(), "source".into()))
        && *v == 1.0));
    assert!(
        samples
            .iter()
            .any(|(n, _, _)| n == "understudy_rounds_total"),
        "{text}"
    );
    // The cuts' writer stalls, as a histogram (there from the start).
    let app = |l: &Vec<(String, String)>| l.contains(&("folder".into(), "app".into()));
    assert!(
        samples
            .iter()
            .any(|(n, l, _)| n == "understudy_cut_writer_stall_seconds_count" && app(l)),
        "{text}"
    );
    assert!(
        samples.iter().any(
            |(n, l, _)| n == "understudy_cut_writer_stall_seconds_bucket"
                && app(l)
                && l.contains(&("le".into(), "+Inf".into()))
        ),
        "{text}"
    );
    let (c, page) = get(http_a, "/").unwrap();
    assert_eq!(c, 200);
    assert!(page.contains("<h2>app") && page.contains("lag"), "{page}");
}

#[test]
fn issue13_health_active_metrics_page_and_an_alert_when_the_replica_dies() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), "", "");
    let (hook_url, alerts) = webhook();
    let http_a = serve_http(&a, &format!("[[alert]]\nurl = \"{hook_url}\"\n"));
    let http_b = serve_http(&b, "");
    let db = a.root.join("library.db");
    make_db(&db, 100);
    let _agent_a = a.start();
    let mut agent_b = b.start();
    let diag = || logs(&[&a, &b]);
    wait_or(
        "the source healthy",
        30,
        || code(&http_a, "/health") == 200,
        diag,
    );
    let (_, body) = get(&http_a, "/health").unwrap();
    let h: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(h["healthy"], true, "{h}");
    assert_eq!(h["folders"][0]["folder"], "app");
    assert_eq!(h["folders"][0]["role"], "source");
    assert_eq!(h["folders"][0]["max_lag_s"], MAX_LAG as f64);
    wait_or(
        "the replica healthy",
        10,
        || code(&http_b, "/health") == 200,
        || format!("{:?}\n{}", get(&http_b, "/health"), diag()),
    );
    assert_eq!(code(&http_a, "/health/app/active"), 200);
    assert_eq!(code(&http_b, "/health/app/active"), 503);
    assert_eq!(code(&http_a, "/health/nope/active"), 404);
    assert_eq!(code(&http_a, "/nothing"), 404);

    metrics_and_page_of_a_source(&http_a, &b.id);

    // The replica dies while the source's database keeps changing.
    agent_b.kill9();
    let killed = Instant::now();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut lags = Vec::new();
    while code(&http_a, "/health") != 503 {
        conn.execute("INSERT INTO t(v) VALUES ('more')", [])
            .unwrap();
        assert!(
            killed.elapsed() < Duration::from_secs(MAX_LAG + 8),
            "/health still not 503 {:?} after the replica died\n{}",
            killed.elapsed(),
            diag()
        );
        lags.push(lag_of(&http_a));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, body) = get(&http_a, "/health").unwrap();
    assert!(
        body.contains("over 2 s") || body.contains("not connected"),
        "{body}"
    );
    // `status --check` judges by the folder's max_lag_secs too.
    let out = a.cli(&["status", "--check"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("UNHEALTHY app"), "{said}");
    let later = lag_of(&http_a);
    assert!(
        later > MAX_LAG as f64 && lags.iter().all(|l| *l <= later),
        "{lags:?} then {later}"
    );

    let alert = alerts
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("no alert\n{}", diag()));
    let alert: serde_json::Value = serde_json::from_str(&alert).unwrap();
    assert_eq!(alert["folder"], "app", "{alert}");
    assert_eq!(alert["event"], "lag_high", "{alert}");
    assert_eq!(alert["node"], a.id.as_str(), "{alert}");
    assert!(
        alert["message"].as_str().unwrap().contains("folder app"),
        "{alert}"
    );
    assert!(alert["time"].as_str().unwrap().ends_with('Z'), "{alert}");
}

/// One GET with `Authorization: Bearer token`: the status code.
fn get_with(addr: &str, path: &str, token: &str) -> u16 {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return 0;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    let mut raw = String::new();
    if s.write_all(req.as_bytes()).is_err() || s.read_to_string(&mut raw).is_err() {
        return 0;
    }
    raw.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn issue13_a_token_is_asked_and_idle_clients_do_not_hurt_the_agent() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), "", "");
    let http_a = serve_http(&a, "");
    let token = a.dir.join("http.token");
    std::fs::write(&token, "tok-123\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let body = std::fs::read_to_string(&a.config).unwrap().replacen(
        "[node]\n",
        &format!("[node]\nhttp_token_file = \"{}\"\n", token.display()),
        1,
    );
    std::fs::write(&a.config, body).unwrap();
    let _agent_a = a.start();
    let _agent_b = b.start();
    let diag = || logs(&[&a, &b]);
    wait_or(
        "healthy",
        30,
        || get_with(&http_a, "/health", "tok-123") == 200,
        diag,
    );
    assert_eq!(code(&http_a, "/health"), 401);
    assert_eq!(get_with(&http_a, "/health", "tok-12"), 401);
    assert_eq!(get_with(&http_a, "/metrics", "tok-123"), 200);

    // 200 connections that send nothing: the agent goes on mirroring, and the
    // server answers again once the idle ones hit the head timeout.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(&http_a).ok())
        .collect();
    std::fs::write(a.root.join("during-the-flood"), "x").unwrap();
    wait_or(
        "the change mirrored",
        10,
        || b.root.join("during-the-flood").exists(),
        diag,
    );
    wait_or(
        "an answer again",
        10,
        || get_with(&http_a, "/health", "tok-123") == 200,
        diag,
    );
    drop(idle);
}

#[test]
fn issue13_mirror_on_a_terminal_shows_a_bar_with_total_percentage_and_eta() {
    let t = tempfile::tempdir().unwrap();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    std::fs::create_dir_all(&src).unwrap();
    // Big enough that the bar is drawn a few times after the scan.
    std::fs::write(src.join("big"), crate::util::random_bytes(120 << 20, 13)).unwrap();
    let typescript = t.path().join("typescript");
    let cmd = format!(
        "{} mirror {} {}",
        crate::util::bin("sync-cli").display(),
        src.display(),
        dst.display()
    );
    // `script` gives the command a terminal.
    crate::util::sh(&format!(
        "script -qfec '{cmd}' {} > /dev/null",
        typescript.display()
    ));
    let screen = String::from_utf8_lossy(&std::fs::read(&typescript).unwrap()).into_owned();
    let bar = screen
        .split(['\r', '\n'])
        .find(|l| l.contains("/120.00 MiB") && l.contains('%') && l.contains("ETA"))
        .map(str::to_string);
    assert!(
        bar.is_some(),
        "no bar with total, % and ETA in {} bytes of terminal output",
        screen.len()
    );
    assert!(screen.contains("files: 1 scanned"));
}

/// Headless Chromium (installed by `.ci/run`) on `url` with `args`, its
/// profile in `profile`: its stdout.
fn chromium(profile: &std::path::Path, url: &str, args: &[&str]) -> String {
    let out = crate::util::run(
        std::process::Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(url),
    );
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn issue13_the_status_page_renders_in_a_browser() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), "", "");
    let http_a = serve_http(&a, "");
    let _agent_a = a.start();
    let _agent_b = b.start();
    wait_or(
        "healthy",
        30,
        || code(&http_a, "/health") == 200,
        || logs(&[&a, &b]),
    );
    let url = format!("http://{http_a}/");
    let profile = t.path().join("chromium");
    let dom = chromium(&profile, &url, &["--dump-dom"]);
    assert!(
        dom.contains("<h2>app <small>(source)</small></h2>"),
        "{dom}"
    );
    assert!(
        dom.contains("healthy") && dom.contains("(bound 2 s)"),
        "{dom}"
    );
    assert!(
        dom.contains("<svg") && dom.contains("polyline"),
        "no lag chart: {dom}"
    );
    assert!(dom.contains(&b.id), "the peer is not named: {dom}");
    // The screenshot stays beside the test's build output, for a person to look at.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("issue13-status-page.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &profile,
        &url,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1000,700",
        ],
    );
    let png = std::fs::read(&shot).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes at {}",
        png.len(),
        shot.display()
    );
}

/// `verify --config` on the source host compares the two hosts through the
/// agents: 0 on a converged pair with an overlay (each host's own banner), an
/// excluded cache that differs and a live database with uncheckpointed
/// frames; 2 on the replica host, naming where to run it.
#[test]
fn issue13_verify_config_on_a_converged_pair_with_overlays_excludes_and_live_databases() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = hosts(t.path(), "", "");
    for h in [&a, &b] {
        let cfg = std::fs::read_to_string(&h.config).unwrap();
        std::fs::write(
            &h.config,
            cfg.replace("overlay = [", "exclude = [\"cache/\"]\noverlay = ["),
        )
        .unwrap();
    }
    for (h, who) in [(&a, "master"), (&b, "standby")] {
        std::fs::write(h.root.join("banner.txt"), who).unwrap();
        std::fs::create_dir_all(h.root.join("cache")).unwrap();
        std::fs::write(h.root.join("cache/thumb"), who).unwrap();
    }
    make_db(&a.root.join("library.db"), 10);
    // A live database: an open connection with frames not checkpointed.
    let live = rusqlite::Connection::open(a.root.join("library.db")).unwrap();
    live.execute_batch("PRAGMA wal_autocheckpoint=0; INSERT INTO t(v) VALUES ('live')")
        .unwrap();
    let (_aa, _ab) = (a.start(), b.start());
    wait_or(
        "the first mirror",
        30,
        || crate::failover::rows(&b.root.join("library.db")) == 11,
        || logs(&[&a, &b]),
    );
    let out = a.cli(&["verify", "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        crate::failover::text(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["identical"], true, "{v}");
    assert_eq!(v["source_root"], v["destination_root"], "{v}");
    assert_eq!(
        std::fs::read_to_string(b.root.join("banner.txt")).unwrap(),
        "standby"
    );
    let on_replica = b.cli(&["verify"]);
    assert_eq!(
        on_replica.status.code(),
        Some(2),
        "{}",
        crate::failover::text(&on_replica)
    );
    assert!(
        crate::failover::text(&on_replica).contains("source host"),
        "{}",
        crate::failover::text(&on_replica)
    );
    drop(live);
}
