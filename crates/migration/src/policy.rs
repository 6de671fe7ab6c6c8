//! The source's policies, kept apart from the mechanics so each can be read and tested alone:
//! how fast to send ([`Meter`]: bandwidth measured and budgeted over 100 ms windows) and when
//! to stop iterating and switch over ([`Convergence`]).

use crate::engine::OutgoingStats;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Bandwidth is measured and budgeted over windows of this length.
pub(crate) const WINDOW: Duration = Duration::from_millis(100);

/// Bandwidth accounting over [`WINDOW`]s.
pub(crate) struct Meter {
    window_start: Instant,
    window_bytes_start: u64,
    window_pages_start: u64,
    /// Last measured throughput in bytes per second (0 before the first window closes).
    pub(crate) bytes_per_sec: f64,
}

impl Meter {
    /// A meter whose first window starts now, with `bytes` already written.
    pub(crate) fn new(bytes: u64) -> Self {
        Meter {
            window_start: Instant::now(),
            window_bytes_start: bytes,
            window_pages_start: 0,
            bytes_per_sec: 0.0,
        }
    }

    /// Closes the window if it is over, updating the statistics.
    pub(crate) fn tick(&mut self, bytes: u64, pages: u64, stats: &OutgoingStats) {
        let el = self.window_start.elapsed();
        if el < WINDOW {
            return;
        }
        let secs = el.as_secs_f64();
        self.bytes_per_sec = (bytes - self.window_bytes_start) as f64 / secs;
        stats
            .bits_per_second
            .store((self.bytes_per_sec * 8.0) as u64, Ordering::Relaxed);
        stats.pages_per_second.store(
            ((pages.saturating_sub(self.window_pages_start)) as f64 / secs) as u64,
            Ordering::Relaxed,
        );
        self.window_start = Instant::now();
        self.window_bytes_start = bytes;
        self.window_pages_start = pages;
    }

    /// Bytes that may still be sent in this window under `max_bandwidth` (bytes/s, 0 = none).
    pub(crate) fn allowance(&self, bytes: u64, max_bandwidth: u64) -> u64 {
        if max_bandwidth == 0 {
            return u64::MAX;
        }
        let per_window = (max_bandwidth as f64 * WINDOW.as_secs_f64()) as u64;
        per_window.saturating_sub(bytes - self.window_bytes_start)
    }

    /// What remains of the current window.
    pub(crate) fn window_left(&self) -> Duration {
        WINDOW.saturating_sub(self.window_start.elapsed())
    }
}

/// Downtime livemig aims for when the guest lets it: it keeps iterating, even when what
/// remains would fit the downtime limit, until what remains takes at most this long to send.
const TARGET_DOWNTIME_MS: u64 = 10;
/// Passes after which a migration that fits the limit switches over even if it still shrinks.
const MAX_PASSES: u64 = 30;

/// When to stop iterating and switch over.
///
/// QEMU switches over as soon as what remains fits `bandwidth × downtime-limit`, even in the
/// middle of the first pass, so its downtime tends towards the limit. livemig treats the limit
/// as a ceiling, not a target: it decides only at the end of a pass (after a dirty-log sync),
/// and switches over when what remains would take at most [`TARGET_DOWNTIME_MS`] to send, or
/// when it fits the limit and has stopped shrinking (the guest dirties memory about as fast
/// as it is sent), or after [`MAX_PASSES`] passes. A migration that never fits the limit runs
/// on, as QEMU's does without auto-converge.
#[derive(Default)]
pub(crate) struct Convergence {
    last_pending: Option<f64>,
    passes: u64,
}

impl Convergence {
    /// Called at the end of each pass with the bytes still to send and the bandwidth.
    pub(crate) fn switch_now(&mut self, pending: f64, bytes_per_sec: f64, limit_ms: u64) -> bool {
        self.passes += 1;
        let limit = bytes_per_sec * limit_ms as f64 / 1000.0;
        let target = bytes_per_sec * limit_ms.min(TARGET_DOWNTIME_MS) as f64 / 1000.0;
        let stalled = self.last_pending.is_some_and(|last| pending > last * 0.8);
        self.last_pending = Some(pending);
        pending <= target || (pending <= limit && (stalled || self.passes >= MAX_PASSES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: f64 = 1e9;

    #[test]
    fn switches_when_what_remains_is_tiny() {
        let mut c = Convergence::default();
        assert!(
            !c.switch_now(200e6, GB, 300),
            "fits the limit but still shrinking"
        );
        assert!(!c.switch_now(40e6, GB, 300));
        assert!(c.switch_now(5e6, GB, 300), "5 ms of data left");
    }

    #[test]
    fn switches_within_the_limit_when_progress_stalls() {
        let mut c = Convergence::default();
        assert!(!c.switch_now(100e6, GB, 300));
        assert!(c.switch_now(95e6, GB, 300), "not shrinking any more");
        let mut c = Convergence::default();
        assert!(!c.switch_now(500e6, GB, 300));
        assert!(
            !c.switch_now(490e6, GB, 300),
            "stalled but over the limit: keep going"
        );
    }

    #[test]
    fn gives_up_improving_after_many_passes() {
        let mut c = Convergence::default();
        let mut pending = 250e6;
        let mut switched = None;
        for pass in 1..=MAX_PASSES {
            if c.switch_now(pending, GB, 300) {
                switched = Some(pass);
                break;
            }
            pending *= 0.79;
        }
        assert!(switched.is_some());
    }

    #[test]
    fn zero_limit_needs_nothing_left() {
        let mut c = Convergence::default();
        assert!(!c.switch_now(4096.0, GB, 0));
        assert!(c.switch_now(0.0, GB, 0));
    }

    #[test]
    fn allowance_is_a_windows_share_of_the_cap() {
        let m = Meter::new(1000);
        assert_eq!(m.allowance(1000, 0), u64::MAX, "no cap");
        // 10 MB/s over a 100 ms window: 1 MB per window, less what this window sent.
        assert_eq!(m.allowance(1000, 10_000_000), 1_000_000);
        assert_eq!(m.allowance(1000 + 400_000, 10_000_000), 600_000);
        assert_eq!(m.allowance(1000 + 2_000_000, 10_000_000), 0);
        assert!(m.window_left() <= WINDOW);
    }
}
