//! The `qcow2` format driver over a `file` child, with an optional `backing` child and QEMU's
//! persistent dirty bitmaps.
//!
//! * [`header`] — cluster 0: fixed fields, extensions, QEMU's open-time checks and messages.
//! * [`meta`] — L1/L2 tables, refcounts, allocation, and the write-back order that keeps the
//!   image consistent.
//! * [`bitmaps`] — the bitmap directory and its checks.
//! * `clusters` — the data path: guest clusters mapped, copied on write, zeroed, discarded.
//! * `bitmap_store` — the persistent bitmap store on top of [`bitmaps`] and [`meta`].
//!
//! This module holds the driver itself: open, options, reopen, and [`BlockDriver`].
//!
//! # Data path
//!
//! Reads map each guest cluster through its L2 entry: data clusters are read from the file,
//! zero clusters are zeroes, unallocated ones come from the backing node (zeroes past its end,
//! or without one). Writes go in place to clusters the active layer owns (refcount 1); any
//! other cluster is copied on write: a new cluster is allocated, filled with the old contents
//! (the backing file's, zeroes, or a shared cluster's) around the new data, written, and the L2
//! entry switched to it. Write-zeroes and discard of whole clusters set the zero flag (version
//! 3), freeing the host cluster when allowed; partial clusters are written as zeroes
//! (write-zeroes) or left alone (discard, as QEMU does).
//!
//! Compressed clusters (`qemu-img convert -c`) are neither read nor written by this crate:
//! requests touching them fail with `ENOTSUP`, and whole-cluster zeroing and discard free them.
//!
//! # Persistent bitmaps
//!
//! [`PersistentBitmapStore`] is QEMU's `qcow2-bitmap.c` behaviour (`qcow2-bitmaps.md` §7): load
//! at open and activation (in-use entries load inconsistent, the others are marked in use on a
//! read-write image, in place), store at inactivation and close (new data clusters, tables and
//! directory, then the header switch, then the old clusters freed), remove, and the checks for a
//! new persistent bitmap.
//!
//! # Locking and activation
//!
//! The driver asks its file child for QEMU's permissions (see [`crate::perm`]) before it reads
//! anything, so opening an image another process writes fails with QEMU's lock error.
//! [`BlockDriver::inactivate`] writes everything back and stops writing; the node then loosens
//! the permissions. [`BlockDriver::activate`] runs after they were taken again and re-reads the
//! image from disk, since its new owner may have changed it.

pub mod bitmaps;
pub mod header;
pub mod meta;

mod bitmap_store;
use bitmap_store::{fix_header, read_directory, update_dir_in_place};
mod clusters;

use self::bitmaps::{
    check_constraints, cluster_coverage, entry_size, parse_directory, serialize_directory,
    table_entry_ok, table_size_for, DirEntry, FLAG_AUTO, FLAG_IN_USE, TABLE_ENTRY_ALL_ONES,
    TABLE_ENTRY_OFFSET_MASK,
};
use self::header::{
    BitmapsExt, Header, AUTOCLEAR_BITMAPS, AUTOCLEAR_MASK, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY, INCOMPAT_EXTL2, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE,
};
use self::meta::{
    read_u64s, Mapping, Meta, ENTRY_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO,
};
use super::{
    BlockDriver, DriverInfo, FilenameInfo, LoadedBitmap, PersistentBitmapStore, StoredBitmap,
};
use crate::error::{strerror, BlockError};
use crate::node::BlockNode;
use crate::perm::{new_user_key, Perm, PermContext};
use hbitmap::HBitmap;
use nix::errno::Errno;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

/// How a qcow2 image is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Options {
    /// `read-only`.
    pub read_only: bool,
    /// Opened inactive (an incoming migration): read nothing into memory that the source may
    /// still change, write nothing, lock nothing for writing.
    pub inactive: bool,
}

struct State {
    meta: Meta,
    active: bool,
    /// The bitmap directory as on disk (empty without the extension).
    dir: Vec<DirEntry>,
    /// Names loaded as inconsistent (they block resizing, as in QEMU).
    inconsistent: Vec<Vec<u8>>,
}

/// An open qcow2 image.
pub struct Qcow2Driver {
    file: Arc<BlockNode>,
    /// The backing node; `blockdev-snapshot` attaches one to an image opened without.
    backing: RwLock<Option<Arc<BlockNode>>>,
    key: u64,
    /// Opened (or reopened) read-write, over a writable file.
    writable: AtomicBool,
    st: Mutex<State>,
}

impl std::fmt::Debug for Qcow2Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Driver")
            .field("file", &self.file.name())
            .field("writable", &self.writable())
            .finish()
    }
}

fn err(msg: impl Into<String>) -> BlockError {
    BlockError::Driver(msg.into())
}

fn errno_text(e: &BlockError) -> String {
    match e {
        BlockError::Io(errno) => strerror(*errno),
        other => other.to_string(),
    }
}

/// Reads and parses cluster 0 of `file`.
fn read_header(file: &BlockNode) -> Result<Header, BlockError> {
    let mut head = [0u8; 512];
    file.child_read_at(0, &mut head)?;
    let bits = Header::peek_cluster_bits(&head)?;
    let mut buf = vec![0u8; 1usize << bits];
    file.child_read_at(0, &mut buf)?;
    Header::parse(&buf)
}

impl Qcow2Driver {
    /// Opens the image in `file`: takes the file's permissions (QEMU's lock error if another
    /// process writes it), reads and checks the header (QEMU's messages), and loads the L1 and
    /// refcount tables. A read-write, active open drops a bitmaps extension a program without
    /// bitmap support left behind, and unknown autoclear bits. The backing file, if the header
    /// names one, is attached by the caller with [`Qcow2Driver::set_backing`].
    pub fn open(file: Arc<BlockNode>, opts: Qcow2Options) -> Result<Self, BlockError> {
        let key = new_user_key();
        let writable = !opts.read_only && file.writable();
        let active = !opts.inactive;
        file.set_user_perm(key, Some(Perm::for_storage(Perm::NONE, writable, active)))?;
        let opened = (|| {
            let hdr = read_header(&file)?;
            hdr.check_features(writable)?;
            if hdr.stale_bitmaps_ext {
                // QEMU's warning (stderr), then the bitmaps are dropped.
                if hdr.version < 3 {
                    log::warn!(
                        "This qcow2 v2 image contains bitmaps, but they may have been \
                         modified by a program without persistent bitmap support; so now they \
                         must all be considered inconsistent"
                    );
                } else {
                    log::warn!(
                        "a program lacking bitmap support modified this file, so all \
                         bitmaps are now considered inconsistent"
                    );
                }
                // QEMU's continuation line, printed without a prefix.
                log::info!(
                    "Some clusters may be leaked, run 'qemu-img check -r' on the image file to \
                     fix."
                );
            }
            let meta = Meta::load(file.clone(), hdr)?;
            let mut st = State {
                meta,
                active,
                dir: Vec::new(),
                inconsistent: Vec::new(),
            };
            if active && writable {
                fix_header(&mut st)?;
            }
            Ok(st)
        })();
        match opened {
            Ok(st) => Ok(Qcow2Driver {
                file,
                backing: RwLock::new(None),
                key,
                writable: AtomicBool::new(writable),
                st: Mutex::new(st),
            }),
            Err(e) => {
                let _ = file.set_user_perm(key, None);
                Err(e)
            }
        }
    }

    /// The backing file name and format the header names, if any.
    pub fn backing_file(&self) -> Option<(String, Option<String>)> {
        let st = self.lock();
        st.meta
            .hdr
            .backing_file
            .clone()
            .map(|f| (f, st.meta.hdr.backing_format.clone()))
    }

    /// Attaches the backing node (read for unallocated clusters).
    pub fn set_backing(&mut self, node: Arc<BlockNode>) -> Result<(), BlockError> {
        self.attach(node, Perm::NONE)
    }

    fn attach(&self, node: Arc<BlockNode>, parents: Perm) -> Result<(), BlockError> {
        node.set_user_perm(self.key, Some(Perm::for_cow(parents)))?;
        let old = self
            .backing
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(node);
        if let Some(old) = old {
            let _ = old.set_user_perm(self.key, None);
        }
        Ok(())
    }

    fn backing_node(&self) -> Option<Arc<BlockNode>> {
        self.backing
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }

    /// The file child.
    pub fn file(&self) -> &Arc<BlockNode> {
        &self.file
    }

    /// The backing child.
    pub fn backing(&self) -> Option<Arc<BlockNode>> {
        self.backing_node()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl BlockDriver for Qcow2Driver {
    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn length(&self) -> Result<u64, BlockError> {
        Ok(Self::size_of(&self.lock()))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let mut st = self.lock();
        let size = Self::size_of(&st);
        let cs = st.meta.cs;
        let mut done = 0usize;
        for (pos, n) in Self::pieces(cs, offset, buf.len() as u64) {
            let piece = buf
                .get_mut(done..done + n as usize)
                .ok_or(BlockError::Io(Errno::EINVAL))?;
            done += n as usize;
            if pos >= size {
                piece.fill(0);
                continue;
            }
            let e = st.meta.l2_entry(pos)?;
            match st.meta.mapping(e)? {
                Mapping::Unallocated => self.read_backing(pos, piece)?,
                Mapping::Zero => piece.fill(0),
                Mapping::Data(h) => self.file.child_read_at(h + pos % cs, piece)?,
                Mapping::Compressed => return Err(BlockError::Io(Errno::ENOTSUP)),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let mut st = self.lock();
        self.check_writable(&st)?;
        Self::check_range(&st, offset, buf.len() as u64)?;
        st.meta.trim_caches()?;
        let cs = st.meta.cs;
        let mut done = 0usize;
        for (pos, n) in Self::pieces(cs, offset, buf.len() as u64) {
            let piece = buf
                .get(done..done + n as usize)
                .ok_or(BlockError::Io(Errno::EINVAL))?;
            done += n as usize;
            self.write_cluster(&mut st.meta, pos - pos % cs, pos % cs, piece)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        let mut st = self.lock();
        self.check_writable(&st)?;
        Self::check_range(&st, offset, len)?;
        st.meta.trim_caches()?;
        let cs = st.meta.cs;
        let zeros = vec![0u8; cs as usize];
        for (pos, n) in Self::pieces(cs, offset, len) {
            let cluster = pos - pos % cs;
            if n == cs {
                self.zero_cluster(&mut st.meta, cluster, may_unmap)?;
            } else {
                let z = zeros
                    .get(..n as usize)
                    .ok_or(BlockError::Io(Errno::EINVAL))?;
                self.write_cluster(&mut st.meta, cluster, pos % cs, z)?;
            }
        }
        Ok(())
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let mut st = self.lock();
        self.check_writable(&st)?;
        Self::check_range(&st, offset, len)?;
        st.meta.trim_caches()?;
        let cs = st.meta.cs;
        for (pos, n) in Self::pieces(cs, offset, len) {
            if n == cs {
                self.discard_cluster(&mut st.meta, pos)?;
            }
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        let mut st = self.lock();
        st.meta.write_out()?;
        self.file.flush()
    }

    fn flush_to_os(&self) -> Result<(), BlockError> {
        self.lock().meta.write_out()
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        let mut st = self.lock();
        self.check_writable(&st)?;
        if !size.is_multiple_of(512) {
            return Err(err("The new size must be a multiple of 512"));
        }
        if size < Self::size_of(&st) {
            return Err(BlockError::Unsupported(
                "qcow2: shrinking an image is not supported by this block layer".into(),
            ));
        }
        // qcow2_truncate_bitmaps_check: every stored bitmap must be loaded and consistent.
        if let Some(e) = st.dir.iter().find(|e| !e.in_use()) {
            let _ = e;
            return Err(err(
                "Cannot resize qcow2 with persistent bitmaps that were not loaded into memory",
            ));
        }
        if let Some(n) = st.inconsistent.first() {
            return Err(BlockError::BitmapInconsistent(
                String::from_utf8_lossy(n).into_owned(),
            ));
        }
        st.meta.grow(size)
    }

    fn info(&self) -> Option<DriverInfo> {
        let st = self.lock();
        Some(DriverInfo {
            cluster_size: st.meta.cs,
            dirty: st.meta.hdr.incompatible & INCOMPAT_DIRTY != 0,
        })
    }

    fn format_specific(&self) -> Option<Value> {
        let mut st = self.lock();
        let hdr = st.meta.hdr.clone();
        let mut data = Map::new();
        if hdr.version < 3 {
            data.insert("compat".into(), json!("0.10"));
            data.insert("refcount-bits".into(), json!(1u32 << hdr.refcount_order));
        } else {
            data.insert("compat".into(), json!("1.1"));
            data.insert(
                "compression-type".into(),
                json!(if hdr.compression_type == 1 {
                    "zstd"
                } else {
                    "zlib"
                }),
            );
            data.insert(
                "lazy-refcounts".into(),
                json!(hdr.compatible & COMPAT_LAZY_REFCOUNTS != 0),
            );
            let entries = if st.active {
                Ok(st.dir.clone())
            } else {
                read_directory(&mut st, hdr.size)
            };
            if let Ok(entries) = entries {
                if !entries.is_empty() {
                    let list: Vec<Value> = entries
                        .iter()
                        .map(|e| {
                            let mut flags = Vec::new();
                            if e.flags & FLAG_IN_USE != 0 {
                                flags.push("in-use");
                            }
                            if e.flags & FLAG_AUTO != 0 {
                                flags.push("auto");
                            }
                            json!({
                                "flags": flags,
                                "name": e.name_str(),
                                "granularity": 1u64 << e.granularity_bits,
                            })
                        })
                        .collect();
                    data.insert("bitmaps".into(), Value::Array(list));
                }
            }
            data.insert("refcount-bits".into(), json!(1u32 << hdr.refcount_order));
            data.insert(
                "corrupt".into(),
                json!(hdr.incompatible & INCOMPAT_CORRUPT != 0),
            );
            data.insert(
                "extended-l2".into(),
                json!(hdr.incompatible & INCOMPAT_EXTL2 != 0),
            );
        }
        Some(json!({"type": "qcow2", "data": data}))
    }

    fn allocated_size(&self) -> u64 {
        self.file.driver().allocated_size()
    }

    fn children(&self) -> Vec<(&'static str, Arc<BlockNode>)> {
        let mut v = vec![("file", self.file.clone())];
        if let Some(b) = self.backing_node() {
            v.push(("backing", b.clone()));
        }
        v
    }

    fn filename(&self) -> FilenameInfo {
        let child = self.file.driver().filename();
        let mut options = Map::new();
        options.insert("driver".into(), json!("qcow2"));
        options.insert("file".into(), Value::Object(child.options));
        FilenameInfo {
            exact: child.exact,
            options,
        }
    }

    fn bitmap_store(&self) -> Option<&dyn PersistentBitmapStore> {
        Some(self)
    }

    /// `blockdev-snapshot`: the node becomes this image's backing node (nothing is written to
    /// the header, as in QEMU).
    fn backing_file_name(&self) -> Option<(String, Option<String>)> {
        self.backing_file()
    }

    fn allocated_in_top(&self, offset: u64, len: u64) -> Result<(bool, u64), BlockError> {
        let mut st = self.lock();
        let size = Self::size_of(&st);
        let cs = st.meta.cs;
        let mut answer: Option<bool> = None;
        let mut n = 0u64;
        for (pos, piece) in Self::pieces(cs, offset, len) {
            // Past the end nothing is allocated (QEMU reports it as unallocated zeroes).
            let here = if pos >= size {
                false
            } else {
                let e = st.meta.l2_entry(pos)?;
                !matches!(st.meta.mapping(e)?, Mapping::Unallocated)
            };
            match answer {
                None => answer = Some(here),
                Some(a) if a != here => break,
                Some(_) => {}
            }
            n += piece;
        }
        Ok((answer.unwrap_or(true), n.max(1).min(len.max(1))))
    }

    fn attach_backing(&self, node: Arc<BlockNode>, parents: Perm) -> Result<(), BlockError> {
        if self.backing_node().is_some() {
            return Err(err("The overlay already has a backing image"));
        }
        self.attach(node, parents)
    }

    fn set_perm(&self, perm: Perm, ctx: PermContext) -> Result<(), BlockError> {
        let storage = Perm::for_storage(perm, ctx.writable && self.writable(), ctx.active);
        self.file.set_user_perm(self.key, Some(storage))?;
        if let Some(b) = self.backing_node() {
            b.set_user_perm(self.key, Some(Perm::for_cow(perm)))?;
        }
        Ok(())
    }

    /// Read-write: takes write access to the file (QEMU's lock error if another process has
    /// the image), checks the header as a read-write open does, and marks the bitmaps of the
    /// directory in use, as they are now in memory and may change (`qcow2_reopen_bitmaps_rw`).
    /// Read-only: writes back the metadata and stops writing; the node stored the bitmaps
    /// before (`qcow2_reopen_bitmaps_ro`).
    fn reopen(&self, read_only: bool) -> Result<(), BlockError> {
        if read_only {
            let mut st = self.lock();
            if st.active && self.writable() {
                st.meta.write_out()?;
                self.file.flush()?;
            }
            self.writable.store(false, Ordering::SeqCst);
            return Ok(());
        }
        if self.writable() {
            return Ok(());
        }
        if !self.file.writable() {
            return Err(BlockError::ReadOnlyNode);
        }
        let active = self.lock().active;
        self.file
            .set_user_perm(self.key, Some(Perm::for_storage(Perm::NONE, true, active)))?;
        let done = (|| {
            let mut st = self.lock();
            let hdr = read_header(&self.file)?;
            hdr.check_features(true)?;
            if !st.active {
                return Ok(());
            }
            fix_header(&mut st)?;
            let mut entries = st.dir.clone();
            let mut changed = false;
            for e in &mut entries {
                if !e.in_use() {
                    e.flags |= FLAG_IN_USE;
                    changed = true;
                }
            }
            if changed {
                update_dir_in_place(&mut st, &entries)?;
                st.dir = entries;
            }
            Ok(())
        })();
        match done {
            Ok(()) => {
                self.writable.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(e) => {
                let _ = self
                    .file
                    .set_user_perm(self.key, Some(Perm::for_storage(Perm::NONE, false, active)));
                Err(e)
            }
        }
    }

    fn activate(&self) -> Result<(), BlockError> {
        let mut st = self.lock();
        if st.active {
            return Ok(());
        }
        // The image may have changed while someone else had it: read it again.
        let hdr = read_header(&self.file)?;
        hdr.check_features(self.writable())?;
        st.meta = Meta::load(self.file.clone(), hdr)?;
        st.dir.clear();
        st.inconsistent.clear();
        st.active = true;
        if self.writable() {
            if let Err(e) = fix_header(&mut st) {
                st.active = false;
                return Err(e);
            }
        }
        Ok(())
    }

    fn inactivate(&self) -> Result<(), BlockError> {
        let mut st = self.lock();
        if !st.active {
            return Ok(());
        }
        st.meta.write_out()?;
        self.file.flush()?;
        st.active = false;
        Ok(())
    }
}

impl Drop for Qcow2Driver {
    fn drop(&mut self) {
        let writable = *self.writable.get_mut();
        let st = self.st.get_mut().unwrap_or_else(PoisonError::into_inner);
        if st.active && writable {
            // Closing without an inactivation: keep what was written (bitmaps stay in use,
            // like after a crash).
            let _ = st.meta.write_out();
        }
        let _ = self.file.set_user_perm(self.key, None);
        let backing = self
            .backing
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = backing {
            let _ = b.set_user_perm(self.key, None);
        }
    }
}

/// Creates a qcow2 image as `qemu-img create -f qcow2 [-b BACKING -F FORMAT] PATH SIZE` does
/// with QEMU 7.2's defaults (version 3, 64 KiB clusters, 16-bit refcounts): the header, one
/// refcount table cluster, one refcount block and the L1 table, nothing allocated. An
/// existing file is overwritten. What `blockdev-snapshot-sync` makes its overlay with.
pub fn create_image(
    path: &str,
    size: u64,
    backing: Option<(&str, &str)>,
) -> Result<(), BlockError> {
    const BITS: u32 = 16;
    let cs: u64 = 1 << BITS;
    // Each L2 table maps cs/8 clusters.
    let per_l1 = (cs / 8) * cs;
    let l1_size = size.div_ceil(per_l1);
    let l1_clusters = (l1_size * 8).div_ceil(cs).max(1);
    let l1_size = u32::try_from(l1_size).map_err(|_| BlockError::Io(Errno::EFBIG))?;
    let clusters = 3 + l1_clusters;
    // One refcount block (16-bit entries) covers cs/2 clusters.
    if clusters > cs / 2 {
        return Err(BlockError::Io(Errno::EFBIG));
    }
    let hdr = Header {
        version: 3,
        cluster_bits: BITS,
        size,
        crypt_method: 0,
        l1_size,
        l1_table_offset: 3 * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: 4,
        header_length: self::header::V3_HEADER_LENGTH,
        compression_type: 0,
        backing_file: backing.map(|(f, _)| f.to_string()),
        backing_format: backing.map(|(_, f)| f.to_string()),
        bitmaps: None,
        stale_bitmaps_ext: false,
        feature_names: Vec::new(),
        unknown_extensions: Vec::new(),
    };
    let mut image = hdr.serialize()?;
    // The refcount table: its one entry points at the refcount block in cluster 2.
    image.extend_from_slice(&(2 * cs).to_be_bytes());
    image.resize(2 * cs as usize, 0);
    // The refcount block: one reference to each cluster in use.
    for _ in 0..clusters {
        image.extend_from_slice(&1u16.to_be_bytes());
    }
    image.resize((clusters * cs) as usize, 0);
    let open_err = |e: std::io::Error| BlockError::OpenFailed {
        filename: path.to_string(),
        errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(open_err)?;
    use std::io::Write;
    f.write_all(&image)
        .and_then(|()| f.sync_all())
        .map_err(|e| BlockError::from_io(&e))
}
