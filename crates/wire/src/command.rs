//! The `QEMU_VM_COMMAND` sub-protocol (stream-format.md §2.1, §2.2): `u8 0x08, be16 cmd,
//! be16 len, len bytes`, with the length table QEMU enforces.

use crate::error::{Result, WireErrorKind};
use crate::reader::StreamReader;
use crate::section::QEMU_VM_COMMAND;
use crate::writer::StreamWriter;
use std::io::{IoSlice, Read, Write};

/// `MIG_CMD_OPEN_RETURN_PATH`.
pub const MIG_CMD_OPEN_RETURN_PATH: u16 = 1;
/// `MIG_CMD_PING`.
pub const MIG_CMD_PING: u16 = 2;
/// `MIG_CMD_POSTCOPY_ADVISE`.
pub const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
/// `MIG_CMD_POSTCOPY_LISTEN`.
pub const MIG_CMD_POSTCOPY_LISTEN: u16 = 4;
/// `MIG_CMD_POSTCOPY_RUN`.
pub const MIG_CMD_POSTCOPY_RUN: u16 = 5;
/// `MIG_CMD_POSTCOPY_RAM_DISCARD`.
pub const MIG_CMD_POSTCOPY_RAM_DISCARD: u16 = 6;
/// `MIG_CMD_PACKAGED`.
pub const MIG_CMD_PACKAGED: u16 = 7;
/// `MIG_CMD_ENABLE_COLO`.
pub const MIG_CMD_ENABLE_COLO: u16 = 8;
/// `MIG_CMD_POSTCOPY_RESUME`.
pub const MIG_CMD_POSTCOPY_RESUME: u16 = 9;
/// `MIG_CMD_RECV_BITMAP`.
pub const MIG_CMD_RECV_BITMAP: u16 = 10;
/// `MIG_CMD_SWITCHOVER_START` (first in QEMU 10.0; 7.2 rejects it).
pub const MIG_CMD_SWITCHOVER_START: u16 = 11;

/// PING value that marks "package loaded" (QEMU 10.2+): the source waits for its PONG.
pub const QEMU_VM_PING_PACKAGED_LOADED: u32 = 0x42;

/// Version byte of POSTCOPY_RAM_DISCARD.
pub const POSTCOPY_RAM_DISCARD_VERSION: u8 = 0;

/// QEMU's name and fixed payload length (`None` = variable) for each command number.
pub fn command_info(cmd: u16) -> Option<(&'static str, Option<u16>)> {
    Some(match cmd {
        MIG_CMD_OPEN_RETURN_PATH => ("OPEN_RETURN_PATH", Some(0)),
        MIG_CMD_PING => ("PING", Some(4)),
        MIG_CMD_POSTCOPY_ADVISE => ("POSTCOPY_ADVISE", None),
        MIG_CMD_POSTCOPY_LISTEN => ("POSTCOPY_LISTEN", Some(0)),
        MIG_CMD_POSTCOPY_RUN => ("POSTCOPY_RUN", Some(0)),
        MIG_CMD_POSTCOPY_RAM_DISCARD => ("POSTCOPY_RAM_DISCARD", None),
        MIG_CMD_PACKAGED => ("PACKAGED", Some(4)),
        MIG_CMD_ENABLE_COLO => ("ENABLE_COLO", Some(0)),
        MIG_CMD_POSTCOPY_RESUME => ("POSTCOPY_RESUME", Some(0)),
        MIG_CMD_RECV_BITMAP => ("RECV_BITMAP", None),
        MIG_CMD_SWITCHOVER_START => ("SWITCHOVER_START", Some(0)),
        _ => return None,
    })
}

/// The 16-byte POSTCOPY_ADVISE payload sent when postcopy-ram is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostcopyAdvise {
    /// Bitwise OR of all RAM block page sizes (0x1000 for plain 4 KiB RAM).
    pub ram_pagesize_summary: u64,
    /// Target page size.
    pub target_page_size: u64,
}

/// One range of a POSTCOPY_RAM_DISCARD command, in bytes inside the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscardRange {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
}

/// A decoded command (§2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// 1: the destination opens the return path.
    OpenReturnPath,
    /// 2: the destination answers PONG with the same value.
    Ping(u32),
    /// 3: postcopy advise; `None` is the 0-byte form (dirty-bitmaps without postcopy-ram).
    PostcopyAdvise(Option<PostcopyAdvise>),
    /// 4: start the postcopy listener.
    PostcopyListen,
    /// 5: start the guest; quits all nested loaders.
    PostcopyRun,
    /// 6: pages of `ramblock` the destination must discard.
    PostcopyRamDiscard {
        /// RAM block name.
        ramblock: String,
        /// Byte ranges inside the block.
        ranges: Vec<DiscardRange>,
    },
    /// 7: a nested stream without header (sections and commands), read whole. Its first byte
    /// was at stream offset `reader.offset() - data.len()` right after decoding.
    Packaged(Vec<u8>),
    /// 8: enable COLO.
    EnableColo,
    /// 9: postcopy recovery: the source is ready.
    PostcopyResume,
    /// 10: the source asks for the received bitmap of a block.
    RecvBitmap {
        /// RAM block name.
        ramblock: String,
    },
    /// 11: switchover begins (QEMU 10.0+).
    SwitchoverStart,
}

impl Command {
    /// The command number on the wire.
    pub fn number(&self) -> u16 {
        match self {
            Command::OpenReturnPath => MIG_CMD_OPEN_RETURN_PATH,
            Command::Ping(_) => MIG_CMD_PING,
            Command::PostcopyAdvise(_) => MIG_CMD_POSTCOPY_ADVISE,
            Command::PostcopyListen => MIG_CMD_POSTCOPY_LISTEN,
            Command::PostcopyRun => MIG_CMD_POSTCOPY_RUN,
            Command::PostcopyRamDiscard { .. } => MIG_CMD_POSTCOPY_RAM_DISCARD,
            Command::Packaged(_) => MIG_CMD_PACKAGED,
            Command::EnableColo => MIG_CMD_ENABLE_COLO,
            Command::PostcopyResume => MIG_CMD_POSTCOPY_RESUME,
            Command::RecvBitmap { .. } => MIG_CMD_RECV_BITMAP,
            Command::SwitchoverStart => MIG_CMD_SWITCHOVER_START,
        }
    }

    /// QEMU's name for the command, e.g. `PING`.
    pub fn name(&self) -> &'static str {
        command_info(self.number())
            .map(|(n, _)| n)
            .unwrap_or("UNKNOWN")
    }
}

/// Reads a command body (after the 0x08 type byte): cmd, len, and the payload, validated
/// against QEMU's table. A PACKAGED command's N bytes are read too, within
/// `options().max_packaged`.
pub fn read_command<R: Read>(r: &mut StreamReader<R>) -> Result<Command> {
    let at = r.offset();
    let cmd = r.be16()?;
    let len = r.be16()?;
    let Some((name, fixed)) = command_info(cmd) else {
        return Err(r.error_at(at, WireErrorKind::UnknownCommand { cmd, len }));
    };
    if let Some(expected) = fixed {
        if expected != len {
            return Err(r.error_at(
                at,
                WireErrorKind::CommandBadLength {
                    name,
                    expected,
                    got: len,
                },
            ));
        }
    }
    Ok(match cmd {
        MIG_CMD_OPEN_RETURN_PATH => Command::OpenReturnPath,
        MIG_CMD_PING => Command::Ping(r.be32()?),
        MIG_CMD_POSTCOPY_ADVISE => match len {
            0 => Command::PostcopyAdvise(None),
            16 => Command::PostcopyAdvise(Some(PostcopyAdvise {
                ram_pagesize_summary: r.be64()?,
                target_page_size: r.be64()?,
            })),
            _ => return Err(r.error_at(at, WireErrorKind::AdviseBadLength { len })),
        },
        MIG_CMD_POSTCOPY_LISTEN => Command::PostcopyListen,
        MIG_CMD_POSTCOPY_RUN => Command::PostcopyRun,
        MIG_CMD_POSTCOPY_RAM_DISCARD => read_discard(r, at, len)?,
        MIG_CMD_PACKAGED => {
            let n_at = r.offset();
            let n = r.be32()?;
            let limit = r.options().max_packaged;
            if n > limit {
                return Err(r.error_at(n_at, WireErrorKind::PackagedTooLarge { len: n, limit }));
            }
            Command::Packaged(r.bytes(u64::from(n), u64::from(limit), "PACKAGED data")?)
        }
        MIG_CMD_ENABLE_COLO => Command::EnableColo,
        MIG_CMD_POSTCOPY_RESUME => Command::PostcopyResume,
        MIG_CMD_RECV_BITMAP => {
            let ramblock = r.counted_string("block name")?;
            if usize::from(len) != ramblock.len() + 1 {
                return Err(r.error_at(at, WireErrorKind::RecvBitmapBadLength { len }));
            }
            Command::RecvBitmap { ramblock }
        }
        _ => Command::SwitchoverStart,
    })
}

fn read_discard<R: Read>(r: &mut StreamReader<R>, at: u64, len: u16) -> Result<Command> {
    // version + name length + at least one name byte + NUL + one range.
    if len < 1 + 1 + 1 + 1 + 16 {
        return Err(r.error_at(at, WireErrorKind::DiscardBadLength { len }));
    }
    let v_at = r.offset();
    let version = r.u8()?;
    if version != POSTCOPY_RAM_DISCARD_VERSION {
        return Err(r.error_at(v_at, WireErrorKind::DiscardBadVersion { version }));
    }
    let ramblock = r.counted_string("RAMBlock ID")?;
    let nil_at = r.offset();
    let nil = r.u8()?;
    if nil != 0 {
        return Err(r.error_at(nil_at, WireErrorKind::DiscardMissingNil { got: nil }));
    }
    let header = 3 + ramblock.len();
    let rest = usize::from(len)
        .checked_sub(header)
        .ok_or_else(|| r.error_at(at, WireErrorKind::DiscardBadLength { len }))?;
    if rest % 16 != 0 {
        return Err(r.error_at(at, WireErrorKind::DiscardBadLength { len: rest as u16 }));
    }
    let mut ranges = Vec::with_capacity(rest / 16);
    for _ in 0..rest / 16 {
        ranges.push(DiscardRange {
            start: r.be64()?,
            length: r.be64()?,
        });
    }
    Ok(Command::PostcopyRamDiscard { ramblock, ranges })
}

fn payload_len<W: Write>(w: &StreamWriter<W>, what: &'static str, len: usize) -> Result<u16> {
    u16::try_from(len).map_err(|_| {
        w.error(WireErrorKind::TooLarge {
            what,
            len: len as u64,
            limit: u64::from(u16::MAX),
        })
    })
}

/// Writes a command, type byte included. PACKAGED writes its header and its N bytes (with a
/// vectored write, not copied).
pub fn write_command<W: Write>(w: &mut StreamWriter<W>, cmd: &Command) -> Result<()> {
    w.put_u8(QEMU_VM_COMMAND)?;
    w.put_be16(cmd.number())?;
    match cmd {
        Command::OpenReturnPath
        | Command::PostcopyListen
        | Command::PostcopyRun
        | Command::EnableColo
        | Command::PostcopyResume
        | Command::SwitchoverStart
        | Command::PostcopyAdvise(None) => w.put_be16(0),
        Command::Ping(v) => {
            w.put_be16(4)?;
            w.put_be32(*v)
        }
        Command::PostcopyAdvise(Some(a)) => {
            w.put_be16(16)?;
            w.put_be64(a.ram_pagesize_summary)?;
            w.put_be64(a.target_page_size)
        }
        Command::PostcopyRamDiscard { ramblock, ranges } => {
            let len = payload_len(
                w,
                "POSTCOPY_RAM_DISCARD",
                3 + ramblock.len() + 16 * ranges.len(),
            )?;
            w.put_be16(len)?;
            w.put_u8(POSTCOPY_RAM_DISCARD_VERSION)?;
            w.put_counted_string(ramblock, "RAMBlock ID")?;
            w.put_u8(0)?;
            for rg in ranges {
                w.put_be64(rg.start)?;
                w.put_be64(rg.length)?;
            }
            Ok(())
        }
        Command::Packaged(data) => {
            let n = u32::try_from(data.len()).map_err(|_| {
                w.error(WireErrorKind::TooLarge {
                    what: "PACKAGED data",
                    len: data.len() as u64,
                    limit: u64::from(u32::MAX),
                })
            })?;
            w.put_be16(4)?;
            w.put_be32(n)?;
            w.write_vectored_all(&mut [IoSlice::new(data)])
        }
        Command::RecvBitmap { ramblock } => {
            let len = payload_len(w, "RECV_BITMAP", 1 + ramblock.len())?;
            w.put_be16(len)?;
            w.put_counted_string(ramblock, "block name")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<Command> {
        let mut r = StreamReader::new(bytes);
        assert_eq!(r.u8().unwrap(), QEMU_VM_COMMAND);
        read_command(&mut r)
    }

    fn encode(c: &Command) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        write_command(&mut w, c).unwrap();
        w.into_inner().unwrap()
    }

    #[test]
    fn advise_bytes_from_the_reference() {
        // §8.1 offset 0x11: POSTCOPY_ADVISE with len 0.
        assert_eq!(
            decode(&[8, 0, 3, 0, 0]).unwrap(),
            Command::PostcopyAdvise(None)
        );
        // §2.2: the 16-byte form observed with postcopy-ram.
        let b = [
            8, 0, 3, 0, 16, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0x10, 0,
        ];
        let c = decode(&b).unwrap();
        assert_eq!(
            c,
            Command::PostcopyAdvise(Some(PostcopyAdvise {
                ram_pagesize_summary: 0x1000,
                target_page_size: 0x1000
            }))
        );
        assert_eq!(encode(&c), b);
    }

    #[test]
    fn discard_bytes_from_the_reference() {
        // §5.2: POSTCOPY_RAM_DISCARD len 22: 00 03 "ram" 00 | be64 0x19b000 | be64 0x1e65000
        let mut b = vec![8, 0, 6, 0, 22, 0, 3, b'r', b'a', b'm', 0];
        b.extend(0x19b000u64.to_be_bytes());
        b.extend(0x1e65000u64.to_be_bytes());
        let c = decode(&b).unwrap();
        assert_eq!(
            c,
            Command::PostcopyRamDiscard {
                ramblock: "ram".into(),
                ranges: vec![DiscardRange {
                    start: 0x19b000,
                    length: 0x1e65000
                }]
            }
        );
        assert_eq!(encode(&c), b);
    }

    #[test]
    fn packaged_reads_its_data() {
        let b = [8, 0, 7, 0, 4, 0, 0, 0, 3, 0xA, 0xB, 0xC];
        let c = decode(&b).unwrap();
        assert_eq!(c, Command::Packaged(vec![0xA, 0xB, 0xC]));
        assert_eq!(encode(&c), b);
    }

    #[test]
    fn packaged_limit_is_checked_before_reading() {
        let mut r = StreamReader::new(&[8u8, 0, 7, 0, 4, 0xFF, 0xFF, 0xFF, 0xFF][..]);
        r.u8().unwrap();
        let e = read_command(&mut r).unwrap_err();
        assert_eq!(e.offset, 5);
        assert!(
            e.to_string()
                .contains("Unreasonably large packaged state: 4294967295"),
            "{e}"
        );
    }

    #[test]
    fn error_paths_use_qemu_wording() {
        let cases: &[(&[u8], &str)] = &[
            (&[8, 0, 0, 0, 0], "MIG_CMD 0x0 unknown (len 0x0)"),
            (&[8, 0, 12, 0, 0], "MIG_CMD 0xc unknown (len 0x0)"),
            (
                &[8, 0, 2, 0, 3],
                "PING received with bad length - expecting 4, got 3",
            ),
            (
                &[8, 0, 7, 0, 0],
                "PACKAGED received with bad length - expecting 4, got 0",
            ),
            (
                &[8, 0, 8, 0, 1],
                "ENABLE_COLO received with bad length - expecting 0, got 1",
            ),
            (&[8, 0, 3, 0, 8], "CMD_POSTCOPY_ADVISE invalid length (8)"),
            (
                &[8, 0, 6, 0, 19],
                "CMD_POSTCOPY_RAM_DISCARD invalid length (19)",
            ),
            (
                &[8, 0, 6, 0, 20, 1],
                "CMD_POSTCOPY_RAM_DISCARD invalid version (1)",
            ),
            (&[8, 0, 6, 0, 20, 0, 0], "Unable to read RAMBlock ID"),
            (
                &[8, 0, 6, 0, 20, 0, 1, b'r', 7],
                "CMD_POSTCOPY_RAM_DISCARD missing nil (7)",
            ),
            (
                &[8, 0, 6, 0, 21, 0, 1, b'r', 0],
                "CMD_POSTCOPY_RAM_DISCARD invalid length (17)",
            ),
            (
                &[8, 0, 10, 0, 5, 3, b'r', b'a', b'm'],
                "loadvm_handle_recv_bitmap: invalid payload length (5)",
            ),
        ];
        for (bytes, msg) in cases {
            let e = decode(bytes).unwrap_err();
            assert!(e.to_string().ends_with(msg), "{e} vs {msg}");
        }
    }

    #[test]
    fn switchover_start_and_recv_bitmap_round_trip() {
        for c in [
            Command::OpenReturnPath,
            Command::Ping(0x42424242),
            Command::PostcopyListen,
            Command::PostcopyRun,
            Command::EnableColo,
            Command::PostcopyResume,
            Command::RecvBitmap {
                ramblock: "pc.ram".into(),
            },
            Command::SwitchoverStart,
        ] {
            assert_eq!(decode(&encode(&c)).unwrap(), c);
        }
        assert_eq!(encode(&Command::SwitchoverStart), [8, 0, 0x0b, 0, 0]);
    }
}
