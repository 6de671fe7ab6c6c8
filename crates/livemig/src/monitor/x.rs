//! livemig's own commands, prefixed `x-livemig-` as QEMU prefixes its unstable ones: RAM
//! checksums, RAM and disk verification, and the reference VM's internals that tests and the
//! demo read.

use super::App;
use migration::machine::Machine;
use migration::runstate::RunState;
use migration::MigrationStatus;
use qmp::{Args, CommandSet, QmpError, Reply};
use serde_json::{json, Value};
use std::sync::Arc;

/// The commands of [`LivemigCommands`].
pub const COMMANDS: &[&str] = &[
    "x-livemig-ram-checksum",
    "x-livemig-verify-ram",
    "x-livemig-query-vm",
    "x-livemig-verify-disk",
];

/// livemig's own commands over one VM.
pub struct LivemigCommands {
    app: Arc<App>,
}

impl LivemigCommands {
    /// The commands of `app`'s VM.
    pub fn new(app: Arc<App>) -> LivemigCommands {
        LivemigCommands { app }
    }
}

impl CommandSet for LivemigCommands {
    fn commands(&self) -> &[&'static str] {
        COMMANDS
    }

    fn dispatch(&self, name: &str, a: Args) -> Result<Reply, QmpError> {
        a.finish()?;
        let vm = &self.app.vm;
        if matches!(name, "x-livemig-ram-checksum" | "x-livemig-verify-ram") {
            // Reading a page that is still on the source would hang the monitor until a
            // recovery that may never come (the source may be dead).
            let held = self.app.mig.pages_awaiting_recovery();
            if held > 0 {
                return Err(QmpError::generic(format!(
                    "{name}: {held} pages of guest RAM are still on the source and postcopy is \
                     paused: reading them would wait for a recovery"
                )));
            }
        }
        let v = match name {
            "x-livemig-ram-checksum" => json!({ "checksum": vm.ram_checksum() }),
            "x-livemig-verify-ram" => {
                // The vCPUs are held for the walk (`Vm::verify_ram`), but an incoming
                // precopy writes pages without them (a page read mid-copy looks torn). A
                // postcopy-active destination is fine: its pages are placed whole, and the
                // walk waits for those it touches (a paused one is refused above).
                let incoming = self.app.mig.incoming_status();
                if matches!(incoming, MigrationStatus::Setup | MigrationStatus::Active) {
                    return Err(QmpError::generic(format!(
                        "x-livemig-verify-ram: an incoming migration is loading guest RAM \
                         (status {}); verify it once the migration has completed",
                        incoming.as_str()
                    )));
                }
                let r = vm.verify_ram();
                json!({
                    "valid": r.valid,
                    "zero": r.zero,
                    "corrupt": r.corrupt_count,
                    "corrupt-pages": r.corrupt,
                })
            }
            "x-livemig-query-vm" => query_vm(&self.app),
            "x-livemig-verify-disk" => {
                if vm.runstate() == RunState::Running {
                    return Err(QmpError::generic(
                        "x-livemig-verify-disk needs a stopped guest (its requests must be settled)",
                    ));
                }
                let r = vm.verify_disk().map_err(QmpError::generic)?;
                json!({
                    "blocks": r.blocks,
                    "written": r.written,
                    "mismatched": r.mismatch_count,
                    "mismatched-blocks": r.mismatched,
                    "submitted": r.submitted,
                    "completed": r.completed,
                })
            }
            _ => return Err(QmpError::unknown_command(name)),
        };
        Ok(Reply::new(v))
    }
}

fn query_vm(app: &App) -> Value {
    let core = app.vm.core();
    let w = core
        .workload
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let vcpus: Vec<Value> = core
        .vcpu_states()
        .iter()
        .map(|s| json!({"id": s.id, "steps": s.steps, "disk-writes": s.disk_writes}))
        .collect();
    json!({
        "machine": app.vm.machine_type(),
        "ram-size": core.ram.size(),
        "vcpus": vcpus,
        "serial-bytes": app.vm.serial_bytes(),
        "clock-ns": core.clock.now_ns(),
        "pages-written": core.pages_written.load(std::sync::atomic::Ordering::Relaxed),
        "memmap-rebuilds": core.memmap.stats().rebuilds,
        "windows": (0..vm::machine::WINDOWS)
            .map(|i| core.memmap.address_of(&format!("window{i}")))
            .collect::<Vec<_>>(),
        "workload": {
            "fill": w.fill, "hot": w.hot, "dirty-rate": w.dirty_rate,
            "disk-every": w.disk_every, "serial-every": w.serial_every, "seed": w.seed,
        },
    })
}
