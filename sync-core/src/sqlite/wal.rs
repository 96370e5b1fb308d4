//! Following a database's write-ahead log from its frame headers.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

/// Where we are in a database's write-ahead log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct WalPos {
    /// Salts of the log generation read so far.
    pub(crate) salts: Option<[u8; 8]>,
    /// Next frame (from 0) not yet read.
    pub(crate) next: u64,
}

/// Pages named by the committed frames of `wal` up to `limit` bytes (the log's
/// size while writers were locked out) that a cut at `pos` has not seen;
/// advances `pos` to just past the last commit frame. `None` when the log
/// cannot tell (then every page is compared).
///
/// No snapshot is held between cuts, so the log may have been checkpointed and
/// reset (or deleted and made anew) since `pos`: its frames past `pos` are then
/// gone. `base_unchanged` says the database file itself is surely unwritten
/// since the last cut: no checkpoint moved anything into it, so no reset can
/// have dropped a frame we had not read, and everything since is in the
/// current log.
pub(crate) fn wal_frames(
    wal: &Path,
    pos: &mut WalPos,
    limit: u64,
    base_unchanged: bool,
) -> Option<BTreeSet<u32>> {
    let last = std::mem::take(pos);
    let (f, hdr) = match header(wal, limit) {
        Ok(Some(h)) => h,
        // No log: nothing since the last cut unless the database was written.
        Ok(None) => return base_unchanged.then(BTreeSet::new),
        Err(()) => return None,
    };
    let (page_size, salts) = generation(&hdr)?;
    let (start, exact) = if last.salts == Some(salts) {
        (last.next, true)
    } else {
        // A new generation since the last cut.
        (0, base_unchanged)
    };
    let frame = 24 + u64::from(page_size);
    let (mut pages, mut txn) = (BTreeSet::new(), Vec::new());
    let mut next = start;
    let mut i = start;
    let mut fh = [0u8; 24];
    while 32 + (i + 1) * frame <= limit {
        if f.read_exact_at(&mut fh, 32 + i * frame).is_err() || fh[8..16] != salts {
            break;
        }
        txn.push(u32::from_be_bytes([fh[0], fh[1], fh[2], fh[3]]));
        i += 1;
        if fh[4..8] != [0; 4] {
            // a commit frame ends a transaction
            pages.extend(txn.drain(..));
            next = i;
        }
    }
    *pos = WalPos {
        salts: Some(salts),
        next,
    };
    exact.then_some(pages)
}

/// Every page named by a frame of `wal`'s current generation within its
/// first `limit` bytes (the log's size under the cut's lock), committed or
/// not: the pages a snapshot taken then may read from the log, and maybe a
/// few more (`whole.rs`). Read after the lock is released: the snapshot keeps
/// those frames from being overwritten should it read any of them, and
/// otherwise reads none. `None` when the log cannot be read.
pub(crate) fn log_pages(wal: &Path, limit: u64) -> Option<BTreeSet<u32>> {
    let (f, hdr) = match header(wal, limit) {
        Ok(Some(h)) => h,
        Ok(None) => return Some(BTreeSet::new()),
        Err(()) => return None,
    };
    let (page_size, salts) = generation(&hdr)?;
    let frame = 24 + u64::from(page_size);
    let mut pages = BTreeSet::new();
    let mut fh = [0u8; 24];
    let mut i = 0u64;
    while 32 + (i + 1) * frame <= limit {
        // a log that shrank since was reset: its snapshot read no frame,
        // but say so rather than guess
        f.read_exact_at(&mut fh, 32 + i * frame).ok()?;
        if fh[8..16] != salts {
            break;
        }
        pages.insert(u32::from_be_bytes([fh[0], fh[1], fh[2], fh[3]]));
        i += 1;
    }
    Some(pages)
}

/// The salts of `wal`'s current generation (`None`: no log, an empty or
/// unreadable one, or not a log).
pub(crate) fn salts(wal: &Path) -> Option<[u8; 8]> {
    let (_, hdr) = header(wal, u64::MAX).ok()??;
    generation(&hdr).map(|(_, salts)| salts)
}

/// A log header's page size and salts (`None`: not a log's header, or a
/// page size SQLite never uses).
fn generation(hdr: &[u8; 32]) -> Option<(u32, [u8; 8])> {
    let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let page_size = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let page_size = if page_size == 1 { 65536 } else { page_size };
    if magic & !1 != 0x377f_0682 || !proto::valid_page_size(page_size) {
        return None;
    }
    let mut salts = [0u8; 8];
    salts.copy_from_slice(&hdr[16..24]);
    Some((page_size, salts))
}

/// The log file and its 32-byte header (`None`: no log, or an empty one;
/// `Err`: a log that cannot be read).
#[allow(clippy::result_unit_err)]
fn header(wal: &Path, limit: u64) -> Result<Option<(std::fs::File, [u8; 32])>, ()> {
    let mut f = match std::fs::File::open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(_) => return Err(()),
    };
    let mut hdr = [0u8; 32];
    if limit < 32 {
        return Ok(None);
    }
    f.read_exact(&mut hdr).map_err(|_| ())?;
    Ok(Some((f, hdr)))
}
