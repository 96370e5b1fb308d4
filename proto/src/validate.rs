//! The bounds a message must keep that its types do not: checked by the
//! frame decoder, so a decoded message is always within them.

use crate::*;

/// Checks a database's announced page size and page count against
/// [`MAX_PAGE_SIZE`], [`MAX_DB_PAGES`] and [`MAX_DB_BYTES`]; the error names
/// the field.
pub fn check_db_bounds(page_size: u32, pages: u32) -> Result<(), String> {
    if !valid_page_size(page_size) {
        return Err(format!("database page size {page_size}"));
    }
    if pages > MAX_DB_PAGES {
        return Err(format!(
            "database of {pages} pages (at most {MAX_DB_PAGES})"
        ));
    }
    let bytes = u64::from(page_size) * u64::from(pages);
    if bytes > MAX_DB_BYTES {
        return Err(format!(
            "database of {pages} pages of {page_size} bytes: {bytes} bytes (at most {MAX_DB_BYTES})"
        ));
    }
    Ok(())
}

impl Message {
    /// Checks every bound that the type system does not. The decoder calls this, so
    /// a decoded message is always within bounds.
    pub fn validate(&self) -> Result<(), String> {
        fn text(s: &str, what: &str) -> Result<(), String> {
            if s.len() > MAX_TEXT {
                return Err(format!("{what} longer than {MAX_TEXT} bytes"));
            }
            Ok(())
        }
        match self {
            Message::Hello(h) => {
                text(&h.software, "software name")?;
                if h.folder.len() > 255 {
                    return Err("folder name longer than 255 bytes".into());
                }
                Ok(())
            }
            Message::Error { message, .. } => text(message, "error message"),
            Message::Manifest(entries) => {
                if entries.len() > MAX_ENTRIES_PER_BATCH {
                    return Err(format!(
                        "manifest batch of {} entries (at most {MAX_ENTRIES_PER_BATCH})",
                        entries.len()
                    ));
                }
                entries.iter().try_for_each(validate_entry)
            }
            Message::Deleted(paths) => {
                if paths.len() > MAX_ENTRIES_PER_BATCH {
                    return Err(format!("{} deletions in one batch", paths.len()));
                }
                if paths.iter().any(RelPath::is_root) {
                    return Err("deletion of the root".into());
                }
                Ok(())
            }
            Message::Renamed(pairs) => {
                if pairs.len() > MAX_ENTRIES_PER_BATCH {
                    return Err(format!("{} renames in one batch", pairs.len()));
                }
                if pairs
                    .iter()
                    .any(|(a, b)| a.is_root() || b.is_root() || b.starts_with(a))
                {
                    return Err("rename of the root, to the root, or into itself".into());
                }
                Ok(())
            }
            Message::Inline { data, .. } if data.len() > MAX_INLINE => Err(format!(
                "inline content of {} bytes (at most {MAX_INLINE})",
                data.len()
            )),
            Message::DbHashes {
                page_size, hashes, ..
            } => {
                if hashes.len() > MAX_HASHES_PER_BATCH {
                    return Err(format!("{} page hashes in one batch", hashes.len()));
                }
                if *page_size != 0 && !valid_page_size(*page_size) {
                    return Err(format!("page size {page_size}"));
                }
                Ok(())
            }
            Message::DbPages(pages) => {
                if pages.len() > MAX_PAGES_PER_BATCH {
                    return Err(format!("{} pages in one batch", pages.len()));
                }
                if let Some((n, d)) = pages
                    .iter()
                    .find(|(n, d)| *n == 0 || !valid_page_size(d.len() as u32))
                {
                    return Err(format!("page {n} of {} bytes", d.len()));
                }
                Ok(())
            }
            Message::DbEnd {
                page_size, pages, ..
            } => check_db_bounds(*page_size, *pages).map_err(|e| format!("database end: {e}")),
            Message::Promoted { error, .. } => text(error, "promotion error"),
            Message::RoundDone { summary: s, .. } => {
                if s.warnings.len() > 1000 || s.held.len() > 1000 {
                    return Err("more than 1000 warnings or held databases".into());
                }
                s.warnings.iter().try_for_each(|w| text(w, "warning"))
            }
            _ => Ok(()),
        }
    }
}

fn validate_entry(e: &Entry) -> Result<(), String> {
    let at = |m: String| format!("entry {}: {m}", e.path);
    if let Kind::Database {
        page_size, pages, ..
    } = &e.kind
    {
        check_db_bounds(*page_size, *pages).map_err(at)?;
    }
    match &e.kind {
        Kind::Symlink { target }
            if target.is_empty() || target.len() > MAX_LINK_TARGET || target.contains(&0) =>
        {
            return Err(at("symlink target empty, too long or holding NUL".into()));
        }
        Kind::HardLink { target } if target.is_root() || target == &e.path => {
            return Err(at("hard link to itself or to the root".into()));
        }
        Kind::Symlink { .. } | Kind::HardLink { .. } => {}
        Kind::Dir => {}
        _ if e.path.is_root() => return Err(at("the root must be a directory".into())),
        _ => {}
    }
    if e.meta.mode & !0o7777 != 0 {
        return Err(at(format!("mode {:o} has bits beyond 0o7777", e.meta.mode)));
    }
    if e.meta.mtime_nsec >= 1_000_000_000 {
        return Err(at("mtime nanoseconds out of range".into()));
    }
    if e.meta.xattrs.len() > MAX_XATTRS {
        return Err(at(format!(
            "{} xattrs (at most {MAX_XATTRS})",
            e.meta.xattrs.len()
        )));
    }
    let mut total = 0usize;
    for x in &e.meta.xattrs {
        if x.name.is_empty() || x.name.len() > MAX_XATTR_NAME || x.name.contains(&0) {
            return Err(at("xattr name empty, too long or holding NUL".into()));
        }
        if x.value.len() > MAX_XATTR_VALUE {
            return Err(at(format!("xattr value of {} bytes", x.value.len())));
        }
        total += x.name.len() + x.value.len();
    }
    if total > MAX_XATTR_TOTAL {
        return Err(at(format!("{total} bytes of xattrs")));
    }
    Ok(())
}

#[cfg(test)]
#[path = "validate_tests.rs"]
mod validate_tests;
