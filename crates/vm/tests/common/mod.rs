//! What the reference VM's tests on one machine share (`kvm.rs`, `soft_virtio.rs`): a VM with
//! its migration, the software model of a vCPU, waiting for the guest's progress, a migration
//! between two sides, and the virtio-blk story — a request in flight at the switchover, there
//! and back — that both the KVM guest and the software vCPUs tell. Each test binary uses part
//! of it.
#![allow(dead_code)]

use block::BlockLayer;
use migration::caps::Capability;
use migration::events::RecordedEvents;
use migration::machine::Machine;
use migration::runstate::RunState;
use migration::{Migration, MigrationOptions, MigrationStatus};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm::workload::{Share, VcpuState, WorkloadConfig};
use vm::{Accel, MachineType, Vm, VmConfig};

/// Guest RAM of every VM here: small, as the first touch of a page is slow on nested KVM.
pub const RAM: u64 = 16 << 20;

/// A VM and its migration.
pub struct Side {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Its migration (no autostart, capability `events`).
    pub mig: Migration,
}

/// A `livemig` machine of [`RAM`] as `config` says otherwise, on `block`, with its migration.
pub fn side_on(block: Arc<BlockLayer>, config: VmConfig) -> Side {
    let events = Arc::new(RecordedEvents::default());
    let vm = Vm::new(
        VmConfig {
            machine: MachineType::Livemig,
            ram_size: RAM,
            ..config
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

/// A two-vCPU side whose workload writes to the raw image at `image` (node `d0`) through the
/// virtio-blk device.
pub fn disk_side(incoming: bool, image: &Path, workload: WorkloadConfig, accel: Accel) -> Side {
    let block = Arc::new(BlockLayer::new());
    block.set_incoming(incoming);
    block
        .blockdev_add(&serde_json::json!({
            "driver": "raw", "node-name": "d0",
            "file": {"driver": "file", "filename": image.display().to_string()}
        }))
        .unwrap();
    side_on(
        block,
        VmConfig {
            vcpus: 2,
            workload,
            workload_disk: Some("d0".into()),
            virtio_blk: true,
            incoming,
            accel,
            ..Default::default()
        },
    )
}

/// What the software model of vCPU `id` (of `n`) looks like after `steps` steps.
pub fn model(cfg: &WorkloadConfig, id: u32, n: u32, steps: u64) -> VcpuState {
    let share = Share::of(cfg, RAM / 4096, id, n);
    let mut st = VcpuState::boot(cfg, id);
    while st.steps < steps {
        st.step(cfg, &share);
    }
    st
}

/// Waits (a minute at most) until every vCPU of `vm` has made `at_least` steps.
pub fn wait_steps(vm: &Vm, at_least: u64) {
    let t = Instant::now();
    while vm.vcpu_steps().iter().any(|s| *s < at_least) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "guest stuck at {:?}",
            vm.vcpu_steps()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Field `field` of vCPU `id`'s control block in the guest's memory.
pub fn cb(vm: &Vm, id: u32, field: u64) -> u64 {
    vm::kvm::boot::cb_field(&**vm.core().sys.as_ref().unwrap(), id, field)
}

/// Migrates `src` into `dst` over the unix socket `sock`; both must complete.
pub fn migrate_sides(src: &Side, dst: &Side, sock: &Path) {
    let uri = format!("unix:{}", sock.display());
    dst.mig.incoming(&uri).unwrap();
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

/// What the KVM guest and the software vCPUs do differently in
/// [`request_in_flight_there_and_back`].
pub struct InFlight {
    /// The vCPUs.
    pub accel: Accel,
    /// The workload's dirty rate.
    pub dirty_rate: u64,
    /// Steps before the device is held.
    pub warm_up: u64,
    /// Software vCPUs, whose pace the device keeps: every vCPU has had more than 10 writes
    /// served before the hold, and has a request queued at the switchover. Otherwise (KVM) at
    /// least one vCPU has.
    pub every_vcpu: bool,
    /// Steps the first destination runs before it migrates on.
    pub run_between: u64,
    /// Steps the last destination runs before its disk is checked once more.
    pub run_last: u64,
}

/// Two vCPUs write to a raw image through virtio-blk; the device is held so that a request
/// is queued, in flight at the switchover, and the VM migrates A → B: RAM, vCPU state and the
/// device's queues arrive, the request still queued. B runs it once and writes on, then
/// migrates to C in the middle of its writes: the disk checks out (every write the guest made
/// is there, no request lost or run twice), the vCPUs are the software model's, RAM is valid,
/// and C runs on with a disk that still checks out.
pub fn request_in_flight_there_and_back(t: InFlight) {
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
        dirty_rate: t.dirty_rate,
        ..Default::default()
    };
    let side =
        |incoming: bool, workload: WorkloadConfig| disk_side(incoming, &image, workload, t.accel);
    let a = side(false, cfg.clone());
    let dev = a.vm.core().virtio.clone().unwrap();
    a.vm.start();
    wait_steps(&a.vm, t.warm_up);
    if t.every_vcpu {
        // The device served the vCPUs' writes.
        assert!(
            dev.queues().iter().all(|q| q.completed > 10),
            "{:?}",
            dev.queues()
        );
    }
    // Hold the device: the guest's next requests stay in their rings, in flight at the
    // switchover.
    dev.pause();
    let queued =
        |i: u32| cb(&a.vm, i, guest::layout::CB_SUBMITTED) != dev.queues()[i as usize].completed;
    let t0 = Instant::now();
    while !(if t.every_vcpu {
        (0..2).all(queued)
    } else {
        (0..2).any(queued)
    }) {
        assert!(t0.elapsed() < Duration::from_secs(30), "no request queued");
        std::thread::sleep(Duration::from_millis(1));
    }
    let b = side(true, WorkloadConfig::default());
    migrate_sides(&a, &b, &dir.path().join("ab.sock"));
    // What arrived: RAM, the guest's counters, the device's queues with the requests still
    // queued (issued, not completed).
    assert_eq!(a.vm.ram_checksum(), b.vm.ram_checksum());
    assert_eq!(a.vm.core().vcpu_states(), b.vm.core().vcpu_states());
    assert_eq!(dev.queues(), b.vm.core().virtio.as_ref().unwrap().queues());
    let before = b.vm.verify_disk().unwrap();
    assert_eq!(before.mismatch_count, 0, "{before:?}");
    let in_flight = |(s, c): (&u64, &u64)| *s == c + 1;
    let mut pairs = before.submitted.iter().zip(&before.completed);
    let held = if t.every_vcpu {
        pairs.all(in_flight)
    } else {
        pairs.any(in_flight)
    };
    assert!(held, "{before:?}");
    // The destination runs the queued requests once, and the guest goes on writing.
    b.vm.start();
    let goal = b.vm.vcpu_steps().iter().max().copied().unwrap_or(0) + t.run_between;
    wait_steps(&b.vm, goal);
    // ... and back, in the middle of its writes.
    let c = side(true, WorkloadConfig::default());
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
    let goal = c.vm.vcpu_steps().iter().max().copied().unwrap_or(0) + t.run_last;
    wait_steps(&c.vm, goal);
    c.vm.stop(RunState::Paused);
    let end = c.vm.verify_disk().unwrap();
    assert_eq!(end.mismatch_count, 0, "{end:?}");
    for vm in [&a.vm, &b.vm, &c.vm] {
        vm.shutdown();
    }
}
