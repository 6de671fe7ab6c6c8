//! The worked examples of `reference/dirty-bitmaps.md` §1 (Computed and Observed values, and the
//! §1.10 test vectors), one test each, plus the robust choices of §5.4.

use super::*;
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;
/// QEMU callers pass `INT64_MAX` for "to the end".
const I64MAX: u64 = i64::MAX as u64;

fn collect(hb: &HBitmap, first: u64) -> Vec<u64> {
    hb.iter_from(first)
        .map(Iterator::collect)
        .unwrap_or_default()
}

// ---- §1.2 level sizes ----

#[test]
fn level_sizes_table_matches_qemu() {
    let table: [(u64, u32, [u64; 7]); 8] = [
        (0, 0, [1, 1, 1, 1, 1, 1, 1]),
        (64, 0, [1, 1, 1, 1, 1, 1, 1]),
        (65, 0, [1, 1, 1, 1, 1, 1, 2]),
        (4096, 0, [1, 1, 1, 1, 1, 1, 64]),
        (4097, 0, [1, 1, 1, 1, 1, 2, 65]),
        (64 * MIB, 16, [1, 1, 1, 1, 1, 1, 16]),
        (1000, 9, [1, 1, 1, 1, 1, 1, 1]),
        (
            1 << 41,
            0,
            [1, 32, 2048, 131072, 8388608, 536870912, 34359738368],
        ),
    ];
    for (size, g, sizes) in table {
        let hb = HBitmap::new(size, g).expect("valid size");
        assert_eq!(qemu_level_sizes(hb.size()), sizes, "alloc({size}, {g})");
    }
}

#[test]
fn sha256_hashes_qemu_bottom_level_word_count() {
    // The hash covers sizes[6] words, including the single word of an empty bitmap.
    for (size, g) in [
        (0u64, 0u32),
        (64, 0),
        (65, 0),
        (4096, 0),
        (4097, 0),
        (64 * MIB, 16),
        (1000, 9),
    ] {
        let hb = HBitmap::new(size, g).expect("valid size");
        let words = qemu_level_sizes(hb.size())[6];
        let expect: [u8; 32] = Sha256::digest(vec![0u8; words as usize * 8]).into();
        assert_eq!(hb.sha256(), expect, "alloc({size}, {g})");
    }
}

// ---- §1.3 granularity and count ----

#[test]
fn count_is_not_clamped_for_2gib_granularity_on_64mib_node() {
    // Observed with QEMU 7.2: one write gives "count": 2147483648.
    let mut hb = HBitmap::new(64 * MIB, 31).expect("valid");
    hb.set(4096, 512).expect("in range");
    assert_eq!(hb.count(), 2_147_483_648);
    assert_eq!(hb.size(), 1);
}

#[test]
fn count_of_full_1000_item_bitmap_at_g9_is_1024() {
    let mut hb = HBitmap::new(1000, 9).expect("valid");
    hb.set(0, 1000).expect("in range");
    assert_eq!(hb.count(), 1024);
}

// ---- §1.4 / §5.4 obsolete reset example ----

#[test]
fn header_comment_reset_example_is_now_an_alignment_error() {
    let mut hb = HBitmap::new(16, 1).expect("valid");
    hb.set(0, 9).expect("in range");
    assert_eq!(collect(&hb, 0), [0, 2, 4, 6, 8]);
    let err = hb.reset(1, 3).expect_err("unaligned");
    assert_eq!(
        err,
        HBitmapError::UnalignedReset {
            start: 1,
            count: 3,
            granularity: 1,
            orig_size: 16
        }
    );
    assert!(err
        .to_string()
        .contains("reset of [1, +3) is not aligned to granularity 2^1"));
    // The bitmap is unchanged by the refused reset.
    assert_eq!(collect(&hb, 0), [0, 2, 4, 6, 8]);
    hb.set(9, 2).expect("in range");
    assert_eq!(collect(&hb, 0), [0, 2, 4, 6, 8, 10]);
    assert!(hb.reset(5, 5).is_err());
}

// ---- §1.5 iteration ----

#[test]
fn iteration_from_inside_a_dirty_group_starts_below_first() {
    let mut hb = HBitmap::new(16, 1).expect("valid");
    hb.set(0, 9).expect("in range");
    assert_eq!(collect(&hb, 3), [2, 4, 6, 8]);
}

// ---- §1.6 truncate ----

#[test]
fn truncate_shrink_keeps_partial_last_group_and_grow_adds_clear_bits() {
    let mut hb = HBitmap::new(MIB, 16).expect("valid");
    hb.set(0, MIB).expect("in range");
    hb.truncate(100_000).expect("valid size");
    assert_eq!(hb.orig_size(), 100_000);
    assert_eq!(hb.size(), 2);
    assert_eq!(hb.count(), 131_072);
    hb.truncate(2 * MIB).expect("valid size");
    assert_eq!(hb.size(), 32);
    assert_eq!(hb.count(), 131_072);
    assert_eq!(hb.get(MIB), Ok(false));
    assert_eq!(hb.get(65_536), Ok(true));
}

#[test]
fn truncate_to_same_bit_count_still_updates_orig_size() {
    let mut hb = HBitmap::new(1000, 9).expect("valid");
    hb.truncate(1020).expect("valid size");
    assert_eq!(hb.orig_size(), 1020);
    assert_eq!(hb.size(), 2);
}

// ---- §1.7 merge ----

#[test]
fn merge_fine_and_coarse_sources_into_coarse_result() {
    let mut a = HBitmap::new(MIB, 9).expect("valid");
    a.set(70_000, 1).expect("in range");
    let mut b = HBitmap::new(MIB, 16).expect("valid");
    b.set(0, 1).expect("in range");
    let mut r = HBitmap::new(MIB, 16).expect("valid");
    r.merge_from(&a).expect("same size");
    r.merge_from(&b).expect("same size");
    assert_eq!(r.count(), 131_072);
    assert_eq!(collect(&r, 0), [0, 65_536]);
}

#[test]
fn merge_coarse_source_into_fine_bitmap_marks_whole_fine_groups() {
    let mut b = HBitmap::new(MIB, 16).expect("valid");
    b.set(0, 1).expect("in range");
    let mut r2 = HBitmap::new(MIB, 9).expect("valid");
    r2.merge_from(&b).expect("same size");
    assert_eq!(r2.count(), 65_536);
}

#[test]
fn merge_of_different_sizes_is_an_error() {
    let mut a = HBitmap::new(MIB, 9).expect("valid");
    let b = HBitmap::new(2 * MIB, 9).expect("valid");
    assert_eq!(
        a.merge_from(&b),
        Err(HBitmapError::SizeMismatch {
            dst: MIB,
            src: 2 * MIB
        })
    );
}

// ---- §1.10 vectors: partial last group ----

fn partial_group() -> HBitmap {
    let mut hb = HBitmap::new(1000, 9).expect("valid");
    assert_eq!(hb.size(), 2);
    hb.set(600, 1).expect("in range");
    hb
}

#[test]
fn vector_partial_group_set_count_and_get() {
    let hb = partial_group();
    assert_eq!(hb.count(), 512);
    assert_eq!(hb.get(512), Ok(true));
    assert_eq!(hb.get(999), Ok(true));
    assert_eq!(hb.get(0), Ok(false));
}

#[test]
fn vector_partial_group_next_dirty() {
    let hb = partial_group();
    assert_eq!(hb.next_dirty(0, I64MAX), Some(512));
    assert_eq!(hb.next_dirty(700, I64MAX), Some(700));
    assert_eq!(hb.next_dirty(0, 512), None);
    assert_eq!(hb.next_dirty(0, 513), Some(512));
    assert_eq!(hb.next_dirty(1000, 1), None);
    assert_eq!(hb.next_dirty(0, u64::MAX), Some(512));
}

#[test]
fn vector_partial_group_next_zero() {
    let hb = partial_group();
    assert_eq!(hb.next_zero(0, I64MAX), Some(0));
    assert_eq!(hb.next_zero(512, I64MAX), None);
    assert_eq!(hb.next_zero(100, I64MAX), Some(100));
    assert_eq!(hb.next_zero(600, I64MAX), None);
}

#[test]
fn vector_partial_group_set_all_counts_past_orig_size() {
    let mut hb = partial_group();
    hb.set(0, 1000).expect("in range");
    assert_eq!(hb.count(), 1024);
}

#[test]
fn vector_partial_group_reset_to_orig_size_is_allowed() {
    let mut hb = partial_group();
    hb.set(0, 1000).expect("in range");
    hb.reset(512, 488).expect("start + count == orig_size");
    assert_eq!(hb.count(), 512);
    // Up to ALIGN_UP(orig_size) is allowed too, but not beyond the last bit.
    hb.reset(0, 1024).expect("aligned count");
    assert!(hb.is_empty());
    assert!(matches!(
        hb.reset(0, 1536),
        Err(HBitmapError::RangeOutOfBounds { .. })
    ));
}

// ---- §1.10 vectors: dirty areas, status and iteration ----

fn areas() -> HBitmap {
    let mut hb = HBitmap::new(MIB, 12).expect("valid");
    hb.set(8192, 8192).expect("in range");
    hb.set(65636, 1).expect("in range");
    hb.set(1_044_480, 4096).expect("in range");
    hb
}

#[test]
fn vector_next_dirty_area_whole_bitmap() {
    assert_eq!(areas().next_dirty_area(0, MIB, I64MAX), Some((8192, 8192)));
}

#[test]
fn vector_next_dirty_area_start_is_not_aligned_down() {
    assert_eq!(
        areas().next_dirty_area(10_000, MIB, I64MAX),
        Some((10_000, 6384))
    );
}

#[test]
fn vector_next_dirty_area_capped_by_max_dirty_count() {
    assert_eq!(areas().next_dirty_area(0, MIB, 5000), Some((8192, 5000)));
}

#[test]
fn vector_next_dirty_area_skips_to_next_group() {
    assert_eq!(
        areas().next_dirty_area(16_384, MIB, I64MAX),
        Some((65_536, 4096))
    );
}

#[test]
fn vector_next_dirty_area_clamped_to_end() {
    assert_eq!(areas().next_dirty_area(0, 9000, I64MAX), Some((8192, 808)));
}

#[test]
fn vector_next_dirty_area_clamped_to_orig_size() {
    assert_eq!(
        areas().next_dirty_area(MIB - 1, 2 * MIB, I64MAX),
        Some((1_048_575, 1))
    );
}

#[test]
fn vector_status_clean_run() {
    assert_eq!(areas().status(0, MIB), Ok((false, 8192)));
}

#[test]
fn vector_status_dirty_run() {
    assert_eq!(areas().status(9000, 512 * 1024), Ok((true, 7384)));
}

#[test]
fn vector_iteration_and_count() {
    let hb = areas();
    assert_eq!(collect(&hb, 0), [8192, 12_288, 65_536, 1_044_480]);
    assert_eq!(collect(&hb, 9000), [8192, 12_288, 65_536, 1_044_480]);
    assert_eq!(hb.count(), 16_384);
}

// ---- §1.10 vectors: serialization ----

const SER_SIZE: u64 = 1_000_448;

fn ser_bitmap() -> HBitmap {
    let hb = HBitmap::new(SER_SIZE, 9).expect("valid");
    assert_eq!(hb.size(), 1954);
    hb
}

#[test]
fn vector_serialization_align_and_sizes() {
    let hb = ser_bitmap();
    assert_eq!(hb.serialization_align(), 32_768);
    assert_eq!(hb.serialization_size(0, SER_SIZE), Ok(248));
    assert_eq!(hb.serialization_size(0, 32_768), Ok(8));
    assert_eq!(hb.serialization_size(32_768, SER_SIZE - 32_768), Ok(240));
}

#[test]
fn vector_serialized_bytes() {
    let mut hb = ser_bitmap();
    hb.set(0, 512).expect("in range");
    hb.set(9 * 512, 1).expect("in range");
    hb.set(64 * 512, 1).expect("in range");
    hb.set(1953 * 512, 1).expect("in range");
    let mut buf = vec![0xaau8; 248];
    hb.serialize_part(&mut buf, 0, SER_SIZE)
        .expect("valid chunk");
    assert_eq!(buf[..8], [0x01, 0x02, 0, 0, 0, 0, 0, 0]);
    assert_eq!(buf[8], 0x01);
    assert!(buf[9..240].iter().all(|&b| b == 0));
    assert_eq!(buf[240..248], [0, 0, 0, 0, 0x02, 0, 0, 0]);
}

#[test]
fn vector_deserialize_ones_counts_whole_bitmap_and_masks_tail() {
    let mut hb = ser_bitmap();
    hb.deserialize_ones(0, SER_SIZE, true).expect("valid chunk");
    assert_eq!(hb.count(), 1_000_448);
    // QEMU leaves bits 1954..1983 of the last word set; the robust choice (§5.4) masks them, so
    // the last word serializes as bits 1920..1953 only.
    let mut buf = vec![0u8; 8];
    hb.serialize_part(&mut buf, 30 * 64 * 512, SER_SIZE - 30 * 64 * 512)
        .expect("last chunk");
    assert_eq!(
        u64::from_le_bytes(buf.try_into().expect("8 bytes")),
        (1u64 << 34) - 1
    );
}

// ---- §5.4 tail bits and the hash ----

#[test]
fn deserialize_part_drops_tail_bits_so_they_never_count_or_hash() {
    let mut hb = ser_bitmap();
    let mut buf = vec![0u8; 8];
    buf.copy_from_slice(&u64::MAX.to_le_bytes());
    let start = 30 * 64 * 512;
    hb.deserialize_part(&buf, start, SER_SIZE - start, true)
        .expect("last chunk");
    assert_eq!(hb.count(), 34 * 512);
    let mut clean = ser_bitmap();
    clean.set(start, SER_SIZE - start).expect("in range");
    assert_eq!(hb.sha256(), clean.sha256());
    assert_eq!(hb, clean);
}

#[test]
fn sha256_is_over_little_endian_words() {
    let mut hb = HBitmap::new(128, 0).expect("valid");
    hb.set(0, 1).expect("in range");
    hb.set(72, 1).expect("in range");
    let mut bytes = [0u8; 16];
    bytes[0] = 1;
    bytes[9] = 1;
    let expect: [u8; 32] = Sha256::digest(bytes).into();
    assert_eq!(hb.sha256(), expect);
}

// ---- preconditions as errors ----

#[test]
fn constructor_preconditions_are_errors() {
    assert_eq!(
        HBitmap::new(1, 64).map(|_| ()),
        Err(HBitmapError::GranularityOutOfRange { granularity: 64 })
    );
    assert!(matches!(
        HBitmap::new(I64MAX + 1, 0),
        Err(HBitmapError::SizeTooLarge { .. })
    ));
    assert!(matches!(
        HBitmap::new((1 << 41) + 1, 0),
        Err(HBitmapError::TooManyBits { bits, .. }) if bits == (1 << 41) + 1
    ));
    let hb = HBitmap::new(I64MAX, 63).expect("one bit");
    assert_eq!(hb.size(), 1);
    let hb = HBitmap::new(1 << 50, 9).expect("2^41 bits");
    assert_eq!(hb.size(), MAX_BITS);
}

#[test]
fn range_preconditions_are_errors() {
    let mut hb = HBitmap::new(1000, 9).expect("valid");
    assert!(matches!(
        hb.set(u64::MAX, 2),
        Err(HBitmapError::RangeOverflow { .. })
    ));
    assert!(matches!(
        hb.reset(512, u64::MAX),
        Err(HBitmapError::RangeOverflow { .. })
    ));
    let err = hb.set(1000, 100).expect_err("past the last bit");
    assert!(err.to_string().contains("ends in bit 2"), "{err}");
    hb.set(1000, 24).expect("inside the last group");
    assert!(matches!(
        hb.get(1024),
        Err(HBitmapError::ItemOutOfBounds { bit: 2, .. })
    ));
    assert!(hb.iter_from(1024).is_err());
    assert_eq!(
        hb.status(0, 0),
        Err(HBitmapError::EmptyStatusRange { start: 0 })
    );
    assert!(matches!(
        hb.status(1, 1000),
        Err(HBitmapError::StatusPastEnd { .. })
    ));
    assert!(matches!(
        hb.truncate(I64MAX + 1),
        Err(HBitmapError::SizeTooLarge { .. })
    ));
    assert_eq!(hb.orig_size(), 1000);
    assert_eq!(hb.next_dirty_area(0, 1000, 0), None);
    // Zero-length operations are no-ops even at absurd offsets, as in QEMU.
    hb.set(u64::MAX, 0).expect("no-op");
    hb.reset(u64::MAX, 0).expect("no-op");
    assert_eq!(hb.serialization_size(u64::MAX, 0), Ok(0));
}

#[test]
fn serialization_preconditions_are_errors() {
    let mut hb = ser_bitmap();
    assert!(matches!(
        hb.serialization_size(512, 32_768),
        Err(HBitmapError::UnalignedChunkStart {
            start: 512,
            align: 32_768
        })
    ));
    assert!(matches!(
        hb.serialization_size(0, 512),
        Err(HBitmapError::UnalignedChunkCount { .. })
    ));
    assert!(matches!(
        hb.serialization_size(0, SER_SIZE + 512),
        Err(HBitmapError::RangeOutOfBounds { .. })
    ));
    let mut small = [0u8; 7];
    assert!(matches!(
        hb.serialize_part(&mut small, 0, 32_768),
        Err(HBitmapError::BufferTooSmall {
            needed: 8,
            len: 7,
            ..
        })
    ));
    assert!(hb.deserialize_part(&small, 0, 32_768, true).is_err());
    let coarse = HBitmap::new(I64MAX, 58).expect("valid");
    assert!(!coarse.is_serializable());
    assert_eq!(coarse.serialization_align(), u64::MAX);
    assert_eq!(
        coarse.serialization_size(0, 1),
        Err(HBitmapError::NotSerializable { granularity: 58 })
    );
    // A chunk ending in the last bit may have any count, including past orig_size in that bit.
    let short = HBitmap::new(SER_SIZE - 100, 9).expect("valid");
    assert_eq!(short.size(), 1954);
    assert_eq!(
        short.serialization_size(32_768, SER_SIZE - 32_768 - 100),
        Ok(240)
    );
    assert_eq!(short.serialization_size(32_768, SER_SIZE - 32_768), Ok(240));
}

#[test]
fn summary_and_count_stay_exact_across_chunk_states() {
    // Three chunks' worth of bits: exercise all-set, all-clear and mixed chunks.
    let bits = 3 * CHUNK_BITS + 77;
    let mut hb = HBitmap::new(bits, 0).expect("valid");
    hb.set(5, bits - 10).expect("in range");
    assert_eq!(hb.count(), bits - 10);
    assert_eq!(hb.recount(), bits - 10);
    hb.reset(CHUNK_BITS, CHUNK_BITS).expect("aligned");
    assert_eq!(hb.recount(), hb.count() >> hb.granularity());
    assert_eq!(hb.next_zero(CHUNK_BITS - 1, I64MAX), Some(CHUNK_BITS));
    assert_eq!(hb.next_dirty(CHUNK_BITS, I64MAX), Some(2 * CHUNK_BITS));
    assert_eq!(hb.next_zero(2 * CHUNK_BITS, I64MAX), Some(bits - 5));
    hb.truncate(2 * CHUNK_BITS + 3).expect("shrink");
    assert_eq!(hb.count(), CHUNK_BITS - 5 + 3);
    assert_eq!(hb.recount(), CHUNK_BITS - 5 + 3);
    hb.truncate(bits).expect("grow");
    assert_eq!(
        hb.next_zero(2 * CHUNK_BITS, I64MAX),
        Some(2 * CHUNK_BITS + 3)
    );
    assert_eq!(hb.recount(), CHUNK_BITS - 5 + 3);
}

#[test]
fn granularity_63_single_bit_bitmap() {
    let mut hb = HBitmap::new(I64MAX, 63).expect("valid");
    assert_eq!(hb.size(), 1);
    hb.set(I64MAX - 1, 1).expect("in range");
    assert_eq!(hb.count(), 1 << 63);
    assert_eq!(hb.next_dirty(5, I64MAX), Some(5));
    assert_eq!(hb.next_zero(0, I64MAX), None);
    assert_eq!(
        hb.next_dirty_area(7, u64::MAX, u64::MAX),
        Some((7, I64MAX - 7))
    );
    assert_eq!(collect(&hb, 12345), [0]);
    assert!(matches!(
        hb.reset(0, 1),
        Err(HBitmapError::UnalignedReset { .. })
    ));
    hb.reset(0, I64MAX).expect("reaches orig_size");
    assert!(hb.is_empty());
    assert_eq!(hb.next_zero(3, 1), Some(3));
}
