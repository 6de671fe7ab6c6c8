//! Sockets the parent process passes down by number (`-chardev socket,fd=N`, as QEMU's Python
//! test library passes its monitor's socketpair end).

use std::os::unix::net::UnixStream;

/// Takes ownership of the inherited socket `fd` (closed when the stream is dropped). Refused if
/// `fd` is not open, is not a socket, or was adopted before (`net::fdpass::adopt_inherited`).
pub fn adopt_socket(fd: i32) -> Result<UnixStream, String> {
    net::fdpass::adopt_inherited(fd, true).map(UnixStream::from)
}
