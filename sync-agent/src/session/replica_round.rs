//! The replica side of a session: reading a round from the peer and applying it.

use super::PARALLEL_FILES;
use super::replica::*;
use super::replica_ahead::Ahead;
use super::replica_batch::{BATCH_BYTES, BATCH_FILES, Got, fetch_batch};
use super::replica_fetch::{fetch_db, fetch_file};
use crate::wire;
use anyhow::{Context, Result};
use proto::ApplySummary;
use proto::round::{Assembler, Event};
use std::sync::Arc;
use sync_core::Manifest;
use sync_core::engine::{self, Prescan, content};
use sync_core::plan::{Fetch, Plan};
use tokio::sync::Semaphore;

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
    // Content that came with the round is written first; the rest is pulled.
    let (inlined, pulled) = content::split_inline(&plan, &kept, &mut round.inline);
    if !inlined.is_empty() {
        let (r, s) = (folder.replica.clone(), planned.clone());
        let (files, bytes) =
            tokio::task::spawn_blocking(move || engine::write_whole(&r, &s, inlined)).await??;
        summary.files_transferred += files;
        summary.files_inline += files;
        summary.bytes_literal += bytes;
    }
    clock.mark("inline");
    // Large files staged ahead by the bulk lane are installed, not fetched.
    let pulled = super::replica_stage::take_staged(folder, &planned, pulled, &mut summary).await?;
    // Files and databases travel at once, on streams of their own: a large
    // database does not wait behind thousands of small files, nor they behind it.
    // Once the files are in while databases still arrive, a round whose
    // sync is a `syncfs` anyway starts it (`Replica::start_sync`).
    let dbs_left = std::sync::atomic::AtomicBool::new(!plan.dbs.is_empty());
    let files = async {
        let pulled = pull_files(conn, folder, &planned, &kept, pulled, &mut summary).await;
        if pulled.is_ok() && dbs_left.load(std::sync::atomic::Ordering::Acquire) {
            folder.replica.start_sync();
        }
        pulled
    };
    let dbs = async {
        let mut done = (0u64, 0u64);
        for &i in &plan.dbs {
            let entry = planned.entries[i].clone();
            let current = dst.get(&entry.path).map(|(_, d)| d.meta.clone());
            let (r, activity) = (folder.replica.clone(), &folder.activity);
            if let Some(pages) = fetch_db(conn, r, entry, kept[i] as u64, current, activity).await?
            {
                done.0 += 1;
                done.1 += pages;
            }
        }
        dbs_left.store(false, std::sync::atomic::Ordering::Release);
        Ok::<_, anyhow::Error>(done)
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
            engine::make(&r, &s, &mut plan, &f, &mut sum)?;
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

/// Pulls the files the round did not carry, in parallel: small ones with no
/// basis many to a stream ([`fetch_batch`]), the others each on its own;
/// stops starting transfers once one has failed, and every transfer ends
/// (and its writer with it) before this returns.
async fn pull_files(
    conn: &quinn::Connection,
    folder: &Arc<ReplicaFolder>,
    planned: &Arc<Manifest>,
    kept: &[usize],
    pulled: Vec<Fetch>,
    summary: &mut ApplySummary,
) -> Result<()> {
    let sem = Arc::new(Semaphore::new(PARALLEL_FILES));
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed: Option<anyhow::Error> = None;
    type Done = std::result::Result<Result<Got>, tokio::task::JoinError>;
    fn add(done: Done, summary: &mut ApplySummary, failed: &mut Option<anyhow::Error>) {
        match done.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(got) => {
                summary.files_transferred += got.files;
                summary.bytes_literal += got.literal;
                summary.bytes_matched += got.matched;
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    let mut batches = Batches::default();
    let mut pulled = pulled.into_iter();
    loop {
        let files = match pulled.next() {
            Some(f) => {
                let entry = planned.entries[f.index].clone();
                match batches.add(entry, kept[f.index] as u64, f.basis) {
                    Some(files) => files,
                    None => continue,
                }
            }
            None => match batches.rest() {
                Some(files) => files,
                None => break,
            },
        };
        let permit = sem.clone().acquire_owned().await?;
        let (conn, r, activity) = (
            conn.clone(),
            folder.replica.clone(),
            folder.activity.clone(),
        );
        tasks.spawn(async move {
            let res = fetch(conn, r, files, activity).await;
            drop(permit);
            res
        });
        while let Some(done) = tasks.try_join_next() {
            add(done, summary, &mut failed);
        }
        if failed.is_some() {
            break;
        }
    }
    while let Some(done) = tasks.join_next().await {
        add(done, summary, &mut failed);
    }
    failed.map_or(Ok(()), Err)
}

/// Pulls what [`Batches`] made: one file on its own stream (with its basis,
/// if it has one), several small ones on one.
async fn fetch(
    conn: quinn::Connection,
    r: Arc<sync_core::apply::Replica>,
    mut files: Vec<(proto::Entry, u64, bool)>,
    activity: Activity,
) -> Result<Got> {
    if files.len() == 1 {
        let Some((entry, index, basis)) = files.pop() else {
            return Ok(Got::default());
        };
        let got = fetch_file(conn, r, entry, index, basis, activity).await?;
        return Ok(got.map_or_else(Got::default, |(literal, matched)| Got {
            files: 1,
            literal,
            matched,
        }));
    }
    let files = files.into_iter().map(|(e, i, _)| (e, i)).collect();
    fetch_batch(conn, r, files, activity).await
}

/// Groups the files to pull, in the plan's order: a file with a basis or
/// over [`proto::MAX_BATCH_FILE`] goes alone; small ones with no basis
/// gather until [`BATCH_FILES`] or [`BATCH_BYTES`].
#[derive(Default)]
struct Batches {
    open: Vec<(proto::Entry, u64, bool)>,
    bytes: u64,
}

impl Batches {
    /// Takes one file (its entry, its index in the round, whether the
    /// replica has a basis): what is ready to pull, if anything.
    fn add(
        &mut self,
        entry: proto::Entry,
        index: u64,
        basis: bool,
    ) -> Option<Vec<(proto::Entry, u64, bool)>> {
        let size = match entry.kind {
            proto::Kind::File { size, .. } if !basis && size <= proto::MAX_BATCH_FILE => size,
            _ => return Some(vec![(entry, index, basis)]),
        };
        self.open.push((entry, index, basis));
        self.bytes += size;
        if self.open.len() >= BATCH_FILES || self.bytes >= BATCH_BYTES {
            return self.rest();
        }
        None
    }

    /// The files gathered so far, if any.
    fn rest(&mut self) -> Option<Vec<(proto::Entry, u64, bool)>> {
        self.bytes = 0;
        Some(std::mem::take(&mut self.open)).filter(|b| !b.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small files with no basis gather, in order, until a batch is full by
    /// count or by bytes; a file with a basis and one too large for a batch
    /// go alone; what is left is the last batch.
    #[test]
    fn small_files_with_no_basis_are_pulled_many_to_a_stream() {
        let entry = |name: String, size: u64| proto::Entry {
            path: proto::RelPath::new(name.into_bytes()).expect("path"),
            kind: proto::Kind::File {
                size,
                hash: [0; 32],
            },
            meta: proto::Meta::default(),
        };
        let names = |b: &[(proto::Entry, u64, bool)]| b.iter().map(|f| f.1).collect::<Vec<_>>();
        let mut b = Batches::default();
        let mut out = Vec::new();
        for i in 0..(BATCH_FILES as u64 + 3) {
            if let Some(done) = b.add(entry(format!("s{i}"), 10), i, false) {
                out.push(names(&done));
            }
        }
        assert_eq!(out, vec![(0..BATCH_FILES as u64).collect::<Vec<_>>()]);
        // alone, whatever is open
        let alone = [
            (entry("basis".into(), 10), true),
            (entry("big".into(), proto::MAX_BATCH_FILE + 1), false),
        ];
        for (i, (e, basis)) in alone.into_iter().enumerate() {
            let got = b.add(e, 1000 + i as u64, basis).expect("alone");
            assert_eq!(names(&got), vec![1000 + i as u64]);
        }
        let rest = b.rest().expect("the rest");
        let n = BATCH_FILES as u64;
        assert_eq!(names(&rest), vec![n, n + 1, n + 2]);
        assert!(b.rest().is_none());
        // by bytes: as soon as the sizes reach BATCH_BYTES
        let each = proto::MAX_BATCH_FILE;
        let mut batches = Vec::new();
        for i in 0..(2 * BATCH_BYTES / each) {
            if let Some(done) = b.add(entry(format!("m{i}"), each), i, false) {
                batches.push(done.len() as u64);
            }
        }
        assert_eq!(batches, vec![BATCH_BYTES / each; 2]);
        assert!(b.rest().is_none());
    }

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
