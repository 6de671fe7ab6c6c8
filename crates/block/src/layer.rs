//! The block layer: the graph of nodes, `blockdev-add` / `blockdev-del`, the devices attached
//! to nodes, activation, the QMP-shaped bitmap commands and the `query-*` replies.
//!
//! # Locking
//!
//! * The **graph** (which nodes exist, who owns them, which device uses which) is one
//!   `RwLock`. It is held for lookups and for `blockdev-add` / `blockdev-del` (which open or
//!   close host files — host calls that never wait for another thread), never across a wait for
//!   another thread. Guest I/O does not touch it: a device keeps the `Arc<BlockNode>` that
//!   [`BlockLayer::attach_device`] returned.
//! * Each **node's state** (flags and bitmaps) is its own mutex (see [`crate::node`]).
//! * Order: graph before node states; several node states in **descending node id**. A node's
//!   id is larger than its children's (children are opened first, references can only name
//!   existing nodes), so this is also "parents before children", the order in which a format
//!   driver holding its node's state may write to its child.
//! * [`BlockLayer::inactivate_all`] and [`BlockLayer::activate_all`] take a snapshot of the
//!   graph and release it before touching nodes, because inactivation waits for writes in
//!   flight.

use crate::bitmap::{granularity_shift, merge_into, BitmapCheck};
use crate::driver::file::{FileDriver, Locking};
use crate::driver::null::NullDriver;
use crate::driver::qcow2::{Qcow2Driver, Qcow2Options};
use crate::driver::raw::RawDriver;
use crate::driver::BlockDriver;
use crate::error::BlockError;
use crate::node::{BlockNode, NodeFlags};
use crate::options::{
    id_wellformed, BackingRef, BlockdevOptions, BlockdevRef, DriverOptions, MAX_NODE_NAME,
};
use crate::perm::{new_user_key, Perm};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A guest device attached to a node (what `query-block` lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The BlockBackend name (`device` in `query-block`); empty for `-device ...,drive=<node>`.
    pub id: String,
    /// The device's QOM path (`qdev`), e.g. `/machine/peripheral/vd0/virtio-backend`.
    pub qdev: String,
}

/// A source of `block-dirty-bitmap-merge` (QAPI `BlockDirtyBitmapOrStr`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeSource {
    /// A bitmap on the target's node.
    Local(String),
    /// A bitmap on any node.
    External {
        /// Node (or device) name.
        node: String,
        /// Bitmap name.
        name: String,
    },
}

struct Entry {
    node: Arc<BlockNode>,
    /// The options it was opened with (`blockdev-reopen` compares against them); `None` for
    /// a node the embedding VMM inserted, which cannot be reopened.
    opts: Option<BlockdevOptions>,
    monitor_owned: bool,
    device: Option<Device>,
    /// The attached device's key in the node's list of users (see [`crate::perm`]).
    device_key: u64,
}

#[derive(Default)]
struct Graph {
    /// In creation order.
    entries: Vec<Entry>,
    auto_names: u64,
}

impl Graph {
    fn entry(&self, node_name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.node.name() == node_name)
    }
    fn device(&self, id: &str) -> Option<&Entry> {
        if id.is_empty() {
            return None;
        }
        self.entries
            .iter()
            .find(|e| e.device.as_ref().is_some_and(|d| d.id == id))
    }
    fn parents_of(&self, node: &BlockNode) -> usize {
        self.entries
            .iter()
            .filter(|e| {
                e.node
                    .driver()
                    .children()
                    .iter()
                    .any(|(_, c)| c.id() == node.id())
            })
            .count()
    }
}

/// `blockdev-snapshot-sync`'s arguments (QAPI `BlockdevSnapshotSync`).
#[derive(Debug, Clone, Default)]
pub struct SnapshotSync {
    /// `device`.
    pub device: Option<String>,
    /// `node-name`.
    pub node_name: Option<String>,
    /// `snapshot-file`.
    pub snapshot_file: String,
    /// `snapshot-node-name`.
    pub snapshot_node_name: Option<String>,
    /// `format` (default qcow2).
    pub format: Option<String>,
    /// `mode`: `existing` or `absolute-paths` (the default).
    pub mode: Option<String>,
}

/// Inherited options for implicitly created children.
#[derive(Clone, Copy, Default)]
struct Inherit {
    read_only: Option<bool>,
    discard_unmap: Option<bool>,
    no_flush: Option<bool>,
    force_share: Option<bool>,
}

/// All block nodes of one VM process.
pub struct BlockLayer {
    graph: RwLock<Graph>,
    next_id: AtomicU64,
    incoming: AtomicBool,
}

impl Default for BlockLayer {
    fn default() -> Self {
        Self::new()
    }
}

fn non_negative(v: Option<i64>, name: &str) -> Result<Option<u64>, BlockError> {
    match v {
        None => Ok(None),
        Some(x) => u64::try_from(x)
            .map(Some)
            .map_err(|_| BlockError::InvalidParameterValue {
                name: name.to_string(),
                expected: "a non-negative number below 2^64".to_string(),
            }),
    }
}

impl BlockLayer {
    /// An empty layer.
    pub fn new() -> Self {
        BlockLayer {
            graph: RwLock::new(Graph::default()),
            next_id: AtomicU64::new(1),
            incoming: AtomicBool::new(false),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Graph> {
        self.graph.read().unwrap_or_else(PoisonError::into_inner)
    }
    fn write(&self) -> RwLockWriteGuard<'_, Graph> {
        self.graph.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// While set, nodes are opened inactive (QEMU opens images inactive under `-incoming`
    /// until the migration completes and `activate_all` runs).
    pub fn set_incoming(&self, incoming: bool) {
        self.incoming.store(incoming, Ordering::SeqCst);
    }

    // ---- blockdev-add / blockdev-del --------------------------------------------------------

    /// `blockdev-add`: opens the node (and any child defined inline) described by QEMU's
    /// `BlockdevOptions` JSON. Errors are QEMU's.
    pub fn blockdev_add(&self, options: &Value) -> Result<Arc<BlockNode>, BlockError> {
        if let Some(r) = crate::extension::open_registered(self, options) {
            return r;
        }
        let opts = BlockdevOptions::from_json(options)?;
        if opts.node_name.is_none() {
            return Err(BlockError::RootNodeNameRequired);
        }
        opts.check_supported()?;
        let mut g = self.write();
        let mut pending = Vec::new();
        let node = self.open_node(&mut g, &mut pending, &opts, Inherit::default(), true)?;
        g.entries.extend(pending);
        Ok(node)
    }

    /// `-drive`: opens the drive's format node (a generated `#blockNNN` name unless the
    /// option gave `node-name`) and its protocol node. An `if=none` drive gets its
    /// BlockBackend, named by the drive's `id`, here; an `if=virtio` one gets it when the
    /// machine attaches its disk device under that name ([`BlockLayer::attach_device`]).
    /// Either way QMP commands find the disk by the `id`. Like QEMU's, the node belongs to
    /// the backend, not to the monitor (`blockdev-del` refuses it).
    pub fn drive_add(
        &self,
        spec: &crate::options::DriveSpec,
    ) -> Result<Arc<BlockNode>, BlockError> {
        let mut opts = BlockdevOptions::from_json(&spec.options)?;
        opts.check_supported()?;
        if let Some(name) = &spec.backing_node_name {
            match &mut opts.driver_options {
                DriverOptions::Qcow2 { backing, .. } => {
                    *backing = Some(BackingRef::FromImage {
                        node_name: name.clone(),
                    })
                }
                _ => {
                    return Err(BlockError::Unsupported(format!(
                        "Driver '{}' does not support backing files",
                        opts.driver
                    )))
                }
            }
        }
        let node = {
            let mut g = self.write();
            if g.device(&spec.id).is_some() {
                return Err(BlockError::DuplicateDevice(spec.id.clone()));
            }
            let mut pending = Vec::new();
            let node = self.open_node(&mut g, &mut pending, &opts, Inherit::default(), false)?;
            g.entries.extend(pending);
            node
        };
        if spec.interface == crate::options::DriveInterface::None {
            self.attach_device(node.name(), &spec.id, "")?;
        }
        Ok(node)
    }

    /// Adds a node over a driver the embedding VMM built itself (a driver of its own, or one
    /// of this crate's opened directly), owned by the monitor like a `blockdev-add` node. The
    /// name is checked as `blockdev-add` checks it. Children the driver holds must already be
    /// in the layer.
    pub fn insert_node(
        &self,
        node_name: &str,
        driver: Box<dyn BlockDriver>,
        flags: NodeFlags,
    ) -> Result<Arc<BlockNode>, BlockError> {
        let mut g = self.write();
        let name = self.assign_name(&mut g, &[], Some(node_name))?;
        let flags = NodeFlags {
            inactive: flags.inactive || self.incoming.load(Ordering::SeqCst),
            ..flags
        };
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let node = Arc::new(BlockNode::new(id, &name, driver, flags)?);
        g.entries.push(Entry {
            node: node.clone(),
            opts: None,
            monitor_owned: true,
            device: None,
            device_key: new_user_key(),
        });
        Ok(node)
    }

    fn assign_name(
        &self,
        g: &mut Graph,
        pending: &[Entry],
        name: Option<&str>,
    ) -> Result<String, BlockError> {
        let Some(n) = name else {
            loop {
                g.auto_names += 1;
                let candidate = format!("#block{:03}", g.auto_names);
                if g.entry(&candidate).is_none() {
                    return Ok(candidate);
                }
            }
        };
        if !id_wellformed(n) {
            return Err(BlockError::InvalidNodeName(n.to_string()));
        }
        if g.device(n).is_some() {
            return Err(BlockError::NodeNameConflictsWithDevice(n.to_string()));
        }
        if g.entry(n).is_some() || pending.iter().any(|e| e.node.name() == n) {
            return Err(BlockError::DuplicateNode(n.to_string()));
        }
        if n.len() > MAX_NODE_NAME {
            return Err(BlockError::NodeNameTooLong);
        }
        Ok(n.to_string())
    }

    /// Opens the child `r` of a node with `flags` (a reference to an existing node, or a
    /// definition opened with inherited options, owned by its parent).
    fn open_child(
        &self,
        g: &mut Graph,
        pending: &mut Vec<Entry>,
        r: &BlockdevRef,
        inherit: Inherit,
    ) -> Result<Arc<BlockNode>, BlockError> {
        match r {
            BlockdevRef::Reference(name) => Self::find(g, name)
                .or_else(|| {
                    pending
                        .iter()
                        .find(|e| e.node.name() == name)
                        .map(|e| e.node.clone())
                })
                .ok_or_else(|| BlockError::CannotFind {
                    device: name.clone(),
                    node: name.clone(),
                }),
            BlockdevRef::Definition(c) => self.open_node(g, pending, c, inherit, false),
        }
    }

    fn open_node(
        &self,
        g: &mut Graph,
        pending: &mut Vec<Entry>,
        opts: &BlockdevOptions,
        inherit: Inherit,
        monitor_owned: bool,
    ) -> Result<Arc<BlockNode>, BlockError> {
        let flags = NodeFlags {
            read_only: opts.read_only.or(inherit.read_only).unwrap_or(false),
            discard_unmap: opts
                .discard_unmap
                .or(inherit.discard_unmap)
                .unwrap_or(false),
            no_flush: opts.cache_no_flush.or(inherit.no_flush).unwrap_or(false),
            inactive: self.incoming.load(Ordering::SeqCst),
        };
        let force_share = opts.force_share.or(inherit.force_share).unwrap_or(false);
        if force_share && !flags.read_only {
            return Err(BlockError::ForceShareNeedsReadOnly);
        }
        let child_inherit = Inherit {
            read_only: Some(flags.read_only),
            discard_unmap: Some(flags.discard_unmap),
            no_flush: Some(flags.no_flush),
            force_share: Some(force_share),
        };
        // Children first, as QEMU opens them before its own node.
        let child = match &opts.driver_options {
            DriverOptions::Raw { file, .. } | DriverOptions::Qcow2 { file, .. } => {
                Some(self.open_child(g, pending, file, child_inherit)?)
            }
            _ => None,
        };
        let name = self.assign_name(g, pending, opts.node_name.as_deref())?;
        let driver: Box<dyn BlockDriver> = match (&opts.driver_options, child) {
            (DriverOptions::Raw { offset, size, .. }, Some(child)) => Box::new(RawDriver::open(
                child,
                non_negative(*offset, "offset")?,
                non_negative(*size, "size")?,
            )?),
            (DriverOptions::Qcow2 { backing, .. }, Some(child)) => {
                let mut d = Qcow2Driver::open(
                    child.clone(),
                    Qcow2Options {
                        read_only: flags.read_only,
                        inactive: flags.inactive,
                    },
                )?;
                // Backing files are opened read-only (QEMU's backing options).
                let backing_inherit = Inherit {
                    read_only: Some(true),
                    ..child_inherit
                };
                let mut from_image = |name: Option<String>| match d.backing_file() {
                    None => Ok(None),
                    Some((file, format)) => self
                        .open_backing_file(
                            g,
                            pending,
                            &child,
                            (&file, format.as_deref()),
                            backing_inherit,
                            name,
                        )
                        .map(Some),
                };
                let node = match backing {
                    Some(BackingRef::Null) => None,
                    Some(BackingRef::Ref(r)) => {
                        Some(self.open_child(g, pending, r, backing_inherit)?)
                    }
                    Some(BackingRef::FromImage { node_name }) => {
                        from_image(Some(node_name.clone()))?
                    }
                    None => from_image(None)?,
                };
                if let Some(b) = node {
                    d.set_backing(b)?;
                }
                Box::new(d)
            }
            (
                DriverOptions::File {
                    filename, locking, ..
                },
                _,
            ) => Box::new(FileDriver::open_with(
                filename,
                flags.read_only,
                locking
                    .as_deref()
                    .and_then(Locking::parse)
                    .unwrap_or_default(),
            )?),
            (
                DriverOptions::Null {
                    size,
                    latency_ns,
                    read_zeroes,
                },
                _,
            ) => Box::new(NullDriver::new(
                non_negative(*size, "size")?,
                *read_zeroes,
                *latency_ns,
            )),
            (DriverOptions::Raw { .. } | DriverOptions::Qcow2 { .. }, None) => {
                return Err(BlockError::MissingParameter("file".into()))
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let node =
            Arc::new(BlockNode::new(id, &name, driver, flags)?.with_force_share(force_share));
        pending.push(Entry {
            node: node.clone(),
            opts: Some(opts.clone()),
            monitor_owned,
            device: None,
            device_key: new_user_key(),
        });
        Ok(node)
    }

    /// Opens the backing file an image names: relative to the image's directory, in the format
    /// the image records, or probed (qcow2 magic, else raw) when it records none.
    fn open_backing_file(
        &self,
        g: &mut Graph,
        pending: &mut Vec<Entry>,
        image: &BlockNode,
        (file, format): (&str, Option<&str>),
        inherit: Inherit,
        node_name: Option<String>,
    ) -> Result<Arc<BlockNode>, BlockError> {
        // A `json:{...}` name is the backing node's whole definition (QEMU writes one when an
        // image is created over a backing node that has no plain filename).
        if let Some(text) = file.strip_prefix("json:") {
            let v: Value = serde_json::from_str(text).map_err(|e| {
                BlockError::Driver(format!("Could not parse the JSON options of '{file}': {e}"))
            })?;
            let mut opts = BlockdevOptions::from_json(&v)?;
            opts.check_supported()?;
            if node_name.is_some() {
                opts.node_name = node_name;
            }
            return self.open_node(g, pending, &opts, inherit, false);
        }
        let path = match (image.driver().filename().exact, file.starts_with('/')) {
            (Some(img), false) => match std::path::Path::new(&img).parent() {
                Some(dir) if !dir.as_os_str().is_empty() => dir.join(file).display().to_string(),
                _ => file.to_string(),
            },
            _ => file.to_string(),
        };
        let format = match format {
            Some(f) => f.to_string(),
            None => {
                let mut magic = [0u8; 4];
                let probe = std::fs::File::open(&path).and_then(|f| {
                    use std::os::unix::fs::FileExt;
                    f.read_at(&mut magic, 0)
                });
                match probe {
                    Ok(4) if u32::from_be_bytes(magic) == crate::driver::qcow2::header::MAGIC => {
                        "qcow2".to_string()
                    }
                    _ => "raw".to_string(),
                }
            }
        };
        let file_ref = BlockdevRef::Definition(Box::new(BlockdevOptions {
            driver: "file".into(),
            node_name: None,
            discard_unmap: None,
            cache_direct: None,
            cache_no_flush: None,
            read_only: None,
            auto_read_only: None,
            force_share: None,
            detect_zeroes: None,
            driver_options: DriverOptions::File {
                filename: path,
                locking: None,
                aio: None,
            },
        }));
        let driver_options = match format.as_str() {
            "qcow2" => DriverOptions::Qcow2 {
                file: file_ref,
                backing: None,
                lazy_refcounts: None,
                data_file: false,
            },
            "raw" => DriverOptions::Raw {
                file: file_ref,
                offset: None,
                size: None,
            },
            other => return Err(BlockError::Driver(format!("Unknown driver '{other}'"))),
        };
        let opts = BlockdevOptions {
            driver: format,
            node_name,
            discard_unmap: None,
            cache_direct: None,
            cache_no_flush: None,
            read_only: None,
            auto_read_only: None,
            force_share: None,
            detect_zeroes: None,
            driver_options,
        };
        self.open_node(g, pending, &opts, inherit, false)
    }

    // ---- blockdev-reopen ----------------------------------------------------------------------

    /// `blockdev-reopen`: reopens each node of `list` (QEMU's `BlockdevOptions`, `node-name`
    /// selecting the node) with its options, in one transaction: on any error nothing
    /// changes. As in QEMU 7.2, an option left out goes back to its default (`read-only` to
    /// false, or to the parent's value for an implicitly created child), a child given as a
    /// set of options is reopened with them, one given by its current name keeps its options
    /// (inheriting the parent's `read-only` if it was created with the parent), and
    /// `backing` must be given when the node has a backing file. What livemig reopens is
    /// `read-only`, both ways (bitmaps stored and made readonly, or writable again); any
    /// other option must keep its value ("Cannot change the option ..."), and changing
    /// `discard`, `cache.*`, `detect-zeroes` or a child node, which QEMU allows, is refused
    /// with a message saying so.
    pub fn blockdev_reopen(&self, list: &[Value]) -> Result<(), BlockError> {
        let g = self.write();
        let mut plan: Vec<(Arc<BlockNode>, bool)> = Vec::new();
        for v in list {
            let opts = BlockdevOptions::from_json(v)?;
            let name = opts
                .node_name
                .clone()
                .ok_or(BlockError::NodeNameNotSpecified)?;
            let node = g
                .entry(&name)
                .map(|e| e.node.clone())
                .ok_or(BlockError::DelNodeNotFound(name))?;
            Self::plan_reopen(&g, &node, &opts, Inherit::default(), &mut plan)?;
        }
        // Each node once (the last request wins, as QEMU's queue merges them).
        let mut seen = std::collections::HashSet::new();
        let mut steps: Vec<(Arc<BlockNode>, bool)> = plan
            .into_iter()
            .rev()
            .filter(|(n, _)| seen.insert(n.id()))
            .filter(|(n, ro)| n.read_only() != *ro)
            .collect();
        // Read-write: children before parents; read-only: parents before children.
        steps.sort_by_key(|(n, ro)| (*ro, if *ro { u64::MAX - n.id() } else { n.id() }));
        let mut done: Vec<(Arc<BlockNode>, bool)> = Vec::new();
        for (node, ro) in steps {
            if let Err(e) = node.reopen(ro) {
                for (n, r) in done.iter().rev() {
                    let _ = n.reopen(!r);
                }
                return Err(e);
            }
            done.push((node, ro));
        }
        Ok(())
    }

    /// Checks one node's reopen options against the ones it was opened with and adds it (and
    /// the implicitly created children it takes along) to `plan` with its new `read-only`.
    fn plan_reopen(
        g: &Graph,
        node: &Arc<BlockNode>,
        new: &BlockdevOptions,
        inherit: Inherit,
        plan: &mut Vec<(Arc<BlockNode>, bool)>,
    ) -> Result<(), BlockError> {
        let name = node.name().to_string();
        let old = g.entry(&name).and_then(|e| e.opts.clone()).ok_or_else(|| {
            BlockError::ReopenNotSupported {
                format: node.driver_name().to_string(),
                node: name.clone(),
            }
        })?;
        if new.node_name.as_deref().is_some_and(|n| n != name) {
            return Err(BlockError::CannotChangeOption("node-name".into()));
        }
        if new.driver != old.driver {
            return Err(BlockError::CannotChangeOption("driver".into()));
        }
        let read_only = new.read_only.or(inherit.read_only).unwrap_or(false);
        let flags = node.flags();
        let not_built = |what: &str| {
            BlockError::Unsupported(format!(
                "livemig's blockdev-reopen changes 'read-only' only; it cannot change '{what}' of node '{name}'"
            ))
        };
        let discard = new.discard_unmap.or(inherit.discard_unmap).unwrap_or(false);
        if discard != flags.discard_unmap {
            return Err(not_built("discard"));
        }
        let no_flush = new.cache_no_flush.or(inherit.no_flush).unwrap_or(false);
        if no_flush != flags.no_flush {
            return Err(not_built("cache.no-flush"));
        }
        if new.cache_direct.unwrap_or(false) != old.cache_direct.unwrap_or(false) {
            return Err(not_built("cache.direct"));
        }
        if new.detect_zeroes != old.detect_zeroes {
            return Err(not_built("detect-zeroes"));
        }
        let force_share = new.force_share.or(inherit.force_share).unwrap_or(false);
        if force_share != node.force_share() {
            return Err(BlockError::CannotChangeOption("force-share".into()));
        }
        if force_share && !read_only {
            return Err(BlockError::ForceShareNeedsReadOnly);
        }
        let child_inherit = Inherit {
            read_only: Some(read_only),
            discard_unmap: Some(discard),
            no_flush: Some(no_flush),
            force_share: Some(force_share),
        };
        let same = |a: bool, what: &str| {
            if a {
                Ok(())
            } else {
                Err(BlockError::CannotChangeOption(what.into()))
            }
        };
        let children = node.driver().children();
        let child = |role: &str| {
            children
                .iter()
                .find(|(r, _)| *r == role)
                .map(|(_, c)| c.clone())
        };
        let file_ref = match (&new.driver_options, &old.driver_options) {
            (
                DriverOptions::File {
                    filename,
                    locking,
                    aio,
                },
                DriverOptions::File {
                    filename: f0,
                    locking: l0,
                    aio: a0,
                },
            ) => {
                // An option left out is its default, as in QEMU's comparison.
                let or = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.into());
                same(filename == f0, "filename")?;
                same(or(locking, "auto") == or(l0, "auto"), "locking")?;
                same(or(aio, "threads") == or(a0, "threads"), "aio")?;
                None
            }
            (
                DriverOptions::Null {
                    size,
                    latency_ns,
                    read_zeroes,
                },
                DriverOptions::Null {
                    size: s0,
                    latency_ns: l0,
                    read_zeroes: r0,
                },
            ) => {
                same(size.unwrap_or(1 << 30) == s0.unwrap_or(1 << 30), "size")?;
                same(latency_ns.unwrap_or(0) == l0.unwrap_or(0), "latency-ns")?;
                same(
                    read_zeroes.unwrap_or(false) == r0.unwrap_or(false),
                    "read-zeroes",
                )?;
                None
            }
            (
                DriverOptions::Raw { file, offset, size },
                DriverOptions::Raw {
                    offset: o0,
                    size: s0,
                    ..
                },
            ) => {
                same(offset == o0, "offset")?;
                same(size == s0, "size")?;
                Some(file)
            }
            (
                DriverOptions::Qcow2 {
                    file,
                    backing,
                    lazy_refcounts,
                    data_file,
                },
                DriverOptions::Qcow2 {
                    lazy_refcounts: l0,
                    data_file: d0,
                    ..
                },
            ) => {
                same(
                    lazy_refcounts.unwrap_or(false) == l0.unwrap_or(false),
                    "lazy-refcounts",
                )?;
                same(data_file == d0, "data-file")?;
                let current = child("backing");
                match (backing, &current) {
                    (None, Some(_)) => return Err(BlockError::BackingMissing(name)),
                    (None, None) | (Some(BackingRef::Null), None) => {}
                    (Some(BackingRef::Ref(BlockdevRef::Reference(r))), Some(c))
                        if r == c.name() => {}
                    _ => return Err(not_built("backing")),
                }
                Some(file)
            }
            _ => return Err(BlockError::CannotChangeOption("driver".into())),
        };
        if let Some(file_ref) = file_ref {
            let current = child("file").ok_or(BlockError::MissingParameter("file".into()))?;
            let implicit = g.entry(current.name()).is_some_and(|e| !e.monitor_owned);
            match file_ref {
                BlockdevRef::Reference(r) if r == current.name() => {
                    if implicit {
                        // Its own options, the parent's read-only.
                        let mut kept = g
                            .entry(current.name())
                            .and_then(|e| e.opts.clone())
                            .ok_or_else(|| BlockError::ReopenNotSupported {
                                format: current.driver_name().to_string(),
                                node: current.name().to_string(),
                            })?;
                        kept.node_name = None;
                        Self::plan_reopen(g, &current, &kept, child_inherit, plan)?;
                    }
                }
                BlockdevRef::Reference(_) => return Err(not_built("file")),
                BlockdevRef::Definition(c) => {
                    if !implicit {
                        return Err(BlockError::CannotChangeOption("file".into()));
                    }
                    Self::plan_reopen(g, &current, c, child_inherit, plan)?;
                }
            }
        }
        plan.push((node.clone(), read_only));
        Ok(())
    }

    // ---- snapshots ----------------------------------------------------------------------------

    /// `blockdev-snapshot`: `node` (a device or node name) becomes the backing node of
    /// `overlay`, an existing node without one (QEMU's `bdrv_append`), and a BlockBackend
    /// (`-drive if=none`) of `node` moves to `overlay`. QEMU's refusals and messages; livemig
    /// also refuses, saying so, when `node` has a guest device or a parent node, which it
    /// cannot yet move onto the overlay.
    pub fn blockdev_snapshot(&self, node: &str, overlay: &str) -> Result<(), BlockError> {
        let mut g = self.write();
        Self::append(&mut g, node, overlay)
    }

    fn append(g: &mut Graph, node: &str, overlay: &str) -> Result<(), BlockError> {
        let not_found = |n: &str| BlockError::CannotFind {
            device: n.to_string(),
            node: n.to_string(),
        };
        let base = Self::find(g, node).ok_or_else(|| not_found(node))?;
        let top = Self::find(g, overlay).ok_or_else(|| not_found(overlay))?;
        if g.entry(top.name()).is_some_and(|e| e.device.is_some()) {
            return Err(BlockError::Driver("The overlay is already in use".into()));
        }
        if top.id() == base.id() || top.driver().children().iter().any(|(r, _)| *r == "backing") {
            return Err(BlockError::Driver(
                "The overlay already has a backing image".into(),
            ));
        }
        let moved = g.entry(base.name()).and_then(|e| e.device.clone());
        if moved.as_ref().is_some_and(|d| !d.qdev.is_empty()) || g.parents_of(&base) > 0 {
            return Err(BlockError::Unsupported(format!(
                "livemig cannot yet move the guest device or parent node of '{}' onto an overlay",
                base.name()
            )));
        }
        if !base.read_only() && !base.is_inactive() {
            base.flush()?;
        }
        top.driver().attach_backing(base.clone(), top.perm())?;
        if let Some(dev) = moved {
            // The BlockBackend moves: the overlay takes the permissions it asks for.
            let (old_key, new_key) = (
                g.entry(base.name()).map(|e| e.device_key),
                g.entry(top.name()).map(|e| e.device_key),
            );
            if let (Some(old_key), Some(new_key)) = (old_key, new_key) {
                top.set_user_perm(new_key, Some(Perm::device(top.writable())))?;
                let _ = base.set_user_perm(old_key, None);
            }
            for e in g.entries.iter_mut() {
                if e.node.id() == base.id() {
                    e.device = None;
                } else if e.node.id() == top.id() {
                    e.device = Some(dev.clone());
                }
            }
        }
        Ok(())
    }

    /// `blockdev-snapshot-sync`: creates the overlay image `snapshot_file` (qcow2, backed by
    /// the node's image under its filename and format, `mode=absolute-paths`) or opens an
    /// existing one (`mode=existing`), opens it as `snapshot_node_name` without a backing
    /// file, read-only if the node is, and appends it as [`BlockLayer::blockdev_snapshot`]
    /// does. Formats other than qcow2 are refused.
    pub fn blockdev_snapshot_sync(&self, req: &SnapshotSync) -> Result<(), BlockError> {
        let mut g = self.write();
        let base = match (&req.device, &req.node_name) {
            (Some(d), _) if g.device(d).is_some() => Self::find(&g, d),
            (_, Some(n)) => g.entry(n).map(|e| e.node.clone()),
            _ => None,
        }
        .ok_or_else(|| BlockError::CannotFind {
            device: req.device.clone().unwrap_or_default(),
            node: req.node_name.clone().unwrap_or_default(),
        })?;
        if let Some(n) = &req.snapshot_node_name {
            if Self::find(&g, n).is_some() {
                return Err(BlockError::Driver(
                    "New overlay node-name already in use".into(),
                ));
            }
        }
        let format = req.format.as_deref().unwrap_or("qcow2");
        if format != "qcow2" {
            return Err(BlockError::Unsupported(format!(
                "livemig creates qcow2 overlays only, not '{format}'"
            )));
        }
        match req.mode.as_deref().unwrap_or("absolute-paths") {
            "absolute-paths" => {
                let backing = crate::driver::display_filename(&base.driver().filename());
                crate::driver::qcow2::create_image(
                    &req.snapshot_file,
                    base.size()?,
                    Some((&backing, base.driver_name())),
                )?;
            }
            "existing" => {}
            other => {
                return Err(BlockError::InvalidParameterValue {
                    name: "mode".into(),
                    expected: format!("'existing' or 'absolute-paths', not '{other}'"),
                })
            }
        }
        let mut opts = BlockdevOptions::from_json(&json!({"driver": "qcow2",
            "read-only": base.read_only(), "backing": null,
            "file": {"driver": "file", "filename": req.snapshot_file}}))?;
        opts.node_name.clone_from(&req.snapshot_node_name);
        let mut pending = Vec::new();
        let top = self.open_node(&mut g, &mut pending, &opts, Inherit::default(), false)?;
        let ids: Vec<u64> = pending.iter().map(|e| e.node.id()).collect();
        g.entries.extend(pending);
        if let Err(e) = Self::append(&mut g, base.name(), top.name()) {
            g.entries.retain(|e| !ids.contains(&e.node.id()));
            return Err(e);
        }
        Ok(())
    }

    /// `blockdev-del`: removes a node the monitor created, with QEMU's refusals (attached to a
    /// device, created implicitly, used by another node). A node with a busy bitmap (a
    /// migration holds it) counts as used. Implicitly created children go with it. Each removed
    /// node is closed like an inactivation: flushed, persistent bitmaps stored.
    pub fn blockdev_del(&self, node_name: &str) -> Result<(), BlockError> {
        let removed = {
            let mut g = self.write();
            let e = g
                .entry(node_name)
                .ok_or_else(|| BlockError::DelNodeNotFound(node_name.to_string()))?;
            if e.device.is_some() {
                return Err(BlockError::NodeInUse(node_name.to_string()));
            }
            if !e.monitor_owned {
                return Err(BlockError::NotMonitorOwned(node_name.to_string()));
            }
            // A job or export using the node answers first, with its own message (QEMU's
            // permission check comes before the bitmap check).
            crate::extension::check_del(&e.node)?;
            if g.parents_of(&e.node) > 0 || e.node.bitmaps().iter().any(|b| b.busy()) {
                return Err(BlockError::BlockDeviceInUse(node_name.to_string()));
            }
            let mut removed = Vec::new();
            let mut victims = vec![node_name.to_string()];
            while let Some(name) = victims.pop() {
                let Some(i) = g.entries.iter().position(|e| e.node.name() == name) else {
                    continue;
                };
                let e = g.entries.remove(i);
                for (_, child) in e.node.driver().children() {
                    let orphan = g.entry(child.name()).is_some_and(|c| !c.monitor_owned)
                        && g.parents_of(&child) == 0;
                    if orphan {
                        victims.push(child.name().to_string());
                    }
                }
                removed.push(e.node);
            }
            removed
        };
        for n in removed {
            // Closing cannot be refused; QEMU only warns when storing bitmaps fails here.
            let _ = n.inactivate();
        }
        Ok(())
    }

    // ---- lookups ----------------------------------------------------------------------------

    fn find(g: &Graph, name: &str) -> Option<Arc<BlockNode>> {
        g.device(name)
            .or_else(|| g.entry(name))
            .map(|e| e.node.clone())
    }

    /// The node called `node_name`.
    pub fn node(&self, node_name: &str) -> Option<Arc<BlockNode>> {
        self.read().entry(node_name).map(|e| e.node.clone())
    }

    /// All nodes in creation order (QEMU's `bdrv_next_all_states`), implicit children
    /// included.
    pub fn nodes(&self) -> Vec<Arc<BlockNode>> {
        self.read().entries.iter().map(|e| e.node.clone()).collect()
    }

    /// QEMU's `bdrv_lookup_bs(device, node)`: by device name, then by node name; else
    /// `Cannot find device='<device>' nor node-name='<node>'`.
    pub fn lookup_bs(
        &self,
        device: Option<&str>,
        node: Option<&str>,
    ) -> Result<Arc<BlockNode>, BlockError> {
        let g = self.read();
        if let Some(e) = device.and_then(|d| g.device(d)) {
            return Ok(e.node.clone());
        }
        if let Some(e) = node.and_then(|n| g.entry(n)) {
            return Ok(e.node.clone());
        }
        Err(BlockError::CannotFind {
            device: device.unwrap_or_default().to_string(),
            node: node.unwrap_or_default().to_string(),
        })
    }

    /// QEMU's `bdrv_get_device_or_node_name`: the attached device's name if it has one, else
    /// the node name.
    pub fn device_or_node_name(&self, node: &BlockNode) -> String {
        self.read()
            .entries
            .iter()
            .find(|e| e.node.id() == node.id())
            .and_then(|e| e.device.as_ref())
            .filter(|d| !d.id.is_empty())
            .map(|d| d.id.clone())
            .unwrap_or_else(|| node.name().to_string())
    }

    // ---- devices ----------------------------------------------------------------------------

    /// Attaches a guest device to a node and returns the node for its I/O. `device_id` is the
    /// BlockBackend name (empty for `-device ...,drive=<node-name>`).
    pub fn attach_device(
        &self,
        node_name: &str,
        device_id: &str,
        qdev: &str,
    ) -> Result<Arc<BlockNode>, BlockError> {
        let mut g = self.write();
        if !device_id.is_empty() {
            if g.device(device_id).is_some() {
                return Err(BlockError::DuplicateDevice(device_id.to_string()));
            }
            if g.entry(device_id).is_some() {
                return Err(BlockError::DeviceNameConflictsWithNode(
                    device_id.to_string(),
                ));
            }
        }
        let e = g
            .entries
            .iter_mut()
            .find(|e| e.node.name() == node_name)
            .ok_or_else(|| BlockError::CannotFind {
                device: String::new(),
                node: node_name.to_string(),
            })?;
        if let Some(d) = &e.device {
            return Err(BlockError::AlreadyAttached {
                node: node_name.to_string(),
                device: d.qdev.clone(),
            });
        }
        // The device takes QEMU's permissions on the node (virtio-blk, share-rw=off), which
        // reach the image's locks.
        e.node
            .set_user_perm(e.device_key, Some(Perm::device(e.node.writable())))?;
        e.device = Some(Device {
            id: device_id.to_string(),
            qdev: qdev.to_string(),
        });
        Ok(e.node.clone())
    }

    /// Detaches the device with this QOM path; returns whether one was attached.
    pub fn detach_device(&self, qdev: &str) -> bool {
        let mut g = self.write();
        for e in &mut g.entries {
            if e.device.as_ref().is_some_and(|d| d.qdev == qdev) {
                e.device = None;
                let _ = e.node.set_user_perm(e.device_key, None);
                return true;
            }
        }
        false
    }

    // ---- activation -------------------------------------------------------------------------

    /// Inactivates every node, parents before children (QEMU's `bdrv_inactivate_all`). If one
    /// fails, the nodes inactivated so far are activated again and the error is returned.
    pub fn inactivate_all(&self) -> Result<(), BlockError> {
        let mut nodes = self.nodes();
        crate::extension::check_inactivate(&nodes)?;
        nodes.sort_by_key(|n| std::cmp::Reverse(n.id()));
        let mut done: Vec<Arc<BlockNode>> = Vec::new();
        for n in nodes {
            let was_active = !n.is_inactive();
            if let Err(e) = n.inactivate() {
                for d in done.iter().rev() {
                    let _ = d.activate();
                }
                return Err(e);
            }
            if was_active {
                done.push(n);
            }
        }
        Ok(())
    }

    /// Activates every node, children before parents (QEMU's `bdrv_activate_all`), and stops
    /// opening new nodes inactive.
    ///
    /// Activation takes each image's write lock back; if another process holds it, or any
    /// node fails, the nodes this call activated are inactivated again (their persistent bitmaps
    /// stored again) and QEMU's error is returned: nothing is left half-activated.
    pub fn activate_all(&self) -> Result<(), BlockError> {
        self.set_incoming(false);
        let mut nodes = self.nodes();
        nodes.sort_by_key(|n| n.id());
        let mut done: Vec<Arc<BlockNode>> = Vec::new();
        for n in nodes {
            let was_inactive = n.is_inactive();
            if let Err(e) = n.activate() {
                for d in done.iter().rev() {
                    let _ = d.inactivate();
                }
                return Err(e);
            }
            if was_inactive {
                done.push(n);
            }
        }
        Ok(())
    }

    /// Closes every node, as QEMU does at exit (`bdrv_close_all`): each active node is
    /// inactivated (flushed, its persistent bitmaps stored, its image unlocked), parents first,
    /// and the graph is emptied. Errors do not stop the others; the first is returned.
    pub fn close_all(&self) -> Result<(), BlockError> {
        let mut nodes = {
            let mut g = self.write();
            let nodes: Vec<Arc<BlockNode>> = g.entries.iter().map(|e| e.node.clone()).collect();
            g.entries.clear();
            nodes
        };
        nodes.sort_by_key(|n| std::cmp::Reverse(n.id()));
        let mut first = Ok(());
        for n in nodes {
            if let Err(e) = n.inactivate() {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    // ---- QMP bitmap commands ----------------------------------------------------------------

    /// `block_dirty_bitmap_lookup`'s node step: the node named `node` (a node name only, not
    /// a device name), or `Node '<node>' not found`.
    pub fn bitmap_node(&self, node: &str) -> Result<Arc<BlockNode>, BlockError> {
        let g = self.read();
        Self::find(&g, node).ok_or_else(|| BlockError::NodeNotFound(node.to_string()))
    }

    /// `block-dirty-bitmap-add`, with QEMU's checks in QEMU's order (§3.3). A persistent
    /// bitmap on a read-only node is refused here (QEMU accepts it and loses it at shutdown).
    pub fn block_dirty_bitmap_add(
        &self,
        node: &str,
        name: &str,
        granularity: Option<u32>,
        persistent: Option<bool>,
        disabled: Option<bool>,
    ) -> Result<(), BlockError> {
        if name.is_empty() {
            return Err(BlockError::BitmapNameEmpty);
        }
        let bs = self.lookup_bs(Some(node), Some(node))?;
        let granularity = match granularity {
            Some(g) => {
                granularity_shift(g)?;
                g
            }
            None => bs.default_bitmap_granularity(),
        };
        let persistent = persistent.unwrap_or(false);
        if persistent {
            match bs.driver().bitmap_store() {
                None => {
                    return Err(BlockError::CannotStorePersistent(
                        self.device_or_node_name(&bs),
                    ))
                }
                Some(store) => {
                    let names: Vec<String> = {
                        let l = bs.bitmaps();
                        if l.find(name).is_some() {
                            return Err(BlockError::BitmapExists(name.to_string()));
                        }
                        l.named()
                            .filter(|b| b.get_persistence())
                            .filter_map(|b| b.name().map(str::to_string))
                            .collect()
                    };
                    let names: Vec<&str> = names.iter().map(String::as_str).collect();
                    store.can_store_new(
                        &self.device_or_node_name(&bs),
                        name,
                        granularity,
                        &names,
                    )?;
                    if !bs.writable() {
                        return Err(BlockError::Driver(format!(
                            "Can't make bitmap '{name}' persistent in '{}': No write access",
                            bs.name()
                        )));
                    }
                }
            }
        }
        bs.with_bitmaps(|l| {
            let id = l.create(granularity, Some(name))?;
            if let Some(b) = l.get_mut(id) {
                b.set_disabled(disabled.unwrap_or(false));
                b.set_persistent(persistent);
            }
            Ok(())
        })
    }

    /// `block-dirty-bitmap-remove`: refused for busy or readonly bitmaps (an inconsistent one
    /// may go); a bitmap whose persistence holds is removed from the image first.
    pub fn block_dirty_bitmap_remove(&self, node: &str, name: &str) -> Result<(), BlockError> {
        let bs = self.bitmap_node(node)?;
        bs.with_bitmaps(|l| {
            let b = l.lookup(name)?;
            b.check(BitmapCheck::BUSY | BitmapCheck::RO)?;
            let id = b.id();
            if b.get_persistence() {
                if let Some(store) = bs.driver().bitmap_store() {
                    store.remove(bs.name(), name)?;
                }
            }
            l.release(id).map(drop)
        })
    }

    /// `block-dirty-bitmap-clear`: refused for busy, readonly or inconsistent bitmaps.
    pub fn block_dirty_bitmap_clear(&self, node: &str, name: &str) -> Result<(), BlockError> {
        let bs = self.bitmap_node(node)?;
        bs.with_bitmaps(|l| {
            let b = l.lookup_mut(name)?;
            b.check(BitmapCheck::DEFAULT)?;
            b.clear()
        })
    }

    /// `block-dirty-bitmap-enable`: refused for busy or inconsistent bitmaps; allowed on
    /// readonly ones, as in QEMU.
    pub fn block_dirty_bitmap_enable(&self, node: &str, name: &str) -> Result<(), BlockError> {
        self.set_disabled(node, name, false)
    }

    /// `block-dirty-bitmap-disable`: as enable.
    pub fn block_dirty_bitmap_disable(&self, node: &str, name: &str) -> Result<(), BlockError> {
        self.set_disabled(node, name, true)
    }

    fn set_disabled(&self, node: &str, name: &str, disabled: bool) -> Result<(), BlockError> {
        let bs = self.bitmap_node(node)?;
        bs.with_bitmaps(|l| {
            let b = l.lookup_mut(name)?;
            b.check(BitmapCheck::ALLOW_RO)?;
            b.set_disabled(disabled);
            Ok(())
        })
    }

    /// `block-dirty-bitmap-merge`: ORs every source into `target`, in order; on any error the
    /// target is restored to its bits before the first merge, so it is all or nothing.
    ///
    /// An **empty** source list succeeds and changes nothing (QEMU 7.2 crashes on it, §5.4).
    pub fn block_dirty_bitmap_merge(
        &self,
        node: &str,
        target: &str,
        sources: &[MergeSource],
    ) -> Result<(), BlockError> {
        let dst_node = self.bitmap_node(node)?;
        // Resolve source nodes now (graph lock), report their errors in order later.
        let src_nodes: Vec<Result<Arc<BlockNode>, BlockError>> = {
            let g = self.read();
            sources
                .iter()
                .map(|s| match s {
                    MergeSource::Local(_) => Ok(dst_node.clone()),
                    MergeSource::External { node, .. } => {
                        Self::find(&g, node).ok_or_else(|| BlockError::NodeNotFound(node.clone()))
                    }
                })
                .collect()
        };
        let mut locked: Vec<Arc<BlockNode>> = vec![dst_node.clone()];
        for n in src_nodes.iter().flatten() {
            if !locked.iter().any(|l| l.id() == n.id()) {
                locked.push(n.clone());
            }
        }
        locked.sort_by_key(|n| std::cmp::Reverse(n.id()));
        let mut guards: Vec<_> = locked.iter().map(|n| (n.id(), n.bitmaps())).collect();
        let di = guards
            .iter()
            .position(|(id, _)| *id == dst_node.id())
            .ok_or_else(|| BlockError::NodeNotFound(node.to_string()))?;
        let dst_id = {
            let (_, g) = guards
                .get(di)
                .ok_or_else(|| BlockError::NodeNotFound(node.to_string()))?;
            g.lookup(target)?.id()
        };
        let mut backup = None;
        let mut result = Ok(());
        for (src, src_node) in sources.iter().zip(&src_nodes) {
            let step = (|| {
                let src_node = src_node.clone()?;
                let src_name = match src {
                    MergeSource::Local(n) => n,
                    MergeSource::External { name, .. } => name,
                };
                let si = guards
                    .iter()
                    .position(|(id, _)| *id == src_node.id())
                    .ok_or_else(|| BlockError::NodeNotFound(src_node.name().to_string()))?;
                if si == di {
                    let (_, g) = guards
                        .get_mut(di)
                        .ok_or_else(|| BlockError::NodeNotFound(node.to_string()))?;
                    let sid = g.lookup(src_name)?.id();
                    return g.merge(dst_id, sid, &mut backup);
                }
                let (dg, sg) = if di < si {
                    let (l, r) = guards.split_at_mut(si);
                    (l.get_mut(di), r.first())
                } else {
                    let (l, r) = guards.split_at_mut(di);
                    (r.first_mut(), l.get(si))
                };
                let (Some((_, dg)), Some((_, sg))) = (dg, sg) else {
                    return Err(BlockError::NodeNotFound(node.to_string()));
                };
                let s = sg.lookup(src_name)?;
                let d = dg
                    .get_mut(dst_id)
                    .ok_or_else(|| BlockError::BitmapNotFound(target.to_string()))?;
                merge_into(d, s, &mut backup)
            })();
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        if result.is_err() {
            if let (Some(b), Some((_, g))) = (backup, guards.get_mut(di)) {
                if let Some(d) = g.get_mut(dst_id) {
                    d.restore(b);
                }
            }
        }
        result
    }

    /// `x-debug-block-dirty-bitmap-sha256`: the hex SHA-256 of the bits; no state checks.
    pub fn x_debug_block_dirty_bitmap_sha256(
        &self,
        node: &str,
        name: &str,
    ) -> Result<String, BlockError> {
        let bs = self.bitmap_node(node)?;
        let l = bs.bitmaps();
        Ok(l.lookup(name)?.sha256_hex())
    }

    // ---- queries ----------------------------------------------------------------------------

    /// `query-named-block-nodes`: `BlockDeviceInfo` for every node, newest first (as QEMU 7.2
    /// lists them). `flat` changes nothing here, since no node has a backing chain.
    pub fn query_named_block_nodes(&self, _flat: bool) -> Value {
        let nodes = self.nodes();
        Value::Array(nodes.iter().rev().map(|n| block_device_info(n)).collect())
    }

    /// `query-block`: a `BlockInfo` for every attached device, in attach order of the nodes.
    pub fn query_block(&self) -> Value {
        let devices: Vec<(Device, Arc<BlockNode>)> = self
            .read()
            .entries
            .iter()
            .filter_map(|e| e.device.clone().map(|d| (d, e.node.clone())))
            .collect();
        Value::Array(
            devices
                .iter()
                .map(|(d, n)| {
                    json!({
                        "device": d.id,
                        "qdev": d.qdev,
                        "locked": false,
                        "removable": false,
                        "type": "unknown",
                        "io-status": "ok",
                        "inserted": block_device_info(n),
                    })
                })
                .collect(),
        )
    }
}

/// QEMU 7.2's `BlockDeviceInfo` for a node, with the fields a client looks at.
pub fn block_device_info(n: &BlockNode) -> Value {
    let filename = n.filename();
    let size = n.size().unwrap_or(0);
    let mut image = Map::new();
    image.insert("filename".into(), json!(filename));
    image.insert("format".into(), json!(n.driver_name()));
    image.insert("virtual-size".into(), json!(size));
    image.insert("actual-size".into(), json!(n.driver().allocated_size()));
    if let Some(info) = n.driver().info() {
        if info.cluster_size > 0 && n.driver_name() == "qcow2" {
            image.insert("cluster-size".into(), json!(info.cluster_size));
        }
        image.insert("dirty-flag".into(), json!(info.dirty));
    }
    if let Some(spec) = n.driver().format_specific() {
        image.insert("format-specific".into(), spec);
    }
    let backing = |n: &BlockNode| {
        n.driver()
            .children()
            .into_iter()
            .find(|(role, _)| *role == "backing")
            .map(|(_, b)| b)
    };
    let mut depth = 0u64;
    let mut cur = backing(n);
    let first = cur.clone();
    while let Some(b) = cur {
        depth += 1;
        cur = backing(&b);
    }
    let mut m = Map::new();
    m.insert("file".into(), json!(filename));
    m.insert("node-name".into(), json!(n.name()));
    m.insert("ro".into(), json!(n.read_only()));
    m.insert("drv".into(), json!(n.driver_name()));
    if let Some(b) = &first {
        m.insert("backing_file".into(), json!(b.filename()));
    }
    m.insert("backing_file_depth".into(), json!(depth));
    m.insert("encrypted".into(), json!(false));
    m.insert("detect_zeroes".into(), json!("off"));
    for k in ["bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr"] {
        m.insert(k.into(), json!(0));
    }
    if let Some(b) = &first {
        image.insert("backing-filename".into(), json!(b.filename()));
        image.insert("backing-filename-format".into(), json!(b.driver_name()));
    }
    m.insert("image".into(), Value::Object(image));
    m.insert(
        "cache".into(),
        json!({"writeback": true, "direct": false, "no-flush": n.flags().no_flush}),
    );
    m.insert("write_threshold".into(), json!(0));
    let bitmaps = n.bitmap_info();
    if !bitmaps.is_empty() {
        m.insert("dirty-bitmaps".into(), Value::Array(bitmaps));
    }
    Value::Object(m)
}
