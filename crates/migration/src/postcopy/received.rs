//! The received-pages map: one bit per target page of a RAM block, set once the page's
//! contents are in place on the destination (QEMU's `receivedmap`).
//!
//! Postcopy uses it three ways: a page that arrives on both channels (requested on the preempt
//! channel, pushed in the background on the main one) is placed once; a fault on a page that
//! was placed meanwhile is only woken, not requested; and after a cut link the source rebuilds
//! what it still has to send from it (the RECV_BITMAP dump, `stream-format.md` §5.5).
//!
//! The map is shared by the threads that place pages and the fault thread, so each word is an
//! `AtomicU64`: setting is a `fetch_or`, testing a `load`, no lock.

use super::PostcopyError;
use std::sync::atomic::{AtomicU64, Ordering};

/// The received pages of one RAM block.
#[derive(Debug)]
pub struct ReceivedMap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

fn word_bit(page: u64) -> (usize, u64) {
    ((page / 64) as usize, 1u64 << (page % 64))
}

/// Mask of bits `[lo, hi)` of one word (`hi` ≤ 64).
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl ReceivedMap {
    /// An empty map for `pages` pages.
    pub fn new(pages: u64) -> Self {
        ReceivedMap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages the map covers.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Whether `page` has been received. Pages outside the map read as not received.
    pub fn test(&self, page: u64) -> bool {
        if page >= self.pages {
            return false;
        }
        let (w, b) = word_bit(page);
        self.words
            .get(w)
            .is_some_and(|x| x.load(Ordering::Acquire) & b != 0)
    }

    /// Marks `page` received; returns whether it already was. Out-of-range pages are ignored
    /// (and reported as already received, so nobody acts on them).
    pub fn set(&self, page: u64) -> bool {
        if page >= self.pages {
            return true;
        }
        let (w, b) = word_bit(page);
        self.words
            .get(w)
            .is_none_or(|x| x.fetch_or(b, Ordering::AcqRel) & b != 0)
    }

    fn update_range(&self, first: u64, count: u64, set: bool) {
        let end = first.saturating_add(count).min(self.pages);
        let mut p = first;
        while p < end {
            let lo = p % 64;
            let hi = (lo + (end - p)).min(64);
            let m = mask(lo, hi);
            if let Some(w) = self.words.get((p / 64) as usize) {
                if set {
                    w.fetch_or(m, Ordering::AcqRel);
                } else {
                    w.fetch_and(!m, Ordering::AcqRel);
                }
            }
            p += hi - lo;
        }
    }

    /// Marks `[first, first+count)` received, a word at a time.
    pub fn set_range(&self, first: u64, count: u64) {
        self.update_range(first, count, true);
    }

    /// Marks `[first, first+count)` not received (a discard), a word at a time.
    pub fn clear_range(&self, first: u64, count: u64) {
        self.update_range(first, count, false);
    }

    /// Forgets every page (ADVISE discards all of RAM).
    pub fn clear(&self) {
        for w in self.words.iter() {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of pages received.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The map as QEMU sends it after RECV_BITMAP: `ceil(pages / 8)` bytes rounded up to a
    /// multiple of 8, as little-endian 64-bit words; bits past the last page are zero.
    pub fn to_le_dump(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(dump_len(self.pages) as usize);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::Acquire).to_le_bytes());
        }
        out.truncate(dump_len(self.pages) as usize);
        out
    }
}

/// Length in bytes of the received-map dump of a block of `pages` pages.
pub fn dump_len(pages: u64) -> u64 {
    pages.div_ceil(8).next_multiple_of(8)
}

/// The source's side of recovery (`ram_dirty_bitmap_reload`): the destination's received map
/// of block `block` (`pages` pages) becomes the pages still to send, one bit per page, bit `n`
/// of word `n / 64` — everything the destination does not have. Bits past the last page are
/// clear.
pub fn dirty_from_dump(block: &str, pages: u64, dump: &[u8]) -> Result<Vec<u64>, PostcopyError> {
    let want = dump_len(pages);
    if dump.len() as u64 != want {
        return Err(PostcopyError::BadDump(format!(
            "ram_dirty_bitmap_reload: ramblock '{block}' bitmap size mismatch ({:#x} != {want:#x})",
            dump.len()
        )));
    }
    let mut words: Vec<u64> = dump
        .chunks(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            !u64::from_le_bytes(b)
        })
        .collect();
    words.truncate(pages.div_ceil(64) as usize);
    if !pages.is_multiple_of(64) {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << (pages % 64)) - 1;
        }
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_test_and_ranges() {
        let m = ReceivedMap::new(200);
        assert!(!m.set(3));
        assert!(m.set(3), "second set reports it was there");
        assert!(m.test(3) && !m.test(4));
        m.set_range(60, 70);
        assert_eq!(m.count(), 71);
        assert!(m.test(60) && m.test(129) && !m.test(130) && !m.test(59));
        m.clear_range(64, 64);
        assert!(m.test(63) && !m.test(64) && !m.test(127) && m.test(128));
        assert_eq!(m.count(), 1 + 4 + 2);
        // Out of range: never received, never settable, ranges clipped.
        assert!(!m.test(200) && m.set(200));
        m.set_range(190, 1000);
        assert_eq!(m.count(), 7 + 10);
        m.clear();
        assert_eq!(m.count(), 0);
    }

    #[test]
    fn dump_is_qemus_layout() {
        // 70 pages: ceil(70/8) = 9 bytes, rounded up to 16.
        let m = ReceivedMap::new(70);
        m.set(0);
        m.set(9);
        m.set(69);
        let d = m.to_le_dump();
        assert_eq!(d.len(), 16);
        assert_eq!(dump_len(70), 16);
        assert_eq!(d[0], 0x01);
        assert_eq!(d[1], 0x02);
        assert_eq!(
            d[8], 0x20,
            "page 69 is bit 5 of the second word's first byte"
        );
        assert!(d[9..].iter().all(|b| *b == 0));
        // 64 pages: exactly one word.
        assert_eq!(ReceivedMap::new(64).to_le_dump().len(), 8);
        assert_eq!(dump_len(1), 8);
    }

    #[test]
    fn dump_inverts_into_what_is_left_to_send() {
        let m = ReceivedMap::new(70);
        m.set_range(0, 65);
        let dirty = dirty_from_dump("ram", 70, &m.to_le_dump()).unwrap();
        assert_eq!(dirty, vec![0, 0b11_1110]);
        let e = dirty_from_dump("ram", 70, &[0; 8]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ram_dirty_bitmap_reload: ramblock 'ram' bitmap size mismatch (0x8 != 0x10)"
        );
    }
}
