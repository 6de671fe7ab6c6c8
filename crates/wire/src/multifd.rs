//! Multifd channels as syntax (stream-format.md §4): the 64-byte handshake that opens each
//! channel ([`InitPacket`], QEMU's `MultiFDInit_t`) and the fixed 1344-byte packet header
//! ([`PacketHeader`], QEMU 7.2's `MultiFDPacket_t` with its 128 page offsets) that precedes each
//! batch of pages.
//!
//! Headers are encoded into and decoded from a caller's buffer, so a channel reuses one buffer
//! for its whole life and no packet allocates. Payloads are not handled here: after a header
//! the caller reads `normal_pages` pages (or `next_packet_size` compressed bytes) itself,
//! straight into guest memory. Every check QEMU's receiver makes on the header is made here,
//! with QEMU's words; what needs the machine (does the RAM block exist, is the offset inside
//! it) is the engine's.
//!
//! Channels are one-way (source → destination); counters on them are per channel, and errors
//! name the byte offset on the channel where the bad item starts.

use crate::error::{Result, WireError, WireErrorKind};

/// `MULTIFD_MAGIC`: the first four bytes of the handshake and of every packet.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// `MULTIFD_VERSION`.
pub const MULTIFD_VERSION: u32 = 1;
/// `MULTIFD_PACKET_SIZE`: the payload bytes one packet carries at most, uncompressed.
pub const MULTIFD_PACKET_SIZE: usize = 512 * 1024;
/// Page offsets in every packet header: `MULTIFD_PACKET_SIZE / 4096`.
pub const PAGES_PER_PACKET: usize = MULTIFD_PACKET_SIZE / 4096;
/// Length of the handshake ([`InitPacket`]).
pub const INIT_LEN: usize = 64;
/// Length of the header fields before the block name.
const FIXED_LEN: usize = 64;
/// Room for the block name (NUL-padded, at most 255 bytes of name).
pub const RAMBLOCK_LEN: usize = 256;
/// Length of every packet header on the wire: fields, block name, 128 be64 offsets. QEMU
/// always sends (and reads) all of it, whatever the page counts say.
pub const PACKET_HEADER_LEN: usize = FIXED_LEN + RAMBLOCK_LEN + 8 * PAGES_PER_PACKET;

/// `MULTIFD_FLAG_SYNC`: the receiver waits after this packet until the main stream reaches
/// its next sync point.
pub const FLAG_SYNC: u32 = 0x01;
/// The compression method's bits (QEMU 7.2 reserves three).
pub const FLAG_COMPRESSION_MASK: u32 = 0x0e;
/// Flag bits QEMU 7.2 defines; a receiver of 7.2 ignores the others (later QEMUs use 0x40
/// for device state, which 7.2 would misread as pages).
pub const FLAGS_KNOWN: u32 = FLAG_SYNC | FLAG_COMPRESSION_MASK;

/// How a channel's pages travel (`multifd-compression`), with its flag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Raw pages (`none`, flag 0).
    None,
    /// One zlib stream per channel, flushed (`Z_SYNC_FLUSH`) at the end of each packet
    /// (`zlib`, flag 0x02).
    Zlib,
    /// One zstd stream per channel, flushed (`ZSTD_e_flush`) at the end of each packet
    /// (`zstd`, flag 0x04).
    Zstd,
}

impl Compression {
    /// The method's value in the flags.
    pub fn flag(self) -> u32 {
        match self {
            Compression::None => 0,
            Compression::Zlib => 0x02,
            Compression::Zstd => 0x04,
        }
    }

    /// The method a packet's flags name, if 7.2 knows it.
    pub fn from_flags(flags: u32) -> Option<Compression> {
        match flags & FLAG_COMPRESSION_MASK {
            0 => Some(Compression::None),
            0x02 => Some(Compression::Zlib),
            0x04 => Some(Compression::Zstd),
            _ => None,
        }
    }

    /// QEMU's name (`multifd-compression`).
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }

    /// Parses QEMU's name.
    pub fn parse(s: &str) -> Option<Compression> {
        match s {
            "none" => Some(Compression::None),
            "zlib" => Some(Compression::Zlib),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_be_bytes(v)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_be_bytes(v)
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(at..at + v.len()) {
        d.copy_from_slice(v);
    }
}

/// A UUID as QEMU prints it (`qemu_uuid_unparse`).
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

/// The handshake that opens a multifd channel (`MultiFDInit_t`): magic, version, the VM's
/// UUID and the channel's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitPacket {
    /// The source's `qemu_uuid` (all zero unless QEMU ran with `-uuid`); the destination
    /// requires its own.
    pub uuid: [u8; 16],
    /// The channel's index, 0..channels.
    pub id: u8,
}

impl InitPacket {
    /// The 64 bytes on the wire.
    pub fn encode(&self) -> [u8; INIT_LEN] {
        let mut b = [0u8; INIT_LEN];
        put(&mut b, 0, &MULTIFD_MAGIC.to_be_bytes());
        put(&mut b, 4, &MULTIFD_VERSION.to_be_bytes());
        put(&mut b, 8, &self.uuid);
        b[24] = self.id;
        b
    }

    /// Decodes and checks a handshake as QEMU's `multifd_recv_initial_packet` does, against
    /// the destination's UUID and channel count. `offset` is where it started on its channel
    /// (0), for the error.
    pub fn decode(
        b: &[u8; INIT_LEN],
        uuid: &[u8; 16],
        channels: u32,
        offset: u64,
    ) -> Result<InitPacket> {
        let err = |kind| WireError::new(offset, kind);
        let magic = be32(b, 0);
        if magic != MULTIFD_MAGIC {
            return Err(err(WireErrorKind::MultifdInitMagic { magic }));
        }
        let version = be32(b, 4);
        if version != MULTIFD_VERSION {
            return Err(err(WireErrorKind::MultifdInitVersion { version }));
        }
        let mut got = [0u8; 16];
        got.copy_from_slice(&b[8..24]);
        let id = b[24];
        if &got != uuid {
            return Err(err(WireErrorKind::MultifdUuid {
                received: uuid_string(&got),
                expected: uuid_string(uuid),
                id,
            }));
        }
        // QEMU 7.2 compares `id > channels` (one too many) with a message about the version;
        // an id must name one of the channels.
        if u32::from(id) >= channels {
            return Err(err(WireErrorKind::MultifdChannelId { id, channels }));
        }
        Ok(InitPacket { uuid: got, id })
    }
}

/// The header of one multifd packet, decoded. Fixed-size, so a channel keeps one and decodes
/// every packet into it without allocating.
#[derive(Clone, PartialEq, Eq)]
pub struct PacketHeader {
    /// `FLAG_SYNC` and the compression method.
    pub flags: u32,
    /// Offsets the sender had room for (≤ [`PAGES_PER_PACKET`]).
    pub pages_alloc: u32,
    /// Pages that follow (≤ `pages_alloc`).
    pub normal_pages: u32,
    /// Bytes of payload that follow: the pages, or their compressed form. Stale in some
    /// QEMU 7.2 packets without pages (the sender does not clear its packet buffer), so only
    /// compressed packets are read by it.
    pub next_packet_size: u32,
    /// A global packet number; not per channel, and it can repeat.
    pub packet_num: u64,
    ramblock: [u8; RAMBLOCK_LEN],
    offsets: [u64; PAGES_PER_PACKET],
}

impl Default for PacketHeader {
    fn default() -> Self {
        PacketHeader {
            flags: 0,
            pages_alloc: 0,
            normal_pages: 0,
            next_packet_size: 0,
            packet_num: 0,
            ramblock: [0; RAMBLOCK_LEN],
            offsets: [0; PAGES_PER_PACKET],
        }
    }
}

impl std::fmt::Debug for PacketHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketHeader")
            .field("flags", &self.flags)
            .field("pages_alloc", &self.pages_alloc)
            .field("normal_pages", &self.normal_pages)
            .field("next_packet_size", &self.next_packet_size)
            .field("packet_num", &self.packet_num)
            .field("ramblock", &String::from_utf8_lossy(self.ramblock_bytes()))
            .field("offsets", &self.offsets())
            .finish()
    }
}

impl PacketHeader {
    /// The block name's bytes, up to the first NUL (QEMU terminates it at byte 255 whatever
    /// the sender wrote).
    pub fn ramblock_bytes(&self) -> &[u8] {
        let end = self
            .ramblock
            .iter()
            .take(RAMBLOCK_LEN - 1)
            .position(|&c| c == 0)
            .unwrap_or(RAMBLOCK_LEN - 1);
        &self.ramblock[..end]
    }

    /// The block name, if it is UTF-8 (every block name QEMU or livemig gives is).
    pub fn ramblock(&self) -> Option<&str> {
        std::str::from_utf8(self.ramblock_bytes()).ok()
    }

    /// The offsets of the `normal_pages` pages that follow, in order.
    pub fn offsets(&self) -> &[u64] {
        let n = (self.normal_pages as usize).min(PAGES_PER_PACKET);
        &self.offsets[..n]
    }

    /// Whether the packet ends a sync round on its channel.
    pub fn is_sync(&self) -> bool {
        self.flags & FLAG_SYNC != 0
    }

    /// Decodes `b` (a whole header) into `self`, with the checks of QEMU 7.2's
    /// `multifd_recv_unfill_packet` that need no machine: magic, version, `pages_alloc` at
    /// most 128, `normal_pages` at most `pages_alloc`. The block name and the offsets are
    /// taken only when there are pages (QEMU ignores them otherwise). `offset` is where the
    /// header started on its channel.
    pub fn decode_from(&mut self, b: &[u8; PACKET_HEADER_LEN], offset: u64) -> Result<()> {
        let err = |kind| WireError::new(offset, kind);
        let magic = be32(b, 0);
        if magic != MULTIFD_MAGIC {
            return Err(err(WireErrorKind::MultifdPacketMagic { magic }));
        }
        let version = be32(b, 4);
        if version != MULTIFD_VERSION {
            return Err(err(WireErrorKind::MultifdPacketVersion { version }));
        }
        let flags = be32(b, 8);
        let pages_alloc = be32(b, 12);
        if pages_alloc as usize > PAGES_PER_PACKET {
            return Err(err(WireErrorKind::MultifdPacketSize {
                size: pages_alloc,
                expected: PAGES_PER_PACKET as u32,
            }));
        }
        let normal_pages = be32(b, 16);
        if normal_pages > pages_alloc {
            return Err(err(WireErrorKind::MultifdPacketPages {
                pages: normal_pages,
                max: pages_alloc,
            }));
        }
        self.flags = flags;
        self.pages_alloc = pages_alloc;
        self.normal_pages = normal_pages;
        self.next_packet_size = be32(b, 20);
        self.packet_num = be64(b, 24);
        if normal_pages > 0 {
            if let Some(name) = b.get(FIXED_LEN..FIXED_LEN + RAMBLOCK_LEN) {
                self.ramblock.copy_from_slice(name);
            }
            for (i, o) in self
                .offsets
                .iter_mut()
                .take(normal_pages as usize)
                .enumerate()
            {
                *o = be64(b, FIXED_LEN + RAMBLOCK_LEN + 8 * i);
            }
        } else {
            self.ramblock = [0; RAMBLOCK_LEN];
        }
        Ok(())
    }
}

/// What a sender puts in one packet header.
#[derive(Debug, Clone, Copy)]
pub struct PacketFields<'a> {
    /// `FLAG_SYNC` and the compression method.
    pub flags: u32,
    /// The global packet number.
    pub packet_num: u64,
    /// Payload bytes that follow (pages, or their compressed form).
    pub next_packet_size: u32,
    /// The block the pages belong to (ignored without pages).
    pub ramblock: &'a str,
    /// The pages' offsets in the block (at most [`PAGES_PER_PACKET`]).
    pub offsets: &'a [u64],
}

/// Encodes a packet header into `b`, which a sender keeps for its whole life: the parts a
/// previous packet wrote and this one does not (offsets past `offsets.len()`) are cleared, so
/// the bytes depend only on `fields`. `pages_alloc` is always 128, as QEMU's sender says.
/// Fails for more than 128 offsets and for a block name QEMU cannot hold (empty names are
/// allowed only without pages; at most 255 bytes).
pub fn encode_packet(b: &mut [u8; PACKET_HEADER_LEN], fields: &PacketFields<'_>) -> Result<()> {
    let n = fields.offsets.len();
    if n > PAGES_PER_PACKET {
        return Err(WireError::new(
            0,
            WireErrorKind::TooMany {
                what: "pages in a multifd packet",
                limit: PAGES_PER_PACKET as u64,
            },
        ));
    }
    let name = fields.ramblock.as_bytes();
    if name.len() >= RAMBLOCK_LEN || (n > 0 && name.is_empty()) {
        return Err(WireError::new(
            0,
            WireErrorKind::BadStringLength {
                what: "multifd RAM block name",
                len: name.len(),
            },
        ));
    }
    b.fill(0);
    put(b, 0, &MULTIFD_MAGIC.to_be_bytes());
    put(b, 4, &MULTIFD_VERSION.to_be_bytes());
    put(b, 8, &fields.flags.to_be_bytes());
    put(b, 12, &(PAGES_PER_PACKET as u32).to_be_bytes());
    put(b, 16, &(n as u32).to_be_bytes());
    put(b, 20, &fields.next_packet_size.to_be_bytes());
    put(b, 24, &fields.packet_num.to_be_bytes());
    if n > 0 {
        put(b, FIXED_LEN, name);
    }
    for (i, o) in fields.offsets.iter().enumerate() {
        put(b, FIXED_LEN + RAMBLOCK_LEN + 8 * i, &o.to_be_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn init_packet_bytes_are_qemus() {
        // Channel 1's handshake as QEMU 7.2 sends it (stream-format.md §4.2).
        let b = InitPacket {
            uuid: [0; 16],
            id: 1,
        }
        .encode();
        let mut want = vec![0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1];
        want.extend([0u8; 16]);
        want.push(1);
        want.resize(64, 0);
        assert_eq!(&b[..], &want[..]);
        let p = InitPacket::decode(&b, &[0; 16], 2, 0).unwrap();
        assert_eq!(p.id, 1);
    }

    #[test]
    fn init_packet_checks_have_qemus_words() {
        let good = InitPacket {
            uuid: [0; 16],
            id: 3,
        }
        .encode();
        let e = |b: &[u8; 64], ch| {
            InitPacket::decode(b, &[0; 16], ch, 0)
                .unwrap_err()
                .kind
                .to_string()
        };
        let mut b = good;
        b[0] = 0x12;
        assert_eq!(
            e(&b, 4),
            "multifd: received packet magic 12223344 expected 11223344"
        );
        let mut b = good;
        b[7] = 2;
        assert_eq!(e(&b, 4), "multifd: received packet version 2 expected 1");
        let mut b = good;
        b[8] = 0xab;
        assert_eq!(
            e(&b, 4),
            "multifd: received uuid 'ab000000-0000-0000-0000-000000000000' and expected uuid \
             '00000000-0000-0000-0000-000000000000' for channel 3"
        );
        assert_eq!(
            e(&good, 3),
            "multifd: received channel id 3, but only 3 channels are expected"
        );
    }

    fn header(fields: &PacketFields<'_>) -> Box<[u8; PACKET_HEADER_LEN]> {
        let mut b = Box::new([0xeeu8; PACKET_HEADER_LEN]);
        encode_packet(&mut b, fields).unwrap();
        b
    }

    #[test]
    fn packet_header_layout() {
        let b = header(&PacketFields {
            flags: FLAG_SYNC,
            packet_num: 3,
            next_packet_size: 8192,
            ramblock: "ram",
            offsets: &[0x3000, 0x4000],
        });
        assert_eq!(b.len(), 1344);
        assert_eq!(&b[..8], &[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
        assert_eq!(be32(&b[..], 8), 1);
        assert_eq!(be32(&b[..], 12), 128);
        assert_eq!(be32(&b[..], 16), 2);
        assert_eq!(be32(&b[..], 20), 8192);
        assert_eq!(be64(&b[..], 24), 3);
        assert!(b[32..64].iter().all(|&c| c == 0));
        assert_eq!(&b[64..68], b"ram\0");
        assert_eq!(be64(&b[..], 320), 0x3000);
        assert_eq!(be64(&b[..], 328), 0x4000);
        assert!(b[336..].iter().all(|&c| c == 0));
        let mut h = PacketHeader::default();
        h.decode_from(&b, 0).unwrap();
        assert!(h.is_sync());
        assert_eq!(h.ramblock(), Some("ram"));
        assert_eq!(h.offsets(), &[0x3000, 0x4000]);
        assert_eq!(Compression::from_flags(h.flags), Some(Compression::None));
    }

    #[test]
    fn qemus_stale_packet_reads_as_empty() {
        // 7.2 sends an empty packet whose other fields are left from the one before.
        let mut b = header(&PacketFields {
            flags: 0,
            packet_num: 3,
            next_packet_size: 8192,
            ramblock: "ram",
            offsets: &[0x3000, 0x4000],
        });
        b[16..20].copy_from_slice(&0u32.to_be_bytes());
        let mut h = PacketHeader::default();
        h.decode_from(&b, 0).unwrap();
        assert!(h.offsets().is_empty());
        assert_eq!(h.ramblock(), Some(""));
        assert!(!h.is_sync());
    }

    #[test]
    fn packet_checks_have_qemus_words() {
        let good = header(&PacketFields {
            flags: 0,
            packet_num: 0,
            next_packet_size: 0,
            ramblock: "ram",
            offsets: &[0],
        });
        let e = |b: &[u8; PACKET_HEADER_LEN]| {
            PacketHeader::default()
                .decode_from(b, 0x40)
                .unwrap_err()
                .to_string()
        };
        let mut b = good.clone();
        b[3] = 0x45;
        assert_eq!(
            e(&b),
            "at byte 0x40: multifd: received packet magic 11223345 and expected magic 11223344"
        );
        let mut b = good.clone();
        b[7] = 9;
        assert_eq!(
            e(&b),
            "at byte 0x40: multifd: received packet version 9 and expected version 1"
        );
        let mut b = good.clone();
        b[12..16].copy_from_slice(&129u32.to_be_bytes());
        assert_eq!(
            e(&b),
            "at byte 0x40: multifd: received packet with size 129 and expected a size of 128"
        );
        let mut b = good.clone();
        b[12..16].copy_from_slice(&4u32.to_be_bytes());
        b[16..20].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(
            e(&b),
            "at byte 0x40: multifd: received packet with 5 pages and expected maximum pages are 4"
        );
    }

    #[test]
    fn block_name_is_cut_at_255_bytes() {
        let mut b = header(&PacketFields {
            flags: 0,
            packet_num: 0,
            next_packet_size: 0,
            ramblock: "r",
            offsets: &[0],
        });
        b[64..320].fill(b'x');
        let mut h = PacketHeader::default();
        h.decode_from(&b, 0).unwrap();
        assert_eq!(h.ramblock_bytes().len(), 255);
    }

    #[test]
    fn encoder_refuses_what_qemu_cannot_read() {
        let mut b = Box::new([0u8; PACKET_HEADER_LEN]);
        let offs = [0u64; 129];
        let f = |ramblock, offsets| PacketFields {
            flags: 0,
            packet_num: 0,
            next_packet_size: 0,
            ramblock,
            offsets,
        };
        assert!(encode_packet(&mut b, &f("ram", &offs)).is_err());
        assert!(encode_packet(&mut b, &f("", &offs[..1])).is_err());
        let long = "x".repeat(256);
        assert!(encode_packet(&mut b, &f(&long, &offs[..1])).is_err());
        encode_packet(&mut b, &f("", &[])).unwrap();
    }

    #[test]
    fn uuid_is_printed_as_qemu_prints_it() {
        let u: [u8; 16] = core::array::from_fn(|i| i as u8 * 17);
        assert_eq!(uuid_string(&u), "00112233-4455-6677-8899-aabbccddeeff");
    }

    proptest! {
        #[test]
        fn headers_round_trip(
            flags in any::<u32>(),
            num in any::<u64>(),
            size in any::<u32>(),
            name in "[a-z.]{1,255}",
            offsets in proptest::collection::vec(any::<u64>(), 0..=128),
        ) {
            let b = header(&PacketFields {
                flags, packet_num: num, next_packet_size: size, ramblock: &name, offsets: &offsets,
            });
            let mut h = PacketHeader::default();
            h.decode_from(&b, 0).unwrap();
            prop_assert_eq!(h.flags, flags);
            prop_assert_eq!(h.packet_num, num);
            prop_assert_eq!(h.next_packet_size, size);
            prop_assert_eq!(h.offsets(), &offsets[..]);
            if !offsets.is_empty() {
                prop_assert_eq!(h.ramblock(), Some(name.as_str()));
            }
        }

        #[test]
        fn any_header_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), PACKET_HEADER_LEN)) {
            let mut b = [0u8; PACKET_HEADER_LEN];
            b.copy_from_slice(&bytes);
            b[..8].copy_from_slice(&[0x11, 0x22, 0x33, 0x44, 0, 0, 0, 1]);
            let mut h = PacketHeader::default();
            if h.decode_from(&b, 0).is_ok() {
                prop_assert!(h.offsets().len() <= h.pages_alloc as usize);
                prop_assert!(h.pages_alloc as usize <= PAGES_PER_PACKET);
            }
        }
    }
}
