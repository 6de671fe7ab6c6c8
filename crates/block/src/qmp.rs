//! The block layer's QMP commands: arguments checked as QEMU's QAPI visitor checks them (same
//! order, same messages), then handed to [`BlockLayer`]. The monitor crate calls
//! [`dispatch`] for the commands in [`COMMANDS`] and turns an `Err` into
//! `{"error": {"class": e.class(), "desc": e.to_string()}}`.

use crate::error::BlockError;
use crate::layer::{BlockLayer, MergeSource};
use serde_json::{json, Map, Value};

/// The commands [`dispatch`] handles.
pub const COMMANDS: &[&str] = &[
    "blockdev-add",
    "blockdev-del",
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

static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();

fn object(args: &Value) -> Result<&Map<String, Value>, BlockError> {
    match args {
        Value::Object(m) => Ok(m),
        Value::Null => Ok(EMPTY.get_or_init(Map::new)),
        _ => Err(BlockError::InvalidParameterType {
            name: "arguments".into(),
            expected: "object".into(),
        }),
    }
}

fn req_str<'a>(m: &'a Map<String, Value>, name: &str, path: &str) -> Result<&'a str, BlockError> {
    match m.get(name) {
        None => Err(BlockError::MissingParameter(format!("{path}{name}"))),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(BlockError::InvalidParameterType {
            name: format!("{path}{name}"),
            expected: "string".into(),
        }),
    }
}

fn opt_bool(m: &Map<String, Value>, name: &str) -> Result<Option<bool>, BlockError> {
    match m.get(name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(BlockError::InvalidParameterType {
            name: name.into(),
            expected: "boolean".into(),
        }),
    }
}

/// QAPI `uint32`: visited as uint64 (negative numbers wrap, as QEMU accepts them), then range
/// checked.
fn opt_u32(m: &Map<String, Value>, name: &str) -> Result<Option<u32>, BlockError> {
    let Some(v) = m.get(name) else {
        return Ok(None);
    };
    let wide = v
        .as_u64()
        .or_else(|| v.as_i64().map(|i| i as u64))
        .ok_or_else(|| BlockError::InvalidParameterValue {
            name: name.into(),
            expected: "uint64".into(),
        })?;
    u32::try_from(wide)
        .map(Some)
        .map_err(|_| BlockError::InvalidParameterValue {
            name: name.into(),
            expected: "uint32_t".into(),
        })
}

fn no_others(m: &Map<String, Value>, allowed: &[&str], path: &str) -> Result<(), BlockError> {
    match m.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(BlockError::UnexpectedParameter(format!("{path}{k}"))),
        None => Ok(()),
    }
}

/// `BlockDirtyBitmap` arguments: `node`, `name`.
fn node_and_name(args: &Value) -> Result<(&str, &str), BlockError> {
    let m = object(args)?;
    let node = req_str(m, "node", "")?;
    let name = req_str(m, "name", "")?;
    no_others(m, &["node", "name"], "")?;
    Ok((node, name))
}

fn merge_sources(v: &Value) -> Result<Vec<MergeSource>, BlockError> {
    let list = v
        .as_array()
        .ok_or_else(|| BlockError::InvalidParameterType {
            name: "bitmaps".into(),
            expected: "array".into(),
        })?;
    list.iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::String(s) => Ok(MergeSource::Local(s.clone())),
            Value::Object(m) => {
                let path = format!("bitmaps[{i}].");
                let node = req_str(m, "node", &path)?;
                let name = req_str(m, "name", &path)?;
                no_others(m, &["node", "name"], &path)?;
                Ok(MergeSource::External {
                    node: node.into(),
                    name: name.into(),
                })
            }
            // QEMU 7.2 names list elements 'null' in this message.
            _ => Err(BlockError::InvalidParameterType {
                name: "null".into(),
                expected: "BlockDirtyBitmapOrStr".into(),
            }),
        })
        .collect()
}

/// Runs one of [`COMMANDS`]; `None` for any other command.
pub fn dispatch(
    layer: &BlockLayer,
    command: &str,
    args: &Value,
) -> Option<Result<Value, BlockError>> {
    let r = match command {
        "blockdev-add" => layer.blockdev_add(args).map(|_| json!({})),
        "blockdev-del" => (|| {
            let m = object(args)?;
            let name = req_str(m, "node-name", "")?;
            no_others(m, &["node-name"], "")?;
            layer.blockdev_del(name).map(|()| json!({}))
        })(),
        "block-dirty-bitmap-add" => (|| {
            let m = object(args)?;
            let node = req_str(m, "node", "")?;
            let name = req_str(m, "name", "")?;
            let granularity = opt_u32(m, "granularity")?;
            let persistent = opt_bool(m, "persistent")?;
            let disabled = opt_bool(m, "disabled")?;
            no_others(
                m,
                &["node", "name", "granularity", "persistent", "disabled"],
                "",
            )?;
            layer
                .block_dirty_bitmap_add(node, name, granularity, persistent, disabled)
                .map(|()| json!({}))
        })(),
        "block-dirty-bitmap-remove" => node_and_name(args)
            .and_then(|(n, b)| layer.block_dirty_bitmap_remove(n, b))
            .map(|()| json!({})),
        "block-dirty-bitmap-clear" => node_and_name(args)
            .and_then(|(n, b)| layer.block_dirty_bitmap_clear(n, b))
            .map(|()| json!({})),
        "block-dirty-bitmap-enable" => node_and_name(args)
            .and_then(|(n, b)| layer.block_dirty_bitmap_enable(n, b))
            .map(|()| json!({})),
        "block-dirty-bitmap-disable" => node_and_name(args)
            .and_then(|(n, b)| layer.block_dirty_bitmap_disable(n, b))
            .map(|()| json!({})),
        "block-dirty-bitmap-merge" => (|| {
            let m = object(args)?;
            let node = req_str(m, "node", "")?;
            let target = req_str(m, "target", "")?;
            let sources = match m.get("bitmaps") {
                None => return Err(BlockError::MissingParameter("bitmaps".into())),
                Some(v) => merge_sources(v)?,
            };
            no_others(m, &["node", "target", "bitmaps"], "")?;
            layer
                .block_dirty_bitmap_merge(node, target, &sources)
                .map(|()| json!({}))
        })(),
        "x-debug-block-dirty-bitmap-sha256" => node_and_name(args)
            .and_then(|(n, b)| layer.x_debug_block_dirty_bitmap_sha256(n, b))
            .map(|h| json!({ "sha256": h })),
        "query-block" => object(args)
            .and_then(|m| no_others(m, &[], ""))
            .map(|()| layer.query_block()),
        "query-named-block-nodes" => (|| {
            let m = object(args)?;
            let flat = opt_bool(m, "flat")?.unwrap_or(false);
            no_others(m, &["flat"], "")?;
            Ok(layer.query_named_block_nodes(flat))
        })(),
        _ => return None,
    };
    Some(r)
}
