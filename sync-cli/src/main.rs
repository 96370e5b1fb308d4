//! `sync-cli`: the operator's tool.
//!
//! Exit codes: 0 success; 1 `verify` found differences, or `status --check`
//! found a folder unhealthy; 2 error (nothing was left torn, the message names
//! the cause; for `status`, the agent is unreachable or the config is bad); 3
//! the mirror completed but something could not be preserved (each listed on
//! stderr).

mod doctor;
mod handover;
mod keys;
mod profiles;
mod promote;
mod status;
mod transfer;
mod verify;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// understudy: a warm standby of a folder, kept over QUIC.
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    after_help = "Exit codes: 0 ok, 1 verify found differences or status --check found a folder unhealthy, 2 error, 3 done with things not preserved."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a node identity (cert.pem, key.pem) and print its node id.
    Keygen(keys::KeygenArgs),
    /// Print the node id of an identity directory.
    Id(keys::IdArgs),
    /// Mirror SRC into DST on this machine (both ends in-process, QUIC on 127.0.0.1).
    Mirror(transfer::MirrorArgs),
    /// Mirror SRC to a running replica (`sync-agent replica`).
    Push(transfer::PushArgs),
    /// Compare two local trees by content and all metadata, or with --config
    /// a folder's two hosts through the agents (a cut: both root hashes).
    Verify(verify::VerifyArgs),
    /// Show a running agent's folders: connected, lag, pending, last error;
    /// with --check, judge them (exit 0 healthy, 1 unhealthy, 2 error).
    #[command(after_help = status::EXIT_CODES)]
    Status(status::StatusArgs),
    /// Take a consistent cut of a source folder (every database frozen at one
    /// instant), ship it, and compare both root hashes (exit 0 only when equal).
    Cut(handover::CutArgs),
    /// Hand a folder over to its replica: stop hook, final cut, promotion
    /// (epoch + 1), start hook on the replica; rolls back on any failure.
    Failover(handover::HandoverArgs),
    /// Hand a folder back to the old source once it is back as the replica:
    /// the same handover, run on the promoted side.
    Failback(handover::HandoverArgs),
    /// On a standby whose master is dead: take the folder over (epoch past
    /// all seen, start hook, serve as source). Refused while the source is
    /// connected (use failover).
    Promote(promote::PromoteArgs),
    /// List the app profiles (`profile = "NAME"` in a folder): excludes,
    /// databases, overlays and identity files per image layout.
    Profiles(profiles::ProfilesArgs),
    /// Preflight this node for a config's folders: filesystem, xattrs, ACLs,
    /// nanosecond times, inotify limits, free space, trust, PID namespace,
    /// unexcluded caches and logs, the agent and its peer. Each check ok, warn
    /// or fail with a sentence.
    #[command(after_help = doctor::EXIT_CODES)]
    Doctor(doctor::DoctorArgs),
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Keygen(a) => keys::keygen(a),
        Cmd::Id(a) => keys::id(a),
        Cmd::Mirror(a) => transfer::mirror(a),
        Cmd::Push(a) => transfer::push(a),
        Cmd::Verify(a) => verify::verify(a),
        Cmd::Status(a) => status::status(a),
        Cmd::Cut(a) => handover::cut(a),
        Cmd::Failover(a) => handover::failover(a),
        Cmd::Failback(a) => handover::failback(a),
        Cmd::Promote(a) => promote::promote(a),
        Cmd::Profiles(a) => profiles::profiles(a),
        Cmd::Doctor(a) => doctor::doctor(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("UNDERSTUDY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("sync-cli: {e:#}");
            ExitCode::from(2)
        }
    }
}
