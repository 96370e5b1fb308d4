//! `sync-agent`: the daemon. Runs the folders of a config file, or one folder
//! from flags: `source` watches and ships changes continuously, `replica`
//! applies them.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use sync_agent::config::{Config, Role};
use sync_agent::continuous::{Command, FolderStatus, Outcome, SourceFolder};
use sync_agent::control::Registry;
use sync_agent::session::replica::{Fence, ReplicaFolder};
use sync_agent::{Identity, NodeId};
use sync_core::filter::Filter;
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
    Source {
        /// The folder to keep.
        #[arg(long)]
        root: PathBuf,
        /// The replica's address (host:port).
        #[arg(long)]
        connect: SocketAddr,
        /// Directory with this node's cert.pem and key.pem (`sync-cli keygen`).
        #[arg(long)]
        identity: PathBuf,
        /// The replica's node id.
        #[arg(long)]
        peer: String,
        /// Folder name as the replica knows it.
        #[arg(long, default_value = "default")]
        folder: String,
        /// gitignore-style exclude (repeatable).
        #[arg(long)]
        exclude: Vec<String>,
        /// State directory for the hash index (default: in memory).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Control socket for `sync-cli status`.
        #[arg(long)]
        control: Option<PathBuf>,
        /// Quiet time that ends a batch of changes, in ms.
        #[arg(long, default_value_t = 5)]
        debounce_ms: u64,
        /// Seconds between safety full rescans.
        #[arg(long, default_value_t = 600)]
        rescan_s: u64,
    },
    /// Serve pushes and continuous sources from pinned peers into a root.
    Replica {
        /// The replica root (must exist).
        #[arg(long)]
        root: PathBuf,
        /// Address to listen on (UDP), e.g. 0.0.0.0:7878.
        #[arg(long)]
        listen: SocketAddr,
        /// Directory with this node's cert.pem and key.pem (`sync-cli keygen`).
        #[arg(long)]
        identity: PathBuf,
        /// Node ids allowed to push, comma separated.
        #[arg(long, value_delimiter = ',', required = true)]
        allow: Vec<String>,
        /// gitignore-style exclude (repeatable): neither written nor deleted.
        #[arg(long)]
        exclude: Vec<String>,
        /// Control socket for `sync-cli status`.
        #[arg(long)]
        control: Option<PathBuf>,
    },
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

fn parse_ids(ids: &[String], what: &str) -> Result<Vec<NodeId>> {
    ids.iter()
        .map(|s| s.parse::<NodeId>().with_context(|| format!("{what} {s}")))
        .collect()
}

/// Everything one agent process runs.
#[derive(Default)]
struct Plan {
    identity: Option<Identity>,
    listen: Option<SocketAddr>,
    folders: Vec<FolderPlan>,
    control: Option<PathBuf>,
    surface: sync_agent::surface::Settings,
}

/// One folder: the replica side (served when this node is not its source), the
/// source loops (one per peer, run while it is), and its fencing state.
struct FolderPlan {
    name: String,
    replica: Option<Arc<ReplicaFolder>>,
    sources: Vec<SourceFolder>,
    fence: Fence,
    state_dir: Option<PathBuf>,
    /// Hooks, run by handovers.
    hooks: sync_agent::config::Hooks,
    /// The configured role (the epoch file, when present, wins).
    configured: Role,
}

fn plan_from_config(path: &Path) -> Result<Plan> {
    let c = Config::load(path)?;
    let identity = Identity::load(&c.node.identity)?;
    let mut plan = Plan {
        listen: c.node.listen,
        control: c.node.control.clone(),
        surface: sync_agent::surface::Settings::from_config(&c)?,
        ..Default::default()
    };
    for f in &c.folders {
        let filter = f.filter()?;
        let peers = f.peer_ids()?;
        let sqlite = Filter::new(&f.sqlite_globs()?)
            .with_context(|| format!("folder {}: sqlite", f.name))?;
        sync_agent::config::profiles::advise(f, &filter);
        // The persisted fencing state wins over the configured role: a failover
        // may have swapped them.
        let persisted = match &c.node.state {
            Some(dir) => sync_agent::epoch::load(dir, &f.name)?,
            None => None,
        };
        let (role, epoch) = persisted.map_or((f.role, 0), |st| (st.role, st.epoch));
        if persisted.is_some() && role != f.role {
            tracing::info!(folder = %f.name, ?role, epoch, "role from the persisted fencing state (a failover swapped it)");
        }
        let fence = Fence {
            epoch,
            source: role == Role::Source,
        };
        if role == Role::Replica && c.node.listen.is_none() {
            bail!(
                "folder {}: this node is its replica but [node] listen is not set",
                f.name
            );
        }
        let replica = match c.node.listen {
            Some(_) => Some(sync_agent::replica_folder_with(
                &f.name,
                &f.path,
                filter.clone(),
                peers.clone(),
                sync_agent::ReplicaSettings {
                    sqlite: sqlite.clone(),
                    state_dir: c.node.state.clone(),
                    node: identity.id().to_string(),
                    hooks: f.hooks.clone(),
                    fence,
                    promotable: f.failover
                        && !peers.is_empty()
                        && peers.iter().all(|p| c.peer_address(p).is_some()),
                    ids: f.id_map()?,
                    sweep: f.sweep()?,
                },
            )?),
            None => None,
        };
        let mut sources = Vec::new();
        for peer in peers {
            let Some(addr) = c.peer_address(&peer) else {
                if role == Role::Source {
                    bail!("folder {}: peer {peer} has no address", f.name);
                }
                continue;
            };
            let index_path = c
                .node
                .state
                .as_ref()
                .map(|s| s.join(format!("{}.{}.index.db", f.name, &peer.to_string()[..9])));
            sources.push(SourceFolder {
                name: f.name.clone(),
                root: f.path.clone(),
                filter: filter.clone(),
                identity: identity.clone(),
                peer,
                addr,
                index_path,
                debounce: Duration::from_millis(5),
                rescan_every: Duration::from_secs(600),
                sqlite: sqlite.clone(),
                epoch,
                state_dir: c.node.state.clone(),
            });
        }
        plan.folders.push(FolderPlan {
            name: f.name.clone(),
            replica,
            sources,
            fence,
            state_dir: c.node.state.clone(),
            hooks: f.hooks.clone(),
            configured: f.role,
        });
    }
    plan.identity = Some(identity);
    Ok(plan)
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
        let mut rx = stop_rx.clone();
        tasks.spawn(sync_agent::serve(endpoint, Arc::new(folders), async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
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

/// Runs one folder in the role its fencing state says, switching when a
/// failover promotes or demotes this node.
async fn supervise(
    f: FolderPlan,
    statuses: Vec<Arc<Mutex<FolderStatus>>>,
    mut commands: mpsc::Receiver<Command>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let fence = |f: &FolderPlan| {
        f.replica
            .as_ref()
            .and_then(|r| r.fence.lock().ok().map(|g| *g))
            .unwrap_or(f.fence)
    };
    let mut local = f.fence;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let now = if f.replica.is_some() {
            fence(&f)
        } else {
            local
        };
        if now.source {
            // The first peer drives handovers; more peers each get a copy.
            let Some((first, rest)) = f.sources.split_first() else {
                bail!(
                    "folder {}: this node is its source but no peer has an address",
                    f.name
                );
            };
            let (sub_stop_tx, sub_stop) = watch::channel(false);
            let mut others = tokio::task::JoinSet::new();
            for (cfg, st) in rest.iter().zip(statuses.iter().skip(1)) {
                let mut cfg = cfg.clone();
                cfg.epoch = now.epoch;
                let (st, s) = (st.clone(), sub_stop.clone());
                others.spawn(async move {
                    let (_tx, mut rx) = mpsc::channel(1);
                    sync_agent::continuous::run_source(cfg, st, s, &mut rx).await
                });
            }
            let mut cfg = first.clone();
            cfg.epoch = now.epoch;
            let status = statuses.first().cloned().unwrap_or_default();
            let stop_first = {
                let mut stop = stop.clone();
                let sub = sub_stop_tx.clone();
                tokio::spawn(async move {
                    let _ = stop.wait_for(|s| *s).await;
                    let _ = sub.send(true);
                })
            };
            let outcome =
                sync_agent::continuous::run_source(cfg, status, sub_stop.clone(), &mut commands)
                    .await;
            let _ = sub_stop_tx.send(true);
            stop_first.abort();
            while others.join_next().await.is_some() {}
            match outcome? {
                Outcome::Stopped => return Ok(()),
                Outcome::Demoted { epoch } => {
                    for s in &statuses {
                        if let Ok(mut s) = s.lock() {
                            s.connected = false;
                        }
                    }
                    let st = sync_agent::epoch::FolderState {
                        role: Role::Replica,
                        epoch,
                    };
                    if let Some(dir) = &f.state_dir {
                        let node = f
                            .sources
                            .first()
                            .map(|s| s.identity.id().to_string())
                            .unwrap_or_default();
                        sync_agent::epoch::store(dir, &f.name, &node, st)?;
                    }
                    // The app is stopped before the replica side takes
                    // sessions: the new source's first round (and, after a
                    // fencing, the copy of what only this node held) never
                    // races the app's last writes.
                    if let Some(r) = &f.replica
                        && let Some(cmd) = r.hooks.command(sync_agent::config::Hook::StopReplica)
                        && let Err(e) =
                            sync_agent::hooks::run("stop_replica", cmd, &f.name, r.hooks.timeout())
                                .await
                    {
                        tracing::error!(folder = %f.name, "{e:#}");
                    }
                    local = Fence {
                        epoch,
                        source: false,
                    };
                    if let Some(r) = &f.replica
                        && let Ok(mut g) = r.fence.lock()
                    {
                        *g = local;
                    }
                    tracing::warn!(folder = %f.name, epoch, "this node is now the folder's replica");
                }
            }
        } else {
            let Some(r) = f.replica.clone() else {
                tracing::error!(folder = %f.name, "this node is now the folder's replica, but [node] listen is not set: not serving it");
                let _ = stop.wait_for(|s| *s).await;
                return Ok(());
            };
            tokio::select! {
                () = r.promoted.notified() => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
                Some(c) = commands.recv() => {
                    let why = format!(
                        "folder {}: this node is its replica (epoch {}); run this on the source's host",
                        f.name, now.epoch
                    );
                    match c {
                        Command::Cut(reply) => { let _ = reply.send(Err(why)); }
                        Command::Promote { reply, .. } => { let _ = reply.send(Err(sync_agent::handover::PromoteFailure::NotSent(why))); }
                    }
                }
            }
        }
    }
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
        (
            None,
            Some(Cmd::Replica {
                root,
                listen,
                identity,
                allow,
                exclude,
                control,
            }),
        ) => {
            let identity = Identity::load(&identity)?;
            let allowed = parse_ids(&allow, "--allow")?;
            let filter = Filter::new(&exclude)?;
            Ok(Plan {
                identity: Some(identity),
                listen: Some(listen),
                folders: vec![FolderPlan {
                    name: "default".into(),
                    replica: Some(sync_agent::replica_folder(
                        "default", &root, filter, allowed,
                    )?),
                    sources: Vec::new(),
                    fence: Fence::default(),
                    state_dir: None,
                    hooks: Default::default(),
                    configured: Role::Replica,
                }],
                control,
                ..Default::default()
            })
        }
        (
            None,
            Some(Cmd::Source {
                root,
                connect,
                identity,
                peer,
                folder,
                exclude,
                state,
                control,
                debounce_ms,
                rescan_s,
            }),
        ) => {
            let identity = Identity::load(&identity)?;
            let peer: NodeId = peer.parse().context("--peer")?;
            if !root.is_dir() {
                bail!(
                    "--root {} does not exist or is not a directory",
                    root.display()
                );
            }
            let index_path = match state {
                Some(s) => {
                    sync_agent::trust::check_dir_or_parent(&s, sync_agent::trust::Kind::StateDir)?;
                    std::fs::create_dir_all(&s)
                        .with_context(|| format!("creating state dir {}", s.display()))?;
                    Some(s.join(format!("{folder}.index.db")))
                }
                None => None,
            };
            Ok(Plan {
                identity: Some(identity.clone()),
                folders: vec![FolderPlan {
                    name: folder.clone(),
                    replica: None,
                    sources: vec![SourceFolder {
                        name: folder,
                        root,
                        filter: Filter::new(&exclude)?,
                        identity,
                        peer,
                        addr: connect.into(),
                        index_path,
                        debounce: Duration::from_millis(debounce_ms),
                        rescan_every: Duration::from_secs(rescan_s.max(1)),
                        sqlite: Filter::default(),
                        epoch: 0,
                        state_dir: None,
                    }],
                    fence: Fence {
                        epoch: 0,
                        source: true,
                    },
                    state_dir: None,
                    hooks: Default::default(),
                    configured: Role::Source,
                }],
                control,
                ..Default::default()
            })
        }
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
