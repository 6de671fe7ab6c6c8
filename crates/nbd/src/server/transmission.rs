//! Transmission: the requests of a negotiated client (read, write, zeroes, trim, flush,
//! cache, block status, disconnect), each checked against the export before it touches the
//! node, answered with simple or structured replies.

use super::negotiation::Negotiated;
use super::{Conn, Export, MAX_EXTENTS, META_ID_BASE_ALLOCATION, META_ID_DIRTY_BITMAP};
use crate::proto::{self, cflag, chunk, cmd, err, state, ProtoError, Request};
use block::BlockError;
use std::io::Read;
use std::sync::atomic::Ordering;

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

pub(super) fn transmission(
    export: &Export,
    neg: &Negotiated,
    c: &mut Conn,
) -> Result<(), ProtoError> {
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
        // first so the stream stays in step (an oversized one is refused unread, and the
        // client disconnected).
        if req.kind == cmd::WRITE {
            if req.len > proto::MAX_BUFFER_SIZE {
                // Refused before its payload is read, which leaves the stream out of step: as
                // QEMU 7.2's server, answer, then disconnect.
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
                return Err(ProtoError::Protocol(
                    "Request handling failed in intermediate state".into(),
                ));
            }
            // The buffer grows with what arrives, not with what the header announced: a
            // client that announces 32 MiB and sends a few bytes costs a few bytes.
            buf.clear();
            let want = u64::from(req.len);
            let got = (&mut c.r)
                .take(want)
                .read_to_end(&mut buf)
                .map_err(|source| ProtoError::Io {
                    what: "write payload",
                    source,
                })?;
            if got as u64 != want {
                return Err(ProtoError::Io {
                    what: "write payload",
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
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
    // QEMU 7.2's checks, in its order (nbd_co_receive_request, then nbd_handle_request):
    // the buffer size, the read-only export, the bounds (of every command, FLUSH included),
    // the flags, and last the type.
    if matches!(req.kind, cmd::READ | cmd::WRITE | cmd::CACHE) && req.len > proto::MAX_BUFFER_SIZE {
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
    check_bounds(export, req)?;
    let mut valid = cflag::FUA;
    match req.kind {
        cmd::READ if neg.structured => valid |= cflag::DF,
        cmd::WRITE_ZEROES => valid |= cflag::NO_HOLE,
        cmd::BLOCK_STATUS => valid |= cflag::REQ_ONE,
        _ => {}
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
    if !matches!(
        req.kind,
        cmd::READ
            | cmd::WRITE
            | cmd::FLUSH
            | cmd::TRIM
            | cmd::CACHE
            | cmd::WRITE_ZEROES
            | cmd::BLOCK_STATUS
    ) {
        return Err(ReqError::new(
            err::EINVAL,
            format!("invalid request type ({}) received", req.kind),
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
