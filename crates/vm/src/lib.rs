//! The reference VM: guest memory, dirty tracking, vCPU workload, devices.
#![deny(unsafe_code)]

pub mod memmap;
pub mod memory;
pub mod workload;
