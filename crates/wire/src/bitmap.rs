//! Chunk syntax of the `dirty-bitmap` section (dirty-bitmaps.md §4.2–4.4, §5.2).
//!
//! A chunk is: flags (1, 2 or 4 bytes), node alias if DEVICE_NAME, bitmap alias if
//! BITMAP_NAME, then a payload chosen by START, else COMPLETE, else BITS. QEMU's own flag
//! decoder truncates the multi-byte forms (§5.2); this one decodes them into a `u32` and rejects
//! bits no version defines. The encoder always writes one flags byte, as QEMU does.
//!
//! Names are elided on the wire when unchanged since the previous chunk (across sections):
//! decoded chunks carry `None` then, and [`NameTracker`] resolves them.

use crate::error::{Result, WireErrorKind};
use crate::reader::StreamReader;
use crate::writer::StreamWriter;
use std::io::{IoSlice, Read, Write};

/// idstr of the section.
pub const DIRTY_BITMAP_IDSTR: &str = "dirty-bitmap";
/// Version of the section (`dirty_bitmap_load` wants exactly 1).
pub const DIRTY_BITMAP_VERSION: u32 = 1;

/// End of this section's chunk list.
pub const FLAG_EOS: u32 = 0x01;
/// BITS chunk whose data is all zero; no buffer follows.
pub const FLAG_ZEROES: u32 = 0x02;
/// Bitmap alias follows.
pub const FLAG_BITMAP_NAME: u32 = 0x04;
/// Node alias follows.
pub const FLAG_DEVICE_NAME: u32 = 0x08;
/// First chunk of a bitmap: granularity and START flags.
pub const FLAG_START: u32 = 0x10;
/// Bitmap fully transferred.
pub const FLAG_COMPLETE: u32 = 0x20;
/// Bitmap data for a sector range.
pub const FLAG_BITS: u32 = 0x40;
/// In a flags byte: more flag bytes follow.
pub const FLAG_EXTRA_FLAGS: u32 = 0x80;
/// Every flag any version defines.
pub const KNOWN_FLAGS: u32 = 0x7F;

/// START flags: the source bitmap was enabled.
pub const START_FLAG_ENABLED: u8 = 0x01;
/// START flags: the bitmap is persistent.
pub const START_FLAG_PERSISTENT: u8 = 0x02;
/// START flags: formerly AUTOLOAD, now ignored.
pub const START_FLAG_AUTOLOAD: u8 = 0x04;
/// START flags that must be zero ("Unknown flags in migrated dirty bitmap header").
pub const START_FLAG_RESERVED_MASK: u8 = 0xF8;

/// Bytes of bitmap per full BITS chunk (QEMU's CHUNK_SIZE).
pub const CHUNK_SIZE: u64 = 1024;
/// QEMU's cap on a BITS buffer: 10 × CHUNK_SIZE.
pub const MAX_BUFFER_SIZE: u64 = 10 * CHUNK_SIZE;
/// BITS buffers are padded to a multiple of this (4 × sizeof(long) on LP64 hosts).
pub const BUFFER_ALIGN: usize = 32;
/// Bitmap sector size (512 bytes).
pub const SECTOR_BITS: u32 = 9;

/// The data of a BITS chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitsData {
    /// ZEROES: the range is all clear; no buffer on the wire.
    Zeroes,
    /// The serialized bitmap: little-endian words, granule i = bit i%8 of byte i/8,
    /// zero-padded (see [`pad_buffer`]).
    Buffer(Vec<u8>),
}

/// What a chunk carries after its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    /// START: a bitmap begins.
    Start {
        /// Granularity in bytes (not validated here: power of two ≥ 512 is the engine's check).
        granularity: u32,
        /// START flags ([`START_FLAG_ENABLED`], [`START_FLAG_PERSISTENT`]; reserved bits are
        /// kept for the engine to reject, see [`START_FLAG_RESERVED_MASK`]).
        flags: u8,
    },
    /// BITS: data for a range of 512-byte sectors.
    Bits {
        /// First sector.
        start_sector: u64,
        /// Number of sectors.
        nr_sectors: u32,
        /// Zeroes or a buffer.
        data: BitsData,
    },
    /// COMPLETE: the bitmap is fully transferred.
    Complete,
    /// No payload (typically the EOS chunk).
    None,
}

/// One chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Node alias, when on the wire (DEVICE_NAME).
    pub node: Option<String>,
    /// Bitmap alias, when on the wire (BITMAP_NAME).
    pub bitmap: Option<String>,
    /// The payload.
    pub payload: ChunkPayload,
    /// EOS is set: the section's chunk list ends with this chunk.
    pub eos: bool,
}

impl Chunk {
    /// A chunk with `payload` and no EOS, its names as [`NameTracker::encode`] gives them
    /// (`None` where the previous chunk's name stands).
    pub fn new((node, bitmap): (Option<String>, Option<String>), payload: ChunkPayload) -> Self {
        Chunk {
            node,
            bitmap,
            payload,
            eos: false,
        }
    }

    /// The EOS-only chunk that ends every section body.
    pub fn eos() -> Self {
        Chunk {
            node: None,
            bitmap: None,
            payload: ChunkPayload::None,
            eos: true,
        }
    }

    /// The flags this chunk has on the wire when encoded.
    pub fn flags(&self) -> u32 {
        let mut f = 0;
        if self.eos {
            f |= FLAG_EOS;
        }
        if self.node.is_some() {
            f |= FLAG_DEVICE_NAME;
        }
        if self.bitmap.is_some() {
            f |= FLAG_BITMAP_NAME;
        }
        match &self.payload {
            ChunkPayload::Start { .. } => f |= FLAG_START,
            ChunkPayload::Complete => f |= FLAG_COMPLETE,
            ChunkPayload::Bits { data, .. } => {
                f |= FLAG_BITS;
                if *data == BitsData::Zeroes {
                    f |= FLAG_ZEROES;
                }
            }
            ChunkPayload::None => {}
        }
        f
    }
}

/// Reads chunk flags in their 1-, 2- or 4-byte form and returns the defined flag bits.
/// Continuation markers are removed; any other bit beyond [`KNOWN_FLAGS`] is an error.
pub fn read_flags<R: Read>(r: &mut StreamReader<R>) -> Result<u32> {
    let at = r.offset();
    let b0 = u32::from(r.u8()?);
    let (value, markers) = if b0 & FLAG_EXTRA_FLAGS == 0 {
        (b0, 0)
    } else {
        let v = (b0 << 8) | u32::from(r.u8()?);
        if v & FLAG_EXTRA_FLAGS == 0 {
            (v, 0x8000)
        } else {
            ((v << 16) | u32::from(r.be16()?), 0x8080_0000)
        }
    };
    let flags = value & !markers;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(r.error_at(at, WireErrorKind::BitmapUnknownFlags { flags: value }));
    }
    Ok(flags)
}

/// What comes before a chunk's payload: its flags and the names it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkHeader {
    /// The defined flag bits (see [`read_flags`]).
    pub flags: u32,
    /// Node alias, when on the wire (DEVICE_NAME).
    pub node: Option<String>,
    /// Bitmap alias, when on the wire (BITMAP_NAME).
    pub bitmap: Option<String>,
}

/// Reads a chunk's flags and names. A caller that reads the payload separately
/// ([`read_chunk_payload`]) knows which bitmap a bad payload belongs to before it fails.
pub fn read_chunk_header<R: Read>(r: &mut StreamReader<R>) -> Result<ChunkHeader> {
    let flags = read_flags(r)?;
    let node = if flags & FLAG_DEVICE_NAME != 0 {
        Some(r.counted_string("node alias string")?)
    } else {
        None
    };
    let bitmap = if flags & FLAG_BITMAP_NAME != 0 {
        Some(r.counted_string("bitmap alias string")?)
    } else {
        None
    };
    Ok(ChunkHeader {
        flags,
        node,
        bitmap,
    })
}

/// Reads the payload that follows a chunk header with `flags`: START if that flag is set, else
/// COMPLETE, else BITS, else none. `options().max_bitmap_buffer` bounds BITS buffers, checked
/// before allocating.
pub fn read_chunk_payload<R: Read>(r: &mut StreamReader<R>, flags: u32) -> Result<ChunkPayload> {
    Ok(if flags & FLAG_START != 0 {
        ChunkPayload::Start {
            granularity: r.be32()?,
            flags: r.u8()?,
        }
    } else if flags & FLAG_COMPLETE != 0 {
        ChunkPayload::Complete
    } else if flags & FLAG_BITS != 0 {
        let start_sector = r.be64()?;
        let nr_sectors = r.be32()?;
        let data = if flags & FLAG_ZEROES != 0 {
            BitsData::Zeroes
        } else {
            let at = r.offset();
            let size = r.be64()?;
            let limit = r.options().max_bitmap_buffer;
            if size > limit {
                return Err(r.error_at(at, WireErrorKind::BitmapBufferTooLarge { size, limit }));
            }
            BitsData::Buffer(r.bytes(size, limit, "bitmap buffer")?)
        };
        ChunkPayload::Bits {
            start_sector,
            nr_sectors,
            data,
        }
    } else {
        ChunkPayload::None
    })
}

/// Reads one chunk: [`read_chunk_header`], then [`read_chunk_payload`].
pub fn read_chunk<R: Read>(r: &mut StreamReader<R>) -> Result<Chunk> {
    let h = read_chunk_header(r)?;
    let payload = read_chunk_payload(r, h.flags)?;
    Ok(Chunk {
        node: h.node,
        bitmap: h.bitmap,
        payload,
        eos: h.flags & FLAG_EOS != 0,
    })
}

/// Writes one chunk with exactly one flags byte derived from its contents.
pub fn write_chunk<W: Write>(w: &mut StreamWriter<W>, c: &Chunk) -> Result<()> {
    w.put_u8(c.flags() as u8)?;
    if let Some(n) = &c.node {
        w.put_counted_string(n, "node alias string")?;
    }
    if let Some(b) = &c.bitmap {
        w.put_counted_string(b, "bitmap alias string")?;
    }
    match &c.payload {
        ChunkPayload::Start { granularity, flags } => {
            w.put_be32(*granularity)?;
            w.put_u8(*flags)
        }
        ChunkPayload::Bits {
            start_sector,
            nr_sectors,
            data,
        } => {
            w.put_be64(*start_sector)?;
            w.put_be32(*nr_sectors)?;
            if let BitsData::Buffer(buf) = data {
                w.put_be64(buf.len() as u64)?;
                w.write_vectored_all(&mut [IoSlice::new(buf)])?;
            }
            Ok(())
        }
        ChunkPayload::Complete | ChunkPayload::None => Ok(()),
    }
}

/// Size QEMU gives the buffer of a chunk of `granules` granules: whole 64-bit words, padded to
/// [`BUFFER_ALIGN`] bytes.
pub fn buffer_size(granules: u64) -> u64 {
    let words = granules.div_ceil(64);
    words
        .saturating_mul(8)
        .div_ceil(BUFFER_ALIGN as u64)
        .saturating_mul(BUFFER_ALIGN as u64)
}

/// Pads a serialized chunk with zeros to a multiple of [`BUFFER_ALIGN`] bytes, as QEMU does.
pub fn pad_buffer(buf: &mut Vec<u8>) {
    let len = buf.len().div_ceil(BUFFER_ALIGN) * BUFFER_ALIGN;
    buf.resize(len, 0);
}

/// Tracks the node and bitmap names that chunks elide when unchanged (the state persists
/// across sections, on both sides).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NameTracker {
    node: Option<String>,
    bitmap: Option<String>,
}

impl NameTracker {
    /// A tracker that has seen no names.
    pub fn new() -> Self {
        Self::default()
    }

    /// Updates the state from a decoded chunk and returns the (node, bitmap) it refers to;
    /// `None` parts were never named.
    pub fn resolve(&mut self, c: &Chunk) -> (Option<&str>, Option<&str>) {
        if let Some(n) = &c.node {
            self.node = Some(n.clone());
        }
        if let Some(b) = &c.bitmap {
            self.bitmap = Some(b.clone());
        }
        (self.node.as_deref(), self.bitmap.as_deref())
    }

    /// For writers: the next chunk names its bitmap again, whatever the last one named (a
    /// stream resumed on a new connection, where the last chunk written may have been lost).
    pub fn forget_bitmap(&mut self) {
        self.bitmap = None;
    }

    /// For writers: the next chunk names its node and bitmap again.
    pub fn forget(&mut self) {
        *self = Self::default();
    }

    /// For writers: the (node, bitmap) names to put on the wire for a chunk about
    /// `node`/`bitmap` (each `None` when unchanged), updating the state.
    pub fn encode(&mut self, node: &str, bitmap: &str) -> (Option<String>, Option<String>) {
        let n = if self.node.as_deref() == Some(node) {
            None
        } else {
            self.node = Some(node.to_string());
            Some(node.to_string())
        };
        let b = if self.bitmap.as_deref() == Some(bitmap) {
            None
        } else {
            self.bitmap = Some(bitmap.to_string());
            Some(bitmap.to_string())
        };
        (n, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(b: &[u8]) -> Vec<Chunk> {
        let mut r = StreamReader::new(b);
        let mut out = Vec::new();
        while !r.is_at_eof().unwrap() {
            out.push(read_chunk(&mut r).unwrap());
        }
        out
    }

    fn encode_all(cs: &[Chunk]) -> Vec<u8> {
        let mut w = StreamWriter::new(Vec::new());
        for c in cs {
            write_chunk(&mut w, c).unwrap();
        }
        w.into_inner().unwrap()
    }

    fn start(node: Option<&str>, bitmap: &str, flags: u8) -> Chunk {
        let payload = ChunkPayload::Start {
            granularity: 65536,
            flags,
        };
        Chunk::new((node.map(Into::into), Some(bitmap.into())), payload)
    }

    #[test]
    fn walkthrough_start_chunk() {
        // §8.1 offset 0x62: 1c 03 "vda" 07 "bitmap0" 00010000 03, then 01.
        let mut b = vec![0x1c, 3];
        b.extend(b"vda");
        b.push(7);
        b.extend(b"bitmap0");
        b.extend([0, 1, 0, 0, 3, 1]);
        let cs = decode_all(&b);
        assert_eq!(cs, vec![start(Some("vda"), "bitmap0", 3), Chunk::eos()]);
        assert_eq!(encode_all(&cs), b);
    }

    #[test]
    fn decoded_stream_of_section_4_5() {
        let mut data = vec![0u8; 128];
        data[0] = 0x21;
        data[2] = 0x01;
        let start_section = vec![
            Chunk {
                node: Some("node0".into()),
                ..start(None, "bm-disabled", 0)
            },
            start(None, "bitmap0", START_FLAG_ENABLED),
            Chunk::eos(),
        ];
        let end_section = vec![
            Chunk::new(
                (None, Some("bm-disabled".into())),
                ChunkPayload::Bits {
                    start_sector: 0,
                    nr_sectors: 131072,
                    data: BitsData::Zeroes,
                },
            ),
            Chunk::new(
                (None, Some("bitmap0".into())),
                ChunkPayload::Bits {
                    start_sector: 0,
                    nr_sectors: 131072,
                    data: BitsData::Buffer(data),
                },
            ),
            Chunk::new((None, Some("bm-disabled".into())), ChunkPayload::Complete),
            Chunk::new((None, Some("bitmap0".into())), ChunkPayload::Complete),
            Chunk::eos(),
        ];
        let flags: Vec<u32> = start_section
            .iter()
            .chain(&end_section)
            .map(Chunk::flags)
            .collect();
        assert_eq!(flags, vec![0x1c, 0x14, 0x01, 0x46, 0x44, 0x24, 0x24, 0x01]);
        let b = encode_all(&end_section);
        // flags 0x44, name, be64 0, be32 131072, be64 128, then the buffer.
        let p = 1 + 1 + 11 + 8 + 4;
        let q = p + 1 + 1 + 7;
        assert_eq!(&b[q..q + 8], &[0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[q + 8..q + 12], &[0, 2, 0, 0]);
        assert_eq!(&b[q + 12..q + 20], &128u64.to_be_bytes());
        assert_eq!((b[q + 20], b[q + 22]), (0x21, 0x01));
        assert_eq!(decode_all(&b), end_section);
        assert_eq!(decode_all(&encode_all(&start_section)), start_section);
        let mut t = NameTracker::new();
        let names: Vec<(Option<String>, Option<String>)> = start_section
            .iter()
            .chain(&end_section)
            .map(|c| {
                let (n, b) = t.resolve(c);
                (n.map(Into::into), b.map(Into::into))
            })
            .collect();
        assert_eq!(names[4], (Some("node0".into()), Some("bitmap0".into())));
    }

    #[test]
    fn multi_byte_flags_decode_robustly() {
        // 2-byte form: 0x80 marker, then EOS.
        assert_eq!(
            read_flags(&mut StreamReader::new(&[0x80, 0x01][..])).unwrap(),
            FLAG_EOS
        );
        // 4-byte form: 0x80 0x80 then be16 0x0044.
        assert_eq!(
            read_flags(&mut StreamReader::new(&[0x80, 0x80, 0x00, 0x44][..])).unwrap(),
            0x44
        );
        // Undefined bits in any form are rejected.
        let e = read_flags(&mut StreamReader::new(&[0x81, 0x01][..])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x0: Unknown dirty bitmap migration flags: 0x8101"
        );
        assert!(read_flags(&mut StreamReader::new(&[0x80, 0x80, 0x01, 0x00][..])).is_err());
        assert!(read_flags(&mut StreamReader::new(&[0x80, 0x80, 0x00, 0x80][..])).is_err());
        assert!(read_flags(&mut StreamReader::new(&[0x80][..]))
            .unwrap_err()
            .is_truncated());
    }

    #[test]
    fn error_paths() {
        let e = read_chunk(&mut StreamReader::new(&[0x08, 0][..])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x1: Unable to read node alias string"
        );
        let e = read_chunk(&mut StreamReader::new(&[0x04, 0][..])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x1: Unable to read bitmap alias string"
        );
        let mut b = vec![0x40];
        b.extend(0u64.to_be_bytes());
        b.extend(1u32.to_be_bytes());
        b.extend(20480u64.to_be_bytes());
        let mut r = StreamReader::new(&b[..]);
        r.set_section(Some(crate::error::SectionContext::new("dirty-bitmap", 3)));
        let e = read_chunk(&mut r).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0xd in section 'dirty-bitmap' (id 3): Bitmap migration stream buffer allocation request is too large (20480 > 10240)"
        );
    }

    #[test]
    fn header_is_known_before_a_bad_payload() {
        // BITS|DEVICE_NAME|BITMAP_NAME for node "n1", bitmap "big", with a 16 KiB buffer.
        let mut b = vec![0x4c, 2];
        b.extend(b"n1");
        b.push(3);
        b.extend(b"big");
        b.extend(0u64.to_be_bytes());
        b.extend(1u32.to_be_bytes());
        b.extend(16384u64.to_be_bytes());
        let mut r = StreamReader::new(&b[..]);
        let h = read_chunk_header(&mut r).unwrap();
        assert_eq!(
            h,
            ChunkHeader {
                flags: 0x4c,
                node: Some("n1".into()),
                bitmap: Some("big".into()),
            }
        );
        let e = read_chunk_payload(&mut r, h.flags).unwrap_err();
        assert!(matches!(
            e.kind,
            WireErrorKind::BitmapBufferTooLarge { size: 16384, .. }
        ));
        assert_eq!(e.offset, 20);
    }

    #[test]
    fn padding_helpers() {
        assert_eq!(buffer_size(1024), 128);
        assert_eq!(buffer_size(1040), 160);
        assert_eq!(buffer_size(1), 32);
        let mut v = vec![1u8; 136];
        pad_buffer(&mut v);
        assert_eq!(v.len(), 160);
        assert!(v[136..].iter().all(|&b| b == 0));
    }
}
