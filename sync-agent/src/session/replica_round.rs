//! The replica side of a session: reading a round from the peer and applying it.

use super::files_lane::Running;
use super::replica::*;
use super::replica_ahead::Ahead;
use super::replica_lanes::{Lanes, dbs_lane, files_lane};
use crate::wire;
use anyhow::{Context, Result};
use proto::ApplySummary;
use proto::round::{Assembler, Event};
use std::sync::Arc;
use sync_core::Manifest;
use sync_core::engine::{self, Prescan};
use sync_core::plan::Plan;

/// What the source sent next on the control stream.
pub(super) enum Next {
    /// A round.
    Round(Incoming),
    /// A full round with nothing to do: the source's tree has `digest`.
    Same {
        /// Round number.
        id: u64,
        /// The quick digest the source's tree has.
        digest: [u8; 32],
    },
    /// Become the folder's source at this epoch.
    Promote(u64),
}

/// The next round, a round with nothing to do, or a promotion request, or
/// the end. The messages go through [`Assembler`], which checks their order,
/// the round's bounds and its end; this glue adds the time bound, growing
/// with what the round carried.
pub(super) async fn read_round(
    ctl: &mut quinn::RecvStream,
    activity: &Activity,
) -> Result<Option<Next>> {
    let Some(first) = wire::recv(ctl).await? else {
        return Ok(None);
    };
    activity.touch();
    let mut asm = Assembler::new();
    let mut event = asm.handle(first)?;
    let id = asm.round_id().unwrap_or_default();
    let (mut stage, mut timed) = (wire::Stage::new(format!("round {id}"), 0), 0);
    loop {
        match event {
            Some(Event::Round(r)) => return Ok(Some(Next::Round(r))),
            Some(Event::Promote { epoch }) => return Ok(Some(Next::Promote(epoch))),
            Some(Event::Same { id, digest, .. }) => return Ok(Some(Next::Same { id, digest })),
            None => {}
        }
        stage.grow(asm.timed_bytes().saturating_sub(timed));
        timed = asm.timed_bytes();
        let msg = stage.expect(ctl, "the rest of the round").await?;
        activity.touch();
        event = asm.handle(msg)?;
    }
}

/// Applies one round: the engine's phases ([`sync_core::engine`]) on
/// blocking threads, contents pulled over QUIC in between.
pub(super) async fn apply_round(
    conn: &quinn::Connection,
    folder: &Arc<ReplicaFolder>,
    round: Incoming,
    prescanned: Option<Prescan>,
) -> Result<ApplySummary> {
    let mut clock = Phases::start();
    let mut round = engine::Round::from(round);
    engine::check(&round, folder.replica.root_path())?;
    round.map_ids(&folder.ids);
    // Excluded entries are dropped; `kept` maps what is planned back to the
    // round's indexes, which the source serves.
    let (kept, planned) = engine::keep(std::mem::take(&mut round.src), &folder.filter);
    let planned = Arc::new(planned);
    let (dst, plan, mut summary) =
        prepare_and_make(folder, &mut round, planned.clone(), prescanned).await?;
    clock.mark("prepare");
    // Files and databases travel at once, on streams of their own: a large
    // database does not wait behind thousands of small files, nor they behind
    // it, nor it behind the directories the files need (its own are made).
    // Once one lane is in while the other still runs (the files, or the
    // databases: the files lane runs below them, `files_lane`), a round
    // whose sync is a `syncfs` anyway starts it (`Replica::start_sync`).
    let running = Running::new(!plan.dbs.is_empty());
    let lanes = Lanes {
        conn,
        folder,
        planned: &planned,
        kept: &kept,
        plan: &plan,
    };
    let files = async {
        let pulled = files_lane(&lanes, &mut round.inline, &mut summary).await;
        tracing::debug!(
            ms = clock.since_last().as_millis() as u64,
            "round's files in"
        );
        if running.ended(true, pulled.is_ok()) {
            folder.replica.start_sync();
        }
        pulled
    };
    let dbs = async {
        let done = dbs_lane(&lanes, &dst).await;
        if running.ended(false, done.is_ok()) {
            tracing::debug!("databases in before the files: sync ahead");
            folder.replica.start_sync();
        }
        done
    };
    let (files, dbs) = tokio::join!(files, dbs);
    files?;
    let (applied, pages) = dbs?;
    summary.databases_applied += applied;
    summary.db_pages += pages;
    clock.mark("content");
    // Renames into place, links, metadata, directories, durability.
    let (r, s) = (folder.replica.clone(), planned.clone());
    let mut summary =
        tokio::task::spawn_blocking(move || engine::finish(&r, &s, &plan, &dst, summary)).await??;
    clock.mark("finish");
    if round.verify {
        let (r, d, f) = (
            folder.replica.clone(),
            folder.detect.clone(),
            folder.filter.clone(),
        );
        // A cut says which databases another process holds open (the
        // standby's application running), changed or not: a handover's
        // preflight refuses on it.
        let ids = folder.ids.clone();
        let verified =
            tokio::task::spawn_blocking(move || engine::verify(&r, d, f, &planned, &ids)).await??;
        engine::add_verified(&mut summary, verified, round.full);
        summary.parity = crate::hooks::parity_output(&folder.hooks, &folder.name).await;
        clock.mark("verify");
    }
    tracing::debug!(folder = %folder.name, phases = %clock, "round applied");
    Ok(summary)
}

/// Scans this replica's tree while the source scans its own (a session's
/// first round is full), or takes the scan kept from an earlier session
/// while its tree is quiet ([`super::replica_ahead`]), and offers its quick
/// digest (`TreeDigest`, sent once per session before anything else after
/// the hello): the scan for the first full round's plan, or `None` when it
/// failed (the round scans again and reports why). No digest is offered on
/// a fenced node's first repair (it keeps aside what it alone holds); the
/// scan itself offers none with id maps ([`engine::prescan`]).
pub(super) async fn offer_digest(
    folder: &Arc<ReplicaFolder>,
    ctl_send: &mut quinn::SendStream,
) -> Result<Option<Ahead>> {
    let pre = match folder.ahead.take() {
        Some(kept) => {
            tracing::debug!(folder = %folder.name, entries = kept.pre.dst.entries.len(), "replica's scan ahead kept: its tree is quiet");
            Ok(kept)
        }
        None => {
            let f = folder.clone();
            tokio::task::spawn_blocking(move || super::replica_ahead::scan(&f)).await?
        }
    };
    let pre = match pre {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(folder = %folder.name, "scanning ahead of the first round: {e}");
            None
        }
    };
    let digest = digest_to_offer(folder, pre.as_ref().map(|a| &a.pre))?;
    wire::send(ctl_send, &proto::Message::TreeDigest { digest }).await?;
    Ok(pre)
}

/// The prescan's digest, unless this node is fenced and its first full round
/// must keep aside what it alone holds (and clear the mark): never skipped.
fn digest_to_offer(folder: &ReplicaFolder, pre: Option<&Prescan>) -> Result<Option<[u8; 32]>> {
    let offer = divergence_target(folder, true)?.is_none();
    Ok(pre.and_then(|p| p.digest).filter(|_| offer))
}

/// A full round with nothing to do (`RoundSame`): checked against the
/// prescan's digest, directories its database reads touched put back,
/// excluded leftovers counted. The scan is handed back (kept after the
/// session while the tree stays quiet).
pub(super) async fn apply_same(
    folder: &Arc<ReplicaFolder>,
    prescanned: Option<Ahead>,
    id: u64,
    digest: [u8; 32],
) -> (Result<ApplySummary>, Option<Ahead>) {
    let Some(ahead) = prescanned else {
        let e = anyhow::anyhow!(
            "round {id}: the source says nothing changed, but this replica offered no digest"
        );
        return (Err(e), None);
    };
    let (r, d, sweep) = (
        folder.replica.clone(),
        folder.detect.clone(),
        folder.sweep.clone(),
    );
    let done = tokio::task::spawn_blocking(move || {
        let res = engine::same(&r, &ahead.pre, &digest, &d, &sweep);
        (res, ahead)
    })
    .await;
    let (res, ahead) = match done {
        Ok(d) => d,
        Err(e) => return (Err(e.into()), None),
    };
    let (summary, found) = match res {
        Ok(s) => s,
        Err(e) => return (Err(e.into()), Some(ahead)),
    };
    if let Ok(mut st) = folder.stats.lock() {
        st.leftovers = Some(found);
    }
    tracing::debug!(folder = %folder.name, round = id, "round applied: nothing to do (same digest)");
    (Ok(summary), Some(ahead))
}

/// How long each phase of a round took, for the debug log (where the time
/// goes on bulk work: benches/README.md).
struct Phases {
    last: std::time::Instant,
    done: Vec<(&'static str, std::time::Duration)>,
}

impl Phases {
    fn start() -> Self {
        Self {
            last: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    /// Time since the last phase ended.
    fn since_last(&self) -> std::time::Duration {
        self.last.elapsed()
    }

    fn mark(&mut self, phase: &'static str) {
        let now = std::time::Instant::now();
        self.done.push((phase, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (p, d)) in self.done.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{p}={}ms", d.as_millis())?;
        }
        Ok(())
    }
}

/// Renames, deletions, the replica's own manifest and the plan, the
/// divergence kept aside on a fenced node's first repair, then the plan's
/// deletions, directories and other entries: `(dst, plan, summary)`.
async fn prepare_and_make(
    folder: &Arc<ReplicaFolder>,
    round: &mut engine::Round,
    planned: Arc<Manifest>,
    prescanned: Option<Prescan>,
) -> Result<(Manifest, Plan, ApplySummary)> {
    let (r, s, f) = (folder.replica.clone(), planned, folder.filter.clone());
    let detect = folder.detect.clone();
    let (full, checksum) = (round.full, round.compares_content());
    let (deleted, renamed) = (
        std::mem::take(&mut round.deleted),
        std::mem::take(&mut round.renamed),
    );
    let capture = divergence_target(folder, full)?;
    let (name, sweep) = (folder.name.clone(), folder.sweep.clone());
    let (dst, plan, sum, captured, leftovers) =
        tokio::task::spawn_blocking(move || -> Result<_> {
            let mut sum = ApplySummary::default();
            let prep = engine::Prepare {
                filter: &f,
                detect,
                full,
                checksum,
                renamed: &renamed,
                deleted: &deleted,
                sweep: &sweep,
            };
            let engine::Prepared {
                dst,
                mut plan,
                leftovers,
            } = engine::prepare(&r, &s, &prep, prescanned, &mut sum)?;
            // The first repair after this node was fenced: what it alone holds is
            // copied aside before anything is replaced or deleted.
            let captured = match &capture {
                Some((state, into, epoch)) => {
                    let header = format!(
                        "# understudy: what this node held when it came back fenced, before the\n\
                     # repair by the folder's new source (epoch {epoch}). folder {name}, root {}\n",
                        r.root_path().display()
                    );
                    let c = sync_core::diverged::capture(&r, &s, &dst, &plan, into, &header)
                        .with_context(|| {
                            format!("folder {name}: keeping aside what only this node held")
                        })?;
                    crate::diverged::clear(state, &name)?;
                    Some((into.clone(), c.kept.len()))
                }
                None => None,
            };
            engine::make_early(&r, &s, &mut plan, &f, &mut sum)?;
            Ok((dst, plan, sum, captured, leftovers))
        })
        .await??;
    if let Some(l) = leftovers
        && let Ok(mut st) = folder.stats.lock()
    {
        st.leftovers = Some(l);
    }
    if let Some((into, n)) = captured {
        if n == 0 {
            tracing::info!(folder = %folder.name, "fenced and repaired: this node held nothing the new source lacks");
        } else {
            tracing::warn!(folder = %folder.name, kept = n, dir = %into.display(), "fenced: what only this node held is kept aside (see its MANIFEST)");
            if let Ok(mut d) = folder.diverged.lock() {
                *d = Some(into);
            }
        }
    }
    Ok((dst, plan, sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_node_offers_no_digest_until_its_first_repair() {
        let t = tempfile::tempdir().expect("temp dir");
        let (root, state) = (t.path().join("root"), t.path().join("state"));
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::write(root.join("a"), b"a").expect("write");
        let settings = crate::ReplicaSettings {
            state_dir: Some(state.clone()),
            ..Default::default()
        };
        let folder = crate::replica_folder_with("f", &root, Default::default(), vec![], settings)
            .expect("folder");
        let scan = || {
            super::super::replica_ahead::scan(&folder)
                .expect("scan")
                .pre
        };
        let pre = scan();
        assert!(pre.digest.is_some());
        assert_eq!(
            digest_to_offer(&folder, Some(&pre)).expect("offer"),
            pre.digest
        );
        crate::diverged::mark(&state, "f", 3).expect("fenced");
        assert_eq!(
            digest_to_offer(&folder, Some(&scan())).expect("offer"),
            None
        );
    }
}
