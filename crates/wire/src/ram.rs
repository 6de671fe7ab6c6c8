//! Record syntax of the `ram` section (stream-format.md §3): a be64 header word carrying a
//! page-aligned offset and flags, optional block name, and a payload per record kind.
//!
//! Page payloads are not read here: after a [`RamRecord::Page`] the caller reads the
//! [`TARGET_PAGE_SIZE`] bytes itself with [`StreamReader::read_into`], straight into guest
//! memory. Likewise [`write_page`] sends header and page in one vectored write.

use crate::error::{Result, WireErrorKind};
use crate::reader::StreamReader;
use crate::writer::StreamWriter;
use std::io::{IoSlice, Read, Write};

/// Target page size (x86): offsets are multiples of it, flags live below it.
pub const TARGET_PAGE_SIZE: u64 = 4096;
/// log2 of [`TARGET_PAGE_SIZE`].
pub const TARGET_PAGE_BITS: u32 = 12;
/// Version of the `ram` section (`ram_load` wants exactly 4).
pub const RAM_SECTION_VERSION: u32 = 4;

/// Obsolete since 2009, never sent; rejected.
pub const RAM_SAVE_FLAG_FULL: u64 = 0x01;
/// Zero page: [block] + u8 fill.
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x02;
/// RAM block list (first record of the START section).
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x04;
/// Normal page: [block] + one target page.
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x08;
/// End of the section body.
pub const RAM_SAVE_FLAG_EOS: u64 = 0x10;
/// Modifier: same block as the previous record; no block name follows.
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x20;
/// XBZRLE delta page.
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x40;
/// RDMA control hook.
pub const RAM_SAVE_FLAG_HOOK: u64 = 0x80;
/// zlib-compressed page (removed in QEMU 9.1).
pub const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
/// Multifd sync point (QEMU 8.1+; 7.2 rejects it).
pub const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;

/// livemig's integrity DIGEST record (`x-livemig-integrity`, only between livemig peers; QEMU
/// knows no such flag): a be64 digest ([`crate::digest`]) of the run of records it closes —
/// its own header word included — follows.
pub const RAM_SAVE_FLAG_LIVEMIG_DIGEST: u64 = 0x800;

/// Encoding byte of XBZRLE records.
pub const ENCODING_FLAG_XBZRLE: u8 = 0x01;
/// Largest COMPRESS_PAGE payload: zlib's `compressBound(4096)`
/// (`n + (n >> 12) + (n >> 14) + (n >> 25) + 13`).
pub const COMPRESS_MAX_LEN: u32 = 4110;

/// Splits a record header word into (offset, flags).
pub fn split_header(word: u64) -> (u64, u64) {
    (
        word & !(TARGET_PAGE_SIZE - 1),
        word & (TARGET_PAGE_SIZE - 1),
    )
}

/// One RAM record, header and fixed fields (payloads are the caller's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RamRecord {
    /// MEM_SIZE: total RAM bytes; the block list follows ([`read_mem_blocks`]).
    MemSize {
        /// Sum of all blocks' used_length.
        total: u64,
    },
    /// ZERO: fill the page with `fill` (0 from every sender).
    Zero {
        /// Block name; `None` = CONTINUE (same block as before).
        block: Option<String>,
        /// Offset in the block.
        offset: u64,
        /// Fill byte.
        fill: u8,
    },
    /// PAGE: [`TARGET_PAGE_SIZE`] raw bytes follow, for the caller to read.
    Page {
        /// Block name; `None` = CONTINUE.
        block: Option<String>,
        /// Offset in the block.
        offset: u64,
    },
    /// XBZRLE: `len` bytes of delta follow.
    Xbzrle {
        /// Block name; `None` = CONTINUE.
        block: Option<String>,
        /// Offset in the block.
        offset: u64,
        /// Delta length (≤ 4096).
        len: u16,
    },
    /// COMPRESS_PAGE: `len` bytes of zlib data follow.
    CompressPage {
        /// Block name; `None` = CONTINUE.
        block: Option<String>,
        /// Offset in the block.
        offset: u64,
        /// Compressed length (≤ [`COMPRESS_MAX_LEN`]).
        len: u32,
    },
    /// MULTIFD_FLUSH: multifd barrier.
    MultifdFlush,
    /// DIGEST (livemig's `x-livemig-integrity`): the be64 digest follows, for the caller to
    /// check with [`crate::digest::check_value`].
    Digest,
    /// EOS: end of the section body.
    Eos,
    /// HOOK: RDMA control (no payload on a non-RDMA channel).
    Hook {
        /// Offset bits of the header word.
        offset: u64,
    },
}

impl RamRecord {
    /// The block name carried by the record, if any (None also for CONTINUE records).
    pub fn block(&self) -> Option<&str> {
        match self {
            RamRecord::Zero { block, .. }
            | RamRecord::Page { block, .. }
            | RamRecord::Xbzrle { block, .. }
            | RamRecord::CompressPage { block, .. } => block.as_deref(),
            _ => None,
        }
    }

    /// Bytes of payload the caller must still read (or write) after the record.
    pub fn payload_len(&self) -> u64 {
        match self {
            RamRecord::Page { .. } => TARGET_PAGE_SIZE,
            RamRecord::Xbzrle { len, .. } => u64::from(*len),
            RamRecord::CompressPage { len, .. } => u64::from(*len),
            RamRecord::Digest => 8,
            _ => 0,
        }
    }
}

/// Reads one record: header word, block name unless CONTINUE, fixed fields. Flag
/// combinations QEMU does not accept give "Unknown combination of migration flags".
pub fn read_ram_record<R: Read>(r: &mut StreamReader<R>) -> Result<RamRecord> {
    let at = r.offset();
    let (offset, flags) = split_header(r.be64()?);
    let base = flags & !RAM_SAVE_FLAG_CONTINUE;
    let needs_block = matches!(
        base,
        RAM_SAVE_FLAG_ZERO
            | RAM_SAVE_FLAG_PAGE
            | RAM_SAVE_FLAG_XBZRLE
            | RAM_SAVE_FLAG_COMPRESS_PAGE
    );
    let block = if needs_block && flags & RAM_SAVE_FLAG_CONTINUE == 0 {
        Some(r.counted_string("RAM block name")?)
    } else {
        None
    };
    Ok(match base {
        RAM_SAVE_FLAG_MEM_SIZE => RamRecord::MemSize { total: offset },
        RAM_SAVE_FLAG_ZERO => RamRecord::Zero {
            block,
            offset,
            fill: r.u8()?,
        },
        RAM_SAVE_FLAG_PAGE => RamRecord::Page { block, offset },
        RAM_SAVE_FLAG_XBZRLE => {
            let e_at = r.offset();
            let encoding = r.u8()?;
            if encoding != ENCODING_FLAG_XBZRLE {
                return Err(r.error_at(e_at, WireErrorKind::XbzrleBadEncoding { encoding }));
            }
            let l_at = r.offset();
            let len = r.be16()?;
            if u64::from(len) > TARGET_PAGE_SIZE {
                return Err(r.error_at(l_at, WireErrorKind::XbzrleTooLong { len }));
            }
            RamRecord::Xbzrle { block, offset, len }
        }
        RAM_SAVE_FLAG_COMPRESS_PAGE => {
            let l_at = r.offset();
            let len = r.be32()?;
            if len > COMPRESS_MAX_LEN {
                return Err(r.error_at(l_at, WireErrorKind::CompressBadLength { len }));
            }
            RamRecord::CompressPage { block, offset, len }
        }
        RAM_SAVE_FLAG_EOS => RamRecord::Eos,
        RAM_SAVE_FLAG_LIVEMIG_DIGEST if offset == 0 => RamRecord::Digest,
        RAM_SAVE_FLAG_MULTIFD_FLUSH => RamRecord::MultifdFlush,
        RAM_SAVE_FLAG_HOOK => RamRecord::Hook { offset },
        _ => return Err(r.error_at(at, WireErrorKind::RamUnknownFlags { flags })),
    })
}

/// Resolves CONTINUE records to a block name: the "last block" state QEMU keeps per channel,
/// which persists across section boundaries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTracker {
    last: Option<String>,
}

impl BlockTracker {
    /// A tracker that has seen no block yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The block a record refers to: its own name (which becomes the last block), or the last
    /// block for CONTINUE records. `Err(RamContinueWithoutBlock)` for a CONTINUE before any
    /// name.
    pub fn resolve(&mut self, block: Option<&str>) -> std::result::Result<&str, WireErrorKind> {
        if let Some(b) = block {
            if self.last.as_deref() != Some(b) {
                self.last = Some(b.to_string());
            }
        }
        self.last
            .as_deref()
            .ok_or(WireErrorKind::RamContinueWithoutBlock)
    }

    /// The last block named, if any.
    pub fn last(&self) -> Option<&str> {
        self.last.as_deref()
    }

    /// For writers: the name to put on the wire for a record of `block` (None = use CONTINUE),
    /// updating the state.
    pub fn encode<'a>(&mut self, block: &'a str) -> Option<&'a str> {
        if self.last.as_deref() == Some(block) {
            None
        } else {
            self.last = Some(block.to_string());
            Some(block)
        }
    }
}

/// One entry of the MEM_SIZE block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemBlock {
    /// RAM block name (idstr), e.g. `ram`, `pc.ram`.
    pub name: String,
    /// Used length in bytes.
    pub used_length: u64,
    /// Block page size; on the wire only with postcopy-ram and a page size different from the
    /// host's.
    pub page_size: Option<u64>,
    /// Guest physical address of the memory region; on the wire only with x-ignore-shared.
    pub addr: Option<u64>,
}

/// Which optional fields follow a block's used_length. The reader decides per block from its
/// own configuration, as QEMU does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemBlockFields {
    /// A be64 page size follows.
    pub page_size: bool,
    /// A be64 GPA follows (after the page size).
    pub addr: bool,
}

/// Reads one block entry. `fields_for(name)` says which optional fields follow.
pub fn read_mem_block<R: Read>(
    r: &mut StreamReader<R>,
    fields_for: impl FnOnce(&str) -> MemBlockFields,
) -> Result<MemBlock> {
    let name = r.counted_string("RAM block name")?;
    let used_length = r.be64()?;
    let f = fields_for(&name);
    let page_size = if f.page_size { Some(r.be64()?) } else { None };
    let addr = if f.addr { Some(r.be64()?) } else { None };
    Ok(MemBlock {
        name,
        used_length,
        page_size,
        addr,
    })
}

/// Reads the whole block list after a MEM_SIZE record: entries until their lengths add up to
/// `total`. A block that overruns the total is an error (QEMU would desynchronise), and so are
/// more than `options().max_list_entries` blocks.
pub fn read_mem_blocks<R: Read>(
    r: &mut StreamReader<R>,
    total: u64,
    mut fields_for: impl FnMut(&str) -> MemBlockFields,
) -> Result<Vec<MemBlock>> {
    let mut left = total;
    let mut blocks = Vec::new();
    let limit = r.options().max_list_entries as usize;
    while left > 0 {
        if blocks.len() >= limit {
            return Err(r.error(WireErrorKind::TooMany {
                what: "RAM blocks",
                limit: limit as u64,
            }));
        }
        let at = r.offset();
        let b = read_mem_block(r, &mut fields_for)?;
        if b.used_length > left {
            return Err(r.error_at(
                at,
                WireErrorKind::RamBlockListOverrun {
                    block: b.name,
                    len: b.used_length,
                    left,
                },
            ));
        }
        left -= b.used_length;
        blocks.push(b);
    }
    Ok(blocks)
}

fn header_word<W: Write>(w: &StreamWriter<W>, offset: u64, flags: u64) -> Result<u64> {
    if offset & (TARGET_PAGE_SIZE - 1) != 0 {
        return Err(w.error(WireErrorKind::RamMisalignedOffset { offset }));
    }
    Ok(offset | flags)
}

fn block_flags(block: Option<&str>, flags: u64) -> u64 {
    if block.is_some() {
        flags
    } else {
        flags | RAM_SAVE_FLAG_CONTINUE
    }
}

/// The header of a PAGE record (be64 word, block name unless CONTINUE), on the stack, for
/// sending together with the page in one vectored write.
#[derive(Clone)]
pub struct PageHeader {
    bytes: [u8; 8 + 1 + 255],
    len: usize,
}

impl PageHeader {
    /// Builds the header of a record with `flags` at `offset` in `block` (`None` = CONTINUE).
    pub fn new(
        block: Option<&str>,
        offset: u64,
        flags: u64,
    ) -> std::result::Result<Self, WireErrorKind> {
        if offset & (TARGET_PAGE_SIZE - 1) != 0 {
            return Err(WireErrorKind::RamMisalignedOffset { offset });
        }
        let mut h = PageHeader {
            bytes: [0; 8 + 1 + 255],
            len: 8,
        };
        h.bytes[..8].copy_from_slice(&(offset | block_flags(block, flags)).to_be_bytes());
        if let Some(name) = block {
            if name.is_empty() || name.len() > 255 {
                return Err(WireErrorKind::BadStringLength {
                    what: "RAM block name",
                    len: name.len(),
                });
            }
            h.bytes[8] = name.len() as u8;
            h.bytes[9..9 + name.len()].copy_from_slice(name.as_bytes());
            h.len = 9 + name.len();
        }
        Ok(h)
    }

    /// The encoded header.
    pub fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or(&[])
    }
}

/// Writes a record's header and fixed fields; the caller then writes
/// [`RamRecord::payload_len`] bytes of payload (for pages, prefer [`write_page`]).
pub fn write_ram_record<W: Write>(w: &mut StreamWriter<W>, rec: &RamRecord) -> Result<()> {
    match rec {
        RamRecord::MemSize { total } => w.put_be64(header_word(w, *total, RAM_SAVE_FLAG_MEM_SIZE)?),
        RamRecord::Eos => w.put_be64(RAM_SAVE_FLAG_EOS),
        RamRecord::Digest => w.put_be64(RAM_SAVE_FLAG_LIVEMIG_DIGEST),
        RamRecord::MultifdFlush => w.put_be64(RAM_SAVE_FLAG_MULTIFD_FLUSH),
        RamRecord::Hook { offset } => w.put_be64(header_word(w, *offset, RAM_SAVE_FLAG_HOOK)?),
        RamRecord::Zero {
            block,
            offset,
            fill,
        } => {
            put_header(w, block.as_deref(), *offset, RAM_SAVE_FLAG_ZERO)?;
            w.put_u8(*fill)
        }
        RamRecord::Page { block, offset } => {
            put_header(w, block.as_deref(), *offset, RAM_SAVE_FLAG_PAGE)
        }
        RamRecord::Xbzrle { block, offset, len } => {
            put_header(w, block.as_deref(), *offset, RAM_SAVE_FLAG_XBZRLE)?;
            w.put_u8(ENCODING_FLAG_XBZRLE)?;
            w.put_be16(*len)
        }
        RamRecord::CompressPage { block, offset, len } => {
            put_header(w, block.as_deref(), *offset, RAM_SAVE_FLAG_COMPRESS_PAGE)?;
            w.put_be32(*len)
        }
    }
}

fn put_header<W: Write>(
    w: &mut StreamWriter<W>,
    block: Option<&str>,
    offset: u64,
    flags: u64,
) -> Result<()> {
    let h = PageHeader::new(block, offset, flags).map_err(|k| w.error(k))?;
    w.put_bytes(h.as_bytes())
}

/// Closes the writer's digest run with a DIGEST record (its header word inside the run, the
/// value after it) and starts the next run.
pub fn write_digest<W: Write>(w: &mut StreamWriter<W>) -> Result<()> {
    write_ram_record(w, &RamRecord::Digest)?;
    crate::digest::write_value(w)?;
    w.digest_start();
    Ok(())
}

/// Writes the MEM_SIZE record header (the block entries follow with [`write_mem_block`]).
pub fn write_mem_size<W: Write>(w: &mut StreamWriter<W>, total: u64) -> Result<()> {
    write_ram_record(w, &RamRecord::MemSize { total })
}

/// Writes one block entry, with its optional fields when set (page size before addr).
pub fn write_mem_block<W: Write>(w: &mut StreamWriter<W>, b: &MemBlock) -> Result<()> {
    w.put_counted_string(&b.name, "RAM block name")?;
    w.put_be64(b.used_length)?;
    if let Some(p) = b.page_size {
        w.put_be64(p)?;
    }
    if let Some(a) = b.addr {
        w.put_be64(a)?;
    }
    Ok(())
}

/// Writes a ZERO record.
pub fn write_zero<W: Write>(
    w: &mut StreamWriter<W>,
    block: Option<&str>,
    offset: u64,
    fill: u8,
) -> Result<()> {
    put_header(w, block, offset, RAM_SAVE_FLAG_ZERO)?;
    w.put_u8(fill)
}

/// Writes a PAGE record: header and the page go out in one vectored write, the page uncopied.
pub fn write_page<W: Write>(
    w: &mut StreamWriter<W>,
    block: Option<&str>,
    offset: u64,
    page: &[u8],
) -> Result<()> {
    if page.len() as u64 != TARGET_PAGE_SIZE {
        return Err(w.error(WireErrorKind::RamBadPageLength { len: page.len() }));
    }
    let h = PageHeader::new(block, offset, RAM_SAVE_FLAG_PAGE).map_err(|k| w.error(k))?;
    w.write_vectored_all(&mut [IoSlice::new(h.as_bytes()), IoSlice::new(page)])
}

/// Writes an XBZRLE record with its delta.
pub fn write_xbzrle<W: Write>(
    w: &mut StreamWriter<W>,
    block: Option<&str>,
    offset: u64,
    delta: &[u8],
) -> Result<()> {
    let len = u16::try_from(delta.len())
        .ok()
        .filter(|&l| u64::from(l) <= TARGET_PAGE_SIZE)
        .ok_or_else(|| {
            w.error(WireErrorKind::TooLarge {
                what: "XBZRLE delta",
                len: delta.len() as u64,
                limit: TARGET_PAGE_SIZE,
            })
        })?;
    write_ram_record(
        w,
        &RamRecord::Xbzrle {
            block: block.map(str::to_string),
            offset,
            len,
        },
    )?;
    w.put_bytes(delta)
}

/// Writes a COMPRESS_PAGE record with its zlib data.
pub fn write_compressed<W: Write>(
    w: &mut StreamWriter<W>,
    block: Option<&str>,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    let len = u32::try_from(data.len())
        .ok()
        .filter(|&l| l <= COMPRESS_MAX_LEN)
        .ok_or_else(|| {
            w.error(WireErrorKind::TooLarge {
                what: "compressed page",
                len: data.len() as u64,
                limit: u64::from(COMPRESS_MAX_LEN),
            })
        })?;
    write_ram_record(
        w,
        &RamRecord::CompressPage {
            block: block.map(str::to_string),
            offset,
            len,
        },
    )?;
    w.put_bytes(data)
}

/// Writes EOS.
pub fn write_eos<W: Write>(w: &mut StreamWriter<W>) -> Result<()> {
    write_ram_record(w, &RamRecord::Eos)
}

/// Writes MULTIFD_FLUSH.
pub fn write_multifd_flush<W: Write>(w: &mut StreamWriter<W>) -> Result<()> {
    write_ram_record(w, &RamRecord::MultifdFlush)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(b: &[u8]) -> StreamReader<&[u8]> {
        StreamReader::new(b)
    }

    #[test]
    fn start_section_body_from_the_walkthrough() {
        // §8.1 offsets 0x27..0x43: MEM_SIZE 0x2000000, "ram" 0x2000000, EOS.
        let b = [
            0, 0, 0, 0, 2, 0, 0, 4, 3, b'r', b'a', b'm', 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0x10,
        ];
        let mut r = rd(&b);
        let rec = read_ram_record(&mut r).unwrap();
        assert_eq!(rec, RamRecord::MemSize { total: 0x2000000 });
        let blocks = read_mem_blocks(&mut r, 0x2000000, |_| MemBlockFields::default()).unwrap();
        assert_eq!(
            blocks,
            vec![MemBlock {
                name: "ram".into(),
                used_length: 0x2000000,
                page_size: None,
                addr: None
            }]
        );
        assert_eq!(read_ram_record(&mut r).unwrap(), RamRecord::Eos);
        let mut w = StreamWriter::new(Vec::new());
        write_mem_size(&mut w, 0x2000000).unwrap();
        write_mem_block(&mut w, &blocks[0]).unwrap();
        write_eos(&mut w).unwrap();
        assert_eq!(w.into_inner().unwrap(), b);
    }

    #[test]
    fn zero_pages_from_the_walkthrough() {
        // §8.1 offsets 0x7f..0x9e.
        let b = [
            0, 0, 0, 0, 0, 0, 0, 2, 3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 0x10, 0x22, 0, 0, 0,
            0, 0, 0, 0, 0x20, 0x22, 0,
        ];
        let mut r = rd(&b);
        let mut t = BlockTracker::new();
        let mut got = Vec::new();
        while !r.is_at_eof().unwrap() {
            let rec = read_ram_record(&mut r).unwrap();
            let RamRecord::Zero {
                block,
                offset,
                fill,
            } = &rec
            else {
                panic!("{rec:?}")
            };
            got.push((
                t.resolve(block.as_deref()).unwrap().to_string(),
                *offset,
                *fill,
            ));
        }
        assert_eq!(
            got,
            vec![
                ("ram".into(), 0, 0),
                ("ram".into(), 0x1000, 0),
                ("ram".into(), 0x2000, 0)
            ]
        );
        let mut w = StreamWriter::new(Vec::new());
        let mut t = BlockTracker::new();
        for off in [0u64, 0x1000, 0x2000] {
            let name = t.encode("ram");
            write_zero(&mut w, name, off, 0).unwrap();
        }
        assert_eq!(w.into_inner().unwrap(), b);
        // The last zero page of §8.1 and the EOS after it.
        let b = [
            0, 0, 0, 0, 1, 0xff, 0xf0, 0x22, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ];
        let mut r = rd(&b);
        assert_eq!(
            read_ram_record(&mut r).unwrap(),
            RamRecord::Zero {
                block: None,
                offset: 0x1fff000,
                fill: 0
            }
        );
        assert_eq!(read_ram_record(&mut r).unwrap(), RamRecord::Eos);
    }

    #[test]
    fn page_is_left_for_the_caller() {
        let page: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let mut w = StreamWriter::new(Vec::new());
        write_page(&mut w, Some("pc.ram"), 0x3000, &page).unwrap();
        write_page(&mut w, None, 0x4000, &page).unwrap();
        write_multifd_flush(&mut w).unwrap();
        let b = w.into_inner().unwrap();
        assert_eq!(&b[..8], &[0, 0, 0, 0, 0, 0, 0x30, 0x08]);
        let mut r = rd(&b);
        let rec = read_ram_record(&mut r).unwrap();
        assert_eq!(
            rec,
            RamRecord::Page {
                block: Some("pc.ram".into()),
                offset: 0x3000
            }
        );
        let mut guest = vec![0u8; 4096];
        r.read_into(&mut guest).unwrap();
        assert_eq!(guest, page);
        assert_eq!(
            read_ram_record(&mut r).unwrap(),
            RamRecord::Page {
                block: None,
                offset: 0x4000
            }
        );
        r.skip(4096).unwrap();
        assert_eq!(read_ram_record(&mut r).unwrap(), RamRecord::MultifdFlush);
    }

    #[test]
    fn error_paths() {
        // 0x800 alone is livemig's DIGEST record (refused by a loader that did not agree to
        // `x-livemig-integrity`, in the same words); combined with anything it is unknown.
        for flags in [0x01u64, 0x0a, 0x12, 0x18, 0x400, 0xc00, 0x808] {
            let e = read_ram_record(&mut rd(&flags.to_be_bytes())).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("at byte 0x0: Unknown combination of migration flags: {flags:#x}")
            );
        }
        let e = read_ram_record(&mut rd(&0x401u64.to_be_bytes())).unwrap_err();
        assert!(e
            .to_string()
            .ends_with("Unknown combination of migration flags: 0x401"));
        let e = read_ram_record(&mut rd(&[0, 0, 0, 0, 0, 0, 0, 8, 0])).unwrap_err();
        assert_eq!(e.to_string(), "at byte 0x8: Unable to read RAM block name");
        let e = read_ram_record(&mut rd(&[0, 0, 0, 0, 0, 0, 0, 0x60, 2, 0x10, 0])).unwrap_err();
        assert!(e.to_string().contains("wrong compression"), "{e}");
        let e = read_ram_record(&mut rd(&[0, 0, 0, 0, 0, 0, 0, 0x60, 1, 0x10, 1])).unwrap_err();
        assert!(e.to_string().contains("len overflow"), "{e}");
        let e =
            read_ram_record(&mut rd(&[0, 0, 0, 0, 0, 0, 1, 0x20, 0, 0, 0x10, 0x0f])).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("Invalid compressed data length: 4111"),
            "{e}"
        );
        let mut t = BlockTracker::new();
        assert!(matches!(
            t.resolve(None),
            Err(WireErrorKind::RamContinueWithoutBlock)
        ));
        // Block list longer than the total.
        let b = [1, b'a', 0, 0, 0, 0, 0, 0, 0x20, 0];
        let e = read_mem_blocks(&mut rd(&b), 0x1000, |_| MemBlockFields::default()).unwrap_err();
        assert!(e.to_string().contains("overruns the MEM_SIZE total"), "{e}");
        let mut w = StreamWriter::new(Vec::new());
        assert!(write_zero(&mut w, Some("ram"), 0x10, 0).is_err());
        assert!(write_page(&mut w, Some("ram"), 0, &[0; 10]).is_err());
    }

    #[test]
    fn optional_block_fields_follow_the_callers_flags() {
        let b = MemBlock {
            name: "pc.ram".into(),
            used_length: 0x200000,
            page_size: Some(0x200000),
            addr: Some(0),
        };
        let mut w = StreamWriter::new(Vec::new());
        write_mem_block(&mut w, &b).unwrap();
        let bytes = w.into_inner().unwrap();
        assert_eq!(bytes.len(), 1 + 6 + 8 + 8 + 8);
        let got = read_mem_block(&mut rd(&bytes), |n| {
            assert_eq!(n, "pc.ram");
            MemBlockFields {
                page_size: true,
                addr: true,
            }
        })
        .unwrap();
        assert_eq!(got, b);
    }
}
