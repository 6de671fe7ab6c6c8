//! A virtio-blk device on virtio-mmio (virtio 1.x, MMIO version 2), backed by a block node of
//! the block layer: the guest's disk writes dirty the node's bitmaps and land in its image.
//!
//! **Why virtio-mmio.** The machine has no PCI bus; virtio-mmio is a page of registers at a
//! fixed address (`guest::layout::VIRTIO_MMIO_BASE`), which the KVM guest reaches through its
//! page tables. QEMU's name for this device is `virtio-blk-device` (on a `virtio-bus`);
//! `-device virtio-blk` is accepted as an alias (QEMU's alias names the PCI variant).
//!
//! **Queues.** One virtqueue per vCPU (`VIRTIO_BLK_F_MQ`), so vCPUs never share a ring. The
//! guest polls the used ring; the device raises no interrupt line (the machine wires none) but
//! keeps `InterruptStatus` as the spec says.
//!
//! **Requests in flight at the switchover**, as QEMU handles them: a notification only wakes
//! the device's I/O thread, so requests are asynchronous to the vCPU. When the VM stops, the
//! device stops taking requests from the rings and *drains* the ones it took (they complete,
//! on the source, before the disks are inactivated); requests the guest queued but the device
//! had not taken stay in the avail ring, which migrates with RAM, and the queue's
//! `last_avail_idx` migrates in the device section. When the VM starts — on the destination
//! after a migration — the device looks at every ready queue at once (QEMU kicks its queues at
//! start), so those requests run there, exactly once. Each queue counts the requests it
//! completed (`completed`, in the section), which is how tests prove none was lost or
//! duplicated.

use block::BlockLayer;
use migration::machine::{DeviceState, Reader, Writer};
use migration::MigrationError;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use wire::vmstate::{FieldKind, VmsdDesc};

/// "virt"
const MAGIC: u32 = 0x7472_6976;
/// Device ID of a block device.
const DEVICE_BLOCK: u32 = 2;
/// Vendor ID ("LMIG").
const VENDOR: u32 = 0x474d_494c;
/// Entries a queue may have.
pub const QUEUE_MAX: u16 = 256;

const F_SEG_MAX: u64 = 1 << 2;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_VERSION_1: u64 = 1 << 32;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// Status bits.
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;

/// One virtqueue's configuration and progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queue {
    /// Entries (`QueueNum`).
    pub num: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub avail: u64,
    /// Used (device) ring address.
    pub used: u64,
    /// Next avail entry the device takes.
    pub last_avail_idx: u16,
    /// Next used entry the device fills.
    pub used_idx: u16,
    /// Requests completed since the device was reset.
    pub completed: u64,
}

#[derive(Debug, Default)]
struct Regs {
    status: u32,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    queues: Vec<Queue>,
    /// Queues notified and not yet looked at, one bit each.
    kicks: Vec<bool>,
    /// The VM runs: the I/O thread may take requests.
    running: bool,
    /// The I/O thread is between taking requests and completing them.
    busy: bool,
    quit: bool,
}

/// The device.
pub struct VirtioBlk {
    node: String,
    block: Arc<BlockLayer>,
    mem: GuestMemoryMmap<AtomicBitmap>,
    regs: Mutex<Regs>,
    cv: Condvar,
}

fn dma_err(e: impl std::fmt::Display) -> String {
    format!("virtio-blk: guest memory: {e}")
}

impl VirtioBlk {
    /// A device with `queues` queues over block node `node`, doing DMA into `memory` (the
    /// guest's RAM regions; writes are logged in their bitmaps). Starts its I/O thread.
    pub fn new(
        node: &str,
        block: Arc<BlockLayer>,
        memory: Vec<Arc<GuestRegionMmap<AtomicBitmap>>>,
        queues: u16,
    ) -> Result<Arc<VirtioBlk>, String> {
        let mem = GuestMemoryMmap::from_arc_regions(memory).map_err(dma_err)?;
        let n = usize::from(queues.max(1));
        let dev = Arc::new(VirtioBlk {
            node: node.to_string(),
            block,
            mem,
            regs: Mutex::new(Regs {
                queues: vec![Queue::default(); n],
                kicks: vec![false; n],
                ..Default::default()
            }),
            cv: Condvar::new(),
        });
        let d = dev.clone();
        std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || d.io_thread())
            .map_err(|e| format!("cannot start the virtio-blk thread: {e}"))?;
        Ok(dev)
    }

    fn lock(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The block node it writes to.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Each queue's state (tests and verification).
    pub fn queues(&self) -> Vec<Queue> {
        self.lock().queues.clone()
    }

    fn device_features(&self, nqueues: usize) -> u64 {
        let mut f = F_VERSION_1 | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if nqueues > 1 {
            f |= F_MQ;
        }
        f
    }

    fn capacity_sectors(&self) -> u64 {
        self.block
            .node(&self.node)
            .and_then(|n| n.size().ok())
            .unwrap_or(0)
            / 512
    }

    /// A guest read of register `offset` (0..0x1000).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let r = self.lock();
        let q = r.queues.get(r.queue_sel as usize);
        let v: u64 = match offset {
            0x000 => u64::from(MAGIC),
            0x004 => 2,
            0x008 => u64::from(DEVICE_BLOCK),
            0x00c => u64::from(VENDOR),
            0x010 => {
                let f = self.device_features(r.queues.len());
                match r.device_features_sel {
                    0 => f & 0xffff_ffff,
                    1 => f >> 32,
                    _ => 0,
                }
            }
            0x034 => q.map_or(0, |_| u64::from(QUEUE_MAX)),
            0x044 => q.map_or(0, |q| u64::from(q.ready)),
            0x060 => u64::from(r.interrupt_status),
            0x070 => u64::from(r.status),
            0x0fc => u64::from(r.config_generation),
            o if o >= 0x100 => {
                // struct virtio_blk_config: capacity, size_max, seg_max, geometry, blk_size,
                // topology, writeback, unused, num_queues.
                let mut cfg = [0u8; 64];
                cfg[0..8].copy_from_slice(&self.capacity_sectors().to_le_bytes());
                cfg[12..16].copy_from_slice(&u32::from(QUEUE_MAX - 2).to_le_bytes());
                cfg[20..24].copy_from_slice(&512u32.to_le_bytes());
                cfg[34..36].copy_from_slice(&(r.queues.len() as u16).to_le_bytes());
                let at = (o - 0x100) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = cfg.get(at + i).copied().unwrap_or(0);
                }
                return;
            }
            _ => 0,
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = (v >> (8 * i)) as u8;
        }
    }

    /// A guest write of register `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let v = data
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let v32 = v as u32;
        let mut r = self.lock();
        let sel = r.queue_sel as usize;
        let set_half = |old: u64, hi: bool| {
            if hi {
                (old & 0xffff_ffff) | (u64::from(v32) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(v32)
            }
        };
        match offset {
            0x014 => r.device_features_sel = v32,
            0x020 => {
                let allowed = self.device_features(r.queues.len());
                let f = match r.driver_features_sel {
                    0 => (r.driver_features & !0xffff_ffff) | u64::from(v32),
                    1 => (r.driver_features & 0xffff_ffff) | (u64::from(v32) << 32),
                    _ => r.driver_features,
                };
                r.driver_features = f & allowed;
            }
            0x024 => r.driver_features_sel = v32,
            0x030 => r.queue_sel = v32,
            0x038 => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.num = (v32 as u16).min(QUEUE_MAX);
                }
            }
            0x044 => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.ready = v32 & 1 == 1;
                }
            }
            0x050 => {
                if let Some(k) = r.kicks.get_mut(v32 as usize) {
                    *k = true;
                    self.cv.notify_all();
                }
            }
            0x064 => r.interrupt_status &= !v32,
            0x070 => {
                if v32 == 0 {
                    // Reset: wait for requests in progress, then forget everything.
                    while r.busy {
                        r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner());
                    }
                    let n = r.queues.len();
                    r.queues = vec![Queue::default(); n];
                    r.kicks = vec![false; n];
                    r.driver_features = 0;
                    r.interrupt_status = 0;
                    r.status = 0;
                } else {
                    // FEATURES_OK only sticks for features that include VERSION_1.
                    let mut s = v32;
                    if s & STATUS_FEATURES_OK != 0 && r.driver_features & F_VERSION_1 == 0 {
                        s &= !STATUS_FEATURES_OK;
                    }
                    r.status = s;
                }
            }
            0x080 | 0x084 => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.desc = set_half(q.desc, offset == 0x084);
                }
            }
            0x090 | 0x094 => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.avail = set_half(q.avail, offset == 0x094);
                }
            }
            0x0a0 | 0x0a4 => {
                if let Some(q) = r.queues.get_mut(sel) {
                    q.used = set_half(q.used, offset == 0x0a4);
                }
            }
            _ => log::debug!("virtio-blk: write {v:#x} to register {offset:#x} ignored"),
        }
    }

    /// The VM stops: take no more requests, and return once those taken have completed.
    pub fn pause(&self) {
        let mut r = self.lock();
        r.running = false;
        while r.busy {
            r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The VM starts: look at every ready queue (requests queued before a migration run
    /// now).
    pub fn resume(&self) {
        let mut r = self.lock();
        r.running = true;
        let ready: Vec<bool> = r.queues.iter().map(|q| q.ready).collect();
        for (k, ready) in r.kicks.iter_mut().zip(ready) {
            *k |= ready;
        }
        self.cv.notify_all();
    }

    /// Whether the device has taken requests it has not completed yet (its I/O thread is
    /// between taking and completing them).
    pub fn in_progress(&self) -> bool {
        self.lock().busy
    }

    /// Ends the I/O thread (process exit).
    pub fn shutdown(&self) {
        self.lock().quit = true;
        self.cv.notify_all();
    }

    fn io_thread(&self) {
        loop {
            let queue = {
                let mut r = self.lock();
                loop {
                    if r.quit {
                        return;
                    }
                    if r.running {
                        if let Some(i) = r.kicks.iter().position(|k| *k) {
                            r.kicks[i] = false;
                            r.busy = true;
                            break i;
                        }
                    }
                    r = self.cv.wait(r).unwrap_or_else(|p| p.into_inner());
                }
            };
            if let Err(e) = self.process(queue) {
                log::error!("virtio-blk queue {queue}: {e}; the device needs a reset");
                self.lock().status |= STATUS_NEEDS_RESET;
            }
            self.lock().busy = false;
            self.cv.notify_all();
        }
    }

    /// Takes and completes every request queued on `qi`, while the VM runs.
    fn process(&self, qi: usize) -> Result<(), String> {
        loop {
            let q = {
                let r = self.lock();
                if !r.running || r.status & STATUS_NEEDS_RESET != 0 {
                    return Ok(());
                }
                match r.queues.get(qi) {
                    Some(q) if q.ready && q.num > 0 => *q,
                    _ => return Ok(()),
                }
            };
            let avail_idx: u16 = self
                .mem
                .read_obj(GuestAddress(q.avail + 2))
                .map_err(dma_err)?;
            if avail_idx == q.last_avail_idx {
                return Ok(());
            }
            let slot = u64::from(q.last_avail_idx % q.num);
            let head: u16 = self
                .mem
                .read_obj(GuestAddress(q.avail + 4 + 2 * slot))
                .map_err(dma_err)?;
            let written = self.request(&q, head)?;
            // Complete: used.ring[used_idx % num] = {head, written}; used.idx += 1.
            let uslot = u64::from(q.used_idx % q.num);
            self.mem
                .write_obj(u32::from(head), GuestAddress(q.used + 4 + 8 * uslot))
                .map_err(dma_err)?;
            self.mem
                .write_obj(written, GuestAddress(q.used + 8 + 8 * uslot))
                .map_err(dma_err)?;
            let used_idx = q.used_idx.wrapping_add(1);
            std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
            self.mem
                .write_obj(used_idx, GuestAddress(q.used + 2))
                .map_err(dma_err)?;
            let mut r = self.lock();
            r.interrupt_status |= 1;
            if let Some(q) = r.queues.get_mut(qi) {
                q.last_avail_idx = q.last_avail_idx.wrapping_add(1);
                q.used_idx = used_idx;
                q.completed += 1;
            }
        }
    }

    /// Runs the request whose chain starts at descriptor `head`; returns the bytes written
    /// into device-writable buffers (data and status).
    fn request(&self, q: &Queue, head: u16) -> Result<u32, String> {
        // Walk the chain: (addr, len, writable) per descriptor.
        let mut chain = Vec::new();
        let mut i = head;
        loop {
            if i >= q.num || chain.len() >= usize::from(q.num) {
                return Err(format!("descriptor chain from {head} is malformed"));
            }
            let d = q.desc + 16 * u64::from(i);
            let addr: u64 = self.mem.read_obj(GuestAddress(d)).map_err(dma_err)?;
            let len: u32 = self.mem.read_obj(GuestAddress(d + 8)).map_err(dma_err)?;
            let flags: u16 = self.mem.read_obj(GuestAddress(d + 12)).map_err(dma_err)?;
            let next: u16 = self.mem.read_obj(GuestAddress(d + 14)).map_err(dma_err)?;
            chain.push((addr, len, flags & DESC_F_WRITE != 0));
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            i = next;
        }
        let (Some(&(hdr, hlen, false)), Some(&(status_addr, slen, true))) =
            (chain.first(), chain.last())
        else {
            return Err("request without a readable header and a writable status".into());
        };
        if hlen < 16 || slen < 1 || chain.len() < 2 {
            return Err("request header or status too short".into());
        }
        let kind: u32 = self.mem.read_obj(GuestAddress(hdr)).map_err(dma_err)?;
        let sector: u64 = self.mem.read_obj(GuestAddress(hdr + 8)).map_err(dma_err)?;
        let data = &chain[1..chain.len() - 1];
        let mut written = 1u32;
        let status = match kind {
            T_OUT | T_IN => match self.rw(kind, sector, data, &mut written) {
                Ok(()) => S_OK,
                Err(e) => {
                    log::warn!("virtio-blk: {e}");
                    S_IOERR
                }
            },
            T_FLUSH => match self.block.node(&self.node).map(|n| n.flush()) {
                Some(Ok(())) => S_OK,
                _ => S_IOERR,
            },
            T_GET_ID => {
                let mut id = [0u8; 20];
                let n = self.node.len().min(20);
                id[..n].copy_from_slice(&self.node.as_bytes()[..n]);
                match data.first() {
                    Some(&(a, l, true)) => {
                        let l = (l as usize).min(20);
                        self.mem
                            .write_slice(&id[..l], GuestAddress(a))
                            .map_err(dma_err)?;
                        written += l as u32;
                        S_OK
                    }
                    _ => S_IOERR,
                }
            }
            _ => S_UNSUPP,
        };
        self.mem
            .write_obj(status, GuestAddress(status_addr))
            .map_err(dma_err)?;
        Ok(written)
    }

    fn rw(
        &self,
        kind: u32,
        sector: u64,
        data: &[(u64, u32, bool)],
        written: &mut u32,
    ) -> Result<(), String> {
        let node = self
            .block
            .node(&self.node)
            .ok_or_else(|| format!("no block node {}", self.node))?;
        let mut off = sector
            .checked_mul(512)
            .ok_or_else(|| format!("sector {sector} is out of range"))?;
        let size = node.size().map_err(|e| e.to_string())?;
        for &(addr, len, writable) in data {
            if off.checked_add(u64::from(len)).is_none_or(|e| e > size) {
                return Err(format!("sector {sector}: beyond the end of {}", self.node));
            }
            let mut buf = vec![0u8; len as usize];
            if kind == T_OUT {
                if writable {
                    return Err("write request with a device-writable data buffer".into());
                }
                self.mem
                    .read_slice(&mut buf, GuestAddress(addr))
                    .map_err(dma_err)?;
                node.write_at(off, &buf).map_err(|e| e.to_string())?;
            } else {
                if !writable {
                    return Err("read request with a read-only data buffer".into());
                }
                node.read_at(off, &mut buf).map_err(|e| e.to_string())?;
                self.mem
                    .write_slice(&buf, GuestAddress(addr))
                    .map_err(dma_err)?;
                *written += len;
            }
            off += u64::from(len);
        }
        Ok(())
    }
}

fn queue_vmsd() -> VmsdDesc {
    VmsdDesc::new("virtqueue", 1)
        .field("num", FieldKind::U16)
        .field("ready", FieldKind::Bool)
        .field("desc", FieldKind::U64)
        .field("avail", FieldKind::U64)
        .field("used", FieldKind::U64)
        .field("last_avail_idx", FieldKind::U16)
        .field("used_idx", FieldKind::U16)
        .field("completed", FieldKind::U64)
}

/// The device as a section (`livemig-virtio-blk`, saved after the VM stopped, so no request
/// is half done).
pub struct VirtioBlkState(pub Arc<VirtioBlk>);

impl DeviceState for VirtioBlkState {
    fn idstr(&self) -> String {
        "livemig-virtio-blk".into()
    }
    fn vmsd(&self) -> VmsdDesc {
        let n = self.0.lock().queues.len();
        VmsdDesc::new("livemig-virtio-blk", 1)
            .field("status", FieldKind::U32)
            .field("device_features_sel", FieldKind::U32)
            .field("driver_features", FieldKind::U64)
            .field("driver_features_sel", FieldKind::U32)
            .field("queue_sel", FieldKind::U32)
            .field("interrupt_status", FieldKind::U32)
            .field("config_generation", FieldKind::U32)
            .field("num_queues", FieldKind::U32)
            .field(
                "queues",
                FieldKind::Array(Box::new(FieldKind::Struct(Box::new(queue_vmsd()))), n),
            )
    }
    fn save(&self, w: &mut Writer) -> Result<(), MigrationError> {
        let r = self.0.lock();
        for v in [r.status, r.device_features_sel] {
            w.put_be32(v)?;
        }
        w.put_be64(r.driver_features)?;
        for v in [
            r.driver_features_sel,
            r.queue_sel,
            r.interrupt_status,
            r.config_generation,
            r.queues.len() as u32,
        ] {
            w.put_be32(v)?;
        }
        for q in &r.queues {
            w.put_be16(q.num)?;
            w.put_u8(u8::from(q.ready))?;
            w.put_be64(q.desc)?;
            w.put_be64(q.avail)?;
            w.put_be64(q.used)?;
            w.put_be16(q.last_avail_idx)?;
            w.put_be16(q.used_idx)?;
            w.put_be64(q.completed)?;
        }
        Ok(())
    }
    fn load(&self, r: &mut Reader, _version_id: u32) -> Result<(), MigrationError> {
        let status = r.be32()?;
        let device_features_sel = r.be32()?;
        let driver_features = r.be64()?;
        let driver_features_sel = r.be32()?;
        let queue_sel = r.be32()?;
        let interrupt_status = r.be32()?;
        let config_generation = r.be32()?;
        let n = r.be32()?;
        let mut regs = self.0.lock();
        if n as usize != regs.queues.len() {
            return Err(MigrationError::Load(format!(
                "livemig-virtio-blk: the source has {n} queues, this device {}",
                regs.queues.len()
            )));
        }
        let mut queues = Vec::with_capacity(n as usize);
        for i in 0..n {
            let q = Queue {
                num: r.be16()?,
                ready: match r.u8()? {
                    0 => false,
                    1 => true,
                    b => {
                        return Err(MigrationError::Load(format!(
                            "livemig-virtio-blk: queue {i}: ready flag {b} is not a bool"
                        )))
                    }
                },
                desc: r.be64()?,
                avail: r.be64()?,
                used: r.be64()?,
                last_avail_idx: r.be16()?,
                used_idx: r.be16()?,
                completed: r.be64()?,
            };
            if q.num > QUEUE_MAX {
                return Err(MigrationError::Load(format!(
                    "livemig-virtio-blk: queue {i}: {} entries (at most {QUEUE_MAX})",
                    q.num
                )));
            }
            queues.push(q);
        }
        regs.status = status;
        regs.device_features_sel = device_features_sel;
        regs.driver_features = driver_features & self.0.device_features(n as usize);
        regs.driver_features_sel = driver_features_sel;
        regs.queue_sel = queue_sel;
        regs.interrupt_status = interrupt_status;
        regs.config_generation = config_generation;
        regs.queues = queues;
        regs.kicks = vec![false; n as usize];
        Ok(())
    }
}
