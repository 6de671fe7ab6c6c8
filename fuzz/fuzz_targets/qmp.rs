//! cargo-fuzz target: a QMP client's bytes — the JSON parser, whole and in pieces, and a
//! server session with real command handlers (harness and invariants: `fuzz_harness::qmp`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::qmp::run(data);
});
