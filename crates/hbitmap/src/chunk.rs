//! One allocated piece of the bottom level.
//!
//! The bottom level is cut into chunks of [`CHUNK_WORDS`] words. A chunk that is all clear or
//! all set is not allocated at all (the bitmap records its state in a flag); only a mixed chunk
//! holds a [`Chunk`]: its words, a [`Summary`] of which words are non-zero, and its number of
//! set bits. Bits past the chunk's length in its last word are always zero.

use crate::summary::{bits_clear, word_mask, words_for, Summary};

/// log2 of the words per chunk.
pub(crate) const CHUNK_WORD_SHIFT: u32 = 14;
/// Words per (full-length) chunk: 128 KiB of bitmap.
pub(crate) const CHUNK_WORDS: u64 = 1 << CHUNK_WORD_SHIFT;
/// log2 of the bits per chunk.
pub(crate) const CHUNK_BIT_SHIFT: u32 = CHUNK_WORD_SHIFT + 6;
/// Bits per (full-length) chunk.
pub(crate) const CHUNK_BITS: u64 = 1 << CHUNK_BIT_SHIFT;

/// A mixed chunk of the bottom level.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// The bottom-level words, `ceil(bits / 64)` of them.
    pub(crate) words: Vec<u64>,
    /// Which words are non-zero.
    pub(crate) nz: Summary,
    /// Number of set bits.
    pub(crate) ones: u64,
    /// Number of valid bits.
    pub(crate) bits: u64,
}

/// Bit `j` set iff `block[j]` is non-zero, for the first 64 words of `block`.
#[inline]
fn nonzero_mask(block: &[u64]) -> u64 {
    let mut m = 0u64;
    // Groups of eight with constant shifts: several times faster than one variable shift a word.
    for (i, oct) in block.chunks(8).take(8).enumerate() {
        let mut b = 0u64;
        if let Ok(o) = <&[u64; 8]>::try_from(oct) {
            for (j, w) in o.iter().enumerate() {
                b |= u64::from(*w != 0) << j;
            }
        } else {
            for (j, w) in oct.iter().enumerate() {
                b |= u64::from(*w != 0) << j;
            }
        }
        m |= b << (8 * i);
    }
    m
}

/// Popcount of a slice, as a u64.
#[inline]
pub(crate) fn popcount(words: &[u64]) -> u64 {
    words.iter().map(|w| u64::from(w.count_ones())).sum()
}

impl Chunk {
    /// An all-clear chunk of `bits` bits.
    pub(crate) fn zeroed(bits: u64) -> Self {
        let n = words_for(bits);
        Chunk {
            words: vec![0u64; n],
            nz: Summary::new(n as u64),
            ones: 0,
            bits,
        }
    }

    /// An all-set chunk of `bits` bits (tail bits clear).
    pub(crate) fn filled(bits: u64) -> Self {
        let n = words_for(bits);
        let mut words = vec![u64::MAX; n];
        bits_clear(&mut words, bits, n as u64 * 64);
        Chunk {
            words,
            nz: Summary::full(if bits == 0 { 0 } else { n as u64 }),
            ones: bits,
            bits,
        }
    }

    /// Builds a chunk around `words` (tail bits are cleared), computing its summary and count.
    pub(crate) fn from_words(mut words: Vec<u64>, bits: u64) -> Self {
        let n = words_for(bits);
        words.resize(n, 0);
        bits_clear(&mut words, bits, n as u64 * 64);
        let mut c = Chunk {
            ones: popcount(&words),
            nz: Summary::new(n as u64),
            words,
            bits,
        };
        c.refresh_nz(0, n);
        c
    }

    /// Mask of the valid bits of word `i`.
    #[inline]
    fn valid_mask(&self, i: usize) -> u64 {
        let base = i as u64 * 64;
        if base >= self.bits {
            0
        } else {
            word_mask(0, (self.bits - base).min(64))
        }
    }

    /// Recomputes the non-zero summary for words `lo..hi`.
    pub(crate) fn refresh_nz(&mut self, lo: usize, hi: usize) {
        if lo >= hi {
            return;
        }
        let (klo, khi) = (lo / 64, (hi - 1) / 64);
        for k in klo..=khi {
            let block = self.words.get(k * 64..).unwrap_or_default();
            self.nz.set_leaf_word(k, nonzero_mask(block));
        }
        self.nz.refresh_up(klo, khi);
    }

    /// Sets bits `lo..hi` (chunk-relative, `lo < hi <= bits`); returns how many were clear.
    pub(crate) fn set_range(&mut self, lo: u64, hi: u64) -> u64 {
        if lo >= hi {
            return 0;
        }
        let (w0, w1) = ((lo / 64) as usize, ((hi - 1) / 64) as usize);
        let mut added = 0u64;
        for (i, w) in self.words.iter_mut().enumerate().take(w1 + 1).skip(w0) {
            let base = i as u64 * 64;
            let m = word_mask(lo.max(base) - base, (hi - base).min(64));
            added += u64::from((m & !*w).count_ones());
            *w |= m;
        }
        self.ones += added;
        if w0 == w1 {
            self.nz.set(w0 as u64);
        } else {
            self.nz.set_range(w0 as u64, w1 as u64 + 1);
        }
        added
    }

    /// Clears bits `lo..hi` (chunk-relative); returns how many were set.
    pub(crate) fn clear_range(&mut self, lo: u64, hi: u64) -> u64 {
        if lo >= hi {
            return 0;
        }
        let (w0, w1) = ((lo / 64) as usize, ((hi - 1) / 64) as usize);
        let mut removed = 0u64;
        for (i, w) in self.words.iter_mut().enumerate().take(w1 + 1).skip(w0) {
            let base = i as u64 * 64;
            let m = word_mask(lo.max(base) - base, (hi - base).min(64));
            removed += u64::from((m & *w).count_ones());
            *w &= !m;
        }
        self.ones -= removed.min(self.ones);
        // The words strictly inside are now zero; only the end words may still hold bits.
        if w1 > w0 + 1 {
            self.nz.clear_range(w0 as u64 + 1, w1 as u64);
        }
        for w in [w0, w1] {
            if self.words.get(w).is_some_and(|&x| x == 0) {
                self.nz.clear(w as u64);
            }
        }
        removed
    }

    /// ORs `other` (same length) into `self`; returns how many bits became set.
    pub(crate) fn or_assign(&mut self, other: &Chunk) -> u64 {
        let mut added = 0u64;
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            added += u64::from((b & !*a).count_ones());
            *a |= *b;
        }
        self.ones += added;
        self.nz.or_assign(&other.nz);
        added
    }

    /// Replaces words `lo..lo+src.len()/8` with little-endian words from `src` (tail bits of the
    /// chunk's last word are masked); returns the change in set bits as (added, removed).
    pub(crate) fn write_le(&mut self, lo: usize, src: &[u8]) -> (u64, u64) {
        let n = src.len() / 8;
        let hi = (lo + n).min(self.words.len());
        let Some(dst) = self.words.get_mut(lo..hi) else {
            return (0, 0);
        };
        let before = popcount(dst);
        for (w, b) in dst.iter_mut().zip(src.chunks_exact(8)) {
            *w = u64::from_le_bytes(le8(b));
        }
        if hi == self.words.len() && hi > lo {
            let m = self.valid_mask(hi - 1);
            if let Some(last) = self.words.get_mut(hi - 1) {
                *last &= m;
            }
        }
        let after = self.words.get(lo..hi).map(popcount).unwrap_or(0);
        self.ones = self.ones.saturating_sub(before) + after;
        self.refresh_nz(lo, hi);
        (after.saturating_sub(before), before.saturating_sub(after))
    }

    /// First set bit at or after chunk-relative `from`.
    pub(crate) fn next_set(&self, from: u64) -> Option<u64> {
        let wi = from / 64;
        let first = self.words.get(wi as usize)? & (u64::MAX << (from % 64));
        if first != 0 {
            return Some(wi * 64 + u64::from(first.trailing_zeros()));
        }
        let wj = self.nz.next_set(wi + 1)?;
        let w = *self.words.get(wj as usize)?;
        (w != 0).then(|| wj * 64 + u64::from(w.trailing_zeros()))
    }

    /// First clear bit in chunk-relative `from..limit`.
    pub(crate) fn next_zero(&self, from: u64, limit: u64) -> Option<u64> {
        if from >= limit {
            return None;
        }
        let first = (from / 64) as usize;
        let last = ((limit - 1) / 64) as usize;
        for (i, &w) in self.words.iter().enumerate().take(last + 1).skip(first) {
            let mut inv = !w;
            if i == first {
                inv &= u64::MAX << (from % 64);
            }
            if inv != 0 {
                let bit = i as u64 * 64 + u64::from(inv.trailing_zeros());
                return (bit < limit).then_some(bit);
            }
        }
        None
    }

    /// Bit `i` (chunk-relative).
    #[inline]
    pub(crate) fn get(&self, i: u64) -> bool {
        crate::summary::bits_get(&self.words, i)
    }
}

/// `b` as an 8-byte array (callers pass `chunks_exact(8)` pieces; anything else reads as 0).
#[inline]
pub(crate) fn le8(b: &[u8]) -> [u8; 8] {
    <[u8; 8]>::try_from(b).unwrap_or_default()
}
