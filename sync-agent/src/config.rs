//! The agent's TOML configuration.
//!
//! ```toml
//! [node]
//! identity = "/var/lib/understudy/identity"  # dir written by `sync-cli keygen`
//! listen = "0.0.0.0:7878"                     # where replicas listen (optional)
//! control = "/run/understudy/control.sock"    # local control socket for sync-cli
//! state = "/var/lib/understudy/state"         # hash index and other state
//!
//! [[peer]]
//! id = "<node id>"
//! address = "192.0.2.10:7878"                 # optional on the listening side
//!
//! [[folder]]
//! name = "jellyfin"
//! path = "/mnt/user/appdata/jellyfin"
//! role = "source"                             # or "replica"
//! peers = ["<node id>"]
//! profile = "jellyfin"                        # optional: its default excludes
//! exclude = ["*.tmp"]                         # gitignore-style
//! ```
//!
//! Unknown keys are errors that name the key and its line; every reference is
//! checked ([`Config::load`]) before the agent touches anything.

use crate::identity::NodeId;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
}

/// `[[peer]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// Node id (certificate fingerprint).
    pub id: String,
    /// Where to reach it (needed for the peers of source folders).
    pub address: Option<SocketAddr>,
}

/// Which end a folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
    /// A named set of default excludes (`jellyfin`).
    pub profile: Option<String>,
    /// gitignore-style excludes.
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// The excludes of a profile.
pub fn profile_excludes(name: &str) -> Option<&'static [&'static str]> {
    match name {
        // Regenerable: transcodes, caches, logs.
        "jellyfin" => Some(&["cache/", "transcodes/", "log/"]),
        _ => None,
    }
}

impl Folder {
    /// The folder's compiled excludes (profile first, then its own).
    pub fn filter(&self) -> Result<Filter> {
        let mut pats: Vec<String> = Vec::new();
        if let Some(p) = &self.profile {
            let Some(ex) = profile_excludes(p) else {
                bail!(
                    "folder {}: unknown profile {p:?} (known: jellyfin)",
                    self.name
                )
            };
            pats.extend(ex.iter().map(|s| s.to_string()));
        }
        pats.extend(self.exclude.iter().cloned());
        Filter::new(&pats).with_context(|| format!("folder {}", self.name))
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
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
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
            }
            if f.role == Role::Replica && self.node.listen.is_none() {
                bail!("folder {}: a replica folder needs [node] listen", f.name);
            }
        }
        Ok(())
    }

    /// The address of a declared peer.
    #[must_use]
    pub fn peer_address(&self, id: &NodeId) -> Option<SocketAddr> {
        self.peers
            .iter()
            .find(|p| p.id.parse::<NodeId>().ok().as_ref() == Some(id))
            .and_then(|p| p.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("understudy.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn base(dir: &Path, id: &str) -> String {
        format!(
            "[node]\nidentity = \"{d}\"\nlisten = \"127.0.0.1:7878\"\n\n[[peer]]\nid = \"{id}\"\naddress = \"127.0.0.1:7879\"\n\n[[folder]]\nname = \"jf\"\npath = \"{d}\"\nrole = \"source\"\npeers = [\"{id}\"]\nprofile = \"jellyfin\"\n",
            d = dir.display()
        )
    }

    #[test]
    fn shipped_sample_parses() {
        let text = include_str!("../../dist/examples/understudy.toml");
        let c: Config = toml::from_str(text).unwrap();
        assert_eq!(c.folders[0].profile.as_deref(), Some("jellyfin"));
        assert!(profile_excludes("jellyfin").is_some());
    }

    #[test]
    fn good_config_loads_and_typos_are_named() {
        let d = tempfile::tempdir().unwrap();
        let id = crate::Identity::generate().unwrap().id().to_string();
        let p = write(d.path(), &base(d.path(), &id));
        let c = Config::load(&p).unwrap();
        assert!(
            c.folders[0]
                .filter()
                .unwrap()
                .excludes(&sync_core::RelPath::new(&b"cache"[..]).unwrap(), true)
        );

        let p = write(d.path(), &base(d.path(), &id).replace("role =", "rol ="));
        let e = format!("{:#}", Config::load(&p).unwrap_err());
        assert!(e.contains("rol") && e.contains("line"), "{e}");

        let other = crate::Identity::generate().unwrap().id().to_string();
        let p = write(
            d.path(),
            &base(d.path(), &id).replace(
                &format!("peers = [\"{id}\"]"),
                &format!("peers = [\"{other}\"]"),
            ),
        );
        let e = format!("{:#}", Config::load(&p).unwrap_err());
        assert!(e.contains("not declared"), "{e}");

        let p = write(
            d.path(),
            &base(d.path(), &id).replace(
                &format!("path = \"{}\"", d.path().display()),
                "path = \"/nonexistent/x\"",
            ),
        );
        let e = format!("{:#}", Config::load(&p).unwrap_err());
        assert!(
            e.contains("/nonexistent/x") && e.contains("folder jf"),
            "{e}"
        );

        let p = write(
            d.path(),
            &base(d.path(), &id).replacen(
                &format!("identity = \"{}\"", d.path().display()),
                "identity = \"/nonexistent/id\"",
                1,
            ),
        );
        let e = format!("{:#}", Config::load(&p).unwrap_err());
        assert!(e.contains("/nonexistent/id") && e.contains("keygen"), "{e}");
    }
}
