//! Where a socket lives: a unix path, or a TCP host and port.

use crate::{Listener, Stream};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// A socket address of either family, resolved (for TCP) only when used.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// A TCP socket. An empty `host` means every address when listening, localhost when
    /// connecting (as the resolver takes it).
    Tcp {
        /// Host name or address, without brackets.
        host: String,
        /// Port (0 lets the system pick one when listening).
        port: u16,
    },
}

impl std::fmt::Display for Address {
    /// `unix:PATH` or `HOST:PORT`, as error messages name an address.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Every address `host:port` resolves to, in the resolver's order: connecting tries them in
/// turn, listening binds the first that works.
pub fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    (host, port).to_socket_addrs().map(|a| a.collect())
}

impl Address {
    /// Connects (TCP: each resolved address in turn, `TCP_NODELAY` on; an empty host is
    /// `localhost`).
    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Address::Unix(p) => Stream::connect_unix(p),
            Address::Tcp { host, port } => {
                let host = if host.is_empty() { "localhost" } else { host };
                Stream::connect_tcp(&resolve(host, *port)?)
            }
        }
    }

    /// Connects, retrying until `timeout` has passed while nobody listens yet (a process
    /// that is still starting up); the last error when it runs out.
    pub fn connect_retry(&self, timeout: Duration) -> io::Result<Stream> {
        crate::connect_retry(|| self.connect(), timeout)
    }

    /// Listens. A stale unix socket file at the path is replaced (see
    /// [`Listener::bind_unix`]); a TCP host is resolved and the first address that binds is
    /// taken, an empty one meaning every IPv4 address (`0.0.0.0`).
    pub fn listen(&self) -> io::Result<Listener> {
        match self {
            Address::Unix(p) => Listener::bind_unix(p),
            Address::Tcp { host, port } => {
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                Listener::bind_tcp(&resolve(host, *port)?)
            }
        }
    }

    /// The unix path, if this is one.
    pub fn unix_path(&self) -> Option<&std::path::Path> {
        match self {
            Address::Unix(p) => Some(p),
            Address::Tcp { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn unix_and_tcp_carry_bytes_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        for addr in [
            Address::Unix(dir.path().join("s")),
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 0,
            },
        ] {
            let l = addr.listen().unwrap();
            let addr = match (&addr, l.local_port()) {
                (Address::Tcp { host, .. }, Some(port)) => Address::Tcp {
                    host: host.clone(),
                    port,
                },
                _ => addr.clone(),
            };
            let t = std::thread::spawn(move || {
                let mut s = l.accept().unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).unwrap();
                s.write_all(&b).unwrap();
            });
            let mut c = addr.connect().unwrap();
            c.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            c.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"ping", "{addr}");
            t.join().unwrap();
        }
    }

    #[test]
    fn display_names_the_address() {
        assert_eq!(Address::Unix("/x".into()).to_string(), "unix:/x");
        assert_eq!(
            Address::Tcp {
                host: "h".into(),
                port: 1
            }
            .to_string(),
            "h:1"
        );
    }
}
