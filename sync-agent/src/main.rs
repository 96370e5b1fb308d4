//! `sync-agent`: the daemon. Today it serves pushes as a replica.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use sync_agent::{Identity, NodeId};

/// understudy agent: keeps a warm standby of a folder.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log as JSON lines instead of human text.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve pushes from pinned peers into a replica root.
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
    },
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("UNDERSTUDY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json { b.json().init() } else { b.init() }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Replica {
            root,
            listen,
            identity,
            allow,
        } => {
            let me = Identity::load(&identity)?;
            let allowed = allow
                .iter()
                .map(|s| s.parse::<NodeId>().with_context(|| format!("--allow {s}")))
                .collect::<Result<Vec<_>>>()?;
            sync_agent::open_replica(&root)?;
            let endpoint = sync_agent::tls::server(listen, &me, allowed)?;
            let local = endpoint.local_addr()?;
            tracing::info!(id = %me.id(), %local, root = %root.display(), "replica listening");
            // One line on stdout so scripts can learn the port when listening on :0.
            println!("listening {local}");
            let shutdown = async {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(_) => return std::future::pending().await,
                    };
                tokio::select! {
                    _ = term.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                }
            };
            sync_agent::serve(endpoint, root, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_json);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sync-agent: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sync-agent: {e:#}");
            ExitCode::from(2)
        }
    }
}
