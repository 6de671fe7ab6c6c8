//! The reference VM's device sections.
//!
//! | idstr | instances | version | body |
//! |---|---|---|---|
//! | `timer` | 1 | 2 | QEMU's TimersState: ticks, 8 unused bytes, the VM clock in ns |
//! | `livemig-workload` | 1 | 1 | the workload configuration (a destination adopts it) |
//! | `livemig-vcpu` | one per vCPU | 1 | id, PRNG state, steps, disk writes |
//! | `livemig-serial` | 1 | 1 | bytes the guest has printed |
//! | `livemig-window` | one per window | 1 | mapped flag and guest physical address |
//! | `livemig-virtio-blk` | with a virtio-blk device | 1 | registers and each queue's addresses, indices and completed count |
//! | `kvmclock`, `livemig-kvm-cpu` | with `-accel kvm`, instead of `livemig-vcpu` | 1 | see [`crate::kvm::state`] |
//!
//! `-M none` has only `timer`, exactly like QEMU 7.2's `-M none`.
//!
//! Loading a window moves a region of the memory map. The engine loads all devices inside one
//! memory-map batch, so eight windows cost one flat-view rebuild, not eight — and under KVM
//! one round of memslot calls for what changed (a window over RAM splits a RAM slot).

use crate::machine::{MachineType, VmCore, WINDOWS};
use migration::machine::{DeviceState, Reader, Writer};
use migration::MigrationError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wire::vmstate::{FieldKind, VmsdDesc};

/// Every device section of the VM, in save order.
pub fn all(core: &Arc<VmCore>) -> Vec<Arc<dyn DeviceState>> {
    let mut v: Vec<Arc<dyn DeviceState>> = vec![Arc::new(Timer(core.clone()))];
    if core.config.machine == MachineType::Livemig {
        v.push(Arc::new(Workload(core.clone())));
        match &core.kvm {
            // Under KVM the workload's state is in guest memory; the vCPUs' is KVM's.
            Some(kvm) => {
                v.push(Arc::new(crate::kvm::state::KvmClock(core.clone())));
                for i in 0..kvm.vcpu_count() as u32 {
                    v.push(Arc::new(crate::kvm::state::KvmCpu(core.clone(), i)));
                }
            }
            None => {
                for i in 0..core.vcpus.len() as u32 {
                    v.push(Arc::new(Vcpu(core.clone(), i)));
                }
            }
        }
        v.push(Arc::new(Serial(core.clone())));
        for i in 0..WINDOWS {
            v.push(Arc::new(Window(core.clone(), i)));
        }
        if let Some(dev) = &core.virtio {
            v.push(Arc::new(crate::virtio_blk::VirtioBlkState(dev.clone())));
        }
    }
    v
}

/// QEMU's `timer` section (TimersState, version 2).
struct Timer(Arc<VmCore>);

impl DeviceState for Timer {
    fn idstr(&self) -> String {
        "timer".into()
    }
    fn vmsd(&self) -> VmsdDesc {
        VmsdDesc::new("timer", 2)
            .minimum(1)
            .field("cpu_ticks_offset", FieldKind::I64)
            .field("unused", FieldKind::Unused(8))
            .field_since("cpu_clock_offset", FieldKind::I64, 2)
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let ns = self.0.clock.now_ns();
        w.put_be64(ns)?;
        w.put_bytes(&[0; 8])?;
        w.put_be64(ns)?;
        Ok(())
    }
    fn load(&self, r: &mut Reader, version_id: u32) -> Result<(), MigrationError> {
        let ticks = r.be64()?;
        r.skip(8)?;
        // Version 1 had no clock offset; continue from the tick count then.
        let clock = if version_id >= 2 { r.be64()? } else { ticks };
        // Values are run time in ns; a negative int64 from a peer makes no sense as one.
        self.0
            .clock
            .set_ns(if (clock as i64) < 0 { 0 } else { clock });
        Ok(())
    }
}

/// The workload configuration.
struct Workload(Arc<VmCore>);

impl DeviceState for Workload {
    fn idstr(&self) -> String {
        "livemig-workload".into()
    }
    fn vmsd(&self) -> VmsdDesc {
        VmsdDesc::new("livemig-workload", 1)
            .field("fill", FieldKind::U64)
            .field("hot", FieldKind::U64)
            .field("dirty_rate", FieldKind::U64)
            .field("disk_every", FieldKind::U64)
            .field("serial_every", FieldKind::U64)
            .field("seed", FieldKind::U64)
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let c = self
            .0
            .workload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for v in [
            c.fill,
            c.hot,
            c.dirty_rate,
            c.disk_every,
            c.serial_every,
            c.seed,
        ] {
            w.put_be64(v)?;
        }
        Ok(())
    }
    fn load(&self, r: &mut Reader, _version_id: u32) -> Result<(), MigrationError> {
        let mut c = self.0.workload.lock().unwrap_or_else(|p| p.into_inner());
        c.fill = r.be64()?;
        c.hot = r.be64()?;
        c.dirty_rate = r.be64()?;
        c.disk_every = r.be64()?;
        c.serial_every = r.be64()?;
        c.seed = r.be64()?;
        Ok(())
    }
}

/// One vCPU.
struct Vcpu(Arc<VmCore>, u32);

impl DeviceState for Vcpu {
    fn idstr(&self) -> String {
        "livemig-vcpu".into()
    }
    fn instance_id(&self) -> u32 {
        self.1
    }
    fn vmsd(&self) -> VmsdDesc {
        VmsdDesc::new("livemig-vcpu", 1)
            .field("id", FieldKind::U32)
            .field("rng", FieldKind::U64)
            .field("steps", FieldKind::U64)
            .field("disk_writes", FieldKind::U64)
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let st = match self.0.vcpus.get(self.1 as usize) {
            Some(s) => *s.lock().unwrap_or_else(|p| p.into_inner()),
            None => return Err(MigrationError::Other(format!("no vCPU {}", self.1))),
        };
        w.put_be32(st.id)?;
        w.put_be64(st.rng)?;
        w.put_be64(st.steps)?;
        w.put_be64(st.disk_writes)?;
        Ok(())
    }
    fn load(&self, r: &mut Reader, _version_id: u32) -> Result<(), MigrationError> {
        let id = r.be32()?;
        let rng = r.be64()?;
        let steps = r.be64()?;
        let disk_writes = r.be64()?;
        if id != self.1 {
            return Err(MigrationError::Load(format!(
                "livemig-vcpu instance {} carries vCPU id {id}",
                self.1
            )));
        }
        if rng == 0 {
            return Err(MigrationError::Load(format!(
                "livemig-vcpu {id}: PRNG state 0 is invalid"
            )));
        }
        let slot = self
            .0
            .vcpus
            .get(self.1 as usize)
            .ok_or_else(|| MigrationError::Load(format!("no vCPU {}", self.1)))?;
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = crate::workload::VcpuState {
            id,
            rng,
            steps,
            disk_writes,
        };
        Ok(())
    }
}

/// The serial console's position.
struct Serial(Arc<VmCore>);

impl DeviceState for Serial {
    fn idstr(&self) -> String {
        "livemig-serial".into()
    }
    fn vmsd(&self) -> VmsdDesc {
        VmsdDesc::new("livemig-serial", 1).field("bytes", FieldKind::U64)
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        w.put_be64(self.0.serial.bytes.load(Ordering::Relaxed))?;
        Ok(())
    }
    fn load(&self, r: &mut Reader, _version_id: u32) -> Result<(), MigrationError> {
        self.0.serial.bytes.store(r.be64()?, Ordering::Relaxed);
        Ok(())
    }
}

/// One MMIO window of the memory map.
struct Window(Arc<VmCore>, u32);

impl Window {
    fn name(&self) -> String {
        format!("window{}", self.1)
    }
}

impl DeviceState for Window {
    fn idstr(&self) -> String {
        "livemig-window".into()
    }
    fn instance_id(&self) -> u32 {
        self.1
    }
    fn vmsd(&self) -> VmsdDesc {
        VmsdDesc::new("livemig-window", 1)
            .field("mapped", FieldKind::Bool)
            .field("gpa", FieldKind::U64)
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let gpa = self.0.memmap.address_of(&self.name());
        w.put_u8(u8::from(gpa.is_some()))?;
        w.put_be64(gpa.unwrap_or(0))?;
        Ok(())
    }
    fn load(&self, r: &mut Reader, _version_id: u32) -> Result<(), MigrationError> {
        let mapped = r.u8()?;
        let gpa = r.be64()?;
        if mapped > 1 {
            return Err(MigrationError::Load(format!(
                "livemig-window {}: mapped flag {mapped} is not a bool",
                self.1
            )));
        }
        if gpa % migration::guest::PAGE_SIZE != 0 {
            return Err(MigrationError::Load(format!(
                "livemig-window {}: address {gpa:#x} is not page-aligned",
                self.1
            )));
        }
        self.0
            .memmap
            .set_address(&self.name(), (mapped == 1).then_some(gpa));
        Ok(())
    }
}
