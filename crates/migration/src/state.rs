//! The migration state machine: the one place where a migration's status changes.
//!
//! It owns the state shared between the QMP-facing [`crate::Migration`] and the migration
//! threads ([`Shared`]): capabilities, parameters, and one status per direction. A status
//! changes only through [`Shared`]'s transition methods, which check the move against the
//! table below — an illegal move is a typed error ([`IllegalTransition`]) and changes nothing
//! — and emit the `MIGRATION` event (capability `events`) while they still hold the lock, so
//! events come out in exactly the order the states were entered.
//!
//! # Transitions
//!
//! Source (`Side::Outgoing`):
//!
//! | from | to |
//! |---|---|
//! | `none`, `completed`, `failed`, `cancelled` | `setup` (`migrate`) |
//! | `setup` | `active`, `failed`, `cancelling`, `cancelled` (cancelled before the channel connected: nothing to undo) |
//! | `active` | `completed`, `pre-switchover` (capability `pause-before-switchover`), `postcopy-active` (`migrate-start-postcopy`), `failed`, `cancelling` |
//! | `pre-switchover` | `device` (`migrate-continue`), `postcopy-active` (`migrate-continue` in a postcopy switch), `failed`, `cancelling` |
//! | `device` | `completed`, `failed`, `cancelling` |
//! | `cancelling` | `cancelled`, `completed` (the cancel came after the destination confirmed the whole stream: too late to take the guest back) |
//! | `postcopy-active` | `completed`, `failed`, `postcopy-paused` |
//! | `postcopy-paused` | `postcopy-recover` (`migrate resume=true`), `failed` (the VM shuts down while paused) |
//! | `postcopy-recover` | `postcopy-active`, `postcopy-paused` |
//!
//! Destination (`Side::Incoming`):
//!
//! | from | to |
//! |---|---|
//! | `none` | `setup` (the source connected; no event: QEMU 7.2 sends `setup` when the destination starts listening), `failed` (accepting failed) |
//! | `setup` | `active`, `failed` |
//! | `active` | `completed`, `failed`, `postcopy-active` |
//! | `postcopy-active` | `completed`, `failed`, `postcopy-paused` |
//! | `postcopy-paused` | `postcopy-recover`, `failed` (the VM shuts down while paused) |
//! | `postcopy-recover` | `postcopy-active`, `postcopy-paused` |
//!
//! Nothing else is legal, a state to itself included. `colo` and `wait-unplug` are 7.2 names
//! livemig never enters (`x-colo` is refused; there are no failover devices). As in QEMU 7.2
//! (`migration_completion`, `postcopy_start`), `device` exists only after a pause: a precopy
//! switchover without `pause-before-switchover` stays `active` until `completed`, with it
//! it goes `active → pre-switchover → device → completed`; postcopy goes `active →
//! postcopy-active` before the guest stops, or `active → pre-switchover → postcopy-active`
//! with the pause. The destination takes `active → postcopy-active`; a cut link or
//! `migrate-pause` takes
//! `postcopy-active → postcopy-paused`, and a recovery `postcopy-paused → postcopy-recover →
//! postcopy-active` (a recovery that fails goes back to `postcopy-paused`). livemig adds
//! `postcopy-paused → failed` for a VM that shuts down while paused (QEMU just exits).
//!
//! # Guards
//!
//! Every outgoing migration has a [`Generation`]. The migration thread's transitions name
//! theirs, and are refused once a newer migration owns the state or once a cancel has been
//! requested: after `migrate_cancel` only the cancel path (`cancelling → cancelled`, or
//! `→ completed` when too late) may move the state, so the thread can never overwrite
//! `cancelling` with a state of its own.

use crate::caps::{Capabilities, Capability};
use crate::engine::OutgoingStats;
use crate::error::MigrationError;
use crate::events::EventSink;
use crate::params::Parameters;
use crate::status::MigrationStatus;
use crate::transport::ShutdownHandle;
use serde_json::json;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Which end of a migration a status belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source: `migrate`.
    Outgoing,
    /// The destination: `-incoming` / `migrate-incoming`.
    Incoming,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Outgoing => "outgoing",
            Side::Incoming => "incoming",
        })
    }
}

/// Whether `from → to` is a legal transition on `side` (the tables in the module doc).
pub fn is_legal(side: Side, from: MigrationStatus, to: MigrationStatus) -> bool {
    use MigrationStatus::*;
    match side {
        Side::Outgoing => matches!(
            (from, to),
            (None | Completed | Failed | Cancelled, Setup)
                | (Setup, Active | Failed | Cancelling | Cancelled)
                | (
                    Active,
                    Completed | PreSwitchover | PostcopyActive | Failed | Cancelling
                )
                | (PreSwitchover, Device | PostcopyActive | Failed | Cancelling)
                | (Device, Completed | Failed | Cancelling)
                | (Cancelling, Cancelled | Completed)
                | (PostcopyActive, Completed | Failed | PostcopyPaused)
                | (PostcopyPaused, PostcopyRecover | Failed)
                | (PostcopyRecover, PostcopyActive | PostcopyPaused)
        ),
        Side::Incoming => matches!(
            (from, to),
            (None, Setup | Failed)
                | (Setup, Active | Failed)
                | (Active, Completed | Failed | PostcopyActive)
                | (PostcopyActive, Completed | Failed | PostcopyPaused)
                | (PostcopyPaused, PostcopyRecover | Failed)
                | (PostcopyRecover, PostcopyActive | PostcopyPaused)
        ),
    }
}

/// A transition the table does not allow. It is a bug in the engine, reported as an error
/// (the migration fails) instead of a state `query-migrate` could never explain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("internal error: illegal {side} migration state transition {from} -> {to}")]
pub struct IllegalTransition {
    /// Which end.
    pub side: Side,
    /// The state it was in (and stays in).
    pub from: MigrationStatus,
    /// The state asked for.
    pub to: MigrationStatus,
}

/// One direction's status. Private fields: it changes only through [`Status::go`], which
/// checks the table.
#[derive(Debug)]
pub struct Status {
    side: Side,
    current: MigrationStatus,
}

impl Status {
    /// A status that starts at `none`.
    pub fn new(side: Side) -> Self {
        Status {
            side,
            current: MigrationStatus::None,
        }
    }

    /// The current state.
    pub fn get(&self) -> MigrationStatus {
        self.current
    }

    /// Moves to `to` if the table allows it; otherwise changes nothing.
    pub fn go(&mut self, to: MigrationStatus) -> Result<(), IllegalTransition> {
        if !is_legal(self.side, self.current, to) {
            return Err(IllegalTransition {
                side: self.side,
                from: self.current,
                to,
            });
        }
        self.current = to;
        Ok(())
    }
}

/// Identifies one outgoing migration: the thread of an old one (whose connect hung past a
/// cancel, say) can no longer touch the state of a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// How an outgoing migration ended, as its thread reports it to [`Shared::finish_outgoing`].
#[derive(Debug)]
pub enum Outcome {
    /// Everything was sent (and confirmed, with a return path).
    Completed,
    /// It failed with this `error-desc` — or was cancelled, if a cancel was requested.
    Failed(String),
}

/// State of the outgoing side.
pub(crate) struct OutState {
    status: Status,
    generation: Generation,
    /// `migrate_cancel` (or a shutdown) asked this migration to stop.
    cancel_requested: bool,
    continue_requested: bool,
    /// `migrate-start-postcopy` was asked for: switch to postcopy at the next round.
    pub postcopy_requested: bool,
    /// `migrate URI resume=true`, for the migration thread waiting in `postcopy-paused`.
    resume_uri: Option<crate::transport::MigrationUri>,
    /// Why postcopy paused (shown as `error-desc` while paused or recovering).
    pub pause_reason: Option<String>,
    /// The channel, once connected: a cancel shuts it down so a blocked write returns.
    shutdown: Option<ShutdownHandle>,
    /// The other channels (multifd), shut down with it.
    extra: Vec<ShutdownHandle>,
    /// `error-desc` of a failed migration.
    pub error: Option<String>,
    pub started: Option<Instant>,
    pub setup_ms: Option<u64>,
    pub total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub stats: Arc<OutgoingStats>,
    /// `x-livemig-handover` of a finished migration: whether the destination confirmed it
    /// took the guest (see `outgoing::Handover`).
    pub handover: Option<&'static str>,
}

impl OutState {
    fn new(generation: Generation) -> Self {
        OutState {
            status: Status::new(Side::Outgoing),
            generation,
            cancel_requested: false,
            continue_requested: false,
            postcopy_requested: false,
            resume_uri: None,
            pause_reason: None,
            shutdown: None,
            extra: Vec::new(),
            error: None,
            started: None,
            setup_ms: None,
            total_ms: None,
            downtime_ms: None,
            stats: Arc::default(),
            handover: None,
        }
    }

    /// The current state.
    pub fn status(&self) -> MigrationStatus {
        self.status.get()
    }

    fn owned_by(&self, generation: Generation) -> bool {
        self.generation == generation && !self.cancel_requested
    }
}

/// How this VM was told to expect an incoming migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IncomingMode {
    /// Not a destination.
    None,
    /// `-incoming defer`: waits for `migrate-incoming`.
    Deferred,
    /// Listening or loading (`-incoming URI` or after `migrate-incoming`).
    Started,
}

/// State of the incoming side.
pub(crate) struct InState {
    status: Status,
    pub mode: IncomingMode,
    pub error: Option<String>,
    pub started: Option<Instant>,
    pub total_ms: Option<u64>,
    pub port: Option<(String, u16)>,
    pub pages_loaded: u64,
    pub shutdown: Option<ShutdownHandle>,
    /// The other channels (multifd), shut down with it.
    pub extra: Vec<ShutdownHandle>,
    /// What the loader reported without failing (dropped bitmaps, a missing trailer).
    pub warnings: Vec<String>,
    /// Guest RAM in postcopy, from ADVISE on (blocktime, latency and page counts for
    /// `query-migrate`).
    pub postcopy: Option<Arc<crate::postcopy::PostcopyRam>>,
    /// `migrate-recover`'s listener, for the listen thread waiting in `postcopy-paused`.
    recover_listener: Option<crate::transport::Listener>,
    /// `migrate-recover` was accepted and its connection has not come yet.
    recover_triggered: bool,
    /// Why postcopy paused (shown as `error-desc` while paused or recovering).
    pub pause_reason: Option<String>,
}

impl InState {
    /// The current state.
    pub fn status(&self) -> MigrationStatus {
        self.status.get()
    }
}

/// Everything behind [`Shared`]'s mutex.
pub(crate) struct Inner {
    /// Start the guest when an incoming migration completes (false with `-S`, until `cont`).
    pub autostart: bool,
    /// The VM is shutting down (`quit`, SIGTERM): no new migration starts, and a migration
    /// cancelled by the shutdown does not resume the guest (QEMU's `migration_shutdown`).
    pub shutting_down: bool,
    pub caps: Capabilities,
    pub params: Parameters,
    pub out: OutState,
    pub inc: InState,
}

/// State shared between the QMP-facing API and the migration threads.
///
/// Its mutex is held for bookkeeping only: never across I/O, never while calling into the
/// VMM, never while waiting for a migration thread (the waits here release it).
pub struct Shared {
    inner: Mutex<Inner>,
    cond: Condvar,
    pub(crate) events: Arc<dyn EventSink>,
}

impl Shared {
    /// The state of a VM that has not migrated.
    pub(crate) fn new(autostart: bool, events: Arc<dyn EventSink>) -> Self {
        Shared {
            inner: Mutex::new(Inner {
                autostart,
                shutting_down: false,
                caps: Capabilities::default(),
                params: Parameters::default(),
                out: OutState::new(Generation(0)),
                inc: InState {
                    status: Status::new(Side::Incoming),
                    mode: IncomingMode::None,
                    error: None,
                    started: None,
                    total_ms: None,
                    port: None,
                    pages_loaded: 0,
                    shutdown: None,
                    extra: Vec::new(),
                    warnings: Vec::new(),
                    postcopy: None,
                    recover_listener: None,
                    recover_triggered: false,
                    pause_reason: None,
                },
            }),
            cond: Condvar::new(),
            events,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes every wait on the state (a parameter changed, say).
    pub(crate) fn notify(&self) {
        self.cond.notify_all();
    }

    /// The only code that changes a status: checks the move, emits `MIGRATION` (with the lock
    /// held, so events keep the order of the states), wakes waiters.
    fn go(
        &self,
        inner: &mut Inner,
        side: Side,
        to: MigrationStatus,
    ) -> Result<(), IllegalTransition> {
        let status = match side {
            Side::Outgoing => &mut inner.out.status,
            Side::Incoming => &mut inner.inc.status,
        };
        if let Err(e) = status.go(to) {
            log::error!("{e}");
            return Err(e);
        }
        // QEMU 7.2's destination sends `setup` when it starts listening ([`crate::Migration::incoming`]),
        // not when the source connects.
        let silent = side == Side::Incoming && to == MigrationStatus::Setup;
        if inner.caps.has(Capability::Events) && !silent {
            self.events
                .emit("MIGRATION", Some(json!({ "status": to.as_str() })));
        }
        self.cond.notify_all();
        Ok(())
    }

    // ---- outgoing ----

    /// `migrate`: a new outgoing migration in `setup`, with fresh statistics. The caller has
    /// checked that nothing else runs; the table refuses a migration that is still running.
    pub(crate) fn begin_outgoing(&self, inner: &mut Inner) -> Result<Generation, MigrationError> {
        if inner.shutting_down {
            return Err(MigrationError::Other("The VM is shutting down".into()));
        }
        let from = inner.out.status();
        if !is_legal(Side::Outgoing, from, MigrationStatus::Setup) {
            return Err(MigrationError::InProgress);
        }
        let generation = Generation(inner.out.generation.0 + 1);
        let mut out = OutState::new(generation);
        // Carry the current state over so that the table judges the move from it.
        out.status.current = from;
        out.started = Some(Instant::now());
        inner.out = out;
        self.go(inner, Side::Outgoing, MigrationStatus::Setup)?;
        Ok(generation)
    }

    /// The lock, for recording a channel of migration `generation`; if that migration was
    /// cancelled meanwhile, the channel is shut down and the caller gets `Cancelled`.
    fn lock_for_channel(
        &self,
        generation: Generation,
        handle: &ShutdownHandle,
    ) -> Result<MutexGuard<'_, Inner>, MigrationError> {
        let inner = self.lock();
        if !inner.out.owned_by(generation) {
            handle.shutdown();
            return Err(MigrationError::Cancelled);
        }
        Ok(inner)
    }

    /// Records the connected channel of migration `generation`, so a cancel can shut it down.
    /// Fails (and shuts the channel down) if the migration was cancelled meanwhile.
    pub(crate) fn attach_channel(
        &self,
        generation: Generation,
        handle: &ShutdownHandle,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock_for_channel(generation, handle)?;
        inner.out.shutdown = Some(handle.clone());
        Ok(())
    }

    /// Records one more channel of migration `generation` (a multifd channel), shut down with
    /// the main one by a cancel or a failure. Fails (and shuts it down) if the migration was
    /// cancelled meanwhile.
    pub(crate) fn attach_extra_channel(
        &self,
        generation: Generation,
        handle: &ShutdownHandle,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock_for_channel(generation, handle)?;
        inner.out.extra.push(handle.clone());
        Ok(())
    }

    /// Moves outgoing migration `generation` to `to`, unless a cancel got there first or a
    /// newer migration owns the state ([`MigrationError::Cancelled`]), or the table forbids
    /// it.
    pub(crate) fn advance(
        &self,
        generation: Generation,
        to: MigrationStatus,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        self.advance_locked(&mut inner, generation, to)
    }

    fn advance_locked(
        &self,
        inner: &mut Inner,
        generation: Generation,
        to: MigrationStatus,
    ) -> Result<(), MigrationError> {
        if !inner.out.owned_by(generation) {
            return Err(MigrationError::Cancelled);
        }
        self.go(inner, Side::Outgoing, to)?;
        Ok(())
    }

    /// Whether outgoing migration `generation` is being cancelled (or was replaced).
    pub(crate) fn out_cancelled(&self, generation: Generation) -> bool {
        !self.lock().out.owned_by(generation)
    }

    /// Waits up to `d`, returning early on a cancel. Returns true if cancelled.
    pub(crate) fn sleep_unless_cancelled(&self, generation: Generation, d: Duration) -> bool {
        self.sleep_unless_cancelled_or_postcopy(generation, d, false)
    }

    /// Waits up to `d`, returning early on a cancel (true) or, if `postcopy_wakes`, when
    /// `migrate-start-postcopy` asks for the switch (false).
    pub(crate) fn sleep_unless_cancelled_or_postcopy(
        &self,
        generation: Generation,
        d: Duration,
        postcopy_wakes: bool,
    ) -> bool {
        let deadline = Instant::now() + d;
        let mut inner = self.lock();
        while inner.out.owned_by(generation) {
            let now = Instant::now();
            if now >= deadline || (postcopy_wakes && inner.out.postcopy_requested) {
                return false;
            }
            inner = self
                .cond
                .wait_timeout(inner, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    /// Enters `pre-switchover` and waits there for `migrate-continue`, a cancel, or (every
    /// 50 ms) `check` to report an error — the return path saying the destination is gone.
    pub(crate) fn pause_before_switchover(
        &self,
        generation: Generation,
        mut check: impl FnMut() -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        if !inner.out.owned_by(generation) {
            return Err(MigrationError::SwitchoverInterrupted);
        }
        // A `migrate-continue` that arrived before the pause must not skip it (QEMU resets the
        // event just before entering pre-switchover).
        inner.out.continue_requested = false;
        self.advance_locked(&mut inner, generation, MigrationStatus::PreSwitchover)?;
        while !inner.out.continue_requested && inner.out.owned_by(generation) {
            // `check` may write to the channel (a keepalive): never with the lock held.
            drop(inner);
            check()?;
            inner = self.lock();
            if inner.out.continue_requested || !inner.out.owned_by(generation) {
                break;
            }
            inner = self
                .cond
                .wait_timeout(inner, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        if !inner.out.owned_by(generation) {
            return Err(MigrationError::SwitchoverInterrupted);
        }
        Ok(())
    }

    /// `migrate-continue`: releases the `pre-switchover` wait when `state` names the current
    /// state (and, as in QEMU, merely succeeds when it names another current state).
    pub(crate) fn request_continue(&self, state: MigrationStatus) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        let current = inner.out.status();
        if state != current {
            return Err(MigrationError::NotInExpectedState(current));
        }
        inner.out.continue_requested = true;
        self.cond.notify_all();
        Ok(())
    }

    /// `migrate_cancel`: moves a running outgoing migration to `cancelling`, shuts its
    /// channel down (a blocked write returns) and wakes its waits; its thread cleans up and
    /// reports `cancelled`. A migration whose channel is not connected yet ends `cancelled`
    /// at once: nothing was sent and nothing about the VM changed. A no-op when nothing runs
    /// or a cancel is already under way. Never waits for the migration thread.
    pub(crate) fn cancel_outgoing(&self) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        let st = inner.out.status();
        if st.is_postcopy() {
            return Err(MigrationError::Other(
                "Postcopy migration in progress, cannot cancel.".into(),
            ));
        }
        if !st.is_running() || inner.out.cancel_requested {
            return Ok(());
        }
        self.go(&mut inner, Side::Outgoing, MigrationStatus::Cancelling)?;
        inner.out.cancel_requested = true;
        for h in &inner.out.extra {
            h.shutdown();
        }
        match inner.out.shutdown.clone() {
            Some(h) => h.shutdown(),
            None => {
                // Not connected yet (the connect may hang on a dead network). The thread, if
                // its connect ever returns, sees the cancel and leaves the state alone.
                inner.out.total_ms = inner.out.started.map(|s| s.elapsed().as_millis() as u64);
                self.go(&mut inner, Side::Outgoing, MigrationStatus::Cancelled)?;
            }
        }
        self.cond.notify_all();
        Ok(())
    }

    // ---- postcopy pause and recovery ----

    /// `migrate-pause`: shuts the channel of the migration that is `postcopy-active` down
    /// (source first, as QEMU looks); its threads then see the I/O error and pause.
    pub(crate) fn request_pause(&self) -> Result<(), MigrationError> {
        let inner = self.lock();
        if inner.out.status() == MigrationStatus::PostcopyActive {
            if let Some(h) = &inner.out.shutdown {
                h.shutdown();
            }
            return Ok(());
        }
        if inner.inc.status() == MigrationStatus::PostcopyActive {
            if let Some(h) = &inner.inc.shutdown {
                h.shutdown();
            }
            return Ok(());
        }
        Err(MigrationError::Other(
            "migrate-pause is currently only supported during postcopy-active state".into(),
        ))
    }

    /// The source's migration thread pauses postcopy (`postcopy-active` or
    /// `postcopy-recover` → `postcopy-paused`) because of `why`.
    pub(crate) fn pause_outgoing(
        &self,
        generation: Generation,
        why: String,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        if inner.out.generation != generation {
            return Err(MigrationError::Cancelled);
        }
        inner.out.pause_reason = Some(why);
        inner.out.resume_uri = None;
        inner.out.shutdown = None;
        if inner.out.status() != MigrationStatus::PostcopyPaused {
            self.go(&mut inner, Side::Outgoing, MigrationStatus::PostcopyPaused)?;
        }
        Ok(())
    }

    /// `migrate URI resume=true`: hands `uri` to the migration thread paused in postcopy.
    pub(crate) fn request_resume(
        &self,
        uri: crate::transport::MigrationUri,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        if inner.out.status() != MigrationStatus::PostcopyPaused || inner.out.resume_uri.is_some() {
            return Err(MigrationError::Other(
                "Cannot resume if there is no paused migration".into(),
            ));
        }
        inner.out.resume_uri = Some(uri);
        self.cond.notify_all();
        Ok(())
    }

    /// The paused source waits for `migrate ... resume=true`; `None` when the VM shuts down.
    pub(crate) fn wait_resume(
        &self,
        generation: Generation,
    ) -> Option<crate::transport::MigrationUri> {
        let mut inner = self.lock();
        loop {
            if inner.shutting_down || inner.out.generation != generation {
                return None;
            }
            if let Some(u) = inner.out.resume_uri.take() {
                return Some(u);
            }
            inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The resumed source's new channel: a pause or a shutdown shuts this one down now.
    pub(crate) fn attach_resumed_channel(&self, generation: Generation, handle: &ShutdownHandle) {
        let mut inner = self.lock();
        if inner.out.generation == generation {
            inner.out.shutdown = Some(handle.clone());
        }
    }

    /// Moves the source to `to` in recovery (`postcopy-recover`, then `postcopy-active`);
    /// unlike [`Shared::advance`], a cancel cannot get in the way (postcopy refuses it).
    pub(crate) fn advance_recovery(
        &self,
        generation: Generation,
        to: MigrationStatus,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        if inner.out.generation != generation {
            return Err(MigrationError::Cancelled);
        }
        self.go(&mut inner, Side::Outgoing, to)?;
        if to == MigrationStatus::PostcopyActive {
            inner.out.pause_reason = None;
        }
        Ok(())
    }

    /// The destination pauses postcopy because of `why`.
    pub(crate) fn pause_incoming(&self, why: String) -> Result<(), IllegalTransition> {
        let mut inner = self.lock();
        inner.inc.pause_reason = Some(why);
        inner.inc.recover_triggered = false;
        inner.inc.recover_listener = None;
        if inner.inc.status() == MigrationStatus::PostcopyPaused {
            return Ok(());
        }
        self.go(&mut inner, Side::Incoming, MigrationStatus::PostcopyPaused)
    }

    /// `migrate-recover`: hands a bound listener to the paused destination.
    pub(crate) fn request_recover(
        &self,
        bind: impl FnOnce() -> Result<crate::transport::Listener, MigrationError>,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        if inner.inc.status() != MigrationStatus::PostcopyPaused {
            return Err(MigrationError::Other(
                "Migrate recover can only be run when postcopy is paused.".into(),
            ));
        }
        if inner.inc.recover_triggered {
            return Err(MigrationError::Other(
                "Migrate recovery is triggered already".into(),
            ));
        }
        let l = bind()?;
        if let Some(port) = l.local_port() {
            if let Some((_, p)) = inner.inc.port.as_mut() {
                *p = port;
            }
        }
        inner.inc.recover_listener = Some(l);
        inner.inc.recover_triggered = true;
        self.cond.notify_all();
        Ok(())
    }

    /// The paused destination waits for `migrate-recover`'s listener; `None` when the VM
    /// shuts down.
    pub(crate) fn wait_recover(&self) -> Option<crate::transport::Listener> {
        let mut inner = self.lock();
        loop {
            if inner.shutting_down {
                return None;
            }
            if let Some(l) = inner.inc.recover_listener.take() {
                return Some(l);
            }
            inner = self.cond.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The destination's recovery connection came: `postcopy-recover`, and its channel is
    /// the one `migrate-pause` and a shutdown shut down from now on.
    pub(crate) fn incoming_recovering(
        &self,
        handle: &ShutdownHandle,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock();
        inner.inc.shutdown = Some(handle.clone());
        inner.inc.recover_triggered = false;
        self.go(&mut inner, Side::Incoming, MigrationStatus::PostcopyRecover)?;
        Ok(())
    }

    /// POSTCOPY_RESUME on the destination: `postcopy-active` again.
    pub(crate) fn incoming_resumed(&self) -> Result<(), IllegalTransition> {
        let mut inner = self.lock();
        inner.inc.pause_reason = None;
        self.go(&mut inner, Side::Incoming, MigrationStatus::PostcopyActive)
    }

    /// Whether the VM is shutting down (`quit`, a termination signal).
    pub(crate) fn shutting_down(&self) -> bool {
        self.lock().shutting_down
    }

    /// Whether the guest may be resumed after a failed or cancelled migration: not while the
    /// VM shuts down (QEMU's `migrate_fd_cleanup` does not restart a VM that is shutting
    /// down).
    pub(crate) fn may_resume_guest(&self) -> bool {
        !self.lock().shutting_down
    }

    /// The VM is shutting down (`quit`, a termination signal): refuses new migrations,
    /// cancels the outgoing one (its cleanup releases the bitmaps, clears `skip_store` and
    /// reactivates the disks, but does not resume the guest), shuts the incoming channel down
    /// (its loader drops the bitmaps it had begun), then waits up to `timeout` until neither
    /// runs. Returns whether both stopped in time.
    pub(crate) fn shutdown(&self, timeout: Duration) -> bool {
        {
            let mut inner = self.lock();
            inner.shutting_down = true;
            self.cond.notify_all();
            if inner.inc.status().is_running() {
                if let Some(h) = &inner.inc.shutdown {
                    h.shutdown();
                }
                for h in &inner.inc.extra {
                    h.shutdown();
                }
            }
        }
        if let Err(e) = self.cancel_outgoing() {
            log::warn!("cannot end the migration before shutting down: {e}");
        }
        let stopped = self.wait_status(
            |i| {
                if i.out.status().is_running() {
                    i.out.status()
                } else {
                    i.inc.status()
                }
            },
            &[
                MigrationStatus::None,
                MigrationStatus::Completed,
                MigrationStatus::Failed,
                MigrationStatus::Cancelled,
            ],
            timeout,
        );
        !stopped.is_running()
    }

    /// The end of outgoing migration `generation`, once its thread has put the source back:
    /// `completed`, `cancelled` (a cancel was requested and the migration did not complete)
    /// or `failed` with its error. Nothing happens if the state already moved on (a cancel
    /// before the channel connected ended it, and perhaps a newer migration started).
    pub(crate) fn finish_outgoing(&self, generation: Generation, outcome: Outcome) {
        let mut inner = self.lock();
        if inner.out.generation != generation || inner.out.status().is_finished() {
            return;
        }
        let failed = !matches!(outcome, Outcome::Completed);
        if let Some(s) = inner.out.shutdown.take() {
            if failed {
                s.shutdown();
            }
        }
        for s in std::mem::take(&mut inner.out.extra) {
            if failed {
                s.shutdown();
            }
        }
        inner.out.total_ms = inner.out.started.map(|s| s.elapsed().as_millis() as u64);
        let to = match outcome {
            Outcome::Completed => MigrationStatus::Completed,
            Outcome::Failed(_) if inner.out.cancel_requested => MigrationStatus::Cancelled,
            Outcome::Failed(e) => {
                inner.out.error = Some(e);
                MigrationStatus::Failed
            }
        };
        if let Err(e) = self.go(&mut inner, Side::Outgoing, to) {
            // Only a bug gets here; the migration must end all the same.
            inner.out.error = Some(e.to_string());
            inner.out.status.current = MigrationStatus::Failed;
            self.cond.notify_all();
        }
    }

    /// Waits until `status(inner)` is one of `statuses`, or `timeout` passes; returns the
    /// last state seen.
    pub(crate) fn wait_status(
        &self,
        status: impl Fn(&Inner) -> MigrationStatus,
        statuses: &[MigrationStatus],
        timeout: Duration,
    ) -> MigrationStatus {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        loop {
            if statuses.contains(&status(&inner)) || Instant::now() >= deadline {
                return status(&inner);
            }
            inner = self
                .cond
                .wait_timeout(inner, deadline.saturating_duration_since(Instant::now()))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    // ---- incoming ----

    /// The lock, for recording an incoming channel; if the VM is shutting down, the channel
    /// is shut down and the caller gets the error that says so.
    fn lock_for_incoming_channel(
        &self,
        handle: &ShutdownHandle,
    ) -> Result<MutexGuard<'_, Inner>, MigrationError> {
        let inner = self.lock();
        if inner.shutting_down {
            handle.shutdown();
            return Err(MigrationError::Other("The VM is shutting down".into()));
        }
        Ok(inner)
    }

    /// Records the incoming channel, so a shutdown can interrupt the load; fails (and shuts
    /// the channel down) if the VM is already shutting down.
    pub(crate) fn attach_incoming_channel(
        &self,
        handle: &ShutdownHandle,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock_for_incoming_channel(handle)?;
        inner.inc.shutdown = Some(handle.clone());
        inner.inc.extra.clear();
        Ok(())
    }

    /// Records one more incoming channel (a multifd channel), so a shutdown interrupts it
    /// too; fails (and shuts it down) if the VM is shutting down.
    pub(crate) fn attach_extra_incoming_channel(
        &self,
        handle: &ShutdownHandle,
    ) -> Result<(), MigrationError> {
        let mut inner = self.lock_for_incoming_channel(handle)?;
        inner.inc.extra.push(handle.clone());
        Ok(())
    }

    /// Moves the incoming migration to `to`.
    pub(crate) fn advance_incoming(&self, to: MigrationStatus) -> Result<(), IllegalTransition> {
        let mut inner = self.lock();
        self.go(&mut inner, Side::Incoming, to)
    }

    /// Ends the incoming migration `failed` with `error`.
    pub(crate) fn fail_incoming(&self, error: String, started: Instant) {
        let mut inner = self.lock();
        inner.inc.error = Some(error);
        inner.inc.total_ms = Some(started.elapsed().as_millis() as u64);
        if let Err(e) = self.go(&mut inner, Side::Incoming, MigrationStatus::Failed) {
            inner.inc.error = Some(e.to_string());
            inner.inc.status.current = MigrationStatus::Failed;
            self.cond.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::RecordedEvents;
    use MigrationStatus::*;

    /// The tables of the module doc, written out pair by pair.
    const OUTGOING: &[(MigrationStatus, &[MigrationStatus])] = &[
        (None, &[Setup]),
        (Setup, &[Active, Failed, Cancelling, Cancelled]),
        (Cancelling, &[Cancelled, Completed]),
        (Cancelled, &[Setup]),
        (
            Active,
            &[Completed, PreSwitchover, PostcopyActive, Failed, Cancelling],
        ),
        (PostcopyActive, &[Completed, Failed, PostcopyPaused]),
        (PostcopyPaused, &[PostcopyRecover, Failed]),
        (PostcopyRecover, &[PostcopyActive, PostcopyPaused]),
        (Completed, &[Setup]),
        (Failed, &[Setup]),
        (Colo, &[]),
        (PreSwitchover, &[Device, PostcopyActive, Failed, Cancelling]),
        (Device, &[Completed, Failed, Cancelling]),
        (WaitUnplug, &[]),
    ];
    const INCOMING: &[(MigrationStatus, &[MigrationStatus])] = &[
        (None, &[Setup, Failed]),
        (Setup, &[Active, Failed]),
        (Cancelling, &[]),
        (Cancelled, &[]),
        (Active, &[Completed, Failed, PostcopyActive]),
        (PostcopyActive, &[Completed, Failed, PostcopyPaused]),
        (PostcopyPaused, &[PostcopyRecover, Failed]),
        (PostcopyRecover, &[PostcopyActive, PostcopyPaused]),
        (Completed, &[]),
        (Failed, &[]),
        (Colo, &[]),
        (PreSwitchover, &[]),
        (Device, &[]),
        (WaitUnplug, &[]),
    ];

    #[test]
    fn every_pair_is_legal_exactly_when_the_table_says() {
        for (side, table) in [(Side::Outgoing, OUTGOING), (Side::Incoming, INCOMING)] {
            assert_eq!(table.len(), MigrationStatus::ALL.len());
            for (from, legal) in table {
                for to in MigrationStatus::ALL {
                    let want = legal.contains(&to);
                    assert_eq!(is_legal(side, *from, to), want, "{side}: {from} -> {to}");
                    // Through a `Status`: a refused move changes nothing.
                    let mut s = Status::new(side);
                    s.current = *from;
                    match s.go(to) {
                        Ok(()) => assert!(want && s.get() == to),
                        Err(e) => {
                            assert!(!want);
                            assert_eq!(s.get(), *from);
                            assert_eq!(
                                e,
                                IllegalTransition {
                                    side,
                                    from: *from,
                                    to
                                }
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn states_livemig_never_enters_are_unreachable() {
        for side in [Side::Outgoing, Side::Incoming] {
            for from in MigrationStatus::ALL {
                for to in [Colo, WaitUnplug, None] {
                    assert!(!is_legal(side, from, to), "{side}: {from} -> {to}");
                }
            }
        }
    }

    fn shared_with_events() -> (Shared, Arc<RecordedEvents>) {
        let ev = Arc::new(RecordedEvents::default());
        let sh = Shared::new(true, ev.clone());
        sh.lock().caps.apply(&[(Capability::Events, true)]).unwrap();
        (sh, ev)
    }

    fn statuses(ev: &RecordedEvents) -> Vec<String> {
        ev.take()
            .into_iter()
            .map(|(name, data)| {
                assert_eq!(name, "MIGRATION");
                data.unwrap()["status"].as_str().unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn each_transition_emits_one_event_in_order() {
        let (sh, ev) = shared_with_events();
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        sh.advance(g, Active).unwrap();
        sh.finish_outgoing(g, Outcome::Completed);
        assert_eq!(statuses(&ev), ["setup", "active", "completed"]);
        // Illegal: nothing changes, no event, a typed error.
        let g2 = sh.begin_outgoing(&mut sh.lock()).unwrap();
        let e = sh.advance(g2, Completed).unwrap_err();
        assert!(matches!(e, MigrationError::IllegalTransition(_)), "{e}");
        assert_eq!(sh.lock().out.status(), Setup);
        assert_eq!(statuses(&ev), ["setup"]);
        // Incoming.
        sh.advance_incoming(Setup).unwrap();
        assert!(sh.advance_incoming(Completed).is_err());
        sh.advance_incoming(Active).unwrap();
        sh.fail_incoming("broken".into(), Instant::now());
        // The source's connecting (`setup`) is silent on the destination, as in QEMU 7.2.
        assert_eq!(statuses(&ev), ["active", "failed"]);
        assert_eq!(sh.lock().inc.error.as_deref(), Some("broken"));
    }

    #[test]
    fn no_events_without_the_capability() {
        let ev = Arc::new(RecordedEvents::default());
        let sh = Shared::new(true, ev.clone());
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        sh.advance(g, Active).unwrap();
        assert!(ev.take().is_empty());
    }

    #[test]
    fn a_running_migration_cannot_be_begun_again() {
        let (sh, _) = shared_with_events();
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        sh.advance(g, Active).unwrap();
        let e = sh.begin_outgoing(&mut sh.lock()).unwrap_err();
        assert!(matches!(e, MigrationError::InProgress), "{e}");
        sh.lock().shutting_down = true;
        sh.cancel_outgoing().unwrap();
        sh.finish_outgoing(g, Outcome::Failed("x".into()));
        let e = sh.begin_outgoing(&mut sh.lock()).unwrap_err();
        assert_eq!(e.to_string(), "The VM is shutting down");
    }

    #[test]
    fn a_cancel_wins_over_the_migration_thread() {
        let (sh, ev) = shared_with_events();
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        sh.attach_channel(g, &ShutdownHandle::default()).unwrap();
        sh.advance(g, Active).unwrap();
        sh.cancel_outgoing().unwrap();
        // The thread's own moves are refused from now on...
        assert!(matches!(
            sh.advance(g, PreSwitchover),
            Err(MigrationError::Cancelled)
        ));
        assert!(sh.out_cancelled(g));
        assert!(sh.sleep_unless_cancelled(g, Duration::from_secs(10)));
        // ...a second cancel does nothing, and its failure ends it `cancelled`.
        sh.cancel_outgoing().unwrap();
        sh.finish_outgoing(g, Outcome::Failed("Migration cancelled".into()));
        assert_eq!(sh.lock().out.status(), Cancelled);
        assert_eq!(sh.lock().out.error, Option::None);
        assert_eq!(
            statuses(&ev),
            ["setup", "active", "cancelling", "cancelled"]
        );
    }

    #[test]
    fn a_cancel_too_late_ends_completed() {
        let (sh, ev) = shared_with_events();
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        sh.attach_channel(g, &ShutdownHandle::default()).unwrap();
        sh.advance(g, Active).unwrap();
        sh.cancel_outgoing().unwrap();
        sh.finish_outgoing(g, Outcome::Completed);
        assert_eq!(
            statuses(&ev),
            ["setup", "active", "cancelling", "completed"]
        );
    }

    #[test]
    fn a_cancel_before_connect_ends_at_once_and_the_old_thread_is_locked_out() {
        let (sh, ev) = shared_with_events();
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        sh.cancel_outgoing().unwrap();
        assert_eq!(sh.lock().out.status(), Cancelled);
        // A newer migration starts while the old thread's connect still hangs.
        let g2 = sh.begin_outgoing(&mut sh.lock()).unwrap();
        assert!(matches!(
            sh.attach_channel(g, &ShutdownHandle::default()),
            Err(MigrationError::Cancelled)
        ));
        assert!(sh.advance(g, Active).is_err());
        sh.finish_outgoing(g, Outcome::Failed("late".into()));
        assert_eq!(
            sh.lock().out.status(),
            Setup,
            "the new migration is untouched"
        );
        sh.advance(g2, Active).unwrap();
        assert_eq!(
            statuses(&ev),
            ["setup", "cancelling", "cancelled", "setup", "active"]
        );
    }

    #[test]
    fn postcopy_refuses_a_cancel() {
        let (sh, _) = shared_with_events();
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        for st in [Active, PostcopyActive] {
            sh.advance(g, st).unwrap();
        }
        assert_eq!(
            sh.cancel_outgoing().unwrap_err().to_string(),
            "Postcopy migration in progress, cannot cancel."
        );
    }

    #[test]
    fn continue_needs_the_current_state_and_a_pause_forgets_an_early_one() {
        let (sh, _) = shared_with_events();
        let sh = Arc::new(sh);
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        sh.advance(g, Active).unwrap();
        assert_eq!(
            sh.request_continue(PreSwitchover).unwrap_err().to_string(),
            "Migration not in expected state: active"
        );
        sh.request_continue(Active).unwrap();
        let waiter = {
            let sh = sh.clone();
            std::thread::spawn(move || sh.pause_before_switchover(g, || Ok(())))
        };
        assert_eq!(
            sh.wait_status(
                |i| i.out.status(),
                &[PreSwitchover],
                Duration::from_secs(10)
            ),
            PreSwitchover
        );
        sh.request_continue(PreSwitchover).unwrap();
        waiter.join().unwrap().unwrap();
        // A cancel interrupts the pause.
        let g = {
            sh.advance(g, Device).unwrap();
            sh.finish_outgoing(g, Outcome::Completed);
            sh.begin_outgoing(&mut sh.lock()).unwrap()
        };
        sh.advance(g, Active).unwrap();
        let waiter = {
            let sh = sh.clone();
            std::thread::spawn(move || sh.pause_before_switchover(g, || Ok(())))
        };
        sh.wait_status(
            |i| i.out.status(),
            &[PreSwitchover],
            Duration::from_secs(10),
        );
        sh.cancel_outgoing().unwrap();
        assert!(matches!(
            waiter.join().unwrap(),
            Err(MigrationError::SwitchoverInterrupted)
        ));
    }

    #[test]
    fn shutdown_cancels_waits_for_the_cleanup_and_locks_migrations_out() {
        let (sh, ev) = shared_with_events();
        let sh = Arc::new(sh);
        let g = sh.begin_outgoing(&mut sh.lock()).unwrap();
        sh.attach_channel(g, &ShutdownHandle::default()).unwrap();
        sh.advance(g, Active).unwrap();
        // The migration thread: it notices the cancel, cleans up (which takes a while), and
        // reports.
        let thread = {
            let sh = sh.clone();
            std::thread::spawn(move || {
                while !sh.sleep_unless_cancelled(g, Duration::from_secs(10)) {}
                std::thread::sleep(Duration::from_millis(100));
                let resume = sh.may_resume_guest();
                sh.finish_outgoing(g, Outcome::Failed("Migration cancelled".into()));
                resume
            })
        };
        assert!(sh.shutdown(Duration::from_secs(10)));
        // It returned after the cleanup, which did not resume the guest.
        assert_eq!(sh.lock().out.status(), Cancelled);
        assert!(!thread.join().unwrap());
        assert_eq!(
            statuses(&ev),
            ["setup", "active", "cancelling", "cancelled"]
        );
        assert!(sh.begin_outgoing(&mut sh.lock()).is_err());
        assert!(sh
            .attach_incoming_channel(&ShutdownHandle::default())
            .is_err());
        // With nothing running it returns at once.
        assert!(sh.shutdown(Duration::ZERO));
    }
}
