//! `cut`, `failover` and `failback`: consistent cuts and handovers, driven
//! through the local agent's control socket.
//!
//! A handover runs on the folder's current source host, and the *agent* runs
//! it (`sync_agent::handover`), from persisted state: this command asks it to
//! start and follows its progress; killing this command (Ctrl-C, a dropped SSH
//! session) does not stop or break the handover. Preflight (this node is the
//! source, the replica is connected, no replica database is held open),
//! `stop_source` hook, a final cut verified by both root hashes, promotion of
//! the replica (its epoch + 1, its `start_replica` hook), and this node takes
//! the replica role. Any failure before the promotion completes rolls back:
//! `start_source` runs again and the replica stays as it was. `failover` and
//! `failback` both hand the folder to the peer, whichever way round; `failback`
//! is refused at epoch 0 (nothing was failed over yet).

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use sync_agent::config::{Config, Folder};
use sync_agent::continuous::CutReport;
use sync_agent::control::{Answer, Request};

#[derive(Args, Debug)]
pub struct CutArgs {
    /// The source agent's config file (its `[node] control` socket is used).
    #[arg(long)]
    config: PathBuf,
    /// The folder (needed when the config has several).
    #[arg(long)]
    folder: Option<String>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct HandoverArgs {
    /// This host's agent config file (the folder's current source).
    #[arg(long)]
    config: PathBuf,
    /// The folder (needed when the config has several).
    #[arg(long)]
    folder: Option<String>,
    /// Print the plan and the current state; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Go on even when the two hosts' `parity` outputs differ (the app's
    /// versions; Jellyfin has no downgrade path). Logged.
    #[arg(long)]
    ignore_parity: bool,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn control(cfg: &Config, path: &Path) -> Result<PathBuf> {
    cfg.node
        .control
        .clone()
        .with_context(|| format!("config {}: [node] control is not set", path.display()))
}

fn folder<'c>(cfg: &'c Config, name: Option<&str>, path: &Path) -> Result<&'c Folder> {
    match name {
        Some(n) => cfg
            .folders
            .iter()
            .find(|f| f.name == n)
            .ok_or_else(|| anyhow!("config {}: no folder named {n:?}", path.display())),
        None => match cfg.folders.as_slice() {
            [f] => Ok(f),
            [] => bail!("config {}: no [[folder]]", path.display()),
            _ => bail!(
                "config {} has several folders: say which with --folder",
                path.display()
            ),
        },
    }
}

fn print_cut(c: &CutReport) {
    println!("cut {} of folder {}", c.cut_id, c.folder);
    println!("  writer stall   {:.3} ms", c.writer_stall_ms);
    println!(
        "  databases      {} ({} pages changed)",
        c.databases, c.pages_changed
    );
    println!("  bytes shipped  {}", c.bytes_shipped);
    println!("  source root    {}", c.source_root);
    println!("  replica root   {}", c.replica_root);
    println!(
        "  {} in {:.0} ms (epoch {})",
        if c.matched { "match" } else { "MISMATCH" },
        c.elapsed_ms,
        c.epoch
    );
    for w in &c.warnings {
        println!("  warning: {w}");
    }
}

async fn ask(control: &Path, req: &Request) -> Result<Answer> {
    let v = sync_agent::control::request(control, req).await?;
    serde_json::from_value(v).context("parsing the agent's answer")
}

pub fn cut(a: CutArgs) -> Result<ExitCode> {
    let cfg = Config::parse(&a.config)?;
    let sock = control(&cfg, &a.config)?;
    let name = a.folder.clone();
    let ans = runtime()?.block_on(ask(&sock, &Request::Cut { folder: name }))?;
    if a.json {
        let mut v = serde_json::to_value(ans.cut.clone().unwrap_or_default())?;
        v["ok"] = ans.ok.into();
        if let Some(e) = &ans.error {
            v["error"] = e.clone().into();
        }
        println!("{v}");
    } else if let Some(c) = &ans.cut {
        print_cut(c);
    }
    match (ans.ok, ans.error) {
        (true, _) => Ok(ExitCode::SUCCESS),
        (false, e) => {
            eprintln!("sync-cli: cut failed: {}", e.unwrap_or_default());
            Ok(ExitCode::from(2))
        }
    }
}

/// `verify --config`: a folder's two hosts compared through the agents, as a
/// cut: exit 0 when both root hashes match, 1 when they differ (the first
/// differences printed), 2 when no cut could be taken (not the source host,
/// agent down, replica away).
pub fn verify_hosts(config: Option<&Path>, folder: Option<String>, json: bool) -> Result<ExitCode> {
    let config = config.context("verify needs SRC and DST, or --config")?;
    let cfg = Config::parse(config)?;
    let sock = control(&cfg, config)?;
    let ans = runtime()?.block_on(ask(&sock, &Request::Cut { folder }))?;
    let Some(c) = ans.cut else {
        let e = ans.error.unwrap_or_default();
        if json {
            println!("{}", serde_json::json!({"identical": false, "error": e}));
        }
        eprintln!(
            "sync-cli: verify: no cut: {e} (run it on the folder's source host, with the replica connected)"
        );
        return Ok(ExitCode::from(2));
    };
    if json {
        let v = serde_json::json!({
            "identical": c.matched, "folder": c.folder, "source_root": c.source_root,
            "destination_root": c.replica_root, "differences": c.warnings, "held": c.held,
        });
        println!("{v}");
    } else {
        println!("source root      {}", c.source_root);
        println!("replica root     {}", c.replica_root);
        for d in c.warnings.iter().chain(&c.held) {
            println!("{d}");
        }
        println!("{}", if c.matched { "identical" } else { "DIFFERENT" });
    }
    Ok(if c.matched {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn failover(a: HandoverArgs) -> Result<ExitCode> {
    handover(a, "failover")
}

pub fn failback(a: HandoverArgs) -> Result<ExitCode> {
    handover(a, "failback")
}

/// How often the progress is polled.
const POLL: Duration = Duration::from_millis(200);

fn handover(a: HandoverArgs, kind: &'static str) -> Result<ExitCode> {
    let cfg = Config::parse(&a.config)?;
    let f = folder(&cfg, a.folder.as_deref(), &a.config)?.clone();
    let sock = control(&cfg, &a.config)?;
    let rt = runtime()?;
    let req = Request::Handover {
        folder: Some(f.name.clone()),
        kind: kind.to_string(),
        dry_run: a.dry_run,
        ignore_parity: a.ignore_parity,
    };
    let ans = rt.block_on(ask(&sock, &req))?;
    if !ans.ok {
        let e = ans.error.unwrap_or_default();
        if a.json {
            let v = serde_json::json!({"folder": f.name, "kind": kind, "ok": false,
                "dry_run": a.dry_run, "error": e, "steps": []});
            println!("{v}");
        }
        eprintln!("sync-cli: {kind} refused: {e}");
        return Ok(ExitCode::from(2));
    }
    if !a.json {
        println!(
            "{kind} of folder {} runs in the agent; interrupting this command does not stop it \
             (follow it with `sync-cli status`)",
            f.name
        );
    }
    let p = rt.block_on(follow(&sock, &f.name, !a.json))?;
    let o = p.outcome.clone().unwrap_or_default();
    if a.json {
        let v = serde_json::json!({
            "folder": f.name, "kind": kind, "ok": o.ok, "dry_run": a.dry_run,
            "step": o.step, "steps": p.lines, "source_state": o.this_node,
            "replica_state": o.peer, "error": o.error,
        });
        println!("{v}");
    } else {
        println!("this node ({}): {}", f.name, o.this_node);
        println!("its peer:  {}", o.peer);
        if let Some(e) = &o.error {
            eprintln!("sync-cli: {kind} failed ({}): {e}", o.step);
        }
    }
    Ok(if o.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// Follows the agent's handover until it is over; prints its lines as they come.
async fn follow(sock: &Path, folder: &str, print: bool) -> Result<sync_agent::handover::Progress> {
    let mut lines = Vec::new();
    loop {
        let req = Request::HandoverProgress {
            folder: Some(folder.to_string()),
            from: lines.len(),
        };
        let ans = ask(sock, &req).await.context(
            "lost contact with the agent: the handover goes on (or resumes when it restarts); \
             see `sync-cli status`",
        )?;
        let p = match (ans.ok, ans.handover) {
            (true, Some(p)) => p,
            _ => bail!(
                "the agent answered without the handover's progress: {}",
                ans.error.unwrap_or_default()
            ),
        };
        for l in &p.lines {
            if print {
                println!("{l}");
            }
        }
        lines.extend(p.lines.iter().cloned());
        if !p.running && p.outcome.is_some() {
            return Ok(sync_agent::handover::Progress { lines, ..p });
        }
        tokio::time::sleep(POLL).await;
    }
}
