//! cargo-fuzz target: `dirty-bitmap` section bodies, loaded into a block layer with two nodes
//! of different sizes (harness and invariants: `fuzz_harness::bitmaps`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::bitmaps::run(data);
});
