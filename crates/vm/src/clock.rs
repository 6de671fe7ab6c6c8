//! The guest clock: nanoseconds of run time, which stands still while the VM is stopped and
//! migrates in QEMU's `timer` section so the destination's clock continues from the source's.

use std::sync::Mutex;
use std::time::Instant;

struct Inner {
    /// Run time accumulated before `since`.
    base_ns: u64,
    /// When the VM last started, if it runs.
    since: Option<Instant>,
}

/// The VM clock (QEMU's `QEMU_CLOCK_VIRTUAL`).
pub struct VmClock {
    inner: Mutex<Inner>,
}

impl Default for VmClock {
    fn default() -> Self {
        VmClock {
            inner: Mutex::new(Inner {
                base_ns: 0,
                since: None,
            }),
        }
    }
}

impl VmClock {
    /// Nanoseconds the VM has run.
    pub fn now_ns(&self) -> u64 {
        let i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        i.base_ns + i.since.map_or(0, |s| s.elapsed().as_nanos() as u64)
    }

    /// The VM starts running.
    pub fn resume(&self) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if i.since.is_none() {
            i.since = Some(Instant::now());
        }
    }

    /// The VM stops.
    pub fn pause(&self) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = i.since.take() {
            i.base_ns += s.elapsed().as_nanos() as u64;
        }
    }

    /// Sets the run time (loading migrated state, with the VM stopped).
    pub fn set_ns(&self, ns: u64) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        i.base_ns = ns;
        if i.since.is_some() {
            i.since = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stands_still_while_paused() {
        let c = VmClock::default();
        c.set_ns(1_000);
        assert_eq!(c.now_ns(), 1_000);
        c.resume();
        std::thread::sleep(std::time::Duration::from_millis(5));
        c.pause();
        let t = c.now_ns();
        assert!(t >= 5_000_000, "{t}");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(c.now_ns(), t);
    }
}
