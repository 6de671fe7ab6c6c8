//! The QMP server: listeners, connections, event delivery and shutdown.
//!
//! # Threads
//!
//! Plain threads and blocking I/O. Each listener has an accept thread. Each connection has a
//! reader thread, which parses the client's input and runs its commands one at a time, and a
//! writer thread, which drains the connection's outgoing queue. Replies and events both go
//! through that queue, so a message is never written in the middle of another, and nothing that
//! produces a message ever waits for a client's socket:
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

use crate::dispatch::{AfterFlush, Dispatcher};
use crate::json::{to_line, JsonStream, Limits};
use crate::option::{QmpAddress, QmpOption};
use crate::session::{Mode, Session, Shared};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
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

/// A connected socket of either family.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// A listening socket of either family.
enum Acceptor {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Acceptor {
    fn accept(&self) -> io::Result<Stream> {
        let s = match self {
            Acceptor::Unix(l) => Stream::Unix(l.accept()?.0),
            Acceptor::Tcp(l) => Stream::Tcp(l.accept()?.0),
        };
        Ok(s)
    }

    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Acceptor::Unix(l) => l.set_nonblocking(on),
            Acceptor::Tcp(l) => l.set_nonblocking(on),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Acceptor::Unix(l) => l.as_fd(),
            Acceptor::Tcp(l) => l.as_fd(),
        }
    }
}

/// Bytes to send: a reply of one connection, or an event shared by all.
enum Payload {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl Payload {
    fn bytes(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Shared(a) => a,
        }
    }
}

struct Item {
    payload: Payload,
    after: Option<AfterFlush>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueueState {
    Open,
    /// Flush what is queued, then close.
    Closing,
    /// Closed, or the client is gone: nothing more is written.
    Dead,
}

struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    state: QueueState,
}

/// One client connection, as seen by everyone but its reader.
struct Conn {
    id: u64,
    /// For shutting the socket down from any thread.
    stream: Stream,
    queue: Mutex<Queue>,
    /// Signalled on every change to `queue`.
    changed: Condvar,
    /// Set once the client has negotiated, after its `qmp_capabilities` reply was queued.
    command_mode: AtomicBool,
    max_pending: usize,
}

impl Conn {
    /// Queues a reply, waiting while the queue is over its limit. Returns false (and runs the
    /// reply's hook) when the connection is dead.
    fn push_reply(&self, line: Vec<u8>, after: Option<AfterFlush>) -> bool {
        let mut q = lock(&self.queue);
        loop {
            if q.state == QueueState::Dead {
                drop(q);
                if let Some(f) = after {
                    spawn_detached(f);
                }
                return false;
            }
            if q.bytes == 0 || q.bytes + line.len() <= self.max_pending {
                q.bytes += line.len();
                q.items.push_back(Item {
                    payload: Payload::Owned(line),
                    after,
                });
                self.changed.notify_all();
                return true;
            }
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Queues an event without waiting; drops the client if it has fallen too far behind.
    fn push_event(&self, line: &Arc<[u8]>) {
        let mut q = lock(&self.queue);
        if q.state != QueueState::Open {
            return;
        }
        if q.bytes > 0 && q.bytes + line.len() > self.max_pending {
            q.state = QueueState::Dead;
            self.changed.notify_all();
            drop(q);
            let _ = self.stream.shutdown(Shutdown::Both);
            return;
        }
        q.bytes += line.len();
        q.items.push_back(Item {
            payload: Payload::Shared(line.clone()),
            after: None,
        });
        self.changed.notify_all();
    }

    /// Asks the writer to flush and close.
    fn begin_close(&self) {
        let mut q = lock(&self.queue);
        if q.state == QueueState::Open {
            q.state = QueueState::Closing;
        }
        self.changed.notify_all();
    }

    /// Closes at once, dropping whatever is queued.
    fn kill(&self) {
        let mut q = lock(&self.queue);
        q.state = QueueState::Dead;
        self.changed.notify_all();
        drop(q);
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// The next item to write, or `None` when the writer should stop.
    fn next_item(&self) -> Option<Item> {
        let mut q = lock(&self.queue);
        loop {
            if q.state == QueueState::Dead {
                return None;
            }
            if let Some(item) = q.items.pop_front() {
                q.bytes = q.bytes.saturating_sub(item.payload.bytes().len());
                self.changed.notify_all();
                return Some(item);
            }
            if q.state == QueueState::Closing {
                return None;
            }
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The set of live connections, shared by the server and its event sinks.
struct Hub {
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Signalled when a connection goes away.
    removed: Condvar,
    next_id: AtomicU64,
}

impl Hub {
    fn remove(&self, id: u64) {
        lock(&self.conns).remove(&id);
        self.removed.notify_all();
    }
}

/// A handle for emitting QMP events to every client in command mode. Cheap to clone; usable
/// from any thread; never blocks on a client.
#[derive(Clone)]
pub struct EventSink {
    hub: Arc<Hub>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("subscribers", &self.subscribers())
            .finish()
    }
}

/// Host time as QMP reports it: seconds and microseconds since the Unix epoch, or -1 and -1
/// when the clock is before the epoch.
fn timestamp() -> Value {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()}),
        Err(_) => json!({"seconds": -1, "microseconds": -1}),
    }
}

impl EventSink {
    /// Sends event `name` with optional `data`, stamped with the current time, to every
    /// connection that has completed capabilities negotiation. Events from one thread reach
    /// every client in the order they were emitted.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let mut event = serde_json::Map::new();
        event.insert("timestamp".into(), timestamp());
        event.insert("event".into(), Value::String(name.to_string()));
        if let Some(data) = data {
            event.insert("data".into(), data);
        }
        let line: Arc<[u8]> = to_line(&Value::Object(event)).into();
        // Holding the registry lock across the (non-blocking) pushes gives every client the
        // same order when several threads emit at once.
        let conns = lock(&self.hub.conns);
        for conn in conns.values() {
            if conn.command_mode.load(Ordering::Acquire) {
                conn.push_event(&line);
            }
        }
    }

    /// How many connections would receive an event now.
    pub fn subscribers(&self) -> usize {
        lock(&self.hub.conns)
            .values()
            .filter(|c| c.command_mode.load(Ordering::Acquire))
            .count()
    }
}

struct Listening {
    /// Writing a byte here stops the accept thread.
    waker: UnixStream,
    thread: Option<JoinHandle<()>>,
    /// The socket file to remove on close.
    unix_path: Option<PathBuf>,
}

impl Listening {
    /// Stops the accept thread and removes the socket file.
    fn stop(&mut self) {
        let _ = (&self.waker).write_all(b"x");
        if let Some(t) = self.thread.take() {
            if t.thread().id() != thread::current().id() {
                let _ = t.join();
            }
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
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
        let listener = bind_unix(path.as_ref())?;
        self.spawn_acceptor(
            Acceptor::Unix(listener),
            Some(path.as_ref().to_path_buf()),
            false,
        )
    }

    /// Listens on a TCP address and accepts clients in the background. Returns the address
    /// bound (useful with port 0).
    pub fn listen_tcp(&self, addr: impl ToSocketAddrs) -> io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        self.spawn_acceptor(Acceptor::Tcp(listener), None, false)?;
        Ok(local)
    }

    /// Sets up the monitor a `-qmp` option describes. With `server=on,wait=off` the socket is
    /// listening when this returns and clients are accepted in the background; with
    /// `server=on` and `wait` left on, this blocks until the first client has connected; without
    /// `server`, this connects to the address and serves that one connection.
    pub fn start(&self, opt: &QmpOption) -> io::Result<()> {
        match (&opt.address, opt.server) {
            (QmpAddress::Unix(path), true) => {
                let listener = bind_unix(path)?;
                self.spawn_acceptor(Acceptor::Unix(listener), Some(path.clone()), opt.wait)
            }
            (QmpAddress::Tcp { host, port }, true) => {
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                let listener = TcpListener::bind((host, *port))?;
                self.spawn_acceptor(Acceptor::Tcp(listener), None, opt.wait)
            }
            (QmpAddress::Unix(path), false) => self.serve_unix(UnixStream::connect(path)?),
            (QmpAddress::Tcp { host, port }, false) => {
                let host = if host.is_empty() { "localhost" } else { host };
                self.serve_tcp(TcpStream::connect((host, *port))?)
            }
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
            let _ = c
                .stream
                .set_write_timeout(Some(timeout.max(Duration::from_millis(1))));
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

    fn spawn_acceptor(
        &self,
        acceptor: Acceptor,
        unix_path: Option<PathBuf>,
        wait_first: bool,
    ) -> io::Result<()> {
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
            if let Some(path) = &unix_path {
                let _ = std::fs::remove_file(path);
            }
            return Err(io::Error::other("QMP server is closed"));
        }
        let server = self.clone();
        let thread = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || server.accept_loop(acceptor, wake_rx))?;
        listeners.push(Listening {
            waker,
            thread: Some(thread),
            unix_path,
        });
        Ok(())
    }

    fn accept_loop(&self, acceptor: Acceptor, wake: UnixStream) {
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

    fn serve(&self, stream: Stream) -> io::Result<()> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(io::Error::other("QMP server is closed"));
        }
        match &stream {
            Stream::Unix(s) => s.set_nonblocking(false)?,
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                // Every write is a whole message; waiting to coalesce only adds latency.
                s.set_nodelay(true)?;
            }
        }
        let max = inner.config.max_clients;
        if max > 0 && lock(&inner.hub.conns).len() >= max {
            refuse(&stream, max);
            return Err(io::Error::other("too many monitor clients"));
        }
        let session = Session::new(inner.shared.clone());
        let id = inner.hub.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            stream: stream.try_clone()?,
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                state: QueueState::Open,
            }),
            changed: Condvar::new(),
            command_mode: AtomicBool::new(false),
            max_pending: inner.config.max_pending_bytes,
        });
        conn.push_reply(session.greeting(), None);
        let reader = stream.try_clone()?;
        lock(&inner.hub.conns).insert(id, conn.clone());
        if inner.closed.load(Ordering::Acquire) {
            conn.begin_close();
        }

        let (wconn, hub) = (conn.clone(), inner.hub.clone());
        let writer = thread::Builder::new()
            .name(format!("qmp-conn{id}-wr"))
            .spawn(move || writer_loop(wconn, stream, hub));
        if let Err(e) = writer {
            conn.kill();
            inner.hub.remove(id);
            return Err(e);
        }
        let limits = inner.config.limits;
        let rconn = conn.clone();
        let spawned = thread::Builder::new()
            .name(format!("qmp-conn{id}-rd"))
            .spawn(move || reader_loop(rconn, reader, session, limits));
        if let Err(e) = spawned {
            // The writer cleans up once it sees the connection dead.
            conn.kill();
            return Err(e);
        }
        Ok(())
    }
}

/// Tells a client beyond [`ServerConfig::max_clients`] why it gets no greeting, without
/// waiting for it (a short write bound on the accept thread), and closes it.
fn refuse(stream: &Stream, max: usize) {
    let line = to_line(&json!({"error": {
        "class": "GenericError",
        "desc": format!("Too many monitor clients: at most {max} are served at once"),
    }}));
    let mut s = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = s.write_all(&line).and_then(|()| s.flush());
    let _ = stream.shutdown(Shutdown::Both);
}

fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    UnixListener::bind(path)
}

/// Reads the client's input and answers it, until EOF or error.
fn reader_loop(conn: Arc<Conn>, mut input: Stream, mut session: Session, limits: Limits) {
    let mut parser = JsonStream::new(limits);
    let mut buf = vec![0u8; 64 << 10];
    'read: loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for parsed in parser.feed(buf.get(..n).unwrap_or_default()) {
            let out = session.handle(parsed);
            let alive = conn.push_reply(out.line, out.after);
            if session.mode() != Mode::Negotiation {
                // After the reply is queued, so no event can precede it.
                conn.command_mode.store(true, Ordering::Release);
            }
            if !alive {
                break 'read;
            }
        }
    }
    // What the client sent last without finishing it is dropped, as QEMU does on close.
    conn.begin_close();
}

/// Writes the connection's queue to the socket until the connection closes.
fn writer_loop(conn: Arc<Conn>, mut out: Stream, hub: Arc<Hub>) {
    while let Some(item) = conn.next_item() {
        let written = out
            .write_all(item.payload.bytes())
            .and_then(|()| out.flush());
        if let Some(f) = item.after {
            spawn_detached(f);
        }
        if written.is_err() {
            break;
        }
    }
    let leftovers = {
        let mut q = lock(&conn.queue);
        q.state = QueueState::Dead;
        q.bytes = 0;
        conn.changed.notify_all();
        std::mem::take(&mut q.items)
    };
    for item in leftovers {
        if let Some(f) = item.after {
            spawn_detached(f);
        }
    }
    let _ = conn.stream.shutdown(Shutdown::Both);
    hub.remove(conn.id);
}
