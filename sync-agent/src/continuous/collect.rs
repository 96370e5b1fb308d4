//! A source's batches of watch events: collected until they pause (the
//! debounce), and what each batch holds.

use super::partial::{debounce_over, settled};
use super::*;

impl Driver<'_> {
    /// Debounce: collects until the events pause, at most 100 ms; once the
    /// batch holds a path of its own, events of files held back from earlier
    /// rounds (a large file still being written) count as a pause, so they
    /// do not hold back the small writes beside them. `None` when there is
    /// nothing to ship (or a full rescan is due).
    pub(super) async fn collect(&mut self) -> Option<Collected> {
        let cfg = self.cfg;
        let started = Instant::now();
        self.w.note(self.lag);
        publish_lag(self.status, self.lag);
        let restamp = (self.restamp.take_if(|r| r.0 <= started))
            .map(|r| r.1)
            .unwrap_or_default();
        let mut c = Collected {
            restamp_only: !restamp.is_empty() && self.deferred.is_empty(),
            dirty: self.deferred.keys().cloned().chain(restamp).collect(),
            created: BTreeSet::new(),
            renames: Vec::new(),
        };
        let mut woken = false;
        loop {
            self.w.note(self.lag);
            let stirred = self.drain(&mut c);
            c.restamp_only &= stirred.is_none();
            // the batch starts with the files held back from earlier rounds
            let fresh = c.dirty.len() > self.deferred.len() || !c.renames.is_empty();
            if debounce_over(started, Instant::now()) || settled(woken, stirred, fresh) {
                break;
            }
            let quiet = tokio::time::timeout(cfg.debounce, self.w.wake.notified())
                .await
                .is_err();
            woken = true;
            if quiet && self.w.rx.is_empty() {
                break;
            }
        }
        tracing::trace!(
            dirty = c.dirty.len(),
            renames = c.renames.len(),
            "batch collected"
        );
        if self.w.rescan.swap(false, Ordering::SeqCst) {
            self.full = true;
            self.unknown = true;
            return None;
        }
        // The round covers every change noted so far.
        self.lag.round_started(Instant::now(), false);
        if c.dirty.is_empty() && c.renames.is_empty() {
            self.lag.round_applied(std::iter::empty());
            publish_lag(self.status, self.lag);
            return None;
        }
        set(self.status, |s| s.files_pending = c.dirty.len() as u64);
        Some(c)
    }

    /// Takes the queued watch events into `c`: `Some(true)` when one was of a
    /// path not held back from an earlier round, `None` when there was none.
    fn drain(&mut self, c: &mut Collected) -> Option<bool> {
        let mut stirred = None;
        while let Ok(m) = self.w.rx.try_recv() {
            let stirred = stirred.get_or_insert(false);
            match m {
                WatchMsg::Paths(ps, new) => {
                    for p in ps.iter().filter_map(|p| rel(&self.cfg.root, p)) {
                        *stirred |= !self.deferred.contains_key(&p);
                        if new {
                            c.created.insert(p.clone());
                        }
                        c.dirty.insert(p);
                    }
                }
                WatchMsg::Rename(a, b) => {
                    if let (Some(a), Some(b)) = (rel(&self.cfg.root, &a), rel(&self.cfg.root, &b)) {
                        *stirred = true;
                        c.renames.push((a, b));
                    }
                }
            }
        }
        stirred
    }
}
