//! The understudy agent: QUIC transport with pinned mutual TLS, and the sessions
//! that run over it.
//!
//! - [`identity`]: node certificates and their ids.
//! - [`tls`]: QUIC endpoints that accept only pinned peers.
//! - [`session`]: a push (source side) and its application (replica side).
//! - [`push`], [`serve`], [`mirror`]: what the binaries call.
//!
//! `sync-core` does the filesystem work; it is synchronous and called through
//! `spawn_blocking`.

pub mod identity;
pub mod session;
pub mod tls;
mod wire;

pub use identity::{Identity, NodeId};
pub use session::{Progress, Summary};

use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use sync_core::apply::Replica;

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
    /// The protocol version to announce (tests use another to check refusal).
    pub protocol_version: u32,
}

/// Mirrors `opts.src` to a running replica.
pub async fn push(opts: PushOptions, progress: Arc<Progress>) -> Result<Summary> {
    let meta =
        std::fs::metadata(&opts.src).with_context(|| format!("source {}", opts.src.display()))?;
    if !meta.is_dir() {
        bail!("source {} is not a directory", opts.src.display());
    }
    let bind: SocketAddr = if opts.to.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .context("bind address")?;
    let mut endpoint = quinn::Endpoint::client(bind).context("opening a UDP socket")?;
    endpoint.set_default_client_config(tls::client_config(&opts.identity, opts.peer)?);
    let conn = endpoint
        .connect(opts.to, tls::SERVER_NAME)
        .context("starting the connection")?
        .await
        .with_context(|| {
            format!(
                "connecting to replica {} (expected id {})",
                opts.to, opts.peer
            )
        })?;
    let res = session::run_source(conn, opts.src.clone(), progress, opts.protocol_version)
        .await
        .with_context(|| format!("push to replica {}", opts.to));
    endpoint.wait_idle().await;
    res
}

/// Serves pushes into `root` from the pinned peers on `endpoint` until
/// `shutdown` resolves. Sessions run one at a time per root.
pub async fn serve(
    endpoint: quinn::Endpoint,
    root: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let replica = Arc::new(open_replica(&root)?);
    let lock = Arc::new(tokio::sync::Mutex::new(()));
    tokio::pin!(shutdown);
    loop {
        let incoming = tokio::select! {
            () = &mut shutdown => break,
            inc = endpoint.accept() => match inc {
                Some(i) => i,
                None => break,
            },
        };
        let (replica, lock) = (replica.clone(), lock.clone());
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(%remote, "refused a connection: {e}");
                    return;
                }
            };
            let _guard = lock.lock().await;
            if let Err(e) = session::run_replica(conn, replica).await {
                tracing::error!(%remote, "{e:#}");
            }
        });
    }
    endpoint.close(0u32.into(), b"shutdown");
    endpoint.wait_idle().await;
    Ok(())
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

/// The embedded default: mirrors `src` into `dst` with both ends in this process,
/// over QUIC on 127.0.0.1 with throwaway identities.
pub async fn mirror(src: &Path, dst: &Path, progress: Arc<Progress>) -> Result<Summary> {
    std::fs::metadata(src).with_context(|| format!("source {}", src.display()))?;
    // Like rsync, create the destination itself (not its parents) when missing.
    match std::fs::create_dir(dst) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating destination {}", dst.display())),
    }
    let dst_meta =
        std::fs::metadata(dst).with_context(|| format!("destination {}", dst.display()))?;
    if !dst_meta.is_dir() {
        bail!("destination {} is not a directory", dst.display());
    }
    let (source_id, replica_id) = (Identity::generate()?, Identity::generate()?);
    let endpoint = tls::server(
        "127.0.0.1:0".parse().context("loopback")?,
        &replica_id,
        vec![source_id.id()],
    )?;
    let addr = endpoint.local_addr().context("replica address")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let root = dst.to_path_buf();
    let server = tokio::spawn(serve(endpoint, root, async move {
        let _ = stop_rx.await;
    }));
    let res = push(
        PushOptions {
            src: src.to_path_buf(),
            to: addr,
            identity: source_id,
            peer: replica_id.id(),
            protocol_version: proto::PROTOCOL_VERSION,
        },
        progress,
    )
    .await;
    let _ = stop_tx.send(());
    server.await.context("replica task")??;
    res
}
