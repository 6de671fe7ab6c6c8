//! The QMP monitor of `livemig vm`: a table of command sets, one per owner.
//!
//! | set | commands | where |
//! |---|---|---|
//! | VM and run control | `query-status`, `query-name`, `query-kvm`, `stop`, `cont`, `quit`, `pmemsave` | [`run`] |
//! | migration | `migrate*`, `query-migrate*` | `migration::qmp` |
//! | block layer | `blockdev-*`, `block-dirty-bitmap-*`, `query-block`, ... | `block::qmp` |
//! | NBD server | `nbd-server-*`, `block-export-*`, `query-block-exports` | `nbd::qmp` |
//! | block jobs | `blockdev-mirror`, `drive-mirror`, `block-job-*`, `job-*`, `query-*jobs` | `blockjob::qmp` |
//! | objects | `object-add`, `object-del` (TLS credentials, authz) | `tls::qmp` |
//! | passed descriptors | `getfd`, `closefd` (for `migrate fd:NAME`) | `qmp::fds` |
//! | livemig's own | `x-livemig-*` | [`x`] |
//! | human monitor | `human-monitor-command` | [`hmp`] |
//!
//! Every set checks its arguments with `qmp::Args` before it acts, so a refused command has no
//! side effect, and maps its errors to QEMU's classes itself. Commands are quick: a migration
//! runs on its own thread and reports through events and `query-migrate`.

pub mod hmp;
pub mod run;
pub mod x;

use block::BlockLayer;
use migration::Migration;
use qmp::{Args, CommandSets, Dispatcher, QmpError, Reply};
use serde_json::Value;
use std::sync::{Arc, OnceLock};

/// Everything the monitor drives.
pub struct App {
    /// `-name guest=`, what `query-name` reports.
    pub name: Option<String>,
    /// The reference VM.
    pub vm: Arc<vm::Vm>,
    /// Its migration subsystem.
    pub mig: Arc<Migration>,
    /// Its disks.
    pub block: Arc<BlockLayer>,
    /// The QMP server (for `quit`).
    pub server: qmp::Server,
    /// Where events go.
    pub events: qmp::EventSink,
    /// `-object` / `object-add` objects (TLS credentials, authz).
    pub objects: Arc<tls::Objects>,
}

/// The dispatcher the QMP server holds. The table arrives after the server exists (the VM
/// needs the server's event sink), hence the cell; the listeners open only once it is set.
#[derive(Default)]
pub struct Monitor {
    sets: OnceLock<CommandSets>,
}

impl Monitor {
    /// Builds the table of command sets over `app`; commands fail until then.
    pub fn set_app(&self, app: Arc<App>) {
        nbd::register_driver(app.objects.clone());
        let events = app.events.clone();
        let jobs = blockjob::JobManager::new(
            app.block.clone(),
            Arc::new(move |name: &str, data: Value| events.emit(name, Some(data))),
        );
        let nbd = nbd::qmp::NbdCommands::new(app.block.clone());
        nbd.server().set_tls_objects(app.objects.clone());
        let mut sets = CommandSets::new();
        sets.add(run::VmCommands::new(app.clone()))
            .add(migration::qmp::MigrationCommands::new(app.mig.clone()))
            .add(block::qmp::BlockCommands::new(app.block.clone()))
            .add(nbd)
            .add(blockjob::qmp::JobCommands::new(jobs))
            .add(tls::qmp::ObjectCommands::new(app.objects.clone()))
            .add(qmp::fds::FdCommands)
            .add(x::LivemigCommands::new(app.clone()))
            .add(hmp::HmpCommands::new(app));
        let _ = self.sets.set(sets);
    }
}

impl Dispatcher for Monitor {
    fn commands(&self) -> Vec<String> {
        self.sets.get().map(|s| s.commands()).unwrap_or_default()
    }

    fn has_command(&self, name: &str) -> bool {
        self.sets.get().is_some_and(|s| s.has_command(name))
    }

    fn allows_oob(&self, name: &str) -> bool {
        self.sets.get().is_some_and(|s| s.allows_oob(name))
    }

    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
        match self.sets.get() {
            Some(s) => s.dispatch(name, args),
            None => Err(QmpError::generic("The VM is still starting")),
        }
    }
}
