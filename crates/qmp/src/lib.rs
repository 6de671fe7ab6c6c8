//! The QEMU Machine Protocol (QMP) as a server library: framing, capabilities negotiation,
//! dispatch, errors and events — the protocol only. What the commands do is the embedding
//! program's business: each crate that owns commands implements [`CommandSet`], the program
//! hands the server a [`CommandSets`] table of them (or any other [`Dispatcher`], such as a
//! [`CommandTable`] of closures), and emits events through an [`EventSink`]. QAPI argument
//! checking — types, enums, alternates, ids, QEMU's messages — lives here once ([`args`]) and
//! every command of the program uses it.
//!
//! The behaviour follows QEMU 7.2 (`docs/interop/qmp-spec.rst`, `monitor/qmp.c`,
//! `qapi/qmp-dispatch.c`, `qobject/json-*.c`), down to the error texts, so that tools written
//! against QEMU's monitor — libvirt, the `qemu.qmp` Python client, scripts — work unchanged:
//!
//! * the greeting `{"QMP": {"version": .., "capabilities": ["oob"]}}`;
//! * negotiation mode, where only `qmp_capabilities` exists and everything else fails with
//!   `CommandNotFound: Expecting capabilities negotiation with 'qmp_capabilities'`;
//! * command mode, with `id` echoed in every reply to a request that had one, errors as
//!   `{"error": {"class", "desc"}}`, and the built-ins `qmp_capabilities`, `query-version` and
//!   `query-commands`;
//! * `exec-oob` once `oob` is negotiated, for commands the dispatcher marks OOB-capable;
//! * events `{"timestamp": {"seconds", "microseconds"}, "event", "data"}` to negotiated clients.
//!
//! And the other end: [`Client`], a blocking client, the one `livemig demo`/`bench` and the
//! tests drive monitors with.
//!
//! Modules: [`client`] (the blocking client), [`json`] (the streaming parser and the serializer), [`args`] (argument checking),
//! [`commands`] (command sets and the monitor's table), [`dispatch`] (the seam between server
//! and commands), [`server`] (sockets, threads, events, shutdown), [`fds`] (descriptors
//! passed to a monitor: `getfd`, `closefd`, and the current monitor's for commands that take
//! one by name), [`option`] (QEMU's `-qmp` option syntax), [`error`] (QMP error classes).
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![forbid(unsafe_code)]

pub mod args;
pub mod client;
pub mod commands;
pub mod dispatch;
pub mod error;
pub mod fds;
pub mod json;
pub mod option;
pub mod server;
mod session;

pub use args::{id_wellformed, Args, Param, QapiEnum, QapiInt, StrOrObject};
pub use client::{Client, ClientError};
pub use commands::{CommandSet, CommandSets};
pub use dispatch::{AfterFlush, CommandTable, Dispatcher, Reply};
pub use error::{ErrorClass, QmpError};
pub use json::{parse_all, JsonError, JsonStream, Limits, SyntaxError};
pub use option::{split_options, QmpAddress, QmpOption, QmpOptionError};
pub use server::{EventSink, Server, ServerConfig, VersionInfo, DEFAULT_MAX_CLIENTS};
