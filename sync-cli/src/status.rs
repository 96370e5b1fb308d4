//! `status`: ask a running agent how far behind each folder is; with `--check`,
//! judge it (exit 0 healthy, 1 unhealthy, 2 error).

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use sync_agent::continuous::FolderStatus;
use sync_agent::lag::Problem;

/// What `status --help` says about exit codes.
pub const EXIT_CODES: &str = "Exit codes: 0 the status was printed (with --check: every folder is \
healthy); 1 with --check: some folder is unhealthy (not connected, lag over --max-lag or else the \
folder's max_lag_secs, a database held open on the replica), each reason printed as FOLDER: WHAT; 2 error (the agent is unreachable, \
the config is bad).";

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The agent's config file (its `[node] control` socket is queried).
    #[arg(long)]
    config: PathBuf,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
    /// Judge the status: exit 1 when a folder is not connected, a source's lag
    /// is over --max-lag, or a replica database is held open.
    #[arg(long)]
    check: bool,
    /// The most lag --check accepts, in seconds, for every folder (default:
    /// each folder's `max_lag_secs`, 30 when it has none).
    #[arg(long, value_name = "S")]
    max_lag: Option<f64>,
}

pub fn status(a: StatusArgs) -> Result<ExitCode> {
    if a.max_lag.is_some_and(|m| !(m.is_finite() && m >= 0.0)) {
        anyhow::bail!("--max-lag must be a number of seconds ≥ 0");
    }
    let cfg = sync_agent::config::Config::parse(&a.config)?;
    let control = cfg
        .node
        .control
        .with_context(|| format!("config {}: [node] control is not set", a.config.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let st = rt.block_on(sync_agent::control::query(&control))?;
    let default = sync_agent::config::Folder::DEFAULT_MAX_LAG_SECS as f64;
    let bound = |name: &str| {
        a.max_lag.unwrap_or_else(|| {
            cfg.folders
                .iter()
                .find(|f| f.name == name)
                .map_or(default, |f| f.max_lag())
        })
    };
    let problems: Vec<Problem> = st
        .folders
        .iter()
        .flat_map(|f| sync_agent::lag::check(std::slice::from_ref(f), bound(&f.folder)))
        .collect();
    let max_lag = a.max_lag.unwrap_or(default);
    if a.json {
        let mut v = serde_json::to_value(&st)?;
        if a.check {
            v["check"] = serde_json::json!({
                "healthy": problems.is_empty(),
                "max_lag_s": max_lag,
                "problems": problems,
            });
        }
        println!("{v}");
    } else {
        print_human(&st.node, &st.folders);
        print_handovers(&st.handovers);
        if a.check {
            let bound = match a.max_lag {
                Some(m) => format!("max lag {m} s"),
                None => "each folder within its max_lag_secs".to_string(),
            };
            print_problems(&problems, &bound);
        }
    }
    Ok(if a.check && !problems.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn print_handovers(handovers: &[sync_agent::handover::Progress]) {
    for h in handovers {
        let age = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(h.started_unix);
        println!(
            "handover in progress: {} of folder {}, step {}, for {age} s (another one is refused until it ends)",
            h.kind, h.folder, h.step
        );
    }
}

fn print_problems(problems: &[Problem], bound: &str) {
    if problems.is_empty() {
        println!("healthy ({bound})");
    }
    for p in problems {
        println!("UNHEALTHY {}: {}", p.folder, p.what);
    }
}

fn print_human(node: &str, folders: &[FolderStatus]) {
    println!("node {node}");
    println!(
        "{:<16} {:<8} {:<10} {:>8} {:>12} {:>8} {:>7}  last error",
        "folder", "role", "connected", "lag s", "lag bytes", "pending", "rounds"
    );
    for f in folders {
        println!(
            "{:<16} {:<8} {:<10} {:>8.3} {:>12} {:>8} {:>7}  {}",
            f.folder,
            f.role,
            if f.connected { "yes" } else { "no" },
            f.lag_s,
            f.lag_bytes,
            f.files_pending,
            f.rounds,
            f.last_error.as_deref().unwrap_or("-")
        );
        if let Some(d) = &f.diverged {
            println!(
                "  diverged: what only this node held when it came back fenced is kept in {d}"
            );
        }
        if let Some(w) = &f.watcher {
            println!("  watcher: {w}");
        }
        if let Some(p) = &f.full_round {
            println!(
                "  full round: {}/{} entries sent, {}/{} content bytes sent ({} files)",
                p.entries_sent, p.entries_total, p.bytes_sent, p.bytes_total, p.files_sent
            );
        }
        if f.role == "replica" {
            println!("  {}", replica_line(f));
        } else if f.epoch > 0 || f.databases > 0 {
            println!(
                "  epoch {}, {} databases, worst writer stall {:.3} ms",
                f.epoch, f.databases, f.max_writer_stall_ms
            );
        }
        if let Some(l) = f.excluded_leftovers.as_ref().filter(|l| l.count > 0) {
            println!(
                "  {} excluded paths present on the replica (delete_excluded = true removes them): {}",
                l.count,
                l.first.join(", ")
            );
        }
        for db in &f.held_databases {
            println!("  held open on the replica, not updated: {db}");
        }
    }
}

fn replica_line(f: &FolderStatus) -> String {
    let applied = match (f.last_applied_unix, f.last_applied_age_s) {
        (Some(t), Some(age)) => format!(
            "last round applied {} ({age:.1} s ago)",
            sync_agent::alerts::rfc3339(t)
        ),
        _ => "no round applied since the agent started".to_string(),
    };
    let source = f.source_epoch.map_or_else(
        || "no source yet".to_string(),
        |e| format!("source epoch {e}"),
    );
    format!(
        "{applied}; {} rounds ({} full); epoch {}, {source}",
        f.rounds, f.full_rounds, f.epoch
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_row_says_when_and_from_which_epoch() {
        let f = FolderStatus {
            role: "replica".into(),
            rounds: 7,
            full_rounds: 1,
            epoch: 3,
            source_epoch: Some(3),
            last_applied_unix: Some(0.0),
            last_applied_age_s: Some(1.5),
            ..Default::default()
        };
        assert_eq!(
            replica_line(&f),
            "last round applied 1970-01-01T00:00:00Z (1.5 s ago); 7 rounds (1 full); epoch 3, source epoch 3"
        );
    }
}
