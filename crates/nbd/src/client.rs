//! The NBD client: fixed newstyle negotiation (`STRUCTURED_REPLY`, `SET_META_CONTEXT`, `GO`
//! with block sizes), requests with simple or structured replies, and [`NbdDriver`], the
//! `nbd` block driver that `blockdev-add` opens through the block layer's driver registry.
//!
//! Requests are sent one at a time on one connection (the connection's mutex is held for the
//! request and its reply, which is the driver's own lock and waits only for the server, or,
//! while the connection is being made again, for as long as `reconnect-delay` allows).
//! Reconnection, `reconnect-delay` and `open-timeout` are QEMU 7.2's: see the `reconnect` module.
//! Everything the server sends is checked: magic numbers, cookies, chunk lengths against the
//! request, offsets inside the requested range.
//!
//! TLS as QEMU's client does it: with `tls-creds` (client credentials) the client asks for
//! `NBD_OPT_STARTTLS` before any other option and runs the rest of the connection inside the
//! session; the server's certificate must carry `tls-hostname` (by default the host of an
//! inet address; no name check over a unix socket unless one is given).

use crate::address::SocketAddress;
use crate::proto::{self, cflag, chunk, cmd, info, opt, rep, tflag, Cursor, ProtoError, Request};
use crate::reconnect::{Breakage, Canceller, Conn, ConnectFn, Connector, Link, Wait};
use block::driver::{BlockDriver, DriverInfo, FilenameInfo};
use block::{BlockError, BlockLayer, BlockNode};
use net::Stream;
use nix::errno::Errno;
use serde_json::{json, Map, Value};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Largest option reply the client accepts.
const MAX_OPTION_REPLY: u64 = 64 << 10;

/// An extent reported by `NBD_CMD_BLOCK_STATUS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u32,
    /// Status flags of the context.
    pub flags: u32,
}

/// What to negotiate.
#[derive(Clone, Default)]
pub struct ConnectOptions {
    /// Export name.
    pub export: String,
    /// Meta context to select (e.g. `qemu:dirty-bitmap:b0`), if any.
    pub meta_context: Option<String>,
    /// TLS: the client credentials, and the name the server's certificate must carry.
    pub tls: Option<(Arc<tls::TlsCreds>, Option<String>)>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("export", &self.export)
            .field("meta_context", &self.meta_context)
            .field("tls", &self.tls.as_ref().map(|(_, host)| host))
            .finish()
    }
}

/// One direction of the connection: the socket, or the TLS session over it.
type Reader = Box<dyn Read + Send>;
/// See [`Reader`].
type Writer = Box<dyn Write + Send>;

/// A connected, negotiated NBD client.
pub struct NbdClient {
    /// The socket itself (the TLS handshake and the TLS writer's sends and peer probe need it).
    sock: Stream,
    r: BufReader<Reader>,
    w: BufWriter<Writer>,
    size: u64,
    flags: u16,
    structured: bool,
    max_block: u32,
    /// The connection broke (`Io`) or the server broke the protocol (`Fatal`): it is out of
    /// step and must not be used again.
    broken: Option<Breakage>,
    meta_context_id: Option<u32>,
    next_handle: u64,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish()
    }
}

fn perr(e: String) -> ProtoError {
    ProtoError::Protocol(e)
}

/// An option reply: type and payload.
struct OptReply {
    kind: u32,
    data: Vec<u8>,
}

impl NbdClient {
    /// Connects to `addr` and negotiates `opts`.
    pub fn connect(addr: &SocketAddress, opts: &ConnectOptions) -> Result<Self, ProtoError> {
        let s = addr.connect().map_err(|source| ProtoError::Io {
            what: "connect",
            source,
        })?;
        Self::over(s, opts)
    }

    /// Negotiates `opts` on `s`, a stream already connected to a server (what
    /// [`connect`](Self::connect) does once connected; the fuzzing harness hands it one end of
    /// a socket pair).
    pub fn over(s: Stream, opts: &ConnectOptions) -> Result<Self, ProtoError> {
        let io = |source| ProtoError::Io {
            what: "socket",
            source,
        };
        let rs = s.try_clone().map_err(io)?;
        let ws = s.try_clone().map_err(io)?;
        let mut c = NbdClient {
            sock: s,
            r: BufReader::with_capacity(256 << 10, Box::new(rs)),
            w: BufWriter::with_capacity(256 << 10, Box::new(ws)),
            size: 0,
            flags: 0,
            structured: false,
            max_block: proto::MAX_BUFFER_SIZE,
            broken: None,
            meta_context_id: None,
            next_handle: 1,
        };
        c.negotiate(opts)?;
        Ok(c)
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }
    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    fn send(&mut self, b: &[u8]) -> Result<(), ProtoError> {
        proto::write_all(&mut self.w, b, "request")
    }
    fn flush(&mut self) -> Result<(), ProtoError> {
        self.w.flush().map_err(|source| ProtoError::Io {
            what: "request",
            source,
        })
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), ProtoError> {
        let len = u32::try_from(data.len()).map_err(|_| perr("option too long".into()))?;
        self.send(&proto::option_header(option, len))?;
        self.send(data)?;
        self.flush()
    }

    fn read_option_reply(&mut self, option: u32) -> Result<OptReply, ProtoError> {
        let magic = proto::read_u64(&mut self.r, "option reply magic")?;
        if magic != proto::REP_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                got: magic,
                expected: proto::REP_MAGIC,
            });
        }
        let o = proto::read_u32(&mut self.r, "option reply")?;
        if o != option {
            return Err(perr(format!(
                "Unexpected option type {o} ({}), expected {option} ({})",
                opt::name(o),
                opt::name(option)
            )));
        }
        let kind = proto::read_u32(&mut self.r, "option reply type")?;
        let len = proto::read_u32(&mut self.r, "option reply length")?;
        let data = proto::read_vec(
            &mut self.r,
            u64::from(len),
            MAX_OPTION_REPLY,
            "option reply payload",
        )?;
        Ok(OptReply { kind, data })
    }

    fn option_error(option: u32, r: &OptReply) -> ProtoError {
        let msg = String::from_utf8_lossy(&r.data);
        if r.kind == rep::ERR_TLS_REQD {
            // QEMU's words and hint: the server wants TLS and this client has no credentials.
            return perr(format!(
                "TLS negotiation required before option {option} ({}): {msg}; \
                 did you forget a valid tls-creds?",
                opt::name(option)
            ));
        }
        let what = match r.kind {
            rep::ERR_UNSUP => "unsupported",
            rep::ERR_POLICY => "denied by policy",
            rep::ERR_INVALID => "invalid",
            rep::ERR_PLATFORM => "platform lacks support",
            rep::ERR_TLS_REQD => "TLS required",
            rep::ERR_UNKNOWN => "export not present",
            rep::ERR_SHUTDOWN => "server shutting down",
            rep::ERR_BLOCK_SIZE_REQD => "block size required",
            rep::ERR_TOO_BIG => "too big",
            _ => "error",
        };
        perr(format!(
            "Option '{}' failed ({what}): {msg}",
            opt::name(option)
        ))
    }

    fn negotiate(&mut self, opts: &ConnectOptions) -> Result<(), ProtoError> {
        let magic = proto::read_u64(&mut self.r, "server magic")?;
        if magic != proto::NBDMAGIC {
            return Err(ProtoError::BadMagic {
                what: "server greeting",
                got: magic,
                expected: proto::NBDMAGIC,
            });
        }
        let magic = proto::read_u64(&mut self.r, "server magic")?;
        if magic != proto::IHAVEOPT {
            return Err(perr(format!(
                "Server does not speak newstyle negotiation (magic {magic:#x})"
            )));
        }
        let sflags = proto::read_u16(&mut self.r, "server flags")?;
        if sflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(perr("Server does not support fixed newstyle".into()));
        }
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if sflags & proto::FLAG_NO_ZEROES != 0 {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        self.send(&cflags.to_be_bytes())?;

        if let Some((creds, hostname)) = &opts.tls {
            self.start_tls(creds, hostname.as_deref())?;
        }

        self.send_option(opt::STRUCTURED_REPLY, &[])?;
        let r = self.read_option_reply(opt::STRUCTURED_REPLY)?;
        // As QEMU's client: any refusal here only means simple replies (a server that wants
        // TLS first says so again, fatally, to GO).
        self.structured = r.kind == rep::ACK;

        let name = opts.export.as_bytes();
        if name.len() > proto::MAX_STRING_SIZE as usize {
            return Err(perr("export name too long".into()));
        }
        if let Some(ctx) = &opts.meta_context {
            if !self.structured {
                return Err(perr(
                    "Server does not support structured replies, needed for meta contexts".into(),
                ));
            }
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name);
            d.extend_from_slice(&1u32.to_be_bytes());
            d.extend_from_slice(&(ctx.len() as u32).to_be_bytes());
            d.extend_from_slice(ctx.as_bytes());
            self.send_option(opt::SET_META_CONTEXT, &d)?;
            loop {
                let r = self.read_option_reply(opt::SET_META_CONTEXT)?;
                match r.kind {
                    rep::ACK => break,
                    rep::META_CONTEXT => {
                        let mut cur = Cursor::new(&r.data, "meta context reply");
                        let id = cur.u32()?;
                        let got = String::from_utf8_lossy(cur.bytes(cur.remaining())?);
                        if got != *ctx {
                            return Err(perr(format!(
                                "Server replied with unexpected meta context '{got}'"
                            )));
                        }
                        self.meta_context_id = Some(id);
                    }
                    k if rep::is_err(k) => {
                        return Err(Self::option_error(opt::SET_META_CONTEXT, &r))
                    }
                    k => return Err(perr(format!("Unexpected reply type {k} to meta context"))),
                }
            }
            if self.meta_context_id.is_none() {
                return Err(perr(format!("requested x-dirty-bitmap {ctx} not found")));
            }
        }

        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name);
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        self.send_option(opt::GO, &d)?;
        let mut got_export = false;
        loop {
            let r = self.read_option_reply(opt::GO)?;
            match r.kind {
                rep::ACK => break,
                rep::INFO => {
                    let mut cur = Cursor::new(&r.data, "info reply");
                    match cur.u16()? {
                        info::EXPORT => {
                            self.size = cur.u64()?;
                            self.flags = cur.u16()?;
                            got_export = true;
                        }
                        info::BLOCK_SIZE => {
                            let _min = cur.u32()?;
                            let _pref = cur.u32()?;
                            let max = cur.u32()?;
                            if max > 0 {
                                self.max_block = max.min(proto::MAX_BUFFER_SIZE);
                            }
                        }
                        _ => {}
                    }
                }
                k if rep::is_err(k) => return Err(Self::option_error(opt::GO, &r)),
                k => return Err(perr(format!("Unexpected reply type {k} to go"))),
            }
        }
        if !got_export {
            return Err(perr("Server did not send export info".into()));
        }
        if self.size > i64::MAX as u64 {
            return Err(perr(format!("Export size {} is too large", self.size)));
        }
        Ok(())
    }

    /// `NBD_OPT_STARTTLS`, then the handshake; the connection continues inside the session.
    fn start_tls(
        &mut self,
        creds: &tls::TlsCreds,
        hostname: Option<&str>,
    ) -> Result<(), ProtoError> {
        self.send_option(opt::STARTTLS, &[])?;
        let r = self.read_option_reply(opt::STARTTLS)?;
        match r.kind {
            rep::ACK if r.data.is_empty() => {}
            rep::ACK => return Err(perr("Server sent data with its STARTTLS reply".into())),
            rep::ERR_UNSUP => {
                // QEMU's words (sic).
                let _ = self.send_option(opt::ABORT, &[]);
                return Err(perr("Server don't support STARTTLS option".into()));
            }
            k if rep::is_err(k) => return Err(Self::option_error(opt::STARTTLS, &r)),
            k => return Err(perr(format!("Unexpected reply type {k} to starttls"))),
        }
        if !self.r.buffer().is_empty() {
            return Err(perr("the server sent data before the TLS handshake".into()));
        }
        let io = |source| ProtoError::Io {
            what: "socket",
            source,
        };
        let rs = self.sock.try_clone().map_err(io)?;
        let ws = self.sock.try_clone().map_err(io)?;
        let mut st = tls::connect(creds, hostname, rs, ws)
            .map_err(|e| ProtoError::Protocol(e.to_string()))?;
        let probe = st.writer.set_socket(self.sock.as_fd());
        probe.map_err(io)?;
        self.r = BufReader::with_capacity(256 << 10, Box::new(st.reader));
        self.w = BufWriter::with_capacity(256 << 10, Box::new(st.writer));
        Ok(())
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> Result<u64, ProtoError> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        self.send(
            &Request {
                flags,
                kind,
                handle,
                offset,
                len,
            }
            .encode(),
        )?;
        Ok(handle)
    }

    /// Reads the reply to `handle`. `data`: where a read's payload goes (its length is the
    /// request's). `extents`: where block status goes. The outer error is a broken connection;
    /// the inner one the server's error for this request.
    fn reply(
        &mut self,
        handle: u64,
        offset: u64,
        mut data: Option<&mut [u8]>,
        mut extents: Option<&mut Vec<Extent>>,
    ) -> Result<Result<(), (u32, String)>, ProtoError> {
        let magic = proto::read_u32(&mut self.r, "reply magic")?;
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let error = proto::read_u32(&mut self.r, "reply error")?;
            let h = proto::read_u64(&mut self.r, "reply handle")?;
            if h != handle {
                return Err(perr(format!("Reply for unexpected handle {h:#x}")));
            }
            if error != 0 {
                return Ok(Err((error, String::new())));
            }
            if let Some(d) = data {
                proto::read_exact(&mut self.r, d, "read payload")?;
            }
            return Ok(Ok(()));
        }
        if magic != proto::STRUCTURED_REPLY_MAGIC || !self.structured {
            return Err(ProtoError::BadMagic {
                what: "reply",
                got: u64::from(magic),
                expected: u64::from(proto::SIMPLE_REPLY_MAGIC),
            });
        }
        let mut result = Ok(());
        loop {
            let flags = proto::read_u16(&mut self.r, "chunk flags")?;
            let kind = proto::read_u16(&mut self.r, "chunk type")?;
            let h = proto::read_u64(&mut self.r, "chunk handle")?;
            let len = proto::read_u32(&mut self.r, "chunk length")?;
            if h != handle {
                return Err(perr(format!("Chunk for unexpected handle {h:#x}")));
            }
            let data_len = data.as_ref().map_or(0, |d| d.len() as u64);
            match kind {
                chunk::NONE => {
                    if len != 0 || flags & chunk::FLAG_DONE == 0 {
                        return Err(perr("Bad NBD_REPLY_TYPE_NONE chunk".into()));
                    }
                }
                chunk::OFFSET_DATA => {
                    let Some(d) = data.as_deref_mut() else {
                        return Err(perr("Data chunk in reply to a non-read".into()));
                    };
                    if len < 8 {
                        return Err(perr("Too short data chunk".into()));
                    }
                    let off = proto::read_u64(&mut self.r, "chunk offset")?;
                    let n = u64::from(len - 8);
                    let start = off
                        .checked_sub(offset)
                        .filter(|s| s.checked_add(n).is_some_and(|e| e <= data_len));
                    let Some(start) = start else {
                        return Err(perr(format!(
                            "Data chunk at {off}+{n} outside the request at {offset}+{data_len}"
                        )));
                    };
                    let dst = d
                        .get_mut(start as usize..(start + n) as usize)
                        .ok_or_else(|| perr("bad data chunk".into()))?;
                    proto::read_exact(&mut self.r, dst, "read payload")?;
                }
                chunk::OFFSET_HOLE => {
                    let Some(d) = data.as_deref_mut() else {
                        return Err(perr("Hole chunk in reply to a non-read".into()));
                    };
                    if len != 12 {
                        return Err(perr("Bad hole chunk length".into()));
                    }
                    let off = proto::read_u64(&mut self.r, "chunk offset")?;
                    let n = u64::from(proto::read_u32(&mut self.r, "hole size")?);
                    let start = off
                        .checked_sub(offset)
                        .filter(|s| s.checked_add(n).is_some_and(|e| e <= data_len));
                    let Some(start) = start else {
                        return Err(perr("Hole chunk outside the request".into()));
                    };
                    if let Some(dst) = d.get_mut(start as usize..(start + n) as usize) {
                        dst.fill(0);
                    }
                }
                chunk::BLOCK_STATUS => {
                    let payload = proto::read_vec(
                        &mut self.r,
                        u64::from(len),
                        u64::from(proto::MAX_BUFFER_SIZE),
                        "block status chunk",
                    )?;
                    let mut cur = Cursor::new(&payload, "block status chunk");
                    let id = cur.u32()?;
                    if !cur.remaining().is_multiple_of(8) || cur.remaining() == 0 {
                        return Err(perr("Bad block status chunk length".into()));
                    }
                    let wanted = self.meta_context_id == Some(id);
                    while cur.remaining() > 0 {
                        let e = Extent {
                            len: cur.u32()?,
                            flags: cur.u32()?,
                        };
                        if let (true, Some(x)) = (wanted, extents.as_deref_mut()) {
                            x.push(e);
                        }
                    }
                }
                k if chunk::is_err(k) => {
                    let payload = proto::read_vec(
                        &mut self.r,
                        u64::from(len),
                        u64::from(proto::MAX_STRING_SIZE) + 16,
                        "error chunk",
                    )?;
                    let mut cur = Cursor::new(&payload, "error chunk");
                    let error = cur.u32()?;
                    let mlen = cur.u16()?;
                    let msg = String::from_utf8_lossy(cur.bytes(usize::from(mlen))?).into_owned();
                    if error == 0 {
                        return Err(perr("Server sent an error chunk without an error".into()));
                    }
                    if result.is_ok() {
                        result = Err((error, msg));
                    }
                }
                k => {
                    return Err(perr(format!("Unknown structured reply chunk type {k}")));
                }
            }
            if flags & chunk::FLAG_DONE != 0 {
                return Ok(result);
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        match offset.checked_add(len) {
            Some(e) if e <= self.size => Ok(()),
            _ => Err(BlockError::Io(Errno::EIO)),
        }
    }

    fn simple_cmd(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: Option<&[u8]>,
    ) -> Result<(), BlockError> {
        let r = (|| {
            let h = self.request(kind, flags, offset, len)?;
            if let Some(p) = payload {
                self.send(p)?;
            }
            self.flush()?;
            self.reply(h, offset, None, None)
        })();
        self.finish(r)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check(offset, buf.len() as u64)?;
        let max = self.max_block as usize;
        let mut done = 0usize;
        for piece in buf.chunks_mut(max.max(1)) {
            let off = offset + done as u64;
            let n = piece.len();
            let r = (|| {
                let h = self.request(cmd::READ, 0, off, n as u32)?;
                self.flush()?;
                self.reply(h, off, Some(piece), None)
            })();
            self.finish(r)?;
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.check(offset, buf.len() as u64)?;
        self.check_writable()?;
        let max = self.max_block as usize;
        let mut done = 0usize;
        for piece in buf.chunks(max.max(1)) {
            let off = offset + done as u64;
            self.simple_cmd(cmd::WRITE, 0, off, piece.len() as u32, Some(piece))?;
            done += piece.len();
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<(), BlockError> {
        if self.flags & tflag::READ_ONLY != 0 {
            return Err(BlockError::Io(Errno::EPERM));
        }
        Ok(())
    }

    /// Zeroes a range (`NBD_CMD_WRITE_ZEROES`, or plain writes where the server lacks it).
    pub fn write_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), BlockError> {
        self.check(offset, len)?;
        self.check_writable()?;
        let step = u64::from(!0xfffu32);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(step);
            if self.flags & tflag::SEND_WRITE_ZEROES != 0 {
                let flags = if may_unmap { 0 } else { cflag::NO_HOLE };
                self.simple_cmd(cmd::WRITE_ZEROES, flags, offset + done, n as u32, None)?;
            } else {
                let zeroes = vec![0u8; (n.min(1 << 20)) as usize];
                let mut d = 0u64;
                while d < n {
                    let m = (n - d).min(zeroes.len() as u64) as usize;
                    self.write_at(offset + done + d, zeroes.get(..m).unwrap_or_default())?;
                    d += m as u64;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Discards a range (a no-op where the server lacks `TRIM`).
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(offset, len)?;
        self.check_writable()?;
        if self.flags & tflag::SEND_TRIM == 0 {
            return Ok(());
        }
        let step = u64::from(!0xfffu32);
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(step);
            self.simple_cmd(cmd::TRIM, 0, offset + done, n as u32, None)?;
            done += n;
        }
        Ok(())
    }

    /// Flushes (a no-op where the server lacks `FLUSH`).
    pub fn flush_export(&mut self) -> Result<(), BlockError> {
        if self.flags & tflag::SEND_FLUSH == 0 {
            return Ok(());
        }
        self.simple_cmd(cmd::FLUSH, 0, 0, 0, None)
    }

    /// Block status of the negotiated meta context over `[offset, offset+len)`.
    pub fn block_status(&mut self, offset: u64, len: u32) -> Result<Vec<Extent>, BlockError> {
        self.check(offset, u64::from(len))?;
        if self.meta_context_id.is_none() {
            return Err(BlockError::Io(Errno::ENOTSUP));
        }
        let mut out = Vec::new();
        let r = (|| {
            let h = self.request(cmd::BLOCK_STATUS, 0, offset, len)?;
            self.flush()?;
            self.reply(h, offset, None, Some(&mut out))
        })();
        self.finish(r)?;
        Ok(out)
    }

    /// Turns a reply into the request's result; a broken connection marks the client unusable
    /// (how it broke tells the driver whether to reconnect) and fails with `EIO`.
    fn finish(
        &mut self,
        r: Result<Result<(), (u32, String)>, ProtoError>,
    ) -> Result<(), BlockError> {
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err((code, _msg))) => {
                Err(BlockError::Io(Errno::from_raw(proto::nbd_to_errno(code))))
            }
            Err(e) => {
                self.broken = Some(match e {
                    ProtoError::Io { .. } => Breakage::Io,
                    _ => Breakage::Fatal,
                });
                Err(BlockError::Io(Errno::EIO))
            }
        }
    }

    /// Whether the connection is unusable.
    pub fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    /// Sends `NBD_CMD_DISC`.
    pub fn disconnect(mut self) {
        let _ = self.request(cmd::DISC, 0, 0, 0);
        let _ = self.flush();
    }
}

impl Conn for NbdClient {
    fn breakage(&self) -> Option<Breakage> {
        self.broken
    }
    fn close(self) {
        self.disconnect();
    }
}

/// How the `nbd` driver times its connections (`BlockdevOptionsNbd`'s members of that name).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// `reconnect-delay`: how long requests wait for a broken connection to be made again
    /// before they fail (zero: they do not wait).
    pub reconnect_delay: Duration,
    /// `open-timeout`: how long the open retries its first connection (zero: one attempt).
    pub open_timeout: Duration,
}

/// QEMU's first pause between connection attempts.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// QEMU's text for a failed connect: the address as QEMU writes it and the system's error.
fn connect_error(addr: &SocketAddress, e: &ProtoError) -> String {
    let at = match addr {
        SocketAddress::Unix(p) => p.display().to_string(),
        SocketAddress::Inet { host, port } => format!("{host}:{port}"),
    };
    match e {
        ProtoError::Io {
            what: "connect",
            source,
        } => match source.raw_os_error() {
            Some(n) => format!("Failed to connect to '{at}': {}", Errno::from_raw(n).desc()),
            None => format!("Failed to connect to '{at}': {source}"),
        },
        e => format!("Failed to connect to '{at}': {e}"),
    }
}

/// The `nbd` block driver: a node whose bytes live in a remote export.
pub struct NbdDriver {
    conn: Mutex<Link<NbdClient>>,
    /// Stops a request's wait for a reconnect without the lock it holds.
    canceller: Canceller,
    size: u64,
    addr: SocketAddress,
    export: String,
    read_only: bool,
    /// `tls-creds` and `tls-hostname` as given (they are part of the node's options).
    tls_ids: Option<(String, Option<String>)>,
}

impl std::fmt::Debug for NbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDriver")
            .field("addr", &self.addr)
            .field("export", &self.export)
            .finish()
    }
}

impl NbdDriver {
    /// Connects to `export` at `addr`, inside TLS when `tls` gives client credentials (and
    /// the name the server's certificate must carry), with QEMU's defaults for the timing
    /// (one attempt; requests do not wait for a reconnect).
    pub fn open(
        addr: SocketAddress,
        export: &str,
        read_only: bool,
        tls: Option<(Arc<tls::TlsCreds>, Option<String>)>,
    ) -> Result<Self, BlockError> {
        Self::open_timed(addr, export, read_only, tls, Timing::default())
    }

    /// [`open`](Self::open) with `reconnect-delay` and `open-timeout` as `timing` says.
    pub fn open_timed(
        addr: SocketAddress,
        export: &str,
        read_only: bool,
        tls: Option<(Arc<tls::TlsCreds>, Option<String>)>,
        timing: Timing,
    ) -> Result<Self, BlockError> {
        let opts = ConnectOptions {
            export: export.to_string(),
            meta_context: None,
            tls,
        };
        let at = addr.clone();
        let connect: ConnectFn<NbdClient> =
            Arc::new(move || NbdClient::connect(&at, &opts).map_err(|e| connect_error(&at, &e)));
        let connector = Connector::new(connect, RETRY_PAUSE);
        let wait = if timing.open_timeout.is_zero() {
            Wait::Done
        } else {
            connector.enable_retry();
            Wait::Until(Instant::now() + timing.open_timeout)
        };
        let c = connector.establish(wait).map_err(BlockError::Driver)?;
        // As QEMU's nbd_handle_updated_info, at the open and at every reconnect.
        let check = move |c: &NbdClient| {
            if !read_only && c.flags() & tflag::READ_ONLY != 0 {
                Err("NBD export is read-only".to_string())
            } else {
                Ok(())
            }
        };
        if let Err(e) = check(&c) {
            c.disconnect();
            return Err(BlockError::Driver(e));
        }
        let link_size = c.size();
        let link = Link::new(c, timing.reconnect_delay, connector, Box::new(check));
        Ok(NbdDriver {
            size: link_size,
            canceller: link.canceller(),
            conn: Mutex::new(link),
            addr,
            export: export.to_string(),
            read_only,
            tls_ids: None,
        })
    }

    /// Parses the `nbd` driver's `blockdev-add` members (`server`, `export`, and QEMU's
    /// optional ones) and connects; `tls-creds` names client credentials in `objects`.
    pub fn from_options(
        m: &Map<String, Value>,
        read_only: bool,
        objects: &tls::Objects,
    ) -> Result<Self, BlockError> {
        const KNOWN: &[&str] = &[
            "server",
            "export",
            "tls-creds",
            "tls-hostname",
            "x-dirty-bitmap",
            "reconnect-delay",
            "open-timeout",
        ];
        for k in m.keys() {
            if !KNOWN.contains(&k.as_str()) {
                return Err(BlockError::UnexpectedParameter(k.clone()));
            }
        }
        let server = m
            .get("server")
            .ok_or_else(|| BlockError::MissingParameter("server".into()))?;
        let addr = SocketAddress::from_json(server, "server.", false).map_err(|e| match e {
            crate::address::AddressError::Missing(p) => BlockError::MissingParameter(p),
            crate::address::AddressError::Unexpected(p) => BlockError::UnexpectedParameter(p),
            crate::address::AddressError::Type(p, t) => BlockError::InvalidParameterType {
                name: p,
                expected: t.to_string(),
            },
            crate::address::AddressError::BadType(p, v) => {
                BlockError::ParameterValueRejected { name: p, value: v }
            }
        })?;
        let export = match m.get("export") {
            None => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(BlockError::InvalidParameterType {
                    name: "export".into(),
                    expected: "string".into(),
                })
            }
        };
        let string = |key: &str| match m.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(BlockError::InvalidParameterType {
                name: key.into(),
                expected: "string".into(),
            }),
        };
        let creds_id = string("tls-creds")?;
        let hostname = string("tls-hostname")?;
        let tls = match &creds_id {
            // As QEMU: tls-hostname means nothing without tls-creds.
            None => None,
            Some(id) => {
                let creds = objects
                    .tls_creds(id, tls::Endpoint::Client)
                    .map_err(|e| BlockError::Driver(e.to_string()))?;
                let name = hostname.clone().or_else(|| match &addr {
                    SocketAddress::Inet { host, .. } => Some(host.clone()),
                    SocketAddress::Unix(_) => None,
                });
                Some((creds, name))
            }
        };
        if m.get("x-dirty-bitmap").is_some() {
            return Err(BlockError::Unsupported(
                "x-dirty-bitmap is not supported by this nbd driver".into(),
            ));
        }
        let seconds = |key: &str| -> Result<Duration, BlockError> {
            let n = match m.get(key) {
                None => return Ok(Duration::ZERO),
                Some(Value::Number(n)) => n.as_u64().or_else(|| n.as_i64().map(|_| u64::MAX)),
                Some(Value::String(s)) => block::options::parse_c_u64(s),
                Some(_) => None,
            };
            let n = n.ok_or_else(|| BlockError::InvalidParameterValue {
                name: key.into(),
                expected: "uint64".into(),
            })?;
            let n = u32::try_from(n).map_err(|_| BlockError::InvalidParameterValue {
                name: key.into(),
                expected: "uint32_t".into(),
            })?;
            Ok(Duration::from_secs(u64::from(n)))
        };
        let timing = Timing {
            reconnect_delay: seconds("reconnect-delay")?,
            open_timeout: seconds("open-timeout")?,
        };
        let mut d = Self::open_timed(addr, &export, read_only, tls, timing)?;
        d.tls_ids = creds_id.map(|c| (c, hostname));
        Ok(d)
    }

    fn with<R>(
        &self,
        f: impl FnMut(&mut NbdClient) -> Result<R, BlockError>,
    ) -> Result<R, BlockError> {
        // A request that met a broken connection may run again on the next one.
        self.conn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .run(f)
    }
}

impl BlockDriver for NbdDriver {
    fn format_name(&self) -> &'static str {
        "nbd"
    }
    fn length(&self) -> Result<u64, BlockError> {
        Ok(self.size)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.with(|c| c.read_at(offset, buf))
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.with(|c| c.write_at(offset, buf))
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.with(|c| c.write_zeroes(offset, len, may_unmap))
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.with(|c| c.trim(offset, len))
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.with(|c| c.flush_export())
    }
    fn cancel_in_flight(&self) {
        self.canceller.cancel();
    }
    fn truncate(&self, _size: u64) -> Result<(), BlockError> {
        Err(BlockError::ResizeUnsupported)
    }
    fn info(&self) -> Option<DriverInfo> {
        None
    }
    fn allocated_size(&self) -> u64 {
        0
    }
    fn children(&self) -> Vec<(&'static str, Arc<BlockNode>)> {
        Vec::new()
    }
    fn filename(&self) -> FilenameInfo {
        let exact = match &self.addr {
            SocketAddress::Unix(p) => format!("nbd+unix:///{}?socket={}", self.export, p.display()),
            SocketAddress::Inet { host, port } => {
                format!("nbd://{host}:{port}/{}", self.export)
            }
        };
        let mut options = Map::new();
        options.insert("driver".into(), json!("nbd"));
        options.insert("server".into(), self.addr.to_json());
        options.insert("export".into(), json!(self.export));
        if let Some((creds, hostname)) = &self.tls_ids {
            options.insert("tls-creds".into(), json!(creds));
            if let Some(h) = hostname {
                options.insert("tls-hostname".into(), json!(h));
            }
        }
        let _ = self.read_only;
        FilenameInfo {
            exact: Some(exact),
            options,
        }
    }
}

impl Drop for NbdDriver {
    fn drop(&mut self) {
        if let Some(c) = self
            .conn
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            c.disconnect();
        }
    }
}

/// Registers the `nbd` driver with the block layer, so `blockdev-add` can open it; its
/// `tls-creds` are looked up in `objects` (the process's `-object`/`object-add` objects).
pub fn register_driver(objects: Arc<tls::Objects>) {
    BlockLayer::register_driver(
        "nbd",
        Arc::new(move |m: &Map<String, Value>, read_only: bool| {
            Ok(Box::new(NbdDriver::from_options(m, read_only, &objects)?) as Box<dyn BlockDriver>)
        }),
    );
}
