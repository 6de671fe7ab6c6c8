//! What firmware would do before the guest runs: load the guest code into the system block,
//! build identity page tables (2 MiB pages) for RAM, the system block and the virtio-mmio
//! window, a flat 64-bit GDT, the control blocks the workload runs from, and each vCPU's
//! entry state (long mode, paging on, RIP at the code, RDI at its control block).

use crate::memory::GuestRam;
use crate::workload::{Share, VcpuState, WorkloadConfig};
use guest::layout::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestRegionMmap, MemoryRegionAddress};

/// Where the firmware writes: the system block, as the reference VM has it ([`GuestRam`]) or
/// as any `vm-memory` VMM has it (a `GuestRegionMmap`, see the embedding example).
pub trait SysMemory {
    /// Writes `data` at `offset` into the block; false when it does not fit.
    fn write_at(&self, offset: u64, data: &[u8]) -> bool;
    /// Reads `dst.len()` bytes at `offset`; false when out of range.
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> bool;
    /// Writes one little-endian u64.
    fn write_u64(&self, offset: u64, v: u64) -> bool {
        self.write_at(offset, &v.to_le_bytes())
    }
    /// Reads one little-endian u64 (0 when out of range).
    fn read_u64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read_at(offset, &mut b);
        u64::from_le_bytes(b)
    }
}

impl SysMemory for GuestRam {
    fn write_at(&self, offset: u64, data: &[u8]) -> bool {
        self.write(offset, data)
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> bool {
        self.read(offset, dst)
    }
}

impl<B: Bitmap> SysMemory for GuestRegionMmap<B> {
    fn write_at(&self, offset: u64, data: &[u8]) -> bool {
        self.write_slice(data, MemoryRegionAddress(offset)).is_ok()
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> bool {
        self.read_slice(dst, MemoryRegionAddress(offset)).is_ok()
    }
}

const PRESENT: u64 = 1;
/// Every mapping is user-accessible: the guest runs at CPL 3 (see [`entry_sregs`]).
const WRITABLE: u64 = 2 | 4;
const WRITE_THROUGH: u64 = 1 << 3;
const CACHE_DISABLE: u64 = 1 << 4;
const HUGE: u64 = 1 << 7;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// Why the machine cannot boot.
pub fn check_ram(ram_size: u64) -> Result<(), String> {
    if ram_size > MAX_RAM {
        return Err(format!(
            "-accel kvm: at most {} GiB of RAM (the guest's page tables map that much)",
            MAX_RAM >> 30
        ));
    }
    Ok(())
}

/// Writes code, page tables, GDT, control blocks and shared data into `sys` (the system
/// block) for a guest with `ram_size` bytes of RAM and `nvcpus` vCPUs.
pub fn load(
    sys: &(impl SysMemory + ?Sized),
    ram_size: u64,
    nvcpus: u32,
    cfg: &WorkloadConfig,
    has_disk: bool,
) -> Result<(), String> {
    check_ram(ram_size)?;
    if u64::from(nvcpus) > MAX_VCPUS {
        return Err(format!("-accel kvm: at most {MAX_VCPUS} vCPUs"));
    }
    if !sys.write_at(CODE_OFF, guest::IMAGE) {
        return Err("guest code does not fit the system block".into());
    }
    let entry = |off: u64| SYS_BASE + off;
    // PML4: entry 0 -> RAM (first 512 GiB), entry 1 -> system block and device window.
    sys.write_u64(PML4_OFF, entry(PDPT_RAM_OFF) | PRESENT | WRITABLE);
    sys.write_u64(PML4_OFF + 8, entry(PDPT_SYS_OFF) | PRESENT | WRITABLE);
    let gibs = ram_size.div_ceil(ONE_GIB);
    for g in 0..gibs {
        let pd = PD_RAM_OFF + g * 4096;
        sys.write_u64(PDPT_RAM_OFF + g * 8, entry(pd) | PRESENT | WRITABLE);
        for i in 0..512 {
            let gpa = g * ONE_GIB + i * TWO_MIB;
            if gpa >= ram_size {
                break;
            }
            sys.write_u64(pd + i * 8, gpa | PRESENT | WRITABLE | HUGE);
        }
    }
    sys.write_u64(PDPT_SYS_OFF, entry(PD_SYS_OFF) | PRESENT | WRITABLE);
    for i in 0..SYS_SIZE / TWO_MIB {
        sys.write_u64(
            PD_SYS_OFF + i * 8,
            (SYS_BASE + i * TWO_MIB) | PRESENT | WRITABLE | HUGE,
        );
    }
    let mmio_entry = (VIRTIO_MMIO_BASE - SYS_BASE) / TWO_MIB;
    sys.write_u64(
        PD_SYS_OFF + mmio_entry * 8,
        VIRTIO_MMIO_BASE | PRESENT | WRITABLE | HUGE | WRITE_THROUGH | CACHE_DISABLE,
    );
    // GDT: null, kernel code (0x08) and data (0x10), user data (0x1b) and 64-bit code (0x23),
    // TSS (0x28, two slots).
    for (i, d) in [
        0u64,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        0x0000_8b00_0000_0067,
        0,
    ]
    .iter()
    .enumerate()
    {
        sys.write_u64(GDT_OFF + i as u64 * 8, *d);
    }
    let ram_pages = ram_size / 4096;
    for id in 0..nvcpus {
        let cb = CB_OFF + u64::from(id) * CB_SIZE;
        let share = Share::of(cfg, ram_pages, id, nvcpus);
        let st = VcpuState::boot(cfg, id);
        for (field, v) in [
            (CB_ID, u64::from(id)),
            (CB_RNG, st.rng),
            (CB_STEPS, 0),
            (CB_DISK_WRITES, 0),
            (CB_FILL_FIRST, share.fill_first),
            (CB_FILL_PAGES, share.fill_pages),
            (CB_HOT_FIRST, share.hot_first),
            (CB_HOT_PAGES, share.hot_pages),
            (CB_DISK_EVERY, cfg.disk_every),
            (CB_SERIAL_EVERY, cfg.serial_every),
            (CB_SUBMITTED, 0),
            (CB_COMPLETED, 0),
            (CB_IO_ERRORS, 0),
            (CB_IO, SYS_BASE + IO_OFF + u64::from(id) * IO_SIZE),
        ] {
            sys.write_u64(cb + field, v);
        }
    }
    sys.write_u64(SHARED_OFF + SH_NVCPUS, u64::from(nvcpus));
    sys.write_u64(SHARED_OFF + SH_HAS_DISK, u64::from(has_disk));
    sys.write_u64(SHARED_OFF + SH_READY, 0);
    Ok(())
}

/// vCPU `id`'s state as control block `id` holds it (what the VMM reports and verifies).
pub fn vcpu_state(sys: &(impl SysMemory + ?Sized), id: u32) -> VcpuState {
    let cb = CB_OFF + u64::from(id) * CB_SIZE;
    VcpuState {
        id,
        rng: sys.read_u64(cb + CB_RNG),
        steps: sys.read_u64(cb + CB_STEPS),
        disk_writes: sys.read_u64(cb + CB_DISK_WRITES),
    }
}

/// A control-block field of vCPU `id`.
pub fn cb_field(sys: &(impl SysMemory + ?Sized), id: u32, field: u64) -> u64 {
    sys.read_u64(CB_OFF + u64::from(id) * CB_SIZE + field)
}

fn segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The special registers of a vCPU entering the guest in 64-bit mode (starting from the
/// vCPU's current ones, so KVM's defaults for the rest stay).
pub fn entry_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cs = segment(0x23, 11, 1, 0);
    let data = segment(0x1b, 3, 0, 1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x28,
        type_: 11,
        present: 1,
        s: 0,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        unusable: 1,
        type_: 2,
        present: 1,
        ..Default::default()
    };
    s.gdt.base = SYS_BASE + GDT_OFF;
    s.gdt.limit = 7 * 8 - 1;
    s.idt.base = 0;
    s.idt.limit = 0;
    // PE, MP, ET, NE, WP, PG.
    s.cr0 = 0x8005_0033;
    // PAE, OSFXSR, OSXMMEXCPT.
    s.cr4 = 0x620;
    s.cr3 = SYS_BASE + PML4_OFF;
    // SCE, LME, LMA.
    s.efer = 0x501;
    s
}

/// The general registers of vCPU `id` at entry.
pub fn entry_regs(id: u32) -> kvm_regs {
    kvm_regs {
        rip: SYS_BASE + CODE_OFF,
        rsp: SYS_BASE + STACK_OFF + (u64::from(id) + 1) * 4096,
        rdi: SYS_BASE + CB_OFF + u64::from(id) * CB_SIZE,
        // IOPL 3: the guest, at CPL 3, may use its ports (each access still exits to us).
        rflags: 0x3002,
        ..Default::default()
    }
}
