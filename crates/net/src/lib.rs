//! Sockets, once for the whole tree: the QMP monitor, the NBD server and client, migration's
//! channels, the `-chardev` sockets and the test relay all connect, listen and accept through
//! this crate, so a unix socket and a TCP one look the same to them and the details that are
//! easy to get subtly different — which stale socket file may be replaced, `TCP_NODELAY` on
//! every TCP connection, every resolved address tried, the file removed when the listener
//! goes, a blocked `accept` woken by `shutdown` — are decided in one place.
//!
//! * [`Address`]: a unix path or a TCP host and port, to [`Address::connect`] to or
//!   [`Address::listen`] on.
//! * [`Stream`]: a connected socket of either family (`Read`, `Write` with vectored writes,
//!   clones, shutdown, timeouts).
//! * [`QuietReader`]: the reading side of a socket whose other direction carries bulk data
//!   (the source's return path), woken only by data.
//! * [`Listener`]: a listening socket of either family; a unix one removes its file when
//!   dropped.
//! * [`zerocopy`]: `MSG_ZEROCOPY` sends with completion accounting, and [`sockopt`]: a limit on
//!   a TCP socket's unsent data (the crate's `unsafe`: `setsockopt`s that `nix` does not wrap).
//! * [`fdpass`]: descriptors passed beside bytes (`SCM_RIGHTS`) and inherited by number (the
//!   crate's other `unsafe`: owning a descriptor the kernel hands over by number).
//!
//! What the addresses look like on a command line or in QMP (`tcp:HOST:PORT`, QAPI's
//! `SocketAddress`, `-chardev socket,path=...`) is the business of the crate that takes them;
//! they all end up here.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod address;
pub mod fdpass;
mod listener;
pub mod sockopt;
mod stream;
pub mod zerocopy;

pub use address::{resolve, Address};
pub use listener::Listener;
pub use stream::{connect_retry, QuietReader, Stream};
