//! Where a round's file contents come from: with the round (inline), pulled
//! from the source (the agent, over QUIC), or read from the source's tree in
//! the same process ([`Loopback`], for the in-memory pair of tests).

use crate::Manifest;
use crate::plan::{Fetch, Plan};
use proto::{Entry, Kind};
use std::collections::HashMap;
use std::path::Path;

/// A source of whole file contents, by the entry's index in the round.
pub trait ContentSource {
    /// The content of regular file `entry` (entry `index` of the round), or
    /// `None` when the source no longer has it as the round announced it.
    fn content(&self, index: u64, entry: &Entry) -> Option<Vec<u8>>;
}

/// Reads contents from the source's own tree: the round's sender and its
/// receiver in one process, no network.
#[derive(Debug, Clone, Copy)]
pub struct Loopback<'a> {
    /// The source's root.
    pub root: &'a Path,
}

impl ContentSource for Loopback<'_> {
    fn content(&self, _index: u64, entry: &Entry) -> Option<Vec<u8>> {
        use std::io::Read;
        let Kind::File { size, hash } = entry.kind else {
            return None;
        };
        let mut f = crate::scan::open_regular(&crate::scan::abs(self.root, &entry.path)).ok()?;
        let mut data = Vec::new();
        f.read_to_end(&mut data).ok()?;
        (data.len() as u64 == size && *blake3::hash(&data).as_bytes() == hash).then_some(data)
    }
}

/// Splits the plan's fetches into content that came with the round
/// (`(index in the planned manifest, data)`, taken out of `inline`) and the
/// fetches still to pull. `kept` maps planned entries to the round's indexes.
#[must_use]
pub fn split_inline(
    plan: &Plan,
    kept: &[usize],
    inline: &mut HashMap<u64, Vec<u8>>,
) -> (Vec<(usize, Vec<u8>)>, Vec<Fetch>) {
    let (mut inlined, mut pulled) = (Vec::new(), Vec::new());
    for f in plan.fetch.iter().copied() {
        match inline.remove(&(kept[f.index] as u64)) {
            Some(data) => inlined.push((f.index, data)),
            None => pulled.push(f),
        }
    }
    (inlined, pulled)
}

/// The contents of `fetches` from `source` (planned index, data); entries the
/// source no longer has as announced are left for the next round.
pub fn pull(
    source: &dyn ContentSource,
    planned: &Manifest,
    kept: &[usize],
    fetches: &[Fetch],
) -> Vec<(usize, Vec<u8>)> {
    fetches
        .iter()
        .filter_map(|f| {
            let e = &planned.entries[f.index];
            source
                .content(kept[f.index] as u64, e)
                .map(|data| (f.index, data))
        })
        .collect()
}
