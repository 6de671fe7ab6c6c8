//! `zero-copy-send`: multifd pages handed to the kernel with `MSG_ZEROCOPY`, so not even the
//! kernel copies them into the socket buffer — the network stack reads guest memory when it
//! transmits (Linux 4.14+, TCP).
//!
//! The price is completion accounting. Each `sendmsg` with `MSG_ZEROCOPY` is numbered by the
//! kernel, which reports on the socket's error queue when the pages of a range of calls are
//! no longer referenced, and whether it had to copy them after all
//! (`SO_EE_CODE_ZEROCOPY_COPIED`: loopback always does, since the receiving socket keeps the
//! buffers). At each sync point a channel waits for every completion ([`ZeroCopySocket::flush`])
//! so that a page sent again later cannot be overtaken by an older transmission of itself,
//! and reports whether every send since the last flush was copied: QEMU counts those as
//! `dirty-sync-missed-zero-copy`.
//!
//! Why this module holds `unsafe`: turning the feature on is a `setsockopt` that `nix` does not
//! wrap. The sends themselves are safe calls; the kernel pins the pages it references
//! (`get_user_pages`), so even guest memory unmapped before a completion stays valid for it.
#![allow(unsafe_code)]

use nix::sys::socket::{recvmsg, sendmsg, ControlMessageOwned, MsgFlags};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// `SO_ZEROCOPY` (asm-generic and x86).
const SO_ZEROCOPY: nix::libc::c_int = 60;
/// `SO_EE_ORIGIN_ZEROCOPY`: a completion notification.
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied the data after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// QEMU's error when the socket cannot do it.
pub const NOT_SUPPORTED: &str = "Zero copy send feature not detected in host kernel";

/// Turns `SO_ZEROCOPY` on for a socket; fails where the kernel or the socket type cannot
/// (unix sockets, kernels before 4.14).
fn enable(fd: &impl AsFd) -> io::Result<()> {
    let one: nix::libc::c_int = 1;
    // SAFETY: `fd` is an open descriptor borrowed for the call; the option value is a c_int
    // that lives across the call and whose size is passed with it.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            nix::libc::SOL_SOCKET,
            SO_ZEROCOPY,
            (&one as *const nix::libc::c_int).cast(),
            std::mem::size_of::<nix::libc::c_int>() as nix::libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether zero-copy sends work on this socket (QEMU probes the main channel when it
/// connects).
pub fn supported(fd: &impl AsFd) -> bool {
    enable(fd).is_ok()
}

/// A socket that sends with `MSG_ZEROCOPY` and counts the completions.
pub struct ZeroCopySocket {
    fd: OwnedFd,
    /// `sendmsg` calls made with `MSG_ZEROCOPY`.
    queued: u64,
    /// Calls the kernel has reported complete.
    completed: u64,
}

impl ZeroCopySocket {
    /// Turns zero copy on for `fd` (a handle of the channel's socket).
    pub fn new(fd: OwnedFd) -> io::Result<ZeroCopySocket> {
        enable(&fd)?;
        Ok(ZeroCopySocket {
            fd,
            queued: 0,
            completed: 0,
        })
    }

    /// Sends all of `bufs` with `MSG_ZEROCOPY`, resuming after partial sends. The memory
    /// must stay unchanged until [`ZeroCopySocket::flush`] if its contents matter (guest
    /// pages that change are sent again anyway).
    pub fn send_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        let flags = MsgFlags::from_bits_retain(nix::libc::MSG_ZEROCOPY) | MsgFlags::MSG_NOSIGNAL;
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            match sendmsg::<()>(self.fd.as_raw_fd(), bufs, &[], flags, None) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    self.queued += 1;
                    IoSlice::advance_slices(&mut bufs, n);
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(nix::errno::Errno::ENOBUFS) => {
                    return Err(io::Error::new(
                        io::ErrorKind::OutOfMemory,
                        "Process can't lock enough memory for using MSG_ZEROCOPY",
                    ))
                }
                Err(e) => return Err(io::Error::from(e)),
            }
        }
        Ok(())
    }

    /// Waits until the kernel has reported every send complete. Returns true when there were
    /// sends and the kernel copied all of them (QEMU's `qio_channel_flush` returning 1).
    pub fn flush(&mut self) -> io::Result<bool> {
        if self.completed == self.queued {
            return Ok(false);
        }
        let mut all_copied = true;
        while self.completed < self.queued {
            let mut space = nix::cmsg_space!(nix::libc::sock_extended_err, nix::libc::sockaddr_in6);
            let mut none: [IoSliceMut<'_>; 0] = [];
            let got = recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut none,
                Some(&mut space),
                MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
            );
            let msg = match got {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN) => {
                    // Nothing queued yet: wait for the error queue (POLLERR is always
                    // reported).
                    let mut pfd = [nix::poll::PollFd::new(
                        self.fd.as_fd(),
                        nix::poll::PollFlags::empty(),
                    )];
                    match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::NONE) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                        Err(e) => {
                            return Err(io::Error::new(
                                io::Error::from(e).kind(),
                                format!("Unable to read errqueue: {e}"),
                            ))
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("Unable to read errqueue: {}", e.desc()),
                    ))
                }
            };
            let mut seen = false;
            for c in msg.cmsgs().map_err(io::Error::from)? {
                let ee = match c {
                    ControlMessageOwned::Ipv4RecvErr(ee, _) => ee,
                    ControlMessageOwned::Ipv6RecvErr(ee, _) => ee,
                    _ => continue,
                };
                seen = true;
                if ee.ee_errno != 0 {
                    let kind = io::Error::from_raw_os_error(ee.ee_errno as i32).kind();
                    return Err(io::Error::new(
                        kind,
                        format!(
                            "Error on socket: {}",
                            nix::errno::Errno::from_raw(ee.ee_errno as i32).desc()
                        ),
                    ));
                }
                if ee.ee_origin != SO_EE_ORIGIN_ZEROCOPY {
                    return Err(io::Error::other(format!(
                        "Error not from zero copy (origin {})",
                        ee.ee_origin
                    )));
                }
                // Calls ee_info..=ee_data are complete.
                let n = u64::from(ee.ee_data.wrapping_sub(ee.ee_info)) + 1;
                self.completed += n;
                if ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED == 0 {
                    all_copied = false;
                }
            }
            if !seen {
                return Err(io::Error::other("Wrong cmsg in errqueue"));
            }
        }
        Ok(all_copied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn unix_sockets_are_refused() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!supported(&a));
    }

    #[test]
    fn tcp_sends_arrive_and_completions_are_counted() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let s = std::net::TcpStream::connect(addr).unwrap();
        let (mut r, _) = l.accept().unwrap();
        if !supported(&s) {
            eprintln!("skipped: no MSG_ZEROCOPY on this kernel");
            return;
        }
        let mut z = ZeroCopySocket::new(s.as_fd().try_clone_to_owned().unwrap()).unwrap();
        let pages: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 4096]).collect();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 8 * 4096 * 3];
            r.read_exact(&mut got).unwrap();
            got
        });
        for _ in 0..3 {
            let mut iov: Vec<IoSlice<'_>> = pages.iter().map(|p| IoSlice::new(p)).collect();
            z.send_all(&mut iov).unwrap();
        }
        // Loopback copies: every completion says so.
        assert!(z.flush().unwrap());
        assert_eq!(z.completed, z.queued);
        assert!(!z.flush().unwrap(), "nothing sent since the last flush");
        let got = reader.join().unwrap();
        for (i, chunk) in got.chunks(4096).enumerate() {
            assert!(chunk.iter().all(|&b| b == (i % 8) as u8));
        }
    }
}
