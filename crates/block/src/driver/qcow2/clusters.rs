//! Clusters: how a guest range maps onto the image — reads through L2 entries (data, zero,
//! unallocated from the backing node), copy-on-write of clusters the active layer does not
//! own, and whole-cluster zeroing and discard — with the range and write checks every request
//! passes first.

use super::*;

impl Qcow2Driver {
    pub(super) fn read_backing(&self, off: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let Some(b) = self.backing_node() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size()?;
        let n = bsize.saturating_sub(off).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(n);
        if !head.is_empty() {
            b.child_read_at(off, head)?;
        }
        tail.fill(0);
        Ok(())
    }

    /// Splits `[off, off+len)` into pieces that stay inside one guest cluster.
    pub(super) fn pieces(cs: u64, off: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
        let mut pos = off;
        let end = off + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let n = (cs - pos % cs).min(end - pos);
            let p = (pos, n);
            pos += n;
            Some(p)
        })
    }

    /// The current contents of a whole guest cluster (for copy-on-write).
    pub(super) fn cluster_contents(
        &self,
        meta: &mut Meta,
        cluster: u64,
        e: u64,
    ) -> Result<Vec<u8>, BlockError> {
        let mut buf = vec![0u8; meta.cs as usize];
        match meta.mapping(e)? {
            Mapping::Unallocated => self.read_backing(cluster, &mut buf)?,
            Mapping::Zero => {}
            Mapping::Data(h) => self.file.child_read_at(h, &mut buf)?,
            Mapping::Compressed => return Err(BlockError::Io(Errno::ENOTSUP)),
        }
        Ok(buf)
    }

    /// Writes `data` at `co` inside the guest cluster starting at `cluster`.
    pub(super) fn write_cluster(
        &self,
        meta: &mut Meta,
        cluster: u64,
        co: u64,
        data: &[u8],
    ) -> Result<(), BlockError> {
        let (table, i) = meta.l2_for_write(cluster)?;
        let e = meta.l2_entry(cluster)?;
        let host = e & ENTRY_OFFSET_MASK;
        let owned = host != 0 && e & OFLAG_COPIED != 0 && e & OFLAG_COMPRESSED == 0;
        let zero = matches!(meta.mapping(e)?, Mapping::Zero);
        if owned && !zero {
            return self.file.child_write_at(host + co, data);
        }
        let whole = co == 0 && data.len() as u64 == meta.cs;
        let mut buf = if whole {
            Vec::new()
        } else if zero {
            vec![0u8; meta.cs as usize]
        } else {
            self.cluster_contents(meta, cluster, e)?
        };
        let data = if whole {
            data
        } else {
            let start = co as usize;
            buf.get_mut(start..start + data.len())
                .ok_or(BlockError::Io(Errno::EINVAL))?
                .copy_from_slice(data);
            &buf
        };
        if owned {
            // A preallocated zero cluster of our own: fill it and drop the zero flag.
            self.file.child_write_at(host, data)?;
            return meta.set_l2(table, i, host | OFLAG_COPIED);
        }
        let new = meta.alloc_clusters(1)?;
        if let Err(e) = self.file.child_write_at(new, data) {
            // Nothing references the new cluster yet: give it back, as QEMU's
            // `qcow2_alloc_cluster_abort` does, or every failed write (a full file system)
            // leaks one. The next allocation takes it again.
            if let Err(f) = meta.free_now(new, meta.cs) {
                log::warn!("qcow2: cannot free cluster {new:#x} after a failed write: {f}");
            }
            return Err(e);
        }
        meta.set_l2(table, i, new | OFLAG_COPIED)?;
        // A shared or compressed cluster loses this reference.
        meta.free_entry_later(e);
        Ok(())
    }

    /// Makes the whole guest cluster at `cluster` read as zeroes; `unmap` frees its storage.
    pub(super) fn zero_cluster(
        &self,
        meta: &mut Meta,
        cluster: u64,
        unmap: bool,
    ) -> Result<(), BlockError> {
        let e = meta.l2_entry(cluster)?;
        if meta.hdr.version < 3 {
            if e == 0 && self.backing_node().is_none() {
                return Ok(());
            }
            let zeros = vec![0u8; meta.cs as usize];
            return self.write_cluster(meta, cluster, 0, &zeros);
        }
        if e == 0 && self.backing_node().is_none() {
            return Ok(());
        }
        if e == OFLAG_ZERO {
            return Ok(());
        }
        let (table, i) = meta.l2_for_write(cluster)?;
        let host = e & ENTRY_OFFSET_MASK;
        let keep = !unmap && host != 0 && e & OFLAG_COPIED != 0 && e & OFLAG_COMPRESSED == 0;
        if keep {
            return meta.set_l2(table, i, host | OFLAG_COPIED | OFLAG_ZERO);
        }
        meta.set_l2(table, i, OFLAG_ZERO)?;
        meta.free_entry_later(e);
        Ok(())
    }

    /// Discards the whole guest cluster at `cluster` (QEMU's `discard_in_l2_slice` without
    /// `full_discard`): it reads as zeroes on version 3, falls through to the backing file on
    /// version 2, and its storage is freed.
    pub(super) fn discard_cluster(&self, meta: &mut Meta, cluster: u64) -> Result<(), BlockError> {
        let e = meta.l2_entry(cluster)?;
        let v3 = meta.hdr.version >= 3;
        let new = if v3 && (self.backing_node().is_some() || e & !OFLAG_COPIED != 0) {
            OFLAG_ZERO
        } else {
            0
        };
        if e == new || (e == 0 && !meta.has_l2(cluster) && new == 0) {
            return Ok(());
        }
        let (table, i) = meta.l2_for_write(cluster)?;
        meta.set_l2(table, i, new)?;
        meta.free_entry_later(e);
        Ok(())
    }

    pub(super) fn check_writable(&self, st: &State) -> Result<(), BlockError> {
        if !self.writable() || !st.active {
            return Err(BlockError::Io(Errno::EPERM));
        }
        Ok(())
    }

    pub(super) fn size_of(st: &State) -> u64 {
        st.meta.hdr.size
    }

    pub(super) fn check_range(st: &State, off: u64, len: u64) -> Result<(), BlockError> {
        if off.checked_add(len).is_none_or(|e| e > Self::size_of(st)) {
            return Err(BlockError::Io(Errno::EIO));
        }
        Ok(())
    }
}
