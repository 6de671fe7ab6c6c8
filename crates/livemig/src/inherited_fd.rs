//! Sockets the parent process passes down by number (`-chardev socket,fd=N`, as QEMU's Python
//! test library passes its monitor's socketpair end). The one `unsafe` block of the binary lives
//! here: adopting a descriptor number as an owned socket.

#![allow(unsafe_code)]

use std::collections::HashSet;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;

/// Descriptors already adopted: each may be owned once.
static ADOPTED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Takes ownership of the inherited socket `fd` (closed when the stream is dropped). Refused if
/// `fd` is not open, is not a socket, or was adopted before.
pub fn adopt_socket(fd: i32) -> Result<UnixStream, String> {
    // /proc/self/fd/N of a socket reads `socket:[INODE]`; a missing entry means N is not open.
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .map_err(|_| format!("fd={fd}: no such open file descriptor"))?;
    if !target.to_string_lossy().starts_with("socket:") {
        return Err(format!(
            "fd={fd}: not a socket ({})",
            target.to_string_lossy()
        ));
    }
    let mut adopted = ADOPTED.lock().unwrap_or_else(|p| p.into_inner());
    if !adopted.get_or_insert_with(HashSet::new).insert(fd) {
        return Err(format!("fd={fd}: already in use"));
    }
    // SAFETY: `fd` is open and a socket (checked above through /proc), it was inherited from the
    // parent for this chardev rather than opened by this process (adoption happens at start-up,
    // before the process opens sockets of its own, and each number is adopted once, recorded in
    // ADOPTED), so the stream becomes its only owner.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}
