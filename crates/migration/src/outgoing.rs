//! The source side: the migration thread, one phase at a time.
//!
//! [`Outgoing`] holds everything one outgoing migration owns — the channel and its return
//! path, the section savers, what the switchover changed — and runs it in phases, each a
//! method that postcopy and multifd can extend or replace:
//! 1. [`Outgoing::connect`]: the channel first, holding nothing (seed 004): a connect that
//!    waits for the network must not block anyone else, and `migrate_cancel` can still
//!    interrupt it.
//! 2. [`Outgoing::setup`], with the guest running: header, configuration, START sections.
//!    Dirty logging starts here, before the first page is read, so every later write is
//!    caught.
//! 3. [`Outgoing::iterate`], while the guest runs: each round sends dirty pages for at most
//!    50 ms or the bandwidth budget, inside a PART section. When a pass over RAM ends, the
//!    dirty log is synchronised, [`AutoConverge`] (with `auto-converge`) decides whether to
//!    throttle the vCPUs harder, and [`Convergence`] whether to switch over.
//! 4. [`Outgoing::switchover`]: stop the guest, optionally wait in `pre-switchover` for
//!    `migrate-continue` and then enter `device` (QEMU 7.2 enters `device` only after a
//!    pause: without one the status stays `active` to the end), inactivate disks, send the
//!    END sections (the last dirty pages and the bitmaps), the device state, EOF and the
//!    vmdesc trailer.
//! 5. [`Outgoing::complete`]: with a return path, wait for the destination's SHUT before
//!    calling it completed; the source is then `postmigrate`.
//!
//! Whatever happens after the connect, [`Outgoing::cleanup`] puts the source back: dirty
//! logging stops, bitmaps are released, and after a failure or cancel the disks are
//! reactivated and the guest resumes if it was running (not when the VM is shutting down).
//! Nothing is lost on the source. The state changes themselves are the state machine's
//! ([`crate::state`]).

use crate::bitmaps::BitmapSaver;
use crate::caps::{Capabilities, Capability};
use crate::engine::OutgoingStats;
use crate::error::MigrationError;
use crate::globalstate::GlobalState;
use crate::machine::{DeviceState, Machine, Writer};
use crate::policy::{AutoConverge, Backlog, Convergence, Meter};
use crate::postcopy::source::{Cursor, PageWriter, PreemptSender, SourceRam};
use crate::ram::{RamSaver, SendOutcome, RAM_IDSTR, RAM_VERSION};
use crate::return_path::{drain_requests, spawn as spawn_return_path, RpCtx, RpEvent};
use crate::runstate::RunState;
use crate::state::{Generation, Outcome, Shared};
use crate::status::MigrationStatus;
use crate::transport::{connect, connect_with, Connection, MigrationUri};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wire::command::{write_command, Command};
use wire::config::{write_configuration, Configuration};
use wire::section::{
    write_end, write_eof, write_file_header, write_footer, write_full, write_part, write_start,
    write_vmdesc,
};
use wire::vmstate::{vmdesc_json, DeviceDesc};
use wire::StreamWriter;

/// Longest a precopy round runs before the engine looks at the state again.
const ROUND: Duration = Duration::from_millis(50);
/// How long the switchover waits for answers to its [`Backlog`] PINGs when
/// `x-livemig-stall-timeout` is off.
const DEFAULT_SILENCE: Duration = Duration::from_secs(30);
/// Section ids: `ram` and `dirty-bitmap` as QEMU 7.2's `-M none`; devices follow.
const RAM_SECTION_ID: u32 = 2;
const BITMAP_SECTION_ID: u32 = 3;
/// Bytes of dirty-bitmap chunks per PART section in postcopy: small, so that a requested
/// page (sent between sections without preempt) never waits long behind bitmap data.
const POSTCOPY_BITMAP_SLICE: u64 = 64 * 1024;
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
    /// `tls-creds`, `tls-hostname`, `tls-authz` as they were when `migrate` ran (a postcopy
    /// recovery reads them again when it connects).
    pub tls: crate::secure::TlsParams,
    /// Where the credentials are looked up.
    pub objects: Arc<tls::Objects>,
}

/// What the migration changed on the source, so cleanup knows what to undo.
#[derive(Default)]
struct Undo {
    /// The guest was running when the engine stopped it.
    stopped_running_guest: bool,
    /// The guest was stopped by the engine at all.
    stopped: bool,
    /// Disks were inactivated.
    inactivated: bool,
    /// The postcopy package went out: the destination may be running the guest, so the
    /// source must never take it back (no reactivation, no resume), whatever happens next.
    handed_over: bool,
    /// The whole stream went out (EOF and trailer written and flushed): from here on the
    /// destination may have everything it needs to run the guest.
    stream_sent: bool,
    /// After the whole stream, the destination said nothing within the stall bound: whether
    /// it runs the guest is unknown, so the source must not.
    verdict_unknown: bool,
}

/// One outgoing migration: what it owns, phase by phase (see the module doc).
pub(crate) struct Outgoing {
    job: Job,
    /// The connected channel (from [`Outgoing::connect`]).
    conn: Option<Connection>,
    /// The stream, until the switchover has written its end.
    w: Option<Writer>,
    /// Messages from the return-path thread, when the return path is open.
    rp: Option<mpsc::Receiver<RpEvent>>,
    /// The `ram` section's saver (from [`Outgoing::setup`]).
    ram: Option<RamSaver>,
    /// The `dirty-bitmap` section's saver, when bitmaps migrate.
    bitmaps: Option<BitmapSaver>,
    undo: Undo,
    /// When the guest stopped, and the stream's length then.
    downtime_start: Option<(Instant, u64)>,
    /// The `postcopy-preempt` channel, connected right after the main one (QEMU 7.2 opens it
    /// at setup), until the postcopy switch hands it to the [`PreemptSender`].
    preempt_conn: Option<Connection>,
    /// What the return-path thread needs once postcopy runs.
    rp_ctx: Arc<RpCtx>,
    /// Bytes written on the channels a postcopy recovery replaced (`ram.transferred` counts
    /// every channel).
    written_base: u64,
    /// `ram.transferred` when postcopy began (`postcopy-bytes` counts from there).
    postcopy_base: u64,
    /// `x-livemig-stall-timeout` as it was at `migrate`: the longest a write, or the wait for
    /// the destination's verdict, may go without the channel moving.
    stall: Option<Duration>,
    /// How the guest changed hands, once that is known (`x-livemig-handover`).
    handover: Option<Handover>,
    /// The multifd channels, started after the main channel connected, until
    /// [`Outgoing::setup`] gives them to the `ram` saver.
    multifd: Option<crate::multifd::send::Sender>,
}

/// The name of the machine's first RAM block, if it has any.
fn job_first_block(job: &Job) -> Option<String> {
    job.machine
        .ram_blocks()
        .first()
        .map(|b| b.name().to_string())
}

fn gone(what: &str) -> MigrationError {
    MigrationError::Other(format!("internal error: {what} is missing"))
}

/// Runs one outgoing migration to its end.
pub(crate) fn run(job: Job) {
    let mut out = Outgoing::new(job);
    let result = out.migrate();
    out.cleanup(result);
}

impl Outgoing {
    fn new(job: Job) -> Self {
        Outgoing {
            job,
            conn: None,
            w: None,
            rp: None,
            ram: None,
            bitmaps: None,
            undo: Undo::default(),
            downtime_start: None,
            preempt_conn: None,
            rp_ctx: Arc::default(),
            written_base: 0,
            postcopy_base: 0,
            stall: None,
            handover: None,
            multifd: None,
        }
    }

    /// Every phase, in order; the first error ends the migration.
    fn migrate(&mut self) -> Result<(), MigrationError> {
        self.connect()?;
        self.setup()?;
        match self.iterate()? {
            Next::Switchover => self.switchover()?,
            Next::Postcopy => {
                let lost = self.postcopy_switch()?;
                self.postcopy_run(lost)?;
            }
        }
        self.complete()
    }

    /// The stream and the `ram` saver (both exist from [`Outgoing::setup`] on), with the
    /// bitmap saver if bitmaps migrate.
    fn stream(
        &mut self,
    ) -> Result<(&mut Writer, &mut RamSaver, Option<&mut BitmapSaver>), MigrationError> {
        let w = self.w.as_mut().ok_or_else(|| gone("the stream"))?;
        let ram = self.ram.as_mut().ok_or_else(|| gone("the ram saver"))?;
        Ok((w, ram, self.bitmaps.as_mut()))
    }

    /// Phase 1: connects the channel, holding nothing, and opens the return path.
    fn connect(&mut self) -> Result<(), MigrationError> {
        let job = &self.job;
        let (stall, auto_rp) = {
            let inner = job.shared.lock();
            (
                inner.params.stall_timeout(),
                inner.params.auto_return_path(),
            )
        };
        self.stall = stall;
        let postcopy = job.caps.has(Capability::PostcopyRam);
        // The return path: asked for (capability, postcopy) on any transport that can carry
        // one — over `exec:` the command's stdout, as in QEMU 7.2 — and opened by default
        // over sockets (`x-livemig-auto-return-path`), so the source learns the destination's
        // verdict before it gives the guest up.
        if postcopy && !job.uri.is_socket_channel() {
            // Postcopy cannot work without page requests (QEMU's words); livemig takes them
            // over sockets only.
            return Err(MigrationError::Other(
                "Unable to open return-path for postcopy".into(),
            ));
        }
        let asked = job.caps.has(Capability::ReturnPath) || postcopy;
        if asked && !job.uri.has_return_path() {
            // Asked for and impossible: refused, not silently left unused.
            return Err(MigrationError::Other(
                "Unable to open return-path: a file: migration carries nothing back (capability 'return-path')".into(),
            ));
        }
        let use_rp = asked || (auto_rp && job.uri.is_socket_channel());
        let conn = connect_with(&job.uri, use_rp)?;
        job.shared.attach_channel(job.generation, &conn.shutdown)?;
        // A write that moves nothing for the bound fails (the guest then resumes).
        conn.shutdown.set_stall_timeout(false, true, stall);
        // The handshake runs with the channel attached, so a cancel ends it too.
        let mut conn =
            crate::secure::secure_outgoing(conn, &job.uri, &job.tls, &job.objects, stall)?;
        let stream = conn.writer.take().ok_or_else(|| {
            MigrationError::Other("the transport has no outgoing direction".into())
        })?;
        if use_rp {
            let reader = conn
                .reader
                .take()
                .ok_or_else(|| MigrationError::Other("the transport has no return path".into()))?;
            self.rp = Some(spawn_return_path(reader, self.rp_ctx.clone())?);
        }
        if job.caps.has(Capability::PostcopyPreempt) {
            // QEMU 7.2 connects the preempt channel at setup, right after the main one, so
            // the destination's second accepted connection is it (`postcopy_preempt_setup`).
            if !job.uri.is_socket() {
                return Err(MigrationError::Other(
                    "Postcopy preempt is not supported as current migration stream does not support multi-channels.".into(),
                ));
            }
            let p = connect(&job.uri)?;
            let p = crate::secure::secure_outgoing(p, &job.uri, &job.tls, &job.objects, stall)?;
            self.preempt_conn = Some(p);
        }
        self.w = Some(StreamWriter::with_capacity(stream, 256 * 1024));
        self.conn = Some(conn);
        self.connect_multifd()
    }

    /// Phase 1, multifd: after the main channel (QEMU 7.2's destination takes the first
    /// connection as the main one), starts a thread per channel, which connects, registers
    /// the channel for a cancel, secures it and sends its handshake.
    fn connect_multifd(&mut self) -> Result<(), MigrationError> {
        let job = &self.job;
        let (config, stall) = {
            let inner = job.shared.lock();
            (
                crate::multifd::MultifdConfig::from_settings(&job.caps, &inner.params),
                inner.params.stall_timeout(),
            )
        };
        let Some(config) = config else {
            return Ok(());
        };
        if !job.uri.is_socket() {
            return Err(MigrationError::Other(
                crate::multifd::PROTOCOL_REFUSED.into(),
            ));
        }
        if config.zero_copy {
            // QEMU checks the main channel's socket when it connects.
            let main = self.conn.as_ref().and_then(|c| c.shutdown.socket());
            if !main.is_some_and(|fd| crate::multifd::zerocopy::supported(&fd)) {
                return Err(MigrationError::Other(
                    crate::multifd::zerocopy::NOT_SUPPORTED.into(),
                ));
            }
        }
        let (shared, generation) = (job.shared.clone(), job.generation);
        let (uri, tls, objects) = (job.uri.clone(), job.tls.clone(), job.objects.clone());
        let open: crate::multifd::send::Opener = Arc::new(move |_id| {
            let conn = connect(&uri)?;
            shared.attach_extra_channel(generation, &conn.shutdown)?;
            // As the main channel: a write that moves nothing for the bound fails; and so
            // does a TLS handshake whose peer never answers.
            conn.shutdown.set_stall_timeout(tls.enabled(), true, stall);
            crate::secure::secure_outgoing(conn, &uri, &tls, &objects, stall)
        });
        let (shared, generation) = (job.shared.clone(), job.generation);
        let cancelled: crate::multifd::send::Cancelled =
            Arc::new(move || shared.out_cancelled(generation));
        self.multifd = Some(crate::multifd::send::Sender::start(
            &config,
            open,
            job.stats.multifd.clone(),
            cancelled,
        )?);
        Ok(())
    }

    /// Phase 2: header, configuration and the START sections, with the guest running; then
    /// `active`.
    fn setup(&mut self) -> Result<(), MigrationError> {
        let setup_start = Instant::now();
        let (job, has_rp) = (&self.job, self.rp.is_some());
        let w = self.w.as_mut().ok_or_else(|| gone("the stream"))?;
        write_file_header(w)?;
        let mut config = Configuration::new(job.machine.machine_type());
        let validated: Vec<String> = job
            .caps
            .list()
            .into_iter()
            .filter(|(c, on)| *on && c.is_validated())
            .map(|(c, _)| c.as_str().to_string())
            .collect();
        if !validated.is_empty() {
            config.capabilities = Some(validated);
        }
        write_configuration(w, &config)?;
        if has_rp {
            write_command(w, &Command::OpenReturnPath)?;
            write_command(w, &Command::Ping(1))?;
        }
        if job.caps.has(Capability::PostcopyRam) {
            // Page sizes: every block is plain 4 KiB RAM.
            write_command(
                w,
                &Command::PostcopyAdvise(Some(wire::command::PostcopyAdvise {
                    ram_pagesize_summary: crate::guest::PAGE_SIZE,
                    target_page_size: crate::guest::PAGE_SIZE,
                })),
            )?;
        } else if job.caps.has(Capability::DirtyBitmaps) {
            // QEMU sends this whenever dirty-bitmaps is on (bitmaps are postcopiable); a QEMU
            // destination expects the 0-byte form.
            write_command(w, &Command::PostcopyAdvise(None))?;
        }
        let ram = self.ram.insert(RamSaver::new(
            job.machine.ram_blocks(),
            job.stats.ram.clone(),
        ));
        if let Some(m) = self.multifd.take() {
            ram.attach_multifd(m);
        }
        let integrity = job.caps.has(Capability::XLivemigIntegrity);
        ram.set_integrity(integrity);
        job.stats.total.store(ram.total_bytes(), Ordering::Relaxed);
        write_start(w, RAM_SECTION_ID, RAM_IDSTR, 0, RAM_VERSION)?;
        ram.setup(w)?;
        write_footer(w, RAM_SECTION_ID)?;
        if job.caps.has(Capability::DirtyBitmaps) {
            if let Some(layer) = job.machine.block_layer() {
                let mapping = job.shared.lock().params.block_bitmap_mapping.clone();
                let saver = BitmapSaver::setup(layer, mapping.as_ref())?;
                if saver.is_active() {
                    // Kept before anything can fail, so cleanup releases the bitmaps.
                    let saver = self.bitmaps.insert(saver);
                    saver.set_integrity(integrity);
                    write_start(
                        w,
                        BITMAP_SECTION_ID,
                        crate::bitmaps::BITMAP_IDSTR,
                        0,
                        crate::bitmaps::BITMAP_VERSION,
                    )?;
                    saver.save_setup(w)?;
                    write_footer(w, BITMAP_SECTION_ID)?;
                } else {
                    saver.cleanup(false);
                }
            }
        }
        if job.caps.has(Capability::Events) {
            job.shared
                .events
                .emit("MIGRATION_PASS", Some(json!({ "pass": 1 })));
        }
        job.stats.ram.dirty_syncs.store(1, Ordering::Relaxed);
        w.flush()?;
        job.shared.lock().out.setup_ms = Some(setup_start.elapsed().as_millis() as u64);
        job.shared.advance(job.generation, MigrationStatus::Active)
    }

    /// Phase 3: precopy rounds while the guest runs, until [`Convergence`] says what
    /// remains can be sent in the downtime.
    fn iterate(&mut self) -> Result<Next, MigrationError> {
        let (shared, generation, stats) = (
            self.job.shared.clone(),
            self.job.generation,
            self.job.stats.clone(),
        );
        let events = self.job.caps.has(Capability::Events);
        let machine = self.job.machine.clone();
        let auto_converge = self.job.caps.has(Capability::AutoConverge);
        let ram_postcopy = self.job.caps.has(Capability::PostcopyRam);
        // With a return path, the destination's progress is measured (see `Backlog`).
        let rp_ctx = self.rp.is_some().then(|| self.rp_ctx.clone());
        let mut backlog = Backlog::default();
        // A destination that answers nothing for this long is not measured any more.
        let silence = self.stall.unwrap_or(DEFAULT_SILENCE);
        let mut unmeasured = false;
        let (w, ram, bitmaps) = self.stream()?;
        // Bytes sent count the multifd channels' too.
        let mut meter = Meter::new(ram.sent_bytes(w));
        let mut last_sync = Instant::now();
        let mut convergence = Convergence::default();
        let mut throttle = AutoConverge::new(last_sync, w.bytes_written());
        loop {
            if shared.out_cancelled(generation) {
                return Err(MigrationError::Cancelled);
            }
            let (max_bw, downtime_ms, postcopy) = {
                let inner = shared.lock();
                (
                    inner.params.max_bandwidth(),
                    inner.params.downtime_limit_ms(),
                    inner.out.postcopy_requested,
                )
            };
            // With postcopy-ram all of RAM can follow the switch, so QEMU's condition
            // (`must_precopy <= threshold`) always holds: switch at once. In a bitmap-only
            // postcopy RAM must converge first (below, at the end of a pass).
            if postcopy && ram_postcopy {
                return Ok(Next::Postcopy);
            }
            let allowance = meter.allowance(ram.sent_bytes(w), max_bw);
            if allowance == 0 {
                // Before the switch a request for it ends the wait; after it, only a cancel.
                if shared.sleep_unless_cancelled_or_postcopy(
                    generation,
                    meter.window_left(),
                    !postcopy,
                ) {
                    return Err(MigrationError::Cancelled);
                }
                meter.tick(ram.sent_bytes(w), sent_pages(&stats), &stats);
                continue;
            }
            write_part(w, RAM_SECTION_ID)?;
            let outcome = ram.send(w, allowance, Some(Instant::now() + ROUND))?;
            ram.end_section(w)?;
            write_footer(w, RAM_SECTION_ID)?;
            if rp_ctx.is_some() {
                // Answered once the destination has consumed everything before it.
                let ping = backlog.ping(ram.sent_bytes(w), Instant::now());
                write_command(w, &Command::Ping(ping))?;
            }
            w.flush()?;
            stats
                .transferred
                .store(w.bytes_written(), Ordering::Relaxed);
            meter.tick(ram.sent_bytes(w), sent_pages(&stats), &stats);

            // Bandwidth for the switchover decision: the measured rate, or the cap before the
            // first window closes; no more than the destination consumes while it is behind.
            let bw = if meter.bytes_per_sec > 0.0 {
                meter.bytes_per_sec
            } else if max_bw > 0 {
                max_bw as f64
            } else {
                1e9
            };
            if let Some(ctx) = &rp_ctx {
                ctx.take_answer(&mut backlog);
            }
            // A return path that carries no answers (a command that passes nothing back):
            // decided as QEMU decides, without the backlog, rather than never.
            let measured = rp_ctx.is_some() && backlog.silent_for(Instant::now()) < silence;
            if !measured && rp_ctx.is_some() && !unmeasured {
                unmeasured = true;
                log::warn!(
                    "the destination answered no PING for {} ms: the switchover no longer counts what it has not consumed",
                    silence.as_millis()
                );
            }
            let (bw, unconsumed) = if measured {
                // What the destination has not consumed yet must be, before it can run the
                // guest: it is part of what remains.
                (backlog.bandwidth(bw), backlog.unconsumed(ram.sent_bytes(w)))
            } else {
                (bw, 0)
            };
            let bitmap_bytes = bitmaps.as_ref().map_or(0, |b| b.pending_bytes());
            stats.bitmap_bytes.store(bitmap_bytes, Ordering::Relaxed);
            let pending = (ram.remaining_pages() * crate::guest::PAGE_SIZE
                + bitmap_bytes
                + unconsumed) as f64;
            if bw > 0.0 {
                stats
                    .expected_downtime_ms
                    .store((pending / bw * 1000.0) as u64, Ordering::Relaxed);
            }
            if outcome == SendOutcome::PassDone {
                let dirty = ram.sync();
                if auto_converge {
                    // As QEMU's period counter: the pages this sync newly marked dirty.
                    let params = shared.lock().params.throttle();
                    let sent = stats.transferred.load(Ordering::Relaxed);
                    let dirty_bytes =
                        stats.ram.last_sync_dirty.load(Ordering::Relaxed) * crate::guest::PAGE_SIZE;
                    if let Some(pct) =
                        throttle.after_sync(Instant::now(), sent, dirty_bytes, &params)
                    {
                        log::info!("auto-converge: throttling the vCPUs to {pct} %");
                        machine.throttle_vcpus(pct);
                        stats
                            .cpu_throttle_percentage
                            .store(u64::from(pct), Ordering::Relaxed);
                    }
                }
                let el = last_sync.elapsed().as_secs_f64().max(1e-3);
                let new_dirty = stats.ram.last_sync_dirty.load(Ordering::Relaxed);
                stats
                    .dirty_pages_rate
                    .store((new_dirty as f64 / el) as u64, Ordering::Relaxed);
                last_sync = Instant::now();
                if events {
                    let pass = stats.ram.dirty_syncs.load(Ordering::Relaxed);
                    shared
                        .events
                        .emit("MIGRATION_PASS", Some(json!({ "pass": pass })));
                }
                let pending = (dirty * crate::guest::PAGE_SIZE + bitmap_bytes + unconsumed) as f64;
                if bw > 0.0 {
                    stats
                        .expected_downtime_ms
                        .store((pending / bw * 1000.0) as u64, Ordering::Relaxed);
                }
                // QEMU 7.2's `migration_iteration_run`: once postcopy is requested and what
                // must go in precopy (RAM, in a bitmap-only postcopy) fits in the downtime,
                // the migration switches to postcopy while something (the bitmaps) is left to
                // follow the switch, before it considers completing in precopy: a requested
                // postcopy with bitmaps to send is entered, however little RAM remains.
                let ram_pending = (dirty * crate::guest::PAGE_SIZE) as f64;
                // A request that arrived during the pass counts now.
                let postcopy = postcopy || shared.lock().out.postcopy_requested;
                let ram_fits = ram_pending <= bw * downtime_ms as f64 / 1000.0;
                if postcopy && ram_fits && bitmap_bytes > 0 {
                    return Ok(Next::Postcopy);
                }
                log::debug!(
                    "pass {}: {} bytes dirty, {unconsumed} sent and not consumed yet, {bw:.0} bytes/s (the destination's: {:?})",
                    stats.ram.dirty_syncs.load(Ordering::Relaxed),
                    dirty * crate::guest::PAGE_SIZE,
                    backlog.rate()
                );
                if convergence.switch_now(pending, bw, downtime_ms) {
                    return Ok(Next::Switchover);
                }
                if postcopy && ram_fits {
                    return Ok(Next::Postcopy);
                }
                if let (Some(ctx), true) = (&rp_ctx, measured && ram_fits && unconsumed > 0) {
                    // What is dirty fits, what the destination has not consumed does not: let
                    // it catch up (for as long as that should take, a round at least and a
                    // second at most; the guest runs on) instead of starting pass after pass
                    // over a clean bitmap.
                    let drain = Duration::from_secs_f64((unconsumed as f64 / bw).min(1.0));
                    let until = Instant::now() + drain.max(ROUND);
                    while !backlog.caught_up() && Instant::now() < until {
                        let cancelled =
                            shared.sleep_unless_cancelled(generation, Duration::from_millis(5));
                        if cancelled {
                            return Err(MigrationError::Cancelled);
                        }
                        ctx.take_answer(&mut backlog);
                    }
                }
            }
        }
    }

    /// Phase 4: stops the guest, waits in `pre-switchover` if asked to, enters `device`,
    /// inactivates the disks and writes the rest of the stream: the END sections, the device
    /// state, EOF and the vmdesc trailer. Then closes the sending direction.
    fn switchover(&mut self) -> Result<(), MigrationError> {
        let (machine, stats) = (self.job.machine.clone(), self.job.stats.clone());
        let globalstate = self.stop_guest(MigrationStatus::Device)?;
        let written = self.downtime_start.map_or(0, |(_, b)| b);

        let (w, ram, bitmaps) = self.stream()?;
        write_ram_end(w, ram)?;
        let total_multifd = stats.multifd.bytes.load(Ordering::Relaxed);
        if let Some(b) = bitmaps {
            write_end(w, BITMAP_SECTION_ID)?;
            b.save_complete(w)?;
            write_footer(w, BITMAP_SECTION_ID)?;
        }
        let described = write_devices(w, &*machine, globalstate)?;
        write_eof(w)?;
        write_vmdesc(
            w,
            vmdesc_json(crate::guest::PAGE_SIZE, &described, None).as_bytes(),
        )?;
        w.flush()?;
        let total = w.bytes_written();
        stats.transferred.store(total, Ordering::Relaxed);
        stats.downtime_bytes.store(
            (total + total_multifd).saturating_sub(written),
            Ordering::Relaxed,
        );
        self.undo.stream_sent = true;
        // The end of the stream: an `exec:` child sees its input close, a socket peer sees
        // the end of the data.
        self.w = None;
        if let Some(conn) = &self.conn {
            conn.shutdown.shutdown_write();
        }
        Ok(())
    }

    /// The start of every switchover: stops the guest (remembering its run state for
    /// `globalstate`) and inactivates the disks. `next` is the state the switchover runs in:
    /// `device` for precopy, `postcopy-active` for postcopy. As QEMU 7.2
    /// (`migration_maybe_pause`), with `pause-before-switchover` the source waits in
    /// `pre-switchover` after the stop and enters `next` on `migrate-continue`; without it,
    /// precopy stays `active` (there is no `device` state then) and postcopy enters
    /// `postcopy-active` before the guest stops.
    fn stop_guest(&mut self, next: MigrationStatus) -> Result<Arc<GlobalState>, MigrationError> {
        let (shared, machine, generation, stats) = (
            self.job.shared.clone(),
            self.job.machine.clone(),
            self.job.generation,
            self.job.stats.clone(),
        );
        // The multifd channels' bytes count as well (all written: a sync point came last).
        let written = self.w.as_ref().map_or(0, |w| w.bytes_written())
            + stats.multifd.bytes.load(Ordering::Relaxed);
        stats.precopy_bytes.store(written, Ordering::Relaxed);
        let pause = self.job.caps.has(Capability::PauseBeforeSwitchover);
        if !pause && next == MigrationStatus::PostcopyActive {
            shared.advance(generation, next)?;
        }
        let before = machine.runstate();
        self.undo.stopped_running_guest = before.is_running();
        let globalstate = Arc::new(GlobalState::default());
        globalstate.store(if before.is_running() {
            RunState::Running
        } else {
            before
        });
        machine.stop(RunState::FinishMigrate);
        self.undo.stopped = true;
        self.downtime_start = Some((Instant::now(), written));

        if pause {
            // With a return path, the wait keeps the channel alive with PINGs, so that the
            // destination's stall bound does not run out while management takes its time.
            let keepalive = match (&self.rp, self.w.as_mut(), self.stall) {
                (Some(_), Some(w), Some(t)) => Some((w, t / 3)),
                _ => None,
            };
            wait_for_continue(
                &shared,
                generation,
                self.rp.as_ref(),
                keepalive,
                self.ram.as_ref().and_then(|r| r.multifd()),
            )?;
            shared.advance(generation, next)?;
        }
        machine.inactivate_disks().map_err(|e| {
            MigrationError::Other(format!("Block inactivate failed during switchover: {e}"))
        })?;
        self.undo.inactivated = true;
        Ok(globalstate)
    }

    /// Phase 4, postcopy (QEMU's `postcopy_start`): stop the guest as for a switchover, send
    /// what cannot follow the switch (the dirty bitmaps, for now), tell the destination which
    /// pages to throw away (still dirty here), then the device state wrapped in a package
    /// with LISTEN before it and RUN after it — all of it in `postcopy-active`, entered as
    /// [`Outgoing::stop_guest`] says. Returns the error of a link lost while the package
    /// went out, which [`Outgoing::postcopy_run`] pauses on.
    fn postcopy_switch(&mut self) -> Result<Option<MigrationError>, MigrationError> {
        let (shared, machine, stats) = (
            self.job.shared.clone(),
            self.job.machine.clone(),
            self.job.stats.clone(),
        );
        let globalstate = self.stop_guest(MigrationStatus::PostcopyActive)?;
        let ram_postcopy = self.job.caps.has(Capability::PostcopyRam);
        if ram_postcopy {
            // The dirty bitmaps are postcopiable (as QEMU's): they follow the switch, in
            // postcopy's PART sections, out of the downtime.
            let first_block = job_first_block(&self.job);
            let (w, ram, _) = self.stream()?;
            ram.sync();
            let mut discards = ram.discard_commands();
            if discards.is_empty() {
                // Nothing to discard (every page went out in precopy and none was written
                // since): one empty range all the same. QEMU 7.2's destination, seeing LISTEN
                // without a discard first, moves its postcopy state back to "discard" and then
                // refuses RUN ("CMD_POSTCOPY_RUN in wrong postcopy state (2)").
                if let Some(name) = first_block {
                    discards.push(Command::PostcopyRamDiscard {
                        ramblock: name,
                        ranges: vec![wire::command::DiscardRange {
                            start: 0,
                            length: 0,
                        }],
                    });
                }
            }
            for cmd in discards {
                write_command(w, &cmd)?;
            }
            write_command(w, &Command::Ping(2))?;
            // From here on the pages still to send are shared with the return-path thread, which
            // answers requests on the preempt channel itself; both are ready before LISTEN goes
            // out (no request can come earlier).
            let src = Arc::new(SourceRam::new(ram.take_dirty(), stats.ram.clone()));
            let _ = self.rp_ctx.src.set(src.clone());
            if let Some(mut conn) = self.preempt_conn.take() {
                let pw = conn.writer.take().ok_or_else(|| {
                    MigrationError::Other("the preempt channel has no outgoing direction".into())
                })?;
                let sender = PreemptSender::new(
                    src,
                    StreamWriter::with_capacity(pw, 64 * 1024),
                    conn.shutdown.clone(),
                );
                let _ = self.rp_ctx.preempt.set(Arc::new(sender));
            }
        } else {
            // A bitmap-only postcopy (QEMU's `postcopy_start` without postcopy-ram): RAM is
            // not postcopiable, so its END goes out now with every page still dirty, as at a
            // switchover; no discard, no PINGs. Only the bitmaps follow the switch.
            let (w, ram, _) = self.stream()?;
            write_ram_end(w, ram)?;
        }
        // The package: the destination reads it whole before loading it, so that its main
        // channel is free for the pages device loading may fault on.
        let buf = SharedBuf::default();
        let mut pw: Writer = StreamWriter::new(Box::new(buf.clone()));
        write_command(&mut pw, &Command::PostcopyListen)?;
        write_devices(&mut pw, &*machine, globalstate)?;
        if ram_postcopy {
            write_command(&mut pw, &Command::Ping(3))?;
        }
        write_command(&mut pw, &Command::PostcopyRun)?;
        pw.flush()?;
        drop(pw);
        // Last point where the source can take the guest back (QEMU's `restart_block`).
        self.undo.handed_over = true;
        let (w, _, _) = self.stream()?;
        let sent = write_command(w, &Command::Packaged(buf.take()))
            .and_then(|()| {
                if ram_postcopy {
                    write_command(w, &Command::Ping(4))
                } else {
                    Ok(())
                }
            })
            .and_then(|()| w.flush());
        if let Err(e) = sent {
            if !ram_postcopy {
                return Err(e.into());
            }
            // Some or all of the package may be on the destination, which then runs the
            // guest: failing here would leave its RAM split with nothing to resume. The
            // push pauses on this first (`migrate-pause`, a cut), and a recovery goes on.
            return Ok(Some(e.into()));
        }
        let written = w.bytes_written();
        stats.transferred.store(written, Ordering::Relaxed);
        if let Some((t, b)) = self.downtime_start {
            stats.downtime_bytes.store(written - b, Ordering::Relaxed);
            // QEMU measures postcopy's downtime up to the package.
            shared.lock().out.downtime_ms = Some(t.elapsed().as_millis() as u64);
        }
        Ok(None)
    }

    /// Phase 4b, postcopy: the pages the destination asks for first, the rest in the
    /// background at `max-postcopy-bandwidth`, then END, EOF and the destination's SHUT
    /// ([`Outgoing::postcopy_push`]). A failure of the link (or `migrate-pause`) pauses
    /// instead of failing: both ends keep everything, and `migrate ... resume=true` resumes
    /// ([`Outgoing::postcopy_pause`]); repeated cuts recover repeatedly. `lost`: the link was
    /// lost while the package went out (the destination may run the guest already): pause on
    /// it first, as on any lost link.
    fn postcopy_run(&mut self, mut lost: Option<MigrationError>) -> Result<(), MigrationError> {
        if !self.job.caps.has(Capability::PostcopyRam) {
            return self.bitmaps_push();
        }
        let src = self
            .rp_ctx
            .src
            .get()
            .cloned()
            .ok_or_else(|| gone("postcopy's RAM"))?;
        let preempt = self.rp_ctx.preempt.get().cloned();
        let mut rp = self.rp.take().ok_or_else(|| gone("the return path"))?;
        self.postcopy_base = self.w.as_ref().map_or(0, |w| w.bytes_written());
        if let Some(conn) = &self.conn {
            crate::postcopy::limit_socket_queue(
                &conn.shutdown,
                true,
                crate::postcopy::MAIN_CHANNEL_QUEUE,
            );
        }
        loop {
            let pushed = match lost.take() {
                Some(e) => Err(e),
                None => self.postcopy_push(&src, preempt.as_deref(), &rp),
            };
            let e = match pushed {
                Ok(()) => break,
                Err(e) => e,
            };
            let fatal = matches!(
                e,
                MigrationError::Cancelled | MigrationError::SiblingError(_)
            ) || !self.job.caps.has(Capability::PostcopyRam);
            if fatal {
                return Err(e);
            }
            rp = self.postcopy_pause(e, &src, preempt.as_deref())?;
        }
        // The destination said SHUT 0 already.
        self.handover = Some(Handover::Confirmed);
        self.rp = None;
        self.w = None;
        Ok(())
    }

    /// Phase 4b of a bitmap-only postcopy: the bitmaps' bits in PART slices at
    /// `max-postcopy-bandwidth`, then their END (a COMPLETE per bitmap, as QEMU's
    /// `qemu_savevm_state_complete_postcopy`) and EOF without vmdesc; [`Outgoing::complete`]
    /// then waits for the verdict as after a precopy. The guest runs on the destination with
    /// all of its RAM, so there is nothing to recover: a failure here fails the migration (the
    /// destination completes without the bitmaps still in flight, and names them).
    fn bitmaps_push(&mut self) -> Result<(), MigrationError> {
        let (shared, generation, stats) = (
            self.job.shared.clone(),
            self.job.generation,
            self.job.stats.clone(),
        );
        let w = self.w.as_mut().ok_or_else(|| gone("the stream"))?;
        let postcopy_base = w.bytes_written();
        self.postcopy_base = postcopy_base;
        let mut meter = Meter::new(postcopy_base);
        if let Some(b) = self.bitmaps.as_mut() {
            while b.bits_remaining() {
                let max_bw = shared.lock().params.max_postcopy_bandwidth();
                let allowance = meter.allowance(w.bytes_written(), max_bw);
                if allowance == 0 {
                    let wait = meter.window_left().max(Duration::from_millis(1));
                    if shared.sleep_unless_cancelled(generation, wait) {
                        return Err(MigrationError::Cancelled);
                    }
                    meter.tick(w.bytes_written(), sent_pages(&stats), &stats);
                    continue;
                }
                write_part(w, BITMAP_SECTION_ID)?;
                b.save_part(w, allowance.min(POSTCOPY_BITMAP_SLICE))?;
                write_footer(w, BITMAP_SECTION_ID)?;
                w.flush()?;
                let now = w.bytes_written();
                stats.transferred.store(now, Ordering::Relaxed);
                stats
                    .postcopy_bytes
                    .store(now.saturating_sub(postcopy_base), Ordering::Relaxed);
                meter.tick(now, sent_pages(&stats), &stats);
            }
            write_end(w, BITMAP_SECTION_ID)?;
            b.save_complete(w)?;
            write_footer(w, BITMAP_SECTION_ID)?;
        }
        // QEMU's postcopy stream ends without a vmdesc trailer.
        write_eof(w)?;
        w.flush()?;
        let now = w.bytes_written();
        stats.transferred.store(now, Ordering::Relaxed);
        stats
            .postcopy_bytes
            .store(now.saturating_sub(postcopy_base), Ordering::Relaxed);
        self.undo.stream_sent = true;
        self.w = None;
        if let Some(conn) = &self.conn {
            conn.shutdown.shutdown_write();
        }
        Ok(())
    }

    /// Sends postcopy's pages on the current channel until every one is out, then END, EOF,
    /// EOS on the preempt channel, and waits for the destination's SHUT.
    fn postcopy_push(
        &mut self,
        src: &SourceRam,
        preempt: Option<&PreemptSender>,
        rp: &mpsc::Receiver<RpEvent>,
    ) -> Result<(), MigrationError> {
        let (shared, generation, stats) = (
            self.job.shared.clone(),
            self.job.generation,
            self.job.stats.clone(),
        );
        // Background pages per PART: without preempt a requested page waits behind at most
        // one batch in this process (the socket's own queue is another matter); with it, a
        // page the guest asks for while it is claimed and not yet written waits for it on the
        // main channel (the source sends each page once).
        let batch_pages = if preempt.is_some() {
            (POSTCOPY_PREEMPT_BATCH / crate::guest::PAGE_SIZE) as usize
        } else {
            (POSTCOPY_BATCH / crate::guest::PAGE_SIZE) as usize
        };
        let base = self.written_base;
        let postcopy_base = self.postcopy_base;
        let w = self.w.as_mut().ok_or_else(|| gone("the stream"))?;
        let start_bytes = w.bytes_written();
        let mut meter = Meter::new(start_bytes);
        let mut pending: Vec<(usize, u64, u64)> = Vec::new();
        // A new connection: its first record names its block.
        let mut pages = PageWriter::new();
        let mut cursor = Cursor::default();
        let mut batch = Vec::with_capacity(batch_pages);
        // A recovery's new stream sends the bitmaps' bits again from the first chunk (what
        // the old one lost is covered). At the switch the names go on from the START chunks,
        // as QEMU's do.
        let mut bitmaps = self.bitmaps.as_mut();
        if base > 0 {
            if let Some(b) = bitmaps.as_deref_mut() {
                b.restart();
            }
        }
        loop {
            let max_bw = shared.lock().params.max_postcopy_bandwidth();
            let allowance = meter.allowance(w.bytes_written(), max_bw);
            // Wait for a request only when the background may not send now.
            let wait = if allowance == 0 {
                meter.window_left().max(Duration::from_micros(100))
            } else {
                Duration::ZERO
            };
            drain_requests(rp, &mut pending, wait)?;
            if pending.is_empty() && allowance == 0 {
                meter.tick(w.bytes_written(), sent_pages(&stats), &stats);
                continue;
            }
            write_part(w, RAM_SECTION_ID)?;
            for (bi, first, end) in pending.drain(..) {
                batch.clear();
                batch.extend((first..end).filter(|p| src.claim(bi, *p)).map(|p| (bi, p)));
                if batch.is_empty() {
                    stats
                        .ram
                        .requested_in_flight
                        .fetch_add(1, Ordering::Relaxed);
                }
                pages.write(w, src, &batch)?;
            }
            let mut ram_done = false;
            if allowance > 0 {
                let max = (allowance.min(batch_pages as u64 * crate::guest::PAGE_SIZE)
                    / crate::guest::PAGE_SIZE)
                    .clamp(1, batch_pages as u64) as usize;
                if src.claim_next(&mut cursor, max, &mut batch) {
                    pages.write(w, src, &batch)?;
                } else if src.remaining() == 0 {
                    ram_done = true;
                } else {
                    // Pages given back behind the scan (a request the preempt channel could
                    // not answer): scan again.
                    cursor = Cursor::default();
                }
            }
            wire::ram::write_eos(w)?;
            write_footer(w, RAM_SECTION_ID)?;
            // Then a slice of the bitmaps' bits, under the same bandwidth limit.
            let mut bits_done = true;
            if let Some(b) = bitmaps.as_deref_mut() {
                if b.bits_remaining() && allowance > 0 {
                    write_part(w, BITMAP_SECTION_ID)?;
                    bits_done = !b.save_part(w, allowance.min(POSTCOPY_BITMAP_SLICE))?;
                    write_footer(w, BITMAP_SECTION_ID)?;
                } else {
                    bits_done = !b.bits_remaining();
                }
            }
            let done = ram_done && bits_done;
            w.flush()?;
            let now = w.bytes_written();
            stats.transferred.store(base + now, Ordering::Relaxed);
            stats.postcopy_bytes.store(
                (base + now).saturating_sub(postcopy_base),
                Ordering::Relaxed,
            );
            meter.tick(now, sent_pages(&stats), &stats);
            if done {
                break;
            }
        }
        write_end(w, RAM_SECTION_ID)?;
        wire::ram::write_eos(w)?;
        write_footer(w, RAM_SECTION_ID)?;
        if let Some(b) = bitmaps {
            // QEMU's `dirty_bitmap_save_complete` in postcopy: whatever bits remain (none),
            // COMPLETE for each bitmap, EOS.
            write_end(w, BITMAP_SECTION_ID)?;
            b.save_complete(w)?;
            write_footer(w, BITMAP_SECTION_ID)?;
        }
        // QEMU's postcopy stream ends without a vmdesc trailer.
        write_eof(w)?;
        w.flush()?;
        stats
            .transferred
            .store(base + w.bytes_written(), Ordering::Relaxed);
        if let Some(p) = preempt {
            // QEMU's `postcopy_preempt_shutdown_file`: the destination's preempt thread
            // ends at this EOS.
            p.finish()?;
        }
        if let Some(conn) = &self.conn {
            conn.shutdown.shutdown_write();
        }
        if wait_for_shut(&shared, generation, rp, self.stall)? {
            Ok(())
        } else {
            // In postcopy a silent destination is a lost link like any other: pause.
            Err(MigrationError::Other(format!(
                "the destination sent no verdict for {} ms after the whole stream went out (x-livemig-stall-timeout)",
                self.stall.map_or(0, |t| t.as_millis())
            )))
        }
    }

    /// Postcopy lost its link (`e`): both channels go down, the source enters
    /// `postcopy-paused` keeping every page, and waits for `migrate ... resume=true`; then it
    /// reconnects and resumes ([`Outgoing::postcopy_resume`]). A resume that fails pauses
    /// again. Returns the new return path once `postcopy-active` again.
    fn postcopy_pause(
        &mut self,
        e: MigrationError,
        src: &SourceRam,
        preempt: Option<&PreemptSender>,
    ) -> Result<mpsc::Receiver<RpEvent>, MigrationError> {
        let (shared, generation) = (self.job.shared.clone(), self.job.generation);
        let mut why = failure_text(&self.job.uri, &e, self.stall);
        loop {
            log::error!("Detected IO failure for postcopy. Migration paused. ({why})");
            self.drop_channels(preempt);
            shared.pause_outgoing(
                generation,
                format!(
                    "postcopy paused: {why}; the guest's RAM is split between both ends: \
                     resume with migrate-recover on the same destination process and \
                     migrate ... resume=true here (a new destination cannot take over)"
                ),
            )?;
            let Some(uri) = shared.wait_resume(generation) else {
                return Err(MigrationError::Other(format!(
                    "the VM shut down while postcopy was paused ({why})"
                )));
            };
            match self.postcopy_resume(&uri, src, preempt) {
                Ok(rp) => return Ok(rp),
                Err(e) => why = format!("resume failed: {}", failure_text(&uri, &e, self.stall)),
            }
        }
    }

    /// Shuts every channel of the migration down and forgets them.
    fn drop_channels(&mut self, preempt: Option<&PreemptSender>) {
        if let Some(c) = &self.conn {
            c.shutdown.shutdown();
        }
        if let Some(p) = preempt {
            p.detach();
        }
        if let Some(w) = &self.w {
            self.written_base += w.bytes_written();
        }
        self.w = None;
    }

    /// `migrate URI resume=true`: connects the main channel (no file header: the stream
    /// goes on where it broke) and, with preempt, a new preempt channel; asks for every
    /// block's received map (RECV_BITMAP) — what the destination lacks is what remains to
    /// send — then POSTCOPY_RESUME, and waits for RESUME_ACK.
    fn postcopy_resume(
        &mut self,
        uri: &MigrationUri,
        src: &SourceRam,
        preempt: Option<&PreemptSender>,
    ) -> Result<mpsc::Receiver<RpEvent>, MigrationError> {
        let (shared, generation) = (self.job.shared.clone(), self.job.generation);
        // TLS as the parameters are now, not as they were at `migrate`: QEMU 7.2 decides
        // whether a resumed channel is upgraded, and with which credentials and host name,
        // when it connects (`migration_channel_connect`), and so does its destination when
        // `migrate-recover`'s listener accepts. A `tls-creds` set while paused secures the
        // recovery; the destination, reading its own at that point, expects the same.
        let tls = shared.lock().params.tls();
        let conn = connect(uri)?;
        shared.attach_resumed_channel(generation, &conn.shutdown);
        conn.shutdown.set_stall_timeout(false, true, self.stall);
        let mut conn =
            crate::secure::secure_outgoing(conn, uri, &tls, &self.job.objects, self.stall)?;
        let preempt_conn = match preempt {
            Some(_) => {
                let p = connect(uri)?;
                Some(crate::secure::secure_outgoing(
                    p,
                    uri,
                    &tls,
                    &self.job.objects,
                    self.stall,
                )?)
            }
            None => None,
        };
        shared.advance_recovery(generation, MigrationStatus::PostcopyRecover)?;
        let (Some(w), Some(reader)) = (conn.writer.take(), conn.reader.take()) else {
            return Err(MigrationError::Other(
                "the transport has no return path".into(),
            ));
        };
        let rp = spawn_return_path(reader, self.rp_ctx.clone())?;
        crate::postcopy::limit_socket_queue(
            &conn.shutdown,
            true,
            crate::postcopy::MAIN_CHANNEL_QUEUE,
        );
        self.conn = Some(conn);
        let w = self.w.insert(StreamWriter::with_capacity(w, 256 * 1024));
        let names: Vec<String> = src.blocks().map(|(n, _)| n.to_string()).collect();
        for name in &names {
            write_command(
                w,
                &Command::RecvBitmap {
                    ramblock: name.clone(),
                },
            )?;
        }
        w.flush()?;
        let mut synced = vec![false; names.len()];
        while synced.iter().any(|s| !s) {
            match recv_recovery(&shared, &rp)? {
                RpEvent::RecvBitmap { block, dirty } => {
                    let n = src.set_dirty(block, &dirty);
                    log::info!(
                        "postcopy recovery: block {} misses {n} pages",
                        names.get(block).map_or("?", |s| s.as_str())
                    );
                    if let Some(s) = synced.get_mut(block) {
                        *s = true;
                    }
                }
                other => return Err(unexpected_in_recovery(other)),
            }
        }
        if let (Some(p), Some(mut pc)) = (preempt, preempt_conn) {
            let pw = pc.writer.take().ok_or_else(|| {
                MigrationError::Other("the preempt channel has no outgoing direction".into())
            })?;
            p.replace(
                StreamWriter::with_capacity(pw, 64 * 1024),
                pc.shutdown.clone(),
            );
        }
        write_command(w, &Command::PostcopyResume)?;
        w.flush()?;
        match recv_recovery(&shared, &rp)? {
            RpEvent::ResumeAck(v) if v == wire::return_path::RESUME_ACK_VALUE => {}
            RpEvent::ResumeAck(v) => {
                return Err(MigrationError::Other(format!(
                    "migrate_handle_rp_resume_ack: illegal resume_ack value {v}"
                )))
            }
            other => return Err(unexpected_in_recovery(other)),
        }
        shared.advance_recovery(generation, MigrationStatus::PostcopyActive)?;
        log::info!("postcopy resumed");
        Ok(rp)
    }

    /// Phase 5: waits for the destination's verdict (with a return path) and for an `exec:`
    /// child; the source is then `postmigrate`.
    fn complete(&mut self) -> Result<(), MigrationError> {
        let job = &self.job;
        match &self.rp {
            Some(rp) => {
                if !wait_for_shut(&job.shared, job.generation, rp, self.stall)? {
                    // The stream went out whole, and nothing came back: the destination may
                    // be running the guest, or may never have got the end. Neither end can
                    // tell; the source keeps the guest stopped (see `cleanup`).
                    self.undo.verdict_unknown = true;
                    return Err(MigrationError::Other(format!(
                        "the destination sent no verdict for {} ms after the whole stream went out (x-livemig-stall-timeout); the guest stays stopped here: 'cont' it only once the destination is known not to run it",
                        self.stall.map_or(0, |t| t.as_millis())
                    )));
                }
                self.handover = Some(Handover::Confirmed);
            }
            // Postcopy confirmed it already; otherwise nobody did.
            None => {
                self.handover.get_or_insert(Handover::Unconfirmed);
            }
        }
        let confirmed = self.handover == Some(Handover::Confirmed);
        match self
            .conn
            .as_mut()
            .ok_or_else(|| gone("the channel"))?
            .finish(self.stall)
        {
            // The destination confirmed the stream: the command's end changes nothing.
            Err(e) if confirmed => log::warn!("{e}"),
            // The command had the whole stream and never ended: what it passed on, and
            // whether a destination runs the guest, is unknown (as after a silent return
            // path); the guest stays stopped here.
            Err(e) if e.to_string().starts_with(crate::transport::EXEC_TIMEOUT) => {
                self.undo.verdict_unknown = true;
                return Err(MigrationError::Other(format!(
                    "{e}; the guest stays stopped here: 'cont' it only once the destination is known not to run it"
                )));
            }
            other => other?,
        }
        let downtime = self
            .downtime_start
            .map_or(0, |(t, _)| t.elapsed().as_millis() as u64);
        // Throughput over the whole transfer, as QEMU reports it once completed.
        let secs = job
            .shared
            .lock()
            .out
            .started
            .map_or(0.0, |s| s.elapsed().as_secs_f64())
            .max(1e-6);
        let total = job.stats.transferred.load(Ordering::Relaxed)
            + job.stats.multifd.bytes.load(Ordering::Relaxed);
        job.stats
            .bits_per_second
            .store((total as f64 * 8.0 / secs) as u64, Ordering::Relaxed);
        job.machine.set_runstate(RunState::PostMigrate);
        // Postcopy measured its downtime at the switch already.
        job.shared.lock().out.downtime_ms.get_or_insert(downtime);
        Ok(())
    }

    /// The end, whatever it was: dirty logging stops, bitmaps are released, and after a
    /// failure or cancel the source is put back (disks reactivated, the guest resumed if it
    /// ran). Then the state machine records the outcome.
    fn cleanup(mut self, result: Result<(), MigrationError>) {
        // The stream's end goes first, as it would had the phase that failed owned it.
        self.w = None;
        let ok = result.is_ok();
        // The multifd channels close after the destination confirmed the stream (or are shut
        // down, after a failure), as QEMU's close after the migration thread is done.
        if let Some(m) = self.multifd.take() {
            m.finish(false);
        }
        if let Some(ram) = self.ram.as_mut() {
            ram.finish_multifd(ok);
        }
        let job = &self.job;
        if job.caps.has(Capability::AutoConverge) {
            // Lifted before the guest may resume below, as QEMU lifts it at the end of the
            // migration's iterations whatever their outcome.
            job.machine.throttle_vcpus(0);
            job.stats
                .cpu_throttle_percentage
                .store(0, Ordering::Relaxed);
        }
        if let Some(ram) = &self.ram {
            ram.stop();
        }
        if !ok {
            if let Some(p) = self.rp_ctx.preempt.get() {
                p.shutdown();
            }
        }
        if let Some(b) = self.bitmaps {
            b.cleanup(ok);
        }
        // A cancel that arrives after the whole stream went out (and, with a return path,
        // after the destination confirmed it) is too late: the destination may be running the
        // guest, so the source must not resume. QEMU would resume it; livemig reports
        // `completed`.
        if !ok && self.undo.verdict_unknown {
            // The whole stream went out and the destination never answered: it may run the
            // guest. Resuming here could run it twice; management decides (`cont`).
            self.handover = Some(Handover::Unknown);
            job.machine.set_runstate(RunState::Paused);
        } else if !ok && self.undo.handed_over {
            // Postcopy failed after the package went out: the guest may run on the
            // destination, with part of its RAM still only here. Taking it back would run it
            // twice; the source stays stopped with everything it has.
            job.machine.set_runstate(RunState::Paused);
        } else if !ok {
            // Put the source back: disks first (the guest needs them), then the guest.
            let mut reactivated = true;
            if self.undo.inactivated {
                reactivated = job.machine.activate_disks().is_ok();
            }
            if self.undo.stopped {
                if self.undo.stopped_running_guest && reactivated && job.shared.may_resume_guest() {
                    job.machine.start();
                } else {
                    // Not running before, or the disks could not be taken back (the
                    // destination may hold them): stay stopped and let management decide.
                    // Nor when the VM is shutting down: it only needs its disks back.
                    job.machine.set_runstate(RunState::Paused);
                }
            }
        }
        if let Some(h) = self.handover {
            job.shared.lock().out.handover = Some(h.as_str());
            if h != Handover::Confirmed && job.caps.has(Capability::Events) {
                job.shared.events.emit(
                    HANDOVER_EVENT,
                    Some(json!({ "handover": h.as_str(), "source-runstate": "paused" })),
                );
            }
        }
        let outcome = match &result {
            Ok(()) => Outcome::Completed,
            Err(e) if self.undo.handed_over && !job.caps.has(Capability::PostcopyRam) => {
                Outcome::Failed(format!(
                    "{}; a bitmap-only postcopy was running: the destination runs the guest with all of its RAM, without the dirty bitmaps still in flight; the guest stays stopped here",
                    failure_text(&job.uri, e, self.stall)
                ))
            }
            Err(e) if self.undo.handed_over => Outcome::Failed(format!(
                "{}; postcopy was running: the guest stays stopped here, its RAM is split between both ends",
                failure_text(&job.uri, e, self.stall)
            )),
            Err(e) => Outcome::Failed(failure_text(&job.uri, e, self.stall)),
        };
        job.shared.finish_outgoing(job.generation, outcome);
    }
}

/// The RAM section's END with the guest stopped: the last dirty log collected and every page
/// still dirty sent.
fn write_ram_end(w: &mut Writer, ram: &mut RamSaver) -> Result<(), MigrationError> {
    write_end(w, RAM_SECTION_ID)?;
    ram.sync();
    ram.send(w, u64::MAX, None)?;
    ram.end_section(w)?;
    write_footer(w, RAM_SECTION_ID)?;
    Ok(())
}

fn sent_pages(stats: &OutgoingStats) -> u64 {
    stats.ram.normal_pages.load(Ordering::Relaxed) + stats.ram.zero_pages.load(Ordering::Relaxed)
}

/// Bytes of background pages per PART section in postcopy: a requested page waits behind
/// at most this much.
const POSTCOPY_BATCH: u64 = 16 * crate::guest::PAGE_SIZE;

/// Bytes of background pages per PART section in postcopy with preempt. Requested pages take
/// the other channel, except those the background push has claimed already: those arrive
/// behind everything claimed before them, so the batch is short; shorter still costs a
/// section and a write per batch (16 pages: +60 % of the source's CPU time per GiB).
const POSTCOPY_PREEMPT_BATCH: u64 = 32 * crate::guest::PAGE_SIZE;

/// Which way the precopy phase ends.
enum Next {
    /// Stop, send the rest, done.
    Switchover,
    /// `migrate-start-postcopy`: switch now and let the destination pull the rest.
    Postcopy,
}

/// Writes the FULL section of every device that needs one, `globalstate` last; returns their
/// descriptions for the vmdesc trailer.
fn write_devices(
    w: &mut Writer,
    machine: &dyn Machine,
    globalstate: Arc<GlobalState>,
) -> Result<Vec<DeviceDesc>, MigrationError> {
    let mut devices: Vec<Arc<dyn DeviceState>> = machine.devices();
    devices.push(globalstate);
    let mut described = Vec::new();
    for (i, d) in devices.iter().filter(|d| d.needed()).enumerate() {
        let id = FIRST_DEVICE_SECTION_ID + i as u32;
        let vmsd = d.vmsd();
        write_full(w, id, &d.idstr(), d.instance_id(), vmsd.version_id)?;
        d.save(w)?;
        write_footer(w, id)?;
        described.push(DeviceDesc {
            idstr: d.idstr(),
            instance_id: d.instance_id(),
            vmsd,
        });
    }
    Ok(described)
}

/// A growable buffer several writers can share: the postcopy package is built in one, through
/// the same `Writer` type the devices save with.
#[derive(Clone, Default)]
struct SharedBuf(Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuf {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits in `pre-switchover` until `migrate-continue` or a cancel; with `keepalive`, sends a
/// PING on the stream at that interval (the destination answers on the return path).
/// Multifd channels carry nothing while the source waits, so a connection of theirs that
/// closes (a channel cut alone) is looked for on their sockets.
fn wait_for_continue(
    shared: &Shared,
    generation: Generation,
    rp: Option<&mpsc::Receiver<RpEvent>>,
    mut keepalive: Option<(&mut Writer, Duration)>,
    multifd: Option<&crate::multifd::send::Sender>,
) -> Result<(), MigrationError> {
    let mut last_ping = Instant::now();
    shared.pause_before_switchover(generation, || {
        if multifd.is_some_and(|m| m.channel_hung_up()) {
            return Err(MigrationError::Other(
                "the destination went away while the source waited in pre-switchover \
                 (a multifd channel's connection closed)"
                    .into(),
            ));
        }
        let Some(rp) = rp else {
            return Ok(());
        };
        // With a return path the source knows when the destination is gone: it fails now and
        // resumes the guest, instead of waiting for a `migrate-continue` that can only fail
        // (QEMU waits). Looked at before a keepalive is written, so that a departed
        // destination is reported as such rather than as a failed write.
        let heard = match rp.try_recv() {
            Ok(RpEvent::Closed(why)) => Err(MigrationError::Other(format!(
                "the destination went away while the source waited in pre-switchover ({why})"
            ))),
            Ok(RpEvent::Shut(n)) => Err(MigrationError::Other(format!(
                "the destination ended the migration (SHUT {n}) before the switchover"
            ))),
            Ok(RpEvent::Request { .. }) => Err(MigrationError::Other(
                "RP: page request before postcopy".into(),
            )),
            Ok(RpEvent::Failed(why)) => Err(MigrationError::Other(why)),
            Ok(RpEvent::RecvBitmap { .. } | RpEvent::ResumeAck(_)) => Err(MigrationError::Other(
                "RP: recovery message before postcopy".into(),
            )),
            Err(mpsc::TryRecvError::Disconnected) => Err(MigrationError::Other(
                "the return path ended while the source waited in pre-switchover".into(),
            )),
            Err(mpsc::TryRecvError::Empty) => Ok(()),
        };
        heard?;
        if let Some((w, every)) = keepalive.as_mut() {
            if last_ping.elapsed() >= *every {
                // QEMU's destinations answer a PING whenever the return path is open.
                write_command(w, &Command::Ping(KEEPALIVE_PING))?;
                w.flush()?;
                last_ping = Instant::now();
            }
        }
        Ok(())
    })
}

/// How the guest changed hands at the end of an outgoing migration: `query-migrate`'s
/// `x-livemig-handover`, and the [`HANDOVER_EVENT`] when it is not `confirmed` — the source
/// is then paused and only management, looking at the destination, can tell whether to
/// `cont` it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handover {
    /// The destination reported success on the return path (SHUT 0).
    Confirmed,
    /// `completed` without a return path (`exec:`, `file:`, or with the return path turned
    /// off): the destination never said whether it loaded the stream — QEMU's old behaviour.
    /// If it failed, the guest runs nowhere until the source is `cont`-ed.
    Unconfirmed,
    /// `failed` after the whole stream went out, with no word from the destination within
    /// `x-livemig-stall-timeout`: it may run the guest, so the source stays paused.
    Unknown,
}

impl Handover {
    fn as_str(self) -> &'static str {
        match self {
            Handover::Confirmed => "confirmed",
            Handover::Unconfirmed => "unconfirmed",
            Handover::Unknown => "unknown",
        }
    }
}

/// The event a source emits (with capability `events`) when a migration ends with the
/// guest's whereabouts unconfirmed: `{"handover": "unconfirmed"|"unknown", "source-runstate":
/// "paused"}`.
pub(crate) const HANDOVER_EVENT: &str = "X_LIVEMIG_HANDOVER";

/// The value of the keepalive PINGs sent in `pre-switchover`.
const KEEPALIVE_PING: u32 = 0x6b61;

/// The next return-path event during a recovery handshake (`None` of the channel means the
/// destination went away again).
fn recv_recovery(shared: &Shared, rp: &mpsc::Receiver<RpEvent>) -> Result<RpEvent, MigrationError> {
    loop {
        match rp.recv_timeout(Duration::from_millis(100)) {
            // Requests of faults before RESUME wait for RESUME_ACK, when the destination
            // sends every pending one again.
            Ok(RpEvent::Request { .. }) => {}
            Ok(ev) => return Ok(ev),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if shared.lock().shutting_down {
                    return Err(MigrationError::Other("The VM is shutting down".into()));
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(MigrationError::Other(
                    "the return path ended during the recovery".into(),
                ))
            }
        }
    }
}

fn unexpected_in_recovery(ev: RpEvent) -> MigrationError {
    MigrationError::Other(match ev {
        RpEvent::Closed(why) | RpEvent::Failed(why) => why,
        RpEvent::Shut(n) => format!("the destination ended the migration (SHUT {n})"),
        RpEvent::ResumeAck(v) => format!("RESUME_ACK {v} before the received maps"),
        RpEvent::RecvBitmap { .. } => "RECV_BITMAP after POSTCOPY_RESUME".into(),
        RpEvent::Request { .. } => "a page request".into(),
    })
}

/// Waits for the destination's verdict: `Ok(true)` for success, `Ok(false)` once `stall`
/// passed with nothing at all from the destination.
fn wait_for_shut(
    shared: &Shared,
    generation: Generation,
    rp: &mpsc::Receiver<RpEvent>,
    stall: Option<Duration>,
) -> Result<bool, MigrationError> {
    let mut deadline = stall.map(|t| Instant::now() + t);
    loop {
        if shared.out_cancelled(generation) {
            return Err(MigrationError::Cancelled);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(false);
        }
        match rp.recv_timeout(Duration::from_millis(50)) {
            Ok(RpEvent::Shut(0)) => return Ok(true),
            // Pages asked for after the last one went out: they are on their way (and the
            // destination is alive).
            Ok(RpEvent::Request { .. }) => deadline = stall.map(|t| Instant::now() + t),
            Ok(RpEvent::Failed(why)) => return Err(MigrationError::Other(why)),
            Ok(RpEvent::RecvBitmap { .. } | RpEvent::ResumeAck(_)) => {
                return Err(MigrationError::Other(
                    "RP: recovery message outside a recovery".into(),
                ))
            }
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

/// `error-desc` of a failed migration. A write that failed on the channel is worded as QEMU
/// words it (`Unable to write to socket: Broken pipe`): the destination went away, and the
/// stream offset a `WireError` carries means nothing to the operator.
/// A write that moved nothing for `x-livemig-stall-timeout` says so.
fn failure_text(uri: &MigrationUri, e: &MigrationError, stall: Option<Duration>) -> String {
    if let (true, Some(t)) = (e.is_stall(), stall) {
        return format!(
            "the migration stream stalled: the destination took nothing for {} ms (x-livemig-stall-timeout)",
            t.as_millis()
        );
    }
    if let MigrationError::Wire(w) = e {
        if let wire::WireErrorKind::Io(io) = &w.kind {
            let channel = match uri {
                MigrationUri::Tcp { .. } | MigrationUri::Unix(_) => "socket",
                MigrationUri::Fd(p) if p.is_socket() => "socket",
                MigrationUri::Exec(_) => "command",
                MigrationUri::File { .. } | MigrationUri::Fd(_) => "file",
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
            assert_eq!(failure_text(&uri, &epipe(), None), want);
        }
        let other = MigrationError::Other("Block inactivate failed during switchover".into());
        let uri = MigrationUri::parse("unix:/x").unwrap();
        assert_eq!(failure_text(&uri, &other, None), other.to_string());
    }
}
