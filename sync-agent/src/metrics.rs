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

fn gauge(reg: &mut Registry, name: &str, help: &str) -> GaugeF {
    let g = GaugeF::default();
    reg.register(name, help, g.clone());
    g
}

fn counter(reg: &mut Registry, name: &str, help: &str) -> CounterU {
    let c = CounterU::default();
    reg.register(name, help, c.clone());
    c
}

/// The OpenMetrics text of `status`.
pub fn encode_status(status: &Status, shared: &Shared) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::with_prefix("understudy");
    let lag = gauge(
        &mut reg,
        "lag_seconds",
        "Age of the oldest change the replica has not applied",
    );
    let lag_bytes = gauge(
        &mut reg,
        "lag_bytes",
        "Content bytes of the unshipped changes",
    );
    let pending = gauge(
        &mut reg,
        "files_pending",
        "Paths changed and not yet applied",
    );
    let bound = gauge(&mut reg, "max_lag_seconds", "The folder's max_lag_secs");
    let connected = gauge(
        &mut reg,
        "connected",
        "1 while a session with the peer is up",
    );
    let epoch = gauge(
        &mut reg,
        "epoch",
        "This node's fencing epoch for the folder",
    );
    let role = gauge(
        &mut reg,
        "role",
        "1 for the role this node plays for the folder",
    );
    let rounds = counter(&mut reg, "rounds", "Rounds, by result");
    let full = counter(&mut reg, "full_rounds", "Full rounds applied");
    let shipped = counter(&mut reg, "shipped_bytes", "UDP bytes sent to the replica");
    let pages = counter(&mut reg, "db_pages", "Database pages the replica wrote");
    let last = gauge(
        &mut reg,
        "last_applied_timestamp_seconds",
        "When the last round (a consistent cut) was applied",
    );
    let dbs = gauge(&mut reg, "databases", "Live databases shipped from cuts");
    let held = gauge(
        &mut reg,
        "databases_held",
        "Databases the replica does not update while another process holds them open",
    );
    let stall = gauge(
        &mut reg,
        "cut_writer_stall_max_seconds",
        "Longest writer stall of the cuts so far",
    );
    let handover = gauge(
        &mut reg,
        "handover_in_progress",
        "1 while a failover or failback runs",
    );
    for f in &status.folders {
        let l: Labels = vec![
            ("folder".into(), f.folder.clone()),
            ("peer".into(), f.peer.clone()),
        ];
        lag.get_or_create(&l).set(f.lag_s);
        lag_bytes.get_or_create(&l).set(f.lag_bytes as f64);
        pending.get_or_create(&l).set(f.files_pending as f64);
        bound.get_or_create(&l).set(shared.max_lag(&f.folder));
        connected
            .get_or_create(&l)
            .set(f64::from(u8::from(f.connected)));
        epoch.get_or_create(&l).set(f.epoch as f64);
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
        full.get_or_create(&l).inc_by(f.full_rounds);
        shipped.get_or_create(&l).inc_by(f.wire_bytes_total);
        pages.get_or_create(&l).inc_by(f.db_pages_total);
        if let Some(t) = f.last_applied_unix {
            last.get_or_create(&l).set(t);
        }
        dbs.get_or_create(&l).set(f.databases as f64);
        held.get_or_create(&l).set(f.held_databases.len() as f64);
        stall.get_or_create(&l).set(f.max_writer_stall_ms / 1000.0);
        let running = status
            .handovers
            .iter()
            .any(|h| h.folder == f.folder && h.running);
        handover.get_or_create(&l).set(f64::from(u8::from(running)));
    }
    let dropped = Counter::<u64>::default();
    dropped.inc_by(shared.alerts_dropped.load(Ordering::Relaxed));
    reg.register(
        "alerts_dropped",
        "Alerts not delivered (queue full, rate spent, webhook failing)",
        dropped,
    );
    let sent = Counter::<u64>::default();
    sent.inc_by(shared.alerts_sent.load(Ordering::Relaxed));
    reg.register("alerts_sent", "Alerts delivered", sent);
    let mut out = String::new();
    encode(&mut out, &reg)?;
    Ok(out)
}
