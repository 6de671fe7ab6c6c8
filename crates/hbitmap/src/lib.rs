//! A hierarchical bitmap with QEMU's `HBitmap` semantics (`util/hbitmap.c`).
//!
//! The bitmap tracks `orig_size` *items* (bytes, for the block layer) with one bit per
//! `2^granularity` items. Its observable behaviour — rounding, counts, search results, the
//! serialized byte layout, truncation and merging — is QEMU's, as specified in
//! `reference/dirty-bitmaps.md` §1, with the robust choices of §5.4:
//!
//! * every precondition QEMU asserts is an [`HBitmapError`], and nothing here panics on any
//!   argument values;
//! * bits past `size` in the last word ("tail bits") are always clear, even after
//!   [`HBitmap::deserialize_ones`] or [`HBitmap::deserialize_part`], so they never count, hash or
//!   serialize;
//! * [`HBitmap::sha256`] hashes little-endian 64-bit words.
//!
//! # Storage
//!
//! QEMU keeps seven dense levels. Up to [`MAX_BITS`] (2^41) bits that would be 256 GiB, so here
//! the bottom level is cut into chunks of 2^20 bits: a chunk that is all clear or all set is not
//! allocated, and a mixed chunk carries its own summary levels (which words are non-zero). A
//! dense summary over chunks sits on top. Searches for set bits therefore skip empty regions in
//! O(levels), and range operations, scans and (de)serialization work a word at a time.
//!
//! Unlike QEMU, the summary levels and the count are kept exact after every call, including the
//! `deserialize_*` calls with `finish == false`; [`HBitmap::deserialize_finish`] has nothing left
//! to do.
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

mod chunk;
mod error;
mod iter;
mod serialize;
mod summary;

use chunk::{Chunk, CHUNK_BITS, CHUNK_BIT_SHIFT, CHUNK_WORDS, CHUNK_WORD_SHIFT};
use summary::{bits_clear, bits_get, bits_next_clear, bits_set, word_mask, words_for, Summary};

pub use error::HBitmapError;
pub use iter::Iter;

/// Largest number of bits (after granularity) a bitmap may hold: QEMU's `HBITMAP_LOG_MAX_SIZE`.
pub const MAX_BITS: u64 = 1 << 41;

/// Largest size in items (`INT64_MAX`): QEMU's bound in `hbitmap_alloc` and `hbitmap_truncate`.
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// A bitmap over `orig_size` items with one bit per `2^granularity` items.
#[derive(Clone)]
pub struct HBitmap {
    orig_size: u64,
    granularity: u32,
    /// Bits in the bottom level: `ceil(orig_size / 2^granularity)`.
    size: u64,
    /// Set bits in the bottom level (QEMU's `count`, not scaled).
    set_bits: u64,
    /// Mixed chunks; `None` is an all-clear chunk, or an all-set one if its `full` bit is set.
    chunks: Vec<Option<Box<Chunk>>>,
    /// One bit per chunk: the chunk is all set (and not allocated).
    full: Vec<u64>,
    /// One bit per chunk: the chunk has a set bit.
    nonzero: Summary,
}

/// What a chunk holds.
enum State<'a> {
    Zero,
    Ones,
    Mixed(&'a Chunk),
}

/// `ceil(orig_size / 2^g)` without overflow.
fn bits_for(orig_size: u64, g: u32) -> u64 {
    let mask = (1u64 << g) - 1;
    (orig_size >> g) + u64::from(orig_size & mask != 0)
}

/// Number of chunks for `bits` bits.
fn chunks_for(bits: u64) -> usize {
    bits.div_ceil(CHUNK_BITS) as usize
}

impl std::fmt::Debug for HBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HBitmap")
            .field("orig_size", &self.orig_size)
            .field("granularity", &self.granularity)
            .field("size", &self.size)
            .field("set_bits", &self.set_bits)
            .finish_non_exhaustive()
    }
}

/// Two bitmaps are equal when they have the same `orig_size`, granularity and bits.
impl PartialEq for HBitmap {
    fn eq(&self, other: &Self) -> bool {
        if self.orig_size != other.orig_size
            || self.granularity != other.granularity
            || self.set_bits != other.set_bits
        {
            return false;
        }
        (0..self.chunks.len()).all(|c| match (self.state(c), other.state(c)) {
            (State::Zero, State::Zero) | (State::Ones, State::Ones) => true,
            (State::Zero, State::Ones) | (State::Ones, State::Zero) => false,
            (State::Zero, State::Mixed(m)) | (State::Mixed(m), State::Zero) => m.ones == 0,
            (State::Ones, State::Mixed(m)) | (State::Mixed(m), State::Ones) => m.ones == m.bits,
            (State::Mixed(a), State::Mixed(b)) => a.words == b.words,
        })
    }
}

impl Eq for HBitmap {}

impl HBitmap {
    /// `hbitmap_alloc(orig_size, granularity)`: an all-clear bitmap over `orig_size` items, one
    /// bit per `2^granularity` items.
    ///
    /// Errors: `granularity >= 64`, `orig_size > INT64_MAX`, or more than [`MAX_BITS`] bits.
    pub fn new(orig_size: u64, granularity: u32) -> Result<Self, HBitmapError> {
        let size = Self::check_size(orig_size, granularity)?;
        let n = chunks_for(size);
        Ok(HBitmap {
            orig_size,
            granularity,
            size,
            set_bits: 0,
            chunks: vec![None; n],
            full: vec![0u64; words_for(n as u64)],
            nonzero: Summary::new(n as u64),
        })
    }

    /// Validates a size and granularity; returns the number of bits.
    fn check_size(orig_size: u64, granularity: u32) -> Result<u64, HBitmapError> {
        if granularity >= 64 {
            return Err(HBitmapError::GranularityOutOfRange { granularity });
        }
        if orig_size > MAX_SIZE {
            return Err(HBitmapError::SizeTooLarge {
                size: orig_size,
                max: MAX_SIZE,
            });
        }
        let bits = bits_for(orig_size, granularity);
        if bits > MAX_BITS {
            return Err(HBitmapError::TooManyBits {
                size: orig_size,
                granularity,
                bits,
                max: MAX_BITS,
            });
        }
        Ok(bits)
    }

    /// Size in items as given to `new`/`truncate`.
    pub fn orig_size(&self) -> u64 {
        self.orig_size
    }

    /// Number of bits: `ceil(orig_size / 2^G)`.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Granularity shift `G`.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Items covered by set bits: `set_bits << G` (not clamped to `orig_size`, as in QEMU: a
    /// partial last group counts whole).
    pub fn count(&self) -> u64 {
        // Cannot overflow: set_bits <= ceil(orig_size / 2^G) and orig_size <= 2^63 - 1.
        self.set_bits << self.granularity
    }

    /// No bit set.
    pub fn is_empty(&self) -> bool {
        self.set_bits == 0
    }

    /// Set items `[start, start+count)`, rounding outward to whole groups.
    ///
    /// A no-op when `count == 0`. Errors: `start + count` overflows, or the last item's bit is
    /// past `size` (items past `orig_size` inside the last group are accepted, as in QEMU).
    pub fn set(&mut self, start: u64, count: u64) -> Result<(), HBitmapError> {
        let Some((first, last)) = self.bit_range(start, count)? else {
            return Ok(());
        };
        self.apply_bits(first, last + 1, true);
        Ok(())
    }

    /// Reset items `[start, start+count)`.
    ///
    /// A no-op when `count == 0`. Otherwise QEMU's rules: `start` must be group-aligned, and
    /// `count` group-aligned or `start + count == orig_size` (so `start + count` may also be
    /// `orig_size` rounded up to a group); the range must end within the last bit.
    pub fn reset(&mut self, start: u64, count: u64) -> Result<(), HBitmapError> {
        if count == 0 {
            return Ok(());
        }
        let end = start
            .checked_add(count)
            .ok_or(HBitmapError::RangeOverflow { start, count })?;
        let mask = (1u64 << self.granularity) - 1;
        if start & mask != 0 || (count & mask != 0 && end != self.orig_size) {
            return Err(HBitmapError::UnalignedReset {
                start,
                count,
                granularity: self.granularity,
                orig_size: self.orig_size,
            });
        }
        let Some((first, last)) = self.bit_range(start, count)? else {
            return Ok(());
        };
        self.apply_bits(first, last + 1, false);
        Ok(())
    }

    /// Maps a non-empty item range to its bit range `(first, last)` (inclusive), checking it.
    fn bit_range(&self, start: u64, count: u64) -> Result<Option<(u64, u64)>, HBitmapError> {
        if count == 0 {
            return Ok(None);
        }
        let end = start
            .checked_add(count)
            .ok_or(HBitmapError::RangeOverflow { start, count })?;
        let last = (end - 1) >> self.granularity;
        if last >= self.size {
            return Err(HBitmapError::RangeOutOfBounds {
                start,
                count,
                last_bit: last,
                size: self.size,
                orig_size: self.orig_size,
                granularity: self.granularity,
            });
        }
        Ok(Some((start >> self.granularity, last)))
    }

    /// Clear every bit.
    pub fn reset_all(&mut self) {
        for slot in &mut self.chunks {
            *slot = None;
        }
        self.full.fill(0);
        self.nonzero.clear_all();
        self.set_bits = 0;
    }

    /// Whether the group holding `item` is set.
    ///
    /// Errors: the item's bit is past `size`.
    pub fn get(&self, item: u64) -> Result<bool, HBitmapError> {
        let bit = self.item_bit(item)?;
        Ok(self.bit(bit))
    }

    /// The bit of `item`, checked against `size`.
    fn item_bit(&self, item: u64) -> Result<u64, HBitmapError> {
        let bit = item >> self.granularity;
        if bit >= self.size {
            return Err(HBitmapError::ItemOutOfBounds {
                item,
                bit,
                size: self.size,
                granularity: self.granularity,
            });
        }
        Ok(bit)
    }

    /// First dirty item in `[start, start+count)`, or `None`; `max(start, group start)`.
    ///
    /// QEMU's rules: `None` when `start >= orig_size` or `count == 0`; a `count` reaching past
    /// `orig_size` means "to the end". When the group holding `start` is dirty the answer is
    /// `start` itself.
    pub fn next_dirty(&self, start: u64, count: u64) -> Option<u64> {
        if start >= self.orig_size || count == 0 {
            return None;
        }
        let end = if count > self.orig_size - start {
            self.orig_size
        } else {
            start + count
        };
        let bit = self.next_set_bit(start >> self.granularity)?;
        let item = bit << self.granularity;
        (item < end).then_some(item.max(start))
    }

    /// First clean item in `[start, start+count)`, or `None`.
    ///
    /// Same `None` rules as [`HBitmap::next_dirty`]. When the range reaches past `orig_size` the
    /// whole last group is searched; when the group holding `start` is clean the answer is
    /// `start` itself.
    pub fn next_zero(&self, start: u64, count: u64) -> Option<u64> {
        if start >= self.orig_size || count == 0 {
            return None;
        }
        let end_bit = if count > self.orig_size - start {
            self.size
        } else {
            ((start + count - 1) >> self.granularity) + 1
        };
        let bit = self.next_zero_bit(start >> self.granularity, end_bit)?;
        Some((bit << self.granularity).max(start))
    }

    /// First dirty area `(start, len)` within `[start, end)`, at most `max_dirty_count` long.
    ///
    /// QEMU's `hbitmap_next_dirty_area` (modern signature): `end` is clamped to `orig_size`; the
    /// area starts at `next_dirty(start, ..)` (so not aligned down) and stops at the first clean
    /// item, at `end` or after `max_dirty_count` items. QEMU asserts `max_dirty_count > 0`; here
    /// a zero `max_dirty_count` finds no area.
    pub fn next_dirty_area(
        &self,
        start: u64,
        end: u64,
        max_dirty_count: u64,
    ) -> Option<(u64, u64)> {
        if max_dirty_count == 0 {
            return None;
        }
        let end = end.min(self.orig_size);
        if start >= end {
            return None;
        }
        let area = self.next_dirty(start, end - start)?;
        let len = (end - area).min(max_dirty_count);
        let stop = self.next_zero(area, len).unwrap_or(area + len);
        Some((area, stop - area))
    }

    /// `hbitmap_status`: whether `start` is dirty, and the length of the run of that state
    /// starting at `start`, capped at `count`.
    ///
    /// Errors: `count == 0`, or `start + count` past `orig_size`.
    pub fn status(&self, start: u64, count: u64) -> Result<(bool, u64), HBitmapError> {
        if count == 0 {
            return Err(HBitmapError::EmptyStatusRange { start });
        }
        match start.checked_add(count) {
            Some(end) if end <= self.orig_size => {}
            _ => {
                return Err(HBitmapError::StatusPastEnd {
                    start,
                    count,
                    orig_size: self.orig_size,
                })
            }
        }
        match self.next_dirty(start, count) {
            None => return Ok((false, count)),
            Some(d) if d > start => return Ok((false, d - start)),
            Some(_) => {}
        }
        Ok(match self.next_zero(start, count) {
            None => (true, count),
            Some(z) => (true, z - start),
        })
    }

    /// Iterate set bits starting at the group holding `first`, yielding item offsets
    /// (`bit << G`, so the first result may be below `first`).
    ///
    /// Errors: `first`'s bit is past `size`.
    pub fn iter_from(&self, first: u64) -> Result<Iter<'_>, HBitmapError> {
        let bit = self.item_bit(first)?;
        Ok(Iter::new(self, bit))
    }

    /// Change `orig_size`, growing with clear bits or shrinking.
    ///
    /// `orig_size` is always updated. On shrink, groups wholly past the new end are cleared; a
    /// partial last group keeps its bit. Errors (leaving the bitmap unchanged): `new_size` past
    /// `INT64_MAX` or needing more than [`MAX_BITS`] bits.
    pub fn truncate(&mut self, new_size: u64) -> Result<(), HBitmapError> {
        let new_bits = Self::check_size(new_size, self.granularity)?;
        self.orig_size = new_size;
        if new_bits == self.size {
            return Ok(());
        }
        if new_bits < self.size {
            self.apply_bits(new_bits, self.size, false);
        }
        self.resize_bits(new_bits);
        Ok(())
    }

    /// Changes the number of bits; bits past the new end must already be clear.
    fn resize_bits(&mut self, new_bits: u64) {
        let old_n = self.chunks.len();
        let new_n = chunks_for(new_bits);
        // The last chunk kept may change length.
        if let Some(c) = old_n.min(new_n).checked_sub(1) {
            let old_cbits = self.chunk_bits(c);
            let new_cbits = new_bits
                .saturating_sub((c as u64) << CHUNK_BIT_SHIFT)
                .min(CHUNK_BITS);
            if old_cbits != new_cbits {
                let full = bits_get(&self.full, c as u64);
                if let Some(slot) = self.chunks.get_mut(c) {
                    if full && new_cbits > old_cbits {
                        // All set up to the old end, clear past it: now a mixed chunk.
                        *slot = Some(Box::new(Chunk::filled(old_cbits)));
                        bits_clear(&mut self.full, c as u64, c as u64 + 1);
                    }
                    if let Some(ch) = slot.take() {
                        let resized = Chunk::from_words(ch.words, new_cbits);
                        *slot = Some(Box::new(resized));
                    }
                }
            }
        }
        self.chunks.resize_with(new_n, || None);
        self.full.resize(words_for(new_n as u64), 0);
        let full_bits = self.full.len() as u64 * 64;
        bits_clear(&mut self.full, new_n as u64, full_bits);
        self.size = new_bits;
        self.nonzero = Summary::new(new_n as u64);
        self.set_bits = 0;
        for c in 0..new_n {
            let n = self.chunk_count(c);
            self.set_bits += n;
            if n > 0 {
                self.nonzero.set(c as u64);
            }
        }
    }

    /// `self |= src`, granularities may differ, `orig_size` must be equal.
    ///
    /// QEMU's `hbitmap_merge(self, src, self)`: with equal granularities a word-wise OR; with
    /// different ones a sparse merge that sets, in `self`, every dirty area of `src` (so a coarse
    /// source marks whole fine groups, and a fine source whole coarse groups).
    pub fn merge_from(&mut self, src: &HBitmap) -> Result<(), HBitmapError> {
        if self.orig_size != src.orig_size {
            return Err(HBitmapError::SizeMismatch {
                dst: self.orig_size,
                src: src.orig_size,
            });
        }
        if src.is_empty() {
            return Ok(());
        }
        if self.granularity != src.granularity {
            let mut offset = 0;
            while let Some((start, len)) = src.next_dirty_area(offset, src.orig_size, u64::MAX) {
                self.set(start, len)?;
                offset = start + len;
            }
            return Ok(());
        }
        for c in 0..self.chunks.len().min(src.chunks.len()) {
            match src.state(c) {
                State::Zero => {}
                State::Ones => self.make_uniform(c, true),
                State::Mixed(s) if s.ones == 0 => {}
                State::Mixed(s) => {
                    if bits_get(&self.full, c as u64) {
                        continue;
                    }
                    let Some(slot) = self.chunks.get_mut(c) else {
                        continue;
                    };
                    match slot {
                        None => {
                            *slot = Some(Box::new(s.clone()));
                            self.set_bits += s.ones;
                        }
                        Some(d) => self.set_bits += d.or_assign(s),
                    }
                    self.nonzero.set(c as u64);
                }
            }
        }
        Ok(())
    }

    // ---- chunk-level helpers ----

    /// What chunk `c` holds.
    fn state(&self, c: usize) -> State<'_> {
        if bits_get(&self.full, c as u64) {
            return State::Ones;
        }
        match self.chunks.get(c) {
            Some(Some(ch)) => State::Mixed(ch),
            _ => State::Zero,
        }
    }

    /// Valid bits in chunk `c`.
    fn chunk_bits(&self, c: usize) -> u64 {
        self.size
            .saturating_sub((c as u64) << CHUNK_BIT_SHIFT)
            .min(CHUNK_BITS)
    }

    /// Set bits in chunk `c`.
    fn chunk_count(&self, c: usize) -> u64 {
        match self.state(c) {
            State::Zero => 0,
            State::Ones => self.chunk_bits(c),
            State::Mixed(m) => m.ones,
        }
    }

    /// Makes chunk `c` all clear or all set, dropping its storage.
    fn make_uniform(&mut self, c: usize, on: bool) {
        let before = self.chunk_count(c);
        let cbits = self.chunk_bits(c);
        if let Some(slot) = self.chunks.get_mut(c) {
            *slot = None;
        }
        let c64 = c as u64;
        if on {
            bits_set(&mut self.full, c64, c64 + 1);
            self.nonzero.set(c64);
            self.set_bits = self.set_bits.saturating_sub(before) + cbits;
        } else {
            bits_clear(&mut self.full, c64, c64 + 1);
            self.nonzero.clear(c64);
            self.set_bits = self.set_bits.saturating_sub(before);
        }
    }

    /// Sets (`on`) or clears bits `lo..hi` (`hi <= size`), a chunk at a time.
    fn apply_bits(&mut self, lo: u64, hi: u64, on: bool) {
        let hi = hi.min(self.size);
        let mut b = lo;
        while b < hi {
            let c = (b >> CHUNK_BIT_SHIFT) as usize;
            let cstart = (c as u64) << CHUNK_BIT_SHIFT;
            let cbits = self.chunk_bits(c);
            let end = hi.min(cstart + cbits);
            let (l, h) = (b - cstart, end - cstart);
            if l == 0 && h == cbits {
                self.make_uniform(c, on);
            } else if on {
                self.set_in_chunk(c, l, h);
            } else {
                self.clear_in_chunk(c, l, h);
            }
            b = end;
        }
    }

    /// Sets chunk-relative bits `l..h` of chunk `c`.
    fn set_in_chunk(&mut self, c: usize, l: u64, h: u64) {
        if bits_get(&self.full, c as u64) {
            return;
        }
        let cbits = self.chunk_bits(c);
        let Some(slot) = self.chunks.get_mut(c) else {
            return;
        };
        let ch = slot.get_or_insert_with(|| Box::new(Chunk::zeroed(cbits)));
        self.set_bits += ch.set_range(l, h);
        if ch.ones > 0 {
            self.nonzero.set(c as u64);
        }
    }

    /// Clears chunk-relative bits `l..h` of chunk `c`.
    fn clear_in_chunk(&mut self, c: usize, l: u64, h: u64) {
        let cbits = self.chunk_bits(c);
        let full = bits_get(&self.full, c as u64);
        let Some(slot) = self.chunks.get_mut(c) else {
            return;
        };
        if slot.is_none() {
            if !full {
                return;
            }
            *slot = Some(Box::new(Chunk::filled(cbits)));
            bits_clear(&mut self.full, c as u64, c as u64 + 1);
        }
        if let Some(ch) = slot {
            self.set_bits = self.set_bits.saturating_sub(ch.clear_range(l, h));
            if ch.ones == 0 {
                self.nonzero.clear(c as u64);
            }
        }
    }

    /// Bottom-level bit `bit` (`bit < size`).
    fn bit(&self, bit: u64) -> bool {
        let c = (bit >> CHUNK_BIT_SHIFT) as usize;
        match self.state(c) {
            State::Zero => false,
            State::Ones => true,
            State::Mixed(m) => m.get(bit & (CHUNK_BITS - 1)),
        }
    }

    /// Bottom-level word `wi`, tail bits clear.
    fn word(&self, wi: u64) -> u64 {
        let c = (wi >> CHUNK_WORD_SHIFT) as usize;
        match self.state(c) {
            State::Zero => 0,
            State::Ones => self.ones_word(wi),
            State::Mixed(m) => m
                .words
                .get((wi & (CHUNK_WORDS - 1)) as usize)
                .copied()
                .unwrap_or(0),
        }
    }

    /// Word `wi` with every valid bit set.
    fn ones_word(&self, wi: u64) -> u64 {
        let base = wi * 64;
        if base >= self.size {
            0
        } else {
            word_mask(0, (self.size - base).min(64))
        }
    }

    /// First set bit at or after `from`.
    fn next_set_bit(&self, from: u64) -> Option<u64> {
        if from >= self.size {
            return None;
        }
        let mut c = from >> CHUNK_BIT_SHIFT;
        let mut local = from & (CHUNK_BITS - 1);
        loop {
            let next = self.nonzero.next_set(c)?;
            if next != c {
                local = 0;
                c = next;
            }
            let base = c << CHUNK_BIT_SHIFT;
            match self.state(c as usize) {
                State::Ones => return Some(base + local),
                State::Mixed(m) => {
                    if let Some(b) = m.next_set(local) {
                        return Some(base + b);
                    }
                }
                State::Zero => {}
            }
            c += 1;
            local = 0;
        }
    }

    /// First clear bit in `from..limit` (`limit` is capped at `size`).
    fn next_zero_bit(&self, from: u64, limit: u64) -> Option<u64> {
        let limit = limit.min(self.size);
        let n = self.chunks.len() as u64;
        let mut b = from;
        while b < limit {
            let c = b >> CHUNK_BIT_SHIFT;
            let cstart = c << CHUNK_BIT_SHIFT;
            let cend = cstart + self.chunk_bits(c as usize);
            match self.state(c as usize) {
                State::Zero => return Some(b),
                State::Ones => {
                    let next = bits_next_clear(&self.full, c + 1, n)?;
                    b = next << CHUNK_BIT_SHIFT;
                }
                State::Mixed(m) => {
                    if let Some(z) = m.next_zero(b - cstart, limit.min(cend) - cstart) {
                        return Some(cstart + z);
                    }
                    b = cend;
                }
            }
        }
        None
    }
}

/// QEMU's `sizes[0..7]` (words per level, coarsest first) for a bitmap of `bits` bits.
#[cfg(test)]
fn qemu_level_sizes(bits: u64) -> [u64; 7] {
    let mut sizes = [0u64; 7];
    let mut s = bits;
    for slot in sizes.iter_mut().rev() {
        s = s.div_ceil(64).max(1);
        *slot = s;
    }
    sizes
}

#[cfg(test)]
mod tests;
