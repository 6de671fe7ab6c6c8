//! The livemig migration engine.
//!
//! It moves a VM's RAM, device state and block dirty bitmaps over QEMU's migration stream, with
//! QEMU's state machine, capabilities and parameters. A VMM embeds it by implementing a few
//! traits — its guest memory ([`guest::RamBlock`]), its devices and its run state — and gets
//! precopy migration to and from livemig or QEMU.
#![deny(unsafe_code)]

pub mod caps;
pub mod error;
pub mod guest;
pub mod params;
pub mod status;
pub mod transport;

pub use error::MigrationError;
pub use status::MigrationStatus;
