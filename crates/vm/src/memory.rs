//! Guest RAM of the reference VM: one `vm-memory` mapping per RAM block, owned through an
//! `Arc`, with the mapping's dirty bitmap as the log that every guest write goes through.
//!
//! The mapping is created with `MAP_NORESERVE`, so a large guest costs host memory only for the
//! pages it touches — a fresh destination's RAM reads as zero without being allocated — and is
//! advised for transparent huge pages (as QEMU does for guest RAM): the destination's first
//! touch of each page is a page fault, and with huge pages there are 512 times fewer of them.
//! (Linux places anonymous mappings whose size is a multiple of 2 MiB on a 2 MiB boundary.)
//!
//! The engine sees the block through [`MmapRamBlock`], which lends it the mapping by borrow
//! ([`RamBlock::region`]); devices and KVM share the same `vm-memory` region
//! ([`GuestRam::mmap`]), so nothing here hands out a pointer that could outlive the mapping.
#![allow(unsafe_code)]

use migration::guest::{GuestRegion, MmapRamBlock, RamBlock, PAGE_SIZE};
use nix::sys::mman::{madvise, MmapAdvise};
use std::num::NonZeroUsize;
use std::sync::Arc;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress};

/// One block of guest RAM.
pub struct GuestRam {
    block: MmapRamBlock,
}

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
        source: vm_memory::mmap::MmapRegionError,
    },
}

impl GuestRam {
    /// Maps `size` bytes of zeroed guest RAM named `name`, at guest physical address `gpa`.
    pub fn new(name: &str, size: u64) -> Result<Self, MemoryError> {
        Self::at(name, 0, size)
    }

    /// Maps `size` bytes of zeroed guest RAM named `name` whose first byte is guest physical
    /// address `gpa` (where a machine's memory map puts it).
    pub fn at(name: &str, gpa: u64, size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let page = NonZeroUsize::new(PAGE_SIZE as usize).ok_or(MemoryError::BadSize(size))?;
        let mapping = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::new(len, page))
            .with_mmap_prot(libc_prot())
            .with_mmap_flags(libc_flags())
            .build()
            .map_err(|source| MemoryError::Map { size, source })?;
        // SAFETY: advice on exactly the mapping just created; it changes no contents. Without
        // THP support the mapping works with small pages, so the result is ignored.
        let _ = unsafe {
            madvise(
                std::ptr::NonNull::new(mapping.as_ptr().cast())
                    .ok_or(MemoryError::BadSize(size))?,
                len,
                MmapAdvise::MADV_HUGEPAGE,
            )
        };
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(gpa)).ok_or(MemoryError::BadSize(size))?;
        let block =
            MmapRamBlock::new(name, Arc::new(region)).map_err(|_| MemoryError::BadSize(size))?;
        Ok(GuestRam { block })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.block.region().len() as u64
    }

    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.size() / PAGE_SIZE
    }

    /// The host mapping as the engine sees it, borrowed from this block.
    pub fn guest_region(&self) -> GuestRegion<'_> {
        self.block.region()
    }

    /// The `vm-memory` region (shared with devices doing DMA and with KVM's memslots); writes
    /// through its accessors are logged.
    pub fn mmap(&self) -> &Arc<GuestRegionMmap<AtomicBitmap>> {
        self.block.mmap()
    }

    /// Allocates every page now (QEMU's `-mem-prealloc`), so that neither the guest nor an
    /// incoming migration pays a page fault per first touch later. Falls back to touching one
    /// byte per page where the kernel lacks `MADV_POPULATE_WRITE`.
    pub fn prealloc(&self) {
        let region = self.guest_region();
        let ok = match std::ptr::NonNull::new(region.host_addr().cast()) {
            // SAFETY: the range is exactly this block's mapping, alive while `self` is
            // borrowed; populating does not change its contents (fresh memory stays zero).
            Some(p) => unsafe { madvise(p, region.len(), MmapAdvise::MADV_POPULATE_WRITE) }.is_ok(),
            None => false,
        };
        if !ok {
            let mut b = [0u8; 1];
            let mut off = 0;
            while off < region.len() as u64 {
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
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > self.size()) {
            return false;
        }
        self.mmap()
            .write_slice(data, MemoryRegionAddress(offset))
            .is_ok()
    }

    /// A guest read.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> bool {
        self.guest_region().read(offset, dst)
    }

    /// Marks `[offset, offset+len)` dirty in the block's log without writing it (pages a vCPU
    /// under KVM wrote, as the hardware log reported them).
    pub fn mark_dirty(&self, offset: u64, len: u64) {
        let m: &vm_memory::MmapRegion<AtomicBitmap> = self.mmap();
        if let (Ok(o), Ok(l)) = (usize::try_from(offset), usize::try_from(len)) {
            m.bitmap().set_addr_range(o, l);
        }
    }

    /// A guest write of one little-endian u64 (page tables, control blocks), logged.
    pub fn write_u64(&self, offset: u64, v: u64) -> bool {
        self.write(offset, &v.to_le_bytes())
    }

    /// A guest read of one little-endian u64 (0 outside RAM).
    pub fn read_u64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(offset, &mut b);
        u64::from_le_bytes(b)
    }
}

fn libc_prot() -> i32 {
    (nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE).bits()
}

fn libc_flags() -> i32 {
    (nix::sys::mman::MapFlags::MAP_PRIVATE
        | nix::sys::mman::MapFlags::MAP_ANONYMOUS
        | nix::sys::mman::MapFlags::MAP_NORESERVE)
        .bits()
}

impl RamBlock for GuestRam {
    fn name(&self) -> &str {
        self.block.name()
    }

    fn region(&self) -> GuestRegion<'_> {
        self.block.region()
    }

    fn start_dirty_log(&self) {
        self.block.start_dirty_log();
    }

    fn sync_dirty_log(&self, bitmap: &mut [u64]) {
        self.block.sync_dirty_log(bitmap);
    }

    fn stop_dirty_log(&self) {
        self.block.stop_dirty_log();
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
