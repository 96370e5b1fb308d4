//! The checks a handover makes before anything is stopped: this node is the
//! source, its replica is connected, no replica database is held open, and a
//! preflight cut matches on both sides.

use super::machine::Check;
use super::runner::{CONNECT_WAIT, CUT_TIMEOUT, Folder, POLL};
use crate::config::Role;
use crate::continuous::Command;
use std::time::Instant;

pub(super) async fn preflight(f: &Folder) -> Vec<Check> {
    let mut checks = Vec::new();
    let check = |name: &str, ok: bool, detail: String| Check {
        name: name.into(),
        ok,
        detail,
    };
    match f.local() {
        Ok((Role::Source, e)) => checks.push(check(
            "this node is the source",
            true,
            format!("epoch {e} (persisted)"),
        )),
        Ok((Role::Replica, e)) => {
            checks.push(check(
                "this node is the source",
                false,
                format!("it is the replica at epoch {e}"),
            ));
            return checks;
        }
        Err(e) => {
            checks.push(check("this node is the source", false, e));
            return checks;
        }
    }
    // Right after a handover the new source takes a moment to reach its
    // replica: wait a little for a session and a first cut.
    let deadline = Instant::now() + CONNECT_WAIT;
    let cut = loop {
        let attempt = match connected(f) {
            Ok(peer) => ask_cut(f).await.map(|c| (peer, c)),
            Err(e) => Err(e),
        };
        match attempt {
            Ok(done) => break Ok(done),
            Err(e) if Instant::now() >= deadline => break Err(e),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    };
    let (peer, c) = match cut {
        Ok(done) => done,
        Err(e) => {
            checks.push(check("replica connected", false, e));
            return checks;
        }
    };
    checks.push(check("replica connected", true, format!("peer {peer}")));
    // Only the replica knows whether it could serve (its `failover` and its
    // peer's address): its hello says so. A no here refuses the handover
    // before anything is stopped, not after `stop_source` ran.
    let promotable = peer_promotable(f);
    checks.push(check(
        "replica can serve as the source",
        promotable,
        if promotable {
            "its hello says it can be promoted".into()
        } else {
            format!(
                "replica {peer} cannot be promoted: its config has `failover = false` for the \
                 folder, or no `address` for its peer"
            )
        },
    ));
    // The cut tells which replica databases another process holds open (the
    // standby's application left running), before anything is stopped.
    checks.push(check(
        "replica databases not held open",
        c.held.is_empty(),
        if c.held.is_empty() {
            format!("{} databases checked", c.databases)
        } else {
            format!(
                "{} (stop the application on the replica's host)",
                c.held.join("; ")
            )
        },
    ));
    checks.extend(parity_check(f, c.replica_parity.as_deref()).await);
    checks.push(check(
        "preflight cut",
        c.matched,
        format!(
            "cut {}: source root {} replica root {}",
            c.cut_id, c.source_root, c.replica_root
        ),
    ));
    checks
}

/// Whether the connected replica's hello said it could be promoted (an
/// unknown answer is a no: no session, no promotion).
fn peer_promotable(f: &Folder) -> bool {
    f.status
        .as_ref()
        .and_then(|s| s.lock().ok().and_then(|s| s.peer_promotable))
        .unwrap_or(false)
}

/// The peer, when the source loop has a session with it; else why not.
fn connected(f: &Folder) -> Result<String, String> {
    let st = f.status.as_ref().and_then(|s| {
        s.lock()
            .ok()
            .map(|s| (s.connected, s.peer.clone(), s.last_error.clone()))
    });
    match st {
        Some((true, peer, _)) => Ok(peer),
        Some((false, peer, err)) => Err(format!(
            "replica {peer} is not connected{}",
            err.map(|e| format!(" ({e})")).unwrap_or_default()
        )),
        None => Err("this node runs no source loop for the folder".into()),
    }
}

pub(super) async fn ask_cut(f: &Folder) -> Result<crate::continuous::CutReport, String> {
    let (reply, rx) = tokio::sync::oneshot::channel();
    f.commands
        .send(Command::Cut(reply))
        .await
        .map_err(|_| format!("folder {}: its source loop is not running", f.name))?;
    match tokio::time::timeout(CUT_TIMEOUT, rx).await {
        Err(_) => Err(format!("no cut within {} s", CUT_TIMEOUT.as_secs())),
        Ok(Err(_)) => Err("the session ended during the cut".into()),
        Ok(Ok(r)) => r,
    }
}

/// Runs this host's `parity` command and judges it against the replica's.
async fn parity_check(f: &Folder, theirs: Option<&str>) -> Option<Check> {
    let ours = crate::hooks::parity_output(&f.hooks, &f.name).await;
    judge_parity(ours.as_deref(), theirs, f.ignore_parity())
}

/// The parity check: both hosts' `parity` outputs (the app's versions) must
/// be equal, or the handover is refused before any hook runs. No check when
/// neither host has the command; one host without it cannot be compared and
/// fails. With `ignore`, a failure passes, says so, and is logged.
pub(super) fn judge_parity(
    ours: Option<&str>,
    theirs: Option<&str>,
    ignore: bool,
) -> Option<Check> {
    let (ok, detail) = match (ours, theirs) {
        (None, None) => return None,
        (Some(a), Some(b)) if a == b && !a.starts_with("error: ") => {
            (true, format!("both hosts print {a:?}"))
        }
        (Some(a), Some(b)) => (
            false,
            format!("this host prints {a:?}, the replica prints {b:?}"),
        ),
        (Some(_), None) => (
            false,
            "the replica has no `parity` command in its config: the versions cannot be compared"
                .into(),
        ),
        (None, Some(b)) => (
            false,
            format!(
                "this host has no `parity` command in its config (the replica prints {b:?}): the \
                 versions cannot be compared"
            ),
        ),
    };
    if !ok && ignore {
        tracing::warn!("parity check ignored (--ignore-parity): {detail}");
        return Some(Check {
            name: "app versions match (parity)".into(),
            ok: true,
            detail: format!("ignored (--ignore-parity): {detail}"),
        });
    }
    Some(Check {
        name: "app versions match (parity)".into(),
        ok,
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::judge_parity;

    #[test]
    fn parity_outputs_must_be_equal_unless_ignored() {
        assert!(judge_parity(None, None, false).is_none());
        let same = judge_parity(Some("sha256:1"), Some("sha256:1"), false).unwrap();
        assert!(same.ok, "{same:?}");
        let differ = judge_parity(Some("sha256:1"), Some("sha256:2"), false).unwrap();
        assert!(
            !differ.ok && differ.detail.contains("sha256:1") && differ.detail.contains("sha256:2"),
            "{differ:?}"
        );
        let ignored = judge_parity(Some("sha256:1"), Some("sha256:2"), true).unwrap();
        assert!(
            ignored.ok && ignored.detail.starts_with("ignored"),
            "{ignored:?}"
        );
        for (a, b) in [(Some("x"), None), (None, Some("x"))] {
            assert!(!judge_parity(a, b, false).unwrap().ok, "{a:?} {b:?}");
        }
        // Two failures to run the command are not a match.
        let e = "error: hook parity failed";
        assert!(!judge_parity(Some(e), Some(e), false).unwrap().ok);
    }
}
