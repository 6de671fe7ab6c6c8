//! Pages the destination has asked the source for and not yet placed.
//!
//! The fault thread records a page when it first faults and sends one request for it, however
//! many threads then wait on it; placement removes it and takes a latency sample (first fault →
//! placement, what a blocked vCPU waits). After a recovery, everything still pending is asked
//! for again (the source lost its queue with the old connection).
//!
//! Each sample is also split in three stages, so a slow request says where it was slow:
//! *asking* (fault → the request handed to the return path's socket: the fault thread),
//! *answer* (→ placement begins: the write, the source, both sockets and the destination's
//! reader) and *placing* (the ioctl, the received map, the wake-up). A request whose page
//! came before the request went out (the background push was faster) has no split.
//!
//! One mutex guards the map; it is held for an insert or a remove, never across I/O or an
//! access to guest memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What the fault thread should do about a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// First fault on the page: send a request.
    Request,
    /// Already requested: wait for it.
    AlreadyRequested,
}

/// A latency histogram: 1 µs buckets up to [`FINE_US`], then one bucket per power of two.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    fine: Vec<u64>,
    coarse: [u64; 32],
    count: u64,
    sum_ns: u128,
    max_ns: u64,
}

/// Upper end (exclusive) of the 1 µs buckets.
pub const FINE_US: u64 = 4096;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            fine: vec![0; FINE_US as usize],
            coarse: [0; 32],
            count: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl LatencyHistogram {
    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let us = ns / 1000;
        if let Some(b) = self.fine.get_mut(us as usize) {
            *b += 1;
        } else {
            let i = (63 - us.leading_zeros()) as usize;
            if let Some(b) = self.coarse.get_mut(i) {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean in nanoseconds (0 without samples).
    pub fn mean_ns(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            (self.sum_ns / u128::from(self.count)) as u64
        }
    }

    /// Largest sample in nanoseconds.
    pub fn max_ns(&self) -> u64 {
        self.max_ns
    }

    /// The `q`-quantile (0..=1) in microseconds: the upper edge of the bucket that holds it
    /// (exact to 1 µs below [`FINE_US`]).
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (us, n) in self.fine.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return us as u64 + 1;
            }
        }
        for (i, n) in self.coarse.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return 2u64.saturating_pow(i as u32 + 1);
            }
        }
        self.max_ns / 1000
    }
}

/// A page asked for: when it first faulted, and when its request last went out.
#[derive(Clone, Copy)]
struct Pending {
    fault: Instant,
    sent: Option<Instant>,
}

/// The three stages of a request's latency (see the module's documentation).
#[derive(Debug, Clone, Default)]
pub struct Stages {
    /// Fault → request handed to the socket.
    pub asking: LatencyHistogram,
    /// Request handed to the socket → placement begins.
    pub answer: LatencyHistogram,
    /// Placement begins → placed.
    pub placing: LatencyHistogram,
}

#[derive(Default)]
struct Inner {
    pending: HashMap<(usize, u64), Pending>,
    latency: LatencyHistogram,
    stages: Stages,
    requests: u64,
}

impl Inner {
    /// Completes the request for `key`, if there is one: `begun` is when its placement began,
    /// `now` when it ended.
    fn complete(&mut self, key: (usize, u64), begun: Instant, now: Instant) {
        let Some(p) = self.pending.remove(&key) else {
            return;
        };
        self.latency.record(now.saturating_duration_since(p.fault));
        if let Some(sent) = p.sent.filter(|s| *s <= begun) {
            let st = &mut self.stages;
            st.asking.record(sent.saturating_duration_since(p.fault));
            st.answer.record(begun.saturating_duration_since(sent));
            st.placing.record(now.saturating_duration_since(begun));
        }
    }
}

/// The pending requests of one incoming postcopy migration.
#[derive(Default)]
pub struct Requests {
    inner: Mutex<Inner>,
}

impl Requests {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fault on page `page` of block `block` at `now`.
    pub fn fault(&self, block: usize, page: u64, now: Instant) -> FaultAction {
        let mut i = self.lock();
        if i.pending.contains_key(&(block, page)) {
            return FaultAction::AlreadyRequested;
        }
        i.pending.insert(
            (block, page),
            Pending {
                fault: now,
                sent: None,
            },
        );
        i.requests += 1;
        FaultAction::Request
    }

    /// Forgets a request that could not be made (the page turned out to be present).
    pub fn withdraw(&self, block: usize, page: u64) {
        self.lock().pending.remove(&(block, page));
    }

    /// The requests for `pages` (block, page) are being written to the return path at `now`
    /// (again, after a recovery: the last write counts).
    pub fn sent(&self, pages: &[(usize, u64)], now: Instant) {
        let mut i = self.lock();
        for k in pages {
            if let Some(p) = i.pending.get_mut(k) {
                p.sent = Some(now);
            }
        }
    }

    /// Pages `first..first+count` of `block` were placed at `now` (one run, whose placement
    /// began at `begun`): completes the requests among them, under one lock hold, walking
    /// whichever is shorter — the run or the pending requests (usually none).
    pub fn placed_range(&self, block: usize, first: u64, count: u64, begun: Instant, now: Instant) {
        let mut i = self.lock();
        if i.pending.is_empty() {
            return;
        }
        let end = first.saturating_add(count);
        let done: Vec<(usize, u64)> = if count <= i.pending.len() as u64 {
            (first..end)
                .map(|p| (block, p))
                .filter(|k| i.pending.contains_key(k))
                .collect()
        } else {
            i.pending
                .keys()
                .filter(|(b, p)| *b == block && (first..end).contains(p))
                .copied()
                .collect()
        };
        for k in done {
            i.complete(k, begun, now);
        }
    }

    /// Every page still pending, oldest first.
    pub fn pending(&self) -> Vec<(usize, u64)> {
        let i = self.lock();
        let mut v: Vec<_> = i.pending.iter().map(|(k, p)| (p.fault, *k)).collect();
        v.sort();
        v.into_iter().map(|(_, k)| k).collect()
    }

    /// Number of distinct pages requested so far.
    pub fn requests(&self) -> u64 {
        self.lock().requests
    }

    /// A copy of the fault → placement latency histogram.
    pub fn latency(&self) -> LatencyHistogram {
        self.lock().latency.clone()
    }

    /// A copy of the latency's three stages.
    pub fn stages(&self) -> Stages {
        self.lock().stages.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_per_page_and_latency_on_placement() {
        let r = Requests::default();
        let t0 = Instant::now();
        assert_eq!(r.fault(0, 5, t0), FaultAction::Request);
        assert_eq!(r.fault(0, 5, t0), FaultAction::AlreadyRequested);
        assert_eq!(r.fault(1, 5, t0), FaultAction::Request);
        assert_eq!(
            r.fault(0, 6, t0 + Duration::from_micros(1)),
            FaultAction::Request
        );
        assert_eq!(r.pending(), vec![(0, 5), (1, 5), (0, 6)]);
        let at = t0 + Duration::from_micros(25);
        r.placed_range(0, 5, 1, at, at);
        assert_eq!(r.latency().max_ns(), 25_000);
        r.placed_range(0, 5, 1, t0, t0);
        assert_eq!(r.latency().count(), 1, "placed twice: only one sample");
        r.withdraw(1, 5);
        assert_eq!(r.pending(), vec![(0, 6)]);
        assert_eq!(r.requests(), 3);
        let h = r.latency();
        assert_eq!(h.count(), 1);
        assert_eq!(h.quantile_us(0.5), 26);
        // A page faulted again after placement is a new request.
        assert_eq!(r.fault(0, 5, t0), FaultAction::Request);
    }

    #[test]
    fn a_run_completes_the_requests_inside_it() {
        let r = Requests::default();
        let t0 = Instant::now();
        for (b, p) in [(0, 3), (0, 100), (1, 4), (0, 10)] {
            assert_eq!(r.fault(b, p, t0), FaultAction::Request);
        }
        // A short run (walked page by page), then a long one (the pending map is walked).
        let at = |us| t0 + Duration::from_micros(us);
        r.placed_range(0, 0, 10, at(5), at(5));
        assert_eq!(r.pending(), vec![(0, 10), (0, 100), (1, 4)]);
        r.placed_range(0, 10, 1000, at(7), at(7));
        assert_eq!(r.pending(), vec![(1, 4)]);
        assert_eq!(r.latency().count(), 3);
        r.placed_range(1, 0, 4, t0, t0);
        assert_eq!(r.pending(), vec![(1, 4)], "the run ends before page 4");
    }

    #[test]
    fn each_sample_is_split_into_asking_answer_and_placing() {
        let r = Requests::default();
        let t0 = Instant::now();
        let at = |us| t0 + Duration::from_micros(us);
        for p in [1, 2, 3] {
            assert_eq!(r.fault(0, p, t0), FaultAction::Request);
        }
        r.sent(&[(0, 1), (0, 2)], at(6));
        // Re-sent after a recovery: the last write counts; a page not pending is ignored.
        r.sent(&[(0, 2), (0, 9)], at(10));
        r.placed_range(0, 1, 1, at(40), at(43));
        r.placed_range(0, 2, 1, at(70), at(90));
        // Page 3's request never went out (placed first by the background push): a latency
        // sample without a split.
        r.placed_range(0, 3, 1, at(50), at(52));
        assert_eq!(r.latency().count(), 3);
        let st = r.stages();
        for h in [&st.asking, &st.answer, &st.placing] {
            assert_eq!(h.count(), 2);
        }
        assert_eq!(
            st.asking.quantile_us(0.0),
            7,
            "6 µs in the 1 µs bucket [6, 7)"
        );
        assert_eq!(st.asking.quantile_us(1.0), 11);
        assert_eq!(st.answer.quantile_us(0.0), 35);
        assert_eq!(st.answer.quantile_us(1.0), 61);
        assert_eq!(st.placing.quantile_us(0.0), 4);
        assert_eq!(st.placing.quantile_us(1.0), 21);
    }

    #[test]
    fn quantiles() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.quantile_us(0.5), 0);
        for us in 1..=100 {
            h.record(Duration::from_micros(us));
        }
        h.record(Duration::from_millis(20));
        assert_eq!(h.count(), 101);
        assert_eq!(h.quantile_us(0.5), 52);
        assert_eq!(h.quantile_us(0.99), 101);
        assert_eq!(
            h.quantile_us(1.0),
            32768,
            "20 ms lands in [16384, 32768) µs"
        );
        assert_eq!(h.max_ns(), 20_000_000);
    }
}
