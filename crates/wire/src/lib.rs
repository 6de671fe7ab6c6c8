//! QEMU's live-migration stream format as a Rust codec library: framing and record syntax,
//! no semantics. The migration engine gives sections their meaning; this crate reads and
//! writes the bytes, checks every length against a limit before allocating, and names what was
//! wrong and where when a stream is bad.
//!
//! Layout, from the bottom up:
//! - [`reader`] / [`writer`]: buffered, offset-tracking I/O; payloads move without copies.
//! - [`section`]: file header, section headers and footers, the item loop, the JSON trailer.
//! - [`config`], [`command`], [`return_path`]: the configuration section, the command
//!   sub-protocol and the return-path messages.
//! - [`ram`], [`bitmap`]: the record syntax of the `ram` and `dirty-bitmap` sections.
//! - [`digest`]: the integrity digest between livemig peers (`x-livemig-integrity`).
//! - [`multifd`]: the handshake and packet headers of the multifd channels.
//! - [`vmstate`]: device-state layouts as data, the vmdesc JSON, subsections.
//! - [`analyze`]: a whole-stream decoder for inspecting captures without a VM.
//!
//! The reference is `shared/reference/stream-format.md` (QEMU 7.2 and master).
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![forbid(unsafe_code)]

pub mod analyze;
pub mod bitmap;
pub mod command;
pub mod config;
pub mod digest;
pub mod error;
pub mod multifd;
pub mod ram;
pub mod reader;
pub mod return_path;
pub mod section;
pub mod vmstate;
pub mod writer;

pub use analyze::{analyze, Analysis, Summary};
pub use command::Command;
pub use error::{Result, SectionContext, WireError, WireErrorKind};
pub use reader::{ReaderOptions, StreamReader};
pub use section::{read_item, Item, SectionHeader, SectionKind, SectionStart, Trailer};
pub use writer::StreamWriter;
