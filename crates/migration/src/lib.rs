//! The livemig migration engine.
//!
//! It moves a VM's RAM, device state and block dirty bitmaps over QEMU's migration stream, with
//! QEMU's state machine, capabilities and parameters. A VMM embeds it by implementing a few
//! traits — its guest memory ([`guest::RamBlock`]), its devices ([`machine::DeviceState`]) and
//! the machine itself ([`machine::Machine`]) — and gets precopy migration to and from livemig
//! or QEMU, driven through [`Migration`] with QMP's semantics.
//!
//! | module | owns |
//! |---|---|
//! | [`engine`] | the [`Migration`] object: capabilities, parameters, QMP-shaped operations |
//! | [`state`] | the state machine: the shared state, checked transitions, `MIGRATION` events |
//! | [`outgoing`] / [`incoming`] | the source's migration thread / the destination's loader |
//! | [`ram`] | the `ram` section |
//! | [`return_path`] | the source's return-path thread: verdict, PONGs, page requests, recovery messages |
//! | [`multifd`] | the multifd channels: pages beside the main stream, compression, zero copy |
//! | [`bitmaps`] | the `dirty-bitmap` section |
//! | [`globalstate`] | the `globalstate` section |
//! | [`postcopy`] | postcopy's building blocks: received map, discards, userfaultfd placement, fault thread, blocktime |
//! | [`guest`] | the seam to guest memory (the crate's only `unsafe`) |
//! | [`transport`] | `tcp:`, `unix:`, `exec:`, `file:` |
//! | [`qmp`] | the migration commands as one [`qmp::CommandSet`](::qmp::CommandSet) |
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![deny(unsafe_code)]

pub mod bitmaps;
pub mod caps;
mod channel_wait;
pub mod engine;
pub mod error;
pub mod events;
pub mod globalstate;
pub mod guest;
pub mod incoming;
pub mod machine;
pub mod multifd;
pub mod outgoing;
pub mod params;
mod policy;
pub mod postcopy;
pub mod qmp;
pub mod ram;
pub mod return_path;
pub mod runstate;
pub mod secure;
pub mod state;
pub mod status;
pub mod transport;

pub use engine::{LoadFailureHook, Migration, MigrationOptions};
pub use error::MigrationError;
pub use status::MigrationStatus;
