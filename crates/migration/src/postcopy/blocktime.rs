//! vCPU blocktime (capability `postcopy-blocktime`): how long each vCPU was blocked on missing
//! pages, and the *total* blocktime, the time during which every vCPU was blocked at once —
//! QEMU's definition (`mark_postcopy_blocktime_begin/end`), reported by `query-migrate` as
//! `postcopy-vcpu-blocktime` and `postcopy-blocktime` in milliseconds.
//!
//! The fault thread calls [`Blocktime::begin`] with the faulting thread's id; the threads that
//! place pages call [`Blocktime::end`] with the page's address. Everything is atomics: the
//! placing threads and the fault thread never wait for each other. Time is kept in nanoseconds
//! since the tracker was made (QEMU keeps milliseconds, too coarse for pages that arrive in
//! tens of microseconds), and rounded to milliseconds only for `query-migrate`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

struct Vcpu {
    tid: i32,
    /// Page address the vCPU waits for (0: not blocked).
    addr: AtomicU64,
    /// When it started waiting, ns since `start` (0: not blocked).
    since: AtomicU64,
    /// Accumulated blocktime, ns.
    total: AtomicU64,
}

/// Blocktime accounting for one incoming postcopy migration.
pub struct Blocktime {
    start: Instant,
    vcpus: Vec<Vcpu>,
    /// vCPUs blocked right now.
    down: AtomicU32,
    /// When the most recent vCPU became blocked, ns since `start`.
    last_begin: AtomicU64,
    /// Total blocktime (all vCPUs blocked), ns.
    total: AtomicU64,
}

impl Blocktime {
    /// A tracker for vCPUs whose kernel thread ids are `vcpu_tids` (index = vCPU index).
    pub fn new(vcpu_tids: &[i32]) -> Self {
        Blocktime {
            start: Instant::now(),
            vcpus: vcpu_tids
                .iter()
                .map(|&tid| Vcpu {
                    tid,
                    addr: AtomicU64::new(0),
                    since: AtomicU64::new(0),
                    total: AtomicU64::new(0),
                })
                .collect(),
            down: AtomicU32::new(0),
            last_begin: AtomicU64::new(0),
            total: AtomicU64::new(0),
        }
    }

    /// Now, in ns since the tracker was made (never 0, which means "not blocked").
    pub fn now(&self) -> u64 {
        (self.start.elapsed().as_nanos() as u64).max(1)
    }

    /// The vCPU index of kernel thread `tid`, if it is a vCPU.
    pub fn vcpu_of(&self, tid: i32) -> Option<usize> {
        if tid == 0 {
            return None;
        }
        self.vcpus.iter().position(|v| v.tid == tid)
    }

    /// Thread `tid` faulted on page address `addr` at `now`. `received` is asked *after* the
    /// fault is recorded: a page placed in between would otherwise leave the vCPU counted as
    /// blocked forever (QEMU checks in the same order).
    pub fn begin(&self, addr: u64, tid: i32, now: u64, received: impl FnOnce() -> bool) {
        let Some(i) = self.vcpu_of(tid) else {
            return;
        };
        let v = &self.vcpus[i];
        if v.addr.load(Ordering::Acquire) == 0 {
            self.down.fetch_add(1, Ordering::AcqRel);
        }
        self.last_begin.store(now, Ordering::Release);
        v.since.store(now, Ordering::Release);
        v.addr.store(addr, Ordering::Release);
        if received() {
            v.addr.store(0, Ordering::Release);
            v.since.store(0, Ordering::Release);
            self.down.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Page address `addr` was placed at `now`: every vCPU waiting on it stops being blocked.
    pub fn end(&self, addr: u64, now: u64) {
        self.end_range(addr, 1, now);
    }

    /// The pages at addresses `start..start+len` were placed at `now` (one run): every vCPU
    /// waiting on one of them stops being blocked.
    pub fn end_range(&self, start: u64, len: u64, now: u64) {
        let n = self.vcpus.len() as u32;
        let mut affected = 0;
        let mut all_were_down = false;
        let end = start.saturating_add(len);
        for v in &self.vcpus {
            let since = v.since.load(Ordering::Acquire);
            let addr = v.addr.load(Ordering::Acquire);
            if since == 0 || addr == 0 || addr < start || addr >= end {
                continue;
            }
            if v.addr
                .compare_exchange(addr, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
            {
                continue; // another placing thread ended it first
            }
            v.since.store(0, Ordering::Release);
            affected += 1;
            if !all_were_down && self.down.load(Ordering::Acquire) == n {
                all_were_down = true;
            }
            v.total
                .fetch_add(now.saturating_sub(since), Ordering::AcqRel);
        }
        if affected > 0 {
            self.down.fetch_sub(affected, Ordering::AcqRel);
        }
        if all_were_down {
            let last = self.last_begin.load(Ordering::Acquire);
            self.total
                .fetch_add(now.saturating_sub(last), Ordering::AcqRel);
        }
    }

    /// Per-vCPU blocktime in ns.
    pub fn vcpu_ns(&self) -> Vec<u64> {
        self.vcpus
            .iter()
            .map(|v| v.total.load(Ordering::Acquire))
            .collect()
    }

    /// Total blocktime (all vCPUs blocked) in ns.
    pub fn total_ns(&self) -> u64 {
        self.total.load(Ordering::Acquire)
    }

    /// `postcopy-vcpu-blocktime`: per-vCPU blocktime in ms, as QEMU's `uint32` list.
    pub fn vcpu_ms(&self) -> Vec<u32> {
        self.vcpu_ns().into_iter().map(ms).collect()
    }

    /// `postcopy-blocktime`: total blocktime in ms.
    pub fn total_ms(&self) -> u32 {
        ms(self.total_ns())
    }
}

fn ms(ns: u64) -> u32 {
    u32::try_from(ns / 1_000_000).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_vcpu_and_overlap_as_qemu_counts_them() {
        // QEMU's picture with 2 vCPUs: only the time both are blocked counts as total.
        let b = Blocktime::new(&[100, 200]);
        let no = || false;
        b.begin(0x1000, 100, 10, no); // vCPU 0 blocked from 10
        b.begin(0x2000, 200, 30, no); // vCPU 1 from 30: both down
        b.end(0x1000, 50); // vCPU 0 waited 40; both were down from 30 → total += 20
        b.end(0x2000, 70); // vCPU 1 waited 40; vCPU 0 was up → no total
        assert_eq!(b.vcpu_ns(), vec![40, 40]);
        assert_eq!(b.total_ns(), 20);
        // A page placed twice ends nothing the second time.
        b.end(0x2000, 90);
        assert_eq!(b.vcpu_ns(), vec![40, 40]);
    }

    #[test]
    fn one_page_ends_every_vcpu_waiting_on_it() {
        let b = Blocktime::new(&[1, 2, 3]);
        b.begin(0x5000, 1, 1_000_000, || false);
        b.begin(0x5000, 2, 2_000_000, || false);
        b.begin(0x6000, 3, 3_000_000, || false);
        b.end(0x5000, 5_000_000);
        assert_eq!(b.vcpu_ns(), vec![4_000_000, 3_000_000, 0]);
        assert_eq!(b.total_ns(), 2_000_000, "all three down from 3 ms to 5 ms");
        b.end(0x6000, 6_000_000);
        assert_eq!(b.vcpu_ms(), vec![4, 3, 3]);
        assert_eq!(b.total_ms(), 2);
    }

    #[test]
    fn non_vcpu_threads_and_raced_placements_are_not_counted() {
        let b = Blocktime::new(&[7]);
        b.begin(0x1000, 8, 5, || false); // the loader, say
        b.begin(0x1000, 0, 5, || false); // no thread id
        b.begin(0x2000, 7, 5, || true); // placed between fault and check
        b.end(0x2000, 50);
        b.end(0x1000, 50);
        assert_eq!(b.vcpu_ns(), vec![0]);
        assert_eq!(b.total_ns(), 0);
        assert_eq!(b.vcpu_of(7), Some(0));
        assert_eq!(b.vcpu_of(0), None);
        assert!(b.now() >= 1);
    }
}
