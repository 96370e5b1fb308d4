//! The agent's TOML configuration.
//!
//! ```toml
//! [node]
//! identity = "/var/lib/understudy/identity"  # dir written by `sync-cli keygen`
//! listen = "0.0.0.0:7878"                     # where replicas listen (optional)
//! control = "/run/understudy/control.sock"    # local control socket for sync-cli
//! state = "/var/lib/understudy/state"         # hash index and other state
//! http = "127.0.0.1:9810"                     # /health, /metrics (off when absent)
//! http_token_file = "/etc/understudy/http.token" # bearer token; required off loopback
//!
//! [[peer]]
//! id = "<node id>"
//! address = "192.0.2.10:7878"                 # or "jellyfin-a.lan:7878"; resolved at each connect
//!
//! [[folder]]
//! name = "jellyfin"
//! path = "/mnt/user/appdata/jellyfin"
//! role = "source"                             # or "replica"
//! peers = ["<node id>"]
//! profile = "jellyfin"                        # optional: excludes, databases, overlays (`sync-cli profiles`)
//! exclude = ["*.tmp"]                         # gitignore-style
//! sqlite = ["data/*.db", "*.sqlite"]          # databases (gitignore-style globs)
//! overlay = ["config/network.xml"]            # each host keeps its own copy
//! failover = true                             # false: this replica is never promoted
//! parity = "docker inspect --format '{{.Image}}' jellyfin"  # same output on both hosts before a handover
//! uid_map = ["1000:99"]                       # when receiving: the sender's uid 1000 is 99 here
//! gid_map = ["1000:100"]                      # (owners and POSIX ACL entries; see below)
//! delete_excluded = false                     # true: full rounds remove excluded paths here
//! max_lag_secs = 30                           # /health and alerts: the lag bound
//!
//! [folder.hooks]                              # optional: `sh -c` commands
//! stop_source = "docker stop jellyfin"        # before a failover's final cut
//! start_source = "docker start jellyfin"      # on rollback, or after failback
//! stop_replica = "docker stop jellyfin"       # before a failback
//! start_replica = "docker start jellyfin"     # after promotion
//! timeout_secs = 120                          # per hook; the group is killed
//!
//! [[alert]]                                   # optional, repeatable: a webhook
//! url = "http://127.0.0.1:8080/understudy"    # plain http (a local relay for https)
//! events = ["lag_high", "disconnected"]       # optional: all events when absent
//! format = "json"                             # or "ntfy": plain text with a Title
//! ```
//!
//! `uid_map`/`gid_map` (`"REMOTE:LOCAL"`) apply when this host receives the
//! folder: owners and the qualifiers of POSIX ACL entries (access and default)
//! are mapped to this host's ids, and back when the replica's root hash is
//! computed (cuts compare it with the source's). Each map is a permutation:
//! an id that is a LOCAL but not a REMOTE goes the other way. The other host's
//! config holds the reverse map (`["99:1000"]`) for the way back after a
//! failover.
//!
//! `delete_excluded = true` (rsync's `--delete-excluded`): a full round on
//! this replica removes paths the folder's excludes match (leftovers mirrored
//! before an exclude was added); overlays and SQLite side files never. Without
//! it, status reports such paths (`excluded_leftovers`).
//!
//! Unknown keys are errors that name the key and its line; every reference is
//! checked ([`Config::load`]) before the agent touches anything.

pub mod profiles;

pub use crate::addr::PeerAddr;
use crate::identity::NodeId;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use sync_core::RelPath;
use sync_core::filter::Filter;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node.
    pub node: Node,
    /// Known peers.
    #[serde(default, rename = "peer")]
    pub peers: Vec<Peer>,
    /// Folders kept.
    #[serde(default, rename = "folder")]
    pub folders: Vec<Folder>,
    /// `[[alert]]`: webhooks told about trouble ([`crate::alerts`]).
    #[serde(default, rename = "alert")]
    pub alerts: Vec<crate::alerts::Sink>,
}

/// `[node]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    /// Identity directory.
    pub identity: PathBuf,
    /// UDP address to listen on (needed by replicas).
    pub listen: Option<SocketAddr>,
    /// Control socket path.
    pub control: Option<PathBuf>,
    /// State directory (hash index).
    pub state: Option<PathBuf>,
    /// TCP address of the HTTP server (`/health`, `/metrics`: [`crate::http`]);
    /// off when absent.
    pub http: Option<SocketAddr>,
    /// A file holding the bearer token the HTTP server asks for; required when
    /// `http` is not a loopback address.
    pub http_token_file: Option<PathBuf>,
}

/// `[[peer]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Node id (certificate fingerprint).
    pub id: String,
    /// Where to reach it: `ip:port` or `host:port` (needed for the peers of
    /// source folders, and of replica folders that can be promoted).
    pub address: Option<PeerAddr>,
    /// Cap on the bytes/s of content this node sends the peer, for each
    /// folder (`"10M"`; a folder's own `bwlimit` overrides it).
    pub bwlimit: Option<crate::bwlimit::ByteRate>,
}

/// Which end a folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Watches and sends.
    Source,
    /// Applies.
    Replica,
}

/// `[[folder]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Folder {
    /// Name, the same on both hosts.
    pub name: String,
    /// Root directory.
    pub path: PathBuf,
    /// Source or replica.
    pub role: Role,
    /// Peer ids (declared in `[[peer]]`).
    #[serde(default)]
    pub peers: Vec<String>,
    /// An app profile (`jellyfin`, `home-assistant`, `vaultwarden`, `sonarr`,
    /// `radarr`, `plex`): its excludes, databases and overlays come first.
    /// See [`profiles`].
    pub profile: Option<String>,
    /// gitignore-style excludes.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// SQLite databases: gitignore-style globs relative to the root
    /// (`data/*.db`, `*.sqlite`). See [`Folder::sqlite_matcher`].
    #[serde(default)]
    pub sqlite: Vec<String>,
    /// Paths (relative to the root) each host keeps as its own: never
    /// overwritten or deleted by the mirror. See [`Folder::overlays`].
    #[serde(default)]
    pub overlay: Vec<String>,
    /// `[folder.hooks]`: commands run around a failover or failback.
    #[serde(default)]
    pub hooks: Hooks,
    /// Whether this node may become the folder's source (a failover, or
    /// `sync-cli promote`). A promotable replica needs its peers' addresses.
    #[serde(default = "yes")]
    pub failover: bool,
    /// A command whose output tells the app's version on this host
    /// (`docker inspect --format '{{.Image}}' jellyfin`). Before a handover
    /// both hosts run it; different outputs refuse the handover before any
    /// hook runs (`--ignore-parity` overrides, logged).
    pub parity: Option<String>,
    /// The lag over which the folder is unhealthy (`/health`, alerts), in
    /// seconds; [`Folder::DEFAULT_MAX_LAG_SECS`] when absent.
    pub max_lag_secs: Option<u64>,
    /// `"REMOTE:LOCAL"` uids, applied when this host receives the folder
    /// (see [`Folder::id_map`]).
    #[serde(default)]
    pub uid_map: Vec<String>,
    /// `"REMOTE:LOCAL"` gids, likewise.
    #[serde(default)]
    pub gid_map: Vec<String>,
    /// Full rounds remove excluded paths present on this replica (never
    /// overlays); see [`Folder::sweep`].
    #[serde(default)]
    pub delete_excluded: bool,
    /// Cap on the bytes/s of content this node sends the folder's peer
    /// when it is the source (`"10M"`, like rsync's `--bwlimit` but in
    /// bytes/s, K = 1024, at least 256K); see [`crate::bwlimit`].
    pub bwlimit: Option<crate::bwlimit::ByteRate>,
}

fn yes() -> bool {
    true
}

/// `[folder.hooks]`: shell commands (`sh -c`) such as `docker stop jellyfin`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Stops the application on the source before a failover's final cut.
    pub stop_source: Option<String>,
    /// Starts it on the source again (rollback of a failover; after a failback).
    pub start_source: Option<String>,
    /// Stops the application on the replica (before a failback).
    pub stop_replica: Option<String>,
    /// Starts it on the promoted replica.
    pub start_replica: Option<String>,
    /// Per-hook limit in seconds; [`Hooks::DEFAULT_TIMEOUT`] when absent.
    pub timeout_secs: Option<u64>,
    /// The folder's `parity` command (set from [`Folder::parity`] at load,
    /// so that it travels with the hooks).
    #[serde(skip)]
    pub parity: Option<String>,
}

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// `stop_source`.
    StopSource,
    /// `start_source`.
    StartSource,
    /// `stop_replica`.
    StopReplica,
    /// `start_replica`.
    StartReplica,
}

impl Hook {
    /// All hooks.
    pub const ALL: [Hook; 4] = [
        Hook::StopSource,
        Hook::StartSource,
        Hook::StopReplica,
        Hook::StartReplica,
    ];

    /// The key in `[folder.hooks]`, also the hook's name in messages and in
    /// `UNDERSTUDY_HOOK`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Hook::StopSource => "stop_source",
            Hook::StartSource => "start_source",
            Hook::StopReplica => "stop_replica",
            Hook::StartReplica => "start_replica",
        }
    }
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Hooks {
    /// The limit when `timeout_secs` is absent.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

    /// The command of `hook`, if configured.
    #[must_use]
    pub fn command(&self, hook: Hook) -> Option<&str> {
        match hook {
            Hook::StopSource => self.stop_source.as_deref(),
            Hook::StartSource => self.start_source.as_deref(),
            Hook::StopReplica => self.stop_replica.as_deref(),
            Hook::StartReplica => self.start_replica.as_deref(),
        }
    }

    /// The per-hook time limit.
    #[must_use]
    pub fn timeout(&self) -> Duration {
        self.timeout_secs
            .map_or(Self::DEFAULT_TIMEOUT, Duration::from_secs)
    }
}

/// Which paths of a folder are SQLite databases, by the folder's `sqlite` globs.
#[derive(Debug, Clone, Default)]
pub struct SqliteMatcher {
    filter: Filter,
}

impl SqliteMatcher {
    /// Compiles gitignore-style `patterns`; a bad one is an error naming it.
    pub fn new(patterns: &[String]) -> Result<Self> {
        Ok(Self {
            filter: Filter::new(patterns).context("sqlite")?,
        })
    }

    /// Whether the file at `path` (relative to the folder root) is a configured
    /// database. A pattern naming a directory (`data/`) covers the files in it.
    #[must_use]
    pub fn matches(&self, path: &RelPath) -> bool {
        self.filter.excludes(path, false)
    }

    /// Whether no pattern is configured.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.filter.patterns().is_empty()
    }

    /// The patterns as given.
    #[must_use]
    pub fn patterns(&self) -> &[String] {
        self.filter.patterns()
    }
}

impl Folder {
    /// The lag bound when `max_lag_secs` is absent.
    pub const DEFAULT_MAX_LAG_SECS: u64 = 30;

    /// The folder's lag bound, in seconds.
    #[must_use]
    pub fn max_lag(&self) -> f64 {
        self.max_lag_secs.unwrap_or(Self::DEFAULT_MAX_LAG_SECS) as f64
    }

    /// The folder's compiled excludes (profile first, then its own).
    pub fn filter(&self) -> Result<Filter> {
        let mut pats: Vec<String> = Vec::new();
        if let Some(p) = self.app_profile()? {
            pats.extend(p.excludes());
        }
        pats.extend(self.exclude.iter().cloned());
        // Overlays are each host's own: never sent, overwritten or deleted.
        pats.extend(self.sweep()?.overlays.patterns().iter().cloned());
        Filter::new(&pats).with_context(|| format!("folder {}", self.name))
    }

    /// The folder's profile, if it names one; an unknown name is an error
    /// listing the known ones.
    pub fn app_profile(&self) -> Result<Option<&'static profiles::Profile>> {
        match &self.profile {
            None => Ok(None),
            Some(p) => match profiles::find(p) {
                Some(found) => Ok(Some(found)),
                None => bail!(
                    "folder {}: unknown profile {p:?} (known: {})",
                    self.name,
                    profiles::names()
                ),
            },
        }
    }

    /// The folder's database globs: its profile's, then its own `sqlite`.
    pub fn sqlite_globs(&self) -> Result<Vec<String>> {
        let mut globs = self
            .app_profile()?
            .map(|p| p.databases())
            .unwrap_or_default();
        globs.extend(self.sqlite.iter().cloned());
        Ok(globs)
    }

    /// The folder's database globs, compiled.
    pub fn sqlite_matcher(&self) -> Result<SqliteMatcher> {
        SqliteMatcher::new(&self.sqlite_globs()?).with_context(|| format!("folder {}", self.name))
    }

    /// The folder's overlay paths: its profile's first, then its own, each once,
    /// as written (relative to the root; [`Folder::overlay_paths`] parses them).
    #[must_use]
    pub fn overlays(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let profile = self
            .profile
            .as_deref()
            .and_then(profiles::find)
            .map(profiles::Profile::overlays)
            .unwrap_or_default();
        for p in profile.into_iter().chain(self.overlay.iter().cloned()) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }

    /// [`Folder::overlays`] as relative paths; an absolute, empty or `..` path is
    /// an error naming it (a trailing `/` is allowed).
    pub fn overlay_paths(&self) -> Result<Vec<RelPath>> {
        self.overlays()
            .iter()
            .map(|o| {
                let trimmed = o.trim_end_matches('/');
                match RelPath::new(trimmed.as_bytes()) {
                    Ok(p) if !p.is_root() => Ok(p),
                    Ok(_) => bail!("folder {}: overlay {o:?} names the folder root", self.name),
                    Err(e) => bail!(
                        "folder {}: overlay {o:?} is not a path relative to the folder root: {e}",
                        self.name
                    ),
                }
            })
            .collect()
    }

    /// The folder's `uid_map` and `gid_map`; a bad entry is an error naming
    /// the folder, the field and the entry.
    pub fn id_map(&self) -> Result<sync_core::idmap::IdMap> {
        sync_core::idmap::IdMap::parse(&self.uid_map, &self.gid_map)
            .with_context(|| format!("folder {}", self.name))
    }

    /// What full rounds on this replica do with excluded leftovers: removed
    /// with `delete_excluded`, overlays kept either way.
    pub fn sweep(&self) -> Result<sync_core::engine::Sweep> {
        let anchored: Vec<String> = self
            .overlays()
            .into_iter()
            .map(|o| format!("/{}", o.trim_start_matches('/')))
            .collect();
        Ok(sync_core::engine::Sweep {
            delete: self.delete_excluded,
            overlays: Filter::new(&anchored)
                .with_context(|| format!("folder {}: overlay", self.name))?,
        })
    }

    /// The folder's peers, parsed.
    pub fn peer_ids(&self) -> Result<Vec<NodeId>> {
        self.peers
            .iter()
            .map(|p| {
                p.parse()
                    .with_context(|| format!("folder {}: peers", self.name))
            })
            .collect()
    }
}

impl Config {
    /// Reads and parses `path` without checking references.
    pub fn parse(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        // The config is the pin list: whoever can write it is trusted.
        crate::trust::check(path, crate::trust::Kind::Config)?;
        let mut c: Self =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))?;
        for f in &mut c.folders {
            f.hooks.parity.clone_from(&f.parity);
        }
        Ok(c)
    }

    /// Reads, parses and checks `path`: peers declared and well-formed, folder
    /// paths existing directories, names unique, addresses where they are needed,
    /// the identity directory present.
    pub fn load(path: &Path) -> Result<Self> {
        let c = Self::parse(path)?;
        c.check()
            .with_context(|| format!("config {}", path.display()))?;
        Ok(c)
    }

    fn check(&self) -> Result<()> {
        if !self.node.identity.is_dir() {
            bail!(
                "[node] identity: directory {} does not exist (create it with `sync-cli keygen --dir {}`)",
                self.node.identity.display(),
                self.node.identity.display()
            );
        }
        if let Some(state) = &self.node.state {
            // It holds the fencing epochs: whoever can write it can unfence.
            crate::trust::check_dir_or_parent(state, crate::trust::Kind::StateDir)?;
        }
        self.check_http()?;
        for (i, a) in self.alerts.iter().enumerate() {
            a.check().with_context(|| format!("[[alert]] #{}", i + 1))?;
        }
        let mut ids = Vec::new();
        for (i, p) in self.peers.iter().enumerate() {
            let id: NodeId =
                p.id.parse()
                    .with_context(|| format!("[[peer]] #{}: id", i + 1))?;
            ids.push(id);
        }
        let mut names = std::collections::HashSet::new();
        for f in &self.folders {
            if !names.insert(&f.name) {
                bail!("[[folder]] name {:?} appears twice", f.name);
            }
            if !f.path.is_dir() {
                bail!(
                    "folder {}: path {} does not exist or is not a directory",
                    f.name,
                    f.path.display()
                );
            }
            f.filter()?;
            f.sqlite_matcher()?;
            f.overlay_paths()?;
            f.id_map()?;
            for h in Hook::ALL {
                if f.hooks.command(h).is_some_and(|c| c.trim().is_empty()) {
                    bail!("folder {}: hooks.{h} is empty", f.name);
                }
            }
            if f.parity.as_deref().is_some_and(|c| c.trim().is_empty()) {
                bail!("folder {}: parity is empty", f.name);
            }
            if f.max_lag_secs == Some(0) {
                bail!("folder {}: max_lag_secs must be at least 1", f.name);
            }
            if f.hooks.timeout_secs == Some(0) {
                bail!("folder {}: hooks.timeout_secs must be at least 1", f.name);
            }
            if f.peers.is_empty() {
                bail!("folder {}: peers is empty", f.name);
            }
            for id in f.peer_ids()? {
                let Some(pos) = ids.iter().position(|x| *x == id) else {
                    bail!(
                        "folder {}: peer {id} is not declared in a [[peer]] section",
                        f.name
                    );
                };
                if f.role == Role::Source && self.peers[pos].address.is_none() {
                    bail!("folder {}: peer {id} has no address to connect to", f.name);
                }
                if f.role == Role::Replica && f.failover && self.peers[pos].address.is_none() {
                    bail!(
                        "folder {}: [[peer]] {id} has no address: this replica can be promoted \
                         (failover, `sync-cli promote`) and then connects to it; set the peer's \
                         address, or failover = false in the folder",
                        f.name
                    );
                }
            }
            if f.role == Role::Replica && self.node.listen.is_none() {
                bail!("folder {}: a replica folder needs [node] listen", f.name);
            }
        }
        Ok(())
    }

    /// `[node] http` off loopback needs a token: the status names folders,
    /// peers and errors.
    fn check_http(&self) -> Result<()> {
        if let Some(addr) = self.node.http
            && !addr.ip().is_loopback()
            && self.node.http_token_file.is_none()
        {
            bail!(
                "[node] http: {addr} is not a loopback address; set http_token_file \
                 (a file holding a bearer token) or bind 127.0.0.1"
            );
        }
        if let Some(p) = &self.node.http_token_file {
            crate::http::read_token(p).context("[node] http_token_file")?;
        }
        Ok(())
    }

    /// The address of a declared peer.
    #[must_use]
    pub fn peer_address(&self, id: &NodeId) -> Option<PeerAddr> {
        self.peers
            .iter()
            .find(|p| p.id.parse::<NodeId>().ok().as_ref() == Some(id))
            .and_then(|p| p.address.clone())
    }

    /// The `bwlimit` of a declared peer.
    #[must_use]
    pub fn peer_bwlimit(&self, id: &NodeId) -> Option<crate::bwlimit::ByteRate> {
        self.peers
            .iter()
            .find(|p| p.id.parse::<NodeId>().ok().as_ref() == Some(id))
            .and_then(|p| p.bwlimit)
    }
}

#[cfg(test)]
mod tests;
