//! Reading and writing framed messages on QUIC streams.

use anyhow::{Context, Result, bail};
use proto::Message;
use proto::frame::{self, HEADER_LEN};

/// Writes one message as a frame, within [`stage_deadline`]: a peer that stops
/// reading (flow control never opens) does not block the sender. A task
/// serving content under a `bwlimit` ([`crate::bwlimit::scope`]) first waits
/// for the frame's bytes.
pub async fn send(stream: &mut quinn::SendStream, msg: &Message) -> Result<()> {
    let mut buf = Vec::new();
    frame::encode(msg, &mut buf).context("encoding a message")?;
    send_frames(stream, buf).await
}

/// Writes frames already encoded (`frame::encode`, one after another) as
/// [`send`] writes one. The buffer is handed to the stream as it is (not
/// copied into the stream's own: content crosses this once less).
pub async fn send_frames(stream: &mut quinn::SendStream, buf: Vec<u8>) -> Result<()> {
    if let Some(limit) = crate::bwlimit::current() {
        limit.acquire(buf.len() as u64).await;
    }
    let d = stage_deadline();
    match tokio::time::timeout(d, stream.write_chunk(bytes::Bytes::from(buf))).await {
        Ok(r) => r.context("sending to peer")?,
        Err(_) => bail!(
            "peer read nothing for {} s while we sent to it",
            d.as_secs()
        ),
    }
    Ok(())
}

/// Reads one message; `Ok(None)` when the peer finished the stream cleanly
/// between frames. The length is checked before the body is allocated.
pub async fn recv(stream: &mut quinn::RecvStream) -> Result<Option<Message>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match stream
            .read(&mut header[got..])
            .await
            .context("reading from peer")?
        {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => bail!("peer closed the stream inside a frame header"),
        }
    }
    let len = frame::frame_len(header)?;
    // read as the stream's chunks come (no zeroed buffer written over)
    let mut body = Vec::with_capacity(len);
    while body.len() < len {
        match stream
            .read_chunk(len - body.len(), true)
            .await
            .context("reading a frame body from peer")?
        {
            Some(c) => body.extend_from_slice(&c.bytes),
            None => bail!(
                "peer closed the stream inside a frame body ({} of {len} bytes)",
                body.len()
            ),
        }
    }
    Ok(Some(frame::decode_body(&body)?))
}

/// Reads one message, which must be there.
pub async fn expect(stream: &mut quinn::RecvStream, what: &str) -> Result<Message> {
    match recv(stream).await? {
        Some(m) => Ok(m),
        None => bail!("peer closed the stream while we waited for {what}"),
    }
}

/// How long a peer may take to send the next frame in the middle of an exchange
/// (a round, a file) before the session is closed as stalled: 120 s, or
/// `UNDERSTUDY_STAGE_DEADLINE_SECS` (read once; for tests and slow links).
pub fn stage_deadline() -> std::time::Duration {
    static D: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        let secs = std::env::var("UNDERSTUDY_STAGE_DEADLINE_SECS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&s| s > 0)
            .unwrap_or(120);
        std::time::Duration::from_secs(secs)
    })
}

/// Most time a new connection has to open its control stream and say hello:
/// 10 s, or the stage deadline when that is shorter.
pub const HELLO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// [`HELLO_DEADLINE`], or [`stage_deadline`] when shorter.
pub fn hello_deadline() -> std::time::Duration {
    HELLO_DEADLINE.min(stage_deadline())
}

/// [`expect`] within [`stage_deadline`].
pub async fn expect_soon(stream: &mut quinn::RecvStream, what: &str) -> Result<Message> {
    let d = stage_deadline();
    match tokio::time::timeout(d, expect(stream, what)).await {
        Ok(r) => r,
        Err(_) => bail!(
            "peer sent nothing for {} s while we waited for {what}",
            d.as_secs()
        ),
    }
}

/// Slowest rate a whole stage is given time for beyond its floor: 256 KiB/s.
pub const STAGE_MIN_RATE: u64 = 256 << 10;

/// A whole exchange (a round, a file, a database) bounded as a whole, not only
/// frame by frame: it may take [`stage_deadline`] plus the time its bytes take
/// at [`STAGE_MIN_RATE`]. A peer trickling valid frames is cut off at that.
#[derive(Debug)]
pub struct Stage {
    started: std::time::Instant,
    bytes: u64,
    what: String,
}

impl Stage {
    /// A stage named `what` (for errors) announcing `bytes` so far.
    pub fn new(what: impl Into<String>, bytes: u64) -> Self {
        Self {
            started: std::time::Instant::now(),
            bytes,
            what: what.into(),
        }
    }

    /// More bytes announced: more time.
    pub fn grow(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// The whole stage's bound.
    pub fn limit(&self) -> std::time::Duration {
        stage_deadline().saturating_add(std::time::Duration::from_secs(self.bytes / STAGE_MIN_RATE))
    }

    /// [`expect`] within [`stage_deadline`] and what is left of the stage.
    pub async fn expect(&self, stream: &mut quinn::RecvStream, what: &str) -> Result<Message> {
        let (limit, per_frame) = (self.limit(), stage_deadline());
        let left = limit.saturating_sub(self.started.elapsed());
        match tokio::time::timeout(per_frame.min(left), expect(stream, what)).await {
            Ok(r) => r,
            Err(_) if left <= per_frame => bail!(
                "{} took longer than its bound of {} s (peer too slow or stalled)",
                self.what,
                limit.as_secs()
            ),
            Err(_) => bail!(
                "peer sent nothing for {} s while we waited for {what}",
                per_frame.as_secs()
            ),
        }
    }
}
