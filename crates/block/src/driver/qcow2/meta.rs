//! The metadata of an open qcow2 image: the L1 table, cached L2 tables, the refcount table and
//! cached refcount blocks, cluster allocation and freeing, and the order in which changed
//! metadata goes back to the file.
//!
//! # Consistency
//!
//! Guest data is written to its cluster at once. Metadata changes stay in memory until
//! [`Meta::write_out`], which writes them in dependency order with a flush of the file between
//! steps: data and new refcounts first, then the refcount table and L2 tables that point to
//! them, then the L1 table, and only then the refcount decrements of clusters that lost their
//! last reference (their L2 or L1 entries are gone on disk by then). A crash at any point leaves
//! an image whose every reference has a refcount — at worst some clusters leak, which
//! `qemu-img check -r leaks` repairs; never a cluster in use with refcount 0.
//!
//! Changes that move a table (the refcount table growing, the L1 table growing, the bitmap
//! directory) write the new copy, flush, switch the header, flush, and free the old copy.
//!
//! # Allocation
//!
//! A free cluster has refcount 0 (a cluster whose refcount block does not exist yet has refcount
//! 0 too). Allocation scans from `free_hint`. A missing refcount block is placed in a free
//! cluster at or above `floor` (above any run being allocated); when it falls into its own
//! range it counts itself, otherwise its own refcount is set first (which may create another
//! block, further up). A refcount table too small for a block is replaced by a bigger one
//! placed past the end of the image together with the blocks it needs, which count themselves
//! and the table.

use super::header::Header;
use crate::error::BlockError;
use crate::node::BlockNode;
use nix::errno::Errno;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

/// Hashes the u64 offsets that key the table caches with one multiplication (they are trusted
/// keys derived from the image's own tables, so no flooding resistance is needed).
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v >> 9).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type OffsetMap<V> = HashMap<u64, V, BuildHasherDefault<OffsetHasher>>;

/// Offset bits of L1 and L2 entries.
pub const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of refcount table entries.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// `QCOW_OFLAG_COPIED`: the cluster's refcount is exactly 1.
pub const OFLAG_COPIED: u64 = 1 << 63;
/// `QCOW_OFLAG_COMPRESSED`.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// `QCOW_OFLAG_ZERO` (version 3): the cluster reads as zeroes.
pub const OFLAG_ZERO: u64 = 1;

/// Bytes of cached tables beyond which metadata is written out and clean tables dropped
/// (QEMU's default L2 cache is at most 32 MiB).
const CACHE_BYTES: u64 = 32 << 20;

fn corrupt(what: String) -> BlockError {
    // QEMU marks the image corrupt and fails the request with EIO; this layer fails it without
    // touching the image (the message goes to stderr like QEMU's).
    log::error!("qcow2: Image is corrupt: {what}");
    BlockError::Io(Errno::EIO)
}

struct Table {
    entries: Vec<u64>,
    dirty: bool,
}

struct RefBlock {
    bytes: Vec<u8>,
    dirty: bool,
}

/// What an L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// No L2 entry: the backing file (or zeroes).
    Unallocated,
    /// Reads as zeroes (`QCOW_OFLAG_ZERO`), with or without a preallocated host cluster.
    Zero,
    /// Data at this host offset.
    Data(u64),
    /// Compressed data (not readable by this crate).
    Compressed,
}

/// The metadata of one open image. All methods run under the driver's lock.
pub struct Meta {
    /// The image file.
    pub file: Arc<BlockNode>,
    /// The header as on disk (after the last header write).
    pub hdr: Header,
    /// Cluster size.
    pub cs: u64,
    /// `log2(cs)`.
    pub cbits: u32,
    l1: Vec<u64>,
    l1_dirty: bool,
    l2: OffsetMap<Table>,
    reftable: Vec<u64>,
    reftable_dirty: bool,
    refblocks: OffsetMap<RefBlock>,
    /// Host clusters to decrement once the metadata that referenced them is on disk.
    pending_free: Vec<u64>,
    free_hint: u64,
    floor: u64,
}

impl Meta {
    /// Loads the L1 and refcount tables of an image whose header was parsed and checked.
    pub fn load(file: Arc<BlockNode>, hdr: Header) -> Result<Meta, BlockError> {
        let cs = hdr.cluster_size();
        let cbits = hdr.cluster_bits;
        let l1 = read_u64s(&file, hdr.l1_table_offset, u64::from(hdr.l1_size))?;
        let rt_entries = u64::from(hdr.refcount_table_clusters) * cs / 8;
        let reftable = read_u64s(&file, hdr.refcount_table_offset, rt_entries)?;
        Ok(Meta {
            file,
            hdr,
            cs,
            cbits,
            l1,
            l1_dirty: false,
            l2: OffsetMap::default(),
            reftable,
            reftable_dirty: false,
            refblocks: OffsetMap::default(),
            pending_free: Vec::new(),
            free_hint: 0,
            floor: 0,
        })
    }

    /// Whether anything is waiting to be written.
    pub fn is_dirty(&self) -> bool {
        self.l1_dirty
            || self.reftable_dirty
            || !self.pending_free.is_empty()
            || self.l2.values().any(|t| t.dirty)
            || self.refblocks.values().any(|b| b.dirty)
    }

    fn l2_entries(&self) -> u64 {
        self.cs / 8
    }

    fn refcount_bits(&self) -> u32 {
        1 << self.hdr.refcount_order
    }

    /// Clusters one refcount block covers.
    fn per_block(&self) -> u64 {
        self.cs * 8 / u64::from(self.refcount_bits())
    }

    fn max_refcount(&self) -> u64 {
        match self.refcount_bits() {
            64 => u64::MAX,
            b => (1u64 << b) - 1,
        }
    }

    // ---- refcounts ---------------------------------------------------------------------------

    fn refblock(&mut self, off: u64) -> Result<&mut RefBlock, BlockError> {
        if !self.refblocks.contains_key(&off) {
            if off & (self.cs - 1) != 0 {
                return Err(corrupt(format!("refblock offset {off:#x} unaligned")));
            }
            let mut bytes = vec![0u8; self.cs as usize];
            self.file.child_read_at(off, &mut bytes)?;
            self.refblocks.insert(
                off,
                RefBlock {
                    bytes,
                    dirty: false,
                },
            );
        }
        self.refblocks
            .get_mut(&off)
            .ok_or(BlockError::Io(Errno::EIO))
    }

    fn get_entry(&self, bytes: &[u8], i: u64) -> u64 {
        let bits = self.refcount_bits();
        match bits {
            1 | 2 | 4 => {
                let per_byte = 8 / u64::from(bits);
                let byte = bytes.get((i / per_byte) as usize).copied().unwrap_or(0);
                let shift = (i % per_byte) as u32 * bits;
                u64::from(byte >> shift) & ((1 << bits) - 1)
            }
            _ => {
                let n = (bits / 8) as usize;
                let start = i as usize * n;
                bytes
                    .get(start..start + n)
                    .map(|s| s.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b)))
                    .unwrap_or(0)
            }
        }
    }

    fn put_entry(bits: u32, bytes: &mut [u8], i: u64, v: u64) {
        match bits {
            1 | 2 | 4 => {
                let per_byte = 8 / u64::from(bits);
                let shift = (i % per_byte) as u32 * bits;
                let mask = (((1u16 << bits) - 1) << shift) as u8;
                if let Some(b) = bytes.get_mut((i / per_byte) as usize) {
                    *b = (*b & !mask) | (((v as u8) << shift) & mask);
                }
            }
            _ => {
                let n = (bits / 8) as usize;
                let start = i as usize * n;
                if let Some(s) = bytes.get_mut(start..start + n) {
                    let be = v.to_be_bytes();
                    if let Some(src) = be.get(8 - n..) {
                        s.copy_from_slice(src);
                    }
                }
            }
        }
    }

    /// The refcount of host cluster `idx`.
    pub fn refcount(&mut self, idx: u64) -> Result<u64, BlockError> {
        let per = self.per_block();
        let bi = idx / per;
        let Some(&e) = self.reftable.get(bi as usize) else {
            return Ok(0);
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let b = self.refblock(off)?;
        let bytes = std::mem::take(&mut b.bytes);
        let v = self.get_entry(&bytes, idx % per);
        if let Some(b) = self.refblocks.get_mut(&off) {
            b.bytes = bytes;
        }
        Ok(v)
    }

    /// Sets the refcount of host cluster `idx`, creating its refcount block if needed.
    pub fn set_refcount(&mut self, idx: u64, v: u64) -> Result<(), BlockError> {
        if v > self.max_refcount() {
            return Err(BlockError::Io(Errno::ERANGE));
        }
        let per = self.per_block();
        let off = self.ensure_refblock(idx / per)?;
        let bits = self.refcount_bits();
        let b = self.refblock(off)?;
        Self::put_entry(bits, &mut b.bytes, idx % per, v);
        b.dirty = true;
        if v == 0 && idx < self.free_hint {
            self.free_hint = idx;
        }
        Ok(())
    }

    /// First cluster at or above `from` with refcount 0 (a refcount block at a time).
    fn first_free(&mut self, from: u64) -> Result<u64, BlockError> {
        let per = self.per_block();
        let mut i = from;
        loop {
            let bi = i / per;
            let off = self.reftable.get(bi as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
            if off == 0 {
                return Ok(i);
            }
            let b = self.refblock(off)?;
            let bytes = std::mem::take(&mut b.bytes);
            let found = (i % per..per).find(|j| self.get_entry(&bytes, *j) == 0);
            if let Some(b) = self.refblocks.get_mut(&off) {
                b.bytes = bytes;
            }
            if let Some(j) = found {
                return Ok(bi * per + j);
            }
            i = (bi + 1) * per;
        }
    }

    /// The host offset of refcount block `bi`, creating it (and growing the refcount table) if
    /// it does not exist.
    fn ensure_refblock(&mut self, bi: u64) -> Result<u64, BlockError> {
        if bi >= self.reftable.len() as u64 {
            self.grow_reftable(bi + 1)?;
        }
        let existing = self.reftable.get(bi as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
        if existing != 0 {
            return Ok(existing);
        }
        let per = self.per_block();
        let cand = self.first_free(self.floor.max(self.free_hint))?;
        let off = cand * self.cs;
        let mut bytes = vec![0u8; self.cs as usize];
        if cand / per == bi {
            // The new block counts itself.
            Self::put_entry(self.refcount_bits(), &mut bytes, cand % per, 1);
        } else {
            // Its own refcount lives in another block; reserve it before creating that one.
            let saved = self.floor;
            self.floor = self.floor.max(cand + 1);
            let r = self.set_refcount(cand, 1);
            self.floor = saved;
            r?;
            // Setting that refcount may itself have created block `bi`.
            let now = self.reftable.get(bi as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
            if now != 0 {
                self.set_refcount(cand, 0)?;
                return Ok(now);
            }
        }
        self.refblocks.insert(off, RefBlock { bytes, dirty: true });
        if let Some(e) = self.reftable.get_mut(bi as usize) {
            *e = off;
        }
        self.reftable_dirty = true;
        Ok(off)
    }

    /// Replaces the refcount table with one of at least `min_entries` entries, placed past the
    /// end of the image with the refcount blocks it needs.
    fn grow_reftable(&mut self, min_entries: u64) -> Result<(), BlockError> {
        self.write_out()?;
        let cs = self.cs;
        let per = self.per_block();
        let end = self.file.size()?.div_ceil(cs);
        let start = self.first_free(end.max(self.floor))?;
        let mut entries = (min_entries.max(self.reftable.len() as u64) * 3 / 2)
            .max(min_entries)
            .next_multiple_of(cs / 8);
        let mut nblocks = 0u64;
        let table_clusters = loop {
            let tc = (entries * 8).div_ceil(cs);
            let area_end = start + nblocks + tc;
            let first_bi = start / per;
            let last_bi = (area_end - 1) / per;
            if last_bi >= entries {
                entries = (last_bi + 1).next_multiple_of(cs / 8);
                continue;
            }
            let missing = (first_bi..=last_bi)
                .filter(|bi| {
                    self.reftable.get(*bi as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK == 0
                })
                .count() as u64;
            if missing == nblocks {
                break tc;
            }
            nblocks = missing;
        };
        if table_clusters * cs > super::header::MAX_REFTABLE_SIZE {
            return Err(BlockError::Io(Errno::EFBIG));
        }
        let mut table = self.reftable.clone();
        table.resize(entries as usize, 0);
        // New blocks first, at [start, start + nblocks).
        let mut next = start;
        let last_bi = (start + nblocks + table_clusters - 1) / per;
        for bi in start / per..=last_bi {
            let slot = table
                .get_mut(bi as usize)
                .ok_or(BlockError::Io(Errno::EIO))?;
            if *slot & REFT_OFFSET_MASK == 0 {
                *slot = next * cs;
                self.refblocks.insert(
                    next * cs,
                    RefBlock {
                        bytes: vec![0u8; cs as usize],
                        dirty: true,
                    },
                );
                next += 1;
            }
        }
        let old_offset = self.hdr.refcount_table_offset;
        let old_clusters = u64::from(self.hdr.refcount_table_clusters);
        let table_offset = next * cs;
        self.reftable = table;
        for c in start..start + nblocks + table_clusters {
            self.set_refcount(c, 1)?;
        }
        self.write_refblocks()?;
        self.file.flush()?;
        self.write_u64s(table_offset, &self.reftable.clone(), table_clusters * cs)?;
        self.file.flush()?;
        self.hdr.refcount_table_offset = table_offset;
        self.hdr.refcount_table_clusters =
            u32::try_from(table_clusters).map_err(|_| BlockError::Io(Errno::EFBIG))?;
        self.write_header()?;
        self.reftable_dirty = false;
        for c in 0..old_clusters {
            self.decref(old_offset / cs + c)?;
        }
        self.write_refblocks()?;
        self.file.flush()
    }

    /// Allocates `n` contiguous free clusters (refcount 1 each) and returns the first's offset.
    pub fn alloc_clusters(&mut self, n: u64) -> Result<u64, BlockError> {
        let n = n.max(1);
        // Every cluster below the first free one is in use: the hint moves up to it.
        self.free_hint = self.first_free(self.free_hint)?;
        let mut start = self.free_hint;
        let mut i = start + 1;
        while i < start + n {
            if self.refcount(i)? == 0 {
                i += 1;
            } else {
                start = self.first_free(i + 1)?;
                i = start + 1;
            }
        }
        if start
            .checked_mul(self.cs)
            .is_none_or(|o| o > ENTRY_OFFSET_MASK)
        {
            return Err(BlockError::Io(Errno::EFBIG));
        }
        let saved = self.floor;
        self.floor = self.floor.max(start + n);
        let mut r = Ok(());
        for c in start..start + n {
            r = self.set_refcount(c, 1);
            if r.is_err() {
                break;
            }
        }
        self.floor = saved;
        r?;
        if start == self.free_hint {
            self.free_hint = start + n;
        }
        Ok(start * self.cs)
    }

    fn decref(&mut self, idx: u64) -> Result<(), BlockError> {
        let v = self.refcount(idx)?;
        if v == 0 {
            return Err(corrupt(format!(
                "freeing cluster {:#x} with refcount 0",
                idx * self.cs
            )));
        }
        self.set_refcount(idx, v - 1)
    }

    /// Queues the clusters of `[off, off + bytes)` for a refcount decrement once the metadata
    /// that no longer references them is on disk.
    pub fn free_later(&mut self, off: u64, bytes: u64) {
        let first = off / self.cs;
        let last = (off + bytes.max(1) - 1) / self.cs;
        for c in first..=last {
            self.pending_free.push(c * self.cs);
        }
    }

    /// Decrements the refcounts of `[off, off + bytes)` now (for structures the header no
    /// longer points to, after the header switch is on disk).
    pub fn free_now(&mut self, off: u64, bytes: u64) -> Result<(), BlockError> {
        let first = off / self.cs;
        let last = (off + bytes.max(1) - 1) / self.cs;
        for c in first..=last {
            self.decref(c)?;
        }
        Ok(())
    }

    // ---- L1 / L2 -----------------------------------------------------------------------------

    fn l2_table(&mut self, off: u64) -> Result<&mut Table, BlockError> {
        if !self.l2.contains_key(&off) {
            if off & (self.cs - 1) != 0 {
                return Err(corrupt(format!("L2 table offset {off:#x} unaligned")));
            }
            let entries = read_u64s(&self.file, off, self.l2_entries())?;
            self.l2.insert(
                off,
                Table {
                    entries,
                    dirty: false,
                },
            );
        }
        self.l2.get_mut(&off).ok_or(BlockError::Io(Errno::EIO))
    }

    fn split(&self, guest: u64) -> (usize, usize) {
        let cluster = guest >> self.cbits;
        let per = self.l2_entries();
        ((cluster / per) as usize, (cluster % per) as usize)
    }

    /// The raw L2 entry for the guest cluster holding `guest` (0 when there is no L2 table).
    pub fn l2_entry(&mut self, guest: u64) -> Result<u64, BlockError> {
        let (l1i, l2i) = self.split(guest);
        let l1e = self.l1.get(l1i).copied().unwrap_or(0);
        let off = l1e & ENTRY_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let t = self.l2_table(off)?;
        Ok(t.entries.get(l2i).copied().unwrap_or(0))
    }

    /// Decodes an L2 entry.
    pub fn mapping(&self, e: u64) -> Result<Mapping, BlockError> {
        if e & OFLAG_COMPRESSED != 0 {
            return Ok(Mapping::Compressed);
        }
        if e & OFLAG_ZERO != 0 && self.hdr.version >= 3 {
            return Ok(Mapping::Zero);
        }
        let off = e & ENTRY_OFFSET_MASK;
        if off == 0 {
            return Ok(Mapping::Unallocated);
        }
        if off & (self.cs - 1) != 0 {
            return Err(corrupt(format!("data cluster offset {off:#x} unaligned")));
        }
        Ok(Mapping::Data(off))
    }

    /// The host byte range a compressed L2 entry covers.
    fn compressed_range(&self, e: u64) -> (u64, u64) {
        let shift = 62 - (self.cbits - 8);
        let off = e & ((1u64 << shift) - 1);
        let sectors = ((e >> shift) & ((1u64 << (self.cbits - 8)) - 1)) + 1;
        (off, sectors * 512 - (off & 511))
    }

    /// Frees (later) whatever host storage an L2 entry holds.
    pub fn free_entry_later(&mut self, e: u64) {
        if e & OFLAG_COMPRESSED != 0 {
            let (off, len) = self.compressed_range(e);
            self.free_later(off, len);
        } else if e & ENTRY_OFFSET_MASK != 0 {
            self.free_later(e & ENTRY_OFFSET_MASK, self.cs);
        }
    }

    /// The L2 table for `guest`, made private to the active layer (refcount 1), allocating or
    /// copying it if needed. Returns the table's offset and the entry index.
    pub fn l2_for_write(&mut self, guest: u64) -> Result<(u64, usize), BlockError> {
        let (l1i, l2i) = self.split(guest);
        let l1e = *self.l1.get(l1i).ok_or(BlockError::Io(Errno::EINVAL))?;
        let old = l1e & ENTRY_OFFSET_MASK;
        if old != 0 && l1e & OFLAG_COPIED != 0 {
            return Ok((old, l2i));
        }
        let entries = if old == 0 {
            vec![0u64; self.l2_entries() as usize]
        } else {
            self.l2_table(old)?.entries.clone()
        };
        let new = self.alloc_clusters(1)?;
        self.l2.insert(
            new,
            Table {
                entries,
                dirty: true,
            },
        );
        if let Some(e) = self.l1.get_mut(l1i) {
            *e = new | OFLAG_COPIED;
        }
        self.l1_dirty = true;
        if old != 0 {
            self.free_later(old, self.cs);
        }
        Ok((new, l2i))
    }

    /// Sets an entry of a private L2 table.
    pub fn set_l2(&mut self, table: u64, i: usize, v: u64) -> Result<(), BlockError> {
        let t = self.l2_table(table)?;
        let slot = t.entries.get_mut(i).ok_or(BlockError::Io(Errno::EINVAL))?;
        *slot = v;
        t.dirty = true;
        Ok(())
    }

    /// Whether the L1 entry for `guest` exists (there is an L2 table).
    pub fn has_l2(&self, guest: u64) -> bool {
        let (l1i, _) = self.split(guest);
        self.l1.get(l1i).is_some_and(|e| e & ENTRY_OFFSET_MASK != 0)
    }

    /// Grows the L1 table to cover `new_size` bytes and sets the virtual size (the caller has
    /// checked it only grows).
    pub fn grow(&mut self, new_size: u64) -> Result<(), BlockError> {
        let per = self.l2_entries();
        let needed = new_size.div_ceil(self.cs).div_ceil(per);
        if needed > super::header::MAX_L1_SIZE / 8 {
            return Err(BlockError::Io(Errno::EFBIG));
        }
        self.write_out()?;
        if needed > self.l1.len() as u64 {
            let old_off = self.hdr.l1_table_offset;
            let old_bytes = self.l1.len() as u64 * 8;
            let mut l1 = self.l1.clone();
            l1.resize(needed as usize, 0);
            let bytes = (needed * 8).next_multiple_of(self.cs);
            let off = self.alloc_clusters(bytes / self.cs)?;
            self.write_refblocks()?;
            self.write_reftable()?;
            self.file.flush()?;
            self.write_u64s(off, &l1, bytes)?;
            self.file.flush()?;
            self.hdr.l1_table_offset = off;
            self.hdr.l1_size = needed as u32;
            self.hdr.size = new_size;
            self.write_header()?;
            self.l1 = l1;
            if old_off != 0 && old_bytes > 0 {
                self.free_now(old_off, old_bytes)?;
            }
            self.write_refblocks()?;
            self.file.flush()?;
        } else {
            self.hdr.size = new_size;
            self.write_header()?;
        }
        Ok(())
    }

    // ---- writing back ----------------------------------------------------------------------

    fn write_u64s(&self, off: u64, v: &[u64], pad_to: u64) -> Result<(), BlockError> {
        let mut buf = Vec::with_capacity(pad_to.max(v.len() as u64 * 8) as usize);
        for e in v {
            buf.extend_from_slice(&e.to_be_bytes());
        }
        buf.resize(buf.len().max(pad_to as usize), 0);
        self.file.child_write_at(off, &buf)
    }

    fn write_refblocks(&mut self) -> Result<bool, BlockError> {
        let mut any = false;
        let mut dirty: Vec<u64> = self
            .refblocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(o, _)| *o)
            .collect();
        dirty.sort_unstable();
        for off in dirty {
            if let Some(b) = self.refblocks.get_mut(&off) {
                self.file.child_write_at(off, &b.bytes)?;
                b.dirty = false;
                any = true;
            }
        }
        Ok(any)
    }

    fn write_reftable(&mut self) -> Result<bool, BlockError> {
        if !self.reftable_dirty {
            return Ok(false);
        }
        let bytes = u64::from(self.hdr.refcount_table_clusters) * self.cs;
        let n = (bytes / 8).min(self.reftable.len() as u64) as usize;
        let entries = self.reftable.get(..n).unwrap_or_default().to_vec();
        self.write_u64s(self.hdr.refcount_table_offset, &entries, bytes)?;
        self.reftable_dirty = false;
        Ok(true)
    }

    /// Writes cluster 0 from `hdr`.
    pub fn write_header(&mut self) -> Result<(), BlockError> {
        let buf = self.hdr.serialize()?;
        self.file.child_write_at(0, &buf)
    }

    /// Writes every changed table back in dependency order (see the module documentation),
    /// then applies the queued refcount decrements, with a flush of the file between steps.
    pub fn write_out(&mut self) -> Result<(), BlockError> {
        if !self.is_dirty() {
            return Ok(());
        }
        if self.write_refblocks()? {
            self.file.flush()?;
        }
        let mut wrote = self.write_reftable()?;
        let mut dirty: Vec<u64> = self
            .l2
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(o, _)| *o)
            .collect();
        dirty.sort_unstable();
        for off in dirty {
            if let Some(t) = self.l2.get(&off) {
                let entries = t.entries.clone();
                self.write_u64s(off, &entries, self.cs)?;
            }
            if let Some(t) = self.l2.get_mut(&off) {
                t.dirty = false;
            }
            wrote = true;
        }
        if wrote {
            self.file.flush()?;
        }
        if self.l1_dirty {
            let l1 = self.l1.clone();
            self.write_u64s(self.hdr.l1_table_offset, &l1, 0)?;
            self.l1_dirty = false;
            self.file.flush()?;
        }
        if !self.pending_free.is_empty() {
            let frees = std::mem::take(&mut self.pending_free);
            for off in frees {
                self.decref(off / self.cs)?;
            }
            // A decrement never needs a new refcount block or table.
            self.write_refblocks()?;
            self.file.flush()?;
        }
        Ok(())
    }

    /// Drops clean cached tables when the caches grew past their limit (writing out first).
    pub fn trim_caches(&mut self) -> Result<(), BlockError> {
        if (self.l2.len() + self.refblocks.len()) as u64 * self.cs <= CACHE_BYTES {
            return Ok(());
        }
        self.write_out()?;
        self.l2.retain(|_, t| t.dirty);
        self.refblocks.retain(|_, b| b.dirty);
        Ok(())
    }
}

/// Reads `n` big-endian u64s at `off` (bounded by the callers' header checks).
pub fn read_u64s(file: &BlockNode, off: u64, n: u64) -> Result<Vec<u64>, BlockError> {
    let len = usize::try_from(n.checked_mul(8).ok_or(BlockError::Io(Errno::EFBIG))?)
        .map_err(|_| BlockError::Io(Errno::EFBIG))?;
    let mut buf = vec![0u8; len];
    file.child_read_at(off, &mut buf)?;
    Ok(buf
        .chunks_exact(8)
        .map(|c| c.iter().fold(0u64, |acc, b| acc << 8 | u64::from(*b)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entry_widths() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let mut bytes = vec![0u8; 64];
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let n = 64 * 8 / u64::from(bits);
            for i in 0..n {
                Meta::put_entry(bits, &mut bytes, i, (i * 7 + 1) & max);
            }
            // Reading goes through a Meta-free copy of the decoding rule.
            for i in 0..n {
                let v = match bits {
                    1 | 2 | 4 => {
                        let per = 8 / u64::from(bits);
                        u64::from(bytes[(i / per) as usize] >> ((i % per) as u32 * bits)) & max
                    }
                    _ => {
                        let w = (bits / 8) as usize;
                        bytes[i as usize * w..(i as usize + 1) * w]
                            .iter()
                            .fold(0, |a, b| a << 8 | u64::from(*b))
                    }
                };
                assert_eq!(v, (i * 7 + 1) & max, "order {order} entry {i}");
            }
        }
        // 16-bit refcounts are big-endian; 1-bit ones LSB first (QEMU's get_refcount_ro0).
        let mut b = vec![0u8; 4];
        Meta::put_entry(16, &mut b, 1, 0x0102);
        assert_eq!(b, [0, 0, 1, 2]);
        let mut b = vec![0u8; 1];
        Meta::put_entry(1, &mut b, 3, 1);
        assert_eq!(b, [0x08]);
    }
}
