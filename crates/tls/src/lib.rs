//! TLS for livemig's channels, configured the way QEMU 7.2 configures it, carried out by
//! rustls (with the `ring` crypto provider) for certificates and by OpenSSL for pre-shared
//! keys — two engines, because rustls implements no external PSKs and QEMU's PSK sessions
//! (TLS 1.3 with an external key, GnuTLS) need them:
//!
//! * [`objects`]: the `tls-creds-x509`, `tls-creds-psk`, `authz-simple` and `authz-list`
//!   objects that `-object`, `object-add` and `object-del` create and remove, with QEMU's
//!   properties and messages;
//! * [`creds`]: credentials loaded from a directory with QEMU's file names (`ca-cert.pem`,
//!   `server-cert.pem`, `server-key.pem`, `client-cert.pem`, `client-key.pem`, `ca-crl.pem`,
//!   `dh-params.pem`), QEMU's sanity checks, and per-session rustls configurations;
//! * [`psk`]: pre-shared keys from `keys.psk` (`username:hexkey` lines) and the OpenSSL
//!   sessions that use them;
//! * [`verify`]: the checks of the peer — chain, hostname (GnuTLS's rules), authz of the
//!   client certificate's distinguished name — made during the handshake, so that the peer
//!   gets an alert;
//! * [`stream`]: a session over one connection, on either engine, split into a reader and a
//!   writer that two threads use at once (a migration stream and its return path; each
//!   multifd channel is one more session over its own connection);
//! * [`cert`] and [`authz`]: what a certificate says as GnuTLS reads it, and the
//!   authorization rules.
//!
//! Not supported, and refused with an error saying so: `tls-creds-anon` (anonymous
//! Diffie-Hellman: neither engine is set up for it, and it authenticates no one), the
//! `priority` and `passwordid` properties. Keys and certificates come from files only;
//! nothing secret is logged.
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod authz;
pub mod cert;
pub mod creds;
pub mod error;
pub mod objects;
pub mod psk;
pub mod qmp;
pub mod stream;
pub mod verify;

pub use authz::Authz;
pub use creds::{Endpoint, TlsCreds, X509Creds, X509Options};
pub use error::TlsError;
pub use objects::{Object, Objects};
pub use psk::{PskCreds, PskOptions};
pub use stream::{accept, connect, TlsReader, TlsStreams, TlsWriter};
