//! `mirror` and `push`: a one-shot mirror with a progress bar and a summary.

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use sync_agent::{Identity, NodeId, Progress, PushOptions, Summary};

#[derive(Args, Debug)]
pub struct MirrorArgs {
    /// Source directory.
    src: PathBuf,
    /// Destination directory (created if missing, not its parents).
    dst: PathBuf,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Compare files by content hash, not size and mtime (like rsync -c).
    #[arg(long, short = 'c')]
    checksum: bool,
    /// Where the source's file hashes and database cut state, and the
    /// destination's database page tables, are kept between runs, so a
    /// re-run reads only what changed [default: $XDG_CACHE_HOME/understudy,
    /// else ~/.cache/understudy].
    #[arg(long, value_name = "DIR", conflicts_with = "no_state")]
    state_dir: Option<PathBuf>,
    /// Keep nothing between runs: every run reads and hashes the whole tree
    /// and the destination's databases.
    #[arg(long)]
    no_state: bool,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    /// Source directory.
    src: PathBuf,
    /// The replica's address (host:port).
    #[arg(long)]
    to: SocketAddr,
    /// Our identity directory (`sync-cli keygen`).
    #[arg(long)]
    identity: PathBuf,
    /// The replica's node id (pinned: any other certificate is refused).
    #[arg(long)]
    peer: String,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
    /// Compare files by content hash, not size and mtime (like rsync -c).
    #[arg(long, short = 'c')]
    checksum: bool,
    /// Where the source's file hashes and database cut state are kept
    /// between runs, so a re-run reads only what changed [default:
    /// $XDG_CACHE_HOME/understudy, else ~/.cache/understudy].
    #[arg(long, value_name = "DIR", conflicts_with = "no_state")]
    state_dir: Option<PathBuf>,
    /// Keep nothing between runs: every run reads and hashes the whole tree.
    #[arg(long)]
    no_state: bool,
    /// Folder name as the replica knows it.
    #[arg(long, default_value = "default")]
    folder: String,
    /// gitignore-style exclude (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Cap on the bytes/s of content sent, like rsync's --bwlimit but in
    /// bytes/s: 500K, 10M, 1G (K = 1024; at least 256K).
    #[arg(long)]
    bwlimit: Option<sync_agent::bwlimit::ByteRate>,
    /// Announce this protocol version (for testing a mismatch).
    #[arg(long, hide = true, default_value_t = proto::PROTOCOL_VERSION)]
    protocol_version: u32,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Runs `fut` with a progress bar on a terminal.
fn with_progress<F>(json: bool, fut: impl FnOnce(Arc<Progress>) -> F) -> Result<Summary>
where
    F: std::future::Future<Output = Result<Summary>>,
{
    let progress = Arc::new(Progress::default());
    let bar = if !json && std::io::stderr().is_terminal() {
        let b = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("{spinner} {bytes} sent {bytes_per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let rt = runtime()?;
    let res = rt.block_on(async {
        let ticker = bar.clone().map(|b| {
            let p = progress.clone();
            tokio::spawn(async move {
                loop {
                    // Once the scan has the total: a bar with percentage and ETA.
                    let total = p.bytes_total.load(Ordering::Relaxed);
                    if total > 0 && b.length().is_none() {
                        b.set_length(total);
                        b.set_style(bar_style());
                    }
                    b.set_position(p.bytes_done.load(Ordering::Relaxed));
                    b.set_message(format!(
                        "{} files sent, {} entries scanned",
                        p.files_done.load(Ordering::Relaxed),
                        p.entries.load(Ordering::Relaxed)
                    ));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        });
        let r = fut(progress.clone()).await;
        if let Some(t) = ticker {
            t.abort();
        }
        r
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    res
}

/// The bar once the total is known (content bytes of the tree: a first mirror
/// sends all of them, a later one less and ends early).
fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{bar:30} {bytes}/{total_bytes} {percent}% {bytes_per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn report(s: &Summary, json: bool) -> Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string(s)?);
    } else {
        println!(
            "files: {} scanned ({} entries), {} sent, {} deleted, {} metadata-only, {} dirs/links/special made",
            s.files_total,
            s.entries_total,
            s.files_transferred,
            s.files_deleted,
            s.meta_updated,
            s.others_created
        );
        println!(
            "bytes: {} total, {} literal, {} matched, {} on the wire ({} sent, {} received)",
            s.bytes_total,
            s.bytes_literal,
            s.bytes_matched,
            s.bytes_sent_wire + s.bytes_received_wire,
            s.bytes_sent_wire,
            s.bytes_received_wire
        );
        println!(
            "elapsed: {:.3} s (scan {:.3} s); source root {}",
            s.elapsed_s, s.scan_s, s.source_root
        );
    }
    for w in &s.warnings {
        eprintln!("sync-cli: not preserved: {w}");
    }
    Ok(if s.warnings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// The state directory a run uses (`None`: none).
fn state_dir(given: &Option<PathBuf>, none: bool) -> Option<PathBuf> {
    if none {
        return None;
    }
    given.clone().or_else(sync_agent::push_state::default_dir)
}

pub fn mirror(a: MirrorArgs) -> Result<ExitCode> {
    let (src, dst) = (a.src.clone(), a.dst.clone());
    let state = state_dir(&a.state_dir, a.no_state);
    let s = with_progress(a.json, |p| async move {
        sync_agent::mirror_with(&src, &dst, a.checksum, state, p).await
    })
    .with_context(|| format!("mirror {} -> {}", a.src.display(), a.dst.display()))?;
    report(&s, a.json)
}

pub fn push(a: PushArgs) -> Result<ExitCode> {
    let peer: NodeId = a.peer.parse().context("--peer")?;
    let opts = PushOptions {
        src: a.src.clone(),
        to: a.to,
        identity: Identity::load(&a.identity)?,
        peer,
        folder: a.folder.clone(),
        filter: sync_core::filter::Filter::new(&a.exclude)?,
        protocol_version: a.protocol_version,
        checksum: a.checksum,
        state: state_dir(&a.state_dir, a.no_state),
        bwlimit: a.bwlimit,
    };
    let s = with_progress(a.json, |p| sync_agent::push(opts, p))?;
    report(&s, a.json)
}
