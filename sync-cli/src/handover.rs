//! `cut`, `failover` and `failback`: consistent cuts and handovers, driven
//! through the local agent's control socket.
//!
//! A failover runs on the source's host: lock (one at a time), check the replica
//! is connected, `stop_source` hook, a final cut verified by both root hashes,
//! promotion of the replica (its epoch + 1, its `start_replica` hook), and this
//! node takes the replica role. Any failure before the promotion completes rolls
//! back: `start_source` runs again and the replica stays as it was. A failback is
//! the same handover run from the promoted side, once the old source is back as
//! its replica (it came back fenced, took the replica role, and received only
//! what changed since the promotion).

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use sync_agent::config::{Config, Folder, Hook};
use sync_agent::continuous::{CutReport, FolderStatus};
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
    /// This host's agent config file (the current source's).
    #[arg(long)]
    config: PathBuf,
    /// The folder (needed when the config has several).
    #[arg(long)]
    folder: Option<String>,
    /// Print the plan and the current state; change nothing.
    #[arg(long)]
    dry_run: bool,
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

/// What a handover did, step by step, and where each side stands.
#[derive(Debug, Default, Serialize)]
struct Report {
    folder: String,
    kind: &'static str,
    ok: bool,
    dry_run: bool,
    steps: Vec<String>,
    /// This node's state at the end.
    source_state: String,
    /// The peer's state at the end.
    replica_state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    cut: Option<CutReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

pub fn failover(a: HandoverArgs) -> Result<ExitCode> {
    handover(a, "failover")
}

pub fn failback(a: HandoverArgs) -> Result<ExitCode> {
    handover(a, "failback")
}

fn handover(a: HandoverArgs, kind: &'static str) -> Result<ExitCode> {
    let cfg = Config::parse(&a.config)?;
    let f = folder(&cfg, a.folder.as_deref(), &a.config)?.clone();
    let sock = control(&cfg, &a.config)?;
    let state = cfg.node.state.clone().with_context(|| {
        format!(
            "config {}: [node] state is not set (the fencing epoch lives there)",
            a.config.display()
        )
    })?;
    let _lock = sync_agent::epoch::FailoverLock::acquire(&state, &f.name)?;
    let rt = runtime()?;
    let mut r = Report {
        folder: f.name.clone(),
        kind,
        dry_run: a.dry_run,
        ..Default::default()
    };
    let res = rt.block_on(run_handover(&f, &sock, kind, a.dry_run, &mut r));
    if let Err(e) = &res {
        r.error = Some(format!("{e:#}"));
    }
    r.ok = res.is_ok();
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        for s in &r.steps {
            println!("{s}");
        }
        println!("this node ({}): {}", f.name, r.source_state);
        println!("its peer:  {}", r.replica_state);
        if let Some(e) = &r.error {
            eprintln!("sync-cli: {kind} failed: {e}");
        }
    }
    Ok(if r.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

async fn run_hook(f: &Folder, hook: Hook, r: &mut Report) -> Result<()> {
    match f.hooks.command(hook) {
        None => {
            r.steps.push(format!("{hook}: not configured, skipped"));
            Ok(())
        }
        Some(cmd) => {
            let out = sync_agent::hooks::run(hook.name(), cmd, &f.name, f.hooks.timeout()).await;
            match out {
                Ok(o) => {
                    r.steps.push(format!(
                        "{hook}: ran {cmd:?} in {:.1} s",
                        o.elapsed.as_secs_f64()
                    ));
                    Ok(())
                }
                Err(e) => {
                    r.steps.push(format!("{hook}: FAILED: {e:#}"));
                    Err(e)
                }
            }
        }
    }
}

/// Puts the source's application back after a failed handover.
async fn roll_back(f: &Folder, epoch: u64, r: &mut Report, why: anyhow::Error) -> anyhow::Error {
    r.steps.push("rolling back".into());
    let restarted = run_hook(f, Hook::StartSource, r).await;
    r.source_state = match restarted {
        Ok(()) => format!(
            "still the source at epoch {epoch}; its application was started again (start_source)"
        ),
        Err(e) => format!(
            "still the source at epoch {epoch}, but start_source FAILED ({e:#}): its application may be stopped"
        ),
    };
    why
}

async fn run_handover(
    f: &Folder,
    sock: &Path,
    kind: &str,
    dry_run: bool,
    r: &mut Report,
) -> Result<()> {
    let status = sync_agent::control::query(sock).await?;
    let st: FolderStatus = status
        .folders
        .iter()
        .find(|s| s.folder == f.name && s.role == "source")
        .cloned()
        .ok_or_else(|| {
            r.source_state = "not the folder's source on this node: nothing changed".into();
            anyhow!(
                "folder {}: this node is not its source (run the {kind} on the source's host)",
                f.name
            )
        })?;
    let epoch = st.epoch;
    r.source_state = format!("the source at epoch {epoch}");
    r.replica_state = format!(
        "peer {} ({}), replica at epoch {epoch}",
        st.peer,
        if st.connected {
            "connected"
        } else {
            "NOT connected"
        }
    );
    if kind == "failback" && epoch == 0 {
        bail!(
            "folder {}: epoch 0, this node was never promoted: nothing to fail back (use failover)",
            f.name
        );
    }
    let plan = [
        format!("1. check the replica {} is connected", st.peer),
        format!(
            "2. stop_source: {}",
            f.hooks.stop_source.as_deref().unwrap_or("(none)")
        ),
        "3. final cut; both root hashes must match".to_string(),
        format!(
            "4. promote the replica to epoch {} (it persists the epoch, then runs its start_replica hook)",
            epoch + 1
        ),
        format!("5. this node becomes the replica at epoch {}", epoch + 1),
        format!(
            "on any failure before 4 completes: start_source ({}) and the replica stays as it was",
            f.hooks.start_source.as_deref().unwrap_or("none")
        ),
    ];
    if dry_run {
        r.steps
            .push(format!("{kind} plan (dry run, nothing changed):"));
        r.steps.extend(plan);
        return Ok(());
    }
    if !st.connected {
        r.replica_state = format!("peer {} unreachable: unchanged", st.peer);
        r.source_state = format!(
            "still the source at epoch {epoch}; its application was not stopped: nothing changed"
        );
        bail!(
            "folder {}: the replica {} is not connected{}",
            f.name,
            st.peer,
            st.last_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    r.steps.push(format!("replica {} connected", st.peer));
    if let Err(e) = run_hook(f, Hook::StopSource, r).await {
        r.replica_state = format!("peer {}: replica at epoch {epoch}, unchanged", st.peer);
        return Err(roll_back(f, epoch, r, e).await);
    }
    let cut = ask(
        sock,
        &Request::Cut {
            folder: Some(f.name.clone()),
        },
    )
    .await;
    match cut {
        Ok(a) if a.ok => {
            let c = a.cut.unwrap_or_default();
            r.steps.push(format!(
                "final cut {}: roots match {} (writer stall {:.3} ms, {} bytes)",
                c.cut_id, c.source_root, c.writer_stall_ms, c.bytes_shipped
            ));
            r.cut = Some(c);
        }
        Ok(a) => {
            let e = anyhow!("final cut failed: {}", a.error.unwrap_or_default());
            r.cut = a.cut;
            r.replica_state = format!("peer {}: replica at epoch {epoch}, unchanged", st.peer);
            return Err(roll_back(f, epoch, r, e).await);
        }
        Err(e) => {
            r.replica_state = format!("peer {}: replica at epoch {epoch}, unchanged", st.peer);
            return Err(roll_back(f, epoch, r, e.context("final cut")).await);
        }
    }
    let promoted = ask(
        sock,
        &Request::Promote {
            folder: Some(f.name.clone()),
            epoch: epoch + 1,
        },
    )
    .await;
    match promoted {
        Ok(a) if a.ok => {
            r.steps.push(format!(
                "replica {} promoted to epoch {} (its start_replica hook ran)",
                st.peer,
                epoch + 1
            ));
            r.replica_state = format!("peer {}: the SOURCE at epoch {}", st.peer, epoch + 1);
            r.source_state = format!(
                "the replica at epoch {} (its agent now applies the peer's changes)",
                epoch + 1
            );
            Ok(())
        }
        Ok(a)
            if a.error
                .as_deref()
                .is_some_and(|e| e.contains("refused the promotion")) =>
        {
            // The replica said no and put itself back: a clean rollback.
            let e = anyhow!("promotion failed: {}", a.error.unwrap_or_default());
            r.replica_state = format!(
                "peer {}: replica at epoch {epoch} (it rolled its promotion back)",
                st.peer
            );
            Err(roll_back(f, epoch, r, e).await)
        }
        other => {
            // The answer was lost: the replica may have been promoted. Starting
            // the application here too could make two masters; leave it stopped.
            let e = match other {
                Ok(a) => anyhow!("promotion: {}", a.error.unwrap_or_default()),
                Err(e) => e.context("promotion"),
            };
            r.replica_state = format!(
                "peer {}: UNKNOWN (the promotion's answer was lost): check `sync-cli status` on its host",
                st.peer
            );
            r.source_state = format!(
                "the source at epoch {epoch} with its application STOPPED (not restarted: the peer may \
                 be the source now; if its status says replica at epoch {epoch}, run start_source by hand)"
            );
            Err(e)
        }
    }
}
