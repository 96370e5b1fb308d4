//! The crate's error type.
//!
//! Rules: every I/O failure names the operation and the path it was done on, once;
//! messages are short and lowercase; callers add the peer or folder.

use std::io;

/// Errors of sync-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed on a path.
    #[error("{op} {path}: {err}")]
    Io {
        /// What was being done (`open`, `rename`, ...).
        op: &'static str,
        /// On what, displayed with non-UTF-8 bytes escaped.
        path: String,
        /// The OS error.
        err: io::Error,
    },
    /// Input that breaks a rule (from a peer or from the tree).
    #[error("{path}: {msg}")]
    Invalid {
        /// The entry concerned.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// SQLite refused something on a database.
    #[error("database {path}: {msg}")]
    Sqlite {
        /// The database file.
        path: String,
        /// What failed, with SQLite's message.
        msg: String,
    },
    /// A delta or signature could not be used.
    #[error("{path}: {msg}")]
    Delta {
        /// The file concerned.
        path: String,
        /// What is wrong.
        msg: String,
    },
}

impl Error {
    pub(crate) fn io(
        op: &'static str,
        path: impl std::fmt::Display,
        err: impl Into<io::Error>,
    ) -> Self {
        Error::Io {
            op,
            path: path.to_string(),
            err: err.into(),
        }
    }

    pub(crate) fn invalid(path: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.to_string(),
            msg: msg.into(),
        }
    }

    /// The OS error number, when this is an I/O error.
    #[must_use]
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Io { err, .. } => err.raw_os_error(),
            _ => None,
        }
    }

    /// Whether this is "no space left on device" (or quota exceeded).
    #[must_use]
    pub fn is_disk_full(&self) -> bool {
        matches!(self.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
}
