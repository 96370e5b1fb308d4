//! How many connections the replica holds at once (issue 10, item 3).
//!
//! Handshakes in progress are bounded by QUIC (`max_incoming`); once a peer is
//! authenticated its connection takes a slot here, in all and for its node id,
//! and gives it back when it ends. Beyond either cap the connection is closed
//! at once with a reason the peer can read.

use crate::NodeId;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Most authenticated connections the replica holds at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most connections one peer (node id) holds at once.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// QUIC application close code of a connection refused by these caps.
pub const REFUSED_CODE: u32 = 2;

/// The slots in use.
#[derive(Debug, Default)]
pub struct Connections {
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_peer: HashMap<Option<NodeId>, usize>,
}

/// A connection's slot, given back on drop (the heap is trimmed when the last
/// connection ends, so a flood's memory goes back to the system).
#[derive(Debug)]
pub struct Slot {
    owner: Arc<Connections>,
    peer: Option<NodeId>,
}

impl Connections {
    /// A slot for `peer`, or why not (the text the peer is closed with).
    pub fn admit(self: &Arc<Self>, peer: Option<NodeId>) -> Result<Slot, String> {
        let mut c = self
            .inner
            .lock()
            .map_err(|_| "connection table poisoned".to_string())?;
        if c.total >= MAX_CONNECTIONS {
            return Err(format!(
                "too many connections: the replica holds {MAX_CONNECTIONS} already"
            ));
        }
        let mine = c.per_peer.get(&peer).copied().unwrap_or(0);
        if mine >= MAX_CONNECTIONS_PER_PEER {
            return Err(format!(
                "too many connections from this peer: {MAX_CONNECTIONS_PER_PEER} open already"
            ));
        }
        c.total += 1;
        *c.per_peer.entry(peer).or_default() += 1;
        Ok(Slot {
            owner: self.clone(),
            peer,
        })
    }

    /// Connections held now.
    #[must_use]
    pub fn total(&self) -> usize {
        self.inner.lock().map(|c| c.total).unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let last = match self.owner.inner.lock() {
            Ok(mut c) => {
                c.total = c.total.saturating_sub(1);
                if let Some(n) = c.per_peer.get_mut(&self.peer) {
                    *n -= 1;
                    if *n == 0 {
                        c.per_peer.remove(&self.peer);
                    }
                }
                c.total == 0
            }
            Err(_) => false,
        };
        if last {
            sync_core::trim_heap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_all_and_per_peer() {
        let c = Arc::new(Connections::default());
        let a = crate::Identity::generate().map(|i| i.id()).ok();
        let mut held: Vec<Slot> = (0..MAX_CONNECTIONS_PER_PEER)
            .map(|_| c.admit(a).expect("under the cap"))
            .collect();
        let err = c.admit(a).expect_err("over the per-peer cap");
        assert!(err.contains("from this peer"), "{err}");
        held.pop();
        held.push(c.admit(a).expect("a slot was given back"));
        // Others fill the rest; then nobody gets in.
        for _ in held.len()..MAX_CONNECTIONS {
            let other = crate::Identity::generate().map(|i| i.id()).ok();
            held.push(c.admit(other).expect("under the total cap"));
        }
        let err = c.admit(None).expect_err("over the total cap");
        assert!(err.contains("too many connections"), "{err}");
        drop(held);
        assert_eq!(c.total(), 0);
    }
}
