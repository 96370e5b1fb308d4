//! Reconnect backoff, its waits, and the session's connect, kept out of the
//! source loop: the delays are plain values, testable without sleeping.

use super::*;

/// The delay before the next connect: 100 ms, doubling to 5 s after each
/// failure; back to 100 ms after a session that ended cleanly or lasted
/// [`Backoff::LONG_SESSION`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Backoff {
    /// The current delay.
    pub(super) delay: Duration,
}

impl Backoff {
    /// The first delay.
    pub(super) const FIRST: Duration = Duration::from_millis(100);
    /// The longest delay.
    pub(super) const MAX: Duration = Duration::from_secs(5);
    /// A session that fails sooner than this after it began (a file we cannot
    /// read, a full replica disk) is backed off as a failed connect.
    pub(super) const LONG_SESSION: Duration = Duration::from_secs(30);

    pub(super) fn new() -> Self {
        Self { delay: Self::FIRST }
    }

    /// After a wait of [`Self::delay`]: the next one is twice as long.
    pub(super) fn grow(&mut self) {
        self.delay = (self.delay * 2).min(Self::MAX);
    }

    /// Whether a session that failed after `lasted` is waited on before the
    /// next connect (it must not spin).
    pub(super) fn waits_after(lasted: Duration) -> bool {
        lasted < Self::LONG_SESSION
    }

    /// A session ended (`ok`: cleanly) `lasted` after it began.
    pub(super) fn session_ended(&mut self, ok: bool, lasted: Duration) {
        if ok || lasted >= Self::LONG_SESSION {
            self.delay = Self::FIRST;
        }
    }
}

/// Waits `delay` (or until shutdown) while no session is up: watch events
/// are noted as pending, and commands, when given, are refused with `why`.
pub(super) async fn pause(
    delay: Duration,
    shutdown: &mut watch::Receiver<bool>,
    w: &mut Watch,
    lag: &mut LagTracker<RelPath>,
    status: &SharedStatus,
    mut commands: Option<&mut mpsc::Receiver<Command>>,
    why: &str,
) {
    let deadline = tokio::time::sleep(delay);
    tokio::pin!(deadline);
    loop {
        let command = async {
            match commands.as_deref_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = &mut deadline => break,
            _ = shutdown.changed() => break,
            () = w.wake.notified() => note_away(w, lag, status),
            Some(c) = command => refuse(c, why),
        }
    }
}

/// Connects to the replica and opens a session; watch events meanwhile are
/// pending from their instant (a connect to a vanished replica takes the idle
/// timeout).
pub(super) async fn connect_session(
    cfg: &SourceFolder,
    progress: &Arc<Progress>,
    w: &mut Watch,
    lag: &mut LagTracker<RelPath>,
    status: &SharedStatus,
) -> Result<(quinn::Endpoint, SourceSession)> {
    let connecting = async {
        let to = cfg.addr.resolve().await?;
        let (endpoint, conn) = crate::connect(&cfg.identity, cfg.peer, to).await?;
        let s = SourceSession::open(
            conn,
            cfg.root.clone(),
            &cfg.name,
            proto::PROTOCOL_VERSION,
            cfg.epoch,
            progress.clone(),
        )
        .await?
        .with_bwlimit(cfg.bwlimit);
        Ok::<_, anyhow::Error>((endpoint, s))
    };
    tokio::pin!(connecting);
    loop {
        tokio::select! {
            r = &mut connecting => return r,
            () = w.wake.notified() => note_away(w, lag, status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_to_five_seconds() {
        let mut b = Backoff::new();
        let mut seen = Vec::new();
        for _ in 0..8 {
            seen.push(b.delay.as_millis());
            b.grow();
        }
        assert_eq!(seen, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn a_long_or_clean_session_resets_the_backoff() {
        let mut b = Backoff::new();
        b.grow();
        b.grow();
        b.session_ended(false, Duration::from_secs(29));
        assert_eq!(
            b.delay,
            Duration::from_millis(400),
            "a quick failure keeps it"
        );
        b.session_ended(false, Backoff::LONG_SESSION);
        assert_eq!(b, Backoff::new());
        b.grow();
        b.session_ended(true, Duration::ZERO);
        assert_eq!(b, Backoff::new());
    }

    #[test]
    fn only_a_quick_failure_waits() {
        assert!(Backoff::waits_after(Duration::from_secs(1)));
        assert!(!Backoff::waits_after(Backoff::LONG_SESSION));
    }
}
