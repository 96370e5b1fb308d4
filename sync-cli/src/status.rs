//! `status`: ask a running agent how far behind each folder is.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The agent's config file (its `[node] control` socket is queried).
    #[arg(long)]
    config: PathBuf,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn status(a: StatusArgs) -> Result<ExitCode> {
    let cfg = sync_agent::config::Config::parse(&a.config)?;
    let control = cfg
        .node
        .control
        .with_context(|| format!("config {}: [node] control is not set", a.config.display()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let st = rt.block_on(sync_agent::control::query(&control))?;
    if a.json {
        println!("{}", serde_json::to_string(&st)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("node {}", st.node);
    println!(
        "{:<16} {:<8} {:<10} {:>8} {:>12} {:>8} {:>7}  last error",
        "folder", "role", "connected", "lag s", "lag bytes", "pending", "rounds"
    );
    for f in &st.folders {
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
        if let Some(w) = &f.watcher {
            println!("  watcher: {w}");
        }
        if f.epoch > 0 || f.databases > 0 {
            println!(
                "  epoch {}, {} databases, worst writer stall {:.3} ms",
                f.epoch, f.databases, f.max_writer_stall_ms
            );
        }
    }
    for h in &st.handovers {
        let age = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(h.started_unix);
        println!(
            "handover in progress: {} of folder {}, step {}, for {age} s (another one is refused until it ends)",
            h.kind, h.folder, h.step
        );
    }
    Ok(ExitCode::SUCCESS)
}
