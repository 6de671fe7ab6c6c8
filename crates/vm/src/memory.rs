//! Guest RAM of the reference VM: one anonymous host mapping per RAM block, with a dirty log
//! that every guest write goes through.
//!
//! The mapping is created with `MAP_NORESERVE`, so a large guest costs host memory only for the
//! pages it touches — a fresh destination's RAM reads as zero without being allocated.
#![allow(unsafe_code)]

use migration::guest::{AtomicDirtyLog, GuestRegion, RamBlock, PAGE_SIZE};
use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use std::num::NonZeroUsize;
use std::ptr::NonNull;

/// One block of guest RAM.
pub struct GuestRam {
    name: String,
    ptr: NonNull<u8>,
    len: usize,
    log: AtomicDirtyLog,
}

// SAFETY: the mapping is owned by this value and released only in Drop; concurrent access from
// vCPU threads and the migration thread goes through raw copies (see GuestRegion).
unsafe impl Send for GuestRam {}
// SAFETY: as above; no method hands out references that outlive a call.
unsafe impl Sync for GuestRam {}

/// Why guest RAM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or not a multiple of the page size.
    #[error("RAM size {0} is not a positive multiple of 4096")]
    BadSize(u64),
    /// The host refused the mapping.
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Map {
        /// Requested size.
        size: u64,
        /// The host's error.
        source: nix::Error,
    },
}

/// Transparent huge pages are 2 MiB on x86.
const HUGE: usize = 2 << 20;

/// Maps `len` bytes of private anonymous memory, 2 MiB-aligned and advised for transparent huge
/// pages (as QEMU does for guest RAM): the destination's first touch of each page is a page
/// fault, and with huge pages there are 512 times fewer of them.
fn map_guest(len: usize) -> Result<NonNull<u8>, nix::Error> {
    let padded = len.checked_add(HUGE).ok_or(nix::Error::ENOMEM)?;
    let nz = NonZeroUsize::new(padded).ok_or(nix::Error::EINVAL)?;
    // SAFETY: a fresh private anonymous mapping aliases nothing.
    let base = unsafe {
        mmap_anonymous(
            None,
            nz,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
        )
    }?
    .cast::<u8>();
    let addr = base.as_ptr() as usize;
    let head = addr.next_multiple_of(HUGE) - addr;
    let tail = HUGE - head;
    // SAFETY: `head` < HUGE, so `base + head` lies inside the mapping of `padded` bytes.
    let start = unsafe { base.add(head) };
    // SAFETY: the head and tail slices are parts of the mapping just created, not used by
    // anyone; unmapping them leaves exactly `[start, start + len)`.
    unsafe {
        if head > 0 {
            let _ = munmap(base.cast(), head);
        }
        if tail > 0 {
            let _ = munmap(start.add(len).cast(), tail);
        }
        // Advice only: without THP support the mapping works with small pages.
        let _ = madvise(start.cast(), len, MmapAdvise::MADV_HUGEPAGE);
    }
    Ok(start)
}

impl GuestRam {
    /// Maps `size` bytes of zeroed guest RAM named `name`.
    pub fn new(name: &str, size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let ptr = map_guest(len).map_err(|source| MemoryError::Map { size, source })?;
        Ok(GuestRam {
            name: name.to_string(),
            ptr,
            len,
            log: AtomicDirtyLog::new(size / PAGE_SIZE),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.len as u64
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.len as u64 / PAGE_SIZE
    }

    /// The host mapping as the engine sees it.
    pub fn guest_region(&self) -> GuestRegion {
        // SAFETY: the mapping lives as long as `self`, and every GuestRegion handed out is used
        // only by code holding an Arc to this GuestRam (the engine keeps the RamBlock alive).
        unsafe { GuestRegion::new(self.ptr, self.len) }
    }

    /// Allocates every page now (QEMU's `-mem-prealloc`), so that neither the guest nor an
    /// incoming migration pays a page fault per first touch later. Falls back to touching one
    /// byte per page where the kernel lacks `MADV_POPULATE_WRITE`.
    pub fn prealloc(&self) {
        // SAFETY: the range is exactly this mapping; populating does not change its contents
        // (fresh anonymous memory stays zero).
        let ok =
            unsafe { madvise(self.ptr.cast(), self.len, MmapAdvise::MADV_POPULATE_WRITE) }.is_ok();
        if !ok {
            let region = self.guest_region();
            let mut b = [0u8; 1];
            let mut off = 0;
            while off < self.len as u64 {
                // Read then write back the same byte: the page is allocated, its contents kept.
                region.read(off, &mut b);
                region.write(off, &b);
                off += PAGE_SIZE;
            }
        }
    }

    /// A guest write: copies `data` to `offset` and logs the pages it touched. Returns false
    /// (and writes nothing) when the range is outside RAM.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        if !self.guest_region().write(offset, data) {
            return false;
        }
        if !data.is_empty() {
            let first = offset / PAGE_SIZE;
            let last = (offset + data.len() as u64 - 1) / PAGE_SIZE;
            self.log.mark_range(first, last - first + 1);
        }
        true
    }

    /// A guest read.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> bool {
        self.guest_region().read(offset, dst)
    }
}

impl RamBlock for GuestRam {
    fn name(&self) -> &str {
        &self.name
    }

    fn region(&self) -> GuestRegion {
        self.guest_region()
    }

    fn start_dirty_log(&self) {
        // Pages written before logging started are sent by the first pass anyway; clear the log
        // so the first sync reports only writes made during the migration.
        let mut scratch = vec![0u64; self.log.pages().div_ceil(64) as usize];
        self.log.take_into(&mut scratch);
    }

    fn sync_dirty_log(&self, bitmap: &mut [u64]) {
        self.log.take_into(bitmap);
    }

    fn stop_dirty_log(&self) {
        // Guest writes are always logged (an atomic OR per write is cheaper than a branch on
        // a shared flag); nothing to switch off.
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `new`, and no GuestRegion
        // outlives the GuestRam (see `guest_region`).
        let _ = unsafe { munmap(self.ptr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_logged_by_page() {
        let ram = GuestRam::new("ram", 64 * 4096).unwrap();
        ram.start_dirty_log();
        assert!(ram.write(4095, &[1, 2]));
        assert!(ram.write(10 * 4096, &[3]));
        assert!(!ram.write(64 * 4096 - 1, &[1, 2]));
        let mut bm = vec![0u64; 1];
        ram.sync_dirty_log(&mut bm);
        assert_eq!(bm[0], 0b11 | 1 << 10);
        let mut b = [0u8; 2];
        assert!(ram.read(4095, &mut b));
        assert_eq!(b, [1, 2]);
        let mut bm = vec![0u64; 1];
        ram.sync_dirty_log(&mut bm);
        assert_eq!(bm[0], 0);
    }

    #[test]
    fn prealloc_allocates_without_changing_contents() {
        let ram = GuestRam::new("ram", 8 << 20).unwrap();
        assert!(ram.write(4096, &[7]));
        ram.prealloc();
        let mut b = [0u8; 1];
        assert!(ram.read(4096, &mut b));
        assert_eq!(b, [7]);
        assert!(ram.guest_region().is_zero(8192, (8 << 20) - 8192));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(GuestRam::new("ram", 0).is_err());
        assert!(GuestRam::new("ram", 4097).is_err());
    }

    #[test]
    fn large_ram_costs_nothing_until_touched() {
        let ram = GuestRam::new("ram", 8 << 30).unwrap();
        assert!(ram.guest_region().is_zero(4 << 30, 4096));
    }
}
