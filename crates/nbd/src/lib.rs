//! NBD (network block device) for livemig: the protocol ([`proto`]), a server that exports
//! block nodes ([`server`]), a client that is also the `nbd` block driver ([`client`]), and
//! the QMP commands `nbd-server-start`, `nbd-server-add`, `nbd-server-remove`,
//! `nbd-server-stop`, `block-export-add`, `block-export-del` and `query-block-exports`
//! ([`qmp`]).
//!
//! With a destination exporting its (empty) disk writable and a source mirroring its disk into
//! an `nbd` node connected to that export, a VM migrates without shared storage, as with
//! QEMU. The protocol is the one of the NBD project's `proto.md`; where it leaves a choice,
//! the choice is QEMU 7.2's (error codes, flags, block sizes, context ids), so QEMU's tools
//! (`qemu-img`, `qemu-io`, the `nbd` driver) talk to this server and this client talks to
//! `qemu-nbd`.
//!
//! TLS: the server takes `tls-creds`/`tls-authz` (`NBD_OPT_STARTTLS` first, as QEMU's server
//! requires); the client (the `nbd` driver) takes `tls-creds`/`tls-hostname` as QEMU's does.
//!
//! Not implemented: `NBD_OPT_EXTENDED_HEADERS`, `qemu:allocation-depth`, real
//! allocation in `base:allocation` (every extent reads as data).
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod address;
pub mod client;
pub mod proto;
pub mod qmp;
mod reconnect;
pub mod server;

pub use address::SocketAddress;
pub use client::{register_driver, NbdClient, NbdDriver, Timing};
pub use server::{ExportConfig, ExportError, NbdServer};
