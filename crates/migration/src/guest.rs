//! The seam between the engine and a VMM's guest memory.
//!
//! A VMM implements [`RamBlock`] for each region of guest RAM that migrates (QEMU's
//! RAMBlocks): a name, the host mapping as a [`GuestRegion`], and a dirty log. The engine
//! sends pages straight from the mapping to the socket with vectored writes and loads them
//! straight from the socket into the mapping; it never copies a page through a buffer of its
//! own.
//!
//! **Ownership.** A [`GuestRegion<'a>`] is a view of a mapping *borrowed* from its owner for
//! `'a`: [`RamBlock::region`] hands out `GuestRegion<'_>` tied to the block, so safe code cannot
//! keep a region after the block (and with it the mapping) is gone. A rust-vmm VMM hands its
//! `vm-memory` mapping over as it is — [`GuestRegion::from_mmap`] borrows an
//! [`MmapRegion`] (what a `GuestRegionMmap` derefs to) without copying, and [`MmapRamBlock`]
//! is a ready-made block over a `GuestRegionMmap<AtomicBitmap>` whose bitmap (marked by every
//! write made through `vm-memory`, e.g. device DMA) is the dirty log. Only a VMM with a mapping
//! of its own needs the `unsafe` [`GuestRegion::from_raw_parts`], whose contract is that the
//! mapping outlives `'a`.
//!
//! This module is the only place in the crate that touches raw guest memory, and it is why the
//! crate is `deny(unsafe_code)` rather than `forbid`: guest RAM is shared with vCPU threads
//! (and KVM) that write it behind Rust's back, so it is reached through raw pointers, volatile
//! reads and the kernel, never through long-lived Rust references. Postcopy (userfaultfd) and
//! other raw uses of the mapping belong here too; [`GuestRegion::host_addr`] gives the address
//! for the kernel interfaces that want one (memslots, `UFFDIO_REGISTER`).
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut, Read};
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{GuestRegionMmap, MmapRegion, VolatileSlice};

/// Target page size: the unit of RAM migration (QEMU's `TARGET_PAGE_SIZE` on x86).
pub const PAGE_SIZE: u64 = 4096;

/// A span of host memory holding guest RAM, borrowed from its owner for `'a`.
///
/// It is `Copy` (a pointer and a length), but every copy carries the same lifetime, so none can
/// outlive the borrow of the owner it came from. Keeping one past its block does not compile:
///
/// ```compile_fail
/// use migration::guest::{GuestRegion, MmapRamBlock, RamBlock};
/// fn keep(block: MmapRamBlock) -> GuestRegion<'static> {
///     block.region() // `block` (and its mapping) is dropped here
/// }
/// ```
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion<'a> {
    ptr: NonNull<u8>,
    len: usize,
    /// Shared, mutable-behind-our-back memory borrowed for `'a`.
    _owner: PhantomData<&'a std::cell::UnsafeCell<[u8]>>,
}

// SAFETY: a GuestRegion is a borrowed view of memory that its owner keeps mapped for 'a (the
// constructors guarantee it), usable from any thread: guest memory is shared with vCPU threads
// by design, and every access through it is a raw/volatile access or a kernel copy.
unsafe impl Send for GuestRegion<'_> {}
// SAFETY: as above; sharing the handle between threads adds no Rust-level aliasing.
unsafe impl Sync for GuestRegion<'_> {}

impl<'a> GuestRegion<'a> {
    /// Borrows a `vm-memory` mapping (a `GuestRegionMmap` derefs to its `MmapRegion`): the
    /// zero-copy hand-over from a rust-vmm VMM. Writes the engine makes through the region are
    /// not marked in the mapping's bitmap (the engine writes only on the destination, while it
    /// loads, when nothing tracks them).
    pub fn from_mmap<B: Bitmap>(mapping: &'a MmapRegion<B>) -> GuestRegion<'a> {
        match NonNull::new(mapping.as_ptr()) {
            Some(ptr) => GuestRegion {
                ptr,
                len: mapping.size(),
                _owner: PhantomData,
            },
            // vm-memory never builds a null mapping; an empty region is the safe answer.
            None => GuestRegion {
                ptr: NonNull::dangling(),
                len: 0,
                _owner: PhantomData,
            },
        }
    }

    /// Wraps a host mapping of guest RAM that the caller owns.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must be mapped readable and writable for all of `'a`. Other code may
    /// write the memory concurrently (vCPUs), but must not hold Rust references into it while
    /// the engine loads pages (the destination's guest is stopped during a precopy load).
    pub unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize) -> GuestRegion<'a> {
        GuestRegion {
            ptr,
            len,
            _owner: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(self) -> bool {
        self.len == 0
    }

    /// The host address of the first byte, for kernel interfaces that register the mapping
    /// (KVM memslots, userfaultfd). Using it is the caller's `unsafe`; getting it is not.
    pub fn host_addr(self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The region as a `vm-memory` volatile slice (no dirty bitmap), for code written against
    /// `vm-memory`'s accessors.
    pub fn as_volatile_slice(self) -> VolatileSlice<'a> {
        // SAFETY: the range is mapped for 'a (constructors' contract) and the slice cannot
        // outlive 'a; every user of guest memory accesses it volatilely or through the kernel.
        unsafe { VolatileSlice::new(self.ptr.as_ptr(), self.len) }
    }

    fn check(self, offset: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        (off.checked_add(len)? <= self.len).then_some(off)
    }

    /// The bytes `[offset, offset+len)` as an `IoSlice` for a vectored write, or `None` when
    /// the range is outside the region.
    ///
    /// The guest may be writing these bytes while the kernel copies them: the page is then
    /// dirty again, and the dirty log makes the engine send it once more before switchover.
    pub fn io_slice(self, offset: u64, len: usize) -> Option<IoSlice<'a>> {
        let off = self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked above), which the owner keeps alive
        // for 'a. The slice is handed to the kernel for a copy; concurrent guest writes can
        // only make that copy stale, which the dirty log repairs.
        let s = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) };
        Some(IoSlice::new(s))
    }

    /// Runs `f` with `[offset, offset+len)` as a mutable slice — how the loader reads a page
    /// from the socket directly into guest memory. Returns `None` when the range is outside
    /// the region.
    pub fn with_slice_mut<R>(
        self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R> {
        let off = self.check(offset, len)?;
        // SAFETY: in bounds (checked) and mapped for 'a; the constructors' contract says nobody
        // holds references into the region while the engine loads, and the slice does not
        // outlive `f`.
        let s = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) };
        Some(f(s))
    }

    /// Reads pages of `len` bytes from `r` into the region, page `i` at `offsets[i]`, in that
    /// order: how a multifd channel loads a packet. The pages are read with vectored reads
    /// straight into guest memory, all of a packet's pages per call; pages that overlap each
    /// other (no sender makes them, but the bytes allow it) are read one at a time. Fails
    /// with `InvalidInput` before reading anything if a page is outside the region.
    pub fn read_pages(self, r: &mut dyn Read, offsets: &[u64], len: usize) -> io::Result<()> {
        const MAX: usize = 128;
        if offsets.len() > MAX {
            for chunk in offsets.chunks(MAX) {
                self.read_pages(r, chunk, len)?;
            }
            return Ok(());
        }
        let n = offsets.len();
        let mut starts = [0usize; MAX];
        for (s, &o) in starts.iter_mut().zip(offsets) {
            *s = self.check(o, len).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("page at {o:#x} is outside the RAM block"),
                )
            })?;
        }
        let mut sorted = starts;
        sorted[..n].sort_unstable();
        if sorted[..n].windows(2).any(|w| w[1] - w[0] < len) {
            for &o in offsets {
                self.with_slice_mut(o, len, |s| r.read_exact(s))
                    .unwrap_or_else(|| Err(io::Error::from(io::ErrorKind::InvalidInput)))?;
            }
            return Ok(());
        }
        let mut iov: [IoSliceMut<'_>; MAX] = std::array::from_fn(|_| IoSliceMut::new(&mut []));
        for (slot, &start) in iov.iter_mut().zip(&starts[..n]) {
            // SAFETY: `start..start+len` is inside the mapping (checked above), which the owner
            // keeps mapped for 'a; the ranges are pairwise disjoint (checked above), so no two
            // slices alias; and, per the constructors' contract, nobody holds references into
            // the region while the engine loads. The slices live only for this call.
            *slot = IoSliceMut::new(unsafe {
                std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(start), len)
            });
        }
        let mut bufs = &mut iov[..n];
        while !bufs.is_empty() {
            match r.read_vectored(bufs) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
                Ok(got) => IoSliceMut::advance_slices(&mut bufs, got),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether `[offset, offset+len)` is all zero bytes. Reads are volatile 64-bit loads,
    /// stopping at the first non-zero word, because the guest may be writing the page.
    pub fn is_zero(self, offset: u64, len: usize) -> bool {
        let Some(off) = self.check(offset, len) else {
            return false;
        };
        // SAFETY: in bounds (checked).
        let base = unsafe { self.ptr.as_ptr().add(off) };
        let head = base.align_offset(8).min(len);
        let words = (len - head) / 8;
        for i in 0..head {
            // SAFETY: i < head <= len, inside the checked range.
            if unsafe { std::ptr::read_volatile(base.add(i)) } != 0 {
                return false;
            }
        }
        // SAFETY: `base + head` is 8-aligned and `words * 8` bytes from it are in range.
        let wbase = unsafe { base.add(head) } as *const u64;
        // A page of data is mostly told by its first word: look at it alone first.
        // SAFETY: as below, word 0 is inside the range when words > 0.
        if words > 0 && unsafe { std::ptr::read_volatile(wbase) } != 0 {
            return false;
        }
        // Then a cache line (8 words) per test: one branch per 64 bytes instead of per word.
        // A branch per word made the scan's speed depend on where the loop happened to land
        // in the binary (4.5 or 6.5 ms for 64 MiB between otherwise unrelated builds).
        let lines = words / 8;
        for l in 0..lines {
            let mut acc = 0u64;
            for i in l * 8..l * 8 + 8 {
                // SAFETY: i < lines * 8 <= words, so the word lies inside the checked range;
                // aligned (above).
                acc |= unsafe { std::ptr::read_volatile(wbase.add(i)) };
            }
            if acc != 0 {
                return false;
            }
        }
        for i in lines * 8..words {
            // SAFETY: i < words, so the word lies inside the checked range; aligned (above).
            if unsafe { std::ptr::read_volatile(wbase.add(i)) } != 0 {
                return false;
            }
        }
        for i in head + words * 8..len {
            // SAFETY: i < len, inside the checked range.
            if unsafe { std::ptr::read_volatile(base.add(i)) } != 0 {
                return false;
            }
        }
        true
    }

    /// Copies `[offset, offset+dst.len())` out of guest memory (for checksums and tests).
    pub fn read(self, offset: u64, dst: &mut [u8]) -> bool {
        let Some(off) = self.check(offset, dst.len()) else {
            return false;
        };
        // SAFETY: source in bounds (checked) and mapped for 'a, destination is a distinct Rust
        // buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        };
        true
    }

    /// Copies `src` into guest memory at `offset` (a device or vCPU write). Not logged: callers
    /// that need the page marked dirty use their block's write path.
    pub fn write(self, offset: u64, src: &[u8]) -> bool {
        let Some(off) = self.check(offset, src.len()) else {
            return false;
        };
        // SAFETY: destination in bounds (checked) and mapped for 'a, source is a distinct Rust
        // buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len())
        };
        true
    }
}

/// One region of guest RAM that migrates, as a VMM presents it to the engine.
pub trait RamBlock: Send + Sync {
    /// The RAMBlock name on the wire (`ram` for QEMU's `-M none`, `pc.ram` for `-M pc`).
    fn name(&self) -> &str;
    /// The host mapping, borrowed from the block; its length is the block's `used_length`, a
    /// multiple of [`PAGE_SIZE`]. The engine asks for it whenever it touches the memory and
    /// keeps it no longer than the `Arc<dyn RamBlock>` it holds.
    fn region(&self) -> GuestRegion<'_>;
    /// Starts logging the pages the guest writes.
    fn start_dirty_log(&self);
    /// Moves the pages written since the last call (or since `start_dirty_log`) into `bitmap`
    /// (one bit per page, bit `n` of word `n / 64`), ORing them in, and forgets them.
    fn sync_dirty_log(&self, bitmap: &mut [u64]);
    /// Stops logging.
    fn stop_dirty_log(&self);
}

/// A lock-free dirty log with one bit per page: what a software-only VMM (or a KVM one
/// collecting its dirty rings) records guest writes in. Writers mark whole words at a time;
/// the engine collects with one atomic swap per word.
pub struct AtomicDirtyLog {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl AtomicDirtyLog {
    /// A clean log for `pages` pages.
    pub fn new(pages: u64) -> Self {
        let n = pages.div_ceil(64) as usize;
        AtomicDirtyLog {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// Number of pages tracked.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Marks one page dirty. Out-of-range pages are ignored.
    pub fn mark(&self, page: u64) {
        if page < self.pages {
            if let Some(w) = self.words.get((page / 64) as usize) {
                w.fetch_or(1 << (page % 64), Ordering::Release);
            }
        }
    }

    /// Marks pages `[first, first+count)` dirty, a word at a time.
    pub fn mark_range(&self, first: u64, count: u64) {
        let end = first.saturating_add(count).min(self.pages);
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            if let Some(w) = self.words.get((p / 64) as usize) {
                w.fetch_or(mask, Ordering::Release);
            }
            p += n;
        }
    }

    /// Marks every page dirty.
    pub fn mark_all(&self) {
        self.mark_range(0, self.pages);
    }

    /// ORs the logged pages into `bitmap` and clears the log (one atomic swap per word).
    pub fn take_into(&self, bitmap: &mut [u64]) {
        for (w, out) in self.words.iter().zip(bitmap.iter_mut()) {
            if w.load(Ordering::Relaxed) != 0 {
                *out |= w.swap(0, Ordering::Acquire);
            }
        }
    }

    /// Number of pages currently logged.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// ORs the pages logged in a `vm-memory` [`AtomicBitmap`] into `out` (one bit per page, as
/// [`RamBlock::sync_dirty_log`] wants) and clears them.
pub fn take_atomic_bitmap(bitmap: &AtomicBitmap, out: &mut [u64]) {
    for (o, w) in out.iter_mut().zip(bitmap.get_and_reset()) {
        *o |= w;
    }
}

/// A [`RamBlock`] over a `vm-memory` region, as a rust-vmm VMM has it: the engine reads and
/// writes the region's own mapping (no copy), and the region's [`AtomicBitmap`] — marked by
/// every write made through `vm-memory`'s accessors — is the dirty log. A VMM whose vCPUs write
/// behind `vm-memory`'s back (KVM) adds their log in its own `RamBlock` (see the `vm` crate's
/// KVM machine and the embedding example).
pub struct MmapRamBlock {
    name: String,
    region: Arc<GuestRegionMmap<AtomicBitmap>>,
}

impl MmapRamBlock {
    /// A block named `name` (its RAMBlock name on the wire) over `region`. Fails unless the
    /// region's bitmap has one bit per [`PAGE_SIZE`] bytes (the engine's unit).
    pub fn new(
        name: &str,
        region: Arc<GuestRegionMmap<AtomicBitmap>>,
    ) -> Result<MmapRamBlock, crate::MigrationError> {
        let mapping: &MmapRegion<AtomicBitmap> = &region;
        let pages = (mapping.size() as u64).div_ceil(PAGE_SIZE);
        if mapping.bitmap().len() as u64 != pages {
            return Err(crate::MigrationError::Other(format!(
                "RAM block {name}: its dirty bitmap has {} bits for {pages} pages of {PAGE_SIZE} bytes",
                mapping.bitmap().len()
            )));
        }
        Ok(MmapRamBlock {
            name: name.to_string(),
            region,
        })
    }

    /// The `vm-memory` region (to share with devices, or to register as a memslot).
    pub fn mmap(&self) -> &Arc<GuestRegionMmap<AtomicBitmap>> {
        &self.region
    }

    fn mapping(&self) -> &MmapRegion<AtomicBitmap> {
        &self.region
    }
}

impl RamBlock for MmapRamBlock {
    fn name(&self) -> &str {
        &self.name
    }

    fn region(&self) -> GuestRegion<'_> {
        GuestRegion::from_mmap(self.mapping())
    }

    fn start_dirty_log(&self) {
        // Pages written before logging started are sent by the first pass anyway.
        self.mapping().bitmap().reset();
    }

    fn sync_dirty_log(&self, bitmap: &mut [u64]) {
        take_atomic_bitmap(self.mapping().bitmap(), bitmap);
    }

    fn stop_dirty_log(&self) {
        // vm-memory marks its bitmap on every write whatever we do; nothing to switch off.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(buf: &mut [u8]) -> GuestRegion<'_> {
        // SAFETY: the buffer is borrowed for the region's lifetime.
        unsafe { GuestRegion::from_raw_parts(NonNull::new(buf.as_mut_ptr()).unwrap(), buf.len()) }
    }

    #[test]
    fn bounds_are_checked() {
        let mut buf = vec![0u8; 8192];
        let r = region(&mut buf);
        assert!(r.io_slice(4096, 4096).is_some());
        assert!(r.io_slice(4097, 4096).is_none());
        assert!(r.io_slice(u64::MAX, 1).is_none());
        assert!(r.with_slice_mut(8192, 1, |_| ()).is_none());
        assert!(!r.is_zero(8000, 4096));
    }

    #[test]
    fn pages_are_read_in_place_in_order_even_when_they_overlap() {
        let mut buf = vec![0u8; 8 * 4096];
        let r = region(&mut buf);
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i / 4096) as u8 + 1).collect();
        r.read_pages(&mut &data[..], &[5 * 4096, 0, 2 * 4096], 4096)
            .unwrap();
        let mut page = [0u8; 4096];
        for (at, want) in [(5, 1u8), (0, 2), (2, 3)] {
            assert!(r.read(at * 4096, &mut page));
            assert!(page.iter().all(|&b| b == want), "page {at}");
        }
        // Overlapping pages: read one after the other, the later wins.
        let data: Vec<u8> = (0..2 * 4096).map(|i| (i / 4096) as u8 + 7).collect();
        r.read_pages(&mut &data[..], &[4096, 4096 + 8], 4096)
            .unwrap();
        assert!(r.read(4096 + 8, &mut page));
        assert!(page.iter().all(|&b| b == 8));
        let mut one = [0u8; 1];
        assert!(r.read(4096, &mut one));
        assert_eq!(one[0], 7);
        // A page outside the region: nothing is read.
        let e = r
            .read_pages(&mut &data[..], &[0, 8 * 4096], 4096)
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // A short stream.
        let e = r.read_pages(&mut &data[..10], &[0], 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn zero_detection_sees_any_byte() {
        let mut buf = vec![0u8; 3 * 4096 + 3];
        let r = region(&mut buf);
        assert!(r.is_zero(0, 4096));
        for pos in [0usize, 1, 7, 8, 4095, 4096 + 100] {
            r.write(pos as u64, &[1]);
            assert!(!r.is_zero(0, 8192), "{pos}");
            r.write(pos as u64, &[0]);
        }
        assert!(r.is_zero(3, 4096));
        r.write(3 + 4095, &[9]);
        assert!(!r.is_zero(3, 4096));
        r.write(3 + 4095, &[0]);
        // Every byte of unaligned heads, whole cache lines, words after the last line and
        // tails: 235 bytes from 0 are 3 lines, 5 words and a 3-byte tail; from 3 they start
        // with a 5-byte head; 7 bytes are a head alone.
        for start in [0u64, 3, 8] {
            for len in [4096usize, 235, 64, 7] {
                assert!(r.is_zero(start, len));
                for pos in 0..len as u64 {
                    r.write(start + pos, &[0x80]);
                    assert!(!r.is_zero(start, len), "start {start} len {len} byte {pos}");
                    r.write(start + pos, &[0]);
                }
            }
        }
    }

    #[test]
    fn dirty_log_marks_ranges_and_takes_once() {
        let log = AtomicDirtyLog::new(200);
        log.mark(3);
        log.mark_range(60, 70);
        log.mark(500);
        assert_eq!(log.count(), 71);
        let mut bm = vec![0u64; 4];
        log.take_into(&mut bm);
        assert_eq!(log.count(), 0);
        let set: Vec<u64> = (0..256)
            .filter(|p| bm[(p / 64) as usize] >> (p % 64) & 1 == 1)
            .collect();
        let mut want = vec![3];
        want.extend(60..130);
        assert_eq!(set, want);
        log.mark_all();
        assert_eq!(log.count(), 200);
    }

    #[test]
    fn mmap_block_lends_its_mapping_and_logs_vm_memory_writes() {
        use vm_memory::{Bytes, GuestAddress, MemoryRegionAddress};
        let size = 16 * PAGE_SIZE as usize;
        let mapping = MmapRegion::<AtomicBitmap>::new(size).unwrap();
        let region = Arc::new(GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap());
        let block = MmapRamBlock::new("pc.ram", region.clone()).unwrap();
        block.start_dirty_log();
        // A device writes through vm-memory: the engine sees the bytes in place and the page
        // in the log.
        region
            .write_slice(&[7, 8], MemoryRegionAddress(5 * 4096 + 4095))
            .unwrap();
        let mut b = [0u8; 2];
        assert!(block.region().read(5 * 4096 + 4095, &mut b));
        assert_eq!(b, [7, 8]);
        assert_eq!(block.region().host_addr(), region.as_ptr());
        let mut bm = [0u64; 1];
        block.sync_dirty_log(&mut bm);
        assert_eq!(bm[0], 0b11 << 5);
        let mut bm = [0u64; 1];
        block.sync_dirty_log(&mut bm);
        assert_eq!(bm[0], 0);
    }
}
