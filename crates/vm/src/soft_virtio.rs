//! The software vCPUs' virtio-blk driver: what `guest.S` does for the KVM guest's disk writes,
//! written in Rust for the workload's host threads (`-accel tcg` with
//! `-device virtio-blk,drive=NODE`), so both kinds of vCPU drive the same device the same way.
//!
//! Same layout as the KVM guest (`guest::layout`): a system block `sys` at `SYS_BASE` (it
//! migrates as a second RAM block) holding one control block and one I/O area per vCPU; each
//! vCPU owns virtqueue `id` with three descriptors (header, data page, status) set at boot.
//! The step that writes the disk waits, between steps (where the vCPU can park), for the
//! vCPU's previous request to complete (the used ring's index reaches the control block's
//! `CB_SUBMITTED`); the write fills the data page, puts the request in the available ring,
//! counts it in `CB_SUBMITTED` and notifies the device, without waiting for it to complete.
//! A request still queued when the VM stops migrates in the ring and runs on the destination,
//! exactly as the KVM guest's does.

use crate::kvm::boot::SysMemory;
use crate::memory::GuestRam;
use crate::virtio_blk::VirtioBlk;
use guest::layout::*;

fn reg(dev: &VirtioBlk, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn set(dev: &VirtioBlk, offset: u64, v: u32) {
    dev.write(offset, &v.to_le_bytes());
}

fn io(id: u32) -> u64 {
    IO_OFF + u64::from(id) * IO_SIZE
}

fn cb(id: u32, field: u64) -> u64 {
    CB_OFF + u64::from(id) * CB_SIZE + field
}

/// Brings the device up as firmware (the KVM guest's `disk_init`) does: negotiates
/// VERSION_1 and MQ, sets up queue `i` for vCPU `i` in `sys`, and sets DRIVER_OK.
pub fn init(sys: &GuestRam, dev: &VirtioBlk, nvcpus: u32) -> Result<(), String> {
    if reg(dev, 0x000) != 0x7472_6976 || reg(dev, 0x004) != 2 || reg(dev, 0x008) != 2 {
        return Err("virtio-blk: not a virtio-mmio block device".into());
    }
    set(dev, 0x070, 0);
    set(dev, 0x070, 1);
    set(dev, 0x070, 3);
    set(dev, 0x024, 1);
    set(dev, 0x020, 1); // VIRTIO_F_VERSION_1 (bit 32)
    set(dev, 0x024, 0);
    set(dev, 0x014, 0);
    set(dev, 0x020, reg(dev, 0x010) & 0x1000); // VIRTIO_BLK_F_MQ
    set(dev, 0x070, 11);
    if reg(dev, 0x070) & 8 == 0 {
        return Err("virtio-blk: FEATURES_OK refused".into());
    }
    for id in 0..nvcpus {
        set(dev, 0x030, id);
        if u64::from(reg(dev, 0x034)) < QUEUE_SIZE {
            return Err(format!("virtio-blk: no queue {id}"));
        }
        set(dev, 0x038, QUEUE_SIZE as u32);
        let a = io(id);
        let base = SYS_BASE + a;
        // Descriptors: 0 header -> 1 data -> 2 status (written by the device).
        let descs: [(u64, u32, u16, u16); 3] = [
            (base + IO_HDR, 16, 1, 1),
            (base + IO_BUF, 4096, 1, 2),
            (base + IO_STATUS, 1, 2, 0),
        ];
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            sys.write_at(a + IO_DESC + i as u64 * 16, &d);
        }
        for (lo, addr) in [
            (0x080, base + IO_DESC),
            (0x090, base + IO_AVAIL),
            (0x0a0, base + IO_USED),
        ] {
            set(dev, lo, addr as u32);
            set(dev, lo + 4, (addr >> 32) as u32);
        }
        set(dev, 0x044, 1);
        sys.write_u64(cb(id, CB_ID), u64::from(id));
    }
    set(dev, 0x070, 15);
    Ok(())
}

fn used_idx(sys: &GuestRam, id: u32) -> u16 {
    let mut b = [0u8; 2];
    sys.read_at(io(id) + IO_USED + 2, &mut b);
    u16::from_le_bytes(b)
}

/// Whether vCPU `id`'s previous request is still with the device. Once it is not, counts it
/// completed (`CB_COMPLETED`, as the KVM guest does).
pub fn busy(sys: &GuestRam, id: u32) -> bool {
    let submitted = sys.read_u64(cb(id, CB_SUBMITTED));
    if used_idx(sys, id) != submitted as u16 {
        return true;
    }
    if sys.read_u64(cb(id, CB_COMPLETED)) != submitted {
        sys.write_u64(cb(id, CB_COMPLETED), submitted);
    }
    false
}

/// Queues a write of `data` (one page) to block `block` (already reduced to the disk's size)
/// on vCPU `id`'s queue and notifies the device; does not wait for it. The caller checked
/// that the previous request completed ([`busy`]).
pub fn submit(sys: &GuestRam, dev: &VirtioBlk, id: u32, block: u64, data: &[u8]) {
    let submitted = sys.read_u64(cb(id, CB_SUBMITTED));
    let a = io(id);
    sys.write_at(a + IO_BUF, data);
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
    hdr[8..16].copy_from_slice(&(block * 8).to_le_bytes());
    sys.write_at(a + IO_HDR, &hdr);
    sys.write_at(a + IO_STATUS, &[0xff]);
    let mut idx = [0u8; 2];
    sys.read_at(a + IO_AVAIL + 2, &mut idx);
    let idx = u16::from_le_bytes(idx);
    let slot = u64::from(idx) % QUEUE_SIZE;
    sys.write_at(a + IO_AVAIL + 4 + slot * 2, &0u16.to_le_bytes());
    // The ring entry is visible before the index that publishes it.
    std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
    sys.write_at(a + IO_AVAIL + 2, &idx.wrapping_add(1).to_le_bytes());
    sys.write_u64(cb(id, CB_SUBMITTED), submitted + 1);
    set(dev, 0x050, id);
}
