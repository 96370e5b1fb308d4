//! Posting alerts: one task per webhook, fed through a bounded queue.

use super::{Event, Format, Sink};
use http_body_util::Full;
use hyper::body::Bytes;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;

/// Alerts waiting per webhook; more are dropped and counted.
pub const QUEUE: usize = 64;
/// Alerts a webhook gets per minute at most; more are dropped and counted.
pub const PER_MINUTE: u32 = 20;
/// Tries per alert (the first and the retries).
pub const TRIES: u32 = 4;
/// One try's limit (connect, send, answer).
pub const TRY_TIMEOUT: Duration = Duration::from_secs(5);

/// A webhook's address: `http://host[:port][/path]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host name or address (an IPv6 address without brackets).
    pub host: String,
    /// Port (80 when absent).
    pub port: u16,
    /// Path and query (`/` when absent).
    pub path: String,
}

impl Target {
    /// Parses a webhook URL; only plain `http` (put a local relay in front of
    /// an `https` service).
    pub fn parse(url: &str) -> Result<Self, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "{url:?}: only http:// URLs (an https service needs a local relay)"
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.contains('@') {
            return Err(format!("{url:?}: credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, tail) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed [ in the host"))?;
            (h, tail.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
            None => 80,
        };
        if host.is_empty() || port == 0 {
            return Err(format!("{url:?}: no host or port"));
        }
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{url:?}: spaces or control characters in the path"));
        }
        Ok(Self {
            host: host.to_string(),
            port,
            path: path.to_string(),
        })
    }

    fn host_header(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }
}

/// The webhooks' queues.
#[derive(Debug, Clone, Default)]
pub struct Dispatch {
    queues: Vec<(Sink, mpsc::Sender<Event>)>,
    dropped: Arc<AtomicU64>,
}

impl Dispatch {
    /// Starts one sending task per webhook (on the current runtime).
    #[must_use]
    pub fn start(sinks: Vec<Sink>, dropped: Arc<AtomicU64>, sent: Arc<AtomicU64>) -> Self {
        let mut queues = Vec::new();
        for sink in sinks {
            let Ok(target) = Target::parse(&sink.url) else {
                continue; // refused when the config was loaded
            };
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(deliver(
                target,
                sink.format,
                rx,
                dropped.clone(),
                sent.clone(),
            ));
            queues.push((sink, tx));
        }
        Self { queues, dropped }
    }

    /// Queues `e` for every webhook that wants it; never waits.
    pub fn send(&self, e: &Event) {
        tracing::warn!(folder = %e.folder, event = e.event, "alert: {}", e.message);
        for (sink, tx) in &self.queues {
            if sink.wants(e.event) && tx.try_send(e.clone()).is_err() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// One webhook's task: a token bucket of [`PER_MINUTE`], [`TRIES`] tries per
/// alert with doubling pauses from one second.
async fn deliver(
    target: Target,
    format: Format,
    mut rx: mpsc::Receiver<Event>,
    dropped: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
) {
    let mut tokens = f64::from(PER_MINUTE);
    let mut last = tokio::time::Instant::now();
    while let Some(e) = rx.recv().await {
        let now = tokio::time::Instant::now();
        let per_s = f64::from(PER_MINUTE) / 60.0;
        tokens =
            (tokens + now.duration_since(last).as_secs_f64() * per_s).min(f64::from(PER_MINUTE));
        last = now;
        if tokens < 1.0 {
            dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        tokens -= 1.0;
        let mut pause = Duration::from_secs(1);
        let mut result = Err(String::new());
        for attempt in 1..=TRIES {
            result = match tokio::time::timeout(TRY_TIMEOUT, post(&target, format, &e)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {TRY_TIMEOUT:?}")),
            };
            if result.is_ok() || attempt == TRIES {
                break;
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
        match result {
            Ok(()) => {
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(why) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "alert {} for folder {} not delivered to {}:{}{} after {TRIES} tries: {why}",
                    e.event,
                    e.folder,
                    target.host,
                    target.port,
                    target.path
                );
            }
        }
    }
}

/// One POST of `e`.
pub(super) async fn post(t: &Target, format: Format, e: &Event) -> Result<(), String> {
    let addr = tokio::net::lookup_host((t.host.as_str(), t.port))
        .await
        .map_err(|err| format!("resolving {}: {err}", t.host))?
        .next()
        .ok_or_else(|| format!("{} has no address", t.host))?;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connecting to {addr}: {err}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|err| format!("{addr}: {err}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let (ctype, body) = match format {
        Format::Json => (
            "application/json",
            serde_json::to_string(e).map_err(|err| err.to_string())?,
        ),
        Format::Ntfy => ("text/plain; charset=utf-8", e.message.clone()),
    };
    let mut req = hyper::Request::post(t.path.as_str())
        .header(hyper::header::HOST, t.host_header())
        .header(hyper::header::CONTENT_TYPE, ctype)
        .header(hyper::header::USER_AGENT, "understudy-agent");
    // A title a header cannot carry (a folder name in UTF-8) is left out.
    let title =
        hyper::header::HeaderValue::from_str(&format!("understudy {}: {}", e.event, e.folder));
    if let (Format::Ntfy, Ok(t)) = (format, title) {
        req = req.header("Title", t);
    }
    let req = req
        .body(Full::new(Bytes::from(body)))
        .map_err(|err| err.to_string())?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|err| format!("{addr}: {err}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("{addr} answered {}", resp.status()))
    }
}
