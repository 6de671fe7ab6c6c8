//! The qcow2 header and its extensions: parsing with QEMU 7.2's checks and messages, and
//! writing it back the way `qcow2_update_header` lays it out (fixed fields, backing format,
//! feature-name table, bitmaps extension, preserved unknown extensions, end marker, backing file
//! name — all inside cluster 0).
//!
//! Every integer is big-endian. The parser works on a byte slice holding cluster 0 and never
//! indexes past it: every field read goes through [`be32`]/[`be64`], which fail on short input.

use crate::error::BlockError;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// End of the header extensions.
pub const EXT_END: u32 = 0;
/// Backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not zlib.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Incompatible features QEMU 7.2 knows.
pub const INCOMPAT_MASK: u64 = 0x1f;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear bits QEMU 7.2 knows (bitmaps, raw external data).
pub const AUTOCLEAR_MASK: u64 = 0x3;

/// Size of the version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Shortest version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// The version 3 header QEMU writes (`sizeof(QCowHeader)`, with the compression type byte and
/// its padding).
pub const V3_HEADER_LENGTH: u32 = 112;
/// Cluster sizes QEMU supports: 2^9 .. 2^21.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// `QCOW_MAX_L1_SIZE`: 32 MiB of L1 table.
pub const MAX_L1_SIZE: u64 = 0x0200_0000;
/// `QCOW_MAX_REFTABLE_SIZE`: 8 MiB of refcount table.
pub const MAX_REFTABLE_SIZE: u64 = 0x0080_0000;
/// `QCOW_MAX_SNAPSHOTS`.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Longest backing file name QEMU reads (`sizeof(bs->auto_backing_file) - 1`).
pub const MAX_BACKING_NAME: u32 = 1023;
/// `QCOW2_MAX_BITMAPS`.
pub const MAX_BITMAPS: u32 = 65535;
/// `QCOW2_MAX_BITMAP_DIRECTORY_SIZE`.
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;

/// QEMU 7.2's feature name table: (type, bit, name). Types: 0 incompatible, 1 compatible,
/// 2 autoclear.
const FEATURES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapsExt {
    /// Number of directory entries.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub dir_size: u64,
    /// Directory offset (cluster-aligned).
    pub dir_offset: u64,
}

/// A parsed header: the fixed fields and the extensions this crate understands; unknown
/// extensions are kept to be written back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// `log2(cluster size)`.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 for none; anything else is refused.
    pub crypt_method: u32,
    /// Entries in the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Autoclear feature bits.
    pub autoclear: u64,
    /// `log2(refcount bits)`, 0..=6.
    pub refcount_order: u32,
    /// Header length as read (72 for version 2).
    pub header_length: u32,
    /// Compression type (0 zlib, 1 zstd).
    pub compression_type: u8,
    /// Backing file name.
    pub backing_file: Option<String>,
    /// Backing file format (extension `0xe2792aca`).
    pub backing_format: Option<String>,
    /// The bitmaps extension, when present *and* valid (autoclear bit set).
    pub bitmaps: Option<BitmapsExt>,
    /// The image had a bitmaps extension that a program without bitmap support left behind
    /// (autoclear bit clear): it was ignored, and a read-write open drops it.
    pub stale_bitmaps_ext: bool,
    /// Feature names from the image's own table, for "Unsupported qcow2 feature(s)".
    pub feature_names: Vec<(u8, u8, String)>,
    /// Extensions this crate does not interpret, in image order.
    pub unknown_extensions: Vec<(u32, Vec<u8>)>,
}

fn err(msg: impl Into<String>) -> BlockError {
    BlockError::Driver(msg.into())
}

/// Reads a big-endian u32 at `off`; an error if `buf` is too short.
pub fn be32(buf: &[u8], off: usize) -> Result<u32, BlockError> {
    let b = buf
        .get(off..off.saturating_add(4))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .ok_or_else(|| err("qcow2 header too short"))?;
    Ok(u32::from_be_bytes(b))
}

/// Reads a big-endian u64 at `off`; an error if `buf` is too short.
pub fn be64(buf: &[u8], off: usize) -> Result<u64, BlockError> {
    let b = buf
        .get(off..off.saturating_add(8))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .ok_or_else(|| err("qcow2 header too short"))?;
    Ok(u64::from_be_bytes(b))
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(bytes.get(..end).unwrap_or_default()).into_owned()
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The fixed fields' checks that need only the first bytes: magic, version, cluster size
    /// (so the caller knows how much of cluster 0 to read). Returns the cluster bits.
    pub fn peek_cluster_bits(buf: &[u8]) -> Result<u32, BlockError> {
        if buf.len() < 8 || be32(buf, 0)? != MAGIC {
            return Err(err("Image is not in qcow2 format"));
        }
        let version = be32(buf, 4)?;
        if !(2..=3).contains(&version) {
            return Err(err(format!("Unsupported qcow2 version {version}")));
        }
        let bits = be32(buf, 20)?;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(err(format!("Unsupported cluster size: 2^{bits}")));
        }
        Ok(bits)
    }

    /// Parses cluster 0 (`buf` holds at least the whole first cluster, or the whole file if it
    /// is shorter), with `qcow2_do_open`'s checks in its order. Feature checks that depend on
    /// how the image is opened are [`Header::check_features`].
    pub fn parse(buf: &[u8]) -> Result<Header, BlockError> {
        let cluster_bits = Self::peek_cluster_bits(buf)?;
        let cs = 1u64 << cluster_bits;
        let version = be32(buf, 4)?;
        let backing_file_offset = be64(buf, 8)?;
        let backing_file_size = be32(buf, 16)?;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(buf, 24)?,
            crypt_method: be32(buf, 32)?,
            l1_size: be32(buf, 36)?,
            l1_table_offset: be64(buf, 40)?,
            refcount_table_offset: be64(buf, 48)?,
            refcount_table_clusters: be32(buf, 56)?,
            nb_snapshots: be32(buf, 60)?,
            snapshots_offset: be64(buf, 64)?,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LENGTH,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
            stale_bitmaps_ext: false,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
        };
        if version >= 3 {
            h.incompatible = be64(buf, 72)?;
            h.compatible = be64(buf, 80)?;
            h.autoclear = be64(buf, 88)?;
            h.refcount_order = be32(buf, 96)?;
            h.header_length = be32(buf, 100)?;
            if h.header_length < V3_MIN_HEADER_LENGTH {
                return Err(err("qcow2 header too short"));
            }
            if u64::from(h.header_length) > cs {
                return Err(err("qcow2 header exceeds cluster size"));
            }
            if h.header_length > V3_MIN_HEADER_LENGTH {
                h.compression_type = buf
                    .get(V3_MIN_HEADER_LENGTH as usize)
                    .copied()
                    .ok_or_else(|| err("qcow2 header too short"))?;
            }
        }
        if backing_file_offset > cs {
            return Err(err("Invalid backing file offset"));
        }
        let ext_end = if backing_file_offset != 0 {
            backing_file_offset
        } else {
            cs
        };
        h.read_extensions(buf, u64::from(h.header_length), ext_end)?;
        if backing_file_offset != 0 && backing_file_size != 0 {
            if backing_file_size > MAX_BACKING_NAME
                || backing_file_offset + u64::from(backing_file_size) > cs
            {
                return Err(err("Backing file name too long"));
            }
            let start = backing_file_offset as usize;
            let name = buf
                .get(start..start + backing_file_size as usize)
                .ok_or_else(|| err("Backing file name too long"))?;
            h.backing_file = Some(String::from_utf8_lossy(name).into_owned());
        }
        Ok(h)
    }

    /// `qcow2_read_extensions`.
    fn read_extensions(&mut self, buf: &[u8], start: u64, end: u64) -> Result<(), BlockError> {
        let mut offset = start;
        while offset < end {
            let o = offset as usize;
            let magic = be32(buf, o)
                .map_err(|_| err("qcow2_read_extension: ERROR: pread fail from offset"))?;
            let len = be32(buf, o + 4)
                .map_err(|_| err("qcow2_read_extension: ERROR: pread fail from offset"))?;
            offset += 8;
            if offset > end || u64::from(len) > end - offset {
                return Err(err("Header extension too large"));
            }
            let data_start = offset as usize;
            let data = buf
                .get(data_start..data_start + len as usize)
                .ok_or_else(|| err("Header extension too large"))?;
            match magic {
                EXT_END => return Ok(()),
                EXT_BACKING_FORMAT => {
                    if len >= 16 {
                        return Err(err(format!(
                            "ERROR: ext_backing_format: len={len} too large (>=16)"
                        )));
                    }
                    self.backing_format = Some(c_string(data));
                }
                EXT_FEATURE_TABLE => {
                    self.feature_names = data
                        .chunks_exact(48)
                        .filter_map(|e| {
                            let (ty, rest) = e.split_first()?;
                            let (bit, name) = rest.split_first()?;
                            Some((*ty, *bit, c_string(name)))
                        })
                        .collect();
                }
                EXT_BITMAPS => self.read_bitmaps_ext(data)?,
                EXT_CRYPTO => {
                    return Err(err(
                        "Encrypted qcow2 images are not supported by this block layer",
                    ))
                }
                EXT_DATA_FILE => {
                    return Err(err(
                        "qcow2 images with an external data file are not supported by this block \
                         layer",
                    ))
                }
                other => self.unknown_extensions.push((other, data.to_vec())),
            }
            offset += (u64::from(len) + 7) & !7;
        }
        Ok(())
    }

    fn read_bitmaps_ext(&mut self, data: &[u8]) -> Result<(), BlockError> {
        if data.len() != 24 {
            return Err(err("bitmaps_ext: Invalid extension length"));
        }
        if self.autoclear & AUTOCLEAR_BITMAPS == 0 {
            self.stale_bitmaps_ext = true;
            return Ok(());
        }
        let nb = be32(data, 0)?;
        let reserved = be32(data, 4)?;
        let dir_size = be64(data, 8)?;
        let dir_offset = be64(data, 16)?;
        if reserved != 0 {
            return Err(err("bitmaps_ext: Reserved field is not zero"));
        }
        if nb > MAX_BITMAPS {
            return Err(err(format!(
                "bitmaps_ext: Image has {nb} bitmaps, exceeding the QEMU supported maximum of \
                 {MAX_BITMAPS}"
            )));
        }
        if nb == 0 {
            return Err(err("found bitmaps extension with zero bitmaps"));
        }
        if dir_offset & (self.cluster_size() - 1) != 0 {
            return Err(err("bitmaps_ext: invalid bitmap directory offset"));
        }
        if dir_size > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(err(format!(
                "bitmaps_ext: bitmap directory size ({dir_size}) exceeds the maximum supported \
                 size ({MAX_BITMAP_DIRECTORY_SIZE})"
            )));
        }
        self.bitmaps = Some(BitmapsExt {
            nb_bitmaps: nb,
            dir_size,
            dir_offset,
        });
        Ok(())
    }

    /// The feature and table checks of `qcow2_do_open` that follow the header: unknown
    /// incompatible features, the corrupt bit for writers, features this crate lacks, the
    /// refcount width, encryption, and the L1, refcount and snapshot table bounds.
    pub fn check_features(&self, writable: bool) -> Result<(), BlockError> {
        let unknown = self.incompatible & !INCOMPAT_MASK;
        if unknown != 0 {
            return Err(err(format!(
                "Unsupported qcow2 feature(s): {}",
                self.describe_features(0, unknown)
            )));
        }
        if self.incompatible & INCOMPAT_CORRUPT != 0 && writable {
            return Err(err("qcow2: Image is corrupt; cannot be opened read/write"));
        }
        if self.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(err(
                "qcow2 images with an external data file are not supported by this block layer",
            ));
        }
        if self.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(err(
                "qcow2 images with extended L2 entries are not supported by this block layer",
            ));
        }
        if self.incompatible & INCOMPAT_DIRTY != 0 && writable {
            return Err(err(
                "qcow2: the image is dirty (lazy refcounts); repair it with 'qemu-img check -r \
                 all' first",
            ));
        }
        if self.refcount_order > 6 {
            return Err(err(
                "Reference count entry width too large; may not exceed 64 bits",
            ));
        }
        if self.crypt_method != 0 {
            return Err(err(format!(
                "Unsupported encryption method: {}",
                self.crypt_method
            )));
        }
        let cs = self.cluster_size();
        let entries_per_l2 = cs / 8;
        if u64::from(self.l1_size) > MAX_L1_SIZE / 8 {
            return Err(err("Active L1 table too large"));
        }
        let needed = self.size.div_ceil(cs).div_ceil(entries_per_l2);
        if needed > i32::MAX as u64 {
            return Err(err("Image is too big"));
        }
        if u64::from(self.l1_size) < needed {
            return Err(err("L1 table is too small"));
        }
        if !table_offset_ok(self.l1_table_offset, u64::from(self.l1_size) * 8, cs)
            || (self.l1_size > 0 && self.l1_table_offset == 0)
        {
            return Err(err("Invalid L1 table offset"));
        }
        if u64::from(self.refcount_table_clusters) * cs > MAX_REFTABLE_SIZE {
            return Err(err("Reference count table too large"));
        }
        if !table_offset_ok(
            self.refcount_table_offset,
            u64::from(self.refcount_table_clusters) * cs,
            cs,
        ) || self.refcount_table_offset == 0
            || self.refcount_table_clusters == 0
        {
            return Err(err("Invalid reference count table offset"));
        }
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(err("Snapshot table too large"));
        }
        if !table_offset_ok(self.snapshots_offset, u64::from(self.nb_snapshots) * 8, cs) {
            return Err(err("Invalid snapshot table offset"));
        }
        Ok(())
    }

    /// `report_unsupported_feature`: names from the image's table, else
    /// `Unknown incompatible feature: <hex>`.
    fn describe_features(&self, ty: u8, mut mask: u64) -> String {
        let mut parts = Vec::new();
        for (t, bit, name) in &self.feature_names {
            if *t == ty && *bit < 64 && mask & (1u64 << bit) != 0 {
                parts.push(name.clone());
                mask &= !(1u64 << bit);
            }
        }
        if mask != 0 {
            parts.push(format!("Unknown incompatible feature: {mask:x}"));
        }
        parts.join(", ")
    }

    /// Cluster 0 as QEMU's `qcow2_update_header` writes it: `cluster_size` bytes, or `ENOSPC`
    /// when the extensions and backing file name do not fit. The feature-name table is left out
    /// when it is what does not fit (QEMU 7.2 does so with 512-byte clusters and a bitmaps
    /// extension, observed).
    pub fn serialize(&self) -> Result<Vec<u8>, BlockError> {
        match self.serialize_with(true) {
            Err(BlockError::Io(nix::errno::Errno::ENOSPC)) => self.serialize_with(false),
            other => other,
        }
    }

    fn serialize_with(&self, feature_table: bool) -> Result<Vec<u8>, BlockError> {
        let cs = self.cluster_size() as usize;
        let mut b: Vec<u8> = Vec::with_capacity(cs);
        let header_length = if self.version >= 3 {
            V3_HEADER_LENGTH
        } else {
            V2_HEADER_LENGTH
        };
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes()); // backing file offset, patched below
        b.extend_from_slice(&0u32.to_be_bytes()); // backing file size, patched below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&header_length.to_be_bytes());
            b.push(self.compression_type);
            b.resize(header_length as usize, 0);
        }
        let ext = |b: &mut Vec<u8>, magic: u32, data: &[u8]| {
            b.extend_from_slice(&magic.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(b.len().next_multiple_of(8), 0);
        };
        if let Some(f) = &self.backing_format {
            ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if self.version >= 3 && feature_table {
            let mut table = Vec::with_capacity(FEATURES.len() * 48);
            for (ty, bit, name) in FEATURES {
                let start = table.len();
                table.push(*ty);
                table.push(*bit);
                table.extend_from_slice(name.as_bytes());
                table.resize(start + 48, 0);
            }
            ext(&mut b, EXT_FEATURE_TABLE, &table);
        }
        if let Some(bm) = self.bitmaps.filter(|bm| bm.nb_bitmaps > 0) {
            let mut data = Vec::with_capacity(24);
            data.extend_from_slice(&bm.nb_bitmaps.to_be_bytes());
            data.extend_from_slice(&0u32.to_be_bytes());
            data.extend_from_slice(&bm.dir_size.to_be_bytes());
            data.extend_from_slice(&bm.dir_offset.to_be_bytes());
            ext(&mut b, EXT_BITMAPS, &data);
        }
        for (magic, data) in &self.unknown_extensions {
            ext(&mut b, *magic, data);
        }
        ext(&mut b, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            let off = b.len() as u64;
            b.extend_from_slice(name.as_bytes());
            if let Some(f) = b.get_mut(8..16) {
                f.copy_from_slice(&off.to_be_bytes());
            }
            if let Some(f) = b.get_mut(16..20) {
                f.copy_from_slice(&(name.len() as u32).to_be_bytes());
            }
        }
        if b.len() > cs {
            return Err(BlockError::Io(nix::errno::Errno::ENOSPC));
        }
        b.resize(cs, 0);
        Ok(b)
    }
}

/// `validate_table_offset`: cluster-aligned, and the table does not reach past `INT64_MAX`.
fn table_offset_ok(offset: u64, bytes: u64, cs: u64) -> bool {
    offset & (cs - 1) == 0
        && offset
            .checked_add(bytes)
            .is_some_and(|e| e <= i64::MAX as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 20,
            crypt_method: 0,
            l1_size: 1,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LENGTH,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            bitmaps: None,
            stale_bitmaps_ext: false,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
        }
    }

    #[test]
    fn layout_matches_qemu_img_create() {
        // `qemu-img create -f qcow2 h.qcow2 1M` (QEMU 7.2): header length 0x70, feature table
        // of 8 entries at 0x70, end marker at 0x1f8.
        let b = sample().serialize().unwrap();
        assert_eq!(&b[..8], &[0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]);
        assert_eq!(be32(&b, 100).unwrap(), 0x70);
        assert_eq!(be32(&b, 0x70).unwrap(), EXT_FEATURE_TABLE);
        assert_eq!(be32(&b, 0x74).unwrap(), 384);
        assert_eq!(&b[0x78..0x78 + 11], b"\0\0dirty bit");
        assert_eq!(&b[0x198..0x1a1], b"\x02\0bitmaps");
        assert_eq!(be64(&b, 0x1f8).unwrap(), 0);
        let parsed = Header::parse(&b).unwrap();
        assert_eq!(parsed.feature_names.len(), 8);
        let mut h = sample();
        h.feature_names = parsed.feature_names.clone();
        assert_eq!(parsed, h);
    }

    #[test]
    fn roundtrip_with_backing_bitmaps_and_unknown_extension() {
        let mut h = sample();
        h.backing_file = Some("base.qcow2".into());
        h.backing_format = Some("qcow2".into());
        h.autoclear = AUTOCLEAR_BITMAPS;
        h.bitmaps = Some(BitmapsExt {
            nb_bitmaps: 2,
            dir_size: 64,
            dir_offset: 0x50000,
        });
        h.unknown_extensions.push((0x1234_5678, vec![1, 2, 3]));
        let b = h.serialize().unwrap();
        let p = Header::parse(&b).unwrap();
        assert_eq!(p.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(p.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(p.bitmaps, h.bitmaps);
        assert_eq!(p.unknown_extensions, vec![(0x1234_5678, vec![1, 2, 3])]);
    }

    #[test]
    fn bad_headers_get_qemu_messages() {
        let good = sample().serialize().unwrap();
        let msg = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            Header::parse(&b)
                .and_then(|h| h.check_features(true))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(msg(&|b| b[0] = 0), "Image is not in qcow2 format");
        assert_eq!(msg(&|b| b[7] = 4), "Unsupported qcow2 version 4");
        assert_eq!(msg(&|b| b[23] = 22), "Unsupported cluster size: 2^22");
        assert_eq!(msg(&|b| b[103] = 100), "qcow2 header too short");
        assert_eq!(
            msg(&|b| b[79] = 0x20),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 20"
        );
        assert_eq!(
            msg(&|b| b[79] = 2),
            "qcow2: Image is corrupt; cannot be opened read/write"
        );
        assert_eq!(
            msg(&|b| b[99] = 7),
            "Reference count entry width too large; may not exceed 64 bits"
        );
        assert_eq!(msg(&|b| b[39] = 0), "L1 table is too small");
        assert_eq!(msg(&|b| b[47] = 1), "Invalid L1 table offset");
        assert_eq!(msg(&|b| b[0x74] = 0xff), "Header extension too large");
        // Short input never panics.
        for n in 0..120 {
            let _ = Header::parse(&good[..n]);
        }
    }
}
