//! `GET /metrics`: the status as OpenMetrics text (prometheus-client), every
//! name prefixed `understudy_`, labelled by `folder` and `peer`.
//!
//! Built from a status snapshot at each scrape: the counters are the agent's
//! own totals since it started (they reset with it, as Prometheus expects).
//!
//! | metric | type | what |
//! | --- | --- | --- |
//! | `understudy_lag_seconds` | gauge | age of the oldest change the replica has not applied (sources) |
//! | `understudy_lag_bytes` | gauge | content bytes of the unshipped changes |
//! | `understudy_files_pending` | gauge | paths changed and not yet applied |
//! | `understudy_max_lag_seconds` | gauge | the folder's `max_lag_secs` |
//! | `understudy_connected` | gauge | 1 while a session is up |
//! | `understudy_epoch` | gauge | this node's fencing epoch for the folder |
//! | `understudy_role` | gauge | 1, with `role="source"` or `"replica"` |
//! | `understudy_rounds_total` | counter | rounds, by `result` (`applied`, `failed`) |
//! | `understudy_full_rounds_total` | counter | full rounds applied |
//! | `understudy_shipped_bytes_total` | counter | UDP bytes sent to the replica |
//! | `understudy_db_pages_total` | counter | database pages the replica wrote |
//! | `understudy_last_applied_timestamp_seconds` | gauge | when the last round (cut) was applied |
//! | `understudy_databases` | gauge | live databases shipped from cuts |
//! | `understudy_databases_held` | gauge | databases the replica refuses while held open |
//! | `understudy_cut_writer_stall_max_seconds` | gauge | longest writer stall of the cuts |
//! | `understudy_cut_writer_stall_seconds` | histogram | each cut's writer stall |
//! | `understudy_handover_in_progress` | gauge | 1 while a failover or failback runs |
//! | `understudy_alerts_dropped_total` | counter | alerts not delivered (queue full, rate spent, webhook failing) |
//! | `understudy_alerts_sent_total` | counter | alerts delivered |

use crate::continuous::FolderStatus;
use crate::control::Status;
use crate::surface::Shared;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

type Labels = Vec<(String, String)>;
type GaugeF = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterU = Family<Labels, Counter<u64>>;

/// A per-folder gauge's value (none: the series is left out).
type GaugeValue = fn(&FolderStatus, &Status, &Shared) -> Option<f64>;

/// The per-folder gauges: name, help, value.
const GAUGES: &[(&str, &str, GaugeValue)] = &[
    (
        "lag_seconds",
        "Age of the oldest change the replica has not applied",
        |f, _, _| Some(f.lag_s),
    ),
    (
        "lag_bytes",
        "Content bytes of the unshipped changes",
        |f, _, _| Some(f.lag_bytes as f64),
    ),
    (
        "files_pending",
        "Paths changed and not yet applied",
        |f, _, _| Some(f.files_pending as f64),
    ),
    (
        "max_lag_seconds",
        "The folder's max_lag_secs",
        |f, _, sh| Some(sh.max_lag(&f.folder)),
    ),
    (
        "connected",
        "1 while a session with the peer is up",
        |f, _, _| Some(f64::from(u8::from(f.connected))),
    ),
    (
        "epoch",
        "This node's fencing epoch for the folder",
        |f, _, _| Some(f.epoch as f64),
    ),
    (
        "last_applied_timestamp_seconds",
        "When the last round (a consistent cut) was applied",
        |f, _, _| f.last_applied_unix,
    ),
    (
        "databases",
        "Live databases shipped from cuts",
        |f, _, _| Some(f.databases as f64),
    ),
    (
        "databases_held",
        "Databases the replica does not update while another process holds them open",
        |f, _, _| Some(f.held_databases.len() as f64),
    ),
    (
        "cut_writer_stall_max_seconds",
        "Longest writer stall of the cuts so far",
        |f, _, _| Some(f.max_writer_stall_ms / 1000.0),
    ),
    (
        "handover_in_progress",
        "1 while a failover or failback runs",
        |f, st, _| {
            let running = st
                .handovers
                .iter()
                .any(|h| h.folder == f.folder && h.running);
            Some(f64::from(u8::from(running)))
        },
    ),
];

/// A per-folder counter's value.
type CounterValue = fn(&FolderStatus) -> u64;

/// The per-folder counters: name (`_total` is added), help, value.
const COUNTERS: &[(&str, &str, CounterValue)] = &[
    ("full_rounds", "Full rounds applied", |f| f.full_rounds),
    ("shipped_bytes", "UDP bytes sent to the replica", |f| {
        f.wire_bytes_total
    }),
    ("db_pages", "Database pages the replica wrote", |f| {
        f.db_pages_total
    }),
];

/// Upper bounds of the writer stall buckets, in seconds (the last is +Inf).
const STALL_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// The writer stalls of a folder's cuts as a histogram: kept in status, so
/// that `/metrics` encodes it from a snapshot like everything else.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StallHistogram {
    /// Stalls per bucket of [`STALL_BUCKETS`], then over the last bound.
    pub counts: Vec<u64>,
    /// Sum of the stalls, in seconds.
    pub sum: f64,
}

impl StallHistogram {
    /// Counts one cut's writer stall. A zero stall locked no database (a
    /// round without live databases, or all idle): no cut, not counted.
    pub fn observe(&mut self, stall: std::time::Duration) {
        if stall.is_zero() {
            return;
        }
        let secs = stall.as_secs_f64();
        self.counts.resize(STALL_BUCKETS.len() + 1, 0);
        let i = STALL_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(STALL_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += secs;
    }

    /// (upper bound, count in that bucket alone), +Inf last.
    fn buckets(&self) -> Vec<(f64, u64)> {
        STALL_BUCKETS
            .iter()
            .copied()
            .chain([f64::MAX]) // the encoder writes it as +Inf
            .enumerate()
            .map(|(i, b)| (b, self.counts.get(i).copied().unwrap_or(0)))
            .collect()
    }
}

/// The stall histograms of every folder, by labels.
#[derive(Debug, Default)]
struct StallFamily(Vec<(Labels, StallHistogram)>);

impl EncodeMetric for StallFamily {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, h) in &self.0 {
            let count = h.counts.iter().sum();
            encoder
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(h.sum, count, &h.buckets(), None)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The OpenMetrics text of `status`.
pub fn encode_status(status: &Status, shared: &Shared) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("understudy");
    let gauges: Vec<(GaugeF, GaugeValue)> = GAUGES
        .iter()
        .map(|(name, help, value)| {
            let g = GaugeF::default();
            reg.register(*name, *help, g.clone());
            (g, *value)
        })
        .collect();
    let counters: Vec<(CounterU, CounterValue)> = COUNTERS
        .iter()
        .map(|(name, help, value)| {
            let c = CounterU::default();
            reg.register(*name, *help, c.clone());
            (c, *value)
        })
        .collect();
    let role = GaugeF::default();
    reg.register(
        "role",
        "1 for the role this node plays for the folder",
        role.clone(),
    );
    let rounds = CounterU::default();
    reg.register("rounds", "Rounds, by result", rounds.clone());
    let mut stalls = StallFamily::default();
    for f in &status.folders {
        let l: Labels = vec![
            ("folder".into(), f.folder.clone()),
            ("peer".into(), f.peer.clone()),
        ];
        for (g, value) in &gauges {
            if let Some(v) = value(f, status, shared) {
                g.get_or_create(&l).set(v);
            }
        }
        for (c, value) in &counters {
            c.get_or_create(&l).inc_by(value(f));
        }
        let with = |k: &str, v: &str| {
            let mut l = l.clone();
            l.push((k.into(), v.into()));
            l
        };
        // Sources cut; the series is there from the start, empty until a cut.
        if f.role == "source" {
            stalls.0.push((l.clone(), f.writer_stall.clone()));
        }
        role.get_or_create(&with("role", &f.role)).set(1.0);
        rounds
            .get_or_create(&with("result", "applied"))
            .inc_by(f.rounds);
        rounds
            .get_or_create(&with("result", "failed"))
            .inc_by(f.rounds_failed);
    }
    reg.register(
        "cut_writer_stall_seconds",
        "How long each cut made the databases' writers wait",
        stalls,
    );
    for (name, help, n) in [
        (
            "alerts_dropped",
            "Alerts not delivered (queue full, rate spent, webhook failing)",
            &shared.alerts_dropped,
        ),
        ("alerts_sent", "Alerts delivered", &shared.alerts_sent),
    ] {
        let c = Counter::<u64>::default();
        c.inc_by(n.load(Ordering::Relaxed));
        reg.register(name, help, c);
    }
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stalls_fall_in_their_buckets_and_encode_as_a_histogram() {
        let mut h = StallHistogram::default();
        h.observe(Duration::ZERO);
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(9));
        assert_eq!(h.counts, [1, 0, 0, 1, 0, 0, 0, 0, 1]);
        let status = Status {
            folders: vec![FolderStatus {
                folder: "app".into(),
                peer: "p".into(),
                role: "source".into(),
                writer_stall: h,
                ..Default::default()
            }],
            ..Default::default()
        };
        let shared = Shared {
            registry: Default::default(),
            token: None,
            max_lag: Default::default(),
            alerts_dropped: Default::default(),
            alerts_sent: Default::default(),
            history: Default::default(),
        };
        let text = encode_status(&status, &shared).unwrap();
        assert!(
            text.contains("# TYPE understudy_cut_writer_stall_seconds histogram"),
            "{text}"
        );
        for want in [
            "understudy_cut_writer_stall_seconds_count{folder=\"app\",peer=\"p\"} 3",
            "understudy_cut_writer_stall_seconds_bucket{le=\"0.001\",folder=\"app\",peer=\"p\"} 1",
            "understudy_cut_writer_stall_seconds_bucket{le=\"0.05\",folder=\"app\",peer=\"p\"} 2",
            "understudy_cut_writer_stall_seconds_bucket{le=\"+Inf\",folder=\"app\",peer=\"p\"} 3",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} not in {text}");
        }
    }
}
