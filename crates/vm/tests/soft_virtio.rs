//! The software vCPUs (`-accel tcg`) drive the same virtio-blk device as the KVM guest: their
//! disk writes go through virtqueues, land in the image, and a request in flight at the
//! switchover runs on the destination exactly once — there and back.

mod common;
use common::*;
use vm::Accel;

#[test]
fn software_vcpus_write_through_virtio_blk_and_migrate_a_request_in_flight() {
    request_in_flight_there_and_back(InFlight {
        accel: Accel::Tcg,
        dirty_rate: 20_000,
        warm_up: 400,
        every_vcpu: true,
        run_between: 400,
        run_last: 200,
    });
}
