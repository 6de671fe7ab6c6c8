//! The persistent bitmap store (QEMU's `qcow2-bitmap.c`): the header fix-up of a read-write
//! open, the bitmap directory read and written in place or switched, bitmap tables and data
//! loaded and written, and [`PersistentBitmapStore`] on top of them.

use super::*;

/// Clears autoclear bits this driver does not maintain (and with them a stale bitmaps
/// extension), as QEMU does on a read-write open.
pub(super) fn fix_header(st: &mut State) -> Result<(), BlockError> {
    let hdr = &mut st.meta.hdr;
    if hdr.stale_bitmaps_ext || hdr.autoclear & !AUTOCLEAR_MASK != 0 {
        hdr.autoclear &= AUTOCLEAR_MASK;
        if hdr.bitmaps.is_none() {
            hdr.autoclear &= !AUTOCLEAR_BITMAPS;
        }
        hdr.stale_bitmaps_ext = false;
        st.meta.write_header()?;
        st.meta.file.flush()?;
    }
    Ok(())
}

/// Reads the bitmap directory the header points to (QEMU's `bitmap_list_load`).
pub(super) fn read_directory(st: &mut State, disk_len: u64) -> Result<Vec<DirEntry>, BlockError> {
    let Some(ext) = st.meta.hdr.bitmaps else {
        return Ok(Vec::new());
    };
    if ext.dir_size == 0 {
        return Err(err("Requested bitmap directory size is zero"));
    }
    if ext.dir_size > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(err("Requested bitmap directory size is too big"));
    }
    let mut buf = vec![0u8; ext.dir_size as usize];
    st.meta
        .file
        .child_read_at(ext.dir_offset, &mut buf)
        .map_err(|e| {
            err(format!(
                "Failed to read bitmap directory: {}",
                errno_text(&e)
            ))
        })?;
    parse_directory(&buf, ext.nb_bitmaps, st.meta.cs, disk_len)
}

/// Rewrites the directory where it is (only flags changed), with the autoclear bit cleared
/// around the write (QEMU's `update_ext_header_and_dir_in_place`).
pub(super) fn update_dir_in_place(st: &mut State, entries: &[DirEntry]) -> Result<(), BlockError> {
    let Some(ext) = st.meta.hdr.bitmaps else {
        return Ok(());
    };
    let bytes = serialize_directory(entries);
    if bytes.len() as u64 != ext.dir_size {
        return Err(BlockError::Io(Errno::EINVAL));
    }
    st.meta.hdr.autoclear &= !AUTOCLEAR_BITMAPS;
    st.meta.write_header()?;
    st.meta.file.flush()?;
    st.meta.file.child_write_at(ext.dir_offset, &bytes)?;
    st.meta.file.flush()?;
    st.meta.hdr.autoclear |= AUTOCLEAR_BITMAPS;
    st.meta.write_header()?;
    st.meta.file.flush()
}

/// Loads one bitmap's data (QEMU's `load_bitmap`).
pub(super) fn load_bitmap_data(
    meta: &mut Meta,
    e: &DirEntry,
    disk_len: u64,
) -> Result<HBitmap, BlockError> {
    let name = e.name_str();
    let table_err = |t: String| {
        err(format!(
            "Could not read bitmap_table table from image for bitmap '{name}': {t}"
        ))
    };
    let table = read_u64s(&meta.file, e.table_offset, u64::from(e.table_size))
        .map_err(|x| table_err(errno_text(&x)))?;
    if table.iter().any(|t| !table_entry_ok(*t, meta.cs)) {
        return Err(table_err(strerror(Errno::EINVAL)));
    }
    let data_err = |t: String| err(format!("Could not read bitmap '{name}' from image: {t}"));
    let bits = u32::from(e.granularity_bits);
    let mut hb = HBitmap::new(disk_len, bits).map_err(|x| data_err(x.to_string()))?;
    let tab_size = table_size_for(&hb, meta.cs).map_err(|x| data_err(x.to_string()))?;
    if tab_size != u64::from(e.table_size) {
        return Err(data_err(strerror(Errno::EINVAL)));
    }
    let limit = cluster_coverage(meta.cs, bits);
    let mut buf = vec![0u8; meta.cs as usize];
    for (i, t) in table.iter().enumerate() {
        let start = i as u64 * limit;
        if start >= disk_len {
            break;
        }
        let count = (disk_len - start).min(limit);
        let off = t & TABLE_ENTRY_OFFSET_MASK;
        if off == 0 {
            if t & TABLE_ENTRY_ALL_ONES != 0 {
                hb.deserialize_ones(start, count, false)
                    .map_err(|x| data_err(x.to_string()))?;
            }
            continue;
        }
        meta.file
            .child_read_at(off, &mut buf)
            .map_err(|x| data_err(errno_text(&x)))?;
        hb.deserialize_part(&buf, start, count, false)
            .map_err(|x| data_err(x.to_string()))?;
    }
    hb.deserialize_finish();
    Ok(hb)
}

/// Writes one bitmap's data clusters (only those with a set bit) and its table; returns the
/// table's offset and size. Clusters allocated so far are pushed to `allocated`.
pub(super) fn write_bitmap(
    meta: &mut Meta,
    hb: &HBitmap,
    allocated: &mut Vec<(u64, u64)>,
) -> Result<(u64, u32), BlockError> {
    let cs = meta.cs;
    let size = hb.orig_size();
    let tsize = table_size_for(hb, cs)?;
    let limit = cluster_coverage(cs, hb.granularity());
    let mut table = vec![0u64; tsize as usize];
    let mut buf = vec![0u8; cs as usize];
    for (i, slot) in table.iter_mut().enumerate() {
        let start = i as u64 * limit;
        if start >= size {
            break;
        }
        let count = (size - start).min(limit);
        if hb.next_dirty(start, count).is_none() {
            continue;
        }
        buf.fill(0);
        hb.serialize_part(&mut buf, start, count)?;
        let off = meta.alloc_clusters(1)?;
        allocated.push((off, cs));
        meta.file.child_write_at(off, &buf)?;
        *slot = off;
    }
    let bytes = (tsize * 8).next_multiple_of(cs).max(cs);
    let toff = meta.alloc_clusters(bytes / cs)?;
    allocated.push((toff, bytes));
    let mut tb = Vec::with_capacity(bytes as usize);
    for t in &table {
        tb.extend_from_slice(&t.to_be_bytes());
    }
    tb.resize(bytes as usize, 0);
    meta.file.child_write_at(toff, &tb)?;
    Ok((
        toff,
        u32::try_from(tsize).map_err(|_| BlockError::Io(Errno::EFBIG))?,
    ))
}

/// Frees a stored bitmap's table and data clusters (skipping entries that do not make sense:
/// a table another program left may be damaged, and freeing what it points to would be worse).
pub(super) fn free_bitmap_clusters(
    meta: &mut Meta,
    table_offset: u64,
    table_size: u32,
) -> Result<(), BlockError> {
    if table_offset == 0 || !table_offset.is_multiple_of(meta.cs) {
        return Ok(());
    }
    let table = read_u64s(&meta.file, table_offset, u64::from(table_size))?;
    for t in table {
        let off = t & TABLE_ENTRY_OFFSET_MASK;
        if off != 0 && table_entry_ok(t, meta.cs) && meta.refcount(off / meta.cs)? > 0 {
            meta.free_now(off, meta.cs)?;
        }
    }
    let bytes = (u64::from(table_size) * 8).next_multiple_of(meta.cs);
    let first = table_offset / meta.cs;
    for c in 0..bytes / meta.cs {
        if meta.refcount(first + c)? > 0 {
            meta.free_now((first + c) * meta.cs, meta.cs)?;
        }
    }
    Ok(())
}

/// Writes `entries` as the new directory and switches the header to it (removing the
/// extension when the list is empty), then frees the old directory (QEMU's
/// `update_ext_header_and_dir`).
pub(super) fn switch_directory(st: &mut State, entries: &[DirEntry]) -> Result<(), BlockError> {
    let old = st.meta.hdr.bitmaps;
    let cs = st.meta.cs;
    if entries.is_empty() {
        st.meta.write_out()?;
        st.meta.hdr.bitmaps = None;
        st.meta.hdr.autoclear &= !AUTOCLEAR_BITMAPS;
    } else {
        let bytes = serialize_directory(entries);
        let len = bytes.len() as u64;
        let clusters = len.div_ceil(cs);
        let off = st.meta.alloc_clusters(clusters)?;
        let mut padded = bytes;
        padded.resize((clusters * cs) as usize, 0);
        if let Err(e) = st.meta.file.child_write_at(off, &padded) {
            let _ = st.meta.free_now(off, clusters * cs);
            return Err(e);
        }
        st.meta.write_out()?;
        st.meta.file.flush()?;
        st.meta.hdr.bitmaps = Some(BitmapsExt {
            nb_bitmaps: entries.len() as u32,
            dir_size: len,
            dir_offset: off,
        });
        st.meta.hdr.autoclear |= AUTOCLEAR_BITMAPS;
    }
    // The header write is the atomic switch.
    st.meta.write_header()?;
    st.meta.file.flush()?;
    if let Some(o) = old {
        if o.dir_offset != 0 && o.dir_size != 0 && st.meta.refcount(o.dir_offset / cs)? > 0 {
            st.meta.free_now(o.dir_offset, o.dir_size)?;
        }
    }
    Ok(())
}

impl PersistentBitmapStore for Qcow2Driver {
    fn can_store_new(
        &self,
        node_name: &str,
        name: &str,
        granularity: u32,
        persistent: &[&str],
    ) -> Result<(), BlockError> {
        let st = self.lock();
        let prefix = format!("Can't make bitmap '{name}' persistent in '{node_name}': ");
        if st.meta.hdr.version < 3 {
            return Err(err(format!(
                "{prefix}Cannot store dirty bitmaps in qcow2 v2 files"
            )));
        }
        check_constraints(name, granularity, st.meta.cs, st.meta.hdr.size)
            .map_err(|m| err(format!("{prefix}{m}")))?;
        if persistent.len() + 1 > MAX_BITMAPS as usize {
            return Err(err(format!(
                "{prefix}Maximum number of persistent bitmaps is already reached"
            )));
        }
        let dir: u64 =
            persistent.iter().map(|n| entry_size(n.len())).sum::<u64>() + entry_size(name.len());
        if dir > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(err(format!(
                "{prefix}Not enough space in the bitmap directory"
            )));
        }
        Ok(())
    }

    fn remove(&self, _node_name: &str, name: &str) -> Result<(), BlockError> {
        let mut st = self.lock();
        let Some(i) = st.dir.iter().position(|e| e.is(name)) else {
            return Ok(());
        };
        self.check_writable(&st)?;
        let mut list = st.dir.clone();
        let e = list.remove(i);
        switch_directory(&mut st, &list)?;
        st.dir = list;
        st.inconsistent.retain(|n| n != &e.name);
        free_bitmap_clusters(&mut st.meta, e.table_offset, e.table_size)?;
        st.meta.write_out()?;
        self.file.flush()
    }

    fn load(&self, node_size: u64, in_memory: &[&str]) -> Result<Vec<LoadedBitmap>, BlockError> {
        let mut st = self.lock();
        let mut entries = read_directory(&mut st, node_size)?;
        for (i, e) in entries.iter().enumerate() {
            if entries.iter().skip(i + 1).any(|o| o.name == e.name) {
                return Err(BlockError::BitmapExists(e.name_str()));
            }
        }
        let writable = self.writable() && st.active;
        let mut out = Vec::new();
        let mut changed = false;
        let mut inconsistent = Vec::new();
        for e in &mut entries {
            if in_memory.iter().any(|n| e.is(n)) {
                // The bitmap in memory is the one to store from now on (QEMU skips in-use
                // entries of bitmaps that arrived by migration; an entry that is not in use
                // is taken over the same way instead of failing the activation).
                if writable && !e.in_use() {
                    e.flags |= FLAG_IN_USE;
                    changed = true;
                }
                continue;
            }
            let bits = u32::from(e.granularity_bits);
            if e.in_use() {
                inconsistent.push(e.name.clone());
                out.push(LoadedBitmap {
                    name: e.name_str(),
                    granularity: 1u32 << bits,
                    enabled: e.flags & FLAG_AUTO != 0,
                    in_use: true,
                    bitmap: HBitmap::new(node_size, bits)?,
                });
                continue;
            }
            let bitmap = load_bitmap_data(&mut st.meta, e, node_size)?;
            out.push(LoadedBitmap {
                name: e.name_str(),
                granularity: 1u32 << bits,
                enabled: e.flags & FLAG_AUTO != 0,
                in_use: false,
                bitmap,
            });
            if writable {
                e.flags |= FLAG_IN_USE;
                changed = true;
            }
        }
        if changed {
            update_dir_in_place(&mut st, &entries)?;
        }
        st.dir = entries;
        st.inconsistent = inconsistent;
        Ok(out)
    }

    fn store(&self, bitmaps: &[StoredBitmap<'_>]) -> Result<(), BlockError> {
        let mut st = self.lock();
        if bitmaps.is_empty() {
            return Ok(());
        }
        if !self.writable() || !st.active {
            return Err(err("No write access"));
        }
        st.meta.write_out()?;
        let cs = st.meta.cs;
        let mut list = st.dir.clone();
        let mut old_tables = Vec::new();
        let mut slots = Vec::with_capacity(bitmaps.len());
        for b in bitmaps {
            check_constraints(b.name, b.granularity, cs, b.bitmap.orig_size()).map_err(|m| {
                err(format!(
                    "Bitmap '{}' doesn't satisfy the constraints: {m}",
                    b.name
                ))
            })?;
            let i = match list.iter().position(|e| e.is(b.name)) {
                Some(i) => {
                    let e = list.get(i).ok_or(BlockError::Io(Errno::EINVAL))?;
                    if !e.in_use() {
                        return Err(err(format!(
                            "Bitmap '{}' already exists in the image",
                            b.name
                        )));
                    }
                    old_tables.push((e.table_offset, e.table_size));
                    i
                }
                None => {
                    if list.len() >= MAX_BITMAPS as usize {
                        return Err(err("Too many persistent bitmaps"));
                    }
                    let dir: u64 =
                        list.iter().map(DirEntry::size).sum::<u64>() + entry_size(b.name.len());
                    if dir > MAX_BITMAP_DIRECTORY_SIZE {
                        return Err(err("Bitmap directory is too large"));
                    }
                    list.push(DirEntry {
                        table_offset: 0,
                        table_size: 0,
                        flags: 0,
                        granularity_bits: 0,
                        name: b.name.as_bytes().to_vec(),
                    });
                    list.len() - 1
                }
            };
            slots.push(i);
        }
        let mut allocated = Vec::new();
        let written = (|| {
            for (b, i) in bitmaps.iter().zip(&slots) {
                let (toff, tsize) = write_bitmap(&mut st.meta, b.bitmap, &mut allocated)?;
                let e = list.get_mut(*i).ok_or(BlockError::Io(Errno::EINVAL))?;
                e.table_offset = toff;
                e.table_size = tsize;
                e.flags = if b.enabled { FLAG_AUTO } else { 0 };
                e.granularity_bits = b.granularity.trailing_zeros() as u8;
            }
            switch_directory(&mut st, &list)
        })();
        if let Err(e) = written {
            for (off, len) in allocated {
                let _ = st.meta.free_now(off, len);
            }
            let _ = st.meta.write_out();
            return Err(e);
        }
        st.dir = list;
        st.inconsistent.clear();
        for (off, size) in old_tables {
            free_bitmap_clusters(&mut st.meta, off, size)?;
        }
        st.meta.write_out()?;
        self.file.flush()
    }
}
