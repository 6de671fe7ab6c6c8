//! The reference VM: guest memory, dirty tracking, vCPU workload, devices.
#![deny(unsafe_code)]
