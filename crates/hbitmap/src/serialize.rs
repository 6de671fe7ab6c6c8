//! Serialization of the bottom level (`hbitmap_serialize_part` and friends) and the debug hash.
//!
//! The byte layout is QEMU's: a chunk is the run of bottom-level 64-bit words holding its bits,
//! each written little-endian, so relative bit `b` is bit `b % 8` of byte `b / 8`. This is also
//! the qcow2 bitmap data layout and the migration `BITS` payload. Chunks must start on a multiple
//! of `64 << G` items and cover a multiple of it, unless they end in the last bit; these are
//! QEMU's assertions, returned here as errors because chunk ranges arrive from the network.
//!
//! Tail bits (past `size` in the last word) are written as zero and masked off when read.

use sha2::{Digest, Sha256};

use crate::chunk::{le8, Chunk, CHUNK_WORDS, CHUNK_WORD_SHIFT};
use crate::summary::{bits_clear, bits_get, bits_set, words_for};
use crate::{HBitmap, HBitmapError, State};

/// The all-set value of chunk-relative word `rel` in a chunk of `cbits` bits.
fn ones_word_in_chunk(rel: u64, cbits: u64) -> u64 {
    let base = rel * 64;
    if base >= cbits {
        0
    } else if cbits - base >= 64 {
        u64::MAX
    } else {
        (1u64 << (cbits - base)) - 1
    }
}

/// Granularity shifts at or above this cannot be serialized (`64 << G` overflows).
const SERIALIZABLE_LIMIT: u32 = 58;

impl HBitmap {
    /// `hbitmap_is_serializable`: `G < 58`, so that [`HBitmap::serialization_align`] fits a u64.
    pub fn is_serializable(&self) -> bool {
        self.granularity < SERIALIZABLE_LIMIT
    }

    /// `64 << G` items: the unit serialization chunks are aligned to.
    ///
    /// For a bitmap that is not serializable (`G >= 58`) the value saturates at `u64::MAX`; every
    /// serialization call on such a bitmap returns [`HBitmapError::NotSerializable`].
    pub fn serialization_align(&self) -> u64 {
        if self.is_serializable() {
            64u64 << self.granularity
        } else {
            u64::MAX
        }
    }

    /// Validates a non-empty chunk; returns its first and last bottom-level word.
    fn chunk_words(&self, start: u64, count: u64) -> Result<(u64, u64), HBitmapError> {
        if !self.is_serializable() {
            return Err(HBitmapError::NotSerializable {
                granularity: self.granularity,
            });
        }
        let align = self.serialization_align();
        let end = start
            .checked_add(count)
            .ok_or(HBitmapError::RangeOverflow { start, count })?;
        if start & (align - 1) != 0 {
            return Err(HBitmapError::UnalignedChunkStart { start, align });
        }
        let last_bit = (end - 1) >> self.granularity;
        if last_bit >= self.size {
            return Err(HBitmapError::RangeOutOfBounds {
                start,
                count,
                last_bit,
                size: self.size,
                orig_size: self.orig_size,
                granularity: self.granularity,
            });
        }
        if last_bit != self.size - 1 && count & (align - 1) != 0 {
            return Err(HBitmapError::UnalignedChunkCount {
                start,
                count,
                align,
                last_bit,
                last: self.size - 1,
            });
        }
        Ok(((start >> self.granularity) / 64, last_bit / 64))
    }

    /// Bytes `serialize_part` writes for the chunk: 8 per bottom-level word it touches (0 when
    /// `count == 0`).
    ///
    /// Errors: the chunk breaks QEMU's alignment or bounds rules (see the module doc).
    pub fn serialization_size(&self, start: u64, count: u64) -> Result<u64, HBitmapError> {
        if count == 0 {
            return Ok(0);
        }
        let (first, last) = self.chunk_words(start, count)?;
        Ok((last - first + 1) * 8)
    }

    /// Validates a chunk and a buffer for it; returns the word range and byte length.
    fn chunk_for_buf(
        &self,
        buf_len: usize,
        start: u64,
        count: u64,
    ) -> Result<(u64, u64, usize), HBitmapError> {
        let (first, last) = self.chunk_words(start, count)?;
        let needed = (last - first + 1) * 8;
        if (buf_len as u64) < needed {
            return Err(HBitmapError::BufferTooSmall {
                start,
                count,
                needed,
                len: buf_len,
            });
        }
        Ok((first, last, needed as usize))
    }

    /// Write the chunk's bottom-level words little-endian into the first
    /// `serialization_size(start, count)` bytes of `buf` (the rest is untouched).
    ///
    /// Errors: the chunk breaks QEMU's rules, or `buf` is too short.
    pub fn serialize_part(
        &self,
        buf: &mut [u8],
        start: u64,
        count: u64,
    ) -> Result<(), HBitmapError> {
        if count == 0 {
            return Ok(());
        }
        let (first, last, needed) = self.chunk_for_buf(buf.len(), start, count)?;
        let mut out = buf.get_mut(..needed).unwrap_or_default();
        let mut w = first;
        while w <= last {
            let c = (w >> CHUNK_WORD_SHIFT) as usize;
            let cw = (c as u64) << CHUNK_WORD_SHIFT;
            let stop = (cw + CHUNK_WORDS).min(last + 1);
            let n = ((stop - w) * 8) as usize;
            let Some((dst, rest)) = std::mem::take(&mut out).split_at_mut_checked(n) else {
                break;
            };
            match self.state(c) {
                State::Zero => dst.fill(0),
                State::Ones => {
                    dst.fill(0xff);
                    // The bitmap's last word keeps its tail bits clear.
                    if let Some(tail) = dst.rchunks_exact_mut(8).next() {
                        tail.copy_from_slice(&self.ones_word(stop - 1).to_le_bytes());
                    }
                }
                State::Mixed(m) => {
                    let words = m.words.get((w - cw) as usize..).unwrap_or_default();
                    for (d, s) in dst.chunks_exact_mut(8).zip(words) {
                        d.copy_from_slice(&s.to_le_bytes());
                    }
                }
            }
            out = rest;
            w = stop;
        }
        Ok(())
    }

    /// Inverse of `serialize_part`: replace the chunk's words with the little-endian words at the
    /// start of `buf`. Bits past `size` in the last word are dropped.
    ///
    /// `finish` is accepted for QEMU's call sequence; this bitmap is consistent after every call.
    /// Errors: the chunk breaks QEMU's rules, or `buf` is too short.
    pub fn deserialize_part(
        &mut self,
        buf: &[u8],
        start: u64,
        count: u64,
        finish: bool,
    ) -> Result<(), HBitmapError> {
        if count == 0 {
            return Ok(());
        }
        let (first, last, needed) = self.chunk_for_buf(buf.len(), start, count)?;
        let mut src = buf.get(..needed).unwrap_or_default();
        let mut w = first;
        while w <= last {
            let c = (w >> CHUNK_WORD_SHIFT) as usize;
            let cw = (c as u64) << CHUNK_WORD_SHIFT;
            let stop = (cw + CHUNK_WORDS).min(last + 1);
            let n = ((stop - w) * 8) as usize;
            let Some((piece, rest)) = src.split_at_checked(n) else {
                break;
            };
            self.load_into_chunk(c, (w - cw) as usize, piece);
            src = rest;
            w = stop;
        }
        if finish {
            self.deserialize_finish();
        }
        Ok(())
    }

    /// Loads little-endian words `piece` into chunk `c` from chunk-relative word `lo`.
    fn load_into_chunk(&mut self, c: usize, lo: usize, piece: &[u8]) {
        let cbits = self.chunk_bits(c);
        let nwords = words_for(cbits);
        let before = self.chunk_count(c);
        let full = bits_get(&self.full, c as u64);
        let c64 = c as u64;
        let Some(slot) = self.chunks.get_mut(c) else {
            return;
        };
        if lo == 0 && piece.len() / 8 >= nwords {
            // The whole chunk: decode into fresh (or recycled) words and pick the cheapest state.
            let mut words = match slot.take() {
                Some(old) => old.words,
                None => Vec::new(),
            };
            words.resize(nwords, 0);
            for (d, s) in words.iter_mut().zip(piece.chunks_exact(8)) {
                *d = u64::from_le_bytes(le8(s));
            }
            let ch = Chunk::from_words(words, cbits);
            let ones = ch.ones;
            if ones == cbits {
                bits_set(&mut self.full, c64, c64 + 1);
            } else {
                bits_clear(&mut self.full, c64, c64 + 1);
                if ones > 0 {
                    *slot = Some(Box::new(ch));
                }
            }
            self.nonzero.assign(c64, ones > 0);
            self.set_bits = self.set_bits.saturating_sub(before) + ones;
            return;
        }
        if slot.is_none() {
            if full {
                // Leave an all-set chunk alone if the data keeps it all set.
                let keeps = piece.chunks_exact(8).enumerate().all(|(i, s)| {
                    let all = ones_word_in_chunk((lo + i) as u64, cbits);
                    u64::from_le_bytes(le8(s)) & all == all
                });
                if keeps {
                    return;
                }
                *slot = Some(Box::new(Chunk::filled(cbits)));
                bits_clear(&mut self.full, c64, c64 + 1);
            } else {
                if piece.iter().all(|&b| b == 0) {
                    return;
                }
                *slot = Some(Box::new(Chunk::zeroed(cbits)));
            }
        }
        if let Some(ch) = slot {
            let (added, removed) = ch.write_le(lo, piece);
            self.set_bits = self.set_bits.saturating_sub(removed) + added;
            let nonzero = ch.ones > 0;
            self.nonzero.assign(c64, nonzero);
        }
    }

    /// Clear the chunk's whole words (`hbitmap_deserialize_zeroes`).
    ///
    /// Errors: the chunk breaks QEMU's rules.
    pub fn deserialize_zeroes(
        &mut self,
        start: u64,
        count: u64,
        finish: bool,
    ) -> Result<(), HBitmapError> {
        self.fill_chunk(start, count, finish, false)
    }

    /// Set the chunk's whole words (`hbitmap_deserialize_ones`); bits past `size` stay clear.
    ///
    /// Errors: the chunk breaks QEMU's rules.
    pub fn deserialize_ones(
        &mut self,
        start: u64,
        count: u64,
        finish: bool,
    ) -> Result<(), HBitmapError> {
        self.fill_chunk(start, count, finish, true)
    }

    fn fill_chunk(
        &mut self,
        start: u64,
        count: u64,
        finish: bool,
        on: bool,
    ) -> Result<(), HBitmapError> {
        if count == 0 {
            return Ok(());
        }
        let (first, last) = self.chunk_words(start, count)?;
        let hi = ((last + 1) * 64).min(self.size);
        self.apply_bits(first * 64, hi, on);
        if finish {
            self.deserialize_finish();
        }
        Ok(())
    }

    /// `hbitmap_deserialize_finish`: after a series of `deserialize_*` calls with
    /// `finish == false`, make the summary levels and the count match the bottom level.
    ///
    /// QEMU rebuilds them here; this bitmap keeps them exact on every call, so there is nothing
    /// left to rebuild and the call returns at once.
    pub fn deserialize_finish(&mut self) {}

    /// SHA-256 of the bottom level as little-endian 64-bit words, tail bits masked.
    ///
    /// The hashed data is `max(ceil(size / 64), 1)` words — QEMU's bottom-level allocation — so
    /// the digest equals QEMU's `x-debug-block-dirty-bitmap-sha256` on x86-64 whenever QEMU's
    /// tail bits are clear (they can be set there after `deserialize_ones`).
    pub fn sha256(&self) -> [u8; 32] {
        const BATCH: usize = 512;
        let mut h = Sha256::new();
        let zeros = [0u8; BATCH * 8];
        let mut buf = [0u8; BATCH * 8];
        if self.chunks.is_empty() {
            h.update(0u64.to_le_bytes());
        }
        for c in 0..self.chunks.len() {
            let cw = (c as u64) << CHUNK_WORD_SHIFT;
            let nwords = words_for(self.chunk_bits(c)) as u64;
            match self.state(c) {
                State::Zero => {
                    let mut left = nwords as usize * 8;
                    while left > 0 {
                        let n = left.min(zeros.len());
                        h.update(zeros.get(..n).unwrap_or_default());
                        left -= n;
                    }
                }
                State::Ones => {
                    let mut done = 0u64;
                    while done < nwords {
                        let n = (nwords - done).min(BATCH as u64);
                        for (i, d) in buf.chunks_exact_mut(8).take(n as usize).enumerate() {
                            d.copy_from_slice(&self.ones_word(cw + done + i as u64).to_le_bytes());
                        }
                        h.update(buf.get(..n as usize * 8).unwrap_or_default());
                        done += n;
                    }
                }
                State::Mixed(m) => {
                    for words in m.words.chunks(BATCH) {
                        for (d, s) in buf.chunks_exact_mut(8).zip(words) {
                            d.copy_from_slice(&s.to_le_bytes());
                        }
                        h.update(buf.get(..words.len() * 8).unwrap_or_default());
                    }
                }
            }
        }
        h.finalize().into()
    }

    /// Number of set bits, recomputed from the chunks (for consistency checks in tests).
    #[cfg(test)]
    pub(crate) fn recount(&self) -> u64 {
        (0..self.chunks.len())
            .map(|c| match self.state(c) {
                State::Zero => 0,
                State::Ones => self.chunk_bits(c),
                State::Mixed(m) => crate::chunk::popcount(&m.words),
            })
            .sum()
    }
}
