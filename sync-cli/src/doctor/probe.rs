//! What `doctor` asks the system: filesystem type and space, what a temp file
//! in a folder root keeps (xattrs, ACLs, nanosecond times), the folder's shape,
//! inotify limits, the PID namespace.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A filesystem magic number's name, and whether understudy has reasons to
/// warn about it.
#[must_use]
pub fn fs_name(magic: u64) -> (&'static str, Option<&'static str>) {
    match magic {
        0xEF53 => ("ext4 (or ext2/3)", None),
        0x5846_5342 => ("xfs", None),
        0x9123_683E => ("btrfs", None),
        0x2FC1_2FC1 => ("zfs", None),
        0x0102_1994 => ("tmpfs", Some("tmpfs is lost at reboot")),
        0xF2F5_2010 => ("f2fs", None),
        0x794C_7630 => (
            "overlayfs",
            Some("overlayfs (a container layer?): keep the folder on a bind-mounted volume"),
        ),
        0x6969 => (
            "nfs",
            Some(
                "inotify does not see changes made over NFS by other hosts; xattrs and ACLs may not be kept",
            ),
        ),
        0xFF53_4D42 | 0xFE53_4D42 => (
            "cifs/smb",
            Some(
                "inotify does not see changes made by other SMB clients; owners, modes and xattrs are not kept faithfully",
            ),
        ),
        0x6573_5546 => (
            "fuse (mergerfs, sshfs, …)",
            Some(
                "a FUSE filesystem may not deliver inotify events for changes below it or keep xattrs: unRAID users, point the folder at /mnt/cache or a disk share rather than /mnt/user",
            ),
        ),
        _ => ("unknown", None),
    }
}

/// What a walk of a folder found.
#[derive(Debug, Default, Clone, Copy)]
pub struct Shape {
    /// Directories, the root included.
    pub dirs: u64,
    /// Bytes in regular files.
    pub bytes: u64,
    /// The largest regular file.
    pub largest: u64,
    /// Whether the walk stopped at [`WALK_LIMIT`] entries.
    pub truncated: bool,
}

/// Entries a walk looks at, at most.
pub const WALK_LIMIT: u64 = 5_000_000;

/// Walks `root` (symlinks not followed, other filesystems included).
#[must_use]
pub fn shape(root: &Path) -> Shape {
    let mut s = Shape::default();
    let mut stack = vec![root.to_path_buf()];
    let mut seen = 0u64;
    while let Some(d) = stack.pop() {
        s.dirs += 1;
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            seen += 1;
            if seen > WALK_LIMIT {
                s.truncated = true;
                return s;
            }
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                s.bytes += m.len();
                s.largest = s.largest.max(m.len());
            }
        }
    }
    s
}

/// A temp file in a folder root, removed on drop. Its name is one the agent
/// skips (`.understudy.tmp.`).
#[derive(Debug)]
pub struct Probe(pub PathBuf);

impl Probe {
    /// Creates it.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        let p = root.join(format!(".understudy.tmp.doctor.{}", std::process::id()));
        std::fs::write(&p, b"understudy doctor probe")?;
        Ok(Self(p))
    }

    /// Which of the xattr namespaces `user`, `trusted`, `security` keep a value.
    #[must_use]
    pub fn xattrs(&self) -> Vec<(&'static str, Result<(), String>)> {
        ["user", "trusted", "security"]
            .into_iter()
            .map(|ns| (ns, self.keeps(&format!("{ns}.understudy_doctor"), b"1")))
            .collect()
    }

    /// Whether a POSIX access ACL with a named user entry is kept.
    pub fn acl(&self) -> Result<(), String> {
        // version 2; (tag u16, perm u16, id u32) entries sorted by tag:
        // USER_OBJ rw-, USER 4242 r--, GROUP_OBJ r--, MASK r--, OTHER r--.
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (0x01u16, 6u16, u32::MAX),
            (0x02, 4, 4242),
            (0x04, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 4, u32::MAX),
        ] {
            v.extend(tag.to_le_bytes());
            v.extend(perm.to_le_bytes());
            v.extend(id.to_le_bytes());
        }
        self.keeps("system.posix_acl_access", &v)
    }

    fn keeps(&self, name: &str, value: &[u8]) -> Result<(), String> {
        rustix::fs::setxattr(&self.0, name, value, rustix::fs::XattrFlags::empty())
            .map_err(|e| format!("setting {name}: {e}"))?;
        let n = rustix::fs::getxattr_query(&self.0, name)
            .map_err(|e| format!("reading {name} back: {e}"))?;
        if n == 0 {
            return Err(format!("{name} was not kept"));
        }
        Ok(())
    }

    /// The nanoseconds of an mtime set to `…​.123456789`, read back.
    pub fn mtime_ns(&self) -> Result<i64, String> {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        let f = std::fs::File::options()
            .write(true)
            .open(&self.0)
            .map_err(|e| e.to_string())?;
        f.set_modified(t)
            .map_err(|e| format!("setting the mtime: {e}"))?;
        let m = std::fs::metadata(&self.0).map_err(|e| e.to_string())?;
        Ok(m.mtime_nsec())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A `/proc/sys/fs/inotify/NAME` value.
#[must_use]
pub fn inotify_limit(name: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/sys/fs/inotify/{name}"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The inode of the initial PID namespace (`PROC_PID_INIT_INO`).
pub const INIT_PID_NS: u64 = 0xEFFF_FFFC;

/// The inode of this process's PID namespace.
#[must_use]
pub fn pid_ns() -> Option<u64> {
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}
