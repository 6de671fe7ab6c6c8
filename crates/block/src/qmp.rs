//! The block layer's QMP commands, as one [`CommandSet`]: arguments checked with [`qmp::Args`]
//! in QEMU's QAPI visiting order (same messages), then handed to [`BlockLayer`]'s typed
//! functions. Every [`BlockError`] becomes a QMP error here, in [`From<BlockError>`] — the one
//! place this crate's errors meet QMP's classes.

use crate::error::BlockError;
use crate::layer::{BlockLayer, MergeSource, SnapshotSync};
use qmp::{Args, CommandSet, Param, QmpError, Reply, StrOrObject};
use serde_json::{json, Value};
use std::sync::Arc;

/// The commands of [`BlockCommands`].
pub const COMMANDS: &[&str] = &[
    "blockdev-add",
    "blockdev-del",
    "blockdev-reopen",
    "blockdev-snapshot",
    "blockdev-snapshot-sync",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
    "x-debug-block-dirty-bitmap-sha256",
    "query-block",
    "query-named-block-nodes",
];

/// QEMU reports every error of the block layer as a `GenericError`.
impl From<BlockError> for QmpError {
    fn from(e: BlockError) -> QmpError {
        QmpError::generic(e.to_string())
    }
}

/// The block layer's commands over one [`BlockLayer`].
pub struct BlockCommands {
    layer: Arc<BlockLayer>,
}

impl BlockCommands {
    /// The commands of `layer`.
    pub fn new(layer: Arc<BlockLayer>) -> BlockCommands {
        BlockCommands { layer }
    }
}

impl CommandSet for BlockCommands {
    fn commands(&self) -> &[&'static str] {
        COMMANDS
    }

    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
        run(&self.layer, name, args).map(Reply::new)
    }
}

/// Runs block command `name` on `layer` and gives its `return` value; `CommandNotFound` for a
/// name not in [`COMMANDS`].
pub fn run(layer: &BlockLayer, name: &str, mut a: Args) -> Result<Value, QmpError> {
    let done = json!({});
    match name {
        "blockdev-add" => {
            // BlockdevOptions is a union over drivers; its own parser checks it member by
            // member (crate::options).
            layer.blockdev_add(&Value::Object(a.into_map()))?;
            Ok(done)
        }
        "blockdev-reopen" => {
            // Each element is a BlockdevOptions union, checked by its own parser.
            let list: Vec<Value> = a
                .req_list("options")?
                .into_iter()
                .map(|p| p.into_object().map(|o| Value::Object(o.into_map())))
                .collect::<Result<_, _>>()?;
            a.finish()?;
            layer.blockdev_reopen(&list)?;
            Ok(done)
        }
        "blockdev-snapshot" => {
            let node = a.req_str("node")?;
            let overlay = a.req_str("overlay")?;
            a.finish()?;
            layer.blockdev_snapshot(&node, &overlay)?;
            Ok(done)
        }
        "blockdev-snapshot-sync" => {
            let req = SnapshotSync {
                device: a.opt_str("device")?,
                node_name: a.opt_str("node-name")?,
                snapshot_file: a.req_str("snapshot-file")?,
                snapshot_node_name: a.opt_str("snapshot-node-name")?,
                format: a.opt_str("format")?,
                mode: a.opt_enum("mode", &["existing", "absolute-paths"])?,
            };
            a.finish()?;
            layer.blockdev_snapshot_sync(&req)?;
            Ok(done)
        }
        "blockdev-del" => {
            let node = a.req_str("node-name")?;
            a.finish()?;
            layer.blockdev_del(&node)?;
            Ok(done)
        }
        "block-dirty-bitmap-add" => {
            let node = a.req_str("node")?;
            let bitmap = a.req_str("name")?;
            let granularity = a.opt_int::<u32>("granularity")?;
            let persistent = a.opt_bool("persistent")?;
            let disabled = a.opt_bool("disabled")?;
            a.finish()?;
            layer.block_dirty_bitmap_add(&node, &bitmap, granularity, persistent, disabled)?;
            Ok(done)
        }
        "block-dirty-bitmap-remove"
        | "block-dirty-bitmap-clear"
        | "block-dirty-bitmap-enable"
        | "block-dirty-bitmap-disable"
        | "x-debug-block-dirty-bitmap-sha256" => {
            // QAPI's BlockDirtyBitmap.
            let node = a.req_str("node")?;
            let bitmap = a.req_str("name")?;
            a.finish()?;
            match name {
                "block-dirty-bitmap-remove" => layer.block_dirty_bitmap_remove(&node, &bitmap)?,
                "block-dirty-bitmap-clear" => layer.block_dirty_bitmap_clear(&node, &bitmap)?,
                "block-dirty-bitmap-enable" => layer.block_dirty_bitmap_enable(&node, &bitmap)?,
                "block-dirty-bitmap-disable" => layer.block_dirty_bitmap_disable(&node, &bitmap)?,
                _ => {
                    let h = layer.x_debug_block_dirty_bitmap_sha256(&node, &bitmap)?;
                    return Ok(json!({ "sha256": h }));
                }
            }
            Ok(done)
        }
        "block-dirty-bitmap-merge" => {
            let node = a.req_str("node")?;
            let target = a.req_str("target")?;
            let sources = a
                .req_list("bitmaps")?
                .into_iter()
                .map(merge_source)
                .collect::<Result<Vec<_>, _>>()?;
            a.finish()?;
            layer.block_dirty_bitmap_merge(&node, &target, &sources)?;
            Ok(done)
        }
        "query-block" => {
            a.finish()?;
            Ok(layer.query_block())
        }
        "query-named-block-nodes" => {
            let flat = a.opt_bool("flat")?.unwrap_or(false);
            a.finish()?;
            Ok(layer.query_named_block_nodes(flat))
        }
        _ => Err(QmpError::unknown_command(name)),
    }
}

/// One element of `bitmaps`: QAPI's alternate `BlockDirtyBitmapOrStr`, a bitmap of the target's
/// node or `{"node", "name"}` of any node.
pub fn merge_source(p: Param) -> Result<MergeSource, QmpError> {
    Ok(match p.into_str_or_object("BlockDirtyBitmapOrStr")? {
        StrOrObject::Str(name) => MergeSource::Local(name),
        StrOrObject::Object(mut o) => {
            let node = o.req_str("node")?;
            let name = o.req_str("name")?;
            o.finish()?;
            MergeSource::External { node, name }
        }
    })
}
