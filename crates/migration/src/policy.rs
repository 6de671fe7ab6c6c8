//! The source's policies, kept apart from the mechanics so each can be read and tested alone:
//! how fast to send ([`Meter`]: bandwidth measured and budgeted over 100 ms windows), what the
//! destination has not consumed yet and how fast it consumes ([`Backlog`]), when to stop
//! iterating and switch over ([`Convergence`]), and how hard to throttle a guest that dirties
//! memory faster than it can be sent ([`AutoConverge`]).

use crate::engine::OutgoingStats;
use std::collections::VecDeque;
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

/// The values of the PINGs that measure the destination's progress: the top bit set, the
/// rest a sequence number, apart from the engine's other PINGs (1 to 4, the keepalive's).
pub(crate) const BACKLOG_PING: u32 = 0x8000_0000;

/// What the destination has not consumed yet, and how fast it consumes.
///
/// Bytes a write accepted are not at the destination: they wait in the socket buffers at both
/// ends (megabytes per connection; with multifd, per channel) and in the destination's queue
/// of pages to place, and with compression each of those bytes stands for many bytes of RAM
/// to decompress and place (a destination without `-mem-prealloc` also faults every page in).
/// All of it must be consumed before the destination can run the guest, so it belongs to the
/// downtime as much as the dirty pages do — yet the rate at which the source writes does not
/// show it: while the buffers fill, it is far above what the destination takes.
///
/// So the source asks. After each round (the end of a RAM section, where every multifd
/// channel has been synced) it sends a PING numbered from [`BACKLOG_PING`] on the main
/// stream, noting the bytes sent so far, counted as the [`Meter`] counts them (RAM bytes
/// queued on the channels, uncompressed). The destination answers with a PONG once its loader
/// reaches the PING — QEMU's and livemig's loaders do so only after every page before that
/// end of section is in guest memory, multifd channels included — so a PONG says that every
/// byte sent before its PING has been consumed. What was sent after the last answered PING is
/// the backlog; the bytes answered per second while the destination had a backlog all along
/// (an answer found more PINGs waiting) are its rate of consumption.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    next: u32,
    /// PINGs not answered yet: their value, the bytes sent when each went, and when.
    waiting: VecDeque<(u32, u64, Instant)>,
    /// Bytes sent before the last answered PING: consumed by the destination.
    acked: u64,
    /// When the last answer arrived, and whether PINGs were still waiting after it (the
    /// destination was busy until the next answer).
    last: Option<(u32, Instant, bool)>,
    busy_bytes: u64,
    busy_time: Duration,
    /// The destination's rate of consumption (bytes/s), the last measured.
    rate: Option<f64>,
    /// When the first PING went.
    first: Option<Instant>,
}

impl Backlog {
    /// The value of the next PING, to be written at `at` after `sent` bytes.
    pub(crate) fn ping(&mut self, sent: u64, at: Instant) -> u32 {
        let v = BACKLOG_PING | (self.next & !BACKLOG_PING);
        self.next = self.next.wrapping_add(1);
        self.waiting.push_back((v, sent, at));
        self.first.get_or_insert(at);
        v
    }

    /// How long the oldest PING not answered yet has waited at `now`. A destination that
    /// consumes, however slowly, answers within the time its backlog takes; one whose return
    /// path carries no answers (a command that passes nothing back) never does.
    pub(crate) fn silent_for(&self, now: Instant) -> Duration {
        self.waiting.front().map_or(Duration::ZERO, |(_, _, at)| {
            now.saturating_duration_since(*at)
        })
    }

    /// The answer to PING `value` arrived at `at` (answers to older PINGs may have been
    /// skipped: one answers for every PING before it, the stream being in order).
    pub(crate) fn answered(&mut self, value: u32, at: Instant) {
        if self.last.is_some_and(|(v, _, _)| v == value) {
            return;
        }
        let Some(pos) = self.waiting.iter().position(|(v, _, _)| *v == value) else {
            return;
        };
        let Some((_, bytes, _)) = self.waiting.drain(..=pos).next_back() else {
            return;
        };
        if let Some((_, prev, true)) = self.last {
            // Busy from the previous answer to this one: a sample of its rate.
            self.busy_bytes += bytes.saturating_sub(self.acked);
            self.busy_time += at.saturating_duration_since(prev);
            if self.busy_time >= WINDOW {
                self.rate = Some(self.busy_bytes as f64 / self.busy_time.as_secs_f64());
                self.busy_bytes = 0;
                self.busy_time = Duration::ZERO;
            }
        }
        self.acked = self.acked.max(bytes);
        self.last = Some((value, at, !self.waiting.is_empty()));
    }

    /// Bytes sent (`sent` so far) that the destination has not confirmed.
    pub(crate) fn unconsumed(&self, sent: u64) -> u64 {
        sent.saturating_sub(self.acked)
    }

    /// The bandwidth to plan the switchover with, given `bw`, the rate the source writes.
    /// While the destination is behind (its last answer found more PINGs waiting), what it
    /// consumes is the limit, however fast the source writes into the buffers: its measured
    /// rate, or before a busy stretch long enough to measure, what it consumed on average
    /// since the first PING (less than its rate, if it waited for data at first: the safe
    /// side); before any answer, the source's rate (a return path that carries no answers
    /// must not hold the switchover back). Once it
    /// keeps up, the source's rate, but not below the rate the destination showed when it was
    /// behind: a source with little left to send writes slowly, and that says nothing of the
    /// link.
    pub(crate) fn bandwidth(&self, bw: f64) -> f64 {
        match (self.rate, self.last) {
            (Some(r), Some((_, _, true))) => r,
            (Some(r), _) => r.max(bw),
            (None, Some((_, at, true))) => {
                let secs = self
                    .first
                    .map_or(0.0, |f| at.saturating_duration_since(f).as_secs_f64());
                if secs > 0.0 {
                    (self.acked as f64 / secs).min(bw)
                } else {
                    0.0
                }
            }
            (None, _) => bw,
        }
    }

    /// The destination's rate of consumption (bytes/s), once measured.
    pub(crate) fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// Whether the destination has answered every PING.
    pub(crate) fn caught_up(&self) -> bool {
        self.waiting.is_empty()
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

/// The `auto-converge` parameters, with QEMU's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ThrottleParams {
    /// `throttle-trigger-threshold`: the share (%) of the bytes sent in a period that the guest
    /// may dirty in it before it is throttled.
    pub threshold: u64,
    /// `cpu-throttle-initial`: the first throttle (%).
    pub initial: u64,
    /// `cpu-throttle-increment`: how much each later step adds (%).
    pub increment: u64,
    /// `cpu-throttle-tailslow`: later steps add no more than would bring the dirty rate down
    /// to the threshold.
    pub tailslow: bool,
    /// `max-cpu-throttle`: the ceiling (%).
    pub max: u64,
}

/// A throttle period closes at the first dirty-log sync more than this long after it opened.
const THROTTLE_PERIOD: Duration = Duration::from_millis(1000);

/// Auto-converge: when to throttle the guest's vCPUs and how hard — QEMU 7.2's
/// `migration_trigger_throttle` and `mig_throttle_guest_down`, step for step.
///
/// The dirty pages found by the dirty-log syncs are counted over a period, which closes at the
/// first sync more than a second after it opened. When it closes, the bytes the guest dirtied
/// in it are compared with `threshold` % of the bytes sent in it. The second time (counted
/// since the last step, not necessarily in a row) they are more, the throttle steps up: to
/// `initial` % if it was off, otherwise by `increment` (with `tailslow`, by no more than the
/// cut in CPU time that would bring the dirty rate down to the threshold), never above `max`.
/// It never steps down: the migration lifts it when it ends.
pub(crate) struct AutoConverge {
    period_start: Instant,
    sent_at_period_start: u64,
    dirty_in_period: u64,
    /// Periods over the threshold since the last step.
    high: u32,
    /// The throttle in force, % (0: off).
    percent: u64,
}

impl AutoConverge {
    /// A controller whose first period opens at `now`, with `sent` bytes already sent.
    pub(crate) fn new(now: Instant, sent: u64) -> Self {
        AutoConverge {
            period_start: now,
            sent_at_period_start: sent,
            dirty_in_period: 0,
            high: 0,
            percent: 0,
        }
    }

    /// Called after each dirty-log sync, at `now`, with the bytes sent so far and the bytes the
    /// sync found newly dirty. Returns the new throttle (%) when it changes.
    pub(crate) fn after_sync(
        &mut self,
        now: Instant,
        sent: u64,
        dirty_bytes: u64,
        p: &ThrottleParams,
    ) -> Option<u8> {
        self.dirty_in_period += dirty_bytes;
        if now.saturating_duration_since(self.period_start) <= THROTTLE_PERIOD {
            return None;
        }
        let sent_in_period = sent.saturating_sub(self.sent_at_period_start);
        let dirty = self.dirty_in_period;
        self.period_start = now;
        self.sent_at_period_start = sent;
        self.dirty_in_period = 0;
        let threshold = sent_in_period.saturating_mul(p.threshold) / 100;
        if dirty <= threshold {
            return None;
        }
        self.high += 1;
        if self.high < 2 {
            return None;
        }
        self.high = 0;
        let next = if self.percent == 0 {
            p.initial
        } else {
            let step = if p.tailslow {
                // The CPU share that would bring the dirty rate down to the threshold, if
                // dirtying scales with CPU time.
                let cpu_now = 100 - self.percent;
                let cpu_ideal = (cpu_now as f64 * (threshold as f64 / dirty as f64)) as u64;
                (cpu_now - cpu_ideal).min(p.increment)
            } else {
                p.increment
            };
            (self.percent + step).min(p.max)
        };
        // As QEMU's `cpu_throttle_set`: within 1..=99.
        let next = next.clamp(1, 99);
        if next == self.percent {
            return None;
        }
        self.percent = next;
        Some(next as u8)
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
    fn the_backlog_is_what_the_destination_has_not_answered_for() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut b = Backlog::default();
        assert_eq!(b.unconsumed(1000), 1000, "nothing answered yet");
        let p1 = b.ping(10_000_000, t0);
        let p2 = b.ping(20_000_000, t0);
        let p3 = b.ping(30_000_000, ms(10));
        assert_eq!(b.silent_for(ms(50)), Duration::from_millis(50));
        assert!(p1 & BACKLOG_PING != 0 && p1 != p2 && p2 != p3);
        assert_eq!(b.bandwidth(1e9), 1e9, "no rate measured yet");
        // Answers come in order; an answer covers the PINGs before it.
        b.answered(p1, ms(0));
        assert_eq!(b.unconsumed(35_000_000), 25_000_000);
        // The destination was busy from the first answer to the next: 10 MB in 100 ms.
        b.answered(p2, ms(100));
        assert_eq!(b.unconsumed(35_000_000), 15_000_000);
        assert_eq!(b.silent_for(ms(100)), Duration::from_millis(90), "p3 waits");
        assert_eq!(
            b.bandwidth(1e9),
            100e6,
            "the destination's rate, not the writes'"
        );
        assert_eq!(b.bandwidth(50e6), 100e6, "behind, it is the destination's");
        b.answered(p2, ms(150));
        assert_eq!(
            b.unconsumed(35_000_000),
            15_000_000,
            "a repeated answer changes nothing"
        );
        b.answered(0x6b61, ms(150));
        b.answered(p3, ms(200));
        assert!(b.caught_up());
        assert_eq!(b.silent_for(ms(300)), Duration::ZERO);
        assert_eq!(b.unconsumed(30_000_000), 0);
        // Caught up: the source's rate, but no less than the destination showed.
        assert_eq!(b.bandwidth(1e9), 1e9);
        assert_eq!(
            b.bandwidth(5e3),
            100e6,
            "an idle source says nothing of the link"
        );
    }

    #[test]
    fn before_its_rate_is_measured_a_destination_behind_is_taken_at_its_average() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut b = Backlog::default();
        // The buffers took 40 MB at once: the source's rate says 4 GB/s.
        let p1 = b.ping(20_000_000, t0);
        b.ping(40_000_000, ms(10));
        assert_eq!(b.bandwidth(4e9), 4e9, "nothing answered: the source's rate");
        // The first answer, 200 ms later, with the second PING still waiting: 100 MB/s on
        // average, not the 4 GB/s the source wrote at.
        b.answered(p1, ms(200));
        assert_eq!(b.rate, None);
        assert_eq!(b.bandwidth(4e9), 100e6);
        assert_eq!(b.bandwidth(50e6), 50e6, "never above the writes'");
    }

    #[test]
    fn an_idle_destination_gives_no_rate() {
        let t0 = Instant::now();
        let mut b = Backlog::default();
        // Each PING answered before the next one goes: the destination waited for data, so the
        // time between answers says nothing of its speed.
        for i in 1..10u64 {
            let p = b.ping(i * 1000, t0 + Duration::from_millis(i * 50));
            b.answered(p, t0 + Duration::from_millis(i * 50 + 1));
        }
        b.ping(20_000, t0 + Duration::from_millis(500));
        assert_eq!(b.rate, None);
        assert_eq!(b.bandwidth(1e9), 1e9);
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

    const QEMU_DEFAULTS: ThrottleParams = ThrottleParams {
        threshold: 50,
        initial: 20,
        increment: 10,
        tailslow: false,
        max: 99,
    };

    /// Runs periods of 1.5 s in which `sent` bytes go out and `dirty` bytes are dirtied;
    /// returns the throttle after each.
    fn periods(ac: &mut AutoConverge, p: &ThrottleParams, per: &[(u64, u64)]) -> Vec<u64> {
        let mut now = ac.period_start;
        let mut sent = ac.sent_at_period_start;
        per.iter()
            .map(|(s, d)| {
                now += Duration::from_millis(1500);
                sent += s;
                ac.after_sync(now, sent, *d, p);
                ac.percent
            })
            .collect()
    }

    #[test]
    fn throttles_on_the_second_period_over_the_threshold() {
        let mut ac = AutoConverge::new(Instant::now(), 1000);
        // Dirtying exactly half of what is sent is not over the (50 %) threshold.
        assert_eq!(
            periods(&mut ac, &QEMU_DEFAULTS, &[(100, 50), (100, 50)]),
            [0, 0]
        );
        // Over it twice, not in a row: the second time starts the throttle at `initial`.
        assert_eq!(
            periods(&mut ac, &QEMU_DEFAULTS, &[(100, 51), (100, 10), (100, 90)]),
            [0, 0, 20]
        );
        // Then `increment` every second time, up to `max`, and never beyond 99.
        let hot = [(100, 100); 20];
        let got = periods(&mut ac, &QEMU_DEFAULTS, &hot);
        assert_eq!(&got[..4], [20, 30, 30, 40]);
        assert_eq!(*got.last().unwrap(), 99);
        let mut p = QEMU_DEFAULTS;
        p.max = 45;
        let mut ac = AutoConverge::new(Instant::now(), 0);
        assert_eq!(*periods(&mut ac, &p, &hot).last().unwrap(), 45);
    }

    #[test]
    fn a_period_lasts_more_than_a_second() {
        let t0 = Instant::now();
        let mut ac = AutoConverge::new(t0, 0);
        let p = QEMU_DEFAULTS;
        // Syncs within the first second add up their dirty pages; the one after it closes the
        // period.
        for ms in [300, 600, 1000] {
            assert_eq!(
                ac.after_sync(t0 + Duration::from_millis(ms), 1000, 200, &p),
                None
            );
        }
        assert_eq!(ac.dirty_in_period, 600);
        assert_eq!(
            ac.after_sync(t0 + Duration::from_millis(1001), 1000, 0, &p),
            None
        );
        assert_eq!((ac.high, ac.dirty_in_period), (1, 0));
        assert_eq!(
            ac.after_sync(t0 + Duration::from_millis(2100), 2000, 600, &p),
            Some(20)
        );
    }

    #[test]
    fn tailslow_steps_towards_the_threshold() {
        let p = ThrottleParams {
            tailslow: true,
            increment: 30,
            ..QEMU_DEFAULTS
        };
        let mut ac = AutoConverge::new(Instant::now(), 0);
        // 100 sent, 60 dirtied: the threshold is 50, so 80 % CPU × 50/60 = 66.67 → 66:
        // the step is 80 - 66 = 14, less than the increment.
        assert_eq!(periods(&mut ac, &p, &[(100, 60), (100, 60)]), [0, 20]);
        assert_eq!(periods(&mut ac, &p, &[(100, 60), (100, 60)]), [20, 34]);
        // Far over the threshold, the increment caps the step.
        assert_eq!(periods(&mut ac, &p, &[(100, 1000), (100, 1000)]), [34, 64]);
    }
}
