//! The reference VM under KVM: the guest code runs on KVM vCPUs, writes self-describing pages
//! exactly as the software workload does, prints on the serial console, and migrates —
//! RAM (with hardware dirty logging, bitmap or ring), vCPU state and the guest's progress.
//!
//! Guests are small (tens of MiB): on this nested KVM the first touch of a page costs ~2 ms.

use block::BlockLayer;
use migration::caps::Capability;
use migration::events::RecordedEvents;
use migration::machine::Machine;
use migration::runstate::RunState;
use migration::{Migration, MigrationOptions, MigrationStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm::kvm::KvmOptions;
use vm::workload::{Share, VcpuState, WorkloadConfig};
use vm::{Accel, MachineType, Vm, VmConfig};

const RAM: u64 = 16 << 20;

fn kvm_ok(test: &str) -> bool {
    testkit::require(test, testkit::kvm())
}

struct Side {
    vm: Arc<Vm>,
    mig: Migration,
}

fn side(
    incoming: bool,
    vcpus: u32,
    workload: WorkloadConfig,
    ring: u32,
    serial: Option<std::path::PathBuf>,
) -> Side {
    let block = Arc::new(BlockLayer::new());
    let events = Arc::new(RecordedEvents::default());
    let vm = Vm::new(
        VmConfig {
            machine: MachineType::Livemig,
            ram_size: RAM,
            vcpus,
            workload,
            incoming,
            serial,
            accel: Accel::Kvm(KvmOptions {
                dirty_ring_size: ring,
            }),
            ..Default::default()
        },
        block,
        events.clone(),
    )
    .unwrap();
    let mig = Migration::new(
        vm.clone(),
        events,
        MigrationOptions {
            autostart: false,
            ..Default::default()
        },
    );
    mig.set_capabilities(&[(Capability::Events, true)]).unwrap();
    Side { vm, mig }
}

/// What the software model of vCPU `id` looks like after `steps` steps.
fn model(cfg: &WorkloadConfig, id: u32, n: u32, steps: u64) -> VcpuState {
    let share = Share::of(cfg, RAM / 4096, id, n);
    let mut st = VcpuState::boot(cfg, id);
    while st.steps < steps {
        st.step(cfg, &share);
    }
    st
}

fn wait_steps(vm: &Vm, at_least: u64) {
    let t = Instant::now();
    while vm.vcpu_steps().iter().any(|s| *s < at_least) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "guest stuck at {:?}",
            vm.vcpu_steps()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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
    let path = dir.path().join("m.sock").display().to_string();
    dst.mig.incoming(&format!("unix:{path}"), false).unwrap();
    src.mig.migrate(&format!("unix:{path}")).unwrap();
    let done = [
        MigrationStatus::Completed,
        MigrationStatus::Failed,
        MigrationStatus::Cancelled,
    ];
    let st = src.mig.wait_outgoing(&done, Duration::from_secs(120));
    assert_eq!(
        st,
        MigrationStatus::Completed,
        "source: {}",
        src.mig.query()
    );
    let st = dst.mig.wait_incoming(&done[..2], Duration::from_secs(60));
    assert_eq!(
        st,
        MigrationStatus::Completed,
        "destination: {}",
        dst.mig.query()
    );
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

/// A KVM side whose workload writes to a raw image through the virtio-blk device.
fn disk_side(incoming: bool, image: &std::path::Path, workload: WorkloadConfig) -> Side {
    let block = Arc::new(BlockLayer::new());
    block.set_incoming(incoming);
    block
        .blockdev_add(&serde_json::json!({
            "driver": "raw", "node-name": "d0",
            "file": {"driver": "file", "filename": image.display().to_string()}
        }))
        .unwrap();
    let events = Arc::new(RecordedEvents::default());
    let vm = Vm::new(
        VmConfig {
            machine: MachineType::Livemig,
            ram_size: RAM,
            vcpus: 2,
            workload,
            workload_disk: Some("d0".into()),
            virtio_blk: true,
            incoming,
            accel: Accel::Kvm(KvmOptions::default()),
            ..Default::default()
        },
        block,
        events.clone(),
    )
    .unwrap();
    let mig = Migration::new(
        vm.clone(),
        events,
        MigrationOptions {
            autostart: false,
            ..Default::default()
        },
    );
    mig.set_capabilities(&[(Capability::Events, true)]).unwrap();
    Side { vm, mig }
}

fn cb(vm: &Vm, id: u32, field: u64) -> u64 {
    vm::kvm::boot::cb_field(&**vm.core().sys.as_ref().unwrap(), id, field)
}

fn migrate_sides(src: &Side, dst: &Side, sock: &std::path::Path) {
    let uri = format!("unix:{}", sock.display());
    dst.mig.incoming(&uri, false).unwrap();
    src.mig.migrate(&uri).unwrap();
    let done = [
        MigrationStatus::Completed,
        MigrationStatus::Failed,
        MigrationStatus::Cancelled,
    ];
    let st = src.mig.wait_outgoing(&done, Duration::from_secs(120));
    assert_eq!(
        st,
        MigrationStatus::Completed,
        "source: {}",
        src.mig.query()
    );
    let st = dst.mig.wait_incoming(&done[..2], Duration::from_secs(60));
    assert_eq!(
        st,
        MigrationStatus::Completed,
        "destination: {}",
        dst.mig.query()
    );
}

#[test]
fn kvm_guest_with_virtio_blk_migrates_with_a_request_in_flight_and_back() {
    if !kvm_ok("kvm_guest_with_virtio_blk_migrates_with_a_request_in_flight_and_back") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let cfg = WorkloadConfig {
        fill: 2 << 20,
        hot: 1 << 20,
        disk_every: 8,
        dirty_rate: 50_000,
        ..Default::default()
    };
    let a = disk_side(false, &image, cfg.clone());
    a.vm.start();
    wait_steps(&a.vm, 2000);
    // Hold the device: the guest's next request stays in its ring, in flight at the switchover.
    let dev = a.vm.core().virtio.clone().unwrap();
    dev.pause();
    let t = Instant::now();
    while (0..2)
        .all(|i| cb(&a.vm, i, guest::layout::CB_SUBMITTED) == dev.queues()[i as usize].completed)
    {
        assert!(t.elapsed() < Duration::from_secs(30), "no request queued");
        std::thread::sleep(Duration::from_millis(1));
    }
    let b = disk_side(true, &image, WorkloadConfig::default());
    migrate_sides(&a, &b, &dir.path().join("ab.sock"));
    // What arrived: RAM, the guest's counters, the device's queues with the request still
    // queued (issued, not completed).
    assert_eq!(a.vm.ram_checksum(), b.vm.ram_checksum());
    assert_eq!(a.vm.core().vcpu_states(), b.vm.core().vcpu_states());
    let queued = b.vm.core().virtio.as_ref().unwrap().queues();
    assert_eq!(dev.queues(), queued);
    let before = b.vm.verify_disk().unwrap();
    assert_eq!(before.mismatch_count, 0, "{before:?}");
    assert!(
        before
            .submitted
            .iter()
            .zip(&before.completed)
            .any(|(s, c)| *s == c + 1),
        "{before:?}"
    );
    // The destination runs the queued request once, and the guest goes on writing.
    b.vm.start();
    let goal = b.vm.vcpu_steps().iter().max().copied().unwrap_or(0) + 5000;
    wait_steps(&b.vm, goal);
    // ... and back, in the middle of its writes.
    let c = disk_side(true, &image, WorkloadConfig::default());
    migrate_sides(&b, &c, &dir.path().join("bc.sock"));
    let after = c.vm.verify_disk().unwrap();
    assert_eq!(after.mismatch_count, 0, "{after:?}");
    assert!(after.written > 0, "{after:?}");
    for (i, (s, done)) in after.submitted.iter().zip(&after.completed).enumerate() {
        assert!(*done <= *s && *done + 1 >= *s, "vCPU {i}: {after:?}");
        assert!(*done > before.completed[i], "vCPU {i}: {after:?}");
    }
    for st in c.vm.core().vcpu_states() {
        assert_eq!(st, model(&cfg, st.id, 2, st.steps), "vCPU {}", st.id);
    }
    let report = c.vm.verify_ram();
    assert_eq!(report.corrupt_count, 0, "{report:?}");
    // The last leg's destination runs on, and its disk still checks out once it stops.
    c.vm.start();
    let goal = c.vm.vcpu_steps().iter().max().copied().unwrap_or(0) + 2000;
    wait_steps(&c.vm, goal);
    c.vm.stop(RunState::Paused);
    let end = c.vm.verify_disk().unwrap();
    assert_eq!(end.mismatch_count, 0, "{end:?}");
    for vm in [&a.vm, &b.vm, &c.vm] {
        vm.shutdown();
    }
}
