//! A TLS session over a byte channel whose two directions are separate objects (a socket and
//! its clone), split again into a [`TlsReader`] and a [`TlsWriter`] that two threads may use
//! at once — the migration stream and its return path, an NBD client's requests and replies,
//! each multifd channel's own pair.
//!
//! Two engines run sessions: rustls for x509 credentials, OpenSSL for pre-shared keys (rustls
//! has no external PSKs; see [`crate::psk`]). Both are driven the same way — ciphertext in,
//! plaintext out and back — through [`Engine`], so the callers (migration's channels, NBD) see
//! one kind of session whatever the credentials.
//!
//! Both halves share one engine behind a mutex that is held only for the CPU work
//! (encrypting, decrypting, queueing) and for non-blocking sends, never across a wait on a
//! socket: given a handle of its socket ([`TlsWriter::set_socket`], as migration and NBD do),
//! the writer encrypts under the lock and sends the records straight from rustls's buffers
//! with `MSG_DONTWAIT`, and waits for a full socket without the lock; without one, it encrypts
//! into its own buffer under the lock and writes that out after (one copy more). The reader
//! reads ciphertext into its own buffer without the lock and decrypts under it. So a writer
//! blocked on a full socket never stops the reader, and two peers that both write a lot cannot
//! deadlock each other. Records the reader's side makes (a TLS 1.3 key update answer, an
//! alert) go out with the writer's next write.
//!
//! A shutdown of the underlying socket (the migration's cancel) ends both halves' blocked
//! calls as it does without TLS.
//!
//! The end of a stream: a `close_notify` from the peer, or — as QEMU 7.2 closes its TLS
//! channels without one — the socket's end, reads as the end of data (`Ok(0)`). The protocols
//! above (the migration stream's EOF section, NBD's replies) say whether data is missing.

use crate::authz::Authz;
use crate::creds::{Endpoint, TlsCreds};
use crate::error::TlsError;
use crate::psk::{self, PskConn, PskCreds};
use crate::verify::Rejection;
use rustls::pki_types::ServerName;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

/// Ciphertext read from the socket per system call (a few records).
const READ_CHUNK: usize = 64 * 1024;
/// Plaintext taken per write (the rest is the caller's next write): four full records. Small
/// enough that the records in flight (rustls allocates each) stay in the cache while they are
/// sealed and sent, and that freeing them never leaves glibc's heap with more free memory at
/// its top than its trim threshold (128 KiB): at 256 KiB every write handed the records'
/// pages back to the kernel and faulted them in again, ~15 % of the sender's time.
const WRITE_CHUNK: usize = 64 * 1024;

/// A session's protocol engine, whichever the credentials need.
enum Engine {
    /// x509 credentials (boxed: a rustls connection is large, and the lock holds either).
    Rustls(Box<rustls::Connection>),
    /// Pre-shared keys.
    Psk(PskConn),
}

impl Engine {
    /// Decrypted bytes into `dst`: `Ok(0)` at the end of data, `WouldBlock` when more
    /// ciphertext is needed, `UnexpectedEof` when the socket ended without `close_notify`.
    fn read_plaintext(&mut self, dst: &mut [u8]) -> io::Result<usize> {
        match self {
            Engine::Rustls(c) => c.reader().read(dst),
            Engine::Psk(c) => c.read_plaintext(dst),
        }
    }

    /// Hands ciphertext in `pending` to the engine, advancing it past what was taken, then
    /// processes it. An error is the session's failure, in words.
    fn feed(&mut self, pending: &mut &[u8]) -> Result<(), FeedError> {
        match self {
            Engine::Rustls(c) => {
                c.read_tls(pending).map_err(FeedError::Io)?;
                c.process_new_packets().map_err(FeedError::Tls)?;
                Ok(())
            }
            Engine::Psk(c) => {
                // OpenSSL keeps all of it and decrypts when read.
                c.feed(pending);
                *pending = &[];
                Ok(())
            }
        }
    }

    /// The socket ended.
    fn set_eof(&mut self) {
        match self {
            Engine::Rustls(c) => {
                let _ = c.read_tls(&mut &[][..]);
            }
            Engine::Psk(c) => c.set_eof(),
        }
    }

    fn write_plaintext(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Engine::Rustls(c) => c.writer().write_vectored(bufs),
            Engine::Psk(c) => c.write_plaintext(bufs),
        }
    }

    /// Moves the records waiting to go out to `out`.
    fn drain(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        match self {
            Engine::Rustls(c) => {
                while c.wants_write() {
                    c.write_tls(out)?;
                }
            }
            Engine::Psk(c) => {
                if c.wants_write() {
                    c.drain(out);
                }
            }
        }
        Ok(())
    }

    /// Sends queued records to the socket `fd` straight from the engine's buffers, as far as
    /// the socket takes them without blocking: `Ok(true)` when none is left, `Ok(false)` when
    /// the socket is full, `None` when this engine cannot (it drains into a buffer instead).
    fn send_nonblocking(&mut self, fd: BorrowedFd<'_>) -> Option<io::Result<bool>> {
        let Engine::Rustls(c) = self else {
            return None;
        };
        let mut sock = NonBlockingSend(fd);
        while c.wants_write() {
            match c.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(Ok(false)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(true))
    }

    fn send_close_notify(&mut self) {
        match self {
            Engine::Rustls(c) => c.send_close_notify(),
            Engine::Psk(c) => c.close_notify(),
        }
    }
}

/// A socket written with `MSG_DONTWAIT`: a full socket is `WouldBlock`, never a wait, so the
/// session's lock may be held while writing to it.
struct NonBlockingSend<'a>(BorrowedFd<'a>);

impl Write for NonBlockingSend<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        use nix::sys::socket::{sendmsg, MsgFlags};
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        sendmsg::<()>(self.0.as_raw_fd(), bufs, &[], flags, None).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits, without the session's lock, until the socket takes more (or has failed: the next
/// send says how). A socket's send timeout (`SO_SNDTIMEO`, the migration's stall bound) bounds
/// the wait as it bounds a blocking write: past it, the wait fails with `EAGAIN`.
fn wait_writable(fd: BorrowedFd<'_>) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nix::sys::socket::{getsockopt, sockopt::SendTimeout};
    use nix::sys::time::TimeValLike;
    let bound_ms = getsockopt(&fd, SendTimeout).map_or(0, |t| t.num_milliseconds());
    let timeout = match bound_ms {
        0 => PollTimeout::NONE,
        // A bound under 1 ms is still a bound.
        ms => PollTimeout::try_from(ms.max(1)).unwrap_or(PollTimeout::MAX),
    };
    loop {
        match poll(&mut [PollFd::new(fd, PollFlags::POLLOUT)], timeout) {
            Ok(0) => return Err(nix::errno::Errno::EAGAIN.into()),
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Why handing ciphertext to the engine failed.
enum FeedError {
    Io(io::Error),
    Tls(rustls::Error),
}

struct Shared {
    conn: Engine,
    /// The first TLS error either half met; both report it from then on.
    failed: Option<String>,
}

/// What both halves hold.
struct Session {
    state: Mutex<Shared>,
    peer_dn: Option<String>,
    protocol: String,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The receiving half of a TLS session.
pub struct TlsReader<R> {
    session: Arc<Session>,
    sock: R,
    buf: Box<[u8]>,
    /// Ciphertext in `buf[start..end]` not handed to rustls yet.
    start: usize,
    end: usize,
    eof: bool,
}

/// The sending half of a TLS session.
pub struct TlsWriter<W> {
    session: Arc<Session>,
    sock: W,
    out: Vec<u8>,
    /// A handle of the socket `sock` writes to (see [`TlsWriter::set_socket`]): sealed
    /// records go out through it straight from the engine's buffers, and when a write fails
    /// the peer's last words (an alert) are read from it.
    socket: Option<OwnedFd>,
}

/// Both halves of an established session.
pub struct TlsStreams<R, W> {
    /// Receives.
    pub reader: TlsReader<R>,
    /// Sends.
    pub writer: TlsWriter<W>,
}

/// Describes a handshake failure: this side's own reason when it refused the peer, else what
/// the peer's alert or bytes say.
fn handshake_error(e: &rustls::Error, rejection: &Rejection) -> TlsError {
    use rustls::{AlertDescription as A, Error as E};
    if let Some(reason) = rejection.reason() {
        return TlsError::PeerRejected(reason);
    }
    let text = match e {
        E::AlertReceived(a) => match a {
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::DecryptError => format!(
                "the peer refused this side's certificate (TLS alert {a:?}); see the peer's log"
            ),
            A::AccessDenied => "the peer denied access (TLS alert AccessDenied): its tls-authz \
                                refused this side's certificate"
                .to_string(),
            A::CertificateRequired => "the peer requires a client certificate (TLS alert \
                                       CertificateRequired): add client-cert.pem and \
                                       client-key.pem to the credentials' directory"
                .to_string(),
            other => format!("the peer sent TLS alert {other:?}"),
        },
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => {
            format!("the peer does not speak TLS (is it set up without tls-creds?): {e}")
        }
        E::NoCertificatesPresented => "Verify failed: No certificate was found.".to_string(),
        other => other.to_string(),
    };
    TlsError::Handshake(text)
}

struct HandshakeIo<'a, R, W> {
    r: &'a mut R,
    w: &'a mut W,
}

impl<R: Read, W: Write> Read for HandshakeIo<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl<R: Read, W: Write> Write for HandshakeIo<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

fn io_error_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "the peer closed the connection".into(),
        _ => crate::creds::strerror(e),
    }
}

/// Runs a rustls handshake to its end (blocking), then hands out the halves.
fn establish<R: Read, W: Write>(
    mut conn: rustls::Connection,
    rejection: Rejection,
    mut reader: R,
    mut writer: W,
) -> Result<TlsStreams<R, W>, TlsError> {
    let mut io = HandshakeIo {
        r: &mut reader,
        w: &mut writer,
    };
    while conn.is_handshaking() {
        match conn.complete_io(&mut io) {
            Ok(_) => {}
            Err(e) => {
                // An error from rustls itself (wrapped in io::Error) explains more than the
                // socket's: the alert it queued is flushed to the peer first.
                while conn.wants_write() {
                    if conn.write_tls(&mut io).is_err() {
                        break;
                    }
                }
                let inner = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .cloned();
                return Err(match inner {
                    Some(tls) => handshake_error(&tls, &rejection),
                    None => match rejection.reason() {
                        Some(r) => TlsError::PeerRejected(r),
                        None => TlsError::Handshake(io_error_text(&e)),
                    },
                });
            }
        }
    }
    // Flush what the handshake's end left queued (the client's Finished).
    while conn.wants_write() {
        conn.write_tls(&mut io)
            .map_err(|e| TlsError::Handshake(io_error_text(&e)))?;
    }
    let protocol = format!(
        "{:?} {:?}",
        conn.protocol_version(),
        conn.negotiated_cipher_suite().map(|s| s.suite())
    );
    conn.set_buffer_limit(None);
    Ok(halves(
        Engine::Rustls(Box::new(conn)),
        rejection.peer_dn(),
        protocol,
        reader,
        writer,
    ))
}

/// Runs an OpenSSL PSK handshake to its end (blocking), then hands out the halves.
fn establish_psk<R: Read, W: Write>(
    ssl: openssl::ssl::Ssl,
    client: bool,
    rejection: Rejection,
    mut reader: R,
    mut writer: W,
) -> Result<TlsStreams<R, W>, TlsError> {
    let conn = psk::handshake(ssl, client, &rejection, &mut reader, &mut writer)?;
    let protocol = conn.protocol.clone();
    Ok(halves(
        Engine::Psk(conn),
        rejection.peer_dn(),
        protocol,
        reader,
        writer,
    ))
}

/// The two halves of an established session.
fn halves<R, W>(
    conn: Engine,
    peer_dn: Option<String>,
    protocol: String,
    reader: R,
    writer: W,
) -> TlsStreams<R, W> {
    let session = Arc::new(Session {
        state: Mutex::new(Shared { conn, failed: None }),
        peer_dn,
        protocol,
    });
    TlsStreams {
        reader: TlsReader {
            session: session.clone(),
            sock: reader,
            buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
            start: 0,
            end: 0,
            eof: false,
        },
        writer: TlsWriter {
            session,
            sock: writer,
            out: Vec::new(),
            socket: None,
        },
    }
}

/// Opens a TLS session as the client (migration source, NBD client) over `reader`/`writer`
/// (two handles of one connection). `hostname` is the name the server's certificate must
/// carry when the credentials verify the peer.
pub fn connect<R: Read, W: Write>(
    creds: &TlsCreds,
    hostname: Option<&str>,
    reader: R,
    writer: W,
) -> Result<TlsStreams<R, W>, TlsError> {
    if creds.endpoint() != Endpoint::Client {
        return Err(TlsError::Lookup(
            "Expected TLS credentials for a client endpoint".into(),
        ));
    }
    let creds = match creds {
        TlsCreds::X509(c) => c,
        TlsCreds::Psk(c) => return connect_psk(c, hostname, reader, writer),
    };
    let (config, rejection) = creds.client_config(hostname)?;
    // The name only feeds rustls's bookkeeping: SNI is off and the verifier checks the
    // hostname itself.
    let name = hostname
        .and_then(|h| ServerName::try_from(h.to_string()).ok())
        .unwrap_or(ServerName::IpAddress(
            std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED).into(),
        ));
    let conn = rustls::ClientConnection::new(config, name)
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    let streams = establish(conn.into(), rejection, reader, writer)?;
    log::debug!(
        "TLS session to {} established ({})",
        hostname.unwrap_or("<no hostname>"),
        streams.writer.session.protocol
    );
    Ok(streams)
}

/// Accepts a TLS session as the server (migration destination, NBD server). `authz`, when
/// given, must allow the client certificate's distinguished name.
pub fn accept<R: Read, W: Write>(
    creds: &TlsCreds,
    authz: Option<Arc<Authz>>,
    reader: R,
    writer: W,
) -> Result<TlsStreams<R, W>, TlsError> {
    if creds.endpoint() != Endpoint::Server {
        return Err(TlsError::Lookup(
            "Expected TLS credentials for a server endpoint".into(),
        ));
    }
    let creds = match creds {
        TlsCreds::X509(c) => c,
        TlsCreds::Psk(c) => return accept_psk(c, authz, reader, writer),
    };
    let (config, rejection) = creds.server_config(authz)?;
    let conn =
        rustls::ServerConnection::new(config).map_err(|e| TlsError::Handshake(e.to_string()))?;
    let streams = establish(conn.into(), rejection, reader, writer)?;
    log::debug!(
        "TLS session from {} accepted ({})",
        streams
            .writer
            .session
            .peer_dn
            .as_deref()
            .unwrap_or("<unverified peer>"),
        streams.writer.session.protocol
    );
    Ok(streams)
}

/// [`connect`] with PSK credentials: the hostname names no one (a PSK session has no
/// certificate to check it against; QEMU 7.2 takes it and checks nothing either).
fn connect_psk<R: Read, W: Write>(
    creds: &PskCreds,
    hostname: Option<&str>,
    reader: R,
    writer: W,
) -> Result<TlsStreams<R, W>, TlsError> {
    let rejection = Rejection::default();
    let ssl = psk::client_ssl(creds, rejection.clone())?;
    let streams = establish_psk(ssl, true, rejection, reader, writer)?;
    log::debug!(
        "TLS session to {} established as PSK user {} ({})",
        hostname.unwrap_or("<no hostname>"),
        creds.username().unwrap_or_default(),
        streams.writer.session.protocol
    );
    Ok(streams)
}

/// [`accept`] with PSK credentials: `authz`, when given, must allow the client's username.
fn accept_psk<R: Read, W: Write>(
    creds: &PskCreds,
    authz: Option<Arc<Authz>>,
    reader: R,
    writer: W,
) -> Result<TlsStreams<R, W>, TlsError> {
    let rejection = Rejection::default();
    let ssl = psk::server_ssl(creds, authz, rejection.clone())?;
    let streams = establish_psk(ssl, false, rejection, reader, writer)?;
    log::debug!(
        "TLS session from PSK user {} accepted ({})",
        streams.writer.session.peer_dn.as_deref().unwrap_or("?"),
        streams.writer.session.protocol
    );
    Ok(streams)
}

impl<R, W> TlsStreams<R, W> {
    /// Who the peer is, when checked: the verified certificate's distinguished name
    /// (GnuTLS's format), or, on a PSK server, the username the client sent.
    pub fn peer_dn(&self) -> Option<&str> {
        self.writer.session.peer_dn.as_deref()
    }

    /// The negotiated protocol version and cipher suite, for logs.
    pub fn protocol(&self) -> &str {
        &self.writer.session.protocol
    }
}

fn tls_failure(shared: &mut Shared, e: rustls::Error) -> io::Error {
    let text = match &e {
        rustls::Error::AlertReceived(a) => format!("TLS: the peer sent alert {a:?}"),
        other => format!("TLS: {other}"),
    };
    fail(shared, text)
}

/// Records the session's first failure; both halves report it from then on.
fn fail(shared: &mut Shared, text: String) -> io::Error {
    shared.failed.get_or_insert(text.clone());
    io::Error::new(io::ErrorKind::InvalidData, text)
}

impl<R: Read> TlsReader<R> {
    /// Decrypted bytes into `dst` when some are ready; `None` when more ciphertext is needed.
    fn take_plaintext(&mut self, dst: &mut [u8]) -> io::Result<Option<usize>> {
        let mut st = self.session.lock();
        loop {
            match st.conn.read_plaintext(dst) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The socket ended without close_notify: the end of data (see the module doc).
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some(0)),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    return Err(fail(&mut st, e.to_string()))
                }
                Err(e) => return Err(e),
            }
            if let Some(f) = &st.failed {
                return Err(io::Error::new(io::ErrorKind::InvalidData, f.clone()));
            }
            if self.eof {
                return Ok(Some(0));
            }
            if self.start == self.end {
                return Ok(None);
            }
            let mut pending = &self.buf[self.start..self.end];
            let before = pending.len();
            let fed = st.conn.feed(&mut pending);
            self.start += before - pending.len();
            match fed {
                Ok(()) => {}
                Err(FeedError::Io(e)) => return Err(e),
                Err(FeedError::Tls(e)) => return Err(tls_failure(&mut st, e)),
            }
        }
    }

    fn fill(&mut self) -> io::Result<()> {
        let n = loop {
            match self.sock.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        self.start = 0;
        self.end = n;
        if n == 0 {
            self.eof = true;
            self.session.lock().conn.set_eof();
        }
        Ok(())
    }
}

impl<R: Read> Read for TlsReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if let Some(n) = self.take_plaintext(buf)? {
                return Ok(n);
            }
            self.fill()?;
        }
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        // Fill the slices in turn with what is decrypted; block only before the first byte.
        let mut total = 0;
        for b in bufs.iter_mut() {
            if b.is_empty() {
                continue;
            }
            let n = if total == 0 {
                self.read(b)?
            } else {
                self.take_plaintext(b)?.unwrap_or_default()
            };
            total += n;
            if n < b.len() {
                break;
            }
        }
        Ok(total)
    }
}

impl<W: Write> TlsWriter<W> {
    /// Encrypts under the lock (the records wait in the engine); returns how much plaintext
    /// was taken.
    fn seal(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut st = self.session.lock();
        if let Some(f) = &st.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, f.clone()));
        }
        // Cap one call's plaintext, so the ciphertext buffer stays small.
        let mut room = WRITE_CHUNK;
        let mut capped: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len());
        for b in bufs {
            if room == 0 {
                break;
            }
            let take = b.len().min(room);
            capped.push(IoSlice::new(&b[..take]));
            room -= take;
        }
        let n = match st.conn.write_plaintext(&capped) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Err(fail(&mut st, e.to_string()))
            }
            Err(e) => return Err(e),
        };
        Ok(n)
    }

    /// Gives the writer a handle of the socket it writes to (a clone), for two things. Sealed
    /// records go out through it with non-blocking sends straight from rustls's buffers, with
    /// the lock held (a non-blocking send never waits) — one copy less than sealing into a
    /// buffer of the writer's own to write it out after the lock; a full socket is waited for
    /// without the lock. And when a write fails because the peer went away, the writer reads
    /// what the peer said last — in TLS 1.3 a server refuses a client certificate only after
    /// the client's handshake is over, with an alert the client would otherwise never read if
    /// it only writes (a migration source). `fd` must be the socket the writer's `W` writes to.
    pub fn set_socket(&mut self, fd: impl AsFd) -> io::Result<()> {
        self.socket = Some(fd.as_fd().try_clone_to_owned()?);
        Ok(())
    }

    /// Reads, without blocking, what the peer sent and nobody read, and returns the TLS error
    /// it holds (the peer's alert), if any.
    fn peer_last_words(&mut self) -> Option<String> {
        let fd = self.socket.as_ref()?;
        let mut buf = vec![0u8; READ_CHUNK];
        let mut st = self.session.lock();
        for _ in 0..16 {
            let n = match nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(fd),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            // (A PSK session decrypts only when read, so this finds nothing there; its
            // refusals all come during the handshake.)
            let mut slice = &buf[..n];
            while !slice.is_empty() {
                match st.conn.feed(&mut slice) {
                    Ok(()) => {}
                    Err(FeedError::Io(_)) => break,
                    Err(FeedError::Tls(e)) => {
                        let _ = tls_failure(&mut st, e);
                        return st.failed.clone();
                    }
                }
            }
        }
        None
    }

    /// What a failed socket write means, in words: the peer's alert when the reader or the
    /// unread bytes know it.
    fn write_failed(&mut self, e: io::Error) -> io::Error {
        // The reader may know why the peer went away (an alert it sent before closing), or
        // the unread bytes may say.
        let known = self.session.lock().failed.clone();
        if let Some(f) = known.or_else(|| self.peer_last_words()) {
            return io::Error::new(e.kind(), f);
        }
        let hint = match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                " (the TLS peer closed the connection; if it refused this side's \
                 certificate, its log says why)"
            }
            _ => "",
        };
        io::Error::new(e.kind(), format!("{}{hint}", crate::creds::strerror(&e)))
    }

    fn send_out(&mut self) -> io::Result<()> {
        if let Err(e) = self.sock.write_all(&self.out) {
            self.out.clear();
            return Err(self.write_failed(e));
        }
        self.out.clear();
        Ok(())
    }

    /// Sends every record the session has queued: through the socket handle straight from
    /// the engine when there is one (waiting for room without the lock), else by draining
    /// them into `out` under the lock and writing that after it.
    fn send_queued(&mut self) -> io::Result<()> {
        loop {
            let sent = {
                let mut st = self.session.lock();
                match self
                    .socket
                    .as_ref()
                    .and_then(|fd| st.conn.send_nonblocking(fd.as_fd()))
                {
                    Some(sent) => sent,
                    None => {
                        st.conn.drain(&mut self.out)?;
                        drop(st);
                        return self.send_out();
                    }
                }
            };
            let waited = match sent {
                Ok(true) => return Ok(()),
                Ok(false) => self
                    .socket
                    .as_ref()
                    .map_or(Ok(()), |fd| wait_writable(fd.as_fd())),
                Err(e) => Err(e),
            };
            if let Err(e) = waited {
                return Err(self.write_failed(e));
            }
        }
    }

    /// Sends a TLS `close_notify`: the peer reads the end of data.
    pub fn close_notify(&mut self) -> io::Result<()> {
        self.session.lock().conn.send_close_notify();
        self.send_queued()?;
        self.sock.flush()
    }

    /// The verified peer certificate's distinguished name, when checked.
    pub fn peer_dn(&self) -> Option<&str> {
        self.session.peer_dn.as_deref()
    }
}

impl<W: Write> Write for TlsWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = self.seal(bufs)?;
        self.send_queued()?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Records queued by the reader (key update answers) go out now.
        self.send_queued()?;
        self.sock.flush()
    }
}
