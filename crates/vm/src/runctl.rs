//! Run control: the run state, and the gate vCPU threads pass through.
//!
//! `stop` is synchronous: it returns only once every vCPU thread is parked outside a step, so
//! guest memory does not change afterwards — the property migration's switchover and RAM
//! verification rely on. vCPUs never wait for anything but this gate, so stopping cannot
//! deadlock with the migration or QMP threads (seed 004).
//!
//! It also holds the vCPU throttle that `auto-converge` sets ([`RunControl::set_throttle`]):
//! running vCPUs pass a [`RunControl::throttle_point`] between batches of guest work and sleep
//! there their share of off-CPU time, as QEMU's cpu-throttle makes its vCPUs do.
//!
//! [`RunControl::hold`] parks the vCPUs the same way without leaving the run state (QEMU's
//! `pause_all_vcpus`): a running guest stays `running`, no STOP/RESUME events, and its vCPUs
//! carry on when the hold ends. Reading all of guest memory consistently from a running guest
//! (`x-livemig-verify-ram`) needs exactly that.

use migration::runstate::RunState;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A throttled vCPU sleeps after each slice of this much running time (QEMU's
/// `CPU_THROTTLE_TIMESLICE_NS`).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

struct Ctl {
    state: RunState,
    /// vCPU threads currently parked (or not started / exited).
    parked: usize,
    vcpus: usize,
    quit: bool,
    /// Live [`Hold`]s: while any is, vCPUs stay parked even in `Running`.
    holds: usize,
}

impl Ctl {
    /// Whether vCPUs may run now.
    fn may_run(&self) -> bool {
        self.state == RunState::Running && self.holds == 0 && !self.quit
    }
}

/// vCPUs parked by [`RunControl::hold`]; they may run again (if the machine still runs) when
/// every hold is dropped.
#[must_use = "the vCPUs run again as soon as the hold is dropped"]
pub struct Hold<'a> {
    rc: &'a RunControl,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut c = self.rc.lock();
        c.holds -= 1;
        self.rc.running.store(c.may_run(), Ordering::Release);
        self.rc.cond.notify_all();
    }
}

/// The run state and the vCPU gate.
pub struct RunControl {
    ctl: Mutex<Ctl>,
    cond: Condvar,
    running: AtomicBool,
    /// The throttle in force, % of the time each vCPU stays off the CPU (0: none).
    throttle: AtomicU8,
}

/// What a vCPU should do after [`RunControl::gate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Run guest steps.
    Run,
    /// Exit the thread.
    Quit,
}

impl RunControl {
    /// A stopped machine in `state` with `vcpus` vCPU threads (all counted as parked until
    /// they first run).
    pub fn new(state: RunState, vcpus: usize) -> Self {
        RunControl {
            ctl: Mutex::new(Ctl {
                state,
                parked: vcpus,
                vcpus,
                quit: false,
                holds: 0,
            }),
            cond: Condvar::new(),
            running: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run state.
    pub fn state(&self) -> RunState {
        self.lock().state
    }

    /// Whether vCPUs may run (the vCPUs' fast-path check).
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Starts the vCPUs. Returns false if they were already running.
    pub fn start(&self) -> bool {
        let mut c = self.lock();
        let was = c.state == RunState::Running;
        c.state = RunState::Running;
        self.running.store(c.may_run(), Ordering::Release);
        self.cond.notify_all();
        !was
    }

    /// Stops the vCPUs and enters `state`; returns once all are parked. Returns whether they
    /// were running.
    pub fn stop(&self, state: RunState) -> bool {
        let mut c = self.lock();
        let was = c.state == RunState::Running;
        c.state = state;
        self.running.store(false, Ordering::Release);
        self.cond.notify_all();
        while c.parked < c.vcpus {
            c = self.cond.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        was
    }

    /// Parks every vCPU without changing the run state, and returns once all are parked: guest
    /// memory does not change (through the vCPUs) while the returned [`Hold`] lives. Holds
    /// nest, and `stop`/`start` under a hold change the state only: the vCPUs stay parked
    /// until the last hold ends.
    pub fn hold(&self) -> Hold<'_> {
        let mut c = self.lock();
        c.holds += 1;
        self.running.store(false, Ordering::Release);
        self.cond.notify_all();
        while c.parked < c.vcpus {
            c = self.cond.wait(c).unwrap_or_else(|p| p.into_inner());
        }
        Hold { rc: self }
    }

    /// Sets the state of a stopped machine.
    pub fn set_state(&self, state: RunState) {
        let mut c = self.lock();
        c.state = state;
        if state != RunState::Running {
            self.running.store(false, Ordering::Release);
        }
        self.cond.notify_all();
    }

    /// The gate: a vCPU thread calls it whenever [`RunControl::is_running`] is false. It
    /// parks until the machine runs again or quits.
    pub fn gate(&self) -> Gate {
        let mut c = self.lock();
        loop {
            if c.quit {
                return Gate::Quit;
            }
            if c.may_run() {
                c.parked -= 1;
                return Gate::Run;
            }
            c = self.cond.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Called by a running vCPU that noticed the machine stopping: counts it parked, then
    /// waits at the gate.
    pub fn park(&self) -> Gate {
        {
            let mut c = self.lock();
            c.parked += 1;
            self.cond.notify_all();
        }
        self.gate()
    }

    /// Sleeps up to `d` while running; returns early when the machine stops or quits.
    pub fn pause_while_running(&self, d: Duration) {
        let c = self.lock();
        if c.may_run() {
            let _ = self.cond.wait_timeout(c, d);
        }
    }

    /// Throttles the vCPUs to run at most `100 - percent` % of the time (clamped to 99 %;
    /// 0 lifts the throttle, and wakes the vCPUs sleeping in it at once).
    pub fn set_throttle(&self, percent: u8) {
        let _c = self.lock();
        self.throttle.store(percent.min(99), Ordering::Relaxed);
        self.cond.notify_all();
    }

    /// The throttle in force, % (0: none).
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::Relaxed)
    }

    /// Called by a running vCPU between batches of guest work, with the instant its current
    /// run slice began. Once the slice is [`THROTTLE_SLICE`] or longer and a throttle of
    /// `p` % is in force, it sleeps `slice × p / (100 − p)` — so the vCPU runs `100 − p` % of
    /// the time — and starts a new slice. The sleep ends early when the machine stops or
    /// quits or is held, or the throttle is lifted. Returns how long it slept.
    pub fn throttle_point(&self, slice_start: &mut Instant) -> Duration {
        let pct = self.throttle();
        if pct == 0 {
            *slice_start = Instant::now();
            return Duration::ZERO;
        }
        let ran = slice_start.elapsed();
        if ran < THROTTLE_SLICE {
            return Duration::ZERO;
        }
        let pct = u32::from(pct);
        let begin = Instant::now();
        let until = begin + ran * pct / (100 - pct);
        let mut c = self.lock();
        loop {
            let now = Instant::now();
            if now >= until || !c.may_run() || self.throttle() == 0 {
                break;
            }
            c = self
                .cond
                .wait_timeout(c, until - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(c);
        *slice_start = Instant::now();
        slice_start.saturating_duration_since(begin)
    }

    /// Makes every vCPU thread exit (they count as parked).
    pub fn quit(&self) {
        let mut c = self.lock();
        c.quit = true;
        self.running.store(false, Ordering::Release);
        self.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;
    use std::thread::JoinHandle;

    #[test]
    fn stop_waits_for_every_vcpu_to_park() {
        let rc = Arc::new(RunControl::new(RunState::Prelaunch, 2));
        let (counter, threads) = spawn_vcpus(&rc, 2);
        assert!(rc.start());
        while counter.load(Ordering::Relaxed) < 1000 {
            std::thread::yield_now();
        }
        assert!(rc.stop(RunState::Paused));
        let frozen = counter.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            counter.load(Ordering::Relaxed),
            frozen,
            "a vCPU ran after stop returned"
        );
        assert_eq!(rc.state(), RunState::Paused);
        rc.start();
        while counter.load(Ordering::Relaxed) == frozen {
            std::thread::yield_now();
        }
        rc.quit();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_throttled_vcpu_sleeps_its_share_of_each_slice() {
        let rc = RunControl::new(RunState::Running, 1);
        rc.start();
        // No throttle: no sleep, and the slice restarts (during the call: compared with
        // instants, not with a time this thread may wait for a CPU after the call).
        let mut slice = Instant::now() - Duration::from_millis(50);
        let called = Instant::now();
        assert_eq!(rc.throttle_point(&mut slice), Duration::ZERO);
        assert!(slice >= called);
        rc.set_throttle(75);
        assert_eq!(rc.throttle(), 75);
        // A slice shorter than THROTTLE_SLICE goes on: no sleep, the same slice. (Again if this
        // thread was kept off the CPU long enough for the slice to reach THROTTLE_SLICE.)
        loop {
            let start = Instant::now();
            let mut slice = start;
            let slept = rc.throttle_point(&mut slice);
            if start.elapsed() >= THROTTLE_SLICE {
                continue;
            }
            assert_eq!(slept, Duration::ZERO);
            assert_eq!(slice, start);
            break;
        }
        // 20 ms run at 75 %: 60 ms off the CPU, then a new slice.
        let mut slice = Instant::now() - Duration::from_millis(20);
        let called = Instant::now();
        let slept = rc.throttle_point(&mut slice);
        assert!(slept >= Duration::from_millis(60), "{slept:?}");
        assert!(slept < Duration::from_secs(5), "{slept:?}");
        assert!(slice >= called + Duration::from_millis(60));
        rc.set_throttle(100);
        assert_eq!(rc.throttle(), 99, "the throttle is capped at 99 %");
    }

    #[test]
    fn lifting_the_throttle_or_stopping_wakes_a_sleeping_vcpu() {
        for lift in [true, false] {
            let rc = Arc::new(RunControl::new(RunState::Running, 1));
            rc.start();
            rc.set_throttle(99);
            let t = {
                let rc = rc.clone();
                std::thread::spawn(move || {
                    // 100 ms at 99 %: 9.9 s unless woken.
                    let mut slice = Instant::now() - Duration::from_millis(100);
                    rc.throttle_point(&mut slice)
                })
            };
            std::thread::sleep(Duration::from_millis(50));
            if lift {
                rc.set_throttle(0);
            } else {
                // The sleeping vCPU is not counted as parked: mark the state only.
                rc.set_state(RunState::Paused);
            }
            let slept = t.join().unwrap();
            assert!(slept < Duration::from_secs(5), "lift={lift}: {slept:?}");
        }
    }

    /// vCPU threads as the machine runs them: a counter of steps each.
    fn spawn_vcpus(rc: &Arc<RunControl>, n: usize) -> (Arc<AtomicU64>, Vec<JoinHandle<()>>) {
        let counter = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|_| {
                let rc = rc.clone();
                let counter = counter.clone();
                std::thread::spawn(move || {
                    if rc.gate() == Gate::Quit {
                        return;
                    }
                    loop {
                        if !rc.is_running() && rc.park() == Gate::Quit {
                            return;
                        }
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        (counter, threads)
    }

    fn runs_on(counter: &AtomicU64) {
        let from = counter.load(Ordering::Relaxed);
        while counter.load(Ordering::Relaxed) < from + 1000 {
            std::thread::yield_now();
        }
    }

    fn frozen(counter: &AtomicU64) {
        let at = counter.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            counter.load(Ordering::Relaxed),
            at,
            "a vCPU ran under a hold"
        );
    }

    #[test]
    fn hold_parks_the_vcpus_and_keeps_the_state() {
        let rc = Arc::new(RunControl::new(RunState::Prelaunch, 2));
        let (counter, threads) = spawn_vcpus(&rc, 2);
        rc.start();
        runs_on(&counter);
        {
            let _hold = rc.hold();
            assert_eq!(rc.state(), RunState::Running);
            frozen(&counter);
            // Nested holds; stop and start under a hold change the state, not the vCPUs.
            let inner = rc.hold();
            assert!(rc.stop(RunState::Paused));
            assert!(rc.start());
            drop(inner);
            frozen(&counter);
            assert_eq!(rc.state(), RunState::Running);
        }
        runs_on(&counter);
        // A hold on a stopped machine leaves it stopped when it ends.
        rc.stop(RunState::Paused);
        drop(rc.hold());
        frozen(&counter);
        assert_eq!(rc.state(), RunState::Paused);
        rc.quit();
        for t in threads {
            t.join().unwrap();
        }
    }
}
