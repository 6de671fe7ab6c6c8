//! cargo-fuzz target: a postcopy migration's channels (main, optionally preempt), loaded into
//! a `postcopy-ram` destination with a real userfaultfd and a bitmap-only postcopy
//! destination (harness and invariants: `fuzz_harness::postcopy`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::postcopy::run(data);
});
