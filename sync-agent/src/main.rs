//! `sync-agent`: the daemon. Runs the folders of a config file, or one folder
//! from flags: `source` watches and ships changes continuously, `replica`
//! applies them.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use sync_agent::NodeId;
use sync_agent::continuous::{Command, FolderStatus};
use sync_agent::control::Registry;
use sync_agent::folder::supervise;
use sync_agent::plan::{Plan, ReplicaFlags, SourceFlags, plan_from_config};
use sync_agent::session::replica::ReplicaFolder;
use tokio::sync::mpsc;
use tokio::sync::watch;

/// understudy agent: keeps a warm standby of a folder.
///
/// Exit codes: 0 stopped cleanly (SIGTERM/SIGINT), 2 error (the message names it).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// Run the folders of this TOML config file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log as JSON lines instead of human text.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Watch a folder and keep a replica in step with it.
    Source(SourceFlags),
    /// Serve pushes and continuous sources from pinned peers into a root.
    Replica(ReplicaFlags),
}

fn init_logs(json: bool) {
    // notify logs an INFO line for every watch of a removed directory it
    // cannot remove (the kernel already did): noise, not news.
    let filter = tracing_subscriber::EnvFilter::try_from_env("UNDERSTUDY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,notify=warn"));
    let b = tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json { b.json().init() } else { b.init() }
}

async fn run(plan: Plan) -> Result<ExitCode> {
    // Before anything is announced: a SIGTERM from then on stops cleanly.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("signal handler")?;
    let identity = plan.identity.context("no identity")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut registry = Registry {
        node: identity.id().to_string(),
        ..Default::default()
    };
    let replicas: Vec<Arc<ReplicaFolder>> = plan
        .folders
        .iter()
        .filter_map(|f| f.replica.clone())
        .collect();
    // A promotion an earlier run left half-way ends before anything is served:
    // it decides the role.
    for r in &replicas {
        if let Err(e) = sync_agent::handover::promotion::resume(r).await {
            tracing::error!(folder = %r.name, "{e:#}");
        }
    }
    if !replicas.is_empty() {
        let listen = plan
            .listen
            .context("replica folders need a listen address")?;
        let allowed: Vec<NodeId> = replicas.iter().flat_map(|r| r.allowed.clone()).collect();
        let endpoint = sync_agent::tls::server(listen, &identity, allowed)?;
        let local = endpoint.local_addr()?;
        tracing::info!(id = %identity.id(), %local, "replica listening");
        // One line on stdout so scripts can learn the port when listening on :0.
        println!("listening {local}");
        let folders: HashMap<String, _> = replicas
            .iter()
            .map(|r| (r.name.clone(), r.clone()))
            .collect();
        registry.replicas = replicas.clone();
        sync_agent::session::replica_ahead::start(&replicas);
        let mut rx = stop_rx.clone();
        tasks.spawn(sync_agent::accept_sessions(
            endpoint,
            Arc::new(folders),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        ));
    }
    for f in plan.folders {
        let (tx, rx) = mpsc::channel::<Command>(4);
        registry.commands.insert(f.name.clone(), tx);
        let statuses: Vec<_> = f.sources.iter().map(|s| source_row(&s.name)).collect();
        registry.folders.extend(statuses.iter().cloned());
        let handover = Arc::new(sync_agent::handover::Folder::new(
            &f.name,
            f.hooks.clone(),
            f.state_dir.clone(),
            identity.id().to_string(),
            f.configured,
            tx_for(&registry, &f.name)?,
            statuses.first().cloned(),
            f.replica.clone(),
        ));
        registry.handovers.insert(f.name.clone(), handover);
        tasks.spawn(supervise(f, statuses, rx, stop_rx.clone()));
    }
    // A handover an earlier run left half-way is taken up again: it ends
    // completed or rolled back.
    for h in registry.handovers.values() {
        if let Err(e) = sync_agent::handover::resume(h) {
            tracing::error!(folder = %h.name, "resuming its handover: {e:#}");
        }
    }
    sync_agent::surface::start(plan.surface, registry.clone()).await?;
    if let Some(path) = plan.control {
        sync_agent::control::spawn(path, registry.clone());
    }

    let failed = tokio::select! {
        _ = term.recv() => None,
        _ = tokio::signal::ctrl_c() => None,
        Some(done) = tasks.join_next() => Some(done),
    };
    let _ = stop_tx.send(true);
    if let Some(done) = failed {
        done.context("agent task")??;
    }
    while tokio::time::timeout(Duration::from_secs(10), tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// A source loop's status row before it runs: named, so that a replica's
/// snapshot tells it from the replica row.
fn source_row(folder: &str) -> Arc<Mutex<FolderStatus>> {
    let (folder, role) = (folder.to_string(), "source".into());
    Arc::new(Mutex::new(FolderStatus {
        folder,
        role,
        ..Default::default()
    }))
}

fn tx_for(registry: &Registry, name: &str) -> Result<mpsc::Sender<Command>> {
    registry
        .commands
        .get(name)
        .cloned()
        .with_context(|| format!("folder {name}: no command channel"))
}

fn build_plan(cli: Cli) -> Result<Plan> {
    match (cli.config, cli.cmd) {
        (Some(path), None) => plan_from_config(&path),
        (Some(_), Some(_)) => bail!("give either --config or a subcommand, not both"),
        (None, None) => {
            bail!("nothing to run: give --config FILE, or `source`/`replica` (see --help)")
        }
        (None, Some(Cmd::Replica(flags))) => sync_agent::plan::from_replica_flags(flags),
        (None, Some(Cmd::Source(flags))) => sync_agent::plan::from_source_flags(flags),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let res = build_plan(cli).and_then(|plan| {
        let rt = tokio::runtime::Runtime::new().context("starting the runtime")?;
        rt.block_on(run(plan))
    });
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sync-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
