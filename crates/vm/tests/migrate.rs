//! End-to-end migrations between two reference VMs in one process: RAM, vCPU state, the
//! clock, the memory map and dirty bitmaps arrive intact over every transport, and cancel or
//! failure leaves the source as it was.

use block::BlockLayer;
use migration::caps::Capability;
use migration::events::RecordedEvents;
use migration::runstate::RunState;
use migration::{Migration, MigrationOptions, MigrationStatus};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use vm::workload::WorkloadConfig;
use vm::{MachineType, Vm, VmConfig};

const DISK: u64 = 64 << 20;

struct Side {
    vm: Arc<Vm>,
    mig: Migration,
    block: Arc<BlockLayer>,
    events: Arc<RecordedEvents>,
}

fn side(incoming: bool, machine: MachineType, workload: WorkloadConfig) -> Side {
    let block = Arc::new(BlockLayer::new());
    block.set_incoming(incoming);
    block
        .blockdev_add(&json!({"driver": "null-co", "node-name": "d0", "size": DISK}))
        .unwrap();
    let events = Arc::new(RecordedEvents::default());
    let vm = Vm::new(
        VmConfig {
            machine,
            ram_size: 32 << 20,
            vcpus: 2,
            workload,
            workload_disk: Some("d0".into()),
            incoming,
            ..Default::default()
        },
        block.clone(),
        events.clone(),
    )
    .unwrap();
    let mig = Migration::new(
        vm.clone(),
        events.clone(),
        MigrationOptions {
            autostart: false,
            ..Default::default()
        },
    );
    mig.set_capabilities(&[(Capability::Events, true), (Capability::DirtyBitmaps, true)])
        .unwrap();
    Side {
        vm,
        mig,
        block,
        events,
    }
}

fn busy_workload() -> WorkloadConfig {
    WorkloadConfig {
        fill: 16 << 20,
        hot: 2 << 20,
        disk_every: 16,
        dirty_rate: 20_000,
        ..Default::default()
    }
}

fn sha(b: &BlockLayer, name: &str) -> String {
    b.x_debug_block_dirty_bitmap_sha256("d0", name).unwrap()
}

/// Waits (a minute at most) for `src`'s outgoing migration to end: it must have completed.
fn outgoing_completed(src: &Side, what: &str) {
    let st = src.mig.wait_outgoing(
        &[
            MigrationStatus::Completed,
            MigrationStatus::Failed,
            MigrationStatus::Cancelled,
        ],
        Duration::from_secs(60),
    );
    assert_eq!(
        st,
        MigrationStatus::Completed,
        "{what}: source {:?}",
        src.mig.query()
    );
}

/// Waits (a minute at most) for `dst`'s incoming migration to end: it must have completed.
fn incoming_completed(dst: &Side, what: &str) {
    let st = dst.mig.wait_incoming(
        &[MigrationStatus::Completed, MigrationStatus::Failed],
        Duration::from_secs(60),
    );
    assert_eq!(
        st,
        MigrationStatus::Completed,
        "{what}: destination {:?}",
        dst.mig.query()
    );
}

/// Waits (30 s at most) until every vCPU of `vm` has taken more steps than in `before`. (A
/// fixed 100 ms sleep assumed every vCPU thread had run by then, which a loaded machine need
/// not grant.)
fn wait_steps_beyond(vm: &Vm, before: &[u64]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = vm.vcpu_steps();
        if now.len() == before.len() && now.iter().zip(before).all(|(a, b)| a > b) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not run: steps {before:?} -> {now:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Migrates `src` to `dst` over `uri` (the destination listens on `listen`) and checks what a
/// user would check: both ends completed, RAM and bitmaps identical at the stop point, the
/// vCPUs' state carried over, and the destination's guest carrying on from there.
fn migrate_and_check(src: &Side, dst: &Side, listen: &str, uri: &str) {
    src.block
        .block_dirty_bitmap_add("d0", "b0", Some(65536), None, None)
        .unwrap();
    src.vm.as_ref().start_for_test();
    // The guest has written pages before the migration starts (`normal` pages to send).
    wait_steps_beyond(&src.vm, &[0, 0]);
    dst.mig.incoming(listen).unwrap();
    let uri = match dst.mig.incoming_port() {
        Some(p) => uri.replace("PORT", &p.to_string()),
        None => uri.to_string(),
    };
    src.mig.migrate(&uri).unwrap();
    outgoing_completed(src, &uri);
    incoming_completed(dst, listen);

    assert_eq!(src.vm.as_ref().runstate_for_test(), RunState::PostMigrate);
    // -S on the destination: paused, so the stop point can be compared.
    assert_eq!(dst.vm.as_ref().runstate_for_test(), RunState::Paused);
    assert_eq!(src.vm.ram_checksum(), dst.vm.ram_checksum(), "RAM differs");
    let report = dst.vm.verify_ram();
    assert_eq!(report.corrupt_count, 0, "{report:?}");
    assert!(report.valid > 0, "{report:?}");
    assert_eq!(report, src.vm.verify_ram());
    assert_eq!(src.vm.vcpu_steps(), dst.vm.vcpu_steps());
    assert_eq!(
        sha(&src.block, "b0"),
        sha(&dst.block, "b0"),
        "bitmap differs"
    );
    let q = src.mig.query();
    assert_eq!(q["status"], "completed");
    assert!(q["downtime"].as_u64().is_some(), "{q}");
    assert!(q["ram"]["normal"].as_u64().unwrap() > 0, "{q}");
    assert!(q["ram"]["mbps"].as_f64().unwrap() > 0.0, "{q}");

    // The guest carries on at the destination from where it stopped.
    let before = dst.vm.vcpu_steps();
    dst.vm.as_ref().start_for_test();
    wait_steps_beyond(&dst.vm, &before);
    dst.vm.shutdown();
    src.vm.shutdown();
}

trait TestControl {
    fn start_for_test(&self);
    fn runstate_for_test(&self) -> RunState;
}

impl TestControl for Vm {
    fn start_for_test(&self) {
        migration::machine::Machine::start(self);
    }
    fn runstate_for_test(&self) -> RunState {
        migration::machine::Machine::runstate(self)
    }
}

#[test]
fn migrates_over_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock").display().to_string();
    let src = side(false, MachineType::Livemig, busy_workload());
    let dst = side(true, MachineType::Livemig, WorkloadConfig::default());
    migrate_and_check(&src, &dst, &format!("unix:{path}"), &format!("unix:{path}"));
    let names: Vec<String> = src
        .events
        .snapshot()
        .into_iter()
        .map(|(n, d)| format!("{n} {}", d.unwrap_or_default()))
        .collect();
    for want in [
        "MIGRATION {\"status\":\"setup\"}",
        "MIGRATION {\"status\":\"active\"}",
        "STOP null",
        "MIGRATION {\"status\":\"completed\"}",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
    }
    // QEMU 7.2 enters `device` only after `pre-switchover`.
    assert!(!names.iter().any(|n| n.contains("\"device\"")), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("MIGRATION_PASS")),
        "{names:?}"
    );
}

#[test]
fn migrates_over_tcp() {
    let src = side(false, MachineType::Livemig, busy_workload());
    let dst = side(true, MachineType::Livemig, WorkloadConfig::default());
    migrate_and_check(&src, &dst, "tcp:127.0.0.1:0", "tcp:127.0.0.1:PORT");
}

#[test]
fn migrates_over_exec_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("stream").display().to_string();
    // Source writes the whole stream to a file through `exec:`; then the destination reads it.
    let src = side(false, MachineType::Livemig, busy_workload());
    src.block
        .block_dirty_bitmap_add("d0", "b0", Some(65536), None, None)
        .unwrap();
    migration::machine::Machine::start(src.vm.as_ref());
    std::thread::sleep(Duration::from_millis(50));
    src.mig.migrate(&format!("exec:cat > {f}")).unwrap();
    outgoing_completed(&src, "exec");
    for listen in [format!("file:{f}"), format!("exec:cat {f}")] {
        let dst = side(true, MachineType::Livemig, WorkloadConfig::default());
        dst.mig.incoming(&listen).unwrap();
        incoming_completed(&dst, &listen);
        assert_eq!(src.vm.ram_checksum(), dst.vm.ram_checksum(), "{listen}");
        assert_eq!(sha(&src.block, "b0"), sha(&dst.block, "b0"), "{listen}");
        assert_eq!(src.vm.vcpu_steps(), dst.vm.vcpu_steps(), "{listen}");
        dst.vm.shutdown();
    }
    src.vm.shutdown();
}

#[test]
fn m_none_machine_migrates_ram_and_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock").display().to_string();
    let src = side(false, MachineType::None, WorkloadConfig::default());
    let dst = side(true, MachineType::None, WorkloadConfig::default());
    src.block
        .block_dirty_bitmap_add("d0", "b0", Some(65536), None, None)
        .unwrap();
    block::qemu_io::run(&src.block, "d0", "write 0 64k").unwrap();
    block::qemu_io::run(&src.block, "d0", "write 1M 4k").unwrap();
    dst.mig.incoming(&format!("unix:{path}")).unwrap();
    src.mig.migrate(&format!("unix:{path}")).unwrap();
    outgoing_completed(&src, "unix");
    incoming_completed(&dst, "unix");
    assert_eq!(sha(&src.block, "b0"), sha(&dst.block, "b0"));
    let info = dst.block.query_named_block_nodes(false);
    assert!(info.to_string().contains("\"count\":131072"), "{info}");
}

#[test]
fn cancel_while_connect_hangs_ends_at_once_and_a_new_migration_works() {
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("full.sock");
    // A listener that never accepts, with a backlog of zero, filled by one waiting client: the
    // next connect blocks, as towards a destination that is not answering.
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &UnixAddr::new(&path).unwrap(),
    )
    .unwrap();
    listen(&fd, Backlog::new(0).unwrap()).unwrap();
    let _filler = std::os::unix::net::UnixStream::connect(&path).unwrap();

    let src = side(false, MachineType::Livemig, busy_workload());
    src.block
        .block_dirty_bitmap_add("d0", "b0", Some(65536), None, None)
        .unwrap();
    migration::machine::Machine::start(src.vm.as_ref());
    src.mig
        .migrate(&format!("unix:{}", path.display()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(src.mig.outgoing_status(), MigrationStatus::Setup);
    src.mig.cancel().unwrap();
    assert_eq!(src.mig.outgoing_status(), MigrationStatus::Cancelled);
    assert_eq!(src.vm.as_ref().runstate_for_test(), RunState::Running);
    // The bitmap was never taken: it can be used at once (the guest keeps writing to the disk,
    // so its contents are not compared here).
    src.block.block_dirty_bitmap_clear("d0", "b0").unwrap();

    let dst = side(true, MachineType::Livemig, WorkloadConfig::default());
    let ok = dir.path().join("ok.sock").display().to_string();
    dst.mig.incoming(&format!("unix:{ok}")).unwrap();
    src.mig.migrate(&format!("unix:{ok}")).unwrap();
    outgoing_completed(&src, "unix");
    let names: Vec<String> = src
        .events
        .snapshot()
        .into_iter()
        .filter(|(n, _)| n == "MIGRATION")
        .map(|(_, d)| d.unwrap()["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        &names[..3],
        &["setup", "cancelling", "cancelled"],
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| *n == "cancelled").count(),
        1,
        "{names:?}"
    );
    dst.vm.shutdown();
    src.vm.shutdown();
}

#[test]
fn device_load_rebuilds_the_memory_map_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.sock").display().to_string();
    let src = side(false, MachineType::Livemig, WorkloadConfig::default());
    let dst = side(true, MachineType::Livemig, WorkloadConfig::default());
    // The destination starts with every window unmapped; the source's firmware mapped them.
    let windows = |s: &Side| -> Vec<Option<u64>> {
        (0..vm::machine::WINDOWS)
            .map(|i| s.vm.core().memmap.address_of(&format!("window{i}")))
            .collect()
    };
    assert!(windows(&dst).iter().all(Option::is_none));
    assert!(windows(&src).iter().all(Option::is_some));
    let before = dst.vm.core().memmap.stats().rebuilds;
    dst.mig.incoming(&format!("unix:{path}")).unwrap();
    src.mig.migrate(&format!("unix:{path}")).unwrap();
    incoming_completed(&dst, "unix");
    assert_eq!(windows(&dst), windows(&src));
    // Eight windows moved, one flat-view rebuild (seed 003).
    assert_eq!(dst.vm.core().memmap.stats().rebuilds, before + 1);
    let view = dst.vm.core().memmap.flat_view();
    for (i, gpa) in windows(&src).into_iter().enumerate() {
        assert_eq!(
            view.lookup(gpa.unwrap()).unwrap().region,
            format!("window{i}")
        );
    }
    dst.vm.shutdown();
    src.vm.shutdown();
}

#[test]
fn a_destination_gone_during_pre_switchover_fails_the_migration_at_once() {
    use testkit::relay::{Plan, Relay, Target};
    let dir = tempfile::tempdir().unwrap();
    let dst_path = dir.path().join("dst.sock");
    // A real destination, which answers the source's PINGs as QEMU's does, behind a link that
    // goes in pre-switchover. (A fake that only drained the stream and answered nothing held
    // the switchover back whenever the source's bandwidth window closed over its idle passes:
    // all it sent then counts as not consumed yet until the destination has been silent for
    // x-livemig-stall-timeout, 30 s: under CPU load the test timed out in `active`.)
    let dst = side(true, MachineType::Livemig, WorkloadConfig::default());
    dst.mig
        .incoming(&format!("unix:{}", dst_path.display()))
        .unwrap();
    let relay = Relay::unix(
        &dir.path().join("relay.sock"),
        Target::Unix(dst_path),
        Plan::none(),
    );
    let src = side(
        false,
        MachineType::Livemig,
        WorkloadConfig {
            fill: 4 << 20,
            ..Default::default()
        },
    );
    migration::machine::Machine::start(src.vm.as_ref());
    src.mig
        .set_capabilities(&[
            (Capability::ReturnPath, true),
            (Capability::PauseBeforeSwitchover, true),
        ])
        .unwrap();
    src.mig.migrate(&relay.uri).unwrap();
    assert_eq!(
        src.mig
            .wait_outgoing(&[MigrationStatus::PreSwitchover], Duration::from_secs(30)),
        MigrationStatus::PreSwitchover,
        "{}",
        src.mig.query()
    );
    relay.cut();
    // No migrate-continue: the source notices by itself.
    let st = src
        .mig
        .wait_outgoing(&[MigrationStatus::Failed], Duration::from_secs(10));
    assert_eq!(st, MigrationStatus::Failed, "{}", src.mig.query());
    assert!(
        src.mig.query()["error-desc"]
            .as_str()
            .unwrap()
            .contains("pre-switchover"),
        "{}",
        src.mig.query()
    );
    assert_eq!(src.vm.as_ref().runstate_for_test(), RunState::Running);
    src.vm.shutdown();
    dst.vm.shutdown();
}
