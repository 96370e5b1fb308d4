//! The bounds a message must keep that its types do not: checked by the
//! frame decoder, so a decoded message is always within them.

use crate::*;

/// A message that breaks a bound its types do not keep; the text names the
/// field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidateError {
    /// A text field longer than [`MAX_TEXT`].
    #[error("{0} longer than {MAX_TEXT} bytes")]
    TextTooLong(&'static str),
    /// A hello's folder name longer than 255 bytes.
    #[error("folder name longer than 255 bytes")]
    FolderNameTooLong,
    /// A manifest batch over [`MAX_ENTRIES_PER_BATCH`].
    #[error("manifest batch of {0} entries (at most {MAX_ENTRIES_PER_BATCH})")]
    TooManyEntries(usize),
    /// A deletion batch over [`MAX_ENTRIES_PER_BATCH`].
    #[error("{0} deletions in one batch")]
    TooManyDeletions(usize),
    /// A deletion of the folder's root.
    #[error("deletion of the root")]
    RootDeleted,
    /// A rename batch over [`MAX_ENTRIES_PER_BATCH`].
    #[error("{0} renames in one batch")]
    TooManyRenames(usize),
    /// A rename of the root, to the root, or into itself.
    #[error("rename of the root, to the root, or into itself")]
    BadRename,
    /// Inline content over [`MAX_INLINE`].
    #[error("inline content of {0} bytes (at most {MAX_INLINE})")]
    InlineTooLarge(usize),
    /// A files request naming none, or more than [`MAX_BATCH_FILES`].
    #[error("a files request for {0} files (1 to {MAX_BATCH_FILES})")]
    BatchSize(usize),
    /// A page hash batch over [`MAX_HASHES_PER_BATCH`].
    #[error("{0} page hashes in one batch")]
    TooManyHashes(usize),
    /// A page size that SQLite does not have.
    #[error("page size {0}")]
    PageSize(u32),
    /// A page batch over [`MAX_PAGES_PER_BATCH`].
    #[error("{0} pages in one batch")]
    TooManyPages(usize),
    /// Page 0, or a page whose length is not a page size.
    #[error("page {number} of {len} bytes")]
    BadPage {
        /// The page number.
        number: u32,
        /// Its length.
        len: usize,
    },
    /// A database end announcing a database out of bounds.
    #[error("database end: {0}")]
    DbEnd(DbBoundsError),
    /// A round summary with more than [`MAX_SUMMARY_LINES`] warnings.
    #[error("more than {MAX_SUMMARY_LINES} warnings")]
    TooManyWarnings,
    /// A round summary naming more than [`MAX_SUMMARY_LINES`] held databases.
    #[error("{0} held databases (at most {MAX_SUMMARY_LINES})")]
    TooManyHeld(usize),
    /// A manifest entry out of bounds.
    #[error("entry {path}: {why}")]
    Entry {
        /// The entry.
        path: RelPath,
        /// What is wrong with it.
        why: EntryError,
    },
}

/// Most warnings, and most held databases, in one round's summary.
pub const MAX_SUMMARY_LINES: usize = 1000;

/// A database's announced geometry out of bounds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DbBoundsError {
    /// A page size that SQLite does not have.
    #[error("database page size {0}")]
    PageSize(u32),
    /// More than [`MAX_DB_PAGES`] pages.
    #[error("database of {0} pages (at most {MAX_DB_PAGES})")]
    Pages(u32),
    /// More than [`MAX_DB_BYTES`] bytes.
    #[error(
        "database of {pages} pages of {page_size} bytes: {bytes} bytes (at most {MAX_DB_BYTES})"
    )]
    Bytes {
        /// Pages announced.
        pages: u32,
        /// Page size announced.
        page_size: u32,
        /// Their product.
        bytes: u64,
    },
}

/// What is wrong with one manifest entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// A database entry out of bounds.
    #[error(transparent)]
    Database(#[from] DbBoundsError),
    /// A symlink target empty, too long or holding NUL.
    #[error("symlink target empty, too long or holding NUL")]
    SymlinkTarget,
    /// A hard link to itself or to the root.
    #[error("hard link to itself or to the root")]
    HardLinkTarget,
    /// A root that is not a directory.
    #[error("the root must be a directory")]
    RootNotDir,
    /// Mode bits beyond 0o7777.
    #[error("mode {0:o} has bits beyond 0o7777")]
    Mode(u32),
    /// Nanoseconds of a second at or past 10^9.
    #[error("mtime nanoseconds out of range")]
    MtimeNsec,
    /// More than [`MAX_XATTRS`] xattrs.
    #[error("{0} xattrs (at most {MAX_XATTRS})")]
    TooManyXattrs(usize),
    /// An xattr name empty, too long or holding NUL.
    #[error("xattr name empty, too long or holding NUL")]
    XattrName,
    /// An xattr value over [`MAX_XATTR_VALUE`].
    #[error("xattr value of {0} bytes")]
    XattrValue(usize),
    /// More than [`MAX_XATTR_TOTAL`] bytes of xattrs.
    #[error("{0} bytes of xattrs")]
    XattrTotal(usize),
}

/// Checks a database's announced page size and page count against
/// [`MAX_PAGE_SIZE`], [`MAX_DB_PAGES`] and [`MAX_DB_BYTES`]; the error names
/// the field.
pub fn check_db_bounds(page_size: u32, pages: u32) -> Result<(), DbBoundsError> {
    if !valid_page_size(page_size) {
        return Err(DbBoundsError::PageSize(page_size));
    }
    if pages > MAX_DB_PAGES {
        return Err(DbBoundsError::Pages(pages));
    }
    let bytes = u64::from(page_size) * u64::from(pages);
    if bytes > MAX_DB_BYTES {
        return Err(DbBoundsError::Bytes {
            pages,
            page_size,
            bytes,
        });
    }
    Ok(())
}

/// A page batch: within [`MAX_PAGES_PER_BATCH`], no page 0, each a page size.
fn check_pages(pages: &[(u32, Vec<u8>)]) -> Result<(), ValidateError> {
    if pages.len() > MAX_PAGES_PER_BATCH {
        return Err(ValidateError::TooManyPages(pages.len()));
    }
    if let Some((n, d)) = pages
        .iter()
        .find(|(n, d)| *n == 0 || !valid_page_size(d.len() as u32))
    {
        return Err(ValidateError::BadPage {
            number: *n,
            len: d.len(),
        });
    }
    Ok(())
}

/// A run of pages: from page 1 on, some whole pages of the smallest page
/// size at least (the database's own size is the fetch's to check).
fn check_run(first: u32, data: &[u8]) -> Result<(), ValidateError> {
    if first == 0 || data.is_empty() || !data.len().is_multiple_of(512) {
        return Err(ValidateError::BadPage {
            number: first,
            len: data.len(),
        });
    }
    Ok(())
}

impl Message {
    /// Checks every bound that the type system does not. The decoder calls this, so
    /// a decoded message is always within bounds.
    pub fn validate(&self) -> Result<(), ValidateError> {
        fn text(s: &str, what: &'static str) -> Result<(), ValidateError> {
            if s.len() > MAX_TEXT {
                return Err(ValidateError::TextTooLong(what));
            }
            Ok(())
        }
        match self {
            Message::Hello(h) => {
                text(&h.software, "software name")?;
                if h.folder.len() > 255 {
                    return Err(ValidateError::FolderNameTooLong);
                }
                Ok(())
            }
            Message::Error { message, .. } => text(message, "error message"),
            Message::Manifest(entries) => {
                if entries.len() > MAX_ENTRIES_PER_BATCH {
                    return Err(ValidateError::TooManyEntries(entries.len()));
                }
                entries.iter().try_for_each(validate_entry)
            }
            Message::Deleted(paths) => {
                if paths.len() > MAX_ENTRIES_PER_BATCH {
                    return Err(ValidateError::TooManyDeletions(paths.len()));
                }
                if paths.iter().any(RelPath::is_root) {
                    return Err(ValidateError::RootDeleted);
                }
                Ok(())
            }
            Message::Renamed(pairs) => {
                if pairs.len() > MAX_ENTRIES_PER_BATCH {
                    return Err(ValidateError::TooManyRenames(pairs.len()));
                }
                if pairs
                    .iter()
                    .any(|(a, b)| a.is_root() || b.is_root() || b.starts_with(a))
                {
                    return Err(ValidateError::BadRename);
                }
                Ok(())
            }
            Message::Inline { data, .. } if data.len() > MAX_INLINE => {
                Err(ValidateError::InlineTooLarge(data.len()))
            }
            Message::FilesRequest { indexes }
                if indexes.is_empty() || indexes.len() > MAX_BATCH_FILES =>
            {
                Err(ValidateError::BatchSize(indexes.len()))
            }
            Message::DbHashes {
                page_size, hashes, ..
            } => {
                if hashes.len() > MAX_HASHES_PER_BATCH {
                    return Err(ValidateError::TooManyHashes(hashes.len()));
                }
                if *page_size != 0 && !valid_page_size(*page_size) {
                    return Err(ValidateError::PageSize(*page_size));
                }
                Ok(())
            }
            Message::DbPages(pages) => check_pages(pages),
            Message::DbRun { first, data } => check_run(*first, data),
            Message::DbEnd {
                page_size, pages, ..
            } => check_db_bounds(*page_size, *pages).map_err(ValidateError::DbEnd),
            Message::Promoted { error, .. } => text(error, "promotion error"),
            Message::RoundDone { summary: s, .. } => {
                if s.warnings.len() > MAX_SUMMARY_LINES {
                    return Err(ValidateError::TooManyWarnings);
                }
                if s.held.len() > MAX_SUMMARY_LINES {
                    return Err(ValidateError::TooManyHeld(s.held.len()));
                }
                if let Some(p) = &s.parity {
                    text(p, "parity output")?;
                }
                s.held
                    .iter()
                    .try_for_each(|h| text(&h.holders, "held database's holders"))?;
                s.warnings.iter().try_for_each(|w| text(w, "warning"))
            }
            _ => Ok(()),
        }
    }
}

fn validate_entry(e: &Entry) -> Result<(), ValidateError> {
    check_entry(e).map_err(|why| ValidateError::Entry {
        path: e.path.clone(),
        why,
    })
}

fn check_entry(e: &Entry) -> Result<(), EntryError> {
    if let Kind::Database {
        page_size, pages, ..
    } = &e.kind
    {
        check_db_bounds(*page_size, *pages)?;
    }
    match &e.kind {
        Kind::Symlink { target }
            if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains(&0) =>
        {
            return Err(EntryError::SymlinkTarget);
        }
        Kind::HardLink { target } if target.is_root() || target == &e.path => {
            return Err(EntryError::HardLinkTarget);
        }
        Kind::Symlink { .. } | Kind::HardLink { .. } => {}
        Kind::Dir => {}
        _ if e.path.is_root() => return Err(EntryError::RootNotDir),
        _ => {}
    }
    if e.meta.mode & !0o7777 != 0 {
        return Err(EntryError::Mode(e.meta.mode));
    }
    if e.meta.mtime_nsec >= 1_000_000_000 {
        return Err(EntryError::MtimeNsec);
    }
    if e.meta.xattrs.len() > MAX_XATTRS {
        return Err(EntryError::TooManyXattrs(e.meta.xattrs.len()));
    }
    let mut total = 0usize;
    for x in &e.meta.xattrs {
        if x.name.is_empty() || x.name.len() > MAX_XATTR_NAME || x.name.contains(&0) {
            return Err(EntryError::XattrName);
        }
        if x.value.len() > MAX_XATTR_VALUE {
            return Err(EntryError::XattrValue(x.value.len()));
        }
        total += x.name.len() + x.value.len();
    }
    if total > MAX_XATTR_TOTAL {
        return Err(EntryError::XattrTotal(total));
    }
    Ok(())
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod validate_tests;
