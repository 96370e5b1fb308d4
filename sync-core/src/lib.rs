//! Trees and files for understudy, with no network.
//!
//! One module per concern:
//! - [`scan`]: walk a tree into a [`Manifest`] (kinds, numeric owners, modes with
//!   setuid/setgid/sticky, ns mtimes, xattrs of every namespace including POSIX ACLs,
//!   hard links, blake3 content hashes).
//! - [`manifest`]: the sorted entry list, its structural checks and its blake3
//!   Merkle root hash; [`manifest::diff`] lists differences for `verify`.
//! - [`plan`]: what a replica must do to turn its tree into the source's.
//! - [`delta`]: rsync-algorithm signatures, windowed deltas and bounded apply
//!   (fast_rsync), verified with blake3.
//! - [`apply`]: the replica side: every write confined beneath a held root
//!   directory fd, staged in a temp file, fsynced, metadata set on the fd, renamed
//!   into place.
//! - [`meta`]: reading and comparing metadata.
//! - [`index`]: the persistent hash index (SQLite), so restarts rehash nothing.
//! - [`filter`]: gitignore-style excludes.
//! - [`sqlite`]: live SQLite databases: consistent cuts, page hashes, page apply.
//! - [`engine`]: the replica's round engine, one round's synchronous phases
//!   (and [`engine::content`], where contents come from).
//! - [`diverged`]: what a returning old master alone held, kept aside before
//!   its repair.
//!
//! Everything here is synchronous; the agent calls it from `spawn_blocking`.
//!
//! ```no_run
//! let m = sync_core::scan::scan(std::path::Path::new("/srv/config"), &Default::default())?;
//! println!("{} entries, root {}", m.entries.len(), sync_core::hex(&m.root_hash()));
//! # Ok::<(), sync_core::Error>(())
//! ```

pub mod apply;
mod db_detect;
pub mod delta;
pub mod digest;
pub mod diverged;
pub mod engine;
mod error;
pub mod filter;
mod fsat;
pub mod holders;
pub mod idmap;
pub mod index;
pub mod manifest;
pub mod meta;
pub mod plan;
pub mod scan;
pub mod sqlite;

pub use error::Error;
pub use fsat::{open_dir_at, open_dir_beneath};

pub use manifest::Manifest;
pub use proto::{Entry, Kind, Meta, RelPath, Xattr};

/// The prefix of every temp file understudy writes; reserved: an entry with this
/// prefix from a peer is refused, and such files are swept at start.
pub const TEMP_PREFIX: &[u8] = b".understudy.tmp.";

/// Whether a file name is one of our temp names.
#[must_use]
pub fn is_temp_name(name: &[u8]) -> bool {
    name.starts_with(TEMP_PREFIX)
}

/// Hex digits of the random suffix of a temp name this agent makes.
pub const TEMP_SUFFIX_LEN: usize = 16;

/// Whether `name` has exactly the shape of a temp name this agent makes: the
/// prefix and [`TEMP_SUFFIX_LEN`] lower-case hex digits of a random suffix.
/// Other names with the prefix (`.understudy.tmp.notes`) are someone else's.
#[must_use]
pub fn is_own_temp_name(name: &[u8]) -> bool {
    name.strip_prefix(TEMP_PREFIX).is_some_and(|rest| {
        rest.len() == TEMP_SUFFIX_LEN && rest.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Crash-test hook: when `UNDERSTUDY_FAILPOINT` names this step, the process
/// aborts here, as a `kill -9` at that instant would leave things (tests kill
/// the replica at each step of an apply this way). Read once; absent in
/// production, where it costs one comparison.
pub fn failpoint(step: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if AT
        .get_or_init(|| std::env::var("UNDERSTUDY_FAILPOINT").ok())
        .as_deref()
        == Some(step)
    {
        eprintln!("failpoint {step}: aborting");
        std::process::abort();
    }
}

/// Lower-case hex of a hash, for output.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Returns freed heap pages to the system (`malloc_trim(0)`). glibc keeps
/// what was freed in its arenas (one per thread that allocated), so without
/// it a process stays at the peak of its last bulk phase, and a phase that
/// frees small blocks while it builds one large one (a scan's subtrees put
/// together) peaks at both. Costs a walk of the arenas' free lists
/// (milliseconds); does nothing with another C library.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of the heap and
    // in free chunks; it touches no live allocation, takes each arena's lock
    // and has no preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Builders shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use crate::{Entry, Kind, Meta, RelPath};

    /// An entry with default metadata.
    pub fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: RelPath::new(path.as_bytes()).unwrap(),
            kind,
            meta: Meta::default(),
        }
    }

    /// A regular file whose hash is its `tag` repeated.
    pub fn file(path: &str, size: u64, tag: u8) -> Entry {
        entry(
            path,
            Kind::File {
                size,
                hash: [tag; 32],
            },
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_temp_names_have_exactly_our_shape() {
        assert!(super::is_own_temp_name(b".understudy.tmp.0123456789abcdef"));
        for foreign in [
            &b".understudy.tmp.notes"[..],
            b".understudy.tmp.mine",
            b".understudy.tmp.journal",
            b".understudy.tmp.0123456789ABCDEF",
            b".understudy.tmp.0123456789abcde",
            b".understudy.tmp.0123456789abcdef0",
        ] {
            assert!(super::is_temp_name(foreign), "{foreign:?}");
            assert!(!super::is_own_temp_name(foreign), "{foreign:?}");
        }
        assert!(!super::is_own_temp_name(
            b"x.understudy.tmp.0123456789abcdef"
        ));
    }
}
