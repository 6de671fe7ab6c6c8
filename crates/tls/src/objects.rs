//! The user-creatable objects this crate owns — `tls-creds-x509`, `tls-creds-psk`,
//! `authz-simple`, `authz-list` — by id, as QEMU's `-object`, `object-add` and `object-del` create and remove
//! them, with QEMU's checks and messages. Migration and NBD look credentials and authz objects
//! up here by the ids their parameters name, at the moment a channel opens.
//!
//! Refused with a clear error, never accepted and ignored: `tls-creds-anon` (anonymous
//! Diffie-Hellman, which authenticates no one), `authz-listfile`, `authz-pam`, the
//! credentials' `priority` property (a GnuTLS priority string) and the `tls-creds-x509`
//! property `passwordid` (encrypted keys need `secret` objects livemig does not have).

use crate::authz::{Authz, Format, Policy, Rule};
use crate::creds::{Endpoint, TlsCreds, X509Options};
use crate::error::TlsError;
use crate::psk::PskOptions;
use qmp::{Args, QmpError};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// One object.
#[derive(Debug, Clone)]
pub enum Object {
    /// `tls-creds-x509` or `tls-creds-psk`.
    TlsCreds(Arc<TlsCreds>),
    /// `authz-simple` or `authz-list`.
    Authz(Arc<Authz>),
}

impl Object {
    /// The QOM type name.
    pub fn qom_type(&self) -> &'static str {
        match self {
            Object::TlsCreds(c) => c.qom_type(),
            Object::Authz(a) => match **a {
                Authz::Simple { .. } => "authz-simple",
                Authz::List { .. } => "authz-list",
            },
        }
    }
}

/// The objects of one process, by id.
#[derive(Debug, Default)]
pub struct Objects {
    map: RwLock<BTreeMap<String, Object>>,
}

/// Object types QEMU 7.2 has that livemig refuses by name (so the message says "not supported"
/// rather than "unknown").
const KNOWN_ELSEWHERE: &[&str] = &[
    "tls-creds-anon",
    "authz-listfile",
    "authz-pam",
    "secret",
    "secret_keyring",
    "iothread",
    "memory-backend-file",
    "memory-backend-memfd",
    "memory-backend-ram",
    "throttle-group",
    "rng-random",
    "rng-builtin",
    "rng-egd",
    "cryptodev-backend",
    "filter-buffer",
    "filter-dump",
    "main-loop",
];

/// Types this module creates.
const TYPES: &[&str] = &[
    "tls-creds-x509",
    "tls-creds-psk",
    "authz-simple",
    "authz-list",
];

/// QEMU's `id_wellformed`: a letter, then letters, digits, `-`, `.`, `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg.into())
}

impl Objects {
    /// An empty set.
    pub fn new() -> Objects {
        Objects::default()
    }

    /// `object-add`: `qom-type`, `id` and the type's properties, typed as QMP sends them.
    pub fn object_add(&self, mut args: Args) -> Result<(), QmpError> {
        let qom_type = args.req_str("qom-type")?;
        let id = args.req_str("id")?;
        if !TYPES.contains(&qom_type.as_str()) {
            return Err(if KNOWN_ELSEWHERE.contains(&qom_type.as_str()) {
                generic(unsupported_type(&qom_type))
            } else {
                generic(format!(
                    "Parameter 'qom-type' does not accept value '{qom_type}'"
                ))
            });
        }
        let object = build(&qom_type, args, &id, |o| self.check_id(&id).map(|_| o))?;
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&id) {
            return Err(duplicate(&id));
        }
        log::debug!("object-add {} id={id}", object.qom_type());
        map.insert(id, object);
        Ok(())
    }

    /// `-object TYPE,id=ID,prop=value,...` (QEMU's keyval syntax: `,,` is a comma in a value,
    /// `rules.0.match=...` builds lists of structures, booleans are `on`/`off`/`yes`/`no`/
    /// `true`/`false`).
    pub fn object_add_cmdline(&self, text: &str) -> Result<(), QmpError> {
        let map = parse_object_keyval(text)?;
        self.object_add(Args::new(map))
    }

    /// `object-del`.
    pub fn object_del(&self, id: &str) -> Result<(), QmpError> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match map.remove(id) {
            // Sessions already open keep their own reference to what they use.
            Some(_) => Ok(()),
            None => Err(generic(format!("object '{id}' not found"))),
        }
    }

    /// The object with this id.
    pub fn get(&self, id: &str) -> Option<Object> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// The ids and types of all objects.
    pub fn list(&self) -> Vec<(String, &'static str)> {
        self.map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.qom_type()))
            .collect()
    }

    /// The TLS credentials named by a `tls-creds` parameter, for `endpoint` (QEMU's
    /// `migration_tls_get_creds` messages).
    pub fn tls_creds(&self, id: &str, endpoint: Endpoint) -> Result<Arc<TlsCreds>, TlsError> {
        match self.get(id) {
            None => Err(TlsError::Lookup(format!(
                "No TLS credentials with id '{id}'"
            ))),
            Some(Object::TlsCreds(c)) => {
                if c.endpoint() != endpoint {
                    return Err(TlsError::Lookup(format!(
                        "Expected TLS credentials for a {} endpoint",
                        endpoint.name()
                    )));
                }
                Ok(c)
            }
            Some(_) => Err(TlsError::Lookup(format!(
                "Object with id '{id}' is not TLS credentials"
            ))),
        }
    }

    /// The authorization object named by a `tls-authz` parameter (QEMU's
    /// `qauthz_is_allowed_by_id` messages).
    pub fn authz(&self, id: &str) -> Result<Arc<Authz>, TlsError> {
        match self.get(id) {
            None => Err(TlsError::Lookup(format!(
                "Cannot find QAuthZ object ID {id}"
            ))),
            Some(Object::Authz(a)) => Ok(a),
            Some(_) => Err(TlsError::Lookup(format!(
                "Object '{id}' is not a QAuthZ subclass"
            ))),
        }
    }

    fn check_id(&self, id: &str) -> Result<(), QmpError> {
        if !id_wellformed(id) {
            return Err(generic("Parameter 'id' expects an identifier"));
        }
        if self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(id)
        {
            return Err(duplicate(id));
        }
        Ok(())
    }
}

fn duplicate(id: &str) -> QmpError {
    generic(format!(
        "attempt to add duplicate property '{id}' to object (type 'container')"
    ))
}

fn unsupported_type(t: &str) -> String {
    match t {
        "tls-creds-anon" => "object type 'tls-creds-anon' is not supported by livemig: anonymous \
                             TLS authenticates neither end; use tls-creds-x509 or tls-creds-psk"
            .into(),
        other => format!("object type '{other}' is not supported by livemig"),
    }
}

/// Why `priority` is refused.
const PRIORITY_REFUSED: &str = "Property 'priority' is not supported by livemig: it is a GnuTLS \
                                priority string, and livemig's TLS negotiates TLS 1.3/1.2 with \
                                its own safe defaults";

/// QEMU 7.2's schema still has the deprecated `loaded` member, but the property behind it has
/// no setter: `user_creatable_add_type` refuses any value once the id has passed
/// `id_wellformed` and before it looks for a duplicate. Refused the same way here.
fn refuse_loaded(qom_type: &str, id: &str, loaded: Option<bool>) -> Result<(), QmpError> {
    if loaded.is_none() {
        return Ok(());
    }
    if !id_wellformed(id) {
        return Err(generic("Parameter 'id' expects an identifier"));
    }
    Err(generic(format!(
        "Property '{qom_type}.loaded' is not writable"
    )))
}

/// Checks the properties (QAPI's visit), then the id and duplicates (`precheck`), then
/// completes the object (loads files) — QEMU's order.
fn build(
    qom_type: &str,
    mut args: Args,
    id: &str,
    precheck: impl FnOnce(()) -> Result<(), QmpError>,
) -> Result<Object, QmpError> {
    match qom_type {
        "tls-creds-x509" => {
            let verify_peer = args.opt_bool("verify-peer")?;
            let dir = args.opt_str("dir")?;
            let endpoint = args.opt_enum("endpoint", &Endpoint::NAMES)?;
            let priority = args.opt_str("priority")?;
            let loaded = args.opt_bool("loaded")?;
            let sanity = args.opt_bool("sanity-check")?;
            let passwordid = args.opt_str("passwordid")?;
            args.finish()?;
            refuse_loaded(qom_type, id, loaded)?;
            precheck(())?;
            if priority.is_some() {
                return Err(generic(PRIORITY_REFUSED));
            }
            if passwordid.is_some() {
                return Err(generic(
                    "Property 'passwordid' is not supported by livemig (it has no 'secret' \
                     objects): give server-key.pem/client-key.pem unencrypted, readable only \
                     by livemig",
                ));
            }
            let options = X509Options {
                dir,
                endpoint: match endpoint.as_deref() {
                    Some("server") => Endpoint::Server,
                    _ => Endpoint::Client,
                },
                verify_peer: verify_peer.unwrap_or(true),
                sanity_check: sanity.unwrap_or(true),
            };
            let creds = TlsCreds::load_x509(options).map_err(|e| generic(e.to_string()))?;
            log::debug!("tls-creds-x509 '{id}' loaded");
            Ok(Object::TlsCreds(Arc::new(creds)))
        }
        "tls-creds-psk" => {
            // QEMU's tls-creds properties, then tls-creds-psk's own.
            let _verify_peer = args.opt_bool("verify-peer")?;
            let dir = args.opt_str("dir")?;
            let endpoint = args.opt_enum("endpoint", &Endpoint::NAMES)?;
            let priority = args.opt_str("priority")?;
            let loaded = args.opt_bool("loaded")?;
            let username = args.opt_str("username")?;
            args.finish()?;
            refuse_loaded(qom_type, id, loaded)?;
            precheck(())?;
            if priority.is_some() {
                return Err(generic(PRIORITY_REFUSED));
            }
            // `verify-peer` is taken and means nothing, as in QEMU 7.2: a PSK handshake only
            // completes with a peer that holds the key.
            let options = PskOptions {
                dir,
                endpoint: match endpoint.as_deref() {
                    Some("server") => Endpoint::Server,
                    _ => Endpoint::Client,
                },
                username,
            };
            let creds = TlsCreds::load_psk(options).map_err(|e| generic(e.to_string()))?;
            log::debug!("tls-creds-psk '{id}' loaded");
            Ok(Object::TlsCreds(Arc::new(creds)))
        }
        "authz-simple" => {
            let identity = args.opt_str("identity")?;
            args.finish()?;
            precheck(())?;
            let identity =
                identity.ok_or_else(|| generic("The 'identity' property must be set"))?;
            Ok(Object::Authz(Arc::new(Authz::Simple { identity })))
        }
        "authz-list" => {
            let policy = args.opt_enum("policy", &Policy::NAMES)?;
            let rules = match args.opt_list("rules")? {
                None => Vec::new(),
                Some(items) => {
                    let mut rules = Vec::with_capacity(items.len());
                    for item in items {
                        let mut r = item.into_object()?;
                        let pattern = r.req_str("match")?;
                        let policy = r.req_enum("policy", &Policy::NAMES)?;
                        let format = r.opt_enum("format", &Format::NAMES)?;
                        r.finish()?;
                        rules.push(Rule {
                            pattern,
                            policy: Policy::from_name(&policy),
                            format: if format.as_deref() == Some("glob") {
                                Format::Glob
                            } else {
                                Format::Exact
                            },
                        });
                    }
                    rules
                }
            };
            args.finish()?;
            precheck(())?;
            Ok(Object::Authz(Arc::new(Authz::List {
                policy: Policy::from_name(policy.as_deref().unwrap_or("deny")),
                rules,
            })))
        }
        other => Err(generic(unsupported_type(other))),
    }
}

/// Properties that are booleans (the command line gives them as words).
const BOOL_PROPS: &[&str] = &["verify-peer", "loaded", "sanity-check"];

/// Parses `TYPE,id=ID,k=v,...` into the map `object-add` takes, with QEMU's keyval rules.
pub fn parse_object_keyval(text: &str) -> Result<Map<String, Value>, QmpError> {
    // Split on single commas; ",," is a literal comma.
    let mut items: Vec<String> = vec![String::new()];
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = items.last_mut() {
                    last.push(',');
                }
            } else {
                items.push(String::new());
            }
        } else if let Some(last) = items.last_mut() {
            last.push(c);
        }
    }
    let mut root = Map::new();
    for (i, item) in items.into_iter().enumerate() {
        let (key, value) = match item.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None if i == 0 && !item.is_empty() => ("qom-type".to_string(), item),
            None => return Err(generic(format!("Expected '=' after parameter '{item}'"))),
        };
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(generic(format!("Invalid parameter '{key}'")));
        }
        insert_dotted(&mut root, &key, value)?;
    }
    let mut v = Value::Object(root);
    listify(&mut v);
    let Value::Object(mut map) = v else {
        return Err(generic("Invalid -object argument"));
    };
    for p in BOOL_PROPS {
        if let Some(Value::String(s)) = map.get(*p) {
            let b = match s.as_str() {
                "on" | "yes" | "true" | "y" => true,
                "off" | "no" | "false" | "n" => false,
                _ => return Err(generic(format!("Parameter '{p}' expects 'on' or 'off'"))),
            };
            map.insert(p.to_string(), Value::Bool(b));
        }
    }
    Ok(map)
}

fn insert_dotted(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), QmpError> {
    let mut parts = key.split('.').peekable();
    let mut cur = root;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            if matches!(cur.get(part), Some(Value::Object(_))) {
                return Err(generic(format!("Parameters '{key}.*' used inconsistently")));
            }
            cur.insert(part.to_string(), Value::String(value));
            return Ok(());
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        match entry {
            Value::Object(m) => cur = m,
            _ => return Err(generic(format!("Parameters '{key}' used inconsistently"))),
        }
    }
    Ok(())
}

/// Objects whose keys are exactly 0..n become lists (QEMU's `keyval_listify`).
fn listify(v: &mut Value) {
    if let Value::Object(m) = v {
        for child in m.values_mut() {
            listify(child);
        }
        let n = m.len();
        let is_list = n > 0 && (0..n).all(|i| m.contains_key(&i.to_string()));
        if is_list {
            let mut items = Vec::with_capacity(n);
            for i in 0..n {
                if let Some(x) = m.remove(&i.to_string()) {
                    items.push(x);
                }
            }
            *v = Value::Array(items);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn add(o: &Objects, v: Value) -> Result<(), String> {
        let Value::Object(m) = v else { panic!() };
        o.object_add(Args::new(m)).map_err(|e| e.to_string())
    }

    #[test]
    fn authz_objects_and_qemu_messages() {
        let o = Objects::new();
        add(
            &o,
            json!({"qom-type": "authz-simple", "id": "a0", "identity": "CN=x"}),
        )
        .unwrap();
        assert!(add(
            &o,
            json!({"qom-type": "authz-simple", "id": "a0", "identity": "CN=x"})
        )
        .unwrap_err()
        .contains("attempt to add duplicate property 'a0' to object (type 'container')"));
        assert!(add(&o, json!({"qom-type": "authz-simple", "id": "a1"}))
            .unwrap_err()
            .contains("The 'identity' property must be set"));
        assert!(add(
            &o,
            json!({"qom-type": "authz-simple", "id": "0a", "identity": "x"})
        )
        .unwrap_err()
        .contains("Parameter 'id' expects an identifier"));
        assert!(add(&o, json!({"qom-type": "nonsense", "id": "x"}))
            .unwrap_err()
            .contains("Parameter 'qom-type' does not accept value 'nonsense'"));
        assert!(add(
            &o,
            json!({"qom-type": "tls-creds-anon", "id": "p", "dir": "/x"})
        )
        .unwrap_err()
        .contains("not supported by livemig"));
        assert_eq!(
            add(
                &o,
                json!({"qom-type": "tls-creds-psk", "id": "p", "dir": "/nonexistent"})
            )
            .unwrap_err(),
            "Unable to access credentials /nonexistent/keys.psk: No such file or directory"
        );
        assert!(add(
            &o,
            json!({"qom-type": "authz-simple", "id": "a2", "identity": "x", "bogus": 1})
        )
        .unwrap_err()
        .contains("Parameter 'bogus' is unexpected"));
        o.object_add_cmdline(
            "authz-list,id=l0,policy=deny,rules.0.match=CN=*,,O=QEMU,rules.0.policy=allow,rules.0.format=glob",
        )
        .unwrap();
        let a = o.authz("l0").unwrap();
        assert!(a.is_allowed("CN=x,O=QEMU"));
        assert!(!a.is_allowed("CN=x,O=Other"));
        assert_eq!(
            o.authz("nope").unwrap_err().to_string(),
            "Cannot find QAuthZ object ID nope"
        );
        assert_eq!(
            o.tls_creds("a0", Endpoint::Client).unwrap_err().to_string(),
            "Object with id 'a0' is not TLS credentials"
        );
        assert_eq!(
            o.tls_creds("zz", Endpoint::Client).unwrap_err().to_string(),
            "No TLS credentials with id 'zz'"
        );
        o.object_del("a0").unwrap();
        assert_eq!(
            o.object_del("a0").unwrap_err().to_string(),
            "object 'a0' not found"
        );
    }

    #[test]
    fn keyval_booleans_and_errors() {
        let m = parse_object_keyval("tls-creds-x509,id=t,dir=/a,,b,verify-peer=off").unwrap();
        assert_eq!(m["qom-type"], json!("tls-creds-x509"));
        assert_eq!(m["dir"], json!("/a,b"));
        assert_eq!(m["verify-peer"], json!(false));
        assert!(parse_object_keyval("tls-creds-x509,id=t,verify-peer=maybe")
            .unwrap_err()
            .to_string()
            .contains("Parameter 'verify-peer' expects 'on' or 'off'"));
    }
}
