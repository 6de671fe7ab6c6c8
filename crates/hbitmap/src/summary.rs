//! A dense multi-level "which of these are non-empty" bitset.
//!
//! Level 0 holds one bit per tracked thing (a bottom-level word inside a chunk, or a chunk of the
//! whole bitmap); each level above holds one bit per word of the level below, set iff that word
//! is non-zero. This is QEMU's level invariant, and it lets [`Summary::next_set`] skip empty
//! regions in O(levels) instead of scanning them.
//!
//! Bits at or past `len` in the last word of each level are always zero.

/// Bits per word.
const W: u64 = 64;

/// Mask of the bits `lo..hi` of one word (`lo < hi <= 64`).
#[inline]
pub(crate) fn word_mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= W { u64::MAX } else { (1u64 << hi) - 1 };
    let lower = if lo >= W { u64::MAX } else { (1u64 << lo) - 1 };
    upper & !lower
}

/// Sets bits `lo..hi` of a plain bit array, a word at a time.
pub(crate) fn bits_set(words: &mut [u64], lo: u64, hi: u64) {
    bits_apply(words, lo, hi, true);
}

/// Clears bits `lo..hi` of a plain bit array, a word at a time.
pub(crate) fn bits_clear(words: &mut [u64], lo: u64, hi: u64) {
    bits_apply(words, lo, hi, false);
}

fn bits_apply(words: &mut [u64], lo: u64, hi: u64, set: bool) {
    if lo >= hi {
        return;
    }
    let first = (lo / W) as usize;
    let last = ((hi - 1) / W) as usize;
    for (i, w) in words.iter_mut().enumerate().take(last + 1).skip(first) {
        let base = i as u64 * W;
        let m = word_mask(lo.max(base) - base, (hi - base).min(W));
        if set {
            *w |= m;
        } else {
            *w &= !m;
        }
    }
}

/// Index of the first clear bit at or after `from` in a plain bit array of `len` bits.
pub(crate) fn bits_next_clear(words: &[u64], from: u64, len: u64) -> Option<u64> {
    if from >= len {
        return None;
    }
    let first = (from / W) as usize;
    for (i, &w) in words.iter().enumerate().skip(first) {
        let base = i as u64 * W;
        let mut inv = !w;
        if i == first {
            inv &= !word_mask(0, from - base);
        }
        if inv != 0 {
            let bit = base + u64::from(inv.trailing_zeros());
            return (bit < len).then_some(bit);
        }
    }
    None
}

/// Whether bit `i` of a plain bit array is set (false past its end).
#[inline]
pub(crate) fn bits_get(words: &[u64], i: u64) -> bool {
    words
        .get((i / W) as usize)
        .is_some_and(|w| w & (1u64 << (i % W)) != 0)
}

/// Number of words needed for `bits` bits, at least one.
#[inline]
pub(crate) fn words_for(bits: u64) -> usize {
    (bits.div_ceil(W) as usize).max(1)
}

/// A multi-level summary bitset over `len` items (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Summary {
    /// `levels[0]` is the leaf level (one bit per item); the last level is a single word.
    levels: Vec<Vec<u64>>,
    len: u64,
}

impl Summary {
    /// An all-clear summary over `len` items.
    pub(crate) fn new(len: u64) -> Self {
        let mut levels = Vec::new();
        let mut n = words_for(len);
        loop {
            levels.push(vec![0u64; n]);
            if n == 1 {
                break;
            }
            n = words_for(n as u64);
        }
        Summary { levels, len }
    }

    /// An all-set summary over `len` items.
    pub(crate) fn full(len: u64) -> Self {
        let mut s = Summary::new(len);
        s.set_range(0, len);
        s
    }

    /// Marks item `i`, propagating up while a word goes from zero to non-zero.
    pub(crate) fn set(&mut self, i: u64) {
        if i >= self.len {
            return;
        }
        let mut pos = i;
        for level in &mut self.levels {
            let Some(w) = level.get_mut((pos / W) as usize) else {
                return;
            };
            let was = *w;
            *w |= 1u64 << (pos % W);
            if was != 0 {
                return;
            }
            pos /= W;
        }
    }

    /// Unmarks item `i`, propagating up while a word becomes zero.
    pub(crate) fn clear(&mut self, i: u64) {
        if i >= self.len {
            return;
        }
        let mut pos = i;
        for level in &mut self.levels {
            let Some(w) = level.get_mut((pos / W) as usize) else {
                return;
            };
            let was = *w;
            *w &= !(1u64 << (pos % W));
            if *w != 0 || was == 0 {
                return;
            }
            pos /= W;
        }
    }

    /// Marks or unmarks item `i`.
    pub(crate) fn assign(&mut self, i: u64, on: bool) {
        if on {
            self.set(i)
        } else {
            self.clear(i)
        }
    }

    /// Marks items `lo..hi`.
    pub(crate) fn set_range(&mut self, lo: u64, hi: u64) {
        let hi = hi.min(self.len);
        if lo >= hi {
            return;
        }
        let (mut lo, mut hi) = (lo, hi);
        for level in &mut self.levels {
            bits_set(level, lo, hi);
            // Every word touched is now non-zero, so the parents are a plain range too.
            lo /= W;
            hi = (hi - 1) / W + 1;
        }
    }

    /// Unmarks items `lo..hi`.
    pub(crate) fn clear_range(&mut self, lo: u64, hi: u64) {
        let hi = hi.min(self.len);
        if lo >= hi {
            return;
        }
        if let Some(leaf) = self.levels.first_mut() {
            bits_clear(leaf, lo, hi);
        }
        self.refresh_up((lo / W) as usize, ((hi - 1) / W) as usize);
    }

    /// Replaces leaf word `k` with `m` (bits past `len` are dropped). Call
    /// [`Summary::refresh_up`] afterwards for the words changed.
    pub(crate) fn set_leaf_word(&mut self, k: usize, m: u64) {
        let base = k as u64 * W;
        if base >= self.len {
            return;
        }
        let valid = word_mask(0, (self.len - base).min(W));
        if let Some(w) = self.levels.first_mut().and_then(|l| l.get_mut(k)) {
            *w = m & valid;
        }
    }

    /// Recomputes the levels above the leaf for leaf words `lo..=hi`.
    pub(crate) fn refresh_up(&mut self, lo: usize, hi: usize) {
        let (mut lo, mut hi) = (lo, hi);
        for l in 1..self.levels.len() {
            let (below, above) = self.levels.split_at_mut(l);
            let (Some(child), Some(parent)) = (below.last(), above.first_mut()) else {
                return;
            };
            let (plo, phi) = (lo / W as usize, hi / W as usize);
            for (p, pw) in parent.iter_mut().enumerate().take(phi + 1).skip(plo) {
                let start = p * W as usize;
                let mut m = 0u64;
                for (j, cw) in child.iter().skip(start).take(W as usize).enumerate() {
                    if *cw != 0 {
                        m |= 1u64 << j;
                    }
                }
                *pw = m;
            }
            lo = plo;
            hi = phi;
        }
    }

    /// Unmarks everything.
    pub(crate) fn clear_all(&mut self) {
        for level in &mut self.levels {
            level.fill(0);
        }
    }

    /// ORs `other` (same `len`) into `self`. Valid because the OR of two summaries is the
    /// summary of the OR of what they summarise.
    pub(crate) fn or_assign(&mut self, other: &Summary) {
        for (a, b) in self.levels.iter_mut().zip(&other.levels) {
            for (x, y) in a.iter_mut().zip(b) {
                *x |= *y;
            }
        }
    }

    /// First marked item at or after `from`.
    pub(crate) fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        // Climb until a word has a marked bit at or after the position, then descend.
        let mut pos = from;
        let mut lvl = 0usize;
        let mut found = loop {
            let level = self.levels.get(lvl)?;
            let wi = pos / W;
            let w = level.get(wi as usize)? & (u64::MAX << (pos % W));
            if w != 0 {
                break wi * W + u64::from(w.trailing_zeros());
            }
            pos = wi + 1;
            lvl += 1;
        };
        while lvl > 0 {
            lvl -= 1;
            let w = *self.levels.get(lvl)?.get(found as usize)?;
            if w == 0 {
                return None;
            }
            found = found * W + u64::from(w.trailing_zeros());
        }
        (found < self.len).then_some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_set_skips_empty_words_at_every_level() {
        let mut s = Summary::new(1 << 21);
        assert_eq!(s.next_set(0), None);
        s.set((1 << 21) - 1);
        s.set(5);
        assert_eq!(s.next_set(0), Some(5));
        assert_eq!(s.next_set(6), Some((1 << 21) - 1));
        s.clear((1 << 21) - 1);
        assert_eq!(s.next_set(6), None);
        s.clear(5);
        assert_eq!(s.next_set(0), None);
    }

    #[test]
    fn ranges_keep_upper_levels_consistent() {
        let mut s = Summary::new(300_000);
        s.set_range(1000, 200_000);
        assert_eq!(s.next_set(0), Some(1000));
        assert_eq!(s.next_set(199_999), Some(199_999));
        assert_eq!(s.next_set(200_000), None);
        let mut t = Summary::new(300_000);
        t.set(250_000);
        s.or_assign(&t);
        assert_eq!(s.next_set(200_000), Some(250_000));
        s.set_leaf_word(250_000 / 64, 0);
        s.refresh_up(250_000 / 64, 250_000 / 64);
        assert_eq!(s.next_set(200_000), None);
        s.clear_range(0, 199_999);
        assert_eq!(s.next_set(0), Some(199_999));
        s.clear_range(199_999, 200_000);
        assert_eq!(s.next_set(0), None);
        assert_eq!(bits_next_clear(&[u64::MAX, 0b1011], 0, 128), Some(66));
        assert_eq!(bits_next_clear(&[u64::MAX, 0b1011], 0, 66), None);
    }
}
