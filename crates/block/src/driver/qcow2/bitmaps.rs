//! The qcow2 bitmap directory (`qcow2-bitmaps.md` §3–§5): entries, QEMU's loader checks and
//! messages, the constraints a persistent bitmap must meet, and the data layout helpers.

use crate::error::BlockError;
use hbitmap::HBitmap;

/// `BME_FLAG_IN_USE`.
pub const FLAG_IN_USE: u32 = 1;
/// `BME_FLAG_AUTO`.
pub const FLAG_AUTO: u32 = 2;
/// `BME_RESERVED_FLAGS` (QEMU rejects `extra_data_compatible` too).
pub const RESERVED_FLAGS: u32 = 0xffff_fffc;
/// `BME_MAX_TABLE_SIZE`.
pub const MAX_TABLE_SIZE: u64 = 0x0800_0000;
/// `BME_MAX_PHYS_SIZE`.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// `BME_MIN_GRANULARITY_BITS`.
pub const MIN_GRANULARITY_BITS: u32 = 9;
/// `BME_MAX_GRANULARITY_BITS`.
pub const MAX_GRANULARITY_BITS: u32 = 31;
/// `BME_MAX_NAME_SIZE`.
pub const MAX_NAME_SIZE: usize = 1023;
/// `BME_TABLE_ENTRY_RESERVED_MASK`.
pub const TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// `BME_TABLE_ENTRY_OFFSET_MASK`.
pub const TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// `BME_TABLE_ENTRY_FLAG_ALL_ONES`.
pub const TABLE_ENTRY_ALL_ONES: u64 = 1;
/// Bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Size of an entry's fixed part.
const ENTRY_HEADER: usize = 24;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// `in_use`, `auto`.
    pub flags: u32,
    /// `log2(granularity)`.
    pub granularity_bits: u8,
    /// The name's bytes as stored.
    pub name: Vec<u8>,
}

impl DirEntry {
    /// The name, as QEMU prints it.
    pub fn name_str(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
    /// Whether the name is `name`.
    pub fn is(&self, name: &str) -> bool {
        self.name == name.as_bytes()
    }
    /// `in_use`.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    /// Bytes this entry takes in the directory.
    pub fn size(&self) -> u64 {
        entry_size(self.name.len())
    }
}

/// `calc_dir_entry_size` without extra data.
pub fn entry_size(name_len: usize) -> u64 {
    ((ENTRY_HEADER + name_len) as u64).next_multiple_of(8)
}

fn err(msg: impl Into<String>) -> BlockError {
    BlockError::Driver(msg.into())
}

fn be32(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
}

fn be16(b: &[u8], o: usize) -> Option<u16> {
    b.get(o..o + 2)
        .and_then(|s| <[u8; 2]>::try_from(s).ok())
        .map(u16::from_be_bytes)
}

fn be64(b: &[u8], o: usize) -> Option<u64> {
    b.get(o..o + 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
}

/// `check_dir_entry`: the fields QEMU requires of an entry of an image of `disk_len` bytes
/// with clusters of `cs` bytes.
fn entry_ok(e: &DirEntry, ty: u8, cs: u64, disk_len: u64) -> bool {
    let bits = u32::from(e.granularity_bits);
    let fail = e.table_size == 0
        || e.table_offset == 0
        || !e.table_offset.is_multiple_of(cs)
        || u64::from(e.table_size) > MAX_TABLE_SIZE
        || !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&bits)
        || e.flags & RESERVED_FLAGS != 0
        || e.name.len() > MAX_NAME_SIZE
        || ty != TYPE_DIRTY_TRACKING;
    if fail {
        return false;
    }
    let phys = u64::from(e.table_size) * cs;
    if phys > MAX_PHYS_SIZE {
        return false;
    }
    // A table too small for the disk is tolerated only on in-use entries (an unsaved resize).
    e.in_use() || disk_len <= (phys * 8) << bits
}

/// `bitmap_list_load`: parses a directory of `nb` entries, with QEMU's checks and messages.
pub fn parse_directory(
    dir: &[u8],
    nb: u32,
    cs: u64,
    disk_len: u64,
) -> Result<Vec<DirEntry>, BlockError> {
    let broken = || err("Broken bitmap directory");
    let mut out = Vec::new();
    let mut pos = 0usize;
    let mut count = 0u32;
    while pos < dir.len() {
        count += 1;
        if count > nb {
            return Err(err("More bitmaps found than specified in header extension"));
        }
        if pos + ENTRY_HEADER > dir.len() {
            return Err(broken());
        }
        let table_offset = be64(dir, pos).ok_or_else(broken)?;
        let table_size = be32(dir, pos + 8).ok_or_else(broken)?;
        let flags = be32(dir, pos + 12).ok_or_else(broken)?;
        let ty = dir.get(pos + 16).copied().ok_or_else(broken)?;
        let granularity_bits = dir.get(pos + 17).copied().ok_or_else(broken)?;
        let name_size = usize::from(be16(dir, pos + 18).ok_or_else(broken)?);
        let extra = be32(dir, pos + 20).ok_or_else(broken)? as usize;
        let size = (ENTRY_HEADER + name_size + extra).next_multiple_of(8);
        if pos + size > dir.len() {
            return Err(broken());
        }
        let name_start = pos + ENTRY_HEADER + extra;
        let name = dir
            .get(name_start..name_start + name_size)
            .ok_or_else(broken)?
            .to_vec();
        if extra != 0 {
            return Err(err("Bitmap extra data is not supported"));
        }
        let e = DirEntry {
            table_offset,
            table_size,
            flags,
            granularity_bits,
            name,
        };
        if !entry_ok(&e, ty, cs, disk_len) {
            return Err(err(format!(
                "Bitmap '{}' doesn't satisfy the constraints",
                e.name_str()
            )));
        }
        out.push(e);
        pos += size;
    }
    if count != nb {
        return Err(err("Less bitmaps found than specified in header extension"));
    }
    if pos != dir.len() {
        return Err(broken());
    }
    Ok(out)
}

/// The directory bytes for `entries` (padding zeroed).
pub fn serialize_directory(entries: &[DirEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    for e in entries {
        let start = b.len();
        b.extend_from_slice(&e.table_offset.to_be_bytes());
        b.extend_from_slice(&e.table_size.to_be_bytes());
        b.extend_from_slice(&e.flags.to_be_bytes());
        b.push(TYPE_DIRTY_TRACKING);
        b.push(e.granularity_bits);
        b.extend_from_slice(&(e.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&e.name);
        b.resize(start + e.size() as usize, 0);
    }
    b
}

/// `check_table_entry`.
pub fn table_entry_ok(entry: u64, cs: u64) -> bool {
    if entry & TABLE_ENTRY_RESERVED_MASK != 0 {
        return false;
    }
    let off = entry & TABLE_ENTRY_OFFSET_MASK;
    off == 0 || (entry & TABLE_ENTRY_ALL_ONES == 0 && off.is_multiple_of(cs))
}

/// `check_constraints_on_bitmap`: the message (without prefix) if a bitmap of `granularity`
/// and `name` cannot be stored in an image of `disk_len` bytes with `cs`-byte clusters.
pub fn check_constraints(
    name: &str,
    granularity: u32,
    cs: u64,
    disk_len: u64,
) -> Result<(), String> {
    let bits = granularity.trailing_zeros();
    if bits > MAX_GRANULARITY_BITS {
        return Err(format!(
            "Granularity exceeds maximum ({} bytes)",
            1u64 << MAX_GRANULARITY_BITS
        ));
    }
    if bits < MIN_GRANULARITY_BITS {
        return Err(format!(
            "Granularity is under minimum ({} bytes)",
            1u64 << MIN_GRANULARITY_BITS
        ));
    }
    let bytes = disk_len.div_ceil(1u64 << bits).div_ceil(8);
    if bytes > MAX_PHYS_SIZE || bytes > MAX_TABLE_SIZE.saturating_mul(cs) {
        return Err(
            "Too much space will be occupied by the bitmap. Use larger granularity".to_string(),
        );
    }
    if name.len() > MAX_NAME_SIZE {
        return Err(format!(
            "Name length exceeds maximum ({MAX_NAME_SIZE} characters)"
        ));
    }
    Ok(())
}

/// Disk bytes one data cluster of a bitmap covers (`bytes_covered_by_bitmap_cluster`).
pub fn cluster_coverage(cs: u64, granularity_bits: u32) -> u64 {
    (cs * 8) << granularity_bits
}

/// The exact table size QEMU requires: clusters of the word-rounded serialization.
pub fn table_size_for(bitmap: &HBitmap, cs: u64) -> Result<u64, BlockError> {
    let size = bitmap.orig_size();
    Ok(bitmap.serialization_size(0, size)?.div_ceil(cs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> DirEntry {
        DirEntry {
            table_offset: 0x40000,
            table_size: 1,
            flags: FLAG_AUTO,
            granularity_bits: 16,
            name: name.as_bytes().to_vec(),
        }
    }

    #[test]
    fn directory_matches_qemu_bytes() {
        // qcow2-bitmaps.md §8: the entry for "b0" after `qemu-img bitmap --add`.
        let b = serialize_directory(&[entry("b0")]);
        assert_eq!(
            b,
            [
                0, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, 1, 0x10, 0, 2, 0, 0, 0, 0, b'b',
                b'0', 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(entry_size(1023), 1048);
        let parsed = parse_directory(&b, 1, 65536, 64 << 20).unwrap();
        assert_eq!(parsed, vec![entry("b0")]);
    }

    #[test]
    fn loader_messages() {
        let two = serialize_directory(&[entry("a"), entry("b")]);
        let m = |d: &[u8], nb: u32| {
            parse_directory(d, nb, 65536, 64 << 20)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            m(&two, 1),
            "More bitmaps found than specified in header extension"
        );
        assert_eq!(
            m(&two, 3),
            "Less bitmaps found than specified in header extension"
        );
        assert_eq!(m(&two[..40], 2), "Broken bitmap directory");
        let mut extra = two.clone();
        extra.extend_from_slice(&[0; 8]);
        assert_eq!(
            m(&extra, 2),
            "More bitmaps found than specified in header extension"
        );
        let mut bad = two.clone();
        bad[15] |= 4;
        assert_eq!(m(&bad, 2), "Bitmap 'a' doesn't satisfy the constraints");
        let mut bad = two.clone();
        bad[17] = 8;
        assert_eq!(m(&bad, 2), "Bitmap 'a' doesn't satisfy the constraints");
        let mut bad = two.clone();
        bad[23] = 8;
        assert_eq!(m(&bad, 2), "Bitmap extra data is not supported");
        let mut bad = two.clone();
        bad[23] = 80;
        assert_eq!(m(&bad, 2), "Broken bitmap directory");
        // A table too small for the disk is fine only while in use.
        let small = serialize_directory(&[entry("s")]);
        assert!(parse_directory(&small, 1, 512, 1 << 40).is_err());
        let mut inuse = entry("s");
        inuse.flags |= FLAG_IN_USE;
        assert!(parse_directory(&serialize_directory(&[inuse]), 1, 512, 1 << 40).is_ok());
        for n in 0..two.len() {
            let _ = parse_directory(&two[..n], 2, 65536, 1 << 20);
        }
    }

    #[test]
    fn constraints_and_table_entries() {
        assert!(check_constraints("b", 65536, 65536, 64 << 20).is_ok());
        assert_eq!(check_constraints("b", 1 << 31, 65536, 1 << 20), Ok(()));
        assert_eq!(
            check_constraints("b", 512, 65536, 4 << 40).unwrap_err(),
            "Too much space will be occupied by the bitmap. Use larger granularity"
        );
        assert!(check_constraints("b", 1024, 65536, 4 << 40).is_ok());
        assert_eq!(
            check_constraints(&"n".repeat(1024), 65536, 65536, 1 << 20).unwrap_err(),
            "Name length exceeds maximum (1023 characters)"
        );
        assert!(table_entry_ok(0, 65536));
        assert!(table_entry_ok(1, 65536));
        assert!(table_entry_ok(0xa0000, 65536));
        assert!(!table_entry_ok(0xa0001, 65536));
        assert!(!table_entry_ok(0xa0200, 65536));
        assert!(!table_entry_ok(2, 65536));
        assert!(!table_entry_ok(1 << 60, 65536));
    }
}
