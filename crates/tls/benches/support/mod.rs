//! What the record bench and the throughput example share: a pair of x509 credentials made
//! for the run, as both ends of a session load them.

use std::path::Path;
use testkit::pki::{Ca, Subject};
use tls::{Endpoint, TlsCreds, X509Options};

/// Server credentials for 127.0.0.1 (in `dir/s`) and client credentials (in `dir/c`) from one
/// CA made for the run, loaded with the peer checks on: (server, client).
pub fn x509_pair(dir: &Path) -> (TlsCreds, TlsCreds) {
    let ca = Ca::new("bench CA");
    ca.write_server(&dir.join("s"), &Subject::new("bench", &["127.0.0.1"]));
    ca.write_client(&dir.join("c"), &Subject::new("bench-client", &[]));
    let load = |sub: &str, endpoint| {
        TlsCreds::load_x509(X509Options {
            dir: Some(dir.join(sub).display().to_string()),
            endpoint,
            verify_peer: true,
            sanity_check: true,
        })
        .expect("x509 credentials")
    };
    (load("s", Endpoint::Server), load("c", Endpoint::Client))
}
