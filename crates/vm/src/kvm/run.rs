//! The KVM vCPU threads: enter the guest, handle its exits, park when the VM stops.
//!
//! The guest leaves `KVM_RUN` at least every `guest::layout::BATCH` steps (a write to
//! `PORT_PROGRESS`), when it is idle (`PORT_IDLE`), while it waits for the disk (`PORT_WAIT`),
//! and for each serial byte and device register access. At every exit the thread checks the
//! run gate, so `Machine::stop` returns within one batch. Before it parks, the thread
//! re-enters `KVM_RUN` once with `immediate_exit` set: KVM then completes the port or MMIO
//! access it exited for (RIP moves past the instruction, an `in` gets its value) and returns
//! at once. The saved state is thus always *between* instructions, and a destination never
//! repeats an access the source already performed.

use crate::machine::VmCore;
use crate::runctl::Gate;
use guest::layout::{PIO_BASE, PIO_SIZE, PORT_IDLE, PORT_PROGRESS, PORT_SERIAL, PORT_WAIT};
use kvm_ioctls::VcpuExit;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `KVM_EXIT_DIRTY_RING_FULL`.
const EXIT_DIRTY_RING_FULL: u32 = 31;

enum Next {
    Continue,
    /// The guest cannot go on (triple fault, entry failure): the vCPU stays parked.
    Dead,
}

/// Runs vCPU `id` until the VM quits.
pub fn vcpu_thread(core: &VmCore, id: u32) {
    let Some(kvm) = core.kvm.as_ref() else {
        return;
    };
    if core.run.gate() == Gate::Quit {
        return;
    }
    let mut pacer = Pacer {
        nvcpus: (kvm.vcpu_count() as u64).max(1),
        start: Instant::now(),
        pages: 0,
        id,
        slice_start: Instant::now(),
    };
    let mut dead = false;
    loop {
        if dead || !core.run.is_running() {
            complete_pending_exit(core, id);
            if core.run.park() == Gate::Quit {
                return;
            }
            pacer.start = Instant::now();
            pacer.pages = 0;
            pacer.slice_start = Instant::now();
            if dead {
                continue;
            }
        }
        let Some(mut vcpu) = kvm.vcpu(id as usize) else {
            return;
        };
        let next = match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let data = data.to_vec();
                drop(vcpu);
                port_out(core, &mut pacer, u64::from(port), &data);
                Next::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                port_in(u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if let Some(port) = pio_port(addr) {
                    port_in(port, data);
                } else if !core.mmio_read(addr, data) {
                    data.fill(0xff);
                }
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                let data = data.to_vec();
                drop(vcpu);
                match pio_port(addr) {
                    Some(port) => port_out(core, &mut pacer, port, &data),
                    None => core.mmio_write(addr, &data),
                }
                Next::Continue
            }
            Ok(VcpuExit::Unsupported(EXIT_DIRTY_RING_FULL)) => {
                drop(vcpu);
                if let Err(e) = kvm.harvest_rings() {
                    log::error!("vcpu{id}: {e}");
                }
                Next::Continue
            }
            Ok(VcpuExit::Intr) => Next::Continue,
            Ok(other) => {
                let what = format!("{other:?}");
                drop(vcpu);
                log::error!("vcpu{id}: the guest stopped with exit {what}");
                Next::Dead
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Next::Continue,
            Err(e) => {
                log::error!("vcpu{id}: KVM_RUN failed: {e}");
                Next::Dead
            }
        };
        if let Next::Dead = next {
            dead = true;
        }
    }
}

/// Completes the access the vCPU last exited for, without running any guest code.
fn complete_pending_exit(core: &VmCore, id: u32) {
    let Some(kvm) = core.kvm.as_ref() else {
        return;
    };
    if let Some(mut vcpu) = kvm.vcpu(id as usize) {
        vcpu.set_kvm_immediate_exit(1);
        match vcpu.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => log::debug!("vcpu{id}: completing the last exit: {e}"),
            Ok(_) => {}
        }
        vcpu.set_kvm_immediate_exit(0);
    }
}

/// The guest's port `p` is the byte at `PIO_BASE + p` (it runs at CPL 3, see `guest.S`).
fn pio_port(addr: u64) -> Option<u64> {
    addr.checked_sub(PIO_BASE).filter(|p| *p < PIO_SIZE)
}

/// A read of port `port`: the serial line status says "transmitter empty"; nothing else
/// answers.
fn port_in(port: u64, data: &mut [u8]) {
    let v: u8 = if port == PORT_SERIAL + 5 { 0x60 } else { 0xff };
    data.fill(v);
}

/// A write to port `port`.
fn port_out(core: &VmCore, pacer: &mut Pacer, port: u64, data: &[u8]) {
    let value = data
        .iter()
        .rev()
        .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    match port {
        PORT_SERIAL => core.serial.write_bytes(&data[..1.min(data.len())]),
        PORT_PROGRESS => {
            core.pages_written.fetch_add(value, Ordering::Relaxed);
            pacer.pages += value;
            // auto-converge's throttle, at most every BATCH steps; as for the software
            // vCPUs, the dirty-rate cap counts only the time the vCPU runs.
            pacer.start += core.run.throttle_point(&mut pacer.slice_start);
            let rate = core
                .workload
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .dirty_rate;
            pacer.pace(core, rate);
        }
        PORT_IDLE => core.run.pause_while_running(Duration::from_millis(20)),
        PORT_WAIT => std::thread::yield_now(),
        _ => log::debug!(
            "vcpu{}: write {value:#x} to unknown port {port:#x}",
            pacer.id
        ),
    }
}

/// Holds a vCPU to its share of the workload's dirty rate over one-second windows, as the
/// software vCPUs do.
struct Pacer {
    nvcpus: u64,
    start: Instant,
    pages: u64,
    id: u32,
    /// When the vCPU's current run slice began (see `RunControl::throttle_point`).
    slice_start: Instant,
}

impl Pacer {
    fn pace(&mut self, core: &VmCore, rate: u64) {
        if rate == 0 {
            return;
        }
        let per_vcpu = (rate / self.nvcpus).max(1);
        let el = self.start.elapsed().as_secs_f64();
        let allowed = per_vcpu as f64 * el;
        if self.pages as f64 > allowed {
            let wait = (self.pages as f64 - allowed) / per_vcpu as f64;
            core.run
                .pause_while_running(Duration::from_secs_f64(wait.min(0.05)));
        }
        if el > 1.0 {
            self.start = Instant::now();
            self.pages = 0;
        }
    }
}
