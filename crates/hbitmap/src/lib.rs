//! A hierarchical bitmap with QEMU's `HBitmap` semantics.
//!
//! API SKELETON — to be implemented (see the crate's issue). Every body below is replaced by a
//! real implementation before this crate is used.
#![forbid(unsafe_code)]

use thiserror::Error;

/// Largest number of bits (after granularity) a bitmap may hold: QEMU's `HBITMAP_LOG_MAX_SIZE`.
pub const MAX_BITS: u64 = 1 << 41;

/// A violated precondition. QEMU asserts these; here they are values the caller must handle.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HBitmapError {
    /// Placeholder until the crate is implemented.
    #[error("unimplemented")]
    Unimplemented,
}

/// A bitmap over `orig_size` items with one bit per `2^granularity` items.
#[derive(Clone, Debug)]
pub struct HBitmap {
    orig_size: u64,
    granularity: u32,
}

/// Iterator over the item offsets (`bit << granularity`) of set bits, ascending.
pub struct Iter<'a> {
    _hb: &'a HBitmap,
}

impl Iterator for Iter<'_> {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        todo!()
    }
}

impl HBitmap {
    /// `alloc(size, G)`.
    pub fn new(orig_size: u64, granularity: u32) -> Result<Self, HBitmapError> {
        let _ = (orig_size, granularity);
        todo!()
    }
    /// Size in items as given to `new`/`truncate`.
    pub fn orig_size(&self) -> u64 {
        self.orig_size
    }
    /// Number of bits: `ceil(orig_size / 2^G)`.
    pub fn size(&self) -> u64 {
        todo!()
    }
    /// Granularity shift `G`.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }
    /// Items covered by set bits: `set_bits << G` (not clamped to `orig_size`).
    pub fn count(&self) -> u64 {
        todo!()
    }
    /// No bit set.
    pub fn is_empty(&self) -> bool {
        todo!()
    }
    /// Set items `[start, start+count)`, rounding outward to whole groups.
    pub fn set(&mut self, start: u64, count: u64) -> Result<(), HBitmapError> {
        let _ = (start, count);
        todo!()
    }
    /// Reset items `[start, start+count)`; must be group-aligned (see QEMU rules).
    pub fn reset(&mut self, start: u64, count: u64) -> Result<(), HBitmapError> {
        let _ = (start, count);
        todo!()
    }
    /// Clear every bit.
    pub fn reset_all(&mut self) {
        todo!()
    }
    /// Whether the group holding `item` is set.
    pub fn get(&self, item: u64) -> Result<bool, HBitmapError> {
        let _ = item;
        todo!()
    }
    /// First dirty item in `[start, start+count)`, or `None`; `max(start, group start)`.
    pub fn next_dirty(&self, start: u64, count: u64) -> Option<u64> {
        let _ = (start, count);
        todo!()
    }
    /// First clean item in `[start, start+count)`, or `None`.
    pub fn next_zero(&self, start: u64, count: u64) -> Option<u64> {
        let _ = (start, count);
        todo!()
    }
    /// First dirty area `(start, len)` within `[start, end)`, at most `max_dirty_count` long.
    pub fn next_dirty_area(&self, start: u64, end: u64, max_dirty_count: u64) -> Option<(u64, u64)> {
        let _ = (start, end, max_dirty_count);
        todo!()
    }
    /// Iterate set bits starting at the group holding `first`.
    pub fn iter_from(&self, first: u64) -> Result<Iter<'_>, HBitmapError> {
        let _ = first;
        todo!()
    }
    /// Change `orig_size`, growing with clear bits or shrinking.
    pub fn truncate(&mut self, new_size: u64) -> Result<(), HBitmapError> {
        let _ = new_size;
        todo!()
    }
    /// `self |= src`, granularities may differ, `orig_size` must be equal.
    pub fn merge_from(&mut self, src: &HBitmap) -> Result<(), HBitmapError> {
        let _ = src;
        todo!()
    }
    /// `64 << G` items.
    pub fn serialization_align(&self) -> u64 {
        todo!()
    }
    /// Bytes `serialize_part` writes for the chunk.
    pub fn serialization_size(&self, start: u64, count: u64) -> Result<u64, HBitmapError> {
        let _ = (start, count);
        todo!()
    }
    /// Write the chunk's bottom-level words little-endian.
    pub fn serialize_part(&self, buf: &mut [u8], start: u64, count: u64) -> Result<(), HBitmapError> {
        let _ = (buf, start, count);
        todo!()
    }
    /// Inverse of `serialize_part`.
    pub fn deserialize_part(&mut self, buf: &[u8], start: u64, count: u64, finish: bool) -> Result<(), HBitmapError> {
        let _ = (buf, start, count, finish);
        todo!()
    }
    /// Fill the chunk's words with zeroes.
    pub fn deserialize_zeroes(&mut self, start: u64, count: u64, finish: bool) -> Result<(), HBitmapError> {
        let _ = (start, count, finish);
        todo!()
    }
    /// Fill the chunk's words with ones (tail bits masked).
    pub fn deserialize_ones(&mut self, start: u64, count: u64, finish: bool) -> Result<(), HBitmapError> {
        let _ = (start, count, finish);
        todo!()
    }
    /// Rebuild upper levels and `count` after deserialization.
    pub fn deserialize_finish(&mut self) {
        todo!()
    }
    /// SHA-256 of the bottom level as little-endian 64-bit words, tail bits masked.
    pub fn sha256(&self) -> [u8; 32] {
        todo!()
    }
}
