//! Framing: a 4-byte big-endian length, then one bincode-encoded [`Message`].
//!
//! Decoding has two steps, as in mini-redis: [`frame_len`] looks at the header and
//! refuses an oversize frame before anything is allocated; [`decode_body`] parses a
//! whole body. [`decode`] combines both over a buffer and returns `Ok(None)` while
//! the frame is incomplete.

use crate::Message;

/// Largest frame body accepted or produced (16 MiB).
pub const MAX_FRAME_LEN: usize = 16 << 20;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why bytes from a peer could not be read as a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The header announces more than [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    /// The body names a message type this build does not know.
    #[error("unknown message type")]
    UnknownType,
    /// The body is not a valid message, or breaks a bound.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message breaks a bound its types do not keep.
    #[error("malformed message: {0}")]
    Invalid(#[from] crate::ValidateError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Manifest batches of fewer entries travel as they are.
const PACK_MIN_ENTRIES: usize = 8;
/// zstd level for manifest batches: fast, and most of the gain.
const PACK_LEVEL: i32 = 3;

/// A manifest batch packed for the wire, when packing makes it smaller.
fn pack(msg: &Message) -> Option<Message> {
    let Message::Manifest(entries) = msg else {
        return None;
    };
    if entries.len() < PACK_MIN_ENTRIES {
        return None;
    }
    let raw = bincode::serde::encode_to_vec(entries, config()).ok()?;
    let raw_len = u32::try_from(raw.len()).ok()?;
    let data = zstd::bulk::compress(&raw, PACK_LEVEL).ok()?;
    (data.len() < raw.len()).then_some(Message::ManifestPacked { raw_len, data })
}

/// The manifest batch a packed one carries: its announced size is bounded
/// before anything is inflated, and must be exactly what inflates.
fn unpack(raw_len: u32, data: &[u8]) -> Result<Message, FrameError> {
    let want = raw_len as usize;
    if want > MAX_FRAME_LEN {
        return Err(FrameError::Malformed(format!(
            "packed manifest announces {want} bytes, over the {MAX_FRAME_LEN}-byte limit"
        )));
    }
    let raw = zstd::bulk::decompress(data, want)
        .map_err(|e| FrameError::Malformed(format!("packed manifest: {e}")))?;
    if raw.len() != want {
        return Err(FrameError::Malformed(format!(
            "packed manifest inflates to {} bytes, not the {want} announced",
            raw.len()
        )));
    }
    let (entries, used): (Vec<crate::Entry>, usize) =
        bincode::serde::decode_from_slice(&raw, config())
            .map_err(|e| FrameError::Malformed(format!("packed manifest: {e}")))?;
    if used != raw.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes in a packed manifest",
            raw.len() - used
        )));
    }
    Ok(Message::Manifest(entries))
}

/// Bytes of content `msg` carries (file data, deltas, page images): most of
/// its encoding, for a buffer sized before it is written.
fn payload_len(msg: &Message) -> usize {
    match msg {
        Message::Literal(d)
        | Message::Delta(d)
        | Message::Inline { data: d, .. }
        | Message::ManifestPacked { data: d, .. }
        | Message::DbRun { data: d, .. } => d.len(),
        Message::DbPages(p) => p.iter().map(|(_, d)| d.len() + 8).sum(),
        _ => 0,
    }
}

/// Appends `msg` as one frame to `out` (a manifest batch packed when that
/// makes it smaller).
pub fn encode(msg: &Message, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let packed = pack(msg);
    let msg = packed.as_ref().unwrap_or(msg);
    let start = out.len();
    // room for the content a message carries, so that the buffer does not
    // grow (and copy it) several times over while it is written
    out.reserve(HEADER_LEN + 64 + payload_len(msg).min(MAX_FRAME_LEN));
    out.extend_from_slice(&[0; HEADER_LEN]);
    bincode::serde::encode_into_std_write(msg, out, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    let len = u32::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
    out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// The body length announced by a header, refused when over [`MAX_FRAME_LEN`].
pub fn frame_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Parses one whole frame body and checks its bounds.
pub fn decode_body(body: &[u8]) -> Result<Message, FrameError> {
    // The variant index leads the body; a newer peer's message type is named as
    // such rather than as garbage.
    if let Ok((tag, _)) = bincode::decode_from_slice::<u32, _>(body, config())
        && tag >= crate::message::MESSAGE_TYPES
    {
        return Err(FrameError::UnknownType);
    }
    let (msg, used): (Message, usize) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            body.len() - used
        )));
    }
    let msg = match msg {
        Message::ManifestPacked { raw_len, data } => unpack(raw_len, &data)?,
        m => m,
    };
    msg.validate()?;
    Ok(msg)
}

/// Decodes the first frame in `buf`: `Ok(None)` while it is incomplete, else the
/// message and how many bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let len = frame_len(*header)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, HEADER_LEN + len)))
}

#[cfg(test)]
#[path = "frame_tests.rs"]
mod tests;
