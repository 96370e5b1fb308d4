//! File system calls relative to an open directory, for the tree walk: no
//! call has the kernel resolve more than one name, and none follows a symlink
//! (a directory is opened `O_NOFOLLOW`, an entry is stat'ed and its xattrs
//! listed with `AT_SYMLINK_NOFOLLOW`).

use crate::index::Stamp;
use crate::{Meta, RelPath};
use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, RawDir, StatxFlags};
use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the walk needs of a `statx` result.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stat {
    pub kind: FileType,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub dev: u64,
    pub ino: u64,
    pub rdev: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub ctime_sec: i64,
    pub ctime_nsec: u32,
}

impl Stat {
    /// The entry's metadata, xattrs left empty (as [`crate::meta::from_stat`]).
    pub fn meta(&self) -> Meta {
        Meta {
            mode: self.mode & 0o7777,
            uid: self.uid,
            gid: self.gid,
            mtime_sec: self.mtime_sec,
            mtime_nsec: self.mtime_nsec,
            xattrs: Vec::new(),
        }
    }

    /// The content stamp (as [`Stamp::of`]).
    pub fn stamp(&self) -> Stamp {
        Stamp {
            dev: self.dev,
            ino: self.ino,
            size: self.size,
            mtime_ns: i128::from(self.mtime_sec) * 1_000_000_000 + i128::from(self.mtime_nsec),
            ctime_ns: i128::from(self.ctime_sec) * 1_000_000_000 + i128::from(self.ctime_nsec),
        }
    }
}

/// `statx` of `name` in `dir`, not following a symlink (`name` empty: `dir`
/// itself).
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    let mut flags = AtFlags::SYMLINK_NOFOLLOW;
    if name.is_empty() {
        flags |= AtFlags::EMPTY_PATH;
    }
    let x = rustix::fs::statx(dir, name, flags, StatxFlags::BASIC_STATS)?;
    Ok(Stat {
        kind: FileType::from_raw_mode(u32::from(x.stx_mode)),
        mode: u32::from(x.stx_mode),
        uid: x.stx_uid,
        gid: x.stx_gid,
        nlink: x.stx_nlink,
        size: x.stx_size,
        dev: rustix::fs::makedev(x.stx_dev_major, x.stx_dev_minor),
        ino: x.stx_ino,
        rdev: rustix::fs::makedev(x.stx_rdev_major, x.stx_rdev_minor),
        mtime_sec: x.stx_mtime.tv_sec,
        mtime_nsec: x.stx_mtime.tv_nsec,
        ctime_sec: x.stx_ctime.tv_sec,
        ctime_nsec: x.stx_ctime.tv_nsec,
    })
}

/// Opens the directory `name` in `dir` for reading, never through a symlink.
pub fn open_dir_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(dir, name, flags, Mode::empty())?)
}

/// Opens the directory `rel` below `root` in one `openat2`, never through a
/// symlink nor out of `root` (`ELOOP` or `ENOTDIR` when a symlink is met):
/// the confined open the replica's writes go through too.
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &RelPath) -> io::Result<OwnedFd> {
    use rustix::fs::ResolveFlags;
    if rel.is_root() {
        return open_dir_at(root, c".");
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    Ok(rustix::fs::openat2(
        root,
        rel.as_bytes(),
        flags,
        Mode::empty(),
        resolve,
    )?)
}

/// The target of the symlink `name` in `dir`.
pub(crate) fn readlink_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Vec<u8>> {
    Ok(rustix::fs::readlinkat(dir, name, Vec::new())?.into_bytes())
}

/// The names in the directory `fd` (without `.` and `..`), sorted bytewise.
/// `buf` is scratch space for `getdents64`, kept between directories.
pub(crate) fn read_names(fd: BorrowedFd<'_>, buf: &mut Vec<MaybeUninit<u8>>) -> io::Result<Names> {
    if buf.is_empty() {
        buf.resize(64 * 1024, MaybeUninit::uninit());
    }
    let mut names = Names::default();
    let mut dir = RawDir::new(fd, buf.as_mut_slice());
    while let Some(e) = dir.next() {
        let e = e?;
        let name = e.file_name().to_bytes_with_nul();
        if name == b".\0" || name == b"..\0" {
            continue;
        }
        names.spans.push((names.bytes.len(), name.len() - 1));
        names.bytes.extend_from_slice(name);
    }
    let bytes = &names.bytes;
    names
        .spans
        .sort_unstable_by(|a, b| bytes[a.0..a.0 + a.1].cmp(&bytes[b.0..b.0 + b.1]));
    Ok(names)
}

/// A directory's names, each stored once with its NUL.
#[derive(Debug, Default)]
pub(crate) struct Names {
    bytes: Vec<u8>,
    /// (start, length without the NUL), in sorted order.
    spans: Vec<(usize, usize)>,
}

impl Names {
    /// How many names.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// The `i`th name, as bytes and as a C string.
    pub fn get(&self, i: usize) -> (&[u8], &CStr) {
        let (start, len) = self.spans[i];
        let with_nul = &self.bytes[start..=start + len];
        // The kernel's names hold no NUL: the one at `len` is ours.
        let c = CStr::from_bytes_with_nul(with_nul).unwrap_or(c"");
        (&with_nul[..len], c)
    }
}

/// Set once the kernel has said it lacks `listxattrat`/`getxattrat`.
static NO_XATTRAT: AtomicBool = AtomicBool::new(false);

#[cfg(test)]
thread_local! {
    /// Tests: act as a kernel without `listxattrat`/`getxattrat`, on this thread.
    pub(crate) static NO_XATTRAT_HERE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether `e` says the call is not there: `ENOSYS` from a kernel before
/// 6.13, or `EPERM` from a seccomp filter that does not know it (container
/// runtimes' older default profiles).
fn lacking(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM))
}

/// The syscall numbers to use, unless the kernel lacks them.
fn xattrat() -> Option<(libc::c_long, libc::c_long)> {
    #[cfg(test)]
    if NO_XATTRAT_HERE.get() {
        return None;
    }
    XATTRAT.filter(|_| !NO_XATTRAT.load(Ordering::Relaxed))
}

/// `listxattrat`/`getxattrat` (Linux 6.13), on the architectures whose
/// syscall numbers we know; `None` elsewhere.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
const XATTRAT: Option<(libc::c_long, libc::c_long)> = Some((465, 464));
#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
const XATTRAT: Option<(libc::c_long, libc::c_long)> = None;

/// The longest xattr list or value Linux has (`XATTR_LIST_MAX`,
/// `XATTR_SIZE_MAX`).
const XATTR_MAX: usize = 65_536;

/// The NUL-separated xattr names of `name` in `dir` (not following a
/// symlink), into `out`; `Ok(false)` when the kernel lacks `listxattrat`
/// (the caller reads by path instead).
pub(crate) fn list_xattrs_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let Some((list_nr, _)) = xattrat() else {
        return Ok(false);
    };
    if out.capacity() < 256 {
        out.reserve(256);
    }
    loop {
        out.clear();
        match listxattrat(list_nr, dir, name, out) {
            Ok(()) => return Ok(true),
            Err(e) if lacking(&e) => {
                NO_XATTRAT.store(true, Ordering::Relaxed);
                return Ok(false);
            }
            // longer than `out`: again with room for the longest list
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => out.reserve(XATTR_MAX),
            Err(e) => return Err(e),
        }
    }
}

/// The value of xattr `attr` of `name` in `dir` (not following a symlink);
/// `Ok(None)` when the kernel lacks `getxattrat`.
pub(crate) fn get_xattr_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    attr: &CStr,
) -> io::Result<Option<Vec<u8>>> {
    let Some((_, get_nr)) = xattrat() else {
        return Ok(None);
    };
    let mut value: Vec<u8> = Vec::with_capacity(256);
    loop {
        match getxattrat(get_nr, dir, name, attr, &mut value) {
            Ok(()) => return Ok(Some(value)),
            Err(e) if lacking(&e) => {
                NO_XATTRAT.store(true, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => value.reserve(XATTR_MAX),
            Err(e) => return Err(e),
        }
    }
}

/// `listxattrat(dir, name, AT_SYMLINK_NOFOLLOW, out)`, filling `out` up to its
/// capacity.
#[allow(unsafe_code)]
fn listxattrat(
    nr: libc::c_long,
    dir: BorrowedFd<'_>,
    name: &CStr,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    use rustix::fd::AsRawFd;
    let cap = out.capacity();
    // SAFETY: `name` is NUL-terminated; the kernel writes at most `cap` bytes
    // into `out`'s spare capacity and returns how many; `dir` is open for the
    // call.
    let r = unsafe {
        libc::syscall(
            nr,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            out.as_mut_ptr(),
            cap,
        )
    };
    filled(r, out, cap)
}

/// What a call that wrote up to `cap` bytes into `out`'s spare capacity
/// returned (`r`: how many, or -1 and errno): `out` holds them.
#[allow(unsafe_code)]
fn filled(r: libc::c_long, out: &mut Vec<u8>, cap: usize) -> io::Result<()> {
    let n = usize::try_from(r).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialized the first `n <= cap` bytes.
    unsafe { out.set_len(n.min(cap)) };
    Ok(())
}

/// `struct xattr_args` of `getxattrat`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// `getxattrat(dir, name, AT_SYMLINK_NOFOLLOW, attr)`, into `out`'s capacity.
#[allow(unsafe_code)]
fn getxattrat(
    nr: libc::c_long,
    dir: BorrowedFd<'_>,
    name: &CStr,
    attr: &CStr,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    use rustix::fd::AsRawFd;
    let cap = out.capacity().min(u32::MAX as usize);
    let mut args = XattrArgs {
        value: out.as_mut_ptr() as u64,
        size: cap as u32,
        flags: 0,
    };
    // SAFETY: `name` and `attr` are NUL-terminated; `args` points the kernel
    // at `cap` bytes of `out`'s spare capacity, which it fills and counts;
    // `dir` is open for the call.
    let r = unsafe {
        libc::syscall(
            nr,
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            attr.as_ptr(),
            &mut args as *mut XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    };
    filled(r, out, cap)
}
