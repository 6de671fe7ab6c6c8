//! The migration object a VMM holds: capabilities, parameters, the state of the outgoing and
//! incoming migrations, and the QMP-shaped operations on them (`migrate`, `migrate_cancel`,
//! `migrate-continue`, `migrate-incoming`, `query-migrate`...).
//!
//! The state itself, and every change of it, belongs to the state machine ([`crate::state`]).
//!
//! Threads and locks. Each migration runs on its own thread. The only lock is the mutex around
//! [`Shared`]'s state, held for short bookkeeping only — never across I/O, never while waiting
//! for the migration thread, and never while calling into the VMM. The migration thread waits
//! for `migrate-continue` (or a cancel) on a condition variable that releases the mutex.
//! `migrate_cancel` never waits for the migration thread: it flips the state to `cancelling`,
//! shuts the channel down so a blocked write returns, and wakes any wait; the thread then
//! cleans up and reports `cancelled`.

use crate::caps::Capability;
use crate::error::MigrationError;
use crate::events::EventSink;
use crate::incoming;
use crate::machine::Machine;
use crate::outgoing;
use crate::params::ParameterUpdate;
use crate::ram::RamCounters;
use crate::state::{IncomingMode, Shared};
use crate::status::MigrationStatus;
use crate::transport::{Listener, MigrationUri};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The destination's postcopy fields of `query-migrate`: QEMU's `postcopy-blocktime` and
/// `postcopy-vcpu-blocktime` (milliseconds, with capability `postcopy-blocktime`), and
/// livemig's `x-livemig-postcopy` (page requests and their fault → placement latency, whole
/// and in its three stages).
fn postcopy_info(m: &mut Map<String, Value>, pc: &crate::postcopy::PostcopyRam) {
    let mut x = Map::new();
    if let Some(bt) = pc.blocktime() {
        m.insert("postcopy-blocktime".into(), json!(bt.total_ms()));
        m.insert("postcopy-vcpu-blocktime".into(), json!(bt.vcpu_ms()));
        x.insert("blocktime-ns".into(), json!(bt.total_ns()));
        x.insert("vcpu-blocktime-ns".into(), json!(bt.vcpu_ns()));
    }
    let h = pc.requests().latency();
    x.insert("requests".into(), json!(pc.requests().requests()));
    x.insert("latency-count".into(), json!(h.count()));
    x.insert("latency-median-us".into(), json!(h.quantile_us(0.5)));
    x.insert("latency-p99-us".into(), json!(h.quantile_us(0.99)));
    x.insert("latency-mean-ns".into(), json!(h.mean_ns()));
    x.insert("latency-max-ns".into(), json!(h.max_ns()));
    // Where the time went (`postcopy::requests`): asking, the answer, placing.
    let st = pc.requests().stages();
    for (name, h) in [
        ("asking", &st.asking),
        ("answer", &st.answer),
        ("placing", &st.placing),
    ] {
        x.insert(format!("latency-{name}-count"), json!(h.count()));
        x.insert(
            format!("latency-{name}-median-us"),
            json!(h.quantile_us(0.5)),
        );
        x.insert(format!("latency-{name}-p99-us"), json!(h.quantile_us(0.99)));
    }
    let st = &pc.stats;
    x.insert(
        "pages-copied".into(),
        json!(st.copied.load(Ordering::Relaxed)),
    );
    x.insert(
        "pages-zeroed".into(),
        json!(st.zeroed.load(Ordering::Relaxed)),
    );
    x.insert("faults".into(), json!(st.faults.load(Ordering::Relaxed)));
    x.insert(
        "preempt-pages".into(),
        json!(st.preempt_pages.load(Ordering::Relaxed)),
    );
    m.insert("x-livemig-postcopy".into(), Value::Object(x));
}

/// Statistics of one outgoing migration, as `query-migrate` reports them.
#[derive(Debug, Default)]
pub struct OutgoingStats {
    /// RAM record counters.
    pub ram: Arc<RamCounters>,
    /// The multifd channels' counters (`multifd-bytes`, `dirty-sync-missed-zero-copy`).
    pub multifd: Arc<crate::multifd::MultifdCounters>,
    /// Bytes written to the main channel (`ram.transferred` adds the multifd channels').
    pub transferred: AtomicU64,
    /// Bytes written before the guest stopped (`precopy-bytes`).
    pub precopy_bytes: AtomicU64,
    /// Bytes written while the guest was stopped (`downtime-bytes`).
    pub downtime_bytes: AtomicU64,
    /// Bytes written in postcopy (`postcopy-bytes`).
    pub postcopy_bytes: AtomicU64,
    /// Total guest RAM in bytes (`ram.total`).
    pub total: AtomicU64,
    /// Throughput of the last measurement window, bits per second.
    pub bits_per_second: AtomicU64,
    /// Pages per second in the last measurement window.
    pub pages_per_second: AtomicU64,
    /// Pages dirtied per second, measured between the last two syncs.
    pub dirty_pages_rate: AtomicU64,
    /// Expected downtime in ms from the last estimate.
    pub expected_downtime_ms: AtomicU64,
    /// Bytes of dirty bitmaps still to send at switchover.
    pub bitmap_bytes: AtomicU64,
    /// The vCPU throttle auto-converge has set, % (0: none); `cpu-throttle-percentage`.
    pub cpu_throttle_percentage: AtomicU64,
}

/// Options a VMM fixes when it creates the migration object.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Start the guest after an incoming migration completes (false with `-S`).
    pub autostart: bool,
    /// The objects (`-object`, `object-add`) where `tls-creds` and `tls-authz` are looked up.
    pub tls_objects: Arc<tls::Objects>,
    /// Called when an incoming migration's load fails where QEMU 7.2 exits the process
    /// (see [`LoadFailureHook`]); `None` keeps the destination running, `failed`.
    pub on_load_failure: Option<LoadFailureHook>,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            autostart: true,
            tls_objects: Arc::new(tls::Objects::new()),
            on_load_failure: None,
        }
    }
}

/// What a VMM does when the load of an incoming migration fails: QEMU 7.2 exits with status
/// 1 then (`process_incoming_migration_co`, and postcopy's listen thread when the failure
/// does not pause), and management — QEMU's iotests included — counts on it. Called with the
/// error, once the status is `failed` and its `MIGRATION` event out. Not called when the
/// incoming migration fails before its stream is read (accepting the channel, TLS, the
/// multifd or preempt channels: QEMU reports those and keeps running), when postcopy pauses
/// instead, nor when the VM is shutting down (the shutdown ended the load).
#[derive(Clone)]
pub struct LoadFailureHook(pub Arc<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for LoadFailureHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadFailureHook")
    }
}

/// The migration subsystem of one VM.
pub struct Migration {
    machine: Arc<dyn Machine>,
    shared: Arc<Shared>,
    objects: Arc<tls::Objects>,
    on_load_failure: Option<LoadFailureHook>,
}

impl Migration {
    /// Creates the migration object of `machine`, reporting events to `events`.
    pub fn new(
        machine: Arc<dyn Machine>,
        events: Arc<dyn EventSink>,
        options: MigrationOptions,
    ) -> Self {
        let shared = Arc::new(Shared::new(options.autostart, events));
        Migration {
            machine,
            shared,
            objects: options.tls_objects,
            on_load_failure: options.on_load_failure,
        }
    }

    /// Whether the guest starts when an incoming migration completes; `cont` during
    /// `inmigrate` turns it on (QEMU's `autostart`).
    pub fn set_autostart(&self, on: bool) {
        self.shared.lock().autostart = on;
    }

    /// `migrate-set-capabilities`. Refused while an outgoing migration runs; a destination
    /// takes them while it listens or loads, as QEMU 7.2 does (its `migration_is_running`
    /// looks at the outgoing state only) — the incoming side reads what it needs when it
    /// needs it (`late-block-activate` at the end of the load, `events` at each transition).
    pub fn set_capabilities(&self, changes: &[(Capability, bool)]) -> Result<(), MigrationError> {
        let mut inner = self.shared.lock();
        if inner.out.status().is_running() {
            return Err(MigrationError::InProgress);
        }
        let throttle_on = changes
            .iter()
            .any(|(c, on)| *c == Capability::AutoConverge && *on);
        if throttle_on && !self.machine.can_throttle_vcpus() {
            return Err(MigrationError::InvalidParameter(
                "Capability 'auto-converge' is not supported by this machine: it cannot throttle its vCPUs".into(),
            ));
        }
        let mut next = inner.caps.clone();
        next.apply(changes)?;
        crate::multifd::check_zero_copy(&next, &inner.params)?;
        inner.caps = next;
        Ok(())
    }

    /// `query-migrate-capabilities`.
    pub fn capabilities(&self) -> Vec<(Capability, bool)> {
        self.shared.lock().caps.list()
    }

    /// Whether a capability is on.
    pub fn has_capability(&self, cap: Capability) -> bool {
        self.shared.lock().caps.has(cap)
    }

    /// `migrate-set-parameters` (allowed during a migration; bandwidth changes take effect at
    /// once).
    pub fn set_parameters(&self, update: &ParameterUpdate) -> Result<(), MigrationError> {
        let mut inner = self.shared.lock();
        let mut next = inner.params.clone();
        next.apply(update)?;
        // QEMU's last check (`migrate_params_check`), on the parameters as they would be.
        crate::multifd::check_zero_copy(&inner.caps, &next)?;
        inner.params = next;
        self.shared.notify();
        Ok(())
    }

    /// `query-migrate-parameters`.
    pub fn parameters(&self) -> Value {
        self.shared.lock().params.to_json()
    }

    /// `migrate`: checks the request and starts the migration thread.
    pub fn migrate(&self, uri: &str) -> Result<(), MigrationError> {
        let parsed = MigrationUri::parse(uri)?;
        let mut inner = self.shared.lock();
        if inner.out.status().is_running() || inner.inc.status().is_running() {
            return Err(MigrationError::InProgress);
        }
        if inner.inc.mode != IncomingMode::None && inner.inc.status() != MigrationStatus::Completed
        {
            return Err(MigrationError::WaitingForIncoming);
        }
        if self.machine.runstate() == crate::runstate::RunState::PostMigrate {
            return Err(MigrationError::PausedAfterMigration);
        }
        // QEMU takes an `fd:` descriptor once the migration has begun: a missing one fails
        // the command and the migration both (the thread fails on the error the URI keeps).
        let claimed = parsed.claim_fd(false);
        let generation = self.shared.begin_outgoing(&mut inner)?;
        let job = outgoing::Job {
            generation,
            shared: self.shared.clone(),
            machine: self.machine.clone(),
            caps: inner.caps.clone(),
            uri: parsed,
            stats: inner.out.stats.clone(),
            tls: inner.params.tls(),
            objects: self.objects.clone(),
        };
        drop(inner);
        std::thread::Builder::new()
            .name("migration-out".into())
            .spawn(move || outgoing::run(job))
            .map_err(|e| MigrationError::io("cannot start the migration thread", e))?;
        claimed
    }

    /// `migrate_cancel`: cancels a running outgoing migration; a no-op otherwise.
    pub fn cancel(&self) -> Result<(), MigrationError> {
        self.shared.cancel_outgoing()
    }

    /// Ends every migration before the VM shuts down (`quit`, SIGTERM...), as QEMU's
    /// `migration_shutdown` does, and waits (at most `timeout`) for the cleanup: an outgoing
    /// migration is cancelled — its bitmaps released with `skip_store` cleared, its disks
    /// reactivated, the guest left stopped — and an incoming one is interrupted, dropping the
    /// bitmaps it had begun. After it, no migration starts. The embedder closes its block
    /// layer next, which stores the persistent bitmaps. Returns whether everything stopped in
    /// time.
    pub fn shutdown(&self, timeout: Duration) -> bool {
        self.shared.shutdown(timeout)
    }

    /// `migrate-continue`: leaves `pre-switchover` when `state` names the current state.
    pub fn continue_(&self, state: MigrationStatus) -> Result<(), MigrationError> {
        self.shared.request_continue(state)
    }

    /// `migrate-start-postcopy`: the running migration switches to postcopy at its next round.
    /// As QEMU, a migration that has already finished is not an error (the command races it).
    pub fn start_postcopy(&self) -> Result<(), MigrationError> {
        let mut inner = self.shared.lock();
        let (ram, bitmaps) = (
            inner.caps.has(Capability::PostcopyRam),
            inner.caps.has(Capability::DirtyBitmaps),
        );
        if !ram && !bitmaps {
            return Err(MigrationError::Other(
                "Enable postcopy with migrate_set_capability before the start of migration".into(),
            ));
        }
        if inner.out.status() == MigrationStatus::None {
            return Err(MigrationError::Other(
                "Postcopy must be started after migration has been started".into(),
            ));
        }
        // With `dirty-bitmaps` alone this is a bitmap-only postcopy (QEMU 7.2's
        // `migrate_postcopy()`): RAM still converges in precopy, the bitmaps follow the switch.
        inner.out.postcopy_requested = true;
        drop(inner);
        self.shared.notify();
        Ok(())
    }

    /// `migrate-pause`: a postcopy migration (either end) drops its channels and pauses,
    /// keeping every page; `migrate-recover` and `migrate ... resume=true` resume it.
    pub fn pause(&self) -> Result<(), MigrationError> {
        self.shared.request_pause()
    }

    /// `migrate URI resume=true` on a source paused in postcopy: the migration thread
    /// connects to `uri` (where the destination's `migrate-recover` listens) and resumes.
    pub fn resume(&self, uri: &str) -> Result<(), MigrationError> {
        let parsed = MigrationUri::parse(uri)?;
        parsed.claim_fd(false)?;
        self.shared.request_resume(parsed)
    }

    /// `migrate-recover URI` on a destination paused in postcopy: listens on `uri` for the
    /// source's `migrate ... resume=true`.
    pub fn recover(&self, uri: &str) -> Result<(), MigrationError> {
        let parsed = MigrationUri::parse(uri)?;
        parsed.claim_fd(true)?;
        self.shared.request_recover(|| Listener::bind(&parsed))
    }

    /// Marks this VM as a destination started with `-incoming defer`.
    pub fn incoming_defer(&self) {
        self.shared.lock().inc.mode = IncomingMode::Deferred;
    }

    /// `-incoming URI` at start-up: binds the address now and loads the stream on a thread.
    pub fn incoming(&self, uri: &str) -> Result<(), MigrationError> {
        self.start_incoming(uri, None)
    }

    /// `migrate-incoming` from a monitor, after `-incoming defer`: as [`Migration::incoming`],
    /// but the stream is read only once the returned gate is opened — after the command's
    /// reply went out, as in QEMU, whose load runs in the main loop after the command returns.
    /// A stream that fails at once ends the process (a failed load exits with status 1), and
    /// the client must have had its reply first.
    pub fn incoming_gated(&self, uri: &str) -> Result<StartGate, MigrationError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.start_incoming(uri, Some(rx))?;
        Ok(StartGate(tx))
    }

    /// Starts an incoming migration; with a `gate`, one a monitor asked for.
    fn start_incoming(
        &self,
        uri: &str,
        gate: Option<std::sync::mpsc::Receiver<()>>,
    ) -> Result<(), MigrationError> {
        let mut inner = self.shared.lock();
        // QEMU checks the VM's state before it looks at the URI.
        if gate.is_some() {
            match inner.inc.mode {
                IncomingMode::None => return Err(MigrationError::NoIncoming),
                IncomingMode::Started => return Err(MigrationError::IncomingAlreadyStarted),
                IncomingMode::Deferred => {}
            }
        }
        // QEMU 7.2's `qemu_start_incoming_migration` announces `setup` first, whatever the
        // `events` capability (with `-incoming` on the command line no client hears it); the
        // source's connecting is silent, and `active` follows once the stream is there.
        self.shared
            .events
            .emit("MIGRATION", Some(serde_json::json!({"status": "setup"})));
        // QEMU 7.2 words an unknown scheme on the incoming side differently from `migrate`.
        if !["tcp:", "unix:", "exec:", "file:", "fd:"]
            .iter()
            .any(|scheme| uri.starts_with(scheme))
        {
            return Err(MigrationError::InvalidParameter(format!(
                "unknown migration protocol: {uri}"
            )));
        }
        let parsed = MigrationUri::parse(uri)?;
        parsed.claim_fd(true)?;
        let listener = Listener::bind(&parsed)?;
        if let (MigrationUri::Tcp { host, .. }, Some(port)) = (&parsed, listener.local_port()) {
            inner.inc.port = Some((host.clone(), port));
        }
        inner.inc.mode = IncomingMode::Started;
        let job = incoming::Job {
            shared: self.shared.clone(),
            machine: self.machine.clone(),
            listener,
            objects: self.objects.clone(),
            on_load_failure: self.on_load_failure.clone(),
        };
        drop(inner);
        std::thread::Builder::new()
            .name("migration-in".into())
            .spawn(move || {
                if let Some(gate) = gate {
                    // Opened, or dropped unopened: either way the reply's fate is settled.
                    let _ = gate.recv();
                }
                incoming::run(job)
            })
            .map_err(|e| MigrationError::io("cannot start the incoming migration thread", e))?;
        Ok(())
    }

    /// The TCP port an incoming migration listens on (useful with port 0).
    pub fn incoming_port(&self) -> Option<u16> {
        self.shared.lock().inc.port.as_ref().map(|(_, p)| *p)
    }

    /// Whether this VM waits for (or is loading) an incoming migration.
    pub fn is_incoming(&self) -> bool {
        let inner = self.shared.lock();
        inner.inc.mode != IncomingMode::None && !inner.inc.status().is_finished()
    }

    /// Status of the outgoing migration.
    pub fn outgoing_status(&self) -> MigrationStatus {
        self.shared.lock().out.status()
    }

    /// Status of the incoming migration.
    pub fn incoming_status(&self) -> MigrationStatus {
        self.shared.lock().inc.status()
    }

    /// Guest RAM pages the destination has not received while its postcopy is paused or
    /// recovering: touching one blocks until a recovery brings it, so a monitor command that
    /// reads all of guest RAM must not run then (0 in any other state).
    pub fn pages_awaiting_recovery(&self) -> u64 {
        let inner = self.shared.lock();
        match (inner.inc.status(), &inner.inc.postcopy) {
            (MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover, Some(pc)) => {
                pc.missing_pages()
            }
            _ => 0,
        }
    }

    /// Waits until the outgoing migration reaches one of `statuses`, or `timeout` passes.
    pub fn wait_outgoing(
        &self,
        statuses: &[MigrationStatus],
        timeout: Duration,
    ) -> MigrationStatus {
        self.shared
            .wait_status(|i| i.out.status(), statuses, timeout)
    }

    /// Waits until the incoming migration reaches one of `statuses`, or `timeout` passes.
    pub fn wait_incoming(
        &self,
        statuses: &[MigrationStatus],
        timeout: Duration,
    ) -> MigrationStatus {
        self.shared
            .wait_status(|i| i.inc.status(), statuses, timeout)
    }

    /// `query-migrate`'s `MigrationInfo`: the outgoing migration once one was started,
    /// otherwise the incoming one, otherwise `{}`.
    pub fn query(&self) -> Value {
        let inner = self.shared.lock();
        let mut m = Map::new();
        if inner.out.status() != MigrationStatus::None {
            let o = &inner.out;
            let st = o.status();
            m.insert("status".into(), json!(st.as_str()));
            let with_ram = matches!(
                st,
                MigrationStatus::Active
                    | MigrationStatus::Cancelling
                    | MigrationStatus::PreSwitchover
                    | MigrationStatus::Device
                    | MigrationStatus::Completed
                    | MigrationStatus::PostcopyActive
                    | MigrationStatus::PostcopyPaused
                    | MigrationStatus::PostcopyRecover
            );
            let elapsed = o
                .total_ms
                .or_else(|| o.started.map(|s| s.elapsed().as_millis() as u64))
                .unwrap_or(0);
            if with_ram {
                let s = &o.stats;
                let normal = s.ram.normal_pages.load(Ordering::Relaxed);
                let multifd_bytes = s.multifd.bytes.load(Ordering::Relaxed);
                let remaining =
                    s.ram.remaining_pages.load(Ordering::Relaxed) * crate::guest::PAGE_SIZE;
                m.insert(
                    "ram".into(),
                    json!({
                        "transferred": s.transferred.load(Ordering::Relaxed) + multifd_bytes,
                        "remaining": remaining,
                        "total": s.total.load(Ordering::Relaxed),
                        "duplicate": s.ram.zero_pages.load(Ordering::Relaxed),
                        "skipped": 0,
                        "normal": normal,
                        "normal-bytes": normal * crate::guest::PAGE_SIZE,
                        "dirty-pages-rate": s.dirty_pages_rate.load(Ordering::Relaxed),
                        "mbps": s.bits_per_second.load(Ordering::Relaxed) as f64 / 1e6,
                        "dirty-sync-count": s.ram.dirty_syncs.load(Ordering::Relaxed),
                        "postcopy-requests": s.ram.postcopy_requests.load(Ordering::Relaxed),
                        "page-size": crate::guest::PAGE_SIZE,
                        "multifd-bytes": multifd_bytes,
                        "pages-per-second": s.pages_per_second.load(Ordering::Relaxed),
                        "precopy-bytes": s.precopy_bytes.load(Ordering::Relaxed),
                        "downtime-bytes": s.downtime_bytes.load(Ordering::Relaxed),
                        "postcopy-bytes": s.postcopy_bytes.load(Ordering::Relaxed),
                        "dirty-sync-missed-zero-copy": s.multifd.missed_zero_copy.load(Ordering::Relaxed),
                    }),
                );
                if o.postcopy_requested {
                    // livemig's own: pages that went out on the preempt channel.
                    m.insert(
                        "x-livemig-postcopy".into(),
                        json!({
                            "preempt-pages": s.ram.preempt_pages.load(Ordering::Relaxed),
                            "requested-in-flight": s.ram.requested_in_flight.load(Ordering::Relaxed),
                        }),
                    );
                }
                // As QEMU: only while the vCPUs are throttled (the migration lifts the
                // throttle when it ends).
                let throttle = s.cpu_throttle_percentage.load(Ordering::Relaxed);
                if throttle > 0 {
                    m.insert("cpu-throttle-percentage".into(), json!(throttle));
                }
                m.insert("total-time".into(), json!(elapsed));
                if st == MigrationStatus::Completed {
                    if let Some(d) = o.downtime_ms {
                        m.insert("downtime".into(), json!(d));
                    }
                } else {
                    m.insert(
                        "expected-downtime".into(),
                        json!(s.expected_downtime_ms.load(Ordering::Relaxed)),
                    );
                }
            } else if st.is_finished() {
                m.insert("total-time".into(), json!(elapsed));
            }
            if let Some(t) = o.setup_ms {
                m.insert("setup-time".into(), json!(t));
            }
            // livemig's own: whether the destination confirmed it took the guest.
            if let Some(h) = o.handover {
                m.insert("x-livemig-handover".into(), json!(h));
            }
            if let Some(e) = &o.error {
                if st == MigrationStatus::Failed {
                    m.insert("error-desc".into(), json!(e));
                }
            }
            if let Some(e) = &o.pause_reason {
                // livemig says why postcopy paused and what a resume needs (QEMU says
                // nothing until the migration fails).
                if matches!(
                    st,
                    MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover
                ) {
                    m.insert("error-desc".into(), json!(e));
                }
            }
        } else if inner.inc.status() != MigrationStatus::None
            || inner.inc.mode != IncomingMode::None
        {
            let i = &inner.inc;
            if i.status() != MigrationStatus::None {
                m.insert("status".into(), json!(i.status().as_str()));
            }
            if let Some((host, port)) = &i.port {
                m.insert(
                    "socket-address".into(),
                    json!([{
                        "type": "inet",
                        "host": host,
                        "port": port.to_string(),
                        // As QEMU: the family of the address bound.
                        (if host.contains(':') { "ipv6" } else { "ipv4" }): true,
                    }]),
                );
            }
            if let Some(t) = i.total_ms {
                m.insert("total-time".into(), json!(t));
            }
            if let (Some(e), MigrationStatus::Failed) = (&i.error, i.status()) {
                m.insert("error-desc".into(), json!(e));
            }
            if let Some(e) = &i.pause_reason {
                if matches!(
                    i.status(),
                    MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover
                ) {
                    m.insert("error-desc".into(), json!(e));
                }
            }
            if !i.warnings.is_empty() {
                m.insert("x-livemig-warnings".into(), json!(i.warnings));
            }
            if let Some(pc) = &i.postcopy {
                postcopy_info(&mut m, pc);
            }
        }
        Value::Object(m)
    }

    /// The destination's postcopy statistics, in nanoseconds and microseconds (benchmarks):
    /// fault → placement latency of requested pages, blocktime, page counts.
    pub fn postcopy_stats(&self) -> Option<Value> {
        let inner = self.shared.lock();
        let pc = inner.inc.postcopy.as_ref()?;
        let mut m = Map::new();
        postcopy_info(&mut m, pc);
        m.remove("x-livemig-postcopy")
    }

    /// The error of the last failed migration, outgoing or incoming.
    pub fn last_error(&self) -> Option<String> {
        let inner = self.shared.lock();
        inner.out.error.clone().or_else(|| inner.inc.error.clone())
    }

    /// The machine this object migrates.
    pub fn machine(&self) -> &Arc<dyn Machine> {
        &self.machine
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::NoEvents;
    use crate::guest::RamBlock;
    use crate::machine::DeviceState;
    use crate::runstate::RunState;

    /// A VMM that cannot throttle its vCPUs (the trait's default).
    struct NoThrottle;

    impl Machine for NoThrottle {
        fn machine_type(&self) -> String {
            "none".into()
        }
        fn ram_blocks(&self) -> Vec<Arc<dyn RamBlock>> {
            vec![]
        }
        fn devices(&self) -> Vec<Arc<dyn DeviceState>> {
            vec![]
        }
        fn block_layer(&self) -> Option<Arc<block::BlockLayer>> {
            None
        }
        fn runstate(&self) -> RunState {
            RunState::Running
        }
        fn stop(&self, _: RunState) {}
        fn start(&self) {}
        fn set_runstate(&self, _: RunState) {}
    }

    #[test]
    fn auto_converge_is_refused_when_the_machine_cannot_throttle() {
        let m = Migration::new(
            Arc::new(NoThrottle),
            Arc::new(NoEvents),
            MigrationOptions::default(),
        );
        let e = m
            .set_capabilities(&[(Capability::AutoConverge, true)])
            .unwrap_err();
        assert!(e.to_string().contains("auto-converge"), "{e}");
        assert!(!m.has_capability(Capability::AutoConverge));
        // Turning it off is always fine.
        m.set_capabilities(&[(Capability::AutoConverge, false)])
            .unwrap();
    }
}

/// Lets an incoming migration started by [`Migration::incoming_gated`] read its stream.
#[derive(Debug)]
pub struct StartGate(std::sync::mpsc::Sender<()>);

impl StartGate {
    /// Opens the gate.
    pub fn open(self) {
        let _ = self.0.send(());
    }
}
