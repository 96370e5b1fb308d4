//! What a one-shot `push` keeps between runs, so a re-run does the work of a
//! change, not of the whole tree (a running agent keeps the same in memory):
//! the hash index of the source's files (`sync_core::index`) and the cut
//! state of its databases (`sync_core::sqlite::LiveSet::save`).
//!
//! Both live in a private directory (default `~/.cache/understudy`), under a
//! name derived from the source's canonical path. They are caches: a missing,
//! unreadable or foreign file only costs the run a full read of the tree.

use anyhow::{Context, Result};
use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use sync_core::index::HashIndex;
use sync_core::sqlite::LiveSet;

/// The default directory: `$XDG_CACHE_HOME/understudy`, else
/// `$HOME/.cache/understudy`; `None` when neither is set.
#[must_use]
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("understudy"))
}

/// One source tree's saved state, in `dir`.
#[derive(Debug, Clone)]
pub struct PushState {
    index: PathBuf,
    cut: PathBuf,
}

impl PushState {
    /// The state of the tree at `src` (canonicalized) in `dir`, which is
    /// created (mode 0700) when missing.
    pub fn new(dir: &Path, src: &Path) -> Result<Self> {
        use std::os::unix::ffi::OsStrExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("state directory {}", dir.display()))?;
        let canon =
            std::fs::canonicalize(src).with_context(|| format!("source {}", src.display()))?;
        let key = blake3::hash(canon.as_os_str().as_bytes());
        let name = format!("push-{}", &key.to_hex()[..24]);
        Ok(Self {
            index: dir.join(format!("{name}.index")),
            cut: dir.join(format!("{name}.cut")),
        })
    }

    /// The saved hash index (empty when it cannot be opened: logged).
    #[must_use]
    pub fn index(&self) -> HashIndex {
        let t0 = std::time::Instant::now();
        let ix = HashIndex::open(&self.index);
        tracing::debug!(ms = t0.elapsed().as_millis(), "hash index loaded");
        ix.unwrap_or_else(|e| {
            tracing::warn!("{e}: hashing every file");
            HashIndex::in_memory()
        })
    }

    /// Gives `live` (tracking the tree's databases, not cut yet) what the
    /// last run's cut saw; how many databases it knew.
    pub fn restore(&self, live: &mut LiveSet) -> usize {
        self.restore_with(live, false)
    }

    /// [`PushState::restore`] into a set that holds nothing yet, made to hold
    /// every database the last run knew.
    pub fn restore_tracking(&self, live: &mut LiveSet) -> usize {
        self.restore_with(live, true)
    }

    fn restore_with(&self, live: &mut LiveSet, track: bool) -> usize {
        let Ok(bytes) = std::fs::read(&self.cut) else {
            return 0;
        };
        let restored = if track {
            live.restore_tracking(&bytes)
        } else {
            live.restore(&bytes)
        };
        restored.unwrap_or_else(|e| {
            tracing::warn!("{e}: reading every database");
            0
        })
    }

    /// Saves what `live`'s last cut saw, replacing the old file atomically
    /// (left alone when it already holds exactly that).
    pub fn save(&self, live: &LiveSet) -> Result<()> {
        replace_file(&self.cut, &live.save()?).map(|_| ())
    }
}

/// Puts `bytes` at `path` atomically (temp file, fsync, rename), unless it
/// already holds exactly them; whether it wrote.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<bool> {
    if same_content(path, bytes) {
        return Ok(false);
    }
    sync_core::apply::write_atomic(path, |w| w.write_all(bytes))
        .with_context(|| format!("saving {}", path.display()))?;
    Ok(true)
}

/// Whether the file at `path` holds exactly `bytes` (read in small pieces:
/// the cut state of a large database is megabytes).
fn same_content(path: &Path, bytes: &[u8]) -> bool {
    use std::io::Read as _;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    if f.metadata().map(|m| m.len()).ok() != Some(bytes.len() as u64) {
        return false;
    }
    let mut buf = vec![0u8; 1 << 16];
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = rest.len().min(buf.len());
        if f.read_exact(&mut buf[..n]).is_err() || buf[..n] != rest[..n] {
            return false;
        }
        rest = &rest[n..];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same state is not written again; another one replaces it whole.
    #[test]
    fn a_state_is_rewritten_only_when_it_changed() {
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("s.cut");
        let big: Vec<u8> = (0..200_000u32).flat_map(u32::to_le_bytes).collect();
        assert!(replace_file(&f, &big).expect("first"));
        assert!(
            !replace_file(&f, &big).expect("same"),
            "rewrote the same bytes"
        );
        let mut other = big.clone();
        other[700_000] ^= 1;
        assert!(replace_file(&f, &other).expect("changed"));
        assert_eq!(std::fs::read(&f).expect("read"), other);
        assert!(replace_file(&f, &other[..10]).expect("shorter"));
        assert_eq!(std::fs::read(&f).expect("read"), &other[..10]);
    }
}
