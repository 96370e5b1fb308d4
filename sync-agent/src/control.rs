//! The local control socket: one JSON request line, one JSON answer line.
//!
//! Requests: `{"cmd":"status"}` (also what a client that sends nothing gets),
//! `{"cmd":"cut","folder":NAME}` (a consistent cut, verified by both root
//! hashes: [`CutReport`]), `{"cmd":"promote","folder":NAME,"epoch":N}` (hand the
//! folder over to its replica; this node becomes the replica),
//! `{"cmd":"promote_standby","folder":NAME}` (this standby takes the folder
//! over while its source is gone: [`crate::promotion::promote_standby`]),
//! `{"cmd":"handover","folder":NAME,"kind":"failover"|"failback","dry_run":B,"ignore_parity":B}`
//! (the agent runs a whole handover on its own task and answers at once:
//! [`crate::handover`]) and `{"cmd":"handover_progress","folder":NAME,"from":N}`
//! (its progress lines from the N-th on, and its outcome once over).
//! `sync-cli status`, `cut`, `failover`, `failback` and `promote` use it. The
//! socket is created with mode 0600 (root's tool).

use crate::continuous::{Command, CutReport, FolderStatus};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt};

/// What a client asks.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The status of every folder.
    Status,
    /// A consistent cut of a source folder.
    Cut {
        /// The folder (optional when the agent has one).
        folder: Option<String>,
    },
    /// Promote the folder's replica to `epoch`.
    Promote {
        /// The folder (optional when the agent has one).
        folder: Option<String>,
        /// The new epoch.
        epoch: u64,
    },
    /// `sync-cli promote`: this standby takes the folder over (its source is
    /// gone), at the epoch past every epoch it has seen.
    #[serde(rename = "promote_standby")]
    PromoteStandby {
        /// The folder (optional when the agent has one).
        folder: Option<String>,
    },
    /// Run a handover (failover or failback) of a source folder on the agent.
    Handover {
        /// The folder (optional when the agent has one).
        folder: Option<String>,
        /// `failover` or `failback`.
        kind: String,
        /// Only the preflight and the plan.
        #[serde(default)]
        dry_run: bool,
        /// Go on even when the `parity` outputs differ (logged).
        #[serde(default)]
        ignore_parity: bool,
    },
    /// The progress of the current or last handover of a folder.
    HandoverProgress {
        /// The folder (optional when the agent has one).
        folder: Option<String>,
        /// The first progress line wanted.
        #[serde(default)]
        from: usize,
    },
}

/// The answer to a cut, a promotion or a handover request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Answer {
    /// Whether it succeeded.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The cut, for a cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutReport>,
    /// The epoch reached, for `promote_standby`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// A handover's progress (for `handover` and `handover_progress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<crate::handover::Progress>,
}

/// What the agent reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// This node's id.
    pub node: String,
    /// The agent's version.
    pub version: String,
    /// The protocol version it speaks.
    pub protocol: u32,
    /// Per folder and peer.
    pub folders: Vec<FolderStatus>,
    /// Handovers in progress on this node (their lines left out).
    #[serde(default)]
    pub handovers: Vec<crate::handover::Progress>,
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
    /// Commands to each folder's source loop, by folder name.
    pub commands: std::collections::HashMap<String, tokio::sync::mpsc::Sender<Command>>,
    /// Each folder's handover context, by folder name.
    pub handovers: std::collections::HashMap<String, Arc<crate::handover::Folder>>,
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
            .map(|s| source_row(s, now))
            .collect();
        // A folder shows in the role it plays now (a failover may swap them).
        let fence = |name: &str| {
            self.replicas
                .iter()
                .find(|r| r.name == name)
                .and_then(|r| r.fence.lock().ok().map(|g| *g))
        };
        folders.retain(|s| fence(&s.folder).is_none_or(|f| f.source));
        for r in &self.replicas {
            let f = r.fence.lock().map(|g| *g).unwrap_or_default();
            if f.source {
                continue;
            }
            folders.push(replica_row(r, f, now));
        }
        let mut handovers: Vec<crate::handover::Progress> = self
            .handovers
            .values()
            .map(|h| h.progress(usize::MAX))
            .filter(|p| p.running)
            .collect();
        handovers.sort_by(|a, b| a.folder.cmp(&b.folder));
        Status {
            node: self.node.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            protocol: proto::PROTOCOL_VERSION,
            folders,
            handovers,
        }
    }
}

/// A source folder's row at `now`: its lag is the age of the oldest unapplied
/// change, whatever the loop is doing; a full round shows its live counters.
fn source_row(mut s: FolderStatus, now: f64) -> FolderStatus {
    use std::sync::atomic::Ordering::Relaxed;
    s.lag_s = s.pending_since_unix.map_or(0.0, |t| (now - t).max(0.0));
    if let (Some(f), Some(p)) = (&mut s.full_round, &s.progress) {
        f.entries_sent = p.entries_sent.load(Relaxed);
        f.bytes_sent = p.bytes_done.load(Relaxed);
        f.files_sent = p.files_done.load(Relaxed);
    }
    s
}

/// A replica folder's row at `now`.
fn replica_row(
    r: &crate::session::replica::ReplicaFolder,
    f: crate::session::replica::Fence,
    now: f64,
) -> FolderStatus {
    let last = r
        .last_applied
        .lock()
        .ok()
        .and_then(|t| *t)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64());
    let stats = r.stats.lock().map(|g| g.clone()).unwrap_or_default();
    let peer = r
        .current
        .lock()
        .ok()
        .and_then(|c| c.as_ref().and_then(|(p, _)| *p))
        .map(|p| p.to_string())
        .unwrap_or_default();
    FolderStatus {
        folder: r.name.clone(),
        role: "replica".into(),
        peer,
        epoch: f.epoch,
        source_epoch: stats.source_epoch,
        rounds: stats.rounds,
        full_rounds: stats.full_rounds,
        excluded_leftovers: stats
            .leftovers
            .map(|l| crate::continuous::ExcludedLeftovers {
                count: l.count,
                first: l.first.iter().map(ToString::to_string).collect(),
                swept: l.swept,
            }),
        held_databases: stats.held,
        last_error: r.last_warning.lock().ok().and_then(|w| w.clone()),
        connected: r.lock.try_lock().is_err(),
        last_applied_unix: last,
        last_applied_age_s: last.map(|t| (now - t).max(0.0)),
        diverged: r
            .diverged
            .lock()
            .ok()
            .and_then(|d| d.as_ref().map(|p| p.display().to_string())),
        ..Default::default()
    }
}

/// Answers commands on the unix socket `path` on a task of its own; an error is logged.
pub fn spawn(path: PathBuf, registry: Registry) {
    tokio::spawn(async move {
        if let Err(e) = listen(path, registry).await {
            tracing::error!("control socket: {e:#}");
        }
    });
}

/// Answers commands on the unix socket `path` until the task is dropped.
pub async fn listen(path: PathBuf, registry: Registry) -> Result<()> {
    let listener = bind(&path)?;
    let registry = Arc::new(registry);
    loop {
        let (stream, _) = listener.accept().await.context("control socket")?;
        let reg = registry.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut line = String::new();
            let mut rd = tokio::io::BufReader::new(rd.take(64 << 10));
            let req = match tokio::time::timeout(
                std::time::Duration::from_secs(2),
                rd.read_line(&mut line),
            )
            .await
            {
                Ok(Ok(n)) if n > 0 => serde_json::from_str::<Request>(line.trim()),
                _ => Ok(Request::Status),
            };
            let out = match req {
                Ok(Request::Status) => serde_json::to_string(&reg.snapshot()),
                Ok(r) => serde_json::to_string(&reg.command(r).await),
                Err(e) => serde_json::to_string(&Answer {
                    ok: false,
                    error: Some(format!("bad request: {e}")),
                    ..Default::default()
                }),
            };
            if let Ok(line) = out {
                let _ = wr.write_all((line + "\n").as_bytes()).await;
            }
        });
    }
}

impl Registry {
    fn folder(&self, name: Option<String>) -> Result<(String, tokio::sync::mpsc::Sender<Command>)> {
        match name {
            Some(n) => self
                .commands
                .get(&n)
                .map(|c| (n.clone(), c.clone()))
                .ok_or_else(|| anyhow!("this agent runs no folder named {n:?}")),
            None if self.commands.len() == 1 => self
                .commands
                .iter()
                .next()
                .map(|(n, c)| (n.clone(), c.clone()))
                .ok_or_else(|| anyhow!("no folder")),
            None => {
                let mut names: Vec<&String> = self.commands.keys().collect();
                names.sort();
                bail!("this agent runs several folders ({names:?}): say which with --folder")
            }
        }
    }

    fn replica(&self, name: Option<String>) -> Result<Arc<crate::session::replica::ReplicaFolder>> {
        let pick = |n: &str| self.replicas.iter().find(|r| r.name == n).cloned();
        match name {
            Some(n) => pick(&n).ok_or_else(|| {
                anyhow!("this agent serves no folder named {n:?} as a replica ([node] listen set?)")
            }),
            None => match self.replicas.as_slice() {
                [r] => Ok(r.clone()),
                [] => bail!("this agent serves no replica folder ([node] listen is not set)"),
                _ => bail!("this agent serves several folders: say which with --folder"),
            },
        }
    }

    fn handover(&self, name: Option<String>) -> Result<Arc<crate::handover::Folder>> {
        let (name, _) = self.folder(name)?;
        self.handovers.get(&name).cloned().ok_or_else(|| {
            anyhow!("folder {name}: no handovers on this agent (run it from a config)")
        })
    }

    async fn command(&self, r: Request) -> Answer {
        let fail = |e: anyhow::Error| Answer {
            ok: false,
            error: Some(format!("{e:#}")),
            ..Default::default()
        };
        let res: Result<Answer> = async {
            match r {
                Request::Status => bail!("status is not a command"),
                Request::Cut { folder } => {
                    let (name, tx) = self.folder(folder)?;
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    tx.send(Command::Cut(reply))
                        .await
                        .map_err(|_| anyhow!("folder {name}: not running"))?;
                    let cut = rx
                        .await
                        .map_err(|_| anyhow!("folder {name}: the session ended during the cut"))?
                        .map_err(|e| anyhow!("folder {name}: {e}"))?;
                    Ok(Answer {
                        ok: cut.matched,
                        error: (!cut.matched).then(|| {
                            format!(
                                "root hashes differ: source {} replica {}",
                                cut.source_root, cut.replica_root
                            )
                        }),
                        cut: Some(cut),
                        ..Default::default()
                    })
                }
                Request::Promote { folder, epoch } => {
                    let (name, tx) = self.folder(folder)?;
                    let (reply, rx) = tokio::sync::oneshot::channel();
                    tx.send(Command::Promote { epoch, reply })
                        .await
                        .map_err(|_| anyhow!("folder {name}: not running"))?;
                    rx.await
                        .map_err(|_| {
                            anyhow!("folder {name}: the session ended during the promotion")
                        })?
                        .map_err(|e| anyhow!("folder {name}: {e}"))?;
                    Ok(Answer {
                        ok: true,
                        epoch: Some(epoch),
                        ..Default::default()
                    })
                }
                Request::PromoteStandby { folder } => {
                    let f = self.replica(folder)?;
                    let epoch = crate::promotion::promote_standby(&f).await?;
                    Ok(Answer {
                        ok: true,
                        epoch: Some(epoch),
                        ..Default::default()
                    })
                }
                Request::Handover {
                    folder,
                    kind,
                    dry_run,
                    ignore_parity,
                } => {
                    let h = self.handover(folder)?;
                    let kind: crate::handover::Kind =
                        kind.parse().map_err(|e: String| anyhow!(e))?;
                    crate::handover::start(&h, kind, dry_run, ignore_parity)?;
                    Ok(Answer {
                        ok: true,
                        handover: Some(h.progress(0)),
                        ..Default::default()
                    })
                }
                Request::HandoverProgress { folder, from } => {
                    let h = self.handover(folder)?;
                    Ok(Answer {
                        ok: true,
                        handover: Some(h.progress(from)),
                        ..Default::default()
                    })
                }
            }
        }
        .await;
        res.unwrap_or_else(fail)
    }
}

/// Sends one request to a running agent and returns its answer line.
pub async fn request(path: &Path, req: &Request) -> Result<serde_json::Value> {
    use tokio::io::AsyncReadExt;
    let mut s = tokio::net::UnixStream::connect(path)
        .await
        .with_context(|| {
            format!(
                "connecting to the agent's control socket {} (is sync-agent running?)",
                path.display()
            )
        })?;
    s.write_all((serde_json::to_string(req)? + "\n").as_bytes())
        .await
        .context("sending the request")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .await
        .context("reading the answer")?;
    serde_json::from_slice(&buf).context("parsing the agent's answer")
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
    let v = request(path, &Request::Status).await?;
    Ok(Status {
        node: v["node"].as_str().unwrap_or_default().to_string(),
        version: v["version"].as_str().unwrap_or_default().to_string(),
        protocol: v["protocol"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .unwrap_or_default(),
        folders: serde_json::from_value(v["folders"].clone()).context("parsing folder status")?,
        handovers: match v.get("handovers") {
            Some(h) => serde_json::from_value(h.clone()).context("parsing handover status")?,
            None => Vec::new(),
        },
    })
}
