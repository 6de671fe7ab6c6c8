//! The whole incoming stream: `migration::incoming::StreamLoader` over arbitrary bytes, into a
//! freshly made reference VM, the way the engine's incoming thread drives it (`load_header`,
//! `load_body`, `finish`; `abandon` after an error).
//!
//! Each input is loaded twice, into a `-M none` VM and into a `-M livemig` VM (one vCPU, whose
//! thread stays parked: the VM is created incoming, so it is stopped), both with
//! [`RAM_SIZE`] of RAM, a null-co disk [`DISK_NODE`] of [`DISK_SIZE`] opened inactive as under
//! `-incoming`, a pre-existing dirty bitmap [`KEPT_BITMAP`] on it with some bits set, and
//! capability `dirty-bitmaps` on, so `dirty-bitmap` sections are loaded rather than refused.
//! The return path is a sink, so `OPEN_RETURN_PATH` and `PING` are accepted.
//!
//! Afterwards, whatever the bytes were:
//! - the guest was never started and no event was emitted (the engine, not the loader, starts
//!   the guest, and only after a completed load);
//! - the device-load batch of the memory map is closed;
//! - after a failed load: the disks are still inactive, and the bitmaps are exactly those that
//!   were there before, untouched and not busy — no incoming bitmap is left;
//! - after a completed load: the disks are active, pre-existing bitmaps are untouched, and
//!   every new bitmap is complete (named, not busy or frozen, sized like its node);
//! - errors and warnings have text;
//! - after a completed load into `-M livemig`, the loaded vCPU and workload state can run: a
//!   few workload steps per vCPU (taken on copies, with no thread started) write only pages
//!   inside guest RAM.

use crate::invariants::{self, BitmapState};
use block::BlockLayer;
use migration::caps::{Capabilities, Capability};
use migration::events::RecordedEvents;
use migration::guest::PAGE_SIZE;
use migration::incoming::StreamLoader;
use migration::machine::{Machine, Reader};
use migration::params::Parameters;
use migration::runstate::RunState;
use migration::transport::{BoxRead, BoxWrite};
use serde_json::json;
use std::io::Cursor;
use std::sync::Arc;
use vm::workload::Share;
use vm::{MachineType, Vm, VmConfig};
use wire::StreamReader;

/// Guest RAM of the destination VMs (the seed streams were made with `-m 1M`).
pub const RAM_SIZE: u64 = 1 << 20;
/// The destination's disk node (the name the seed streams' sources used).
pub const DISK_NODE: &str = "node0";
/// Its size (the seed streams' sources used the same).
pub const DISK_SIZE: u64 = 64 << 20;
/// A bitmap that exists on the destination before the migration and must survive it unchanged.
pub const KEPT_BITMAP: &str = "keep";

/// What loading one input into one machine did.
#[derive(Debug)]
pub struct Outcome {
    /// The destination's machine type.
    pub machine: MachineType,
    /// `Ok` if the stream loaded completely (and `finish` succeeded), else the error's text.
    pub result: Result<(), String>,
    /// Warnings the loader collected.
    pub warnings: Vec<String>,
    /// RAM pages loaded.
    pub pages_loaded: u64,
    /// The run state the stream's `globalstate` carried, if any.
    pub received_runstate: Option<RunState>,
    /// Bitmaps the migration created on the destination (empty after a failure).
    pub bitmaps_created: Vec<BitmapState>,
}

/// Loads `data` into a `-M none` and a `-M livemig` destination and checks the invariants
/// (module doc). Panics when one does not hold.
pub fn run(data: &[u8]) -> Vec<Outcome> {
    vec![
        run_on(MachineType::None, data),
        run_on(MachineType::Livemig, data),
    ]
}

/// The destination: an incoming VM of `machine` with its block layer and event log.
pub fn destination(machine: MachineType) -> (Arc<Vm>, Arc<BlockLayer>, Arc<RecordedEvents>) {
    let layer = Arc::new(BlockLayer::new());
    layer.set_incoming(true);
    let node = layer
        .blockdev_add(&json!({"driver": "null-co", "node-name": DISK_NODE, "size": DISK_SIZE}))
        .expect("harness setup: null-co node");
    node.with_bitmaps(|list| {
        let id = list
            .create(65536, Some(KEPT_BITMAP))
            .expect("harness setup: bitmap");
        let bm = list.get_mut(id).expect("harness setup: bitmap just made");
        bm.set_dirty(0, 3 * 65536).expect("harness setup: set bits");
        bm.set_dirty(1 << 20, 4096)
            .expect("harness setup: set bits");
    });
    let events = Arc::new(RecordedEvents::default());
    let vm = Vm::new(
        VmConfig {
            name: "fuzz".into(),
            machine,
            ram_size: RAM_SIZE,
            vcpus: 1,
            incoming: true,
            start_paused: true,
            ..Default::default()
        },
        layer.clone(),
        events.clone(),
    )
    .expect("harness setup: VM");
    (vm, layer, events)
}

/// The state a completed load left can run: what the vCPU threads would do first once the
/// guest starts, done here on copies of the loaded state.
fn check_runnable(vm: &Vm, context: &str) {
    let core = vm.core();
    let cfg = core
        .workload
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let pages = core.ram.pages();
    let n = core.vcpus.len() as u32;
    for (id, slot) in core.vcpus.iter().enumerate() {
        let mut st = *slot.lock().unwrap_or_else(|p| p.into_inner());
        let share = Share::of(&cfg, pages, id as u32, n);
        for _ in 0..4 {
            let (write, _) = st.step(&cfg, &share);
            if let Some(w) = write {
                assert!(
                    w.offset
                        .checked_add(PAGE_SIZE)
                        .is_some_and(|e| e <= RAM_SIZE),
                    "{context}: vCPU {id} would write a page at {:#x}, outside RAM",
                    w.offset
                );
            }
        }
    }
}

/// Loads `data` into one fresh destination of `machine` and checks the invariants.
pub fn run_on(machine: MachineType, data: &[u8]) -> Outcome {
    let _one_at_a_time = crate::exclusive();
    let (vm, layer, events) = destination(machine);
    let before = invariants::snapshot(&layer);
    let mut caps = Capabilities::default();
    caps.apply(&[(Capability::DirtyBitmaps, true)])
        .expect("harness setup: capability");
    let params = Parameters::default();
    let input: BoxRead = Box::new(Cursor::new(data.to_vec()));
    let mut r: Reader = StreamReader::new(input);
    let return_path: BoxWrite = Box::new(std::io::sink());
    let mut loader = StreamLoader::new(vm.clone(), &caps, &params, Some(return_path));
    let result = load(&mut loader, &mut r);
    let context = format!("-M {machine:?}, result {result:?}");

    let bitmaps_created = check_after_load(
        &vm,
        &layer,
        &events,
        &before,
        &result,
        &loader.warnings,
        loader.postcopy_ran(),
        &context,
    );
    if result.is_ok() {
        check_runnable(&vm, &context);
    }
    let outcome = Outcome {
        machine,
        result,
        warnings: std::mem::take(&mut loader.warnings),
        pages_loaded: loader.pages_loaded(),
        received_runstate: loader.received_runstate(),
        bitmaps_created,
    };
    drop(loader);
    vm.shutdown();
    outcome
}

/// Loads a stream as the engine's incoming thread does: header, body, then what follows a
/// completed load (`finish_postcopy` after a postcopy RUN, else `finish` with the disks
/// activated), or `abandon` after an error.
pub(crate) fn load(loader: &mut StreamLoader, r: &mut Reader) -> Result<(), String> {
    let result = loader
        .load_header(r)
        .and_then(|()| loader.load_body(r))
        .and_then(|()| {
            if loader.postcopy_ran() {
                loader.finish_postcopy();
                Ok(())
            } else {
                loader.finish(true)
            }
        });
    if result.is_err() {
        loader.abandon();
    }
    result.map_err(|e| e.to_string())
}

/// The checks every harness that drives [`StreamLoader`] makes after a load (module doc);
/// returns the bitmaps a completed load created. `postcopy_ran`: a postcopy RUN was handled,
/// which activated the disks and started the guest (or set the source's run state) — even
/// if the listen thread failed afterwards.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_after_load(
    vm: &Vm,
    layer: &BlockLayer,
    events: &RecordedEvents,
    before: &[BitmapState],
    result: &Result<(), String>,
    warnings: &[String],
    postcopy_ran: bool,
    context: &str,
) -> Vec<BitmapState> {
    if let Err(e) = result {
        assert!(!e.trim().is_empty(), "{context}: an error without text");
    }
    for w in warnings {
        assert!(!w.trim().is_empty(), "{context}: a warning without text");
    }
    let emitted = events.snapshot();
    let state = vm.runstate();
    if postcopy_ran {
        // RUN started the guest (RESUME) or gave it the source's run state.
        let resumed = state == RunState::Running;
        let expected: Vec<(String, Option<serde_json::Value>)> = if resumed {
            vec![("RESUME".into(), None)]
        } else {
            Vec::new()
        };
        assert_eq!(
            emitted, expected,
            "{context}: RUN left the run state {state:?} with these events"
        );
        assert_ne!(
            state,
            RunState::InMigrate,
            "{context}: RUN was handled but the run state is still inmigrate"
        );
    } else {
        assert_eq!(
            state,
            RunState::InMigrate,
            "{context}: the loader changed the run state"
        );
        assert!(
            emitted.is_empty(),
            "{context}: the loader emitted events: {emitted:?}"
        );
    }
    // A batch left open would defer this change instead of rebuilding the view at once.
    let memmap = &vm.core().memmap;
    let rebuilds = memmap.stats().rebuilds;
    assert!(
        memmap.set_address("ram", Some(1 << 40)),
        "{context}: no ram region"
    );
    assert_eq!(
        memmap.stats().rebuilds,
        rebuilds + 1,
        "{context}: the device-load batch of the memory map was left open"
    );

    let after = invariants::snapshot(layer);
    let inactive: Vec<String> = layer
        .nodes()
        .iter()
        .filter(|n| n.is_inactive())
        .map(|n| n.name().to_string())
        .collect();
    let bitmaps_created = match result {
        Ok(()) => {
            assert!(
                inactive.is_empty(),
                "{context}: disks still inactive after a completed load: {inactive:?}"
            );
            invariants::assert_completed_load_sane(layer, before, &after, context);
            invariants::created(before, &after)
        }
        Err(_) if postcopy_ran => {
            // The guest ran here: RUN took the disks, and they stay taken.
            assert!(
                inactive.is_empty(),
                "{context}: disks inactive after a postcopy RUN: {inactive:?}"
            );
            invariants::assert_failed_load_clean(before, &after, context);
            Vec::new()
        }
        Err(_) => {
            assert_eq!(
                inactive.len(),
                layer.nodes().len(),
                "{context}: a failed load activated disks"
            );
            invariants::assert_failed_load_clean(before, &after, context);
            Vec::new()
        }
    };
    for n in layer.nodes() {
        assert_eq!(
            n.in_flight(),
            0,
            "{context}: I/O left in flight on '{}'",
            n.name()
        );
    }
    bitmaps_created
}
