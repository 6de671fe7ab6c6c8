//! The NBD server's QMP commands, arguments checked as QEMU 7.2's QAPI visitor checks them,
//! then handed to [`NbdServer`]. The monitor calls [`dispatch`] for the names in [`COMMANDS`].

use crate::net::{AddressError, SocketAddress};
use crate::server::{ExportConfig, ExportError, NbdServer};
use block::BlockLayer;
use serde_json::{json, Map, Value};

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
impl From<block::BlockError> for CommandError {
    fn from(e: block::BlockError) -> Self {
        generic(e.to_string())
    }
}

struct Args<'a> {
    m: &'a Map<String, Value>,
    seen: Vec<&'static str>,
}

impl<'a> Args<'a> {
    fn new(v: &'a Value) -> Result<Self, CommandError> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let m = match v {
            Value::Object(m) => m,
            Value::Null => EMPTY.get_or_init(Map::new),
            _ => {
                return Err(generic(
                    "Invalid parameter type for 'arguments', expected: object",
                ))
            }
        };
        Ok(Args {
            m,
            seen: Vec::new(),
        })
    }
    fn get(&mut self, k: &'static str) -> Option<&'a Value> {
        self.seen.push(k);
        self.m.get(k)
    }
    fn req(&mut self, k: &'static str) -> Result<&'a Value, CommandError> {
        self.get(k)
            .ok_or_else(|| generic(format!("Parameter '{k}' is missing")))
    }
    fn req_str(&mut self, k: &'static str) -> Result<String, CommandError> {
        match self.req(k)? {
            Value::String(s) => Ok(s.clone()),
            _ => Err(generic(format!(
                "Invalid parameter type for '{k}', expected: string"
            ))),
        }
    }
    fn opt_str(&mut self, k: &'static str) -> Result<Option<String>, CommandError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(generic(format!(
                "Invalid parameter type for '{k}', expected: string"
            ))),
        }
    }
    fn opt_bool(&mut self, k: &'static str) -> Result<Option<bool>, CommandError> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(generic(format!(
                "Invalid parameter type for '{k}', expected: boolean"
            ))),
        }
    }
    fn opt_u32(&mut self, k: &'static str) -> Result<Option<u32>, CommandError> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => {
                let w = v
                    .as_u64()
                    .or_else(|| v.as_i64().map(|i| i as u64))
                    .ok_or_else(|| {
                        generic(format!(
                            "Invalid parameter type for '{k}', expected: integer"
                        ))
                    })?;
                u32::try_from(w)
                    .map(Some)
                    .map_err(|_| generic(format!("Parameter '{k}' expects uint32_t")))
            }
        }
    }
    fn opt_enum(
        &mut self,
        k: &'static str,
        allowed: &[&str],
    ) -> Result<Option<String>, CommandError> {
        let Some(s) = self.opt_str(k)? else {
            return Ok(None);
        };
        if allowed.contains(&s.as_str()) {
            Ok(Some(s))
        } else {
            Err(generic(format!(
                "Parameter '{k}' does not accept value '{s}'"
            )))
        }
    }
    fn finish(self) -> Result<(), CommandError> {
        for k in self.m.keys() {
            if !self.seen.contains(&k.as_str()) {
                return Err(generic(format!("Parameter '{k}' is unexpected")));
            }
        }
        Ok(())
    }
}

/// Runs NBD command `name`; `None` if it is not one of [`COMMANDS`].
pub fn dispatch(
    server: &NbdServer,
    layer: &BlockLayer,
    name: &str,
    args: &Value,
) -> Option<Result<Value, CommandError>> {
    let r = match name {
        "nbd-server-start" => server_start(server, args),
        "nbd-server-add" => server_add(server, layer, args),
        "nbd-server-remove" => export_del(server, args, "name"),
        "nbd-server-stop" => Args::new(args)
            .and_then(Args::finish)
            .and_then(|()| server.stop().map_err(CommandError::from)),
        "block-export-add" => block_export_add(server, layer, args),
        "block-export-del" => export_del(server, args, "id"),
        "query-block-exports" => {
            return Some(Args::new(args).and_then(Args::finish).map(|()| {
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

fn server_start(server: &NbdServer, args: &Value) -> Result<(), CommandError> {
    let mut a = Args::new(args)?;
    let addr = SocketAddress::from_json(a.req("addr")?, "addr.", true)?;
    let tls = a.opt_str("tls-creds")?;
    let _authz = a.opt_str("tls-authz")?;
    let max = a.opt_u32("max-connections")?;
    a.finish()?;
    if tls.is_some() {
        return Err(generic("TLS is not supported by this NBD server"));
    }
    server.start(&addr, max.unwrap_or(0))?;
    Ok(())
}

fn server_add(server: &NbdServer, layer: &BlockLayer, args: &Value) -> Result<(), CommandError> {
    let mut a = Args::new(args)?;
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
        },
    )?;
    Ok(())
}

fn block_export_add(
    server: &NbdServer,
    layer: &BlockLayer,
    args: &Value,
) -> Result<(), CommandError> {
    let mut a = Args::new(args)?;
    let _ty = a
        .opt_enum("type", &["nbd"])?
        .ok_or_else(|| generic("Parameter 'type' is missing"))?;
    let id = a.req_str("id")?;
    let node_name = a.req_str("node-name")?;
    let writable = a.opt_bool("writable")?.unwrap_or(false);
    let _ = a.opt_bool("writethrough")?;
    let _ = a.opt_str("iothread")?;
    let _ = a.opt_bool("fixed-iothread")?;
    let name = a.opt_str("name")?;
    let description = a.opt_str("description")?;
    let _ = a.opt_bool("allocation-depth")?;
    let bitmaps = match a.get("bitmaps") {
        None => Vec::new(),
        Some(Value::Array(l)) => l
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    generic("Invalid parameter type for 'bitmaps[0]', expected: string")
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(generic(
                "Invalid parameter type for 'bitmaps', expected: array",
            ))
        }
    };
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
    server.add(
        node,
        ExportConfig {
            id,
            name: name.unwrap_or(node_name),
            description,
            writable,
            bitmap: bitmaps.into_iter().next(),
        },
    )?;
    Ok(())
}

fn export_del(server: &NbdServer, args: &Value, key: &'static str) -> Result<(), CommandError> {
    let mut a = Args::new(args)?;
    let name = a.req_str(key)?;
    let mode = a.opt_enum("mode", &["safe", "hard"])?;
    a.finish()?;
    server.remove(&name, mode.as_deref() == Some("hard"))?;
    Ok(())
}
