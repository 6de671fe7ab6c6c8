//! The NBD client against a server that sends arbitrary bytes: `nbd::NbdClient::over` on one
//! end of a socket pair negotiates (greeting, `STRUCTURED_REPLY`, `SET_META_CONTEXT`, `GO` with
//! its `INFO` replies), then the requests the `nbd` block driver makes — reads (in pieces of
//! the server's maximum block size), block status, a write, write-zeroes, trim, flush — each
//! reading its simple or structured reply (data, hole, block-status and error chunks), until
//! one breaks the connection (the driver then drops it, as the harness does), and disconnects.
//!
//! Input: one byte of options — bit 0 asks for a meta context, bit 1 picks it:
//! `base:allocation` or `qemu:dirty-bitmap:b0` — then everything the server sends. The fake
//! server writes it all, ends its side, and reads what the client sends until it closes.
//!
//! Afterwards:
//! - a failed negotiation is a `ProtoError` with a message; a failed request is an I/O error
//!   (the server's errno, or `EIO` once the connection is broken, after which it is not
//!   used again);
//! - what the client sent is well formed: its flags, options (`IHAVEOPT`, a known option, its
//!   length), then requests with the request magic, distinct handles, ranges inside the export
//!   the server announced, and no write, write-zeroes or trim to a read-only export;
//! - nothing waits: both the client's calls and the fake server end.

use nbd::client::ConnectOptions;
use nbd::proto::{cmd, opt, tflag, IHAVEOPT, REQUEST_MAGIC};
use nbd::NbdClient;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;

/// What connecting and requesting did.
#[derive(Debug)]
pub struct Outcome {
    /// The negotiation's result.
    pub connected: Result<(), String>,
    /// Export size and transmission flags the server announced.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Each request's result, in order (`Ok` or the error).
    pub requests: Vec<Result<(), String>>,
    /// Extents block status returned.
    pub extents: usize,
    /// Requests the client sent.
    pub sent: usize,
}

/// Runs one input (module doc) and checks the invariants. Panics when one does not hold.
pub fn run(data: &[u8]) -> Outcome {
    let (cfg, server_bytes) = data.split_first().map_or((0, &[][..]), |(c, r)| (*c, r));
    let meta = (cfg & 1 != 0).then(|| {
        if cfg & 2 != 0 {
            "qemu:dirty-bitmap:b0".to_string()
        } else {
            "base:allocation".to_string()
        }
    });
    let (ours, theirs) = UnixStream::pair().expect("harness: socket pair");
    let theirs_w = theirs.try_clone().expect("harness: socket clone");
    let bytes = server_bytes.to_vec();
    let writer = std::thread::spawn(move || {
        let mut s = theirs_w;
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(Shutdown::Write);
    });
    let drainer = std::thread::spawn(move || {
        let mut s = theirs;
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    });
    let opts = ConnectOptions {
        export: "node0".into(),
        meta_context: meta.clone(),
        tls: None,
    };
    let mut out = Outcome {
        connected: Ok(()),
        size: 0,
        flags: 0,
        requests: Vec::new(),
        extents: 0,
        sent: 0,
    };
    match NbdClient::over(ours.into(), &opts) {
        Err(e) => {
            let e = e.to_string();
            assert!(!e.is_empty(), "an empty negotiation error");
            out.connected = Err(e);
        }
        Ok(mut c) => {
            out.size = c.size();
            out.flags = c.flags();
            requests(&mut c, meta.is_some(), &mut out);
            if !c.is_broken() {
                c.disconnect();
            }
        }
    }
    // The client's end is closed: the fake server ends.
    let sent = drainer.join().expect("harness: drainer");
    writer.join().expect("harness: writer");
    if out.connected.is_ok() {
        out.sent = check_sent(&sent, out.size, out.flags);
    }
    out
}

/// The requests the block driver makes, until the connection breaks.
fn requests(c: &mut NbdClient, meta: bool, out: &mut Outcome) {
    let size = c.size();
    let small = size.min(4096) as usize;
    let mut buf = vec![0u8; small];
    let mut big = vec![0u8; size.saturating_sub(4096).min(12 << 10) as usize];
    type Op<'a> = Box<dyn FnMut(&mut NbdClient) -> Result<usize, block::BlockError> + 'a>;
    let ops: Vec<Op<'_>> = vec![
        Box::new(|c| c.read_at(0, &mut buf).map(|()| 0)),
        Box::new(|c| c.read_at(4096, &mut big).map(|()| 0)),
        Box::new(move |c| {
            if meta {
                c.block_status(0, size.min(1 << 20) as u32).map(|e| e.len())
            } else {
                Ok(0)
            }
        }),
        Box::new(|c| {
            c.write_at(0, &[0x5a; 512][..size.min(512) as usize])
                .map(|()| 0)
        }),
        Box::new(|c| c.write_zeroes(0, size.min(8192), true).map(|()| 0)),
        Box::new(|c| c.trim(0, size.min(8192)).map(|()| 0)),
        Box::new(|c| c.flush_export().map(|()| 0)),
    ];
    for mut op in ops {
        match op(c) {
            Ok(n) => {
                out.extents += n;
                out.requests.push(Ok(()));
            }
            Err(e) => {
                assert!(
                    matches!(e, block::BlockError::Io(_)),
                    "a request failed with {e:?}, not an I/O error"
                );
                out.requests.push(Err(e.to_string()));
                if c.is_broken() {
                    // The driver drops a broken connection.
                    return;
                }
            }
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Checks what a negotiated client sent (module doc); returns the number of requests.
fn check_sent(sent: &[u8], size: u64, flags: u16) -> usize {
    let cflags = be32(sent, 0).expect("a negotiated client sent its flags");
    assert!(cflags & !3 == 0, "client flags {cflags:#x}");
    let mut at = 4;
    while be64(sent, at) == Some(IHAVEOPT) {
        let o = be32(sent, at + 8).expect("option");
        let len = be32(sent, at + 12).expect("option length") as usize;
        assert!(
            matches!(
                o,
                opt::STRUCTURED_REPLY | opt::SET_META_CONTEXT | opt::GO | opt::ABORT
            ),
            "the client sent option {o}"
        );
        at += 16 + len;
        assert!(at <= sent.len(), "option {o} cut short");
    }
    let mut handles = BTreeSet::new();
    let mut n = 0;
    while at < sent.len() {
        let magic = be32(sent, at).expect("request magic");
        assert_eq!(magic, REQUEST_MAGIC, "request {n} at byte {at}");
        let kind = be16(sent, at + 6).expect("request type");
        let handle = be64(sent, at + 8).expect("handle");
        let offset = be64(sent, at + 16).expect("offset");
        let len = u64::from(be32(sent, at + 24).expect("length"));
        at += 28;
        n += 1;
        assert!(handles.insert(handle), "handle {handle} used twice");
        match kind {
            cmd::READ | cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM | cmd::BLOCK_STATUS => {
                assert!(
                    offset.checked_add(len).is_some_and(|e| e <= size),
                    "request {kind} for {offset}+{len} past the export's {size} bytes"
                );
            }
            cmd::FLUSH | cmd::DISC => {}
            k => panic!("the client sent request type {k}"),
        }
        if matches!(kind, cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM) {
            assert!(
                flags & tflag::READ_ONLY == 0,
                "request {kind} to a read-only export"
            );
        }
        if kind == cmd::WRITE {
            at += len as usize;
            assert!(at <= sent.len(), "write payload cut short");
        }
    }
    n
}
