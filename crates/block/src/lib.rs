//! Block nodes, image drivers and named dirty bitmaps: the storage side of a VM that migrates
//! QEMU-style.
//!
//! # Shape
//!
//! * [`driver`] — the [`driver::BlockDriver`] seam and its backends: `file` (host file, with
//!   QEMU's image locks), `raw` (format over a child node, with `offset`/`size`), `qcow2`
//!   (clusters, refcounts, backing files, persistent bitmaps), `null-co`. Format drivers reach
//!   their children through [`node::BlockNode`]'s `child_*` requests.
//! * [`perm`] — QEMU's permissions between nodes, which become the `file` driver's locks.
//! * [`node`] — [`BlockNode`]: name, driver, read-only/inactive flags, its bitmaps, and the
//!   data path that marks enabled bitmaps on every write, write-zeroes and discard.
//! * [`bitmap`] — [`BdrvDirtyBitmap`] and a node's [`DirtyBitmaps`] list: creation, states and
//!   their checks, successors, merge, truncate, serialization wrappers (`dirty-bitmaps.md` §2).
//! * [`layer`] — [`BlockLayer`]: the node graph (`blockdev-add`/`blockdev-del` with QEMU's
//!   errors), devices attached to nodes, activation, the QMP bitmap commands (§3) as typed
//!   functions, `query-block` and `query-named-block-nodes`.
//! * [`qmp`] — the same commands from JSON arguments, checked like QEMU's QAPI visitor.
//! * [`options`] — `BlockdevOptions` and the `-blockdev` keyval parser.
//! * [`probe`] — QEMU's image format probing (a `-drive` or `drive-mirror` without a format).
//! * [`qemu_io`] — the `qemu-io` subset tests drive through `human-monitor-command`.
//!
//! # Threads and locks
//!
//! vCPU threads (guest I/O), the QMP thread and the migration thread all use the layer. The
//! design never holds a lock across anything that waits for another thread:
//!
//! * the graph is an `RwLock`, taken for lookups and graph changes only; guest I/O holds an
//!   `Arc<BlockNode>` and never takes it;
//! * each node's state (inactive flag, in-flight count, bitmaps) is a mutex held for short
//!   steps — a flag check before a request, the bitmap marking after it, a QMP bitmap command,
//!   one chunk of bitmap serialization. Driver I/O runs outside it;
//! * inactivation waits for in-flight writes on a condition variable (which releases the
//!   mutex); those writes never wait for anything;
//! * order: graph, then node states in descending node id (parents before children).
//!
//! # For the migration engine
//!
//! Iterate [`BlockLayer::nodes`] (creation order) and, under [`BlockNode::bitmaps`], the
//! [`DirtyBitmaps::named`] bitmaps (newest first); use [`BdrvDirtyBitmap::check`] with
//! [`BitmapCheck::DEFAULT`], `set_busy`, `set_skip_store`, [`DirtyBitmaps::create`] (an error
//! for a bad granularity, never an abort), `create_successor` / `enable_successor` / `reclaim`
//! / `release`, and the `serialize_*` / `deserialize_*` wrappers. [`BlockLayer::inactivate_all`]
//! and [`BlockLayer::activate_all`] hand images over.
//!
//! [`BlockLayer::close_all`] is QEMU's `bdrv_close_all`: a process that exits calls it so that
//! qcow2 metadata and persistent bitmaps reach the image.
//!
//! # Where later work goes
//!
//! * **Block jobs and NBD exports**: they mark bitmaps busy, freeze them with successors and
//!   end with `abdicate` or `reclaim`; they attach to nodes like devices do.
//! * **Transactions**: `clear_with_backup` / `restore` and the merge backup are the undo steps.
// A library does not print: it logs (`log`), and the binary decides where that goes.
#![cfg_attr(not(test), deny(clippy::print_stderr, clippy::print_stdout))]
#![forbid(unsafe_code)]
// Requests, QMP arguments and command lines are untrusted input: nothing here may panic on
// them (house rule), so the panicking shortcuts are refused outside tests.
#![cfg_attr(
    not(test),
    deny(
        clippy::indexing_slicing,
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic
    )
)]

pub mod bitmap;
pub mod driver;
pub mod error;
pub mod extension;
pub mod layer;
pub mod node;
pub mod options;
pub mod perm;
pub mod probe;
pub mod qemu_io;
pub mod qmp;

pub use bitmap::{BdrvDirtyBitmap, BitmapCheck, BitmapId, DirtyBitmaps};
pub use error::BlockError;
pub use layer::{BlockLayer, Device, MergeSource, SnapshotSync};
pub use node::{BitmapsGuard, BlockNode, NodeFlags};
pub use options::{parse_blockdev_keyval, parse_drive, DriveInterface, DriveSpec};
