//! cargo-fuzz target: the source's return path (what a destination sends back), read by the
//! engine's return-path thread before postcopy, in postcopy with and without preempt, and in a
//! recovery's handshake (harness and invariants: `fuzz_harness::return_path`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::return_path::run(data);
});
