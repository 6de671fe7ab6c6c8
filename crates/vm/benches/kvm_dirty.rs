#![allow(missing_docs)]
//! The cost of KVM's hardware dirty logging as the engine pays it, bitmap against ring:
//! a KVM guest of 1 GiB rewrites a hot set while the engine's sync (`RamBlock::sync_dirty_log`)
//! harvests what it dirtied every 50 ms. Reports, per mode, the harvest time per sync, per GiB
//! of RAM and per dirty page, and how fast the guest dirtied memory meanwhile (a ring's
//! bookkeeping is paid by the vCPU). Skips without /dev/kvm.
//!
//! `cargo bench -p vm --bench kvm_dirty`. This machine's KVM is nested: absolute numbers are
//! those of a nested guest.

use migration::machine::Machine;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm::kvm::KvmOptions;
use vm::workload::WorkloadConfig;
use vm::{Accel, MachineType, Vm, VmConfig};

const RAM: u64 = 1 << 30;

fn run(label: &str, opts: KvmOptions, hot: u64) {
    let vm = Vm::new(
        VmConfig {
            machine: MachineType::Livemig,
            ram_size: RAM,
            vcpus: 1,
            workload: WorkloadConfig {
                fill: 0,
                hot,
                serial_every: 0,
                ..Default::default()
            },
            accel: Accel::Kvm(opts),
            ..Default::default()
        },
        Arc::new(block::BlockLayer::new()),
        Arc::new(migration::events::RecordedEvents::default()),
    )
    .expect("KVM VM");
    let blocks = vm.ram_blocks();
    let ram = &blocks[0];
    let mut bitmap = vec![0u64; (RAM / 4096 / 64) as usize];
    vm.start();
    // Warm up: every hot page touched once.
    std::thread::sleep(Duration::from_millis(500));
    ram.start_dirty_log();
    ram.sync_dirty_log(&mut bitmap);
    let kvm = vm.core().kvm.clone().expect("kvm");
    let before = kvm.stats();
    let steps0: u64 = vm.vcpu_steps().iter().sum();
    let t0 = Instant::now();
    let mut syncs = 0u64;
    let mut wall = Duration::ZERO;
    while t0.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
        bitmap.iter_mut().for_each(|w| *w = 0);
        let t = Instant::now();
        ram.sync_dirty_log(&mut bitmap);
        wall += t.elapsed();
        syncs += 1;
    }
    let el = t0.elapsed().as_secs_f64();
    let steps = vm.vcpu_steps().iter().sum::<u64>() - steps0;
    ram.stop_dirty_log();
    vm.stop(migration::runstate::RunState::Paused);
    let after = kvm.stats();
    let pages = after.pages - before.pages;
    let ns = after.harvest_ns - before.harvest_ns;
    println!(
        "{label:<28} hot {:>4} MiB: {syncs:>3} syncs, {:>8.1} µs/sync ({:>8.1} µs/sync/GiB), {:>7} pages/sync, {:>6.1} ns/dirty page, {} clear calls, guest {:>7.0} pages/s",
        hot >> 20,
        wall.as_secs_f64() * 1e6 / syncs as f64,
        ns as f64 / 1e3 / syncs as f64 / (RAM as f64 / (1u64 << 30) as f64),
        pages / syncs.max(1),
        if pages > 0 { ns as f64 / pages as f64 } else { 0.0 },
        after.clear_calls - before.clear_calls,
        steps as f64 / el,
    );
    vm.shutdown();
}

fn main() {
    if vm::kvm::available().is_err() {
        println!("SKIP kvm_dirty: /dev/kvm is not usable");
        return;
    }
    for hot in [0, 16 << 20, 256 << 20] {
        run("bitmap (get + clear)", KvmOptions::default(), hot);
        run(
            "ring (65536 entries)",
            KvmOptions {
                dirty_ring_size: 65536,
            },
            hot,
        );
    }
}
