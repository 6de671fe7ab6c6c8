//! KVM acceleration (`-accel kvm`): the reference VM's vCPUs as KVM vCPUs running the guest
//! code of the `guest` crate, KVM memslots over its RAM, and hardware dirty logging feeding
//! the engine's dirty log.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`KvmVm`]: the VM fd, vCPU fds, memslots, dirty logging (bitmap or ring) |
//! | `ioctl.rs` | the `unsafe` KVM calls: memslots, `KVM_CLEAR_DIRTY_LOG`, dirty rings |
//! | `boot.rs` | what firmware would do: page tables, GDT, control blocks, 64-bit entry state |
//! | `run.rs` | the vCPU threads: `KVM_RUN` and its exits (serial, pacing, virtio-mmio) |
//! | `state.rs` | vCPU state and the KVM clock as device sections |
//!
//! **Dirty logging.** Two ways, chosen with `-accel kvm,dirty-ring-size=N` as in QEMU:
//! - *bitmap* (default): `KVM_GET_DIRTY_LOG` per memslot with manual protection
//!   (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, initially all-set, so starting the log costs
//!   nothing), then `KVM_CLEAR_DIRTY_LOG` in chunks of [`CLEAR_CHUNK_PAGES`] pages, skipping
//!   chunks with nothing dirty, to write-protect again only what was found dirty.
//! - *ring* (`KVM_CAP_DIRTY_LOG_RING`): each vCPU pushes the pages it dirties to its own ring;
//!   the migration thread (or a vCPU whose ring is full) harvests every ring and resets them.
//!   Harvested pages are marked in the RAM's `vm-memory` bitmap.
//!
//! Both feed the same log as writes made by devices through `vm-memory` (virtio DMA): the RAM
//! block's bitmap. [`KvmRamBlock`] is the engine's view of one RAM block under KVM.
//!
//! **Memslots follow the memory map** ([`KvmMemoryListener`]): each RAM range of the map's
//! flat view is one memslot, so a window mapped over RAM splits its slot as QEMU's KVM
//! listener does. The map hands the listener a view per commit — once per device load, since
//! the destination loads device state inside one batch (seed 003) — and [`KvmVm::set_memory`]
//! issues `KVM_SET_USER_MEMORY_REGION` only for the slots that differ. A slot deleted while
//! its RAM is logged hands its dirty pages to the RAM's bitmap first, so none is lost.

pub mod boot;
pub mod ioctl;
pub mod run;
pub mod state;

use crate::memmap::{FlatView, MapListener};
use crate::memory::GuestRam;
use ioctl::{DirtyRing, Slot};
use kvm_bindings::{kvm_enable_cap, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use migration::guest::{GuestRegion, RamBlock, PAGE_SIZE};
use std::sync::{Arc, Mutex, MutexGuard};

/// Pages per `KVM_CLEAR_DIRTY_LOG` call: 256 MiB of guest RAM.
pub const CLEAR_CHUNK_PAGES: u64 = 1 << 16;
/// Where KVM may put its TSS (three pages Intel VMX needs below 4 GiB); no RAM is there.
const TSS_ADDR: usize = 0xfffb_d000;

/// How to build the KVM side of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvmOptions {
    /// Dirty-ring entries per vCPU (QEMU's `dirty-ring-size`); 0 logs with bitmaps.
    pub dirty_ring_size: u32,
}

impl KvmOptions {
    /// Checks the options as QEMU does when it parses them.
    pub fn check(&self) -> Result<(), String> {
        let n = self.dirty_ring_size;
        if n != 0 && !n.is_power_of_two() {
            return Err("dirty-ring-size must be a power of two.".into());
        }
        Ok(())
    }
}

/// How KVM logs dirty pages for this VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// `KVM_GET_DIRTY_LOG` + `KVM_CLEAR_DIRTY_LOG`.
    Bitmap,
    /// Per-vCPU dirty rings of this many entries.
    Ring(u32),
}

/// Whether this host can run KVM guests (`/dev/kvm` present and usable).
pub fn available() -> Result<(), String> {
    Kvm::new()
        .map(|_| ())
        .map_err(|e| format!("Could not access KVM kernel module: {}", errno_text(&e)))
}

fn errno_text(e: &kvm_ioctls::Error) -> String {
    std::io::Error::from_raw_os_error(e.errno())
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_string()
}

fn kerr(what: &str) -> impl Fn(kvm_ioctls::Error) -> String + '_ {
    move |e| format!("{what}: {}", errno_text(&e))
}

/// The KVM VM: its fds, memslots and dirty logging.
pub struct KvmVm {
    // Field order is drop order: the vCPU and VM fds close before the slot table drops its
    // RAM, so the kernel never keeps a memslot over an unmapped range.
    vcpus: Vec<Mutex<VcpuFd>>,
    rings: Mutex<Vec<DirtyRing>>,
    vm: VmFd,
    _kvm: Kvm,
    mode: DirtyMode,
    /// Memslots, by slot id, and the RAM blocks whose slots log dirty pages.
    slots: Mutex<SlotTable>,
    /// What `query-kvm`-style reports and benchmarks read.
    stats: Mutex<DirtyStats>,
}

/// The memslots, and which RAM is logged (a slot created for it logs from the start).
#[derive(Default)]
struct SlotTable {
    slots: Vec<Slot>,
    logged: Vec<Arc<GuestRam>>,
}

impl SlotTable {
    fn logging(&self, ram: &Arc<GuestRam>) -> bool {
        self.logged.iter().any(|r| Arc::ptr_eq(r, ram))
    }

    fn free_id(&self) -> u32 {
        (0..)
            .find(|id| self.slots.iter().all(|s| s.id != *id))
            .unwrap_or(0)
    }
}

/// One memslot wanted by the memory map: `size` bytes of `ram` from `offset`, at `gpa`.
#[derive(Clone)]
pub struct SlotSpec {
    /// First guest physical address.
    pub gpa: u64,
    /// The RAM block.
    pub ram: Arc<GuestRam>,
    /// Offset in the block.
    pub offset: u64,
    /// Bytes.
    pub size: u64,
}

/// A memslot as tests and reports see it: id, guest address, size, RAM block name, offset.
pub type SlotInfo = (u32, u64, u64, String, u64);

/// Costs of hardware dirty logging, for benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirtyStats {
    /// Harvests done.
    pub syncs: u64,
    /// Pages found dirty, all harvests together.
    pub pages: u64,
    /// Nanoseconds spent harvesting (get + clear, or ring walk + reset).
    pub harvest_ns: u64,
    /// `KVM_CLEAR_DIRTY_LOG` calls.
    pub clear_calls: u64,
    /// `KVM_SET_USER_MEMORY_REGION` calls.
    pub slot_updates: u64,
}

impl KvmVm {
    /// Opens `/dev/kvm`, creates the VM (with an in-kernel LAPIC) and `nvcpus` vCPUs with the
    /// host's supported CPUID, and sets up dirty logging as `opts` says.
    pub fn new(nvcpus: u32, opts: KvmOptions) -> Result<KvmVm, String> {
        opts.check()?;
        let kvm = Kvm::new().map_err(|e| {
            format!(
                "Could not access KVM kernel module: {0}\nfailed to initialize kvm: {0}",
                errno_text(&e)
            )
        })?;
        let vm = kvm
            .create_vm()
            .map_err(kerr("failed to create the KVM VM"))?;
        vm.set_tss_address(TSS_ADDR)
            .map_err(kerr("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(kerr("KVM_CREATE_IRQCHIP"))?;
        let mode = if opts.dirty_ring_size > 0 {
            let bytes = u64::from(opts.dirty_ring_size) * 16;
            let (cap, max) =
                match vm.check_extension_raw(kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL.into()) {
                    n if n > 0 => (kvm_bindings::KVM_CAP_DIRTY_LOG_RING_ACQ_REL, n),
                    _ => (
                        kvm_bindings::KVM_CAP_DIRTY_LOG_RING,
                        vm.check_extension_int(Cap::DirtyLogRing),
                    ),
                };
            if max <= 0 {
                return Err("KVM dirty ring not available".into());
            }
            if bytes > max as u64 {
                return Err(format!(
                    "KVM dirty ring size {} too big (maximum is {}).  Please use a smaller value.",
                    opts.dirty_ring_size,
                    max / 16
                ));
            }
            let mut c = kvm_enable_cap {
                cap,
                ..Default::default()
            };
            c.args[0] = bytes;
            vm.enable_cap(&c)
                .map_err(kerr("enabling the KVM dirty ring"))?;
            DirtyMode::Ring(opts.dirty_ring_size)
        } else {
            let flags =
                vm.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
            let want = kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET;
            if flags <= 0 || (flags as u32) & want != want {
                return Err("KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2".into());
            }
            let mut c = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            c.args[0] = u64::from(want);
            vm.enable_cap(&c)
                .map_err(kerr("enabling KVM's manual dirty-log protection"))?;
            DirtyMode::Bitmap
        };
        let xsave = vm.check_extension_int(Cap::Xsave2);
        if xsave > 4096 {
            return Err(format!(
                "-accel kvm: this host's XSAVE state ({xsave} bytes) is larger than livemig migrates (4096)"
            ));
        }
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kerr("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        let mut rings = Vec::new();
        for id in 0..nvcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kerr("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&cpuid_for(&cpuid, id))
                .map_err(kerr("KVM_SET_CPUID2"))?;
            if let DirtyMode::Ring(n) = mode {
                rings.push(DirtyRing::map(&vcpu, n).map_err(kerr("mapping the dirty ring"))?);
            }
            vcpus.push(Mutex::new(vcpu));
        }
        Ok(KvmVm {
            vcpus,
            rings: Mutex::new(rings),
            vm,
            _kvm: kvm,
            mode,
            slots: Mutex::new(SlotTable::default()),
            stats: Mutex::new(DirtyStats::default()),
        })
    }

    /// How dirty pages are logged.
    pub fn dirty_mode(&self) -> DirtyMode {
        self.mode
    }

    /// The VM fd (for device models that register with KVM).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// vCPU `id`'s fd, locked. The vCPU thread holds it only while in `KVM_RUN` and while it
    /// handles an exit, so state can be read or written once the vCPU is parked.
    pub fn vcpu(&self, id: usize) -> Option<MutexGuard<'_, VcpuFd>> {
        self.vcpus
            .get(id)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Dirty-logging costs so far.
    pub fn stats(&self) -> DirtyStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slots(&self) -> MutexGuard<'_, SlotTable> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The memslots, sorted by guest address.
    pub fn slot_table(&self) -> Vec<SlotInfo> {
        let mut v: Vec<SlotInfo> = self
            .slots()
            .slots
            .iter()
            .map(|s| (s.id, s.gpa, s.size, s.ram.name().to_string(), s.offset))
            .collect();
        v.sort_by_key(|s| s.1);
        v
    }

    /// Makes the memslots exactly `want`: deletes the slots not in it (handing their logged
    /// dirty pages to their RAM's bitmap first), then creates the missing ones. Slots that
    /// stay are not touched, so a commit costs one `KVM_SET_USER_MEMORY_REGION` per slot that
    /// changed.
    pub fn set_memory(&self, want: &[SlotSpec]) -> Result<(), String> {
        let same = |s: &Slot, w: &SlotSpec| {
            s.gpa == w.gpa
                && s.size == w.size
                && s.offset == w.offset
                && Arc::ptr_eq(&s.ram, &w.ram)
        };
        let goes = |t: &SlotTable| {
            t.slots
                .iter()
                .any(|s| s.flags != 0 && !want.iter().any(|w| same(s, w)))
        };
        // Ring entries name slots by id, and a deleted id may be reused: harvest them while
        // the ids still mean what they meant.
        if matches!(self.mode, DirtyMode::Ring(_)) && goes(&self.slots()) {
            self.harvest_rings()?;
        }
        let mut t = self.slots();
        let mut i = 0;
        while i < t.slots.len() {
            if want.iter().any(|w| same(&t.slots[i], w)) {
                i += 1;
                continue;
            }
            let s = &t.slots[i];
            if s.flags != 0 && self.mode == DirtyMode::Bitmap {
                let log = self
                    .vm
                    .get_dirty_log(s.id, s.size as usize)
                    .map_err(kerr("KVM_GET_DIRTY_LOG"))?;
                for (w, word) in log.iter().enumerate() {
                    let mut word = *word;
                    while word != 0 {
                        let page = w as u64 * 64 + u64::from(word.trailing_zeros());
                        word &= word - 1;
                        if page < s.size / PAGE_SIZE {
                            s.ram.mark_dirty(s.offset + page * PAGE_SIZE, PAGE_SIZE);
                        }
                    }
                }
            }
            ioctl::delete_slot(&self.vm, s.id)
                .map_err(kerr("kvm_set_phys_mem: error unregistering slot"))?;
            self.count_slot_update();
            t.slots.remove(i);
        }
        for w in want {
            if t.slots.iter().any(|s| same(s, w)) {
                continue;
            }
            let slot = Slot {
                id: t.free_id(),
                gpa: w.gpa,
                ram: w.ram.clone(),
                offset: w.offset,
                size: w.size,
                flags: if t.logging(&w.ram) {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            ioctl::set_slot(&self.vm, &slot)
                .map_err(kerr("kvm_set_phys_mem: error registering slot"))?;
            self.count_slot_update();
            t.slots.push(slot);
        }
        Ok(())
    }

    /// Maps `size` bytes of `ram` from `offset` at guest address `gpa` as memslot `id`,
    /// logging dirty pages if logging is on for that RAM.
    pub fn map(
        &self,
        id: u32,
        gpa: u64,
        ram: &Arc<GuestRam>,
        offset: u64,
        size: u64,
    ) -> Result<(), String> {
        let mut t = self.slots();
        let logging = t.logging(ram);
        if let Some(i) = t.slots.iter().position(|s| s.id == id) {
            ioctl::delete_slot(&self.vm, id).map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
            t.slots.remove(i);
            self.count_slot_update();
        }
        let slot = Slot {
            id,
            gpa,
            ram: ram.clone(),
            offset,
            size,
            flags: if logging { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        };
        ioctl::set_slot(&self.vm, &slot).map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
        self.count_slot_update();
        t.slots.push(slot);
        Ok(())
    }

    /// Deletes memslot `id` (nothing if there is none).
    pub fn unmap(&self, id: u32) -> Result<(), String> {
        let mut t = self.slots();
        if let Some(i) = t.slots.iter().position(|s| s.id == id) {
            ioctl::delete_slot(&self.vm, id).map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
            self.count_slot_update();
            t.slots.remove(i);
        }
        Ok(())
    }

    fn count_slot_update(&self) {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .slot_updates += 1;
    }

    /// Turns hardware dirty logging on or off for every memslot backed by `ram`.
    pub fn set_logging(&self, ram: &Arc<GuestRam>, on: bool) -> Result<(), String> {
        let mut t = self.slots();
        t.logged.retain(|r| !Arc::ptr_eq(r, ram));
        if on {
            t.logged.push(ram.clone());
        }
        for s in t.slots.iter_mut().filter(|s| Arc::ptr_eq(&s.ram, ram)) {
            let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
            if s.flags != flags {
                s.flags = flags;
                ioctl::set_slot(&self.vm, s).map_err(kerr("KVM_SET_USER_MEMORY_REGION"))?;
                self.count_slot_update();
            }
        }
        Ok(())
    }

    /// Moves the pages KVM logged for `ram` into `bitmap` (one bit per page of `ram`), and
    /// re-protects them. In ring mode every ring is harvested (into the RAM blocks'
    /// `vm-memory` bitmaps, which the caller collects next).
    pub fn harvest(&self, ram: &Arc<GuestRam>, bitmap: &mut [u64]) -> Result<u64, String> {
        let t = std::time::Instant::now();
        let mut pages = 0u64;
        let mut clears = 0u64;
        match self.mode {
            DirtyMode::Ring(_) => pages += self.harvest_rings()?,
            DirtyMode::Bitmap => {
                let slots: Vec<Slot> = self
                    .slots()
                    .slots
                    .iter()
                    .filter(|s| Arc::ptr_eq(&s.ram, ram) && s.flags != 0)
                    .cloned()
                    .collect();
                for s in slots {
                    let log = self
                        .vm
                        .get_dirty_log(s.id, s.size as usize)
                        .map_err(kerr("KVM_GET_DIRTY_LOG"))?;
                    let slot_pages = s.size / PAGE_SIZE;
                    let mut first = 0u64;
                    while first < slot_pages {
                        let n = CLEAR_CHUNK_PAGES.min(slot_pages - first);
                        let w0 = (first / 64) as usize;
                        let w1 = (first + n).div_ceil(64) as usize;
                        let words = log.get(w0..w1.min(log.len())).unwrap_or(&[]);
                        if words.iter().any(|w| *w != 0) {
                            ioctl::clear_dirty_log(&self.vm, s.id, first, n as u32, words)
                                .map_err(kerr("KVM_CLEAR_DIRTY_LOG"))?;
                            clears += 1;
                        }
                        first += n;
                    }
                    pages += or_shifted(bitmap, &log, s.offset / PAGE_SIZE, slot_pages);
                }
            }
        }
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.syncs += 1;
        st.pages += pages;
        st.clear_calls += clears;
        st.harvest_ns += t.elapsed().as_nanos() as u64;
        Ok(pages)
    }

    /// Ring mode: walks every vCPU's ring, marks the pages in their RAM's bitmap, and resets
    /// the rings. Called by the migration thread and by a vCPU whose ring is full.
    pub fn harvest_rings(&self) -> Result<u64, String> {
        let slots = self.slots().slots.clone();
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0u64;
        for ring in rings.iter_mut() {
            n += u64::from(ring.harvest(|slot, page| {
                if let Some(s) = slots.iter().find(|s| s.id == slot) {
                    if page < s.size / PAGE_SIZE {
                        s.ram.mark_dirty(s.offset + page * PAGE_SIZE, PAGE_SIZE);
                    }
                }
            }));
        }
        if n > 0 {
            ioctl::reset_dirty_rings(&self.vm).map_err(kerr("KVM_RESET_DIRTY_RINGS"))?;
        }
        Ok(n)
    }
}

/// ORs `src` (bits for `count` pages) into `dst` starting at bit `at`; returns the bits set.
fn or_shifted(dst: &mut [u64], src: &[u64], at: u64, count: u64) -> u64 {
    let mut set = 0u64;
    if at.is_multiple_of(64) {
        let base = (at / 64) as usize;
        for (i, w) in src.iter().enumerate() {
            let valid = count.saturating_sub(i as u64 * 64).min(64);
            if valid == 0 {
                break;
            }
            let mask = if valid == 64 {
                u64::MAX
            } else {
                (1u64 << valid) - 1
            };
            let w = *w & mask;
            if let Some(d) = dst.get_mut(base + i) {
                *d |= w;
                set += u64::from(w.count_ones());
            }
        }
        return set;
    }
    for (i, w) in src.iter().enumerate() {
        let mut w = *w;
        while w != 0 {
            let b = u64::from(w.trailing_zeros());
            w &= w - 1;
            let p = i as u64 * 64 + b;
            if p >= count {
                break;
            }
            let q = at + p;
            if let Some(d) = dst.get_mut((q / 64) as usize) {
                *d |= 1 << (q % 64);
                set += 1;
            }
        }
    }
    set
}

/// The supported CPUID with vCPU `id`'s APIC ids filled in.
fn cpuid_for(base: &CpuId, id: u32) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => e.ebx = (e.ebx & 0x00ff_ffff) | (id << 24),
            0xb | 0x1f => e.edx = id,
            _ => {}
        }
    }
    c
}

/// Keeps a VM's memslots equal to the RAM ranges of a memory map's flat view.
pub struct KvmMemoryListener {
    /// The VM.
    pub kvm: Arc<KvmVm>,
    /// The RAM blocks the map's RAM regions name.
    pub blocks: Vec<Arc<GuestRam>>,
}

impl MapListener for KvmMemoryListener {
    fn commit(&self, _old: &FlatView, new: &FlatView) -> Result<(), String> {
        let mut want = Vec::new();
        for r in &new.ranges {
            let Some((block, offset)) = &r.ram else {
                continue;
            };
            let ram = self
                .blocks
                .iter()
                .find(|b| b.name() == block)
                .ok_or_else(|| format!("memory region {}: no RAM block {block}", r.region))?;
            let size = r.end - r.start;
            if offset.checked_add(size).is_none_or(|e| e > ram.size()) {
                return Err(format!(
                    "memory region {}: {size:#x} bytes at offset {offset:#x} do not fit RAM block {block}",
                    r.region
                ));
            }
            want.push(SlotSpec {
                gpa: r.start,
                ram: ram.clone(),
                offset: *offset,
                size,
            });
        }
        self.kvm.set_memory(&want)
    }
}

/// One RAM block of a KVM VM as the engine sees it: the RAM's mapping, and a dirty log that
/// joins what KVM logged for the vCPUs with what devices wrote through `vm-memory`.
pub struct KvmRamBlock {
    /// The RAM.
    pub ram: Arc<GuestRam>,
    /// The VM whose memslots map it.
    pub kvm: Arc<KvmVm>,
}

impl RamBlock for KvmRamBlock {
    fn name(&self) -> &str {
        self.ram.name()
    }

    fn region(&self) -> GuestRegion<'_> {
        self.ram.region()
    }

    fn start_dirty_log(&self) {
        if let Err(e) = self.kvm.set_logging(&self.ram, true) {
            log::error!("{}: cannot start KVM dirty logging: {e}", self.ram.name());
        }
        self.ram.start_dirty_log();
    }

    fn sync_dirty_log(&self, bitmap: &mut [u64]) {
        if let Err(e) = self.kvm.harvest(&self.ram, bitmap) {
            // Without the log the engine could miss pages: mark everything dirty instead.
            log::error!(
                "{}: KVM dirty log: {e}; resending all pages",
                self.ram.name()
            );
            for w in bitmap.iter_mut() {
                *w = u64::MAX;
            }
        }
        self.ram.sync_dirty_log(bitmap);
    }

    fn stop_dirty_log(&self) {
        if let Err(e) = self.kvm.set_logging(&self.ram, false) {
            log::error!("{}: cannot stop KVM dirty logging: {e}", self.ram.name());
        }
        self.ram.stop_dirty_log();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn or_shifted_places_bits_at_any_page() {
        let mut d = vec![0u64; 3];
        assert_eq!(or_shifted(&mut d, &[0b1011, u64::MAX], 64, 66), 5);
        assert_eq!(d, vec![0, 0b1011, 0b11]);
        let mut d = vec![0u64; 3];
        assert_eq!(or_shifted(&mut d, &[1 | 1 << 63], 10, 64), 2);
        assert_eq!(d, vec![1 << 10, 1 << 9, 0]);
    }

    #[test]
    fn ring_size_must_be_a_power_of_two() {
        assert!(KvmOptions {
            dirty_ring_size: 4096
        }
        .check()
        .is_ok());
        assert_eq!(
            KvmOptions {
                dirty_ring_size: 1000
            }
            .check()
            .unwrap_err(),
            "dirty-ring-size must be a power of two."
        );
    }
}
