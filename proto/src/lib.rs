//! The understudy wire protocol, with no I/O.
//!
//! This crate knows nothing of sockets, tokio or the filesystem (the same split as
//! `quinn-proto` and Syncthing's `lib/protocol`): it defines the messages that two
//! agents exchange, how they are framed, and how every length read from a peer is
//! bounded before anything is allocated. The agent feeds it bytes read from QUIC
//! streams; tests and fuzzers feed it arbitrary bytes.
//!
//! Main types:
//! - [`RelPath`]: a validated path relative to a folder root (bytes, not UTF-8).
//! - [`Entry`], [`Kind`], [`Meta`]: one manifest entry with all metadata.
//! - [`Message`]: everything that travels, one per frame.
//! - [`frame`]: `encode` and the two-step decoder (`frame_len` then `decode_body`).
//! - [`handshake`]: admission and fencing decisions as plain functions.
//! - [`round`]: the source's round encoder and the replica's round assembler,
//!   state machines fed messages; [`ProtocolError`] says what broke the protocol.
//! - [`exchange`]: the content exchanges on streams of their own (a file, a
//!   database) and the source's admission of a request, state machines too.
//!
//! The contract: no I/O and no clock here. Whoever drives these (the agent over
//! QUIC, tests in memory) reads frames, feeds them in, and does what comes out.
//!
//! ```
//! use proto::{frame, Hello, Message, Role};
//! let msg = Message::Hello(Hello::new(Role::Source, "default"));
//! let mut buf = Vec::new();
//! frame::encode(&msg, &mut buf).unwrap();
//! let (decoded, used) = frame::decode(&buf).unwrap().expect("a whole frame");
//! assert_eq!(used, buf.len());
//! assert_eq!(decoded, msg);
//! ```

mod error;
pub mod exchange;
pub mod frame;
pub mod handshake;
mod message;
mod path;
pub mod round;
mod validate;

pub use error::ProtocolError;
pub use frame::{FrameError, MAX_FRAME_LEN};
pub use message::*;
pub use path::{PathError, RelPath};
pub use validate::*;

/// The 8 bytes that open every session: a peer that does not send them is not an
/// understudy agent.
pub const MAGIC: [u8; 8] = *b"UNDRSTDY";

/// The protocol version this build speaks. A peer with another version is refused
/// during the handshake with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u32 = 8;

/// The QUIC/TLS application protocol name (ALPN).
pub const ALPN: &[u8] = b"understudy/1";
