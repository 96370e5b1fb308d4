//! Handovers (`sync-cli failover` / `failback`), run by the agent from
//! persisted state.
//!
//! [`machine`] is the pure state machine, [`record`] the file it persists
//! before every step with side effects (`{state}/{folder}.handover`), and
//! [`runner`] the glue that carries out its actions on the agent's own task:
//! the CLI only asks ([`start`]) and follows ([`Folder::progress`]); killing it
//! changes nothing. An agent that stops half-way takes the handover up again
//! at its next start ([`resume`]) and ends it completed or rolled back. On the
//! replica's side, [`promotion`] makes the promotion itself durable.

pub mod machine;
pub mod preflight;
pub mod promotion;
pub mod record;
pub mod runner;

pub use machine::{Outcome, PromoteFailure};
pub use record::{Kind, Step};
pub use runner::{Folder, Progress, Refused, resume, start};
