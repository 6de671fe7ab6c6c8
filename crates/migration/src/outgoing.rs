//! The source side: the migration thread.
//!
//! Order of work, and why:
//! 1. Connect the channel first, holding nothing (seed 004): a connect that waits for the
//!    network must not block anyone else, and `migrate_cancel` can still interrupt it.
//! 2. Setup with the guest running: header, configuration, START sections. Dirty logging
//!    starts here, before the first page is read, so every later write is caught.
//! 3. Precopy rounds while the guest runs: each round sends dirty pages for at most 50 ms or the
//!    bandwidth budget, inside a PART section. When a pass over RAM ends (or little is left),
//!    the dirty log is synchronised and the engine decides whether what remains fits
//!    `bandwidth × downtime-limit`.
//! 4. Switchover: stop the guest, optionally wait in `pre-switchover` for `migrate-continue`,
//!    enter `device`, inactivate disks, send the END sections (the last dirty pages and the
//!    bitmaps), the device state, EOF and the vmdesc trailer.
//! 5. With a return path, wait for the destination's SHUT before calling it completed.
//!
//! Whatever happens after step 1, cleanup puts the source back: dirty logging stops, bitmaps
//! are released, and after a failure or cancel the disks are reactivated and the guest resumes
//! if it was running. Nothing is lost on the source.

use crate::bitmaps::BitmapSaver;
use crate::caps::{Capabilities, Capability};
use crate::engine::OutgoingStats;
use crate::error::MigrationError;
use crate::globalstate::GlobalState;
use crate::machine::{DeviceState, Machine, Writer};
use crate::ram::{RamSaver, SendOutcome, RAM_IDSTR, RAM_VERSION};
use crate::runstate::RunState;
use crate::state::{Generation, Outcome, Shared};
use crate::status::MigrationStatus;
use crate::transport::{connect, BoxRead, MigrationUri};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::command::{write_command, Command};
use wire::config::{write_configuration, Configuration};
use wire::return_path::{read_rp_message, RpMessage};
use wire::section::{
    write_end, write_eof, write_file_header, write_footer, write_full, write_part, write_start,
    write_vmdesc,
};
use wire::vmstate::{vmdesc_json, DeviceDesc};
use wire::{StreamReader, StreamWriter};

/// Longest a precopy round runs before the engine looks at the state again.
const ROUND: Duration = Duration::from_millis(50);
/// Bandwidth is measured and budgeted over windows of this length.
const WINDOW: Duration = Duration::from_millis(100);
/// Section ids: `ram` and `dirty-bitmap` as QEMU 7.2's `-M none`; devices follow.
const RAM_SECTION_ID: u32 = 2;
const BITMAP_SECTION_ID: u32 = 3;
const FIRST_DEVICE_SECTION_ID: u32 = 4;

/// Everything the migration thread needs.
pub(crate) struct Job {
    /// Which migration this is; the shared state belongs to the newest one.
    pub generation: Generation,
    pub shared: Arc<Shared>,
    pub machine: Arc<dyn Machine>,
    pub caps: Capabilities,
    pub uri: MigrationUri,
    pub stats: Arc<OutgoingStats>,
}

/// What the switchover changed, so cleanup knows what to undo.
#[derive(Default)]
struct Undo {
    /// The guest was running when the engine stopped it.
    stopped_running_guest: bool,
    /// The guest was stopped by the engine at all.
    stopped: bool,
    /// Disks were inactivated.
    inactivated: bool,
}

/// Bandwidth accounting over [`WINDOW`]s.
struct Meter {
    window_start: Instant,
    window_bytes_start: u64,
    window_pages_start: u64,
    /// Last measured throughput in bytes per second (0 before the first window closes).
    bytes_per_sec: f64,
}

impl Meter {
    fn new(bytes: u64) -> Self {
        Meter {
            window_start: Instant::now(),
            window_bytes_start: bytes,
            window_pages_start: 0,
            bytes_per_sec: 0.0,
        }
    }

    /// Closes the window if it is over, updating the statistics.
    fn tick(&mut self, bytes: u64, pages: u64, stats: &OutgoingStats) {
        let el = self.window_start.elapsed();
        if el < WINDOW {
            return;
        }
        let secs = el.as_secs_f64();
        self.bytes_per_sec = (bytes - self.window_bytes_start) as f64 / secs;
        stats
            .bits_per_second
            .store((self.bytes_per_sec * 8.0) as u64, Ordering::Relaxed);
        stats.pages_per_second.store(
            ((pages.saturating_sub(self.window_pages_start)) as f64 / secs) as u64,
            Ordering::Relaxed,
        );
        self.window_start = Instant::now();
        self.window_bytes_start = bytes;
        self.window_pages_start = pages;
    }

    /// Bytes that may still be sent in this window under `max_bandwidth` (bytes/s, 0 = none).
    fn allowance(&self, bytes: u64, max_bandwidth: u64) -> u64 {
        if max_bandwidth == 0 {
            return u64::MAX;
        }
        let per_window = (max_bandwidth as f64 * WINDOW.as_secs_f64()) as u64;
        per_window.saturating_sub(bytes - self.window_bytes_start)
    }

    fn window_left(&self) -> Duration {
        WINDOW.saturating_sub(self.window_start.elapsed())
    }
}

/// Downtime livemig aims for when the guest lets it: it keeps iterating, even when what
/// remains would fit the downtime limit, until what remains takes at most this long to send.
const TARGET_DOWNTIME_MS: u64 = 10;
/// Passes after which a migration that fits the limit switches over even if it still shrinks.
const MAX_PASSES: u64 = 30;

/// When to stop iterating and switch over.
///
/// QEMU switches over as soon as what remains fits `bandwidth × downtime-limit`, even in the
/// middle of the first pass, so its downtime tends towards the limit. livemig treats the limit
/// as a ceiling, not a target: it decides only at the end of a pass (after a dirty-log sync),
/// and switches over when what remains would take at most [`TARGET_DOWNTIME_MS`] to send, or
/// when it fits the limit and has stopped shrinking (the guest dirties memory about as fast
/// as it is sent), or after [`MAX_PASSES`] passes. A migration that never fits the limit runs
/// on, as QEMU's does without auto-converge.
#[derive(Default)]
struct Convergence {
    last_pending: Option<f64>,
    passes: u64,
}

impl Convergence {
    /// Called at the end of each pass with the bytes still to send and the bandwidth.
    fn switch_now(&mut self, pending: f64, bytes_per_sec: f64, limit_ms: u64) -> bool {
        self.passes += 1;
        let limit = bytes_per_sec * limit_ms as f64 / 1000.0;
        let target = bytes_per_sec * limit_ms.min(TARGET_DOWNTIME_MS) as f64 / 1000.0;
        let stalled = self.last_pending.is_some_and(|last| pending > last * 0.8);
        self.last_pending = Some(pending);
        pending <= target || (pending <= limit && (stalled || self.passes >= MAX_PASSES))
    }
}

/// Runs one outgoing migration to its end.
pub(crate) fn run(job: Job) {
    let mut undo = Undo::default();
    let mut bitmaps: Option<BitmapSaver> = None;
    let mut ram: Option<RamSaver> = None;
    let result = migrate(&job, &mut undo, &mut ram, &mut bitmaps);
    finish(&job, result, undo, ram, bitmaps);
}

fn migrate(
    job: &Job,
    undo: &mut Undo,
    ram_slot: &mut Option<RamSaver>,
    bitmaps_slot: &mut Option<BitmapSaver>,
) -> Result<(), MigrationError> {
    let shared = &job.shared;
    let machine = &job.machine;

    // 1. Connect, holding nothing.
    let mut conn = connect(&job.uri)?;
    shared.attach_channel(job.generation, &conn.shutdown)?;
    let stream = conn
        .writer
        .take()
        .ok_or_else(|| MigrationError::Other("the transport has no outgoing direction".into()))?;
    let mut w: Writer = StreamWriter::with_capacity(stream, 256 * 1024);
    let use_rp = job.caps.has(Capability::ReturnPath) && job.uri.has_return_path();
    let rp = if use_rp {
        let reader = conn
            .reader
            .take()
            .ok_or_else(|| MigrationError::Other("the transport has no return path".into()))?;
        Some(spawn_return_path(reader)?)
    } else {
        None
    };

    // 2. Setup.
    let setup_start = Instant::now();
    write_file_header(&mut w)?;
    write_configuration(&mut w, &Configuration::new(machine.machine_type()))?;
    if rp.is_some() {
        write_command(&mut w, &Command::OpenReturnPath)?;
        write_command(&mut w, &Command::Ping(1))?;
    }
    if job.caps.has(Capability::DirtyBitmaps) {
        // QEMU sends this whenever dirty-bitmaps is on (bitmaps are postcopiable); a QEMU
        // destination expects the 0-byte form.
        write_command(&mut w, &Command::PostcopyAdvise(None))?;
    }
    let mut ram = RamSaver::new(machine.ram_blocks(), job.stats.ram.clone());
    job.stats.total.store(ram.total_bytes(), Ordering::Relaxed);
    write_start(&mut w, RAM_SECTION_ID, RAM_IDSTR, 0, RAM_VERSION)?;
    ram.setup(&mut w)?;
    write_footer(&mut w, RAM_SECTION_ID)?;
    *ram_slot = Some(ram);
    let ram = ram_slot
        .as_mut()
        .ok_or_else(|| MigrationError::Other("ram saver vanished".into()))?;
    if job.caps.has(Capability::DirtyBitmaps) {
        if let Some(layer) = machine.block_layer() {
            let mapping = shared.lock().params.block_bitmap_mapping.clone();
            let saver = BitmapSaver::setup(layer, mapping.as_ref())?;
            if saver.is_active() {
                write_start(
                    &mut w,
                    BITMAP_SECTION_ID,
                    crate::bitmaps::BITMAP_IDSTR,
                    0,
                    crate::bitmaps::BITMAP_VERSION,
                )?;
                *bitmaps_slot = Some(saver);
                if let Some(b) = bitmaps_slot.as_mut() {
                    b.save_setup(&mut w)?;
                }
                write_footer(&mut w, BITMAP_SECTION_ID)?;
            } else {
                saver.cleanup(false);
            }
        }
    }
    if job.caps.has(Capability::Events) {
        shared
            .events
            .emit("MIGRATION_PASS", Some(json!({ "pass": 1 })));
    }
    job.stats.ram.dirty_syncs.store(1, Ordering::Relaxed);
    w.flush()?;
    shared.lock().out.setup_ms = Some(setup_start.elapsed().as_millis() as u64);
    shared.advance(job.generation, MigrationStatus::Active)?;

    // 3. Precopy rounds.
    let mut meter = Meter::new(w.bytes_written());
    let mut last_sync = Instant::now();
    let mut convergence = Convergence::default();
    loop {
        if shared.out_cancelled(job.generation) {
            return Err(MigrationError::Cancelled);
        }
        let (max_bw, downtime_ms) = {
            let inner = shared.lock();
            (
                inner.params.max_bandwidth(),
                inner.params.downtime_limit_ms(),
            )
        };
        let allowance = meter.allowance(w.bytes_written(), max_bw);
        if allowance == 0 {
            if shared.sleep_unless_cancelled(job.generation, meter.window_left()) {
                return Err(MigrationError::Cancelled);
            }
            meter.tick(w.bytes_written(), sent_pages(&job.stats), &job.stats);
            continue;
        }
        write_part(&mut w, RAM_SECTION_ID)?;
        let outcome = ram.send(&mut w, allowance, Some(Instant::now() + ROUND))?;
        wire::ram::write_eos(&mut w)?;
        write_footer(&mut w, RAM_SECTION_ID)?;
        w.flush()?;
        job.stats
            .transferred
            .store(w.bytes_written(), Ordering::Relaxed);
        meter.tick(w.bytes_written(), sent_pages(&job.stats), &job.stats);

        // Bandwidth for the switchover decision: the measured rate, or the cap before the
        // first window closes.
        let bw = if meter.bytes_per_sec > 0.0 {
            meter.bytes_per_sec
        } else if max_bw > 0 {
            max_bw as f64
        } else {
            1e9
        };
        let bitmap_bytes = bitmaps_slot.as_ref().map_or(0, |b| b.pending_bytes());
        job.stats
            .bitmap_bytes
            .store(bitmap_bytes, Ordering::Relaxed);
        let pending = (ram.remaining_pages() * crate::guest::PAGE_SIZE + bitmap_bytes) as f64;
        job.stats
            .expected_downtime_ms
            .store((pending / bw * 1000.0) as u64, Ordering::Relaxed);
        if outcome == SendOutcome::PassDone {
            let dirty = ram.sync();
            let el = last_sync.elapsed().as_secs_f64().max(1e-3);
            let new_dirty = job.stats.ram.last_sync_dirty.load(Ordering::Relaxed);
            job.stats
                .dirty_pages_rate
                .store((new_dirty as f64 / el) as u64, Ordering::Relaxed);
            last_sync = Instant::now();
            if job.caps.has(Capability::Events) {
                let pass = job.stats.ram.dirty_syncs.load(Ordering::Relaxed);
                shared
                    .events
                    .emit("MIGRATION_PASS", Some(json!({ "pass": pass })));
            }
            let pending = (dirty * crate::guest::PAGE_SIZE + bitmap_bytes) as f64;
            job.stats
                .expected_downtime_ms
                .store((pending / bw * 1000.0) as u64, Ordering::Relaxed);
            if convergence.switch_now(pending, bw, downtime_ms) {
                break;
            }
        }
    }

    // 4. Switchover.
    job.stats
        .precopy_bytes
        .store(w.bytes_written(), Ordering::Relaxed);
    let before = machine.runstate();
    undo.stopped_running_guest = before.is_running();
    let globalstate = Arc::new(GlobalState::default());
    globalstate.store(if before.is_running() {
        RunState::Running
    } else {
        before
    });
    machine.stop(RunState::FinishMigrate);
    undo.stopped = true;
    let downtime_start = Instant::now();
    let downtime_bytes_start = w.bytes_written();

    if job.caps.has(Capability::PauseBeforeSwitchover) {
        wait_for_continue(shared, job.generation, rp.as_ref())?;
    }
    shared.advance(job.generation, MigrationStatus::Device)?;
    machine.inactivate_disks().map_err(|e| {
        MigrationError::Other(format!("Block inactivate failed during switchover: {e}"))
    })?;
    undo.inactivated = true;

    write_end(&mut w, RAM_SECTION_ID)?;
    ram.sync();
    ram.send(&mut w, u64::MAX, None)?;
    wire::ram::write_eos(&mut w)?;
    write_footer(&mut w, RAM_SECTION_ID)?;
    if let Some(b) = bitmaps_slot.as_mut() {
        write_end(&mut w, BITMAP_SECTION_ID)?;
        b.save_complete(&mut w)?;
        write_footer(&mut w, BITMAP_SECTION_ID)?;
    }
    let mut devices: Vec<Arc<dyn DeviceState>> = machine.devices();
    devices.push(globalstate);
    let mut described = Vec::new();
    for (i, d) in devices.iter().filter(|d| d.needed()).enumerate() {
        let id = FIRST_DEVICE_SECTION_ID + i as u32;
        let vmsd = d.vmsd();
        write_full(&mut w, id, &d.idstr(), d.instance_id(), vmsd.version_id)?;
        d.save(&mut w)?;
        write_footer(&mut w, id)?;
        described.push(DeviceDesc {
            idstr: d.idstr(),
            instance_id: d.instance_id(),
            vmsd,
        });
    }
    write_eof(&mut w)?;
    write_vmdesc(
        &mut w,
        vmdesc_json(crate::guest::PAGE_SIZE, &described, None).as_bytes(),
    )?;
    w.flush()?;
    let total = w.bytes_written();
    job.stats.transferred.store(total, Ordering::Relaxed);
    job.stats
        .downtime_bytes
        .store(total - downtime_bytes_start, Ordering::Relaxed);
    drop(w);
    conn.shutdown.shutdown_write();

    // 5. The destination's verdict, when there is a return path.
    if let Some(rp) = rp {
        wait_for_shut(shared, job.generation, &rp)?;
    }
    conn.finish()?;
    let downtime = downtime_start.elapsed().as_millis() as u64;
    // Throughput over the whole transfer, as QEMU reports it once completed.
    let secs = shared
        .lock()
        .out
        .started
        .map_or(0.0, |s| s.elapsed().as_secs_f64())
        .max(1e-6);
    job.stats
        .bits_per_second
        .store((total as f64 * 8.0 / secs) as u64, Ordering::Relaxed);
    machine.set_runstate(RunState::PostMigrate);
    let mut inner = shared.lock();
    inner.out.downtime_ms = Some(downtime);
    Ok(())
}

fn sent_pages(stats: &OutgoingStats) -> u64 {
    stats.ram.normal_pages.load(Ordering::Relaxed) + stats.ram.zero_pages.load(Ordering::Relaxed)
}

/// Waits in `pre-switchover` until `migrate-continue` or a cancel.
fn wait_for_continue(
    shared: &Shared,
    generation: Generation,
    rp: Option<&mpsc::Receiver<RpEvent>>,
) -> Result<(), MigrationError> {
    shared.pause_before_switchover(generation, || {
        let Some(rp) = rp else {
            return Ok(());
        };
        // With a return path the source knows when the destination is gone: it fails now and
        // resumes the guest, instead of waiting for a `migrate-continue` that can only fail
        // (QEMU waits).
        match rp.try_recv() {
            Ok(RpEvent::Closed(why)) => Err(MigrationError::Other(format!(
                "the destination went away while the source waited in pre-switchover ({why})"
            ))),
            Ok(RpEvent::Shut(n)) => Err(MigrationError::Other(format!(
                "the destination ended the migration (SHUT {n}) before the switchover"
            ))),
            Err(mpsc::TryRecvError::Disconnected) => Err(MigrationError::Other(
                "the return path ended while the source waited in pre-switchover".into(),
            )),
            Err(mpsc::TryRecvError::Empty) => Ok(()),
        }
    })
}

/// Messages from the return-path thread.
enum RpEvent {
    Shut(u32),
    Closed(String),
}

fn spawn_return_path(reader: BoxRead) -> Result<mpsc::Receiver<RpEvent>, MigrationError> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("migration-rp".into())
        .spawn(move || {
            let mut r = StreamReader::new(reader);
            loop {
                match read_rp_message(&mut r) {
                    Ok(RpMessage::Shut(st)) => {
                        let _ = tx.send(RpEvent::Shut(st));
                        return;
                    }
                    Ok(RpMessage::Pong(_)) | Ok(RpMessage::SwitchoverAck) => {}
                    Ok(other) => {
                        let _ = tx.send(RpEvent::Closed(format!(
                            "RP: unexpected message {} in precopy",
                            other.name()
                        )));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(RpEvent::Closed(format!("RP: {e}")));
                        return;
                    }
                }
            }
        })
        .map_err(|e| MigrationError::io("cannot start the return-path thread", e))?;
    Ok(rx)
}

fn wait_for_shut(
    shared: &Shared,
    generation: Generation,
    rp: &mpsc::Receiver<RpEvent>,
) -> Result<(), MigrationError> {
    loop {
        if shared.out_cancelled(generation) {
            return Err(MigrationError::Cancelled);
        }
        match rp.recv_timeout(Duration::from_millis(50)) {
            Ok(RpEvent::Shut(0)) => return Ok(()),
            Ok(RpEvent::Shut(n)) => return Err(MigrationError::SiblingError(n)),
            Ok(RpEvent::Closed(why)) => {
                return Err(MigrationError::Other(format!(
                    "the destination closed the return path before reporting success ({why})"
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::Other(
                    "the return path ended before the destination reported success".into(),
                ))
            }
        }
    }
}

/// Ends the migration: final state, and on failure or cancel, the source put back as it was.
fn finish(
    job: &Job,
    result: Result<(), MigrationError>,
    undo: Undo,
    ram: Option<RamSaver>,
    bitmaps: Option<BitmapSaver>,
) {
    let shared = &job.shared;
    if let Some(ram) = &ram {
        ram.stop();
    }
    let ok = result.is_ok();
    if let Some(b) = bitmaps {
        b.cleanup(ok);
    }
    // A cancel that arrives after the whole stream went out (and, with a return path, after
    // the destination confirmed it) is too late: the destination may be running the guest, so
    // the source must not resume. QEMU would resume it; livemig reports `completed`.
    if !ok {
        // Put the source back: disks first (the guest needs them), then the guest.
        let mut reactivated = true;
        if undo.inactivated {
            reactivated = job.machine.activate_disks().is_ok();
        }
        if undo.stopped {
            if undo.stopped_running_guest && reactivated {
                job.machine.start();
            } else {
                // Not running before, or the disks could not be taken back (the destination
                // may hold them): stay stopped and let management decide.
                job.machine.set_runstate(RunState::Paused);
            }
        }
    }
    let outcome = match &result {
        Ok(()) => Outcome::Completed,
        Err(e) => Outcome::Failed(failure_text(&job.uri, e)),
    };
    shared.finish_outgoing(job.generation, outcome);
}

/// `error-desc` of a failed migration. A write that failed on the channel is worded as QEMU
/// words it (`Unable to write to socket: Broken pipe`): the destination went away, and the
/// stream offset a `WireError` carries means nothing to the operator.
fn failure_text(uri: &MigrationUri, e: &MigrationError) -> String {
    if let MigrationError::Wire(w) = e {
        if let wire::WireErrorKind::Io(io) = &w.kind {
            let channel = match uri {
                MigrationUri::Tcp { .. } | MigrationUri::Unix(_) => "socket",
                MigrationUri::Exec(_) => "command",
                MigrationUri::File { .. } => "file",
            };
            return format!(
                "Unable to write to {channel}: {}",
                crate::error::os_error_text(io)
            );
        }
    }
    e.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: f64 = 1e9;

    #[test]
    fn failed_writes_are_worded_as_qemu_words_them() {
        let epipe = || {
            MigrationError::Wire(wire::WireError::new(
                0x8e,
                wire::WireErrorKind::Io(std::io::Error::from_raw_os_error(
                    nix::errno::Errno::EPIPE as i32,
                )),
            ))
        };
        for (uri, want) in [
            ("unix:/x", "Unable to write to socket: Broken pipe"),
            ("tcp:h:1", "Unable to write to socket: Broken pipe"),
            ("exec:false", "Unable to write to command: Broken pipe"),
            ("file:/x", "Unable to write to file: Broken pipe"),
        ] {
            let uri = MigrationUri::parse(uri).unwrap();
            assert_eq!(failure_text(&uri, &epipe()), want);
        }
        let other = MigrationError::Other("Block inactivate failed during switchover".into());
        let uri = MigrationUri::parse("unix:/x").unwrap();
        assert_eq!(failure_text(&uri, &other), other.to_string());
    }

    #[test]
    fn switches_when_what_remains_is_tiny() {
        let mut c = Convergence::default();
        assert!(
            !c.switch_now(200e6, GB, 300),
            "fits the limit but still shrinking"
        );
        assert!(!c.switch_now(40e6, GB, 300));
        assert!(c.switch_now(5e6, GB, 300), "5 ms of data left");
    }

    #[test]
    fn switches_within_the_limit_when_progress_stalls() {
        let mut c = Convergence::default();
        assert!(!c.switch_now(100e6, GB, 300));
        assert!(c.switch_now(95e6, GB, 300), "not shrinking any more");
        let mut c = Convergence::default();
        assert!(!c.switch_now(500e6, GB, 300));
        assert!(
            !c.switch_now(490e6, GB, 300),
            "stalled but over the limit: keep going"
        );
    }

    #[test]
    fn gives_up_improving_after_many_passes() {
        let mut c = Convergence::default();
        let mut pending = 250e6;
        let mut switched = None;
        for pass in 1..=MAX_PASSES {
            if c.switch_now(pending, GB, 300) {
                switched = Some(pass);
                break;
            }
            pending *= 0.79;
        }
        assert!(switched.is_some());
    }

    #[test]
    fn zero_limit_needs_nothing_left() {
        let mut c = Convergence::default();
        assert!(!c.switch_now(4096.0, GB, 0));
        assert!(c.switch_now(0.0, GB, 0));
    }
}
