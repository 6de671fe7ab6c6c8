//! cargo-fuzz target: the NBD client against a server that sends arbitrary bytes
//! (negotiation, then the block driver's requests and their replies; harness and invariants:
//! `fuzz_harness::nbd_client`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fuzz_harness::nbd_client::run(data);
});
