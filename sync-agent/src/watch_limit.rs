//! A directory the watcher could not watch at run time.
//!
//! The watcher ([`crate::tree_watch`]) adds a watch for every directory a
//! scan lists and every new directory itself; when that fails
//! (`fs.inotify.max_user_watches` reached, or another error) it reports an
//! error through the event handler, and nothing under that directory raises
//! events any more. Until the watch can be added the folder is
//! *degraded*: every [`POLL`] the source retries watching the whole tree and,
//! whatever the outcome, runs a full round (a rescan), so changes there reach
//! the replica within seconds instead of at the next periodic rescan. Status
//! (`FolderStatus::watcher`) says which of the two states the folder is in.

use notify::{RecursiveMode, Watcher};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often a degraded folder retries its watch and rescans.
pub const POLL: Duration = Duration::from_secs(2);

/// Whether some directory of the tree may be unwatched. Shared between the
/// watcher's event handler (sets it) and the source loop (polls, clears it).
#[derive(Clone, Debug, Default)]
pub struct Degraded(Arc<AtomicBool>);

impl Degraded {
    /// Marks the folder degraded.
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether the folder is degraded.
    #[must_use]
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Whether a watcher error is the inotify watch limit.
#[must_use]
pub fn is_limit(e: &notify::Error) -> bool {
    matches!(&e.kind, notify::ErrorKind::MaxFilesWatch)
        || matches!(&e.kind, notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::ENOSPC))
}

/// The status note for a watcher error reported while running.
#[must_use]
pub fn error_note(e: &notify::Error) -> String {
    let at = match e.paths.first() {
        Some(p) => format!(" watching {}", p.display()),
        None => String::new(),
    };
    let secs = POLL.as_secs();
    if is_limit(e) {
        format!(
            "inotify watch limit reached{at} (raise fs.inotify.max_user_watches): \
             polling, a full rescan every {secs} s, until the watch can be added"
        )
    } else {
        format!(
            "watcher error{at}: {e}: polling, a full rescan every {secs} s, until the \
             tree can be watched again"
        )
    }
}

/// Tries to watch the whole tree under `root` again (directories already
/// watched keep their watch). Clears `degraded` and returns the status note
/// when every directory is watched; otherwise returns the error's note.
pub fn retry(
    watcher: &mut impl Watcher,
    root: &Path,
    degraded: &Degraded,
) -> Result<String, String> {
    // Cleared first: an error the handler reports meanwhile sets it again.
    degraded.0.store(false, Ordering::SeqCst);
    match watcher.watch(root, RecursiveMode::Recursive) {
        Ok(()) => Ok(
            "a watch could not be added (limit or error); every directory is watched \
             again, rescanned"
                .to_string(),
        ),
        Err(e) => {
            degraded.set();
            Err(error_note(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_name_the_limit_the_path_and_the_poll() {
        let e = notify::Error::new(notify::ErrorKind::MaxFilesWatch).add_path("/r/new".into());
        assert!(is_limit(&e));
        let n = error_note(&e);
        assert!(n.contains("watch limit reached watching /r/new"), "{n}");
        assert!(
            n.contains("max_user_watches") && n.contains("every 2 s"),
            "{n}"
        );
        let e = notify::Error::io(std::io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(is_limit(&e));
        let e = notify::Error::generic("boom");
        assert!(!is_limit(&e));
        assert!(error_note(&e).contains("watcher error: boom"));
    }

    #[test]
    fn retry_clears_the_flag_when_the_tree_can_be_watched() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = crate::tree_watch::TreeWatcher::new(|_| {}, notify::Config::default())
            .expect("watcher");
        let d = Degraded::default();
        d.set();
        assert!(retry(&mut w, dir.path(), &d).is_ok());
        assert!(!d.is_set());
        d.set();
        let gone = dir.path().join("gone");
        assert!(retry(&mut w, &gone, &d).is_err());
        assert!(d.is_set());
    }
}
