//! vCPU state and the KVM clock as device sections, with vmstate descriptions so that
//! `livemig analyze` shows every register.
//!
//! | idstr | instances | version | body |
//! |---|---|---|---|
//! | `kvmclock` | 1 | 1 | the KVM clock (ns), as QEMU's `kvmclock` section |
//! | `livemig-kvm-cpu` | one per vCPU | 1 | registers, special registers, XSAVE area (FPU, SSE, AVX), XCR0, MSRs, local APIC, pending events, MP state |
//!
//! Saved with the vCPUs parked (after their last exit was completed, see `run.rs`); loaded
//! before they run again. Values come from a peer, so KVM checks them on load and a refusal
//! fails the migration with what was refused.

use crate::machine::VmCore;
use kvm_bindings::{
    kvm_clock_data, kvm_dtable, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use migration::machine::{DeviceState, Reader, Writer};
use migration::MigrationError;
use std::sync::Arc;
use wire::vmstate::{FieldKind, VmsdDesc};

/// The MSRs that migrate, by name and index (those QEMU migrates that a 64-bit guest can
/// change without special CPU features).
pub const MSRS: &[(&str, u32)] = &[
    ("tsc", 0x10),
    ("sysenter_cs", 0x174),
    ("sysenter_esp", 0x175),
    ("sysenter_eip", 0x176),
    ("misc_enable", 0x1a0),
    ("pat", 0x277),
    ("star", 0xc000_0081),
    ("lstar", 0xc000_0082),
    ("cstar", 0xc000_0083),
    ("fmask", 0xc000_0084),
    ("kernel_gs_base", 0xc000_0102),
];

const GPRS: [&str; 18] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
    "r14", "r15", "rip", "rflags",
];

fn segment_vmsd() -> VmsdDesc {
    VmsdDesc::new("kvm_segment", 1)
        .field("base", FieldKind::U64)
        .field("limit", FieldKind::U32)
        .field("selector", FieldKind::U16)
        .field("type", FieldKind::U8)
        .field("present", FieldKind::U8)
        .field("dpl", FieldKind::U8)
        .field("db", FieldKind::U8)
        .field("s", FieldKind::U8)
        .field("l", FieldKind::U8)
        .field("g", FieldKind::U8)
        .field("avl", FieldKind::U8)
        .field("unusable", FieldKind::U8)
}

fn dtable_vmsd() -> VmsdDesc {
    VmsdDesc::new("kvm_dtable", 1)
        .field("base", FieldKind::U64)
        .field("limit", FieldKind::U16)
}

/// The layout of a `livemig-kvm-cpu` section.
pub fn cpu_vmsd() -> VmsdDesc {
    let mut regs = VmsdDesc::new("kvm_regs", 1);
    for r in GPRS {
        regs = regs.field(r, FieldKind::U64);
    }
    let seg = || FieldKind::Struct(Box::new(segment_vmsd()));
    let dt = || FieldKind::Struct(Box::new(dtable_vmsd()));
    let sregs = VmsdDesc::new("kvm_sregs", 1)
        .field("cs", seg())
        .field("ds", seg())
        .field("es", seg())
        .field("fs", seg())
        .field("gs", seg())
        .field("ss", seg())
        .field("tr", seg())
        .field("ldt", seg())
        .field("gdt", dt())
        .field("idt", dt())
        .field("cr0", FieldKind::U64)
        .field("cr2", FieldKind::U64)
        .field("cr3", FieldKind::U64)
        .field("cr4", FieldKind::U64)
        .field("cr8", FieldKind::U64)
        .field("efer", FieldKind::U64)
        .field("apic_base", FieldKind::U64)
        .field(
            "interrupt_bitmap",
            FieldKind::Array(Box::new(FieldKind::U64), 4),
        );
    let mut msrs = VmsdDesc::new("kvm_msrs", 1);
    for (name, _) in MSRS {
        msrs = msrs.field(*name, FieldKind::U64);
    }
    let events = VmsdDesc::new("kvm_vcpu_events", 1)
        .field("exception_injected", FieldKind::U8)
        .field("exception_nr", FieldKind::U8)
        .field("exception_has_error_code", FieldKind::U8)
        .field("exception_pending", FieldKind::U8)
        .field("exception_error_code", FieldKind::U32)
        .field("interrupt_injected", FieldKind::U8)
        .field("interrupt_nr", FieldKind::U8)
        .field("interrupt_soft", FieldKind::U8)
        .field("interrupt_shadow", FieldKind::U8)
        .field("nmi_injected", FieldKind::U8)
        .field("nmi_pending", FieldKind::U8)
        .field("nmi_masked", FieldKind::U8)
        .field("sipi_vector", FieldKind::U32)
        .field("flags", FieldKind::U32)
        .field("smi_smm", FieldKind::U8)
        .field("smi_pending", FieldKind::U8)
        .field("smi_inside_nmi", FieldKind::U8)
        .field("smi_latched_init", FieldKind::U8)
        .field("triple_fault_pending", FieldKind::U8)
        .field("exception_has_payload", FieldKind::U8)
        .field("exception_payload", FieldKind::U64);
    VmsdDesc::new("livemig-kvm-cpu", 1)
        .field("id", FieldKind::U32)
        .field("regs", FieldKind::Struct(Box::new(regs)))
        .field("sregs", FieldKind::Struct(Box::new(sregs)))
        .field("xsave", FieldKind::Buffer(4096))
        .field("xcr0", FieldKind::U64)
        .field("msrs", FieldKind::Struct(Box::new(msrs)))
        .field("lapic", FieldKind::Buffer(1024))
        .field("mp_state", FieldKind::U32)
        .field("events", FieldKind::Struct(Box::new(events)))
}

/// Everything `livemig-kvm-cpu` carries for one vCPU.
#[derive(Clone)]
pub struct CpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// The XSAVE area (x87, SSE, AVX state).
    pub xsave: Box<[u8; 4096]>,
    /// XCR0.
    pub xcr0: u64,
    /// Values of [`MSRS`], in order.
    pub msrs: Vec<u64>,
    /// Local APIC registers.
    pub lapic: Box<[u8; 1024]>,
    /// KVM's multiprocessing state.
    pub mp_state: u32,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
}

impl Default for CpuState {
    fn default() -> Self {
        CpuState {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: Box::new([0; 4096]),
            xcr0: 1,
            msrs: Vec::new(),
            lapic: Box::new([0; 1024]),
            mp_state: 0,
            events: kvm_vcpu_events::default(),
        }
    }
}

fn kerr(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> MigrationError {
    move |e| MigrationError::Other(format!("{what}: {e}"))
}

fn lerr(id: u32, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> MigrationError {
    move |e| MigrationError::Load(format!("livemig-kvm-cpu {id}: KVM refused the {what}: {e}"))
}

impl CpuState {
    /// Reads vCPU `id`'s state (it must not be running).
    pub fn get(vcpu: &kvm_ioctls::VcpuFd) -> Result<CpuState, MigrationError> {
        let regs = vcpu.get_regs().map_err(kerr("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kerr("KVM_GET_SREGS"))?;
        let x = vcpu.get_xsave().map_err(kerr("KVM_GET_XSAVE"))?;
        let mut xsave = Box::new([0u8; 4096]);
        for (i, w) in x.region.iter().enumerate() {
            xsave[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        let xcrs = vcpu.get_xcrs().map_err(kerr("KVM_GET_XCRS"))?;
        let xcr0 = xcrs
            .xcrs
            .iter()
            .take(xcrs.nr_xcrs as usize)
            .find(|x| x.xcr == 0)
            .map_or(1, |x| x.value);
        let mut list = Msrs::new(MSRS.len()).map_err(|e| MigrationError::Other(e.to_string()))?;
        for (e, (_, index)) in list.as_mut_slice().iter_mut().zip(MSRS) {
            e.index = *index;
        }
        let n = vcpu.get_msrs(&mut list).map_err(kerr("KVM_GET_MSRS"))?;
        if n != MSRS.len() {
            let missing = MSRS.get(n).map_or("?", |m| m.0);
            return Err(MigrationError::Other(format!(
                "KVM_GET_MSRS read {n} of {} MSRs (stopped at {missing})",
                MSRS.len()
            )));
        }
        let msrs = list.as_slice().iter().map(|e| e.data).collect();
        let l = vcpu.get_lapic().map_err(kerr("KVM_GET_LAPIC"))?;
        let mut lapic = Box::new([0u8; 1024]);
        for (d, s) in lapic.iter_mut().zip(l.regs.iter()) {
            *d = *s as u8;
        }
        let mp_state = vcpu
            .get_mp_state()
            .map_err(kerr("KVM_GET_MP_STATE"))?
            .mp_state;
        let events = vcpu
            .get_vcpu_events()
            .map_err(kerr("KVM_GET_VCPU_EVENTS"))?;
        Ok(CpuState {
            regs,
            sregs,
            xsave,
            xcr0,
            msrs,
            lapic,
            mp_state,
            events,
        })
    }

    /// Loads the state into vCPU `id` (it must not be running), in the order QEMU puts it.
    pub fn set(&self, vcpu: &kvm_ioctls::VcpuFd, id: u32) -> Result<(), MigrationError> {
        vcpu.set_regs(&self.regs).map_err(lerr(id, "registers"))?;
        let mut x = kvm_xsave::default();
        for (i, w) in x.region.iter_mut().enumerate() {
            let mut b = [0u8; 4];
            b.copy_from_slice(&self.xsave[i * 4..i * 4 + 4]);
            *w = u32::from_le_bytes(b);
        }
        super::ioctl::set_xsave(vcpu, &x).map_err(lerr(id, "XSAVE area"))?;
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = self.xcr0;
        vcpu.set_xcrs(&xcrs).map_err(lerr(id, "XCR0"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(lerr(id, "special registers"))?;
        let mut list = Msrs::new(MSRS.len()).map_err(|e| MigrationError::Other(e.to_string()))?;
        for ((e, (_, index)), v) in list.as_mut_slice().iter_mut().zip(MSRS).zip(&self.msrs) {
            e.index = *index;
            e.data = *v;
        }
        let n = vcpu.set_msrs(&list).map_err(lerr(id, "MSRs"))?;
        if n != MSRS.len() {
            let bad = MSRS.get(n).map_or("?", |m| m.0);
            return Err(MigrationError::Load(format!(
                "livemig-kvm-cpu {id}: KVM refused MSR {bad}"
            )));
        }
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(lerr(id, "MP state"))?;
        let mut l = kvm_lapic_state::default();
        for (d, s) in l.regs.iter_mut().zip(self.lapic.iter()) {
            *d = *s as _;
        }
        vcpu.set_lapic(&l).map_err(lerr(id, "local APIC"))?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(lerr(id, "pending events"))?;
        Ok(())
    }
}

fn put_segment(w: &mut Writer, s: &kvm_segment) -> Result<(), MigrationError> {
    w.put_be64(s.base)?;
    w.put_be32(s.limit)?;
    w.put_be16(s.selector)?;
    for b in [
        s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
    ] {
        w.put_u8(b)?;
    }
    Ok(())
}

fn get_segment(r: &mut Reader) -> Result<kvm_segment, MigrationError> {
    Ok(kvm_segment {
        base: r.be64()?,
        limit: r.be32()?,
        selector: r.be16()?,
        type_: r.u8()?,
        present: r.u8()?,
        dpl: r.u8()?,
        db: r.u8()?,
        s: r.u8()?,
        l: r.u8()?,
        g: r.u8()?,
        avl: r.u8()?,
        unusable: r.u8()?,
        padding: 0,
    })
}

fn put_dtable(w: &mut Writer, d: &kvm_dtable) -> Result<(), MigrationError> {
    w.put_be64(d.base)?;
    w.put_be16(d.limit)?;
    Ok(())
}

fn get_dtable(r: &mut Reader) -> Result<kvm_dtable, MigrationError> {
    Ok(kvm_dtable {
        base: r.be64()?,
        limit: r.be16()?,
        padding: [0; 3],
    })
}

fn gprs(r: &mut kvm_regs) -> [&mut u64; 18] {
    [
        &mut r.rax,
        &mut r.rbx,
        &mut r.rcx,
        &mut r.rdx,
        &mut r.rsi,
        &mut r.rdi,
        &mut r.rsp,
        &mut r.rbp,
        &mut r.r8,
        &mut r.r9,
        &mut r.r10,
        &mut r.r11,
        &mut r.r12,
        &mut r.r13,
        &mut r.r14,
        &mut r.r15,
        &mut r.rip,
        &mut r.rflags,
    ]
}

/// Writes a `livemig-kvm-cpu` body.
pub fn write_cpu(w: &mut Writer, id: u32, st: &CpuState) -> Result<(), MigrationError> {
    w.put_be32(id)?;
    let mut regs = st.regs;
    for v in gprs(&mut regs) {
        w.put_be64(*v)?;
    }
    let s = &st.sregs;
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(w, seg)?;
    }
    put_dtable(w, &s.gdt)?;
    put_dtable(w, &s.idt)?;
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        w.put_be64(v)?;
    }
    for v in s.interrupt_bitmap {
        w.put_be64(v)?;
    }
    w.put_bytes(&st.xsave[..])?;
    w.put_be64(st.xcr0)?;
    for v in &st.msrs {
        w.put_be64(*v)?;
    }
    w.put_bytes(&st.lapic[..])?;
    w.put_be32(st.mp_state)?;
    let e = &st.events;
    for b in [
        e.exception.injected,
        e.exception.nr,
        e.exception.has_error_code,
        e.exception.pending,
    ] {
        w.put_u8(b)?;
    }
    w.put_be32(e.exception.error_code)?;
    for b in [
        e.interrupt.injected,
        e.interrupt.nr,
        e.interrupt.soft,
        e.interrupt.shadow,
        e.nmi.injected,
        e.nmi.pending,
        e.nmi.masked,
    ] {
        w.put_u8(b)?;
    }
    w.put_be32(e.sipi_vector)?;
    w.put_be32(e.flags)?;
    for b in [
        e.smi.smm,
        e.smi.pending,
        e.smi.smm_inside_nmi,
        e.smi.latched_init,
        e.triple_fault.pending,
        e.exception_has_payload,
    ] {
        w.put_u8(b)?;
    }
    w.put_be64(e.exception_payload)?;
    Ok(())
}

/// Reads a `livemig-kvm-cpu` body; returns the vCPU id it names and the state.
pub fn read_cpu(r: &mut Reader) -> Result<(u32, CpuState), MigrationError> {
    let id = r.be32()?;
    let mut st = CpuState::default();
    for v in gprs(&mut st.regs) {
        *v = r.be64()?;
    }
    let s = &mut st.sregs;
    for seg in [
        &mut s.cs, &mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss, &mut s.tr, &mut s.ldt,
    ] {
        *seg = get_segment(r)?;
    }
    s.gdt = get_dtable(r)?;
    s.idt = get_dtable(r)?;
    for v in [
        &mut s.cr0,
        &mut s.cr2,
        &mut s.cr3,
        &mut s.cr4,
        &mut s.cr8,
        &mut s.efer,
        &mut s.apic_base,
    ] {
        *v = r.be64()?;
    }
    for v in s.interrupt_bitmap.iter_mut() {
        *v = r.be64()?;
    }
    r.read_into(&mut st.xsave[..])?;
    st.xcr0 = r.be64()?;
    st.msrs = (0..MSRS.len())
        .map(|_| r.be64())
        .collect::<Result<_, _>>()?;
    r.read_into(&mut st.lapic[..])?;
    st.mp_state = r.be32()?;
    let e = &mut st.events;
    e.exception.injected = r.u8()?;
    e.exception.nr = r.u8()?;
    e.exception.has_error_code = r.u8()?;
    e.exception.pending = r.u8()?;
    e.exception.error_code = r.be32()?;
    e.interrupt.injected = r.u8()?;
    e.interrupt.nr = r.u8()?;
    e.interrupt.soft = r.u8()?;
    e.interrupt.shadow = r.u8()?;
    e.nmi.injected = r.u8()?;
    e.nmi.pending = r.u8()?;
    e.nmi.masked = r.u8()?;
    e.sipi_vector = r.be32()?;
    e.flags = r.be32()?;
    e.smi.smm = r.u8()?;
    e.smi.pending = r.u8()?;
    e.smi.smm_inside_nmi = r.u8()?;
    e.smi.latched_init = r.u8()?;
    e.triple_fault.pending = r.u8()?;
    e.exception_has_payload = r.u8()?;
    e.exception_payload = r.be64()?;
    Ok((id, st))
}

/// One KVM vCPU as a device section.
pub struct KvmCpu(pub Arc<VmCore>, pub u32);

impl DeviceState for KvmCpu {
    fn idstr(&self) -> String {
        "livemig-kvm-cpu".into()
    }
    fn instance_id(&self) -> u32 {
        self.1
    }
    fn vmsd(&self) -> VmsdDesc {
        cpu_vmsd()
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let kvm = self
            .0
            .kvm
            .as_ref()
            .ok_or_else(|| MigrationError::Other("no KVM".into()))?;
        let st = {
            let vcpu = kvm
                .vcpu(self.1 as usize)
                .ok_or_else(|| MigrationError::Other(format!("no vCPU {}", self.1)))?;
            CpuState::get(&vcpu)?
        };
        write_cpu(w, self.1, &st)
    }
    fn load(&self, r: &mut Reader, _version_id: u32) -> Result<(), MigrationError> {
        let (id, st) = read_cpu(r)?;
        if id != self.1 {
            return Err(MigrationError::Load(format!(
                "livemig-kvm-cpu instance {} carries vCPU id {id}",
                self.1
            )));
        }
        let kvm = self
            .0
            .kvm
            .as_ref()
            .ok_or_else(|| MigrationError::Other("no KVM".into()))?;
        let vcpu = kvm
            .vcpu(self.1 as usize)
            .ok_or_else(|| MigrationError::Load(format!("no vCPU {}", self.1)))?;
        st.set(&vcpu, id)
    }
}

/// The KVM clock (QEMU's `kvmclock` section).
pub struct KvmClock(pub Arc<VmCore>);

impl DeviceState for KvmClock {
    fn idstr(&self) -> String {
        "kvmclock".into()
    }
    fn vmsd(&self) -> VmsdDesc {
        VmsdDesc::new("kvmclock", 1).field("clock", FieldKind::U64)
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let kvm = self
            .0
            .kvm
            .as_ref()
            .ok_or_else(|| MigrationError::Other("no KVM".into()))?;
        let c = kvm.vm_fd().get_clock().map_err(kerr("KVM_GET_CLOCK"))?;
        w.put_be64(c.clock)?;
        Ok(())
    }
    fn load(&self, r: &mut Reader, _version_id: u32) -> Result<(), MigrationError> {
        let clock = r.be64()?;
        let kvm = self
            .0
            .kvm
            .as_ref()
            .ok_or_else(|| MigrationError::Other("no KVM".into()))?;
        kvm.vm_fd()
            .set_clock(&kvm_clock_data {
                clock,
                ..Default::default()
            })
            .map_err(|e| MigrationError::Load(format!("kvmclock: KVM refused clock {clock}: {e}")))
    }
}
