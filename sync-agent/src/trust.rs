//! Who may have written what grants trust (like sshd's `StrictModes`).
//!
//! The config (the pin list), the identity directory with its key and
//! certificate, and the state directory (the fencing epoch) decide whom the
//! agent, running as root, trusts and what it does. Each must be owned by root
//! or by the user the process runs as (its euid), and not writable by group or
//! others; so must every directory above it, up to `/`. A group- or
//! other-writable directory with the sticky bit (`/tmp`) is accepted only when
//! the entry in it is owned by root or the euid (others cannot then rename or
//! remove it). The key must not be readable by group or others either.
//!
//! The rules are pure functions over (owner, mode) per path component
//! ([`leaf_flaw`], [`dir_flaw`]); [`check`] applies them to a real path: to
//! the path as given (a symlink on the way must be owned by root or the euid,
//! in a directory that passes) and to its canonical form.

use anyhow::{Context, Result, bail};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// What a checked path is, for messages and the key's extra rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The agent's config file (the pin list).
    Config,
    /// The identity directory (`cert.pem`, `key.pem`).
    IdentityDir,
    /// The node's private key: also not readable by group or others.
    Key,
    /// The node's certificate.
    Cert,
    /// The state directory (fencing epochs, hash indexes).
    StateDir,
    /// The HTTP server's bearer token file: also not readable by group or
    /// others.
    Token,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::IdentityDir => "identity directory",
            Self::Key => "key",
            Self::Cert => "certificate",
            Self::StateDir => "state directory",
            Self::Token => "http token file",
        }
    }
}

/// Owner and mode bits (`st_mode & 0o7777`) of one path component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// Owner uid.
    pub uid: u32,
    /// Permission bits, sticky bit included.
    pub mode: u32,
}

/// Why a component is not trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flaw {
    /// Owned by this uid, neither root nor the euid.
    Owner(u32),
    /// Writable by group and/or others (the mode).
    Writable(u32),
    /// A key readable (or otherwise usable) by group and/or others (the mode).
    Readable(u32),
}

fn trusted_owner(uid: u32, euid: u32) -> bool {
    uid == 0 || uid == euid
}

/// The flaw of the checked entry itself, if any.
#[must_use]
pub fn leaf_flaw(st: Stat, euid: u32, kind: Kind) -> Option<Flaw> {
    if !trusted_owner(st.uid, euid) {
        Some(Flaw::Owner(st.uid))
    } else if st.mode & 0o022 != 0 {
        Some(Flaw::Writable(st.mode))
    } else if matches!(kind, Kind::Key | Kind::Token) && st.mode & 0o077 != 0 {
        Some(Flaw::Readable(st.mode))
    } else {
        None
    }
}

/// The flaw of a directory above a checked entry, if any; `child_uid` owns the
/// entry in it on the way down (the sticky exception depends on it).
#[must_use]
pub fn dir_flaw(dir: Stat, child_uid: u32, euid: u32) -> Option<Flaw> {
    let sticky = dir.mode & 0o1000 != 0;
    if !trusted_owner(dir.uid, euid) {
        Some(Flaw::Owner(dir.uid))
    } else if dir.mode & 0o022 != 0 && !(sticky && trusted_owner(child_uid, euid)) {
        Some(Flaw::Writable(dir.mode))
    } else {
        None
    }
}

fn who(mode: u32) -> (&'static str, &'static str) {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => ("its group and others", "go"),
        (true, false) => ("its group", "g"),
        _ => ("others", "o"),
    }
}

/// The sentence for a flaw of `at` (`what` names it: "is", "its directory /x is").
fn explain(flaw: Flaw, what: &str, at: &Path, euid: u32) -> String {
    let at = at.display();
    match flaw {
        Flaw::Owner(uid) => {
            let me = if euid == 0 {
                String::new()
            } else {
                format!(" or uid {euid} this process runs as")
            };
            format!("{what} owned by uid {uid}, not root{me}: chown root {at}")
        }
        Flaw::Writable(mode) => {
            let (by, bits) = who(mode);
            format!(
                "{what} writable by {by} (mode {:o}): chmod {bits}-w {at}",
                mode & 0o7777
            )
        }
        Flaw::Readable(mode) => format!(
            "{what} readable by group or others (mode {:o}): chmod 600 {at}",
            mode & 0o7777
        ),
    }
}

fn lstat(p: &Path, shown: &Path, kind: Kind) -> Result<(Stat, bool)> {
    let m = std::fs::symlink_metadata(p).with_context(|| {
        format!(
            "{} {}: reading {}",
            kind.label(),
            shown.display(),
            p.display()
        )
    })?;
    Ok((
        Stat {
            uid: m.uid(),
            mode: m.mode() & 0o7777,
        },
        m.file_type().is_symlink(),
    ))
}

/// Checks the directories above `entry` (owned by `child_uid`), bottom-up.
fn check_dirs(entry: &Path, child_uid: u32, euid: u32, kind: Kind, shown: &Path) -> Result<()> {
    let mut child = child_uid;
    for dir in entry.ancestors().skip(1) {
        if dir.as_os_str().is_empty() {
            break;
        }
        let (st, _) = lstat(dir, shown, kind)?;
        if let Some(f) = dir_flaw(st, child, euid) {
            let what = format!("its directory {} is", dir.display());
            bail!(
                "{} {}: {}",
                kind.label(),
                shown.display(),
                explain(f, &what, dir, euid)
            );
        }
        child = st.uid;
    }
    Ok(())
}

/// Refuses `path` unless it and every directory above it may grant trust (see
/// the module docs). The error names the path, the component and the fix.
pub fn check(path: &Path, kind: Kind) -> Result<()> {
    check_as(path, kind, rustix::process::geteuid().as_raw())
}

fn check_as(path: &Path, kind: Kind, euid: u32) -> Result<()> {
    let label = kind.label();
    let abs = std::path::absolute(path)
        .with_context(|| format!("{label} {}: making it absolute", path.display()))?;
    // Symlinks on the way as given: each must be ours, in a directory that is.
    let mut prefix = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::ParentDir => {
                prefix = std::fs::canonicalize(&prefix).with_context(|| {
                    format!("{label} {}: resolving {}", path.display(), prefix.display())
                })?;
                prefix.pop();
                continue;
            }
            Component::CurDir => continue,
            c => prefix.push(c),
        }
        let (st, link) = lstat(&prefix, path, kind)?;
        if link {
            if !trusted_owner(st.uid, euid) {
                let what = format!("the symlink {} on its way is", prefix.display());
                bail!(
                    "{label} {}: {}",
                    path.display(),
                    explain(Flaw::Owner(st.uid), &what, &prefix, euid)
                );
            }
            if let Some(parent) = prefix.parent() {
                let parent = std::fs::canonicalize(parent).with_context(|| {
                    format!("{label} {}: resolving {}", path.display(), parent.display())
                })?;
                check_dirs(&parent.join("x"), st.uid, euid, kind, path)?;
            }
        }
    }
    let canon = std::fs::canonicalize(&abs)
        .with_context(|| format!("{label} {}: resolving it", path.display()))?;
    let (st, _) = lstat(&canon, path, kind)?;
    if let Some(f) = leaf_flaw(st, euid, kind) {
        let what = if canon == abs {
            "is".to_string()
        } else {
            format!("(resolved to {}) is", canon.display())
        };
        bail!(
            "{label} {} {}",
            path.display(),
            explain(f, &what, &canon, euid)
        );
    }
    check_dirs(&canon, st.uid, euid, kind, path)
}

/// Checks a directory that may not exist yet: itself when it does, else the
/// nearest existing directory above it (which will hold it).
pub fn check_dir_or_parent(path: &Path, kind: Kind) -> Result<()> {
    let abs = std::path::absolute(path)
        .with_context(|| format!("{} {}: making it absolute", kind.label(), path.display()))?;
    match abs.ancestors().find(|a| a.exists()) {
        Some(a) if a == abs => check(&abs, kind),
        Some(a) => check(a, kind).with_context(|| {
            format!(
                "{} {} does not exist yet; the directory that will hold it is not trusted",
                kind.label(),
                path.display()
            )
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const EUID: u32 = 500;
    const OWNERS: [u32; 4] = [0, EUID, 1000, 65534];

    /// The rules, written the other way round: what is allowed.
    fn leaf_ok(uid: u32, mode: u32, key: bool) -> bool {
        let owner = uid == 0 || uid == EUID;
        let group_w = mode & 0o020 == 0;
        let other_w = mode & 0o002 == 0;
        let private = !key || mode & 0o077 == 0;
        owner && group_w && other_w && private
    }

    fn dir_ok(uid: u32, mode: u32, child: u32) -> bool {
        let owner = uid == 0 || uid == EUID;
        let shared = mode & 0o022 != 0;
        let sticky = mode & 0o1000 != 0;
        owner && (!shared || (sticky && (child == 0 || child == EUID)))
    }

    #[test]
    fn leaf_rules_every_owner_and_mode() {
        for kind in [
            Kind::Config,
            Kind::IdentityDir,
            Kind::Key,
            Kind::Cert,
            Kind::StateDir,
            Kind::Token,
        ] {
            for uid in OWNERS {
                for mode in 0..=0o7777 {
                    let got = leaf_flaw(Stat { uid, mode }, EUID, kind);
                    assert_eq!(
                        got.is_none(),
                        leaf_ok(uid, mode, matches!(kind, Kind::Key | Kind::Token)),
                        "{kind:?} uid {uid} mode {mode:o}: {got:?}"
                    );
                    if let Some(Flaw::Owner(u)) = got {
                        assert_eq!(u, uid);
                    }
                }
            }
        }
    }

    #[test]
    fn dir_rules_every_owner_mode_and_child() {
        for uid in OWNERS {
            for child in OWNERS {
                for mode in 0..=0o7777 {
                    let got = dir_flaw(Stat { uid, mode }, child, EUID);
                    assert_eq!(
                        got.is_none(),
                        dir_ok(uid, mode, child),
                        "dir uid {uid} mode {mode:o} child {child}: {got:?}"
                    );
                }
            }
        }
        // /tmp (root, 1777) holding a root-owned tempdir: fine; a user's: not.
        let tmp = Stat {
            uid: 0,
            mode: 0o1777,
        };
        assert_eq!(dir_flaw(tmp, 0, 0), None);
        assert_eq!(dir_flaw(tmp, 1000, 0), Some(Flaw::Writable(0o1777)));
        // A sticky directory owned by someone else is never fine.
        assert_eq!(
            dir_flaw(
                Stat {
                    uid: 1000,
                    mode: 0o1777
                },
                0,
                0
            ),
            Some(Flaw::Owner(1000))
        );
    }

    #[test]
    fn messages_name_the_component_and_the_fix() {
        let m = explain(
            Flaw::Writable(0o777),
            "its directory /x is",
            Path::new("/x"),
            0,
        );
        assert_eq!(
            m,
            "its directory /x is writable by its group and others (mode 777): chmod go-w /x"
        );
        let m = explain(Flaw::Writable(0o757), "is", Path::new("/y"), 0);
        assert!(m.contains("by others (mode 757): chmod o-w /y"), "{m}");
        let m = explain(Flaw::Owner(1000), "is", Path::new("/y"), 0);
        assert_eq!(m, "is owned by uid 1000, not root: chown root /y");
        let m = explain(Flaw::Readable(0o640), "is", Path::new("/k"), 0);
        assert!(m.contains("chmod 600 /k"), "{m}");
    }

    #[test]
    fn real_paths() {
        let t = tempfile::tempdir().unwrap();
        let euid = rustix::process::geteuid().as_raw();
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        let f = d.join("c.toml");
        std::fs::write(&f, "").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_as(&f, Kind::Config, euid).unwrap();
        // The key rule is stricter.
        let e = check_as(&f, Kind::Key, euid).unwrap_err().to_string();
        assert!(e.contains("readable by group or others"), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_as(&f, Kind::Config, euid).unwrap_err().to_string();
        assert!(
            e.contains(&format!("its directory {} is writable", d.display())),
            "{e}"
        );
        // Sticky: fine, the file is ours.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_as(&f, Kind::Config, euid).unwrap();
        // A symlink in a writable directory is refused, though its target is fine.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let w = t.path().join("w");
        std::fs::create_dir(&w).unwrap();
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o777)).unwrap();
        let link = w.join("link.toml");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let e = check_as(&link, Kind::Config, euid).unwrap_err().to_string();
        assert!(
            e.contains(&format!("its directory {} is", w.display())),
            "{e}"
        );
        // The same symlink in a trusted directory is followed and checked.
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
        check_as(&link, Kind::Config, euid).unwrap();
        // `..` on the way.
        check_as(&w.join("../d/c.toml"), Kind::Config, euid).unwrap();
        // Missing state directory: its parent is checked.
        check_dir_or_parent(&d.join("state/sub"), Kind::StateDir).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_dir_or_parent(&d.join("state"), Kind::StateDir)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist yet"), "{e}");
    }
}
