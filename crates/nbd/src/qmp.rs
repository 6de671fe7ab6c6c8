//! The NBD server's QMP commands, as one [`CommandSet`]: arguments checked with [`qmp::Args`]
//! in QEMU 7.2's visiting order, then handed to [`NbdServer`]. This crate's errors meet QMP's
//! classes here, in the `From` impls (all `GenericError`, as in QEMU).

use crate::address::{AddressError, SocketAddress};
use crate::server::{ExportConfig, ExportError, NbdServer};
use block::{BlockLayer, MergeSource};
use qmp::{Args, CommandSet, QmpError, Reply};
use serde_json::{json, Value};
use std::sync::Arc;

/// The commands of [`NbdCommands`].
pub const COMMANDS: &[&str] = &[
    "nbd-server-start",
    "nbd-server-add",
    "nbd-server-remove",
    "nbd-server-stop",
    "block-export-add",
    "block-export-del",
    "query-block-exports",
];

/// Every refusal of the NBD server is a `GenericError` in QEMU.
impl From<ExportError> for QmpError {
    fn from(e: ExportError) -> QmpError {
        QmpError::generic(e.to_string())
    }
}

/// A bad `addr` is a `GenericError` with QEMU's QAPI text.
impl From<AddressError> for QmpError {
    fn from(e: AddressError) -> QmpError {
        QmpError::generic(e.to_string())
    }
}

/// The NBD server's commands: one server, exporting nodes of one block layer.
pub struct NbdCommands {
    server: NbdServer,
    layer: Arc<BlockLayer>,
}

impl NbdCommands {
    /// The commands of a new, stopped server exporting nodes of `layer`.
    pub fn new(layer: Arc<BlockLayer>) -> NbdCommands {
        NbdCommands {
            server: NbdServer::new(),
            layer,
        }
    }

    /// The server the commands drive.
    pub fn server(&self) -> &NbdServer {
        &self.server
    }
}

impl CommandSet for NbdCommands {
    fn commands(&self) -> &[&'static str] {
        COMMANDS
    }

    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
        let (server, layer) = (&self.server, &*self.layer);
        match name {
            "nbd-server-start" => server_start(server, args)?,
            "nbd-server-add" => server_add(server, layer, args)?,
            "nbd-server-remove" => export_del(server, args, "name")?,
            "nbd-server-stop" => {
                args.finish()?;
                server.stop()?;
            }
            "block-export-add" => block_export_add(server, layer, args)?,
            "block-export-del" => export_del(server, args, "id")?,
            "query-block-exports" => {
                args.finish()?;
                return Ok(Reply::new(Value::Array(
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
                )));
            }
            _ => return Err(QmpError::unknown_command(name)),
        }
        Ok(Reply::empty())
    }
}

fn server_start(server: &NbdServer, mut a: Args) -> Result<(), QmpError> {
    let addr = SocketAddress::from_json(a.required("addr")?.value(), "addr.", true)?;
    let tls = a.opt_str("tls-creds")?;
    let authz = a.opt_str("tls-authz")?;
    let max = a.opt_int::<u32>("max-connections")?;
    a.finish()?;
    server.start_with_tls(&addr, max.unwrap_or(0), tls.as_deref(), authz.as_deref())?;
    Ok(())
}

fn server_add(server: &NbdServer, layer: &BlockLayer, mut a: Args) -> Result<(), QmpError> {
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

fn block_export_add(server: &NbdServer, layer: &BlockLayer, mut a: Args) -> Result<(), QmpError> {
    let _ty = a.req_enum("type", &["nbd"])?;
    let id = a.req_str("id")?;
    let node_name = a.req_str("node-name")?;
    let writable = a.opt_bool("writable")?.unwrap_or(false);
    let writethrough = a.opt_bool("writethrough")?.unwrap_or(false);
    let iothread = a.opt_str("iothread")?;
    // Without `iothread` QEMU reads `fixed-iothread` for nothing; with one, the command fails
    // below before it matters.
    let _fixed_iothread = a.opt_bool("fixed-iothread")?;
    let name = a.opt_str("name")?;
    let description = a.opt_str("description")?;
    let allocation_depth = a.opt_bool("allocation-depth")?.unwrap_or(false);
    let bitmaps = a
        .opt_list("bitmaps")?
        .unwrap_or_default()
        .into_iter()
        .map(block::qmp::merge_source)
        .collect::<Result<Vec<_>, _>>()?;
    a.finish()?;
    if bitmaps.len() > 1 {
        return Err(QmpError::generic(
            "This NBD server exports at most one bitmap per export",
        ));
    }
    if !server.is_running() {
        return Err(QmpError::generic("NBD server not running"));
    }
    let node = layer.lookup_bs(Some(&node_name), Some(&node_name))?;
    if let Some(t) = iothread {
        // livemig has no iothread objects (object-add refuses the type), so every name is one
        // QEMU's `blk_exp_add` would not find either.
        return Err(QmpError::generic(format!("iothread \"{t}\" not found")));
    }
    if writethrough {
        return Err(QmpError::generic(
            "block-export-add: 'writethrough' is not supported by livemig (its exports \
             keep the node's write cache; flush or FUA requests make writes durable)",
        ));
    }
    if allocation_depth {
        return Err(QmpError::generic(
            "block-export-add: 'allocation-depth' is not supported by livemig (its NBD \
             server has no qemu:allocation-depth metadata context)",
        ));
    }
    // QAPI's BlockDirtyBitmapOrStr: a bitmap of the exported node, or of any node.
    let (bitmap_owner, bitmap) = match bitmaps.into_iter().next() {
        None => (None, None),
        Some(MergeSource::Local(name)) => (None, Some(name)),
        Some(MergeSource::External { node, name }) => (Some(node), Some(name)),
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

fn export_del(server: &NbdServer, mut a: Args, key: &'static str) -> Result<(), QmpError> {
    let name = a.req_str(key)?;
    let mode = a.opt_enum("mode", &["safe", "hard"])?;
    a.finish()?;
    server.remove(&name, mode.as_deref() == Some("hard"))?;
    Ok(())
}
