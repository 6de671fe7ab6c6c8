//! The reference VM: guest memory and dirty tracking, vCPUs running a deterministic workload,
//! a clock, a serial console, a memory map, and its implementation of the migration engine's
//! `Machine` trait.
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![deny(unsafe_code)]

pub mod clock;
pub mod devices;
pub mod kvm;
pub mod machine;
pub mod memmap;
pub mod memory;
pub mod runctl;
pub mod soft_virtio;
pub mod virtio_blk;
pub mod workload;

pub use machine::{Accel, DiskReport, MachineType, RamReport, Vm, VmConfig};
