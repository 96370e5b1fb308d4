//! The agent's plan: what one process runs, from a config file or from the
//! flags of a one-folder run.

use crate::Identity;
use crate::config::{Config, Role};
use crate::continuous::SourceFolder;
use crate::session::replica::{Fence, ReplicaFolder};
use anyhow::{Context, Result, bail};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use sync_core::filter::Filter;

/// Everything one agent process runs.
#[derive(Debug, Default)]
pub struct Plan {
    pub identity: Option<Identity>,
    pub listen: Option<SocketAddr>,
    pub folders: Vec<FolderPlan>,
    pub control: Option<PathBuf>,
    pub surface: crate::surface::Settings,
}

/// One folder: the replica side (served when this node is not its source), the
/// source loops (one per peer, run while it is), and its fencing state.
#[derive(Debug)]
pub struct FolderPlan {
    pub name: String,
    pub replica: Option<Arc<ReplicaFolder>>,
    pub sources: Vec<SourceFolder>,
    pub fence: Fence,
    pub state_dir: Option<PathBuf>,
    /// Hooks, run by handovers.
    pub hooks: crate::config::Hooks,
    /// The configured role (the epoch file, when present, wins).
    pub configured: Role,
}

pub fn plan_from_config(path: &Path) -> Result<Plan> {
    let c = Config::load(path)?;
    let identity = Identity::load(&c.node.identity)?;
    let mut plan = Plan {
        listen: c.node.listen,
        control: c.node.control.clone(),
        surface: crate::surface::Settings::from_config(&c)?,
        ..Default::default()
    };
    for f in &c.folders {
        let filter = f.filter()?;
        let peers = f.peer_ids()?;
        let sqlite = Filter::new(&f.sqlite_globs()?)
            .with_context(|| format!("folder {}: sqlite", f.name))?;
        crate::config::profiles::advise(f, &filter);
        // The persisted fencing state wins over the configured role: a failover
        // may have swapped them.
        let persisted = match &c.node.state {
            Some(dir) => crate::epoch::load(dir, &f.name)?,
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
            Some(_) => Some(crate::replica_folder_with(
                &f.name,
                &f.path,
                filter.clone(),
                peers.clone(),
                crate::ReplicaSettings {
                    sqlite: sqlite.clone(),
                    state_dir: c.node.state.clone(),
                    node: identity.id().to_string(),
                    hooks: f.hooks.clone(),
                    fence,
                    promotable: f.failover
                        && !peers.is_empty()
                        && peers.iter().all(|p| c.peer_address(p).is_some()),
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
