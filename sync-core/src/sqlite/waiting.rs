//! What a cut learns of a database just before it asks for its lock, so
//! that a checkpoint landing while it waits (a writer's commit checkpoints as
//! soon as it ends) is told apart from a write it cannot account for.

use super::conn::{FileStamp, Seen, side_path};
use std::path::Path;

#[cfg(test)]
thread_local! {
    /// Called between the log's salts and the file's stamp read before a
    /// cut's lock (`pre_lock`).
    pub(super) static BETWEEN_PRE_LOCK_READS: std::cell::RefCell<Option<super::copy::Hook>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether the database file, unwritten from the last cut (`seen`) to
/// the moment this cut asked for its lock, was written since only by a
/// checkpoint of the log's current generation: that generation was
/// already the log's then, and no restart (new salts) came between.
/// Such a checkpoint copies frames this cut reads from the log anyway (a
/// writer's commit checkpoints as soon as it ends, while the cut takes
/// its lock); no other generation can have been checkpointed and reset
/// unseen, so the log's frames still tell every page changed.
pub(super) fn checkpointed_while_waiting(
    pre_lock: Option<(Option<FileStamp>, Option<[u8; 8]>)>,
    seen: Option<Seen>,
    wal: &Path,
) -> bool {
    let Some((file, log)) = pre_lock else {
        return false;
    };
    seen.is_some_and(|s| s.unchanged(file)) && log.is_some() && log == super::wal::salts(wal)
}

/// The log's salts, then the database file's stamp, before a cut's lock.
/// In that order: a log reset before the salts are read was a checkpoint of
/// every frame, which wrote the file before its stamp is taken (taken first,
/// the stamp would miss a generation checkpointed and reset in between).
pub(super) fn pre_lock(path: &Path) -> (Option<FileStamp>, Option<[u8; 8]>) {
    let log = super::wal::salts(&side_path(path, "-wal"));
    #[cfg(test)]
    BETWEEN_PRE_LOCK_READS.with(|h| {
        if let Some(f) = h.borrow_mut().as_mut() {
            f(path);
        }
    });
    (FileStamp::of(path), log)
}
