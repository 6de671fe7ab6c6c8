//! Socket addresses as QAPI gives them (`SocketAddress`, unix and inet, flat or legacy), with
//! QEMU's messages for a malformed one; the sockets themselves come from the `net` crate.

use net::{Listener, Stream};
use serde_json::{Map, Value};
use std::io;
use std::path::PathBuf;

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// A unix domain socket at this path.
    Unix(PathBuf),
    /// A TCP host and port.
    Inet {
        /// Host name or address.
        host: String,
        /// Port (QAPI gives it as a string).
        port: String,
    },
}

impl std::fmt::Display for SocketAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SocketAddress::Unix(p) => write!(f, "unix:{}", p.display()),
            SocketAddress::Inet { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Why a `SocketAddress` argument was refused: QEMU's QAPI messages.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// A required member is absent.
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    /// A member of the wrong type.
    #[error("Invalid parameter type for '{0}', expected: {1}")]
    Type(String, &'static str),
    /// A member the schema does not have.
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// A `type` that is not supported.
    #[error("Parameter '{0}' does not accept value '{1}'")]
    BadType(String, String),
}

fn get_str(m: &Map<String, Value>, key: &str, path: &str) -> Result<String, AddressError> {
    match m.get(key) {
        None => Err(AddressError::Missing(format!("{path}{key}"))),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(AddressError::Type(format!("{path}{key}"), "string")),
    }
}

const INET_OPTIONAL: &[&str] = &["numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp"];

impl SocketAddress {
    /// Parses QAPI `SocketAddress` (flat: `{"type": "unix", "path": ...}`) or, with
    /// `legacy`, `SocketAddressLegacy` (`{"type": "unix", "data": {"path": ...}}`, what
    /// `nbd-server-start` takes). `path` prefixes member names in errors (`addr.`).
    pub fn from_json(v: &Value, path: &str, legacy: bool) -> Result<Self, AddressError> {
        let name = path.strip_suffix('.').unwrap_or(path);
        let m = v
            .as_object()
            .ok_or_else(|| AddressError::Type(name.to_string(), "object"))?;
        let ty = get_str(m, "type", path)?;
        let (body, body_path) = if legacy {
            let d = m
                .get("data")
                .ok_or_else(|| AddressError::Missing(format!("{path}data")))?;
            for k in m.keys() {
                if k != "type" && k != "data" {
                    return Err(AddressError::Unexpected(format!("{path}{k}")));
                }
            }
            let dm = d
                .as_object()
                .ok_or_else(|| AddressError::Type(format!("{path}data"), "object"))?;
            (dm, format!("{path}data."))
        } else {
            (m, path.to_string())
        };
        let check_keys = |allowed: &[&str]| -> Result<(), AddressError> {
            for k in body.keys() {
                let is_type = !legacy && k == "type";
                if !is_type && !allowed.contains(&k.as_str()) {
                    return Err(AddressError::Unexpected(format!("{body_path}{k}")));
                }
            }
            Ok(())
        };
        match ty.as_str() {
            "unix" => {
                check_keys(&["path", "abstract", "tight"])?;
                Ok(SocketAddress::Unix(PathBuf::from(get_str(
                    body, "path", &body_path,
                )?)))
            }
            "inet" => {
                let mut allowed = vec!["host", "port"];
                allowed.extend_from_slice(INET_OPTIONAL);
                check_keys(&allowed)?;
                let host = get_str(body, "host", &body_path)?;
                let port = match body.get("port") {
                    None => return Err(AddressError::Missing(format!("{body_path}port"))),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    Some(_) => {
                        return Err(AddressError::Type(format!("{body_path}port"), "string"))
                    }
                };
                Ok(SocketAddress::Inet { host, port })
            }
            other => Err(AddressError::BadType(
                format!("{path}type"),
                other.to_string(),
            )),
        }
    }

    /// The flat QAPI form, for `query-block` style output.
    pub fn to_json(&self) -> Value {
        match self {
            SocketAddress::Unix(p) => {
                serde_json::json!({"type": "unix", "path": p.display().to_string()})
            }
            SocketAddress::Inet { host, port } => {
                serde_json::json!({"type": "inet", "host": host, "port": port})
            }
        }
    }

    /// The socket this names, with the port checked.
    fn to_net(&self) -> io::Result<net::Address> {
        Ok(match self {
            SocketAddress::Unix(p) => net::Address::Unix(p.clone()),
            SocketAddress::Inet { host, port } => net::Address::Tcp {
                host: host.clone(),
                port: port.parse().map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("bad port '{port}'"))
                })?,
            },
        })
    }

    /// Connects.
    pub fn connect(&self) -> io::Result<Stream> {
        self.to_net()?.connect()
    }

    /// Listens (a stale unix socket file at the path is replaced, as QEMU does).
    pub fn listen(&self) -> io::Result<Listener> {
        self.to_net()?.listen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_flat_and_legacy_addresses() {
        assert_eq!(
            SocketAddress::from_json(&json!({"type": "unix", "path": "/x"}), "server.", false)
                .unwrap(),
            SocketAddress::Unix("/x".into())
        );
        assert_eq!(
            SocketAddress::from_json(
                &json!({"type": "inet", "data": {"host": "127.0.0.1", "port": "10809"}}),
                "addr.",
                true
            )
            .unwrap(),
            SocketAddress::Inet {
                host: "127.0.0.1".into(),
                port: "10809".into()
            }
        );
        assert_eq!(
            SocketAddress::from_json(&json!({"type": "vsock", "data": {}}), "addr.", true)
                .unwrap_err()
                .to_string(),
            "Parameter 'addr.type' does not accept value 'vsock'"
        );
        assert_eq!(
            SocketAddress::from_json(&json!({"type": "unix", "data": {}}), "addr.", true)
                .unwrap_err()
                .to_string(),
            "Parameter 'addr.data.path' is missing"
        );
        assert_eq!(
            SocketAddress::from_json(
                &json!({"type": "unix", "path": "/x", "q": 1}),
                "server.",
                false
            )
            .unwrap_err()
            .to_string(),
            "Parameter 'server.q' is unexpected"
        );
    }
}
