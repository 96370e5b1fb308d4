//! Handshake decisions as plain functions: whether a replica admits a source
//! ([`admit`], [`recheck`]) and what a source makes of the replica's answer
//! ([`judge_answer`]). Fencing: a node holds an epoch per folder; a source at
//! an older epoch than the replica's, or meeting a node that is itself the
//! source, is refused with [`ErrorCode::Fenced`].

use crate::{ErrorCode, HandshakeError, Hello, Role};

/// The highest epoch: an epoch must have a successor for a later promotion.
pub const MAX_EPOCH: u64 = u64::MAX - 1;

/// A folder's fencing state: the epoch this node holds and whether it is the
/// folder's source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fence {
    /// The epoch this node holds.
    pub epoch: u64,
    /// Whether this node is now the folder's source (promoted).
    pub source: bool,
}

impl Fence {
    /// The role this fence gives the node.
    #[must_use]
    pub fn role(&self) -> Role {
        if self.source {
            Role::Source
        } else {
            Role::Replica
        }
    }

    /// Whether a source at `theirs` makes this node adopt its epoch (a
    /// failover this node missed).
    #[must_use]
    pub fn adopts(&self, theirs: u64) -> bool {
        theirs > self.epoch && !self.source
    }
}

/// What a replica knows of the folder a hello names.
#[derive(Debug, Clone, Copy)]
pub struct FolderView<'a> {
    /// The folder's name.
    pub name: &'a str,
    /// Whether the peer may push into it.
    pub peer_allowed: bool,
    /// Whether a promotion of this node is in progress.
    pub promotion_pending: bool,
    /// This node's fence for the folder.
    pub fence: Fence,
    /// Whether this node could serve the folder as its source if promoted
    /// (what its hello says, a refusal's included).
    pub promotable: bool,
}

/// A source admitted: its epoch, which the replica records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    /// The source's epoch.
    pub epoch: u64,
    /// Whether the replica adopts it (it is newer than the replica's own).
    pub adopt: bool,
}

/// Why a replica refuses a source. The text is what the `Error` frame says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Bad magic or another version.
    #[error("{0}")]
    Version(HandshakeError),
    /// The peer says it is a replica.
    #[error("peer is not a source")]
    NotASource,
    /// An epoch with no successor.
    #[error("epoch {epoch} is past the highest epoch {MAX_EPOCH}")]
    EpochPastMax {
        /// The peer's epoch.
        epoch: u64,
    },
    /// No folder of that name here.
    #[error("this replica serves no folder named {name:?}")]
    NoSuchFolder {
        /// The name asked for.
        name: String,
    },
    /// The folder's allow list does not name the peer.
    #[error("peer {peer} may not push into folder {folder:?}")]
    NotAllowed {
        /// The peer.
        peer: String,
        /// The folder.
        folder: String,
    },
    /// This node is being promoted.
    #[error("folder {folder:?}: a promotion is in progress on this node; retry")]
    PromotionPending {
        /// The folder.
        folder: String,
    },
    /// The peer's epoch is older than ours, or this node is the source.
    #[error(
        "folder {folder:?}: this node is {} at epoch {}; peer {peer} pushes at epoch {theirs}: {}",
        if ours.source { "the source" } else { "a replica" },
        ours.epoch,
        if *theirs < ours.epoch {
            "its epoch is older, it was demoted by a failover and must take the replica role"
        } else {
            "two sources at one epoch; refusing"
        }
    )]
    Fenced {
        /// The folder.
        folder: String,
        /// The peer.
        peer: String,
        /// This node's fence.
        ours: Fence,
        /// The peer's epoch.
        theirs: u64,
        /// Whether this node could be promoted (its hello says so).
        promotable: bool,
    },
    /// This node was promoted while the session waited for the folder.
    #[error(
        "folder {folder:?}: this node was promoted to epoch {} while the session waited; \
         peer {peer} at epoch {theirs} is fenced",
        ours.epoch
    )]
    PromotedWhileWaiting {
        /// The folder.
        folder: String,
        /// The peer.
        peer: String,
        /// This node's fence now.
        ours: Fence,
        /// The peer's epoch.
        theirs: u64,
    },
}

impl Refusal {
    /// The code of the `Error` frame that carries the refusal.
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::Version(_) => ErrorCode::UnsupportedVersion,
            Refusal::NotASource | Refusal::EpochPastMax { .. } => ErrorCode::Protocol,
            Refusal::NoSuchFolder { .. }
            | Refusal::NotAllowed { .. }
            | Refusal::PromotionPending { .. } => ErrorCode::Other,
            Refusal::Fenced { .. } | Refusal::PromotedWhileWaiting { .. } => ErrorCode::Fenced,
        }
    }

    /// The hello to send before the error, if any: a fenced source learns our
    /// role and the epoch it must adopt from it.
    #[must_use]
    pub fn reply_hello(&self) -> Option<Hello> {
        match self {
            Refusal::Fenced {
                folder,
                ours,
                promotable,
                ..
            } => Some(
                Hello::new(ours.role(), folder)
                    .with_epoch(ours.epoch)
                    // a source always says yes (see `Hello::promotable`)
                    .with_promotable(ours.source || *promotable),
            ),
            _ => None,
        }
    }
}

/// Whether a replica admits the source that said `hello`. `folder` is the
/// folder the hello names, as this node sees it (`None`: none such).
pub fn admit(hello: &Hello, peer: &str, folder: Option<FolderView<'_>>) -> Result<Admit, Refusal> {
    hello.check().map_err(Refusal::Version)?;
    if hello.role != Role::Source {
        return Err(Refusal::NotASource);
    }
    if hello.epoch > MAX_EPOCH {
        return Err(Refusal::EpochPastMax { epoch: hello.epoch });
    }
    let Some(f) = folder else {
        return Err(Refusal::NoSuchFolder {
            name: hello.folder.clone(),
        });
    };
    if !f.peer_allowed {
        return Err(Refusal::NotAllowed {
            peer: peer.to_string(),
            folder: f.name.to_string(),
        });
    }
    if f.promotion_pending {
        return Err(Refusal::PromotionPending {
            folder: f.name.to_string(),
        });
    }
    if hello.epoch < f.fence.epoch || f.fence.source {
        return Err(Refusal::Fenced {
            folder: f.name.to_string(),
            peer: peer.to_string(),
            ours: f.fence,
            theirs: hello.epoch,
            promotable: f.promotable,
        });
    }
    Ok(Admit {
        epoch: hello.epoch,
        adopt: f.fence.adopts(hello.epoch),
    })
}

/// After waiting for the folder: a local promotion may have run meanwhile,
/// and then the source at `theirs` is fenced.
pub fn recheck(folder: &str, peer: &str, now: Fence, theirs: u64) -> Result<(), Refusal> {
    if now.source || now.epoch > theirs {
        return Err(Refusal::PromotedWhileWaiting {
            folder: folder.to_string(),
            peer: peer.to_string(),
            ours: now,
            theirs,
        });
    }
    Ok(())
}

/// What a source makes of the replica's hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// A replica at an epoch no newer than ours: rounds may start.
    Accepted {
        /// The replica's epoch.
        epoch: u64,
    },
    /// The peer holds a newer epoch: this node was demoted and must take the
    /// replica role at `epoch`.
    FencedBy {
        /// The peer's epoch.
        epoch: u64,
    },
    /// The peer claims the folder (it is a source) at an epoch no newer than
    /// ours: a stale master, fenced when its own loop reaches us.
    Claimed {
        /// The peer's role.
        role: Role,
        /// The peer's epoch.
        epoch: u64,
    },
}

/// Judges the replica's hello, for a source at epoch `ours`. After a
/// `FencedBy` or `Claimed`, the peer's `Error` frame says why (see
/// [`claim_text`] when it does not).
pub fn judge_answer(hello: &Hello, ours: u64) -> Result<Answer, HandshakeError> {
    hello.check()?;
    Ok(if hello.epoch > ours {
        Answer::FencedBy { epoch: hello.epoch }
    } else if hello.role != Role::Replica {
        Answer::Claimed {
            role: hello.role,
            epoch: hello.epoch,
        }
    } else {
        Answer::Accepted { epoch: hello.epoch }
    })
}

/// What a refusing peer's hello says when no `Error` frame follows.
#[must_use]
pub fn claim_text(role: Role, epoch: u64) -> String {
    let role = match role {
        Role::Source => "source",
        Role::Replica => "replica",
    };
    format!("peer is the folder's {role} at epoch {epoch}")
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
