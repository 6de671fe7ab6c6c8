//! The postcopy destination: `migration::incoming::StreamLoader` over arbitrary bytes with the
//! capabilities of a postcopy destination, driven as the engine's incoming thread drives it
//! (`load_header`, `load_body` — which at LISTEN starts the fault and listen threads and
//! returns once the listen thread has read EOF —, then `finish_postcopy` after a RUN, `finish`
//! otherwise, `abandon` after an error). What the postcopy paths parse: POSTCOPY_ADVISE (0 or
//! 16 bytes), RAM_DISCARD ranges, PACKAGED (a nested stream), LISTEN and RUN, the listen
//! thread's PART/END sections of `ram` (page runs, ZERO fills, EOS) and `dirty-bitmap`, PINGs,
//! RECV_BITMAP and POSTCOPY_RESUME outside a recovery, and the `postcopy-preempt` channel's bare
//! page records.
//!
//! Input: the main channel's bytes, optionally followed by the preempt channel's bytes, their
//! length as a little-endian `u32` and the four bytes `PRMT` ([`split`]). Each input runs in
//! two destinations ([`Variant`]), both `-M none` with [`stream::RAM_SIZE`] of RAM and the
//! disk and bitmaps of [`stream::destination`]:
//! - [`Variant::Ram`]: `postcopy-ram` (+ `dirty-bitmaps`, `postcopy-blocktime`, and
//!   `postcopy-preempt` when the input has a preempt channel): the loader registers guest RAM
//!   with a real userfaultfd. Skipped where the host has none ([`userfaultfd_unavailable`]).
//! - [`Variant::BitmapOnly`]: `dirty-bitmaps` alone, bitmap-only postcopy (no userfaultfd; a
//!   page after LISTEN is refused). The preempt bytes are not used.
//!
//! Why `-M none`: RUN starts the guest, and nothing may touch a page that has not arrived (a
//! vCPU on a missing page would wait for the source forever, and a harness has no source).
//! `-M none` has no vCPUs, and this harness never reads guest RAM either. Everything else
//! that could wait ends by itself: the channels are in-memory readers that end, and the fault
//! thread is stopped by the loader.
//!
//! Afterwards, besides [`stream`]'s checks (a RUN may have started the guest and activated the
//! disks; then the guest is running with one RESUME event, or in the source's run state):
//! - guest RAM is no longer registered with any userfaultfd: a fresh userfaultfd can register
//!   every block (a range left registered with a userfaultfd no thread reads would hang
//!   whoever touches a missing page, for good);
//! - the pages the kernel has mapped are exactly the pages the received maps hold
//!   (`/proc/self/pagemap`): every page marked received was placed, and nothing was placed
//!   that is not marked (but for one precopy page a failed load read half-way);
//! - after a completed postcopy (RUN handled) with `postcopy-ram`, every page was received;
//! - once the loader is dropped: no `postcopy-*` thread and no userfaultfd is left in the
//!   process.

use crate::invariants;
use crate::stream::{self, check_after_load, load, RAM_SIZE};
use migration::caps::{Capabilities, Capability};
use migration::guest::PAGE_SIZE;
use migration::incoming::StreamLoader;
use migration::machine::Reader;
use migration::params::Parameters;
use migration::postcopy::uffd::{probe, PostcopyFd};
use migration::postcopy::PostcopyRam;
use migration::transport::{BoxRead, BoxWrite, ShutdownHandle};
use std::io::{Cursor, Read, Seek, SeekFrom};
use std::sync::OnceLock;
use std::time::Duration;
use vm::MachineType;
use wire::StreamReader;

/// The trailer that says the input carries a preempt channel.
pub const PREEMPT_MAGIC: &[u8; 4] = b"PRMT";

/// Which postcopy destination an input is loaded into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `postcopy-ram` with a userfaultfd, `dirty-bitmaps`, `postcopy-blocktime`, and
    /// `postcopy-preempt` with the input's preempt channel.
    Ram,
    /// Bitmap-only postcopy: `dirty-bitmaps` alone.
    BitmapOnly,
}

/// What loading one input into one destination did.
#[derive(Debug)]
pub struct Outcome {
    /// The destination.
    pub variant: Variant,
    /// `Ok` if the stream loaded completely, else the error's text.
    pub result: Result<(), String>,
    /// Whether a postcopy RUN was handled (the guest ran here).
    pub postcopy_ran: bool,
    /// Warnings the loader collected.
    pub warnings: Vec<String>,
    /// RAM pages loaded the precopy way.
    pub pages_loaded: u64,
    /// Pages the received maps hold at the end (`postcopy-ram` only).
    pub pages_received: u64,
    /// Pages placed with UFFDIO_COPY / UFFDIO_ZEROPAGE after LISTEN.
    pub pages_placed: u64,
    /// Records read from the preempt channel.
    pub preempt_pages: u64,
    /// Bitmaps the migration created (empty after a failure).
    pub bitmaps_created: Vec<invariants::BitmapState>,
}

/// Splits an input into the main channel and, if it has the [`PREEMPT_MAGIC`] trailer, the
/// preempt channel.
pub fn split(data: &[u8]) -> (&[u8], Option<&[u8]>) {
    let Some(rest) = data.strip_suffix(PREEMPT_MAGIC) else {
        return (data, None);
    };
    let Some((head, len)) = rest.split_last_chunk::<4>() else {
        return (data, None);
    };
    let len = u32::from_le_bytes(*len) as usize;
    match head.len().checked_sub(len) {
        Some(at) => (&head[..at], Some(&head[at..])),
        None => (data, None),
    }
}

/// Why the [`Variant::Ram`] destination cannot run here (no userfaultfd for this process),
/// or `None` if it can.
pub fn userfaultfd_unavailable() -> Option<String> {
    static PROBE: OnceLock<Option<String>> = OnceLock::new();
    PROBE
        .get_or_init(|| probe().err().map(|e| e.to_string()))
        .clone()
}

/// Loads `data` into both postcopy destinations (the `postcopy-ram` one only where the host
/// has a userfaultfd) and checks the invariants (module doc). Panics when one does not hold.
pub fn run(data: &[u8]) -> Vec<Outcome> {
    let mut out = Vec::new();
    if userfaultfd_unavailable().is_none() {
        out.push(run_variant(Variant::Ram, data));
    }
    out.push(run_variant(Variant::BitmapOnly, data));
    out
}

/// Loads `data` into one fresh destination of `variant` and checks the invariants.
pub fn run_variant(variant: Variant, data: &[u8]) -> Outcome {
    let _one_at_a_time = crate::exclusive();
    let (main, preempt) = split(data);
    let (vm, layer, events) = stream::destination(MachineType::None);
    let before = invariants::snapshot(&layer);
    let mut caps = Capabilities::default();
    let mut wanted = vec![(Capability::DirtyBitmaps, true)];
    let preempt = preempt.filter(|_| variant == Variant::Ram);
    if variant == Variant::Ram {
        wanted.push((Capability::PostcopyRam, true));
        wanted.push((Capability::PostcopyBlocktime, true));
        if preempt.is_some() {
            wanted.push((Capability::PostcopyPreempt, true));
        }
    }
    caps.apply(&wanted).expect("harness setup: capabilities");
    let params = Parameters::default();
    let input: BoxRead = Box::new(Cursor::new(main.to_vec()));
    let mut r: Reader = StreamReader::new(input);
    let return_path: BoxWrite = Box::new(std::io::sink());
    let mut loader = StreamLoader::new(vm.clone(), &caps, &params, Some(return_path));
    if let Some(p) = preempt {
        loader.set_preempt_channel(Box::new(Cursor::new(p.to_vec())), ShutdownHandle::default());
    }
    let result = load(&mut loader, &mut r);
    let ran = loader.postcopy_ran();
    let context = format!(
        "{variant:?}, preempt channel {}, result {result:?}, RUN handled {ran}",
        preempt.is_some()
    );
    let bitmaps_created = check_after_load(
        &vm,
        &layer,
        &events,
        &before,
        &result,
        &loader.warnings,
        ran,
        &context,
    );
    let (mut pages_received, mut pages_placed, mut preempt_pages) = (0, 0, 0);
    if let Some(pc) = loader.postcopy_ram() {
        assert_eq!(
            variant,
            Variant::Ram,
            "{context}: guest RAM in postcopy without postcopy-ram"
        );
        check_unregistered(pc, &context);
        pages_received = check_placed_is_received(pc, result.is_err(), &context);
        if result.is_ok() && ran {
            assert_eq!(
                pc.missing_pages(),
                0,
                "{context}: a completed postcopy load with pages missing"
            );
        }
        let stats = &pc.stats;
        use std::sync::atomic::Ordering::Relaxed;
        pages_placed = stats.copied.load(Relaxed) + stats.zeroed.load(Relaxed);
        preempt_pages = stats.preempt_pages.load(Relaxed);
    }
    let outcome = Outcome {
        variant,
        result,
        postcopy_ran: ran,
        warnings: std::mem::take(&mut loader.warnings),
        pages_loaded: loader.pages_loaded(),
        pages_received,
        pages_placed,
        preempt_pages,
        bitmaps_created,
    };
    drop(loader);
    vm.shutdown();
    drop(vm);
    check_nothing_left(&context);
    outcome
}

/// No block of guest RAM is registered with a userfaultfd any more: a fresh one can register
/// each (the kernel refuses a range another userfaultfd holds with EBUSY).
fn check_unregistered(pc: &PostcopyRam, context: &str) {
    let fd = PostcopyFd::open().expect("harness: a userfaultfd for the check");
    for b in pc.blocks() {
        if let Err(e) = fd.register(b.range()) {
            panic!(
                "{context}: block '{}' is still registered with the loader's userfaultfd: {e}",
                b.name()
            );
        }
        let _ = fd.unregister(b.range());
    }
}

/// Every page of every block is mapped exactly when its received bit is set. Returns the
/// number of received pages. One exception, after a failed load: a precopy page whose
/// payload ended half-way was read straight into the mapping (as QEMU reads it) and is mapped
/// without being received — at most one page, the last one read.
fn check_placed_is_received(pc: &PostcopyRam, failed: bool, context: &str) -> u64 {
    let mut pagemap = std::fs::File::open("/proc/self/pagemap").expect("harness: pagemap");
    let mut received = 0;
    let mut half_read = 0;
    for b in pc.blocks() {
        let pages = b.range().len() as u64 / PAGE_SIZE;
        let first = b.range().base_addr() as u64 / PAGE_SIZE;
        let mut entries = vec![0u8; pages as usize * 8];
        pagemap
            .seek(SeekFrom::Start(first * 8))
            .and_then(|_| pagemap.read_exact(&mut entries))
            .expect("harness: reading pagemap");
        for (page, e) in entries.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            // Bit 63: present; bit 62: swapped.
            let mapped = e & (3 << 62) != 0;
            let got = b.received().test(page as u64);
            received += u64::from(got);
            if failed && mapped && !got && half_read == 0 {
                half_read += 1;
                continue;
            }
            assert_eq!(
                mapped,
                got,
                "{context}: page {page:#x} of block '{}' is {} but {} in the received map",
                b.name(),
                if mapped { "mapped" } else { "not mapped" },
                if got { "marked" } else { "not marked" },
            );
        }
    }
    assert!(
        received <= RAM_SIZE / PAGE_SIZE,
        "{context}: more pages than RAM"
    );
    received
}

/// Once the loader is gone no postcopy thread runs and no userfaultfd is open.
fn check_nothing_left(context: &str) {
    crate::wait_gone(
        context,
        "left behind after the load",
        Duration::from_millis(5),
        leftovers,
    );
}

/// The postcopy threads and userfaultfds of this process.
fn leftovers() -> Vec<String> {
    let mut left: Vec<String> = crate::threads(|c| c.starts_with("postcopy-"))
        .into_iter()
        .map(|c| format!("thread {c}"))
        .collect();
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        for f in fds.flatten() {
            if let Ok(l) = std::fs::read_link(f.path()) {
                if l.to_string_lossy().contains("userfaultfd") {
                    left.push(format!("fd {:?} {}", f.file_name(), l.display()));
                }
            }
        }
    }
    left
}
