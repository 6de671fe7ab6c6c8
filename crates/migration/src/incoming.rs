//! The destination side: accept the channel, load the stream, resume the guest.
//!
//! The loader is the stream's only consumer of untrusted bytes that changes VM state, so every
//! step checks before it acts: the configuration must name a compatible machine, every section
//! must belong to a known handler and version, every PART/END must follow its START, every
//! section must end with its footer. A bad stream fails the incoming migration with an error
//! naming what and where; the process keeps serving QMP, and the guest is never started from a
//! half-loaded state (QEMU would exit the process instead).
//!
//! At EOF the stream must be whole: every iterable section it started (`ram`, `dirty-bitmap`)
//! has ended, and every device section the machine requires
//! ([`DeviceState::required_on_load`]) has been loaded — QEMU completes such a stream with a
//! warning at most and runs the guest from whatever its devices held.
//!
//! Where QEMU 7.2 refuses a stream, so does the loader: a second POSTCOPY_ADVISE ("in wrong
//! postcopy state (1)"), RAM flag 0x200 (QEMU 8.1's multifd flush, "Unknown combination of
//! migration flags"). One deliberate exception: SWITCHOVER_START (command 11, QEMU 10.0+,
//! which 7.2 refuses as unknown) is accepted and does nothing, so that newer QEMU sources,
//! which send it by default, can migrate to livemig; it carries no state.
//!
//! Device state is loaded inside one memory-map batch ([`Machine::begin_device_load`]), so the
//! downtime spent rebuilding the map does not grow with the number of devices (seed 003).

use crate::bitmaps::{BitmapLoader, BITMAP_IDSTR, BITMAP_VERSION};
use crate::caps::{Capabilities, Capability};
use crate::error::MigrationError;
use crate::globalstate::{GlobalState, GLOBALSTATE_IDSTR};
use crate::machine::{DeviceState, Machine, Reader};
use crate::params::Parameters;
use crate::postcopy::fault::{Control, FaultThread, RpWriter};
use crate::postcopy::PostcopyRam;
use crate::ram::{RamLoader, RAM_IDSTR, RAM_VERSION};
use crate::runstate::RunState;
use crate::state::Shared;
use crate::status::MigrationStatus;
use crate::transport::{BoxWrite, Listener, ShutdownHandle};
use std::collections::{HashMap, HashSet};
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
    /// Where `tls-creds` and `tls-authz` are looked up.
    pub objects: Arc<tls::Objects>,
    /// What the VMM does when the load fails ([`crate::LoadFailureHook`]).
    pub on_load_failure: Option<crate::LoadFailureHook>,
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
    /// OPEN_RETURN_PATH was received: PONG and SHUT go back from then on, not before (QEMU's
    /// `to_src_file`). Over `exec:` the channel always has a way back (the command's stdin),
    /// which a source without a return path never reads.
    rp_opened: bool,
    device_load_started: bool,
    /// Warnings worth showing an operator (a missing trailer, a dropped bitmap).
    pub warnings: Vec<String>,
    /// This end's `postcopy-ram` (the ADVISE length must match it).
    postcopy_ram: bool,
    /// This end's `postcopy-blocktime`.
    postcopy_blocktime: bool,
    /// Guest RAM in postcopy, from ADVISE (16 bytes) on.
    postcopy: Option<Arc<PostcopyRam>>,
    /// The return path once postcopy handed it back (for SHUT).
    postcopy_rp: Option<RpWriter>,
    /// RUN was handled: disks activated, the guest started (or left paused).
    postcopy_ran: bool,
    /// A POSTCOPY_ADVISE was seen (of either length): QEMU's postcopy state left `none`, and
    /// a second ADVISE is refused as QEMU refuses it.
    advised: bool,
    /// Iterable sections started and not yet ended (id → idstr): the stream must end them all
    /// before EOF.
    open_sections: HashMap<u32, String>,
    /// The `ram` section was started.
    ram_started: bool,
    /// Device sections loaded, by (idstr, instance): every one the machine requires must be
    /// among them at EOF.
    loaded: HashSet<(String, u32)>,
    /// The engine's state and the channel's shutdown handle, when run by the engine (postcopy
    /// moves the state and, on a failure, must unblock its listen thread).
    engine: Option<(Arc<Shared>, ShutdownHandle)>,
    /// The `postcopy-preempt` channel (the second connection), read from LISTEN on.
    preempt: Option<(Reader, ShutdownHandle)>,
    /// Where `tls-creds` are looked up for a postcopy recovery's connections.
    objects: Arc<tls::Objects>,
    /// `x-livemig-integrity` is on here: the source must have it on too, and every batch of
    /// RAM records and every bitmap chunk is checked against its digest.
    integrity: bool,
}

/// Whether loading goes on after a command.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    /// Postcopy ran to the end: EOF was read by the listen thread.
    Done,
}

impl StreamLoader {
    /// A loader for `machine`. `return_path` is where PONG/SHUT go if the source opens one.
    /// `caps` are this end's capabilities: only `postcopy-ram` changes how a stream loads (the
    /// ADVISE length must match it) — like QEMU's, the loader takes a `dirty-bitmap` section
    /// whether or not `dirty-bitmaps` is on here (a destination started with
    /// `-incoming file:...` has no chance to turn it on).
    pub fn new(
        machine: Arc<dyn Machine>,
        caps: &Capabilities,
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
            rp_opened: false,
            device_load_started: false,
            warnings: Vec::new(),
            postcopy_ram: caps.has(Capability::PostcopyRam),
            postcopy_blocktime: caps.has(Capability::PostcopyBlocktime),
            postcopy: None,
            postcopy_rp: None,
            postcopy_ran: false,
            advised: false,
            open_sections: HashMap::new(),
            ram_started: false,
            loaded: HashSet::new(),
            engine: None,
            preempt: None,
            objects: Arc::new(tls::Objects::new()),
            integrity: caps.has(Capability::XLivemigIntegrity),
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
            _ => Ok(Handler::Device(device_for(
                &self.devices,
                idstr,
                instance_id,
                version_id,
            )?)),
        }
    }

    /// Reads the header and configuration.
    pub fn load_header(&mut self, r: &mut Reader) -> Result<(), MigrationError> {
        read_file_header(r)?;
        let cfg = read_configuration(r)?;
        check_machine_name(&cfg.machine, &self.machine.machine_type())
            .map_err(|k| MigrationError::Wire(r.error(k)))?;
        // QEMU's configuration_validate_capabilities: a validated capability must be on at
        // both ends or at neither.
        let received = cfg.capabilities.unwrap_or_default();
        let integrity = Capability::XLivemigIntegrity.as_str();
        if let Some(c) = received
            .iter()
            .find(|c| c.as_str() != integrity || !self.integrity)
        {
            return Err(MigrationError::Load(format!(
                "Capability {c} is off, but received capability is on"
            )));
        }
        if self.integrity && !received.iter().any(|c| c == integrity) {
            return Err(MigrationError::Load(format!(
                "Capability {integrity} is on, but received capability is off"
            )));
        }
        self.ram.set_integrity(self.integrity);
        if let Some(b) = self.bitmaps.as_mut() {
            b.set_integrity(self.integrity);
        }
        Ok(())
    }

    /// Loads sections and commands up to EOF, then reads the trailer.
    pub fn load_body(&mut self, r: &mut Reader) -> Result<(), MigrationError> {
        let result = self.load_items(r);
        let ended = if self.device_load_started {
            self.device_load_started = false;
            self.machine.end_device_load()
        } else {
            Ok(())
        };
        result?;
        ended?;
        if self.postcopy_ran {
            // A postcopy stream ends at EOF, without a vmdesc trailer.
            return Ok(());
        }
        self.check_complete()?;
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

    /// At EOF: every iterable section that was started has ended, the `ram` section came,
    /// and every device section the machine requires was loaded. QEMU completes such a
    /// stream with a warning at most ("Expected vmdescription section") and runs the guest
    /// from whatever state its devices had; livemig fails it, naming what is missing.
    fn check_complete(&self) -> Result<(), MigrationError> {
        check_sections_ended(&self.open_sections)?;
        if !self.ram_started && !self.machine.ram_blocks().is_empty() {
            return Err(MigrationError::Load(
                "the stream ended (EOF) without a 'ram' section: the guest's memory never arrived"
                    .into(),
            ));
        }
        check_devices_loaded(&self.devices, &self.loaded)
    }

    fn load_items(&mut self, r: &mut Reader) -> Result<(), MigrationError> {
        loop {
            match read_item(r)? {
                Item::Eof => return Ok(()),
                Item::Command(Command::Packaged(data)) => {
                    if self.load_package(r, data)? == Flow::Done {
                        return Ok(());
                    }
                }
                Item::Command(cmd) => self.command(r, cmd)?,
                Item::Section(h) => self.load_section(r, h)?,
            }
        }
    }

    /// One section: its handler loads the body, then the footer is checked.
    fn load_section(&mut self, r: &mut Reader, h: SectionHeader) -> Result<(), MigrationError> {
        let id = h.section_id();
        let (handler, idstr) = match &h {
            SectionHeader::Start(s) | SectionHeader::Full(s) => {
                let handler = self.handler_for(&s.idstr, s.instance_id, s.version_id)?;
                self.sections.insert(id, (handler.clone(), s.idstr.clone()));
                match (&h, &handler) {
                    (SectionHeader::Start(_), Handler::Ram) => {
                        self.ram_started = true;
                        self.open_sections.insert(id, s.idstr.clone());
                    }
                    (SectionHeader::Start(_), _) => {
                        self.open_sections.insert(id, s.idstr.clone());
                    }
                    _ => {
                        self.loaded.insert((s.idstr.clone(), s.instance_id));
                    }
                }
                (handler, s.idstr.clone())
            }
            SectionHeader::Part { .. } | SectionHeader::End { .. } => {
                self.sections.get(&id).cloned().ok_or_else(|| {
                    MigrationError::Load(format!(
                        "at byte {:#x}: {} section id {id} does not follow a START section",
                        r.offset(),
                        h.kind().name()
                    ))
                })?
            }
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
        if h.kind() == wire::SectionKind::End {
            self.open_sections.remove(&id);
        }
        Ok(())
    }

    fn command(&mut self, r: &Reader, cmd: Command) -> Result<(), MigrationError> {
        match cmd {
            Command::OpenReturnPath => {
                if self.return_path.is_none() {
                    self.warnings
                        .push("OPEN_RETURN_PATH on a transport without a return path; ignored".into());
                }
                self.rp_opened = true;
                Ok(())
            }
            Command::Ping(v) => match self.return_path.as_mut().filter(|_| self.rp_opened) {
                Some(w) => {
                    write_rp_message(w, &RpMessage::Pong(v))?;
                    w.flush()?;
                    Ok(())
                }
                None => Err(MigrationError::Load("CMD_PING (0x2) received with no return path".into())),
            },
            // QEMU moves its postcopy state to ADVISE before it looks at the length, so any
            // second ADVISE is refused, whatever the lengths.
            Command::PostcopyAdvise(_) if self.advised => Err(MigrationError::Load(
                "CMD_POSTCOPY_ADVISE in wrong postcopy state (1)".into(),
            )),
            // 0-byte advise: dirty bitmaps are postcopiable; nothing to prepare in precopy.
            Command::PostcopyAdvise(None) => {
                self.advised = true;
                if self.postcopy_ram {
                    return Err(MigrationError::Load(
                        "RAM postcopy is enabled but have 0 byte advise".into(),
                    ));
                }
                Ok(())
            }
            Command::SwitchoverStart => Ok(()),
            Command::PostcopyAdvise(Some(a)) => {
                self.advised = true;
                self.advise(a)
            }
            Command::PostcopyRamDiscard { ramblock, ranges } => {
                let pc = self.postcopy.as_ref().ok_or_else(|| {
                    MigrationError::Load(
                        "CMD_POSTCOPY_RAM_DISCARD in wrong postcopy state (0)".into(),
                    )
                })?;
                for range in &ranges {
                    pc.discard(&ramblock, range)
                        .map_err(|e| MigrationError::Load(e.to_string()))?;
                }
                Ok(())
            }
            Command::PostcopyListen | Command::PostcopyRun => Err(MigrationError::Load(format!(
                "at byte {:#x}: {} outside a PACKAGED command is not supported by livemig",
                r.offset(),
                cmd.name()
            ))),
            other => Err(MigrationError::Load(format!(
                "at byte {:#x}: migration command {} is not supported by livemig (COLO is not implemented)",
                r.offset(),
                other.name()
            ))),
        }
    }

    /// POSTCOPY_ADVISE with page sizes (`loadvm_postcopy_handle_advise`): the capability must
    /// be on here too, the host must be able to do postcopy, the page sizes must match; then
    /// all of RAM is thrown away and pages from here on are tracked as received.
    fn advise(&mut self, a: wire::command::PostcopyAdvise) -> Result<(), MigrationError> {
        if !self.postcopy_ram {
            return Err(MigrationError::Load(
                "RAM postcopy is disabled but have 16 byte advise".into(),
            ));
        }
        if self.postcopy.is_some() {
            return Err(MigrationError::Load(
                "CMD_POSTCOPY_ADVISE in wrong postcopy state (1)".into(),
            ));
        }
        let pe = |e: crate::postcopy::PostcopyError| MigrationError::Load(e.to_string());
        crate::postcopy::uffd::probe().map_err(pe)?;
        let local = crate::guest::PAGE_SIZE;
        if a.ram_pagesize_summary != local {
            return Err(MigrationError::Load(format!(
                "Postcopy needs matching RAM page sizes (s={:x} d={local:x})",
                a.ram_pagesize_summary
            )));
        }
        if a.target_page_size != local {
            return Err(MigrationError::Load(format!(
                "Postcopy needs matching target page sizes (s={} d={local})",
                a.target_page_size
            )));
        }
        let fd = crate::postcopy::uffd::PostcopyFd::open().map_err(pe)?;
        let tids = self.machine.vcpu_thread_ids();
        let pc = Arc::new(PostcopyRam::from_blocks(
            self.machine.ram_blocks(),
            Some(fd),
            self.postcopy_blocktime.then_some(&tids[..]),
        ));
        if let Some((shared, _)) = &self.engine {
            shared.lock().inc.postcopy = Some(pc.clone());
        }
        pc.discard_all().map_err(pe)?;
        self.ram.set_postcopy(pc.clone());
        self.postcopy = Some(pc);
        Ok(())
    }

    /// A PACKAGED command: its bytes are a stream of their own. Before LISTEN they load as
    /// usual; LISTEN starts postcopy ([`Self::listen_and_run`]).
    fn load_package(&mut self, r: &mut Reader, data: Vec<u8>) -> Result<Flow, MigrationError> {
        let base = r.offset().saturating_sub(data.len() as u64);
        let mut pr: Reader = StreamReader::new(Box::new(std::io::Cursor::new(data)));
        loop {
            match read_item(&mut pr).map_err(|e| package_error(base, e))? {
                // The package ended without RUN: the outer stream goes on (QEMU's nested loop
                // returns at EOF too).
                Item::Eof => return Ok(Flow::Continue),
                Item::Command(Command::PostcopyListen) => return self.listen_and_run(r, pr),
                Item::Command(Command::Packaged(_)) => {
                    return Err(MigrationError::Load("PACKAGED inside PACKAGED".into()))
                }
                Item::Command(cmd) => self.command(&pr, cmd)?,
                Item::Section(h) => self.load_section(&mut pr, h)?,
            }
        }
    }

    /// LISTEN (inside the package): guest RAM is registered with userfaultfd and the fault
    /// thread takes the return path; a listen thread takes over the main channel (RAM pages
    /// from now on) while this thread loads the rest of the package — the device state —
    /// and, at RUN, activates the disks and starts the guest. Returns when the listen thread
    /// has read EOF.
    fn listen_and_run(&mut self, r: &mut Reader, pr: Reader) -> Result<Flow, MigrationError> {
        let pc = match self.postcopy.clone() {
            Some(pc) => pc,
            // A bitmap-only postcopy (0-byte ADVISE, no postcopy-ram): all of RAM is here;
            // guest RAM gets no userfaultfd, and a page after LISTEN is refused.
            None if self.advised && !self.postcopy_ram => {
                let pc = Arc::new(PostcopyRam::from_blocks(
                    self.machine.ram_blocks(),
                    None,
                    None,
                ));
                self.ram.set_postcopy(pc.clone());
                pc
            }
            None => {
                return Err(MigrationError::Load(
                    "CMD_POSTCOPY_LISTEN in wrong postcopy state (0)".into(),
                ))
            }
        };
        let pe = |e: crate::postcopy::PostcopyError| MigrationError::Load(e.to_string());
        pc.register().map_err(pe)?;
        let flow = self.listen_registered(r, pr, &pc);
        if flow.is_err() {
            // Guest RAM leaves userfaultfd on every failure: a vCPU waiting for a page that
            // will never come reads zeros and can be stopped (the VM is failed or shutting
            // down), and nothing that reads guest RAM later waits on a userfaultfd no thread
            // serves any more.
            pc.unregister();
        }
        flow
    }

    /// [`Self::listen_and_run`] once guest RAM is registered (the caller unregisters it if
    /// this fails).
    fn listen_registered(
        &mut self,
        r: &mut Reader,
        mut pr: Reader,
        pc: &Arc<PostcopyRam>,
    ) -> Result<Flow, MigrationError> {
        self.ram.start_listening();
        // (A source that never opened the return path — QEMU's bitmap-only postcopy without
        // `return-path` — gets nothing on it, not even SHUT.)
        let rp = match self.return_path.take().filter(|_| self.rp_opened) {
            Some(w) => Some(RpWriter::new(w.into_inner()?)),
            None => None,
        };
        let fault = FaultThread::spawn(pc.clone(), rp)
            .map_err(|e| MigrationError::io("cannot start the postcopy fault thread", e))?;
        if let Some((_, h)) = &self.engine {
            crate::postcopy::limit_socket_queue(h, false, crate::postcopy::MAIN_CHANNEL_QUEUE);
        }
        if let Some((shared, _)) = &self.engine {
            shared.advance_incoming(MigrationStatus::PostcopyActive)?;
        }
        // Bitmaps that arrived whole (livemig's source sends them before the switch) are
        // enabled now, before any guest write on this side; those still to come (a QEMU
        // source sends them in postcopy) record this side's writes in their successors.
        if let Some(b) = self.bitmaps.as_mut() {
            let w = b.before_vm_start_postcopy();
            self.warnings.extend(w);
        }
        let preempt = self.preempt.take();
        let StreamLoader {
            machine,
            ram,
            bitmaps,
            globalstate,
            devices,
            sections,
            engine,
            device_load_started,
            objects,
            open_sections,
            loaded,
            ..
        } = self;
        let fault_ref = &fault;
        // What RUN came to: None while the package loads, then whether it ran. The listen
        // thread pauses on a failure only once the guest runs here (QEMU's
        // POSTCOPY_INCOMING_RUNNING): before, the migration can still fail cleanly.
        let ran: (std::sync::Mutex<Option<bool>>, std::sync::Condvar) = Default::default();
        let (main, listen) = std::thread::scope(|s| {
            let listen = Listen {
                main: r,
                recovered: None,
                ram,
                bitmaps: bitmaps.as_mut(),
                sections,
                open_sections,
                fault: fault_ref,
                pc,
                engine: engine.as_ref(),
                objects,
                ran: &ran,
                preempt: None,
                recovering: None,
            };
            let listen = std::thread::Builder::new()
                .name("postcopy-listen".into())
                .spawn_scoped(s, move || listen.run(preempt));
            let listen = match listen {
                Ok(h) => h,
                Err(e) => {
                    return (
                        Err(MigrationError::io(
                            "cannot start the postcopy listen thread",
                            e,
                        )),
                        Ok(Ended::Eof),
                    );
                }
            };
            let main = load_package_rest(
                &mut pr,
                &**machine,
                devices,
                globalstate,
                fault_ref,
                device_load_started,
                loaded,
                engine.as_ref().map(|(s, _)| s),
            );
            {
                let mut g = ran.0.lock().unwrap_or_else(|p| p.into_inner());
                *g = Some(main.is_ok());
                ran.1.notify_all();
            }
            if main.is_err() {
                // The listen thread is blocked on the channel: unblock it.
                if let Some((_, h)) = engine.as_ref() {
                    h.shutdown();
                }
            }
            let listen = listen.join().unwrap_or_else(|_| {
                Err(MigrationError::Other(
                    "the postcopy listen thread panicked".into(),
                ))
            });
            (main, listen)
        });
        let ended = if self.device_load_started {
            self.device_load_started = false;
            self.machine.end_device_load()
        } else {
            Ok(())
        };
        let main = main.and(ended);
        self.postcopy_ran = main.is_ok();
        if main.and(listen)? == Ended::Eof {
            // The pages' section must have ended before EOF, as in precopy.
            check_sections_ended(&self.open_sections)?;
        }
        // Everything has arrived: the fault thread hands the return path back (for SHUT) and
        // guest RAM leaves userfaultfd.
        self.postcopy_rp = fault.stop();
        let missing = match pc.uffd() {
            Some(_) => pc.missing_pages(),
            None => 0,
        };
        if missing > 0 {
            self.warnings.push(format!(
                "postcopy ended with {missing} pages never received; they read as zero"
            ));
        }
        pc.unregister();
        Ok(Flow::Done)
    }

    /// Guest RAM in postcopy, from a 16-byte ADVISE on (none in a bitmap-only postcopy): its
    /// received maps and host ranges, for checks after a load (the fuzz harness compares
    /// them with what the kernel has mapped).
    pub fn postcopy_ram(&self) -> Option<&Arc<PostcopyRam>> {
        self.postcopy.as_ref()
    }

    /// Whether the guest was started by a postcopy RUN (the engine must not start it again).
    pub fn postcopy_ran(&self) -> bool {
        self.postcopy_ran
    }

    /// Gives the loader the `postcopy-preempt` channel: requested pages arrive on it in
    /// postcopy, placed by a thread of their own. Public so that fuzzing can drive that
    /// channel without sockets (the engine passes the second accepted connection).
    pub fn set_preempt_channel(
        &mut self,
        reader: crate::transport::BoxRead,
        shutdown: ShutdownHandle,
    ) {
        self.preempt = Some((StreamReader::with_capacity(reader, 64 * 1024), shutdown));
    }

    /// Pages also come over multifd channels, which meet the loader at `sync`.
    pub fn set_multifd(&mut self, sync: Arc<crate::multifd::recv::SyncPoint>) {
        self.ram.set_multifd(sync);
    }

    /// Gives the loader the engine's state and the channel's shutdown handle.
    pub(crate) fn attach_engine(&mut self, shared: Arc<Shared>, shutdown: ShutdownHandle) {
        self.engine = Some((shared, shutdown));
    }

    /// Sends SHUT on the return path, if there is one.
    pub fn shut(&mut self, status: u32) {
        if let Some(w) = self.postcopy_rp.as_mut() {
            let _ = w.send(&RpMessage::Shut(status));
            return;
        }
        if let Some(w) = self.return_path.as_mut().filter(|_| self.rp_opened) {
            let _ = write_rp_message(w, &RpMessage::Shut(status)).and_then(|_| w.flush());
        }
    }

    /// What the destination does once the stream is loaded: take the disks (unless
    /// `activate_disks` is false: `late-block-activate` leaves them to `cont`), enable
    /// migrated bitmaps.
    pub fn finish(&mut self, activate_disks: bool) -> Result<(), MigrationError> {
        if activate_disks {
            self.machine.activate_disks()?;
        }
        if let Some(b) = self.bitmaps.as_mut() {
            let warnings = b.before_vm_start();
            self.warnings.extend(warnings);
        }
        Ok(())
    }

    /// After a postcopy stream's EOF: bitmaps whose COMPLETE never came are dropped, each
    /// named in the warnings (QEMU only says that "some dirty bitmaps may be lost").
    pub fn finish_postcopy(&mut self) {
        if let Some(b) = self.bitmaps.as_mut() {
            let warnings = b.before_vm_start();
            self.warnings.extend(warnings);
        }
    }

    /// Drops what a failed load left behind (incoming bitmaps), so nothing stays half-made.
    pub fn abandon(&mut self) {
        if let Some(b) = self.bitmaps.as_mut() {
            b.cancel("the incoming migration failed");
        }
    }
}

/// The device that loads section `idstr`/`instance_id` at `version_id`, with QEMU's checks.
fn device_for(
    devices: &HashMap<(String, u32), Arc<dyn DeviceState>>,
    idstr: &str,
    instance_id: u32,
    version_id: u32,
) -> Result<Arc<dyn DeviceState>, MigrationError> {
    let d = devices.get(&(idstr.to_string(), instance_id)).ok_or_else(|| {
        MigrationError::Load(format!(
            "Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that your current VM setup matches your saved VM setup, including any hotplugged devices"
        ))
    })?;
    let vmsd = d.vmsd();
    if version_id > vmsd.version_id {
        return Err(MigrationError::Load(format!(
            "savevm: unsupported version {version_id} for '{idstr}' v{}",
            vmsd.version_id
        )));
    }
    if version_id < vmsd.minimum_version_id {
        return Err(MigrationError::Load(format!(
            "{idstr}: incoming version_id {version_id} is too old for local minimum version_id {}",
            vmsd.minimum_version_id
        )));
    }
    Ok(d.clone())
}

/// Fails if an iterable section was started and never ended.
fn check_sections_ended(open: &HashMap<u32, String>) -> Result<(), MigrationError> {
    match open.iter().min_by_key(|(id, _)| **id) {
        Some((id, idstr)) => Err(MigrationError::Load(format!(
            "the stream ended (EOF) before section '{idstr}' (id {id}) was complete: it was started but never ended"
        ))),
        None => Ok(()),
    }
}

/// Fails if a device the machine requires ([`DeviceState::required_on_load`]) has not been
/// loaded, naming every one missing.
fn check_devices_loaded(
    devices: &HashMap<(String, u32), Arc<dyn DeviceState>>,
    loaded: &HashSet<(String, u32)>,
) -> Result<(), MigrationError> {
    let mut missing: Vec<&(String, u32)> = devices
        .iter()
        .filter(|(key, d)| d.required_on_load() && !loaded.contains(*key))
        .map(|(key, _)| key)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    missing.sort();
    let names: Vec<String> = missing
        .iter()
        .map(|(idstr, instance)| format!("'{idstr}' (instance {instance})"))
        .collect();
    Err(MigrationError::Load(format!(
        "the stream ended without the state of {}: the guest cannot run from it",
        names.join(", ")
    )))
}

/// A package's errors name offsets inside the package; say where the package began.
fn package_error(base: u64, e: wire::WireError) -> MigrationError {
    MigrationError::Load(format!("in the PACKAGED data at byte {base:#x}: {e}"))
}

/// The listen thread (`postcopy-listen`): the rest of the main channel in postcopy — PART and
/// END sections of `ram` (pages placed through userfaultfd) and `dirty-bitmap`, PINGs
/// (answered through the fault thread, which owns the return path), up to EOF — and the
/// coordinator of the postcopy threads: it starts the preempt thread of each connection, and
/// on a failure pauses (both channels down, the return path taken from the fault thread,
/// `postcopy-paused`), waits for `migrate-recover`'s connections, answers RECV_BITMAP and
/// resumes at POSTCOPY_RESUME. Holds no lock while it waits.
struct Listen<'a> {
    /// The channel LISTEN came on.
    main: &'a mut Reader,
    /// The channel of the last recovery, which replaced `main`.
    recovered: Option<(Reader, ShutdownHandle)>,
    ram: &'a mut RamLoader,
    bitmaps: Option<&'a mut BitmapLoader>,
    sections: &'a HashMap<u32, (Handler, String)>,
    /// Iterable sections started and not yet ended: their END may come here.
    open_sections: &'a mut HashMap<u32, String>,
    fault: &'a FaultThread,
    pc: &'a Arc<PostcopyRam>,
    engine: Option<&'a (Arc<Shared>, ShutdownHandle)>,
    objects: &'a Arc<tls::Objects>,
    ran: &'a (std::sync::Mutex<Option<bool>>, std::sync::Condvar),
    /// The preempt thread of the current connection.
    preempt: Option<crate::postcopy::recovery::PreemptThread>,
    /// In `postcopy-recover`: the new return path (RECV_BITMAP answers go out on it; it goes
    /// to the fault thread at POSTCOPY_RESUME) and the new preempt channel.
    recovering: Option<(RpWriter, Option<(Reader, ShutdownHandle)>)>,
}

impl Listen<'_> {
    fn main_shutdown(&self) -> Option<ShutdownHandle> {
        match &self.recovered {
            Some((_, h)) => Some(h.clone()),
            None => self.engine.map(|(_, h)| h.clone()),
        }
    }

    fn start_preempt(
        &mut self,
        channel: Option<(Reader, ShutdownHandle)>,
    ) -> Result<(), MigrationError> {
        if let Some((r, h)) = channel {
            let main = self.main_shutdown();
            self.preempt = Some(crate::postcopy::recovery::PreemptThread::spawn(
                self.pc.clone(),
                r,
                h,
                main,
            )?);
        }
        Ok(())
    }

    fn run(mut self, preempt: Option<(Reader, ShutdownHandle)>) -> Result<Ended, MigrationError> {
        let ended = self.run_channels(preempt);
        // A failed load lets go of the preempt channel too: its thread would otherwise stay
        // blocked on the socket, holding guest RAM and the userfaultfd, until the source
        // closed it. (After EOF `finish_channels` has joined it already.)
        if let Some(p) = self.preempt.take() {
            p.stop();
        }
        ended
    }

    fn run_channels(
        &mut self,
        preempt: Option<(Reader, ShutdownHandle)>,
    ) -> Result<Ended, MigrationError> {
        self.start_preempt(preempt)?;
        loop {
            let e = match self.load_to_eof() {
                Ok(()) => match self.finish_channels() {
                    Ok(()) => return Ok(Ended::Eof),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if self.pc.uffd().is_none() {
                return self.bitmaps_lost(e);
            }
            self.pause(e)?;
        }
    }

    /// A bitmap-only postcopy lost its source (`e`). Once the guest runs here it has all of
    /// its RAM and device state: the migration completes, dropping the bitmaps whose
    /// COMPLETE never came, each named (QEMU's `postcopy_ram_listen_thread` only says that
    /// "some dirty bitmaps may be lost"). Before RUN it fails as any load does.
    fn bitmaps_lost(&mut self, e: MigrationError) -> Result<Ended, MigrationError> {
        {
            let mut g = self.ran.0.lock().unwrap_or_else(|p| p.into_inner());
            while g.is_none() {
                g = self.ran.1.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            if *g != Some(true) {
                return Err(e);
            }
        }
        let lost = match self.bitmaps.as_deref_mut() {
            Some(b) => b.cancel(&format!("the bitmap-only postcopy ended early ({e})")),
            None => Vec::new(),
        };
        let lost = if lost.is_empty() {
            "none".to_string()
        } else {
            lost.join(", ")
        };
        log::error!(
            "postcopy_ram_listen_thread: loadvm failed during postcopy: {e}. All states are \
             migrated except dirty bitmaps. These dirty bitmaps are lost: {lost}; the other \
             migrated dirty bitmaps are complete and valid."
        );
        Ok(Ended::SourceLost)
    }

    /// After EOF: the preempt channel ends at its EOS, and every page must be here (a page
    /// the source sent on a channel that broke is missing: a recovery brings it).
    fn finish_channels(&mut self) -> Result<(), MigrationError> {
        if let Some(p) = self.preempt.take() {
            p.join()
                .map_err(|e| MigrationError::Load(format!("postcopy preempt channel: {e}")))?;
        }
        // (A bitmap-only postcopy moved every page in precopy and tracks none.)
        let missing = match self.pc.uffd() {
            Some(_) => self.pc.missing_pages(),
            None => 0,
        };
        if missing > 0 {
            return Err(MigrationError::Load(format!(
                "the source ended postcopy with {missing} pages never received"
            )));
        }
        Ok(())
    }

    /// Postcopy failed with `e`: pause if it can be resumed, and return once resumed.
    fn pause(&mut self, e: MigrationError) -> Result<(), MigrationError> {
        let Some((shared, _)) = self.engine else {
            return Err(e);
        };
        // Wait for RUN's outcome: a failure before the guest runs here fails the migration.
        {
            let mut g = self.ran.0.lock().unwrap_or_else(|p| p.into_inner());
            while g.is_none() {
                g = self.ran.1.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            if *g != Some(true) {
                return Err(e);
            }
        }
        if let Some(h) = self.main_shutdown() {
            h.shutdown();
        }
        if let Some(p) = self.preempt.take() {
            p.stop();
        }
        if let Some((_, Some((_, h)))) = self.recovering.take() {
            h.shutdown();
        }
        self.fault.control(Control::Detach);
        log::error!("Detected IO failure for postcopy. Migration paused. ({e})");
        shared.pause_incoming(format!(
            "postcopy paused: {e}; the guest runs here on the pages it has: recover with \
             migrate-recover here and migrate ... resume=true on the same source process"
        ))?;
        let preempt = shared.lock().caps.has(Capability::PostcopyPreempt);
        let Some(rec) = crate::postcopy::recovery::wait_for_recovery(shared, self.objects, preempt)
        else {
            return Err(MigrationError::Other(format!(
                "the VM shut down while postcopy was paused ({e})"
            )));
        };
        shared.incoming_recovering(&rec.shutdown)?;
        self.recovered = Some((rec.reader, rec.shutdown));
        self.recovering = Some((rec.rp, rec.preempt));
        Ok(())
    }

    /// Reads the current main channel up to EOF.
    fn load_to_eof(&mut self) -> Result<(), MigrationError> {
        loop {
            let r: &mut Reader = match &mut self.recovered {
                Some((r, _)) => r,
                None => self.main,
            };
            match read_item(r)? {
                Item::Eof => return Ok(()),
                Item::Command(Command::Ping(v)) => match &mut self.recovering {
                    Some((w, _)) => w.send(&RpMessage::Pong(v))?,
                    None => self.fault.send(RpMessage::Pong(v)),
                },
                Item::Command(Command::RecvBitmap { ramblock }) => {
                    // `loadvm_handle_recv_bitmap`.
                    let Some((w, _)) = &mut self.recovering else {
                        return Err(MigrationError::Load(format!(
                            "RECV_BITMAP for '{ramblock}' outside a postcopy recovery"
                        )));
                    };
                    let Some(b) = self.pc.blocks().iter().find(|b| b.name() == ramblock) else {
                        return Err(MigrationError::Load(format!(
                            "loadvm_handle_recv_bitmap: block '{ramblock}' not found"
                        )));
                    };
                    w.send_recv_bitmap(&ramblock, &b.received().to_le_dump())?;
                }
                Item::Command(Command::PostcopyResume) => {
                    // `loadvm_postcopy_handle_resume`.
                    let Some((w, preempt)) = self.recovering.take() else {
                        log::error!("loadvm_postcopy_handle_resume: illegal resume received");
                        continue;
                    };
                    if let Some(b) = self.bitmaps.as_deref_mut() {
                        b.resumed();
                    }
                    if let Some((shared, _)) = self.engine {
                        shared.incoming_resumed()?;
                    }
                    self.fault.control(Control::Attach(w));
                    self.fault
                        .send(RpMessage::ResumeAck(wire::return_path::RESUME_ACK_VALUE));
                    // What faulted before or during the pause is asked for again.
                    self.fault.control(Control::ResendPending);
                    self.start_preempt(preempt)?;
                    if let Some(h) = self.main_shutdown() {
                        crate::postcopy::limit_socket_queue(
                            &h,
                            false,
                            crate::postcopy::MAIN_CHANNEL_QUEUE,
                        );
                    }
                    log::info!("postcopy resumed");
                }
                Item::Command(cmd) => {
                    return Err(MigrationError::Load(format!(
                    "at byte {:#x}: migration command {} in postcopy is not supported by livemig",
                    r.offset(),
                    cmd.name()
                )))
                }
                Item::Section(h) => {
                    // A VM shutting down stops loading here, whatever is still buffered on
                    // this side (QEMU's `migration_shutdown` cancels incoming bitmaps):
                    // the bitmaps not complete yet are dropped, not stored half-loaded.
                    if self.engine.is_some_and(|(s, _)| s.lock().shutting_down) {
                        return Err(MigrationError::Other("the VM is shutting down".into()));
                    }
                    let id = h.section_id();
                    let Some((handler, idstr)) =
                        self.sections.get(&id).filter(|_| h.start().is_none())
                    else {
                        return Err(MigrationError::Load(format!(
                            "at byte {:#x}: {} section id {id} in postcopy (only PART and END of a started section may come)",
                            r.offset(),
                            h.kind().name()
                        )));
                    };
                    r.set_section(Some(SectionContext::new(idstr.clone(), id)));
                    match handler {
                        Handler::Ram => self.ram.load(r)?,
                        Handler::Bitmaps => {
                            if let Some(b) = self.bitmaps.as_deref_mut() {
                                b.load(r)?;
                            }
                        }
                        Handler::Device(_) => {
                            return Err(MigrationError::Load(format!(
                                "device section '{idstr}' after the postcopy package"
                            )))
                        }
                    }
                    read_footer(r, id)?;
                    r.set_section(None);
                    if h.kind() == wire::SectionKind::End {
                        self.open_sections.remove(&id);
                    }
                }
            }
        }
    }
}

/// How the listen thread's stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// At the source's EOF, with everything.
    Eof,
    /// A bitmap-only postcopy lost its source after RUN: RAM and devices are whole, the
    /// unfinished bitmaps were dropped (named in the warnings).
    SourceLost,
}

/// The rest of the postcopy package, on the loading thread while the listen thread reads the
/// main channel: device sections (FULL), PINGs, and RUN — which activates the disks and starts
/// the guest as the source's run state and `autostart` say.
// The loading thread's share of the loader, field by field (the listen thread has the rest).
#[allow(clippy::too_many_arguments)]
fn load_package_rest(
    pr: &mut Reader,
    machine: &dyn Machine,
    devices: &HashMap<(String, u32), Arc<dyn DeviceState>>,
    globalstate: &GlobalState,
    fault: &FaultThread,
    device_load_started: &mut bool,
    loaded: &mut HashSet<(String, u32)>,
    shared: Option<&Arc<Shared>>,
) -> Result<(), MigrationError> {
    loop {
        match read_item(pr)? {
            Item::Eof => {
                return Err(MigrationError::Load(
                    "the postcopy package ended without POSTCOPY_RUN".into(),
                ))
            }
            Item::Command(Command::Ping(v)) => fault.send(RpMessage::Pong(v)),
            Item::Command(Command::PostcopyRun) => break,
            Item::Command(cmd) => {
                return Err(MigrationError::Load(format!(
                    "migration command {} inside the postcopy package is not supported",
                    cmd.name()
                )))
            }
            Item::Section(h) => {
                let Some(s) = h.start().filter(|_| h.kind() == wire::SectionKind::Full) else {
                    return Err(MigrationError::Load(format!(
                        "{} section in the postcopy package (only device state may come)",
                        h.kind().name()
                    )));
                };
                let d = device_for(devices, &s.idstr, s.instance_id, s.version_id)?;
                if !*device_load_started {
                    machine.begin_device_load();
                    *device_load_started = true;
                }
                let id = h.section_id();
                pr.set_section(Some(SectionContext::new(s.idstr.clone(), id)));
                d.load(pr, s.version_id)?;
                read_footer(pr, id)?;
                pr.set_section(None);
                loaded.insert((s.idstr.clone(), s.instance_id));
            }
        }
    }
    // The guest runs from here on: every device it needs must have its state.
    check_devices_loaded(devices, loaded)?;
    if *device_load_started {
        *device_load_started = false;
        machine.end_device_load()?;
    }
    // RUN (`loadvm_postcopy_handle_run_bh`).
    machine.activate_disks()?;
    let runstate = globalstate.received().unwrap_or(RunState::Running);
    let autostart = shared.is_none_or(|s| s.lock().autostart);
    if runstate == RunState::Running && autostart {
        machine.start();
    } else if runstate == RunState::Running {
        machine.set_runstate(RunState::Paused);
    } else {
        machine.set_runstate(runstate);
    }
    Ok(())
}

/// How long the multifd channels of a completed load are read on, waiting for the source to
/// close them (`multifd::recv::Receiver::finish_after_load`); the source closes them as it
/// cleans up, at once unless it is starved.
const DRAIN_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// The event a destination emits for each dirty bitmap it dropped from a migration that
/// completed: `{"node": NODE, "name": BITMAP, "reason": WHY}` (livemig's own; QEMU only
/// prints an error).
pub const BITMAP_DROPPED_EVENT: &str = "X_LIVEMIG_BITMAP_DROPPED";

/// Runs one incoming migration to its end.
pub(crate) fn run(job: Job) {
    let shared = job.shared.clone();
    let started = Instant::now();
    let conn = job.listener.accept();
    {
        let mut inner = shared.lock();
        inner.inc.started = Some(started);
    }
    let conn = match conn {
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
    // A source that stops sending fails the load after `x-livemig-stall-timeout` of silence
    // instead of keeping this end in `active` for good (sockets only).
    let stall = shared.lock().params.stall_timeout();
    conn.shutdown.set_stall_timeout(true, true, stall);
    // TLS before the first byte of the stream, with the parameters as they are now.
    let tls_params = shared.lock().params.tls();
    let shutdown = conn.shutdown.clone();
    let mut conn = match crate::secure::secure_incoming(conn, &tls_params, &job.objects) {
        Ok(c) => c,
        Err(e) => {
            shutdown.shutdown();
            fail(&shared, e.to_string(), started);
            return;
        }
    };
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
    loader.attach_engine(shared.clone(), conn.shutdown.clone());
    loader.objects = job.objects.clone();
    if caps.has(Capability::PostcopyPreempt) {
        // QEMU 7.2's source opens the preempt channel right after the main one, and the
        // destination waits for it before loading anything (`migration_has_all_channels`).
        // Watched while waiting: a source that cannot open it (a TLS hello on a side
        // without TLS, a closed main channel) fails the wait instead of leaving both ends
        // waiting on each other.
        let preempt = crate::channel_wait::wait_for_preempt(
            &job.listener,
            &shutdown,
            stall,
            !tls_params.enabled(),
        )
        .and_then(|()| job.listener.accept())
        .and_then(|c| crate::secure::secure_incoming(c, &tls_params, &job.objects));
        match preempt {
            Ok(mut p) => match p.reader.take() {
                Some(reader) => loader.set_preempt_channel(reader, p.shutdown.clone()),
                None => {
                    shutdown.shutdown();
                    fail(
                        &shared,
                        "the preempt channel has no incoming direction".into(),
                        started,
                    );
                    return;
                }
            },
            Err(e) => {
                shutdown.shutdown();
                fail(&shared, format!("postcopy preempt channel: {e}"), started);
                return;
            }
        }
    }
    // Multifd: QEMU 7.2's source connects its channels after the main one, and the
    // destination loads nothing before all of them are there (`migration_has_all_channels`).
    let multifd = match crate::multifd::MultifdConfig::from_settings(&caps, &params) {
        None => None,
        Some(config) => {
            let accepted = if job.listener.is_socket() {
                let main_fd = shutdown.socket();
                let mut accept = || {
                    if let Some(l) = job.listener.socket_fd() {
                        crate::multifd::recv::wait_for_channel(
                            l,
                            main_fd.as_ref().map(std::os::fd::AsFd::as_fd),
                            stall,
                            !tls_params.enabled(),
                        )?;
                    }
                    let c = job.listener.accept()?;
                    shared.attach_extra_incoming_channel(&c.shutdown)?;
                    // A peer that never finishes its TLS handshake or its MultiFDInit_t
                    // fails the channel after the stall bound (lifted once it is read).
                    c.shutdown.set_stall_timeout(true, true, stall);
                    crate::secure::secure_incoming(c, &tls_params, &job.objects)
                };
                crate::multifd::recv::Receiver::accept(
                    &config,
                    &mut accept,
                    job.machine.ram_blocks(),
                    shutdown.clone(),
                )
            } else {
                Err(MigrationError::Other(
                    crate::multifd::PROTOCOL_REFUSED.into(),
                ))
            };
            match accepted {
                Ok(rx) => {
                    loader.set_multifd(rx.sync_point());
                    Some(rx)
                }
                Err(e) => {
                    shutdown.shutdown();
                    loader.abandon();
                    fail(&shared, e.to_string(), started);
                    return;
                }
            }
        }
    };
    // A command's output (`exec:`) or a file is taken up once it has data, as QEMU 7.2
    // watches an `exec:` channel for input before it starts loading: `active` means the
    // stream is flowing (a socket's source is there once it connected).
    let first = if job.listener.is_socket() {
        Ok(())
    } else {
        r.peek_u8().map(drop).map_err(MigrationError::from)
    };
    let result = first
        .and_then(|()| {
            shared
                .advance_incoming(MigrationStatus::Active)
                .map_err(MigrationError::from)
        })
        .and_then(|_| loader.load_header(&mut r))
        .and_then(|_| loader.load_body(&mut r))
        .and_then(|_| {
            if loader.postcopy_ran() {
                loader.finish_postcopy();
                return Ok(());
            }
            // QEMU's `late-block-activate`: with it, the disks are activated now only if the
            // guest is about to run; a destination that stays paused (`-S`, or a source that
            // was not running) keeps them inactive — unlocked — until `cont`. Capability and
            // autostart are read now, as QEMU reads them at the end of the load. (Postcopy's
            // RUN always activates, as QEMU's does.)
            let runstate = loader.received_runstate().unwrap_or(RunState::Running);
            let (late, autostart) = {
                let inner = shared.lock();
                (
                    inner.caps.has(Capability::LateBlockActivate),
                    inner.autostart,
                )
            };
            loader.finish(!late || (autostart && runstate == RunState::Running))
        });
    // A channel's error is the cause when the main stream failed too (the channel shut the
    // main one down to stop the load). After a complete load every page the channels carried
    // is in guest memory (the last sync point came before EOF); they are read on, in the
    // background, until the source closes them (QEMU's sender may write once more).
    let (result, multifd_pages) = match multifd {
        Some(rx) => {
            let result = match (result, rx.error()) {
                (Err(_), Some(e)) => Err(MigrationError::Load(e)),
                (r, _) => r,
            };
            let pages = rx.sync_point().pages();
            if result.is_ok() {
                rx.finish_after_load(DRAIN_BOUND);
            } else {
                rx.finish();
            }
            (result, pages)
        }
        None => (result, 0),
    };
    for w in &loader.warnings {
        log::warn!("incoming migration: {w}");
    }
    {
        let mut inner = shared.lock();
        inner.inc.pages_loaded = loader.pages_loaded() + multifd_pages;
        inner.inc.warnings = loader.warnings.clone();
    }
    match result {
        Ok(()) => {
            // A bitmap dropped from a migration that otherwise completes is easy to miss in
            // `x-livemig-warnings`: each one is also an event, before `completed`.
            for w in &loader.warnings {
                if let Some((node, name, reason)) = crate::bitmaps::parse_dropped(w) {
                    shared.events.emit(
                        BITMAP_DROPPED_EVENT,
                        Some(serde_json::json!({"node": node, "name": name, "reason": reason})),
                    );
                }
            }
            // An `exec:` source command that outlives the stall bound is killed: the stream
            // is loaded already.
            let _ = conn.finish(shared.lock().params.stall_timeout());
            let runstate = loader.received_runstate().unwrap_or(RunState::Running);
            {
                let mut inner = shared.lock();
                inner.inc.total_ms = Some(started.elapsed().as_millis() as u64);
            }
            // The run state first, then `completed` (QEMU's order): whoever sees the
            // migration completed also sees the guest running, or paused with -S.
            let autostart = shared.lock().autostart;
            if loader.postcopy_ran() {
                // Postcopy's RUN already did this.
            } else if runstate == RunState::Running && autostart {
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
            // Done with the channel, as QEMU closes it: a relay between the ends (an
            // `exec:` command carrying the return path) sees the end and exits.
            conn.shutdown.shutdown();
        }
        Err(e) => {
            loader.abandon();
            // Over a stalled link SHUT would only wait for the bound once more.
            if !e.is_stall() {
                loader.shut(1);
            }
            conn.shutdown.shutdown();
            let text = match stall {
                Some(t) if e.is_stall() => format!(
                    "the migration stream stalled: nothing arrived for {} ms (x-livemig-stall-timeout); {e}",
                    t.as_millis()
                ),
                _ => e.to_string(),
            };
            // QEMU's words (`process_incoming_migration_co`).
            log::error!("load of migration failed: {text}");
            shared.fail_incoming(text.clone(), started);
            // As QEMU's `process_incoming_migration_co`: a load that failed ends the process
            // (the VMM's hook decides), unless the VM is shutting down anyway.
            if let Some(hook) = &job.on_load_failure {
                if !shared.shutting_down() {
                    hook.0(&text);
                }
            }
        }
    }
}

fn fail(shared: &Shared, error: String, started: Instant) {
    log::error!("incoming migration failed: {error}");
    shared.fail_incoming(error, started);
}
