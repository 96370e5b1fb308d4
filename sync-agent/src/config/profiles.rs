//! App profiles: what a folder of a known application holds, per layout.
//!
//! A profile names, for each image layout the app ships in (Jellyfin's
//! official image keeps `config/` and `data/` under `/config`; linuxserver's
//! and hotio's keep the config files at the top and the databases under
//! `data/data/`):
//! - **excludes**: regenerable or per-process files (caches, transcodes, logs,
//!   backups, pid files) never mirrored;
//! - **databases**: SQLite globs (databases are also found by their header);
//! - **overlays**: per-host files each host keeps as its own (a "backup server"
//!   banner, hardware-acceleration settings);
//! - **identity** files: mirrored so the standby answers as the same server
//!   after a handover, which is also why the app must never run on both hosts
//!   at once (a cold standby);
//! - a **parity** command for the folder's `parity` key, that prints the app's
//!   version on each host (a handover refuses when the two differ).
//!
//! A folder with a profile gets the rules of every layout of it: a standby's
//! root is empty before its first mirror, so the layout cannot be told there,
//! and no layout's paths exist in another's tree. [`detect`] still names the
//! layout a tree has, for the log and `sync-cli profiles`.

use serde::Serialize;
use std::path::Path;
use sync_core::RelPath;
use sync_core::filter::Filter;

/// One image layout of an app.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Layout {
    /// Which images use it.
    pub name: &'static str,
    /// Paths, relative to the folder root, whose presence identifies it.
    pub markers: &'static [&'static str],
    /// gitignore-style excludes.
    pub excludes: &'static [&'static str],
    /// SQLite globs.
    pub databases: &'static [&'static str],
    /// Per-host files (overlays).
    pub overlays: &'static [&'static str],
    /// Files that make the app's identity: mirrored, never served twice.
    pub identity: &'static [&'static str],
}

/// An app's profile.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Profile {
    /// The name a folder's `profile` key takes.
    pub name: &'static str,
    /// The application.
    pub app: &'static str,
    /// A `parity` command for the folder (run on both hosts before a
    /// handover; the outputs must be equal).
    pub parity: &'static str,
    /// Its layouts.
    pub layouts: &'static [Layout],
}

const JELLYFIN_EXCLUDES: &[&str] = &["cache/", "transcodes/", "log/", "backups/", "*.db-shm"];

const ARR_EXCLUDES: &[&str] = &[
    "logs/",
    "/logs.db",
    "/logs.db-*",
    "Backups/",
    "MediaCover/",
    "*.pid",
    "*.db-shm",
];

/// Every known profile.
pub const PROFILES: &[Profile] = &[
    Profile {
        name: "jellyfin",
        app: "Jellyfin",
        parity: "docker inspect --format '{{.Image}}' jellyfin",
        layouts: &[
            Layout {
                name: "official (jellyfin/jellyfin: config/ and data/ under /config)",
                markers: &["config/system.xml", "data/jellyfin.db", "data/library.db"],
                excludes: JELLYFIN_EXCLUDES,
                databases: &["/data/*.db"],
                overlays: &["config/branding.xml", "config/encoding.xml"],
                identity: &["data/device.txt"],
            },
            Layout {
                name: "linuxserver/hotio (config files in /config, databases in data/data/)",
                markers: &[
                    "system.xml",
                    "data/data/jellyfin.db",
                    "data/data/library.db",
                ],
                excludes: JELLYFIN_EXCLUDES,
                databases: &["/data/data/*.db"],
                overlays: &["branding.xml", "encoding.xml"],
                identity: &["data/device.txt"],
            },
        ],
    },
    Profile {
        name: "home-assistant",
        app: "Home Assistant",
        parity: "docker inspect --format '{{.Image}}' homeassistant",
        layouts: &[Layout {
            name: "container and supervised (/config)",
            markers: &[".HA_VERSION", "configuration.yaml"],
            excludes: &[
                "/home-assistant.log*",
                "/tts/",
                "/backups/",
                "/deps/",
                ".cache/",
                "*.db-shm",
            ],
            databases: &["/home-assistant_v2.db", "/zigbee.db"],
            overlays: &[],
            identity: &[".storage/core.uuid"],
        }],
    },
    Profile {
        name: "vaultwarden",
        app: "Vaultwarden",
        parity: "docker inspect --format '{{.Image}}' vaultwarden",
        layouts: &[Layout {
            name: "vaultwarden/server (/data)",
            markers: &["db.sqlite3", "rsa_key.pem"],
            excludes: &["/icon_cache/", "/tmp/", "*.sqlite3-shm"],
            databases: &["/db.sqlite3"],
            overlays: &[],
            identity: &["rsa_key.pem", "rsa_key.pub.pem"],
        }],
    },
    Profile {
        name: "sonarr",
        app: "Sonarr",
        parity: "docker inspect --format '{{.Image}}' sonarr",
        layouts: &[Layout {
            name: "linuxserver/hotio/official (/config)",
            markers: &["sonarr.db", "config.xml"],
            excludes: ARR_EXCLUDES,
            databases: &["/sonarr.db"],
            overlays: &[],
            identity: &["config.xml"],
        }],
    },
    Profile {
        name: "radarr",
        app: "Radarr",
        parity: "docker inspect --format '{{.Image}}' radarr",
        layouts: &[Layout {
            name: "linuxserver/hotio/official (/config)",
            markers: &["radarr.db", "config.xml"],
            excludes: ARR_EXCLUDES,
            databases: &["/radarr.db"],
            overlays: &[],
            identity: &["config.xml"],
        }],
    },
    Profile {
        name: "plex",
        app: "Plex Media Server",
        parity: "docker inspect --format '{{.Image}}' plex",
        layouts: &[Layout {
            name: "plexinc/pms-docker and linuxserver (/config)",
            markers: &["Library/Application Support/Plex Media Server/Preferences.xml"],
            excludes: &[
                "Library/Application Support/Plex Media Server/Cache/",
                "Library/Application Support/Plex Media Server/Logs/",
                "Library/Application Support/Plex Media Server/Crash Reports/",
                "Library/Application Support/Plex Media Server/Codecs/",
                "Library/Application Support/Plex Media Server/Updates/",
                "Library/Application Support/Plex Media Server/Diagnostics/",
                "*.pid",
                "*.db-shm",
            ],
            databases: &[
                "Library/Application Support/Plex Media Server/Plug-in Support/Databases/*.db",
            ],
            overlays: &[],
            identity: &["Library/Application Support/Plex Media Server/Preferences.xml"],
        }],
    },
];

/// The profile named `name`.
#[must_use]
pub fn find(name: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == name)
}

/// The known profile names, for error messages.
#[must_use]
pub fn names() -> String {
    PROFILES
        .iter()
        .map(|p| p.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Profile {
    /// The union over its layouts of one kind of rule, each once, in order.
    fn union(&self, pick: fn(&Layout) -> &'static [&'static str]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in self.layouts.iter().flat_map(|l| pick(l).iter()) {
            if !out.iter().any(|o| o == s) {
                out.push((*s).to_string());
            }
        }
        out
    }

    /// Every layout's excludes.
    #[must_use]
    pub fn excludes(&self) -> Vec<String> {
        self.union(|l| l.excludes)
    }

    /// Every layout's database globs.
    #[must_use]
    pub fn databases(&self) -> Vec<String> {
        self.union(|l| l.databases)
    }

    /// Every layout's overlays.
    #[must_use]
    pub fn overlays(&self) -> Vec<String> {
        self.union(|l| l.overlays)
    }

    /// Every layout's identity files.
    #[must_use]
    pub fn identity(&self) -> Vec<String> {
        self.union(|l| l.identity)
    }
}

/// The layout of `profile` that the tree at `root` has (the first with a
/// marker present), if any.
#[must_use]
pub fn detect(profile: &Profile, root: &Path) -> Option<&'static Layout> {
    profile.layouts.iter().find(|l| {
        l.markers
            .iter()
            .any(|m| std::fs::symlink_metadata(root.join(m)).is_ok())
    })
}

/// Directory names that hold regenerable data an app folder should exclude.
pub const REGENERABLE: &[&str] = &["cache", "transcodes", "log", "logs"];

/// How deep under the root [`unexcluded_regenerable`] looks.
const LOOK_DEPTH: usize = 3;

/// How many directories [`unexcluded_regenerable`] reads at most (a bounded
/// look at start, not a scan).
const LOOK_DIRS: usize = 10_000;

/// Directories within three levels of `root` named like regenerable data
/// (`cache/`, `transcodes/`, `log/`, `logs/`, any case) that `filter` does
/// not exclude, relative to the root, sorted. Unreadable directories are
/// skipped: this is advice, not a check.
#[must_use]
pub fn unexcluded_regenerable(root: &Path, filter: &Filter) -> Vec<String> {
    let mut found = Vec::new();
    let mut queue = vec![(root.to_path_buf(), String::new(), 0usize)];
    let mut read = 0;
    while let Some((dir, rel, depth)) = queue.pop() {
        read += 1;
        if read > LOOK_DIRS {
            break;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            let Ok(path) = RelPath::new(child.as_bytes()) else {
                continue;
            };
            if filter.excludes(&path, true) {
                continue;
            }
            if REGENERABLE.contains(&name.to_ascii_lowercase().as_str()) {
                found.push(format!("{child}/"));
            } else if depth + 1 < LOOK_DEPTH {
                queue.push((e.path(), child, depth + 1));
            }
        }
    }
    found.sort();
    found
}

/// Logs, at start, the layout a folder's profile found, and warns about
/// regenerable directories a folder without a profile does not exclude.
pub fn advise(folder: &super::Folder, filter: &Filter) {
    match folder.profile.as_deref().and_then(find) {
        Some(p) => match detect(p, &folder.path) {
            Some(l) => {
                tracing::info!(folder = %folder.name, profile = p.name, "layout: {}", l.name)
            }
            None => {
                tracing::info!(folder = %folder.name, profile = p.name, "layout not known yet (an empty standby): the rules of every layout apply")
            }
        },
        None => {
            let found = unexcluded_regenerable(&folder.path, filter);
            if !found.is_empty() {
                tracing::warn!(
                    folder = %folder.name,
                    "holds {} and no profile or exclude covers them: regenerable data will be mirrored (set `profile`, or `exclude = [\"cache/\", ...]`; `sync-cli profiles` lists the profiles)",
                    found.join(", ")
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_apps_each_with_rules_that_compile() {
        // The integration test `profiles_json_lists_the_six_apps` names them.
        assert_eq!(PROFILES.len(), 6);
        for p in PROFILES {
            assert!(!p.layouts.is_empty() && !p.parity.is_empty(), "{}", p.name);
            Filter::new(&p.excludes()).unwrap();
            Filter::new(&p.databases()).unwrap();
            assert!(!p.identity().is_empty(), "{}", p.name);
            for o in p.overlays() {
                RelPath::new(o.as_bytes()).unwrap();
            }
        }
    }

    #[test]
    fn jellyfin_layouts_are_told_apart_by_their_markers() {
        let jf = find("jellyfin").unwrap();
        let d = tempfile::tempdir().unwrap();
        assert!(detect(jf, d.path()).is_none());
        std::fs::create_dir_all(d.path().join("data/data")).unwrap();
        std::fs::write(d.path().join("data/data/library.db"), b"").unwrap();
        assert!(
            detect(jf, d.path())
                .unwrap()
                .name
                .starts_with("linuxserver")
        );
        let o = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(o.path().join("config")).unwrap();
        std::fs::write(o.path().join("config/system.xml"), b"").unwrap();
        assert!(detect(jf, o.path()).unwrap().name.starts_with("official"));
        // Both layouts' rules apply: the standby cannot tell before its
        // first mirror.
        let dbs = Filter::new(&jf.databases()).unwrap();
        let p = |s: &str| RelPath::new(s.as_bytes()).unwrap();
        assert!(dbs.excludes(&p("data/data/library.db"), false));
        assert!(dbs.excludes(&p("data/jellyfin.db"), false));
        assert!(!dbs.excludes(&p("metadata/data/x.db"), false));
        assert!(jf.overlays().contains(&"branding.xml".to_string()));
        assert!(jf.overlays().contains(&"config/branding.xml".to_string()));
    }

    #[test]
    fn regenerable_directories_not_excluded_are_named() {
        let d = tempfile::tempdir().unwrap();
        for dir in ["transcodes", "data/Cache", "a/b/c/cache", "metadata", "log"] {
            std::fs::create_dir_all(d.path().join(dir)).unwrap();
        }
        let none = Filter::default();
        assert_eq!(
            unexcluded_regenerable(d.path(), &none),
            ["data/Cache/", "log/", "transcodes/"]
        );
        let ex = Filter::new(&["transcodes/".into(), "/log".into()]).unwrap();
        assert_eq!(unexcluded_regenerable(d.path(), &ex), ["data/Cache/"]);
    }
}
