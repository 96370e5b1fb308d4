//! Direct I/O (`O_DIRECT`) for a whole new database and a large new file on
//! the replica.
//!
//! A replica writes such content once and does not read it back: through
//! the page cache every byte is copied into a new page-cache page and
//! written back later. On a VM whose host lends memory lazily (free page
//! reporting: this machine) each new page also costs a fault in the host;
//! measured on a first push of the `large` corpus, half the replica's CPU
//! went to that copy. Written directly, the content goes from an aligned
//! buffer to the disk and leaves the page cache to the application.
//!
//! [`Gather`] collects what arrives into aligned chunks and writes each at
//! once: a direct write waits for the disk, so its size sets the rate
//! (measured here, a gigabyte written with `O_DIRECT`: 1.4 s in 128 KiB
//! writes, a database run's size, 0.34 s in 4 MiB ones). A new file of
//! [`DIRECT_MIN`] bytes or more goes this way (its 1,500 files of 64 KiB-8
//! MiB in the `large` corpus, 339 MB: 0.77 s of CPU through the page cache,
//! 0.14 s direct; smaller files lose, each direct write waits for the disk);
//! its unaligned tail goes through the page cache at the end.
//!
//! Writes must be aligned (file offset, length and buffer) to the file
//! system's direct-I/O alignment (`statx`'s `STATX_DIOALIGN`). What is
//! written lies on `unit` boundaries (a file's hole blocks: the staged
//! writer hands over runs of data between aligned zero blocks; a database's
//! pages), so a file system whose alignment does not divide the unit, one
//! that reports no alignment (tmpfs), or a direct write refused with
//! `EINVAL` takes the page cache (the last from there on).

use rustix::fs::{AtFlags, Mode, OFlags};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt as _;

/// The largest alignment taken (past it, the buffer's slack is not worth it).
const MAX_ALIGN: usize = 1 << 16;

/// New files of at least this many bytes are written past the page cache.
pub const DIRECT_MIN: u64 = 256 << 10;
/// Bytes a file's content gathers before a direct write (at most: a file
/// smaller than this gathers its size).
pub(super) const FILE_CHUNK: usize = 1 << 20;
/// Bytes a whole new database gathers before a direct write.
pub(super) const DB_CHUNK: usize = 4 << 20;

/// Content on its way to the disk past the page cache.
#[derive(Debug)]
pub(super) struct Gather {
    /// The file open for direct writes; `None` once one was refused.
    direct: Option<File>,
    align: usize,
    /// `chunk + align` bytes; the chunk starts at `off`, aligned in memory.
    buf: Vec<u8>,
    chunk: usize,
    off: usize,
    fill: usize,
    /// File offset of the chunk's first byte.
    at: u64,
}

impl Gather {
    /// Direct writes of chunks of `chunk` bytes (a multiple of `unit`) to
    /// the temp file `tmp` in `dir` (open as `staged`), or `None` where the
    /// file system takes none or its alignment does not divide `unit` (what
    /// is written always starts and, but for the last piece, ends on a unit
    /// boundary).
    pub(super) fn open(
        (dir, tmp, staged): (&OwnedFd, &[u8], &File),
        unit: usize,
        chunk: usize,
    ) -> Option<Self> {
        let fd = reopen(dir, tmp, staged)?;
        let align = dio_align(&fd)?.max(test_align());
        if !unit.is_multiple_of(align) || !chunk.is_multiple_of(unit) {
            return None;
        }
        let buf = vec![0u8; chunk + align];
        let off = buf.as_ptr().align_offset(align);
        Some(Self {
            direct: Some(File::from(fd)),
            align,
            buf,
            chunk,
            off,
            fill: 0,
            at: 0,
        })
    }

    /// Takes `data`, which lies at `at` in the file (on a unit boundary); what
    /// was gathered is written first unless `data` continues it. `staged` is
    /// the file open through the page cache.
    pub(super) fn put(&mut self, mut data: &[u8], at: u64, staged: &File) -> std::io::Result<()> {
        if self.fill > 0 && at != self.at + self.fill as u64 {
            // (what was gathered ends on a unit boundary)
            self.write_out(self.fill, staged)?;
        }
        if self.fill == 0 {
            self.at = at;
        }
        while !data.is_empty() {
            let n = (self.chunk - self.fill).min(data.len());
            let start = self.off + self.fill;
            self.buf[start..start + n].copy_from_slice(&data[..n]);
            self.fill += n;
            data = &data[n..];
            if self.fill == self.chunk {
                self.write_out(self.chunk, staged)?;
            }
        }
        Ok(())
    }

    /// Writes what is gathered: the aligned part directly, the tail through
    /// the page cache. Content written through the page cache over a range
    /// that was gathered must come after this.
    pub(super) fn finish(&mut self, staged: &File) -> std::io::Result<()> {
        let aligned = self.fill - self.fill % self.align;
        let tail = self.fill - aligned;
        if aligned > 0 {
            self.write_out(aligned, staged)?;
        }
        if tail > 0 {
            let from = self.off;
            staged.write_all_at(&self.buf[from..from + tail], self.at)?;
            self.at += tail as u64;
            self.fill = 0;
        }
        Ok(())
    }

    /// Writes the first `n` gathered bytes (aligned) at `self.at` and keeps
    /// the rest for the next write.
    fn write_out(&mut self, n: usize, staged: &File) -> std::io::Result<()> {
        let chunk = &self.buf[self.off..self.off + n];
        let direct = match &self.direct {
            Some(d) => d.write_all_at(chunk, self.at),
            None => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        match direct {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.direct = None;
                staged.write_all_at(chunk, self.at)?;
            }
            r => r?,
        }
        self.at += n as u64;
        self.buf
            .copy_within(self.off + n..self.off + self.fill, self.off);
        self.fill -= n;
        Ok(())
    }

    /// Moves the chunk one byte out of memory alignment: the next direct
    /// write is refused (tests).
    #[cfg(test)]
    pub(super) fn misalign(&mut self) {
        self.off += 1;
    }

    /// The bytes its buffer holds (tests).
    #[cfg(test)]
    pub(super) fn capacity(&self) -> usize {
        self.buf.len()
    }

    /// Whether direct writes are still taken (tests).
    #[cfg(test)]
    pub(super) fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

#[cfg(test)]
thread_local! {
    /// An alignment tests ask for on top of the file system's.
    pub(super) static TEST_ALIGN: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}

/// The alignment tests ask for (1 outside tests).
fn test_align() -> usize {
    #[cfg(test)]
    return TEST_ALIGN.with(std::cell::Cell::get);
    #[cfg(not(test))]
    1
}

/// The staging file `tmp` in `dir` (open as `staged`) opened again for
/// direct writes; `None` where the file system refuses it or the name no
/// longer leads to the staging file.
pub(super) fn reopen(dir: &OwnedFd, tmp: &[u8], staged: &File) -> Option<OwnedFd> {
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
    ((a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)).then_some(fd)
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
