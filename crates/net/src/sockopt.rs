//! Socket options `nix` does not wrap.
//!
//! * `TCP_NOTSENT_LOWAT`: how much data a TCP socket may hold that it has not sent yet. A
//!   write blocks (a poll says not writable) until less than that is queued unsent, while the
//!   send buffer itself stays large. On a link whose receiver is the bottleneck, the sender's
//!   queue otherwise fills its whole send buffer with data that waits for the receiver's
//!   window: bytes already claimed by the writer but far from the peer. Shrinking the send
//!   buffer instead also bounds it, but a send buffer of less than a few segments stalls
//!   loopback TCP (64 KiB segments) for whole timer periods.
//!
//! Why this module holds `unsafe`: the option is a `setsockopt` that `nix` does not wrap.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Sets `TCP_NOTSENT_LOWAT` to `bytes` on a TCP socket (see the module doc). Fails on a
/// socket that is not TCP (a unix socket) and on kernels before 3.12.
pub fn set_unsent_limit(fd: &impl AsFd, bytes: u32) -> io::Result<()> {
    let v: nix::libc::c_int = nix::libc::c_int::try_from(bytes).unwrap_or(nix::libc::c_int::MAX);
    // SAFETY: `fd` is an open descriptor borrowed for the call; the option value is a c_int
    // that lives across the call and whose size is passed with it.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_NOTSENT_LOWAT,
            (&v as *const nix::libc::c_int).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The `TCP_NOTSENT_LOWAT` of a TCP socket: 0 when it was never set (the system's
/// `net.ipv4.tcp_notsent_lowat` applies, no limit by default).
pub fn unsent_limit(fd: &impl AsFd) -> io::Result<u32> {
    let mut v: nix::libc::c_int = 0;
    let mut len = std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t;
    // SAFETY: `fd` is an open descriptor borrowed for the call; the kernel writes at most
    // `len` bytes into `v`, a c_int that lives across the call.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_fd().as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_NOTSENT_LOWAT,
            (&mut v as *mut nix::libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(v as u32)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt};

    #[test]
    fn the_unsent_limit_is_set_on_tcp_and_refused_elsewhere() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let before = getsockopt(&c, sockopt::SndBuf).unwrap();
        assert_eq!(unsent_limit(&c).unwrap(), 0);
        set_unsent_limit(&c, 65536).unwrap();
        assert_eq!(unsent_limit(&c).unwrap(), 65536);
        assert_eq!(
            getsockopt(&c, sockopt::SndBuf).unwrap(),
            before,
            "the send buffer is left as it was"
        );
        let (u, _) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(set_unsent_limit(&u, 65536).is_err());
    }
}
