//! The destination side: accept the channel, load the stream, resume the guest.
//!
//! The loader is the stream's only consumer of untrusted bytes that changes VM state, so every
//! step checks before it acts: the configuration must name a compatible machine, every section
//! must belong to a known handler and version, every PART/END must follow its START, every
//! section must end with its footer. A bad stream fails the incoming migration with an error
//! naming what and where; the process keeps serving QMP, and the guest is never started from a
//! half-loaded state (QEMU would exit the process instead).
//!
//! Device state is loaded inside one memory-map batch ([`Machine::begin_device_load`]), so the
//! downtime spent rebuilding the map does not grow with the number of devices (seed 003).

use crate::bitmaps::{BitmapLoader, BITMAP_IDSTR, BITMAP_VERSION};
use crate::caps::Capabilities;
use crate::error::MigrationError;
use crate::globalstate::{GlobalState, GLOBALSTATE_IDSTR};
use crate::machine::{DeviceState, Machine, Reader};
use crate::params::Parameters;
use crate::ram::{RamLoader, RAM_IDSTR, RAM_VERSION};
use crate::runstate::RunState;
use crate::state::Shared;
use crate::status::MigrationStatus;
use crate::transport::{BoxWrite, Listener};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use wire::command::Command;
use wire::config::{check_machine_name, read_configuration};
use wire::return_path::{write_rp_message, RpMessage};
use wire::section::{read_file_header, read_footer, read_vmdesc};
use wire::{read_item, Item, SectionContext, SectionHeader, StreamReader, StreamWriter};

/// Everything the incoming thread needs.
pub(crate) struct Job {
    pub shared: Arc<Shared>,
    pub machine: Arc<dyn Machine>,
    pub listener: Listener,
}

/// Which handler a section id belongs to.
#[derive(Clone)]
enum Handler {
    Ram,
    Bitmaps,
    Device(Arc<dyn DeviceState>),
}

/// Loads a whole stream into `machine`. Public so that fuzzing and tests can drive the loader
/// without sockets.
pub struct StreamLoader {
    machine: Arc<dyn Machine>,
    ram: RamLoader,
    bitmaps: Option<BitmapLoader>,
    globalstate: Arc<GlobalState>,
    devices: HashMap<(String, u32), Arc<dyn DeviceState>>,
    sections: HashMap<u32, (Handler, String)>,
    return_path: Option<StreamWriter<BoxWrite>>,
    device_load_started: bool,
    /// Warnings worth showing an operator (a missing trailer, a dropped bitmap).
    pub warnings: Vec<String>,
}

impl StreamLoader {
    /// A loader for `machine`. `return_path` is where PONG/SHUT go if the source opens one.
    /// `_caps` are this end's capabilities: none that livemig implements changes how a stream
    /// loads — like QEMU's, the loader takes a `dirty-bitmap` section whether or not
    /// `dirty-bitmaps` is on here (a destination started with `-incoming file:...` has no
    /// chance to turn it on).
    pub fn new(
        machine: Arc<dyn Machine>,
        _caps: &Capabilities,
        params: &Parameters,
        return_path: Option<BoxWrite>,
    ) -> Self {
        let globalstate = Arc::new(GlobalState::default());
        let mut devices: HashMap<(String, u32), Arc<dyn DeviceState>> = HashMap::new();
        for d in machine.devices() {
            devices.insert((d.idstr(), d.instance_id()), d);
        }
        devices.insert((GLOBALSTATE_IDSTR.to_string(), 0), globalstate.clone());
        let bitmaps = machine
            .block_layer()
            .map(|l| BitmapLoader::new(l, params.block_bitmap_mapping.clone()));
        StreamLoader {
            ram: RamLoader::new(machine.ram_blocks()),
            machine,
            bitmaps,
            globalstate,
            devices,
            sections: HashMap::new(),
            return_path: return_path.map(StreamWriter::new),
            device_load_started: false,
            warnings: Vec::new(),
        }
    }

    /// The run state the source sent in `globalstate`, if it did.
    pub fn received_runstate(&self) -> Option<RunState> {
        self.globalstate.received()
    }

    /// Pages loaded so far.
    pub fn pages_loaded(&self) -> u64 {
        self.ram.pages_loaded
    }

    fn handler_for(
        &self,
        idstr: &str,
        instance_id: u32,
        version_id: u32,
    ) -> Result<Handler, MigrationError> {
        let bad_version = |local: u32| {
            MigrationError::Load(format!(
                "savevm: unsupported version {version_id} for '{idstr}' v{local}"
            ))
        };
        match (idstr, instance_id) {
            (RAM_IDSTR, 0) => {
                if version_id != RAM_VERSION {
                    return Err(bad_version(RAM_VERSION));
                }
                Ok(Handler::Ram)
            }
            (BITMAP_IDSTR, 0) => {
                if version_id != BITMAP_VERSION {
                    return Err(bad_version(BITMAP_VERSION));
                }
                if self.bitmaps.is_none() {
                    return Err(MigrationError::Load(
                        "dirty-bitmap section received but this machine has no block layer".into(),
                    ));
                }
                Ok(Handler::Bitmaps)
            }
            _ => {
                let d = self
                    .devices
                    .get(&(idstr.to_string(), instance_id))
                    .ok_or_else(|| {
                        MigrationError::Load(format!(
                            "Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that your current VM setup matches your saved VM setup, including any hotplugged devices"
                        ))
                    })?;
                let vmsd = d.vmsd();
                if version_id > vmsd.version_id {
                    return Err(bad_version(vmsd.version_id));
                }
                if version_id < vmsd.minimum_version_id {
                    return Err(MigrationError::Load(format!(
                        "{idstr}: incoming version_id {version_id} is too old for local minimum version_id {}",
                        vmsd.minimum_version_id
                    )));
                }
                Ok(Handler::Device(d.clone()))
            }
        }
    }

    /// Reads the header and configuration.
    pub fn load_header(&mut self, r: &mut Reader) -> Result<(), MigrationError> {
        read_file_header(r)?;
        let cfg = read_configuration(r)?;
        check_machine_name(&cfg.machine, &self.machine.machine_type())
            .map_err(|k| MigrationError::Wire(r.error(k)))?;
        if let Some(caps) = &cfg.capabilities {
            if let Some(c) = caps.first() {
                return Err(MigrationError::Load(format!(
                    "Capability {c} is off, but received capability is on"
                )));
            }
        }
        Ok(())
    }

    /// Loads sections and commands up to EOF, then reads the trailer.
    pub fn load_body(&mut self, r: &mut Reader) -> Result<(), MigrationError> {
        let result = self.load_items(r);
        if self.device_load_started {
            self.machine.end_device_load();
            self.device_load_started = false;
        }
        result?;
        match read_vmdesc(r) {
            Ok(t) => {
                if let Some(w) = t.warning() {
                    self.warnings.push(w);
                }
            }
            // QEMU only warns about a bad trailer; the state is loaded.
            Err(e) => self.warnings.push(format!("vmdesc trailer: {e}")),
        }
        Ok(())
    }

    fn load_items(&mut self, r: &mut Reader) -> Result<(), MigrationError> {
        loop {
            match read_item(r)? {
                Item::Eof => return Ok(()),
                Item::Command(cmd) => self.command(r, cmd)?,
                Item::Section(h) => {
                    let id = h.section_id();
                    let (handler, idstr) = match &h {
                        SectionHeader::Start(s) | SectionHeader::Full(s) => {
                            let handler = self.handler_for(&s.idstr, s.instance_id, s.version_id)?;
                            self.sections.insert(id, (handler.clone(), s.idstr.clone()));
                            (handler, s.idstr.clone())
                        }
                        SectionHeader::Part { .. } | SectionHeader::End { .. } => self
                            .sections
                            .get(&id)
                            .cloned()
                            .ok_or_else(|| {
                                MigrationError::Load(format!(
                                    "at byte {:#x}: {} section id {id} does not follow a START section",
                                    r.offset(),
                                    h.kind().name()
                                ))
                            })?,
                    };
                    r.set_section(Some(SectionContext::new(idstr, id)));
                    match handler {
                        Handler::Ram => self.ram.load(r)?,
                        Handler::Bitmaps => {
                            if let Some(b) = self.bitmaps.as_mut() {
                                b.load(r)?;
                            }
                        }
                        Handler::Device(d) => {
                            if !self.device_load_started {
                                self.machine.begin_device_load();
                                self.device_load_started = true;
                            }
                            let version = h.start().map_or(0, |s| s.version_id);
                            d.load(r, version)?;
                        }
                    }
                    read_footer(r, id)?;
                    r.set_section(None);
                }
            }
        }
    }

    fn command(&mut self, r: &Reader, cmd: Command) -> Result<(), MigrationError> {
        match cmd {
            Command::OpenReturnPath => {
                if self.return_path.is_none() {
                    self.warnings
                        .push("OPEN_RETURN_PATH on a transport without a return path; ignored".into());
                }
                Ok(())
            }
            Command::Ping(v) => match self.return_path.as_mut() {
                Some(w) => {
                    write_rp_message(w, &RpMessage::Pong(v))?;
                    w.flush()?;
                    Ok(())
                }
                None => Err(MigrationError::Load("CMD_PING (0x2) received with no return path".into())),
            },
            // 0-byte advise: dirty bitmaps are postcopiable; nothing to prepare in precopy.
            Command::PostcopyAdvise(None) | Command::SwitchoverStart => Ok(()),
            other => Err(MigrationError::Load(format!(
                "at byte {:#x}: migration command {} is not supported by livemig (postcopy and COLO are not implemented)",
                r.offset(),
                other.name()
            ))),
        }
    }

    /// Sends SHUT on the return path, if there is one.
    pub fn shut(&mut self, status: u32) {
        if let Some(w) = self.return_path.as_mut() {
            let _ = write_rp_message(w, &RpMessage::Shut(status)).and_then(|_| w.flush());
        }
    }

    /// What the destination does once the stream is loaded: take the disks, enable migrated
    /// bitmaps.
    pub fn finish(&mut self) -> Result<(), MigrationError> {
        self.machine.activate_disks()?;
        if let Some(b) = self.bitmaps.as_mut() {
            let warnings = b.before_vm_start();
            self.warnings.extend(warnings);
        }
        Ok(())
    }

    /// Drops what a failed load left behind (incoming bitmaps), so nothing stays half-made.
    pub fn abandon(&mut self) {
        if let Some(b) = self.bitmaps.as_mut() {
            b.cancel("the incoming migration failed");
        }
    }
}

/// Runs one incoming migration to its end.
pub(crate) fn run(job: Job) {
    let shared = job.shared.clone();
    let started = Instant::now();
    let conn = job.listener.accept();
    {
        let mut inner = shared.lock();
        inner.inc.started = Some(started);
    }
    let mut conn = match conn {
        Ok(c) => c,
        Err(e) => {
            fail(&shared, e.to_string(), started);
            return;
        }
    };
    if let Err(e) = shared.attach_incoming_channel(&conn.shutdown) {
        fail(&shared, e.to_string(), started);
        return;
    }
    if let Err(e) = shared.advance_incoming(MigrationStatus::Setup) {
        conn.shutdown.shutdown();
        fail(&shared, e.to_string(), started);
        return;
    }
    let Some(stream) = conn.reader.take() else {
        fail(
            &shared,
            "the transport has no incoming direction".into(),
            started,
        );
        return;
    };
    let mut r: Reader = StreamReader::with_capacity(stream, 256 * 1024);
    // Capabilities and parameters as they are when the source connects: management sets them
    // after `-incoming`, before it starts the source (QEMU reads them at load time too).
    let (caps, params) = {
        let inner = shared.lock();
        (inner.caps.clone(), inner.params.clone())
    };
    let mut loader = StreamLoader::new(job.machine.clone(), &caps, &params, conn.writer.take());
    let result = shared
        .advance_incoming(MigrationStatus::Active)
        .map_err(MigrationError::from)
        .and_then(|_| loader.load_header(&mut r))
        .and_then(|_| loader.load_body(&mut r))
        .and_then(|_| loader.finish());
    for w in &loader.warnings {
        log::warn!("incoming migration: {w}");
    }
    {
        let mut inner = shared.lock();
        inner.inc.pages_loaded = loader.pages_loaded();
        inner.inc.warnings = loader.warnings.clone();
    }
    match result {
        Ok(()) => {
            let _ = conn.finish();
            let runstate = loader.received_runstate().unwrap_or(RunState::Running);
            {
                let mut inner = shared.lock();
                inner.inc.total_ms = Some(started.elapsed().as_millis() as u64);
            }
            // The run state first, then `completed` (QEMU's order): whoever sees the
            // migration completed also sees the guest running, or paused with -S.
            let autostart = shared.lock().autostart;
            if runstate == RunState::Running && autostart {
                job.machine.start();
            } else if runstate == RunState::Running {
                job.machine.set_runstate(RunState::Paused);
            } else {
                job.machine.set_runstate(runstate);
            }
            if let Err(e) = shared.advance_incoming(MigrationStatus::Completed) {
                fail(&shared, e.to_string(), started);
                return;
            }
            loader.shut(0);
        }
        Err(e) => {
            loader.abandon();
            loader.shut(1);
            conn.shutdown.shutdown();
            fail(&shared, e.to_string(), started);
        }
    }
}

fn fail(shared: &Shared, error: String, started: Instant) {
    log::error!("incoming migration failed: {error}");
    shared.fail_incoming(error, started);
}
