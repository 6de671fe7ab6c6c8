//! `livemig vm`: one reference VM process, built from the command line, controlled over QMP.
//!
//! Start-up order matters: disks first (an incoming VM opens them inactive, as QEMU does under
//! `-incoming`), then the QMP server (the VM's events go to it), then the VM, then the
//! migration subsystem, then the guest starts (without `-S` or `-incoming`), then the
//! listeners — so a client that connects finds every command working and the guest in its
//! start-up state.

use crate::cli::VmArgs;
use crate::monitor::{App, Monitor};
use block::BlockLayer;
use migration::machine::Machine;
use migration::{Migration, MigrationOptions};
use serde_json::Value;
use std::sync::Arc;
use vm::{Vm, VmConfig};

/// Forwards the engine's and the VM's events to QMP clients.
struct QmpEvents(qmp::EventSink);

impl migration::events::EventSink for QmpEvents {
    fn emit(&self, name: &str, data: Option<Value>) {
        self.0.emit(name, data);
    }
}

/// Runs the VM until `quit` (which exits the process). Returns an error message for a bad
/// configuration, as QEMU does before it starts.
pub fn run(args: VmArgs) -> Result<(), String> {
    // Drivers from other crates, before any -blockdev can name them.
    nbd::register_driver();
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
    if let Some(node) = &args.workload_disk {
        if block.node(node).is_none() {
            return Err(format!("-workload disk={node}: no such block node"));
        }
    }

    let monitor = Arc::new(Monitor::default());
    let server = qmp::Server::new(monitor.clone());
    let events = server.events();
    let sink: Arc<dyn migration::events::EventSink> = Arc::new(QmpEvents(events.clone()));

    let config = VmConfig {
        name: args.name.clone(),
        machine: args.machine,
        ram_size: args.ram_size,
        vcpus: args.vcpus,
        workload: args.workload.clone(),
        workload_disk: args.workload_disk.clone(),
        serial: args.serial.clone(),
        incoming: args.incoming.is_some(),
        start_paused: args.start_paused,
        mem_prealloc: args.mem_prealloc,
    };
    let vm = Vm::new(config, block.clone(), sink.clone())?;
    let mig = Arc::new(Migration::new(
        vm.clone(),
        sink,
        MigrationOptions {
            autostart: !args.start_paused,
        },
    ));
    match args.incoming.as_deref() {
        Some("defer") => mig.incoming_defer(),
        Some(uri) => mig
            .incoming(uri, false)
            .map_err(|e| format!("-incoming {uri}: {e}"))?,
        None => {}
    }
    monitor.set_app(Arc::new(App {
        vm: vm.clone(),
        mig,
        block,
        server: server.clone(),
        events,
    }));
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
    // Everything runs on other threads from here; `quit` exits the process.
    loop {
        std::thread::park();
    }
}
