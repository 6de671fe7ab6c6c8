//! The QMP server: listeners, connections, event delivery and shutdown.
//!
//! This module holds the sockets (listeners, the accept threads, client-mode connections)
//! and shutdown; `conn` one client's connection (queue, reader and writer threads); `events`
//! the set of connections and the event sink.
//!
//! # Threads
//!
//! Plain threads and blocking I/O. Each listener has an accept thread. Each connection has a
//! reader thread, which parses the client's input and runs its commands one at a time, and a
//! writer thread, which drains the connection's outgoing queue. Replies and events both go
//! through that queue, so a message is never written in the middle of another, and nothing that
//! produces a message ever waits for a client's socket (or, for the one connection a program
//! may serve over its stdin and stdout with [`Server::serve_io`], for its stdout):
//!
//! * An event is queued on every connection in command mode and [`EventSink::emit`] returns. A
//!   connection whose queue already holds more than [`ServerConfig::max_pending_bytes`] has
//!   stopped reading: it is dropped (its socket shut down) rather than allowed to hold memory or
//!   hold up the emitter.
//! * A reply waits for room in its own connection's queue, which only stalls that client's
//!   reader: a client that sends commands but never reads replies simply stops being read, as
//!   with QEMU.
//!
//! # Out-of-band commands
//!
//! With `oob` negotiated, `exec-oob` runs commands the dispatcher marks as OOB-capable. QEMU
//! runs those ahead of queued in-band commands; here every command runs to completion in the
//! order received, so an OOB reply never overtakes an earlier in-band one. The protocol allows
//! that ordering, and since commands are expected to be quick it costs nothing a client could
//! rely on.
//!
//! # Shutting down
//!
//! [`Server::close`] stops the listeners, lets every connection flush what is queued, shuts the
//! sockets down (clients see EOF), and removes the unix socket files. A `quit` command is a
//! [`Reply`](crate::Reply) with an after-flush hook that calls `close` and exits.

mod conn;
mod events;

use conn::{reader_loop, refuse, writer_loop, Conn, Queue, QueueState};
pub use events::EventSink;
use events::Hub;

use crate::dispatch::{AfterFlush, Dispatcher};
use crate::json::{to_line, JsonStream, Limits};
use crate::option::QmpOption;
use crate::session::{Mode, Session, Shared};
use net::{Listener, Stream};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `query-version` result, which the greeting also carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// QEMU major version claimed.
    pub major: u64,
    /// QEMU minor version claimed.
    pub minor: u64,
    /// QEMU micro version claimed.
    pub micro: u64,
    /// Free-form package string.
    pub package: String,
}

impl Default for VersionInfo {
    /// QEMU 7.2.0, the version whose behaviour this crate follows, package `livemig <version>`.
    fn default() -> Self {
        VersionInfo {
            major: 7,
            minor: 2,
            micro: 0,
            package: format!("livemig {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl VersionInfo {
    /// As JSON: `{"qemu": {"major": .., "minor": .., "micro": ..}, "package": ..}`.
    pub fn to_value(&self) -> Value {
        json!({
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        })
    }
}

/// How a [`Server`] behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Reported by the greeting and `query-version`.
    pub version: VersionInfo,
    /// Offer the `oob` capability in the greeting (QEMU does when the monitor has its own
    /// thread, which is always the case here).
    pub offer_oob: bool,
    /// Limits on each message a client sends.
    pub limits: Limits,
    /// Bytes queued for one client beyond which an event drops that client (default 8 MiB).
    pub max_pending_bytes: usize,
    /// Clients served at once (default [`DEFAULT_MAX_CLIENTS`]; 0: no limit, as QEMU). Each
    /// costs two threads and three descriptors; one more is told so and closed instead of
    /// being left without a greeting when the process runs out of descriptors.
    pub max_clients: usize,
}

/// Default [`ServerConfig::max_clients`].
pub const DEFAULT_MAX_CLIENTS: usize = 64;

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            version: VersionInfo::default(),
            offer_oob: true,
            limits: Limits::default(),
            max_pending_bytes: 8 << 20,
            max_clients: DEFAULT_MAX_CLIENTS,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data behind; keep serving.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a thread of its own, so it may block or call back into the server.
fn spawn_detached(f: AfterFlush) {
    let cell = Arc::new(Mutex::new(Some(f)));
    let theirs = cell.clone();
    let spawned = thread::Builder::new()
        .name("qmp-after-reply".into())
        .spawn(move || {
            if let Some(f) = lock(&theirs).take() {
                f();
            }
        });
    if spawned.is_err() {
        // No thread to be had: better late on this thread than never.
        if let Some(f) = lock(&cell).take() {
            f();
        }
    }
}

struct Listening {
    /// Writing a byte here stops the accept thread.
    waker: UnixStream,
    /// Owns the listener: a unix socket's file goes when the thread ends.
    thread: Option<JoinHandle<()>>,
}

impl Listening {
    /// Stops the accept thread, which drops the listener (and so removes a unix socket's
    /// file).
    fn stop(&mut self) {
        let _ = (&self.waker).write_all(b"x");
        if let Some(t) = self.thread.take() {
            if t.thread().id() != thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    config: ServerConfig,
    hub: Arc<Hub>,
    listeners: Mutex<Vec<Listening>>,
    closed: AtomicBool,
}

/// A QMP server. Cheap to clone (all clones are the same server); runs until [`Server::close`],
/// whether or not any handle remains.
///
/// ```no_run
/// use qmp::{CommandTable, QmpError, Server};
/// use serde_json::json;
/// use std::sync::Arc;
///
/// let mut table = CommandTable::new();
/// table.register("stop", |args| {
///     args.finish()?;
///     Ok::<_, QmpError>(json!({}))
/// });
/// let server = Server::new(Arc::new(table));
/// server.start(&"unix:/tmp/vm.qmp,server=on,wait=off".parse()?)?;
/// server.events().emit("STOP", None);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("connections", &self.connection_count())
            .field("closed", &self.inner.closed.load(Ordering::Acquire))
            .finish()
    }
}

impl Server {
    /// A server with the default configuration (QEMU 7.2 version, `oob` offered).
    pub fn new(dispatcher: Arc<dyn Dispatcher>) -> Server {
        Server::with_config(dispatcher, ServerConfig::default())
    }

    /// A server with the given configuration.
    pub fn with_config(dispatcher: Arc<dyn Dispatcher>, config: ServerConfig) -> Server {
        let shared = Arc::new(Shared {
            dispatcher,
            version: config.version.to_value(),
            offer_oob: config.offer_oob,
        });
        Server {
            inner: Arc::new(Inner {
                shared,
                config,
                hub: Arc::new(Hub {
                    conns: Mutex::new(HashMap::new()),
                    removed: Condvar::new(),
                    next_id: AtomicU64::new(1),
                }),
                listeners: Mutex::new(Vec::new()),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// The handle for emitting events.
    pub fn events(&self) -> EventSink {
        EventSink {
            hub: self.inner.hub.clone(),
        }
    }

    /// Number of open connections, negotiated or not.
    pub fn connection_count(&self) -> usize {
        lock(&self.inner.hub.conns).len()
    }

    /// Listens on a unix socket at `path` and accepts clients in the background. A stale socket
    /// file at `path` is replaced, as QEMU does; any other file there is an error.
    pub fn listen_unix(&self, path: impl AsRef<Path>) -> io::Result<()> {
        self.spawn_acceptor(Listener::bind_unix(path.as_ref())?, false)
    }

    /// Listens on a TCP address and accepts clients in the background. Returns the address
    /// bound (useful with port 0).
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs) -> io::Result<SocketAddr> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        let listener = Listener::bind_tcp(&addrs)?;
        let local = match &listener {
            Listener::Tcp(l) => l.local_addr()?,
            Listener::Unix(..) => return Err(io::Error::other("not a TCP listener")),
        };
        self.spawn_acceptor(listener, false)?;
        Ok(local)
    }

    /// Sets up the monitor a `-qmp` option describes. With `server=on,wait=off` the socket is
    /// listening when this returns and clients are accepted in the background; with
    /// `server=on` and `wait` left on, this blocks until the first client has connected; without
    /// `server`, this connects to the address and serves that one connection.
    pub fn start(&self, opt: &QmpOption) -> io::Result<()> {
        if opt.server {
            self.spawn_acceptor(opt.address.listen()?, opt.wait)
        } else {
            self.serve(opt.address.connect()?)
        }
    }

    /// Serves an already connected unix socket (its other end gets the greeting).
    pub fn serve_unix(&self, stream: UnixStream) -> io::Result<()> {
        self.serve(Stream::Unix(stream))
    }

    /// Serves an already connected TCP socket.
    pub fn serve_tcp(&self, stream: TcpStream) -> io::Result<()> {
        self.serve(Stream::Tcp(stream))
    }

    /// Stops the server: no new clients, every connection flushes what is queued for it and
    /// is shut down (clients see EOF), unix socket files are removed. Waits up to `timeout` for
    /// the connections to finish flushing; a client that will not take its data within that
    /// time is cut off. Safe to call more than once and from any thread, including an
    /// after-flush hook.
    pub fn close(&self, timeout: Duration) {
        self.inner.closed.store(true, Ordering::Release);
        let listeners = std::mem::take(&mut *lock(&self.inner.listeners));
        for mut l in listeners {
            l.stop();
        }
        let hub = &self.inner.hub;
        let conns: Vec<Arc<Conn>> = lock(&hub.conns).values().cloned().collect();
        for c in &conns {
            if let Some(s) = &c.stream {
                let _ = s.set_write_timeout(Some(timeout.max(Duration::from_millis(1))));
            }
            c.begin_close();
        }
        let deadline = Instant::now() + timeout;
        let mut live = lock(&hub.conns);
        while !live.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            live = hub
                .removed
                .wait_timeout(live, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        for c in live.values() {
            c.kill();
        }
    }

    fn spawn_acceptor(&self, acceptor: Listener, wait_first: bool) -> io::Result<()> {
        if wait_first {
            // QEMU's `wait=on`: nothing else happens until a client is there.
            let first = acceptor.accept()?;
            self.serve(first)?;
        }
        acceptor.set_nonblocking(true)?;
        let (wake_rx, waker) = UnixStream::pair()?;
        // The lock `close` takes after setting the flag is held from before the accept thread
        // exists until the listener is registered. A client of this very listener can then
        // `quit` at any moment (this thread may be preempted for as long as a whole QMP
        // exchange takes), and its `close` waits here and stops the listener, instead of
        // finding nothing to stop and leaving this call to fail on the flag.
        let mut listeners = lock(&self.inner.listeners);
        if self.inner.closed.load(Ordering::Acquire) {
            // (Dropping the listener removes a unix socket's file.)
            return Err(io::Error::other("QMP server is closed"));
        }
        let server = self.clone();
        let thread = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || server.accept_loop(acceptor, wake_rx))?;
        listeners.push(Listening {
            waker,
            thread: Some(thread),
        });
        Ok(())
    }

    fn accept_loop(&self, acceptor: Listener, wake: UnixStream) {
        loop {
            let (ready, woken) = {
                let mut fds = [
                    PollFd::new(acceptor.as_fd(), PollFlags::POLLIN),
                    PollFd::new(wake.as_fd(), PollFlags::POLLIN),
                ];
                match poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => {
                        thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
                let [l, w] = &fds;
                (l.any().unwrap_or(false), w.any().unwrap_or(false))
            };
            if woken || self.inner.closed.load(Ordering::Acquire) {
                return;
            }
            if !ready {
                continue;
            }
            match acceptor.accept() {
                Ok(stream) => {
                    // A connection that cannot be set up is dropped; the client sees EOF.
                    let _ = self.serve(stream);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                // Out of descriptors or similar: give the system a moment.
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Serves one connection over a reader and a writer that are not a socket: QEMU's
    /// `-qmp stdio` (stdin and stdout). The greeting is written at once. The end of `input`
    /// ends only the reading: as with QEMU 7.2's stdio chardev, replies already owed and
    /// events (once negotiated) are still written, until [`Server::close`] or a failed write.
    /// It is not counted against [`ServerConfig::max_clients`], since no client arrives on it. Nothing can be shut down
    /// under a thread blocked on such a reader or writer, so [`Server::close`] waits for it
    /// only up to its timeout, as for a socket client that does not read.
    pub fn serve_io<R, W>(&self, input: R, output: W) -> io::Result<()>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(io::Error::other("QMP server is closed"));
        }
        self.attach(None, input, output, Arc::default())
    }

    fn serve(&self, stream: Stream) -> io::Result<()> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(io::Error::other("QMP server is closed"));
        }
        stream.set_nonblocking(false)?;
        // Every write is a whole message; waiting to coalesce only adds latency.
        stream.set_nodelay(true)?;
        let max = inner.config.max_clients;
        if max > 0 && lock(&inner.hub.conns).len() >= max {
            refuse(&stream, max);
            return Err(io::Error::other("too many monitor clients"));
        }
        let fds = Arc::new(crate::fds::MonitorFds::default());
        // A unix socket may carry descriptors beside the bytes (`getfd`).
        let reader: Box<dyn Read + Send> = match stream.try_clone()? {
            Stream::Unix(u) => Box::new(crate::fds::FdReader::new(u, fds.clone())),
            tcp => Box::new(tcp),
        };
        self.attach(Some(stream.try_clone()?), reader, stream, fds)
    }

    /// Registers a connection reading from `input` and writing to `output` and starts its
    /// threads; `socket` is what shuts it down, when it is one, and `fds` the descriptors the
    /// client passes to it.
    fn attach<R, W>(
        &self,
        socket: Option<Stream>,
        input: R,
        output: W,
        fds: Arc<crate::fds::MonitorFds>,
    ) -> io::Result<()>
    where
        R: Read + Send + 'static,
        W: Write + Send + 'static,
    {
        let inner = &self.inner;
        let session = Session::new(inner.shared.clone());
        let id = inner.hub.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            stream: socket,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                state: QueueState::Open,
            }),
            changed: Condvar::new(),
            command_mode: AtomicBool::new(false),
            max_pending: inner.config.max_pending_bytes,
            fds,
        });
        conn.push_reply(session.greeting(), None);
        lock(&inner.hub.conns).insert(id, conn.clone());
        if inner.closed.load(Ordering::Acquire) {
            conn.begin_close();
        }

        let (wconn, hub) = (conn.clone(), inner.hub.clone());
        let writer = thread::Builder::new()
            .name(format!("qmp-conn{id}-wr"))
            .spawn(move || writer_loop(wconn, output, hub));
        if let Err(e) = writer {
            conn.kill();
            inner.hub.remove(id);
            return Err(e);
        }
        let limits = inner.config.limits;
        let rconn = conn.clone();
        let spawned = thread::Builder::new()
            .name(format!("qmp-conn{id}-rd"))
            .spawn(move || reader_loop(rconn, input, session, limits));
        if let Err(e) = spawned {
            // The writer cleans up once it sees the connection dead.
            conn.kill();
            return Err(e);
        }
        Ok(())
    }
}
