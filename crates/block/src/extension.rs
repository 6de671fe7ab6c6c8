//! Hooks for crates above this one: drivers this crate does not know, and users of a node that
//! are not guest devices.
//!
//! * **Driver registry.** [`BlockLayer::register_driver`] makes `blockdev-add` open a driver
//!   name it does not know (`nbd`, provided by the `nbd` crate) through a factory. The layer
//!   checks the options every node has (`node-name`, `read-only`, ...) and hands the rest to
//!   the factory, which checks its own members with QEMU's messages. The registry is
//!   process-wide, like QEMU's list of block drivers: drivers are code, not state of one VM.
//! * **Node claims.** A block job or an export that reads or writes a node holds a
//!   [`NodeClaim`] on it (QEMU's permissions of an unnamed BlockBackend). While a claim with
//!   write access exists, [`BlockLayer::inactivate_all`] fails with `EPERM` before it touches
//!   any node — QEMU's `blk_root_inactivate` refuses the same way — so a migration cannot hand
//!   an image over while a mirror is still writing to it. `blockdev-del` of a claimed node is
//!   refused with the claim's own message.
//!
//! Claims live in one table keyed by node identity; a claim keeps its node alive, so the
//! identity cannot be reused while the claim exists. The table's lock is a leaf: it is taken
//! alone, or inside the graph lock, and never held across anything else.

use crate::driver::BlockDriver;
use crate::error::BlockError;
use crate::layer::BlockLayer;
use crate::node::{BlockNode, NodeFlags};
use nix::errno::Errno;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// Opens a registered driver from the driver's own `blockdev-add` members (everything but the
/// common node options, which the layer has already taken out). `read_only` is the node's
/// `read-only` option. The error is what `blockdev-add` reports.
pub type DriverFactory = Arc<
    dyn Fn(&Map<String, Value>, bool) -> Result<Box<dyn BlockDriver>, BlockError> + Send + Sync,
>;

static DRIVERS: RwLock<BTreeMap<String, DriverFactory>> = RwLock::new(BTreeMap::new());

/// The members every node accepts, whatever its driver (QEMU's `BlockdevOptionsBase`).
const BASE_MEMBERS: &[&str] = &[
    "driver",
    "node-name",
    "discard",
    "cache",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
];

impl BlockLayer {
    /// Registers (or replaces) the factory `blockdev-add` uses for driver `name`, for every
    /// layer of this process.
    pub fn register_driver(name: &str, factory: DriverFactory) {
        DRIVERS
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), factory);
    }

    /// Whether a factory is registered for `name`.
    pub fn driver_registered(name: &str) -> bool {
        DRIVERS
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }
}

/// `blockdev-add` for a registered driver, or with `detached` [`BlockLayer::open_detached`]
/// for one: `None` when `options` names no registered driver (the layer's own parser then
/// reports what is wrong with them).
pub(crate) fn open_registered(
    layer: &BlockLayer,
    options: &Value,
    detached: bool,
) -> Option<Result<Arc<BlockNode>, BlockError>> {
    let m = options.as_object()?;
    let driver = m.get("driver")?.as_str()?;
    let factory = DRIVERS
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(driver)
        .cloned()?;
    Some(open_with(layer, m, &factory, detached))
}

fn opt_bool(m: &Map<String, Value>, key: &str) -> Result<Option<bool>, BlockError> {
    match m.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(BlockError::InvalidParameterType {
            name: key.to_string(),
            expected: "boolean".to_string(),
        }),
    }
}

fn open_with(
    layer: &BlockLayer,
    m: &Map<String, Value>,
    factory: &DriverFactory,
    detached: bool,
) -> Result<Arc<BlockNode>, BlockError> {
    let node_name = match m.get("node-name") {
        // A detached node gets a generated name below.
        None if detached => String::new(),
        None => return Err(BlockError::RootNodeNameRequired),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(BlockError::InvalidParameterType {
                name: "node-name".into(),
                expected: "string".into(),
            })
        }
    };
    let read_only = opt_bool(m, "read-only")?.unwrap_or(false);
    opt_bool(m, "auto-read-only")?;
    opt_bool(m, "force-share")?;
    let discard_unmap = match m.get("discard") {
        None => false,
        Some(Value::String(s)) if s == "ignore" || s == "off" => false,
        Some(Value::String(s)) if s == "unmap" || s == "on" => true,
        Some(Value::String(s)) => {
            return Err(BlockError::ParameterValueRejected {
                name: "discard".into(),
                value: s.clone(),
            })
        }
        Some(_) => {
            return Err(BlockError::InvalidParameterType {
                name: "discard".into(),
                expected: "string".into(),
            })
        }
    };
    let no_flush = match m.get("cache") {
        None => false,
        Some(Value::Object(c)) => {
            if opt_bool(c, "direct")? == Some(true) {
                return Err(BlockError::Unsupported(
                    "cache.direct=on is not supported by this block layer".into(),
                ));
            }
            opt_bool(c, "no-flush")?.unwrap_or(false)
        }
        Some(_) => {
            return Err(BlockError::InvalidParameterType {
                name: "cache".into(),
                expected: "object".into(),
            })
        }
    };
    if let Some(d) = m.get("detect-zeroes") {
        if d.as_str() != Some("off") {
            return Err(BlockError::Unsupported(format!(
                "detect-zeroes={} is not supported by this block layer",
                d.as_str().unwrap_or("?")
            )));
        }
    }
    if detached && !node_name.is_empty() {
        return Err(BlockError::Unsupported(
            "node-name is not supported for a node outside the graph".into(),
        ));
    }
    // Check the name before connecting anywhere: a refused name must not have side effects.
    if !detached {
        if layer.node(&node_name).is_some() {
            return Err(BlockError::DuplicateNode(node_name));
        }
        if !crate::options::id_wellformed(&node_name) {
            return Err(BlockError::InvalidNodeName(node_name));
        }
    }
    let own: Map<String, Value> = m
        .iter()
        .filter(|(k, _)| !BASE_MEMBERS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let driver = factory(&own, read_only)?;
    let flags = NodeFlags {
        read_only,
        discard_unmap,
        no_flush,
        inactive: false,
    };
    if detached {
        layer.detached_node(driver, flags)
    } else {
        layer.insert_node(&node_name, driver, flags)
    }
}

// ---- node claims ------------------------------------------------------------------------------

struct ClaimEntry {
    id: u64,
    node: Arc<BlockNode>,
    holder: String,
    write: bool,
    del_refusal: BlockError,
}

static CLAIMS: Mutex<Vec<ClaimEntry>> = Mutex::new(Vec::new());
static NEXT_CLAIM: AtomicU64 = AtomicU64::new(1);

fn claims() -> std::sync::MutexGuard<'static, Vec<ClaimEntry>> {
    CLAIMS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A user's hold on a node (a block job's source or target, an export). Dropping it releases
/// the node.
#[derive(Debug)]
pub struct NodeClaim {
    id: u64,
}

impl NodeClaim {
    /// Claims `node` for `holder` (how errors name the user, e.g. `block job 'job0'`).
    /// `write`: the user writes to the node, which then cannot be inactivated.
    /// `del_refusal`: what `blockdev-del` of the node answers while the claim exists.
    pub fn new(
        node: &Arc<BlockNode>,
        holder: &str,
        write: bool,
        del_refusal: BlockError,
    ) -> NodeClaim {
        let id = NEXT_CLAIM.fetch_add(1, Ordering::Relaxed);
        claims().push(ClaimEntry {
            id,
            node: node.clone(),
            holder: holder.to_string(),
            write,
            del_refusal,
        });
        NodeClaim { id }
    }
}

impl Drop for NodeClaim {
    fn drop(&mut self) {
        let node = {
            let mut c = claims();
            c.iter()
                .position(|e| e.id == self.id)
                .map(|i| c.remove(i).node)
        };
        // The node may be dropped here, outside the table's lock.
        drop(node);
    }
}

/// The holders of claims on `node`, with whether each writes.
pub fn claim_holders(node: &BlockNode) -> Vec<(String, bool)> {
    claims()
        .iter()
        .filter(|e| std::ptr::eq(Arc::as_ptr(&e.node), node))
        .map(|e| (e.holder.clone(), e.write))
        .collect()
}

/// Refuses to inactivate any of `nodes` while a claim with write access is held on one of
/// them (QEMU's `bdrv_inactivate_all` failing with `EPERM`).
pub(crate) fn check_inactivate(nodes: &[Arc<BlockNode>]) -> Result<(), BlockError> {
    let c = claims();
    for e in c.iter().filter(|e| e.write) {
        if nodes.iter().any(|n| Arc::ptr_eq(n, &e.node)) && !e.node.is_inactive() {
            return Err(BlockError::Driver(format!(
                "Cannot inactivate node '{}': {} holds write access to it ({})",
                e.node.name(),
                e.holder,
                crate::error::strerror(Errno::EPERM)
            )));
        }
    }
    Ok(())
}

/// `blockdev-del`'s refusal for a claimed node.
pub(crate) fn check_del(node: &BlockNode) -> Result<(), BlockError> {
    match claims()
        .iter()
        .find(|e| std::ptr::eq(Arc::as_ptr(&e.node), node))
    {
        Some(e) => Err(e.del_refusal.clone()),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn registered_driver_opens_through_blockdev_add() {
        BlockLayer::register_driver(
            "x-test-null",
            Arc::new(|m: &Map<String, Value>, _ro: bool| {
                for k in m.keys() {
                    if k != "size" {
                        return Err(BlockError::UnexpectedParameter(k.clone()));
                    }
                }
                let size = m.get("size").and_then(Value::as_u64);
                Ok(
                    Box::new(crate::driver::null::NullDriver::new(size, Some(true), None))
                        as Box<dyn BlockDriver>,
                )
            }),
        );
        let l = BlockLayer::new();
        let n = l
            .blockdev_add(&json!({"driver": "x-test-null", "node-name": "a", "size": 4096}))
            .unwrap();
        assert_eq!(n.size().unwrap(), 4096);
        assert_eq!(
            l.blockdev_add(&json!({"driver": "x-test-null", "node-name": "a"}))
                .unwrap_err()
                .to_string(),
            "Duplicate nodes with node-name='a'"
        );
        assert_eq!(
            l.blockdev_add(&json!({"driver": "x-test-null", "node-name": "b", "bogus": 1}))
                .unwrap_err()
                .to_string(),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            l.blockdev_add(&json!({"driver": "x-test-null"}))
                .unwrap_err()
                .to_string(),
            "'node-name' must be specified for the root node"
        );
        // Unknown drivers are still the layer's parser's business.
        assert!(l
            .blockdev_add(&json!({"driver": "x-unknown", "node-name": "c"}))
            .is_err());
    }

    #[test]
    fn write_claim_blocks_inactivation_and_del() {
        let l = BlockLayer::new();
        let n = l
            .blockdev_add(&json!({"driver": "null-co", "node-name": "t", "size": 1048576}))
            .unwrap();
        let claim = NodeClaim::new(
            &n,
            "block job 'j0'",
            true,
            BlockError::NodeInUse("t".into()),
        );
        let e = l.inactivate_all().unwrap_err().to_string();
        assert!(e.contains("block job 'j0'"), "{e}");
        assert!(!n.is_inactive());
        assert_eq!(
            l.blockdev_del("t").unwrap_err().to_string(),
            "Node t is in use"
        );
        assert_eq!(
            claim_holders(&n),
            vec![("block job 'j0'".to_string(), true)]
        );
        drop(claim);
        l.inactivate_all().unwrap();
        assert!(n.is_inactive());
        l.activate_all().unwrap();
        l.blockdev_del("t").unwrap();
    }

    #[test]
    fn read_claim_does_not_block_inactivation() {
        let l = BlockLayer::new();
        let n = l
            .blockdev_add(&json!({"driver": "null-co", "node-name": "s", "size": 1048576}))
            .unwrap();
        let _claim = NodeClaim::new(
            &n,
            "block job 'j0'",
            false,
            BlockError::Driver("busy".into()),
        );
        l.inactivate_all().unwrap();
    }
}
