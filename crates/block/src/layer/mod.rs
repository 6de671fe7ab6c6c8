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
//!
//! # Rooms
//!
//! This module is the graph: nodes, names, `blockdev-add` / `blockdev-del`, lookups and
//! devices. `reopen` holds `blockdev-reopen`; `snapshot` `blockdev-snapshot(-sync)`; `pivot`
//! what a mirror's end changes (the target's backing chain opened late, the BlockBackend
//! moved to the target);
//! `activation` inactivation, activation and close of the whole graph; `commands` the
//! QMP-shaped bitmap commands and the `query-*` replies.

mod activation;
mod commands;
mod pivot;
mod reopen;
mod snapshot;

pub use commands::block_device_info;

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
        if let Some(r) = crate::extension::open_registered(self, options, false) {
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
    /// the backend, not to the monitor (`blockdev-del` refuses it). Without `format=` the
    /// format is probed ([`crate::probe`]).
    pub fn drive_add(
        &self,
        spec: &crate::options::DriveSpec,
    ) -> Result<Arc<BlockNode>, BlockError> {
        let mut opts = self.probed_options(&spec.options)?;
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

    /// Opens the node `options` describe (QEMU's `BlockdevOptions`, without `node-name`) for
    /// one user alone, outside the graph: QEMU's anonymous node of `drive-mirror`'s target,
    /// which lives as long as the job that opened it. It gets a generated `#blockNNN` name,
    /// no lookup or query finds it, and it is closed when its last reference is dropped.
    /// Options without `driver` have the format probed ([`crate::probe`]). With `no_backing`
    /// an image's backing file is not opened (QEMU's `BDRV_O_NO_BACKING`:
    /// [`BlockLayer::open_backing_chain`] opens it later).
    pub fn open_detached(
        &self,
        options: &Value,
        no_backing: bool,
    ) -> Result<Arc<BlockNode>, BlockError> {
        if let Some(r) = crate::extension::open_registered(self, options, true) {
            return r;
        }
        let mut opts = self.probed_options(options)?;
        if let DriverOptions::Qcow2 {
            backing: backing @ None,
            ..
        } = &mut opts.driver_options
        {
            if no_backing {
                *backing = Some(BackingRef::Null);
            }
        }
        if opts.node_name.is_some() {
            return Err(BlockError::Unsupported(
                "node-name is not supported for a node outside the graph".into(),
            ));
        }
        opts.check_supported()?;
        let mut g = self.write();
        // The children stay out of the graph too: the node holds them.
        let mut children = Vec::new();
        self.open_node(&mut g, &mut children, &opts, Inherit::default(), false)
    }

    /// Wraps `driver` as a node outside the graph, with a generated name (the end of
    /// [`BlockLayer::open_detached`] for a registered driver).
    pub(crate) fn detached_node(
        &self,
        driver: Box<dyn BlockDriver>,
        flags: NodeFlags,
    ) -> Result<Arc<BlockNode>, BlockError> {
        let mut g = self.write();
        let name = self.assign_name(&mut g, &[], None)?;
        let flags = NodeFlags {
            inactive: flags.inactive || self.incoming.load(Ordering::SeqCst),
            ..flags
        };
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        Ok(Arc::new(BlockNode::new(id, &name, driver, flags)?))
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
            (
                DriverOptions::Raw {
                    offset,
                    size,
                    probed,
                    ..
                },
                Some(child),
            ) => {
                let mut d = RawDriver::open(
                    child.clone(),
                    non_negative(*offset, "offset")?,
                    non_negative(*size, "size")?,
                )?;
                if *probed {
                    d.set_probed();
                    if !flags.read_only {
                        // QEMU's warning (`raw_open`), printed as it prints it.
                        log::info!(
                            "WARNING: Image format was not specified for '{}' and probing \
                             guessed raw.\n         Automatically detecting the format is \
                             dangerous for raw images, write operations on block 0 will be \
                             restricted.\n         Specify the 'raw' format explicitly to \
                             remove the restrictions.",
                            crate::driver::display_filename(&child.driver().filename())
                        );
                    }
                }
                Box::new(d)
            }
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

    /// A probed format livemig opens (`qcow2`, `raw`), or a refusal naming the format QEMU
    /// would have opened the image as.
    fn openable_probed(format: &'static str, filename: &str) -> Result<&'static str, BlockError> {
        match format {
            "qcow2" | "raw" => Ok(format),
            other => Err(BlockError::Unsupported(format!(
                "Could not open '{filename}': its format was probed as '{other}', which \
                 livemig does not open (it opens qcow2 and raw)"
            ))),
        }
    }

    /// QEMU's `bdrv_open` of options without `driver` (a `-drive` or `drive-mirror` that names
    /// no format): opens the image `file` describes on its own, read-only, reads its first
    /// sector and fills in the probed format (`find_image_format`: an empty image is raw; a
    /// failed read is QEMU's "Could not read image for determining its format"). A probed
    /// raw node keeps its first sector raw ([`RawDriver::set_probed`]). Options that name a
    /// driver are returned as they are.
    fn with_probed_format(&self, options: &Value) -> Result<Value, BlockError> {
        let Some(m) = options.as_object().filter(|m| !m.contains_key("driver")) else {
            return Ok(options.clone());
        };
        let image = match m.get("file") {
            Some(Value::String(name)) => self.lookup_bs(None, Some(name))?,
            Some(Value::Object(f)) => {
                let mut f = f.clone();
                f.insert("read-only".into(), Value::Bool(true));
                // QEMU probes through the protocol node it then keeps; this one is closed
                // again, so its generated name is given back and the names that follow are
                // QEMU's.
                let names = self.read().auto_names;
                let node = self.open_detached(&Value::Object(f), false);
                self.write().auto_names = names;
                node?
            }
            _ => return Err(BlockError::MissingParameter("driver".into())),
        };
        let filename = crate::driver::display_filename(&image.driver().filename());
        let size = image.size()?;
        let found = if size == 0 {
            "raw"
        } else {
            let mut head = vec![0u8; size.min(crate::probe::PROBE_BUF_SIZE as u64) as usize];
            image.read_at(0, &mut head).map_err(|e| {
                BlockError::Driver(format!(
                    "Could not read image for determining its format: {e}"
                ))
            })?;
            crate::probe::probe(&head, Some(&filename))
        };
        drop(image);
        let format = Self::openable_probed(found, &filename)?;
        let mut m = m.clone();
        m.insert("driver".into(), Value::String(format.into()));
        Ok(Value::Object(m))
    }

    /// [`BlockdevOptions`] of options that may lack `driver` (see
    /// [`BlockLayer::with_probed_format`]).
    fn probed_options(&self, options: &Value) -> Result<BlockdevOptions, BlockError> {
        let probed = options.get("driver").is_none();
        let mut opts = BlockdevOptions::from_json(&self.with_probed_format(options)?)?;
        if let DriverOptions::Raw { probed: p, .. } = &mut opts.driver_options {
            *p = probed;
        }
        Ok(opts)
    }

    /// Opens the backing file an image names: relative to the image's directory, in the format
    /// the image records, or probed ([`crate::probe`]) when it records none.
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
        let (format, probed) = match format {
            Some(f) => (f.to_string(), false),
            None => {
                let mut head = [0u8; crate::probe::PROBE_BUF_SIZE];
                let n = std::fs::File::open(&path)
                    .and_then(|f| {
                        use std::os::unix::fs::FileExt;
                        f.read_at(&mut head, 0)
                    })
                    .unwrap_or(0);
                let found = crate::probe::probe(head.get(..n).unwrap_or_default(), Some(&path));
                (Self::openable_probed(found, &path)?.to_string(), true)
            }
        };
        let file = DriverOptions::File {
            filename: path,
            locking: None,
            aio: None,
        };
        let file_ref =
            BlockdevRef::Definition(Box::new(BlockdevOptions::plain("file".into(), None, file)));
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
                probed,
            },
            other => return Err(BlockError::Driver(format!("Unknown driver '{other}'"))),
        };
        let opts = BlockdevOptions::plain(format, node_name, driver_options);
        self.open_node(g, pending, &opts, inherit, false)
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

    /// The node the guest device at QOM path `qdev` uses (QEMU's `blk_by_qdev_id` once the
    /// path is resolved), if a device there has one.
    pub fn device_node(&self, qdev: &str) -> Option<Arc<BlockNode>> {
        self.read()
            .entries
            .iter()
            .find(|e| e.device.as_ref().is_some_and(|d| d.qdev == qdev))
            .map(|e| e.node.clone())
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
}
