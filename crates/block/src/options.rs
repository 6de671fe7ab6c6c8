//! `BlockdevOptions`: the subset of QEMU's `blockdev-add` / `-blockdev` schema this crate
//! opens, checked with QEMU's QAPI messages, and the keyval parser for the command-line form.
//!
//! Validation follows QEMU's visitor order: the base members (`driver` first), then the
//! driver's members, then members the schema does not know ("Parameter 'x' is unexpected").
//! Nested definitions report full paths (`file.filename`).
//!
//! The command-line form `driver=raw,node-name=d0,file.driver=file,file.filename=/x` is QEMU's
//! keyval syntax: `,,` is a literal comma in a value, dotted keys build nested objects, a later
//! key overrides an earlier one, and every value is a string until the schema converts it —
//! integers with C's base prefixes (`0x1000`, `010` is octal), booleans as `on`/`off`/`yes`/
//! `no`/`true`/`false`/`y`/`n`. The JSON form (`-blockdev '{"driver": ...}'`) is accepted too.

use crate::error::BlockError;
use serde_json::{Map, Value};

/// Drivers this crate opens.
pub const DRIVERS: &[&str] = &["file", "null-co", "qcow2", "raw"];

/// Longest node name, in bytes (QEMU's `node_name[32]` with its NUL).
pub const MAX_NODE_NAME: usize = 31;

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Bool,
    Int,
    UInt,
    Enum(&'static [&'static str]),
    Struct(&'static [Field]),
    Ref,
    RefOrNull,
}

#[derive(Clone, Copy)]
struct Field {
    name: &'static str,
    ty: Ty,
    required: bool,
}

const fn opt(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: false,
    }
}

const fn req(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: true,
    }
}

const CACHE: &[Field] = &[opt("direct", Ty::Bool), opt("no-flush", Ty::Bool)];

const BASE: &[Field] = &[
    req("driver", Ty::Enum(DRIVERS)),
    opt("node-name", Ty::Str),
    opt("discard", Ty::Enum(&["ignore", "unmap"])),
    opt("cache", Ty::Struct(CACHE)),
    opt("read-only", Ty::Bool),
    opt("auto-read-only", Ty::Bool),
    opt("force-share", Ty::Bool),
    opt("detect-zeroes", Ty::Enum(&["off", "on", "unmap"])),
];

const FILE: &[Field] = &[
    req("filename", Ty::Str),
    opt("pr-manager", Ty::Str),
    opt("locking", Ty::Enum(&["off", "on", "auto"])),
    opt("aio", Ty::Enum(&["threads", "native", "io_uring"])),
    opt("aio-max-batch", Ty::Int),
    opt("drop-cache", Ty::Bool),
    opt("x-check-cache-dropped", Ty::Bool),
];

const NULL: &[Field] = &[
    opt("size", Ty::Int),
    opt("latency-ns", Ty::UInt),
    opt("read-zeroes", Ty::Bool),
];

const RAW: &[Field] = &[
    req("file", Ty::Ref),
    opt("offset", Ty::Int),
    opt("size", Ty::Int),
];

const QCOW2: &[Field] = &[
    req("file", Ty::Ref),
    opt("backing", Ty::RefOrNull),
    opt("lazy-refcounts", Ty::Bool),
    opt("pass-discard-request", Ty::Bool),
    opt("pass-discard-snapshot", Ty::Bool),
    opt("pass-discard-other", Ty::Bool),
    opt(
        "overlap-check",
        Ty::Enum(&["none", "constant", "cached", "all"]),
    ),
    opt("cache-size", Ty::Int),
    opt("l2-cache-size", Ty::Int),
    opt("l2-cache-entry-size", Ty::Int),
    opt("refcount-cache-size", Ty::Int),
    opt("cache-clean-interval", Ty::Int),
    opt("data-file", Ty::Ref),
];

fn driver_fields(driver: &str) -> &'static [Field] {
    match driver {
        "file" => FILE,
        "null-co" => NULL,
        "qcow2" => QCOW2,
        "raw" => RAW,
        _ => &[],
    }
}

/// Options of one node, as `blockdev-add` gives them.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockdevOptions {
    /// `driver`.
    pub driver: String,
    /// `node-name`; required for the root of a `blockdev-add`, generated for implicit children.
    pub node_name: Option<String>,
    /// `discard`: `Some(true)` for `unmap`; `None` inherits (children) or means `ignore`.
    pub discard_unmap: Option<bool>,
    /// `cache.direct`.
    pub cache_direct: Option<bool>,
    /// `cache.no-flush`.
    pub cache_no_flush: Option<bool>,
    /// `read-only`.
    pub read_only: Option<bool>,
    /// `auto-read-only` (accepted; this crate never downgrades a node to read-only by itself).
    pub auto_read_only: Option<bool>,
    /// `force-share` (read-only nodes only): share every permission, take no write lock.
    pub force_share: Option<bool>,
    /// `detect-zeroes` (only `off` is supported).
    pub detect_zeroes: Option<String>,
    /// The driver's own members.
    pub driver_options: DriverOptions,
}

/// The members of one driver.
#[derive(Debug, Clone, PartialEq)]
pub enum DriverOptions {
    /// `file`.
    File {
        /// `filename`.
        filename: String,
        /// `locking`: `on`, `off` or `auto` (the default).
        locking: Option<String>,
        /// `aio` (only `threads`).
        aio: Option<String>,
    },
    /// `null-co`.
    Null {
        /// `size` in bytes (default 1 GiB).
        size: Option<i64>,
        /// `latency-ns`.
        latency_ns: Option<u64>,
        /// `read-zeroes`.
        read_zeroes: Option<bool>,
    },
    /// `raw`.
    Raw {
        /// `file`: the child.
        file: BlockdevRef,
        /// `offset` into the child.
        offset: Option<i64>,
        /// `size` of the window.
        size: Option<i64>,
        /// The format was probed, not given (no QMP member: QEMU's `bs->probed`, set when a
        /// `-drive` or `drive-mirror` names no format): the first sector may not be rewritten
        /// into another format.
        probed: bool,
    },
    /// `qcow2`.
    Qcow2 {
        /// `file`: the image.
        file: BlockdevRef,
        /// `backing`: absent opens the backing file the image names, `null` none.
        backing: Option<BackingRef>,
        /// `lazy-refcounts` (only `off` is supported).
        lazy_refcounts: Option<bool>,
        /// `data-file` (not supported).
        data_file: bool,
    },
}

/// A `backing` member: a child, or `null` for none.
#[derive(Debug, Clone, PartialEq)]
pub enum BackingRef {
    /// `"backing": null`.
    Null,
    /// A child.
    Ref(BlockdevRef),
    /// The backing file the image's header names, opened under this node name (`-drive
    /// ...,backing.node-name=NAME`: QEMU merges backing options given on the command line
    /// with the image's backing file).
    FromImage {
        /// The backing node's name.
        node_name: String,
    },
}

/// A child: the name of an existing node, or a definition opened with (and owned by) its
/// parent.
#[derive(Debug, Clone, PartialEq)]
pub enum BlockdevRef {
    /// `"file": "node-name"`.
    Reference(String),
    /// `"file": {"driver": ...}`.
    Definition(Box<BlockdevOptions>),
}

fn full(prefix: &str, name: &str) -> String {
    format!("{prefix}{name}")
}

fn type_err(name: String, expected: &str) -> BlockError {
    BlockError::InvalidParameterType {
        name,
        expected: expected.to_string(),
    }
}

fn check_value(v: &Value, ty: Ty, name: &str) -> Result<(), BlockError> {
    match ty {
        Ty::Str => v
            .is_string()
            .then_some(())
            .ok_or_else(|| type_err(name.into(), "string")),
        Ty::Bool => v
            .is_boolean()
            .then_some(())
            .ok_or_else(|| type_err(name.into(), "boolean")),
        Ty::Int => v
            .as_i64()
            .map(drop)
            .ok_or_else(|| type_err(name.into(), "integer")),
        Ty::UInt => {
            if v.as_u64().is_some() || v.as_i64().is_some() {
                Ok(())
            } else {
                Err(BlockError::InvalidParameterValue {
                    name: name.into(),
                    expected: "uint64".into(),
                })
            }
        }
        Ty::Enum(values) => {
            let s = v.as_str().ok_or_else(|| type_err(name.into(), "string"))?;
            if values.contains(&s) {
                Ok(())
            } else {
                Err(BlockError::ParameterValueRejected {
                    name: name.into(),
                    value: s.into(),
                })
            }
        }
        Ty::Struct(fields) => {
            let m = v
                .as_object()
                .ok_or_else(|| type_err(name.into(), "object"))?;
            check_fields(m, &[fields], &format!("{name}."))
        }
        Ty::Ref => match v {
            Value::String(_) => Ok(()),
            Value::Object(_) => check_options(v, &format!("{name}.")),
            _ => Err(type_err(name.into(), "BlockdevRef")),
        },
        Ty::RefOrNull => match v {
            Value::Null | Value::String(_) => Ok(()),
            Value::Object(_) => check_options(v, &format!("{name}.")),
            _ => Err(type_err(name.into(), "BlockdevRefOrNull")),
        },
    }
}

fn check_fields(
    m: &Map<String, Value>,
    groups: &[&[Field]],
    prefix: &str,
) -> Result<(), BlockError> {
    for f in groups.iter().flat_map(|g| g.iter()) {
        match m.get(f.name) {
            Some(v) => check_value(v, f.ty, &full(prefix, f.name))?,
            None if f.required => return Err(BlockError::MissingParameter(full(prefix, f.name))),
            None => {}
        }
    }
    for k in m.keys() {
        if !groups.iter().any(|g| g.iter().any(|f| f.name == k)) {
            return Err(BlockError::UnexpectedParameter(full(prefix, k)));
        }
    }
    Ok(())
}

fn check_options(v: &Value, prefix: &str) -> Result<(), BlockError> {
    let name = prefix.strip_suffix('.').unwrap_or("arguments");
    let m = v
        .as_object()
        .ok_or_else(|| type_err(name.into(), "object"))?;
    let driver = match m.get("driver") {
        None => return Err(BlockError::MissingParameter(full(prefix, "driver"))),
        Some(d) => {
            check_value(d, Ty::Enum(DRIVERS), &full(prefix, "driver"))?;
            d.as_str().unwrap_or_default()
        }
    };
    check_fields(m, &[BASE, driver_fields(driver)], prefix)
}

fn get_str(m: &Map<String, Value>, k: &str) -> Option<String> {
    m.get(k).and_then(Value::as_str).map(str::to_string)
}
fn get_bool(m: &Map<String, Value>, k: &str) -> Option<bool> {
    m.get(k).and_then(Value::as_bool)
}
fn get_i64(m: &Map<String, Value>, k: &str) -> Option<i64> {
    m.get(k).and_then(Value::as_i64)
}
fn get_u64(m: &Map<String, Value>, k: &str) -> Option<u64> {
    m.get(k)
        .and_then(|v| v.as_u64().or_else(|| v.as_i64().map(|i| i as u64)))
}

fn build_ref(v: Option<&Value>) -> BlockdevRef {
    match v {
        Some(Value::Object(c)) => BlockdevRef::Definition(Box::new(build(c))),
        other => BlockdevRef::Reference(
            other
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        ),
    }
}

fn build(m: &Map<String, Value>) -> BlockdevOptions {
    let driver = get_str(m, "driver").unwrap_or_default();
    let cache = m.get("cache").and_then(Value::as_object);
    let driver_options = match driver.as_str() {
        "file" => DriverOptions::File {
            filename: get_str(m, "filename").unwrap_or_default(),
            locking: get_str(m, "locking"),
            aio: get_str(m, "aio"),
        },
        "qcow2" => DriverOptions::Qcow2 {
            file: build_ref(m.get("file")),
            backing: match m.get("backing") {
                None => None,
                Some(Value::Null) => Some(BackingRef::Null),
                Some(v) => Some(BackingRef::Ref(build_ref(Some(v)))),
            },
            lazy_refcounts: get_bool(m, "lazy-refcounts"),
            data_file: m.contains_key("data-file"),
        },
        "raw" => DriverOptions::Raw {
            file: match m.get("file") {
                Some(Value::Object(c)) => BlockdevRef::Definition(Box::new(build(c))),
                other => BlockdevRef::Reference(
                    other
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                ),
            },
            offset: get_i64(m, "offset"),
            size: get_i64(m, "size"),
            probed: false,
        },
        _ => DriverOptions::Null {
            size: get_i64(m, "size"),
            latency_ns: get_u64(m, "latency-ns"),
            read_zeroes: get_bool(m, "read-zeroes"),
        },
    };
    BlockdevOptions {
        driver,
        node_name: get_str(m, "node-name"),
        discard_unmap: get_str(m, "discard").map(|d| d == "unmap"),
        cache_direct: cache.and_then(|c| get_bool(c, "direct")),
        cache_no_flush: cache.and_then(|c| get_bool(c, "no-flush")),
        read_only: get_bool(m, "read-only"),
        auto_read_only: get_bool(m, "auto-read-only"),
        force_share: get_bool(m, "force-share"),
        detect_zeroes: get_str(m, "detect-zeroes"),
        driver_options,
    }
}

/// Refuses the schema members, of this node and of the children defined inside it, whose
/// values ask for something QEMU 7.2 does and this crate does not build (checked after the
/// schema, before anything is opened). The values left through are exactly the ones this
/// crate acts like QEMU on: `pass-discard-snapshot` has no internal snapshot to delete;
/// `aio-max-batch` only batches `native`/`io_uring` submissions, which are refused; the qcow2
/// metadata cache sizes and `cache-clean-interval` tune memory use, not what a reader sees.
fn refuse_unbuilt(m: &Map<String, Value>) -> Result<(), BlockError> {
    let unsupported = |what: &str, why: &str| {
        Err(BlockError::Unsupported(format!(
            "{what} is not supported by this block layer ({why})"
        )))
    };
    match m.get("driver").and_then(Value::as_str).unwrap_or_default() {
        "file" => {
            if let Some(id) = get_str(m, "pr-manager") {
                // No pr-manager objects exist here, so QEMU's lookup would fail the same way.
                return Err(BlockError::Driver(format!(
                    "No persistent reservation manager with id '{id}'"
                )));
            }
            if get_bool(m, "x-check-cache-dropped") == Some(true) {
                return unsupported(
                    "x-check-cache-dropped=on",
                    "it has no page-cache residency check",
                );
            }
        }
        "qcow2" => {
            for (key, why) in [
                (
                    "pass-discard-request",
                    "a discard frees qcow2 clusters, and is not passed to the image file",
                ),
                (
                    "pass-discard-other",
                    "freed qcow2 clusters are not discarded in the image file",
                ),
            ] {
                if get_bool(m, key) == Some(true) {
                    return unsupported(&format!("{key}=on"), why);
                }
            }
            if let Some(o) = get_str(m, "overlap-check") {
                if o != "none" {
                    return unsupported(
                        &format!("overlap-check={o}"),
                        "it makes no metadata overlap checks: overlap-check=none",
                    );
                }
            }
        }
        _ => {}
    }
    for child in ["file", "backing", "data-file"] {
        if let Some(Value::Object(c)) = m.get(child) {
            refuse_unbuilt(c)?;
        }
    }
    Ok(())
}

impl BlockdevOptions {
    /// Options of `driver` with only a node name and the driver's own members: every common
    /// member unset (inherited from the parent, or the default), as for a node the layer opens
    /// itself.
    pub(crate) fn plain(
        driver: String,
        node_name: Option<String>,
        driver_options: DriverOptions,
    ) -> Self {
        BlockdevOptions {
            driver,
            node_name,
            discard_unmap: None,
            cache_direct: None,
            cache_no_flush: None,
            read_only: None,
            auto_read_only: None,
            force_share: None,
            detect_zeroes: None,
            driver_options,
        }
    }

    /// Checks `blockdev-add` arguments against the schema, with QEMU's messages.
    pub fn from_json(v: &Value) -> Result<Self, BlockError> {
        check_options(v, "")?;
        let m = v
            .as_object()
            .ok_or_else(|| type_err("arguments".into(), "object"))?;
        refuse_unbuilt(m)?;
        Ok(build(m))
    }

    /// Refuses valid QEMU options this implementation does not provide (our messages).
    pub fn check_supported(&self) -> Result<(), BlockError> {
        if self.cache_direct == Some(true) {
            return Err(BlockError::Unsupported(
                "cache.direct=on is not supported by this block layer".into(),
            ));
        }
        if let Some(d) = &self.detect_zeroes {
            if d != "off" {
                return Err(BlockError::Unsupported(format!(
                    "detect-zeroes={d} is not supported by this block layer"
                )));
            }
        }
        if let DriverOptions::File { aio: Some(a), .. } = &self.driver_options {
            if a != "threads" {
                return Err(BlockError::Unsupported(format!(
                    "aio={a} is not supported by this block layer"
                )));
            }
        }
        if let DriverOptions::Raw {
            file: BlockdevRef::Definition(c),
            ..
        } = &self.driver_options
        {
            c.check_supported()?;
        }
        if let DriverOptions::Qcow2 {
            file,
            backing,
            lazy_refcounts,
            data_file,
        } = &self.driver_options
        {
            if *lazy_refcounts == Some(true) {
                return Err(BlockError::Unsupported(
                    "lazy-refcounts=on is not supported by this block layer".into(),
                ));
            }
            if *data_file {
                return Err(BlockError::Unsupported(
                    "qcow2 data-file is not supported by this block layer".into(),
                ));
            }
            if let BlockdevRef::Definition(c) = file {
                c.check_supported()?;
            }
            if let Some(BackingRef::Ref(BlockdevRef::Definition(c))) = backing {
                c.check_supported()?;
            }
        }
        Ok(())
    }
}

/// QEMU's `id_wellformed`, for the crates that name nodes through this one.
pub use qmp::id_wellformed;

// ---- keyval -----------------------------------------------------------------------------------

fn key_fragment_ok(f: &str) -> bool {
    if f.is_empty() || f.len() > 127 {
        return false;
    }
    if f.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let mut chars = f.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Parses QEMU keyval text (`a=1,b.c=x,,y`) into a tree of objects whose leaves are strings.
pub fn parse_keyval(text: &str) -> Result<Map<String, Value>, BlockError> {
    let mut root = Map::new();
    let mut rest = text;
    while !rest.is_empty() {
        let key_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let key = rest.get(..key_end).unwrap_or_default();
        if !key.split('.').all(key_fragment_ok) {
            return Err(BlockError::InvalidKey(key.to_string()));
        }
        let after = rest.get(key_end..).unwrap_or_default();
        let Some(mut value_text) = after.strip_prefix('=') else {
            return Err(BlockError::ExpectedEquals(key.to_string()));
        };
        let mut value = String::new();
        loop {
            match value_text.find(',') {
                None => {
                    value.push_str(value_text);
                    rest = "";
                    break;
                }
                Some(i) => {
                    value.push_str(value_text.get(..i).unwrap_or_default());
                    let tail = value_text.get(i + 1..).unwrap_or_default();
                    if let Some(t) = tail.strip_prefix(',') {
                        value.push(',');
                        value_text = t;
                    } else {
                        rest = tail;
                        break;
                    }
                }
            }
        }
        insert_keyval(&mut root, key, value)?;
    }
    Ok(root)
}

fn insert_keyval(
    root: &mut Map<String, Value>,
    key: &str,
    value: String,
) -> Result<(), BlockError> {
    let frags: Vec<&str> = key.split('.').collect();
    let mut cur = root;
    for (i, f) in frags.iter().enumerate() {
        let path = frags.get(..=i).map(|p| p.join(".")).unwrap_or_default();
        if i + 1 == frags.len() {
            if matches!(cur.get(*f), Some(Value::Object(_))) {
                return Err(BlockError::InconsistentParameters(path));
            }
            cur.insert((*f).to_string(), Value::String(value));
            return Ok(());
        }
        let next = cur
            .entry((*f).to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match next {
            Value::Object(m) => m,
            _ => return Err(BlockError::InconsistentParameters(path)),
        };
    }
    Ok(())
}

/// `qapi_bool_parse`.
fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

/// Splits C's base prefixes off an unsigned number: (digits, radix).
fn radix_of(s: &str) -> (&str, u32) {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (s.get(1..).unwrap_or_default(), 8)
    } else {
        (s, 10)
    }
}

/// `qemu_strtoi64(s, NULL, 0)`: the whole string, C base prefixes, optional sign.
pub fn parse_c_i64(s: &str) -> Option<i64> {
    let (neg, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (digits, radix) = radix_of(body);
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    let mag = u64::from_str_radix(digits, radix).ok()?;
    if neg {
        if mag <= i64::MAX as u64 + 1 {
            Some((mag as i64).wrapping_neg())
        } else {
            None
        }
    } else {
        i64::try_from(mag).ok()
    }
}

/// `qemu_strtou64(s, NULL, 0)`.
pub fn parse_c_u64(s: &str) -> Option<u64> {
    let body = s.strip_prefix('+').unwrap_or(s);
    let (digits, radix) = radix_of(body);
    if digits.is_empty() || digits.starts_with(['+', '-']) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

fn convert_fields(
    m: &mut Map<String, Value>,
    groups: &[&[Field]],
    prefix: &str,
) -> Result<(), BlockError> {
    for (k, v) in m.iter_mut() {
        let Some(f) = groups.iter().flat_map(|g| g.iter()).find(|f| f.name == k) else {
            continue;
        };
        let name = full(prefix, k);
        let bad = |expected: &str| BlockError::InvalidParameterValue {
            name: name.clone(),
            expected: expected.to_string(),
        };
        match (f.ty, &mut *v) {
            (Ty::Bool, Value::String(s)) => {
                *v = Value::Bool(parse_bool(s).ok_or_else(|| bad("'on' or 'off'"))?)
            }
            (Ty::Int, Value::String(s)) => {
                *v = Value::from(parse_c_i64(s).ok_or_else(|| bad("integer"))?)
            }
            (Ty::UInt, Value::String(s)) => {
                *v = Value::from(parse_c_u64(s).ok_or_else(|| bad("uint64"))?)
            }
            (Ty::Struct(fields), Value::Object(inner)) => {
                convert_fields(inner, &[fields], &format!("{name}."))?
            }
            (Ty::Ref | Ty::RefOrNull, Value::Object(inner)) => {
                convert_options(inner, &format!("{name}."))?
            }
            // keyval spells `null` as an empty value (`backing=`).
            (Ty::RefOrNull, Value::String(s)) if s.is_empty() => *v = Value::Null,
            _ => {}
        }
    }
    Ok(())
}

fn convert_options(m: &mut Map<String, Value>, prefix: &str) -> Result<(), BlockError> {
    let driver = m.get("driver").and_then(Value::as_str).unwrap_or_default();
    let fields = driver_fields(driver);
    convert_fields(m, &[BASE, fields], prefix)
}

/// Turns a `-blockdev` argument into `blockdev-add` JSON: QEMU's keyval syntax
/// (`driver=raw,node-name=d0,file.driver=file,file.filename=/x`), with values converted per
/// schema for the options this crate knows, or the JSON form (`{"driver": ...}`) as it is.
pub fn parse_blockdev_keyval(arg: &str) -> Result<Value, BlockError> {
    if arg.trim_start().starts_with('{') {
        let v: Value =
            serde_json::from_str(arg).map_err(|e| BlockError::JsonParse(e.to_string()))?;
        if !v.is_object() {
            return Err(BlockError::JsonParse("expected an object".into()));
        }
        return Ok(v);
    }
    // `-blockdev`'s implied key is `driver`: `-blockdev file,filename=...`.
    let first = arg.split(',').next().unwrap_or_default();
    let mut m = if !first.is_empty() && !first.contains('=') {
        parse_keyval(&format!("driver={arg}"))?
    } else {
        parse_keyval(arg)?
    };
    convert_options(&mut m, "")?;
    Ok(Value::Object(m))
}

/// Which bus a `-drive` puts its disk on (`if=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveInterface {
    /// `if=none`: a named BlockBackend and no device.
    None,
    /// `if=virtio`: the machine's virtio-blk disk.
    Virtio,
}

/// A parsed `-drive` option: QEMU's legacy way to make a BlockBackend (`id`), the format node
/// over a protocol node under it, and (with `if=virtio`) a disk device.
#[derive(Debug, Clone, PartialEq)]
pub struct DriveSpec {
    /// `id=`: the BlockBackend's name, by which QMP commands find the disk (QEMU's default
    /// for a missing one is the interface and index, e.g. `virtio0`).
    pub id: String,
    /// `if=`.
    pub interface: DriveInterface,
    /// The format node as `blockdev-add` arguments, without a `node-name` unless the option
    /// gave one (the layer generates QEMU's `#blockNNN` then), and without `driver` when the
    /// option named no format (the layer probes it).
    pub options: Value,
    /// `backing.node-name=NAME` without a backing definition: the name of the node opened
    /// over the backing file the image names.
    pub backing_node_name: Option<String>,
}

/// Parses QEMU's `-drive` (`if=virtio,id=drive0,file=PATH,format=qcow2,cache=writeback,...`).
/// The drive's own options (`if`, `id`, `file`, `format`, `readonly`, `cache`, `aio`, `media`)
/// are taken out and turned into the node tree QEMU's `blockdev_init` builds; every other key
/// belongs to the format node (`node-name`, `backing.node-name`, `discard`, ...) and goes
/// through `blockdev-add`'s checks, so an option this layer does not know is refused with
/// QEMU's message. `index` counts the drives given before this one (for the default `id`).
pub fn parse_drive(arg: &str, index: usize) -> Result<DriveSpec, BlockError> {
    let mut m = parse_keyval(arg)?;
    fn take_from(m: &mut Map<String, Value>, k: &str) -> Result<Option<String>, BlockError> {
        match m.remove(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(BlockError::Unsupported(format!(
                "-drive: '{k}' takes a single value"
            ))),
        }
    }
    let interface = match take_from(&mut m, "if")?.as_deref() {
        Some("virtio") => DriveInterface::Virtio,
        Some("none") => DriveInterface::None,
        Some(other) => {
            return Err(BlockError::Unsupported(format!(
                "-drive if={other}: livemig's machines have no '{other}' bus (if=virtio or if=none)"
            )))
        }
        None => {
            return Err(BlockError::Unsupported(
                "-drive: if= is required here (if=virtio or if=none): livemig has no default \
                 disk bus"
                    .into(),
            ))
        }
    };
    let id = match take_from(&mut m, "id")? {
        Some(id) => {
            if !id_wellformed(&id) {
                return Err(BlockError::Unsupported(
                    "Parameter 'id' expects an identifier".to_string(),
                ));
            }
            id
        }
        None => match interface {
            DriveInterface::Virtio => format!("virtio{index}"),
            DriveInterface::None => format!("none{index}"),
        },
    };
    if let Some(media) = take_from(&mut m, "media")? {
        if media != "disk" {
            return Err(BlockError::Unsupported(format!(
                "-drive media={media}: only disks (media=disk) are supported"
            )));
        }
    }
    // As QEMU's `blockdev_init`: `format=` names the driver, `driver=` is the node's own
    // option (so it names the format driver too); not both.
    match take_from(&mut m, "format")? {
        Some(_) if m.contains_key("driver") => {
            return Err(BlockError::Unsupported(
                "Cannot specify both 'driver' and 'format'".into(),
            ))
        }
        Some(format) => {
            m.insert("driver".into(), Value::String(format));
        }
        // Neither: the block layer probes the image (`BlockLayer::drive_add`).
        None => {}
    }
    if let Some(ro) = take_from(&mut m, "readonly")? {
        m.insert("read-only".into(), Value::String(ro));
    }
    if let Some(cache) = take_from(&mut m, "cache")? {
        let (direct, no_flush) = match cache.as_str() {
            "writeback" => ("off", "off"),
            "unsafe" => ("off", "on"),
            "none" => ("on", "off"),
            "writethrough" | "directsync" => {
                return Err(BlockError::Unsupported(format!(
                    "-drive cache={cache}: a write-through guest cache is not supported by \
                     this block layer (cache=writeback, unsafe or none)"
                )))
            }
            _ => {
                return Err(BlockError::Unsupported(format!(
                    "invalid cache option '{cache}'"
                )))
            }
        };
        let mut c = Map::new();
        c.insert("direct".into(), Value::String(direct.into()));
        c.insert("no-flush".into(), Value::String(no_flush.into()));
        m.insert("cache".into(), Value::Object(c));
    }
    let aio = take_from(&mut m, "aio")?;
    // Backing options without a driver only adjust the backing file the image names.
    let backing_node_name = match m.get("backing") {
        Some(Value::Object(b)) if !b.contains_key("driver") => {
            let mut b = b.clone();
            let name = match b.remove("node-name") {
                Some(Value::String(n)) => n,
                _ => {
                    return Err(BlockError::Unsupported(
                        "-drive: of the backing file's options only backing.node-name is \
                         supported without backing.driver"
                            .into(),
                    ))
                }
            };
            if let Some(k) = b.keys().next() {
                return Err(BlockError::Unsupported(format!(
                    "-drive: backing.{k} is not supported without backing.driver"
                )));
            }
            m.remove("backing");
            Some(name)
        }
        _ => None,
    };
    let file = match m.remove("file") {
        Some(Value::String(path)) => {
            let mut f = Map::new();
            f.insert("driver".into(), Value::String("file".into()));
            f.insert("filename".into(), Value::String(path));
            Value::Object(f)
        }
        Some(Value::Object(f)) => Value::Object(f),
        Some(_) | None => {
            return Err(BlockError::Unsupported(
                "-drive: file= is required here (an empty drive has no image to open)".into(),
            ))
        }
    };
    let mut file = file;
    if let (Some(aio), Value::Object(f)) = (aio, &mut file) {
        f.insert("aio".into(), Value::String(aio));
    }
    m.insert("file".into(), file);
    convert_options(&mut m, "")?;
    Ok(DriveSpec {
        id,
        interface,
        options: Value::Object(m),
        backing_node_name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(v: Value) -> String {
        BlockdevOptions::from_json(&v).unwrap_err().to_string()
    }

    /// `-drive driver=qcow2` names the format as `format=qcow2` does (QEMU's iotest 181
    /// passes it so); both at once is QEMU's error.
    #[test]
    fn drive_driver_names_the_format() {
        let d = parse_drive("file=/tmp/x.qcow2,driver=qcow2,id=disk,if=none", 0).unwrap();
        assert_eq!(d.options["driver"], json!("qcow2"));
        assert_eq!(d.options["file"]["filename"], json!("/tmp/x.qcow2"));
        let e = parse_drive("file=/x,driver=qcow2,format=raw,if=none", 0).unwrap_err();
        assert_eq!(e.to_string(), "Cannot specify both 'driver' and 'format'");
        // Neither: no driver, for the layer to probe.
        let d = parse_drive("file=/x,if=none", 0).unwrap();
        assert_eq!(d.options.get("driver"), None);
    }

    #[test]
    fn qapi_messages() {
        assert_eq!(
            err(json!({"node-name": "q"})),
            "Parameter 'driver' is missing"
        );
        assert_eq!(
            err(json!({"driver": "nulx", "node-name": "q"})),
            "Parameter 'driver' does not accept value 'nulx'"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "node-name": "q", "size": "12"})),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "node-name": "q", "bogus": 1})),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err(json!({"driver": "raw", "node-name": "q2"})),
            "Parameter 'file' is missing"
        );
        assert_eq!(
            err(json!({"driver": "raw", "file": {"driver": "file"}})),
            "Parameter 'file.filename' is missing"
        );
        assert_eq!(
            err(json!({"driver": "raw", "file": {"driver": "null-co", "bogus": 1}})),
            "Parameter 'file.bogus' is unexpected"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "discard": "bogus"})),
            "Parameter 'discard' does not accept value 'bogus'"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "cache": {"x": true}})),
            "Parameter 'cache.x' is unexpected"
        );
    }

    #[test]
    fn builds_nested_options() {
        let o = BlockdevOptions::from_json(&json!({
            "driver": "raw", "node-name": "d0", "read-only": true, "offset": 512,
            "file": {"driver": "file", "filename": "/x"}
        }))
        .unwrap();
        assert_eq!(o.node_name.as_deref(), Some("d0"));
        assert_eq!(o.read_only, Some(true));
        match o.driver_options {
            DriverOptions::Raw {
                file: BlockdevRef::Definition(c),
                offset: Some(512),
                size: None,
                probed: false,
            } => {
                assert_eq!(
                    c.driver_options,
                    DriverOptions::File {
                        filename: "/x".into(),
                        locking: None,
                        aio: None
                    }
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keyval_to_json() {
        assert_eq!(
            parse_blockdev_keyval("driver=raw,node-name=d0,file.driver=file,file.filename=/a,,b")
                .unwrap(),
            json!({"driver": "raw", "node-name": "d0", "file": {"driver": "file", "filename": "/a,b"}})
        );
        assert_eq!(
            parse_blockdev_keyval(
                "driver=null-co,node-name=n,size=0x1000,read-zeroes=yes,read-only=off,"
            )
            .unwrap(),
            json!({"driver": "null-co", "node-name": "n", "size": 4096, "read-zeroes": true, "read-only": false})
        );
        assert_eq!(
            parse_blockdev_keyval("driver=null-co,node-name=n,size=010,size=2").unwrap()["size"],
            json!(2)
        );
        assert_eq!(
            parse_blockdev_keyval("driver=null-co,size=010").unwrap()["size"],
            json!(8)
        );
        assert_eq!(
            parse_blockdev_keyval("driver=null-co,node-name=n,,x").unwrap()["node-name"],
            json!("n,x")
        );
        assert_eq!(
            parse_blockdev_keyval("driver=raw,file=f1,discard=unmap,cache.no-flush=on").unwrap(),
            json!({"driver": "raw", "file": "f1", "discard": "unmap", "cache": {"no-flush": true}})
        );
        assert_eq!(
            parse_blockdev_keyval(r#"{"driver":"null-co","node-name":"n","size":"5"}"#).unwrap(),
            json!({"driver": "null-co", "node-name": "n", "size": "5"})
        );
    }

    #[test]
    fn keyval_errors_match_qemu() {
        let e = |s: &str| parse_blockdev_keyval(s).unwrap_err().to_string();
        assert_eq!(
            e("driver=null-co,node-name=n,size=1M"),
            "Parameter 'size' expects integer"
        );
        assert_eq!(
            e("driver=null-co,node-name=n,read-zeroes=1"),
            "Parameter 'read-zeroes' expects 'on' or 'off'"
        );
        assert_eq!(
            e("driver=null-co,node-name=n,size"),
            "Expected '=' after parameter 'size'"
        );
        assert_eq!(
            e("driver=null-co,node-name=n,fo%o=1"),
            "Invalid parameter 'fo%o'"
        );
        assert_eq!(
            e("driver=null-co,node-name=n,a..b=1"),
            "Invalid parameter 'a..b'"
        );
        assert_eq!(
            e("driver=null-co,node-name=n,.a=1"),
            "Invalid parameter '.a'"
        );
        assert_eq!(e("driver=null-co,node-name=n,=1"), "Invalid parameter ''");
        assert_eq!(
            e("driver=null-co,node-name=n,1a=1"),
            "Invalid parameter '1a'"
        );
        assert_eq!(
            e("driver=raw,node-name=n,file=x,file.driver=file"),
            "Parameters 'file.*' used inconsistently"
        );
        assert_eq!(
            e("driver=raw,node-name=n,file.driver=file,file=x"),
            "Parameters 'file.*' used inconsistently"
        );
        assert_eq!(
            e("driver=raw,node-name=n,file.driver=null-co,file.size=x"),
            "Parameter 'file.size' expects integer"
        );
        assert_eq!(
            e("driver=null-co,node-name=n,size="),
            "Parameter 'size' expects integer"
        );
        assert_eq!(
            e("driver=null-co,node-name=n,size=99999999999999999999"),
            "Parameter 'size' expects integer"
        );
        assert!(e(r#"{"driver":"null-co""#).starts_with("JSON parse error, "));
        // Errors the keyval step leaves to validation.
        let v = parse_blockdev_keyval("driver=raw,node-name=n,file.driver=null-co,file.bogus=1")
            .unwrap();
        assert_eq!(err(v), "Parameter 'file.bogus' is unexpected");
        let v = parse_blockdev_keyval("driver=null-co,node-name=n,a.0=1").unwrap();
        assert_eq!(err(v), "Parameter 'a' is unexpected");
        let v = parse_blockdev_keyval("node-name=n").unwrap();
        assert_eq!(err(v), "Parameter 'driver' is missing");
    }

    #[test]
    fn c_numbers() {
        assert_eq!(parse_c_i64("0x1000"), Some(4096));
        assert_eq!(parse_c_i64("010"), Some(8));
        assert_eq!(parse_c_i64("-5"), Some(-5));
        assert_eq!(parse_c_i64("0"), Some(0));
        assert_eq!(parse_c_i64("08"), None);
        assert_eq!(parse_c_i64(""), None);
        assert_eq!(parse_c_i64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_c_i64("9223372036854775808"), None);
        assert_eq!(parse_c_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_c_u64("-1"), None);
    }
}
