//! The QMP commands of `livemig vm`: QEMU's names, arguments, replies and error messages,
//! forwarded to the VM, the migration engine and the block layer.
//!
//! Every handler reads and checks all of its arguments (and rejects unknown ones) before it
//! acts, so a refused command has no side effect. Commands are quick: a migration runs on its
//! own thread and reports through events and `query-migrate`.
//!
//! livemig's own commands are prefixed `x-livemig-`: RAM checksums and verification, and the
//! VM's internals that tests and the demo look at.

use block::BlockLayer;
use migration::caps::Capability;
use migration::machine::Machine;
use migration::runstate::RunState;
use migration::{Migration, MigrationError};
use qmp::{Args, Dispatcher, QmpError, Reply};
use serde_json::{json, Value};
use std::sync::{Arc, OnceLock};
use vm::Vm;

/// Everything the monitor drives.
pub struct App {
    /// The reference VM.
    pub vm: Arc<Vm>,
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

/// The commands, besides the server's built-ins.
pub const COMMANDS: &[&str] = &[
    "query-status",
    "query-kvm",
    "stop",
    "cont",
    "quit",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-continue",
    "migrate-start-postcopy",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "query-migrate",
    "human-monitor-command",
    "pmemsave",
    "x-livemig-ram-checksum",
    "x-livemig-verify-ram",
    "x-livemig-verify-disk",
    "x-livemig-query-vm",
];

/// The dispatcher: the [`App`] arrives after the server exists (the app needs the server's
/// event sink), hence the cell.
#[derive(Default)]
pub struct Monitor {
    app: OnceLock<Arc<App>>,
    storage: OnceLock<Storage>,
}

/// Storage migration without shared storage: the NBD server and the block jobs.
struct Storage {
    nbd: nbd::NbdServer,
    jobs: Arc<blockjob::JobManager>,
}

impl Monitor {
    /// Gives the monitor its app; commands fail until then.
    pub fn set_app(&self, app: Arc<App>) {
        nbd::register_driver();
        let events = app.events.clone();
        let nbd = nbd::NbdServer::new();
        nbd.set_tls_objects(app.objects.clone());
        let _ = self.storage.set(Storage {
            nbd,
            jobs: blockjob::JobManager::new(
                app.block.clone(),
                Arc::new(move |name: &str, data: Value| events.emit(name, Some(data))),
            ),
        });
        let _ = self.app.set(app);
    }
}

fn mig_err(e: MigrationError) -> QmpError {
    QmpError::generic(e.to_string())
}

impl Dispatcher for Monitor {
    fn commands(&self) -> Vec<String> {
        COMMANDS
            .iter()
            .chain(block::qmp::COMMANDS)
            .chain(nbd::qmp::COMMANDS)
            .chain(blockjob::qmp::COMMANDS)
            .chain(tls::qmp::COMMANDS)
            .map(|s| s.to_string())
            .collect()
    }

    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
        let app = self
            .app
            .get()
            .ok_or_else(|| QmpError::generic("The VM is still starting"))?
            .clone();
        if block::qmp::COMMANDS.contains(&name) {
            let v = Value::Object(args.into_map());
            return match block::qmp::dispatch(&app.block, name, &v) {
                Some(Ok(v)) => Ok(Reply::new(v)),
                Some(Err(e)) => Err(QmpError::generic(e.to_string())),
                None => Err(QmpError::unknown_command(name)),
            };
        }
        if tls::qmp::COMMANDS.contains(&name) {
            return match tls::qmp::dispatch(&app.objects, name, args) {
                Some(r) => r.map(Reply::new),
                None => Err(QmpError::unknown_command(name)),
            };
        }
        if let Some(st) = self.storage.get() {
            if nbd::qmp::COMMANDS.contains(&name) {
                return match nbd::qmp::dispatch(&st.nbd, &app.block, name, args) {
                    Some(Ok(v)) => Ok(Reply::new(v)),
                    Some(Err(e)) => Err(QmpError::generic(e.desc)),
                    None => Err(QmpError::unknown_command(name)),
                };
            }
            if blockjob::qmp::COMMANDS.contains(&name) {
                return match blockjob::qmp::dispatch(&st.jobs, name, args) {
                    Some(Ok(v)) => Ok(Reply::new(v)),
                    Some(Err(e @ blockjob::JobError::NotFound(_))) => {
                        Err(QmpError::device_not_active(e.to_string()))
                    }
                    Some(Err(e)) => Err(QmpError::generic(e.to_string())),
                    None => Err(QmpError::unknown_command(name)),
                };
            }
        }
        match name {
            "query-kvm" => {
                args.finish()?;
                Ok(Reply::new(app.vm.query_kvm()))
            }
            "query-status" => {
                args.finish()?;
                let st = app.vm.runstate();
                Ok(Reply::new(json!({
                    "status": st.as_str(),
                    "singlestep": false,
                    "running": st.is_running(),
                })))
            }
            "stop" => {
                args.finish()?;
                match app.vm.runstate() {
                    RunState::InMigrate => app.mig.set_autostart(false),
                    RunState::Running => app.vm.stop(RunState::Paused),
                    RunState::Prelaunch => app.vm.set_runstate(RunState::Paused),
                    _ => {}
                }
                Ok(Reply::empty())
            }
            "cont" => {
                args.finish()?;
                cont(&app)?;
                Ok(Reply::empty())
            }
            "quit" => {
                args.finish()?;
                app.events.emit(
                    "SHUTDOWN",
                    Some(json!({"guest": false, "reason": "host-qmp-quit"})),
                );
                let (mig, server, block) = (app.mig.clone(), app.server.clone(), app.block.clone());
                Ok(Reply::empty()
                    .after_flush(move || crate::vmproc::shutdown_and_exit(&mig, &server, &block)))
            }
            "migrate" => {
                let mut args = args;
                let uri = args.req_str("uri")?;
                let blk = args.opt_bool("blk")?.unwrap_or(false);
                let inc = args.opt_bool("inc")?.unwrap_or(false);
                let _detach = args.opt_bool("detach")?;
                let resume = args.opt_bool("resume")?.unwrap_or(false);
                args.finish()?;
                if blk || inc {
                    return Err(QmpError::generic(
                        "Block migration (blk/inc) is not supported; use blockdev-mirror with an NBD export",
                    ));
                }
                if resume {
                    return Err(QmpError::generic(
                        "Cannot resume if there is no paused migration",
                    ));
                }
                app.mig.migrate(&uri).map_err(mig_err)?;
                Ok(Reply::empty())
            }
            "migrate-incoming" => {
                let mut args = args;
                let uri = args.req_str("uri")?;
                args.finish()?;
                app.mig.incoming(&uri, true).map_err(mig_err)?;
                Ok(Reply::empty())
            }
            "migrate_cancel" => {
                args.finish()?;
                app.mig.cancel().map_err(mig_err)?;
                Ok(Reply::empty())
            }
            "migrate-start-postcopy" => {
                args.finish()?;
                app.mig.start_postcopy().map_err(mig_err)?;
                Ok(Reply::empty())
            }
            "migrate-continue" => {
                let mut args = args;
                let state = args.req_str("state")?;
                args.finish()?;
                app.mig.continue_(&state).map_err(mig_err)?;
                Ok(Reply::empty())
            }
            "migrate-set-capabilities" => {
                let mut args = args;
                let list = args.req_list("capabilities")?;
                args.finish()?;
                let mut changes = Vec::new();
                for p in list {
                    let mut o = p.into_object()?;
                    let cap = o.req_str("capability")?;
                    let state = o.req_bool("state")?;
                    o.finish()?;
                    changes.push((Capability::parse(&cap).map_err(mig_err)?, state));
                }
                app.mig.set_capabilities(&changes).map_err(mig_err)?;
                Ok(Reply::empty())
            }
            "query-migrate-capabilities" => {
                args.finish()?;
                let v: Vec<Value> = app
                    .mig
                    .capabilities()
                    .into_iter()
                    .map(|(c, s)| json!({"capability": c.as_str(), "state": s}))
                    .collect();
                Ok(Reply::new(Value::Array(v)))
            }
            "migrate-set-parameters" => {
                app.mig.set_parameters(&args.into_map()).map_err(mig_err)?;
                Ok(Reply::empty())
            }
            "query-migrate-parameters" => {
                args.finish()?;
                Ok(Reply::new(app.mig.parameters()))
            }
            "query-migrate" => {
                args.finish()?;
                Ok(Reply::new(app.mig.query()))
            }
            "human-monitor-command" => {
                let mut args = args;
                let line = args.req_str("command-line")?;
                let _cpu: Option<i64> = args.opt_int("cpu-index")?;
                args.finish()?;
                Ok(Reply::new(Value::String(hmp(&app, &line))))
            }
            "pmemsave" => {
                let mut args = args;
                let val: u64 = args.req_int("val")?;
                let size: u64 = args.req_int("size")?;
                let filename = args.req_str("filename")?;
                args.finish()?;
                pmemsave(&app, val, size, &filename)?;
                Ok(Reply::empty())
            }
            "x-livemig-ram-checksum" => {
                args.finish()?;
                Ok(Reply::new(json!({ "checksum": app.vm.ram_checksum() })))
            }
            "x-livemig-verify-ram" => {
                args.finish()?;
                let r = app.vm.verify_ram();
                Ok(Reply::new(json!({
                    "valid": r.valid,
                    "zero": r.zero,
                    "corrupt": r.corrupt_count,
                    "corrupt-pages": r.corrupt,
                })))
            }
            "x-livemig-verify-disk" => {
                args.finish()?;
                if app.vm.runstate() == RunState::Running {
                    return Err(QmpError::generic(
                        "x-livemig-verify-disk needs a stopped guest (its requests must be settled)",
                    ));
                }
                let r = app.vm.verify_disk().map_err(QmpError::generic)?;
                Ok(Reply::new(json!({
                    "blocks": r.blocks,
                    "written": r.written,
                    "mismatched": r.mismatch_count,
                    "mismatched-blocks": r.mismatched,
                    "submitted": r.submitted,
                    "completed": r.completed,
                })))
            }
            "x-livemig-query-vm" => {
                args.finish()?;
                Ok(Reply::new(query_vm(&app)))
            }
            _ => Err(QmpError::unknown_command(name)),
        }
    }
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
            app.vm
                .activate_disks()
                .map_err(|e| QmpError::generic(e.to_string()))?;
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

/// The human monitor: the commands tests and people use.
fn hmp(app: &App, line: &str) -> String {
    let words = split_hmp(line);
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    match w.as_slice() {
        ["info", "status"] => {
            let st = app.vm.runstate();
            match st {
                RunState::Running => "VM status: running\r\n".into(),
                RunState::Paused => "VM status: paused\r\n".into(),
                other => format!("VM status: paused ({other})\r\n"),
            }
        }
        ["info", "migrate"] => info_migrate(&app.mig.query()),
        ["info", "migrate_capabilities"] => app
            .mig
            .capabilities()
            .into_iter()
            .map(|(c, s)| format!("{c}: {}\r\n", if s { "on" } else { "off" }))
            .collect(),
        ["qemu-io", rest @ ..] => {
            let mut rest: Vec<&str> = rest.to_vec();
            while rest.first().is_some_and(|a| *a == "-d" || *a == "-q") {
                rest.remove(0);
            }
            match rest.as_slice() {
                [node, cmd] => match block::qemu_io::run(&app.block, node, cmd) {
                    Ok(out) => out.replace('\n', "\r\n"),
                    Err(e) => format!("{e}\r\n"),
                },
                _ => "qemu-io: usage: qemu-io [-d] [-q] device \"command\"\r\n".into(),
            }
        }
        ["info"] => INFO_HELP
            .iter()
            .map(|(sub, help)| format!("info {sub}  -- {help}\r\n"))
            .collect(),
        ["info", sub, _, ..] if INFO_HELP.iter().any(|(s, _)| s == sub) => format!(
            "{sub}: extraneous characters at the end of line\r\n\
             Try \"help info {sub}\" for more information\r\n"
        ),
        ["info", sub, ..] => format!("unknown command: 'info {sub}'\r\n"),
        [] => String::new(),
        [cmd, ..] => format!("unknown command: '{cmd}'\r\n"),
    }
}

/// The `info` subcommands this monitor has, with QEMU 7.2's help lines.
const INFO_HELP: &[(&str, &str)] = &[
    ("migrate", "show migration status"),
    (
        "migrate_capabilities",
        "show current migration capabilities",
    ),
    ("status", "show the current VM status (running|paused)"),
];

/// Splits an HMP line into words, honouring double quotes (as `qemu-io dev "write 0 4k"`).
fn split_hmp(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

fn info_migrate(q: &Value) -> String {
    let mut s = String::from(
        "globals:\r\nstore-global-state: on\r\nonly-migratable: off\r\nsend-configuration: on\r\nsend-section-footer: on\r\ndecompress-error-check: on\r\nclear-bitmap-shift: 18\r\n",
    );
    let Some(st) = q.get("status").and_then(Value::as_str) else {
        return s;
    };
    s.push_str(&format!("Migration status: {st}"));
    if let Some(e) = q.get("error-desc").and_then(Value::as_str) {
        s.push_str(&format!(" ({e})"));
    }
    s.push_str("\r\n");
    let num = |k: &str| q.get(k).and_then(Value::as_u64);
    if let Some(t) = num("total-time") {
        s.push_str(&format!("total time: {t} ms\r\n"));
    }
    if let Some(t) = num("expected-downtime") {
        s.push_str(&format!("expected downtime: {t} ms\r\n"));
    }
    if let Some(t) = num("downtime") {
        s.push_str(&format!("downtime: {t} ms\r\n"));
    }
    if let Some(t) = num("setup-time") {
        s.push_str(&format!("setup: {t} ms\r\n"));
    }
    if let Some(r) = q.get("ram") {
        let n = |k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
        s.push_str(&format!(
            "transferred ram: {} kbytes\r\n",
            n("transferred") >> 10
        ));
        s.push_str(&format!(
            "throughput: {:.2} mbps\r\n",
            r.get("mbps").and_then(Value::as_f64).unwrap_or(0.0)
        ));
        s.push_str(&format!(
            "remaining ram: {} kbytes\r\n",
            n("remaining") >> 10
        ));
        s.push_str(&format!("total ram: {} kbytes\r\n", n("total") >> 10));
        s.push_str(&format!("duplicate: {} pages\r\n", n("duplicate")));
        s.push_str(&format!("skipped: {} pages\r\n", n("skipped")));
        s.push_str(&format!("normal: {} pages\r\n", n("normal")));
        s.push_str(&format!(
            "normal bytes: {} kbytes\r\n",
            n("normal-bytes") >> 10
        ));
        s.push_str(&format!("dirty sync count: {}\r\n", n("dirty-sync-count")));
        s.push_str(&format!("page size: {} kbytes\r\n", n("page-size") >> 10));
        s.push_str(&format!(
            "multifd bytes: {} kbytes\r\n",
            n("multifd-bytes") >> 10
        ));
        s.push_str(&format!("pages-per-second: {}\r\n", n("pages-per-second")));
        // As QEMU 7.2: the rate only while active, the byte splits only when non-zero.
        if st == "active" && n("dirty-pages-rate") > 0 {
            s.push_str(&format!(
                "dirty pages rate: {} pages\r\n",
                n("dirty-pages-rate")
            ));
        }
        for (key, label) in [
            ("precopy-bytes", "precopy ram"),
            ("downtime-bytes", "downtime ram"),
            ("postcopy-bytes", "postcopy ram"),
        ] {
            if n(key) > 0 {
                s.push_str(&format!("{label}: {} kbytes\r\n", n(key) >> 10));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmp_words_honour_quotes() {
        assert_eq!(
            split_hmp(r#"qemu-io node0 "write -P 0x5a 0 64k""#),
            vec!["qemu-io", "node0", "write -P 0x5a 0 64k"]
        );
        assert_eq!(split_hmp("  info   status "), vec!["info", "status"]);
        assert_eq!(split_hmp(r#"x """#), vec!["x", ""]);
    }

    #[test]
    fn info_migrate_shows_status_and_error() {
        let s = info_migrate(&json!({"status": "failed", "error-desc": "boom", "total-time": 0}));
        assert!(s.contains("Migration status: failed (boom)\r\n"), "{s}");
        assert!(s.contains("total time: 0 ms"), "{s}");
        assert!(info_migrate(&json!({})).starts_with("globals:"));
    }
}
