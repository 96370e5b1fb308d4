//! Direct I/O (`O_DIRECT`) for a whole new database's runs on the replica.
//!
//! A first copy of a large database writes it once and does not read it
//! back: through the page cache, every byte is copied into a new page-cache
//! page, written back later, and flushed again by the commit's `fsync`. On a
//! VM whose host lends memory lazily (free page reporting: this machine),
//! each new page-cache page also costs a fault in the host; measured on a
//! first push of the `large` corpus, half the replica's CPU went to that
//! copy. Written directly, the run goes from an aligned buffer to the disk
//! and leaves the page cache to the application.
//!
//! Writes must be aligned (file offset, length and buffer) to the file
//! system's direct-I/O alignment (`statx`'s `STATX_DIOALIGN`); a run that is
//! not, a file system that reports no alignment (tmpfs) or a write refused
//! with `EINVAL` takes the page cache as before.

use rustix::fs::{AtFlags, Mode, OFlags};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt as _;

/// The largest alignment taken (past it, the buffer's slack is not worth it).
const MAX_ALIGN: usize = 1 << 16;

/// The staging file opened again for direct writes.
#[derive(Debug)]
pub(super) struct Direct {
    file: File,
    align: usize,
    /// A run is copied here, at an aligned offset (the frame it came in is
    /// not aligned); as large as the largest run plus the alignment.
    buf: Vec<u8>,
}

impl Direct {
    /// The staging file `tmp` in `dir` (open as `staged`) for direct writes;
    /// `None` where the file system takes none, or reports no alignment, or
    /// the name no longer leads to the staging file.
    pub(super) fn open(dir: &OwnedFd, tmp: &[u8], staged: &File) -> Option<Self> {
        let fd = rustix::fs::openat(
            dir,
            tmp,
            OFlags::WRONLY | OFlags::DIRECT | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let (a, b) = (
            rustix::fs::fstat(&fd).ok()?,
            rustix::fs::fstat(staged).ok()?,
        );
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
            return None;
        }
        let align = dio_align(&fd)?;
        Some(Self {
            file: File::from(fd),
            align,
            buf: Vec::new(),
        })
    }

    /// Whether a write of `len` bytes at `at` is aligned for direct I/O.
    pub(super) fn fits(&self, at: u64, len: usize) -> bool {
        at.is_multiple_of(self.align as u64) && len.is_multiple_of(self.align)
    }

    /// Writes `data` at `at` (aligned: [`Direct::fits`]).
    pub(super) fn write(&mut self, data: &[u8], at: u64) -> std::io::Result<()> {
        if self.buf.len() < data.len() + self.align {
            self.buf.resize(data.len() + self.align, 0);
        }
        let off = self.buf.as_ptr().align_offset(self.align);
        let aligned = &mut self.buf[off..off + data.len()];
        aligned.copy_from_slice(data);
        self.file.write_all_at(aligned, at)
    }
}

/// The alignment direct I/O needs on the file open as `fd` (memory and file
/// offsets both), when its file system reports one.
pub(super) fn dio_align(fd: &OwnedFd) -> Option<usize> {
    let flags = rustix::fs::StatxFlags::DIOALIGN;
    let x = rustix::fs::statx(fd, "", AtFlags::EMPTY_PATH, flags).ok()?;
    if x.stx_mask & flags.bits() == 0 {
        return None;
    }
    let align = x.stx_dio_mem_align.max(x.stx_dio_offset_align) as usize;
    (align.is_power_of_two() && align <= MAX_ALIGN).then_some(align)
}

/// Asks the kernel to read, in the background and all at once, the pages of
/// the database open as `db` that the page records staged in `staged` (see
/// `PageRecords`) overwrite. SQLite's pager reads each page it overwrites,
/// one after another: on a database not in the page cache (written past it
/// by a first copy, or evicted since) each would wait on the disk. Best
/// effort: what fails only costs that wait. Returns the ranges asked for.
pub(super) fn prefetch(staged: &File, db: &File) -> usize {
    let (mut at, mut head) = (0u64, [0u8; 8]);
    let (mut run, mut asked): (Option<(u64, u64)>, usize) = (None, 0);
    let mut advise = |(off, len): (u64, u64)| {
        let len = std::num::NonZeroU64::new(len);
        let advice = rustix::fs::Advice::WillNeed;
        asked += usize::from(rustix::fs::fadvise(db, off, len, advice).is_ok());
    };
    while staged.read_exact_at(&mut head, at).is_ok() {
        let pgno = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if pgno == 0 || !proto::valid_page_size(len) {
            break;
        }
        let (off, len) = (u64::from(pgno - 1) * u64::from(len), u64::from(len));
        run = match run {
            Some((o, l)) if o + l == off => Some((o, l + len)),
            Some(r) => {
                advise(r);
                Some((off, len))
            }
            None => Some((off, len)),
        };
        at += 8 + len;
    }
    if let Some(r) = run {
        advise(r);
    }
    asked
}

#[cfg(test)]
impl Direct {
    /// The same writer, taking `align` as its alignment (a multiple of the
    /// file system's): runs that fit the file system but not this take
    /// the page cache.
    pub(super) fn with_align(mut self, align: usize) -> Self {
        self.align = self.align.max(align);
        self
    }
}

/// How many of `file`'s pages are in the page cache.
#[cfg(test)]
pub(super) fn resident(file: &File) -> usize {
    // SAFETY: a read-only shared mapping of a file no other thread of the
    // test resizes; only its residency is asked, no byte is read.
    #[allow(unsafe_code)]
    let map = unsafe { memmap2::Mmap::map(file) }.expect("map");
    // one byte a 4 KiB page: enough for any larger page size too
    let mut vec = vec![0u8; map.len().div_ceil(4096)];
    // SAFETY: `map` is a live mapping of `map.len()` bytes, page-aligned as
    // mmap returns it; `vec` holds one byte per page of it.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::mincore(
            map.as_ptr() as *mut libc::c_void,
            map.len(),
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|b| **b & 1 == 1).count()
}
