//! The NBD server: exports of block nodes over unix or TCP sockets, fixed newstyle negotiation,
//! simple and structured replies, and the `base:allocation` and `qemu:dirty-bitmap:NAME` meta
//! contexts.
//!
//! # Rooms
//!
//! This module holds the exports (`nbd-server-add`, `block-export-*`: configuration, checks,
//! claims), the listener and each client's connection; `negotiation` the handshake and the
//! options up to the chosen export; `transmission` the requests after it.
//!
//! # Threads
//!
//! One thread accepts connections; each client gets a thread of its own that negotiates and
//! then serves requests one at a time. Client threads hold an `Arc` of their export and call
//! the node's request functions, which take the node's state lock only briefly; no lock of
//! this module is held across socket or disk I/O (the export list is copied out first).
//!
//! # Untrusted input
//!
//! Everything a client sends is checked before use: option and request lengths against
//! [`proto::MAX_OPTION_LENGTH`] and [`proto::MAX_BUFFER_SIZE`], offsets and lengths against
//! the export's size (with overflow checks), flags against what the command allows. A client
//! that breaks the framing (bad magic, a payload it announced but did not send) is
//! disconnected; one that asks for something invalid gets QEMU's error reply.

mod negotiation;
mod transmission;

use crate::address::SocketAddress;
use crate::proto::{self, tflag, ProtoError};
use block::extension::NodeClaim;
use block::{BlockError, BlockNode};
use net::{Listener, Stream};
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

/// Context id of `base:allocation` (QEMU's `NBD_META_ID_BASE_ALLOCATION`).
const META_ID_BASE_ALLOCATION: u32 = 0;
/// Context id of the export's dirty bitmap (QEMU's `NBD_META_ID_DIRTY_BITMAP`).
const META_ID_DIRTY_BITMAP: u32 = 2;
/// Most extents one `BLOCK_STATUS` chunk carries (bounds the reply a client can ask for).
const MAX_EXTENTS: usize = 1 << 16;
/// Most queries one `*_META_CONTEXT` option may carry.
const MAX_META_QUERIES: u32 = 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What `nbd-server-add` / `block-export-add` was asked for.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// The block export id (`nbd-server-remove` and `block-export-del` name it); for
    /// `nbd-server-add` the export name.
    pub id: String,
    /// The name clients ask for.
    pub name: String,
    /// Free text sent as `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Whether clients may write.
    pub writable: bool,
    /// A dirty bitmap exported as `qemu:dirty-bitmap:<name>`.
    pub bitmap: Option<String>,
    /// The node that holds `bitmap`, when it was named (`{"node": N, "name": B}`); `None`: the
    /// exported node. A bitmap named by node may be any node's, and may be enabled on a
    /// read-only export (QEMU 7.2 checks neither for that form).
    pub bitmap_node: Option<Arc<BlockNode>>,
}

/// Why an export or a server operation was refused. Texts are QEMU 7.2's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// `nbd-server-add` without a running server.
    #[error("NBD server not running")]
    NotRunning,
    /// `nbd-server-start` twice.
    #[error("NBD server already running")]
    AlreadyRunning,
    /// Two exports of one name.
    #[error("NBD server already has export named '{0}'")]
    Duplicate(String),
    /// An id that is not a well-formed QEMU id.
    #[error("Invalid block export id")]
    InvalidId,
    /// Two exports of one id.
    #[error("Block export id '{0}' is already in use")]
    IdInUse(String),
    /// A name longer than 4096 bytes.
    #[error("export name '{0}' too long")]
    NameTooLong(String),
    /// A description longer than 4096 bytes.
    #[error("description '{0}' too long")]
    DescriptionTooLong(String),
    /// The bitmap does not exist on the node.
    #[error("Bitmap '{0}' is not found")]
    BitmapNotFound(String),
    /// An enabled bitmap on a read-only export (its contents would change under the client).
    #[error("Enabled bitmap '{0}' incompatible with readonly export")]
    EnabledBitmapReadonly(String),
    /// `nbd-server-remove` of an unknown export.
    #[error("Export '{0}' is not found")]
    NotFound(String),
    /// `nbd-server-remove` mode `safe` with clients connected.
    #[error("export '{0}' still in use")]
    InUse(String),
    /// A block layer refusal (read-only node, busy bitmap, ...).
    #[error("{0}")]
    Block(#[from] BlockError),
    /// The socket could not be set up.
    #[error("{0}")]
    Socket(String),
}

impl ExportError {
    /// The hint QEMU appends for human users.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            ExportError::InUse(_) => Some("Use mode='hard' to force client disconnect"),
            _ => None,
        }
    }
}

/// One exported node.
pub struct Export {
    config: ExportConfig,
    node: Arc<BlockNode>,
    /// Connected clients: id and a handle to shut their socket down.
    clients: Mutex<Vec<(u64, Stream)>>,
    removed: AtomicBool,
    _claim: NodeClaim,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("config", &self.config)
            .field("node", &self.node.name())
            .finish()
    }
}

impl Export {
    /// The export's configuration.
    pub fn config(&self) -> &ExportConfig {
        &self.config
    }
    /// The exported node.
    pub fn node(&self) -> &Arc<BlockNode> {
        &self.node
    }
    /// Number of clients connected to this export.
    pub fn client_count(&self) -> usize {
        lock(&self.clients).len()
    }

    fn size(&self) -> u64 {
        self.node.size().unwrap_or(0)
    }

    /// QEMU 7.2's transmission flags for this export.
    fn flags(&self, structured: bool) -> u16 {
        let mut f = tflag::HAS_FLAGS | tflag::SEND_FLUSH | tflag::SEND_FUA | tflag::SEND_CACHE;
        if self.config.writable {
            f |= tflag::SEND_WRITE_ZEROES | tflag::SEND_TRIM;
        } else {
            f |= tflag::READ_ONLY | tflag::CAN_MULTI_CONN;
        }
        if structured {
            f |= tflag::SEND_DF;
        }
        f
    }

    fn bitmap_context(&self) -> Option<String> {
        self.config
            .bitmap
            .as_ref()
            .map(|b| format!("{}{b}", proto::CONTEXT_DIRTY_BITMAP_PREFIX))
    }

    /// The node holding the exported bitmap.
    fn bitmap_owner(&self) -> &Arc<BlockNode> {
        self.config.bitmap_node.as_ref().unwrap_or(&self.node)
    }

    fn release(&self) {
        if let Some(b) = &self.config.bitmap {
            self.bitmap_owner().with_bitmaps(|l| {
                if let Some(bm) = l.find_mut(b) {
                    bm.set_busy(false);
                }
            });
        }
    }
}

struct Running {
    addr: SocketAddress,
    listener: Arc<Listener>,
    accept_thread: Option<JoinHandle<()>>,
    max_connections: u32,
}

struct Inner {
    exports: Mutex<Vec<Arc<Export>>>,
    running: Mutex<Option<Running>>,
    connections: AtomicU64,
    next_client: AtomicU64,
    stopping: AtomicBool,
    /// All connected clients, for `nbd-server-stop`.
    clients: Mutex<Vec<(u64, Stream)>>,
    /// Where `tls-creds` and `tls-authz` are looked up.
    objects: Mutex<Option<Arc<tls::Objects>>>,
    /// TLS for the running server: credentials, and the `tls-authz` id.
    tls: Mutex<Option<(Arc<tls::TlsCreds>, Option<String>)>>,
}

/// The process's NBD server (QEMU has one: `nbd-server-start` / `nbd-server-stop`), with its
/// exports.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl Default for NbdServer {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("running", &self.is_running())
            .finish()
    }
}

impl NbdServer {
    /// A server that is not listening yet.
    pub fn new() -> Self {
        NbdServer {
            inner: Arc::new(Inner {
                exports: Mutex::new(Vec::new()),
                running: Mutex::new(None),
                connections: AtomicU64::new(0),
                next_client: AtomicU64::new(1),
                stopping: AtomicBool::new(false),
                clients: Mutex::new(Vec::new()),
                objects: Mutex::new(None),
                tls: Mutex::new(None),
            }),
        }
    }

    /// Whether the server is listening.
    pub fn is_running(&self) -> bool {
        lock(&self.inner.running).is_some()
    }

    /// The address the server listens on (a TCP port `0` replaced by the bound port).
    pub fn address(&self) -> Option<SocketAddress> {
        lock(&self.inner.running).as_ref().map(|r| r.addr.clone())
    }

    /// Gives the server the objects its `tls-creds` and `tls-authz` name.
    pub fn set_tls_objects(&self, objects: Arc<tls::Objects>) {
        *lock(&self.inner.objects) = Some(objects);
    }

    /// `nbd-server-start`: listens on `addr` and serves clients, `max_connections` at once
    /// (`0`: no limit).
    pub fn start(&self, addr: &SocketAddress, max_connections: u32) -> Result<(), ExportError> {
        self.start_with_tls(addr, max_connections, None, None)
    }

    /// `nbd-server-start` with `tls-creds` (server credentials: every client must start TLS
    /// with `NBD_OPT_STARTTLS` before any other option) and `tls-authz` (checked against the
    /// client certificate's distinguished name at each handshake).
    pub fn start_with_tls(
        &self,
        addr: &SocketAddress,
        max_connections: u32,
        tls_creds: Option<&str>,
        tls_authz: Option<&str>,
    ) -> Result<(), ExportError> {
        let mut running = lock(&self.inner.running);
        if running.is_some() {
            return Err(ExportError::AlreadyRunning);
        }
        let tls = match tls_creds {
            None => None,
            Some(id) => {
                let objects = lock(&self.inner.objects)
                    .clone()
                    .unwrap_or_else(|| Arc::new(tls::Objects::new()));
                let creds = objects
                    .tls_creds(id, tls::Endpoint::Server)
                    .map_err(|e| ExportError::Socket(e.to_string()))?;
                Some((creds, tls_authz.map(str::to_string)))
            }
        };
        *lock(&self.inner.tls) = tls;
        let listener = Arc::new(addr.listen().map_err(|e| {
            ExportError::Socket(match addr {
                SocketAddress::Unix(p) => {
                    format!("Failed to bind socket to {}: {e}", p.display())
                }
                SocketAddress::Inet { host, port } => {
                    format!("Failed to bind socket on {host}:{port}: {e}")
                }
            })
        })?);
        let mut bound = addr.clone();
        if let (SocketAddress::Inet { port, .. }, Some(p)) = (&mut bound, listener.local_port()) {
            *port = p.to_string();
        }
        self.inner.stopping.store(false, Ordering::SeqCst);
        let inner = self.inner.clone();
        let l = listener.clone();
        let accept_thread = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(inner, l, max_connections))
            .map_err(|e| ExportError::Socket(e.to_string()))?;
        *running = Some(Running {
            addr: bound,
            listener,
            accept_thread: Some(accept_thread),
            max_connections,
        });
        Ok(())
    }

    /// `nbd-server-stop`: removes every export (disconnecting their clients), disconnects
    /// clients still negotiating, and stops listening.
    pub fn stop(&self) -> Result<(), ExportError> {
        let Some(mut r) = lock(&self.inner.running).take() else {
            return Err(ExportError::NotRunning);
        };
        self.inner.stopping.store(true, Ordering::SeqCst);
        r.listener.shutdown();
        if let Some(t) = r.accept_thread.take() {
            let _ = t.join();
        }
        let exports: Vec<Arc<Export>> = std::mem::take(&mut *lock(&self.inner.exports));
        for e in exports {
            e.removed.store(true, Ordering::SeqCst);
            for (_, s) in lock(&e.clients).iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            e.release();
        }
        for (_, s) in lock(&self.inner.clients).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = r.max_connections;
        Ok(())
    }

    /// `nbd-server-add`: exports `node` under `config.name`. The node is activated first (an
    /// export on an incoming migration's destination is how storage is migrated without
    /// shared storage, so it must accept writes before the hand-over). A bitmap is marked busy
    /// while exported; a read-only export refuses an enabled bitmap.
    pub fn add(&self, node: Arc<BlockNode>, config: ExportConfig) -> Result<(), ExportError> {
        let mut exports = lock(&self.inner.exports);
        self.check_new(&exports, &config)?;
        if config.writable && !node.writable() {
            return Err(ExportError::Block(BlockError::ReadOnlyNode));
        }
        activate_tree(&node)?;
        if let Some(b) = &config.bitmap {
            let owner = config.bitmap_node.as_ref().unwrap_or(&node);
            let by_node = config.bitmap_node.is_some();
            let writable_node = owner.writable();
            owner.with_bitmaps(|l| -> Result<(), ExportError> {
                let bm = l.find_mut(b).ok_or_else(|| {
                    if by_node {
                        ExportError::Block(BlockError::BitmapNotFound(b.clone()))
                    } else {
                        ExportError::BitmapNotFound(b.clone())
                    }
                })?;
                bm.check(block::BitmapCheck::ALLOW_RO)?;
                if !by_node && !config.writable && writable_node && bm.enabled() {
                    return Err(ExportError::EnabledBitmapReadonly(b.clone()));
                }
                bm.set_busy(true);
                Ok(())
            })?;
        }
        let claim = NodeClaim::new(
            &node,
            &format!("NBD export '{}'", config.name),
            config.writable,
            BlockError::NodeInUse(node.name().to_string()),
        );
        exports.push(Arc::new(Export {
            config,
            node,
            clients: Mutex::new(Vec::new()),
            removed: AtomicBool::new(false),
            _claim: claim,
        }));
        Ok(())
    }

    /// The checks QEMU makes on a new export before it looks at its node and bitmap: the
    /// server runs, the name and description fit, the id is well formed and unused, the name
    /// is unused. [`NbdServer::add`] makes them too; a caller that must resolve something
    /// itself (a bitmap's node) calls this first to fail in QEMU's order.
    pub fn check_export(&self, config: &ExportConfig) -> Result<(), ExportError> {
        self.check_new(&lock(&self.inner.exports), config)
    }

    fn check_new(&self, exports: &[Arc<Export>], config: &ExportConfig) -> Result<(), ExportError> {
        if !self.is_running() {
            return Err(ExportError::NotRunning);
        }
        if config.name.len() > proto::MAX_STRING_SIZE as usize {
            return Err(ExportError::NameTooLong(config.name.clone()));
        }
        if let Some(d) = &config.description {
            if d.len() > proto::MAX_STRING_SIZE as usize {
                return Err(ExportError::DescriptionTooLong(d.clone()));
            }
        }
        if !block::options::id_wellformed(&config.id) {
            return Err(ExportError::InvalidId);
        }
        if exports.iter().any(|e| e.config.id == config.id) {
            return Err(ExportError::IdInUse(config.id.clone()));
        }
        if exports.iter().any(|e| e.config.name == config.name) {
            return Err(ExportError::Duplicate(config.name.clone()));
        }
        Ok(())
    }

    /// `nbd-server-remove` / `block-export-del`: `hard` disconnects clients; otherwise an
    /// export with clients is refused.
    pub fn remove(&self, id: &str, hard: bool) -> Result<(), ExportError> {
        let name = id;
        let e = {
            let mut exports = lock(&self.inner.exports);
            let i = exports
                .iter()
                .position(|e| e.config.id == id)
                .ok_or_else(|| ExportError::NotFound(name.to_string()))?;
            let busy = exports.get(i).is_some_and(|e| e.client_count() > 0);
            if busy && !hard {
                return Err(ExportError::InUse(name.to_string()));
            }
            exports.remove(i)
        };
        e.removed.store(true, Ordering::SeqCst);
        for (_, s) in lock(&e.clients).iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        e.release();
        Ok(())
    }

    /// The exports, newest first (the order QEMU lists them in).
    pub fn exports(&self) -> Vec<Arc<Export>> {
        lock(&self.inner.exports).iter().rev().cloned().collect()
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.inner.exports)
            .iter()
            .find(|e| e.config.name == name)
            .cloned()
    }
}

/// Activates `node` and, first, the nodes under it (QEMU's `bdrv_activate` recurses into
/// children before the parent).
fn activate_tree(node: &Arc<BlockNode>) -> Result<(), BlockError> {
    for (_, child) in node.driver().children() {
        activate_tree(&child)?;
    }
    node.activate()
}

fn accept_loop(inner: Arc<Inner>, listener: Arc<Listener>, max_connections: u32) {
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if inner.stopping.load(Ordering::SeqCst) {
                    return;
                }
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                // EMFILE and friends: wait a little rather than spin.
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        };
        if inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        if max_connections > 0
            && inner.connections.load(Ordering::SeqCst) >= u64::from(max_connections)
        {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            continue;
        }
        inner.connections.fetch_add(1, Ordering::SeqCst);
        let server = NbdServer {
            inner: inner.clone(),
        };
        let id = inner.next_client.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-client-{id}"))
            .spawn(move || {
                if let Err(e) = server.serve_as(id, stream) {
                    if !server.inner.stopping.load(Ordering::SeqCst) {
                        log::warn!("nbd: client {id}: {e}");
                    }
                }
                server.inner.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            inner.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl NbdServer {
    /// Serves one client already connected on `stream`: the handshake, the options, then its
    /// requests one at a time, until it disconnects or breaks the protocol (the error says
    /// how). Returns when the client is done; `nbd-server-stop` and the hard removal of the
    /// export it uses shut its socket down, which ends the call too. The listener runs this on
    /// a thread per connection; a caller that accepts or is handed connections of its own
    /// (an inherited socket, one end of a socket pair) serves them the same way, on a thread
    /// it chooses. Nothing is left open when it returns.
    pub fn serve(&self, stream: Stream) -> Result<(), ProtoError> {
        let id = self.inner.next_client.fetch_add(1, Ordering::SeqCst);
        self.serve_as(id, stream)
    }

    /// [`NbdServer::serve`] for client `id`: registered, so that `nbd-server-stop` can shut
    /// it down, while it is served.
    fn serve_as(&self, id: u64, stream: Stream) -> Result<(), ProtoError> {
        let handle = stream.try_clone().map_err(|source| ProtoError::Io {
            what: "socket",
            source,
        })?;
        lock(&self.inner.clients).push((id, handle));
        // Registered before looking: an `nbd-server-stop` that raced the registration either
        // is seen here or finds this client in the list and shuts it down.
        let r = if self.inner.stopping.load(Ordering::SeqCst) {
            Ok(())
        } else {
            serve_client(self, id, stream)
        };
        lock(&self.inner.clients).retain(|(c, _)| *c != id);
        r
    }
}

struct Conn {
    r: BufReader<Box<dyn Read + Send>>,
    w: BufWriter<Box<dyn Write + Send>>,
    /// The socket itself, for shutting the client down from other threads.
    sock: Stream,
    /// Whether the connection runs inside TLS.
    tls: bool,
}

impl Conn {
    fn flush(&mut self) -> Result<(), ProtoError> {
        self.w.flush().map_err(|source| ProtoError::Io {
            what: "reply",
            source,
        })
    }
    fn put(&mut self, b: &[u8]) -> Result<(), ProtoError> {
        proto::write_all(&mut self.w, b, "reply")
    }
    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Result<(), ProtoError> {
        let len = u32::try_from(data.len())
            .map_err(|_| ProtoError::Protocol("option reply too long".into()))?;
        self.put(&proto::option_reply_header(option, kind, len))?;
        self.put(data)
    }
    fn option_error(&mut self, option: u32, kind: u32, msg: &str) -> Result<(), ProtoError> {
        self.option_reply(option, kind, msg.as_bytes())?;
        self.flush()
    }
}

fn serve_client(server: &NbdServer, id: u64, stream: Stream) -> Result<(), ProtoError> {
    let rs = stream.try_clone().map_err(|source| ProtoError::Io {
        what: "socket",
        source,
    })?;
    let sock = stream.try_clone().map_err(|source| ProtoError::Io {
        what: "socket",
        source,
    })?;
    let mut c = Conn {
        r: BufReader::with_capacity(256 << 10, Box::new(rs)),
        w: BufWriter::with_capacity(256 << 10, Box::new(stream)),
        sock,
        tls: false,
    };
    let Some((export, neg)) = negotiation::negotiate(server, &mut c)? else {
        return Ok(());
    };
    let handle = c.sock.try_clone().map_err(|source| ProtoError::Io {
        what: "socket",
        source,
    })?;
    {
        let mut clients = lock(&export.clients);
        if export.removed.load(Ordering::SeqCst) {
            return Ok(());
        }
        clients.push((id, handle));
    }
    let r = transmission::transmission(&export, &neg, &mut c);
    lock(&export.clients).retain(|(cid, _)| *cid != id);
    r
}
