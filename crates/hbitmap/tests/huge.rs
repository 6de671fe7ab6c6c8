//! The largest bitmap QEMU allows: 2^41 bits (1 PiB of sectors). A dense bottom level would be
//! 256 GiB; this checks that the sparse one works near both ends, and that whole-bitmap
//! operations on it stay cheap.

use hbitmap::{HBitmap, MAX_BITS};

const N: u64 = MAX_BITS;
const MAX: u64 = i64::MAX as u64;

#[test]
fn bitmap_of_2_pow_41_bits_works_near_both_ends() {
    let mut hb = HBitmap::new(N, 0).expect("2^41 bits is the maximum");
    assert_eq!(hb.size(), N);
    assert!(HBitmap::new(N + 1, 0).is_err());

    hb.set(0, 100).expect("in range");
    hb.set(N - 100, 100).expect("in range");
    hb.set(N / 2 + 5, 1).expect("in range");
    assert!(hb.set(N - 1, 2).is_err());
    assert_eq!(hb.count(), 201);
    assert_eq!(hb.get(99), Ok(true));
    assert_eq!(hb.get(100), Ok(false));
    assert_eq!(hb.get(N - 1), Ok(true));
    assert_eq!(hb.get(N - 101), Ok(false));
    assert!(hb.get(N).is_err());

    assert_eq!(hb.next_dirty(0, MAX), Some(0));
    assert_eq!(hb.next_dirty(100, MAX), Some(N / 2 + 5));
    assert_eq!(hb.next_dirty(N / 2 + 6, MAX), Some(N - 100));
    assert_eq!(hb.next_dirty(N / 2 + 6, N / 2 - 200), None);
    assert_eq!(hb.next_zero(0, MAX), Some(100));
    assert_eq!(hb.next_zero(N - 100, MAX), None);
    assert_eq!(hb.next_zero(N - 200, MAX), Some(N - 200));
    assert_eq!(hb.next_dirty_area(1, N, MAX), Some((1, 99)));
    assert_eq!(hb.next_dirty_area(100, N, MAX), Some((N / 2 + 5, 1)));
    assert_eq!(hb.next_dirty_area(N / 2 + 6, N, MAX), Some((N - 100, 100)));
    assert_eq!(hb.status(100, N - 200), Ok((false, N / 2 + 5 - 100)));

    hb.reset(0, 64).expect("aligned");
    hb.reset(N - 64, 64).expect("aligned");
    assert_eq!(hb.count(), 201 - 128);
    let got: Vec<u64> = hb.iter_from(0).expect("in range").collect();
    let mut want: Vec<u64> = (64..100).collect();
    want.push(N / 2 + 5);
    want.extend(N - 100..N - 64);
    assert_eq!(got, want);
    let tail: Vec<u64> = hb.iter_from(N - 70).expect("in range").collect();
    assert_eq!(tail, (N - 70..N - 64).collect::<Vec<_>>());

    // Serialize the last 64 bits.
    let mut buf = [0u8; 8];
    hb.serialize_part(&mut buf, N - 64, 64).expect("last word");
    assert_eq!(u64::from_le_bytes(buf), 0);
    hb.serialize_part(&mut buf, N - 128, 64)
        .expect("word before");
    assert_eq!(u64::from_le_bytes(buf), u64::MAX << 28);
}

#[test]
fn whole_2_pow_41_bit_bitmap_set_truncate_and_clear_are_cheap() {
    let mut hb = HBitmap::new(N, 0).expect("valid");
    hb.set(0, N).expect("whole bitmap");
    assert_eq!(hb.count(), N);
    assert_eq!(hb.next_zero(0, MAX), None);
    hb.reset(N / 2, 64).expect("aligned");
    assert_eq!(hb.next_zero(0, MAX), Some(N / 2));
    assert_eq!(hb.next_zero(N / 2 + 64, MAX), None);
    assert_eq!(hb.next_dirty_area(0, N, MAX), Some((0, N / 2)));
    assert_eq!(hb.count(), N - 64);

    hb.truncate(N - 3).expect("shrink");
    assert_eq!(hb.count(), N - 64 - 3);
    hb.truncate(N).expect("grow back");
    assert_eq!(hb.get(N - 1), Ok(false));
    assert_eq!(hb.next_zero(N / 2 + 64, MAX), Some(N - 3));

    hb.deserialize_zeroes(0, N / 2, true)
        .expect("aligned chunk");
    assert_eq!(hb.next_dirty(0, MAX), Some(N / 2 + 64));
    hb.deserialize_ones(0, N, true).expect("whole bitmap");
    assert_eq!(hb.count(), N);
    hb.reset_all();
    assert!(hb.is_empty());
    assert_eq!(hb.next_dirty(0, MAX), None);
}
