//! Postcopy: the guest runs on the destination before all of its RAM has arrived, and every
//! page it touches that is still missing is pulled from the source on demand
//! (`docs/postcopy.md` has the whole design; QEMU 7.2's wire format is in
//! `reference/stream-format.md` §5).
//!
//! This module holds the building blocks, each testable on its own:
//!
//! | module | what |
//! |---|---|
//! | [`received`] | the destination's received-pages map, and its dump for recovery |
//! | [`discard`] | POSTCOPY_RAM_DISCARD: the source's dirty bitmap as ranges, the destination's checks |
//! | [`uffd`] | userfaultfd: host probe, registration, atomic placement, discards (the `unsafe`) |
//! | [`requests`] | pages requested and not yet placed: one request per page, fault → placement latency |
//! | [`blocktime`] | QEMU's vCPU blocktime accounting |
//! | [`placement`] | [`PostcopyRam`]: the destination's guest RAM in postcopy — place, discard, classify faults |
//! | [`fault`] | the destination's fault thread, which owns the return path while postcopy runs |
//! | [`preempt`] | the destination's page records: one placed, and the `postcopy-preempt` channel's loop |
//! | [`recovery`] | the destination's side of pause and recovery: preempt threads, `migrate-recover`'s connections |
//! | [`source`] | the source's pages still to send, shared by the background push and the preempt answers |

pub mod blocktime;
pub mod discard;
pub mod fault;
pub mod placement;
pub mod preempt;
pub mod received;
pub mod recovery;
pub mod requests;
pub mod source;
pub mod uffd;

pub use placement::PostcopyRam;

/// Bytes a postcopy main channel may hold in one socket buffer (see [`limit_socket_queue`]).
pub const MAIN_CHANNEL_QUEUE: usize = 256 * 1024;

/// Bytes a postcopy main channel's sender may hold unsent (`TCP_NOTSENT_LOWAT`, see
/// [`limit_socket_queue`]).
pub const MAIN_CHANNEL_UNSENT: u32 = 64 * 1024;

/// Makes the kernel queue of a socket channel small (`SO_SNDBUF` when `send`, `SO_RCVBUF`
/// otherwise). In postcopy a page the guest waits for can sit behind whatever the background
/// push has queued on the main channel — several MiB in autotuned loopback buffers, i.e.
/// milliseconds — while a queue of [`MAIN_CHANNEL_QUEUE`] drains in a fraction of one and is
/// still deep enough for full speed on a local link. On the sending side of a TCP channel the
/// data not sent yet is limited further, to [`MAIN_CHANNEL_UNSENT`]: when the receiver is the
/// bottleneck the send queue is otherwise full of it, and a smaller `SO_SNDBUF` instead
/// stalls loopback TCP for timer periods (its segments are 64 KiB). Best effort: a channel
/// that is not a socket keeps its queue.
pub fn limit_socket_queue(h: &crate::transport::ShutdownHandle, send: bool, bytes: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    let Some(fd) = h.socket() else { return };
    if send {
        // (Refused on a unix socket, which has no such queue.)
        if let Err(e) = net::sockopt::set_unsent_limit(&fd, MAIN_CHANNEL_UNSENT) {
            log::debug!("postcopy: cannot limit the unsent queue: {e}");
        }
    }
    let r = if send {
        setsockopt(&fd, sockopt::SndBuf, &bytes)
    } else {
        setsockopt(&fd, sockopt::RcvBuf, &bytes)
    };
    if let Err(e) = r {
        log::debug!("postcopy: cannot limit the socket queue: {e}");
    }
}

/// Why a postcopy step failed. The messages follow QEMU's where QEMU has one.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// The host cannot do postcopy (no userfaultfd, missing ioctls...).
    #[error("Postcopy is not supported: {0}")]
    Unsupported(String),
    /// A userfaultfd operation failed.
    #[error("{what}: {source}")]
    Uffd {
        /// What was being done.
        what: String,
        /// The crate's error.
        source: userfaultfd::Error,
    },
    /// A system call on guest memory failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The host's error.
        source: nix::Error,
    },
    /// A discard range from the stream was refused.
    #[error("{0}")]
    BadDiscard(String),
    /// A page or block named by the stream or by a fault does not exist here.
    #[error("{0}")]
    BadPage(String),
    /// The received-map dump of a recovery does not fit the block.
    #[error("{0}")]
    BadDump(String),
}
