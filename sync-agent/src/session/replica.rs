//! The replica side of a session: rounds applied under the folder's root.

use super::{MAX_ROUND_BYTES, MAX_ROUND_ENTRIES, PARALLEL_FILES};
use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::{ApplySummary, Entry, ErrorCode, Hello, Kind, Message, RelPath, Role};
use std::collections::HashMap;
use std::sync::Arc;
use sync_core::Manifest;
use sync_core::apply::Replica;
use sync_core::delta;
use sync_core::filter::Filter;
use sync_core::scan::ScanOptions;
use tokio::sync::{Semaphore, mpsc};

/// A folder this replica serves.
#[derive(Debug)]
pub struct ReplicaFolder {
    /// Its name (as sources say in their hello).
    pub name: String,
    /// Its root, held open.
    pub replica: Arc<Replica>,
    /// Paths neither written nor deleted.
    pub filter: Filter,
    /// Peers allowed to push into this folder (empty: any pinned peer).
    pub allowed: Vec<crate::NodeId>,
    /// One session at a time per folder.
    pub lock: tokio::sync::Mutex<()>,
    /// When the last round was applied, for status.
    pub last_applied: std::sync::Mutex<Option<std::time::SystemTime>>,
    /// The connection of the session in progress: a source that reconnects
    /// supersedes its own stale session instead of waiting for it to time out.
    pub current: std::sync::Mutex<Option<(Option<crate::NodeId>, quinn::Connection)>>,
}

/// The folders of a replica; a replica with a single folder accepts any name.
pub type Folders = HashMap<String, Arc<ReplicaFolder>>;

fn pick<'f>(folders: &'f Folders, name: &str) -> Option<&'f Arc<ReplicaFolder>> {
    folders.get(name).or_else(|| {
        if folders.len() == 1 {
            folders.values().next()
        } else {
            None
        }
    })
}

/// A round as received.
#[derive(Debug)]
struct Incoming {
    id: u64,
    full: bool,
    checksum: bool,
    entries: Vec<Entry>,
    deleted: Vec<RelPath>,
    renamed: Vec<(RelPath, RelPath)>,
    inline: HashMap<u64, Vec<u8>>,
    root_hash: [u8; 32],
}

/// Serves one connection: hello, then rounds until the source ends the session.
pub async fn run(conn: quinn::Connection, folders: Arc<Folders>) -> Result<()> {
    let mut served = None;
    let res = run_inner(&conn, &folders, &mut served).await;
    // Forget this connection as the folder's current session, and close it.
    if let Some(folder) = served
        && let Ok(mut cur) = folder.current.lock()
        && cur
            .as_ref()
            .is_some_and(|(_, c)| c.stable_id() == conn.stable_id())
    {
        *cur = None;
    }
    conn.close(0u32.into(), b"bye");
    res
}

async fn run_inner(
    conn: &quinn::Connection,
    folders: &Folders,
    served: &mut Option<Arc<ReplicaFolder>>,
) -> Result<()> {
    let peer_id = crate::tls::peer_id(conn);
    let peer = peer_id
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    let (mut ctl_send, mut ctl_recv) = tokio::time::timeout(wire::STAGE_DEADLINE, conn.accept_bi())
        .await
        .map_err(|_| anyhow!("peer {peer} opened no control stream"))?
        .context("waiting for the control stream")?;
    let folder = match wire::expect_soon(&mut ctl_recv, "a hello").await? {
        Message::Hello(h) => {
            let refusal = match h.check() {
                Err(e) => Some((ErrorCode::UnsupportedVersion, e.to_string())),
                Ok(()) if h.role != Role::Source => {
                    Some((ErrorCode::Protocol, "peer is not a source".to_string()))
                }
                Ok(()) => match pick(folders, &h.folder) {
                    None => Some((
                        ErrorCode::Other,
                        format!("this replica serves no folder named {:?}", h.folder),
                    )),
                    Some(f)
                        if !f.allowed.is_empty()
                            && !peer_id.is_some_and(|p| f.allowed.contains(&p)) =>
                    {
                        Some((
                            ErrorCode::Other,
                            format!("peer {peer} may not push into folder {:?}", f.name),
                        ))
                    }
                    Some(_) => None,
                },
            };
            if let Some((code, message)) = refusal {
                wire::send(
                    &mut ctl_send,
                    &Message::Error {
                        code,
                        message: message.clone(),
                    },
                )
                .await?;
                let _ = ctl_send.finish();
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), ctl_send.stopped())
                    .await;
                bail!("peer {peer}: {message}");
            }
            pick(folders, &h.folder)
                .cloned()
                .ok_or_else(|| anyhow!("folder vanished"))?
        }
        other => bail!("peer {peer} opened with {other:?} instead of a hello"),
    };
    wire::send(
        &mut ctl_send,
        &Message::Hello(Hello::new(Role::Replica, &folder.name)),
    )
    .await?;
    *served = Some(folder.clone());
    // The same peer reconnecting supersedes its own stale session; another peer
    // waits its turn.
    let stale = folder.current.lock().ok().and_then(|mut c| {
        let same_peer = c.as_ref().is_some_and(|(p, _)| *p == peer_id);
        let old = c.replace((peer_id, conn.clone()));
        old.filter(|_| same_peer).map(|(_, c)| c)
    });
    if let Some(old) = stale {
        old.close(1u32.into(), b"superseded by a new session");
    }
    let _guard = folder.lock.lock().await;
    folder.replica.reset();
    tracing::info!(%peer, folder = %folder.name, "source connected");
    loop {
        let round = match read_round(&mut ctl_recv).await {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(e) => {
                return fail(conn, &mut ctl_send, &folder, e, ErrorCode::Protocol, &peer).await;
            }
        };
        let (id, full) = (round.id, round.full);
        match apply_round(conn, &folder, round).await {
            Ok(summary) => {
                if let Ok(mut t) = folder.last_applied.lock() {
                    *t = Some(std::time::SystemTime::now());
                }
                wire::send(&mut ctl_send, &Message::RoundDone { id, summary }).await?;
                if full {
                    crate::trim_heap();
                }
            }
            Err(e) => return fail(conn, &mut ctl_send, &folder, e, ErrorCode::Apply, &peer).await,
        }
    }
    let _ = ctl_send.finish();
    Ok(())
}

async fn fail(
    conn: &quinn::Connection,
    ctl_send: &mut quinn::SendStream,
    folder: &ReplicaFolder,
    e: anyhow::Error,
    code: ErrorCode,
    peer: &str,
) -> Result<()> {
    let r = folder.replica.clone();
    let _ = tokio::task::spawn_blocking(move || r.abort()).await;
    let message = format!("{e:#}");
    let _ = wire::send(ctl_send, &Message::Error { code, message }).await;
    let _ = ctl_send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
    Err(e.context(format!("session with peer {peer}, folder {}", folder.name)))
}

async fn read_round(ctl: &mut quinn::RecvStream) -> Result<Option<Incoming>> {
    let (id, full, checksum) = match wire::recv(ctl).await? {
        None => return Ok(None),
        Some(Message::RoundStart { id, full, checksum }) => (id, full, checksum),
        Some(other) => bail!("expected a round, got {other:?}"),
    };
    let mut r = Incoming {
        id,
        full,
        checksum,
        entries: Vec::new(),
        deleted: Vec::new(),
        renamed: Vec::new(),
        inline: HashMap::new(),
        root_hash: [0; 32],
    };
    let mut bytes = 0u64;
    loop {
        let count = (r.entries.len() + r.deleted.len() + r.renamed.len()) as u64;
        if count > MAX_ROUND_ENTRIES {
            bail!("round {id} larger than {MAX_ROUND_ENTRIES} entries");
        }
        if bytes > MAX_ROUND_BYTES {
            bail!("round {id} larger than {MAX_ROUND_BYTES} bytes of entries");
        }
        match wire::expect_soon(ctl, "the rest of the round").await? {
            Message::Manifest(b) => {
                for e in &b {
                    let target = match &e.kind {
                        Kind::Symlink { target } => target.len(),
                        Kind::HardLink { target } => target.as_bytes().len(),
                        _ => 0,
                    };
                    let xattrs: usize = e
                        .meta
                        .xattrs
                        .iter()
                        .map(|x| x.name.len() + x.value.len() + 48)
                        .sum();
                    bytes += (e.path.as_bytes().len() + target + xattrs + 128) as u64;
                }
                r.entries.extend(b);
            }
            Message::Deleted(b) => {
                bytes += b
                    .iter()
                    .map(|p| p.as_bytes().len() as u64 + 24)
                    .sum::<u64>();
                r.deleted.extend(b);
            }
            Message::Renamed(b) => {
                bytes += b
                    .iter()
                    .map(|(a, c)| (a.as_bytes().len() + c.as_bytes().len()) as u64 + 48)
                    .sum::<u64>();
                r.renamed.extend(b);
            }
            Message::Inline { index, data } => {
                bytes += data.len() as u64 + 16;
                r.inline.insert(index, data);
            }
            Message::RoundEnd {
                id: end,
                entries,
                root_hash,
            } => {
                if end != id || entries != r.entries.len() as u64 {
                    bail!(
                        "round {id} ended as round {end} with {entries} entries announced, {} carried",
                        r.entries.len()
                    );
                }
                r.root_hash = root_hash;
                return Ok(Some(r));
            }
            other => bail!("expected the rest of round {id}, got {other:?}"),
        }
    }
}

async fn apply_round(
    conn: &quinn::Connection,
    folder: &Arc<ReplicaFolder>,
    round: Incoming,
) -> Result<ApplySummary> {
    let src = Manifest {
        entries: round.entries,
    };
    if round.full {
        src.check_structure().context("manifest from the source")?;
        if src.root_hash() != round.root_hash {
            bail!("manifest does not match its announced root hash");
        }
    } else {
        if let Some(w) = src.entries.windows(2).find(|w| w[0].path >= w[1].path) {
            bail!("round entries not sorted at {}", w[1].path);
        }
        let reserved = |p: &RelPath| {
            p.split_last()
                .is_some_and(|(_, n)| sync_core::is_temp_name(n))
        };
        let named = src
            .entries
            .iter()
            .map(|e| &e.path)
            .chain(round.deleted.iter())
            .chain(round.renamed.iter().flat_map(|(a, b)| [a, b]));
        if let Some(p) = named.clone().find(|p| reserved(p)) {
            bail!("entry {p}: name uses the reserved temp-file prefix");
        }
    }
    // Excluded entries are dropped; `kept` maps what is planned back to the
    // round's indexes, which the source serves.
    let filter = &folder.filter;
    let kept: Vec<usize> = (0..src.entries.len())
        .filter(|&i| !filter.excludes(&src.entries[i].path, src.entries[i].kind == Kind::Dir))
        .collect();
    let planned = Arc::new(Manifest {
        entries: kept.iter().map(|&i| src.entries[i].clone()).collect(),
    });
    let (r, s, f) = (folder.replica.clone(), planned.clone(), filter.clone());
    let (full, deleted, renamed, mut inline) =
        (round.full, round.deleted, round.renamed, round.inline);
    // A partial round (a few paths) always compares content; a full round does
    // when asked (rsync -c), by size and mtime otherwise, as rsync does.
    let checksum = round.checksum || !full;
    let (dst, plan, mut summary) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut sum = ApplySummary::default();
        let opts = ScanOptions {
            hash: checksum,
            hard_links: false,
            filter: f.clone(),
        };
        // Excludes are matched with the replica's own kind of the entry.
        let excluded = |p: &RelPath| {
            let is_dir = std::fs::symlink_metadata(sync_core::scan::abs(r.root_path(), p))
                .map(|m| m.is_dir())
                .unwrap_or(false);
            f.excludes(p, is_dir)
        };
        for (from, to) in renamed.iter().filter(|(a, b)| !excluded(a) && !excluded(b)) {
            r.rename(from, to);
        }
        for p in deleted.iter().filter(|p| !excluded(p)) {
            r.remove_all(p)?;
            sum.entries_deleted += 1;
        }
        let mut linked = std::collections::HashSet::new();
        let dst = if full {
            let (dst, report) = sync_core::scan::scan_with(r.root_path(), &opts, None)?;
            let swept = r.sweep_temps(&report.temp_files)?;
            if swept > 0 {
                tracing::info!(swept, "removed temp files left by an interrupted run");
            }
            linked = report.multi_linked;
            dst
        } else {
            let mut entries = Vec::with_capacity(s.entries.len());
            for e in &s.entries {
                let (d, report) = sync_core::scan::entry_at(r.root_path(), &e.path, &opts, None)?;
                linked.extend(report.multi_linked);
                entries.extend(d);
            }
            Manifest { entries }
        };
        let plan = sync_core::plan::plan_with_links(&s, &dst, checksum, &linked);
        for p in &plan.delete {
            r.remove_all(p)?;
            sum.entries_deleted += 1;
        }
        for &i in &plan.mkdir {
            r.mkdir(&s.entries[i].path)?;
            sum.others_created += 1;
        }
        for &i in &plan.create {
            r.create(&s.entries[i])?;
            sum.others_created += 1;
        }
        Ok((dst, plan, sum))
    })
    .await??;

    // Content that came with the round is written first; the rest is pulled.
    let (mut pulled, mut inlined) = (Vec::new(), Vec::new());
    for f in plan.fetch.iter().copied() {
        match inline.remove(&(kept[f.index] as u64)) {
            Some(data) => inlined.push((f.index, data)),
            None => pulled.push(f),
        }
    }
    if !inlined.is_empty() {
        let (r, s) = (folder.replica.clone(), planned.clone());
        let (files, bytes) = tokio::task::spawn_blocking(move || -> Result<(u64, u64)> {
            let (mut files, mut bytes) = (0, 0);
            for (i, data) in inlined {
                let e = &s.entries[i];
                let Kind::File { hash, .. } = e.kind else {
                    continue;
                };
                let mut staged = r.stage(&e.path)?;
                staged.write(&data)?;
                staged.commit(&hash, &e.meta)?;
                files += 1;
                bytes += data.len() as u64;
            }
            Ok((files, bytes))
        })
        .await??;
        summary.files_transferred += files;
        summary.files_inline += files;
        summary.bytes_literal += bytes;
    }
    // Content, in parallel; stop starting transfers once one has failed.
    let sem = Arc::new(Semaphore::new(PARALLEL_FILES));
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed: Option<anyhow::Error> = None;
    type Done = std::result::Result<Result<Option<(u64, u64)>>, tokio::task::JoinError>;
    fn add(done: Done, summary: &mut ApplySummary, failed: &mut Option<anyhow::Error>) {
        match done.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok(Some((lit, matched))) => {
                summary.files_transferred += 1;
                summary.bytes_literal += lit;
                summary.bytes_matched += matched;
            }
            Ok(None) => {}
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    }
    for f in pulled {
        let permit = sem.clone().acquire_owned().await?;
        let (conn, r, entry) = (
            conn.clone(),
            folder.replica.clone(),
            planned.entries[f.index].clone(),
        );
        let index = kept[f.index] as u64;
        tasks.spawn(async move {
            let res = fetch_file(conn, r, entry, index, f.basis).await;
            drop(permit);
            res
        });
        while let Some(done) = tasks.try_join_next() {
            add(done, &mut summary, &mut failed);
        }
        if failed.is_some() {
            break;
        }
    }
    // Every transfer ends (and its writer with it) before the round does.
    while let Some(done) = tasks.join_next().await {
        add(done, &mut summary, &mut failed);
    }
    if let Some(e) = failed {
        return Err(e);
    }

    // Renames into place, links, metadata, directories, durability.
    let (r, s) = (folder.replica.clone(), planned.clone());
    let summary = tokio::task::spawn_blocking(move || -> Result<ApplySummary> {
        r.flush()?;
        for &i in &plan.hardlink {
            let e = &s.entries[i];
            if let Kind::HardLink { target } = &e.kind {
                r.hardlink(&e.path, target)?;
                summary.others_created += 1;
            }
        }
        for &i in &plan.meta {
            r.set_meta(&s.entries[i])?;
            summary.meta_updated += 1;
        }
        for &i in &plan.dirs {
            let e = &s.entries[i];
            r.finish_dir(e, dst.get(&e.path).map(|(_, d)| &d.meta))?;
        }
        r.finish()?;
        summary.warnings = r.take_warnings();
        Ok(summary)
    })
    .await??;
    Ok(summary)
}

/// Pulls one file: signature of our basis up, content down, staged and checked.
async fn fetch_file(
    conn: quinn::Connection,
    replica: Arc<Replica>,
    entry: Entry,
    index: u64,
    basis: bool,
) -> Result<Option<(u64, u64)>> {
    let (r, path) = (replica.clone(), entry.path.clone());
    let basis = if basis {
        tokio::task::spawn_blocking(move || -> Result<_> {
            Ok(match r.open_basis(&path)? {
                Some(map) if map.len() as u64 >= delta::MIN_DELTA_SIZE => {
                    let sig = delta::signature(&map);
                    Some((map, sig))
                }
                _ => None,
            })
        })
        .await??
    } else {
        None
    };
    let (map, signature) = match basis {
        Some((m, s)) => (Some(m), Some(s)),
        None => (None, None),
    };
    let (mut send, mut recv) = conn.open_bi().await.context("opening a file stream")?;
    wire::send(&mut send, &Message::FileRequest { index, signature }).await?;
    let _ = send.finish();

    let (tx, rx) = mpsc::channel::<Message>(2);
    let writer =
        tokio::task::spawn_blocking(move || write_file(&replica, &entry, map.as_deref(), rx));
    let reading = async {
        loop {
            let msg = wire::expect_soon(&mut recv, "file content").await?;
            let end = matches!(msg, Message::FileEnd { .. });
            if !matches!(
                msg,
                Message::Literal(_) | Message::Delta(_) | Message::FileEnd { .. }
            ) {
                bail!("expected file content, got {msg:?}");
            }
            if tx.send(msg).await.is_err() || end {
                return Ok(());
            }
        }
    }
    .await;
    // The writer ends (committing or removing its temp file) before we return.
    drop(tx);
    let written = writer.await?;
    reading?;
    written
}
fn write_file(
    replica: &Replica,
    entry: &Entry,
    basis: Option<&[u8]>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<Option<(u64, u64)>> {
    let Kind::File {
        size: want_size,
        hash: want_hash,
    } = entry.kind
    else {
        bail!("{}: content for a {}", entry.path, entry.kind.name());
    };
    // A file that changed at the source since it was scanned is not installed
    // with the scan's metadata: it is left as it was and the next round sends it.
    let changed = |why: String| {
        replica.warn(format!("{}: changed at the source during transfer ({why}); left as it was, sent again next round", entry.path));
        Ok(None)
    };
    let mut staged = replica.stage(&entry.path)?;
    let (mut literal, mut matched) = (0u64, 0u64);
    let mut out = Vec::new();
    while let Some(msg) = rx.blocking_recv() {
        match msg {
            Message::Literal(data) => {
                literal += data.len() as u64;
                staged.write(&data)?;
            }
            Message::Delta(d) => {
                let base = basis.ok_or_else(|| anyhow!("{}: delta without a basis", entry.path))?;
                out.clear();
                delta::apply_delta(base, &d, &mut out, delta::WINDOW)
                    .map_err(|e| anyhow!("{}: {e}", entry.path))?;
                let lit = (d.len() as u64).min(out.len() as u64);
                literal += lit;
                matched += out.len() as u64 - lit;
                staged.write(&out)?;
            }
            Message::FileEnd { size, hash } => {
                if size != staged.len() {
                    bail!(
                        "{}: source announced {size} bytes, {} arrived",
                        entry.path,
                        staged.len()
                    );
                }
                if size != want_size || hash != want_hash {
                    return changed(format!("{size} bytes now, {want_size} when scanned"));
                }
                staged.commit(&hash, &entry.meta)?;
                return Ok(Some((literal, matched)));
            }
            other => bail!("unexpected {other:?}"),
        }
        if staged.len() > want_size {
            return changed(format!("more than the {want_size} bytes scanned"));
        }
    }
    bail!("{}: stream ended before the file was complete", entry.path)
}
