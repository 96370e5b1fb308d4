//! One push session: the source sends its manifest and serves content requests;
//! the replica plans, applies, and pulls content on parallel streams.

use crate::wire;
use anyhow::{Context, Result, anyhow, bail};
use proto::{ApplySummary, ErrorCode, Hello, Kind, Message, Role};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;
use sync_core::Manifest;
use sync_core::apply::Replica;
use sync_core::delta::{self, Chunk, Encoder};
use tokio::sync::{Semaphore, mpsc};

/// Files fetched at once, each on its own stream.
pub const PARALLEL_FILES: usize = 16;
/// Bytes of manifest entries per frame (well under the frame limit).
const MANIFEST_FRAME_BYTES: usize = 4 << 20;
/// Most entries a replica accepts in one manifest.
pub const MAX_MANIFEST_ENTRIES: u64 = 20_000_000;

/// What a push did, as `--json` prints it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Entries in the source manifest (all kinds).
    pub entries_total: u64,
    /// Regular files in the source.
    pub files_total: u64,
    /// Files whose content was sent.
    pub files_transferred: u64,
    /// Entries removed on the replica.
    pub files_deleted: u64,
    /// Entries whose metadata alone was updated.
    pub meta_updated: u64,
    /// Directories, links and special files made.
    pub others_created: u64,
    /// Sum of the source's regular file sizes.
    pub bytes_total: u64,
    /// Content bytes sent literally.
    pub bytes_literal: u64,
    /// Content bytes rebuilt from the replica's basis.
    pub bytes_matched: u64,
    /// UDP payload bytes this side sent.
    pub bytes_sent_wire: u64,
    /// UDP payload bytes this side received.
    pub bytes_received_wire: u64,
    /// Seconds from start (scan included) to the replica's acknowledgement.
    pub elapsed_s: f64,
    /// Seconds spent scanning the source.
    pub scan_s: f64,
    /// The source's root hash.
    pub source_root: String,
    /// What the replica could not preserve.
    pub warnings: Vec<String>,
}

/// Live counters a progress display can poll.
#[derive(Debug, Default)]
pub struct Progress {
    /// Entries scanned so far... set once the scan ends.
    pub entries: AtomicU64,
    /// Bytes to send at most (the sizes of requested files).
    pub bytes_planned: AtomicU64,
    /// Content bytes read and sent so far.
    pub bytes_done: AtomicU64,
    /// Files completed.
    pub files_done: AtomicU64,
}

async fn handshake_client(
    conn: &quinn::Connection,
    version: u32,
) -> Result<(quinn::SendStream, quinn::RecvStream)> {
    let (mut send, mut recv) = conn.open_bi().await.context("opening the control stream")?;
    let mut hello = Hello::new(Role::Source);
    hello.version = version;
    wire::send(&mut send, &Message::Hello(hello)).await?;
    match wire::expect(&mut recv, "the replica's hello").await? {
        Message::Hello(h) => {
            h.check()
                .map_err(|e| anyhow!("replica refused the handshake: {e}"))?;
            if h.role != Role::Replica {
                bail!("peer is not serving as a replica");
            }
            Ok((send, recv))
        }
        Message::Error { message, .. } => bail!("replica refused the session: {message}"),
        other => bail!("replica sent {other:?} instead of a hello"),
    }
}

/// Source side of a push over an established connection: scan `root`, send the
/// manifest, serve content requests until the replica reports it is done.
pub async fn run_source(
    conn: quinn::Connection,
    root: PathBuf,
    progress: Arc<Progress>,
    protocol_version: u32,
) -> Result<Summary> {
    let started = Instant::now();
    let (mut ctl_send, mut ctl_recv) = handshake_client(&conn, protocol_version).await?;
    let scan_root = root.clone();
    let manifest =
        tokio::task::spawn_blocking(move || sync_core::scan::scan(&scan_root, &Default::default()))
            .await?
            .with_context(|| format!("scanning {}", root.display()))?;
    let scan_s = started.elapsed().as_secs_f64();
    let manifest = Arc::new(manifest);
    progress
        .entries
        .store(manifest.entries.len() as u64, Ordering::Relaxed);
    let root_hash = manifest.root_hash();

    // Manifest, in frames of bounded size.
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    for e in &manifest.entries {
        batch_bytes += e.path.as_bytes().len()
            + 64
            + e.meta
                .xattrs
                .iter()
                .map(|x| x.name.len() + x.value.len() + 8)
                .sum::<usize>();
        batch.push(e.clone());
        if batch.len() >= proto::MAX_ENTRIES_PER_BATCH || batch_bytes >= MANIFEST_FRAME_BYTES {
            wire::send(
                &mut ctl_send,
                &Message::Manifest(std::mem::take(&mut batch)),
            )
            .await?;
            batch_bytes = 0;
        }
    }
    if !batch.is_empty() {
        wire::send(&mut ctl_send, &Message::Manifest(batch)).await?;
    }
    wire::send(
        &mut ctl_send,
        &Message::ManifestEnd {
            entries: manifest.entries.len() as u64,
            root_hash,
        },
    )
    .await?;

    // Serve requests until the replica's verdict arrives on the control stream.
    let served = Arc::new(AtomicU64::new(0));
    let done = loop {
        tokio::select! {
            msg = wire::recv(&mut ctl_recv) => break msg?,
            incoming = conn.accept_bi() => {
                let (send, recv) = match incoming {
                    Ok(s) => s,
                    Err(e) => bail!("connection to the replica lost: {e}"),
                };
                let (m, r, p, s) = (manifest.clone(), root.clone(), progress.clone(), served.clone());
                tokio::spawn(async move {
                    if let Err(e) = serve_file(send, recv, m, r, p).await {
                        tracing::warn!("serving a file: {e:#}");
                    } else {
                        s.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    };
    let summary = match done {
        Some(Message::Done(s)) => s,
        Some(Message::Error { code, message }) => bail!("replica failed ({code:?}): {message}"),
        Some(other) => bail!("replica sent {other:?} instead of its summary"),
        None => bail!("replica closed the session before reporting"),
    };
    let _ = ctl_send.finish();
    let stats = conn.stats();
    conn.close(0u32.into(), b"done");
    Ok(Summary {
        entries_total: manifest.entries.len() as u64,
        files_total: manifest.files() as u64,
        files_transferred: summary.files_transferred,
        files_deleted: summary.entries_deleted,
        meta_updated: summary.meta_updated,
        others_created: summary.others_created,
        bytes_total: manifest.bytes_total(),
        bytes_literal: summary.bytes_literal,
        bytes_matched: summary.bytes_matched,
        bytes_sent_wire: stats.udp_tx.bytes,
        bytes_received_wire: stats.udp_rx.bytes,
        elapsed_s: started.elapsed().as_secs_f64(),
        scan_s,
        source_root: sync_core::hex(&root_hash),
        warnings: summary.warnings,
    })
}

/// Sends one requested file: its entry must be a regular file of our manifest, so
/// the replica can never name anything else.
async fn serve_file(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    manifest: Arc<Manifest>,
    root: PathBuf,
    progress: Arc<Progress>,
) -> Result<()> {
    let (index, signature) = match wire::expect(&mut recv, "a file request").await? {
        Message::FileRequest { index, signature } => (index, signature),
        other => bail!("expected a file request, got {other:?}"),
    };
    let entry = usize::try_from(index)
        .ok()
        .and_then(|i| manifest.entries.get(i))
        .ok_or_else(|| anyhow!("replica asked for entry {index}, beyond the manifest"))?;
    if !matches!(entry.kind, Kind::File { .. }) {
        bail!(
            "replica asked for {} which is not a regular file",
            entry.path
        );
    }
    let path = sync_core::scan::abs(&root, &entry.path);
    let (tx, mut rx) = mpsc::channel::<Message>(2);
    let reader = tokio::task::spawn_blocking(move || encode_file(&path, signature, tx, &progress));
    while let Some(msg) = rx.recv().await {
        wire::send(&mut send, &msg).await?;
    }
    reader.await??;
    send.finish()?;
    // Wait until the peer has read everything before the stream is dropped.
    let _ = send.stopped().await;
    Ok(())
}

fn encode_file(
    path: &Path,
    signature: Option<Vec<u8>>,
    tx: mpsc::Sender<Message>,
    progress: &Progress,
) -> Result<()> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let sig = signature
        .map(delta::parse_signature)
        .transpose()
        .with_context(|| format!("signature for {}", path.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut enc = Encoder::new(sig.as_ref());
    let mut hasher = blake3::Hasher::new();
    let mut size = 0u64;
    let mut buf = Vec::new();
    loop {
        let want = enc.window();
        buf.resize(want, 0);
        let mut got = 0;
        while got < want {
            match f.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            }
        }
        if got == 0 {
            break;
        }
        let data = &buf[..got];
        hasher.update(data);
        size += got as u64;
        let msg = match enc.encode(data) {
            Chunk::Literal(l) => Message::Literal(l),
            Chunk::Delta(d) => Message::Delta(d),
        };
        progress.bytes_done.fetch_add(got as u64, Ordering::Relaxed);
        if tx.blocking_send(msg).is_err() {
            bail!(
                "stream to the replica closed while sending {}",
                path.display()
            );
        }
        if got < want {
            break;
        }
    }
    let end = Message::FileEnd {
        size,
        hash: *hasher.finalize().as_bytes(),
    };
    if tx.blocking_send(end).is_err() {
        bail!(
            "stream to the replica closed while sending {}",
            path.display()
        );
    }
    progress.files_done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Replica side of one session on an accepted connection.
pub async fn run_replica(conn: quinn::Connection, replica: Arc<Replica>) -> Result<()> {
    let peer = crate::tls::peer_id(&conn)
        .map(|p| p.to_string())
        .unwrap_or_else(|| "unknown".into());
    let (mut ctl_send, mut ctl_recv) = conn
        .accept_bi()
        .await
        .context("waiting for the control stream")?;
    match wire::expect(&mut ctl_recv, "a hello").await? {
        Message::Hello(h) => {
            if let Err(e) = h.check() {
                let msg = format!("{e}");
                wire::send(
                    &mut ctl_send,
                    &Message::Error {
                        code: ErrorCode::UnsupportedVersion,
                        message: msg.clone(),
                    },
                )
                .await?;
                let _ = ctl_send.finish();
                let _ = ctl_send.stopped().await;
                bail!("peer {peer}: {msg}");
            }
        }
        other => bail!("peer {peer} opened with {other:?} instead of a hello"),
    }
    wire::send(&mut ctl_send, &Message::Hello(Hello::new(Role::Replica))).await?;

    let result = apply_session(&conn, &mut ctl_recv, replica.clone()).await;
    if result.is_err() {
        let r = replica.clone();
        let _ = tokio::task::spawn_blocking(move || r.abort()).await;
    }
    match result {
        Ok(summary) => {
            wire::send(&mut ctl_send, &Message::Done(summary)).await?;
            let _ = ctl_send.finish();
            // Let the source read the summary and close.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), conn.closed()).await;
            Ok(())
        }
        Err(e) => {
            let message = format!("{e:#}");
            let _ = wire::send(
                &mut ctl_send,
                &Message::Error {
                    code: ErrorCode::Apply,
                    message: message.clone(),
                },
            )
            .await;
            let _ = ctl_send.finish();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
            Err(e.context(format!("session with peer {peer}")))
        }
    }
}

async fn apply_session(
    conn: &quinn::Connection,
    ctl_recv: &mut quinn::RecvStream,
    replica: Arc<Replica>,
) -> Result<ApplySummary> {
    // Receive the manifest.
    let mut entries = Vec::new();
    let root_hash = loop {
        match wire::expect(ctl_recv, "the manifest").await? {
            Message::Manifest(batch) => {
                if entries.len() as u64 + batch.len() as u64 > MAX_MANIFEST_ENTRIES {
                    bail!("manifest larger than {MAX_MANIFEST_ENTRIES} entries");
                }
                entries.extend(batch);
            }
            Message::ManifestEnd {
                entries: n,
                root_hash,
            } => {
                if n != entries.len() as u64 {
                    bail!(
                        "manifest announced {n} entries but carried {}",
                        entries.len()
                    );
                }
                break root_hash;
            }
            other => bail!("expected the manifest, got {other:?}"),
        }
    };
    let src = Arc::new(Manifest { entries });
    src.check_structure().context("manifest from the source")?;
    if src.root_hash() != root_hash {
        bail!("manifest does not match its announced root hash");
    }

    // Scan, sweep temps, plan, and do the structural part.
    let (r, s) = (replica.clone(), src.clone());
    let (dst, plan, mut summary) = tokio::task::spawn_blocking(move || -> Result<_> {
        let opts = sync_core::scan::ScanOptions {
            hash: false,
            hard_links: false,
        };
        let (dst, report) = sync_core::scan::scan_with_report(r.root_path(), &opts)?;
        let swept = r.sweep_temps(&report.temp_files)?;
        if swept > 0 {
            tracing::info!(swept, "removed temp files left by an interrupted run");
        }
        let plan = sync_core::plan::plan(&s, &dst, false);
        let mut sum = ApplySummary::default();
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

    // Content, in parallel.
    let sem = Arc::new(Semaphore::new(PARALLEL_FILES));
    let mut tasks = tokio::task::JoinSet::new();
    for f in plan.fetch.clone() {
        let permit = sem.clone().acquire_owned().await?;
        let (conn, r, s) = (conn.clone(), replica.clone(), src.clone());
        tasks.spawn(async move {
            let res = fetch_file(conn, r, s, f).await;
            drop(permit);
            res
        });
        // Fail fast: stop starting new transfers once one has failed.
        while let Some(done) = tasks.try_join_next() {
            let (lit, matched) = done??;
            summary.files_transferred += 1;
            summary.bytes_literal += lit;
            summary.bytes_matched += matched;
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (lit, matched) = done??;
        summary.files_transferred += 1;
        summary.bytes_literal += lit;
        summary.bytes_matched += matched;
    }

    // Renames, links, metadata, directories, durability.
    let (r, s) = (replica.clone(), src.clone());
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
    src: Arc<Manifest>,
    f: sync_core::plan::Fetch,
) -> Result<(u64, u64)> {
    let entry = src.entries[f.index].clone();
    let (r, path) = (replica.clone(), entry.path.clone());
    let basis = if f.basis {
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
    wire::send(
        &mut send,
        &Message::FileRequest {
            index: f.index as u64,
            signature,
        },
    )
    .await?;
    let _ = send.finish();

    let (tx, rx) = mpsc::channel::<Message>(2);
    let writer =
        tokio::task::spawn_blocking(move || write_file(&replica, &entry, map.as_deref(), rx));
    loop {
        let msg = wire::expect(&mut recv, "file content").await?;
        let end = matches!(msg, Message::FileEnd { .. });
        if !matches!(
            msg,
            Message::Literal(_) | Message::Delta(_) | Message::FileEnd { .. }
        ) {
            bail!("expected file content, got {msg:?}");
        }
        if tx.send(msg).await.is_err() {
            break;
        }
        if end {
            break;
        }
    }
    drop(tx);
    writer.await?
}

fn write_file(
    replica: &Replica,
    entry: &proto::Entry,
    basis: Option<&[u8]>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<(u64, u64)> {
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
                staged.commit(&hash, &entry.meta)?;
                return Ok((literal, matched));
            }
            other => bail!("unexpected {other:?}"),
        }
    }
    bail!("{}: stream ended before the file was complete", entry.path)
}
