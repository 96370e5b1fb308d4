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
//! | `understudy_handover_in_progress` | gauge | 1 while a failover or failback runs |
//! | `understudy_alerts_dropped_total` | counter | alerts not delivered (queue full, rate spent, webhook failing) |
//! | `understudy_alerts_sent_total` | counter | alerts delivered |

use crate::continuous::FolderStatus;
use crate::control::Status;
use crate::surface::Shared;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
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
        role.get_or_create(&with("role", &f.role)).set(1.0);
        rounds
            .get_or_create(&with("result", "applied"))
            .inc_by(f.rounds);
        rounds
            .get_or_create(&with("result", "failed"))
            .inc_by(f.rounds_failed);
    }
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
