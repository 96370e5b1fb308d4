//! `bwlimit`: a cap on the bytes/s a source sends a peer on its content
//! streams (files and database pages), like rsync's `--bwlimit`.
//!
//! A token bucket ([`TokenBucket`], clock injected, so it is tested without
//! sleeping) filled at the rate, holding at most [`BURST`] of it; a send may
//! run it into debt (a frame larger than the bucket still goes), and the next
//! sender waits until the debt is paid. One bucket per session, shared by its
//! content streams, so their sum keeps to the rate. The limit is set on the
//! tasks that serve content ([`scope`]); [`crate::wire::send`] waits on it.
//! Control traffic (manifests, acks) is not counted.

use serde::{Deserialize, Deserializer};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The least limit accepted: the replica cuts off a transfer slower than
/// [`crate::wire::STAGE_MIN_RATE`].
pub const MIN_RATE: u64 = crate::wire::STAGE_MIN_RATE;

/// The bucket holds this much of a second's worth of the rate (a burst).
pub const BURST: Duration = Duration::from_millis(100);

/// A rate in bytes/s, written `1048576`, `512K`, `10M` or `1G` (K = 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRate(pub u64);

impl std::str::FromStr for ByteRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (num, mult) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let m: u64 = match c.to_ascii_uppercase() {
                    'K' => 1 << 10,
                    'M' => 1 << 20,
                    'G' => 1 << 30,
                    _ => return Err(format!("bwlimit {s:?}: the suffix must be K, M or G")),
                };
                (&t[..i], m)
            }
            _ => (t, 1),
        };
        let n: f64 = num
            .parse()
            .map_err(|_| format!("bwlimit {s:?}: not a number of bytes/s (e.g. 10M)"))?;
        if !n.is_finite() || n <= 0.0 {
            return Err(format!("bwlimit {s:?}: must be above zero"));
        }
        let rate = (n * mult as f64).round();
        if rate < MIN_RATE as f64 {
            return Err(format!(
                "bwlimit {s:?}: at least {}K (the replica cuts off transfers slower than that)",
                MIN_RATE >> 10
            ));
        }
        Ok(Self(rate.min(u64::MAX as f64) as u64))
    }
}

impl std::fmt::Display for ByteRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes/s", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let s = match Raw::deserialize(d)? {
            Raw::N(n) => n.to_string(),
            Raw::S(s) => s,
        };
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A token bucket over an injected clock.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    /// Bytes that may go now; negative: a debt.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `rate` bytes/s, at `now`.
    #[must_use]
    pub fn new(rate: ByteRate, now: Instant) -> Self {
        let rate = rate.0.max(1) as f64;
        let burst = (rate * BURST.as_secs_f64()).max(16.0 * 1024.0);
        Self {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` bytes at `now`: how long the sender waits before they go
    /// (zero while the bucket holds them).
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A session's bucket, shared by its content streams.
#[derive(Debug, Clone)]
pub struct Limiter(Arc<Mutex<TokenBucket>>);

impl Limiter {
    /// A limiter at `rate`.
    #[must_use]
    pub fn new(rate: ByteRate) -> Self {
        Self(Arc::new(Mutex::new(TokenBucket::new(rate, Instant::now()))))
    }

    /// Waits until `n` more bytes may go.
    pub async fn acquire(&self, n: u64) {
        let wait = self
            .0
            .lock()
            .map(|mut b| b.take(n, Instant::now()))
            .unwrap_or_default();
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

tokio::task_local! {
    static LIMIT: Option<Limiter>;
}

/// Runs `fut` (a task serving content) under `limit`.
pub async fn scope<F: std::future::Future>(limit: Option<Limiter>, fut: F) -> F::Output {
    LIMIT.scope(limit, fut).await
}

/// The limit of the task running now, if any.
#[must_use]
pub fn current() -> Option<Limiter> {
    LIMIT.try_with(Clone::clone).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_binary_suffixes_and_refuse_nonsense() {
        assert_eq!("1048576".parse(), Ok(ByteRate(1 << 20)));
        assert_eq!("512K".parse(), Ok(ByteRate(512 << 10)));
        assert_eq!("10m".parse(), Ok(ByteRate(10 << 20)));
        assert_eq!("1.5M".parse(), Ok(ByteRate(3 << 19)));
        assert_eq!("2G".parse(), Ok(ByteRate(2 << 30)));
        for bad in ["", "M", "10X", "-1M", "0", "abc", "100K"] {
            let e = bad.parse::<ByteRate>().expect_err(bad);
            assert!(e.contains("bwlimit"), "{e}");
        }
    }

    #[test]
    fn rates_read_from_toml_as_text_or_a_number() {
        #[derive(Deserialize)]
        struct T {
            a: ByteRate,
            b: ByteRate,
        }
        let t: T = toml::from_str("a = \"4M\"\nb = 300000").expect("parses");
        assert_eq!((t.a, t.b), (ByteRate(4 << 20), ByteRate(300_000)));
        assert!(toml::from_str::<T>("a = \"4Q\"\nb = 1").is_err());
    }

    #[test]
    fn a_full_bucket_lets_its_burst_go_then_paces_at_the_rate() {
        let t0 = Instant::now();
        let rate = 1 << 20; // 1 MiB/s: a burst of ~104,858 bytes
        let mut b = TokenBucket::new(ByteRate(rate), t0);
        assert_eq!(b.take(100_000, t0), Duration::ZERO);
        // past the burst: the debt is paid at the rate
        let w = b.take(rate, t0);
        let want = (rate as f64 - 4_857.6) / rate as f64;
        assert!((w.as_secs_f64() - want).abs() < 1e-3, "{w:?}");
        // the sender slept that long: the next byte waits only for itself
        let t1 = t0 + w;
        assert!(b.take(1, t1) < Duration::from_micros(2));
    }

    #[test]
    fn a_stream_of_sends_averages_the_rate() {
        let t0 = Instant::now();
        let rate = 10 << 20;
        let mut b = TokenBucket::new(ByteRate(rate), t0);
        let mut now = t0;
        let frame = 64 << 10;
        let mut sent = 0u64;
        while sent < 100 << 20 {
            now += b.take(frame, now);
            sent += frame;
        }
        let secs = now.duration_since(t0).as_secs_f64();
        // 100 MiB at 10 MiB/s, less the initial burst
        assert!((secs - 10.0).abs() < 0.15, "{secs}");
    }

    #[test]
    fn an_idle_bucket_fills_only_to_its_burst() {
        let t0 = Instant::now();
        let rate = 1 << 20;
        let mut b = TokenBucket::new(ByteRate(rate), t0);
        let later = t0 + Duration::from_secs(60);
        // a minute idle does not bank a minute of bytes
        let w = b.take(rate, later);
        assert!(w > Duration::from_millis(850), "{w:?}");
    }

    #[tokio::test]
    async fn the_limit_is_seen_only_inside_its_scope() {
        assert!(current().is_none());
        let l = Limiter::new(ByteRate(1 << 20));
        let inside = scope(Some(l), async { current().is_some() }).await;
        assert!(inside);
        assert!(scope(None, async { current().is_none() }).await);
    }
}
