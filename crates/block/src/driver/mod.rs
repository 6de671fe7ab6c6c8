//! The seam between a block node and the thing that stores its bytes: [`BlockDriver`].
//!
//! A driver is one of two kinds, as in QEMU:
//!
//! * a *protocol* driver talks to the host: [`file`](mod@file) (a host file) and [`null`] (`null-co`, no
//!   storage at all);
//! * a *format* driver interprets the bytes of a child node: [`raw`] (a window onto its `file`
//!   child) and [`qcow2`] (clusters, refcounts, a backing chain and persistent bitmaps). A
//!   format driver holds its children as `Arc<BlockNode>`, does its I/O through
//!   [`BlockNode::child_read_at`] and friends, reports its cluster size through
//!   [`BlockDriver::cluster_size`] (which sets the default bitmap granularity), and exposes a
//!   bitmap directory through [`BlockDriver::bitmap_store`] — the block layer calls that seam at
//!   `block-dirty-bitmap-add persistent=true`, at `block-dirty-bitmap-remove`, at open and
//!   activation (load) and at inactivation and close (store).
//!
//! Permissions flow down the graph through [`BlockDriver::set_perm`]: a node tells its driver
//! what its users ask for, a format driver turns that into requests on its children
//! ([`BlockNode::set_user_perm`]), and the `file` driver into image locks (see [`crate::perm`]).
//!
//! Drivers are shared between threads (`Send + Sync`, methods take `&self`): a driver that
//! keeps mutable metadata guards it itself, and must never wait for another thread while holding
//! its own lock (see the crate documentation for the layer's locking rules).

pub mod file;
pub mod null;
pub mod qcow2;
pub mod raw;

use crate::error::BlockError;
use crate::node::BlockNode;
use crate::perm::{Perm, PermContext};
use hbitmap::HBitmap;
use serde_json::{Map, Value};
use std::sync::Arc;

/// What QEMU's `bdrv_get_info` reports, for drivers that implement it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DriverInfo {
    /// Cluster size in bytes, 0 when the format has no clusters.
    pub cluster_size: u64,
    /// The image is marked dirty (qcow2's lazy refcounts); shown as `dirty-flag`.
    pub dirty: bool,
}

/// A persistent bitmap as a driver loads it from its image.
#[derive(Debug, Clone)]
pub struct LoadedBitmap {
    /// Name (non-empty, at most 1023 bytes).
    pub name: String,
    /// Granularity in bytes (a power of two, at least 512).
    pub granularity: u32,
    /// The image says the bitmap records writes (qcow2's `auto` flag).
    pub enabled: bool,
    /// The image says the bitmap was not stored cleanly (qcow2's `in_use`): it loads as
    /// *inconsistent*.
    pub in_use: bool,
    /// The bits, sized to the node.
    pub bitmap: HBitmap,
}

/// A persistent bitmap handed to a driver to store at inactivation.
#[derive(Debug, Clone, Copy)]
pub struct StoredBitmap<'a> {
    /// Name.
    pub name: &'a str,
    /// Granularity in bytes.
    pub granularity: u32,
    /// Whether the bitmap records writes (stored as qcow2's `auto` flag).
    pub enabled: bool,
    /// The bits.
    pub bitmap: &'a HBitmap,
}

/// A driver's store of persistent bitmaps (qcow2's bitmap directory). The block layer keeps the
/// bitmaps in memory; this is only the load/store seam.
pub trait PersistentBitmapStore: Send + Sync {
    /// QEMU's `bdrv_can_store_new_dirty_bitmap`: may a bitmap of this name and granularity
    /// become persistent on this node, which already has the persistent bitmaps named in
    /// `persistent`? `node_name` is the device or node name messages use. The error is the
    /// driver's own message.
    fn can_store_new(
        &self,
        node_name: &str,
        name: &str,
        granularity: u32,
        persistent: &[&str],
    ) -> Result<(), BlockError>;
    /// Removes a bitmap from the image, at `block-dirty-bitmap-remove`. A bitmap the image does
    /// not have is not an error.
    fn remove(&self, node_name: &str, name: &str) -> Result<(), BlockError>;
    /// Loads the image's bitmaps, at open and at activation. Bitmaps named in `in_memory`
    /// already exist on the node (they stayed in memory, or arrived by migration): the driver
    /// does not return them, and takes them as the ones it will store.
    fn load(&self, node_size: u64, in_memory: &[&str]) -> Result<Vec<LoadedBitmap>, BlockError>;
    /// Stores these bitmaps (all of the node's bitmaps that are persistent and not skipped), at
    /// inactivation and close.
    fn store(&self, bitmaps: &[StoredBitmap<'_>]) -> Result<(), BlockError>;
}

/// How a driver names its image in `query-block` (`file` and `image.filename`): either an exact
/// filename, or `json:` followed by the options that open it again (QEMU's
/// `bdrv_refresh_filename`).
#[derive(Debug, Clone, PartialEq)]
pub struct FilenameInfo {
    /// A plain filename that fully describes the image (`/x.img`, `null-co://`), if there is one.
    pub exact: Option<String>,
    /// The options that open the image again, starting with `driver`.
    pub options: Map<String, Value>,
}

/// A block driver: the storage behind one node.
///
/// Offsets and lengths are bytes. The node has already checked them against its size for
/// guest and monitor requests; requests that a format driver makes on its child may reach past
/// the child's end (reads there return zeroes, writes grow a file), as QEMU allows.
pub trait BlockDriver: Send + Sync {
    /// The driver name QMP shows as `drv` and `format` (`file`, `raw`, `null-co`).
    fn format_name(&self) -> &'static str;
    /// Length in bytes (the node rounds it up to whole 512-byte sectors, as QEMU does).
    fn length(&self) -> Result<u64, BlockError>;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError>;
    /// Makes `[offset, offset+len)` read as zeroes; `may_unmap` allows deallocating it.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<(), BlockError>;
    /// Whether [`BlockDriver::discard`] does anything. QEMU skips discard requests (and does not
    /// mark bitmaps) on drivers without discard support.
    fn supports_discard(&self) -> bool;
    /// Deallocates `[offset, offset+len)`; its contents become unspecified.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes written data durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// Writes cached metadata to the child without making it durable (QEMU's
    /// `bdrv_co_flush_to_os`): what a node with `cache.no-flush` does instead of
    /// [`BlockDriver::flush`].
    fn flush_to_os(&self) -> Result<(), BlockError> {
        Ok(())
    }
    /// Stops what requests in flight wait for (QEMU's `bdrv_cancel_in_flight`, which a forced
    /// cancel of a mirror calls on its target, so the cancel is not held up): an `nbd` node
    /// waiting to reconnect fails them at once. Most drivers have nothing to stop.
    fn cancel_in_flight(&self) {}
    /// Changes the length.
    fn truncate(&self, size: u64) -> Result<(), BlockError>;
    /// `bdrv_get_info`, or `None` where QEMU's driver has no such callback.
    fn info(&self) -> Option<DriverInfo>;
    /// `ImageInfoSpecific` for `query-block` (`{"type": "qcow2", "data": {...}}`), if the
    /// format has one.
    fn format_specific(&self) -> Option<Value> {
        None
    }
    /// Cluster size for the default bitmap granularity (§2.3): `Some(c)` with `c > 0` gives
    /// `min(65536, max(4096, c))`, anything else 65536.
    fn cluster_size(&self) -> Option<u64> {
        self.info().map(|i| i.cluster_size)
    }
    /// Bytes the image occupies on the host (`actual-size`).
    fn allocated_size(&self) -> u64;
    /// The child nodes this driver holds, with their role (`file`).
    fn children(&self) -> Vec<(&'static str, Arc<BlockNode>)>;
    /// How `query-block` names the image.
    fn filename(&self) -> FilenameInfo;
    /// The persistent bitmap store, for drivers that can keep bitmaps in the image.
    fn bitmap_store(&self) -> Option<&dyn PersistentBitmapStore> {
        None
    }
    /// Whether this driver can store persistent bitmaps.
    fn can_store_persistent_bitmaps(&self) -> bool {
        self.bitmap_store().is_some()
    }
    /// The users of the node ask for `perm` (combined), in `ctx`. A format driver passes its
    /// own requests on to its children, the `file` driver takes or releases image locks. An
    /// error (a conflicting lock) leaves things as they were.
    fn set_perm(&self, perm: Perm, ctx: PermContext) -> Result<(), BlockError> {
        let _ = (perm, ctx);
        Ok(())
    }
    /// `blockdev-reopen` to `read_only` (the driver's part of QEMU's `bdrv_reopen_prepare` and
    /// `commit` for `read-only`): get ready to be written — take write access to the image and
    /// mark what it writes as in use — or write back what is cached and stop writing. The node
    /// around it drains its requests and stores its bitmaps before going read-only, and sets
    /// its permissions after. A driver that cannot reopen says so
    /// ([`BlockError::ReopenUnsupported`]) and changes nothing; on any other error it is as it
    /// was.
    fn reopen(&self, read_only: bool) -> Result<(), BlockError> {
        let _ = read_only;
        Err(BlockError::ReopenUnsupported)
    }
    /// The backing file the image names, with its format if recorded (`None` for formats
    /// without backing files): what QEMU's `bdrv_open_backing_file` opens for an image opened
    /// without its backing chain.
    fn backing_file_name(&self) -> Option<(String, Option<String>)> {
        None
    }
    /// Whether the bytes at `offset` belong to this node itself rather than to its backing
    /// node (QEMU's `bdrv_is_allocated` on one layer: data and zero clusters are, clusters
    /// left to the backing file are not), and for how many bytes from `offset` (at least one,
    /// at most `len`) that answer holds. Formats without backing files own every byte.
    fn allocated_in_top(&self, offset: u64, len: u64) -> Result<(bool, u64), BlockError> {
        let _ = offset;
        Ok((true, len))
    }
    /// `blockdev-snapshot`: makes `node` this image's backing node, asking of it what a
    /// backing child asks given `parents`, the node's own users' request. Only formats with
    /// backing files can; the others refuse with QEMU's message.
    fn attach_backing(&self, node: Arc<BlockNode>, parents: Perm) -> Result<(), BlockError> {
        let _ = (node, parents);
        Err(BlockError::Driver(
            "The overlay does not support backing images".into(),
        ))
    }
    /// Called when the node becomes active again (QEMU's `bdrv_co_invalidate_cache`), after
    /// its permissions (locks) were taken: drop cached metadata and re-read it.
    fn activate(&self) -> Result<(), BlockError> {
        Ok(())
    }
    /// Called when the node is inactivated for a hand-over, after its requests are drained, its
    /// data flushed and its persistent bitmaps stored: write back metadata and stop writing.
    /// The node then loosens its permissions (locks).
    fn inactivate(&self) -> Result<(), BlockError> {
        Ok(())
    }
}

/// Formats `options` the way QEMU prints a `json:` filename (`{"a": 1, "b": {"c": "d"}}`).
pub fn json_filename(options: &Map<String, Value>) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                out.push('{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push_str(": ");
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    write(v, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut s = String::from("json:");
    write(&Value::Object(options.clone()), &mut s);
    s
}

/// The filename of a node: the exact one if its driver has one, else the `json:` form.
pub fn display_filename(info: &FilenameInfo) -> String {
    match &info.exact {
        Some(f) => f.clone(),
        None => json_filename(&info.options),
    }
}
