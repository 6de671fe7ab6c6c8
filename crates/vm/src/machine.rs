//! The reference VM: guest RAM, vCPU threads running the workload, a clock, a serial console,
//! a memory map with MMIO windows, and disks — and its implementation of the engine's
//! [`Machine`] trait.
//!
//! Two machine types:
//! - `none`: QEMU's `-M none` — RAM and disks, no vCPU, and only the sections QEMU's `-M none`
//!   has (`timer`; the engine adds `ram`, `dirty-bitmap` and `globalstate`). Streams are
//!   interchangeable with QEMU 7.2's.
//! - `livemig` (default): adds vCPUs running the deterministic workload, whose state migrates in
//!   `livemig-vcpu` sections, the workload configuration, the serial console and the MMIO
//!   windows.
//!
//! Two accelerators (`-accel`): `tcg` (default) runs the workload on host threads (the
//! "software vCPUs"); `kvm` runs the same workload as x86-64 guest code (the `guest` crate) on
//! KVM vCPUs, with RAM and a 4 MiB system block (code, page tables, control blocks) in KVM
//! memslots, hardware dirty logging, and vCPU state in `livemig-kvm-cpu` sections (see
//! [`crate::kvm`]).

use crate::clock::VmClock;
use crate::devices;
use crate::kvm::{KvmMemoryListener, KvmOptions, KvmRamBlock, KvmVm};
use crate::memmap::{MemoryMap, Region, RegionKind};
use crate::memory::GuestRam;
use crate::runctl::{Gate, RunControl};
use crate::virtio_blk::VirtioBlk;
use crate::workload::{check_page, PageCheck, Share, SideEffect, VcpuState, WorkloadConfig};
use migration::events::EventSink;
use migration::guest::{RamBlock, PAGE_SIZE};
use migration::machine::{DeviceState, Machine};
use migration::runstate::RunState;
use migration::MigrationError;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Machine types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineType {
    /// QEMU's `none`.
    None,
    /// livemig's reference machine.
    Livemig,
}

impl MachineType {
    /// Parses `-M` (QEMU's `none`, or `livemig`; suboptions after a comma are ignored).
    pub fn parse(s: &str) -> Option<MachineType> {
        match s.split(',').next().unwrap_or("") {
            "none" => Some(MachineType::None),
            "livemig" => Some(MachineType::Livemig),
            _ => None,
        }
    }

    /// The name sent in the configuration section.
    pub fn wire_name(self) -> &'static str {
        match self {
            MachineType::None => "none",
            MachineType::Livemig => "livemig-1.0",
        }
    }
}

/// Number of MMIO windows of the `livemig` machine.
pub const WINDOWS: u32 = 8;
/// Where the first window is mapped at boot (above any RAM size the tests use).
pub const WINDOW_BASE: u64 = 0xfe00_0000_0000;

/// What runs the vCPUs (`-accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Host threads stepping the workload in Rust (QEMU's name for its software CPUs).
    #[default]
    Tcg,
    /// KVM vCPUs running the workload as guest code.
    Kvm(KvmOptions),
    /// QEMU's `qtest` accelerator: the vCPUs exist (their state migrates) but never execute
    /// guest code, so the guest changes neither its memory nor its disk; what changes the VM
    /// comes from outside (QMP, the qtest protocol). QEMU's iotests run every VM this way.
    Qtest,
}

/// How to build a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// `-name`.
    pub name: String,
    /// `-M`.
    pub machine: MachineType,
    /// `-m`, bytes.
    pub ram_size: u64,
    /// `-smp` (ignored for `none`, which has no vCPU).
    pub vcpus: u32,
    /// The workload (ignored for `none`).
    pub workload: WorkloadConfig,
    /// The disk node the workload writes to, if any.
    pub workload_disk: Option<String>,
    /// `-serial file:PATH`.
    pub serial: Option<PathBuf>,
    /// Started with `-incoming`: RAM and device state come from a migration.
    pub incoming: bool,
    /// `-S`: do not start the vCPUs.
    pub start_paused: bool,
    /// `-mem-prealloc`: allocate all guest RAM at start-up.
    pub mem_prealloc: bool,
    /// `-accel`.
    pub accel: Accel,
    /// `-device virtio-blk,drive=NODE` was given (NODE is `workload_disk`). Under KVM the
    /// device exists whenever the workload has a disk: the guest writes through it.
    pub virtio_blk: bool,
    /// The name of the BlockBackend the virtio-blk disk is attached through (`-drive
    /// if=virtio,id=NAME`: QMP commands find the disk by it); empty for `-device
    /// virtio-blk,drive=NODE`, which names the node itself.
    pub virtio_blk_backend: String,
    /// `-device virtio-blk,...,id=ID`: the device's id. QEMU reports a device's id, when it
    /// has one, as the `qdev` of its BlockBackend (`blk_get_attached_dev_id`), and HMP's
    /// `qemu-io -d ID` finds the disk by it; a device without one is known by its QOM path.
    pub virtio_blk_id: Option<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            name: String::new(),
            machine: MachineType::Livemig,
            ram_size: 128 << 20,
            vcpus: 1,
            workload: WorkloadConfig::default(),
            workload_disk: None,
            serial: None,
            incoming: false,
            start_paused: false,
            mem_prealloc: false,
            accel: Accel::Tcg,
            virtio_blk: false,
            virtio_blk_backend: String::new(),
            virtio_blk_id: None,
        }
    }
}

/// The serial console: lines the guest prints, appended to a file.
pub struct Serial {
    file: Mutex<Option<File>>,
    /// Bytes the guest has written since boot (migrates).
    pub bytes: AtomicU64,
}

impl Serial {
    fn write(&self, text: &str) {
        self.write_bytes(text.as_bytes());
    }

    /// Bytes the guest sent to the console (a KVM guest sends one per port write).
    pub fn write_bytes(&self, bytes: &[u8]) {
        self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        if let Some(f) = self.file.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = f.write_all(bytes);
        }
    }
}

/// Shared parts of the VM, reachable from vCPU threads and device sections.
pub struct VmCore {
    /// Configuration given at start.
    pub config: VmConfig,
    /// The workload configuration in force (a destination adopts the source's).
    pub workload: Mutex<WorkloadConfig>,
    /// Guest RAM.
    pub ram: Arc<GuestRam>,
    /// Run state and vCPU gate.
    pub run: RunControl,
    /// Guest clock.
    pub clock: VmClock,
    /// vCPU states.
    pub vcpus: Vec<Mutex<VcpuState>>,
    /// Serial console.
    pub serial: Serial,
    /// Memory map.
    pub memmap: MemoryMap,
    /// Disks.
    pub block: Arc<block::BlockLayer>,
    /// Where STOP/RESUME go.
    pub events: Arc<dyn EventSink>,
    /// Pages the workload has written since this process started.
    pub pages_written: AtomicU64,
    /// Each vCPU thread's kernel id (0 until the thread has started).
    pub vcpu_tids: Vec<std::sync::atomic::AtomicI32>,
    /// The KVM VM, with `-accel kvm`.
    pub kvm: Option<Arc<KvmVm>>,
    /// The KVM guest's system block (code, page tables, control blocks), with `-accel kvm`.
    pub sys: Option<Arc<GuestRam>>,
    /// The virtio-blk device.
    pub virtio: Option<Arc<VirtioBlk>>,
}

/// The offset of `addr` in the virtio-mmio window, if it is in it.
fn virtio_offset(addr: u64) -> Option<u64> {
    use guest::layout::{VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
    addr.checked_sub(VIRTIO_MMIO_BASE)
        .filter(|o| *o < VIRTIO_MMIO_SIZE)
}

impl VmCore {
    /// A guest read of device registers at `addr` (a KVM MMIO exit). Returns false when no
    /// device is there.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match (&self.virtio, virtio_offset(addr)) {
            (Some(dev), Some(off)) => {
                dev.read(off, data);
                true
            }
            _ => false,
        }
    }

    /// A guest write to device registers at `addr` (a KVM MMIO exit).
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        match (&self.virtio, virtio_offset(addr)) {
            (Some(dev), Some(off)) => dev.write(off, data),
            _ => log::debug!(
                "write of {} bytes to {addr:#x}: no device there",
                data.len()
            ),
        }
    }

    /// vCPU states: the software vCPUs' own, or, under KVM, what the guest's control blocks
    /// hold.
    pub fn vcpu_states(&self) -> Vec<VcpuState> {
        match (&self.kvm, &self.sys) {
            (Some(kvm), Some(sys)) => (0..kvm.vcpu_count() as u32)
                .map(|i| crate::kvm::boot::vcpu_state(&**sys, i))
                .collect(),
            _ => self
                .vcpus
                .iter()
                .map(|v| *v.lock().unwrap_or_else(|p| p.into_inner()))
                .collect(),
        }
    }
}

/// What [`Vm::verify_disk`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskReport {
    /// Blocks of the disk looked at.
    pub blocks: u64,
    /// Blocks that hold a workload write.
    pub written: u64,
    /// Blocks that hold neither zeros nor one of the writes the model expects: the first few.
    pub mismatched: Vec<u64>,
    /// Number of such blocks.
    pub mismatch_count: u64,
    /// Per vCPU: disk requests the guest issued.
    pub submitted: Vec<u64>,
    /// Per vCPU: disk requests the device completed.
    pub completed: Vec<u64>,
}

/// A running reference VM.
pub struct Vm {
    core: Arc<VmCore>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What `verify_ram` found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamReport {
    /// Pages never written (all zero).
    pub zero: u64,
    /// Complete workload pages.
    pub valid: u64,
    /// Pages that are neither: the first few page numbers.
    pub corrupt: Vec<u64>,
    /// Number of corrupt pages.
    pub corrupt_count: u64,
}

impl Vm {
    /// Builds a VM: maps RAM, creates vCPU threads (stopped), maps the MMIO windows.
    pub fn new(
        config: VmConfig,
        block: Arc<block::BlockLayer>,
        events: Arc<dyn EventSink>,
    ) -> Result<Arc<Vm>, String> {
        let ram = Arc::new(GuestRam::new("ram", config.ram_size).map_err(|e| e.to_string())?);
        if config.mem_prealloc {
            ram.prealloc();
        }
        let nvcpus = match config.machine {
            MachineType::None => 0,
            MachineType::Livemig => config.vcpus.max(1),
        };
        let (kvm, sys) = match config.accel {
            Accel::Tcg | Accel::Qtest => (None, None),
            Accel::Kvm(opts) => {
                crate::kvm::boot::check_ram(config.ram_size)?;
                let kvm = Arc::new(KvmVm::new(nvcpus, opts)?);
                // Memslots come from the memory map, once it is built (below).
                let sys = if nvcpus > 0 {
                    use guest::layout::{SYS_BASE, SYS_SIZE};
                    let sys = Arc::new(
                        GuestRam::at("sys", SYS_BASE, SYS_SIZE).map_err(|e| e.to_string())?,
                    );
                    if !config.incoming {
                        crate::kvm::boot::load(
                            &*sys,
                            config.ram_size,
                            nvcpus,
                            &config.workload,
                            config.workload_disk.is_some(),
                        )?;
                        for id in 0..nvcpus {
                            let vcpu = kvm.vcpu(id as usize).ok_or("no vCPU")?;
                            let sregs = vcpu
                                .get_sregs()
                                .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
                            vcpu.set_sregs(&crate::kvm::boot::entry_sregs(sregs))
                                .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
                            vcpu.set_regs(&crate::kvm::boot::entry_regs(id))
                                .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
                            // Every vCPU starts at the entry point: none waits for INIT/SIPI.
                            vcpu.set_mp_state(kvm_bindings::kvm_mp_state {
                                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
                            })
                            .map_err(|e| format!("KVM_SET_MP_STATE: {e}"))?;
                        }
                    }
                    Some(sys)
                } else {
                    None
                };
                (Some(kvm), sys)
            }
        };
        // Software vCPUs with a virtio-blk disk drive it as the KVM guest does, through
        // virtqueues in a system block of the same layout (see `soft_virtio`).
        let soft_disk = kvm.is_none()
            && nvcpus > 0
            && config.virtio_blk
            && config.workload_disk.is_some()
            && config.machine == MachineType::Livemig;
        let sys = match sys {
            None if soft_disk => {
                use guest::layout::{SYS_BASE, SYS_SIZE};
                Some(Arc::new(
                    GuestRam::at("sys", SYS_BASE, SYS_SIZE).map_err(|e| e.to_string())?,
                ))
            }
            sys => sys,
        };
        let initial = if config.incoming {
            RunState::InMigrate
        } else {
            RunState::Prelaunch
        };
        let serial_file = match &config.serial {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("cannot open serial file {}: {e}", p.display()))?,
            ),
            None => None,
        };
        let memmap = MemoryMap::default();
        memmap.add(Region {
            name: "ram".into(),
            gpa: Some(0),
            size: config.ram_size,
            priority: 0,
            kind: RegionKind::Ram {
                block: "ram".into(),
                offset: 0,
            },
        });
        if let Some(sys) = &sys {
            memmap.add(Region {
                name: "sys".into(),
                gpa: Some(guest::layout::SYS_BASE),
                size: sys.size(),
                priority: 0,
                kind: RegionKind::Ram {
                    block: "sys".into(),
                    offset: 0,
                },
            });
        }
        if config.machine == MachineType::Livemig {
            for i in 0..WINDOWS {
                memmap.add(Region {
                    name: format!("window{i}"),
                    // Firmware maps the windows at boot; an incoming VM gets them from the
                    // source's device state.
                    gpa: (!config.incoming).then(|| WINDOW_BASE + u64::from(i) * PAGE_SIZE),
                    size: PAGE_SIZE,
                    priority: 1,
                    kind: RegionKind::Mmio,
                });
            }
        }
        if let Some(kvm) = &kvm {
            // Every RAM range of the map is a memslot from now on.
            memmap.set_listener(Arc::new(KvmMemoryListener {
                kvm: kvm.clone(),
                blocks: std::iter::once(&ram).chain(sys.as_ref()).cloned().collect(),
            }))?;
        }
        if config.virtio_blk && config.machine == MachineType::None {
            return Err("No 'virtio-bus' bus found for device 'virtio-blk-device'".into());
        }
        let wants_device =
            config.machine == MachineType::Livemig && (config.virtio_blk || kvm.is_some());
        let virtio = match &config.workload_disk {
            Some(node) if wants_device => {
                let mut mem = vec![ram.mmap().clone()];
                mem.extend(sys.iter().map(|s| s.mmap().clone()));
                Some(VirtioBlk::new(
                    node,
                    block.clone(),
                    mem,
                    nvcpus.max(1) as u16,
                )?)
            }
            _ => None,
        };
        // The workload's disk is a guest device (QEMU's `-device virtio-blk,drive=NODE`): it
        // takes the device's permissions, so its image is write-locked against other
        // processes while this VM owns it (an incoming VM takes the locks on activation).
        if let Some(node) = &config.workload_disk {
            block
                .attach_device(
                    node,
                    &config.virtio_blk_backend,
                    config
                        .virtio_blk_id
                        .as_deref()
                        .unwrap_or("/machine/peripheral-anon/livemig-disk"),
                )
                .map_err(|e| format!("disk {node}: {e}"))?;
        }
        let core = Arc::new(VmCore {
            workload: Mutex::new(config.workload.clone()),
            vcpus: (0..nvcpus)
                .map(|i| Mutex::new(VcpuState::boot(&config.workload, i)))
                .collect(),
            run: RunControl::new(initial, nvcpus as usize),
            clock: VmClock::default(),
            serial: Serial {
                file: Mutex::new(serial_file),
                bytes: AtomicU64::new(0),
            },
            memmap,
            block,
            events,
            pages_written: AtomicU64::new(0),
            vcpu_tids: (0..nvcpus)
                .map(|_| std::sync::atomic::AtomicI32::new(0))
                .collect(),
            ram,
            kvm,
            sys,
            virtio,
            config,
        });
        if let (true, Some(dev), Some(sys)) = (soft_disk, &core.virtio, &core.sys) {
            // Firmware brings the device up; an incoming VM gets it from the source.
            if !core.config.incoming {
                crate::soft_virtio::init(sys, dev, nvcpus)?;
            }
        }
        let mut threads = Vec::new();
        for id in 0..nvcpus {
            let c = core.clone();
            let kvm = c.kvm.is_some();
            let qtest = c.config.accel == Accel::Qtest;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("vcpu{id}"))
                    .spawn(move || {
                        if let Some(t) = c.vcpu_tids.get(id as usize) {
                            t.store(nix::unistd::gettid().as_raw(), Ordering::Release);
                        }
                        if kvm {
                            crate::kvm::run::vcpu_thread(&c, id)
                        } else if qtest {
                            idle_vcpu_thread(&c)
                        } else {
                            vcpu_thread(&c, id)
                        }
                    })
                    .map_err(|e| format!("cannot start vCPU thread: {e}"))?,
            );
        }
        Ok(Arc::new(Vm {
            core,
            threads: Mutex::new(threads),
        }))
    }

    /// The shared core (for QMP commands and tests).
    pub fn core(&self) -> &Arc<VmCore> {
        &self.core
    }

    /// Stops the vCPU threads for good and waits for them (process exit).
    pub fn shutdown(&self) {
        if let Some(dev) = &self.core.virtio {
            dev.shutdown();
        }
        self.core.run.quit();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }

    /// Steps taken by each vCPU.
    pub fn vcpu_steps(&self) -> Vec<u64> {
        self.core.vcpu_states().iter().map(|v| v.steps).collect()
    }

    /// A 128-bit hash of all guest RAM, as hex (compare source and destination with the guest
    /// stopped). A running guest's vCPUs are held for the walk, so the hash is of one moment's
    /// RAM.
    pub fn ram_checksum(&self) -> String {
        let _hold = self.core.run.hold();
        let region = self.core.ram.guest_region();
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0u64;
        let size = self.core.ram.size();
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            region.read(off, &mut buf[..n]);
            h.update(&buf[..n]);
            off += n as u64;
        }
        format!("{:032x}", h.digest128())
    }

    /// Checks every page of RAM: zero, or a complete workload page at its own address.
    ///
    /// The vCPUs are held for the walk (the guest stays `running`, no events): a page read while
    /// a vCPU rewrites it would be half old, half new, and look corrupt when it is not.
    pub fn verify_ram(&self) -> RamReport {
        let _hold = self.core.run.hold();
        let region = self.core.ram.guest_region();
        let mut report = RamReport::default();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..self.core.ram.pages() {
            region.read(p * PAGE_SIZE, &mut page);
            match check_page(&page, p) {
                PageCheck::Zero => report.zero += 1,
                PageCheck::Valid { .. } => report.valid += 1,
                PageCheck::Corrupt => {
                    report.corrupt_count += 1;
                    if report.corrupt.len() < 16 {
                        report.corrupt.push(p);
                    }
                }
            }
        }
        report
    }

    /// `query-kvm`'s answer: whether KVM is in use, and whether this host has it.
    pub fn query_kvm(&self) -> serde_json::Value {
        serde_json::json!({
            "enabled": self.core.kvm.is_some(),
            "present": self.core.kvm.is_some() || crate::kvm::available().is_ok(),
        })
    }

    /// Checks the workload's disk against the model: replays each vCPU's first N disk writes
    /// (N = the requests its virtio queue completed; for software vCPUs, its writes) and
    /// expects every block to hold zeros or the last write some vCPU made to it. Also reports
    /// requests issued and completed, so a lost request (never completed) or a duplicated one
    /// (more completed than issued) shows. Run it with the guest stopped.
    pub fn verify_disk(&self) -> Result<DiskReport, String> {
        use crate::workload::{disk_history, fill_page, Share};
        let core = &self.core;
        let node_name = core
            .config
            .workload_disk
            .as_ref()
            .ok_or("the workload has no disk")?;
        let node = core
            .block
            .node(node_name)
            .ok_or_else(|| format!("no block node {node_name}"))?;
        let blocks = node.size().map_err(|e| e.to_string())? / PAGE_SIZE;
        let cfg = core
            .workload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let states = core.vcpu_states();
        let n = states.len() as u32;
        let mut report = DiskReport {
            blocks,
            ..Default::default()
        };
        match (&core.virtio, &core.sys) {
            (Some(dev), Some(sys)) => {
                let queues = dev.queues();
                for st in &states {
                    report.submitted.push(crate::kvm::boot::cb_field(
                        &**sys,
                        st.id,
                        guest::layout::CB_SUBMITTED,
                    ));
                    report
                        .completed
                        .push(queues.get(st.id as usize).map_or(0, |q| q.completed));
                }
            }
            _ => {
                report.submitted = states.iter().map(|s| s.disk_writes).collect();
                report.completed = report.submitted.clone();
            }
        }
        // block -> the last write of each vCPU to it: (vcpu, unreduced block, generation).
        let mut last: std::collections::HashMap<u64, Vec<(u32, u64, u64)>> =
            std::collections::HashMap::new();
        if blocks > 0 {
            for st in &states {
                let share = Share::of(&cfg, core.ram.pages(), st.id, n);
                let done = report.completed.get(st.id as usize).copied().unwrap_or(0);
                for (b, generation) in disk_history(&cfg, &share, st.id, done) {
                    let v = last.entry(b % blocks).or_default();
                    v.retain(|(id, _, _)| *id != st.id);
                    v.push((st.id, b, generation));
                }
            }
        }
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut want = [0u8; PAGE_SIZE as usize];
        for blk in 0..blocks {
            node.read_at(blk * PAGE_SIZE, &mut buf)
                .map_err(|e| e.to_string())?;
            let ok = match last.get(&blk) {
                None => buf.iter().all(|b| *b == 0),
                Some(cands) => {
                    report.written += 1;
                    cands.iter().any(|(id, b, generation)| {
                        fill_page(&mut want, *b, *generation, *id);
                        want[..] == buf[..]
                    })
                }
            };
            if !ok {
                report.mismatch_count += 1;
                if report.mismatched.len() < 16 {
                    report.mismatched.push(blk);
                }
            }
        }
        Ok(report)
    }

    /// Bytes written to the serial console since boot.
    pub fn serial_bytes(&self) -> u64 {
        self.core.serial.bytes.load(Ordering::Relaxed)
    }
}

fn vcpu_thread(core: &VmCore, id: u32) {
    if core.run.gate() == Gate::Quit {
        return;
    }
    let nvcpus = core.vcpus.len() as u32;
    let Some(slot) = core.vcpus.get(id as usize) else {
        return;
    };
    let mut window_start = Instant::now();
    let mut window_pages = 0u64;
    let mut slice_start = Instant::now();
    // Disk writes go through the virtio-blk device when the VM has one (`soft_virtio`).
    let soft = match (&core.virtio, &core.sys) {
        (Some(dev), Some(sys)) if core.kvm.is_none() => Some((dev, sys)),
        _ => None,
    };
    loop {
        if !core.run.is_running() {
            if core.run.park() == Gate::Quit {
                return;
            }
            window_start = Instant::now();
            window_pages = 0;
            slice_start = Instant::now();
        }
        // auto-converge's throttle. The dirty-rate cap counts only the time the vCPU runs,
        // so a throttled vCPU does not catch up afterwards: the workload stands for a
        // CPU-bound guest (slowed to the cap so that tests behave alike on a busy host),
        // whose writes a throttle slows down as it would a real one.
        window_start += core.run.throttle_point(&mut slice_start);
        let cfg = core
            .workload
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let share = Share::of(&cfg, core.ram.pages(), id, nvcpus);
        let mut idle = false;
        let mut waiting = false;
        {
            let mut st = slot.lock().unwrap_or_else(|p| p.into_inner());
            for _ in 0..64 {
                if st.is_idle(&share) {
                    idle = true;
                    break;
                }
                // The step that writes the disk waits (between steps, where the vCPU can
                // park) until the device completed this vCPU's previous request.
                if let Some((_, sys)) = soft {
                    let disk_next =
                        cfg.disk_every != 0 && (st.steps + 1).is_multiple_of(cfg.disk_every);
                    if disk_next && crate::soft_virtio::busy(sys, id) {
                        waiting = true;
                        break;
                    }
                }
                let (write, effect) = st.step(&cfg, &share);
                if let Some(w) = write {
                    core.ram.write(w.offset, &w.data);
                    core.pages_written.fetch_add(1, Ordering::Relaxed);
                    window_pages += 1;
                }
                match effect {
                    SideEffect::None => {}
                    SideEffect::Serial(line) => core.serial.write(&line),
                    SideEffect::Disk { offset, data } => {
                        if let Some(node) = &core.config.workload_disk {
                            match soft {
                                Some((dev, sys)) => {
                                    let blocks = core
                                        .block
                                        .node(node)
                                        .and_then(|n| n.size().ok())
                                        .unwrap_or(0)
                                        / PAGE_SIZE;
                                    if blocks > 0 {
                                        let block = offset / PAGE_SIZE % blocks;
                                        crate::soft_virtio::submit(sys, dev, id, block, &data[..]);
                                    }
                                }
                                None => disk_write(core, node, offset, &data[..]),
                            }
                        }
                    }
                }
            }
        }
        if idle {
            core.run.pause_while_running(Duration::from_millis(20));
            continue;
        }
        if waiting {
            core.run.pause_while_running(Duration::from_micros(100));
            continue;
        }
        if cfg.dirty_rate > 0 {
            // Per-vCPU share of the cap, enforced over one-second windows.
            let per_vcpu = (cfg.dirty_rate / u64::from(nvcpus.max(1))).max(1);
            let el = window_start.elapsed().as_secs_f64();
            let allowed = per_vcpu as f64 * el;
            if window_pages as f64 > allowed {
                let wait = (window_pages as f64 - allowed) / per_vcpu as f64;
                core.run
                    .pause_while_running(Duration::from_secs_f64(wait.min(0.05)));
            }
            if el > 1.0 {
                window_start = Instant::now();
                window_pages = 0;
            }
        }
    }
}

/// A vCPU of the `qtest` accelerator: it takes part in every stop and start (so the run
/// state changes as with any accelerator) but executes nothing.
fn idle_vcpu_thread(core: &VmCore) {
    if core.run.gate() == Gate::Quit {
        return;
    }
    loop {
        if !core.run.is_running() && core.run.park() == Gate::Quit {
            return;
        }
        core.run.pause_while_running(Duration::from_millis(100));
    }
}

/// The workload's disk write: one page at `offset` reduced into the disk.
fn disk_write(core: &VmCore, node: &str, offset: u64, data: &[u8]) {
    // A failed write (node removed, image inactive) is the guest's I/O error; the workload
    // carries on, as a guest would.
    if let Some(n) = core.block.node(node) {
        let blocks = n.size().unwrap_or(0) / PAGE_SIZE;
        if blocks > 0 {
            let off = (offset / PAGE_SIZE % blocks) * PAGE_SIZE;
            let _ = n.write_at(off, data);
        }
    }
}

impl Machine for Vm {
    fn machine_type(&self) -> String {
        self.core.config.machine.wire_name().into()
    }

    fn ram_blocks(&self) -> Vec<Arc<dyn RamBlock>> {
        match &self.core.kvm {
            None => std::iter::once(&self.core.ram)
                .chain(self.core.sys.as_ref())
                .map(|ram| ram.clone() as Arc<dyn RamBlock>)
                .collect(),
            Some(kvm) => std::iter::once(&self.core.ram)
                .chain(self.core.sys.as_ref())
                .map(|ram| {
                    Arc::new(KvmRamBlock {
                        ram: ram.clone(),
                        kvm: kvm.clone(),
                    }) as Arc<dyn RamBlock>
                })
                .collect(),
        }
    }

    fn vcpu_thread_ids(&self) -> Vec<i32> {
        self.core
            .vcpu_tids
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .collect()
    }

    fn devices(&self) -> Vec<Arc<dyn DeviceState>> {
        devices::all(&self.core)
    }

    fn block_layer(&self) -> Option<Arc<block::BlockLayer>> {
        Some(self.core.block.clone())
    }

    fn runstate(&self) -> RunState {
        self.core.run.state()
    }

    fn stop(&self, state: RunState) {
        let was_running = self.core.run.stop(state);
        // With the vCPUs parked, the disk finishes what it took from its rings.
        if let Some(dev) = &self.core.virtio {
            dev.pause();
        }
        if was_running {
            self.core.clock.pause();
            self.core.events.emit("STOP", None);
        }
    }

    fn start(&self) {
        if let Some(dev) = &self.core.virtio {
            dev.resume();
        }
        if self.core.run.start() {
            self.core.clock.resume();
            self.core.events.emit("RESUME", None);
        }
    }

    fn set_runstate(&self, state: RunState) {
        self.core.run.set_state(state);
    }

    fn inactivate_disks(&self) -> Result<(), MigrationError> {
        self.core
            .block
            .inactivate_all()
            .map_err(MigrationError::from)
    }

    fn activate_disks(&self) -> Result<(), MigrationError> {
        self.core.block.activate_all().map_err(MigrationError::from)
    }

    fn begin_device_load(&self) {
        self.core.memmap.begin();
    }

    fn end_device_load(&self) -> Result<(), MigrationError> {
        self.core.memmap.commit();
        // A memslot KVM refused during the batch (or when a device read the map) fails the
        // load: the guest must not run on a map KVM does not have.
        match self.core.memmap.take_error() {
            Some(e) => Err(MigrationError::Load(e)),
            None => Ok(()),
        }
    }

    /// Both accelerators' vCPUs pass the throttle point (a machine without vCPUs, `none`,
    /// has nothing to slow down, as QEMU's `-M none` with `auto-converge`).
    fn can_throttle_vcpus(&self) -> bool {
        true
    }

    fn throttle_vcpus(&self, percent: u8) {
        self.core.run.set_throttle(percent);
    }
}
