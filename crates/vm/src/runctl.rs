//! Run control: the run state, and the gate vCPU threads pass through.
//!
//! `stop` is synchronous: it returns only once every vCPU thread is parked outside a step, so
//! guest memory does not change afterwards — the property migration's switchover and RAM
//! verification rely on. vCPUs never wait for anything but this gate, so stopping cannot
//! deadlock with the migration or QMP threads (seed 004).

use migration::runstate::RunState;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

struct Ctl {
    state: RunState,
    /// vCPU threads currently parked (or not started / exited).
    parked: usize,
    vcpus: usize,
    quit: bool,
}

/// The run state and the vCPU gate.
pub struct RunControl {
    ctl: Mutex<Ctl>,
    cond: Condvar,
    running: AtomicBool,
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
            }),
            cond: Condvar::new(),
            running: AtomicBool::new(false),
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
        self.running.store(true, Ordering::Release);
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
            if c.state == RunState::Running {
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
        if c.state == RunState::Running && !c.quit {
            let _ = self.cond.wait_timeout(c, d);
        }
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

    #[test]
    fn stop_waits_for_every_vcpu_to_park() {
        let rc = Arc::new(RunControl::new(RunState::Prelaunch, 2));
        let counter = Arc::new(AtomicU64::new(0));
        let mut threads = vec![];
        for _ in 0..2 {
            let rc = rc.clone();
            let counter = counter.clone();
            threads.push(std::thread::spawn(move || {
                if rc.gate() == Gate::Quit {
                    return;
                }
                loop {
                    if !rc.is_running() && rc.park() == Gate::Quit {
                        return;
                    }
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
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
}
