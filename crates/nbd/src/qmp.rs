//! The NBD server's QMP commands, arguments checked as QEMU 7.2's QAPI visitor checks them,
//! then handed to [`NbdServer`]. The monitor calls [`dispatch`] for the names in [`COMMANDS`].

use crate::net::{AddressError, SocketAddress};
use crate::server::{ExportConfig, ExportError, NbdServer};
use block::BlockLayer;
use qmp::{Args, QmpError};
use serde_json::{json, Value};

/// The commands [`dispatch`] handles.
pub const COMMANDS: &[&str] = &[
    "nbd-server-start",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
];

/// A refused command: QMP error class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    /// QMP error class (`GenericError`).
    pub class: &'static str,
    /// The description QEMU gives.
    pub desc: String,
}

impl std::fmt::Display for CommandError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.desc)
    }
}

fn generic(desc: impl Into<String>) -> CommandError {
    CommandError {
        class: "GenericError",
        desc: desc.into(),
    }
}

impl From<ExportError> for CommandError {
    fn from(e: ExportError) -> Self {
        generic(e.to_string())
    }
}
impl From<AddressError> for CommandError {
    fn from(e: AddressError) -> Self {
        generic(e.to_string())
    }
}
impl From<QmpError> for CommandError {
    fn from(e: QmpError) -> Self {
        generic(e.desc)
    }
}
impl From<block::BlockError> for CommandError {
    fn from(e: block::BlockError) -> Self {
        generic(e.to_string())
    }
}

/// Runs NBD command `name`; `None` if it is not one of [`COMMANDS`].
pub fn dispatch(
    server: &NbdServer,
    layer: &BlockLayer,
    name: &str,
    args: Args,
) -> Option<Result<Value, CommandError>> {
    let r = match name {
        "nbd-server-start" => server_start(server, args),
        "nbd-server-add" => server_add(server, layer, args),
        "nbd-server-remove" => export_del(server, args, "name"),
        "nbd-server-stop" => args
            .finish()
            .map_err(CommandError::from)
            .and_then(|()| server.stop().map_err(CommandError::from)),
        "block-export-add" => block_export_add(server, layer, args),
        "block-export-del" => export_del(server, args, "id"),
        "query-block-exports" => {
            return Some(args.finish().map_err(CommandError::from).map(|()| {
                Value::Array(
                    server
                        .exports()
                        .iter()
                        .map(|e| {
                            json!({
                                "type": "nbd",
                                "id": e.config().id,
                                "node-name": e.node().name(),
                                "shutting-down": false,
                            })
                        })
                        .collect(),
                )
            }))
        }
        _ => return None,
    };
    Some(r.map(|()| json!({})))
}

fn server_start(server: &NbdServer, mut a: Args) -> Result<(), CommandError> {
    let addr = SocketAddress::from_json(a.required("addr")?.value(), "addr.", true)?;
    let tls = a.opt_str("tls-creds")?;
    let authz = a.opt_str("tls-authz")?;
    let max = a.opt_int::<u32>("max-connections")?;
    a.finish()?;
    server.start_with_tls(&addr, max.unwrap_or(0), tls.as_deref(), authz.as_deref())?;
    Ok(())
}

fn server_add(server: &NbdServer, layer: &BlockLayer, mut a: Args) -> Result<(), CommandError> {
    let device = a.req_str("device")?;
    let name = a.opt_str("name")?;
    let description = a.opt_str("description")?;
    let writable = a.opt_bool("writable")?.unwrap_or(false);
    let bitmap = a.opt_str("bitmap")?;
    a.finish()?;
    if !server.is_running() {
        return Err(ExportError::NotRunning.into());
    }
    let node = layer.lookup_bs(Some(&device), Some(&device))?;
    // QEMU's nbd-server-add quietly exports a read-only node read-only.
    let writable = writable && node.writable();
    let name = name.unwrap_or(device);
    server.add(
        node,
        ExportConfig {
            id: name.clone(),
            name,
            description,
            writable,
            bitmap,
            bitmap_node: None,
        },
    )?;
    Ok(())
}

fn block_export_add(
    server: &NbdServer,
    layer: &BlockLayer,
    mut a: Args,
) -> Result<(), CommandError> {
    let _ty = a.req_enum("type", &["nbd"])?;
    let id = a.req_str("id")?;
    let node_name = a.req_str("node-name")?;
    let writable = a.opt_bool("writable")?.unwrap_or(false);
    let _ = a.opt_bool("writethrough")?;
    let _ = a.opt_str("iothread")?;
    let _ = a.opt_bool("fixed-iothread")?;
    let name = a.opt_str("name")?;
    let description = a.opt_str("description")?;
    let _ = a.opt_bool("allocation-depth")?;
    let bitmaps = a
        .opt_list("bitmaps")?
        .unwrap_or_default()
        .into_iter()
        .map(bitmap_or_str)
        .collect::<Result<Vec<_>, _>>()?;
    a.finish()?;
    if bitmaps.len() > 1 {
        return Err(generic(
            "This NBD server exports at most one bitmap per export",
        ));
    }
    if !server.is_running() {
        return Err(generic("NBD server not running"));
    }
    let node = layer.lookup_bs(Some(&node_name), Some(&node_name))?;
    let (bitmap_owner, bitmap) = match bitmaps.into_iter().next() {
        None => (None, None),
        Some((owner, name)) => (owner, Some(name)),
    };
    let mut config = ExportConfig {
        id,
        name: name.unwrap_or_else(|| node_name.clone()),
        description,
        writable,
        bitmap,
        bitmap_node: None,
    };
    if let Some(owner) = bitmap_owner {
        // QEMU looks the bitmap's node up after the export's own checks.
        server.check_export(&config)?;
        config.bitmap_node = Some(layer.bitmap_node(&owner)?);
    }
    server.add(node, config)?;
    Ok(())
}

/// One element of `bitmaps`, QAPI's alternate `BlockDirtyBitmapOrStr`: a bitmap name on the
/// exported node, or `{"node": N, "name": B}` for a bitmap of any node. Gives the node (if
/// named) and the bitmap name.
fn bitmap_or_str(p: qmp::Param) -> Result<(Option<String>, String), QmpError> {
    match p.value() {
        Value::String(_) => Ok((None, p.into_str()?)),
        Value::Object(_) => {
            let mut o = p.into_object()?;
            let node = o.req_str("node")?;
            let name = o.req_str("name")?;
            o.finish()?;
            Ok((Some(node), name))
        }
        // QEMU 7.2 visits list elements of an alternate without a name, and says so.
        _ => Err(QmpError::generic(
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr",
        )),
    }
}

fn export_del(server: &NbdServer, mut a: Args, key: &'static str) -> Result<(), CommandError> {
    let name = a.req_str(key)?;
    let mode = a.opt_enum("mode", &["safe", "hard"])?;
    a.finish()?;
    server.remove(&name, mode.as_deref() == Some("hard"))?;
    Ok(())
}
