//! cargo-fuzz target: the NBD server against a client that sends arbitrary bytes (handshake,
//! options, then requests, on a writable and a read-only export with dirty bitmaps; harness
//! and invariants: `fuzz_harness::nbd_server`). Besides the harness's checks, the largest
//! single allocation of the thread serving the connection is bounded by what the input carried
//! (`fuzz_harness::nbd_server::allocation_bound`): a length on the wire that the server
//! allocates before the bytes arrive is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The largest single allocation (or reallocation) of a serving thread since the input began.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Whether this thread is serving the connection (const-initialized: no allocation).
    static SERVING: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if SERVING.try_with(Cell::get).unwrap_or(false) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

/// The system allocator, recording sizes.
struct Watched;

// SAFETY: every call goes to the system allocator with its arguments unchanged; the wrapper
// only records sizes in an atomic and a const thread-local, which allocate nothing.
unsafe impl GlobalAlloc for Watched {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Watched = Watched;

fuzz_target!(|data: &[u8]| {
    LARGEST.store(0, Ordering::Relaxed);
    fuzz_harness::nbd_server::run_observed(data, |on| SERVING.with(|s| s.set(on)));
    let largest = LARGEST.load(Ordering::Relaxed);
    let bound = fuzz_harness::nbd_server::allocation_bound(data.len());
    assert!(
        largest <= bound,
        "the server allocated {largest} bytes at once for {} bytes of input (bound {bound})",
        data.len()
    );
});
