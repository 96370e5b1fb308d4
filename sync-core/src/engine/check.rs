//! A received round's checks, before anything is made on the replica.

use super::Round;
use crate::RelPath;
use std::path::Path;

/// Why a round is refused before anything of it is applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoundError {
    /// A full round's manifest is not a tree (order, parents, links).
    #[error("manifest from the source: {0}")]
    Structure(crate::Error),
    /// A full round's manifest hashes to another root than announced.
    #[error("manifest does not match its announced root hash")]
    RootHash,
    /// A partial round's entries are not in path order.
    #[error("round entries not sorted at {0}")]
    Unsorted(RelPath),
    /// A partial round names a path with our temp-file prefix.
    #[error("entry {0}: name uses the reserved temp-file prefix")]
    Reserved(RelPath),
    /// A path that, under this replica's root, passes `PATH_MAX`.
    #[error(
        "entry {shown}: path too long for this replica root ({len} bytes with the root, at most {max})"
    )]
    TooLong {
        /// The path, shortened for the message.
        shown: String,
        /// Its length with the root.
        len: usize,
        /// The longest allowed.
        max: usize,
    },
}

/// Every path a round names: entries, deletions, both ends of renames.
fn named(round: &Round) -> impl Iterator<Item = &RelPath> + Clone {
    round
        .src
        .entries
        .iter()
        .map(|e| &e.path)
        .chain(round.deleted.iter())
        .chain(round.renamed.iter().flat_map(|(a, b)| [a, b]))
}

/// Checks a round against the tree rules before anything is made under
/// `root`: a full round is a whole tree with the announced root hash; a
/// partial round is sorted and names no temp file; no path passes `PATH_MAX`
/// under `root` (it could be made with relative `openat2` but never scanned
/// again by absolute path, wedging the folder).
pub fn check(round: &Round, root: &Path) -> Result<(), RoundError> {
    if round.full {
        let m = &round.src;
        m.check_structure().map_err(RoundError::Structure)?;
        if m.root_hash() != round.root_hash {
            return Err(RoundError::RootHash);
        }
    } else {
        if let Some(w) = round
            .src
            .entries
            .windows(2)
            .find(|w| w[0].path >= w[1].path)
        {
            return Err(RoundError::Unsorted(w[1].path.clone()));
        }
        let reserved = |p: &&RelPath| p.split_last().is_some_and(|(_, n)| crate::is_temp_name(n));
        if let Some(p) = named(round).find(reserved) {
            return Err(RoundError::Reserved(p.clone()));
        }
    }
    let root_len = root.as_os_str().len() + 1;
    let max = libc::PATH_MAX as usize;
    if let Some(p) = named(round).find(|p| root_len + p.as_bytes().len() >= max) {
        let mut shown = p.to_string();
        crate::apply::truncate(&mut shown, 200);
        return Err(RoundError::TooLong {
            shown,
            len: root_len + p.as_bytes().len(),
            max: max - 1,
        });
    }
    Ok(())
}
