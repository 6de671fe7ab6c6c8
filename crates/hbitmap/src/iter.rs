//! Iteration over set bits (`hbitmap_iter_init` / `hbitmap_iter_next`).
//!
//! The iterator holds the current bottom-level word and finds the next non-zero word through the
//! summary levels, so a walk costs O(set bits + non-zero words), not O(size). It borrows the
//! bitmap, so the bitmap cannot change under it (QEMU's iterator has to cope with concurrent
//! resets; here the borrow checker rules them out).

use crate::HBitmap;

/// Iterator over the item offsets (`bit << granularity`) of set bits, ascending.
///
/// Results are group-aligned: an iterator started inside a dirty group yields that group's start,
/// which is below the `first` it was started at.
pub struct Iter<'a> {
    hb: &'a HBitmap,
    /// Index of the word `cur` came from.
    word: u64,
    /// Bits of that word not yet returned.
    cur: u64,
    /// No set bit is left past `word`.
    done: bool,
}

impl<'a> Iter<'a> {
    /// Starts at bottom-level bit `bit` (`bit < size`).
    pub(crate) fn new(hb: &'a HBitmap, bit: u64) -> Self {
        let word = bit / 64;
        let cur = hb.word(word) & (u64::MAX << (bit % 64));
        Iter {
            hb,
            word,
            cur,
            done: false,
        }
    }
}

impl Iterator for Iter<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        loop {
            if self.cur != 0 {
                let bit = self.word * 64 + u64::from(self.cur.trailing_zeros());
                self.cur &= self.cur - 1;
                return Some(bit << self.hb.granularity);
            }
            if self.done {
                return None;
            }
            match self.hb.next_set_bit((self.word + 1) * 64) {
                Some(bit) => {
                    self.word = bit / 64;
                    self.cur = self.hb.word(self.word);
                }
                None => {
                    self.done = true;
                    return None;
                }
            }
        }
    }
}

impl std::iter::FusedIterator for Iter<'_> {}

impl std::fmt::Debug for Iter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iter")
            .field("word", &self.word)
            .field("cur", &self.cur)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}
