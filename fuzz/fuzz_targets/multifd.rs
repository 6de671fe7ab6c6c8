//! cargo-fuzz target: the destination's multifd channels (handshakes, packets raw, zlib or
//! zstd, sync points with the loader), read into a 1 MiB guest (harness and invariants:
//! `fuzz_harness::multifd`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::multifd::run(data);
});
