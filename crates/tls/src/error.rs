//! The crate's one error type. Each variant's text is what an operator reads (in a QMP error or
//! on stderr), worded as QEMU 7.2 words the same condition where it has a message for it.

use thiserror::Error;

/// What went wrong with TLS credentials, an authorization object or a TLS session.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TlsError {
    /// Loading or checking credentials failed: a missing or unreadable file, a PEM file that
    /// does not parse, a certificate that fails QEMU's sanity checks, a property livemig does
    /// not support. The text is complete (QEMU's, e.g. `Unable to access credentials
    /// DIR/ca-cert.pem: No such file or directory`).
    #[error("{0}")]
    Creds(String),
    /// An object named by a parameter is missing or of the wrong kind (`No TLS credentials with
    /// id 'x'`, `Expected TLS credentials for a server endpoint`).
    #[error("{0}")]
    Lookup(String),
    /// The peer's certificate, or the peer, was refused by this side's checks (`The certificate
    /// hasn't got a known issuer`, `Certificate does not match the hostname h`, `TLS x509 authz
    /// check for DN is denied`).
    #[error("{0}")]
    PeerRejected(String),
    /// The TLS handshake failed for another reason: the peer refused us (an alert), the peer
    /// does not speak TLS, the connection closed.
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

impl TlsError {
    /// Converts to an `io::Error` (kind `Other` for check failures, `ConnectionAborted` for
    /// handshake failures) whose text is this error's, for layers that speak `io::Result`.
    pub fn into_io(self) -> std::io::Error {
        let kind = match self {
            TlsError::Handshake(_) => std::io::ErrorKind::ConnectionAborted,
            _ => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, self)
    }
}
