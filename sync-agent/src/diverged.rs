//! What a returning old master alone held, kept aside under
//! `{state}/diverged/{folder}-{epoch}-{unix time}/` before its repair.
//!
//! When a source is fenced (its peer was promoted while it was away), it
//! persists a marker, `{state}/{folder}.diverged-pending` holding the epoch it
//! adopted, *before* it takes the replica role. The first full round it then
//! receives copies everything that round would replace or delete into a new
//! capture directory ([`sync_core::diverged::capture`]) before applying it,
//! and clears the marker. An agent restart in between still captures: the
//! marker is on disk. A normal handover (failover, failback) sets no marker.

use anyhow::{Context, Result};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// `{state}/{folder}.diverged-pending`.
#[must_use]
pub fn marker_path(state: &Path, folder: &str) -> PathBuf {
    state.join(format!("{folder}.diverged-pending"))
}

/// `{state}/diverged`.
#[must_use]
pub fn base(state: &Path) -> PathBuf {
    state.join("diverged")
}

/// Persists "capture before the next repair" for `folder`, fenced at `epoch`.
///
/// # Errors
/// The marker cannot be written durably (the error names it).
pub fn mark(state: &Path, folder: &str, epoch: u64) -> Result<()> {
    let p = marker_path(state, folder);
    let tmp = state.join(format!(".{folder}.diverged-pending.tmp"));
    let body = format!("{{\"epoch\":{epoch}}}\n");
    let res = (|| {
        std::fs::create_dir_all(state)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(body.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &p)?;
        std::fs::File::open(state)?.sync_all()
    })();
    res.with_context(|| format!("writing divergence marker {}", p.display()))
}

/// The epoch of a pending capture for `folder`, if one is marked.
///
/// # Errors
/// The marker exists but cannot be read or parsed (the error names it).
pub fn pending(state: &Path, folder: &str) -> Result<Option<u64>> {
    let p = marker_path(state, folder);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
    };
    let v: serde_json::Value = serde_json::from_slice(&text)
        .with_context(|| format!("divergence marker {} is corrupt", p.display()))?;
    v["epoch"]
        .as_u64()
        .map(Some)
        .with_context(|| format!("divergence marker {} has no epoch", p.display()))
}

/// Removes the marker once the capture is on disk.
///
/// # Errors
/// It cannot be removed (the error names it).
pub fn clear(state: &Path, folder: &str) -> Result<()> {
    let p = marker_path(state, folder);
    match std::fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
    }
    std::fs::File::open(state)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of {}", state.display()))
}

/// A new capture directory's path for `folder` at `epoch`, now (created by
/// the capture). `{state}/diverged` is made (mode 0700) if missing.
///
/// # Errors
/// `{state}/diverged` cannot be created.
pub fn target(state: &Path, folder: &str, epoch: u64) -> Result<PathBuf> {
    let b = base(state);
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&b)
        .with_context(|| format!("creating {}", b.display()))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut p = b.join(format!("{folder}-{epoch}-{now}"));
    let mut n = 1;
    while p.exists() {
        p = b.join(format!("{folder}-{epoch}-{now}.{n}"));
        n += 1;
    }
    Ok(p)
}

/// The newest capture directory of `folder`, if any (for status after a
/// restart).
#[must_use]
pub fn latest(state: &Path, folder: &str) -> Option<PathBuf> {
    let prefix = format!("{folder}-");
    std::fs::read_dir(base(state))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(&prefix)?;
            let (epoch, when) = rest.split_once('-')?;
            let when = when.split('.').next()?;
            Some((
                (when.parse::<u64>().ok()?, epoch.parse::<u64>().ok()?),
                e.path(),
            ))
        })
        .max_by_key(|(k, _)| *k)
        .map(|(_, p)| p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_latest_finds_the_newest() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("state");
        assert_eq!(pending(&s, "app").unwrap(), None);
        mark(&s, "app", 4).unwrap();
        assert_eq!(pending(&s, "app").unwrap(), Some(4));
        assert_eq!(pending(&s, "other").unwrap(), None);
        clear(&s, "app").unwrap();
        assert_eq!(pending(&s, "app").unwrap(), None);
        clear(&s, "app").unwrap();

        std::fs::write(marker_path(&s, "app"), "{").unwrap();
        let e = format!("{:#}", pending(&s, "app").unwrap_err());
        assert!(e.contains("app.diverged-pending"), "{e}");

        assert_eq!(latest(&s, "app"), None);
        let t = target(&s, "app", 2).unwrap();
        assert!(t.starts_with(base(&s)));
        for name in [
            "app-1-100",
            "app-2-300",
            "app-x-1",
            "app-3-200",
            "apple-9-999",
        ] {
            std::fs::create_dir(base(&s).join(name)).unwrap();
        }
        assert_eq!(latest(&s, "app"), Some(base(&s).join("app-2-300")));
        std::fs::create_dir(&t).unwrap();
        assert_ne!(target(&s, "app", 2).unwrap(), t);
    }
}
