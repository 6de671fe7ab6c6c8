//! The VM's own commands: run control (`query-status`, `stop`, `cont`, `quit`),
//! `query-name`, `query-kvm` and `pmemsave`,
//! with QEMU 7.2's semantics and messages.

use super::App;
use migration::machine::Machine;
use migration::runstate::RunState;
use qmp::{Args, CommandSet, QmpError, Reply};
use serde_json::{json, Value};
use std::sync::Arc;

/// The commands of [`VmCommands`].
pub const COMMANDS: &[&str] = &[
    "query-status",
    "query-name",
    "query-kvm",
    "stop",
    "cont",
    "quit",
    "pmemsave",
];

/// Run control and guest memory of one VM.
pub struct VmCommands {
    app: Arc<App>,
}

impl VmCommands {
    /// The commands of `app`'s VM.
    pub fn new(app: Arc<App>) -> VmCommands {
        VmCommands { app }
    }
}

impl CommandSet for VmCommands {
    fn commands(&self) -> &[&'static str] {
        COMMANDS
    }

    fn dispatch(&self, name: &str, mut a: Args) -> Result<Reply, QmpError> {
        let app = &self.app;
        match name {
            "query-status" => {
                a.finish()?;
                let st = app.vm.runstate();
                Ok(Reply::new(json!({
                    "status": st.as_str(),
                    "singlestep": false,
                    "running": st.is_running(),
                })))
            }
            "query-kvm" => {
                a.finish()?;
                Ok(Reply::new(app.vm.query_kvm()))
            }
            "query-name" => {
                a.finish()?;
                // QEMU's NameInfo: `name` only when `-name` gave one.
                Ok(Reply::new(match &app.name {
                    Some(n) => json!({ "name": n }),
                    None => json!({}),
                }))
            }
            "stop" => {
                a.finish()?;
                match app.vm.runstate() {
                    RunState::InMigrate => app.mig.set_autostart(false),
                    RunState::Running => app.vm.stop(RunState::Paused),
                    RunState::Prelaunch => app.vm.set_runstate(RunState::Paused),
                    _ => {}
                }
                Ok(Reply::empty())
            }
            "cont" => {
                a.finish()?;
                cont(app)?;
                Ok(Reply::empty())
            }
            "quit" => {
                a.finish()?;
                Ok(quit(app))
            }
            "pmemsave" => {
                let val: u64 = a.req_int("val")?;
                let size: u64 = a.req_int("size")?;
                let filename = a.req_str("filename")?;
                a.finish()?;
                pmemsave(app, val, size, &filename)?;
                Ok(Reply::empty())
            }
            _ => Err(QmpError::unknown_command(name)),
        }
    }
}

/// QEMU's `qmp_quit`: `SHUTDOWN`, the reply, then — once every client has been flushed — the
/// shutdown every termination takes ([`crate::vmproc::shutdown_and_exit`]: a running migration
/// ended first, then the images closed).
fn quit(app: &App) -> Reply {
    quit_replying(app, Value::Object(serde_json::Map::new()))
}

/// [`quit`] with `value` as the reply: the human monitor's `quit` (QEMU's `hmp_quit` calls
/// `qmp_quit`) replies with its text, the empty string.
pub(crate) fn quit_replying(app: &App, value: Value) -> Reply {
    app.events.emit(
        "SHUTDOWN",
        Some(json!({"guest": false, "reason": "host-qmp-quit"})),
    );
    let (mig, server, block) = (app.mig.clone(), app.server.clone(), app.block.clone());
    Reply::new(value).after_flush(move || crate::vmproc::shutdown_and_exit(&mig, &server, &block))
}

/// QEMU's `qmp_cont`.
fn cont(app: &App) -> Result<(), QmpError> {
    match app.vm.runstate() {
        RunState::InternalError | RunState::Shutdown | RunState::GuestPanicked => Err(
            QmpError::generic("Resetting the Virtual Machine is required"),
        ),
        RunState::FinishMigrate => Err(QmpError::generic("Migration is not finalized yet")),
        RunState::InMigrate => {
            app.mig.set_autostart(true);
            Ok(())
        }
        RunState::Running => Ok(()),
        _ => {
            // After a completed outgoing migration the images were handed over; take them back
            // first (QEMU's bdrv_activate_all in qmp_cont).
            app.vm.activate_disks()?;
            app.vm.start();
            Ok(())
        }
    }
}

fn pmemsave(app: &App, val: u64, size: u64, filename: &str) -> Result<(), QmpError> {
    let ram = &app.vm.core().ram;
    let end = val.checked_add(size);
    if end.is_none_or(|e| e > ram.size()) {
        return Err(QmpError::generic(format!(
            "Invalid addr {val:#x}/size {size} specified: guest RAM is {} bytes",
            ram.size()
        )));
    }
    let mut f = std::fs::File::create(filename)
        .map_err(|e| QmpError::generic(format!("Could not open '{filename}': {e}")))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = val;
    while off < val + size {
        let n = (val + size - off).min(buf.len() as u64) as usize;
        ram.read(off, &mut buf[..n]);
        std::io::Write::write_all(&mut f, &buf[..n])
            .map_err(|e| QmpError::generic(format!("writing to '{filename}': {e}")))?;
        off += n as u64;
    }
    Ok(())
}
