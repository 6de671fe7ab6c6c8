//! Migration parameters (`migrate-set-parameters` / `query-migrate-parameters`).
//!
//! livemig keeps every parameter QEMU 7.2 reports, with QEMU's defaults, so that management
//! tools which read and write them keep working. Each acts as it does in QEMU, given what
//! livemig has:
//!
//! | parameters | what they do here |
//! |---|---|
//! | `downtime-limit`, `max-bandwidth`, `block-bitmap-mapping` | act (switchover policy, rate cap, bitmap aliases) |
//! | `tls-creds`, `tls-hostname`, `tls-authz` | act: the channel and its return path go over TLS (`crate::secure`) |
//! | `compress-*`, `decompress-threads` | configure `compress`, which is refused |
//! | `throttle-trigger-threshold`, `cpu-throttle-*`, `max-cpu-throttle` | configure `auto-converge`, which is refused |
//! | `multifd-*` | configure `multifd`, which is refused |
//! | `xbzrle-cache-size` | sizes the `xbzrle` cache, which is refused |
//! | `max-postcopy-bandwidth` | acts: caps postcopy's background push |
//! | `x-checkpoint-delay` | COLO (`x-colo`), refused |
//! | `block-incremental` | block migration (`block`, `migrate blk=true`), refused |
//! | `announce-*` | time the self-announcements a destination's NICs send; the reference VM has no NICs, so, as in QEMU without NICs, nothing is sent |
//!
//! So a parameter whose feature is not built is stored, validated with QEMU's rules and
//! reported, and can change nothing until the capability that uses it is enabled — which is
//! refused.

use crate::error::MigrationError;
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};

/// QEMU's default `max-bandwidth`: 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 134_217_728;
/// QEMU's default `downtime-limit` in milliseconds.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// Largest accepted `downtime-limit` in milliseconds.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// One bitmap alias inside a node alias of `block-bitmap-mapping`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapAlias {
    /// The bitmap's name on this side.
    pub name: String,
    /// The name used on the wire.
    pub alias: String,
    /// `transform.persistent`: overrides the persistence sent (source) or received
    /// (destination).
    pub persistent: Option<bool>,
    /// Whether a `transform` member was given at all: QEMU shows an empty `"transform": {}`
    /// back in `query-migrate-parameters`.
    pub transform: bool,
}

/// One node of `block-bitmap-mapping`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAlias {
    /// The node's name on this side.
    pub node_name: String,
    /// The name used on the wire.
    pub alias: String,
    /// The bitmaps of this node that migrate, and their aliases.
    pub bitmaps: Vec<BitmapAlias>,
}

/// A validated `block-bitmap-mapping`, with lookups in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitmapMapping {
    /// The nodes in the order given.
    pub nodes: Vec<NodeAlias>,
}

impl BitmapMapping {
    /// The wire alias of a node, or `None` when the node is not mapped.
    pub fn node_alias(&self, node_name: &str) -> Option<&NodeAlias> {
        self.nodes.iter().find(|n| n.node_name == node_name)
    }

    /// The node mapped to a wire alias.
    pub fn node_by_alias(&self, alias: &str) -> Option<&NodeAlias> {
        self.nodes.iter().find(|n| n.alias == alias)
    }

    /// Parses and validates the QMP value with QEMU's checks and messages
    /// (`check_dirty_bitmap_mig_alias_map`).
    pub fn from_json(v: &Value) -> Result<Self, MigrationError> {
        let bad = |m: String| {
            MigrationError::InvalidParameter(format!(
                "Invalid mapping given for block-bitmap-mapping: {m}"
            ))
        };
        let list = v.as_array().ok_or_else(|| {
            MigrationError::InvalidParameter(
                "Invalid parameter type for 'block-bitmap-mapping', expected: array".into(),
            )
        })?;
        let mut nodes = Vec::with_capacity(list.len().min(1024));
        let mut node_names = HashSet::new();
        let mut node_aliases = HashSet::new();
        for (i, entry) in list.iter().enumerate() {
            let where_ = format!("block-bitmap-mapping[{i}]");
            let obj = object(entry, &where_)?;
            check_keys(obj, &["node-name", "alias", "bitmaps"], &where_)?;
            let node_name = string_member(obj, "node-name", &where_)?;
            let alias = string_member(obj, "alias", &where_)?;
            let bitmaps_v = obj
                .get("bitmaps")
                .ok_or_else(|| missing(&where_, "bitmaps"))?;
            let bitmaps_list = bitmaps_v.as_array().ok_or_else(|| {
                MigrationError::InvalidParameter(format!(
                    "Invalid parameter type for '{where_}.bitmaps', expected: array"
                ))
            })?;

            if !id_wellformed(&alias) {
                return Err(bad(format!("The node alias '{alias}' is not well-formed")));
            }
            if alias.len() > 255 {
                return Err(bad(format!(
                    "The node alias '{alias}' is longer than 255 bytes"
                )));
            }
            if node_name.len() > 31 {
                return Err(bad(format!(
                    "The node name '{node_name}' is longer than 31 bytes"
                )));
            }
            if !node_names.insert(node_name.clone()) {
                return Err(bad(format!("The node name '{node_name}' is mapped twice")));
            }
            if !node_aliases.insert(alias.clone()) {
                return Err(bad(format!("The node alias '{alias}' is used twice")));
            }

            let mut bitmaps = Vec::with_capacity(bitmaps_list.len().min(1024));
            let mut names = HashSet::new();
            let mut aliases = HashSet::new();
            for (j, b) in bitmaps_list.iter().enumerate() {
                let where_b = format!("{where_}.bitmaps[{j}]");
                let bo = object(b, &where_b)?;
                check_keys(bo, &["name", "alias", "transform"], &where_b)?;
                let name = string_member(bo, "name", &where_b)?;
                let balias = string_member(bo, "alias", &where_b)?;
                let persistent = match bo.get("transform") {
                    None => None,
                    Some(t) => {
                        let where_t = format!("{where_b}.transform");
                        let to = object(t, &where_t)?;
                        check_keys(to, &["persistent"], &where_t)?;
                        match to.get("persistent") {
                            None => None,
                            Some(Value::Bool(p)) => Some(*p),
                            Some(_) => {
                                return Err(MigrationError::InvalidParameter(format!(
                                    "Invalid parameter type for '{where_t}.persistent', expected: boolean"
                                )))
                            }
                        }
                    }
                };
                if balias.len() > 255 {
                    return Err(bad(format!(
                        "The bitmap alias '{balias}' is longer than 255 bytes"
                    )));
                }
                if name.len() > 1023 {
                    return Err(bad(format!(
                        "The bitmap name '{name}' is longer than 1023 bytes"
                    )));
                }
                if !names.insert(name.clone()) {
                    return Err(bad(format!(
                        "The bitmap '{node_name}'/'{name}' is mapped twice"
                    )));
                }
                if !aliases.insert(balias.clone()) {
                    return Err(bad(format!(
                        "The bitmap alias '{alias}'/'{balias}' is used twice"
                    )));
                }
                bitmaps.push(BitmapAlias {
                    name,
                    alias: balias,
                    persistent,
                    transform: bo.contains_key("transform"),
                });
            }
            nodes.push(NodeAlias {
                node_name,
                alias,
                bitmaps,
            });
        }
        Ok(BitmapMapping { nodes })
    }

    /// The QMP value, as `query-migrate-parameters` shows it.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.nodes
                .iter()
                .map(|n| {
                    json!({
                        "node-name": n.node_name,
                        "alias": n.alias,
                        "bitmaps": n.bitmaps.iter().map(|b| {
                            let mut o = json!({"name": b.name, "alias": b.alias});
                            match b.persistent {
                                Some(p) => o["transform"] = json!({"persistent": p}),
                                None if b.transform => o["transform"] = json!({}),
                                None => {}
                            }
                            o
                        }).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        )
    }
}

fn missing(where_: &str, key: &str) -> MigrationError {
    MigrationError::InvalidParameter(format!("Parameter '{where_}.{key}' is missing"))
}

fn object<'a>(v: &'a Value, where_: &str) -> Result<&'a Map<String, Value>, MigrationError> {
    v.as_object().ok_or_else(|| {
        MigrationError::InvalidParameter(format!(
            "Invalid parameter type for '{where_}', expected: object"
        ))
    })
}

fn string_member(
    o: &Map<String, Value>,
    key: &str,
    where_: &str,
) -> Result<String, MigrationError> {
    match o.get(key) {
        None => Err(missing(where_, key)),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(MigrationError::InvalidParameter(format!(
            "Invalid parameter type for '{where_}.{key}', expected: string"
        ))),
    }
}

fn check_keys(
    o: &Map<String, Value>,
    allowed: &[&str],
    where_: &str,
) -> Result<(), MigrationError> {
    match o.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(MigrationError::InvalidParameter(format!(
            "Parameter '{where_}.{k}' is unexpected"
        ))),
        None => Ok(()),
    }
}

/// QEMU's `id_wellformed`: a letter first, then letters, digits, `-`, `.` and `_`.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// How a parameter is typed and checked.
#[derive(Clone, Copy)]
enum Kind {
    /// An unsigned integer with an inclusive range and QEMU's range message.
    Uint {
        min: u64,
        max: u64,
        msg: &'static str,
    },
    /// A boolean.
    Bool,
    /// A string (or null, for the TLS parameters).
    Str,
    /// An enum with the allowed values.
    Enum(&'static [&'static str]),
}

/// Every 7.2 parameter except `block-bitmap-mapping`, with its default and its check.
const PARAMS: &[(&str, Kind, DefaultValue)] = &[
    ("announce-initial", Kind::Uint { min: 0, max: 100_000, msg: "Parameter 'announce_initial' expects an integer in the range of 0 to 100000 ms" }, DefaultValue::U(50)),
    ("announce-max", Kind::Uint { min: 0, max: 100_000, msg: "Parameter 'announce_max' expects an integer in the range of 0 to 100000 ms" }, DefaultValue::U(550)),
    ("announce-rounds", Kind::Uint { min: 0, max: 1000, msg: "Parameter 'announce_rounds' expects an integer in the range of 0 to 1000" }, DefaultValue::U(5)),
    ("announce-step", Kind::Uint { min: 1, max: 10_000, msg: "Parameter 'announce_step' expects an integer in the range of 0 to 10000 ms" }, DefaultValue::U(100)),
    ("compress-level", Kind::Uint { min: 0, max: 9, msg: "Parameter 'compress_level' expects a value between 0 and 9" }, DefaultValue::U(1)),
    ("compress-threads", Kind::Uint { min: 1, max: 255, msg: "Parameter 'compress_threads' expects a value between 1 and 255" }, DefaultValue::U(8)),
    ("compress-wait-thread", Kind::Bool, DefaultValue::B(true)),
    ("decompress-threads", Kind::Uint { min: 1, max: 255, msg: "Parameter 'decompress_threads' expects a value between 1 and 255" }, DefaultValue::U(2)),
    ("throttle-trigger-threshold", Kind::Uint { min: 1, max: 100, msg: "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100" }, DefaultValue::U(50)),
    ("cpu-throttle-initial", Kind::Uint { min: 1, max: 99, msg: "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99" }, DefaultValue::U(20)),
    ("cpu-throttle-increment", Kind::Uint { min: 1, max: 99, msg: "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99" }, DefaultValue::U(10)),
    ("cpu-throttle-tailslow", Kind::Bool, DefaultValue::B(false)),
    ("tls-creds", Kind::Str, DefaultValue::S("")),
    ("tls-hostname", Kind::Str, DefaultValue::S("")),
    ("tls-authz", Kind::Str, DefaultValue::S("")),
    ("max-bandwidth", Kind::Uint { min: 0, max: u64::MAX, msg: "" }, DefaultValue::U(DEFAULT_MAX_BANDWIDTH)),
    ("downtime-limit", Kind::Uint { min: 0, max: MAX_DOWNTIME_LIMIT_MS, msg: "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms" }, DefaultValue::U(DEFAULT_DOWNTIME_LIMIT_MS)),
    ("x-checkpoint-delay", Kind::Uint { min: 0, max: u32::MAX as u64, msg: "Parameter 'x-checkpoint-delay' expects uint32_t" }, DefaultValue::U(20_000)),
    ("block-incremental", Kind::Bool, DefaultValue::B(false)),
    ("multifd-channels", Kind::Uint { min: 1, max: 255, msg: "Parameter 'multifd_channels' expects a value between 1 and 255" }, DefaultValue::U(2)),
    ("xbzrle-cache-size", Kind::Uint { min: 4096, max: u64::MAX, msg: "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size" }, DefaultValue::U(64 << 20)),
    ("max-postcopy-bandwidth", Kind::Uint { min: 0, max: u64::MAX, msg: "" }, DefaultValue::U(0)),
    ("max-cpu-throttle", Kind::Uint { min: 1, max: 99, msg: "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to 99" }, DefaultValue::U(99)),
    ("multifd-compression", Kind::Enum(&["none", "zlib", "zstd"]), DefaultValue::S("none")),
    ("multifd-zlib-level", Kind::Uint { min: 0, max: 9, msg: "Parameter 'multifd_zlib_level' expects a value between 0 and 9" }, DefaultValue::U(1)),
    ("multifd-zstd-level", Kind::Uint { min: 0, max: 20, msg: "Parameter 'multifd_zstd_level' expects a value between 0 and 20" }, DefaultValue::U(1)),
];

#[derive(Clone, Copy)]
enum DefaultValue {
    U(u64),
    B(bool),
    S(&'static str),
}

/// The current parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Parameters {
    values: HashMap<&'static str, Value>,
    /// `block-bitmap-mapping`, once set (an empty list is a valid mapping of nothing).
    pub block_bitmap_mapping: Option<BitmapMapping>,
}

impl Default for Parameters {
    fn default() -> Self {
        let values = PARAMS
            .iter()
            .map(|(name, _, d)| {
                let v = match d {
                    DefaultValue::U(u) => json!(u),
                    DefaultValue::B(b) => json!(b),
                    DefaultValue::S(s) => json!(s),
                };
                (*name, v)
            })
            .collect();
        Parameters {
            values,
            block_bitmap_mapping: None,
        }
    }
}

impl Parameters {
    fn uint(&self, name: &str) -> u64 {
        self.values.get(name).and_then(Value::as_u64).unwrap_or(0)
    }

    /// `max-bandwidth` in bytes per second.
    pub fn max_bandwidth(&self) -> u64 {
        self.uint("max-bandwidth")
    }

    /// `max-postcopy-bandwidth` in bytes per second: the background rate in postcopy (0: no
    /// limit). Requested pages are not limited.
    pub fn max_postcopy_bandwidth(&self) -> u64 {
        self.uint("max-postcopy-bandwidth")
    }

    /// `tls-creds`, `tls-hostname` and `tls-authz`.
    pub fn tls(&self) -> crate::secure::TlsParams {
        let s = |name: &str| {
            self.values
                .get(name)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        crate::secure::TlsParams {
            creds: s("tls-creds"),
            hostname: s("tls-hostname"),
            authz: s("tls-authz"),
        }
    }

    /// `downtime-limit` in milliseconds.
    pub fn downtime_limit_ms(&self) -> u64 {
        self.uint("downtime-limit")
    }

    /// The whole set as `query-migrate-parameters` returns it.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (name, _, _) in PARAMS {
            if let Some(v) = self.values.get(name) {
                m.insert((*name).to_string(), v.clone());
            }
        }
        if let Some(map) = &self.block_bitmap_mapping {
            m.insert("block-bitmap-mapping".into(), map.to_json());
        }
        Value::Object(m)
    }

    /// Applies a `migrate-set-parameters` request: every member is checked first, and nothing
    /// changes unless all are valid.
    pub fn apply(&mut self, args: &Map<String, Value>) -> Result<(), MigrationError> {
        let mut next = self.clone();
        for (key, v) in args {
            if key == "block-bitmap-mapping" {
                next.block_bitmap_mapping = Some(BitmapMapping::from_json(v)?);
                continue;
            }
            let Some((name, kind, _)) = PARAMS.iter().find(|(n, _, _)| n == key) else {
                return Err(MigrationError::InvalidParameter(format!(
                    "Parameter '{key}' is unexpected"
                )));
            };
            let checked = match kind {
                Kind::Uint { min, max, msg } => {
                    let n = v.as_u64().ok_or_else(|| {
                        MigrationError::InvalidParameter(format!(
                            "Invalid parameter type for '{key}', expected: integer"
                        ))
                    })?;
                    let pow2_bad = *name == "xbzrle-cache-size" && !n.is_power_of_two();
                    if n < *min || n > *max || pow2_bad {
                        return Err(MigrationError::InvalidParameter(msg.to_string()));
                    }
                    json!(n)
                }
                Kind::Bool => Value::Bool(v.as_bool().ok_or_else(|| {
                    MigrationError::InvalidParameter(format!(
                        "Invalid parameter type for '{key}', expected: boolean"
                    ))
                })?),
                Kind::Str => match v {
                    Value::String(_) => v.clone(),
                    Value::Null => json!(""),
                    _ => {
                        return Err(MigrationError::InvalidParameter(format!(
                            "Invalid parameter type for '{key}', expected: string"
                        )))
                    }
                },
                Kind::Enum(allowed) => match v.as_str() {
                    Some(s) if allowed.contains(&s) => v.clone(),
                    Some(s) => {
                        return Err(MigrationError::InvalidParameter(format!(
                            "Parameter '{key}' does not accept value '{s}'"
                        )))
                    }
                    None => {
                        return Err(MigrationError::InvalidParameter(format!(
                            "Invalid parameter type for '{key}', expected: string"
                        )))
                    }
                },
            };
            next.values.insert(name, checked);
        }
        if next.uint("max-cpu-throttle") < next.uint("cpu-throttle-initial") {
            return Err(MigrationError::InvalidParameter(
                "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99".into(),
            ));
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(p: &mut Parameters, v: Value) -> Result<(), String> {
        p.apply(v.as_object().unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_qemus() {
        let p = Parameters::default();
        let j = p.to_json();
        assert_eq!(j["max-bandwidth"], 134217728);
        assert_eq!(j["downtime-limit"], 300);
        assert_eq!(j["multifd-channels"], 2);
        assert!(j.get("block-bitmap-mapping").is_none());
        assert_eq!(j.as_object().unwrap().len(), 26);
    }

    #[test]
    fn range_errors_use_qemu_72_wording() {
        let mut p = Parameters::default();
        assert_eq!(
            set(&mut p, json!({"downtime-limit": 3000000})).unwrap_err(),
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
        );
        assert_eq!(
            set(&mut p, json!({"multifd-channels": 0})).unwrap_err(),
            "Parameter 'multifd_channels' expects a value between 1 and 255"
        );
        assert_eq!(p, Parameters::default());
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let mut p = Parameters::default();
        assert!(set(&mut p, json!({"downtime-limit": 10, "multifd-channels": 0})).is_err());
        assert_eq!(p.downtime_limit_ms(), 300);
        set(
            &mut p,
            json!({"downtime-limit": 10, "max-bandwidth": 1u64 << 40}),
        )
        .unwrap();
        assert_eq!(p.downtime_limit_ms(), 10);
        assert_eq!(p.max_bandwidth(), 1 << 40);
    }

    #[test]
    fn mapping_validation_messages() {
        let cases = [
            (json!([{"node-name": "a", "alias": "1x", "bitmaps": []}]),
             "Invalid mapping given for block-bitmap-mapping: The node alias '1x' is not well-formed"),
            (json!([{"node-name": "a", "alias": "x", "bitmaps": []}, {"node-name": "a", "alias": "y", "bitmaps": []}]),
             "Invalid mapping given for block-bitmap-mapping: The node name 'a' is mapped twice"),
            (json!([{"node-name": "a", "alias": "x", "bitmaps": []}, {"node-name": "b", "alias": "x", "bitmaps": []}]),
             "Invalid mapping given for block-bitmap-mapping: The node alias 'x' is used twice"),
            (json!([{"node-name": "a", "alias": "x", "bitmaps": [{"name": "b", "alias": "p"}, {"name": "b", "alias": "q"}]}]),
             "Invalid mapping given for block-bitmap-mapping: The bitmap 'a'/'b' is mapped twice"),
            (json!([{"node-name": "a", "alias": "x", "bitmaps": [{"name": "b", "alias": "p"}, {"name": "c", "alias": "p"}]}]),
             "Invalid mapping given for block-bitmap-mapping: The bitmap alias 'x'/'p' is used twice"),
            (json!([{"node-name": "a".repeat(32), "alias": "x", "bitmaps": []}]),
             "Invalid mapping given for block-bitmap-mapping: The node name 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa' is longer than 31 bytes"),
        ];
        for (v, msg) in cases {
            let mut p = Parameters::default();
            assert_eq!(
                set(&mut p, json!({"block-bitmap-mapping": v})).unwrap_err(),
                msg
            );
        }
    }

    #[test]
    fn empty_mapping_is_valid_and_shown() {
        let mut p = Parameters::default();
        set(&mut p, json!({"block-bitmap-mapping": []})).unwrap();
        assert_eq!(p.to_json()["block-bitmap-mapping"], json!([]));
        let m = json!([{"node-name": "d0", "alias": "disk", "bitmaps": [
            {"name": "b0", "alias": "bm", "transform": {"persistent": true}}]}]);
        set(&mut p, json!({"block-bitmap-mapping": m.clone()})).unwrap();
        assert_eq!(p.to_json()["block-bitmap-mapping"], m);
        let map = p.block_bitmap_mapping.as_ref().unwrap();
        assert_eq!(map.node_by_alias("disk").unwrap().node_name, "d0");
        // An empty transform is kept and shown back as QEMU 7.2 shows it.
        let m2 = json!([{"node-name": "d0", "alias": "disk", "bitmaps": [
            {"name": "b0", "alias": "bm", "transform": {}}, {"name": "b1", "alias": "b1"}]}]);
        let mut p2 = Parameters::default();
        set(&mut p2, json!({"block-bitmap-mapping": m2.clone()})).unwrap();
        assert_eq!(p2.to_json()["block-bitmap-mapping"], m2);
        assert_eq!(
            map.node_alias("d0").unwrap().bitmaps[0].persistent,
            Some(true)
        );
    }
}
