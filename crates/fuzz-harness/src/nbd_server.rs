//! The NBD server against a client that sends arbitrary bytes: `nbd::NbdServer::serve` on one
//! end of a socket pair, the input written into the other — the handshake, options (`LIST`,
//! `INFO`, `GO`, `EXPORT_NAME`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`, `SET_META_CONTEXT`,
//! `STARTTLS` without TLS configured, `ABORT`, unknown ones), then requests (read, write,
//! write-zeroes, trim, flush, cache, block status of `base:allocation` and
//! `qemu:dirty-bitmap:NAME`, disconnect, unknown ones).
//!
//! The server (started once per process on a loopback port nobody connects to, since exports
//! need a running server) has two exports of 1 MiB raw files in memory (`/dev/shm` where there
//! is one; unlinked once open):
//! - `node0`, writable, with a description and the enabled bitmap `b0` (64 KiB granules);
//! - `ro`, read-only, with the disabled bitmap `b1` (4 KiB granules).
//!
//! Both are put back to their first contents and bitmaps before each input. The input is
//! exactly what a client sends, so recorded sessions of QEMU's tools are seeds as they are.
//! Each input is also served by a second server, started with `tls-creds` (a PSK) and no
//! export, which must refuse every option before `STARTTLS` as QEMU's does (`ERR_TLS_REQD`;
//! `EXPORT_NAME` and a malformed `STARTTLS` end the session; `STARTTLS` is acknowledged, and
//! the handshake the input cannot complete ends it).
//!
//! Afterwards the harness decodes both directions on its own (it does not reuse the server's
//! parsing) and checks:
//! - the server ends within [`TIME_BOUND`] of the input's end, leaves no thread and no
//!   descriptor of the connection open;
//! - every option gets its replies, each echoing the option, ending with `ACK` or an error;
//!   the contents of `LIST`, `INFO`/`GO` and the meta-context replies are the exports', and
//!   `GO`/`EXPORT_NAME` of an export enters transmission with its size and flags;
//! - the server disconnects only where the client broke the framing (bad magic, a payload cut
//!   short, an option too long, an unknown export by `EXPORT_NAME`, no fixed newstyle, a write
//!   over the maximum buffer size, after its error reply), asked to (`ABORT`, `DISC`), or
//!   ended;
//! - every request gets one reply with its handle, simple or structured as negotiated; a
//!   request outside the export, with flags its command does not take, of an unknown type,
//!   writing to the read-only export, or a block status nothing was negotiated for fails;
//!   every other request succeeds;
//! - what is read is what a model of the disk holds (its first contents, then every write and
//!   write-zeroes acknowledged; trimmed bytes may read as anything), and so is the disk after
//!   the run; block status lists every negotiated context once, its extents tile the request
//!   (one with `REQ_ONE`) and agree with a model of the bitmap (granules written are dirty).

use block::{BlockLayer, BlockNode};
use nbd::proto::{
    self, cflag, chunk, cmd, info, opt, rep, tflag, IHAVEOPT, NBDMAGIC, REP_MAGIC, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use nbd::{ExportConfig, NbdServer, SocketAddress};
use nix::sys::socket::{send, MsgFlags};
use serde_json::json;
use std::io::Read;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Size of both exports.
pub const SIZE: u64 = 1 << 20;
/// Granularity of `b0` (the writable export's bitmap).
pub const B0_GRANULARITY: u64 = 64 << 10;
/// Granularity of `b1` (the read-only export's bitmap).
pub const B1_GRANULARITY: u64 = 4 << 10;
/// Granules of `b0` dirty before each input.
const B0_DIRTY: [u64; 3] = [0, 5, 12];
/// Granules of `b1` dirty (it is disabled: always).
const B1_DIRTY: [u64; 4] = [1, 2, 100, 255];
/// How long the server may take to end after the client's input has ended.
pub const TIME_BOUND: Duration = Duration::from_secs(5);
/// The writable export's description (`NBD_INFO_DESCRIPTION`, `LIST`).
pub const DESCRIPTION: &str = "fuzzed disk";

/// An export's first contents (0: `node0`, 1: `ro`).
fn pattern(export: usize) -> &'static [u8] {
    static P: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    let p = P.get_or_init(|| {
        [0u8, 0x5a].map(|x| {
            (0..SIZE)
                .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) as u8) ^ x)
                .collect()
        })
    });
    &p[export]
}

struct Fixture {
    server: NbdServer,
    /// A server with `tls-creds` (PSK) and no export: what it does before TLS is fuzzed.
    tls: NbdServer,
    nodes: [Arc<BlockNode>; 2],
    /// Whether `node0` may differ from its first contents (a previous input wrote to it).
    touched: bool,
    /// Keeps the block layer (and its nodes' files) alive.
    _layer: Arc<BlockLayer>,
}

/// Held by every run: one server and one pair of exports per process.
fn fixture() -> MutexGuard<'static, Fixture> {
    static F: OnceLock<Mutex<Fixture>> = OnceLock::new();
    F.get_or_init(|| Mutex::new(Fixture::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

impl Fixture {
    fn new() -> Self {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            std::path::PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let layer = Arc::new(BlockLayer::new());
        let server = NbdServer::new();
        server
            .start(
                &SocketAddress::Inet {
                    host: "127.0.0.1".into(),
                    port: "0".into(),
                },
                0,
            )
            .expect("harness: nbd-server-start");
        let mut nodes = Vec::new();
        for (i, (name, bitmap, gran, dirty)) in [
            ("node0", "b0", B0_GRANULARITY, &B0_DIRTY[..]),
            ("ro", "b1", B1_GRANULARITY, &B1_DIRTY[..]),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.join(format!("livemig-fuzz-nbd-{}-{name}", std::process::id()));
            std::fs::write(&path, pattern(i)).expect("harness: image");
            let node = layer
                .blockdev_add(
                    &json!({"driver": "raw", "node-name": name, "read-only": i == 1,
                    "file": {"driver": "file", "filename": path.to_str().expect("utf-8 path")}}),
                )
                .expect("harness: blockdev-add");
            let _ = std::fs::remove_file(&path);
            node.create_bitmap(gran as u32, Some(bitmap))
                .expect("harness: bitmap");
            node.with_bitmaps(|l| {
                let b = l.find_mut(bitmap).expect("harness: bitmap");
                for g in dirty {
                    b.set_dirty(g * gran, gran).expect("harness: set dirty");
                }
                b.set_disabled(i == 1);
            });
            server
                .add(
                    node.clone(),
                    ExportConfig {
                        id: name.into(),
                        name: name.into(),
                        description: (i == 0).then(|| DESCRIPTION.into()),
                        writable: i == 0,
                        bitmap: Some(bitmap.into()),
                        bitmap_node: None,
                    },
                )
                .expect("harness: nbd-server-add");
            nodes.push(node);
        }
        let [rw, ro]: [Arc<BlockNode>; 2] = nodes.try_into().expect("two nodes");
        // The key file is read at each handshake: one directory for every process, the same
        // contents written each time.
        let psk = dir.join("livemig-fuzz-nbd-psk");
        let _ = std::fs::create_dir_all(&psk);
        let tmp = psk.join(format!("keys.psk.{}", std::process::id()));
        std::fs::write(&tmp, "qemu:00112233445566778899aabbccddeeff\n").expect("harness: psk");
        std::fs::rename(&tmp, psk.join("keys.psk")).expect("harness: psk");
        let objects = Arc::new(tls::Objects::new());
        objects
            .object_add_cmdline(&format!(
                "tls-creds-psk,id=t0,endpoint=server,dir={}",
                psk.display()
            ))
            .expect("harness: tls-creds-psk");
        let tls = NbdServer::new();
        tls.set_tls_objects(objects);
        tls.start_with_tls(
            &SocketAddress::Inet {
                host: "127.0.0.1".into(),
                port: "0".into(),
            },
            0,
            Some("t0"),
            None,
        )
        .expect("harness: nbd-server-start with tls-creds");
        Fixture {
            server,
            tls,
            nodes: [rw, ro],
            touched: false,
            _layer: layer,
        }
    }

    /// Puts `node0` and `b0` back as they were before the first input.
    fn reset(&mut self) {
        if !self.touched {
            return;
        }
        self.nodes[0]
            .write_at(0, pattern(0))
            .expect("harness: restore node0");
        self.nodes[0].with_bitmaps(|l| {
            let b = l.find_mut("b0").expect("harness: b0");
            b.clear().expect("harness: clear b0");
            for g in B0_DIRTY {
                b.set_dirty(g * B0_GRANULARITY, B0_GRANULARITY)
                    .expect("harness: set dirty");
            }
        });
        self.touched = false;
    }
}

/// One block status chunk the server sent.
#[derive(Debug)]
pub struct Status {
    /// The context's name.
    pub context: String,
    /// The request's offset, where the first extent starts.
    pub offset: u64,
    /// Length and flags of each extent.
    pub extents: Vec<(u32, u32)>,
}

/// Meta contexts selected: id and name.
type Contexts = Vec<(u32, String)>;
/// The last successful `SET_META_CONTEXT`: its export's name and what it selected.
type MetaSet = Option<(Vec<u8>, Contexts)>;

/// What the session did, as the harness decoded it.
#[derive(Debug)]
pub struct Outcome {
    /// `serve`'s result.
    pub result: Result<(), String>,
    /// Each option the server answered, with the type of its final reply.
    pub options: Vec<(u32, u32)>,
    /// Names `LIST` returned (the last `LIST`).
    pub listed: Vec<String>,
    /// Meta contexts the last `LIST_META_CONTEXT` or `SET_META_CONTEXT` returned.
    pub contexts: Vec<String>,
    /// The export transmission went on with.
    pub export: Option<String>,
    /// Whether structured replies were negotiated.
    pub structured: bool,
    /// Each request answered: its type and error (0: success).
    pub requests: Vec<(u16, u32)>,
    /// Each block status reply's chunks.
    pub extents: Vec<Status>,
    /// Bytes the server sent.
    pub replied: usize,
    /// The same input to a server with TLS configured: each option it answered before TLS,
    /// with the reply's type.
    pub tls: Vec<(u32, u32)>,
}

impl Outcome {
    /// A session's outcome before its replies are decoded: what `serve` returned, how many
    /// bytes it replied, and what the TLS server answered.
    fn undecoded(result: Result<(), String>, replied: usize, tls: Vec<(u32, u32)>) -> Self {
        Outcome {
            result,
            options: Vec::new(),
            listed: Vec::new(),
            contexts: Vec::new(),
            export: None,
            structured: false,
            requests: Vec::new(),
            extents: Vec::new(),
            replied,
            tls,
        }
    }
}

/// Most bytes of the server's replies the harness keeps and decodes: reads of the whole export
/// are 28 bytes of input for 1 MiB of output, so an input can ask for gigabytes. Past this, the
/// replies are read and dropped, and only what does not need them is checked.
pub const MAX_REPLIES: usize = 16 << 20;

/// Largest allocation the server may make for one connection with `input` bytes: a read of the
/// whole export, its socket buffers, and what the input itself carried (a write's payload,
/// read as it arrives). More comes from a length on the wire.
pub fn allocation_bound(input: usize) -> usize {
    SIZE as usize + 2 * input + (512 << 10)
}

/// Runs one input (module doc) and checks the invariants. Panics when one does not hold.
pub fn run(data: &[u8]) -> Outcome {
    run_observed(data, |_| {})
}

/// [`run`], calling `serving(true)` on the thread that serves the connection before the
/// server starts and `serving(false)` once it returned (a fuzz target's allocator watches
/// what that thread allocates).
pub fn run_observed(data: &[u8], serving: fn(bool)) -> Outcome {
    let mut fx = fixture();
    fx.reset();
    let (result, replies, whole) = session(&fx.server, data, serving);
    let (tls_result, tls_replies, _) = session(&fx.tls, data, serving);
    let tls = before_tls(data, &tls_replies, &tls_result);
    if !whole {
        // Too much to keep: the model and the decoding are skipped, node0 is restored.
        fx.touched = true;
        return Outcome::undecoded(result, MAX_REPLIES, tls);
    }
    let mut model = Model::new();
    let out = Session {
        c: Bytes::new(data),
        s: Bytes::new(&replies),
        model: &mut model,
        out: Outcome::undecoded(result, replies.len(), tls),
    }
    .check();
    fx.touched = model.touched;
    model.check_disk(&fx.nodes[0]);
    out
}

/// Serves `data` on one end of a socket pair, reading the replies on the other, and checks
/// that the server ends in time and leaves nothing behind: `serve`'s result, the replies, and
/// whether they were kept whole ([`MAX_REPLIES`]).
fn session(
    server: &NbdServer,
    data: &[u8],
    serving: fn(bool),
) -> (Result<(), String>, Vec<u8>, bool) {
    let (srv, cli) = UnixStream::pair().expect("harness: socket pair");
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", srv.as_raw_fd()))
        .expect("harness: stat socket")
        .ino();
    let cli_w = cli.try_clone().expect("harness: socket clone");
    let input = data.to_vec();
    // The input as a client sends it, then the end of its writing. MSG_NOSIGNAL: a server
    // that hung up early must not kill the process (a fuzz target does not ignore SIGPIPE).
    let writer = std::thread::spawn(move || {
        let mut at = 0;
        while at < input.len() {
            match send(cli_w.as_raw_fd(), &input[at..], MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => at += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => break,
            }
        }
        let _ = cli_w.shutdown(Shutdown::Write);
    });
    let (rtx, rrx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut piece = vec![0u8; 64 << 10];
        let mut whole = true;
        loop {
            match (&cli).read(&mut piece) {
                Ok(0) => break,
                Ok(n) if got.len() + n <= MAX_REPLIES => got.extend_from_slice(&piece[..n]),
                Ok(_) => whole = false,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = rtx.send((got, whole));
    });
    let (stx, srx) = std::sync::mpsc::channel();
    let server = server.clone();
    // Unnamed: the threads the server itself starts are the `nbd-` ones.
    let serve_thread = std::thread::spawn(move || {
        serving(true);
        let r = server.serve(srv.into()).map_err(|e| e.to_string());
        serving(false);
        let _ = stx.send(r);
    });
    let result = srx.recv_timeout(TIME_BOUND).unwrap_or_else(|_| {
        panic!("the server still serves {TIME_BOUND:?} after the client's input ended")
    });
    serve_thread.join().expect("harness: serving thread");
    let (replies, whole) = rrx
        .recv_timeout(Duration::from_secs(2))
        .unwrap_or_else(|_| {
            panic!(
                "the server returned but the client never read the end: its socket is open in {:?}",
                sockets(ino)
            )
        });
    reader.join().expect("harness: reader");
    writer.join().expect("harness: writer");
    let left = sockets(ino);
    assert!(
        left.is_empty(),
        "the connection's socket left open: {left:?}"
    );
    crate::wait_gone(
        "nbd_server",
        "NBD server threads left",
        Duration::from_millis(1),
        || crate::threads(|n| n.starts_with("nbd-") && n != "nbd-accept"),
    );
    if let Err(e) = &result {
        assert!(!e.is_empty(), "an empty error");
    }
    (result, replies, whole)
}

/// Checks what a server with TLS configured answered before any TLS (QEMU's rules: every
/// option but `STARTTLS` refused with `ERR_TLS_REQD`, `ABORT` then the end, `EXPORT_NAME` the
/// end, `STARTTLS` acknowledged and then a handshake the input cannot complete); returns each
/// option with its reply's type.
fn before_tls(data: &[u8], replies: &[u8], result: &Result<(), String>) -> Vec<(u32, u32)> {
    let mut c = Bytes::new(data);
    let mut s = Bytes::new(replies);
    let mut got = Vec::new();
    assert_eq!(s.u64(), Some(NBDMAGIC), "TLS greeting: NBDMAGIC");
    assert_eq!(s.u64(), Some(IHAVEOPT), "TLS greeting: IHAVEOPT");
    assert!(s.u16().is_some(), "TLS greeting: flags");
    let fixed = match c.u32() {
        Some(f) if f & !3 == 0 => f & 1 != 0,
        _ => {
            assert_eq!(
                s.left(),
                0,
                "TLS: the server went on after the client's flags"
            );
            return got;
        }
    };
    loop {
        let header = (c.u64(), c.u32(), c.u32());
        let (Some(IHAVEOPT), Some(o), Some(len)) = header else {
            break;
        };
        let Some(d) = (len <= proto::MAX_OPTION_LENGTH)
            .then(|| c.take(len as usize))
            .flatten()
        else {
            break;
        };
        if o == opt::EXPORT_NAME || !fixed || (o == opt::STARTTLS && !d.is_empty()) {
            assert!(
                result.is_err(),
                "TLS: option {o} before TLS did not end the session"
            );
            break;
        }
        assert_eq!(s.u64(), Some(REP_MAGIC), "TLS: reply to option {o}");
        assert_eq!(s.u32(), Some(o), "TLS: a reply echoes its option");
        let kind = s.u32().expect("TLS: reply type");
        let n = s.u32().expect("TLS: reply length");
        s.take(n as usize).expect("TLS: reply data");
        got.push((o, kind));
        if o == opt::STARTTLS {
            assert_eq!(kind, rep::ACK, "TLS: STARTTLS");
            // The rest is the handshake's: the server's own TLS records, if any.
            return got;
        }
        assert_eq!(kind, rep::ERR_TLS_REQD, "TLS: option {o} before TLS");
        if o == opt::ABORT {
            break;
        }
    }
    assert_eq!(s.left(), 0, "TLS: the server sent more than its replies");
    got
}

/// Descriptors of this process open on the socket with inode `ino`.
fn sockets(ino: u64) -> Vec<String> {
    let want = format!("socket:[{ino}]");
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    fds.flatten()
        .filter(|f| std::fs::read_link(f.path()).is_ok_and(|l| l.to_str() == Some(&want)))
        .map(|f| f.file_name().to_string_lossy().into_owned())
        .collect()
}

/// One direction's bytes, read front to back.
struct Bytes<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    fn new(b: &'a [u8]) -> Self {
        Bytes { b, at: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
}

/// A granule of the bitmap model.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Granule {
    Clean,
    Dirty,
    /// Trimmed: a discard the node passed on marked it, one it dropped did not.
    Either,
}

/// What `node0` and `b0` hold, as the acknowledged requests say (`ro` and `b1` never change).
struct Model {
    /// `node0`'s bytes (its first contents until something is written).
    disk: std::borrow::Cow<'static, [u8]>,
    /// Bytes trimmed since: they may read as anything.
    any: Vec<bool>,
    b0: Vec<Granule>,
    /// Whether a request that could change `node0` was sent.
    touched: bool,
}

impl Model {
    fn new() -> Self {
        let mut b0 = vec![Granule::Clean; (SIZE / B0_GRANULARITY) as usize];
        for g in B0_DIRTY {
            b0[g as usize] = Granule::Dirty;
        }
        Model {
            disk: std::borrow::Cow::Borrowed(pattern(0)),
            any: Vec::new(),
            b0,
            touched: false,
        }
    }

    /// Whether `got`, read at `offset` of export `e` (0: node0, 1: ro), is what it holds.
    fn matches(&self, e: usize, offset: u64, got: &[u8]) -> Result<(), u64> {
        let range = offset as usize..offset as usize + got.len();
        let want = if e == 0 {
            &self.disk[range.clone()]
        } else {
            &pattern(1)[range.clone()]
        };
        if want == got {
            return Ok(());
        }
        let any = if e == 0 { self.any.get(range) } else { None };
        for (i, (w, g)) in want.iter().zip(got).enumerate() {
            if w != g && !any.is_some_and(|a| a[i]) {
                return Err(offset + i as u64);
            }
        }
        Ok(())
    }

    fn granule(&self, e: usize, offset: u64) -> Granule {
        if e == 0 {
            self.b0[(offset / B0_GRANULARITY) as usize]
        } else if B1_DIRTY.contains(&(offset / B1_GRANULARITY)) {
            Granule::Dirty
        } else {
            Granule::Clean
        }
    }

    /// An acknowledged write of `data` (`None`: zeroes), or trim, at `offset`.
    fn write(&mut self, offset: u64, len: u64, data: Option<&[u8]>, trim: bool) {
        if len == 0 {
            return;
        }
        let range = offset as usize..(offset + len) as usize;
        let disk = self.disk.to_mut();
        match data {
            Some(d) => disk[range.clone()].copy_from_slice(d),
            None => disk[range.clone()].fill(0),
        }
        if trim || !self.any.is_empty() {
            if self.any.is_empty() {
                self.any = vec![false; SIZE as usize];
            }
            self.any[range].fill(trim);
        }
        let first = offset / B0_GRANULARITY;
        let last = (offset + len - 1) / B0_GRANULARITY;
        for g in first..=last {
            let s = &mut self.b0[g as usize];
            *s = match (trim, *s) {
                (false, _) | (true, Granule::Dirty) => Granule::Dirty,
                (true, _) => Granule::Either,
            };
        }
    }

    /// The node after the run is what the model says.
    fn check_disk(&self, node: &BlockNode) {
        if !self.touched {
            return;
        }
        let mut got = vec![0u8; SIZE as usize];
        node.read_at(0, &mut got).expect("harness: read node0");
        if let Err(at) = self.matches(0, 0, &got) {
            panic!("node0 byte {at} after the run is not what was written");
        }
        let bm = node.bitmaps();
        let b = bm.find("b0").expect("harness: b0");
        for (g, m) in self.b0.iter().enumerate() {
            let dirty = b
                .get(g as u64 * B0_GRANULARITY)
                .expect("harness: b0 granule");
            let ok = match m {
                Granule::Clean => !dirty,
                Granule::Dirty => dirty,
                Granule::Either => true,
            };
            assert!(
                ok,
                "b0 granule {g} is dirty={dirty} after the run, model {m:?}"
            );
        }
    }
}

/// The export names and what each has.
const EXPORTS: [&str; 2] = ["node0", "ro"];
const BITMAPS: [&str; 2] = ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"];

fn export_index(name: &[u8]) -> Option<usize> {
    EXPORTS.iter().position(|e| e.as_bytes() == name)
}

/// Both directions of one session, decoded in step.
struct Session<'a> {
    /// What the client sent (the input).
    c: Bytes<'a>,
    /// What the server sent.
    s: Bytes<'a>,
    model: &'a mut Model,
    out: Outcome,
}

/// An option reply: type and data.
type Reply<'a> = (u32, &'a [u8]);

impl<'a> Session<'a> {
    /// The server has nothing more to say (it disconnected).
    fn ended(&self, why: &str) {
        assert_eq!(
            self.s.left(),
            0,
            "the server sent {} bytes after {why}",
            self.s.left()
        );
    }

    fn check(mut self) -> Outcome {
        let s = &mut self.s;
        assert_eq!(s.u64(), Some(NBDMAGIC), "greeting: NBDMAGIC");
        assert_eq!(s.u64(), Some(IHAVEOPT), "greeting: IHAVEOPT");
        let hflags = s.u16().expect("greeting: handshake flags");
        assert_eq!(
            hflags,
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
            "handshake flags"
        );
        let Some(cflags) = self.c.u32() else {
            self.ended("the client's flags were cut");
            return self.out;
        };
        if cflags & !3 != 0 {
            self.ended("unknown client flags");
            assert!(self.out.result.is_err(), "unknown client flags accepted");
            return self.out;
        }
        let fixed = cflags & 1 != 0;
        let no_zeroes = cflags & 2 != 0;
        if let Some((e, active)) = self.options(fixed, no_zeroes) {
            self.out.export = Some(EXPORTS[e].to_string());
            self.transmission(e, &active);
        }
        self.out
    }

    /// The option phase; the export and active meta contexts (id, name) if transmission
    /// follows.
    fn options(&mut self, fixed: bool, no_zeroes: bool) -> Option<(usize, Contexts)> {
        // (export name, contexts) of the last successful SET_META_CONTEXT.
        let mut meta: MetaSet = None;
        loop {
            let Some(magic) = self.c.u64() else {
                self.ended("the client's options ended");
                return None;
            };
            if magic != IHAVEOPT {
                self.ended("a bad option magic");
                assert!(self.out.result.is_err(), "a bad option magic accepted");
                return None;
            }
            let (Some(o), Some(len)) = (self.c.u32(), self.c.u32()) else {
                self.ended("an option header cut short");
                return None;
            };
            if len > proto::MAX_OPTION_LENGTH {
                self.ended("an option too long");
                assert!(
                    self.out.result.is_err(),
                    "an option of {len} bytes accepted"
                );
                return None;
            }
            let Some(data) = self.c.take(len as usize) else {
                self.ended("an option's data cut short");
                return None;
            };
            if !fixed && o != opt::EXPORT_NAME {
                self.ended("an option without fixed newstyle");
                return None;
            }
            if o == opt::EXPORT_NAME {
                let Some(e) = export_index(data) else {
                    self.ended("EXPORT_NAME of an unknown export");
                    assert!(self.out.result.is_err(), "unknown export accepted");
                    return None;
                };
                let size = self.s.u64().expect("EXPORT_NAME: size");
                let flags = self.s.u16().expect("EXPORT_NAME: flags");
                self.check_export(e, size, flags);
                if !no_zeroes {
                    let z = self.s.take(124).expect("EXPORT_NAME: zeroes");
                    assert!(z.iter().all(|b| *b == 0), "EXPORT_NAME: 124 zeroes");
                }
                return Some((e, active(&meta, data)));
            }
            let replies = self.option_replies(o);
            let (last, _) = *replies.last().expect("at least one reply");
            self.out.options.push((o, last));
            if o == opt::ABORT {
                assert_eq!(last, rep::ACK, "ABORT is acknowledged");
                self.ended("ABORT");
                return None;
            }
            let ok = last == rep::ACK;
            match o {
                opt::LIST => {
                    assert_eq!(ok, data.is_empty(), "LIST with {} bytes: {last:#x}", len);
                    if ok {
                        self.out.listed = list_names(&replies);
                        let mut names = self.out.listed.clone();
                        names.sort();
                        assert_eq!(names, ["node0", "ro"], "LIST names both exports");
                    }
                }
                opt::STARTTLS => {
                    assert!(!ok, "STARTTLS without TLS configured was acknowledged");
                }
                opt::STRUCTURED_REPLY => {
                    let want = data.is_empty() && !self.out.structured;
                    assert_eq!(ok, want, "STRUCTURED_REPLY: {last:#x}");
                    self.out.structured |= ok;
                }
                opt::INFO | opt::GO => {
                    if let Some(e) = self.check_info(data, &replies) {
                        if o == opt::GO {
                            let name = EXPORTS[e].as_bytes();
                            return Some((e, active(&meta, name)));
                        }
                    }
                }
                opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                    let got = self.check_meta(o, data, &replies);
                    if o == opt::SET_META_CONTEXT {
                        if let Some(set) = got {
                            meta = Some(set);
                        }
                    }
                }
                _ => assert_eq!(last, rep::ERR_UNSUP, "unknown option {o}"),
            }
        }
    }

    /// Replies to option `o` up to the final one.
    fn option_replies(&mut self, o: u32) -> Vec<Reply<'a>> {
        let mut v = Vec::new();
        loop {
            let magic = self.s.u64();
            assert_eq!(magic, Some(REP_MAGIC), "reply {} to option {o}", v.len());
            assert_eq!(self.s.u32(), Some(o), "a reply echoes its option");
            let kind = self.s.u32().expect("reply type");
            let len = self.s.u32().expect("reply length");
            let data = self
                .s
                .take(len as usize)
                .expect("reply data as long as announced");
            v.push((kind, data));
            if kind == rep::ACK || rep::is_err(kind) {
                if kind == rep::ACK {
                    assert!(data.is_empty(), "ACK with data");
                }
                return v;
            }
            assert!(
                matches!(kind, rep::SERVER | rep::INFO | rep::META_CONTEXT),
                "option {o}: reply type {kind:#x}"
            );
        }
    }

    fn check_export(&self, e: usize, size: u64, flags: u16) {
        assert_eq!(size, SIZE, "export size");
        assert!(flags & tflag::HAS_FLAGS != 0, "HAS_FLAGS");
        assert_eq!(
            flags & tflag::READ_ONLY != 0,
            e == 1,
            "READ_ONLY of {}",
            EXPORTS[e]
        );
        assert_eq!(
            flags & tflag::SEND_DF != 0,
            self.out.structured,
            "SEND_DF only with structured replies"
        );
    }

    /// INFO/GO: the export it acknowledged.
    fn check_info(&mut self, data: &[u8], replies: &[Reply<'_>]) -> Option<usize> {
        let (last, _) = *replies.last()?;
        let mut d = Bytes::new(data);
        let name = d
            .u32()
            .and_then(|n| (n <= proto::MAX_STRING_SIZE).then_some(n))
            .and_then(|n| d.take(n as usize));
        let reqs = d.u16();
        let well_formed = matches!((name, reqs), (Some(_), Some(n)) if d.left() == usize::from(n) * 2)
            && name.is_some_and(|n| std::str::from_utf8(n).is_ok());
        if !well_formed {
            assert_eq!(last, rep::ERR_INVALID, "malformed INFO/GO");
            return None;
        }
        let name = name?;
        let Some(e) = export_index(name) else {
            assert_eq!(last, rep::ERR_UNKNOWN, "INFO/GO of an unknown export");
            return None;
        };
        assert_eq!(last, rep::ACK, "INFO/GO of {}", EXPORTS[e]);
        let mut export = false;
        for (kind, r) in &replies[..replies.len() - 1] {
            assert_eq!(*kind, rep::INFO, "INFO/GO reply type");
            let mut r = Bytes::new(r);
            match r.u16().expect("info type") {
                info::EXPORT => {
                    let size = r.u64().expect("INFO_EXPORT size");
                    let flags = r.u16().expect("INFO_EXPORT flags");
                    self.check_export(e, size, flags);
                    export = true;
                }
                info::NAME => assert_eq!(r.take(r.left()), Some(name), "INFO_NAME"),
                info::DESCRIPTION => {
                    assert_eq!(e, 0, "a description of ro");
                    assert_eq!(r.take(r.left()), Some(DESCRIPTION.as_bytes()));
                }
                info::BLOCK_SIZE => {
                    let (min, pref, max) = (r.u32(), r.u32(), r.u32());
                    let (Some(min), Some(pref), Some(max)) = (min, pref, max) else {
                        panic!("INFO_BLOCK_SIZE cut short");
                    };
                    assert!(
                        min.is_power_of_two() && min <= pref && pref <= max,
                        "block sizes {min} {pref} {max}"
                    );
                }
                t => panic!("INFO type {t}"),
            }
            assert_eq!(r.left(), 0, "INFO reply longer than its type");
        }
        assert!(export, "INFO/GO acknowledged without INFO_EXPORT");
        Some(e)
    }

    /// LIST/SET_META_CONTEXT: for a SET acknowledged, the export and what it selected.
    fn check_meta(&mut self, o: u32, data: &[u8], replies: &[Reply<'_>]) -> MetaSet {
        let (last, _) = *replies.last()?;
        if !self.out.structured {
            assert!(rep::is_err(last), "meta context without structured replies");
            return None;
        }
        if last != rep::ACK {
            return None;
        }
        let mut d = Bytes::new(data);
        let name = d.u32().and_then(|n| d.take(n as usize));
        let e = name.and_then(export_index);
        let e = e.unwrap_or_else(|| panic!("{} acknowledged for no export", opt::name(o)));
        let mut got: Vec<(u32, String)> = Vec::new();
        for (kind, r) in &replies[..replies.len() - 1] {
            assert_eq!(*kind, rep::META_CONTEXT, "meta context reply type");
            let mut r = Bytes::new(r);
            let id = r.u32().expect("context id");
            let ctx = String::from_utf8(r.take(r.left()).unwrap_or_default().to_vec())
                .expect("a UTF-8 context name");
            assert!(
                ctx == proto::CONTEXT_BASE_ALLOCATION || ctx == BITMAPS[e],
                "context {ctx} on {}",
                EXPORTS[e]
            );
            assert!(
                !got.iter().any(|(i, n)| *i == id || *n == ctx),
                "context {id} twice"
            );
            got.push((id, ctx));
        }
        self.out.contexts = got.iter().map(|(_, n)| n.clone()).collect();
        Some((name?.to_vec(), got))
    }

    fn transmission(&mut self, e: usize, active: &[(u32, String)]) {
        loop {
            let Some(h) = self.c.take(28) else {
                self.ended("the client's requests ended");
                return;
            };
            let mut h = Bytes::new(h);
            let (magic, flags, kind) = (h.u32(), h.u16(), h.u16());
            let (handle, offset, len) = (h.u64(), h.u64(), h.u32());
            let (Some(magic), Some(flags), Some(kind), Some(handle), Some(offset), Some(len)) =
                (magic, flags, kind, handle, offset, len)
            else {
                unreachable!("28 bytes hold a request header")
            };
            if magic != REQUEST_MAGIC {
                self.ended("a bad request magic");
                assert!(self.out.result.is_err(), "a bad request magic accepted");
                return;
            }
            let mut payload: &[u8] = &[];
            if kind == cmd::WRITE && len > proto::MAX_BUFFER_SIZE {
                // Refused unread (QEMU's rule): the reply, then the end.
                let r = Req {
                    flags,
                    kind,
                    handle,
                    offset,
                    len,
                };
                let err = self.reply(e, &r, active, true);
                assert!(err != 0, "a write over the maximum buffer size succeeded");
                self.out.requests.push((kind, err));
                self.ended("a write over the maximum buffer size");
                assert!(
                    self.out.result.is_err(),
                    "an oversized write did not end the session"
                );
                return;
            }
            if kind == cmd::WRITE {
                let Some(p) = self.c.take(len as usize) else {
                    self.ended("a write's payload cut short");
                    return;
                };
                payload = p;
            }
            if kind == cmd::DISC {
                self.ended("DISC");
                return;
            }
            let req = Req {
                flags,
                kind,
                handle,
                offset,
                len,
            };
            let must_fail = self.must_fail(e, &req, active);
            let err = self.reply(e, &req, active, must_fail.is_some());
            self.out.requests.push((kind, err));
            match (must_fail, err) {
                (Some(why), 0) => panic!("request {req:?} succeeded: {why}"),
                (None, e) if e != 0 => panic!("request {req:?} failed with {e}"),
                _ => {}
            }
            if e == 0 && matches!(kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM) {
                self.model.touched = true;
                if err == 0 {
                    let (data, trim) = match kind {
                        cmd::WRITE => (Some(payload), false),
                        cmd::WRITE_ZEROES => (None, false),
                        _ => (None, true),
                    };
                    self.model.write(offset, u64::from(len), data, trim);
                }
            }
        }
    }

    /// Why the request must fail, if it must.
    fn must_fail(&self, e: usize, r: &Req, active: &[(u32, String)]) -> Option<&'static str> {
        let known = matches!(
            r.kind,
            cmd::READ
                | cmd::WRITE
                | cmd::FLUSH
                | cmd::TRIM
                | cmd::CACHE
                | cmd::WRITE_ZEROES
                | cmd::BLOCK_STATUS
        );
        if !known {
            return Some("an unknown request type");
        }
        if e == 1 && matches!(r.kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM) {
            return Some("a write to the read-only export");
        }
        if r.offset
            .checked_add(u64::from(r.len))
            .is_none_or(|end| end > SIZE)
        {
            return Some("outside the export");
        }
        let mut valid = cflag::FUA;
        match r.kind {
            cmd::READ if self.out.structured => valid |= cflag::DF,
            cmd::WRITE_ZEROES => valid |= cflag::NO_HOLE,
            cmd::BLOCK_STATUS => valid |= cflag::REQ_ONE,
            _ => {}
        }
        if r.flags & !valid != 0 {
            return Some("flags the command does not take");
        }
        if r.kind == cmd::BLOCK_STATUS {
            if !self.out.structured || active.is_empty() {
                return Some("block status without a meta context");
            }
            if r.len == 0 {
                return Some("block status of nothing");
            }
        }
        None
    }

    /// Reads the reply to `r` and checks it; its error (0: success).
    fn reply(&mut self, e: usize, r: &Req, active: &[(u32, String)], failing: bool) -> u32 {
        let magic = self.s.u32();
        if !self.out.structured {
            assert_eq!(magic, Some(SIMPLE_REPLY_MAGIC), "simple reply to {r:?}");
            let err = self.s.u32().expect("simple reply error");
            assert_eq!(self.s.u64(), Some(r.handle), "simple reply handle");
            if err == 0 && r.kind == cmd::READ && !failing {
                let d = self.s.take(r.len as usize).expect("read data");
                self.check_read(e, r.offset, d);
            }
            return err;
        }
        let mut magic = magic;
        let mut covered = 0u64;
        let mut err = 0;
        let mut seen: Vec<u32> = Vec::new();
        loop {
            assert_eq!(
                magic,
                Some(STRUCTURED_REPLY_MAGIC),
                "chunk of the reply to {r:?}"
            );
            let flags = self.s.u16().expect("chunk flags");
            let kind = self.s.u16().expect("chunk type");
            assert_eq!(self.s.u64(), Some(r.handle), "chunk handle");
            let len = self.s.u32().expect("chunk length");
            let mut d = Bytes::new(self.s.take(len as usize).expect("chunk payload"));
            match kind {
                chunk::NONE => {
                    assert_eq!(len, 0, "NONE chunk with a payload");
                    assert!(flags & chunk::FLAG_DONE != 0, "NONE chunk not the last");
                }
                chunk::ERROR | chunk::ERROR_OFFSET => {
                    err = d.u32().expect("chunk error");
                    assert!(err != 0, "an error chunk with error 0");
                    let n = d.u16().expect("error message length");
                    let msg = d.take(usize::from(n)).expect("error message");
                    assert!(std::str::from_utf8(msg).is_ok(), "error message not UTF-8");
                    if kind == chunk::ERROR_OFFSET {
                        d.u64().expect("error offset");
                    }
                    assert_eq!(d.left(), 0, "error chunk longer than its message");
                }
                chunk::OFFSET_DATA => {
                    assert_eq!(r.kind, cmd::READ, "data in a reply to {r:?}");
                    let at = d.u64().expect("data offset");
                    let bytes = d.take(d.left()).unwrap_or_default();
                    let end = at + bytes.len() as u64;
                    assert!(
                        at >= r.offset && end <= r.offset + u64::from(r.len),
                        "data chunk {at}+{} outside the read",
                        bytes.len()
                    );
                    covered += bytes.len() as u64;
                    self.check_read(e, at, bytes);
                }
                chunk::OFFSET_HOLE => {
                    assert_eq!(r.kind, cmd::READ, "a hole in a reply to {r:?}");
                    let at = d.u64().expect("hole offset");
                    let n = d.u32().expect("hole size");
                    covered += u64::from(n);
                    assert!(
                        at >= r.offset && at + u64::from(n) <= r.offset + u64::from(r.len),
                        "hole chunk {at}+{n} outside the read"
                    );
                    self.check_read(e, at, &vec![0u8; n as usize]);
                }
                chunk::BLOCK_STATUS => {
                    assert_eq!(
                        r.kind,
                        cmd::BLOCK_STATUS,
                        "block status in a reply to {r:?}"
                    );
                    let id = d.u32().expect("context id");
                    let (_, name) = active
                        .iter()
                        .find(|(i, _)| *i == id)
                        .unwrap_or_else(|| panic!("block status of context {id}, not negotiated"));
                    assert!(!seen.contains(&id), "context {id} twice in one reply");
                    seen.push(id);
                    let mut ext = Vec::new();
                    while d.left() > 0 {
                        let l = d.u32().expect("extent length");
                        let f = d.u32().expect("extent flags");
                        ext.push((l, f));
                    }
                    self.check_extents(e, r, name, &ext);
                    self.out.extents.push(Status {
                        context: name.clone(),
                        offset: r.offset,
                        extents: ext,
                    });
                }
                t => panic!("chunk type {t} in a reply to {r:?}"),
            }
            if flags & chunk::FLAG_DONE != 0 {
                break;
            }
            magic = self.s.u32();
        }
        if err == 0 {
            match r.kind {
                cmd::READ => assert_eq!(covered, u64::from(r.len), "read chunks cover the read"),
                cmd::BLOCK_STATUS => assert_eq!(
                    seen.len(),
                    active.len(),
                    "block status of every negotiated context"
                ),
                _ => {}
            }
        }
        err
    }

    fn check_read(&self, e: usize, offset: u64, data: &[u8]) {
        if let Err(at) = self.model.matches(e, offset, data) {
            panic!("byte {at} of {} read back is not what it holds", EXPORTS[e]);
        }
    }

    fn check_extents(&self, e: usize, r: &Req, name: &str, ext: &[(u32, u32)]) {
        assert!(!ext.is_empty(), "no extent for {name}");
        if r.flags & cflag::REQ_ONE != 0 {
            assert_eq!(ext.len(), 1, "REQ_ONE: one extent for {name}");
        }
        let total: u64 = ext.iter().map(|(l, _)| u64::from(*l)).sum();
        assert!(
            total <= u64::from(r.len) && ext.iter().all(|(l, _)| *l > 0),
            "extents {ext:?} of {name} for {r:?}"
        );
        if r.flags & cflag::REQ_ONE == 0 {
            assert_eq!(
                total,
                u64::from(r.len),
                "extents of {name} tile the request"
            );
        }
        if name == proto::CONTEXT_BASE_ALLOCATION {
            return;
        }
        let gran = if e == 0 {
            B0_GRANULARITY
        } else {
            B1_GRANULARITY
        };
        let mut at = r.offset;
        for (l, f) in ext {
            assert!(f & !proto::state::DIRTY == 0, "dirty-bitmap flags {f:#x}");
            let dirty = f & proto::state::DIRTY != 0;
            let end = at + u64::from(*l);
            let mut g = at / gran * gran;
            while g < end {
                let m = self.model.granule(e, g);
                let ok = match m {
                    Granule::Either => true,
                    Granule::Dirty => dirty,
                    Granule::Clean => !dirty,
                };
                assert!(
                    ok,
                    "{name}: {at}+{l} said dirty={dirty}, granule at {g} is {m:?}"
                );
                g += gran;
            }
            at = end;
        }
    }
}

/// A request as the client sent it.
#[derive(Debug)]
struct Req {
    flags: u16,
    kind: u16,
    handle: u64,
    offset: u64,
    len: u32,
}

/// The contexts active for transmission on export `name`: those the last SET selected, if it
/// was for that export.
fn active(meta: &MetaSet, name: &[u8]) -> Contexts {
    match meta {
        Some((n, set)) if n == name => set.clone(),
        _ => Vec::new(),
    }
}

fn list_names(replies: &[Reply<'_>]) -> Vec<String> {
    let mut names = Vec::new();
    for (kind, d) in &replies[..replies.len() - 1] {
        assert_eq!(*kind, rep::SERVER, "LIST reply type");
        let mut d = Bytes::new(d);
        let n = d.u32().expect("LIST name length");
        let name = d.take(n as usize).expect("LIST name");
        names.push(String::from_utf8_lossy(name).into_owned());
    }
    names
}
