//! The QEMU Machine Protocol (QMP) as a server library: framing, capabilities negotiation,
//! dispatch, errors and events — the protocol only. What the commands do is the embedding
//! program's business: it hands the server a [`Dispatcher`] (usually a [`CommandTable`] of
//! closures) and emits events through an [`EventSink`].
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
//! Modules: [`json`] (the streaming parser and the serializer), [`dispatch`] (the seam for
//! commands and argument checking), [`server`] (sockets, threads, events, shutdown),
//! [`option`] (QEMU's `-qmp` option syntax), [`error`] (QMP error classes).
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![forbid(unsafe_code)]

pub mod dispatch;
pub mod error;
pub mod json;
pub mod option;
pub mod server;
mod session;

pub use dispatch::{AfterFlush, Args, CommandTable, Dispatcher, Param, QapiInt, Reply};
pub use error::{ErrorClass, QmpError};
pub use json::{parse_all, JsonError, JsonStream, Limits, SyntaxError};
pub use option::{QmpAddress, QmpOption, QmpOptionError};
pub use server::{EventSink, Server, ServerConfig, VersionInfo};
