//! The destination's wait for a migration's next connection — a multifd channel, the
//! postcopy preempt channel — on its listener, with the main channel already accepted.
//!
//! QEMU 7.2's destination reads nothing of the stream before every channel is there
//! (`migration_has_all_channels`), and so does livemig's. A plain `accept` would then wait
//! for good whenever the source cannot open the next channel. The commonest way: the source
//! has `tls-creds` and this side has none. The source's first channel waits in its TLS
//! handshake for an answer to its hello, which this side never reads, so the source never
//! gets to open its second channel. So the wait watches the main channel beside the
//! listener, and gives up when:
//! - the main channel closes, or is shut down here (a cancel);
//! - on a side without TLS, the source's first bytes on it are a TLS handshake record
//!   (it is peeked at, not read);
//! - the stall bound (`x-livemig-stall-timeout`) passes.

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

/// `POLLRDHUP`, which nix does not name: the peer closed its sending side.
pub(crate) fn rdhup() -> PollFlags {
    PollFlags::from_bits_retain(0x2000)
}

/// Why the next channel did not come.
#[derive(Debug)]
pub(crate) enum NoChannel {
    /// The main channel closed (or was shut down here) first.
    MainClosed,
    /// The bound passed without a connection.
    TimedOut(Duration),
    /// This side has no TLS, and the source began the main channel with a TLS handshake.
    SourceSpeaksTls,
    /// `poll` failed.
    Io(std::io::Error),
}

/// What a destination without `tls-creds` reports when the source speaks TLS to it.
pub(crate) const SOURCE_SPEAKS_TLS: &str =
    "the source speaks TLS (its first bytes are a TLS handshake) and this side has no \
     tls-creds: both ends need them";

/// Waits until `listener` has the next connection to accept (see the module doc). `plain`:
/// this side does not use TLS, so a TLS hello on `main` is a mismatch.
pub(crate) fn wait_for_channel(
    listener: BorrowedFd<'_>,
    main: Option<BorrowedFd<'_>>,
    bound: Option<Duration>,
    plain: bool,
) -> Result<(), NoChannel> {
    let deadline = bound.map(|b| Instant::now() + b);
    // The main channel's first bytes are looked at once, when they come.
    let mut looked = !plain;
    loop {
        let mut fds = vec![PollFd::new(listener, PollFlags::POLLIN)];
        if let Some(m) = main {
            let want = if looked {
                rdhup()
            } else {
                rdhup() | PollFlags::POLLIN
            };
            fds.push(PollFd::new(m, want));
        }
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(NoChannel::Io(std::io::Error::from(e))),
        }
        // A connection waiting to be accepted comes first: a source that sent its whole
        // stream (a small or well-compressed guest) shuts the main channel's sending side
        // after every channel connected, which reads as a hang-up too.
        let listener_ready = |fds: &[PollFd<'_>]| {
            fds.first()
                .and_then(|l| l.revents())
                .is_some_and(|r| !r.is_empty())
        };
        if listener_ready(&fds) {
            return Ok(());
        }
        // nix reads back only the flags it names: `None` means POLLRDHUP (with or without
        // POLLIN) was among them.
        let main_revents = fds.get(1).map(|m| m.revents());
        if let (Some(m), Some(revents), false) = (main, main_revents, looked) {
            let readable = revents.is_none_or(|r| r.contains(PollFlags::POLLIN));
            if readable {
                let mut head = [0u8; 5];
                match recv(
                    m.as_raw_fd(),
                    &mut head,
                    MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(n) if n >= 2 => {
                        looked = true;
                        // Content type 22 (handshake), version 3.x: a ClientHello.
                        if head[0] == 22 && head[1] == 3 {
                            return Err(NoChannel::SourceSpeaksTls);
                        }
                    }
                    // End of stream: the hang-up below.
                    Ok(0) => looked = true,
                    // One byte so far: look again when more has come.
                    Ok(_) => std::thread::sleep(Duration::from_millis(1)),
                    Err(_) => looked = true,
                }
            }
        }
        let gone = PollFlags::POLLHUP | PollFlags::POLLERR | PollFlags::POLLNVAL;
        if main_revents.is_some_and(|r| r.is_none_or(|r| r.intersects(gone))) {
            // The source connects every channel before it ends the stream; give a
            // connection that is on its way a moment to arrive before calling it a failure.
            let mut l = [PollFd::new(listener, PollFlags::POLLIN)];
            if matches!(poll(&mut l, PollTimeout::from(200u8)), Ok(n) if n > 0) {
                return Ok(());
            }
            return Err(NoChannel::MainClosed);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(NoChannel::TimedOut(bound.unwrap_or_default()));
        }
    }
}

/// Waits for the postcopy preempt channel on `listener` (a socket's: preempt needs one),
/// with `main` the main channel already accepted; `plain`: this side has no TLS. The
/// errors name the preempt channel.
pub(crate) fn wait_for_preempt(
    listener: &crate::transport::Listener,
    main: &crate::transport::ShutdownHandle,
    bound: Option<Duration>,
    plain: bool,
) -> Result<(), crate::error::MigrationError> {
    use crate::error::MigrationError;
    use std::os::fd::AsFd;
    let Some(l) = listener.socket_fd() else {
        return Ok(());
    };
    let main = main.socket();
    wait_for_channel(l, main.as_ref().map(|m| m.as_fd()), bound, plain).map_err(|e| match e {
        NoChannel::Io(e) => MigrationError::io("cannot wait for the postcopy preempt channel", e),
        NoChannel::MainClosed => MigrationError::Other(
            "the main channel closed before the postcopy preempt channel connected (the \
             source failed to open it)"
                .into(),
        ),
        NoChannel::TimedOut(b) => MigrationError::Other(format!(
            "no postcopy preempt channel connected within {} ms of the main channel \
             (x-livemig-stall-timeout)",
            b.as_millis()
        )),
        NoChannel::SourceSpeaksTls => MigrationError::Other(SOURCE_SPEAKS_TLS.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::os::unix::net::{UnixListener, UnixStream};

    fn pair(dir: &std::path::Path) -> (UnixListener, UnixStream, UnixStream) {
        let path = dir.join("l");
        let l = UnixListener::bind(&path).unwrap();
        let client = UnixStream::connect(&path).unwrap();
        let (server, _) = l.accept().unwrap();
        (l, client, server)
    }

    #[test]
    fn a_tls_hello_on_a_plain_side_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let (l, mut client, main) = pair(dir.path());
        client.write_all(&[22, 3, 1, 0, 200, 1, 0]).unwrap();
        let r = wait_for_channel(
            l.as_fd(),
            Some(main.as_fd()),
            Some(Duration::from_secs(10)),
            true,
        );
        assert!(matches!(r, Err(NoChannel::SourceSpeaksTls)), "{r:?}");
        // Peeked, not read: the bytes are still there for whoever reads the channel.
        let mut b = [0u8; 7];
        std::io::Read::read_exact(&mut &main, &mut b).unwrap();
        assert_eq!(b[0], 22);
        // A side with TLS expects it.
        let r = wait_for_channel(
            l.as_fd(),
            Some(main.as_fd()),
            Some(Duration::from_millis(100)),
            false,
        );
        assert!(matches!(r, Err(NoChannel::TimedOut(_))), "{r:?}");
    }

    #[test]
    fn a_stream_header_waits_and_a_connection_or_a_hang_up_ends_it() {
        let dir = tempfile::tempdir().unwrap();
        let (l, mut client, main) = pair(dir.path());
        client.write_all(b"QEVM\0\0\0\x03").unwrap();
        let r = wait_for_channel(
            l.as_fd(),
            Some(main.as_fd()),
            Some(Duration::from_millis(100)),
            true,
        );
        assert!(matches!(r, Err(NoChannel::TimedOut(_))), "{r:?}");
        let _second = UnixStream::connect(dir.path().join("l")).unwrap();
        assert!(wait_for_channel(l.as_fd(), Some(main.as_fd()), None, true).is_ok());
        let _ = l.accept().unwrap();
        drop(client);
        let r = wait_for_channel(l.as_fd(), Some(main.as_fd()), None, true);
        assert!(matches!(r, Err(NoChannel::MainClosed)), "{r:?}");
    }
}
