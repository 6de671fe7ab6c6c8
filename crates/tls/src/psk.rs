//! `tls-creds-psk`: a pre-shared key from `keys.psk` in the credentials' directory, and the
//! sessions that use it — carried out by OpenSSL, because rustls implements pre-shared keys
//! only for its own session resumption, not keys given from outside.
//!
//! What QEMU 7.2 (GnuTLS 3.7) does, and so what this side meets: its priority string adds
//! `+ECDHE-PSK:+DHE-PSK:+PSK` to `NORMAL`, so it negotiates TLS 1.3 with an external PSK
//! (`psk_dhe_ke`, the key bound to SHA-256), or TLS 1.2 with an `ECDHE-PSK` or `DHE-PSK`
//! suite when its `priority` takes 1.3 away. OpenSSL's PSK callbacks give exactly that: in
//! TLS 1.3 it uses the key as an external PSK with SHA-256 (so only the SHA-256 suites are
//! negotiated), in TLS 1.2 the `PSK` cipher suites listed here (this side's server has no DH
//! parameters, so it offers the ECDHE ones).
//!
//! When a callback gives no key, OpenSSL goes on with a certificate handshake instead; a
//! client here accepts no certificate (it has nothing to check one against), and a server has
//! none to present, so no session is ever made without the key.
//!
//! | file | server endpoint | client endpoint |
//! |---|---|---|
//! | `keys.psk` | required: `username:hexkey` lines, read at each handshake to find the key of the username the client sends (as GnuTLS reads its password file) | required: the line of `username` (default `qemu`), read when the object is created |
//! | `dh-params.pem` | optional; read and checked, then unused (ECDHE only) | — |
//!
//! What QEMU checks of the peer: nothing beyond the handshake — only a peer holding the same
//! key for the same username completes it. So `tls-hostname` means nothing to a PSK session
//! (QEMU takes it and checks nothing; so does livemig), and `verify-peer` neither. One
//! refinement over QEMU 7.2, whose `qcrypto_tls_session_check_credentials` does nothing for
//! PSK credentials: a server endpoint with `tls-authz` asks it about the username the client
//! sent, and refuses the handshake when it is denied (a `tls-authz` that QEMU would take and
//! ignore acts here).
//!
//! The session itself runs OpenSSL over memory buffers ([`PskConn`]), so that
//! [`crate::stream`] drives it the way it drives rustls: ciphertext in from the socket,
//! plaintext out, and the other way round, with the socket I/O outside the session's lock.
//! Keys are read from files only and never logged; `Debug` shows none.

use crate::authz::Authz;
use crate::creds::{cred_path, files, strerror, Endpoint};
use crate::error::TlsError;
use crate::verify::Rejection;
use openssl::ssl::{
    ErrorCode, Ssl, SslContextBuilder, SslMethod, SslOptions, SslStream, SslVerifyMode, SslVersion,
};
use std::io::{self, Read, Write};
use std::sync::Arc;

/// The username a client sends when the object names none (QEMU's default).
pub const DEFAULT_USERNAME: &str = "qemu";

/// The file holding the keys (QEMU's `QCRYPTO_TLS_CREDS_PSKFILE`).
pub const KEYS_FILE: &str = "keys.psk";

/// TLS 1.2 cipher suites, for a peer without TLS 1.3: GnuTLS's `+ECDHE-PSK:+DHE-PSK:+PSK`.
const TLS12_CIPHERS: &str = "ECDHE-PSK:DHE-PSK:PSK:!eNULL:!3DES:!RC4";

/// TLS 1.3 suites, preferred first: an external PSK is bound to SHA-256, so only these two
/// can carry it; AES-GCM first because this machine's AES instructions make it the faster
/// (OpenSSL's default order puts ChaCha20 first among the SHA-256 suites, and so did GnuTLS
/// against it). A server picks by its own order.
const TLS13_SUITES: &str = "TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256";

/// A pre-shared key as read from `keys.psk`. Never printed.
#[derive(Clone)]
struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.0.len())
    }
}

/// Loaded `tls-creds-psk` credentials.
#[derive(Debug)]
pub struct PskCreds {
    endpoint: Endpoint,
    /// `keys.psk` in the directory.
    keys_file: String,
    /// A client's username and its key (a server looks keys up per handshake).
    client: Option<(String, Key)>,
}

/// Options of a `tls-creds-psk` object that livemig acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PskOptions {
    /// `dir`: where `keys.psk` is.
    pub dir: Option<String>,
    /// `endpoint` (default `client`).
    pub endpoint: Endpoint,
    /// `username`: the client's identity (default `qemu`); refused on a server, as by QEMU.
    pub username: Option<String>,
}

/// Decodes a key written in hex, as GnuTLS's `GNUTLS_PSK_KEY_HEX` does (an even number of hex
/// digits, at least one byte).
fn unhex(text: &str) -> Option<Vec<u8>> {
    let b = text.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| {
            let hi = (p[0] as char).to_digit(16)?;
            let lo = (p[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

/// The key of `username` in the text of a `keys.psk` file: the first line that starts with
/// `username:` (QEMU's `lookup_key`); trailing blanks and a `\r` are not part of the key.
fn lookup(content: &str, username: &str) -> Option<Option<Vec<u8>>> {
    content.split('\n').find_map(|line| {
        let rest = line.strip_prefix(username)?.strip_prefix(':')?;
        Some(unhex(rest.trim_end_matches([' ', '\t', '\r'])))
    })
}

fn read_keys(path: &str) -> Result<String, TlsError> {
    let bytes = std::fs::read(path)
        .map_err(|e| TlsError::Creds(format!("Cannot read PSK file {path}: {}", strerror(&e))))?;
    String::from_utf8(bytes)
        .map_err(|_| TlsError::Creds(format!("Cannot read PSK file {path}: not text")))
}

impl PskCreds {
    /// Loads credentials as QEMU's `tls-creds-psk` does when the object is completed: a server
    /// must not name a username and needs `keys.psk` (whose keys it reads per handshake); a
    /// client reads the key of its username now. Errors carry QEMU's messages.
    pub fn load(options: PskOptions) -> Result<PskCreds, TlsError> {
        let dir = options.dir.as_deref();
        if options.endpoint == Endpoint::Server {
            if options.username.is_some() {
                return Err(TlsError::Creds(
                    "username should not be set when endpoint=server".into(),
                ));
            }
            if let Some(p) = cred_path(dir, files::DH_PARAMS, false)? {
                crate::creds::check_dh_params(&p)?;
            }
            let keys_file = cred_path(dir, KEYS_FILE, true)?.unwrap_or_default();
            return Ok(PskCreds {
                endpoint: Endpoint::Server,
                keys_file,
                client: None,
            });
        }
        let keys_file = cred_path(dir, KEYS_FILE, true)?.unwrap_or_default();
        let username = options
            .username
            .unwrap_or_else(|| DEFAULT_USERNAME.to_string());
        let content = read_keys(&keys_file)?;
        let key = match lookup(&content, &username) {
            None => {
                return Err(TlsError::Creds(format!(
                    "Username {username} not found in PSK file {keys_file}"
                )))
            }
            // GnuTLS's words for a key that is not hex.
            Some(None) => {
                return Err(TlsError::Creds(
                    "Cannot set PSK client credentials: Error in parsing.".into(),
                ))
            }
            Some(Some(k)) => Key(k),
        };
        Ok(PskCreds {
            endpoint: Endpoint::Client,
            keys_file,
            client: Some((username, key)),
        })
    }

    /// The endpoint.
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint
    }

    /// The username a client sends (`None` on a server).
    pub fn username(&self) -> Option<&str> {
        self.client.as_ref().map(|(u, _)| u.as_str())
    }

    /// A client session's OpenSSL state, before the handshake. A server that answers with a
    /// certificate instead of taking the key is refused (the reason goes to `rejection`):
    /// nothing here could check a certificate, and the key is what authenticates it.
    fn client_ssl(&self, rejection: Rejection) -> Result<Ssl, TlsError> {
        let (username, key) = self.client.clone().ok_or_else(|| {
            TlsError::Lookup("Expected TLS credentials for a client endpoint".into())
        })?;
        let mut b = context(SslMethod::tls_client())?;
        let why = rejection.clone();
        b.set_psk_client_callback(move |_ssl, _hint, identity, psk| {
            let id = username.as_bytes();
            // Room for the identity and its NUL, and for the key (OpenSSL's limits).
            if id.len() >= identity.len() {
                why.set(format!(
                    "The PSK username is longer than OpenSSL's limit of {} bytes",
                    identity.len().saturating_sub(1)
                ));
                return Err(openssl::error::ErrorStack::get());
            }
            if key.0.len() > psk.len() {
                why.set(format!(
                    "The pre-shared key is longer than OpenSSL's limit of {} bytes",
                    psk.len()
                ));
                return Err(openssl::error::ErrorStack::get());
            }
            identity[..id.len()].copy_from_slice(id);
            identity[id.len()] = 0;
            psk[..key.0.len()].copy_from_slice(&key.0);
            Ok(key.0.len())
        });
        b.set_verify_callback(SslVerifyMode::PEER, move |_ok, _chain| {
            rejection.set(
                "The server presented a certificate instead of using the pre-shared key: is it \
                 set up with tls-creds-x509? (a PSK client checks no certificates)"
                    .into(),
            );
            false
        });
        Ssl::new(&b.build()).map_err(setup_error)
    }

    /// A server session's OpenSSL state, before the handshake: the key of the username the
    /// client sends comes from `keys.psk`, read then; `authz`, when given, must allow the
    /// username. Why a client was refused goes to `rejection`.
    fn server_ssl(&self, authz: Option<Arc<Authz>>, rejection: Rejection) -> Result<Ssl, TlsError> {
        let keys_file = self.keys_file.clone();
        let mut b = context(SslMethod::tls_server())?;
        // No tickets: each channel is a full handshake, as with QEMU.
        b.set_num_tickets(0).map_err(setup_error)?;
        b.set_psk_server_callback(move |_ssl, identity, psk| {
            let username = String::from_utf8_lossy(identity.unwrap_or_default()).into_owned();
            rejection.set_dn(username.clone());
            let content = match read_keys(&keys_file) {
                Ok(c) => c,
                Err(e) => {
                    rejection.set(e.to_string());
                    return Ok(0);
                }
            };
            let key = match lookup(&content, &username) {
                Some(Some(k)) => k,
                Some(None) => {
                    rejection.set(format!(
                        "The key of username {username} in PSK file {keys_file} is not hex"
                    ));
                    return Ok(0);
                }
                None => {
                    rejection.set(format!(
                        "Username {username} not found in PSK file {keys_file}"
                    ));
                    return Ok(0);
                }
            };
            if let Some(a) = &authz {
                if !a.is_allowed(&username) {
                    rejection.set(format!("TLS PSK authz check for {username} is denied"));
                    return Ok(0);
                }
            }
            if key.len() > psk.len() {
                rejection.set(format!(
                    "The key of username {username} is longer than {} bytes",
                    psk.len()
                ));
                return Ok(0);
            }
            psk[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
        Ssl::new(&b.build()).map_err(setup_error)
    }
}

fn setup_error(e: impl std::fmt::Display) -> TlsError {
    TlsError::Creds(format!("Cannot set up TLS: {e}"))
}

/// What both ends' contexts share: TLS 1.2 or 1.3, PSK suites for 1.2, and the socket's end
/// without `close_notify` read as the end of data (QEMU closes its channels without one).
fn context(method: SslMethod) -> Result<SslContextBuilder, TlsError> {
    let mut b = SslContextBuilder::new(method).map_err(setup_error)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(setup_error)?;
    b.set_cipher_list(TLS12_CIPHERS).map_err(setup_error)?;
    b.set_ciphersuites(TLS13_SUITES).map_err(setup_error)?;
    b.set_options(
        SslOptions::IGNORE_UNEXPECTED_EOF
            | SslOptions::NO_TICKET
            | SslOptions::CIPHER_SERVER_PREFERENCE,
    );
    Ok(b)
}

/// The memory an OpenSSL session reads ciphertext from and writes it to: the socket stays
/// outside, with [`crate::stream`].
#[derive(Debug, Default)]
struct MemIo {
    rx: Vec<u8>,
    /// Bytes of `rx` already read by OpenSSL.
    rx_pos: usize,
    /// The socket ended: an empty `rx` reads as the end.
    eof: bool,
    tx: Vec<u8>,
}

impl MemIo {
    /// Appends ciphertext, first dropping what OpenSSL already read, so the buffer holds only
    /// the unread part. (OpenSSL 3 takes every byte offered into its own record buffer, so
    /// `read` empties this one as it goes; this keeps it bounded whatever a version does.)
    fn push(&mut self, data: &[u8]) {
        if self.rx_pos > 0 {
            self.rx.drain(..self.rx_pos);
            self.rx_pos = 0;
        }
        self.rx.extend_from_slice(data);
    }
}

impl Read for MemIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = &self.rx[self.rx_pos..];
        if avail.is_empty() {
            return if self.eof {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.rx_pos += n;
        if self.rx_pos == self.rx.len() {
            self.rx.clear();
            self.rx_pos = 0;
        }
        Ok(n)
    }
}

impl Write for MemIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An OpenSSL PSK session over memory buffers, driven by [`crate::stream`] as it drives a
/// rustls connection.
pub(crate) struct PskConn {
    ssl: SslStream<MemIo>,
    /// Plaintext of one vectored write gathered for one `SSL_write` (full records, not one per
    /// slice).
    staging: Vec<u8>,
    /// What the peer is (the username) and how the session is protected, for logs.
    pub(crate) protocol: String,
}

/// The words for an OpenSSL failure: what the peer's alert or bytes mean for a PSK session,
/// then OpenSSL's own reasons. `username` is the one a client sent, on a server.
fn failure_text(e: &openssl::ssl::Error, username: Option<&str>) -> String {
    if let Some(io) = e.io_error() {
        return match io.kind() {
            io::ErrorKind::UnexpectedEof => "the peer closed the connection".into(),
            _ => strerror(io),
        };
    }
    let reasons: Vec<&str> = e
        .ssl_error()
        .map(|s| s.errors().iter().filter_map(|x| x.reason()).collect())
        .unwrap_or_default();
    let all = reasons.join(", ");
    let has = |w: &str| reasons.iter().any(|r| r.contains(w));
    if has("binder does not verify") || (username.is_some() && has("decrypt")) {
        format!(
            "the pre-shared key of username {} does not match this side's keys.psk ({all})",
            username.unwrap_or("?")
        )
    } else if has("alert decrypt error")
        || has("alert bad record mac")
        || has("alert illegal parameter")
    {
        format!(
            "the peer refused this side's pre-shared key ({all}): the keys differ, or the \
             peer's keys.psk has no key for this username"
        )
    } else if has("alert unknown psk identity") {
        format!("the peer does not know this side's PSK username ({all})")
    } else if has("alert handshake failure") {
        format!(
            "the peer refused the handshake ({all}): it does not know this side's PSK \
             username, its tls-authz denies it, or it is not set up with tls-creds-psk"
        )
    } else if has("no shared cipher") || has("no suitable signature algorithm") {
        format!("no common TLS cipher suite ({all}): is the peer set up with tls-creds-psk?")
    } else if has("wrong version number")
        || has("packet length too long")
        || has("record layer failure")
        || has("http request")
        || has("unexpected message")
    {
        format!("the peer does not speak TLS (is it set up without tls-creds?): {all}")
    } else if e.code() == ErrorCode::SYSCALL || e.code() == ErrorCode::ZERO_RETURN {
        "the peer closed the connection".into()
    } else if all.is_empty() {
        format!("OpenSSL error {:?}", e.code())
    } else {
        all
    }
}

/// This side's own reason when it refused the session (a check of ours failed; the socket's
/// or OpenSSL's error is then only a consequence), else `other`.
fn refused_or(rejection: &Rejection, other: TlsError) -> TlsError {
    match rejection.reason() {
        Some(r) => TlsError::PeerRejected(r),
        None => other,
    }
}

/// Runs a PSK handshake over `reader`/`writer` (blocking); `client` says which end this is.
pub(crate) fn handshake<R: Read, W: Write>(
    ssl: Ssl,
    client: bool,
    rejection: &Rejection,
    reader: &mut R,
    writer: &mut W,
) -> Result<PskConn, TlsError> {
    let mut s = SslStream::new(ssl, MemIo::default())
        .map_err(|e| TlsError::Handshake(format!("Cannot set up TLS: {e}")))?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let r = if client { s.connect() } else { s.accept() };
        // What the handshake wrote (records, or the alert of a failure) goes out first.
        let out = std::mem::take(&mut s.get_mut().tx);
        let sent = writer.write_all(&out).and_then(|_| writer.flush());
        match r {
            Ok(()) => {
                sent.map_err(|e| refused_or(rejection, TlsError::Handshake(strerror(&e))))?;
                break;
            }
            Err(e) if e.code() == ErrorCode::WANT_READ => {
                sent.map_err(|e| refused_or(rejection, TlsError::Handshake(strerror(&e))))?;
                let n = loop {
                    match reader.read(&mut buf) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            return Err(refused_or(rejection, TlsError::Handshake(strerror(&e))))
                        }
                    }
                };
                let m = s.get_mut();
                if n == 0 {
                    m.eof = true;
                } else {
                    m.push(&buf[..n]);
                }
            }
            Err(e) => {
                let text = failure_text(&e, rejection.peer_dn().as_deref());
                return Err(match rejection.reason() {
                    Some(r) => TlsError::PeerRejected(r),
                    // QEMU (GnuTLS) sends no alert when it refuses a key: it closes.
                    None if client && s.get_ref().eof && s.get_ref().rx.is_empty() => {
                        TlsError::Handshake(format!(
                            "{text} during the handshake: it refused this side's pre-shared \
                             key or username (QEMU closes without a TLS alert), or it is not \
                             set up with tls-creds-psk"
                        ))
                    }
                    None => TlsError::Handshake(text),
                });
            }
        }
    }
    let ssl = s.ssl();
    let protocol = format!(
        "{} {} with a pre-shared key",
        ssl.version_str(),
        ssl.current_cipher().map(|c| c.name()).unwrap_or("?")
    );
    Ok(PskConn {
        ssl: s,
        staging: Vec::new(),
        protocol,
    })
}

impl PskConn {
    /// Ciphertext from the socket, kept until OpenSSL reads it.
    pub(crate) fn feed(&mut self, data: &[u8]) {
        self.ssl.get_mut().push(data);
    }

    /// The socket ended.
    pub(crate) fn set_eof(&mut self) {
        self.ssl.get_mut().eof = true;
    }

    /// Decrypted bytes into `dst`: `Ok(0)` at the end of data, `WouldBlock` when more
    /// ciphertext is needed, `InvalidData` (with the reason) when the session failed.
    pub(crate) fn read_plaintext(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        match self.ssl.ssl_read(dst) {
            Ok(n) => Ok(n),
            Err(e) => match e.code() {
                ErrorCode::ZERO_RETURN => Ok(0),
                ErrorCode::WANT_READ => Err(io::ErrorKind::WouldBlock.into()),
                ErrorCode::SYSCALL if e.io_error().is_none() => Ok(0),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("TLS: {}", failure_text(&e, None)),
                )),
            },
        }
    }

    /// Encrypts the slices (gathered, so records are full) into the outgoing buffer; returns
    /// how much plaintext was taken.
    pub(crate) fn write_plaintext(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.staging.clear();
        for b in bufs {
            self.staging.extend_from_slice(b);
        }
        if self.staging.is_empty() {
            return Ok(0);
        }
        let mut done = 0;
        while done < self.staging.len() {
            match self.ssl.ssl_write(&self.staging[done..]) {
                Ok(n) => done += n,
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("TLS: {}", failure_text(&e, None)),
                    ))
                }
            }
        }
        Ok(done)
    }

    /// Whether records wait to go out.
    pub(crate) fn wants_write(&mut self) -> bool {
        !self.ssl.get_mut().tx.is_empty()
    }

    /// Moves the records waiting to go out to `out`.
    pub(crate) fn drain(&mut self, out: &mut Vec<u8>) {
        let tx = &mut self.ssl.get_mut().tx;
        if out.is_empty() {
            std::mem::swap(out, tx);
        } else {
            out.append(tx);
        }
    }

    /// Queues a `close_notify`.
    pub(crate) fn close_notify(&mut self) {
        // A failure here leaves nothing to send: the socket's end says the same.
        let _ = self.ssl.shutdown();
    }
}

/// Opens a client session's OpenSSL state (for [`crate::stream::connect`]).
pub(crate) fn client_ssl(creds: &PskCreds, rejection: Rejection) -> Result<Ssl, TlsError> {
    creds.client_ssl(rejection)
}

/// Opens a server session's OpenSSL state (for [`crate::stream::accept`]).
pub(crate) fn server_ssl(
    creds: &PskCreds,
    authz: Option<Arc<Authz>>,
    rejection: Rejection,
) -> Result<Ssl, TlsError> {
    creds.server_ssl(authz, rejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_file_lines_as_qemu_reads_them() {
        let text = "alice:00ff\nqemu:0123456789ABCDEF\r\nqemux:aa\n";
        assert_eq!(
            lookup(text, "qemu"),
            Some(Some(vec![1, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]))
        );
        assert_eq!(lookup(text, "alice"), Some(Some(vec![0, 0xff])));
        assert_eq!(lookup(text, "bob"), None);
        assert_eq!(lookup("qemu:abc\n", "qemu"), Some(None));
        assert_eq!(lookup("qemu:zz\n", "qemu"), Some(None));
        assert_eq!(lookup("qemu:\n", "qemu"), Some(None));
        // The first matching line wins; a longer name is another user.
        assert_eq!(
            lookup("qemux:aa\nqemu:bb\nqemu:cc", "qemu"),
            Some(Some(vec![0xbb]))
        );
    }

    #[test]
    fn load_checks_as_qemu() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().display().to_string();
        let opts = |endpoint, username: Option<&str>| PskOptions {
            dir: Some(dir.clone()),
            endpoint,
            username: username.map(str::to_string),
        };
        let e = PskCreds::load(opts(Endpoint::Client, None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Unable to access credentials {dir}/keys.psk: No such file or directory")
        );
        std::fs::write(d.path().join(KEYS_FILE), "qemu:0011\n").unwrap();
        let c = PskCreds::load(opts(Endpoint::Client, None)).unwrap();
        assert_eq!(c.username(), Some("qemu"));
        assert!(!format!("{c:?}").contains("0011"));
        let e = PskCreds::load(opts(Endpoint::Client, Some("bob"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("Username bob not found in PSK file {dir}/keys.psk")
        );
        // Beyond OpenSSL's limits: refused with the reason when a session starts.
        let long = "u".repeat(300);
        std::fs::write(d.path().join(KEYS_FILE), format!("{long}:0011\n")).unwrap();
        let c = PskCreds::load(opts(Endpoint::Client, Some(&long))).unwrap();
        // (No server: the peer's end is closed, so the handshake cannot wait on it.)
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        drop(a);
        let rejection = Rejection::default();
        let ssl = client_ssl(&c, rejection.clone()).unwrap();
        let (mut r, mut w) = (b.try_clone().unwrap(), b);
        let e = match handshake(ssl, true, &rejection, &mut r, &mut w) {
            Ok(_) => panic!("a 300-byte username went through"),
            Err(e) => e,
        };
        assert_eq!(
            e.to_string(),
            "The PSK username is longer than OpenSSL's limit of 255 bytes"
        );
        std::fs::write(d.path().join(KEYS_FILE), "qemu:0011\n").unwrap();
        let e = PskCreds::load(opts(Endpoint::Server, Some("bob"))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "username should not be set when endpoint=server"
        );
        assert_eq!(
            PskCreds::load(opts(Endpoint::Server, None))
                .unwrap()
                .endpoint(),
            Endpoint::Server
        );
    }
}
