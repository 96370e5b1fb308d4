//! Messages: everything that travels between two agents, one per frame.

use crate::{MAGIC, PROTOCOL_VERSION, RelPath};
use serde::{Deserialize, Serialize};

/// Most entries in one [`Message::Manifest`] batch.
pub const MAX_ENTRIES_PER_BATCH: usize = 4096;
/// Most extended attributes on one entry.
pub const MAX_XATTRS: usize = 1024;
/// Longest extended attribute name (Linux `XATTR_NAME_MAX`).
pub const MAX_XATTR_NAME: usize = 255;
/// Largest extended attribute value (Linux `XATTR_SIZE_MAX`).
pub const MAX_XATTR_VALUE: usize = 65536;
/// Most bytes of names and values of all extended attributes of one entry.
pub const MAX_XATTR_TOTAL: usize = 1 << 20;
/// Longest symlink target.
pub const MAX_LINK_TARGET: usize = 4095;
/// Longest free-text field (error messages, software names).
pub const MAX_TEXT: usize = 4096;

/// Which end of a folder a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Sends changes.
    Source,
    /// Applies changes.
    Replica,
}

/// The first frame each side sends on a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// The sender's [`PROTOCOL_VERSION`].
    pub version: u32,
    /// The sender's role on this session.
    pub role: Role,
    /// Free text: software name and version, for logs.
    pub software: String,
    /// The folder this session is about (a replica may serve several).
    pub folder: String,
    /// The sender's fencing epoch for the folder: a replica refuses a source whose
    /// epoch is older than its own (a resurrected old master).
    pub epoch: u64,
    /// A replica's answer to "could you serve the folder as its source if
    /// promoted?" (its `failover` is not off and it knows its peer's address).
    /// The source's preflight refuses a handover to a replica that says no,
    /// before anything is stopped. A source always says yes.
    pub promotable: bool,
    /// The sender's wall clock when it sent this, in ms since the Unix epoch
    /// (0: not said). The other side compares it with its own to report
    /// clock skew (`sync-cli doctor`); nothing decides on it.
    pub sent_unix_ms: u64,
}

impl Hello {
    /// A hello for this build, about `folder`.
    #[must_use]
    pub fn new(role: Role, folder: &str) -> Self {
        Self {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            role,
            software: concat!("understudy ", env!("CARGO_PKG_VERSION")).to_string(),
            folder: folder.to_string(),
            epoch: 0,
            promotable: true,
            sent_unix_ms: 0,
        }
    }

    /// The same hello, stamped with the sender's clock (`unix_ms`).
    #[must_use]
    pub fn sent_at(mut self, unix_ms: u64) -> Self {
        self.sent_unix_ms = unix_ms;
        self
    }

    /// The same hello, carrying `epoch`.
    #[must_use]
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The same hello, saying whether the sender could be promoted.
    #[must_use]
    pub fn with_promotable(mut self, promotable: bool) -> Self {
        self.promotable = promotable;
        self
    }

    /// Checks magic and version against ours.
    pub fn check(&self) -> Result<(), HandshakeError> {
        if self.magic != MAGIC {
            return Err(HandshakeError::UnknownMagic);
        }
        if self.version != PROTOCOL_VERSION {
            return Err(HandshakeError::UnsupportedVersion {
                ours: PROTOCOL_VERSION,
                theirs: self.version,
            });
        }
        Ok(())
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer does not speak this protocol at all.
    #[error("peer is not an understudy agent (bad magic)")]
    UnknownMagic,
    /// The peer speaks another version.
    #[error("peer speaks protocol version {theirs}, this build speaks version {ours}")]
    UnsupportedVersion {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
}

/// What kind of filesystem object an entry is, with what only that kind has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// A regular file.
    File {
        /// Size in bytes.
        size: u64,
        /// blake3 of the content.
        hash: [u8; 32],
    },
    /// A directory.
    Dir,
    /// A symbolic link, never dereferenced.
    Symlink {
        /// The link's target, as stored.
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// A further name of a regular file met earlier in the same manifest.
    HardLink {
        /// The first name of the inode in manifest order.
        target: RelPath,
    },
    /// A named pipe.
    Fifo,
    /// A unix socket node.
    Socket,
    /// A character device.
    CharDev {
        /// Device number.
        rdev: u64,
    },
    /// A block device.
    BlockDev {
        /// Device number.
        rdev: u64,
    },
    /// A live SQLite database, shipped as pages of a consistent snapshot (never as
    /// a raw file; its `-wal`, `-shm` and `-journal` files never travel).
    Database {
        /// Page size in bytes (a power of two, 512 to 65536).
        page_size: u32,
        /// Number of pages in the snapshot.
        pages: u32,
        /// Page Merkle hash of the snapshot (see `sync_core::sqlite::db_hash`).
        hash: [u8; 32],
    },
}

impl Kind {
    /// A short name for messages.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            Kind::File { .. } => "file",
            Kind::Dir => "directory",
            Kind::Symlink { .. } => "symlink",
            Kind::HardLink { .. } => "hard link",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDev { .. } => "character device",
            Kind::BlockDev { .. } => "block device",
            Kind::Database { .. } => "database",
        }
    }
}

/// One extended attribute (of any namespace; POSIX ACLs travel as
/// `system.posix_acl_access` and `system.posix_acl_default`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Xattr {
    /// Full name with namespace, e.g. `user.comment`.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Raw value (may be empty or binary).
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Metadata that travels with every entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Permission bits with setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Numeric owner.
    pub uid: u32,
    /// Numeric group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds part.
    pub mtime_nsec: u32,
    /// Extended attributes, sorted by name.
    pub xattrs: Vec<Xattr>,
}

/// One manifest entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where, relative to the folder root.
    pub path: RelPath,
    /// What.
    pub kind: Kind,
    /// With what metadata.
    pub meta: Meta,
}

/// Error codes carried by [`Message::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer's protocol version is not ours.
    UnsupportedVersion,
    /// A message broke the protocol.
    Protocol,
    /// The receiver could not apply (disk full, permission, ...).
    Apply,
    /// The sender could not read.
    Source,
    /// Anything else.
    Other,
    /// The peer's fencing epoch is older than ours: it was demoted.
    Fenced,
}

/// Counters the replica reports at the end of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplySummary {
    /// Regular files whose content was written.
    pub files_transferred: u64,
    /// Of those, files whose content came inline with the round (no request).
    pub files_inline: u64,
    /// Entries removed because the source no longer has them.
    pub entries_deleted: u64,
    /// Entries whose metadata alone changed.
    pub meta_updated: u64,
    /// Directories, symlinks, hard links and special files made.
    pub others_created: u64,
    /// Content bytes that crossed as literal data.
    pub bytes_literal: u64,
    /// Content bytes rebuilt from the replica's own basis.
    pub bytes_matched: u64,
    /// Things the replica could not preserve, one line each (never silent).
    pub warnings: Vec<String>,
    /// Databases brought to the round's snapshot.
    pub databases_applied: u64,
    /// Database pages written.
    pub db_pages: u64,
    /// The replica's own root hash after the round, when the round asked for it
    /// (computed from a fresh scan of the replica's tree).
    pub root_hash: Option<[u8; 32]>,
    /// Databases not updated because another process holds them open, each
    /// with its holders: the source offers them again soon, and a handover's
    /// preflight refuses while there is one.
    pub held: Vec<HeldDb>,
    /// A verified round (a cut): what the replica's folder `parity` command
    /// printed (the app's version there), or why it failed; `None` when the
    /// replica has none. A handover compares it with the source's.
    pub parity: Option<String>,
}

/// A replica database another process holds open (the standby's
/// application left running), so the replica leaves it alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldDb {
    /// The database.
    pub path: RelPath,
    /// Who holds it, for people (`pid 42 (jellyfin), pid 43 (sqlite3)`); at
    /// most [`MAX_TEXT`] bytes.
    pub holders: String,
}

impl std::fmt::Display for HeldDb {
    /// `path: holders`, as status and a handover's preflight name it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.holders)
    }
}

/// How many variants [`Message`] has (the decoder names others as unknown types).
pub(crate) const MESSAGE_TYPES: u32 = 29;

/// Everything that travels, one per frame.
///
/// A session is a hello each way, then rounds. A round is `RoundStart`, any
/// number of `Manifest`, `Deleted`, `Renamed` and `Inline` frames, and
/// `RoundEnd`, all from the source on the control stream; the replica pulls the
/// content it still lacks with `FileRequest` (or, for many small files,
/// `FilesRequest`) on streams of its own and answers
/// `RoundDone` (or `Error`).
/// A full round carries the whole manifest: the replica removes what it lacks.
/// A partial round carries only changed entries and explicit deletions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First frame of a session, both ways.
    Hello(Hello),
    /// The session is ending because of this.
    Error {
        /// Category.
        code: ErrorCode,
        /// Human text naming the cause.
        message: String,
    },
    /// A round begins.
    RoundStart {
        /// Increasing round number.
        id: u64,
        /// Whether the round carries the whole manifest.
        full: bool,
        /// Compare regular files by content hash, not size and mtime (rsync -c).
        checksum: bool,
        /// Report the replica's root hash, from a fresh scan, in `RoundDone`.
        verify: bool,
    },
    /// A batch of manifest entries, in path order.
    Manifest(Vec<Entry>),
    /// Paths (and everything below them) that the source no longer has.
    Deleted(Vec<RelPath>),
    /// Renames seen by the source, applied before anything else of the round.
    Renamed(Vec<(RelPath, RelPath)>),
    /// The round's entries are complete.
    RoundEnd {
        /// Round number.
        id: u64,
        /// Number of manifest entries in the round.
        entries: u64,
        /// The source's root hash after the round (checked on full rounds).
        root_hash: [u8; 32],
    },
    /// Replica → source on a fresh stream: send the content of entry `index` of
    /// the current round.
    FileRequest {
        /// Position of the entry in the round's manifest.
        index: u64,
        /// fast_rsync signature of the replica's basis, if it has one.
        #[serde(with = "serde_bytes")]
        signature: Option<Vec<u8>>,
    },
    /// Literal bytes of the requested file, in order.
    Literal(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A fast_rsync delta producing the next part of the requested file.
    Delta(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The requested file is complete (see also [`Message::ScannedEnd`]).
    FileEnd {
        /// Bytes sent in all.
        size: u64,
        /// blake3 of exactly what was sent.
        hash: [u8; 32],
    },
    /// The replica applied the round.
    RoundDone {
        /// Round number.
        id: u64,
        /// What it did.
        summary: ApplySummary,
    },
    /// The whole content of a small file of a partial round, sent with the round
    /// so that the hot path needs no request per file.
    Inline {
        /// Position of the entry in the round's manifest.
        index: u64,
        /// Its content.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Replica → source on a fresh stream: bring database entry `index` to the
    /// round's snapshot. `have` is the page Merkle hash the replica holds (zeros
    /// for none).
    DbRequest {
        /// Position of the entry in the round's manifest.
        index: u64,
        /// What the replica holds.
        have: [u8; 32],
    },
    /// Source → replica: the source does not know `have`; send page hashes.
    DbNeedHashes,
    /// Replica → source: the page hashes of what it holds, in page order, in
    /// batches; `last` ends them.
    DbHashes {
        /// Page size of the replica's database (0 when it has none).
        page_size: u32,
        /// The next page hashes.
        hashes: Vec<[u8; 32]>,
        /// Whether this is the last batch.
        last: bool,
    },
    /// Source → replica: page images of the snapshot, by page number (from 1).
    DbPages(#[serde(with = "page_images")] Vec<(u32, Vec<u8>)>),
    /// Source → replica: the pages are complete; the database has `pages` pages
    /// of `page_size` bytes and hash `hash`.
    DbEnd {
        /// Page size.
        page_size: u32,
        /// Page count.
        pages: u32,
        /// Page Merkle hash.
        hash: [u8; 32],
    },
    /// Source → replica on the control stream, between rounds: the replica becomes
    /// the source of the folder at `epoch` (after the final cut).
    Promote {
        /// The new epoch (the old one plus one).
        epoch: u64,
    },
    /// Replica → source: promoted (its start hook ran), or why not.
    Promoted {
        /// The epoch now persisted.
        epoch: u64,
        /// Empty on success; the failure otherwise (the replica stayed as it was).
        error: String,
    },
    /// A [`Message::Manifest`] batch as it travels: its entries' encoding,
    /// zstd-compressed (paths share prefixes, metadata repeats: a tree's
    /// manifest shrinks several times). The frame layer packs and unpacks it
    /// ([`crate::frame`]); above it only `Manifest` is seen.
    ManifestPacked {
        /// Bytes of the entries' encoding (bounded by the frame limit before
        /// anything is inflated).
        raw_len: u32,
        /// The compressed encoding.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Source → replica on a stream the source opens, outside rounds (the
    /// bulk lane): stage the content of the large file `path` ahead of the
    /// round that carries its entry, so that the round does not wait for it
    /// (and the rounds of small changes not behind it). The replica answers
    /// `StageBasis`, the content follows as `Literal`/`Delta` and `FileEnd`,
    /// and the replica answers `Staged` (or `Error`). Nothing is installed
    /// until a round carries the entry with the same size and hash.
    StageFile {
        /// The file.
        path: RelPath,
        /// Its size when the source began (for the replica's time bound).
        size: u64,
    },
    /// Replica → source: the signature of the replica's version of the file
    /// (`None`: send it whole).
    StageBasis {
        /// fast_rsync signature, as in [`Message::FileRequest`].
        #[serde(with = "serde_bytes")]
        signature: Option<Vec<u8>>,
    },
    /// Replica → source: the content is staged, checked against `FileEnd`.
    Staged {
        /// Its size.
        size: u64,
        /// Its blake3.
        hash: [u8; 32],
    },
    /// Replica → source on the control stream, once per session, after its
    /// hello: the quick digest of its tree (`sync_core::digest`), from a scan
    /// made while the source scans its own; `None` when it has none to offer.
    TreeDigest {
        /// The digest.
        digest: Option<[u8; 32]>,
    },
    /// Source → replica on the control stream, in place of a full round whose
    /// entries have the replica's own quick digest: nothing to do. The replica
    /// checks `digest` against its scan and answers `RoundDone`.
    RoundSame {
        /// Round number.
        id: u64,
        /// Entries of the source's tree.
        entries: u64,
        /// The quick digest both trees have.
        digest: [u8; 32],
        /// The source's root hash.
        root_hash: [u8; 32],
    },
    /// Replica → source on a fresh stream: send the content of these small
    /// regular files of the current round (each at most [`MAX_BATCH_FILE`]
    /// bytes, no basis), one after another on this stream: each file's
    /// `Literal` frames then its `FileEnd`, in the order asked. Many small
    /// files cost one stream, not one each.
    FilesRequest {
        /// Positions of the entries in the round's manifest (1 to
        /// [`MAX_BATCH_FILES`]).
        indexes: Vec<u64>,
    },
    /// Source → replica: the page images of the snapshot from page `first`
    /// (from 1) on, one after another: `data` is a whole number of pages of
    /// the database's page size. A run of consecutive pages travels as one
    /// buffer, read, sent and written without a copy or an allocation per
    /// page (a whole database arrives as runs).
    DbRun {
        /// Number of the first page.
        first: u32,
        /// The pages' images.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The requested file is complete, and was not hashed as it was sent
    /// (new in version 8): it had not changed since well before the round's
    /// scan, so `hash` is the scan's. Content that does not hash to it
    /// changed since the scan (written with its times unmoved): the replica
    /// leaves its version, as for a `FileEnd` that is not the entry's.
    ScannedEnd {
        /// Bytes sent in all.
        size: u64,
        /// blake3 of the content as the scan found it.
        hash: [u8; 32],
    },
}

/// Most files one [`Message::FilesRequest`] names.
pub const MAX_BATCH_FILES: usize = 256;
/// Largest file (as the round's entry has it) a [`Message::FilesRequest`]
/// may name: the source reads each whole before sending it.
pub const MAX_BATCH_FILE: u64 = 256 << 10;

/// Most page hashes in one [`Message::DbHashes`] batch.
pub const MAX_HASHES_PER_BATCH: usize = 1 << 16;
/// Most pages in one [`Message::DbPages`] batch.
pub const MAX_PAGES_PER_BATCH: usize = 1024;
/// Largest SQLite page size.
pub const MAX_PAGE_SIZE: u32 = 65536;

/// Most pages of one database (2^24: 64 GiB at SQLite's default 4 KiB pages,
/// 1 TiB at 64 KiB). The replica keeps a 32-byte hash per page while a database
/// is staged, so this bounds that table to 512 MiB, charged to the round's byte
/// budget.
pub const MAX_DB_PAGES: u32 = 1 << 24;
/// Largest database, page size × pages (1 TiB).
pub const MAX_DB_BYTES: u64 = 1 << 40;

/// Whether `n` is a valid SQLite page size.
#[must_use]
pub fn valid_page_size(n: u32) -> bool {
    (512..=MAX_PAGE_SIZE).contains(&n) && n.is_power_of_two()
}

/// Largest file whose content travels inline with a partial round.
pub const MAX_INLINE: usize = 64 << 10;

/// Database page images on the wire: `(page number, bytes)` pairs, each image
/// a byte string (read in one copy, not a byte at a time; the encoding is the
/// same as a sequence of `u8`).
mod page_images {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub(super) fn serialize<S: Serializer>(v: &[(u32, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(n, d)| (*n, Bytes::new(d))))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<(u32, Vec<u8>)>, D::Error> {
        let v = Vec::<(u32, ByteBuf)>::deserialize(d)?;
        Ok(v.into_iter().map(|(n, b)| (n, b.into_vec())).collect())
    }
}
