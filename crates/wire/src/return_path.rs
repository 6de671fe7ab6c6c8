//! Return-path messages, destination → source (stream-format.md §2.3, §5.5):
//! `be16 type, be16 len, len bytes`, with QEMU's length table and its 512-byte cap, plus the
//! received-bitmap dump that follows a RECV_BITMAP message.

use crate::error::{Result, WireErrorKind};
use crate::reader::StreamReader;
use crate::writer::StreamWriter;
use std::io::{IoSlice, Read, Write};

/// `MIG_RP_MSG_SHUT`.
pub const MIG_RP_MSG_SHUT: u16 = 1;
/// `MIG_RP_MSG_PONG`.
pub const MIG_RP_MSG_PONG: u16 = 2;
/// `MIG_RP_MSG_REQ_PAGES_ID`.
pub const MIG_RP_MSG_REQ_PAGES_ID: u16 = 3;
/// `MIG_RP_MSG_REQ_PAGES`.
pub const MIG_RP_MSG_REQ_PAGES: u16 = 4;
/// `MIG_RP_MSG_RECV_BITMAP`.
pub const MIG_RP_MSG_RECV_BITMAP: u16 = 5;
/// `MIG_RP_MSG_RESUME_ACK`.
pub const MIG_RP_MSG_RESUME_ACK: u16 = 6;
/// `MIG_RP_MSG_SWITCHOVER_ACK` (QEMU 8.1+).
pub const MIG_RP_MSG_SWITCHOVER_ACK: u16 = 7;

/// Largest message payload the source accepts.
pub const MAX_RP_LEN: u16 = 512;
/// `MIGRATION_RESUME_ACK_VALUE`.
pub const RESUME_ACK_VALUE: u32 = 1;
/// `RAMBLOCK_RECV_BITMAP_ENDING`: ends a received-bitmap dump.
pub const RECV_BITMAP_ENDING: u64 = 0x0123_4567_89AB_CDEF;

/// QEMU's name and fixed length (`None` = variable) of each message type.
pub fn rp_message_info(ty: u16) -> Option<(&'static str, Option<u16>)> {
    Some(match ty {
        MIG_RP_MSG_SHUT => ("SHUT", Some(4)),
        MIG_RP_MSG_PONG => ("PONG", Some(4)),
        MIG_RP_MSG_REQ_PAGES_ID => ("REQ_PAGES_ID", None),
        MIG_RP_MSG_REQ_PAGES => ("REQ_PAGES", Some(12)),
        MIG_RP_MSG_RECV_BITMAP => ("RECV_BITMAP", None),
        MIG_RP_MSG_RESUME_ACK => ("RESUME_ACK", Some(4)),
        MIG_RP_MSG_SWITCHOVER_ACK => ("SWITCHOVER_ACK", Some(0)),
        _ => return None,
    })
}

/// A return-path message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RpMessage {
    /// 1: loading is over; 0 = success.
    Shut(u32),
    /// 2: answer to PING.
    Pong(u32),
    /// 3: page request naming its block.
    ReqPagesId {
        /// First byte in the block.
        start: u64,
        /// Length in bytes.
        len: u32,
        /// RAM block name.
        ramblock: String,
    },
    /// 4: page request in the block of the last REQ_PAGES_ID.
    ReqPages {
        /// First byte in the block.
        start: u64,
        /// Length in bytes.
        len: u32,
    },
    /// 5: the received bitmap of a block follows ([`read_recv_bitmap_dump`]).
    RecvBitmap {
        /// RAM block name.
        ramblock: String,
    },
    /// 6: postcopy recovery acknowledged ([`RESUME_ACK_VALUE`]).
    ResumeAck(u32),
    /// 7: the destination agrees to switch over.
    SwitchoverAck,
}

impl RpMessage {
    /// The type number on the wire.
    pub fn number(&self) -> u16 {
        match self {
            RpMessage::Shut(_) => MIG_RP_MSG_SHUT,
            RpMessage::Pong(_) => MIG_RP_MSG_PONG,
            RpMessage::ReqPagesId { .. } => MIG_RP_MSG_REQ_PAGES_ID,
            RpMessage::ReqPages { .. } => MIG_RP_MSG_REQ_PAGES,
            RpMessage::RecvBitmap { .. } => MIG_RP_MSG_RECV_BITMAP,
            RpMessage::ResumeAck(_) => MIG_RP_MSG_RESUME_ACK,
            RpMessage::SwitchoverAck => MIG_RP_MSG_SWITCHOVER_ACK,
        }
    }

    /// QEMU's name for the message.
    pub fn name(&self) -> &'static str {
        rp_message_info(self.number())
            .map(|(n, _)| n)
            .unwrap_or("INVALID")
    }
}

/// Reads one return-path message, checked as QEMU's source does.
pub fn read_rp_message<R: Read>(r: &mut StreamReader<R>) -> Result<RpMessage> {
    let at = r.offset();
    let ty = r.be16()?;
    let len = r.be16()?;
    let Some((name, fixed)) = rp_message_info(ty) else {
        return Err(r.error_at(at, WireErrorKind::RpUnknownMessage { ty, len }));
    };
    if fixed.is_some_and(|f| f != len) || len > MAX_RP_LEN {
        let expected = fixed.unwrap_or(MAX_RP_LEN);
        return Err(r.error_at(
            at,
            WireErrorKind::RpBadLength {
                name,
                ty,
                len,
                expected,
            },
        ));
    }
    Ok(match ty {
        MIG_RP_MSG_SHUT => RpMessage::Shut(r.be32()?),
        MIG_RP_MSG_PONG => RpMessage::Pong(r.be32()?),
        MIG_RP_MSG_REQ_PAGES => RpMessage::ReqPages {
            start: r.be64()?,
            len: r.be32()?,
        },
        MIG_RP_MSG_RESUME_ACK => RpMessage::ResumeAck(r.be32()?),
        MIG_RP_MSG_SWITCHOVER_ACK => RpMessage::SwitchoverAck,
        MIG_RP_MSG_REQ_PAGES_ID => {
            if len < 13 {
                return Err(r.error_at(
                    at,
                    WireErrorKind::RpReqPagesIdBadLength { len, expected: 13 },
                ));
            }
            let start = r.be64()?;
            let plen = r.be32()?;
            let n_at = r.offset();
            let n = r.u8()?;
            let expected = 13 + u16::from(n);
            if len != expected {
                return Err(r.error_at(at, WireErrorKind::RpReqPagesIdBadLength { len, expected }));
            }
            if n == 0 {
                return Err(r.error_at(
                    n_at,
                    WireErrorKind::EmptyString {
                        what: "RAM block name",
                    },
                ));
            }
            let ramblock = r.string_of_len(n_at, usize::from(n), "RAM block name")?;
            RpMessage::ReqPagesId {
                start,
                len: plen,
                ramblock,
            }
        }
        _ => {
            if len < 1 {
                return Err(r.error_at(
                    at,
                    WireErrorKind::RpRecvBitmapBadLength { len, expected: 1 },
                ));
            }
            let n_at = r.offset();
            let n = r.u8()?;
            let expected = 1 + u16::from(n);
            if len != expected {
                return Err(r.error_at(at, WireErrorKind::RpRecvBitmapBadLength { len, expected }));
            }
            if n == 0 {
                return Err(r.error_at(
                    n_at,
                    WireErrorKind::EmptyString {
                        what: "RAM block name",
                    },
                ));
            }
            RpMessage::RecvBitmap {
                ramblock: r.string_of_len(n_at, usize::from(n), "RAM block name")?,
            }
        }
    })
}

/// Writes one return-path message.
pub fn write_rp_message<W: Write>(w: &mut StreamWriter<W>, m: &RpMessage) -> Result<()> {
    w.put_be16(m.number())?;
    match m {
        RpMessage::Shut(v) | RpMessage::Pong(v) | RpMessage::ResumeAck(v) => {
            w.put_be16(4)?;
            w.put_be32(*v)
        }
        RpMessage::ReqPages { start, len } => {
            w.put_be16(12)?;
            w.put_be64(*start)?;
            w.put_be32(*len)
        }
        RpMessage::SwitchoverAck => w.put_be16(0),
        RpMessage::ReqPagesId {
            start,
            len,
            ramblock,
        } => {
            if ramblock.is_empty() || ramblock.len() > 255 {
                return Err(w.error(WireErrorKind::BadStringLength {
                    what: "RAM block name",
                    len: ramblock.len(),
                }));
            }
            w.put_be16(13 + ramblock.len() as u16)?;
            w.put_be64(*start)?;
            w.put_be32(*len)?;
            w.put_counted_string(ramblock, "RAM block name")
        }
        RpMessage::RecvBitmap { ramblock } => {
            if ramblock.is_empty() || ramblock.len() > 255 {
                return Err(w.error(WireErrorKind::BadStringLength {
                    what: "RAM block name",
                    len: ramblock.len(),
                }));
            }
            w.put_be16(1 + ramblock.len() as u16)?;
            w.put_counted_string(ramblock, "RAM block name")
        }
    }
}

/// Reads the received-bitmap dump that follows a RECV_BITMAP message: be64 size, `size` bytes
/// (little-endian 64-bit words, one bit per target page), be64 [`RECV_BITMAP_ENDING`].
/// `limit` bounds `size`; `block` names the block in errors.
pub fn read_recv_bitmap_dump<R: Read>(
    r: &mut StreamReader<R>,
    block: &str,
    limit: u64,
) -> Result<Vec<u8>> {
    let size = r.be64()?;
    let data = r.bytes(size, limit, "received bitmap")?;
    let at = r.offset();
    let end = r.be64()?;
    if end != RECV_BITMAP_ENDING {
        return Err(r.error_at(
            at,
            WireErrorKind::RecvBitmapBadEnding {
                block: block.into(),
                got: end,
            },
        ));
    }
    Ok(data)
}

/// Writes a received-bitmap dump. `bitmap` must already be padded to a multiple of 8 bytes, as
/// QEMU sends it.
pub fn write_recv_bitmap_dump<W: Write>(w: &mut StreamWriter<W>, bitmap: &[u8]) -> Result<()> {
    w.put_be64(bitmap.len() as u64)?;
    w.write_vectored_all(&mut [IoSlice::new(bitmap)])?;
    w.put_be64(RECV_BITMAP_ENDING)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(b: &[u8]) -> Vec<RpMessage> {
        let mut r = StreamReader::new(b);
        let mut out = Vec::new();
        while !r.is_at_eof().unwrap() {
            out.push(read_rp_message(&mut r).unwrap());
        }
        out
    }

    fn encode(ms: &[RpMessage]) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        for m in ms {
            write_rp_message(&mut w, m).unwrap();
        }
        w.into_inner().unwrap()
    }

    #[test]
    fn observed_bytes_from_the_reference() {
        // §2.3: PONG 1, PONG 0x42424242, SHUT 0.
        let b = [
            0, 2, 0, 4, 0, 0, 0, 1, 0, 2, 0, 4, 0x42, 0x42, 0x42, 0x42, 0, 1, 0, 4, 0, 0, 0, 0,
        ];
        let ms = decode_all(&b);
        assert_eq!(
            ms,
            vec![
                RpMessage::Pong(1),
                RpMessage::Pong(0x42424242),
                RpMessage::Shut(0)
            ]
        );
        assert_eq!(encode(&ms), b);
        assert_eq!(
            decode_all(&[0, 1, 0, 4, 0, 0, 0, 1]),
            vec![RpMessage::Shut(1)]
        );
    }

    #[test]
    fn all_messages_round_trip() {
        let ms = vec![
            RpMessage::ReqPagesId {
                start: 0x200000,
                len: 0x1000,
                ramblock: "pc.ram".into(),
            },
            RpMessage::ReqPages {
                start: 0x3000,
                len: 0x1000,
            },
            RpMessage::RecvBitmap {
                ramblock: "ram".into(),
            },
            RpMessage::ResumeAck(RESUME_ACK_VALUE),
            RpMessage::SwitchoverAck,
        ];
        let b = encode(&ms);
        assert_eq!(&b[..4], &[0, 3, 0, 19]);
        assert_eq!(decode_all(&b), ms);
    }

    #[test]
    fn errors() {
        let cases: &[(&[u8], &str)] = &[
            (&[0, 0, 0, 0], "RP: Received invalid message 0x0000 length 0x0000"),
            (&[0, 8, 0, 1], "RP: Received invalid message 0x0008 length 0x0001"),
            (&[0, 1, 0, 5], "RP: Received 'SHUT' message (0x0001) with incorrect length 5 expecting 4"),
            (&[0, 3, 2, 1], "RP: Received 'REQ_PAGES_ID' message (0x0003) with incorrect length 513 expecting 512"),
            (&[0, 3, 0, 15, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3], "RP: Req_Page_id with length 15 expecting 16"),
            (&[0, 5, 0, 3, 1, b'x', b'y'], "RP: RECV_BITMAP with length 3 expecting 2"),
        ];
        for (b, msg) in cases {
            let e = read_rp_message(&mut StreamReader::new(*b)).unwrap_err();
            assert_eq!(e.to_string(), format!("at byte 0x0: {msg}"));
        }
    }

    #[test]
    fn recv_bitmap_dump() {
        let mut w = StreamWriter::new(Vec::new());
        write_recv_bitmap_dump(&mut w, &[0xff, 1, 0, 0, 0, 0, 0, 0]).unwrap();
        let b = w.into_inner().unwrap();
        assert_eq!(b.len(), 24);
        assert_eq!(
            read_recv_bitmap_dump(&mut StreamReader::new(&b[..]), "ram", 1024).unwrap(),
            [0xff, 1, 0, 0, 0, 0, 0, 0]
        );
        let mut bad = b.clone();
        bad[23] = 0;
        let e = read_recv_bitmap_dump(&mut StreamReader::new(&bad[..]), "ram", 1024).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("ramblock 'ram' end mark incorrect: 0x123456789abcd00"),
            "{e}"
        );
        let e = read_recv_bitmap_dump(&mut StreamReader::new(&b[..]), "ram", 4).unwrap_err();
        assert!(e
            .to_string()
            .contains("received bitmap length 8 exceeds limit 4"));
    }
}
