//! A round's content on the replica: its files and its databases, two lanes
//! at once on streams of their own ([`super::replica_round::apply_round`]).

use super::PARALLEL_FILES;
use super::replica::*;
use super::replica_batch::{BATCH_BYTES, BATCH_FILES, Got, fetch_batch};
use super::replica_fetch::{fetch_db, fetch_file};
use anyhow::Result;
use proto::ApplySummary;
use std::sync::Arc;
use sync_core::Manifest;
use sync_core::engine::{self, content};
use sync_core::plan::{Fetch, Plan};
use tokio::sync::Semaphore;

/// What both lanes of a round's content share.
pub(super) struct Lanes<'a> {
    pub(super) conn: &'a quinn::Connection,
    pub(super) folder: &'a Arc<ReplicaFolder>,
    pub(super) planned: &'a Arc<Manifest>,
    /// The planned entries' indexes in the round, which the source serves.
    pub(super) kept: &'a [usize],
    pub(super) plan: &'a Plan,
}

/// The round's files: the directories and other entries
/// [`engine::make_early`] left, the content that came with the round, the
/// large files staged ahead by the bulk lane (installed, not fetched), then
/// the rest pulled.
pub(super) async fn files_lane(
    lane: &Lanes<'_>,
    inline: &mut std::collections::HashMap<u64, Vec<u8>>,
    summary: &mut ApplySummary,
) -> Result<()> {
    let (folder, planned) = (lane.folder, lane.planned);
    let (r, s) = (folder.replica.clone(), planned.clone());
    let (mkdir, create) = (lane.plan.mkdir.clone(), lane.plan.create.clone());
    summary.others_created +=
        super::files_lane::spawn(move || engine::make_rest(&r, &s, &mkdir, &create)).await??;
    let (inlined, pulled) = content::split_inline(lane.plan, lane.kept, inline);
    if !inlined.is_empty() {
        let (r, s) = (folder.replica.clone(), planned.clone());
        let (files, bytes) =
            super::files_lane::spawn(move || engine::write_whole(&r, &s, inlined)).await??;
        summary.files_transferred += files;
        summary.files_inline += files;
        summary.bytes_literal += bytes;
    }
    let pulled = super::replica_stage::take_staged(folder, planned, pulled, summary).await?;
    pull_files(lane.conn, folder, planned, lane.kept, pulled, summary).await
}

/// Databases fetched at once: a small one does not wait behind a large one.
const DB_STREAMS: usize = 2;

/// Database `i` of the plan (see [`fetch_db`]).
async fn fetch_one_db(lane: &Lanes<'_>, dst: &Manifest, i: usize) -> Result<Option<u64>> {
    let entry = lane.planned.entries[i].clone();
    let current = dst.get(&entry.path).map(|(_, d)| d.meta.clone());
    let (r, activity) = (lane.folder.replica.clone(), &lane.folder.activity);
    fetch_db(lane.conn, r, entry, lane.kept[i] as u64, current, activity).await
}

/// The round's databases, [`DB_STREAMS`] at a time: `(applied, pages)`.
/// Every fetch ends (and its writer with it) before this returns; the
/// first error is reported.
pub(super) async fn dbs_lane(lane: &Lanes<'_>, dst: &Manifest) -> Result<(u64, u64)> {
    let fetches = lane
        .plan
        .dbs
        .iter()
        .copied()
        .map(|i| fetch_one_db(lane, dst, i));
    let all = at_most(fetches, DB_STREAMS).await;
    let mut done = (0u64, 0u64);
    for got in all {
        if let Some(pages) = got? {
            done.0 += 1;
            done.1 += pages;
        }
    }
    Ok(done)
}

/// Runs `tasks`, at most `n` at once, each to its end: their outputs in the
/// order they ended.
async fn at_most<T>(tasks: impl Iterator<Item = impl Future<Output = T>>, n: usize) -> Vec<T> {
    use futures::StreamExt;
    let mut all = Vec::new();
    let mut running = futures::stream::iter(tasks).buffer_unordered(n);
    while let Some(out) = running.next().await {
        all.push(out);
    }
    all
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

    /// A round's small database is fetched beside a large one, not behind
    /// it: here the first cannot end before the second has.
    #[tokio::test]
    async fn a_small_database_does_not_wait_behind_a_large_one() {
        use futures::FutureExt;
        let (ended, wait) = tokio::sync::oneshot::channel::<()>();
        let large = async move {
            let _ = wait.await;
            "large"
        }
        .boxed();
        let small = async move {
            let _ = ended.send(());
            "small"
        }
        .boxed();
        let order = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            at_most([large, small].into_iter(), DB_STREAMS),
        )
        .await
        .expect("the second database waited behind the first");
        assert_eq!(order, ["small", "large"]);
    }

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
}
