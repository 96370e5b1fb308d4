//! The operator's surface of a running agent: the HTTP server
//! ([`crate::http`]) and the alert webhooks ([`crate::alerts`]), both fed from
//! the control registry's status snapshots, on the agent's runtime.
//!
//! One task samples the status every [`TICK`]: it keeps the lag history the
//! status page draws and hands the snapshot to the alert decision. Nothing
//! here blocks a folder's loop: it only reads the shared status.

use crate::alerts::{self, Dispatch, Sink, Watcher};
use crate::config::Config;
use crate::control::Registry;
use anyhow::{Context, Result};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often the status is sampled for alerts and the lag history.
pub const TICK: Duration = Duration::from_secs(1);
/// Lag samples kept per folder (one per [`SAMPLE_EVERY`]: an hour).
pub const HISTORY: usize = 360;
/// The spacing of the kept lag samples, in seconds.
pub const SAMPLE_EVERY: f64 = 10.0;

/// What the config asks of the surface.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// `[node] http`.
    pub http: Option<SocketAddr>,
    /// The bearer token, read from `http_token_file`.
    pub token: Option<String>,
    /// Each folder's `max_lag_secs`.
    pub max_lag: HashMap<String, f64>,
    /// `[[alert]]`.
    pub alerts: Vec<Sink>,
}

impl Settings {
    /// The surface `c` configures (its token file read and checked).
    pub fn from_config(c: &Config) -> Result<Self> {
        let token = match &c.node.http_token_file {
            Some(p) => Some(crate::http::read_token(p).context("[node] http_token_file")?),
            None => None,
        };
        Ok(Self {
            http: c.node.http,
            token,
            max_lag: c
                .folders
                .iter()
                .map(|f| (f.name.clone(), f.max_lag()))
                .collect(),
            alerts: c.alerts.clone(),
        })
    }
}

/// What the HTTP handlers read.
#[derive(Debug)]
pub struct Shared {
    /// The agent's status sources.
    pub registry: Registry,
    /// The bearer token asked for, if any.
    pub token: Option<String>,
    /// Each folder's lag bound in seconds.
    pub max_lag: HashMap<String, f64>,
    /// Alerts dropped because a webhook's queue was full or its rate spent.
    pub alerts_dropped: Arc<AtomicU64>,
    /// Alerts delivered.
    pub alerts_sent: Arc<AtomicU64>,
    /// Per folder: (unix seconds, lag seconds), oldest first.
    pub history: Mutex<HashMap<String, VecDeque<(f64, f64)>>>,
}

impl Shared {
    /// A folder's lag bound (the default for a folder the config does not name).
    #[must_use]
    pub fn max_lag(&self, folder: &str) -> f64 {
        self.max_lag
            .get(folder)
            .copied()
            .unwrap_or(crate::config::Folder::DEFAULT_MAX_LAG_SECS as f64)
    }

    /// Keeps a lag sample per folder, [`SAMPLE_EVERY`] apart at most.
    fn sample(&self, status: &crate::control::Status, now: f64) {
        let Ok(mut h) = self.history.lock() else {
            return;
        };
        for f in &status.folders {
            let ring = h.entry(f.folder.clone()).or_default();
            if ring.back().is_some_and(|(t, _)| now - t < SAMPLE_EVERY) {
                continue;
            }
            if ring.len() == HISTORY {
                ring.pop_front();
            }
            ring.push_back((now, f.lag_s));
        }
    }
}

/// Starts the HTTP server (when configured) and the sampling task. A bind
/// failure is an error naming the address.
pub async fn start(settings: Settings, registry: Registry) -> Result<()> {
    let shared = Arc::new(Shared {
        registry,
        token: settings.token,
        max_lag: settings.max_lag,
        alerts_dropped: Arc::default(),
        alerts_sent: Arc::default(),
        history: Mutex::default(),
    });
    if let Some(addr) = settings.http {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("[node] http: binding {addr}"))?;
        tracing::info!(%addr, "http server listening (/health, /metrics)");
        tokio::spawn(crate::http::listen(l, shared.clone()));
    }
    let dispatch = Dispatch::start(
        settings.alerts,
        shared.alerts_dropped.clone(),
        shared.alerts_sent.clone(),
    );
    tokio::spawn(async move {
        let mut watcher = Watcher::default();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let status = shared.registry.snapshot();
            let now = alerts::unix_now();
            shared.sample(&status, now);
            let handovers: Vec<_> = shared
                .registry
                .handovers
                .values()
                .map(|h| h.progress(usize::MAX))
                .collect();
            for e in watcher.observe(&status, &handovers, now, &|f| shared.max_lag(f)) {
                dispatch.send(&e);
            }
        }
    });
    Ok(())
}
