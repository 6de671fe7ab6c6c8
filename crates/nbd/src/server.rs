//! The NBD server: exports of block nodes over unix or TCP sockets, fixed newstyle negotiation,
//! simple and structured replies, and the `base:allocation` and `qemu:dirty-bitmap:NAME` meta
//! contexts.
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

use crate::address::SocketAddress;
use crate::proto::{
    self, cflag, chunk, cmd, err, info, opt, rep, state, tflag, Cursor, ProtoError, Request,
};
use block::extension::NodeClaim;
use block::{BlockError, BlockNode};
use net::{Listener, Stream};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
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
        let id = inner.next_client.fetch_add(1, Ordering::SeqCst);
        let Ok(handle) = stream.try_clone() else {
            continue;
        };
        lock(&inner.clients).push((id, handle));
        inner.connections.fetch_add(1, Ordering::SeqCst);
        let server = NbdServer {
            inner: inner.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-client-{id}"))
            .spawn(move || {
                let r = serve_client(&server, id, stream);
                if let Err(e) = r {
                    if !server.inner.stopping.load(Ordering::SeqCst) {
                        log::warn!("nbd: client {id}: {e}");
                    }
                }
                lock(&server.inner.clients).retain(|(c, _)| *c != id);
                server.inner.connections.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            lock(&inner.clients).retain(|(c, _)| *c != id);
            inner.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// What a client negotiated before transmission.
#[derive(Default)]
struct Negotiated {
    structured: bool,
    no_zeroes: bool,
    /// Export the meta contexts were selected for, and the selection.
    meta_export: Option<String>,
    base_allocation: bool,
    dirty_bitmap: bool,
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
    let Some((export, neg)) = negotiate(server, &mut c)? else {
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
    let r = transmission(&export, &neg, &mut c);
    lock(&export.clients).retain(|(cid, _)| *cid != id);
    r
}

/// Fixed newstyle negotiation. `Ok(None)`: the client went away cleanly (ABORT, or it only
/// listed exports).
fn negotiate(
    server: &NbdServer,
    c: &mut Conn,
) -> Result<Option<(Arc<Export>, Negotiated)>, ProtoError> {
    c.put(&proto::NBDMAGIC.to_be_bytes())?;
    c.put(&proto::IHAVEOPT.to_be_bytes())?;
    c.put(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())?;
    c.flush()?;
    let cflags = proto::read_u32(&mut c.r, "client flags")?;
    if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::Protocol(format!(
            "Unknown client flags 0x{:x} received",
            cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        )));
    }
    let fixed = cflags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
    let mut neg = Negotiated {
        no_zeroes: cflags & proto::FLAG_C_NO_ZEROES != 0,
        ..Default::default()
    };
    loop {
        let magic = proto::read_u64(&mut c.r, "option magic")?;
        if magic != proto::IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                got: magic,
                expected: proto::IHAVEOPT,
            });
        }
        let option = proto::read_u32(&mut c.r, "option")?;
        let len = proto::read_u32(&mut c.r, "option length")?;
        if len > proto::MAX_OPTION_LENGTH {
            return Err(ProtoError::TooLong {
                what: "option payload",
                len: u64::from(len),
                limit: u64::from(proto::MAX_OPTION_LENGTH),
            });
        }
        let data = proto::read_vec(
            &mut c.r,
            u64::from(len),
            u64::from(proto::MAX_OPTION_LENGTH),
            "option payload",
        )?;
        if !fixed && option != opt::EXPORT_NAME {
            return Err(ProtoError::Protocol(format!(
                "Unsupported option {option} ({}) before fixed newstyle",
                opt::name(option)
            )));
        }
        let tls = lock(&server.inner.tls).clone();
        if let (Some((creds, authz)), false) = (&tls, c.tls) {
            // QEMU's rules before TLS: STARTTLS, or ABORT, or nothing.
            match option {
                opt::STARTTLS if !data.is_empty() => {
                    return Err(ProtoError::Protocol(
                        "option 'starttls' has unexpected length".into(),
                    ));
                }
                opt::STARTTLS => {
                    c.option_error(option, rep::ACK, "")?;
                    start_tls(server, c, creds, authz.as_deref())?;
                }
                opt::EXPORT_NAME => {
                    return Err(ProtoError::Protocol(format!(
                        "Option 0x{option:x} not permitted before TLS"
                    )));
                }
                _ => {
                    let _ = c.option_error(
                        option,
                        rep::ERR_TLS_REQD,
                        &format!("Option 0x{option:x} not permitted before TLS"),
                    );
                    if option == opt::ABORT {
                        return Ok(None);
                    }
                }
            }
            continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = server.find(&name) else {
                    return Err(ProtoError::Protocol(format!("export '{name}' not present")));
                };
                if neg.meta_export.as_deref() != Some(name.as_str()) {
                    neg.base_allocation = false;
                    neg.dirty_bitmap = false;
                }
                c.put(&export.size().to_be_bytes())?;
                c.put(&export.flags(neg.structured).to_be_bytes())?;
                if !neg.no_zeroes {
                    c.put(&[0u8; 124])?;
                }
                c.flush()?;
                return Ok(Some((export, neg)));
            }
            opt::ABORT => {
                // QEMU acknowledges, then closes; a client that already hung up is fine.
                let _ = c.option_error(option, rep::ACK, "");
                return Ok(None);
            }
            opt::LIST => {
                if !data.is_empty() {
                    c.option_error(
                        option,
                        rep::ERR_INVALID,
                        &format!("option '{}' has unexpected length", opt::name(option)),
                    )?;
                    continue;
                }
                for e in server.exports() {
                    let name = e.config.name.as_bytes();
                    let desc = e.config.description.as_deref().unwrap_or("").as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len() + desc.len());
                    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    d.extend_from_slice(name);
                    d.extend_from_slice(desc);
                    c.option_reply(option, rep::SERVER, &d)?;
                }
                c.option_error(option, rep::ACK, "")?;
            }
            opt::STARTTLS if !data.is_empty() => {
                c.option_error(
                    option,
                    rep::ERR_INVALID,
                    &format!("option '{}' has unexpected length", opt::name(option)),
                )?;
            }
            opt::STARTTLS if c.tls => {
                c.option_error(option, rep::ERR_INVALID, "TLS already enabled")?;
            }
            opt::STARTTLS => {
                c.option_error(option, rep::ERR_POLICY, "TLS not configured")?;
            }
            opt::INFO | opt::GO => match handle_info(server, c, option, &data, &mut neg)? {
                Some(export) if option == opt::GO => return Ok(Some((export, neg))),
                _ => {}
            },
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    c.option_error(
                        option,
                        rep::ERR_INVALID,
                        &format!("option '{}' has unexpected length", opt::name(option)),
                    )?;
                } else if neg.structured {
                    c.option_error(
                        option,
                        rep::ERR_INVALID,
                        "structured reply already negotiated",
                    )?;
                } else {
                    neg.structured = true;
                    c.option_error(option, rep::ACK, "")?;
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                handle_meta(server, c, option, &data, &mut neg)?;
            }
            _ => {
                c.option_error(
                    option,
                    rep::ERR_UNSUP,
                    &format!("Unsupported option {option} ({})", opt::name(option)),
                )?;
            }
        }
    }
}

/// After the ACK to `NBD_OPT_STARTTLS`: the TLS handshake (QEMU's server side), then the
/// connection continues inside the session.
fn start_tls(
    server: &NbdServer,
    c: &mut Conn,
    creds: &Arc<tls::TlsCreds>,
    authz: Option<&str>,
) -> Result<(), ProtoError> {
    if !c.r.buffer().is_empty() {
        return Err(ProtoError::Protocol(
            "the client sent data before the TLS handshake".into(),
        ));
    }
    let fail = |e: tls::TlsError| ProtoError::Protocol(e.to_string());
    let authz = match authz {
        Some(id) if creds.verify_peer() => {
            let objects = lock(&server.inner.objects)
                .clone()
                .unwrap_or_else(|| Arc::new(tls::Objects::new()));
            Some(objects.authz(id).map_err(fail)?)
        }
        _ => None,
    };
    let io = |source| ProtoError::Io {
        what: "socket",
        source,
    };
    let r = c.sock.try_clone().map_err(io)?;
    let w = c.sock.try_clone().map_err(io)?;
    let probe = c.sock.try_clone().map_err(io)?;
    let mut st = tls::accept(creds, authz, r, w).map_err(fail)?;
    let _ = st.writer.set_peer_probe(probe.as_fd());
    c.r = BufReader::with_capacity(256 << 10, Box::new(st.reader));
    c.w = BufWriter::with_capacity(256 << 10, Box::new(st.writer));
    c.tls = true;
    Ok(())
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`. Returns the export when the reply was `ACK`.
fn handle_info(
    server: &NbdServer,
    c: &mut Conn,
    option: u32,
    data: &[u8],
    neg: &mut Negotiated,
) -> Result<Option<Arc<Export>>, ProtoError> {
    let parsed = (|| -> Result<(String, Vec<u16>), ProtoError> {
        let mut cur = Cursor::new(data, "info request");
        let name = cur.string(proto::MAX_STRING_SIZE)?;
        let n = cur.u16()?;
        if cur.remaining() != usize::from(n) * 2 {
            return Err(ProtoError::Protocol(format!(
                "option '{}' has unexpected length",
                opt::name(option)
            )));
        }
        let mut reqs = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            reqs.push(cur.u16()?);
        }
        Ok((name, reqs))
    })();
    let (name, reqs) = match parsed {
        Ok(p) => p,
        Err(e) => {
            c.option_error(option, rep::ERR_INVALID, &e.to_string())?;
            return Ok(None);
        }
    };
    let Some(export) = server.find(&name) else {
        c.option_error(
            option,
            rep::ERR_UNKNOWN,
            &format!("export '{name}' not present"),
        )?;
        return Ok(None);
    };
    if reqs.contains(&info::NAME) {
        let mut d = info::NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        c.option_reply(option, rep::INFO, &d)?;
    }
    if reqs.contains(&info::DESCRIPTION) {
        if let Some(desc) = &export.config.description {
            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(desc.as_bytes());
            c.option_reply(option, rep::INFO, &d)?;
        }
    }
    // QEMU always sends block sizes: minimum 1 (any alignment works: the node handles
    // sub-sector requests), preferred 4096, maximum its buffer size.
    let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&4096u32.to_be_bytes());
    d.extend_from_slice(&proto::MAX_BUFFER_SIZE.to_be_bytes());
    c.option_reply(option, rep::INFO, &d)?;
    let mut d = info::EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&export.size().to_be_bytes());
    d.extend_from_slice(&export.flags(neg.structured).to_be_bytes());
    c.option_reply(option, rep::INFO, &d)?;
    c.option_error(option, rep::ACK, "")?;
    if option == opt::GO && neg.meta_export.as_deref() != Some(name.as_str()) {
        neg.base_allocation = false;
        neg.dirty_bitmap = false;
    }
    Ok(Some(export))
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
fn handle_meta(
    server: &NbdServer,
    c: &mut Conn,
    option: u32,
    data: &[u8],
    neg: &mut Negotiated,
) -> Result<(), ProtoError> {
    let set = option == opt::SET_META_CONTEXT;
    if !neg.structured {
        return c.option_error(
            option,
            rep::ERR_INVALID,
            &format!(
                "request option '{}' when structured reply is not negotiated",
                opt::name(option)
            ),
        );
    }
    let parsed = (|| -> Result<(String, Vec<String>), ProtoError> {
        let mut cur = Cursor::new(data, "meta context request");
        let name = cur.string(proto::MAX_STRING_SIZE)?;
        let n = cur.u32()?;
        if n > MAX_META_QUERIES {
            return Err(ProtoError::Protocol(format!(
                "too many meta context queries ({n})"
            )));
        }
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(cur.string(proto::MAX_STRING_SIZE)?);
        }
        if cur.remaining() != 0 {
            return Err(ProtoError::Protocol(format!(
                "option '{}' has unexpected length",
                opt::name(option)
            )));
        }
        Ok((name, queries))
    })();
    let (name, queries) = match parsed {
        Ok(p) => p,
        Err(e) => return c.option_error(option, rep::ERR_INVALID, &e.to_string()),
    };
    let Some(export) = server.find(&name) else {
        return c.option_error(
            option,
            rep::ERR_UNKNOWN,
            &format!("export '{name}' not present"),
        );
    };
    let bitmap_ctx = export.bitmap_context();
    let mut base = false;
    let mut bitmap = false;
    if queries.is_empty() {
        // An empty query list: LIST shows everything; SET selects nothing.
        if !set {
            base = true;
            bitmap = bitmap_ctx.is_some();
        }
    }
    for q in &queries {
        if q == proto::CONTEXT_BASE_ALLOCATION || (!set && q == "base:") {
            base = true;
        }
        if let Some(ctx) = &bitmap_ctx {
            let listed_prefix = !set && (q == "qemu:" || q == proto::CONTEXT_DIRTY_BITMAP_PREFIX);
            if q == ctx || listed_prefix {
                bitmap = true;
            }
        }
    }
    if base {
        let mut d = META_ID_BASE_ALLOCATION.to_be_bytes().to_vec();
        d.extend_from_slice(proto::CONTEXT_BASE_ALLOCATION.as_bytes());
        c.option_reply(option, rep::META_CONTEXT, &d)?;
    }
    if let (true, Some(ctx)) = (bitmap, &bitmap_ctx) {
        let mut d = META_ID_DIRTY_BITMAP.to_be_bytes().to_vec();
        d.extend_from_slice(ctx.as_bytes());
        c.option_reply(option, rep::META_CONTEXT, &d)?;
    }
    if set {
        neg.meta_export = Some(name);
        neg.base_allocation = base;
        neg.dirty_bitmap = bitmap;
    }
    c.option_error(option, rep::ACK, "")
}

/// A request's failure: the NBD error and the message a structured reply carries.
struct ReqError {
    code: u32,
    msg: String,
}

impl ReqError {
    fn new(code: u32, msg: impl Into<String>) -> Self {
        ReqError {
            code,
            msg: msg.into(),
        }
    }
    fn block(e: &BlockError) -> Self {
        let code = match e {
            BlockError::Io(errno) => proto::errno_to_nbd(*errno as i32),
            BlockError::ReadOnlyNode => err::EPERM,
            _ => err::EINVAL,
        };
        ReqError::new(code, e.to_string())
    }
}

fn transmission(export: &Export, neg: &Negotiated, c: &mut Conn) -> Result<(), ProtoError> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let req = match Request::read(&mut c.r) {
            Ok(r) => r,
            // A client that closes its socket between requests is done, not broken.
            Err(ProtoError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        if req.kind == cmd::DISC {
            return Ok(());
        }
        // A write's payload follows its header whatever we think of the request: read it
        // first so the stream stays in step (an oversized one is skipped, then refused).
        if req.kind == cmd::WRITE {
            if req.len > proto::MAX_BUFFER_SIZE {
                proto::skip(&mut c.r, u64::from(req.len), "write payload")?;
                send_error(
                    c,
                    neg,
                    &req,
                    ReqError::new(
                        err::EINVAL,
                        format!(
                            "len ({}) is larger than max len ({})",
                            req.len,
                            proto::MAX_BUFFER_SIZE
                        ),
                    ),
                )?;
                continue;
            }
            buf.resize(req.len as usize, 0);
            proto::read_exact(&mut c.r, &mut buf, "write payload")?;
        }
        match handle_request(export, neg, c, &req, &mut buf) {
            Ok(()) => {}
            Err(Handled::Proto(e)) => return Err(e),
            Err(Handled::Req(e)) => send_error(c, neg, &req, e)?,
        }
        c.flush()?;
        if export.removed.load(Ordering::SeqCst) {
            return Ok(());
        }
    }
}

enum Handled {
    Proto(ProtoError),
    Req(ReqError),
}

impl From<ProtoError> for Handled {
    fn from(e: ProtoError) -> Self {
        Handled::Proto(e)
    }
}
impl From<ReqError> for Handled {
    fn from(e: ReqError) -> Self {
        Handled::Req(e)
    }
}

fn send_error(
    c: &mut Conn,
    neg: &Negotiated,
    req: &Request,
    e: ReqError,
) -> Result<(), ProtoError> {
    if neg.structured {
        let msg = e.msg.as_bytes();
        let msg = msg.get(..msg.len().min(4096)).unwrap_or_default();
        let len = 6 + msg.len() as u32;
        c.put(&proto::chunk_header(
            chunk::FLAG_DONE,
            chunk::ERROR,
            req.handle,
            len,
        ))?;
        c.put(&e.code.to_be_bytes())?;
        c.put(&(msg.len() as u16).to_be_bytes())?;
        c.put(msg)?;
    } else {
        c.put(&proto::simple_reply(e.code, req.handle))?;
    }
    c.flush()
}

fn check_bounds(export: &Export, req: &Request) -> Result<(), ReqError> {
    let size = export.size();
    let end = req.offset.checked_add(u64::from(req.len)).ok_or_else(|| {
        ReqError::new(
            err::EINVAL,
            "integer overflow detected, you're probably being attacked",
        )
    })?;
    if req.offset > size || end > size {
        let code = if matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES) {
            err::ENOSPC
        } else {
            err::EINVAL
        };
        return Err(ReqError::new(
            code,
            format!(
                "operation past EOF; From: {}, Len: {}, Size: {size}",
                req.offset, req.len
            ),
        ));
    }
    Ok(())
}

fn handle_request(
    export: &Export,
    neg: &Negotiated,
    c: &mut Conn,
    req: &Request,
    buf: &mut Vec<u8>,
) -> Result<(), Handled> {
    let mut valid = cflag::FUA;
    match req.kind {
        cmd::READ if neg.structured => valid |= cflag::DF,
        cmd::WRITE_ZEROES => valid |= cflag::NO_HOLE,
        cmd::BLOCK_STATUS => valid |= cflag::REQ_ONE,
        cmd::READ | cmd::WRITE | cmd::FLUSH | cmd::TRIM | cmd::CACHE => {}
        other => {
            return Err(ReqError::new(
                err::EINVAL,
                format!("invalid request type ({other}) received"),
            )
            .into())
        }
    }
    if req.kind == cmd::READ && req.len > proto::MAX_BUFFER_SIZE {
        return Err(ReqError::new(
            err::EINVAL,
            format!(
                "len ({}) is larger than max len ({})",
                req.len,
                proto::MAX_BUFFER_SIZE
            ),
        )
        .into());
    }
    if !export.config.writable && matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM) {
        return Err(ReqError::new(err::EPERM, "Export is read-only").into());
    }
    if req.kind != cmd::FLUSH {
        check_bounds(export, req)?;
    }
    if req.flags & !valid != 0 {
        return Err(ReqError::new(
            err::EINVAL,
            format!(
                "unsupported flags for command {} (got 0x{:x})",
                cmd::name(req.kind),
                req.flags
            ),
        )
        .into());
    }
    let node = &export.node;
    let fua = |r: Result<(), BlockError>| -> Result<(), ReqError> {
        r.map_err(|e| ReqError::block(&e))?;
        if req.flags & cflag::FUA != 0 {
            node.flush().map_err(|e| ReqError::block(&e))?;
        }
        Ok(())
    };
    match req.kind {
        cmd::READ => {
            buf.resize(req.len as usize, 0);
            node.read_at(req.offset, buf)
                .map_err(|e| ReqError::block(&e))?;
            if neg.structured {
                if req.len == 0 {
                    c.put(&proto::chunk_header(
                        chunk::FLAG_DONE,
                        chunk::NONE,
                        req.handle,
                        0,
                    ))?;
                } else {
                    c.put(&proto::chunk_header(
                        chunk::FLAG_DONE,
                        chunk::OFFSET_DATA,
                        req.handle,
                        req.len + 8,
                    ))?;
                    c.put(&req.offset.to_be_bytes())?;
                    c.put(buf)?;
                }
            } else {
                c.put(&proto::simple_reply(0, req.handle))?;
                c.put(buf)?;
            }
            return Ok(());
        }
        cmd::WRITE => fua(node.write_at(req.offset, buf))?,
        cmd::WRITE_ZEROES => fua(node.write_zeroes(
            req.offset,
            u64::from(req.len),
            req.flags & cflag::NO_HOLE == 0,
        ))?,
        cmd::TRIM => fua(node.discard(req.offset, u64::from(req.len)))?,
        cmd::FLUSH => node.flush().map_err(|e| ReqError::block(&e))?,
        cmd::CACHE => {}
        cmd::BLOCK_STATUS => return block_status(export, neg, c, req),
        _ => {}
    }
    ok_reply(c, neg, req)?;
    Ok(())
}

fn ok_reply(c: &mut Conn, neg: &Negotiated, req: &Request) -> Result<(), ProtoError> {
    if neg.structured {
        c.put(&proto::chunk_header(
            chunk::FLAG_DONE,
            chunk::NONE,
            req.handle,
            0,
        ))
    } else {
        c.put(&proto::simple_reply(0, req.handle))
    }
}

fn block_status(
    export: &Export,
    neg: &Negotiated,
    c: &mut Conn,
    req: &Request,
) -> Result<(), Handled> {
    if !neg.structured || !(neg.base_allocation || neg.dirty_bitmap) {
        return Err(ReqError::new(err::EINVAL, "CMD_BLOCK_STATUS not negotiated").into());
    }
    if req.len == 0 {
        return Err(ReqError::new(err::EINVAL, "need non-zero length").into());
    }
    let one = req.flags & cflag::REQ_ONE != 0;
    let mut contexts: Vec<(u32, Vec<(u32, u32)>)> = Vec::new();
    if neg.base_allocation {
        // The block layer does not report allocation: everything reads as data.
        contexts.push((META_ID_BASE_ALLOCATION, vec![(req.len, 0)]));
    }
    if neg.dirty_bitmap {
        let extents = bitmap_extents(export, req.offset, req.len, one)?;
        contexts.push((META_ID_DIRTY_BITMAP, extents));
    }
    let n = contexts.len();
    for (i, (id, extents)) in contexts.into_iter().enumerate() {
        let flags = if i + 1 == n { chunk::FLAG_DONE } else { 0 };
        let len = 4 + 8 * extents.len() as u32;
        c.put(&proto::chunk_header(
            flags,
            chunk::BLOCK_STATUS,
            req.handle,
            len,
        ))?;
        let mut d = Vec::with_capacity(len as usize);
        d.extend_from_slice(&id.to_be_bytes());
        for (l, f) in extents {
            d.extend_from_slice(&l.to_be_bytes());
            d.extend_from_slice(&f.to_be_bytes());
        }
        c.put(&d)?;
    }
    Ok(())
}

/// Dirty and clean runs of the exported bitmap over `[offset, offset+len)`.
fn bitmap_extents(
    export: &Export,
    offset: u64,
    len: u32,
    one: bool,
) -> Result<Vec<(u32, u32)>, ReqError> {
    let name = export
        .config
        .bitmap
        .as_deref()
        .ok_or_else(|| ReqError::new(err::EINVAL, "no bitmap exported"))?;
    let l = export.bitmap_owner().bitmaps();
    let bm = l
        .find(name)
        .ok_or_else(|| ReqError::new(err::EIO, format!("Bitmap '{name}' is not found")))?;
    let hb = bm.hbitmap();
    let end = (offset + u64::from(len)).min(hb.orig_size());
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let (dirty, run) = hb
            .status(pos, end - pos)
            .map_err(|e| ReqError::new(err::EIO, e.to_string()))?;
        let run = run.clamp(1, end - pos) as u32;
        let flags = if dirty { state::DIRTY } else { 0 };
        match out.last_mut() {
            Some((l, f)) if *f == flags => *l += run,
            _ => out.push((run, flags)),
        }
        pos += u64::from(run);
        if one || out.len() >= MAX_EXTENTS {
            break;
        }
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    Ok(out)
}
