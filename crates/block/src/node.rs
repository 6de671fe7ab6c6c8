//! A block node: one driver instance with its name, flags and dirty bitmaps, and the data path
//! that keeps the bitmaps in step with writes.
//!
//! # Requests
//!
//! [`BlockNode::read_at`], [`BlockNode::write_at`], [`BlockNode::write_zeroes`] and
//! [`BlockNode::discard`] are what a guest device or `qemu-io` uses (QEMU's BlockBackend
//! checks): a request reaching past the node's size fails with `EIO`. A format driver talks to
//! its child with the `child_*` variants, which may reach past the child's end (QEMU's
//! node-level requests: reads there are zeroes, writes grow a file, and grow its bitmaps).
//!
//! Every write, write-zeroes and (effective) discard marks the node's **enabled** bitmaps over
//! the request's range, rounded outward to each bitmap's granularity (QEMU's `bdrv_set_dirty`),
//! once the driver has finished — whatever the driver's result, as QEMU does. A node carrying a
//! readonly bitmap refuses writes with `EPERM`; an inactive node refuses them with `EPERM`; a
//! read-only node with "Block node is read-only". Discards do nothing — and mark nothing —
//! unless the node was opened with `discard=unmap` and its driver can discard (QEMU's default
//! is `discard=ignore`; `null-co` has no discard).
//!
//! # Locking
//!
//! The node's mutable state (inactive flag, in-flight count, bitmaps) sits behind one mutex that
//! is held only for short, non-blocking steps: checking flags before a request, marking bitmaps
//! after it. The driver's I/O runs without it, so vCPU threads writing to the same node do not
//! serialize on I/O, and the QMP or migration thread reading bitmaps never waits for a disk.
//! [`BlockNode::inactivate`] waits for in-flight writes on a condition variable, which releases
//! the mutex while it waits; the writers it waits for never wait for anything themselves.

use crate::bitmap::{default_granularity, BdrvDirtyBitmap, BitmapId, DirtyBitmaps};
use crate::driver::{display_filename, BlockDriver, PersistentBitmapStore, StoredBitmap};
use crate::error::BlockError;
use crate::perm::{Perm, PermContext, ALL};
use nix::errno::Errno;
use serde_json::Value;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

/// `BDRV_SECTOR_SIZE`: node sizes are whole sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Largest piece a request is split into when the node has to allocate a buffer.
const IO_CHUNK: u64 = 1 << 20;

/// How a node is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeFlags {
    /// `read-only`.
    pub read_only: bool,
    /// `discard=unmap`.
    pub discard_unmap: bool,
    /// `cache.no-flush`.
    pub no_flush: bool,
    /// Open inactive (an incoming migration's destination).
    pub inactive: bool,
}

/// The users of a node and what they ask for (see [`crate::perm`]).
struct PermState {
    /// Whether the node's permissions are those of an active node.
    active: bool,
    users: Vec<(u64, Perm)>,
}

struct NodeState {
    inactive: bool,
    in_flight: u64,
    bitmaps: DirtyBitmaps,
    /// Names of the named bitmaps, in list order, when the node was last inactivated: the
    /// activation that loads the stored ones again puts them back in this order.
    order: Vec<String>,
}

/// A block node (QEMU's `BlockDriverState`).
pub struct BlockNode {
    id: u64,
    name: String,
    driver: Box<dyn BlockDriver>,
    /// The flags it was opened with; `read-only` is `read_only` below (`blockdev-reopen`
    /// changes it).
    flags: NodeFlags,
    /// `read-only` now.
    read_only: AtomicBool,
    /// Not read-only, and neither is any child (QEMU cannot grant write permission then).
    writable: AtomicBool,
    /// `force-share`: share every permission whatever the users ask (read-only nodes only).
    force_share: bool,
    state: Mutex<NodeState>,
    idle: Condvar,
    /// Taken after `state` when both are needed, never the other way round; a driver's
    /// `set_perm` called under it only takes its children's `perm` locks.
    perm: Mutex<PermState>,
}

impl std::fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockNode")
            .field("name", &self.name)
            .field("driver", &self.driver.format_name())
            .field("flags", &self.flags())
            .finish()
    }
}

/// Exclusive access to a node's bitmaps. Hold it briefly: while it is held, writes to the node
/// wait to mark their bitmaps, and a write from the holding thread would deadlock.
pub struct BitmapsGuard<'a>(MutexGuard<'a, NodeState>);

impl Deref for BitmapsGuard<'_> {
    type Target = DirtyBitmaps;
    fn deref(&self) -> &DirtyBitmaps {
        &self.0.bitmaps
    }
}

impl DerefMut for BitmapsGuard<'_> {
    fn deref_mut(&mut self) -> &mut DirtyBitmaps {
        &mut self.0.bitmaps
    }
}

/// Rounds a driver length up to whole sectors (QEMU's `bdrv_getlength`).
fn round_to_sectors(len: u64) -> Result<u64, BlockError> {
    len.checked_next_multiple_of(SECTOR_SIZE)
        .filter(|&l| l <= i64::MAX as u64)
        .ok_or(BlockError::Io(Errno::EFBIG))
}

impl BlockNode {
    /// Wraps an opened driver as node `name`. `id` orders nodes for locking: a node's id must
    /// be larger than its children's (the layer hands out increasing ids, and children are
    /// opened first). Loads the driver's persistent bitmaps.
    pub fn new(
        id: u64,
        name: &str,
        driver: Box<dyn BlockDriver>,
        flags: NodeFlags,
    ) -> Result<Self, BlockError> {
        let size = round_to_sectors(driver.length()?)?;
        let mut bitmaps = DirtyBitmaps::new(name, size);
        // An inactive node's image belongs to someone else (a migration source): its bitmaps
        // are loaded at activation, as QEMU does.
        if let (Some(store), false) = (driver.bitmap_store(), flags.inactive) {
            for lb in store.load(size, &[])? {
                bitmaps.insert_loaded(lb, flags.read_only)?;
            }
        }
        // A backing file is only read: a read-only backing node does not make its parent
        // read-only.
        let writable = !flags.read_only
            && driver
                .children()
                .iter()
                .filter(|(role, _)| *role != "backing")
                .all(|(_, c)| c.writable());
        Ok(BlockNode {
            id,
            name: name.to_string(),
            driver,
            flags,
            read_only: AtomicBool::new(flags.read_only),
            writable: AtomicBool::new(writable),
            force_share: false,
            state: Mutex::new(NodeState {
                inactive: flags.inactive,
                in_flight: 0,
                bitmaps,
                order: Vec::new(),
            }),
            idle: Condvar::new(),
            perm: Mutex::new(PermState {
                active: !flags.inactive,
                users: Vec::new(),
            }),
        })
    }

    /// Sets `force-share` (before the node is shared): every permission is shared whatever
    /// the node's users ask, so a read-only user can open an image another process writes.
    /// QEMU allows it on read-only nodes only; the layer checks that.
    pub fn with_force_share(mut self, force_share: bool) -> Self {
        self.force_share = force_share;
        self
    }

    /// Whether `force-share` is on.
    pub fn force_share(&self) -> bool {
        self.force_share
    }

    fn lock(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn perm_lock(&self) -> MutexGuard<'_, PermState> {
        self.perm.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn combined(&self, users: &[(u64, Perm)]) -> Perm {
        let p = users.iter().fold(Perm::NONE, |acc, (_, p)| acc.combine(*p));
        if self.force_share {
            Perm { shared: ALL, ..p }
        } else {
            p
        }
    }

    fn perm_context(&self, active: bool) -> PermContext {
        PermContext {
            active,
            writable: self.writable(),
        }
    }

    /// What the node's users ask for, combined (and `force-share` applied).
    pub fn perm(&self) -> Perm {
        self.combined(&self.perm_lock().users)
    }

    /// Sets (`Some`) or withdraws (`None`) what the user `key` (a parent driver or a device,
    /// keys from [`crate::perm::new_user_key`]) asks of this node, and passes the combined
    /// request to the driver. A conflict (another process holds a lock this needs) is QEMU's
    /// error, and nothing changes.
    pub fn set_user_perm(&self, key: u64, perm: Option<Perm>) -> Result<(), BlockError> {
        let mut ps = self.perm_lock();
        let old = ps.users.clone();
        ps.users.retain(|(k, _)| *k != key);
        if let Some(p) = perm {
            ps.users.push((key, p));
        }
        let ctx = self.perm_context(ps.active);
        if let Err(e) = self.driver.set_perm(self.combined(&ps.users), ctx) {
            ps.users = old;
            let _ = self.driver.set_perm(self.combined(&ps.users), ctx);
            return Err(e);
        }
        Ok(())
    }

    /// Recomputes the driver's permissions for an active or inactive node.
    fn refresh_perm(&self, active: bool) -> Result<(), BlockError> {
        let mut ps = self.perm_lock();
        let was = ps.active;
        ps.active = active;
        let p = self.combined(&ps.users);
        if let Err(e) = self.driver.set_perm(p, self.perm_context(active)) {
            ps.active = was;
            let _ = self.driver.set_perm(p, self.perm_context(was));
            return Err(e);
        }
        Ok(())
    }

    /// Lock-ordering key (see the crate documentation).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// The node name (`#block…` when generated).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Whether the name was generated (such nodes cannot migrate bitmaps).
    pub fn auto_named(&self) -> bool {
        self.name.starts_with('#')
    }
    /// The driver name (`drv`).
    pub fn driver_name(&self) -> &'static str {
        self.driver.format_name()
    }
    /// The driver.
    pub fn driver(&self) -> &dyn BlockDriver {
        self.driver.as_ref()
    }
    /// The node's flags (`read-only` as it is now).
    pub fn flags(&self) -> NodeFlags {
        NodeFlags {
            read_only: self.read_only(),
            ..self.flags
        }
    }
    /// `read-only`.
    pub fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }
    /// Whether guests and qemu-io may write: the node is not read-only and neither is any
    /// child (a read-write raw node over a read-only file node is not writable, as in QEMU).
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }
    /// Whether the node is inactive (handed over to a migration destination, or not yet
    /// received from a source).
    pub fn is_inactive(&self) -> bool {
        self.lock().inactive
    }
    /// Writes currently between their flag check and their bitmap marking.
    pub fn in_flight(&self) -> u64 {
        self.lock().in_flight
    }
    /// Size in bytes: the driver's length rounded up to whole sectors, as QEMU reports it.
    pub fn size(&self) -> Result<u64, BlockError> {
        round_to_sectors(self.driver.length()?)
    }
    /// The driver's cluster size, if it reports one.
    pub fn cluster_size(&self) -> Option<u64> {
        self.driver.cluster_size()
    }
    /// Granularity a bitmap gets when `block-dirty-bitmap-add` gives none.
    pub fn default_bitmap_granularity(&self) -> u32 {
        default_granularity(self.driver.cluster_size())
    }
    /// Whether the driver can store persistent bitmaps.
    pub fn can_store_persistent_bitmaps(&self) -> bool {
        self.driver.can_store_persistent_bitmaps()
    }
    /// The filename `query-block` shows.
    pub fn filename(&self) -> String {
        display_filename(&self.driver.filename())
    }

    // ---- requests -------------------------------------------------------------------------

    fn check_request(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let size = self.size()?;
        if offset > size || len > size - offset {
            return Err(BlockError::Io(Errno::EIO));
        }
        Ok(())
    }

    fn check_writable(&self, st: &NodeState) -> Result<(), BlockError> {
        if !self.writable() {
            return Err(BlockError::ReadOnlyNode);
        }
        if st.inactive || st.bitmaps.has_readonly() {
            return Err(BlockError::Io(Errno::EPERM));
        }
        Ok(())
    }

    fn begin_write(&self) -> Result<(), BlockError> {
        let mut st = self.lock();
        self.check_writable(&st)?;
        st.in_flight += 1;
        Ok(())
    }

    fn end_write(&self, offset: u64, len: u64, may_grow: bool) {
        let grown = if may_grow && offset.saturating_add(len) > self.lock().bitmaps.size() {
            self.size().ok()
        } else {
            None
        };
        let mut st = self.lock();
        if let Some(size) = grown {
            st.bitmaps.grow(size);
        }
        st.bitmaps.mark(offset, len);
        st.in_flight = st.in_flight.saturating_sub(1);
        if st.in_flight == 0 {
            self.idle.notify_all();
        }
    }

    fn write_inner(
        &self,
        offset: u64,
        len: u64,
        may_grow: bool,
        io: impl FnOnce() -> Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        self.begin_write()?;
        let r = io();
        self.end_write(offset, len, may_grow);
        r
    }

    fn discard_inner(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_writable(&self.lock())?;
        if !self.flags.discard_unmap || !self.driver.supports_discard() {
            return Ok(());
        }
        self.write_inner(offset, len, false, || self.driver.discard(offset, len))
    }

    /// Reads `buf.len()` bytes at `offset` (`EIO` past the end).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.check_request(offset, buf.len() as u64)?;
        self.driver.read_at(offset, buf)
    }

    /// Writes `buf` at `offset` and marks the enabled bitmaps.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        self.check_request(offset, len)?;
        self.write_inner(offset, len, false, || self.driver.write_at(offset, buf))
    }

    /// Zeroes `[offset, offset+len)` (deallocating if `may_unmap` and the node has
    /// `discard=unmap`) and marks the enabled bitmaps.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError> {
        self.check_request(offset, len)?;
        let unmap = may_unmap && self.flags.discard_unmap;
        self.write_inner(offset, len, false, || {
            self.driver.write_zeroes(offset, len, unmap)
        })
    }

    /// Discards `[offset, offset+len)`; marks the enabled bitmaps when the discard is passed to
    /// the driver (see the module documentation).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_request(offset, len)?;
        self.discard_inner(offset, len)
    }

    /// Makes written data durable (with `cache.no-flush`, only writes cached metadata out).
    pub fn flush(&self) -> Result<(), BlockError> {
        if self.flags.no_flush {
            return self.driver.flush_to_os();
        }
        self.driver.flush()
    }

    /// A format driver's read of its child: past the end reads zeroes.
    pub fn child_read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        offset
            .checked_add(buf.len() as u64)
            .ok_or(BlockError::Io(Errno::EINVAL))?;
        self.driver.read_at(offset, buf)
    }

    /// A format driver's write to its child: may grow it (and its bitmaps).
    pub fn child_write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        let len = buf.len() as u64;
        offset
            .checked_add(len)
            .ok_or(BlockError::Io(Errno::EINVAL))?;
        self.write_inner(offset, len, true, || self.driver.write_at(offset, buf))
    }

    /// A format driver's write-zeroes on its child.
    pub fn child_write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
    ) -> Result<(), BlockError> {
        offset
            .checked_add(len)
            .ok_or(BlockError::Io(Errno::EINVAL))?;
        let unmap = may_unmap && self.flags.discard_unmap;
        self.write_inner(offset, len, true, || {
            self.driver.write_zeroes(offset, len, unmap)
        })
    }

    /// A format driver's discard on its child.
    pub fn child_discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        offset
            .checked_add(len)
            .ok_or(BlockError::Io(Errno::EINVAL))?;
        self.discard_inner(offset, len)
    }

    /// Resizes the node and all its bitmaps. Refused while a bitmap is busy or has a
    /// successor (QEMU asserts), on read-only and on inactive nodes.
    ///
    /// The driver call runs with the node's state locked, so no bitmap can become busy halfway;
    /// it is a host call that never waits for another thread.
    pub fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if !self.writable() {
            return Err(BlockError::ReadOnlyNode);
        }
        let mut st = self.lock();
        if st.inactive {
            return Err(BlockError::Io(Errno::EPERM));
        }
        st.bitmaps.check_truncatable()?;
        self.driver.truncate(size)?;
        let new_size = self.size()?;
        st.bitmaps.truncate(new_size)
    }

    // ---- activation -----------------------------------------------------------------------

    /// Inactivates this node (not its children): refuses new writes, waits for writes in
    /// flight, flushes, stores the bitmaps whose persistence holds (`persistent &&
    /// !skip_store`) through the driver and drops them from memory, lets the driver write back
    /// its metadata, then loosens its permissions (a qcow2 node lets go of its image's write
    /// lock). Bitmaps with `skip_store` stay in memory. If a step fails the node is active
    /// again, so a source whose hand-over failed keeps running.
    pub fn inactivate(&self) -> Result<(), BlockError> {
        {
            let mut st = self.lock();
            if st.inactive {
                return Ok(());
            }
            st.inactive = true;
            while st.in_flight > 0 {
                st = self.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
        }
        let r = self
            .flush()
            .and_then(|()| self.store_bitmaps())
            .and_then(|()| self.driver.inactivate());
        if r.is_err() {
            self.lock().inactive = false;
            return r;
        }
        // Loosening cannot conflict with anyone.
        let _ = self.refresh_perm(false);
        Ok(())
    }

    /// `blockdev-reopen` of this node with `read-only` = `read_only` (QEMU's `bdrv_reopen_*`
    /// for that option). Going read-only: refused while a user still asks to write (a guest
    /// device attached read-write: "Block node is read-only"); the writes in flight are
    /// drained, the persistent bitmaps stored and kept, readonly (QEMU's
    /// `qcow2_reopen_bitmaps_ro`), the driver writes back and stops writing, the permissions
    /// loosen. Going read-write: the driver reopens for writing (taking the image's write lock,
    /// QEMU's error if another process has it), and the bitmaps loaded read-only become
    /// writable (`qcow2_reopen_bitmaps_rw`). The layer reopens the children — before this node
    /// when it goes read-write, after it when it goes read-only. On error the node is as it was.
    pub fn reopen(&self, read_only: bool) -> Result<(), BlockError> {
        let was_writable = self.writable();
        let writable = !read_only
            && self
                .driver
                .children()
                .iter()
                .filter(|(role, _)| *role != "backing")
                .all(|(_, c)| c.writable());
        if !read_only && !writable {
            // A read-write node over a read-only file: QEMU's permission check refuses it.
            return Err(BlockError::ReadOnlyNode);
        }
        let active = {
            let mut st = self.lock();
            if read_only {
                if self.perm().perm & crate::perm::WRITE != 0 {
                    return Err(BlockError::ReadOnlyNode);
                }
                // No write gets past `check_writable` from here on; wait for those in flight.
                self.writable.store(false, Ordering::SeqCst);
                while st.in_flight > 0 {
                    st = self.idle.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
            }
            !st.inactive
        };
        if read_only {
            let stored = if active && was_writable {
                self.store_bitmaps_kept()
            } else {
                Ok(())
            };
            if let Err(e) = stored.and_then(|()| self.driver.reopen(true)) {
                self.writable.store(was_writable, Ordering::SeqCst);
                return Err(e);
            }
            self.read_only.store(true, Ordering::SeqCst);
            self.with_bitmaps(|l| {
                for b in l.iter_mut() {
                    if b.get_persistence() {
                        b.set_readonly(true);
                    }
                }
            });
            // Loosening cannot conflict with anyone.
            let _ = self.refresh_perm(active);
            return Ok(());
        }
        self.driver.reopen(false)?;
        self.read_only.store(false, Ordering::SeqCst);
        self.writable.store(true, Ordering::SeqCst);
        if let Err(e) = self.refresh_perm(active) {
            self.writable.store(was_writable, Ordering::SeqCst);
            self.read_only.store(true, Ordering::SeqCst);
            let _ = self.driver.reopen(true);
            let _ = self.refresh_perm(active);
            return Err(e);
        }
        self.with_bitmaps(|l| {
            for b in l.iter_mut() {
                b.set_readonly(false);
            }
        });
        Ok(())
    }

    /// Stores the persistent bitmaps and keeps them in memory (a reopen to read-only).
    fn store_bitmaps_kept(&self) -> Result<(), BlockError> {
        let Some(store) = self.driver.bitmap_store() else {
            return Ok(());
        };
        let st = self.lock();
        let chosen = to_store(&st.bitmaps);
        write_stored(store, &st.bitmaps, &chosen).map_err(|e| {
            BlockError::Driver(format!(
                "Failed to store persistent bitmaps of node '{}': {e}",
                self.name
            ))
        })
    }

    fn store_bitmaps(&self) -> Result<(), BlockError> {
        let Some(store) = self.driver.bitmap_store() else {
            return Ok(());
        };
        let mut st = self.lock();
        st.order = st
            .bitmaps
            .named()
            .filter_map(|b| b.name().map(str::to_string))
            .collect();
        let list = &st.bitmaps;
        let chosen = to_store(list);
        if chosen.is_empty() {
            return Ok(());
        }
        write_stored(store, list, &chosen).map_err(|e| {
            BlockError::Driver(format!(
                "Lost persistent bitmaps during inactivation of node '{}': {e}",
                self.name
            ))
        })?;
        let ids: Vec<BitmapId> = chosen
            .iter()
            .filter(|b| !b.busy() && b.successor().is_none())
            .map(|b| b.id())
            .collect();
        for id in ids {
            let _ = st.bitmaps.release(id);
        }
        Ok(())
    }

    /// Activates this node (not its children): its permissions are taken back (a qcow2 node
    /// locks its image for writing — QEMU's error if another process has it), the driver
    /// re-reads the image, persistent bitmaps are loaded again (names already in memory are kept
    /// as they are, and stay the ones to store), and every bitmap's `skip_store` is reset —
    /// QEMU's `bdrv_activate`, which does this only for nodes that were inactive. On error the
    /// node stays inactive.
    pub fn activate(&self) -> Result<(), BlockError> {
        let mut st = self.lock();
        if !st.inactive {
            return Ok(());
        }
        self.refresh_perm(true)?;
        let loaded = self.driver.activate().and_then(|()| {
            let Some(store) = self.driver.bitmap_store() else {
                return Ok(Vec::new());
            };
            let names: Vec<String> = st
                .bitmaps
                .named()
                .filter_map(|b| b.name())
                .map(str::to_string)
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            store.load(st.bitmaps.size(), &names)
        });
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                let _ = self.refresh_perm(false);
                return Err(e);
            }
        };
        for lb in loaded {
            if let Err(e) = st.bitmaps.insert_loaded(lb, self.read_only()) {
                let _ = self.refresh_perm(false);
                return Err(e);
            }
        }
        let order = std::mem::take(&mut st.order);
        st.bitmaps.reorder(&order);
        for b in st.bitmaps.iter_mut() {
            b.set_skip_store(false);
        }
        st.inactive = false;
        Ok(())
    }

    // ---- bitmaps --------------------------------------------------------------------------

    /// Locks the node's bitmaps. See [`BitmapsGuard`] for how long to hold it.
    pub fn bitmaps(&self) -> BitmapsGuard<'_> {
        BitmapsGuard(self.lock())
    }

    /// Runs `f` on the node's bitmaps with the lock held.
    pub fn with_bitmaps<R>(&self, f: impl FnOnce(&mut DirtyBitmaps) -> R) -> R {
        f(&mut self.lock().bitmaps)
    }

    /// Creates a bitmap of `granularity` bytes (an error, never an assertion, for a bad one).
    pub fn create_bitmap(
        &self,
        granularity: u32,
        name: Option<&str>,
    ) -> Result<BitmapId, BlockError> {
        self.with_bitmaps(|l| l.create(granularity, name))
    }

    /// `dirty-bitmaps` entries for queries, newest first.
    pub fn bitmap_info(&self) -> Vec<Value> {
        self.lock().bitmaps.info()
    }
}

impl Drop for BlockNode {
    /// Closing a node that is still active inactivates it first (QEMU's `bdrv_close`): its
    /// persistent bitmaps are stored and its metadata written. Errors cannot be reported here.
    fn drop(&mut self) {
        if !self.state.get_mut().map(|s| s.inactive).unwrap_or(true) {
            let _ = self.inactivate();
        }
    }
}

/// Runs `io` over `[offset, offset+len)` in pieces of at most 1 MiB, for callers that need a
/// buffer per piece.
pub(crate) fn for_each_piece(
    offset: u64,
    len: u64,
    mut io: impl FnMut(u64, usize) -> Result<(), BlockError>,
) -> Result<(), BlockError> {
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(IO_CHUNK);
        io(offset + done, n as usize)?;
        done += n;
    }
    Ok(())
}

/// The bitmaps a node writes back to its image: named, persistent, and neither readonly nor
/// inconsistent (QEMU's `bdrv_store_persistent_dirty_bitmaps` choice).
fn to_store(list: &DirtyBitmaps) -> Vec<&BdrvDirtyBitmap> {
    list.named()
        .filter(|b| b.get_persistence() && !b.readonly() && !b.inconsistent())
        .collect()
}

/// Writes `chosen` (from `list`) to the driver's store. Oldest first: a driver appends new
/// names in this order, and loading inserts each at the head, so a store and a load give back
/// the list in its old order.
fn write_stored(
    store: &dyn PersistentBitmapStore,
    list: &DirtyBitmaps,
    chosen: &[&BdrvDirtyBitmap],
) -> Result<(), BlockError> {
    let stored: Vec<StoredBitmap<'_>> = chosen
        .iter()
        .rev()
        .map(|b| StoredBitmap {
            name: b.name().unwrap_or_default(),
            granularity: b.granularity(),
            enabled: list.recording(b.id()),
            bitmap: b.hbitmap(),
        })
        .collect();
    store.store(&stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::null::NullDriver;

    fn null_node(size: u64, flags: NodeFlags) -> BlockNode {
        BlockNode::new(
            1,
            "n0",
            Box::new(NullDriver::new(Some(size), Some(true), None)),
            flags,
        )
        .unwrap()
    }

    #[test]
    fn size_rounds_up_to_sectors() {
        let n = null_node(1_000_000, NodeFlags::default());
        assert_eq!(n.size().unwrap(), 1_000_448);
        assert_eq!(n.bitmaps().size(), 1_000_448);
    }

    #[test]
    fn writes_mark_enabled_bitmaps_only() {
        let n = null_node(1_000_000, NodeFlags::default());
        let on = n.create_bitmap(65536, Some("on")).unwrap();
        let off = n.create_bitmap(512, Some("off")).unwrap();
        n.with_bitmaps(|l| l.get_mut(off).unwrap().set_disabled(true));
        n.write_zeroes(200_000, 1, false).unwrap();
        n.write_at(999_999, &[0u8; 449]).unwrap();
        assert_eq!(
            n.write_at(999_999, &[0u8; 450]),
            Err(BlockError::Io(Errno::EIO))
        );
        let l = n.bitmaps();
        assert_eq!(l.get(on).unwrap().count(), 131072);
        assert_eq!(l.get(off).unwrap().count(), 0);
    }

    #[test]
    fn qemu_sha_after_write_zeroes() {
        // QEMU 7.2: null-co size=1000000, bitmap b0 granularity 65536, `write -z 200000 1`.
        let n = null_node(1_000_000, NodeFlags::default());
        let id = n.create_bitmap(65536, Some("b0")).unwrap();
        n.discard(70000, 1).unwrap();
        n.write_zeroes(200_000, 1, false).unwrap();
        assert_eq!(
            n.bitmaps().get(id).unwrap().sha256_hex(),
            "6cc16abd70eefb90dc0ba0d14fb088630873b2c6ad943f7442356735984c35a3"
        );
    }

    #[test]
    fn readonly_bitmap_inactive_and_readonly_node_refuse_writes() {
        let n = null_node(1 << 20, NodeFlags::default());
        let id = n.create_bitmap(65536, Some("b")).unwrap();
        n.with_bitmaps(|l| l.get_mut(id).unwrap().set_readonly(true));
        assert_eq!(n.write_at(0, &[1]), Err(BlockError::Io(Errno::EPERM)));
        assert_eq!(n.discard(0, 512), Err(BlockError::Io(Errno::EPERM)));
        n.with_bitmaps(|l| l.get_mut(id).unwrap().set_readonly(false));
        n.inactivate().unwrap();
        assert!(n.is_inactive());
        assert_eq!(n.write_at(0, &[1]), Err(BlockError::Io(Errno::EPERM)));
        let mut b = [0u8; 4];
        n.read_at(0, &mut b).unwrap();
        n.activate().unwrap();
        n.write_at(0, &[1]).unwrap();
        let ro = null_node(
            1 << 20,
            NodeFlags {
                read_only: true,
                ..Default::default()
            },
        );
        assert_eq!(ro.write_at(0, &[1]), Err(BlockError::ReadOnlyNode));
    }

    #[test]
    fn inactivate_waits_for_writes_in_flight() {
        use std::sync::Arc;
        let n = Arc::new(
            BlockNode::new(
                1,
                "slow",
                Box::new(NullDriver::new(Some(1 << 20), None, Some(50_000_000))),
                NodeFlags::default(),
            )
            .unwrap(),
        );
        let id = n.create_bitmap(65536, Some("b")).unwrap();
        let w = {
            let n = n.clone();
            std::thread::spawn(move || n.write_at(0, &[1u8; 512]))
        };
        while n.in_flight() == 0 {
            std::thread::yield_now();
        }
        n.inactivate().unwrap();
        // The write that was in flight finished, and marked, before inactivation completed.
        assert_eq!(n.bitmaps().get(id).unwrap().count(), 65536);
        assert!(w.join().unwrap().is_ok());
    }
}
