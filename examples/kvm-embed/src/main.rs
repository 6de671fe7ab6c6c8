//! A minimal VMM embedding livemig's migration engine: guest memory is `vm-memory`'s, the vCPU
//! `kvm-ioctls`'. The engine sees them through its seams: a `RamBlock` per memory region (lent
//! without a copy, dirty pages from `KVM_GET_DIRTY_LOG`) and a `Machine` with one `DeviceState`
//! (the vCPU's registers). It boots the `guest` crate's workload (firmware: `vm::kvm::boot`),
//! migrates it running to a second instance over a unix socket, and checks the copy: same RAM,
//! valid pages, the guest carrying on. Run: `cargo run -p kvm-embed`.

use guest::layout::{PIO_BASE, SYS_BASE, SYS_SIZE};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use migration::guest::{GuestRegion, MmapRamBlock, RamBlock};
use migration::machine::{DeviceState, Machine, Reader, Writer};
use migration::runstate::RunState;
use migration::{Migration, MigrationError, MigrationOptions, MigrationStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use vm_memory::{
    bitmap::AtomicBitmap, GuestAddress, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};
use wire::vmstate::{FieldKind, VmsdDesc};

const RAM: u64 = 16 << 20;

/// A memory region as the engine sees it: vm-memory's mapping, KVM's dirty log.
struct Block {
    mem: MmapRamBlock,
    vm: Arc<VmFd>,
    slot: u32,
}

impl Block {
    #[allow(unsafe_code)] // the memslot ioctl: KVM keeps the host address
    fn set_slot(&self, flags: u32) {
        let (region, gpa) = (self.mem.region(), self.mem.mmap().start_addr().0);
        let r = kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: region.len() as u64,
            userspace_addr: region.host_addr() as u64,
        };
        // SAFETY: the mapping belongs to `self.mem`, which lives as long as the VM (both are
        // dropped with the Vmm).
        unsafe { self.vm.set_user_memory_region(r) }.expect("KVM_SET_USER_MEMORY_REGION");
    }
}

impl RamBlock for Block {
    fn name(&self) -> &str {
        self.mem.name()
    }
    fn region(&self) -> GuestRegion<'_> {
        self.mem.region()
    }
    fn start_dirty_log(&self) {
        self.set_slot(KVM_MEM_LOG_DIRTY_PAGES);
        self.mem.start_dirty_log()
    }
    fn sync_dirty_log(&self, bitmap: &mut [u64]) {
        let log = self.vm.get_dirty_log(self.slot, self.mem.region().len()).expect("dirty log");
        bitmap.iter_mut().zip(log).for_each(|(b, w)| *b |= w);
        self.mem.sync_dirty_log(bitmap); // what devices wrote through vm-memory
    }
    fn stop_dirty_log(&self) {
        self.set_slot(0)
    }
}

/// The VMM: two memory regions, one vCPU on its own thread, a run state.
struct Vmm {
    vcpu: Arc<Mutex<VcpuFd>>,
    blocks: Vec<Arc<Block>>,
    state: Mutex<RunState>,
}

impl Vmm {
    fn new(incoming: bool) -> Arc<Vmm> {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("VM"));
        vm.set_tss_address(0xfffb_d000).expect("TSS");
        let block = |name: &str, slot, gpa, size| {
            let map = MmapRegion::<AtomicBitmap>::new(size as usize).expect("mmap");
            let region = GuestRegionMmap::new(map, GuestAddress(gpa)).expect("region");
            let mem = MmapRamBlock::new(name, Arc::new(region)).expect("block");
            let b = Arc::new(Block { mem, vm: vm.clone(), slot });
            b.set_slot(0);
            b
        };
        let blocks = vec![block("ram", 0, 0, RAM), block("sys", 1, SYS_BASE, SYS_SIZE)];
        let vcpu = vm.create_vcpu(0).expect("vCPU");
        let cpuid = kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES).expect("cpuid");
        vcpu.set_cpuid2(&cpuid).expect("cpuid");
        // The special registers are the firmware's on both sides; the registers migrate.
        vcpu.set_sregs(&vm::kvm::boot::entry_sregs(vcpu.get_sregs().expect("sregs")))
            .expect("sregs");
        if !incoming {
            let cfg =
                vm::workload::WorkloadConfig { fill: 2 << 20, hot: 1 << 20, ..Default::default() };
            vm::kvm::boot::load(&**blocks[1].mem.mmap(), RAM, 1, &cfg, false).expect("firmware");
            vcpu.set_regs(&vm::kvm::boot::entry_regs(0)).expect("regs");
        }
        let state = Mutex::new(if incoming { RunState::InMigrate } else { RunState::Prelaunch });
        let vcpu = Arc::new(Mutex::new(vcpu));
        let vmm = Arc::new(Vmm { vcpu, blocks, state });
        let v = vmm.clone();
        std::thread::spawn(move || v.vcpu_loop());
        vmm
    }

    fn vcpu_loop(&self) {
        loop {
            // Checked with the vCPU held: `stop` takes it after changing the state.
            let mut vcpu = self.vcpu.lock().expect("vcpu");
            if self.runstate() != RunState::Running {
                drop(vcpu);
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            match vcpu.run() {
                // The guest's ports (serial, progress, idle): nothing to do but go on.
                Ok(VcpuExit::MmioWrite(a, _)) | Ok(VcpuExit::MmioRead(a, _)) if a >= PIO_BASE => {}
                other => panic!("guest stopped: {other:?}"),
            }
        }
    }

    fn steps(&self) -> u64 {
        vm::kvm::boot::vcpu_state(&**self.blocks[1].mem.mmap(), 0).steps
    }

    fn run_until(&self, steps: u64) {
        self.start();
        while self.steps() < steps {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// The vCPU's general registers, as one device section.
struct Cpu(Arc<Mutex<VcpuFd>>);

impl DeviceState for Cpu {
    fn idstr(&self) -> String {
        "embed-cpu".into()
    }
    fn vmsd(&self) -> VmsdDesc {
        VmsdDesc::new("embed-cpu", 1).field("regs", FieldKind::Buffer(18 * 8))
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let mut regs = self.0.lock().expect("vcpu").get_regs().expect("regs");
        gprs(&mut regs).iter().try_for_each(|v| w.put_bytes(&v.to_le_bytes()))?;
        Ok(())
    }
    fn load(&self, r: &mut Reader, _: u32) -> Result<(), MigrationError> {
        let mut regs = kvm_regs::default();
        for v in gprs(&mut regs) {
            *v = u64::from_le_bytes(r.array::<8>()?);
        }
        let vcpu = self.0.lock().expect("vcpu");
        vcpu.set_regs(&regs).map_err(|e| MigrationError::Load(e.to_string()))
    }
}

fn gprs(r: &mut kvm_regs) -> [&mut u64; 18] {
    let kvm_regs { rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, .. } = r;
    let kvm_regs { r12, r13, r14, r15, rip, rflags, .. } = r;
    [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags]
}

impl Machine for Vmm {
    fn machine_type(&self) -> String {
        "kvm-embed".into()
    }
    fn ram_blocks(&self) -> Vec<Arc<dyn RamBlock>> {
        self.blocks.iter().map(|b| b.clone() as Arc<dyn RamBlock>).collect()
    }
    fn devices(&self) -> Vec<Arc<dyn DeviceState>> {
        vec![Arc::new(Cpu(self.vcpu.clone()))]
    }
    fn block_layer(&self) -> Option<Arc<block::BlockLayer>> {
        None
    }
    fn runstate(&self) -> RunState {
        *self.state.lock().expect("state")
    }
    fn stop(&self, state: RunState) {
        self.set_runstate(state);
        // Once we hold the vCPU it has left KVM_RUN; KVM then completes the access the guest
        // exited for, so the state saved is between instructions.
        let mut vcpu = self.vcpu.lock().expect("vcpu");
        vcpu.set_kvm_immediate_exit(1);
        let _ = vcpu.run();
        vcpu.set_kvm_immediate_exit(0);
    }
    fn start(&self) {
        self.set_runstate(RunState::Running)
    }
    fn set_runstate(&self, state: RunState) {
        *self.state.lock().expect("state") = state
    }
}

fn main() {
    let events = Arc::new(migration::events::RecordedEvents::default());
    let (src, dst) = (Vmm::new(false), Vmm::new(true));
    let opts = || MigrationOptions { autostart: false, ..Default::default() };
    let m_src = Migration::new(src.clone(), events.clone(), opts());
    let m_dst = Migration::new(dst.clone(), events, opts());
    src.run_until(10_000);
    let sock = std::env::temp_dir().join(format!("kvm-embed-{}.sock", std::process::id()));
    let uri = format!("unix:{}", sock.display());
    m_dst.incoming(&uri).expect("incoming");
    m_src.migrate(&uri).expect("migrate");
    let end = [MigrationStatus::Completed, MigrationStatus::Failed, MigrationStatus::Cancelled];
    assert_eq!(m_src.wait_outgoing(&end, Duration::from_secs(60)), MigrationStatus::Completed);
    assert_eq!(m_dst.wait_incoming(&end, Duration::from_secs(60)), MigrationStatus::Completed);
    let mut ram = [vec![0u8; RAM as usize], vec![0u8; RAM as usize]];
    src.blocks[0].region().read(0, &mut ram[0]);
    dst.blocks[0].region().read(0, &mut ram[1]);
    assert!(ram[0] == ram[1], "RAM differs");
    let check = |p: usize| vm::workload::check_page(&ram[1][p * 4096..][..4096], p as u64);
    let valid = (0..RAM as usize / 4096)
        .filter(|p| matches!(check(*p), vm::workload::PageCheck::Valid { .. }))
        .count();
    let at_stop = dst.steps();
    assert_eq!(at_stop, src.steps());
    dst.run_until(at_stop + 10_000);
    println!("migrated: {} MiB identical, {valid} valid workload pages, guest went on from step {at_stop} to {}",
        RAM >> 20, dst.steps());
    let _ = std::fs::remove_file(sock);
}
