//! The software vCPUs (`-accel tcg`) drive the same virtio-blk device as the KVM guest: their
//! disk writes go through virtqueues, land in the image, and a request in flight at the
//! switchover runs on the destination exactly once — there and back.

use block::BlockLayer;
use migration::caps::Capability;
use migration::events::RecordedEvents;
use migration::machine::Machine;
use migration::runstate::RunState;
use migration::{Migration, MigrationOptions, MigrationStatus};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm::workload::{Share, VcpuState, WorkloadConfig};
use vm::{MachineType, Vm, VmConfig};

const RAM: u64 = 16 << 20;

struct Side {
    vm: Arc<Vm>,
    mig: Migration,
}

fn side(incoming: bool, image: &std::path::Path, workload: WorkloadConfig) -> Side {
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

fn model(cfg: &WorkloadConfig, id: u32, steps: u64) -> VcpuState {
    let share = Share::of(cfg, RAM / 4096, id, 2);
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
            "stuck at {:?}",
            vm.vcpu_steps()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn submitted(vm: &Vm, id: u32) -> u64 {
    vm::kvm::boot::cb_field(
        &**vm.core().sys.as_ref().unwrap(),
        id,
        guest::layout::CB_SUBMITTED,
    )
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
    let st = src.mig.wait_outgoing(&done, Duration::from_secs(60));
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
fn software_vcpus_write_through_virtio_blk_and_migrate_a_request_in_flight() {
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
        dirty_rate: 20_000,
        ..Default::default()
    };
    let a = side(false, &image, cfg.clone());
    let dev = a.vm.core().virtio.clone().unwrap();
    a.vm.start();
    wait_steps(&a.vm, 400);
    // The device served the software vCPUs' writes.
    assert!(
        dev.queues().iter().all(|q| q.completed > 10),
        "{:?}",
        dev.queues()
    );
    // Hold the device: each vCPU's next request stays in its ring.
    dev.pause();
    let t = Instant::now();
    while (0..2).any(|i| submitted(&a.vm, i) == dev.queues()[i as usize].completed) {
        assert!(t.elapsed() < Duration::from_secs(30), "no request queued");
        std::thread::sleep(Duration::from_millis(1));
    }
    let b = side(true, &image, WorkloadConfig::default());
    migrate_sides(&a, &b, &dir.path().join("ab.sock"));
    assert_eq!(a.vm.ram_checksum(), b.vm.ram_checksum());
    assert_eq!(a.vm.core().vcpu_states(), b.vm.core().vcpu_states());
    assert_eq!(dev.queues(), b.vm.core().virtio.as_ref().unwrap().queues());
    let before = b.vm.verify_disk().unwrap();
    assert_eq!(before.mismatch_count, 0, "{before:?}");
    for (s, c) in before.submitted.iter().zip(&before.completed) {
        assert_eq!(*s, c + 1, "{before:?}");
    }
    // The destination runs each queued request once, and the vCPUs go on writing.
    b.vm.start();
    let goal = b.vm.vcpu_steps().iter().max().copied().unwrap_or(0) + 400;
    wait_steps(&b.vm, goal);
    let c = side(true, &image, WorkloadConfig::default());
    migrate_sides(&b, &c, &dir.path().join("bc.sock"));
    let after = c.vm.verify_disk().unwrap();
    assert_eq!(after.mismatch_count, 0, "{after:?}");
    for (i, (s, done)) in after.submitted.iter().zip(&after.completed).enumerate() {
        assert!(*done <= *s && *done + 1 >= *s, "vCPU {i}: {after:?}");
        assert!(*done > before.completed[i], "vCPU {i}: {after:?}");
    }
    for st in c.vm.core().vcpu_states() {
        assert_eq!(st, model(&cfg, st.id, st.steps), "vCPU {}", st.id);
    }
    assert_eq!(c.vm.verify_ram().corrupt_count, 0);
    c.vm.start();
    let goal = c.vm.vcpu_steps().iter().max().copied().unwrap_or(0) + 200;
    wait_steps(&c.vm, goal);
    c.vm.stop(RunState::Paused);
    let end = c.vm.verify_disk().unwrap();
    assert_eq!(end.mismatch_count, 0, "{end:?}");
    for vm in [&a.vm, &b.vm, &c.vm] {
        vm.shutdown();
    }
}
