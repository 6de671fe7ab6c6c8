//! Descriptors passed over unix sockets (`SCM_RIGHTS`), as a QMP client hands QEMU a socket or
//! a file for `getfd`, and descriptors a process inherits by number (`-incoming fd:N`).
//!
//! Why this module holds `unsafe`: the kernel hands over descriptors as numbers, and taking
//! ownership of a number is `unsafe` in Rust; each place says why nothing else owns it.
#![allow(unsafe_code)]

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use std::collections::HashSet;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// At most this many descriptors are taken from one message (QEMU's `TCP_MAX_FDS`); the
/// kernel closes the ones beyond.
pub const MAX_FDS: usize = 16;

/// Reads like `recv`, and returns the descriptors that came with the bytes (close-on-exec).
pub fn recv_with_fds(s: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel installed these descriptors in this process for this message
            // just now; no other handle to them exists.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}

/// Sends `bytes` with `fd` attached (a QMP client's `getfd`, in tests and tools).
pub fn send_with_fd(s: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<usize> {
    let raw = [fd.as_raw_fd()];
    sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .map_err(io::Error::from)
}

/// Descriptors already adopted by [`adopt_inherited`]: each may be owned once.
static ADOPTED: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

/// Takes ownership of descriptor `fd`, inherited from the parent process and given by number
/// (`-chardev socket,fd=N`, `-incoming fd:N`). Refused if it is not open or was adopted before;
/// with `socket_only`, also if it is not a socket.
pub fn adopt_inherited(fd: RawFd, socket_only: bool) -> Result<OwnedFd, String> {
    // /proc/self/fd/N of a socket reads `socket:[INODE]`; a missing entry means N is not open.
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|_| format!("fd={fd}: no such open file descriptor"))?;
    if socket_only && !target.to_string_lossy().starts_with("socket:") {
        return Err(format!(
            "fd={fd}: not a socket ({})",
            target.to_string_lossy()
        ));
    }
    let mut adopted = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
    if !adopted.get_or_insert_with(HashSet::new).insert(fd) {
        return Err(format!("fd={fd}: already in use"));
    }
    // SAFETY: `fd` is open (checked above through /proc) and was inherited from the parent
    // for this use rather than opened by this process: it is named on the command line or by
    // number in a command, adopted once (recorded in ADOPTED), and nothing else in the process
    // refers to it by number.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_descriptor_travels_with_the_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut x, y) = UnixStream::pair().unwrap();
        send_with_fd(&a, b"hello", y.as_fd()).unwrap();
        drop(y);
        let mut buf = [0u8; 16];
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        // The received descriptor is the other end of `x`.
        let mut y2 = UnixStream::from(fds.into_iter().next().unwrap());
        x.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        y2.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        // Plain bytes come without descriptors.
        (&a).write_all(b"more").unwrap();
        let (n, fds) = recv_with_fds(&b, &mut buf).unwrap();
        assert_eq!((n, fds.len()), (4, 0));
    }

    #[test]
    fn inherited_numbers_are_checked_and_adopted_once() {
        let f = std::fs::File::open("/dev/null").unwrap();
        let n = f.as_raw_fd();
        // Leak the File's ownership into the adoption, as an inherited number is.
        std::mem::forget(f);
        assert!(adopt_inherited(n, true)
            .unwrap_err()
            .contains("not a socket"));
        let owned = adopt_inherited(n, false).unwrap();
        assert_eq!(
            adopt_inherited(n, false).unwrap_err(),
            format!("fd={n}: already in use")
        );
        drop(owned);
        assert_eq!(
            adopt_inherited(999_999, false).unwrap_err(),
            "fd=999999: no such open file descriptor"
        );
    }
}
