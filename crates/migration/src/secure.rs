//! TLS on migration channels (`tls-creds`, `tls-hostname`, `tls-authz`), as QEMU 7.2's
//! `migration/tls.c` does it: when `tls-creds` names credentials, the source wraps its channel
//! in a TLS client session once connected, and the destination wraps the channel it accepted
//! in a TLS server session, before a byte of the stream. The return path runs inside the same
//! session. Each channel is one session of its own, so more channels (multifd) each call
//! these functions on their own connection.
//!
//! The source checks the destination's certificate against `tls-hostname`, or, when that is
//! empty, the host of a `tcp:` address (QEMU's rule; a `unix:` address has no hostname, so
//! verifying credentials need `tls-hostname` there). The destination asks the `tls-authz`
//! object, if set, about the source certificate's distinguished name. With `tls-creds-psk`
//! credentials the key authenticates both ends instead: no hostname is checked, and
//! `tls-authz` is asked about the username the source sent (see `tls::psk`).
//!
//! Failures are the migration's error, worded as QEMU words them (`No TLS credentials with id
//! 'x'`, `Certificate does not match the hostname h`, `TLS x509 authz check for DN is
//! denied`, `TLS handshake failed: ...`).

use crate::error::MigrationError;
use crate::transport::{BoxRead, BoxWrite, Connection, MigrationUri};
use std::sync::Arc;
use tls::{Endpoint, Objects};

/// The TLS parameters of one channel, read when the channel opens.
#[derive(Debug, Clone, Default)]
pub struct TlsParams {
    /// `tls-creds`: the id of the credentials object; empty for no TLS.
    pub creds: String,
    /// `tls-hostname`.
    pub hostname: String,
    /// `tls-authz`.
    pub authz: String,
}

impl TlsParams {
    /// Whether the channel is to use TLS.
    pub fn enabled(&self) -> bool {
        !self.creds.is_empty()
    }
}

fn err(e: tls::TlsError) -> MigrationError {
    MigrationError::Other(e.to_string())
}

fn both_directions(conn: &mut Connection) -> Result<(BoxRead, BoxWrite), MigrationError> {
    match (conn.reader.take(), conn.writer.take()) {
        (Some(r), Some(w)) => Ok((r, w)),
        _ => Err(MigrationError::Other(
            "TLS needs a channel in both directions (tcp: or unix:); livemig's exec: and file: \
             channels carry one"
                .into(),
        )),
    }
}

/// Wraps the source's channel in a TLS client session when `tls-creds` is set. The
/// handshake waits at most `stall` (`x-livemig-stall-timeout`) for each answer: a peer that
/// accepts and never answers — a destination without TLS waiting for another channel before
/// it reads, as QEMU 7.2's does — fails the channel instead of holding the source in
/// `setup` (or a resume) for good; the channel's reads are unbounded again afterwards.
pub fn secure_outgoing(
    mut conn: Connection,
    uri: &MigrationUri,
    params: &TlsParams,
    objects: &Arc<Objects>,
    stall: Option<std::time::Duration>,
) -> Result<Connection, MigrationError> {
    if !params.enabled() {
        return Ok(conn);
    }
    let creds = objects
        .tls_creds(&params.creds, Endpoint::Client)
        .map_err(err)?;
    let hostname = if !params.hostname.is_empty() {
        Some(params.hostname.as_str())
    } else if let MigrationUri::Tcp { host, .. } = uri {
        Some(host.as_str())
    } else {
        None
    };
    let socket = conn.shutdown.socket();
    let (r, w) = both_directions(&mut conn)?;
    let bounded = stall.is_some() && conn.shutdown.set_read_bound(stall);
    let began = std::time::Instant::now();
    let mut streams = tls::connect(&creds, hostname, r, w).map_err(|e| {
        let e = err(e);
        match (bounded, stall) {
            // Only a wait that ran out of time takes this long.
            (true, Some(b)) if began.elapsed() >= b => MigrationError::Other(format!(
                "{e} (no answer within {} ms: x-livemig-stall-timeout; does the destination \
                 use tls-creds too?)",
                b.as_millis()
            )),
            _ => e,
        }
    })?;
    if bounded {
        conn.shutdown.set_read_bound(None);
    }
    if let Some(fd) = socket {
        let _ = streams.writer.set_socket(fd);
    }
    log::debug!(
        "migration channel secured with TLS ({})",
        streams.protocol()
    );
    conn.reader = Some(Box::new(streams.reader));
    conn.writer = Some(Box::new(streams.writer));
    Ok(conn)
}

/// Wraps the destination's accepted channel in a TLS server session when `tls-creds` is set.
pub fn secure_incoming(
    mut conn: Connection,
    params: &TlsParams,
    objects: &Arc<Objects>,
) -> Result<Connection, MigrationError> {
    if !params.enabled() {
        return Ok(conn);
    }
    let creds = objects
        .tls_creds(&params.creds, Endpoint::Server)
        .map_err(err)?;
    // QEMU asks the authz object only when the peer is verified.
    let authz = if !params.authz.is_empty() && creds.verify_peer() {
        Some(objects.authz(&params.authz).map_err(err)?)
    } else {
        None
    };
    let socket = conn.shutdown.socket();
    let (r, w) = both_directions(&mut conn)?;
    let mut streams = tls::accept(&creds, authz, r, w).map_err(err)?;
    if let Some(fd) = socket {
        let _ = streams.writer.set_socket(fd);
    }
    log::debug!(
        "incoming migration channel secured with TLS ({}), peer {}",
        streams.protocol(),
        streams.peer_dn().unwrap_or("not verified")
    );
    conn.reader = Some(Box::new(streams.reader));
    conn.writer = Some(Box::new(streams.writer));
    Ok(conn)
}
