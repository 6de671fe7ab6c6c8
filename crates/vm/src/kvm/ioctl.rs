//! The KVM calls `kvm-ioctls` leaves `unsafe` or does not wrap: memslots (whose host memory the
//! kernel uses behind Rust's back), `KVM_CLEAR_DIRTY_LOG`, and the per-vCPU dirty rings
//! (`KVM_CAP_DIRTY_LOG_RING`: a ring mapped from the vCPU fd, harvested while the vCPU runs).
//!
//! This is the crate's ioctl module: with `memory`, the only place with `unsafe`. Each memslot
//! is registered from a [`Slot`] that owns an `Arc` of the guest RAM it points at, and the
//! table of slots outlives the VM fd (see `KvmVm`'s field order), so the kernel never holds an
//! address of a mapping that was unmapped.
#![allow(unsafe_code)]

use crate::memory::GuestRam;
use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_gfn, kvm_userspace_memory_region};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: u64 = (3 << 30) | (24 << 16) | (0xae << 8) | 0xc0;
/// `KVM_RESET_DIRTY_RINGS`: `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: u64 = (0xae << 8) | 0xc7;
/// A dirty-ring entry the kernel has filled.
const GFN_DIRTY: u32 = 1;
/// A dirty-ring entry userspace has harvested (the kernel re-protects it on reset).
const GFN_RESET: u32 = 2;

/// One KVM memslot: guest RAM (or a piece of it) at a guest physical address.
#[derive(Clone)]
pub struct Slot {
    /// KVM slot number.
    pub id: u32,
    /// First guest physical address.
    pub gpa: u64,
    /// The RAM backing it (kept alive as long as the slot exists).
    pub ram: Arc<GuestRam>,
    /// Offset of the slot's first byte in `ram`.
    pub offset: u64,
    /// Length in bytes (a multiple of 4096, inside `ram`).
    pub size: u64,
    /// `KVM_MEM_LOG_DIRTY_PAGES` or 0.
    pub flags: u32,
}

/// Registers (or, with `size == 0`, deletes) a memslot.
pub fn set_slot(vm: &VmFd, slot: &Slot) -> Result<(), kvm_ioctls::Error> {
    let region = slot.ram.guest_region();
    let in_range = slot
        .offset
        .checked_add(slot.size)
        .is_some_and(|end| end <= region.len() as u64);
    if !in_range {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    let mem = kvm_userspace_memory_region {
        slot: slot.id,
        flags: slot.flags,
        guest_phys_addr: slot.gpa,
        memory_size: slot.size,
        userspace_addr: region.host_addr() as u64 + slot.offset,
    };
    // SAFETY: the host range lies inside `slot.ram`'s mapping (checked above). The caller keeps
    // the `Slot` (and so an `Arc` of that RAM) in the VM's slot table until the slot is deleted
    // or the VM fd is closed, so the mapping outlives the kernel's use of it. Guest RAM is
    // written by the guest behind Rust's back by design; nothing holds references into it.
    unsafe { vm.set_user_memory_region(mem) }
}

/// Deletes memslot `id`.
pub fn delete_slot(vm: &VmFd, id: u32) -> Result<(), kvm_ioctls::Error> {
    let mem = kvm_userspace_memory_region {
        slot: id,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0,
        userspace_addr: 0,
    };
    // SAFETY: a zero-sized region deletes the slot; no host memory is named.
    unsafe { vm.set_user_memory_region(mem) }
}

/// Write-protects again (and clears in KVM's log) the pages of `slot` set in `bitmap`, which
/// covers `num_pages` pages from `first_page` (a multiple of 64).
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), kvm_ioctls::Error> {
    if bitmap.len() as u64 * 64 < u64::from(num_pages) || !first_page.is_multiple_of(64) {
        return Err(kvm_ioctls::Error::new(libc::EINVAL));
    }
    let mut arg = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
    // SAFETY: `arg` is a valid kvm_clear_dirty_log whose bitmap points at `num_pages` bits the
    // kernel only reads (checked above); the ioctl number matches the structure (24 bytes).
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG as _, &arg) };
    if ret < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(())
}

/// Re-protects every page harvested from the dirty rings (`KVM_RESET_DIRTY_RINGS`).
pub fn reset_dirty_rings(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: an argument-less ioctl on a VM fd.
    let ret = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS as _, 0) };
    if ret < 0 {
        return Err(kvm_ioctls::Error::last());
    }
    Ok(())
}

/// One vCPU's dirty ring, mapped from its fd.
pub struct DirtyRing {
    ptr: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// Where harvesting resumes (the kernel's entries are used in order).
    next: u32,
}

// SAFETY: the mapping is owned by this value; entries are accessed through atomics on the
// flags word (the kernel's protocol) and plain reads of entries the kernel has published.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu` (the VM was created with a ring of `entries` entries).
    pub fn map(vcpu: &VcpuFd, entries: u32) -> Result<DirtyRing, kvm_ioctls::Error> {
        let bytes = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        let offset = kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET as i64 * 4096;
        // SAFETY: a shared mapping of the vCPU fd at the offset and size the kernel documents
        // for the dirty ring; the result is checked before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(kvm_ioctls::Error::last());
        }
        let ptr = NonNull::new(p.cast()).ok_or_else(|| kvm_ioctls::Error::new(libc::ENOMEM))?;
        Ok(DirtyRing {
            ptr,
            entries,
            next: 0,
        })
    }

    /// Moves every published entry to `f(slot, page offset in slot)` and marks it harvested.
    /// Returns how many there were.
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let i = (self.next % self.entries) as usize;
            // SAFETY: i < entries, inside the mapping; the flags word is 4-aligned (first field
            // of a 16-byte entry) and shared with the kernel, so it is accessed atomically.
            let entry = unsafe { self.ptr.as_ptr().add(i) };
            // SAFETY: as above; AtomicU32 has the layout of u32.
            let flags = unsafe { &*(std::ptr::addr_of!((*entry).flags) as *const AtomicU32) };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                return n;
            }
            // SAFETY: the entry is published (acquire above); the kernel does not touch it
            // until we hand it back with the reset flag.
            let (slot, offset) = unsafe { ((*entry).slot, (*entry).offset) };
            f(slot & 0xffff, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: exactly the mapping created in `map`, no longer used.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), bytes) };
    }
}

/// Loads a vCPU's XSAVE area. `KvmVm::new` refuses hosts whose XSAVE state is larger than
/// the 4 KiB `kvm_xsave` (AMX), so the kernel never reads past `xsave`.
pub fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_bindings::kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the host's XSAVE size is at most size_of::<kvm_xsave>() (checked when the VM was
    // created), so KVM_SET_XSAVE reads only inside `xsave`.
    unsafe { vcpu.set_xsave(xsave) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_structures() {
        assert_eq!(std::mem::size_of::<kvm_clear_dirty_log>(), 24);
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
        assert_eq!(std::mem::size_of::<kvm_dirty_gfn>(), 16);
    }
}
