//! The reference VM under KVM: the guest code runs on KVM vCPUs, writes self-describing pages
//! exactly as the software workload does, prints on the serial console, and migrates —
//! RAM (with hardware dirty logging, bitmap or ring), vCPU state and the guest's progress.
//!
//! Guests are small (tens of MiB): on this nested KVM the first touch of a page costs ~2 ms.

use block::BlockLayer;
use migration::machine::Machine;
use migration::runstate::RunState;
use migration::MigrationStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm::kvm::KvmOptions;
use vm::workload::WorkloadConfig;
use vm::{Accel, Vm, VmConfig};

mod common;
use common::*;

fn kvm_ok(test: &str) -> bool {
    testkit::require(test, testkit::kvm())
}

fn side(
    incoming: bool,
    vcpus: u32,
    workload: WorkloadConfig,
    ring: u32,
    serial: Option<std::path::PathBuf>,
) -> Side {
    side_on(
        Arc::new(BlockLayer::new()),
        VmConfig {
            vcpus,
            workload,
            incoming,
            serial,
            accel: Accel::Kvm(KvmOptions {
                dirty_ring_size: ring,
            }),
            ..Default::default()
        },
    )
}

#[test]
fn guest_code_runs_the_workload_as_the_software_model_does() {
    if !kvm_ok("guest_code_runs_the_workload_as_the_software_model_does") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let serial = dir.path().join("serial.log");
    let cfg = WorkloadConfig {
        fill: 2 << 20,
        hot: 256 << 10,
        serial_every: 1000,
        ..Default::default()
    };
    let s = side(false, 2, cfg.clone(), 0, Some(serial.clone()));
    s.vm.start();
    wait_steps(&s.vm, 3000);
    s.vm.stop(RunState::Paused);
    let states = s.vm.core().vcpu_states();
    for st in &states {
        assert_eq!(*st, model(&cfg, st.id, 2, st.steps), "vCPU {}", st.id);
    }
    let report = s.vm.verify_ram();
    assert_eq!(report.corrupt_count, 0, "{report:?}");
    assert!(report.valid >= 512, "{report:?}");
    let text = std::fs::read_to_string(&serial).unwrap();
    assert!(text.starts_with("livemig guest: up\n"), "{text:?}");
    assert!(text.contains("vcpu0 steps=1000\n"), "{text:?}");
    assert_eq!(s.vm.serial_bytes(), text.len() as u64);
    s.vm.shutdown();
}

fn migrate(ring: u32) {
    let cfg = WorkloadConfig {
        fill: 4 << 20,
        hot: 1 << 20,
        dirty_rate: 20_000,
        serial_every: 500,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let src = side(
        false,
        2,
        cfg.clone(),
        ring,
        Some(dir.path().join("src.log")),
    );
    let dst = side(
        true,
        2,
        WorkloadConfig::default(),
        ring,
        Some(dir.path().join("dst.log")),
    );
    src.vm.start();
    wait_steps(&src.vm, 200);
    migrate_sides(&src, &dst, &dir.path().join("m.sock"));
    assert!(src.mig.query()["ram"]["dirty-sync-count"].as_u64().unwrap() >= 2);
    // RAM, guest progress and the serial console are the source's at the stop point.
    assert_eq!(src.vm.ram_checksum(), dst.vm.ram_checksum(), "RAM differs");
    let report = dst.vm.verify_ram();
    assert_eq!(report.corrupt_count, 0, "{report:?}");
    let before = dst.vm.core().vcpu_states();
    assert_eq!(src.vm.core().vcpu_states(), before);
    assert_eq!(src.vm.serial_bytes(), dst.vm.serial_bytes());
    for st in &before {
        assert_eq!(*st, model(&cfg, st.id, 2, st.steps), "vCPU {}", st.id);
    }
    // The guest carries on where it stopped: same PRNG stream, no step lost or repeated.
    dst.vm.start();
    let goal = before.iter().map(|s| s.steps).max().unwrap_or(0) + 1000;
    wait_steps(&dst.vm, goal);
    dst.vm.stop(RunState::Paused);
    for st in dst.vm.core().vcpu_states() {
        assert_eq!(st, model(&cfg, st.id, 2, st.steps), "vCPU {} after", st.id);
    }
    let report = dst.vm.verify_ram();
    assert_eq!(report.corrupt_count, 0, "{report:?}");
    src.vm.shutdown();
    dst.vm.shutdown();
}

#[test]
fn kvm_guest_migrates_with_the_dirty_bitmap() {
    if kvm_ok("kvm_guest_migrates_with_the_dirty_bitmap") {
        migrate(0);
    }
}

#[test]
fn kvm_guest_migrates_with_the_dirty_ring() {
    if kvm_ok("kvm_guest_migrates_with_the_dirty_ring") {
        migrate(4096);
    }
}

#[test]
fn kvm_guest_with_virtio_blk_migrates_with_a_request_in_flight_and_back() {
    if kvm_ok("kvm_guest_with_virtio_blk_migrates_with_a_request_in_flight_and_back") {
        request_in_flight_there_and_back(InFlight {
            accel: Accel::Kvm(KvmOptions::default()),
            dirty_rate: 50_000,
            warm_up: 2000,
            every_vcpu: false,
            run_between: 5000,
            run_last: 2000,
        });
    }
}

/// The RAM ranges of `vm`'s flat view, as memslots would hold them: (gpa, size, block, offset).
fn view_ram(vm: &Vm) -> Vec<(u64, u64, String, u64)> {
    vm.core()
        .memmap
        .flat_view()
        .ranges
        .iter()
        .filter_map(|r| r.ram.clone().map(|(b, o)| (r.start, r.end - r.start, b, o)))
        .collect()
}

fn slots(vm: &Vm) -> Vec<(u64, u64, String, u64)> {
    let kvm = vm.core().kvm.clone().unwrap();
    kvm.slot_table()
        .into_iter()
        .map(|(_, gpa, size, b, o)| (gpa, size, b, o))
        .collect()
}

#[test]
fn memslots_are_the_memory_maps_ram_ranges() {
    if !kvm_ok("memslots_are_the_memory_maps_ram_ranges") {
        return;
    }
    let s = side(true, 1, WorkloadConfig::default(), 0, None);
    let base = guest::layout::SYS_BASE;
    assert_eq!(
        slots(&s.vm),
        vec![
            (0, RAM, "ram".to_string(), 0),
            (base, guest::layout::SYS_SIZE, "sys".to_string(), 0)
        ]
    );
    let kvm = s.vm.core().kvm.clone().unwrap();
    let calls = || kvm.stats().slot_updates;
    // A device load that maps two windows over RAM: one commit, the RAM slot split in three.
    let before = calls();
    s.vm.begin_device_load();
    let map = &s.vm.core().memmap;
    map.set_address("window0", Some(0x10_0000));
    map.set_address("window1", Some(0x20_0000));
    assert_eq!(calls(), before, "a memslot call before the load ended");
    // A device that reads the map during the load gets the current one, and KVM has it too.
    assert_eq!(map.flat_view().lookup(0x20_0000).unwrap().region, "window1");
    assert_eq!(slots(&s.vm), view_ram(&s.vm));
    assert_eq!(calls(), before + 4, "delete the RAM slot, add three pieces");
    map.set_address("window1", Some(0x30_0000));
    s.vm.end_device_load().unwrap();
    assert_eq!(slots(&s.vm), view_ram(&s.vm));
    assert_eq!(
        slots(&s.vm)[..3],
        [
            (0, 0x10_0000, "ram".to_string(), 0),
            (0x10_1000, 0x1f_f000, "ram".to_string(), 0x10_1000),
            (0x30_1000, RAM - 0x30_1000, "ram".to_string(), 0x30_1000),
        ]
    );
    // Moving window1 deleted the middle and last pieces and added two: only what differs.
    assert_eq!(calls(), before + 8);
    s.vm.shutdown();
}

#[test]
fn device_load_commits_memslots_once_and_the_guest_runs_on() {
    if !kvm_ok("device_load_commits_memslots_once_and_the_guest_runs_on") {
        return;
    }
    let cfg = WorkloadConfig {
        fill: 1 << 20,
        hot: 1 << 20,
        ..Default::default()
    };
    let src = side(false, 1, cfg.clone(), 0, None);
    // Four windows over the top of RAM, which this workload never writes (mapped before the
    // guest runs: a slot is not split under a running vCPU).
    for i in 0..4u64 {
        assert!(src
            .vm
            .core()
            .memmap
            .set_address(&format!("window{i}"), Some(RAM - (i + 1) * 0x2000)));
    }
    src.vm.start();
    wait_steps(&src.vm, 500);
    let dst = side(true, 1, WorkloadConfig::default(), 0, None);
    let kvm = dst.vm.core().kvm.clone().unwrap();
    let (calls, commits) = (
        kvm.stats().slot_updates,
        dst.vm.core().memmap.stats().listener_commits,
    );
    let dir = tempfile::tempdir().unwrap();
    let uri = format!("unix:{}", dir.path().join("m.sock").display());
    dst.mig.incoming(&uri).unwrap();
    src.mig.migrate(&uri).unwrap();
    let done = [MigrationStatus::Completed, MigrationStatus::Failed];
    assert_eq!(
        dst.mig.wait_incoming(&done, Duration::from_secs(60)),
        MigrationStatus::Completed,
        "{}",
        dst.mig.query()
    );
    // Eight windows loaded (four over RAM, four elsewhere): one view for KVM, and one call
    // per memslot that changed — the RAM slot deleted, five pieces added.
    assert_eq!(dst.vm.core().memmap.stats().listener_commits, commits + 1);
    assert_eq!(kvm.stats().slot_updates, calls + 6);
    assert_eq!(slots(&dst.vm), view_ram(&dst.vm));
    assert_eq!(slots(&dst.vm).len(), 6);
    assert_eq!(src.vm.ram_checksum(), dst.vm.ram_checksum());
    // The guest runs on over split RAM and its pages check out.
    let at = dst.vm.vcpu_steps()[0];
    dst.vm.start();
    wait_steps(&dst.vm, at + 2000);
    dst.vm.stop(RunState::Paused);
    let st = dst.vm.core().vcpu_states()[0];
    assert_eq!(st, model(&cfg, 0, 1, st.steps));
    assert_eq!(dst.vm.verify_ram().corrupt_count, 0);
    src.vm.shutdown();
    dst.vm.shutdown();
}

#[test]
fn a_logged_memslot_deleted_by_the_map_keeps_its_dirty_pages() {
    if !kvm_ok("a_logged_memslot_deleted_by_the_map_keeps_its_dirty_pages") {
        return;
    }
    let cfg = WorkloadConfig {
        fill: 1 << 20,
        hot: 1 << 20,
        ..Default::default()
    };
    let s = side(false, 1, cfg, 0, None);
    let ram = s.vm.ram_blocks()[0].clone();
    let mut bitmap = vec![0u64; (RAM / 4096 / 64) as usize];
    ram.start_dirty_log();
    ram.sync_dirty_log(&mut bitmap);
    let snapshot = |vm: &Vm| -> Vec<u64> {
        (0..256u64)
            .map(|p| {
                let mut page = vec![0u8; 4096];
                vm.core().ram.read(p * 4096, &mut page);
                xxhash_rust::xxh3::xxh3_64(&page)
            })
            .collect()
    };
    s.vm.start();
    wait_steps(&s.vm, 3000);
    s.vm.stop(RunState::Paused);
    let before = snapshot(&s.vm);
    bitmap.iter_mut().for_each(|w| *w = 0);
    ram.sync_dirty_log(&mut bitmap);
    s.vm.start();
    let at = s.vm.vcpu_steps()[0];
    wait_steps(&s.vm, at + 3000);
    s.vm.stop(RunState::Paused);
    // A page the guest rewrote since the last sync...
    let after = snapshot(&s.vm);
    let p = (0..256u64)
        .find(|p| before[*p as usize] != after[*p as usize])
        .expect("the guest rewrote no page");
    // ... ends up under a window: the RAM slot that logged it is deleted.
    assert!(s.vm.core().memmap.set_address("window0", Some(p * 4096)));
    assert_eq!(s.vm.core().memmap.take_error(), None);
    bitmap.iter_mut().for_each(|w| *w = 0);
    ram.sync_dirty_log(&mut bitmap);
    assert_ne!(
        bitmap[(p / 64) as usize] & (1 << (p % 64)),
        0,
        "page {p}'s dirty bit went with its memslot"
    );
    ram.stop_dirty_log();
    s.vm.shutdown();
}

#[test]
fn a_request_the_device_took_completes_before_the_stop_and_runs_once() {
    if !kvm_ok("a_request_the_device_took_completes_before_the_stop_and_runs_once") {
        return;
    }
    // A disk whose every write takes 100 ms: the device is nearly always inside a request.
    let side = |incoming: bool, workload: WorkloadConfig| -> Side {
        let block = Arc::new(BlockLayer::new());
        block.set_incoming(incoming);
        block
            .blockdev_add(&serde_json::json!({
                "driver": "null-co", "node-name": "d0", "size": 4 << 20,
                "latency-ns": 100_000_000u64
            }))
            .unwrap();
        side_on(
            block,
            VmConfig {
                vcpus: 1,
                workload,
                workload_disk: Some("d0".into()),
                virtio_blk: true,
                incoming,
                accel: Accel::Kvm(KvmOptions::default()),
                ..Default::default()
            },
        )
    };
    let cfg = WorkloadConfig {
        fill: 1 << 20,
        hot: 1 << 20,
        disk_every: 8,
        ..Default::default()
    };
    let a = side(false, cfg);
    let dev = a.vm.core().virtio.clone().unwrap();
    a.vm.start();
    let t = Instant::now();
    while !(dev.queues()[0].completed >= 1 && dev.in_progress()) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the device took no request"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let taken_before = dev.queues()[0].completed;
    a.vm.stop(RunState::Paused);
    // Stopped means drained: the request the device held completed, into guest memory.
    assert!(!dev.in_progress());
    let q = dev.queues()[0];
    assert!(q.completed > taken_before, "{q:?}");
    let sys = a.vm.core().sys.clone().unwrap();
    let io = guest::layout::IO_OFF;
    let mut used = [0u8; 2];
    sys.read(io + guest::layout::IO_USED + 2, &mut used);
    assert_eq!(u16::from_le_bytes(used), q.used_idx);
    let submitted = cb(&a.vm, 0, guest::layout::CB_SUBMITTED);
    assert!(submitted == q.completed || submitted == q.completed + 1);
    // The destination neither runs the drained request again nor loses a queued one.
    let b = side(true, WorkloadConfig::default());
    let dir = tempfile::tempdir().unwrap();
    migrate_sides(&a, &b, &dir.path().join("m.sock"));
    let dev_b = b.vm.core().virtio.clone().unwrap();
    assert_eq!(dev_b.queues()[0], q);
    b.vm.start();
    let t = Instant::now();
    while dev_b.queues()[0].completed < q.completed + 3 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{:?}",
            dev_b.queues()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    b.vm.stop(RunState::Paused);
    let done = dev_b.queues()[0].completed;
    let issued = cb(&b.vm, 0, guest::layout::CB_SUBMITTED);
    assert!(
        done <= issued && issued <= done + 1,
        "issued {issued}, completed {done}"
    );
    a.vm.shutdown();
    b.vm.shutdown();
}
