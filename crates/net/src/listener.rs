//! A listening socket of either family.

use crate::Stream;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// A listening unix or TCP socket. A unix one owns its file: it is removed when the listener
/// is dropped.
#[derive(Debug)]
pub enum Listener {
    /// Unix domain, with its path.
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on a unix socket. A socket file already at the path is a stale one (its
    /// server is gone, or about to be replaced) and is removed first, as QEMU's monitor and
    /// NBD server do; any other kind of file is left alone and the bind fails.
    pub fn bind_unix(path: &Path) -> io::Result<Listener> {
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if md.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        UnixListener::bind(path).map(|l| Listener::Unix(l, path.to_path_buf()))
    }

    /// Listens on a unix socket after removing whatever is at the path, socket or not — what
    /// QEMU's migration listener does (`unix_listen_saddr` unlinks the path first).
    pub fn bind_unix_replacing(path: &Path) -> io::Result<Listener> {
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path).map(|l| Listener::Unix(l, path.to_path_buf()))
    }

    /// Listens on the first of `addrs` that binds.
    pub fn bind_tcp(addrs: &[SocketAddr]) -> io::Result<Listener> {
        TcpListener::bind(addrs).map(Listener::Tcp)
    }

    /// Waits for the next connection (TCP: with `TCP_NODELAY` on, as [`Stream::connect_tcp`]).
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }),
        }
    }

    /// Switches non-blocking mode (for an accept loop that polls).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix(l, _) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }

    /// Wakes a thread blocked in [`Listener::accept`] (it returns an error) and stops
    /// accepting.
    pub fn shutdown(&self) {
        let _ = nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&self.as_fd()),
            nix::sys::socket::Shutdown::Both,
        );
    }

    /// The TCP port actually bound (for port `0`).
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }

    /// The unix socket's path.
    pub fn unix_path(&self) -> Option<&Path> {
        match self {
            Listener::Unix(_, p) => Some(p),
            Listener::Tcp(_) => None,
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l, _) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_socket_is_replaced_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        let stale = UnixListener::bind(&p).unwrap();
        drop(stale); // the file stays behind
        let l = Listener::bind_unix(&p).unwrap();
        drop(l);
        assert!(!p.exists(), "the listener removes its file");
        std::fs::write(&p, b"data").unwrap();
        assert!(Listener::bind_unix(&p).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"data");
        let l = Listener::bind_unix_replacing(&p).unwrap();
        assert!(std::fs::symlink_metadata(&p)
            .unwrap()
            .file_type()
            .is_socket());
        drop(l);
    }

    #[test]
    fn shutdown_wakes_accept() {
        let l = std::sync::Arc::new(Listener::bind_tcp(&["127.0.0.1:0".parse().unwrap()]).unwrap());
        let l2 = l.clone();
        let t = std::thread::spawn(move || l2.accept().is_err());
        std::thread::sleep(std::time::Duration::from_millis(20));
        l.shutdown();
        assert!(t.join().unwrap());
    }
}
