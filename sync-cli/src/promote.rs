//! `promote`: a standby whose master is dead takes the folder over.
//!
//! Asks the local agent (control socket) to promote the folder: the agent
//! refuses while the folder's source is connected to it (a planned switchover
//! is `failover`, run on the source's host); otherwise it persists the epoch
//! past every epoch it has seen (role source), runs its `start_replica` hook,
//! and serves the folder as its source. A failed hook rolls the promotion back.
//! When the old master returns it is fenced, keeps what only it held under its
//! `{state}/diverged/`, and becomes the replica (docs/RUNBOOK.md).

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;
use sync_agent::config::Config;
use sync_agent::control::{Answer, Request};

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// This (standby) host's agent config file.
    #[arg(long)]
    config: PathBuf,
    /// The folder (needed when the agent serves several).
    #[arg(long)]
    folder: Option<String>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn promote(a: PromoteArgs) -> Result<ExitCode> {
    let cfg = Config::parse(&a.config)?;
    let sock = cfg
        .node
        .control
        .clone()
        .with_context(|| format!("config {}: [node] control is not set", a.config.display()))?;
    let req = Request::PromoteStandby {
        folder: a.folder.clone(),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let v = rt.block_on(sync_agent::control::request(&sock, &req))?;
    let ans: Answer = serde_json::from_value(v).context("parsing the agent's answer")?;
    let name = a.folder.as_deref().unwrap_or("the folder");
    if a.json {
        let mut v = serde_json::json!({ "ok": ans.ok, "folder": a.folder });
        if let Some(e) = ans.epoch {
            v["epoch"] = e.into();
        }
        if let Some(e) = &ans.error {
            v["error"] = e.clone().into();
        }
        println!("{v}");
    } else if ans.ok {
        println!(
            "{name}: promoted to epoch {}; its start_replica hook ran and this node is now the source",
            ans.epoch.unwrap_or_default()
        );
        println!(
            "when the old master returns it is fenced and becomes the replica (see docs/RUNBOOK.md)"
        );
    }
    if ans.ok {
        return Ok(ExitCode::SUCCESS);
    }
    if !a.json {
        eprintln!(
            "sync-cli: promote refused: {}",
            ans.error.unwrap_or_default()
        );
    }
    Ok(ExitCode::from(2))
}
