//! The agent's plan: what one process runs, from a config file or from the
//! flags of a one-folder run.

use crate::config::{Config, Role};
use crate::continuous::SourceFolder;
use crate::session::replica::{Fence, ReplicaFolder};
use crate::{Identity, NodeId};
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
                bwlimit: f.bwlimit.or(c.peer_bwlimit(&peer)),
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

/// The flags of `sync-agent source`: one folder, watched and shipped.
#[derive(clap::Args, Debug)]
pub struct SourceFlags {
    /// The folder to keep.
    #[arg(long)]
    pub root: PathBuf,
    /// The replica's address (host:port).
    #[arg(long)]
    pub connect: SocketAddr,
    /// Directory with this node's cert.pem and key.pem (`sync-cli keygen`).
    #[arg(long)]
    pub identity: PathBuf,
    /// The replica's node id.
    #[arg(long)]
    pub peer: String,
    /// Folder name as the replica knows it.
    #[arg(long, default_value = "default")]
    pub folder: String,
    /// gitignore-style exclude (repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// State directory for the hash index (default: in memory).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Control socket for `sync-cli status`.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Quiet time that ends a batch of changes, in ms.
    #[arg(long, default_value_t = 5)]
    pub debounce_ms: u64,
    /// Seconds between safety full rescans.
    #[arg(long, default_value_t = 600)]
    pub rescan_s: u64,
    /// Cap on the bytes/s of content sent to the replica, like rsync's
    /// --bwlimit but in bytes/s: 500K, 10M, 1G (K = 1024; at least 256K).
    #[arg(long)]
    pub bwlimit: Option<crate::bwlimit::ByteRate>,
}

/// The flags of `sync-agent replica`: one folder, served.
#[derive(clap::Args, Debug)]
pub struct ReplicaFlags {
    /// The replica root (must exist).
    #[arg(long)]
    pub root: PathBuf,
    /// Address to listen on (UDP), e.g. 0.0.0.0:7878.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory with this node's cert.pem and key.pem (`sync-cli keygen`).
    #[arg(long)]
    pub identity: PathBuf,
    /// Node ids allowed to push, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub allow: Vec<String>,
    /// gitignore-style exclude (repeatable): neither written nor deleted.
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Control socket for `sync-cli status`.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Where the replica keeps its databases' page tables between runs
    /// (`default.pages`): a restarted agent does not read and hash its
    /// databases again before its first round.
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
}

fn parse_ids(ids: &[String], what: &str) -> Result<Vec<NodeId>> {
    ids.iter()
        .map(|s| s.parse::<NodeId>().with_context(|| format!("{what} {s}")))
        .collect()
}

/// The plan of `sync-agent replica`: one folder named `default`, served.
pub fn from_replica_flags(flags: ReplicaFlags) -> Result<Plan> {
    let ReplicaFlags {
        root,
        listen,
        identity,
        allow,
        exclude,
        control,
        state,
    } = flags;
    let identity = Identity::load(&identity)?;
    let allowed = parse_ids(&allow, "--allow")?;
    let filter = Filter::new(&exclude)?;
    let replica = crate::replica_folder("default", &root, filter, allowed)?;
    if let Some(s) = state {
        crate::trust::check_dir_or_parent(&s, crate::trust::Kind::StateDir)?;
        let tables = crate::session::replica_tables::file(&s, "default");
        replica.replica.keep_tables_in(tables);
        replica.replica.load_tables();
    }
    Ok(Plan {
        identity: Some(identity),
        listen: Some(listen),
        folders: vec![FolderPlan {
            name: "default".into(),
            replica: Some(replica),
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

/// The plan of `sync-agent source`: one folder, watched and shipped to one peer.
pub fn from_source_flags(flags: SourceFlags) -> Result<Plan> {
    let SourceFlags {
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
        bwlimit,
    } = flags;
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
            crate::trust::check_dir_or_parent(&s, crate::trust::Kind::StateDir)?;
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
                bwlimit,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A node identity, a folder and a config naming one peer, in `d`.
    fn config(d: &Path, extra_node: &str) -> (PathBuf, NodeId) {
        let me = Identity::create(&d.join("id")).unwrap();
        let peer = Identity::generate().unwrap().id();
        std::fs::create_dir(d.join("app")).unwrap();
        let text = format!(
            "[node]\nidentity = \"{id}\"\nlisten = \"127.0.0.1:7878\"\n{extra_node}\n\
             [[peer]]\nid = \"{peer}\"\naddress = \"127.0.0.1:7879\"\n\n\
             [[folder]]\nname = \"app\"\npath = \"{app}\"\nrole = \"source\"\npeers = [\"{peer}\"]\n",
            id = d.join("id").display(),
            app = d.join("app").display(),
        );
        assert_ne!(me.id(), peer);
        let p = d.join("understudy.toml");
        std::fs::write(&p, text).unwrap();
        (p, peer)
    }

    #[test]
    fn a_config_gives_one_folder_with_its_replica_side_and_a_source_per_peer() {
        let d = tempfile::tempdir().unwrap();
        let (p, peer) = config(d.path(), "");
        let plan = plan_from_config(&p).unwrap();
        assert_eq!(plan.listen, Some("127.0.0.1:7878".parse().unwrap()));
        assert_eq!(plan.folders.len(), 1);
        let f = &plan.folders[0];
        assert_eq!(f.name, "app");
        assert_eq!(f.configured, Role::Source);
        assert_eq!((f.fence.epoch, f.fence.source), (0, true));
        assert!(f.replica.is_some(), "a node that listens serves the folder");
        assert_eq!(f.sources.len(), 1);
        assert_eq!(f.sources[0].peer, peer);
        assert_eq!(f.sources[0].addr.to_string(), "127.0.0.1:7879");
        assert!(
            f.sources[0].index_path.is_none(),
            "no state dir: index in memory"
        );
    }

    #[test]
    fn the_persisted_fencing_state_wins_over_the_configured_role() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let (p, _) = config(d.path(), &format!("state = \"{}\"", state.display()));
        let st = crate::epoch::FolderState {
            role: Role::Replica,
            epoch: 3,
        };
        crate::epoch::store(&state, "app", "me", st).unwrap();
        let plan = plan_from_config(&p).unwrap();
        let f = &plan.folders[0];
        assert_eq!(f.configured, Role::Source);
        assert_eq!((f.fence.epoch, f.fence.source), (3, false));
        assert_eq!(f.sources[0].epoch, 3);
        let index = f.sources[0].index_path.as_ref().unwrap();
        assert!(index.starts_with(&state), "{}", index.display());
    }

    #[test]
    fn bwlimit_comes_from_the_folder_else_from_its_peer() {
        let d = tempfile::tempdir().unwrap();
        let (p, _) = config(d.path(), "");
        let text = std::fs::read_to_string(&p).unwrap();
        let peer_only = text.replace(
            "address = \"127.0.0.1:7879\"\n",
            "address = \"127.0.0.1:7879\"\nbwlimit = \"2M\"\n",
        );
        std::fs::write(&p, &peer_only).unwrap();
        let plan = plan_from_config(&p).unwrap();
        let got = plan.folders[0].sources[0].bwlimit;
        assert_eq!(got, Some(crate::bwlimit::ByteRate(2 << 20)));
        std::fs::write(&p, format!("{peer_only}bwlimit = \"512K\"\n")).unwrap();
        let plan = plan_from_config(&p).unwrap();
        let got = plan.folders[0].sources[0].bwlimit;
        assert_eq!(got, Some(crate::bwlimit::ByteRate(512 << 10)));
        std::fs::write(&p, format!("{text}bwlimit = \"10\"\n")).unwrap();
        let e = format!("{:#}", plan_from_config(&p).unwrap_err());
        assert!(e.contains("bwlimit"), "{e}");
    }

    #[test]
    fn a_replica_without_listen_is_refused_naming_the_folder() {
        let d = tempfile::tempdir().unwrap();
        let (p, _) = config(d.path(), "");
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text
            .replace("listen = \"127.0.0.1:7878\"\n", "")
            .replace("role = \"source\"", "role = \"replica\"");
        std::fs::write(&p, text).unwrap();
        let e = format!("{:#}", plan_from_config(&p).unwrap_err());
        assert!(e.contains("folder app") && e.contains("listen"), "{e}");
    }
}
