//! Multifd: RAM pages over several channels beside the main stream, in QEMU 7.2's format
//! (stream-format.md §4; the syntax is `wire::multifd`).
//!
//! With capability `multifd`, the source opens `multifd-channels` more connections after the
//! main one, each with a thread of its own ([`send::Sender`]). The `ram` saver still walks the
//! dirty bitmap and checks each page for zero on the migration thread: zero pages go as ZERO
//! records on the main stream, as QEMU 7.2 sends them; every other page is queued into a batch
//! of up to 128 pages of one block, which the next free channel sends as one packet. Before
//! each end of a RAM section (EOS) the source *syncs*: every channel sends a packet flagged
//! SYNC, and the migration thread waits until all of them are written. The destination
//! ([`recv::Receiver`]) has a thread per channel that reads each packet's pages straight into
//! guest memory and, after a SYNC packet, waits until the main stream's loader reaches the
//! matching EOS and releases all channels at once. So every page sent before a sync point is
//! in guest memory before anything after it on the main stream is loaded: a page sent again
//! later (or sent later as a ZERO record) always lands last.
//!
//! The data path keeps the main stream's rules: a channel sends its packet header and the
//! pages in one vectored write straight from guest memory (with `zero-copy-send`, the pages
//! go with `MSG_ZEROCOPY` and the kernel does not copy them either, see [`zerocopy`]); the
//! destination reads the pages with one vectored read straight into guest memory. With
//! `multifd-compression` (`zlib`, `zstd`), each channel keeps one compression stream for its
//! whole life, flushed at the end of every packet, as QEMU's ([`codec`]).
//!
//! Channels are connected after the main channel (QEMU 7.2's destination takes the first
//! connection as the main one) and each is wrapped in its own TLS session when `tls-creds` is
//! set. A channel that fails fails the migration; a cancel shuts every channel down, so no
//! thread stays blocked on a dead peer.

pub mod codec;
pub mod recv;
pub mod send;
pub use net::zerocopy;

use crate::caps::{Capabilities, Capability};
use crate::error::MigrationError;
use crate::params::Parameters;
use std::sync::atomic::AtomicU64;
pub use wire::multifd::Compression;

/// The VM's UUID as multifd handshakes carry it. livemig has no `-uuid`, so it is all zero,
/// as QEMU's is without one: a QEMU peer started with `-uuid` is refused with QEMU's message.
pub const UUID: [u8; 16] = [0; 16];

/// How one migration uses multifd, fixed when it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MultifdConfig {
    /// `multifd-channels`: 1..=255.
    pub channels: u8,
    /// `multifd-compression`.
    pub compression: Compression,
    /// `multifd-zlib-level` (0..=9).
    pub zlib_level: u32,
    /// `multifd-zstd-level` (0..=20).
    pub zstd_level: i32,
    /// Capability `zero-copy-send`.
    pub zero_copy: bool,
}

impl MultifdConfig {
    /// The configuration the capabilities and parameters ask for, or `None` without `multifd`.
    pub fn from_settings(caps: &Capabilities, params: &Parameters) -> Option<MultifdConfig> {
        if !caps.has(Capability::Multifd) {
            return None;
        }
        Some(MultifdConfig {
            channels: params.multifd_channels(),
            compression: params.multifd_compression(),
            zlib_level: params.multifd_zlib_level(),
            zstd_level: params.multifd_zstd_level(),
            zero_copy: caps.has(Capability::ZeroCopySend),
        })
    }
}

/// Counters of the multifd channels, for `query-migrate`.
#[derive(Debug, Default)]
pub struct MultifdCounters {
    /// Bytes written to the channels: packet headers and payloads (`multifd-bytes`; part of
    /// `transferred`). Compressed payloads count as sent, not as the pages they hold.
    pub bytes: AtomicU64,
    /// Packets written.
    pub packets: AtomicU64,
    /// Syncs after which a channel found that the kernel had copied every page it was asked
    /// to send without copying (`dirty-sync-missed-zero-copy`).
    pub missed_zero_copy: AtomicU64,
}

/// QEMU's refusal of `zero-copy-send` with what it cannot go with.
pub const ZERO_COPY_REFUSED: &str =
    "Zero copy only available for non-compressed non-TLS multifd migration";

/// QEMU's refusal of multifd on a transport with one channel (`exec:`, `file:`).
pub const PROTOCOL_REFUSED: &str = "multifd is not supported by current protocol";

/// QEMU's checks of `zero-copy-send` against the other capabilities and the parameters
/// (`migrate_caps_check`): it needs `multifd`, and neither compression nor TLS.
pub fn check_zero_copy(caps: &Capabilities, params: &Parameters) -> Result<(), MigrationError> {
    if caps.has(Capability::ZeroCopySend)
        && (!caps.has(Capability::Multifd)
            || params.multifd_compression() != Compression::None
            || params.tls().enabled())
    {
        return Err(MigrationError::InvalidParameter(ZERO_COPY_REFUSED.into()));
    }
    Ok(())
}

/// A channel error as the migration's error: which channel, and what happened.
pub(crate) fn channel_error(id: u8, e: &MigrationError) -> MigrationError {
    MigrationError::Other(format!("multifd {id}: {e}"))
}
