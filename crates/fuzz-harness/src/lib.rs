//! Fuzzing harnesses, shared by the cargo-fuzz targets in `fuzz/` and by the corpus replay
//! test of this crate (`tests/fuzz_corpus.rs`), so that what the fuzzer checks and what the
//! default test suite replays are the same code.
//!
//! Each harness takes arbitrary bytes, drives one consumer of untrusted input the way the
//! program does, and then checks the invariants that matter to a user — not only that nothing
//! panicked. A broken invariant is a panic with a message saying which one, which is what a
//! fuzzer reports as a crash and what fails a replay test.
//!
//! | harness | drives | checks afterwards |
//! |---|---|---|
//! | [`stream::run`] | `migration::incoming::StreamLoader` over a whole stream, into a reference VM (`-M none` and `-M livemig`) with a null-co disk and capability `dirty-bitmaps` | a failed load leaves no incoming bitmap and nothing busy, disks inactive, the guest not started; a completed load leaves only finished bitmaps, disks active; the device-load batch is closed |
//! | [`postcopy::run`] | the same loader as a postcopy destination (`-M none`): `postcopy-ram` with a real userfaultfd and an optional preempt channel, and bitmap-only postcopy (`dirty-bitmaps` alone) | [`stream::run`]'s checks (a handled RUN may have started the guest and taken the disks); guest RAM left registered with no userfaultfd; mapped pages are exactly the received ones; no postcopy thread or userfaultfd left |
//! | [`bitmaps::run`] | `migration::bitmaps::BitmapLoader` on dirty-bitmap section bodies, then `before_vm_start` (or `cancel` after an error) | every bitmap left on a node existed before, untouched, or is one whose START and COMPLETE were both in the input, with the START's granularity and flags |
//! | [`return_path::run`] | the source's return-path thread (`migration::return_path`) before postcopy, in postcopy with and without preempt (page requests answered), and in a recovery's handshake | one terminal event, clean errors; requests inside a block and only after the switch; every page sent was requested, still to send, sent once with the guest's bytes, none lost; received maps end at the block's end; no `migration-rp` thread left |
//! | [`multifd::run`] | the destination's multifd channels (`migration::multifd::recv::Receiver`): handshakes, packets raw, zlib or zstd into guest RAM, the loader's sync points, `finish` | clean errors naming an existing channel; guest RAM written only in pages the headers name; no more pages or sync rounds than the input has; no channel thread left |
//! | [`nbd_client::run`] | `nbd::NbdClient` against a server sending arbitrary bytes: negotiation (option replies, meta context, `GO`'s infos), then the block driver's requests with their simple or structured replies | clean errors, a broken client dropped; what the client sent is well formed: known options, distinct handles, ranges inside the announced export, no writes to a read-only one; nothing waits |
//! | [`nbd_server::run`] | `nbd::NbdServer::serve` on a socket pair, the input being what a client sends: handshake, options, then requests, against a writable export with an enabled dirty bitmap and a read-only one with a disabled bitmap, and a server with TLS configured | the server ends within a bound, leaving no thread or descriptor; every option and request answered as the protocol says, disconnects only where the client broke the framing; reads and block status agree with a model of the disk and its bitmap, and so does the disk afterwards; before `STARTTLS`, every option refused as QEMU refuses it |
//! | [`qmp::run`] | `qmp::parse_all`, the streaming parser fed in pieces, and a QMP server session over a socket pair | chunking does not change the result; every value serializes to ASCII and parses back equal; one reply per input, in order, with its `id`, before negotiation only `qmp_capabilities` |
#![forbid(unsafe_code)]

pub mod bitmaps;
pub mod invariants;
pub mod multifd;
pub mod nbd_client;
pub mod nbd_server;
pub mod postcopy;
pub mod qmp;
pub mod return_path;
pub mod stream;

use std::sync::{Mutex, MutexGuard};

/// Held by every run of a stream loader ([`stream`], [`postcopy`]), so that in a test process
/// that replays several corpora at once only one loader runs at a time, and a check on the
/// whole process (threads left behind, userfaultfds left open) sees only its own run.
static LOADERS: Mutex<()> = Mutex::new(());

fn exclusive() -> MutexGuard<'static, ()> {
    LOADERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The names of this process's threads that `select` picks (from `/proc/self/task`).
fn threads(select: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| select(c))
        .collect()
}

/// Waits until `left()` finds nothing (polling every `poll`), at most 2 s: a thread that was
/// joined may still show in /proc for a moment. Then panics, saying `what` was left and
/// listing it.
fn wait_gone(context: &str, what: &str, poll: std::time::Duration, left: impl Fn() -> Vec<String>) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let l = left();
        if l.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("{context}: {what}: {l:?}");
        }
        std::thread::sleep(poll);
    }
}

/// Where the cargo-fuzz corpora live, relative to the workspace root (`fuzz/corpus/<target>`).
pub const CORPUS_DIR: &str = "fuzz/corpus";
