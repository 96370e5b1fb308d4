//! Following a database's write-ahead log from its frame headers.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::os::unix::fs::FileExt as _;
use std::path::Path;

/// Where we are in a database's write-ahead log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct WalPos {
    /// Salts of the log generation read so far.
    pub(crate) salts: Option<[u8; 8]>,
    /// Next frame (from 0) not yet read.
    pub(crate) next: u64,
}

/// Pages named by the committed frames of `wal` from `pos` up to `limit` bytes
/// (the log's size while writers were locked out); advances `pos` to just past
/// the last commit frame. `None` when the log cannot be followed (then every
/// page is compared).
pub(crate) fn wal_frames(wal: &Path, pos: &mut WalPos, limit: u64) -> Option<BTreeSet<u32>> {
    let mut f = match std::fs::File::open(wal) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // No log: nothing since the last cut unless one existed then.
            return pos.salts.is_none().then(BTreeSet::new);
        }
        Err(_) => return None,
    };
    let mut hdr = [0u8; 32];
    if limit < 32 || f.read_exact(&mut hdr).is_err() {
        return pos.salts.is_none().then(BTreeSet::new);
    }
    let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    if magic & !1 != 0x377f_0682 {
        return None;
    }
    let page_size = u32::from_be_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]);
    let page_size = if page_size == 1 { 65536 } else { page_size };
    if !proto::valid_page_size(page_size) {
        return None;
    }
    let mut salts = [0u8; 8];
    salts.copy_from_slice(&hdr[16..24]);
    // A new generation: our held snapshot kept the old one from being reset
    // while it had frames we had not read (module docs), so all of the new
    // one's frames are new to us.
    let start = if pos.salts == Some(salts) {
        pos.next
    } else {
        0
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
    Some(pages)
}
