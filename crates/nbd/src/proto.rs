//! The NBD wire protocol as data: magic numbers, option, reply, command and flag values (the
//! protocol document's names without the `NBD_` prefix), and reading and writing the fixed
//! headers. Everything here is big-endian, as on the wire.
//!
//! Reading never trusts a length: callers pass the limit a length must respect, and a length
//! over it is an error before anything is allocated.

use std::io::{self, Read, Write};
use thiserror::Error;

/// `NBDMAGIC`: the first eight bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub mod opt {
    /// `NBD_OPT_EXPORT_NAME`.
    pub const EXPORT_NAME: u32 = 1;
    /// `NBD_OPT_ABORT`.
    pub const ABORT: u32 = 2;
    /// `NBD_OPT_LIST`.
    pub const LIST: u32 = 3;
    /// `NBD_OPT_STARTTLS`.
    pub const STARTTLS: u32 = 5;
    /// `NBD_OPT_INFO`.
    pub const INFO: u32 = 6;
    /// `NBD_OPT_GO`.
    pub const GO: u32 = 7;
    /// `NBD_OPT_STRUCTURED_REPLY`.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// `NBD_OPT_LIST_META_CONTEXT`.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// `NBD_OPT_SET_META_CONTEXT`.
    pub const SET_META_CONTEXT: u32 = 10;

    /// QEMU's `nbd_opt_lookup` names, used in error messages.
    pub fn name(o: u32) -> &'static str {
        match o {
            EXPORT_NAME => "export name",
            ABORT => "abort",
            LIST => "list",
            4 => "peek export",
            STARTTLS => "starttls",
            INFO => "info",
            GO => "go",
            STRUCTURED_REPLY => "structured reply",
            LIST_META_CONTEXT => "list meta context",
            SET_META_CONTEXT => "set meta context",
            _ => "<unknown>",
        }
    }
}

/// Option reply types.
pub mod rep {
    /// `NBD_REP_ACK`.
    pub const ACK: u32 = 1;
    /// `NBD_REP_SERVER`.
    pub const SERVER: u32 = 2;
    /// `NBD_REP_INFO`.
    pub const INFO: u32 = 3;
    /// `NBD_REP_META_CONTEXT`.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// `NBD_REP_ERR_UNSUP`.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// `NBD_REP_ERR_POLICY`.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// `NBD_REP_ERR_INVALID`.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// `NBD_REP_ERR_PLATFORM`.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// `NBD_REP_ERR_TLS_REQD`.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// `NBD_REP_ERR_UNKNOWN`.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// `NBD_REP_ERR_SHUTDOWN`.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// `NBD_REP_ERR_BLOCK_SIZE_REQD`.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// `NBD_REP_ERR_TOO_BIG`.
    pub const ERR_TOO_BIG: u32 = ERR | 9;

    /// Whether `t` is an error reply.
    pub fn is_err(t: u32) -> bool {
        t & ERR != 0
    }
}

/// `NBD_REP_INFO` types.
pub mod info {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// `NBD_INFO_NAME`.
    pub const NAME: u16 = 1;
    /// `NBD_INFO_DESCRIPTION`.
    pub const DESCRIPTION: u16 = 2;
    /// `NBD_INFO_BLOCK_SIZE`.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    /// `NBD_FLAG_HAS_FLAGS`.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// `NBD_FLAG_READ_ONLY`.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_FLAG_SEND_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_FLAG_SEND_FUA`.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_FLAG_ROTATIONAL`.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_FLAG_SEND_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_FLAG_SEND_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_FLAG_SEND_DF`.
    pub const SEND_DF: u16 = 1 << 7;
    /// `NBD_FLAG_CAN_MULTI_CONN`.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_FLAG_SEND_RESIZE`.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// `NBD_FLAG_SEND_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_FLAG_SEND_FAST_ZERO`.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Commands.
pub mod cmd {
    /// `NBD_CMD_READ`.
    pub const READ: u16 = 0;
    /// `NBD_CMD_WRITE`.
    pub const WRITE: u16 = 1;
    /// `NBD_CMD_DISC`.
    pub const DISC: u16 = 2;
    /// `NBD_CMD_FLUSH`.
    pub const FLUSH: u16 = 3;
    /// `NBD_CMD_TRIM`.
    pub const TRIM: u16 = 4;
    /// `NBD_CMD_CACHE`.
    pub const CACHE: u16 = 5;
    /// `NBD_CMD_WRITE_ZEROES`.
    pub const WRITE_ZEROES: u16 = 6;
    /// `NBD_CMD_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 7;

    /// QEMU's `nbd_cmd_lookup` names.
    pub fn name(c: u16) -> &'static str {
        match c {
            READ => "read",
            WRITE => "write",
            DISC => "disconnect",
            FLUSH => "flush",
            TRIM => "trim",
            CACHE => "cache",
            WRITE_ZEROES => "write zeroes",
            BLOCK_STATUS => "block status",
            _ => "<unknown>",
        }
    }
}

/// Command flags.
pub mod cflag {
    /// `NBD_CMD_FLAG_FUA`.
    pub const FUA: u16 = 1 << 0;
    /// `NBD_CMD_FLAG_NO_HOLE`.
    pub const NO_HOLE: u16 = 1 << 1;
    /// `NBD_CMD_FLAG_DF`.
    pub const DF: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_REQ_ONE`.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `NBD_CMD_FLAG_FAST_ZERO`.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// `NBD_REPLY_FLAG_DONE`.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// `NBD_REPLY_TYPE_NONE`.
    pub const NONE: u16 = 0;
    /// `NBD_REPLY_TYPE_OFFSET_DATA`.
    pub const OFFSET_DATA: u16 = 1;
    /// `NBD_REPLY_TYPE_OFFSET_HOLE`.
    pub const OFFSET_HOLE: u16 = 2;
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`.
    pub const BLOCK_STATUS: u16 = 5;
    /// `NBD_REPLY_TYPE_ERROR`.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// `NBD_REPLY_TYPE_ERROR_OFFSET`.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;

    /// Whether `t` is an error chunk.
    pub fn is_err(t: u16) -> bool {
        t & (1 << 15) != 0
    }
}

/// NBD error values (the protocol's own numbering, which is Linux's).
pub mod err {
    /// `NBD_EPERM`.
    pub const EPERM: u32 = 1;
    /// `NBD_EIO`.
    pub const EIO: u32 = 5;
    /// `NBD_ENOMEM`.
    pub const ENOMEM: u32 = 12;
    /// `NBD_EINVAL`.
    pub const EINVAL: u32 = 22;
    /// `NBD_ENOSPC`.
    pub const ENOSPC: u32 = 28;
    /// `NBD_EOVERFLOW`.
    pub const EOVERFLOW: u32 = 75;
    /// `NBD_ENOTSUP`.
    pub const ENOTSUP: u32 = 95;
    /// `NBD_ESHUTDOWN`.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub mod state {
    /// `NBD_STATE_HOLE`.
    pub const HOLE: u32 = 1 << 0;
    /// `NBD_STATE_ZERO`.
    pub const ZERO: u32 = 1 << 1;
    /// `NBD_STATE_DIRTY` (`qemu:dirty-bitmap:`).
    pub const DIRTY: u32 = 1 << 0;
}

/// The `base:allocation` context name.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// The prefix of QEMU's dirty bitmap contexts.
pub const CONTEXT_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

/// Largest payload of one request or reply: QEMU's `NBD_MAX_BUFFER_SIZE` (32 MiB).
pub const MAX_BUFFER_SIZE: u32 = 32 << 20;
/// Longest export name or string in negotiation (`NBD_MAX_STRING_SIZE`).
pub const MAX_STRING_SIZE: u32 = 4096;
/// Largest option payload a server reads (QEMU refuses bigger ones the same way).
pub const MAX_OPTION_LENGTH: u32 = 64 << 10;

/// Why a peer's bytes could not be used.
#[derive(Debug, Error)]
pub enum ProtoError {
    /// The connection failed or closed.
    #[error("{what}: {source}")]
    Io {
        /// What was being read or written.
        what: &'static str,
        /// The host error.
        source: io::Error,
    },
    /// A magic number was wrong.
    #[error("{what}: bad magic {got:#x} (expected {expected:#x})")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// What arrived.
        got: u64,
        /// What the protocol requires.
        expected: u64,
    },
    /// A length over its limit.
    #[error("{what}: length {len} exceeds the limit of {limit}")]
    TooLong {
        /// Which length.
        what: &'static str,
        /// What arrived.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// Anything else the peer did wrong.
    #[error("{0}")]
    Protocol(String),
}

/// Reads exactly `buf.len()` bytes, naming `what` in the error.
pub fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), ProtoError> {
    r.read_exact(buf)
        .map_err(|source| ProtoError::Io { what, source })
}

/// Writes all of `buf`, naming `what` in the error.
pub fn write_all(w: &mut impl Write, buf: &[u8], what: &'static str) -> Result<(), ProtoError> {
    w.write_all(buf)
        .map_err(|source| ProtoError::Io { what, source })
}

/// Reads a big-endian `u16`.
pub fn read_u16(r: &mut impl Read, what: &'static str) -> Result<u16, ProtoError> {
    let mut b = [0u8; 2];
    read_exact(r, &mut b, what)?;
    Ok(u16::from_be_bytes(b))
}

/// Reads a big-endian `u32`.
pub fn read_u32(r: &mut impl Read, what: &'static str) -> Result<u32, ProtoError> {
    let mut b = [0u8; 4];
    read_exact(r, &mut b, what)?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian `u64`.
pub fn read_u64(r: &mut impl Read, what: &'static str) -> Result<u64, ProtoError> {
    let mut b = [0u8; 8];
    read_exact(r, &mut b, what)?;
    Ok(u64::from_be_bytes(b))
}

/// Reads `len` bytes after checking `len <= limit`.
pub fn read_vec(
    r: &mut impl Read,
    len: u64,
    limit: u64,
    what: &'static str,
) -> Result<Vec<u8>, ProtoError> {
    if len > limit {
        return Err(ProtoError::TooLong { what, len, limit });
    }
    let mut v = vec![0u8; len as usize];
    read_exact(r, &mut v, what)?;
    Ok(v)
}

/// A cursor over a received payload: every read is checked against what is left.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor over `buf`; errors name `what`.
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, what }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.buf.len() {
            return Err(ProtoError::Protocol(format!(
                "{}: truncated (needed {n} more bytes, {} left)",
                self.what,
                self.buf.len()
            )));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    /// The next big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// The next big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// The next big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    /// A `u32` length followed by that many bytes of UTF-8, at most `limit` long.
    pub fn string(&mut self, limit: u32) -> Result<String, ProtoError> {
        let len = self.u32()?;
        if len > limit {
            return Err(ProtoError::TooLong {
                what: self.what,
                len: u64::from(len),
                limit: u64::from(limit),
            });
        }
        let b = self.bytes(len as usize)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| ProtoError::Protocol(format!("{}: string is not UTF-8", self.what)))
    }
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// The client's cookie (handle), echoed in replies.
    pub handle: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

impl Request {
    /// The 28 bytes on the wire.
    pub fn encode(&self) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }

    /// Reads one request header.
    pub fn read(r: &mut impl Read) -> Result<Request, ProtoError> {
        let mut b = [0u8; 28];
        read_exact(r, &mut b, "request header")?;
        let mut c = Cursor::new(&b, "request header");
        let magic = c.u32()?;
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                got: u64::from(magic),
                expected: u64::from(REQUEST_MAGIC),
            });
        }
        Ok(Request {
            flags: c.u16()?,
            kind: c.u16()?,
            handle: c.u64()?,
            offset: c.u64()?,
            len: c.u32()?,
        })
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option request header (magic, option, length).
pub fn option_header(option: u32, len: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option reply header (magic, option, type, length).
pub fn option_reply_header(option: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&REP_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// QEMU's `system_errno_to_nbd_errno`: the NBD error for a host errno.
pub fn errno_to_nbd(e: i32) -> u32 {
    match e {
        0 => 0,
        libc::EPERM | libc::EROFS => err::EPERM,
        libc::EIO => err::EIO,
        libc::ENOMEM => err::ENOMEM,
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => err::ENOSPC,
        libc::EOVERFLOW => err::EOVERFLOW,
        libc::ENOTSUP => err::ENOTSUP,
        libc::ESHUTDOWN => err::ESHUTDOWN,
        _ => err::EINVAL,
    }
}

/// QEMU's `nbd_errno_to_system_errno`: the host errno for an NBD error (unknown values are
/// `EINVAL`, as the protocol says).
pub fn nbd_to_errno(e: u32) -> i32 {
    match e {
        err::EPERM => libc::EPERM,
        err::EIO => libc::EIO,
        err::ENOMEM => libc::ENOMEM,
        err::ENOSPC => libc::ENOSPC,
        err::EOVERFLOW => libc::EOVERFLOW,
        err::ENOTSUP => libc::ENOTSUP,
        err::ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: cflag::FUA,
            kind: cmd::WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::read(&mut &b[..]).unwrap(), r);
    }

    #[test]
    fn bad_request_magic_is_an_error() {
        let mut b = Request {
            flags: 0,
            kind: 0,
            handle: 0,
            offset: 0,
            len: 0,
        }
        .encode();
        b[0] = 0;
        assert!(matches!(
            Request::read(&mut &b[..]),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn errno_mapping_is_qemus() {
        assert_eq!(errno_to_nbd(libc::EROFS), err::EPERM);
        assert_eq!(errno_to_nbd(libc::EFBIG), err::ENOSPC);
        assert_eq!(errno_to_nbd(libc::ENOENT), err::EINVAL);
        assert_eq!(nbd_to_errno(12345), libc::EINVAL);
        assert_eq!(nbd_to_errno(err::ENOSPC), libc::ENOSPC);
    }

    proptest! {
        #[test]
        fn cursor_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut c = Cursor::new(&data, "fuzz");
            let _ = c.string(16);
            let _ = c.u64();
            let _ = c.u16();
        }

        #[test]
        fn read_vec_respects_limit(len in 0u64..1 << 40) {
            let data = [0u8; 16];
            let r = read_vec(&mut &data[..], len, 16, "x");
            prop_assert_eq!(r.is_ok(), len <= 16);
        }
    }
}
