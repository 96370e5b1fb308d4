//! The understudy agent: QUIC transport with pinned mutual TLS, and the sessions
//! that run over it.
//!
//! - [`identity`]: node certificates and their ids.
//! - [`tls`]: QUIC endpoints that accept only pinned peers, on [`udp`]'s
//!   sockets.
//! - [`session`]: rounds, source side and replica side.
//! - [`continuous`]: the source's watch loop, with reconnect and resume.
//! - [`config`]: the TOML configuration.
//! - [`control`]: the local control socket (`sync-cli status`).
//! - [`lag`]: the age of the oldest unapplied change, and the health check.
//! - [`surface`]: the operator's surface: [`http`] (`/health`, `/metrics`
//!   from [`metrics`], the [`page`]) and [`alerts`] (webhooks).
//! - [`push`], [`accept_sessions`], [`mirror`]: one-shot entry points.
//!
//! `sync-core` does the filesystem work; it is synchronous and called through
//! `spawn_blocking`.

pub mod addr;
pub mod alerts;
pub mod bwlimit;
pub mod config;
pub mod continuous;
pub mod control;
pub mod diverged;
pub mod epoch;
pub mod folder;
pub mod handover;
pub mod hooks;
pub mod http;
pub mod identity;
mod index_save;
pub mod lag;
pub mod limits;
pub mod metrics;
pub mod page;
pub mod plan;
pub mod promotion;
mod push_scan;
pub mod push_state;
pub mod session;
pub mod surface;
pub mod tls;
pub mod tree_watch;
pub mod trust;
pub mod udp;
pub mod watch_limit;
mod wire;

pub use identity::{Identity, NodeId};
pub use session::{Progress, Summary};

use anyhow::{Context, Result, bail};
use session::replica::{Folders, ReplicaFolder};
use session::source::{Round, SourceSession};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use sync_core::apply::Replica;
use sync_core::filter::Filter;
use sync_core::sqlite::LiveSet;

/// How long a cut waits for a database's writer to finish its transaction.
pub const DB_BUSY: std::time::Duration = std::time::Duration::from_secs(5);

/// How to push a tree to a replica.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// The tree to mirror.
    pub src: PathBuf,
    /// The replica's address.
    pub to: SocketAddr,
    /// Our identity.
    pub identity: Identity,
    /// The replica's pinned id.
    pub peer: NodeId,
    /// The folder name announced to the replica.
    pub folder: String,
    /// Excluded paths.
    pub filter: Filter,
    /// The protocol version to announce (tests use another to check refusal).
    pub protocol_version: u32,
    /// Compare files by content hash rather than size and mtime (rsync -c).
    pub checksum: bool,
    /// Where the source's hash index and cut state are kept between runs
    /// (`None`: every run reads the whole tree).
    pub state: Option<PathBuf>,
    /// Cap on the content streams' bytes/s (`--bwlimit`).
    pub bwlimit: Option<bwlimit::ByteRate>,
}

/// Connects to a pinned replica.
pub async fn connect(
    identity: &Identity,
    peer: NodeId,
    to: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .context("bind address")?;
    // the route to the replica says how large datagrams may grow
    let datagrams = udp::Datagrams::to(to);
    let mut endpoint = udp::endpoint(bind, None, datagrams)?;
    let (config, presented) = tls::client_config_noting(identity, peer, datagrams)?;
    endpoint.set_default_client_config(config);
    let conn = match endpoint
        .connect(to, tls::SERVER_NAME)
        .context("starting the connection")?
        .await
    {
        Ok(c) => c,
        Err(e) => {
            if let Some(other) = presented.lock().ok().and_then(|g| *g) {
                bail!(
                    "replica {to} presented id {other}, expected {peer}: the peer id in the \
                     config (or --peer) is not that replica's (`sync-cli id --dir IDENTITY` \
                     on it prints its id)"
                );
            }
            return Err(e)
                .with_context(|| format!("connecting to replica {to} (expected id {peer})"));
        }
    };
    Ok((endpoint, conn))
}

/// A push's saved state, if it keeps one, with its hash index loading on
/// another thread (while the connection is made).
type Loading = (
    Option<push_state::PushState>,
    Option<tokio::task::JoinHandle<sync_core::index::HashIndex>>,
);

fn load_state(opts: &PushOptions) -> Result<Loading> {
    let keep = match &opts.state {
        Some(dir) => Some(push_state::PushState::new(dir, &opts.src)?),
        None => None,
    };
    let index = keep
        .clone()
        .map(|k| tokio::task::spawn_blocking(move || k.index()));
    Ok((keep, index))
}

/// What a push's scan gives: the manifest, the bytes it read to hash, the
/// databases' cut, the root hash and the quick digest, and the hash index
/// being saved.
type Scanned = (
    sync_core::Manifest,
    u64,
    Arc<std::sync::Mutex<LiveSet>>,
    [u8; 32],
    [u8; 32],
    Option<tokio::task::JoinHandle<Result<()>>>,
);

/// Scans `opts.src` and cuts its databases (shipped from a consistent cut,
/// never as raw files), with the root hash and the quick digest over every
/// entry at once; what the scan freed goes back to the system.
async fn scan_source(
    opts: &PushOptions,
    saved: Option<push_state::PushState>,
    index: Option<sync_core::index::HashIndex>,
) -> Result<Scanned> {
    let (src, filter) = (opts.src.clone(), opts.filter.clone());
    let scanned = tokio::task::spawn_blocking(move || {
        push_scan::scan_and_cut(&src, filter, saved.as_ref(), index).map(
            |(m, report, live, saving)| {
                let t0 = Instant::now();
                let (root, quick) = sync_core::digest::root_and_quick(&m);
                tracing::debug!(ms = t0.elapsed().as_millis(), "root hash and quick digest");
                (m, report.bytes_hashed, live, root, quick, saving)
            },
        )
    })
    .await?
    .with_context(|| format!("scanning {}", opts.src.display()))?;
    let t0 = Instant::now();
    sync_core::trim_heap();
    tracing::debug!(ms = t0.elapsed().as_millis(), "heap trimmed");
    Ok(scanned)
}

/// Mirrors `opts.src` to a running replica: one full round.
pub async fn push(opts: PushOptions, progress: Arc<Progress>) -> Result<Summary> {
    let started = Instant::now();
    let meta =
        std::fs::metadata(&opts.src).with_context(|| format!("source {}", opts.src.display()))?;
    if !meta.is_dir() {
        bail!("source {} is not a directory", opts.src.display());
    }
    let (keep, index) = load_state(&opts)?;
    let (endpoint, conn) = connect(&opts.identity, opts.peer, opts.to).await?;
    let res = async {
        let mut session = SourceSession::open(
            conn.clone(),
            opts.src.clone(),
            &opts.folder,
            opts.protocol_version,
            0,
            progress.clone(),
        )
        .await?
        .with_bwlimit(opts.bwlimit);
        let index = match index {
            Some(task) => Some(task.await?),
            None => None,
        };
        let scan_began = sync_core::scan::now_ns();
        let (manifest, bytes_hashed, live, root_hash, quick, saving) =
            scan_source(&opts, keep.clone(), index).await?;
        let scan_s = started.elapsed().as_secs_f64();
        progress
            .entries
            .store(manifest.entries.len() as u64, Ordering::Relaxed);
        progress
            .bytes_total
            .store(manifest.bytes_total(), Ordering::Relaxed);
        let (files_total, bytes_total, entries_total) = (
            manifest.files() as u64,
            manifest.bytes_total(),
            manifest.entries.len() as u64,
        );
        let round = Round {
            full: true,
            entries: Arc::new(manifest.entries),
            root_hash,
            checksum: opts.checksum,
            live: Some(live),
            quick_digest: Some(quick),
            scan_began: Some(scan_began),
            ..Default::default()
        };
        let applied = session.round(&round).await?;
        if let (Some(state), Some(live)) = (&keep, &round.live) {
            keep_cut(state, live);
        }
        if let Some(saving) = saving {
            index_save::index_saved("push", saving).await;
        }
        let stats = session.connection().stats();
        note_wire(&stats);
        let unchanged = session.last_round_same();
        let peer_closed = session.close().await;
        let summary = Summary {
            entries_total,
            files_total,
            files_transferred: applied.files_transferred,
            files_deleted: applied.entries_deleted,
            meta_updated: applied.meta_updated,
            others_created: applied.others_created,
            bytes_total,
            bytes_literal: applied.bytes_literal,
            bytes_matched: applied.bytes_matched,
            bytes_sent_wire: stats.udp_tx.bytes,
            bytes_received_wire: stats.udp_rx.bytes,
            elapsed_s: started.elapsed().as_secs_f64(),
            scan_s,
            bytes_hashed,
            source_root: sync_core::hex(&root_hash),
            unchanged,
            warnings: applied.warnings,
        };
        Ok::<_, anyhow::Error>((summary, peer_closed))
    }
    .await
    .with_context(|| format!("push to replica {}", opts.to));
    // The replica closes a session it finished; then there is nothing left to
    // deliver and the connection's draining period (three probe timeouts) is
    // not waited out. Closed from this side, the close is seen delivered.
    let peer_closed = matches!(res, Ok((_, true)));
    let res = res.map(|(summary, _)| summary);
    conn.close(0u32.into(), b"done");
    if !peer_closed {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), endpoint.wait_idle()).await;
    }
    res
}

/// The replica holds the pushed cut now: saved, so the next run sends it
/// only what changes.
/// How the push's datagrams went (their size, how many, in how many writes).
fn note_wire(stats: &quinn::ConnectionStats) {
    tracing::debug!(
        mtu = stats.path.current_mtu,
        datagrams = stats.udp_tx.datagrams,
        ios = stats.udp_tx.ios,
        "wire of the push"
    );
}

fn keep_cut(state: &push_state::PushState, live: &std::sync::Mutex<LiveSet>) {
    let saved = live
        .lock()
        .map_err(|_| anyhow::anyhow!("live database set poisoned"))
        .and_then(|mut l| {
            l.end_round();
            state.save(&l)
        });
    if let Err(e) = saved {
        tracing::warn!("{e:#}: the next push reads every database again");
    }
}

/// Opens and checks a replica root.
pub fn open_replica(root: &Path) -> Result<Replica> {
    let meta =
        std::fs::metadata(root).with_context(|| format!("replica root {}", root.display()))?;
    if !meta.is_dir() {
        bail!("replica root {} is not a directory", root.display());
    }
    Ok(Replica::open(root)?)
}

/// A replica folder ready to serve.
pub fn replica_folder(
    name: &str,
    root: &Path,
    filter: Filter,
    allowed: Vec<NodeId>,
) -> Result<Arc<ReplicaFolder>> {
    replica_folder_with(name, root, filter, allowed, ReplicaSettings::default())
}

/// What a configured replica folder adds to [`replica_folder`].
#[derive(Debug, Default)]
pub struct ReplicaSettings {
    /// Database globs (headers are recognised anyway).
    pub sqlite: Filter,
    /// Where the fencing epoch is persisted.
    pub state_dir: Option<PathBuf>,
    /// This node's id.
    pub node: String,
    /// The folder's hooks.
    pub hooks: config::Hooks,
    /// The persisted fencing state.
    pub fence: session::replica::Fence,
    /// Whether this node can serve as the folder's source once promoted.
    pub promotable: bool,
    /// The folder's `uid_map`/`gid_map` (the source's ids to this host's).
    pub ids: sync_core::idmap::IdMap,
    /// What full rounds do with excluded leftovers (`delete_excluded`).
    pub sweep: sync_core::engine::Sweep,
}

/// [`replica_folder`] with database globs, fencing state and hooks.
pub fn replica_folder_with(
    name: &str,
    root: &Path,
    filter: Filter,
    allowed: Vec<NodeId>,
    settings: ReplicaSettings,
) -> Result<Arc<ReplicaFolder>> {
    let replica = open_replica(root)?;
    if let Some(dir) = &settings.state_dir {
        replica.keep_tables_in(session::replica_tables::file(dir, name));
        replica.load_tables();
    }
    Ok(Arc::new(ReplicaFolder {
        name: name.to_string(),
        replica: Arc::new(replica),
        filter,
        allowed,
        lock: tokio::sync::Mutex::new(()),
        last_applied: std::sync::Mutex::new(None),
        current: std::sync::Mutex::new(None),
        detect: Arc::new(sync_core::scan::DbDetect {
            globs: settings.sqlite,
            ..Default::default()
        }),
        fence: std::sync::Mutex::new(settings.fence),
        node: settings.node,
        hooks: settings.hooks,
        promoted: tokio::sync::Notify::new(),
        last_warning: std::sync::Mutex::new(None),
        activity: Default::default(),
        stats: std::sync::Mutex::default(),
        stages: std::sync::Mutex::default(),
        promotable: settings.promotable,
        ids: settings.ids,
        sweep: settings.sweep,
        scan_index: std::sync::Mutex::new(sync_core::index::HashIndex::in_memory()),
        ahead: Default::default(),
        diverged: std::sync::Mutex::new(
            settings
                .state_dir
                .as_deref()
                .and_then(|d| diverged::latest(d, name)),
        ),
        state_dir: settings.state_dir,
    }))
}

/// Accepts sessions from the pinned peers on `endpoint` until `shutdown`
/// resolves.
pub async fn accept_sessions(
    endpoint: quinn::Endpoint,
    folders: Arc<Folders>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    tokio::pin!(shutdown);
    let slots = Arc::new(limits::Connections::default());
    loop {
        let incoming = tokio::select! {
            () = &mut shutdown => break,
            inc = endpoint.accept() => match inc {
                Some(i) => i,
                None => break,
            },
        };
        let (folders, slots) = (folders.clone(), slots.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, "refused a connection: {e}");
                    return;
                }
            };
            // Authenticated: a slot in all and for this peer, or closed now.
            let peer = tls::peer_id(&conn);
            let _slot = match slots.admit(peer) {
                Ok(s) => s,
                Err(why) => {
                    let shown = peer.map_or_else(|| "unknown".to_string(), |p| p.to_string());
                    tracing::warn!(%remote, peer = %shown, "refused a connection: {why}");
                    conn.close(limits::REFUSED_CODE.into(), why.as_bytes());
                    return;
                }
            };
            if let Err(e) = session::replica::run(conn, folders).await {
                tracing::error!(%remote, "{e:#}");
            }
        });
    }
    endpoint.close(0u32.into(), b"shutdown");
    endpoint.wait_idle().await;
    Ok(())
}

/// The embedded default: mirrors `src` into `dst` with both ends in this process,
/// over QUIC on 127.0.0.1 with throwaway identities.
pub async fn mirror(src: &Path, dst: &Path, progress: Arc<Progress>) -> Result<Summary> {
    mirror_with(src, dst, false, None, progress).await
}

/// [`mirror`], comparing files by content hash when `checksum` (rsync -c).
pub async fn mirror_with(
    src: &Path,
    dst: &Path,
    checksum: bool,
    state: Option<PathBuf>,
    progress: Arc<Progress>,
) -> Result<Summary> {
    std::fs::metadata(src).with_context(|| format!("source {}", src.display()))?;
    // Like rsync, create the destination itself (not its parents) when missing.
    match std::fs::create_dir(dst) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating destination {}", dst.display())),
    }
    let (source_id, replica_id) = (Identity::generate()?, Identity::generate()?);
    let endpoint = tls::server(
        "127.0.0.1:0".parse().context("loopback")?,
        &replica_id,
        vec![source_id.id()],
    )?;
    let addr = endpoint.local_addr().context("replica address")?;
    let folder = replica_folder("default", dst, Filter::default(), Vec::new())?;
    // The destination's page tables are kept beside the source's state
    // (read by the replica's scan, while the source scans).
    if let Some(dir) = &state {
        let file = session::replica_tables::mirror_file(dir, dst)?;
        folder.replica.keep_tables_in(file);
    }
    let replica = folder.replica.clone();
    let folders: Folders = HashMap::from([("default".to_string(), folder)]);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(accept_sessions(endpoint, Arc::new(folders), async move {
        let _ = stop_rx.await;
    }));
    let res = push(
        PushOptions {
            src: src.to_path_buf(),
            to: addr,
            identity: source_id,
            peer: replica_id.id(),
            folder: "default".into(),
            filter: Filter::default(),
            protocol_version: proto::PROTOCOL_VERSION,
            checksum,
            state,
            bwlimit: None,
        },
        progress,
    )
    .await;
    let _ = stop_tx.send(());
    server.await.context("replica task")??;
    session::replica_tables::save(replica).await;
    res
}
