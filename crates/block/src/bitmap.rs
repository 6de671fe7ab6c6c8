//! Named dirty bitmaps (QEMU's `BdrvDirtyBitmap`, `block/dirty-bitmap.c`): an [`HBitmap`]
//! attached to a node, with a name and the state flags of `dirty-bitmaps.md` §2.
//!
//! A node's bitmaps live in a [`DirtyBitmaps`] list, newest first (QEMU inserts at the head, so
//! queries and migration visit bitmaps in reverse creation order). Successors — the anonymous
//! bitmaps that record writes while their parent is frozen — are members of the same list, as
//! in QEMU: they are marked by writes and listed (without a name) by queries.
//!
//! Everything QEMU asserts here is an error instead: a bad granularity, releasing a busy bitmap,
//! truncating while a bitmap is busy, an unaligned reset.

use crate::error::BlockError;
use hbitmap::HBitmap;
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicU64, Ordering};

/// `BDRV_BITMAP_MAX_NAME_SIZE`: longest bitmap name in bytes.
pub const MAX_NAME_SIZE: usize = 1023;

/// Smallest granularity in bytes (`BDRV_SECTOR_SIZE`).
pub const MIN_GRANULARITY: u32 = 512;

/// Identifies one bitmap for as long as it exists (names move on `abdicate`; ids do not).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BitmapId(u64);

static NEXT_BITMAP_ID: AtomicU64 = AtomicU64::new(1);

impl BitmapId {
    fn fresh() -> Self {
        BitmapId(NEXT_BITMAP_ID.fetch_add(1, Ordering::Relaxed))
    }
}

/// Which states [`BdrvDirtyBitmap::check`] refuses (QEMU's `BDRV_BITMAP_*` flags). They are
/// tested in the order busy, readonly, inconsistent, whatever order they are combined in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapCheck(u8);

impl BitmapCheck {
    /// `BDRV_BITMAP_BUSY`.
    pub const BUSY: BitmapCheck = BitmapCheck(1);
    /// `BDRV_BITMAP_RO`.
    pub const RO: BitmapCheck = BitmapCheck(2);
    /// `BDRV_BITMAP_INCONSISTENT`.
    pub const INCONSISTENT: BitmapCheck = BitmapCheck(4);
    /// `BDRV_BITMAP_DEFAULT`: all three.
    pub const DEFAULT: BitmapCheck = BitmapCheck(7);
    /// `BDRV_BITMAP_ALLOW_RO`: busy and inconsistent.
    pub const ALLOW_RO: BitmapCheck = BitmapCheck(5);

    /// Whether every flag of `other` is in `self`.
    pub const fn contains(self, other: BitmapCheck) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for BitmapCheck {
    type Output = BitmapCheck;
    fn bitor(self, rhs: BitmapCheck) -> BitmapCheck {
        BitmapCheck(self.0 | rhs.0)
    }
}

/// Validates a granularity in bytes: a power of two, at least 512 (and, being a `u32`, at most
/// 2^31). Returns the granularity shift.
pub fn granularity_shift(granularity: u32) -> Result<u32, BlockError> {
    if granularity < MIN_GRANULARITY || !granularity.is_power_of_two() {
        return Err(BlockError::BadGranularity);
    }
    Ok(granularity.trailing_zeros())
}

/// QEMU's `bdrv_get_default_bitmap_granularity`: from the driver's cluster size if it reports a
/// positive one, `min(65536, max(4096, cluster))`, else 65536.
pub fn default_granularity(cluster_size: Option<u64>) -> u32 {
    match cluster_size {
        Some(c) if c > 0 => c.clamp(4096, 65536) as u32,
        _ => 65536,
    }
}

/// One dirty bitmap.
#[derive(Debug, Clone)]
pub struct BdrvDirtyBitmap {
    id: BitmapId,
    name: Option<String>,
    hbitmap: HBitmap,
    disabled: bool,
    busy: bool,
    successor: Option<BitmapId>,
    readonly: bool,
    persistent: bool,
    inconsistent: bool,
    skip_store: bool,
}

impl BdrvDirtyBitmap {
    fn new(name: Option<String>, hbitmap: HBitmap) -> Self {
        BdrvDirtyBitmap {
            id: BitmapId::fresh(),
            name,
            hbitmap,
            disabled: false,
            busy: false,
            successor: None,
            readonly: false,
            persistent: false,
            inconsistent: false,
            skip_store: false,
        }
    }

    /// Stable identity.
    pub fn id(&self) -> BitmapId {
        self.id
    }
    /// Name; `None` for anonymous bitmaps (successors), which QMP cannot address.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    /// The name for messages (anonymous bitmaps show as `(anonymous)`).
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or("(anonymous)")
    }
    /// Granularity in bytes.
    pub fn granularity(&self) -> u32 {
        // Bitmaps are only created with validated granularities (at most 2^31).
        1u32.checked_shl(self.hbitmap.granularity())
            .unwrap_or(u32::MAX)
    }
    /// Size in bytes of the node the bitmap covers (the HBitmap's `orig_size`).
    pub fn size(&self) -> u64 {
        self.hbitmap.orig_size()
    }
    /// QMP's `count`: bytes covered by set bits, `set_bits << G`, not clamped to the size.
    pub fn count(&self) -> u64 {
        self.hbitmap.count()
    }
    /// `!disabled`: the bitmap itself records writes.
    pub fn enabled(&self) -> bool {
        !self.disabled
    }
    /// In use by an operation (migration, backup, NBD export); QMP refuses to touch it.
    pub fn busy(&self) -> bool {
        self.busy
    }
    /// Loaded from a read-only image: no change allowed, and writes to the node are refused.
    pub fn readonly(&self) -> bool {
        self.readonly
    }
    /// To be stored in the image on inactivation or close.
    pub fn persistent(&self) -> bool {
        self.persistent
    }
    /// Loaded with the image's `in_use` flag: only removal is allowed.
    pub fn inconsistent(&self) -> bool {
        self.inconsistent
    }
    /// Not to be stored at inactivation (set for bitmaps a migration carries away).
    pub fn skip_store(&self) -> bool {
        self.skip_store
    }
    /// `persistent && !skip_store`: whether inactivation stores it.
    pub fn get_persistence(&self) -> bool {
        self.persistent && !self.skip_store
    }
    /// The anonymous successor, if a job or migration froze this bitmap.
    pub fn successor(&self) -> Option<BitmapId> {
        self.successor
    }

    /// QEMU's `bdrv_dirty_bitmap_check`: the first refused state among busy, readonly,
    /// inconsistent (in that order) that `flags` selects.
    pub fn check(&self, flags: BitmapCheck) -> Result<(), BlockError> {
        let name = || self.display_name().to_string();
        if flags.contains(BitmapCheck::BUSY) && self.busy {
            return Err(BlockError::BitmapBusy(name()));
        }
        if flags.contains(BitmapCheck::RO) && self.readonly {
            return Err(BlockError::BitmapReadOnly(name()));
        }
        if flags.contains(BitmapCheck::INCONSISTENT) && self.inconsistent {
            return Err(BlockError::BitmapInconsistent(name()));
        }
        Ok(())
    }

    /// Marks the bitmap busy or not (migration setup and cleanup, jobs).
    pub fn set_busy(&mut self, busy: bool) {
        self.busy = busy;
    }
    /// Sets or clears `skip_store`.
    pub fn set_skip_store(&mut self, skip: bool) {
        self.skip_store = skip;
    }
    /// Sets persistence without checking the driver (QEMU's
    /// `bdrv_dirty_bitmap_set_persistence`; the migration destination applies the source's
    /// flag this way).
    pub fn set_persistent(&mut self, persistent: bool) {
        self.persistent = persistent;
    }
    /// Sets the readonly flag (used when loading from a read-only image).
    pub fn set_readonly(&mut self, readonly: bool) {
        self.readonly = readonly;
    }
    /// Enables or disables recording, without the QMP checks.
    pub fn set_disabled(&mut self, disabled: bool) {
        self.disabled = disabled;
    }
    /// Marks a persistent bitmap inconsistent, which also disables it (QEMU asserts
    /// persistence; here a transient bitmap is an error).
    pub fn set_inconsistent(&mut self) -> Result<(), BlockError> {
        if !self.persistent {
            return Err(BlockError::NotPersistent(self.display_name().to_string()));
        }
        self.inconsistent = true;
        self.disabled = true;
        Ok(())
    }

    /// The bits, for scans and serialization.
    pub fn hbitmap(&self) -> &HBitmap {
        &self.hbitmap
    }
    /// The bits, mutable, for deserialization by the migration destination. Callers are
    /// expected to have checked the bitmap (it is busy while they load it).
    pub fn hbitmap_mut(&mut self) -> &mut HBitmap {
        &mut self.hbitmap
    }

    /// Whether the group holding `offset` is dirty.
    pub fn get(&self, offset: u64) -> Result<bool, BlockError> {
        Ok(self.hbitmap.get(offset)?)
    }
    /// `bdrv_set_dirty_bitmap`: marks `[offset, offset+len)`, rounding outward.
    pub fn set_dirty(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.readonly {
            return Err(BlockError::BitmapReadOnly(self.display_name().to_string()));
        }
        Ok(self.hbitmap.set(offset, len)?)
    }
    /// `bdrv_reset_dirty_bitmap`: clears `[offset, offset+len)`, which must be group-aligned
    /// (or end at the node's end).
    pub fn reset_dirty(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.readonly {
            return Err(BlockError::BitmapReadOnly(self.display_name().to_string()));
        }
        Ok(self.hbitmap.reset(offset, len)?)
    }
    /// `bdrv_clear_dirty_bitmap` without a backup.
    pub fn clear(&mut self) -> Result<(), BlockError> {
        if self.readonly {
            return Err(BlockError::BitmapReadOnly(self.display_name().to_string()));
        }
        self.hbitmap.reset_all();
        Ok(())
    }
    /// `bdrv_clear_dirty_bitmap` with a backup: swaps in an empty bitmap and returns the old
    /// bits, for [`BdrvDirtyBitmap::restore`] on abort.
    pub fn clear_with_backup(&mut self) -> Result<HBitmap, BlockError> {
        if self.readonly {
            return Err(BlockError::BitmapReadOnly(self.display_name().to_string()));
        }
        let fresh = HBitmap::new(self.hbitmap.orig_size(), self.hbitmap.granularity())?;
        Ok(std::mem::replace(&mut self.hbitmap, fresh))
    }
    /// `bdrv_restore_dirty_bitmap`: puts backed-up bits back.
    pub fn restore(&mut self, backup: HBitmap) {
        self.hbitmap = backup;
    }

    /// `serialization_align`: chunk starts must be multiples of this many bytes.
    pub fn serialization_align(&self) -> u64 {
        self.hbitmap.serialization_align()
    }
    /// `serialization_size`: bytes [`BdrvDirtyBitmap::serialize_part`] writes for the chunk.
    pub fn serialization_size(&self, offset: u64, len: u64) -> Result<u64, BlockError> {
        Ok(self.hbitmap.serialization_size(offset, len)?)
    }
    /// `serialization_coverage`: disk bytes covered by `chunk_bytes` of serialized data.
    pub fn serialization_coverage(&self, chunk_bytes: u64) -> u64 {
        u64::from(self.granularity())
            .saturating_mul(chunk_bytes)
            .saturating_mul(8)
    }
    /// Serializes the chunk `[offset, offset+len)` little-endian into `buf`.
    pub fn serialize_part(&self, buf: &mut [u8], offset: u64, len: u64) -> Result<(), BlockError> {
        Ok(self.hbitmap.serialize_part(buf, offset, len)?)
    }
    /// Loads the chunk `[offset, offset+len)` from `buf`.
    pub fn deserialize_part(
        &mut self,
        buf: &[u8],
        offset: u64,
        len: u64,
        finish: bool,
    ) -> Result<(), BlockError> {
        Ok(self.hbitmap.deserialize_part(buf, offset, len, finish)?)
    }
    /// Clears the chunk's words.
    pub fn deserialize_zeroes(
        &mut self,
        offset: u64,
        len: u64,
        finish: bool,
    ) -> Result<(), BlockError> {
        Ok(self.hbitmap.deserialize_zeroes(offset, len, finish)?)
    }
    /// Sets the chunk's words.
    pub fn deserialize_ones(
        &mut self,
        offset: u64,
        len: u64,
        finish: bool,
    ) -> Result<(), BlockError> {
        Ok(self.hbitmap.deserialize_ones(offset, len, finish)?)
    }
    /// Finishes a series of `deserialize_*` calls.
    pub fn deserialize_finish(&mut self) {
        self.hbitmap.deserialize_finish();
    }
    /// The value of `x-debug-block-dirty-bitmap-sha256`: SHA-256 of the bits, lowercase hex.
    pub fn sha256_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.hbitmap.sha256() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// Merges `src` into `dst`, QEMU's `bdrv_merge_dirty_bitmap` with a backup: checks `dst` with
/// `DEFAULT` and `src` with `ALLOW_RO`, refuses different sizes, saves `dst`'s old bits into
/// `backup` if it holds none yet, then ORs. On error `dst` is unchanged.
pub fn merge_into(
    dst: &mut BdrvDirtyBitmap,
    src: &BdrvDirtyBitmap,
    backup: &mut Option<HBitmap>,
) -> Result<(), BlockError> {
    dst.check(BitmapCheck::DEFAULT)?;
    src.check(BitmapCheck::ALLOW_RO)?;
    if dst.size() != src.size() {
        return Err(BlockError::SizeMismatch {
            dest: dst.size(),
            src: src.size(),
        });
    }
    if backup.is_none() {
        *backup = Some(dst.hbitmap.clone());
    }
    dst.hbitmap.merge_from(&src.hbitmap)?;
    Ok(())
}

/// The bitmaps of one node, newest first.
#[derive(Debug, Clone)]
pub struct DirtyBitmaps {
    node_name: String,
    /// The node's length as the bitmaps know it.
    size: u64,
    list: Vec<BdrvDirtyBitmap>,
}

impl DirtyBitmaps {
    /// An empty list for the node `node_name` of `size` bytes.
    pub fn new(node_name: &str, size: u64) -> Self {
        DirtyBitmaps {
            node_name: node_name.to_string(),
            size,
            list: Vec::new(),
        }
    }

    /// The owning node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
    /// The node size new bitmaps get.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Number of bitmaps, anonymous ones included.
    pub fn len(&self) -> usize {
        self.list.len()
    }
    /// No bitmaps at all.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
    /// All bitmaps in list order (newest first), successors included.
    pub fn iter(&self) -> impl Iterator<Item = &BdrvDirtyBitmap> {
        self.list.iter()
    }
    /// All bitmaps, mutable, in list order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut BdrvDirtyBitmap> {
        self.list.iter_mut()
    }
    /// Named bitmaps in list order: what migration and QMP see.
    pub fn named(&self) -> impl Iterator<Item = &BdrvDirtyBitmap> {
        self.list.iter().filter(|b| b.name.is_some())
    }
    /// The bitmap called `name` (`bdrv_find_dirty_bitmap`).
    pub fn find(&self, name: &str) -> Option<&BdrvDirtyBitmap> {
        self.list.iter().find(|b| b.name.as_deref() == Some(name))
    }
    /// The bitmap called `name`, mutable.
    pub fn find_mut(&mut self, name: &str) -> Option<&mut BdrvDirtyBitmap> {
        self.list
            .iter_mut()
            .find(|b| b.name.as_deref() == Some(name))
    }
    /// The bitmap called `name`, or QEMU's `Dirty bitmap '<name>' not found`.
    pub fn lookup(&self, name: &str) -> Result<&BdrvDirtyBitmap, BlockError> {
        self.find(name)
            .ok_or_else(|| BlockError::BitmapNotFound(name.to_string()))
    }
    /// Mutable [`DirtyBitmaps::lookup`].
    pub fn lookup_mut(&mut self, name: &str) -> Result<&mut BdrvDirtyBitmap, BlockError> {
        self.find_mut(name)
            .ok_or_else(|| BlockError::BitmapNotFound(name.to_string()))
    }
    /// The bitmap with this id.
    pub fn get(&self, id: BitmapId) -> Option<&BdrvDirtyBitmap> {
        self.list.iter().find(|b| b.id == id)
    }
    /// The bitmap with this id, mutable.
    pub fn get_mut(&mut self, id: BitmapId) -> Option<&mut BdrvDirtyBitmap> {
        self.list.iter_mut().find(|b| b.id == id)
    }
    fn index(&self, id: BitmapId) -> Result<usize, BlockError> {
        self.list
            .iter()
            .position(|b| b.id == id)
            .ok_or_else(|| BlockError::BitmapNotFound(format!("#{}", id.0)))
    }

    /// QEMU's `bdrv_create_dirty_bitmap`: a new enabled bitmap of the node's size at the head
    /// of the list. Errors (never asserts) for a bad granularity, an existing name, a name
    /// longer than 1023 bytes, or an empty name.
    pub fn create(&mut self, granularity: u32, name: Option<&str>) -> Result<BitmapId, BlockError> {
        let shift = granularity_shift(granularity)?;
        if let Some(n) = name {
            if n.is_empty() {
                return Err(BlockError::BitmapNameEmpty);
            }
            if self.find(n).is_some() {
                return Err(BlockError::BitmapExists(n.to_string()));
            }
            if n.len() > MAX_NAME_SIZE {
                return Err(BlockError::BitmapNameTooLong(n.to_string()));
            }
        }
        let hb = HBitmap::new(self.size, shift)?;
        let bm = BdrvDirtyBitmap::new(name.map(str::to_string), hb);
        let id = bm.id;
        self.list.insert(0, bm);
        Ok(id)
    }

    /// Inserts a bitmap loaded from the image (persistent; readonly on read-only nodes;
    /// inconsistent and disabled when the image had it in use). Names already present are
    /// skipped, as QEMU's qcow2 loader does for bitmaps that arrived by migration.
    pub fn insert_loaded(
        &mut self,
        loaded: crate::driver::LoadedBitmap,
        readonly: bool,
    ) -> Result<Option<BitmapId>, BlockError> {
        if self.find(&loaded.name).is_some() {
            return Ok(None);
        }
        granularity_shift(loaded.granularity)?;
        if loaded.bitmap.orig_size() != self.size
            || 1u64 << loaded.bitmap.granularity() != u64::from(loaded.granularity)
        {
            return Err(BlockError::SizeMismatch {
                dest: self.size,
                src: loaded.bitmap.orig_size(),
            });
        }
        let mut bm = BdrvDirtyBitmap::new(Some(loaded.name), loaded.bitmap);
        bm.persistent = true;
        bm.readonly = readonly;
        bm.disabled = !loaded.enabled;
        if loaded.in_use {
            bm.inconsistent = true;
            bm.disabled = true;
        }
        let id = bm.id;
        self.list.insert(0, bm);
        Ok(Some(id))
    }

    /// Puts the named bitmaps listed in `order` back in that order (after an inactivation
    /// released them and an activation loaded them again at the head). Bitmaps not listed stay
    /// in front, in their current order.
    pub(crate) fn reorder(&mut self, order: &[String]) {
        let key = |b: &BdrvDirtyBitmap| {
            b.name
                .as_ref()
                .and_then(|n| order.iter().position(|o| o == n))
                .map_or((0, 0), |i| (1, i))
        };
        self.list.sort_by_key(key);
    }

    /// `bdrv_release_dirty_bitmap`: removes a bitmap. Refuses (QEMU asserts) a busy bitmap or
    /// one with a successor.
    pub fn release(&mut self, id: BitmapId) -> Result<BdrvDirtyBitmap, BlockError> {
        let i = self.index(id)?;
        let bm = self
            .list
            .get(i)
            .ok_or(BlockError::BitmapNotFound(String::new()))?;
        if bm.busy || bm.successor.is_some() {
            return Err(BlockError::BitmapBusy(bm.display_name().to_string()));
        }
        Ok(self.list.remove(i))
    }

    /// The `recording` predicate: `!disabled || (successor && !successor.disabled)`.
    pub fn recording(&self, id: BitmapId) -> bool {
        let Some(bm) = self.get(id) else { return false };
        if !bm.disabled {
            return true;
        }
        bm.successor
            .and_then(|s| self.get(s))
            .is_some_and(|s| !s.disabled)
    }

    /// `bdrv_dirty_bitmap_create_successor`: freezes `id` (disabled, busy) and returns a new
    /// anonymous bitmap that records in its stead, with `id`'s previous enabled state.
    pub fn create_successor(&mut self, id: BitmapId) -> Result<BitmapId, BlockError> {
        let (granularity, disabled) = {
            let bm = self
                .get(id)
                .ok_or_else(|| BlockError::BitmapNotFound(String::new()))?;
            bm.check(BitmapCheck::BUSY)?;
            if bm.successor.is_some() {
                return Err(BlockError::SuccessorExists);
            }
            (bm.granularity(), bm.disabled)
        };
        let child = self.create(granularity, None)?;
        if let Some(c) = self.get_mut(child) {
            c.disabled = disabled;
        }
        if let Some(bm) = self.get_mut(id) {
            bm.disabled = true;
            bm.successor = Some(child);
            bm.busy = true;
        }
        Ok(child)
    }

    /// `bdrv_dirty_bitmap_enable_successor`: the successor starts recording.
    pub fn enable_successor(&mut self, id: BitmapId) -> Result<(), BlockError> {
        let succ = self
            .get(id)
            .and_then(|b| b.successor)
            .ok_or(BlockError::NoSuccessorToEnable)?;
        if let Some(s) = self.get_mut(succ) {
            s.disabled = false;
        }
        Ok(())
    }

    /// `bdrv_dirty_bitmap_abdicate` (job success): the successor takes the name and
    /// persistence, the parent is released. Returns the successor's id.
    pub fn abdicate(&mut self, id: BitmapId) -> Result<BitmapId, BlockError> {
        let succ = self
            .get(id)
            .and_then(|b| b.successor)
            .ok_or(BlockError::NoSuccessorToAbdicate)?;
        let i = self.index(id)?;
        let parent = self.list.remove(i);
        if let Some(s) = self.get_mut(succ) {
            s.name = parent.name;
            s.persistent = parent.persistent;
        }
        Ok(succ)
    }

    /// `bdrv_reclaim_dirty_bitmap` (job failure): merges the successor back into the parent,
    /// which takes the successor's enabled state and stops being busy.
    pub fn reclaim(&mut self, id: BitmapId) -> Result<(), BlockError> {
        let succ = self
            .get(id)
            .and_then(|b| b.successor)
            .ok_or(BlockError::NoSuccessorToReclaim)?;
        let si = self.index(succ)?;
        let successor = self.list.remove(si);
        let parent = match self.get_mut(id) {
            Some(p) => p,
            None => {
                self.list.insert(si, successor);
                return Err(BlockError::NoSuccessorToReclaim);
            }
        };
        if let Err(e) = parent.hbitmap.merge_from(&successor.hbitmap) {
            self.list.insert(si, successor);
            return Err(e.into());
        }
        parent.disabled = successor.disabled;
        parent.busy = false;
        parent.successor = None;
        Ok(())
    }

    /// `bdrv_dirty_bitmap_truncate`: resizes every bitmap to `new_size` bytes. Refuses (QEMU
    /// asserts) while any bitmap is busy or has a successor; nothing changes then.
    pub fn truncate(&mut self, new_size: u64) -> Result<(), BlockError> {
        self.check_truncatable()?;
        self.resize_all(new_size)
    }

    /// Whether [`DirtyBitmaps::truncate`] would be allowed.
    pub fn check_truncatable(&self) -> Result<(), BlockError> {
        if let Some(b) = self.list.iter().find(|b| b.busy || b.successor.is_some()) {
            return Err(BlockError::BitmapBusy(b.display_name().to_string()));
        }
        Ok(())
    }

    fn resize_all(&mut self, new_size: u64) -> Result<(), BlockError> {
        // Check every bitmap can take the size before changing any.
        for b in &self.list {
            HBitmap::new(new_size, b.hbitmap.granularity())?;
        }
        for b in &mut self.list {
            b.hbitmap.truncate(new_size)?;
        }
        self.size = new_size;
        Ok(())
    }

    /// Grows every bitmap when the node grew by a write past its end (QEMU truncates the
    /// bitmaps in `bdrv_co_write_req_finish`). Never shrinks.
    pub(crate) fn grow(&mut self, new_size: u64) {
        if new_size > self.size && self.resize_all(new_size).is_err() {
            // A size no bitmap can represent: keep the old size; marks past it are clamped.
        }
    }

    /// QEMU's `bdrv_set_dirty`: marks `[offset, offset+len)` in every enabled bitmap (rounding
    /// outward), disabled ones untouched even when busy. The range is clamped to each bitmap.
    pub fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        for b in self.list.iter_mut().filter(|b| !b.disabled) {
            let size = b.hbitmap.orig_size();
            if offset >= size {
                continue;
            }
            let n = len.min(size - offset);
            // In range by construction; an error here would mean a corrupt bitmap.
            let _ = b.hbitmap.set(offset, n);
        }
    }

    /// `bdrv_has_readonly_bitmaps`: writes to the node are refused while this holds.
    pub fn has_readonly(&self) -> bool {
        self.list.iter().any(|b| b.readonly)
    }

    /// Merges bitmap `src` into `dst`, both on this node (see [`merge_into`]).
    pub fn merge(
        &mut self,
        dst: BitmapId,
        src: BitmapId,
        backup: &mut Option<HBitmap>,
    ) -> Result<(), BlockError> {
        let di = self.index(dst)?;
        let si = self.index(src)?;
        if di == si {
            let b = self
                .list
                .get_mut(di)
                .ok_or(BlockError::BitmapNotFound(String::new()))?;
            b.check(BitmapCheck::DEFAULT)?;
            b.check(BitmapCheck::ALLOW_RO)?;
            if backup.is_none() {
                *backup = Some(b.hbitmap.clone());
            }
            return Ok(());
        }
        let (d, s) = if di < si {
            let (l, r) = self.list.split_at_mut(si);
            (l.get_mut(di), r.first())
        } else {
            let (l, r) = self.list.split_at_mut(di);
            (r.first_mut(), l.get(si))
        };
        match (d, s) {
            (Some(d), Some(s)) => merge_into(d, s, backup),
            _ => Err(BlockError::BitmapNotFound(String::new())),
        }
    }

    /// `BlockDirtyInfo` entries for `query-block` / `query-named-block-nodes`, in list order.
    pub fn info(&self) -> Vec<Value> {
        self.list
            .iter()
            .map(|b| {
                let mut m = Map::new();
                if let Some(n) = &b.name {
                    m.insert("name".into(), json!(n));
                }
                m.insert("count".into(), json!(b.count()));
                m.insert("granularity".into(), json!(b.granularity()));
                m.insert("recording".into(), json!(self.recording(b.id)));
                m.insert("busy".into(), json!(b.busy));
                m.insert("persistent".into(), json!(b.persistent));
                if b.inconsistent {
                    m.insert("inconsistent".into(), json!(true));
                }
                Value::Object(m)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn granularity_rules() {
        for bad in [0u32, 256, 511, 3000, 65535, 1000] {
            assert_eq!(
                granularity_shift(bad),
                Err(BlockError::BadGranularity),
                "{bad}"
            );
        }
        assert_eq!(granularity_shift(512), Ok(9));
        assert_eq!(granularity_shift(1 << 31), Ok(31));
        assert_eq!(default_granularity(None), 65536);
        assert_eq!(default_granularity(Some(0)), 65536);
        assert_eq!(default_granularity(Some(512)), 4096);
        assert_eq!(default_granularity(Some(4096)), 4096);
        assert_eq!(default_granularity(Some(65536)), 65536);
        assert_eq!(default_granularity(Some(2 * MIB)), 65536);
    }

    #[test]
    fn create_inserts_at_head_and_checks_names() {
        let mut l = DirtyBitmaps::new("d0", 64 * MIB);
        l.create(65536, Some("big")).unwrap();
        l.create(65536, Some("per")).unwrap();
        l.create(4096, Some("g4k")).unwrap();
        let names: Vec<_> = l.named().map(|b| b.name().unwrap()).collect();
        assert_eq!(names, ["g4k", "per", "big"]);
        assert_eq!(
            l.create(65536, Some("per")).unwrap_err().to_string(),
            "Bitmap already exists: per"
        );
        let long = "x".repeat(1024);
        assert_eq!(
            l.create(65536, Some(&long)).unwrap_err().to_string(),
            format!("Bitmap name too long: {long}")
        );
        assert!(l.create(65536, Some(&"y".repeat(1023))).is_ok());
        assert_eq!(l.create(1000, Some("z")), Err(BlockError::BadGranularity));
    }

    #[test]
    fn check_order_is_busy_readonly_inconsistent() {
        let mut l = DirtyBitmaps::new("d0", MIB);
        let id = l.create(65536, Some("b0")).unwrap();
        let b = l.get_mut(id).unwrap();
        b.set_persistent(true);
        b.set_inconsistent().unwrap();
        b.set_readonly(true);
        b.set_busy(true);
        assert_eq!(
            b.check(BitmapCheck::DEFAULT).unwrap_err().to_string(),
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        );
        assert_eq!(
            b.check(BitmapCheck::RO | BitmapCheck::INCONSISTENT)
                .unwrap_err()
                .to_string(),
            "Bitmap 'b0' is readonly and cannot be modified"
        );
        let e = b.check(BitmapCheck::INCONSISTENT).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bitmap 'b0' is inconsistent and cannot be used"
        );
        assert_eq!(
            e.hint(),
            Some("Try block-dirty-bitmap-remove to delete this bitmap from disk".to_string())
        );
        assert!(!b.enabled(), "inconsistent bitmaps are disabled");
        assert!(b.check(BitmapCheck(0)).is_ok());
    }

    #[test]
    fn successor_lifecycle_messages() {
        let mut l = DirtyBitmaps::new("d0", MIB);
        let id = l.create(65536, Some("b0")).unwrap();
        assert_eq!(
            l.abdicate(id).unwrap_err().to_string(),
            "Cannot relinquish control if there's no successor present"
        );
        assert_eq!(
            l.reclaim(id).unwrap_err().to_string(),
            "Cannot reclaim a successor when none is present"
        );
        let s = l.create_successor(id).unwrap();
        assert!(l.get(id).unwrap().busy());
        assert!(l.recording(id), "the successor records for its parent");
        assert_eq!(
            l.create_successor(id).unwrap_err().to_string(),
            "Bitmap 'b0' is currently in use by another operation and cannot be used"
        );
        l.get_mut(id).unwrap().set_busy(false);
        assert_eq!(
            l.create_successor(id).unwrap_err().to_string(),
            "Cannot create a successor for a bitmap that already has one"
        );
        l.get_mut(id).unwrap().set_busy(true);
        assert!(l.release(id).is_err());
        l.mark(0, 1);
        assert_eq!(l.get(s).unwrap().count(), 65536);
        assert_eq!(l.get(id).unwrap().count(), 0);
        l.reclaim(id).unwrap();
        let b = l.get(id).unwrap();
        assert_eq!((b.count(), b.busy(), b.enabled()), (65536, false, true));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn truncate_refused_while_busy() {
        let mut l = DirtyBitmaps::new("d0", MIB);
        let id = l.create(65536, Some("b0")).unwrap();
        l.get_mut(id).unwrap().set_busy(true);
        assert!(l.truncate(2 * MIB).is_err());
        assert_eq!(l.get(id).unwrap().size(), MIB);
        l.get_mut(id).unwrap().set_busy(false);
        l.truncate(2 * MIB).unwrap();
        assert_eq!(l.get(id).unwrap().size(), 2 * MIB);
        assert_eq!(l.size(), 2 * MIB);
    }

    #[test]
    fn info_lists_anonymous_and_inconsistent_only_when_true() {
        let mut l = DirtyBitmaps::new("d0", MIB);
        let id = l.create(65536, Some("b0")).unwrap();
        l.create_successor(id).unwrap();
        let info = l.info();
        assert_eq!(
            info[0],
            json!({"count": 0, "granularity": 65536, "recording": true, "busy": false, "persistent": false})
        );
        assert_eq!(
            info[1],
            json!({"name": "b0", "count": 0, "granularity": 65536, "recording": true, "busy": true, "persistent": false})
        );
    }

    #[test]
    fn sha_of_empty_bitmap_matches_qemu() {
        // QEMU 7.2, null-co of 1000000 bytes (1000448 rounded), granularity 512, no writes:
        // 1954 bits = 31 words of zeroes.
        let mut l = DirtyBitmaps::new("node0", 1000448);
        let id = l.create(512, Some("b1")).unwrap();
        assert_eq!(
            l.get(id).unwrap().sha256_hex(),
            "b3ab6982980fddf460a2f47adb428475ce9afa89092fd034499d017a35993f05"
        );
    }
}
