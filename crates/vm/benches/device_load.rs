#![allow(missing_docs)]
//! Seed 003 under KVM: what a destination's device load costs when 64 devices each map a
//! window, with the memory map's changes committed per change (unbatched) or once per load
//! (batched, `Machine::begin_device_load` / `end_device_load`). The map's KVM listener makes
//! every commit real: `KVM_SET_USER_MEMORY_REGION` for each memslot that differs.
//!
//! Two layouts, each with 64 MiB of RAM at 0 (one memslot to start with) and every window
//! unmapped, as on a fresh `-incoming` destination:
//! - *mmio-over-ram*: 64 MMIO windows of 64 KiB mapped inside RAM (as legacy VGA or PAM
//!   windows are): each splits a RAM slot in two.
//! - *ram-windows*: 64 RAM-backed windows of 64 KiB (device memory: ROM BARs, video RAM)
//!   mapped above RAM: each is a memslot of its own.
//!
//! Each device's load maps its window at the source's address (one `set_address`, as the
//! `livemig-window` section does). Timed: the 64 loads and the commit. Between runs the
//! windows are unmapped again (not timed). Prints the median over 15 runs of each, the
//! flat-view rebuilds and memslot calls per load. No vCPU runs, so no page is touched: on this
//! nested KVM the times are the memslot calls' own. Skips without /dev/kvm.
//!
//! `cargo bench -p vm --bench device_load`.

use std::sync::Arc;
use std::time::Instant;
use vm::kvm::{KvmMemoryListener, KvmOptions, KvmVm};
use vm::memmap::{MemoryMap, Region, RegionKind};
use vm::memory::GuestRam;

const RAM: u64 = 64 << 20;
const DEVICES: u64 = 64;
const WINDOW: u64 = 64 << 10;
const RUNS: usize = 15;

struct Setup {
    map: MemoryMap,
    kvm: Arc<KvmVm>,
    /// Where each device's window goes.
    at: Vec<u64>,
}

fn setup(ram_windows: bool) -> Setup {
    let kvm = Arc::new(KvmVm::new(0, KvmOptions::default()).expect("KVM VM"));
    let ram = Arc::new(GuestRam::new("ram", RAM).expect("RAM"));
    let mut blocks = vec![ram];
    let map = MemoryMap::default();
    map.add(Region {
        name: "ram".into(),
        gpa: Some(0),
        size: RAM,
        priority: 0,
        kind: RegionKind::Ram {
            block: "ram".into(),
            offset: 0,
        },
    });
    let mut at = Vec::new();
    for i in 0..DEVICES {
        let name = format!("window{i}");
        let kind = if ram_windows {
            blocks.push(Arc::new(GuestRam::new(&name, WINDOW).expect("window RAM")));
            at.push(RAM + (1 << 30) + i * 2 * WINDOW);
            RegionKind::Ram {
                block: name.clone(),
                offset: 0,
            }
        } else {
            // Spread over RAM, a gap of RAM between any two.
            at.push((i + 1) * (RAM / (DEVICES + 1)) / WINDOW * WINDOW);
            RegionKind::Mmio
        };
        map.add(Region {
            name,
            gpa: None,
            size: WINDOW,
            priority: 1,
            kind,
        });
    }
    map.set_listener(Arc::new(KvmMemoryListener {
        kvm: kvm.clone(),
        blocks,
    }))
    .expect("memslots");
    Setup { map, kvm, at }
}

/// One device load: returns (ms, flat-view rebuilds, memslot calls, memslots after).
fn load(s: &Setup, batched: bool) -> (f64, u64, u64, usize) {
    let (r0, u0) = (s.map.stats().rebuilds, s.kvm.stats().slot_updates);
    let t = Instant::now();
    if batched {
        s.map.begin();
    }
    for (i, gpa) in s.at.iter().enumerate() {
        s.map.set_address(&format!("window{i}"), Some(*gpa));
    }
    if batched {
        s.map.commit();
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    assert!(s.map.take_error().is_none());
    let out = (
        ms,
        s.map.stats().rebuilds - r0,
        s.kvm.stats().slot_updates - u0,
        s.kvm.slot_table().len(),
    );
    // Back to a fresh destination's map.
    s.map.begin();
    for i in 0..s.at.len() {
        s.map.set_address(&format!("window{i}"), None);
    }
    s.map.commit();
    out
}

fn main() {
    if vm::kvm::available().is_err() {
        println!("SKIP device_load: /dev/kvm is not usable");
        return;
    }
    for (label, ram_windows) in [("mmio-over-ram", false), ("ram-windows", true)] {
        let s = setup(ram_windows);
        for batched in [false, true] {
            let mut runs: Vec<_> = (0..RUNS).map(|_| load(&s, batched)).collect();
            runs.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (med, rebuilds, calls, slots) = runs[RUNS / 2];
            println!(
                "{label:<14} {:<10} 64 devices: {med:>8.2} ms (min {:>8.2}, max {:>8.2}), {rebuilds:>3} rebuilds, {calls:>3} KVM_SET_USER_MEMORY_REGION, {slots} memslots after",
                if batched { "batched" } else { "unbatched" },
                runs[0].0,
                runs[RUNS - 1].0,
            );
        }
    }
}
