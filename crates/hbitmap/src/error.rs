//! The preconditions QEMU asserts in `util/hbitmap.c`, as values a caller must handle.
//!
//! Every message names the values involved, because these reach operators through the block
//! layer and the migration loader (a chunk from the network that does not fit the local bitmap
//! is an error for that bitmap, never an abort).

use thiserror::Error;

/// A violated precondition. QEMU asserts these; here they are values the caller must handle.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HBitmapError {
    /// The granularity shift is 64 or more (QEMU asserts `0 <= G < 64`).
    #[error("granularity shift {granularity} is out of range (must be below 64)")]
    GranularityOutOfRange {
        /// The rejected shift.
        granularity: u32,
    },
    /// The size in items exceeds `INT64_MAX` (QEMU asserts `size <= INT64_MAX`).
    #[error("bitmap size {size} exceeds the largest allowed size {max} (INT64_MAX)")]
    SizeTooLarge {
        /// The rejected size in items.
        size: u64,
        /// `i64::MAX`.
        max: u64,
    },
    /// The size needs more bits than [`crate::MAX_BITS`] (QEMU asserts
    /// `size <= 1 << HBITMAP_LOG_MAX_SIZE`).
    #[error(
        "bitmap size {size} at granularity 2^{granularity} needs {bits} bits, more than the \
         maximum {max}"
    )]
    TooManyBits {
        /// The size in items.
        size: u64,
        /// The granularity shift.
        granularity: u32,
        /// Bits that size needs.
        bits: u64,
        /// [`crate::MAX_BITS`].
        max: u64,
    },
    /// `start + count` does not fit in a u64.
    #[error("range [{start}, +{count}) overflows a 64-bit offset")]
    RangeOverflow {
        /// First item of the range.
        start: u64,
        /// Number of items.
        count: u64,
    },
    /// The range ends in a bit past the end of the bitmap (QEMU asserts `last < size`).
    #[error(
        "range [{start}, +{count}) ends in bit {last_bit}, past the bitmap's {size} bits \
         (size {orig_size} items at granularity 2^{granularity})"
    )]
    RangeOutOfBounds {
        /// First item of the range.
        start: u64,
        /// Number of items.
        count: u64,
        /// Bit holding the range's last item.
        last_bit: u64,
        /// Bits in the bitmap.
        size: u64,
        /// Size of the bitmap in items.
        orig_size: u64,
        /// The granularity shift.
        granularity: u32,
    },
    /// A reset whose start is not group-aligned, or whose count is neither group-aligned nor
    /// reaching exactly `orig_size` (QEMU's alignment assertions in `hbitmap_reset`).
    #[error(
        "reset of [{start}, +{count}) is not aligned to granularity 2^{granularity} (start must \
         be aligned, and count aligned or reaching the bitmap size {orig_size})"
    )]
    UnalignedReset {
        /// First item of the range.
        start: u64,
        /// Number of items.
        count: u64,
        /// The granularity shift.
        granularity: u32,
        /// Size of the bitmap in items.
        orig_size: u64,
    },
    /// An item past the last bit (QEMU asserts `pos < size` in `get` and `iter_init`).
    #[error(
        "item {item} is in bit {bit}, past the bitmap's {size} bits (granularity 2^{granularity})"
    )]
    ItemOutOfBounds {
        /// The item asked for.
        item: u64,
        /// The bit holding it.
        bit: u64,
        /// Bits in the bitmap.
        size: u64,
        /// The granularity shift.
        granularity: u32,
    },
    /// A `status` query with `count == 0` (QEMU asserts `count > 0`).
    #[error("status of [{start}, +0) asks about an empty range")]
    EmptyStatusRange {
        /// First item of the range.
        start: u64,
    },
    /// A `status` query reaching past `orig_size` (QEMU asserts `start + count <= orig_size`).
    #[error("status of [{start}, +{count}) reaches past the bitmap size {orig_size}")]
    StatusPastEnd {
        /// First item of the range.
        start: u64,
        /// Number of items.
        count: u64,
        /// Size of the bitmap in items.
        orig_size: u64,
    },
    /// A merge of bitmaps covering different sizes (QEMU asserts equal `orig_size`).
    #[error("cannot merge a bitmap of size {src} into a bitmap of size {dst}")]
    SizeMismatch {
        /// Size of the destination in items.
        dst: u64,
        /// Size of the source in items.
        src: u64,
    },
    /// Serialization of a bitmap whose granularity is 58 or more (`64 << G` would overflow).
    #[error("granularity 2^{granularity} is too coarse to serialize (the shift must be below 58)")]
    NotSerializable {
        /// The granularity shift.
        granularity: u32,
    },
    /// A serialization chunk whose start is not a multiple of the serialization alignment.
    #[error("serialization chunk start {start} is not aligned to {align} items")]
    UnalignedChunkStart {
        /// First item of the chunk.
        start: u64,
        /// `serialization_align()`.
        align: u64,
    },
    /// A serialization chunk whose count is not a multiple of the serialization alignment and
    /// that does not end in the bitmap's last bit.
    #[error(
        "serialization chunk [{start}, +{count}) is not a multiple of {align} items and ends in \
         bit {last_bit}, not in the last bit {last}"
    )]
    UnalignedChunkCount {
        /// First item of the chunk.
        start: u64,
        /// Number of items.
        count: u64,
        /// `serialization_align()`.
        align: u64,
        /// Bit holding the chunk's last item.
        last_bit: u64,
        /// The bitmap's last bit (`size - 1`).
        last: u64,
    },
    /// A buffer shorter than the chunk's serialized size.
    #[error(
        "buffer of {len} bytes is too small for chunk [{start}, +{count}), which needs {needed}"
    )]
    BufferTooSmall {
        /// First item of the chunk.
        start: u64,
        /// Number of items.
        count: u64,
        /// Bytes the chunk takes (`serialization_size`).
        needed: u64,
        /// Bytes given.
        len: usize,
    },
}
