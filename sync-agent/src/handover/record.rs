//! The persisted handover: `{state}/{folder}.handover`, one JSON object
//! replaced atomically (as [`crate::epoch::store`] does: temp file, fsync,
//! rename, fsync of the directory) before every step with side effects, and
//! removed when the handover is over. Its presence means a handover of the
//! folder is in progress on this node.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Which handover.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `sync-cli failover`: hand the folder to its replica.
    Failover,
    /// `sync-cli failback`: the same, named for the return trip (refused at
    /// epoch 0: nothing was failed over yet).
    Failback,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Failover => "failover",
            Kind::Failback => "failback",
        })
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "failover" => Ok(Kind::Failover),
            "failback" => Ok(Kind::Failback),
            other => Err(format!(
                "unknown handover kind {other:?} (failover or failback)"
            )),
        }
    }
}

/// A handover's step: the one about to be taken (or taken) when persisted.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Checks; nothing changed yet.
    Preflight,
    /// `stop_source` is running (or ran).
    StopSource,
    /// The final cut.
    FinalCut,
    /// The promotion was sent (or is about to be); its answer decides.
    Promote,
    /// The peer is the source: this node takes the replica role.
    Demote,
    /// `start_source` runs again on this node.
    RollingBack,
    /// Completed.
    Done,
    /// Rolled back: this node is the source, its application started again.
    RolledBack,
    /// Ended without completing or rolling back cleanly (the error says where).
    Failed,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Preflight => "preflight",
            Step::StopSource => "stop_source",
            Step::FinalCut => "final_cut",
            Step::Promote => "promote",
            Step::Demote => "demote",
            Step::RollingBack => "rolling_back",
            Step::Done => "done",
            Step::RolledBack => "rolled_back",
            Step::Failed => "failed",
        })
    }
}

/// What is persisted.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The folder.
    pub folder: String,
    /// Failover or failback.
    pub kind: Kind,
    /// The step.
    pub step: Step,
    /// This node's epoch (as the source) when the handover began.
    pub from_epoch: u64,
    /// The epoch the replica is promoted to.
    pub to_epoch: u64,
    /// When the handover began (seconds since the Unix epoch).
    pub started_unix: u64,
    /// The last error, for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `{state_dir}/{folder}.handover`.
#[must_use]
pub fn path(state_dir: &Path, folder: &str) -> PathBuf {
    state_dir.join(format!("{folder}.handover"))
}

/// The persisted handover of `folder`, `None` when there is none.
///
/// # Errors
/// The file cannot be read or parsed (the error names it).
pub fn load(state_dir: &Path, folder: &str) -> Result<Option<Record>> {
    crate::epoch::check_name(folder)?;
    let p = path(state_dir, folder);
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading handover file {}", p.display())),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .with_context(|| format!("handover file {} is corrupt", p.display()))
}

/// Persists `rec` atomically.
///
/// # Errors
/// Any step of the write fails (the error names the file).
pub fn store(state_dir: &Path, rec: &Record) -> Result<()> {
    crate::epoch::check_name(&rec.folder)?;
    crate::epoch::create_state_dir(state_dir)?;
    let p = path(state_dir, &rec.folder);
    let mut json = serde_json::to_vec(rec).context("encoding the handover state")?;
    json.push(b'\n');
    sync_core::apply::write_atomic(&p, |w| std::io::Write::write_all(w, &json))
        .with_context(|| format!("writing handover file {}", p.display()))
}

/// Removes the persisted handover of `folder` (and syncs the directory).
///
/// # Errors
/// The file exists and cannot be removed (the error names it).
pub fn clear(state_dir: &Path, folder: &str) -> Result<()> {
    crate::epoch::check_name(folder)?;
    let p = path(state_dir, folder);
    match std::fs::remove_file(&p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("removing handover file {}", p.display())),
    }
    std::fs::File::open(state_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of state directory {}", state_dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_load_clear_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        assert_eq!(load(&state, "jf").unwrap(), None);
        let rec = Record {
            folder: "jf".into(),
            kind: Kind::Failback,
            step: Step::Promote,
            from_epoch: 3,
            to_epoch: 4,
            started_unix: 1_700_000_000,
            error: None,
        };
        store(&state, &rec).unwrap();
        assert_eq!(load(&state, "jf").unwrap(), Some(rec.clone()));
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path(&state, "jf")).unwrap()).unwrap();
        assert_eq!(v["step"], "promote");
        assert_eq!(v["kind"], "failback");
        let names: Vec<_> = std::fs::read_dir(&state)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["jf.handover".to_string()], "temp file left");
        clear(&state, "jf").unwrap();
        clear(&state, "jf").unwrap();
        assert_eq!(load(&state, "jf").unwrap(), None);
    }

    #[test]
    fn corrupt_file_names_itself() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(path(d.path(), "jf"), b"{\"step\":").unwrap();
        let e = format!("{:#}", load(d.path(), "jf").unwrap_err());
        assert!(e.contains("jf.handover"), "{e}");
    }
}
