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
//! | `throttle-trigger-threshold`, `cpu-throttle-*`, `max-cpu-throttle` | act with `auto-converge`: when and how hard the source throttles its vCPUs (read at each throttle decision, so a change takes effect during a migration) |
//! | `multifd-channels`, `multifd-compression`, `multifd-zlib-level`, `multifd-zstd-level` | act: channels, their compression and its level (`crate::multifd`) |
//! | `xbzrle-cache-size` | sizes the `xbzrle` cache, which is refused |
//! | `max-postcopy-bandwidth` | acts: caps postcopy's background push |
//! | `x-checkpoint-delay` | COLO (`x-colo`), refused |
//! | `block-incremental` | block migration (`block`, `migrate blk=true`), refused |
//! | `x-livemig-auto-return-path`, `x-livemig-stall-timeout` | livemig's own: act (see [`Parameters::auto_return_path`], [`Parameters::stall_timeout`]) |
//! | `announce-*` | time the self-announcements a destination's NICs send; the reference VM has no NICs, so, as in QEMU without NICs, nothing is sent |
//!
//! So a parameter whose feature is not built is stored, validated with QEMU's rules and
//! reported, and can change nothing until the capability that uses it is enabled — which is
//! refused.
//!
//! A request is read in two steps, as QEMU reads it: [`ParameterUpdate::from_args`] visits the
//! members with their QAPI types ([`qmp::Args`], QEMU's schema order), then
//! [`Parameters::apply`] checks the merged result with QEMU's `migrate_params_check` rules, in
//! its order, and changes nothing unless every rule holds.

use crate::error::MigrationError;
use qmp::{Args, Param, QmpError};
use serde_json::{json, Map, Value};
use std::collections::{HashMap, HashSet};

/// QEMU's default `max-bandwidth`: 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 134_217_728;
/// QEMU's default `downtime-limit` in milliseconds.
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// Largest accepted `downtime-limit` in milliseconds.
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// Default `x-livemig-stall-timeout` in milliseconds: how long a migration channel may move
/// nothing, while one side waits on it, before the migration fails.
pub const DEFAULT_STALL_TIMEOUT_MS: u64 = 30_000;
/// Largest accepted `x-livemig-stall-timeout` in milliseconds (a day).
pub const MAX_STALL_TIMEOUT_MS: u64 = 86_400_000;

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

    /// Parses and validates a `block-bitmap-mapping` value: [`BitmapMapping::from_param`], then
    /// [`BitmapMapping::check`].
    pub fn from_json(v: &Value) -> Result<Self, MigrationError> {
        let m = Self::from_param(Param::new("block-bitmap-mapping", v.clone()))
            .map_err(|e| MigrationError::InvalidParameter(e.desc))?;
        m.check()?;
        Ok(m)
    }

    /// Reads the value with its QAPI types (`[BitmapMigrationNodeAlias]`), as QEMU's visitor
    /// does; the aliases are checked later, by [`BitmapMapping::check`].
    pub fn from_param(p: Param) -> Result<Self, QmpError> {
        let mut nodes = Vec::new();
        for n in p.into_list()? {
            let mut n = n.into_object()?;
            let node_name = n.req_str("node-name")?;
            let alias = n.req_str("alias")?;
            let mut bitmaps = Vec::new();
            for b in n.req_list("bitmaps")? {
                let mut b = b.into_object()?;
                let name = b.req_str("name")?;
                let balias = b.req_str("alias")?;
                let (transform, persistent) = match b.opt_object("transform")? {
                    None => (false, None),
                    Some(mut t) => {
                        let persistent = t.opt_bool("persistent")?;
                        t.finish()?;
                        (true, persistent)
                    }
                };
                b.finish()?;
                bitmaps.push(BitmapAlias {
                    name,
                    alias: balias,
                    persistent,
                    transform,
                });
            }
            n.finish()?;
            nodes.push(NodeAlias {
                node_name,
                alias,
                bitmaps,
            });
        }
        Ok(BitmapMapping { nodes })
    }

    /// QEMU's `check_dirty_bitmap_mig_alias_map`: well-formed, short and unique aliases and
    /// names, each with QEMU's message.
    pub fn check(&self) -> Result<(), MigrationError> {
        let bad = |m: String| {
            MigrationError::InvalidParameter(format!(
                "Invalid mapping given for block-bitmap-mapping: {m}"
            ))
        };
        let mut node_names = HashSet::new();
        let mut node_aliases = HashSet::new();
        for n in &self.nodes {
            let (node_name, alias) = (&n.node_name, &n.alias);
            if !qmp::id_wellformed(alias) {
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
            if !node_names.insert(node_name) {
                return Err(bad(format!("The node name '{node_name}' is mapped twice")));
            }
            if !node_aliases.insert(alias) {
                return Err(bad(format!("The node alias '{alias}' is used twice")));
            }
            let mut names = HashSet::new();
            let mut aliases = HashSet::new();
            for b in &n.bitmaps {
                let (name, balias) = (&b.name, &b.alias);
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
                if !names.insert(name) {
                    return Err(bad(format!(
                        "The bitmap '{node_name}'/'{name}' is mapped twice"
                    )));
                }
                if !aliases.insert(balias) {
                    return Err(bad(format!(
                        "The bitmap alias '{alias}'/'{balias}' is used twice"
                    )));
                }
            }
        }
        Ok(())
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

/// A parameter's QAPI type in `MigrateSetParameters`, which decides the messages for a value
/// of the wrong type (`expects uint8_t`, `expected: StrOrNull`, ...).
#[derive(Clone, Copy)]
enum Ty {
    /// `uint8`.
    U8,
    /// `uint32`.
    U32,
    /// `uint64` and `size`.
    U64,
    /// `bool`.
    Bool,
    /// `StrOrNull` (`null` reads as `""`).
    StrOrNull,
    /// An enum with the allowed values.
    Enum(&'static [&'static str]),
}

/// The rule `migrate_params_check` applies to a parameter, with QEMU 7.2's message.
#[derive(Clone, Copy)]
enum Rule {
    /// The type says it all.
    None,
    /// An inclusive range.
    Range {
        min: u64,
        max: u64,
        msg: &'static str,
    },
    /// A power of two no less than `min`.
    PowerOfTwo { min: u64, msg: &'static str },
}

const fn range(min: u64, max: u64, msg: &'static str) -> Rule {
    Rule::Range { min, max, msg }
}

/// Every 7.2 parameter except `block-bitmap-mapping`, in QEMU's schema order, with its type,
/// its rule and its default.
const PARAMS: &[(&str, Ty, Rule, DefaultValue)] = &[
    ("announce-initial", Ty::U64, range(0, 100_000, "Parameter 'announce_initial' expects an integer in the range of 0 to 100000 ms"), DefaultValue::U(50)),
    ("announce-max", Ty::U64, range(0, 100_000, "Parameter 'announce_max' expects an integer in the range of 0 to 100000 ms"), DefaultValue::U(550)),
    ("announce-rounds", Ty::U64, range(0, 1000, "Parameter 'announce_rounds' expects an integer in the range of 0 to 1000"), DefaultValue::U(5)),
    ("announce-step", Ty::U64, range(1, 10_000, "Parameter 'announce_step' expects an integer in the range of 0 to 10000 ms"), DefaultValue::U(100)),
    ("compress-level", Ty::U8, range(0, 9, "Parameter 'compress_level' expects a value between 0 and 9"), DefaultValue::U(1)),
    ("compress-threads", Ty::U8, range(1, 255, "Parameter 'compress_threads' expects a value between 1 and 255"), DefaultValue::U(8)),
    ("compress-wait-thread", Ty::Bool, Rule::None, DefaultValue::B(true)),
    ("decompress-threads", Ty::U8, range(1, 255, "Parameter 'decompress_threads' expects a value between 1 and 255"), DefaultValue::U(2)),
    ("throttle-trigger-threshold", Ty::U8, range(1, 100, "Parameter 'throttle_trigger_threshold' expects an integer in the range of 1 to 100"), DefaultValue::U(50)),
    ("cpu-throttle-initial", Ty::U8, range(1, 99, "Parameter 'cpu_throttle_initial' expects an integer in the range of 1 to 99"), DefaultValue::U(20)),
    ("cpu-throttle-increment", Ty::U8, range(1, 99, "Parameter 'cpu_throttle_increment' expects an integer in the range of 1 to 99"), DefaultValue::U(10)),
    ("cpu-throttle-tailslow", Ty::Bool, Rule::None, DefaultValue::B(false)),
    ("tls-creds", Ty::StrOrNull, Rule::None, DefaultValue::S("")),
    ("tls-hostname", Ty::StrOrNull, Rule::None, DefaultValue::S("")),
    ("tls-authz", Ty::StrOrNull, Rule::None, DefaultValue::S("")),
    ("max-bandwidth", Ty::U64, Rule::None, DefaultValue::U(DEFAULT_MAX_BANDWIDTH)),
    ("downtime-limit", Ty::U64, range(0, MAX_DOWNTIME_LIMIT_MS, "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"), DefaultValue::U(DEFAULT_DOWNTIME_LIMIT_MS)),
    ("x-checkpoint-delay", Ty::U32, Rule::None, DefaultValue::U(20_000)),
    ("block-incremental", Ty::Bool, Rule::None, DefaultValue::B(false)),
    ("multifd-channels", Ty::U8, range(1, 255, "Parameter 'multifd_channels' expects a value between 1 and 255"), DefaultValue::U(2)),
    ("xbzrle-cache-size", Ty::U64, Rule::PowerOfTwo { min: 4096, msg: "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size" }, DefaultValue::U(64 << 20)),
    ("max-postcopy-bandwidth", Ty::U64, Rule::None, DefaultValue::U(0)),
    ("max-cpu-throttle", Ty::U8, range(1, 99, "Parameter 'max_cpu_throttle' expects an integer in the range of 1 to 99"), DefaultValue::U(99)),
    ("multifd-compression", Ty::Enum(&["none", "zlib", "zstd"]), Rule::None, DefaultValue::S("none")),
    ("multifd-zlib-level", Ty::U8, range(0, 9, "Parameter 'multifd_zlib_level' expects a value between 0 and 9"), DefaultValue::U(1)),
    ("multifd-zstd-level", Ty::U8, range(0, 20, "Parameter 'multifd_zstd_level' expects a value between 0 and 20"), DefaultValue::U(1)),
    // livemig's own (not in QEMU): see `Parameters::stall_timeout`.
    ("x-livemig-auto-return-path", Ty::Bool, Rule::None, DefaultValue::B(true)),
    ("x-livemig-stall-timeout", Ty::U64, range(0, MAX_STALL_TIMEOUT_MS, "Parameter 'x-livemig-stall-timeout' expects an integer in the range of 0 to 86400000 ms"), DefaultValue::U(DEFAULT_STALL_TIMEOUT_MS)),
];

/// The order in which QEMU 7.2's `migrate_params_check` applies the rules (the first broken
/// one is reported); `block-bitmap-mapping` comes last.
const CHECK_ORDER: &[&str] = &[
    "compress-level",
    "compress-threads",
    "decompress-threads",
    "throttle-trigger-threshold",
    "cpu-throttle-initial",
    "cpu-throttle-increment",
    "max-bandwidth",
    "downtime-limit",
    "multifd-channels",
    "multifd-zlib-level",
    "multifd-zstd-level",
    "xbzrle-cache-size",
    "max-cpu-throttle",
    "announce-initial",
    "announce-max",
    "announce-rounds",
    "announce-step",
    "x-livemig-stall-timeout",
];

/// A `migrate-set-parameters` request whose members have their QAPI types; apply it with
/// [`Parameters::apply`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParameterUpdate {
    values: Vec<(&'static str, Value)>,
    mapping: Option<BitmapMapping>,
}

impl ParameterUpdate {
    /// Visits `migrate-set-parameters` arguments as QEMU's `MigrateSetParameters`: each member
    /// with its type, in schema order, then no other member.
    pub fn from_args(mut args: Args) -> Result<ParameterUpdate, QmpError> {
        let mut values = Vec::new();
        for (name, ty, _, _) in PARAMS {
            let Some(p) = args.take(name) else { continue };
            let v = match ty {
                Ty::U8 => json!(p.into_int::<u8>()?),
                Ty::U32 => json!(p.into_int::<u32>()?),
                Ty::U64 => json!(p.into_int::<u64>()?),
                Ty::Bool => json!(p.into_bool()?),
                // QEMU stores null as "" (its "TODO Rewrite \"\" to null instead").
                Ty::StrOrNull => json!(p.into_str_or_null()?.unwrap_or_default()),
                Ty::Enum(allowed) => json!(p.into_enum(allowed)?),
            };
            values.push((*name, v));
        }
        let mapping = args
            .take("block-bitmap-mapping")
            .map(BitmapMapping::from_param)
            .transpose()?;
        args.finish()?;
        Ok(ParameterUpdate { values, mapping })
    }

    /// Whether the request names `parameter`.
    pub fn sets(&self, parameter: &str) -> bool {
        if parameter == "block-bitmap-mapping" {
            return self.mapping.is_some();
        }
        self.values.iter().any(|(n, _)| *n == parameter)
    }
}

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
            .map(|(name, _, _, d)| {
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

    /// The `auto-converge` parameters: `throttle-trigger-threshold`, `cpu-throttle-initial`,
    /// `cpu-throttle-increment`, `cpu-throttle-tailslow` and `max-cpu-throttle`.
    pub(crate) fn throttle(&self) -> crate::policy::ThrottleParams {
        crate::policy::ThrottleParams {
            threshold: self.uint("throttle-trigger-threshold"),
            initial: self.uint("cpu-throttle-initial"),
            increment: self.uint("cpu-throttle-increment"),
            tailslow: self
                .values
                .get("cpu-throttle-tailslow")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max: self.uint("max-cpu-throttle"),
        }
    }

    /// `multifd-channels` (1..=255).
    pub fn multifd_channels(&self) -> u8 {
        self.uint("multifd-channels").clamp(1, 255) as u8
    }

    /// `multifd-compression`.
    pub fn multifd_compression(&self) -> crate::multifd::Compression {
        self.values
            .get("multifd-compression")
            .and_then(Value::as_str)
            .and_then(crate::multifd::Compression::parse)
            .unwrap_or(crate::multifd::Compression::None)
    }

    /// `multifd-zlib-level` (0..=9).
    pub fn multifd_zlib_level(&self) -> u32 {
        self.uint("multifd-zlib-level").min(9) as u32
    }

    /// `multifd-zstd-level` (0..=20).
    pub fn multifd_zstd_level(&self) -> i32 {
        self.uint("multifd-zstd-level").min(20) as i32
    }

    /// `downtime-limit` in milliseconds.
    pub fn downtime_limit_ms(&self) -> u64 {
        self.uint("downtime-limit")
    }

    /// `x-livemig-stall-timeout` (livemig's own; 0 turns it off, as QEMU has none): the
    /// longest a migration channel may move no byte while one end waits on it — the source
    /// blocked in a write, or waiting for the destination's verdict once the stream went out;
    /// the destination waiting for the next byte of the stream — before that end fails the
    /// migration. The source then resumes the guest, unless the whole stream had gone out (see
    /// `outgoing`). On sockets (`tcp:`, `unix:`) only: `exec:` and `file:` leave it to the
    /// command or the file system.
    pub fn stall_timeout(&self) -> Option<std::time::Duration> {
        match self.uint("x-livemig-stall-timeout") {
            0 => None,
            ms => Some(std::time::Duration::from_millis(ms)),
        }
    }

    /// `x-livemig-auto-return-path` (livemig's own, on by default): a source opens the return
    /// path over a socket (`tcp:`, `unix:`) even without the `return-path` capability — every
    /// QEMU destination since 2.5 accepts one — so that it waits for the destination's verdict
    /// and resumes the guest when the destination fails, instead of calling a migration
    /// `completed` whose destination never loaded it. Off, the return path opens only with
    /// the capability, as in QEMU. (Over `exec:` the capability still decides alone: a command
    /// may not carry bytes back.)
    pub fn auto_return_path(&self) -> bool {
        self.values
            .get("x-livemig-auto-return-path")
            .and_then(Value::as_bool)
            .unwrap_or(true)
    }

    /// The whole set as `query-migrate-parameters` returns it.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        for (name, ..) in PARAMS {
            if let Some(v) = self.values.get(name) {
                m.insert((*name).to_string(), v.clone());
            }
        }
        if let Some(map) = &self.block_bitmap_mapping {
            m.insert("block-bitmap-mapping".into(), map.to_json());
        }
        Value::Object(m)
    }

    /// Applies a `migrate-set-parameters` request: the merged parameters are checked with
    /// QEMU's rules, in QEMU's order, and nothing changes unless all hold.
    pub fn apply(&mut self, update: &ParameterUpdate) -> Result<(), MigrationError> {
        let mut next = self.clone();
        for (name, v) in &update.values {
            next.values.insert(name, v.clone());
        }
        for name in CHECK_ORDER {
            let Some((_, _, rule, _)) = PARAMS.iter().find(|(n, ..)| n == name) else {
                continue;
            };
            let n = next.uint(name);
            let broken = match *rule {
                Rule::None => None,
                Rule::Range { min, max, msg } => (n < min || n > max).then_some(msg),
                Rule::PowerOfTwo { min, msg } => (n < min || !n.is_power_of_two()).then_some(msg),
            };
            if let Some(msg) = broken {
                return Err(MigrationError::InvalidParameter(msg.to_string()));
            }
            if *name == "max-cpu-throttle" && n < next.uint("cpu-throttle-initial") {
                return Err(MigrationError::InvalidParameter(
                    "Parameter 'max_cpu_throttle' expects an integer in the range of cpu_throttle_initial to 99".into(),
                ));
            }
        }
        if let Some(m) = &update.mapping {
            m.check()?;
            next.block_bitmap_mapping = Some(m.clone());
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(p: &mut Parameters, v: Value) -> Result<(), String> {
        let args = Args::new(v.as_object().unwrap().clone());
        let update = ParameterUpdate::from_args(args).map_err(|e| e.desc)?;
        p.apply(&update).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_qemus() {
        let p = Parameters::default();
        let j = p.to_json();
        assert_eq!(j["max-bandwidth"], 134217728);
        assert_eq!(j["downtime-limit"], 300);
        assert_eq!(j["multifd-channels"], 2);
        assert!(j.get("block-bitmap-mapping").is_none());
        // QEMU 7.2's 26, and livemig's own two.
        assert_eq!(j.as_object().unwrap().len(), 28);
        assert_eq!(j["x-livemig-auto-return-path"], true);
        assert_eq!(j["x-livemig-stall-timeout"], 30_000);
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
