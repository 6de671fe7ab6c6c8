//! cargo-fuzz target: a whole incoming migration stream, loaded into `-M none` and
//! `-M livemig` reference VMs (harness and invariants: `fuzz_harness::stream`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::stream::run(data);
});
