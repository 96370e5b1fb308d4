//! The local control socket: one JSON line of status per connection.
//!
//! `sync-cli status --config FILE` connects to `[node] control`, and prints what
//! it reads. The socket is created with mode 0600 (root's tool).

use crate::continuous::FolderStatus;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::AsyncWriteExt;

/// What the agent reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// This node's id.
    pub node: String,
    /// Per folder and peer.
    pub folders: Vec<FolderStatus>,
}

/// The status sources of a running agent.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// This node's id.
    pub node: String,
    /// One per folder.
    pub folders: Vec<Arc<Mutex<FolderStatus>>>,
    /// Replica folders: their last applied times.
    pub replicas: Vec<Arc<crate::session::replica::ReplicaFolder>>,
}

impl Registry {
    /// A snapshot, with lag computed now.
    #[must_use]
    pub fn snapshot(&self) -> Status {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut folders: Vec<FolderStatus> = self
            .folders
            .iter()
            .filter_map(|f| f.lock().ok().map(|s| s.clone()))
            .map(|mut s| {
                if let Some(t) = s.pending_since_unix {
                    s.lag_s = (now - t).max(0.0);
                }
                s
            })
            .collect();
        for r in &self.replicas {
            let last = r.last_applied.lock().ok().and_then(|t| *t);
            folders.push(FolderStatus {
                folder: r.name.clone(),
                role: "replica".into(),
                connected: r.lock.try_lock().is_err(),
                last_applied_unix: last
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_secs_f64()),
                ..Default::default()
            });
        }
        Status {
            node: self.node.clone(),
            folders,
        }
    }
}

/// Serves status on the unix socket `path` until the task is dropped.
pub async fn serve(path: PathBuf, registry: Registry) -> Result<()> {
    let listener = bind(&path)?;
    loop {
        let (mut stream, _) = listener.accept().await.context("control socket")?;
        let line = serde_json::to_string(&registry.snapshot())? + "\n";
        tokio::spawn(async move {
            let _ = stream.write_all(line.as_bytes()).await;
        });
    }
}

fn bind(path: &Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A stale socket from a previous run.
    let _ = std::fs::remove_file(path);
    let l = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("binding control socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

/// Reads one status from a running agent's control socket.
pub async fn query(path: &Path) -> Result<Status> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| {
            format!(
                "connecting to the agent's control socket {} (is sync-agent running?)",
                path.display()
            )
        })?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.context("reading status")?;
    let v: serde_json::Value = serde_json::from_slice(&buf).context("parsing status")?;
    Ok(Status {
        node: v["node"].as_str().unwrap_or_default().to_string(),
        folders: serde_json::from_value(v["folders"].clone()).context("parsing folder status")?,
    })
}
