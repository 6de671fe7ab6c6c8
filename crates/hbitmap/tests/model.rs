//! Property tests: every `HBitmap` operation against a naive model (one `bool` per bit plus
//! `orig_size`), at several granularities and at sizes around word, level and chunk boundaries.
//!
//! The model implements the rules of `reference/dirty-bitmaps.md` §1 directly, a bit (or a
//! group) at a time, including the exact error each precondition violation must produce.

use hbitmap::{HBitmap, HBitmapError, MAX_BITS};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const GRANULARITIES: [u32; 6] = [0, 1, 3, 9, 12, 16];
/// Bit counts around word (64) and QEMU level (4096, 262144) boundaries.
const SMALL_BITS: [u64; 12] = [
    0, 1, 2, 63, 64, 65, 4095, 4096, 4097, 262_143, 262_144, 262_145,
];
/// Bit counts around the implementation's chunk boundary (2^20 bits).
const CHUNK_BITS: [u64; 4] = [1_048_575, 1_048_576, 1_048_577, 2 * 1_048_576 + 65];

// ---------------------------------------------------------------------------------------------
// The model

#[derive(Clone, Debug)]
struct Model {
    bits: Vec<bool>,
    orig: u64,
    g: u32,
}

fn bits_for(orig: u64, g: u32) -> u64 {
    orig.div_ceil(1u64 << g)
}

impl Model {
    fn new(orig: u64, g: u32) -> Model {
        Model {
            bits: vec![false; bits_for(orig, g) as usize],
            orig,
            g,
        }
    }

    fn size(&self) -> u64 {
        self.bits.len() as u64
    }

    fn bit(&self, b: u64) -> bool {
        self.bits[b as usize]
    }

    fn oob(&self, start: u64, count: u64, last_bit: u64) -> HBitmapError {
        HBitmapError::RangeOutOfBounds {
            start,
            count,
            last_bit,
            size: self.size(),
            orig_size: self.orig,
            granularity: self.g,
        }
    }

    /// Checked bit range of a non-empty item range.
    fn range(&self, start: u64, count: u64) -> Result<(u64, u64), HBitmapError> {
        let end = start
            .checked_add(count)
            .ok_or(HBitmapError::RangeOverflow { start, count })?;
        let last = (end - 1) >> self.g;
        if last >= self.size() {
            return Err(self.oob(start, count, last));
        }
        Ok((start >> self.g, last))
    }

    fn set(&mut self, start: u64, count: u64) -> Result<(), HBitmapError> {
        if count == 0 {
            return Ok(());
        }
        let (first, last) = self.range(start, count)?;
        for b in first..=last {
            self.bits[b as usize] = true;
        }
        Ok(())
    }

    fn reset(&mut self, start: u64, count: u64) -> Result<(), HBitmapError> {
        if count == 0 {
            return Ok(());
        }
        let end = start
            .checked_add(count)
            .ok_or(HBitmapError::RangeOverflow { start, count })?;
        let gran = 1u64 << self.g;
        if start % gran != 0 || (count % gran != 0 && end != self.orig) {
            return Err(HBitmapError::UnalignedReset {
                start,
                count,
                granularity: self.g,
                orig_size: self.orig,
            });
        }
        let (first, last) = self.range(start, count)?;
        for b in first..=last {
            self.bits[b as usize] = false;
        }
        Ok(())
    }

    fn reset_all(&mut self) {
        self.bits.fill(false);
    }

    fn get(&self, item: u64) -> Result<bool, HBitmapError> {
        let bit = item >> self.g;
        if bit >= self.size() {
            return Err(HBitmapError::ItemOutOfBounds {
                item,
                bit,
                size: self.size(),
                granularity: self.g,
            });
        }
        Ok(self.bit(bit))
    }

    fn count(&self) -> u64 {
        (self.bits.iter().filter(|&&b| b).count() as u64) << self.g
    }

    fn next_dirty(&self, start: u64, count: u64) -> Option<u64> {
        if start >= self.orig || count == 0 {
            return None;
        }
        let end = if count > self.orig - start {
            self.orig
        } else {
            start + count
        };
        let b = (start >> self.g..self.size()).find(|&b| self.bit(b))?;
        let item = b << self.g;
        (item < end).then_some(item.max(start))
    }

    fn next_zero(&self, start: u64, count: u64) -> Option<u64> {
        if start >= self.orig || count == 0 {
            return None;
        }
        let end_bit = if count > self.orig - start {
            self.size()
        } else {
            ((start + count - 1) >> self.g) + 1
        };
        let b = (start >> self.g..end_bit).find(|&b| !self.bit(b))?;
        Some((b << self.g).max(start))
    }

    /// End of the run of items with `item`'s state starting at `item`, capped at `limit`.
    fn run_end(&self, item: u64, limit: u64) -> u64 {
        let state = self.bit(item >> self.g);
        let mut b = item >> self.g;
        loop {
            let next = (b + 1) << self.g;
            if next >= limit {
                return limit;
            }
            b += 1;
            if self.bit(b) != state {
                return next;
            }
        }
    }

    /// Defined from the item-level meaning: the first dirty item in `[start, end)`, and the run
    /// of dirty items from it, capped by `end`, `orig_size` and `max`.
    fn next_dirty_area(&self, start: u64, end: u64, max: u64) -> Option<(u64, u64)> {
        let end = end.min(self.orig);
        if max == 0 || start >= end {
            return None;
        }
        let b = (start >> self.g..self.size()).find(|&b| self.bit(b))?;
        let s = (b << self.g).max(start);
        if s >= end {
            return None;
        }
        let limit = end.min(s.saturating_add(max));
        Some((s, self.run_end(s, limit) - s))
    }

    fn status(&self, start: u64, count: u64) -> Result<(bool, u64), HBitmapError> {
        if count == 0 {
            return Err(HBitmapError::EmptyStatusRange { start });
        }
        match start.checked_add(count) {
            Some(end) if end <= self.orig => {
                let state = self.bit(start >> self.g);
                Ok((state, self.run_end(start, end) - start))
            }
            _ => Err(HBitmapError::StatusPastEnd {
                start,
                count,
                orig_size: self.orig,
            }),
        }
    }

    fn iter_from(&self, first: u64) -> Result<Vec<u64>, HBitmapError> {
        self.get(first)?;
        Ok((first >> self.g..self.size())
            .filter(|&b| self.bit(b))
            .map(|b| b << self.g)
            .collect())
    }

    fn truncate(&mut self, new: u64) -> Result<(), HBitmapError> {
        if new > i64::MAX as u64 {
            return Err(HBitmapError::SizeTooLarge {
                size: new,
                max: i64::MAX as u64,
            });
        }
        let bits = bits_for(new, self.g);
        if bits > MAX_BITS {
            return Err(HBitmapError::TooManyBits {
                size: new,
                granularity: self.g,
                bits,
                max: MAX_BITS,
            });
        }
        self.orig = new;
        self.bits.resize(bits as usize, false);
        Ok(())
    }

    fn merge_from(&mut self, src: &Model) -> Result<(), HBitmapError> {
        if src.orig != self.orig {
            return Err(HBitmapError::SizeMismatch {
                dst: self.orig,
                src: src.orig,
            });
        }
        // Every dirty item of the source (clamped to orig_size) dirties its group here.
        for b in 0..src.size() {
            if src.bit(b) {
                let first = b << src.g;
                let last = (((b + 1) << src.g).min(self.orig)) - 1;
                for d in first >> self.g..=last >> self.g {
                    self.bits[d as usize] = true;
                }
            }
        }
        Ok(())
    }

    fn chunk_words(&self, start: u64, count: u64) -> Result<(u64, u64), HBitmapError> {
        if self.g >= 58 {
            return Err(HBitmapError::NotSerializable {
                granularity: self.g,
            });
        }
        let align = 64u64 << self.g;
        let end = start
            .checked_add(count)
            .ok_or(HBitmapError::RangeOverflow { start, count })?;
        if start % align != 0 {
            return Err(HBitmapError::UnalignedChunkStart { start, align });
        }
        let last_bit = (end - 1) >> self.g;
        if last_bit >= self.size() {
            return Err(self.oob(start, count, last_bit));
        }
        if last_bit != self.size() - 1 && count % align != 0 {
            return Err(HBitmapError::UnalignedChunkCount {
                start,
                count,
                align,
                last_bit,
                last: self.size() - 1,
            });
        }
        Ok(((start >> self.g) / 64, last_bit / 64))
    }

    fn serialization_size(&self, start: u64, count: u64) -> Result<u64, HBitmapError> {
        if count == 0 {
            return Ok(0);
        }
        let (f, l) = self.chunk_words(start, count)?;
        Ok((l - f + 1) * 8)
    }

    fn serialize(&self, start: u64, count: u64) -> Result<Vec<u8>, HBitmapError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let (f, l) = self.chunk_words(start, count)?;
        let mut out = vec![0u8; ((l - f + 1) * 8) as usize];
        for (k, byte) in out.iter_mut().enumerate() {
            for j in 0..8u64 {
                let b = f * 64 + k as u64 * 8 + j;
                if b < self.size() && self.bit(b) {
                    *byte |= 1 << j;
                }
            }
        }
        Ok(out)
    }

    fn deserialize(&mut self, buf: &[u8], start: u64, count: u64) -> Result<(), HBitmapError> {
        if count == 0 {
            return Ok(());
        }
        let (f, l) = self.chunk_words(start, count)?;
        let needed = (l - f + 1) * 8;
        if (buf.len() as u64) < needed {
            return Err(HBitmapError::BufferTooSmall {
                start,
                count,
                needed,
                len: buf.len(),
            });
        }
        for b in f * 64..((l + 1) * 64).min(self.size()) {
            let rel = b - f * 64;
            self.bits[b as usize] = buf[(rel / 8) as usize] & (1 << (rel % 8)) != 0;
        }
        Ok(())
    }

    fn fill(&mut self, start: u64, count: u64, on: bool) -> Result<(), HBitmapError> {
        if count == 0 {
            return Ok(());
        }
        let (f, l) = self.chunk_words(start, count)?;
        for b in f * 64..((l + 1) * 64).min(self.size()) {
            self.bits[b as usize] = on;
        }
        Ok(())
    }

    fn sha256(&self) -> [u8; 32] {
        let words = self.size().div_ceil(64).max(1);
        let mut bytes = vec![0u8; (words * 8) as usize];
        for (b, &on) in self.bits.iter().enumerate() {
            if on {
                bytes[b / 8] |= 1 << (b % 8);
            }
        }
        Sha256::digest(bytes).into()
    }
}

// ---------------------------------------------------------------------------------------------
// Generated operations

/// A value chosen relative to the bitmap's current geometry (see [`Pick::item`]).
#[derive(Clone, Copy, Debug)]
struct Pick(u8, u64);

impl Pick {
    /// An item offset or count: anywhere, group-aligned, near `orig_size`, near a word or chunk
    /// boundary, small, or huge.
    fn item(self, m: &Model) -> u64 {
        let Pick(sel, raw) = self;
        let (orig, g, size) = (m.orig, m.g, m.size());
        let gran = 1u64 << g;
        match sel % 10 {
            0 => raw % (orig + 1),
            1 | 2 => (raw % (size + 1)) << g,
            3 => orig.saturating_sub(raw % 3),
            4 => orig + raw % 3,
            5 => raw % 5,
            6 => ((raw % (size + 1)) << g).wrapping_add(if raw & 1 == 0 { 1 } else { gran - 1 }),
            7 => ((raw % (size / 64 + 2)) * 64) << g,
            8 => (((raw % (size >> 20).max(1)) + (raw & 1)) << 20) << g,
            _ => u64::MAX - raw % 4,
        }
    }

    /// A count for a range starting at `start`: to the end, to the end of the last group,
    /// group-aligned, word-aligned, arbitrary within the bitmap, small, or huge.
    fn count(self, start: u64, m: &Model) -> u64 {
        let Pick(sel, raw) = self;
        let (orig, g, size) = (m.orig, m.g, m.size());
        let left = orig.saturating_sub(start);
        match sel % 9 {
            0 => left,
            1 | 2 => raw % (left + 1),
            3 => ((raw % 130) + 1) << g,
            4 => (raw % (size + 1)) << g,
            5 => (size << g).saturating_sub(start),
            6 => ((raw % (size / 64 + 2)) * 64) << g,
            7 => raw % 5,
            _ => u64::MAX - raw % 4,
        }
    }

    /// A serialization chunk: mostly valid (aligned start, aligned or to-the-end count).
    fn chunk(self, other: Pick, m: &Model) -> (u64, u64) {
        let align = 64u64 << m.g;
        let chunks = m.size().div_ceil(64);
        let start = match self.0 % 4 {
            0..=2 => (self.1 % (chunks + 1)) * align,
            _ => self.item(m),
        };
        let count = match other.0 % 5 {
            0 | 1 => m.orig.saturating_sub(start),
            2 => ((other.1 % 4) + 1) * align,
            3 => (m.size() << m.g).saturating_sub(start),
            _ => other.item(m),
        };
        (start, count)
    }

    /// A new size for `truncate`: near the current one, one of the test sizes, or invalid.
    fn new_size(self, m: &Model, sizes: &[u64]) -> u64 {
        let Pick(sel, raw) = self;
        let gran = 1u64 << m.g;
        match sel % 6 {
            0 | 1 => (m.orig + raw % 200).saturating_sub(100),
            2 | 3 => (sizes[(raw % sizes.len() as u64) as usize] << m.g).saturating_sub(raw % gran),
            4 => i64::MAX as u64 + 1 + raw % 10,
            _ => ((MAX_BITS + 1) << m.g) - raw % gran,
        }
    }
}

fn pick() -> impl Strategy<Value = Pick> {
    (any::<u8>(), any::<u64>()).prop_map(|(s, r)| Pick(s, r))
}

#[derive(Clone, Debug)]
enum Op {
    Set(Pick, Pick),
    Reset(Pick, Pick),
    ResetAll,
    Truncate(Pick),
    DeserializePart(Pick, Pick, u64, bool),
    DeserializeOnes(Pick, Pick),
    DeserializeZeroes(Pick, Pick),
    Merge(usize, Vec<(Pick, Pick)>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (pick(), pick()).prop_map(|(a, b)| Op::Set(a, b)),
        5 => (pick(), pick()).prop_map(|(a, b)| Op::Reset(a, b)),
        1 => Just(Op::ResetAll),
        1 => pick().prop_map(Op::Truncate),
        2 => (pick(), pick(), any::<u64>(), any::<bool>())
            .prop_map(|(a, b, s, f)| Op::DeserializePart(a, b, s, f)),
        1 => (pick(), pick()).prop_map(|(a, b)| Op::DeserializeOnes(a, b)),
        1 => (pick(), pick()).prop_map(|(a, b)| Op::DeserializeZeroes(a, b)),
        1 => (0..GRANULARITIES.len(), prop::collection::vec((pick(), pick()), 0..4))
            .prop_map(|(g, sets)| Op::Merge(g, sets)),
    ]
}

/// Queries run after each operation.
#[derive(Clone, Debug)]
struct Query(Pick, Pick, Pick);

fn query() -> impl Strategy<Value = Query> {
    (pick(), pick(), pick()).prop_map(|(a, b, c)| Query(a, b, c))
}

/// Pseudo-random bytes for `deserialize_part`: dense, sparse, all-zero or all-one.
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let style = seed % 4;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match style {
                0 => x as u8,
                1 => (x as u8) & (x >> 8) as u8 & (x >> 16) as u8,
                2 => 0,
                _ => 0xff,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running

fn apply(hb: &mut HBitmap, m: &mut Model, op: &Op, sizes: &[u64]) -> Result<(), TestCaseError> {
    match op {
        Op::Set(a, b) => {
            let s = a.item(m);
            let c = b.count(s, m);
            prop_assert_eq!(hb.set(s, c), m.set(s, c), "set({}, {})", s, c);
        }
        Op::Reset(a, b) => {
            let s = a.item(m);
            let c = b.count(s, m);
            prop_assert_eq!(hb.reset(s, c), m.reset(s, c), "reset({}, {})", s, c);
        }
        Op::ResetAll => {
            hb.reset_all();
            m.reset_all();
        }
        Op::Truncate(a) => {
            let n = a.new_size(m, sizes);
            prop_assert_eq!(hb.truncate(n), m.truncate(n), "truncate({})", n);
            prop_assert_eq!(hb.orig_size(), m.orig);
            prop_assert_eq!(hb.size(), m.size());
        }
        Op::DeserializePart(a, b, seed, finish) => {
            let (s, c) = a.chunk(*b, m);
            let len = m.serialization_size(s, c).unwrap_or(16) as usize;
            // Sometimes one byte short, to check the buffer-size error.
            let len = if seed % 13 == 0 {
                len.saturating_sub(1)
            } else {
                len
            };
            let buf = payload(*seed, len);
            prop_assert_eq!(
                hb.deserialize_part(&buf, s, c, *finish),
                m.deserialize(&buf, s, c),
                "deserialize_part({}, {})",
                s,
                c
            );
        }
        Op::DeserializeOnes(a, b) => {
            let (s, c) = a.chunk(*b, m);
            prop_assert_eq!(hb.deserialize_ones(s, c, true), m.fill(s, c, true));
        }
        Op::DeserializeZeroes(a, b) => {
            let (s, c) = a.chunk(*b, m);
            prop_assert_eq!(hb.deserialize_zeroes(s, c, false), m.fill(s, c, false));
            hb.deserialize_finish();
        }
        Op::Merge(gi, sets) => {
            // A source granularity whose model stays small enough to hold in memory.
            let allowed: Vec<u32> = GRANULARITIES
                .into_iter()
                .filter(|&g| bits_for(m.orig, g) <= 1 << 22)
                .collect();
            let g = allowed[*gi % allowed.len()];
            let mut src =
                HBitmap::new(m.orig, g).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut sm = Model::new(m.orig, g);
            for (a, b) in sets {
                let s = a.item(&sm);
                let c = b.count(s, &sm);
                prop_assert_eq!(src.set(s, c), sm.set(s, c));
            }
            prop_assert_eq!(hb.merge_from(&src), m.merge_from(&sm), "merge from G={}", g);
            // A source of another size is refused.
            let other =
                HBitmap::new(m.orig + 1, g).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert!(hb.merge_from(&other).is_err());
        }
    }
    Ok(())
}

fn check(hb: &HBitmap, m: &Model, q: &Query) -> Result<(), TestCaseError> {
    prop_assert_eq!(hb.count(), m.count());
    prop_assert_eq!(hb.is_empty(), m.count() == 0);
    let a = q.0.item(m);
    let b = q.1.count(a, m);
    let c = q.2.count(a, m);
    prop_assert_eq!(hb.get(a), m.get(a), "get({})", a);
    prop_assert_eq!(
        hb.next_dirty(a, b),
        m.next_dirty(a, b),
        "next_dirty({}, {})",
        a,
        b
    );
    prop_assert_eq!(
        hb.next_zero(a, b),
        m.next_zero(a, b),
        "next_zero({}, {})",
        a,
        b
    );
    prop_assert_eq!(
        hb.next_dirty_area(a, b, c),
        m.next_dirty_area(a, b, c),
        "next_dirty_area({}, {}, {})",
        a,
        b,
        c
    );
    prop_assert_eq!(hb.status(a, b), m.status(a, b), "status({}, {})", a, b);
    let got: Result<Vec<u64>, _> = hb.iter_from(a).map(|it| it.take(100).collect());
    let want = m.iter_from(a).map(|v| v.into_iter().take(100).collect());
    prop_assert_eq!(got, want, "iter_from({})", a);
    let (s, n) = q.1.chunk(q.2, m);
    prop_assert_eq!(hb.serialization_size(s, n), m.serialization_size(s, n));
    Ok(())
}

/// Whole-bitmap checks: iteration, serialization in pieces and back, hash, dirty-area walk.
fn check_all(hb: &HBitmap, m: &Model, piece_words: u64) -> Result<(), TestCaseError> {
    if m.size() > 0 {
        let got: Vec<u64> = hb
            .iter_from(0)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .collect();
        prop_assert_eq!(got, m.iter_from(0).unwrap_or_default());
    }
    prop_assert_eq!(hb.sha256(), m.sha256());

    // Walk the dirty areas like a sparse merge and compare with the model's walk.
    let mut off = 0;
    while let Some((s, n)) = hb.next_dirty_area(off, u64::MAX, u64::MAX) {
        prop_assert_eq!(Some((s, n)), m.next_dirty_area(off, u64::MAX, u64::MAX));
        off = s + n;
    }
    prop_assert_eq!(m.next_dirty_area(off, u64::MAX, u64::MAX), None);

    // Serialize in pieces of `piece_words` words, compare bytes, load into a fresh bitmap.
    if m.size() > 0 {
        let piece = (piece_words * 64) << m.g;
        let mut copy = HBitmap::new(m.orig, m.g).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut start = 0;
        while start < m.orig {
            let count = piece.min(m.orig - start);
            let size = hb.serialization_size(start, count);
            prop_assert_eq!(size.clone(), m.serialization_size(start, count));
            let mut buf = vec![0u8; size.unwrap_or(0) as usize];
            prop_assert_eq!(hb.serialize_part(&mut buf, start, count), Ok(()));
            prop_assert_eq!(&buf, &m.serialize(start, count).unwrap_or_default());
            prop_assert_eq!(copy.deserialize_part(&buf, start, count, false), Ok(()));
            start += count;
        }
        copy.deserialize_finish();
        prop_assert_eq!(copy.count(), hb.count());
        prop_assert!(&copy == hb, "serialized copy differs");
    }
    Ok(())
}

fn run(
    sizes: &[u64],
    gi: usize,
    si: usize,
    slack: u64,
    ops: Vec<(Op, Query)>,
    piece_words: u64,
) -> Result<(), TestCaseError> {
    let g = GRANULARITIES[gi];
    let bits = sizes[si];
    // Not a multiple of the granularity unless the slack is zero.
    let orig = if bits == 0 {
        0
    } else {
        (bits << g) - slack % (1u64 << g)
    };
    let mut hb = HBitmap::new(orig, g).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut m = Model::new(orig, g);
    prop_assert_eq!(hb.size(), m.size());
    for (op, q) in &ops {
        apply(&mut hb, &mut m, op, sizes)?;
        check(&hb, &m, q)?;
    }
    check_all(&hb, &m, piece_words)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn operations_match_model_around_word_and_level_boundaries(
        gi in 0..GRANULARITIES.len(),
        si in 0..SMALL_BITS.len(),
        slack in any::<u64>(),
        ops in prop::collection::vec((op(), query()), 1..40),
        piece_words in 1u64..40,
    ) {
        run(&SMALL_BITS, gi, si, slack, ops, piece_words)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn operations_match_model_around_chunk_boundaries(
        gi in 0..GRANULARITIES.len(),
        si in 0..CHUNK_BITS.len(),
        slack in any::<u64>(),
        ops in prop::collection::vec((op(), query()), 1..16),
        piece_words in prop::sample::select(vec![16u64, 1000, 16_384, 40_000]),
    ) {
        run(&CHUNK_BITS, gi, si, slack, ops, piece_words)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Merging a source of one granularity into a destination of another, both with contents.
    #[test]
    fn merge_across_granularities_matches_model(
        gd in 0..GRANULARITIES.len(),
        gs in 0..GRANULARITIES.len(),
        si in 1..SMALL_BITS.len(),
        slack in any::<u64>(),
        dst_sets in prop::collection::vec((pick(), pick()), 0..6),
        src_sets in prop::collection::vec((pick(), pick()), 0..6),
    ) {
        let (g_dst, g_src) = (GRANULARITIES[gd], GRANULARITIES[gs]);
        // Sized on the finer granularity so that both models stay small.
        let g_fine = g_dst.min(g_src);
        let orig = (SMALL_BITS[si] << g_fine) - slack % (1u64 << g_fine);
        let mut d = HBitmap::new(orig, g_dst).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut dm = Model::new(orig, g_dst);
        let mut s = HBitmap::new(orig, g_src).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut sm = Model::new(orig, g_src);
        prop_assert_eq!(s.size(), sm.size());
        for (a, b) in &dst_sets {
            let x = a.item(&dm);
            let y = b.count(x, &dm);
            prop_assert_eq!(d.set(x, y), dm.set(x, y));
        }
        for (a, b) in &src_sets {
            let x = a.item(&sm);
            let y = b.count(x, &sm);
            prop_assert_eq!(s.set(x, y), sm.set(x, y));
        }
        prop_assert_eq!(d.merge_from(&s), dm.merge_from(&sm));
        prop_assert_eq!(d.count(), dm.count());
        check_all(&d, &dm, 7)?;
    }
}
