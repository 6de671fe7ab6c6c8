//! Transports: the URIs `migrate` and `-incoming` accept, and the byte channels behind them.
//!
//! A connection is a plain blocking reader and writer plus a handle that can shut the channel
//! down from another thread. That handle is how `migrate_cancel` unblocks a migration thread
//! stuck in a write to a dead peer, without any lock being held across the write.
//!
//! | URI | outgoing | incoming | return path |
//! |---|---|---|---|
//! | `tcp:HOST:PORT` | connect | listen, accept one | yes |
//! | `unix:PATH` | connect | listen, accept one | yes |
//! | `exec:CMD` | `sh -c CMD`, stream on its stdin | `sh -c CMD`, stream from its stdout | the other pipe, as QEMU 7.2 |
//! | `file:PATH[,offset=N]` | write the file | read the file | no |
//!
//! Over `exec:` the return path is the command's other standard stream, as QEMU 7.2 opens
//! commands read-write: the source reads it from the command's stdout, the destination writes
//! it to the command's stdin — it works when the commands carry both directions (`socat`,
//! `ssh`), and fails the migration when they do not (the source waits for a verdict that
//! never comes). The source pipes its command's stdout only when it opens the return path;
//! otherwise the command's stdout goes to `/dev/null`.

use crate::error::MigrationError;
use net::Stream;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A parsed migration address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`; the host may be a bracketed IPv6 address.
    Tcp {
        /// Host name or address, without brackets.
        host: String,
        /// Port; 0 for "any" when listening.
        port: u16,
    },
    /// `unix:PATH`.
    Unix(String),
    /// `exec:COMMAND LINE`, run with `sh -c`.
    Exec(String),
    /// `file:PATH[,offset=N]`.
    File {
        /// The file.
        path: String,
        /// Where the stream starts in the file.
        offset: u64,
    },
    /// `fd:NAME`: a descriptor the client passed to the monitor (`getfd`); on the incoming
    /// side also `fd:N`, a descriptor inherited by number. Claimed by [`MigrationUri::claim_fd`]
    /// while the command runs, as QEMU takes it from the monitor that runs the command.
    Fd(PassedFd),
}

/// The descriptor of an `fd:` URI, once claimed: a connected socket (which carries a return
/// path) or anything else that reads or writes (a pipe, a file).
#[derive(Clone)]
pub struct PassedFd {
    name: String,
    claimed: Arc<Mutex<Result<Option<OwnedFd>, String>>>,
    socket: Arc<AtomicBool>,
}

impl PassedFd {
    fn new(name: &str) -> PassedFd {
        PassedFd {
            name: name.to_string(),
            claimed: Arc::new(Mutex::new(Ok(None))),
            socket: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What the URI names (a `getfd` name or a number).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the descriptor is a socket (known once claimed).
    pub fn is_socket(&self) -> bool {
        self.socket.load(Ordering::Relaxed)
    }

    /// Takes the descriptor, once: a second connection over the same `fd:` has nothing to use.
    fn take(&self) -> Result<OwnedFd, MigrationError> {
        let mut c = self.claimed.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *c {
            Err(e) => Err(MigrationError::Other(e.clone())),
            Ok(fd) => fd.take().ok_or_else(|| {
                MigrationError::Other(format!(
                    "the descriptor of fd:{} was used already",
                    self.name
                ))
            }),
        }
    }
}

impl std::fmt::Debug for PassedFd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "fd:{}", self.name)
    }
}

impl PartialEq for PassedFd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.claimed, &other.claimed)
    }
}

impl Eq for PassedFd {}

impl MigrationUri {
    /// Parses a URI, with QEMU's message for one it does not know.
    pub fn parse(uri: &str) -> Result<Self, MigrationError> {
        let invalid = || {
            MigrationError::InvalidParameter(
                "Parameter 'uri' expects a valid migration protocol".into(),
            )
        };
        if let Some(rest) = uri.strip_prefix("tcp:") {
            // QEMU's inet_parse() messages for an address without a port.
            let (host, port) = if let Some(r) = rest.strip_prefix('[') {
                let (h, p) = r.split_once("]:").ok_or_else(|| {
                    MigrationError::InvalidParameter(format!("error parsing IPv6 address '{rest}'"))
                })?;
                (h.to_string(), p)
            } else {
                let (h, p) = rest.rsplit_once(':').ok_or_else(|| {
                    MigrationError::InvalidParameter(format!("error parsing address '{rest}'"))
                })?;
                (h.to_string(), p)
            };
            if port.is_empty() {
                return Err(MigrationError::InvalidParameter(format!(
                    "error parsing address '{rest}'"
                )));
            }
            // QEMU accepts options after the port (",ipv4" ...); livemig takes the port only.
            let port = port.split(',').next().unwrap_or_default();
            let port: u16 = port.parse().map_err(|_| {
                MigrationError::InvalidParameter(format!("Invalid port '{port}' in URI '{uri}'"))
            })?;
            return Ok(MigrationUri::Tcp { host, port });
        }
        if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid());
            }
            return Ok(MigrationUri::Unix(path.to_string()));
        }
        if let Some(cmd) = uri.strip_prefix("exec:") {
            if cmd.trim().is_empty() {
                return Err(invalid());
            }
            return Ok(MigrationUri::Exec(cmd.to_string()));
        }
        if let Some(rest) = uri.strip_prefix("file:") {
            let (path, offset) = match rest.rsplit_once(",offset=") {
                Some((p, o)) => {
                    let off = parse_size(o).ok_or_else(|| {
                        MigrationError::InvalidParameter(format!(
                            "file URI has an invalid offset '{o}'"
                        ))
                    })?;
                    (p, off)
                }
                None => (rest, 0),
            };
            if path.is_empty() {
                return Err(invalid());
            }
            return Ok(MigrationUri::File {
                path: path.to_string(),
                offset,
            });
        }
        if let Some(name) = uri.strip_prefix("fd:") {
            return Ok(MigrationUri::Fd(PassedFd::new(name)));
        }
        Err(invalid())
    }

    /// Takes the descriptor of an `fd:` URI from the monitor running the command, as QEMU's
    /// `fd_start_outgoing_migration` (a `getfd` name only) and `fd_start_incoming_migration`
    /// (a name, or a number: a descriptor the process inherited) do. Other URIs have nothing
    /// to claim. On failure the URI keeps the error, so a connection over it fails with it.
    pub fn claim_fd(&self, incoming: bool) -> Result<(), MigrationError> {
        let MigrationUri::Fd(p) = self else {
            return Ok(());
        };
        let name = p.name.as_str();
        let digit = name.starts_with(|c: char| c.is_ascii_digit());
        let got = match qmp::fds::current() {
            Some(fds) if !(incoming && digit) => fds.take(name),
            // QEMU's `monitor_fd_param`: a number, or anything at all outside a monitor
            // (`-incoming fd:N` on the command line).
            _ if incoming => name
                .parse::<i32>()
                .map_err(|_| format!("Invalid file descriptor number '{name}'"))
                .and_then(|n| net::fdpass::adopt_inherited(n, false)),
            _ => Err(format!("File descriptor named '{name}' has not been found")),
        };
        let mut c = p.claimed.lock().unwrap_or_else(|e| e.into_inner());
        match got {
            Ok(fd) => {
                let socket = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::SockType)
                    .is_ok_and(|t| t == nix::sys::socket::SockType::Stream);
                p.socket.store(socket, Ordering::Relaxed);
                *c = Ok(Some(fd));
                Ok(())
            }
            Err(e) => {
                *c = Err(e.clone());
                Err(MigrationError::Other(e))
            }
        }
    }

    /// Whether a connection over this transport can carry a return path (sockets; `exec:`
    /// through the command's other pipe).
    pub fn has_return_path(&self) -> bool {
        match self {
            MigrationUri::File { .. } => false,
            MigrationUri::Fd(p) => p.is_socket(),
            _ => true,
        }
    }

    /// Whether the transport is a socket address: several channels to one address
    /// (postcopy-preempt, multifd), and a return path that needs nothing from a command.
    pub fn is_socket(&self) -> bool {
        matches!(self, MigrationUri::Tcp { .. } | MigrationUri::Unix(_))
    }

    /// Whether the one channel is a socket (an address, or an `fd:` that is one): a return
    /// path that needs nothing from a command, so postcopy's page requests can travel.
    pub fn is_socket_channel(&self) -> bool {
        match self {
            MigrationUri::Fd(p) => p.is_socket(),
            _ => self.is_socket(),
        }
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Shuts a channel down from another thread, so blocked reads and writes on it return.
#[derive(Clone, Default)]
pub struct ShutdownHandle {
    inner: Arc<Mutex<ShutdownTarget>>,
}

#[derive(Default)]
enum ShutdownTarget {
    #[default]
    Nothing,
    Socket(Stream),
    /// An `exec:` command, and the stall bound its pipes wait with ([`BoundedPipe`]).
    Child(Arc<Mutex<Child>>, Arc<AtomicU64>),
}

impl ShutdownHandle {
    fn new(t: ShutdownTarget) -> Self {
        ShutdownHandle {
            inner: Arc::new(Mutex::new(t)),
        }
    }

    /// Shuts the channel down (idempotent).
    pub fn shutdown(&self) {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match &*guard {
            ShutdownTarget::Nothing => {}
            ShutdownTarget::Socket(s) => {
                let _ = s.shutdown(Shutdown::Both);
            }
            ShutdownTarget::Child(c, _) => {
                if let Ok(mut c) = c.lock() {
                    kill_command(&mut c);
                }
            }
        }
    }

    /// A new handle of the underlying socket, if the channel is one (TLS uses it to read a
    /// departed peer's last alert).
    pub fn socket(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match &*guard {
            ShutdownTarget::Socket(s) => s.as_fd().try_clone_to_owned().ok(),
            _ => None,
        }
    }

    /// Bounds how long one read on a socket may wait without a byte (`SO_RCVTIMEO` alone;
    /// `None` waits forever), leaving the write bound and the kernel's TCP bounds of
    /// [`ShutdownHandle::set_stall_timeout`] as they are: for a wait that ends, such as a TLS
    /// handshake on a channel that is read without a bound afterwards. Returns whether the
    /// channel took it.
    pub fn set_read_bound(&self, t: Option<Duration>) -> bool {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let t = t.filter(|d| !d.is_zero());
        match &*guard {
            ShutdownTarget::Socket(s) => s.set_read_timeout(t).is_ok(),
            _ => false,
        }
    }

    /// Bounds how long one read (`read`) or one write (`write`) on a socket may wait without
    /// moving a byte (`SO_RCVTIMEO` / `SO_SNDTIMEO`; `None` waits forever): a stalled peer then
    /// fails the call with `WouldBlock` instead of blocking it for good. A slow peer is not a
    /// stalled one — each byte that moves restarts the bound. Pipes and files have no such
    /// bound; returns whether the channel took it.
    ///
    /// Over TCP the same bound also goes to the kernel, which sees a peer vanish even where no
    /// call of ours waits on it (data sent and unacknowledged, a return path that is quiet for
    /// good reason): `TCP_USER_TIMEOUT` (sent data unacknowledged, or the peer's window shut,
    /// for longer than the bound closes the connection) and keepalive probes every third of
    /// the bound on an idle connection. `None` gives both back to the system's defaults.
    pub fn set_stall_timeout(&self, read: bool, write: bool, t: Option<Duration>) -> bool {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let set = |r: std::io::Result<()>, w: std::io::Result<()>| r.is_ok() && w.is_ok();
        // A zero duration means "forever" to the kernel but is an error to std.
        let t = t.filter(|d| !d.is_zero());
        match &*guard {
            ShutdownTarget::Socket(s) if s.is_tcp() && !tcp_stall_bound(s, t) => false,
            // Both pipes of a command share one bound.
            ShutdownTarget::Child(_, bound) if read || write => {
                let ms = t.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
                bound.store(ms.max(u64::from(t.is_some())), Ordering::Relaxed);
                true
            }
            ShutdownTarget::Socket(s) => set(
                if read { s.set_read_timeout(t) } else { Ok(()) },
                if write {
                    s.set_write_timeout(t)
                } else {
                    Ok(())
                },
            ),
            _ => false,
        }
    }

    /// Half-closes the sending direction of a socket (after the stream has been written), so
    /// a peer waiting for more data sees the end.
    pub fn shutdown_write(&self) {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let ShutdownTarget::Socket(s) = &*guard {
            let _ = s.shutdown(Shutdown::Write);
        }
    }
}

/// One pipe of an `exec:` command, bounded as a socket is by `SO_RCVTIMEO` / `SO_SNDTIMEO`:
/// the pipe is non-blocking, and each read or write waits (`poll`) at most the channel's
/// stall bound (milliseconds, 0 = for good) for it to be ready, then fails with
/// `WouldBlock` — a command that stops reading its stdin, or stops writing its stdout, fails
/// the migration as a stalled socket does. A slow command is not a stalled one: each byte
/// restarts the bound.
struct BoundedPipe<P> {
    pipe: P,
    bound_ms: Arc<AtomicU64>,
}

impl<P: AsFd> BoundedPipe<P> {
    fn new(pipe: P, bound_ms: Arc<AtomicU64>) -> std::io::Result<Self> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let flags = OFlag::from_bits_truncate(fcntl(pipe.as_fd(), FcntlArg::F_GETFL)?);
        fcntl(pipe.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(BoundedPipe { pipe, bound_ms })
    }

    /// Runs `op` until it does not find the pipe busy, waiting at most the bound each time.
    fn io(
        &mut self,
        events: nix::poll::PollFlags,
        mut op: impl FnMut(&mut P) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        use nix::poll::{poll, PollFd, PollTimeout};
        loop {
            match op(&mut self.pipe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                other => return other,
            }
            let ms = self.bound_ms.load(Ordering::Relaxed);
            let timeout = if ms == 0 {
                PollTimeout::NONE
            } else {
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            };
            let mut fds = [PollFd::new(self.pipe.as_fd(), events)];
            match poll(&mut fds, timeout) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "the exec command moved no byte within the stall bound",
                    ))
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl<P: Read + AsFd> Read for BoundedPipe<P> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.io(nix::poll::PollFlags::POLLIN, |p| p.read(buf))
    }
}

impl<P: Write + AsFd> Write for BoundedPipe<P> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.io(nix::poll::PollFlags::POLLOUT, |p| p.write(buf))
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.io(nix::poll::PollFlags::POLLOUT, |p| p.write_vectored(bufs))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.pipe.flush()
    }
}

/// `TCP_USER_TIMEOUT` and keepalive for a TCP channel's stall bound `t` (see
/// [`ShutdownHandle::set_stall_timeout`]); returns whether the socket took them.
fn tcp_stall_bound(s: &Stream, t: Option<Duration>) -> bool {
    use nix::sys::socket::{setsockopt, sockopt};
    let ms = t.map_or(0, |d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX));
    let user = setsockopt(s, sockopt::TcpUserTimeout, &ms);
    let keep = match t {
        Some(d) => {
            // Whole seconds, at least one: the kernel's unit.
            let third = u32::try_from((d.as_secs() / 3).max(1)).unwrap_or(u32::MAX);
            setsockopt(s, sockopt::TcpKeepIdle, &third)
                .and_then(|_| setsockopt(s, sockopt::TcpKeepInterval, &third))
                .and_then(|_| setsockopt(s, sockopt::TcpKeepCount, &3))
                .and_then(|_| setsockopt(s, sockopt::KeepAlive, &true))
        }
        None => setsockopt(s, sockopt::KeepAlive, &false),
    };
    user.is_ok() && keep.is_ok()
}

/// The byte type every transport's reader is boxed as.
pub type BoxRead = Box<dyn Read + Send>;
/// The byte type every transport's writer is boxed as.
pub type BoxWrite = Box<dyn Write + Send>;

/// One migration channel.
pub struct Connection {
    /// The direction in which the stream flows away from this side (source: the stream;
    /// destination: the return path, when the transport has one).
    pub writer: Option<BoxWrite>,
    /// The direction towards this side (source: the return path; destination: the stream).
    pub reader: Option<BoxRead>,
    /// Unblocks both directions from another thread.
    pub shutdown: ShutdownHandle,
    /// The `exec:` child, waited for when the stream is done.
    pub child: Option<Arc<Mutex<Child>>>,
}

impl Connection {
    /// Waits for an `exec:` child to exit and reports a failure exit status. The wait lasts
    /// at most `bound` (the stall bound; `None` waits for good): a command still running then
    /// is killed, and the error says so (it begins with [`EXEC_TIMEOUT`]).
    pub fn finish(&mut self, bound: Option<Duration>) -> Result<(), MigrationError> {
        let Some(child) = self.child.take() else {
            return Ok(());
        };
        let mut child = child
            .lock()
            .map_err(|_| MigrationError::Other("exec child lock poisoned".into()))?;
        let deadline = bound.map(|b| std::time::Instant::now() + b);
        let status = loop {
            let waited = match deadline {
                None => child.wait().map(Some),
                Some(_) => child.try_wait(),
            }
            .map_err(|e| MigrationError::io("Failed to wait for the exec command", e))?;
            if let Some(st) = waited {
                break st;
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                kill_command(&mut child);
                let _ = child.wait();
                return Err(MigrationError::Other(format!(
                    "{EXEC_TIMEOUT} {} ms after the stream ended (x-livemig-stall-timeout); it was killed",
                    bound.map_or(0, |b| b.as_millis())
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            return Err(MigrationError::Other(format!(
                "The exec command exited with {status}"
            )));
        }
        Ok(())
    }
}

/// How the error of an `exec:` command that outlived the stall bound begins.
pub const EXEC_TIMEOUT: &str = "the exec command did not exit within";

/// A passed socket as a stream of its family.
fn fd_stream(fd: OwnedFd) -> Result<Stream, MigrationError> {
    use nix::sys::socket::{getsockname, AddressFamily, SockaddrLike, SockaddrStorage};
    let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(|e| MigrationError::io("getsockname", std::io::Error::from(e)))?
        .family();
    Ok(match family {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => {
            Stream::from(std::net::TcpStream::from(fd))
        }
        _ => Stream::from(std::os::unix::net::UnixStream::from(fd)),
    })
}

fn tcp_addrs(host: &str, port: u16) -> Result<Vec<std::net::SocketAddr>, MigrationError> {
    net::resolve(host, port)
        .map_err(|e| MigrationError::io(format!("address resolution failed for {host}:{port}"), e))
}

/// A socket channel: the stream, a second handle for the other direction and a third for
/// the shutdown handle. `outgoing` says which way the first handle points (source: the
/// stream goes out on it).
pub(crate) fn socket_connection(s: Stream, outgoing: bool) -> Result<Connection, MigrationError> {
    let other = s.try_clone().map_err(|e| MigrationError::io("socket", e))?;
    let h = s.try_clone().map_err(|e| MigrationError::io("socket", e))?;
    // The source reads its return path from the socket the stream goes out on: a quiet
    // reader, or every acknowledgement of the stream would wake the return-path thread.
    let (w, r): (Stream, BoxRead) = if outgoing {
        (s, Box::new(net::QuietReader::new(other)))
    } else {
        (other, Box::new(s))
    };
    Ok(Connection {
        writer: Some(Box::new(w)),
        reader: Some(r),
        shutdown: ShutdownHandle::new(ShutdownTarget::Socket(h)),
        child: None,
    })
}

/// Opens the outgoing channel for `migrate`, without a return path over `exec:` (the
/// command's stdout goes to `/dev/null`); see [`connect_with`].
pub fn connect(uri: &MigrationUri) -> Result<Connection, MigrationError> {
    connect_with(uri, false)
}

/// Opens the outgoing channel for `migrate`; with `return_path`, an `exec:` command's stdout
/// is piped back as the connection's reader (sockets always have one).
pub fn connect_with(uri: &MigrationUri, return_path: bool) -> Result<Connection, MigrationError> {
    match uri {
        MigrationUri::Tcp { host, port } => {
            let s = Stream::connect_tcp(&tcp_addrs(host, *port)?).map_err(|e| {
                MigrationError::io(format!("Failed to connect to '{host}:{port}'"), e)
            })?;
            socket_connection(s, true)
        }
        MigrationUri::Unix(path) => {
            let s = Stream::connect_unix(Path::new(path))
                .map_err(|e| MigrationError::io(format!("Failed to connect to '{path}'"), e))?;
            socket_connection(s, true)
        }
        MigrationUri::Exec(cmd) => {
            let mut child = spawn_command(
                cmd,
                if return_path {
                    Stdio::piped()
                } else {
                    Stdio::null()
                },
            )?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| MigrationError::Other("exec child has no stdin".into()))?;
            let stdout = child.stdout.take();
            let child = Arc::new(Mutex::new(child));
            let bound = Arc::new(AtomicU64::new(0));
            let pipe_error = |e| MigrationError::io(format!("Failed to run '{cmd}'"), e);
            let reader = match stdout {
                Some(s) => Some(
                    Box::new(BoundedPipe::new(s, bound.clone()).map_err(pipe_error)?) as BoxRead,
                ),
                None => None,
            };
            Ok(Connection {
                writer: Some(Box::new(
                    BoundedPipe::new(stdin, bound.clone()).map_err(pipe_error)?,
                )),
                reader,
                shutdown: ShutdownHandle::new(ShutdownTarget::Child(child.clone(), bound)),
                child: Some(child),
            })
        }
        MigrationUri::Fd(p) => {
            let fd = p.take()?;
            if p.is_socket() {
                return socket_connection(fd_stream(fd)?, true);
            }
            Ok(Connection {
                writer: Some(Box::new(File::from(fd))),
                reader: None,
                shutdown: ShutdownHandle::default(),
                child: None,
            })
        }
        MigrationUri::File { path, offset } => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(*offset == 0)
                .open(path)
                .map_err(|e| MigrationError::io(format!("Failed to open file '{path}'"), e))?;
            if *offset > 0 {
                f.set_len(*offset)
                    .and_then(|_| f.seek(SeekFrom::Start(*offset)).map(|_| ()))
                    .map_err(|e| MigrationError::io(format!("Failed to seek in '{path}'"), e))?;
            }
            Ok(Connection {
                writer: Some(Box::new(f)),
                reader: None,
                shutdown: ShutdownHandle::default(),
                child: None,
            })
        }
    }
}

/// A bound incoming address, waiting for its one connection.
pub enum Listener {
    /// A TCP or unix socket listener (a unix one's path is removed when it is dropped).
    Socket(net::Listener),
    /// An `exec:` command whose stdout is the stream.
    Exec(String),
    /// A file holding the stream.
    File(String, u64),
    /// The descriptor of an `fd:` URI: the stream is already there.
    Fd(PassedFd),
}

impl Listener {
    /// Binds the address now, so the source can connect as soon as this returns.
    pub fn bind(uri: &MigrationUri) -> Result<Self, MigrationError> {
        match uri {
            MigrationUri::Tcp { host, port } => {
                let l = net::Listener::bind_tcp(&tcp_addrs(host, *port)?)
                    .map_err(|e| MigrationError::io("Failed to bind socket", e))?;
                Ok(Listener::Socket(l))
            }
            MigrationUri::Unix(path) => {
                let l = net::Listener::bind_unix_replacing(Path::new(path)).map_err(|e| {
                    MigrationError::io(format!("Failed to bind socket to {path}"), e)
                })?;
                Ok(Listener::Socket(l))
            }
            MigrationUri::Exec(cmd) => Ok(Listener::Exec(cmd.clone())),
            MigrationUri::File { path, offset } => Ok(Listener::File(path.clone(), *offset)),
            MigrationUri::Fd(p) => Ok(Listener::Fd(p.clone())),
        }
    }

    /// Whether connections come over a socket (`tcp:`, `unix:`): only those carry more than
    /// one channel.
    pub fn is_socket(&self) -> bool {
        matches!(self, Listener::Socket(_))
    }

    /// The real address of a TCP listener (for `query-migrate`'s `socket-address`, and for
    /// port 0).
    pub fn local_port(&self) -> Option<u16> {
        match self {
            Listener::Socket(l) => l.local_port(),
            _ => None,
        }
    }

    /// The listening socket (`tcp:`, `unix:`), for a wait that watches it beside other
    /// sockets (multifd's channels are awaited while the main channel is watched).
    pub fn socket_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match self {
            Listener::Socket(l) => Some(l.as_fd()),
            _ => None,
        }
    }

    /// Waits for the source and returns the channel.
    pub fn accept(&self) -> Result<Connection, MigrationError> {
        match self {
            Listener::Socket(l) => {
                let s = l
                    .accept()
                    .map_err(|e| MigrationError::io("accept failed", e))?;
                socket_connection(s, false)
            }
            Listener::Exec(cmd) => {
                // Both pipes, as QEMU 7.2: the return path, if the source opens one, goes
                // to the command's stdin.
                let mut child = spawn_command(cmd, Stdio::piped())?;
                let stdout = child
                    .stdout
                    .take()
                    .ok_or_else(|| MigrationError::Other("exec child has no stdout".into()))?;
                let stdin = child.stdin.take();
                let child = Arc::new(Mutex::new(child));
                let bound = Arc::new(AtomicU64::new(0));
                let pipe_error = |e| MigrationError::io(format!("Failed to run '{cmd}'"), e);
                let writer = match stdin {
                    Some(s) => Some(Box::new(
                        BoundedPipe::new(s, bound.clone()).map_err(pipe_error)?,
                    ) as BoxWrite),
                    None => None,
                };
                Ok(Connection {
                    writer,
                    reader: Some(Box::new(
                        BoundedPipe::new(stdout, bound.clone()).map_err(pipe_error)?,
                    )),
                    shutdown: ShutdownHandle::new(ShutdownTarget::Child(child.clone(), bound)),
                    child: Some(child),
                })
            }
            Listener::Fd(p) => {
                let fd = p.take()?;
                if p.is_socket() {
                    return socket_connection(fd_stream(fd)?, false);
                }
                Ok(Connection {
                    writer: None,
                    reader: Some(Box::new(File::from(fd))),
                    shutdown: ShutdownHandle::default(),
                    child: None,
                })
            }
            Listener::File(path, offset) => {
                let mut f = File::open(path)
                    .map_err(|e| MigrationError::io(format!("Failed to open file '{path}'"), e))?;
                if *offset > 0 {
                    f.seek(SeekFrom::Start(*offset)).map_err(|e| {
                        MigrationError::io(format!("Failed to seek in '{path}'"), e)
                    })?;
                }
                Ok(Connection {
                    writer: None,
                    reader: Some(Box::new(f)),
                    shutdown: ShutdownHandle::default(),
                    child: None,
                })
            }
        }
    }
}

/// Starts an `exec:` command (`/bin/sh -c CMD`, stdin piped) in a process group of its own,
/// so that [`kill_command`] reaches every process it started: a shell that forked a child
/// (`sleep 9; cat > f`, a pipeline) hands the pipe to it, and killing the shell alone left
/// that child holding the pipe — a cancel then waited for it to exit or for the stall bound.
fn spawn_command(cmd: &str, stdout: Stdio) -> Result<Child, MigrationError> {
    use std::os::unix::process::CommandExt;
    Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::piped())
        .stdout(stdout)
        .process_group(0)
        .spawn()
        .map_err(|e| MigrationError::io(format!("Failed to run '{cmd}'"), e))
}

/// Kills an `exec:` command and everything it started (its process group, see
/// [`spawn_command`]).
fn kill_command(child: &mut Child) {
    // Only while the shell is alive: then its pid, which names the group, cannot have been
    // reused. (A shell that already exited is reaped here and its group left alone.)
    if let (Ok(None), Ok(pid)) = (child.try_wait(), i32::try_from(child.id())) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postcopy_main_channel_holds_little_unsent() {
        use nix::sys::socket::{getsockopt, sockopt};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let s = Stream::connect_tcp(&[l.local_addr().unwrap()]).unwrap();
        let h = ShutdownHandle::new(ShutdownTarget::Socket(s));
        let fd = h.socket().unwrap();
        assert_eq!(net::sockopt::unsent_limit(&fd).unwrap(), 0, "unset");
        crate::postcopy::limit_socket_queue(&h, true, crate::postcopy::MAIN_CHANNEL_QUEUE);
        assert_eq!(
            net::sockopt::unsent_limit(&fd).unwrap(),
            crate::postcopy::MAIN_CHANNEL_UNSENT
        );
        // (The kernel doubles what it is given, for its bookkeeping.)
        assert_eq!(
            getsockopt(&fd, sockopt::SndBuf).unwrap(),
            2 * crate::postcopy::MAIN_CHANNEL_QUEUE
        );
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(
            MigrationUri::parse("tcp:127.0.0.1:4446").unwrap(),
            MigrationUri::Tcp {
                host: "127.0.0.1".into(),
                port: 4446
            }
        );
        assert_eq!(
            MigrationUri::parse("tcp:[::1]:0").unwrap(),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        assert_eq!(
            MigrationUri::parse("unix:/tmp/m.sock").unwrap(),
            MigrationUri::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            MigrationUri::parse("exec:cat > /tmp/x").unwrap(),
            MigrationUri::Exec("cat > /tmp/x".into())
        );
        assert_eq!(
            MigrationUri::parse("file:/tmp/f,offset=4k").unwrap(),
            MigrationUri::File {
                path: "/tmp/f".into(),
                offset: 4096
            }
        );
    }

    #[test]
    fn unknown_protocol_has_qemu_message() {
        for bad in ["foo:bar", "", "unix:", "exec:"] {
            let e = MigrationUri::parse(bad).unwrap_err();
            assert_eq!(
                e.to_string(),
                "Parameter 'uri' expects a valid migration protocol",
                "{bad}"
            );
        }
    }

    #[test]
    fn tcp_address_without_port_has_qemu_message() {
        for (bad, msg) in [
            ("tcp:", "error parsing address ''"),
            ("tcp:host", "error parsing address 'host'"),
            ("tcp:host:", "error parsing address 'host:'"),
            ("tcp:[::1]", "error parsing IPv6 address '[::1]'"),
        ] {
            let e = MigrationUri::parse(bad).unwrap_err();
            assert_eq!(e.to_string(), msg, "{bad}");
        }
    }

    #[test]
    fn refused_connect_names_the_address() {
        // Held for the whole test: a port found free and let go can be taken by a parallel
        // test, which made this one flaky.
        let refused = testkit::RefusedPort::new();
        let port = refused.port();
        let e = connect(&MigrationUri::parse(&format!("tcp:127.0.0.1:{port}")).unwrap())
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!("Failed to connect to '127.0.0.1:{port}': Connection refused")
        );
    }

    /// Issue 14 item 1: over TCP the stall bound reaches the kernel too — `TCP_USER_TIMEOUT`
    /// equal to it and keepalive every third of it (at least a second) — on both ends of
    /// the channel; `None` gives the defaults back (before, neither was ever set).
    #[test]
    fn the_stall_bound_sets_tcp_user_timeout_and_keepalive_on_both_ends() {
        use nix::sys::socket::{getsockopt, sockopt};
        let l = Listener::bind(&MigrationUri::parse("tcp:127.0.0.1:0").unwrap()).unwrap();
        let port = l.local_port().unwrap();
        let t = std::thread::spawn(move || l.accept().unwrap());
        let out = connect(&MigrationUri::parse(&format!("tcp:127.0.0.1:{port}")).unwrap()).unwrap();
        let inc = t.join().unwrap();
        let opts = |c: &Connection| {
            let g = c.shutdown.inner.lock().unwrap();
            let ShutdownTarget::Socket(s) = &*g else {
                panic!("not a socket")
            };
            (
                getsockopt(s, sockopt::TcpUserTimeout).unwrap(),
                getsockopt(s, sockopt::KeepAlive).unwrap(),
                getsockopt(s, sockopt::TcpKeepIdle).unwrap(),
                getsockopt(s, sockopt::TcpKeepInterval).unwrap(),
                getsockopt(s, sockopt::TcpKeepCount).unwrap(),
            )
        };
        assert_eq!(opts(&out).0, 0, "no bound before it is set");
        assert!(out
            .shutdown
            .set_stall_timeout(false, true, Some(Duration::from_millis(1500))));
        assert!(inc
            .shutdown
            .set_stall_timeout(true, true, Some(Duration::from_secs(30))));
        assert_eq!(opts(&out), (1500, true, 1, 1, 3));
        assert_eq!(opts(&inc), (30_000, true, 10, 10, 3));
        assert!(out.shutdown.set_stall_timeout(false, true, None));
        let (user, keep, ..) = opts(&out);
        assert_eq!((user, keep), (0, false));
    }

    /// Issue 14 item 1: the wait for an `exec:` command after the stream lasts at most the
    /// bound, and the command is killed then (before, a command that never exited held the
    /// migration for good); without a bound it still waits for the exit status.
    #[test]
    fn the_wait_for_an_exec_command_is_bounded() {
        let mut c = connect(&MigrationUri::parse("exec:exec sleep 600").unwrap()).unwrap();
        c.writer = None;
        let t0 = std::time::Instant::now();
        let e = c
            .finish(Some(Duration::from_millis(200)))
            .unwrap_err()
            .to_string();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert_eq!(
            e,
            "the exec command did not exit within 200 ms after the stream ended (x-livemig-stall-timeout); it was killed"
        );
        let mut c = connect(&MigrationUri::parse("exec:exit 3").unwrap()).unwrap();
        let e = c.finish(None).unwrap_err().to_string();
        assert_eq!(e, "The exec command exited with exit status: 3");
    }

    /// Issue 14 item 1: an `exec:` command that stops reading its stdin fails the write
    /// after the stall bound, as a stalled socket does (before, the write blocked for good);
    /// a command that reads moves everything, bound or not.
    #[test]
    fn an_exec_pipe_has_the_stall_bound() {
        let mut c = connect(&MigrationUri::parse("exec:exec sleep 600").unwrap()).unwrap();
        assert!(c
            .shutdown
            .set_stall_timeout(false, true, Some(Duration::from_millis(300))));
        let chunk = vec![7u8; 1 << 20];
        let t0 = std::time::Instant::now();
        let e = c.writer.as_mut().unwrap().write_all(&chunk).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        c.shutdown.shutdown();

        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("out");
        let mut c =
            connect(&MigrationUri::parse(&format!("exec:cat > {}", f.display())).unwrap()).unwrap();
        c.shutdown
            .set_stall_timeout(false, true, Some(Duration::from_millis(300)));
        let data: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
        c.writer.as_mut().unwrap().write_all(&data).unwrap();
        c.writer = None;
        c.finish(Some(Duration::from_secs(10))).unwrap();
        assert!(std::fs::read(&f).unwrap() == data);
        let l = Listener::bind(&MigrationUri::parse(&format!("exec:cat {}", f.display())).unwrap())
            .unwrap();
        let mut c = l.accept().unwrap();
        c.shutdown
            .set_stall_timeout(true, false, Some(Duration::from_millis(300)));
        let mut back = Vec::new();
        c.reader.as_mut().unwrap().read_to_end(&mut back).unwrap();
        assert!(back == data);
    }

    #[test]
    fn unix_round_trip_and_shutdown_unblocks_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s").display().to_string();
        let uri = MigrationUri::Unix(path);
        let l = Listener::bind(&uri).unwrap();
        let t = std::thread::spawn(move || {
            let mut c = l.accept().unwrap();
            let mut buf = [0u8; 5];
            c.reader.as_mut().unwrap().read_exact(&mut buf).unwrap();
            assert_eq!(&buf, b"hello");
            // Now block until the peer shuts the channel down.
            let mut rest = Vec::new();
            c.reader.as_mut().unwrap().read_to_end(&mut rest).unwrap();
            rest
        });
        let mut c = loop {
            match connect(&uri) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        };
        c.writer.as_mut().unwrap().write_all(b"hello").unwrap();
        c.shutdown.shutdown();
        assert!(t.join().unwrap().is_empty());
    }

    #[test]
    fn exec_and_file_carry_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("stream");
        let uri = MigrationUri::parse(&format!("exec:cat > {}", f.display())).unwrap();
        let mut c = connect(&uri).unwrap();
        c.writer.as_mut().unwrap().write_all(b"QEVM").unwrap();
        c.writer = None;
        c.finish(None).unwrap();
        let l = Listener::bind(&MigrationUri::parse(&format!("file:{}", f.display())).unwrap())
            .unwrap();
        let mut c = l.accept().unwrap();
        let mut s = String::new();
        c.reader.as_mut().unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "QEVM");
        let l = Listener::bind(&MigrationUri::parse(&format!("exec:cat {}", f.display())).unwrap())
            .unwrap();
        let mut c = l.accept().unwrap();
        let mut s = String::new();
        c.reader.as_mut().unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "QEVM");
        c.finish(None).unwrap();
    }
}
