// The guest's memory layout and I/O ports, shared by the VMM (`guest::layout`) and by the
// build script, which turns every `pub const` here into an `.equ` for the assembler. Keep each
// item a `pub const NAME: u64 = VALUE;` on one line (the build script reads them that way).

/// Guest physical address of the system block (page tables, code, control blocks, stacks,
/// I/O buffers): 512 GiB, above any RAM size the machine accepts.
pub const SYS_BASE: u64 = 0x80_0000_0000;
/// Size of the system block.
pub const SYS_SIZE: u64 = 0x40_0000;
/// Guest physical address of the virtio-mmio device window (right after the system block).
pub const VIRTIO_MMIO_BASE: u64 = 0x80_0040_0000;
/// Size of the virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Guest physical address of the port window: the guest's port `p` is the byte at
/// `PIO_BASE + p` (an MMIO access the VMM handles as a port access; see `guest.S`).
pub const PIO_BASE: u64 = 0x80_0041_0000;
/// Size of the port window.
pub const PIO_SIZE: u64 = 0x1_0000;
/// Largest RAM the page tables map (identity, 2 MiB pages): 64 GiB.
pub const MAX_RAM: u64 = 0x10_0000_0000;

/// Offset in the system block of the top-level page table (CR3).
pub const PML4_OFF: u64 = 0x0;
/// Offset of the page-directory-pointer table for RAM (PML4 entry 0).
pub const PDPT_RAM_OFF: u64 = 0x1000;
/// Offset of the first of the 64 page directories mapping RAM.
pub const PD_RAM_OFF: u64 = 0x2000;
/// Offset of the page-directory-pointer table for the system block (PML4 entry 1).
pub const PDPT_SYS_OFF: u64 = 0x42000;
/// Offset of the page directory mapping the system block and the device window.
pub const PD_SYS_OFF: u64 = 0x43000;
/// Offset of the global descriptor table.
pub const GDT_OFF: u64 = 0x44000;
/// Offset where the code is loaded (its entry point is its first byte).
pub const CODE_OFF: u64 = 0x80000;
/// Room for the code.
pub const CODE_MAX: u64 = 0x10000;
/// Offset of the control blocks, one per vCPU.
pub const CB_OFF: u64 = 0x90000;
/// Size of one control block.
pub const CB_SIZE: u64 = 0x100;
/// Offset of the data shared by all vCPUs.
pub const SHARED_OFF: u64 = 0xa0000;
/// Offset of the stacks, one page per vCPU (vCPU n's stack tops at `STACK_OFF + (n+1)*4096`).
pub const STACK_OFF: u64 = 0x100000;
/// Offset of the per-vCPU I/O areas (virtqueue, request header, status, data buffer).
pub const IO_OFF: u64 = 0x200000;
/// Size of one I/O area.
pub const IO_SIZE: u64 = 0x2000;
/// Most vCPUs the layout holds.
pub const MAX_VCPUS: u64 = 256;

/// Control block: vCPU index.
pub const CB_ID: u64 = 0x00;
/// Control block: PRNG state (xorshift64*, never zero).
pub const CB_RNG: u64 = 0x08;
/// Control block: steps taken since boot.
pub const CB_STEPS: u64 = 0x10;
/// Control block: disk writes issued since boot.
pub const CB_DISK_WRITES: u64 = 0x18;
/// Control block: first page of the fill share.
pub const CB_FILL_FIRST: u64 = 0x20;
/// Control block: pages in the fill share.
pub const CB_FILL_PAGES: u64 = 0x28;
/// Control block: first page of the hot share.
pub const CB_HOT_FIRST: u64 = 0x30;
/// Control block: pages in the hot share.
pub const CB_HOT_PAGES: u64 = 0x38;
/// Control block: a disk write every this many steps (0: never).
pub const CB_DISK_EVERY: u64 = 0x40;
/// Control block: a serial line every this many steps (0: never).
pub const CB_SERIAL_EVERY: u64 = 0x48;
/// Control block: requests submitted to the disk (a request counts once it is in the ring).
pub const CB_SUBMITTED: u64 = 0x50;
/// Control block: requests the device completed, as the guest saw them.
pub const CB_COMPLETED: u64 = 0x58;
/// Control block: requests completed with an error status.
pub const CB_IO_ERRORS: u64 = 0x60;
/// Control block: guest physical address of this vCPU's I/O area.
pub const CB_IO: u64 = 0x68;

/// Shared data: number of vCPUs.
pub const SH_NVCPUS: u64 = 0x00;
/// Shared data: 1 when the machine has a virtio-blk device for the workload.
pub const SH_HAS_DISK: u64 = 0x08;
/// Shared data: set by vCPU 0 when the device is ready (or found unusable).
pub const SH_READY: u64 = 0x10;
/// Shared data: disk size in 4 KiB blocks (0: no usable disk).
pub const SH_DISK_BLOCKS: u64 = 0x18;

/// I/O area: descriptor table (3 descriptors used).
pub const IO_DESC: u64 = 0x000;
/// I/O area: available ring.
pub const IO_AVAIL: u64 = 0x100;
/// I/O area: used ring.
pub const IO_USED: u64 = 0x200;
/// I/O area: the request header (type, reserved, sector).
pub const IO_HDR: u64 = 0x300;
/// I/O area: the status byte.
pub const IO_STATUS: u64 = 0x310;
/// I/O area: the data buffer (one page).
pub const IO_BUF: u64 = 0x1000;
/// Entries in each virtqueue.
pub const QUEUE_SIZE: u64 = 4;

/// Port of the serial console's transmit register (COM1).
pub const PORT_SERIAL: u64 = 0x3f8;
/// Port the guest writes after each batch of steps (the VMM paces and pauses it there).
pub const PORT_PROGRESS: u64 = 0x510;
/// Port the guest writes when it has nothing left to do (the VMM sleeps it a while).
pub const PORT_IDLE: u64 = 0x511;
/// Port the guest writes while it waits for the device (the VMM yields).
pub const PORT_WAIT: u64 = 0x512;
/// Steps between two progress exits.
pub const BATCH: u64 = 64;
