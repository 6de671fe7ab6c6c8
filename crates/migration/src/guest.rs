//! The seam between the engine and a VMM's guest memory.
//!
//! A VMM implements [`RamBlock`] for each region of guest RAM that migrates (QEMU's
//! RAMBlocks): a name, the host mapping as a [`GuestRegion`], and a dirty log. The engine
//! sends pages straight from the mapping to the socket with vectored writes and loads them
//! straight from the socket into the mapping; it never copies a page through a buffer of its
//! own.
//!
//! This module is the only place in the crate that touches raw guest memory, and it is why the
//! crate is `deny(unsafe_code)` rather than `forbid`: guest RAM is shared with vCPU threads
//! that write it behind Rust's back, so it is reached through raw pointers, volatile reads and
//! the kernel, never through long-lived Rust references.
#![allow(unsafe_code)]

use std::io::IoSlice;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Target page size: the unit of RAM migration (QEMU's `TARGET_PAGE_SIZE` on x86).
pub const PAGE_SIZE: u64 = 4096;

/// A span of host memory holding guest RAM.
#[derive(Clone, Copy, Debug)]
pub struct GuestRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a GuestRegion is an address range, not ownership; the creator promises (see `new`)
// that the range stays mapped while any copy is in use, from any thread. Guest memory is
// shared with vCPU threads by design.
unsafe impl Send for GuestRegion {}
// SAFETY: as above; every access through `&GuestRegion` is a raw/volatile access or a kernel
// copy, so sharing the handle between threads adds no Rust-level aliasing.
unsafe impl Sync for GuestRegion {}

impl GuestRegion {
    /// Wraps a host mapping of guest RAM.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must be mapped readable and writable for as long as this value or any
    /// copy of it is used. Other code may write the memory concurrently (vCPUs), but must not
    /// hold Rust references into it while the engine loads pages (the destination's guest is
    /// stopped during a precopy load).
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> Self {
        GuestRegion { ptr, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(offset).ok()?;
        (off.checked_add(len)? <= self.len).then_some(off)
    }

    /// The bytes `[offset, offset+len)` as an `IoSlice` for a vectored write, or `None` when
    /// the range is outside the region.
    ///
    /// The guest may be writing these bytes while the kernel copies them: the page is then
    /// dirty again, and the dirty log makes the engine send it once more before switchover.
    pub fn io_slice(&self, offset: u64, len: usize) -> Option<IoSlice<'_>> {
        let off = self.check(offset, len)?;
        // SAFETY: the range is inside the mapping (checked above), which `new`'s contract keeps
        // alive for `'_`. The slice is handed to the kernel for a copy; concurrent guest writes
        // can only make that copy stale, which the dirty log repairs.
        let s = unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(off), len) };
        Some(IoSlice::new(s))
    }

    /// Runs `f` with `[offset, offset+len)` as a mutable slice — how the loader reads a page
    /// from the socket directly into guest memory. Returns `None` when the range is outside
    /// the region.
    pub fn with_slice_mut<R>(
        &self,
        offset: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> R,
    ) -> Option<R> {
        let off = self.check(offset, len)?;
        // SAFETY: in bounds (checked); `new`'s contract says nobody holds references into the
        // region while the engine loads, and the slice does not outlive `f`.
        let s = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(off), len) };
        Some(f(s))
    }

    /// Whether `[offset, offset+len)` is all zero bytes. Reads are volatile 64-bit loads,
    /// stopping at the first non-zero word, because the guest may be writing the page.
    pub fn is_zero(&self, offset: u64, len: usize) -> bool {
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
        for i in 0..words {
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
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> bool {
        let Some(off) = self.check(offset, dst.len()) else {
            return false;
        };
        // SAFETY: source in bounds (checked), destination is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        };
        true
    }

    /// Copies `src` into guest memory at `offset` (a device or vCPU write).
    pub fn write(&self, offset: u64, src: &[u8]) -> bool {
        let Some(off) = self.check(offset, src.len()) else {
            return false;
        };
        // SAFETY: destination in bounds (checked), source is a distinct Rust buffer.
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
    /// The host mapping; its length is the block's `used_length`, a multiple of
    /// [`PAGE_SIZE`].
    fn region(&self) -> GuestRegion;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn region(buf: &mut [u8]) -> GuestRegion {
        // SAFETY: the buffer outlives every use in these tests.
        unsafe { GuestRegion::new(NonNull::new(buf.as_mut_ptr()).unwrap(), buf.len()) }
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
}
