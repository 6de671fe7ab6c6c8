//! `livemig vm`: one reference VM process, built from the command line, controlled over QMP.
//!
//! Start-up order matters: disks first (an incoming VM opens them inactive, as QEMU does under
//! `-incoming`), then the QMP server (the VM's events go to it), then the VM, then the
//! migration subsystem, then the guest starts (without `-S` or `-incoming`), then the
//! listeners — so a client that connects finds every command working and the guest in its
//! start-up state.
//!
//! Shutting down (`quit`, or SIGTERM, SIGINT or SIGHUP, which QEMU treats the same way) ends a
//! running migration first and waits for its cleanup, then closes the monitors and the block
//! layer (so persistent bitmaps are stored), then exits with status 0:
//! [`shutdown_and_exit`]. A destination whose incoming migration fails to load exits with
//! status 1, as QEMU's does. The signals are blocked in every thread and taken by one thread that
//! waits for them (children started by `exec:` get a clean mask from `std::process`).

use crate::cli::VmArgs;
use crate::monitor::{App, Monitor};
use block::BlockLayer;
use migration::machine::Machine;
use migration::{LoadFailureHook, Migration, MigrationOptions};
use nix::sys::signal::{SigSet, Signal};
use serde_json::{json, Value};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vm::{Vm, VmConfig};

/// Longest a shutdown waits for a running migration to be cancelled and cleaned up.
const MIGRATION_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Ends the process as QEMU's main loop does after a shutdown request: the migrations are
/// ended as a cancel ends them (bitmaps released, `skip_store` cleared, disks reactivated) and
/// their cleanup awaited (bounded); then the monitors close; then every block node is closed
/// (`bdrv_close_all`: qcow2 metadata and persistent bitmaps reach the images); then the
/// process exits with status 0. Only the first caller does this; a second one (a signal
/// during `quit`) waits for the exit.
pub fn shutdown_and_exit(mig: &Migration, server: &qmp::Server, block: &BlockLayer) -> ! {
    begin_exit();
    if !mig.shutdown(MIGRATION_SHUTDOWN_TIMEOUT) {
        log::warn!(
            "the migration did not end within {} s; closing the images anyway",
            MIGRATION_SHUTDOWN_TIMEOUT.as_secs()
        );
    }
    server.close(Duration::from_secs(5));
    if let Err(e) = block.close_all() {
        log::error!("{e}");
    }
    std::process::exit(0);
}

/// Makes the caller the one that ends the process; any later caller (a signal during `quit`,
/// a `quit` while a failed load exits) waits here for the exit.
fn begin_exit() {
    static STARTED: AtomicBool = AtomicBool::new(false);
    if STARTED.swap(true, Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

/// An incoming migration's load failed: as QEMU 7.2 (`process_incoming_migration_co`), the
/// destination exits with status 1, the error already on stderr. The monitors get what is
/// queued for them first (the `MIGRATION` event `failed`). Nothing was activated, so there
/// is nothing for the block layer to store.
fn exit_after_failed_load(server: &qmp::Server) -> ! {
    begin_exit();
    server.close(Duration::from_secs(1));
    std::process::exit(1);
}

/// SIGTERM, SIGINT and SIGHUP: QEMU's termination signals.
fn termination_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set
}

/// Forwards the engine's and the VM's events to QMP clients.
struct QmpEvents(qmp::EventSink);

impl migration::events::EventSink for QmpEvents {
    fn emit(&self, name: &str, data: Option<Value>) {
        self.0.emit(name, data);
    }
}

/// Runs the VM until `quit` (which exits the process). Returns an error message for a bad
/// configuration, as QEMU does before it starts.
pub fn run(mut args: VmArgs) -> Result<(), String> {
    if args.device_help {
        // A reader that went away early (`| head`) is no error.
        let _ = crate::out::write(format_args!("{}", crate::cli::DEVICE_HELP));
        return Ok(());
    }
    if args.drive_format_help {
        // QEMU's listing: every driver, read-write then read-only (QEMU's iotests read both).
        nbd::register_driver(Arc::new(tls::Objects::new()));
        let mut drivers: Vec<&str> = block::options::DRIVERS.to_vec();
        if block::BlockLayer::driver_registered("nbd") {
            drivers.push("nbd");
        }
        drivers.sort_unstable();
        let list = drivers.join(" ");
        println!("Supported formats: {list}\nSupported formats (read-only): {list}");
        return Ok(());
    }
    if args.machine_help {
        print!("{}", crate::cli::MACHINE_HELP);
        return Ok(());
    }
    // Chardevs first, and inherited sockets (fd=N) adopted before this process opens
    // anything of its own.
    let wiring = crate::chardev::wire(&args.chardevs, &args.mons, args.qtest.as_deref())?;
    let mut fd_monitors = Vec::new();
    let mut socket_monitors = Vec::new();
    for m in &wiring.monitors {
        match m {
            crate::chardev::Endpoint::Fd(fd) => fd_monitors.push(
                crate::inherited_fd::adopt_socket(*fd)
                    .map_err(|e| format!("-chardev socket,{e}"))?,
            ),
            crate::chardev::Endpoint::Socket(opt) => socket_monitors.push(opt.clone()),
        }
    }
    let qtest = match &wiring.qtest {
        Some(e @ crate::chardev::Endpoint::Fd(_)) => Some(crate::chardev::connect_qtest(e)?),
        _ => None,
    };
    // Before any thread starts, so that every thread inherits the mask and only the signal
    // thread below ever takes them.
    let signals = termination_signals();
    signals
        .thread_block()
        .map_err(|e| format!("cannot block the termination signals: {e}"))?;
    // Objects first: an nbd -blockdev may name TLS credentials.
    let objects = Arc::new(tls::Objects::new());
    for spec in &args.objects {
        let added = if spec.trim_start().starts_with('{') {
            match serde_json::from_str::<Value>(spec) {
                Ok(Value::Object(m)) => objects.object_add(qmp::Args::new(m)),
                Ok(_) => Err(qmp::QmpError::generic("expected a JSON object")),
                Err(e) => Err(qmp::QmpError::generic(e.to_string())),
            }
        } else {
            objects.object_add_cmdline(spec)
        };
        added.map_err(|e| format!("-object {spec}: {}", e.desc))?;
    }
    // `-name process=`: the main thread's name is the process's (`/proc/PID/comm`), as QEMU
    // sets it.
    if let Some(p) = &args.process_name {
        let name = std::ffi::CString::new(p.as_str())
            .map_err(|_| format!("-name process={p}: the name holds a NUL byte"))?;
        nix::sys::prctl::set_name(&name).map_err(|e| format!("-name process={p}: {e}"))?;
    }
    // Drivers from other crates, before any -blockdev can name them.
    nbd::register_driver(objects.clone());
    let block = Arc::new(BlockLayer::new());
    block.set_incoming(args.incoming.is_some());
    for spec in &args.blockdevs {
        let v = if spec.trim_start().starts_with('{') {
            serde_json::from_str::<Value>(spec).map_err(|e| format!("-blockdev {spec}: {e}"))?
        } else {
            block::options::parse_blockdev_keyval(spec)
                .map_err(|e| format!("-blockdev {spec}: {e}"))?
        };
        block
            .blockdev_add(&v)
            .map_err(|e| format!("-blockdev {spec}: {e}"))?;
    }
    let mut virtio_blk_backend = String::new();
    for (i, spec) in args.drives.iter().enumerate() {
        // QEMU's `block_default_type`: a drive without `if=` goes on the machine's default
        // bus. The livemig machine's one disk bus is virtio (as on QEMU's machines whose
        // default is `if=virtio`); the `none` machine has none, so `parse_drive` refuses.
        let given_if = qmp::split_options(spec)
            .iter()
            .any(|p| p.starts_with("if="));
        let with_bus = if args.machine == vm::MachineType::Livemig && !given_if {
            format!("{spec},if=virtio")
        } else {
            spec.clone()
        };
        let drive = block::parse_drive(&with_bus, i).map_err(|e| format!("-drive {spec}: {e}"))?;
        let node = block
            .drive_add(&drive)
            .map_err(|e| format!("-drive {spec}: {e}"))?;
        if drive.interface == block::DriveInterface::Virtio {
            if args.virtio_blk.is_some() {
                return Err(format!(
                    "-drive {spec}: this machine has one virtio-blk slot, already taken"
                ));
            }
            match &args.workload_disk {
                Some(w) => {
                    return Err(format!(
                        "-drive {spec}: -workload disk={w} names another disk than this drive"
                    ))
                }
                None => args.workload_disk = Some(node.name().to_string()),
            }
            if args.workload.disk_every == 0 {
                args.workload.disk_every = 64;
            }
            args.virtio_blk = Some(node.name().to_string());
            virtio_blk_backend = drive.id.clone();
        }
    }
    if let Some(node) = &args.virtio_blk {
        if block.node(node).is_none() {
            return Err(format!(
                "-device virtio-blk,drive={node}: Property 'virtio-blk-device.drive' can't find value '{node}'"
            ));
        }
    }
    if let Some(node) = &args.workload_disk {
        if block.node(node).is_none() {
            return Err(format!("-workload disk={node}: no such block node"));
        }
    }

    let monitor = Arc::new(Monitor::default());
    let server = qmp::Server::with_config(
        monitor.clone(),
        qmp::ServerConfig {
            max_clients: args.monitor_clients,
            ..qmp::ServerConfig::default()
        },
    );
    let events = server.events();
    let sink: Arc<dyn migration::events::EventSink> = Arc::new(QmpEvents(events.clone()));

    let config = VmConfig {
        name: args.name.clone().unwrap_or_default(),
        machine: args.machine,
        ram_size: args.ram_size,
        vcpus: args.vcpus,
        workload: args.workload.clone(),
        workload_disk: args.workload_disk.clone(),
        serial: args.serial.clone(),
        incoming: args.incoming.is_some(),
        start_paused: args.start_paused,
        mem_prealloc: args.mem_prealloc,
        accel: args.accel,
        virtio_blk: args.virtio_blk.is_some(),
        virtio_blk_backend,
        virtio_blk_id: args.virtio_blk_id.clone(),
    };
    let vm = Vm::new(config, block.clone(), sink.clone())?;
    let mig = Arc::new(Migration::new(
        vm.clone(),
        sink,
        MigrationOptions {
            autostart: !args.start_paused,
            tls_objects: objects.clone(),
            on_load_failure: Some({
                let server = server.clone();
                LoadFailureHook(Arc::new(move |_| exit_after_failed_load(&server)))
            }),
        },
    ));
    match args.incoming.as_deref() {
        Some("defer") => mig.incoming_defer(),
        Some(uri) => mig
            .incoming(uri)
            .map_err(|e| format!("-incoming {uri}: {e}"))?,
        None => {}
    }
    {
        let (mig, server, block, events) =
            (mig.clone(), server.clone(), block.clone(), events.clone());
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                if let Ok(sig) = signals.wait() {
                    // QEMU's words (its `qemu_kill_report` without the sender, which
                    // sigwait does not tell).
                    log::error!("terminating on signal {}", sig as i32);
                    events.emit(
                        "SHUTDOWN",
                        Some(json!({"guest": false, "reason": "host-signal"})),
                    );
                    shutdown_and_exit(&mig, &server, &block);
                }
            })
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    }
    let app = Arc::new(App {
        name: args.name.clone(),
        vm: vm.clone(),
        mig,
        block,
        server: server.clone(),
        events,
        objects,
    });
    monitor.set_app(app.clone());
    // The guest starts before any monitor listens: QEMU runs no monitor command before
    // vm_start(), so without -S a client never sees `prelaunch` (and a `stop` it sends is not
    // undone by a start-up that comes after it). Unlike QEMU with `wait=on`, the guest does not
    // wait for the first client.
    if args.incoming.is_none() && !args.start_paused {
        vm.start();
    }
    for q in &args.qmp {
        let opt = qmp::QmpOption::parse(q).map_err(|e| format!("-qmp {q}: {e}"))?;
        server.start(&opt).map_err(|e| format!("-qmp {q}: {e}"))?;
    }
    for opt in &socket_monitors {
        server
            .start(opt)
            .map_err(|e| format!("-chardev {opt:?}: {e}"))?;
    }
    for stream in fd_monitors {
        server
            .serve_unix(stream)
            .map_err(|e| format!("-mon: {e}"))?;
    }
    if args.qmp_stdio {
        // Copies of the descriptors, written without a buffer: a reply is on stdout once its
        // write returns, so `quit` exits only after its reply and event are out.
        let dup =
            |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map(std::fs::File::from);
        let input = dup(std::io::stdin().as_fd()).map_err(|e| format!("-qmp stdio: {e}"))?;
        let output = dup(std::io::stdout().as_fd()).map_err(|e| format!("-qmp stdio: {e}"))?;
        server
            .serve_io(input, output)
            .map_err(|e| format!("-qmp stdio: {e}"))?;
    }
    if args.monitor_stdio {
        crate::monitor::hmp::serve_stdio(app)
            .map_err(|e| format!("-monitor stdio: cannot start the monitor: {e}"))?;
    }
    match (qtest, &wiring.qtest) {
        (Some(stream), _) => crate::qtest::serve(stream)?,
        (None, Some(e)) => crate::qtest::serve(crate::chardev::connect_qtest(e)?)?,
        (None, None) => {}
    }
    // Everything runs on other threads from here; `quit` exits the process.
    loop {
        std::thread::park();
    }
}
