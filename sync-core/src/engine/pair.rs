//! The in-memory pair of the fast test tier: a source and a replica over two
//! temp dirs, the round's messages passed through [`Outgoing`] and
//! [`Assembler`] in memory, contents from the source tree ([`Loopback`]),
//! database pages from the source's [`LiveSet`]. No network, no tokio.

use super::content::{ContentSource as _, Loopback, pull, split_inline};
use super::*;
use crate::sqlite::{LiveSet, Need};
use proto::Message;
use proto::exchange::{DbFetch, DbGeometry, DbStep, page_messages, pages_per_batch};
use proto::round::{Assembler, Event, Outgoing};
use std::path::PathBuf;

pub(super) struct Pair {
    pub src: tempfile::TempDir,
    pub dst: tempfile::TempDir,
    pub replica: Replica,
    pub filter: Filter,
    /// The replica folder's uid/gid maps.
    pub ids: crate::idmap::IdMap,
    /// What full rounds do with excluded leftovers.
    pub sweep: Sweep,
    /// The last full round's excluded leftovers.
    pub leftovers: Option<Leftovers>,
    detect: Arc<DbDetect>,
    live: LiveSet,
    next_id: u64,
    /// The replica's scan made ahead, taken by the next full round.
    prescanned: Option<Prescan>,
    /// What the replica's scans ahead learned of its files' stamps.
    scan_index: std::sync::Mutex<crate::index::HashIndex>,
}

impl Pair {
    pub fn new() -> Self {
        let src = tempfile::tempdir().expect("a temp dir");
        let dst = tempfile::tempdir().expect("a temp dir");
        let replica = Replica::open(dst.path()).expect("the replica root opens");
        replica.reset();
        let live = LiveSet::new(src.path(), std::time::Duration::from_secs(5));
        Self {
            src,
            dst,
            replica,
            filter: Filter::default(),
            ids: Default::default(),
            sweep: Sweep::default(),
            leftovers: None,
            detect: Arc::new(DbDetect::default()),
            live,
            next_id: 1,
            prescanned: None,
            scan_index: std::sync::Mutex::new(crate::index::HashIndex::in_memory()),
        }
    }

    pub fn src(&self, rel: &str) -> PathBuf {
        self.src.path().join(rel)
    }

    pub fn dst(&self, rel: &str) -> PathBuf {
        self.dst.path().join(rel)
    }

    /// The source's whole manifest as the agent makes it: scan, cut of the
    /// live databases, their entries marked with their snapshots.
    pub fn source_manifest(&mut self) -> Manifest {
        let opts = ScanOptions {
            databases: Some(self.detect.clone()),
            filter: self.filter.clone(),
            ..Default::default()
        };
        let (mut m, report) =
            crate::scan::scan_with(self.src.path(), &opts, None).expect("the source scans");
        self.live.name_from(&m.entries, &report.databases);
        self.live.track(&report.databases);
        let stats = self.live.cut().expect("a cut");
        m.entries.retain(|e| !stats.dropped.contains(&e.path));
        crate::sqlite::mark_databases(&mut m.entries, &self.live).expect("marked");
        m
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// A full, verified round of the whole source tree; the replica's root
    /// hash after it is the source's.
    pub fn full(&mut self) -> Result<ApplySummary, String> {
        let (sum, root) = self.full_as_is()?;
        assert_eq!(sum.root_hash, Some(root), "{sum:?}");
        Ok(sum)
    }

    /// A full, verified round of the whole source tree, and the source's
    /// root hash (which the replica's need not match: something it held).
    pub fn full_as_is(&mut self) -> Result<(ApplySummary, [u8; 32]), String> {
        let m = self.source_manifest();
        let out = Outgoing {
            id: self.id(),
            full: true,
            checksum: false,
            verify: true,
            entries: &m.entries,
            renamed: &[],
            deleted: &[],
            root_hash: m.root_hash(),
        };
        let msgs: Vec<Message> = out.messages(Vec::new()).collect();
        Ok((self.send(msgs)?, m.root_hash()))
    }

    /// A session's first full round as the agents run it: the replica scans
    /// ahead ([`prescan`]) and offers its quick digest; a source tree with
    /// the same one is answered by `RoundSame` (`Ok(true)`: nothing applied),
    /// any other by a full verified round that takes the prescan (`Ok(false)`).
    pub fn first_full(&mut self) -> Result<bool, String> {
        let pre = self.prescan()?;
        let m = self.source_manifest();
        let ours = crate::digest::quick_root(&m.entries);
        if pre.digest == Some(ours) {
            let msg = Message::RoundSame {
                id: self.id(),
                entries: m.entries.len() as u64,
                digest: ours,
                root_hash: m.root_hash(),
            };
            let Ok(Some(Event::Same { digest, .. })) = Assembler::new().handle(msg) else {
                return Err("RoundSame is not an event between rounds".into());
            };
            let (_, found) = same(&self.replica, &pre, &digest, &self.detect, &self.sweep)
                .map_err(|e| e.to_string())?;
            self.leftovers = Some(found);
            self.live.end_round();
            return Ok(true);
        }
        self.prescanned = Some(pre);
        self.full().map(|_| false)
    }

    /// The replica's scan ahead of a session's first round.
    fn prescan(&self) -> Result<Prescan, String> {
        prescan(
            &self.replica,
            &self.filter,
            self.detect.clone(),
            &self.sweep,
            &self.ids,
            Some(&self.scan_index),
            None,
        )
        .map_err(|e| e.to_string())
    }

    /// Scans the replica ahead and has its index trust every stamp seen (as
    /// if the files were older than the racy window).
    pub fn trust_replica_stamps(&mut self) {
        let pre = self.prescan().expect("scan ahead");
        let later = crate::scan::now_ns() + 10 * crate::index::RACY_NS;
        let mut ix = self.scan_index.lock().expect("index");
        ix.remember_stamps(&pre.dst.entries, &pre.report.stamps, later);
        assert!(!ix.is_empty(), "no stamps learned");
    }

    /// The replica's answer to a `RoundSame` with `digest` after a prescan.
    pub fn same_as(&mut self, digest: [u8; 32]) -> Result<ApplySummary, String> {
        let pre = self.prescan()?;
        same(&self.replica, &pre, &digest, &self.detect, &self.sweep)
            .map(|(s, _)| s)
            .map_err(|e| e.to_string())
    }

    /// A partial round of `changed` paths (as the source has them now),
    /// `deleted` and `renamed`, with small contents inline; then the
    /// replica's root hash is the source's.
    pub fn partial(
        &mut self,
        changed: &[&str],
        deleted: &[&str],
        renamed: &[(&str, &str)],
    ) -> Result<ApplySummary, String> {
        let whole = self.source_manifest();
        // With their parent directories, whose mtimes the changes moved (as
        // the agent's batches carry them).
        let named = changed
            .iter()
            .chain(deleted)
            .chain(renamed.iter().flat_map(|(a, b)| [a, b]));
        let mut paths: Vec<RelPath> = named
            .flat_map(|p| {
                let p = rel(p);
                let parent = p.split_last().map(|(d, _)| d);
                [Some(p), parent]
            })
            .flatten()
            .filter(|p| !deleted.contains(&p.to_string().as_str()))
            .collect();
        paths.sort();
        paths.dedup();
        let entries: Vec<Entry> = paths
            .iter()
            .filter_map(|p| whole.get(p).map(|(_, e)| e.clone()))
            .collect();
        let inline: Vec<(u64, Vec<u8>)> = (0..entries.len())
            .filter_map(|i| {
                let data = Loopback {
                    root: self.src.path(),
                }
                .content(i as u64, &entries[i])?;
                (data.len() <= proto::MAX_INLINE).then_some((i as u64, data))
            })
            .collect();
        let deleted: Vec<RelPath> = deleted.iter().map(|p| rel(p)).collect();
        let renamed: Vec<(RelPath, RelPath)> =
            renamed.iter().map(|(a, b)| (rel(a), rel(b))).collect();
        let out = Outgoing {
            id: self.id(),
            full: false,
            checksum: false,
            verify: true,
            entries: &entries,
            renamed: &renamed,
            deleted: &deleted,
            root_hash: [0; 32],
        };
        let msgs: Vec<Message> = out.messages(inline).collect();
        let sum = self.send(msgs)?;
        self.assert_mirrored_but_root_mtime();
        Ok(sum)
    }

    /// Feeds messages to the replica side as they would arrive; the round
    /// they complete is applied.
    pub fn send(
        &mut self,
        msgs: impl IntoIterator<Item = Message>,
    ) -> Result<ApplySummary, String> {
        let mut asm = Assembler::new();
        for m in msgs {
            match asm.handle(m).map_err(|e| e.to_string())? {
                Some(Event::Round(r)) => return self.apply(r),
                Some(Event::Promote { epoch }) => return Err(format!("promote {epoch}")),
                Some(Event::Same { id, .. }) => return Err(format!("round {id} is the same")),
                None => {}
            }
        }
        Err("the messages ended inside a round".into())
    }

    /// The replica engine's phases, in the agent's order, contents from the
    /// source tree; a failed round is aborted as the agent aborts it.
    pub fn apply(&mut self, r: Incoming) -> Result<ApplySummary, String> {
        let round = Round::from(r);
        check(&round, self.replica.root_path()).map_err(|e| e.to_string())?;
        let res = self.apply_checked(round);
        if res.is_err() {
            self.replica.abort();
        }
        self.live.end_round();
        res.map_err(|e| e.to_string())
    }

    fn apply_checked(&mut self, mut round: Round) -> Result<ApplySummary, Error> {
        round.map_ids(&self.ids);
        let r = &self.replica;
        let (kept, planned) = keep(std::mem::take(&mut round.src), &self.filter);
        let mut sum = ApplySummary::default();
        let prep = Prepare {
            filter: &self.filter,
            detect: self.detect.clone(),
            full: round.full,
            checksum: round.compares_content(),
            renamed: &round.renamed,
            deleted: &round.deleted,
            sweep: &self.sweep,
        };
        let Prepared {
            dst,
            mut plan,
            leftovers,
        } = prepare(r, &planned, &prep, self.prescanned.take(), &mut sum)?;
        if leftovers.is_some() {
            self.leftovers = leftovers;
        }
        make(r, &planned, &mut plan, &self.filter, &mut sum)?;
        let (inlined, pulled) = split_inline(&plan, &kept, &mut round.inline);
        let (files, bytes) = write_whole(r, &planned, inlined)?;
        sum.files_inline += files;
        sum.files_transferred += files;
        sum.bytes_literal += bytes;
        let loopback = Loopback {
            root: self.src.path(),
        };
        let contents = pull(&loopback, &planned, &kept, &pulled);
        let (files, bytes) = write_whole(r, &planned, contents)?;
        sum.files_transferred += files;
        sum.bytes_literal += bytes;
        for &i in &plan.dbs {
            let e = &planned.entries[i];
            if let Some(pages) = self.ship_db(e, dst.get(&e.path).map(|(_, d)| &d.meta))? {
                sum.databases_applied += 1;
                sum.db_pages += pages;
            }
        }
        let mut sum = finish(r, &planned, &plan, &dst, sum)?;
        if round.verify {
            let (d, f) = (self.detect.clone(), self.filter.clone());
            let v = verify(r, d, f, &planned, &self.ids)?;
            add_verified(&mut sum, v, round.full);
        }
        Ok(sum)
    }

    /// One database brought to the source's snapshot, pages from the
    /// source's cut (what the agent's database exchange carries).
    fn ship_db(&self, e: &Entry, current: Option<&proto::Meta>) -> Result<Option<u64>, Error> {
        let Kind::Database {
            page_size,
            pages,
            hash,
        } = e.kind
        else {
            return Ok(None);
        };
        let r = &self.replica;
        let table = r.page_table(&e.path)?;
        if table.as_ref().is_some_and(|h| h.hash == hash) {
            if current != Some(&e.meta) {
                r.set_meta(e)?;
            }
            return Ok(None);
        }
        let have = table.as_ref().map_or([0; 32], |h| h.hash);
        let wanted = match self.live.need(&e.path, &have) {
            Need::Nothing => Vec::new(),
            Need::Pages(p) => p,
            Need::Hashes => match &table {
                Some(h) => self.live.differing(&e.path, h.page_size, &h.hashes),
                None => self.live.differing(&e.path, 0, &[]),
            },
        };
        let db = DbGeometry {
            page_size,
            pages,
            hash,
        };
        let bad = |why: String| Error::invalid(&e.path, why);
        let mut fetch = DbFetch::new(db);
        let mut staged = r.stage_db(&e.path, table, page_size, pages)?;
        // The pages as the source sends them, through the replica's machine.
        let mut feed = |m: Message| -> Result<Option<u64>, Error> {
            match fetch.handle(m).map_err(|x| bad(x.to_string()))? {
                DbStep::Pages(batch) => {
                    for (p, data) in batch {
                        staged.page(p, &data)?;
                    }
                }
                DbStep::Run { first, data } => staged.run(first, &data)?,
                DbStep::Commit => return Ok(Some(fetch.received())),
                DbStep::SendHashes => return Err(bad("hashes asked, none sent".into())),
            }
            Ok(None)
        };
        for batch in wanted.chunks(pages_per_batch(page_size)) {
            for m in page_messages(page_size, self.live.runs(&e.path, batch)?) {
                feed(m)?;
            }
        }
        // the end commits or is refused: nothing else comes of it
        let received = feed(Message::DbEnd {
            page_size,
            pages,
            hash,
        })?;
        staged.commit(&hash, &e.meta)?;
        Ok(received)
    }

    /// The replica's tree, scanned as the source's is: the same root hash.
    pub fn assert_mirrored(&mut self) {
        self.compare(true);
    }

    /// The same, but for the root directory's mtime. A partial round that
    /// does not carry the root leaves it as the round's journal (or a
    /// database's) left it once the session touched the root (the replica
    /// forgets what it touched per session, not per round); the next full
    /// round sets it.
    pub fn assert_mirrored_but_root_mtime(&mut self) {
        self.compare(false);
    }

    fn compare(&mut self, root_mtime: bool) {
        let mut want = self.source_manifest();
        let (mut own, _) = own_manifest(&self.replica, self.detect.clone(), self.filter.clone())
            .expect("the replica scans");
        for e in &mut own.entries {
            e.meta = self.ids.meta(&e.meta, crate::idmap::Direction::ToRemote);
        }
        if !root_mtime {
            for m in [&mut want, &mut own] {
                if let Some(root) = m.entries.first_mut().filter(|e| e.path.is_root()) {
                    (root.meta.mtime_sec, root.meta.mtime_nsec) = (0, 0);
                }
            }
        }
        let diff = crate::manifest::diff(&want, &own);
        assert!(diff.is_empty(), "{diff:?}");
        assert_eq!(own.root_hash(), want.root_hash());
    }
}

pub(super) fn rel(p: &str) -> RelPath {
    RelPath::new(p.as_bytes().to_vec()).expect("a valid test path")
}
