//! QAPI argument checking, once for every command of the program: [`Args`] (a command's
//! arguments, taken member by member), [`Param`] (one member or list element), the integer
//! types QAPI knows ([`QapiInt`]), QAPI enums ([`QapiEnum`]), alternates of a string and an
//! object ([`StrOrObject`]), and QEMU's `id_wellformed`. Every message is QEMU 7.2's.
//!
//! # Validating arguments
//!
//! QMP promises that a wrong type or an unknown key is reported *before* the command has any
//! side effect. A handler therefore takes everything it needs out of its [`Args`] first, calls
//! [`Args::finish`] (which rejects whatever is left), and only then acts:
//!
//! ```
//! use qmp::{Args, QmpError};
//! use serde_json::{json, Value};
//!
//! fn migrate_set_downtime(mut args: Args) -> Result<Value, QmpError> {
//!     let limit: u64 = args.req_int("downtime-limit")?;
//!     let verbose = args.opt_bool("verbose")?.unwrap_or(false);
//!     args.finish()?;
//!     // ... side effects only from here on ...
//!     let _ = (limit, verbose);
//!     Ok(json!({}))
//! }
//!
//! let args = Args::new(json!({"downtime-limit": 300, "bogus": 1}).as_object().unwrap().clone());
//! let err = migrate_set_downtime(args).unwrap_err();
//! assert_eq!(err.desc, "Parameter 'bogus' is unexpected");
//! ```
//!
//! Names in messages follow QEMU's input visitor: nested members are `outer.inner`, list
//! elements `list[0]`, so `Parameter 'block-bitmap-mapping[0].alias' is missing`. Like QEMU, the
//! range and enum messages name only the member itself (`null` for a list element).

use crate::error::QmpError;
use serde_json::{Map, Value};

/// An integer type QAPI knows, with the name QEMU uses in range errors (`uint32_t`, ...).
pub trait QapiInt: Sized + Copy {
    /// The C type name used in `Parameter 'x' expects <name>`.
    const C_NAME: &'static str;
    /// Converts a JSON value, or says why not: `Err(false)` for something that is not an
    /// integer at all, `Err(true)` for an integer out of range.
    #[doc(hidden)]
    fn from_json(v: &Value) -> Result<Self, bool>;
    /// Whether the type is unsigned (its type errors read `expects uint64`).
    #[doc(hidden)]
    const UNSIGNED: bool;
}

macro_rules! qapi_signed {
    ($($t:ty => $n:literal),*) => {$(
        impl QapiInt for $t {
            const C_NAME: &'static str = $n;
            const UNSIGNED: bool = false;
            fn from_json(v: &Value) -> Result<Self, bool> {
                let wide = v.as_i64().ok_or(false)?;
                <$t>::try_from(wide).map_err(|_| true)
            }
        }
    )*};
}

macro_rules! qapi_unsigned {
    ($($t:ty => $n:literal),*) => {$(
        impl QapiInt for $t {
            const C_NAME: &'static str = $n;
            const UNSIGNED: bool = true;
            fn from_json(v: &Value) -> Result<Self, bool> {
                if let Some(wide) = v.as_u64() {
                    return <$t>::try_from(wide).map_err(|_| true);
                }
                // A negative integer is out of range; anything else is not an integer.
                match v.as_i64() {
                    Some(_) => Err(true),
                    None => Err(false),
                }
            }
        }
    )*};
}

qapi_signed!(i8 => "int8_t", i16 => "int16_t", i32 => "int32_t", i64 => "int64_t");
qapi_unsigned!(u8 => "uint8_t", u16 => "uint16_t", u32 => "uint32_t", u64 => "uint64");

/// One argument (or list element), with the names QEMU would use for it in error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    value: Value,
    /// Full path, e.g. `capabilities[0].state`.
    path: String,
    /// The member's own name; `None` for a list element (QEMU then says `null`).
    member: Option<String>,
}

impl Param {
    /// A parameter named `name` at top level.
    pub fn new(name: &str, value: Value) -> Param {
        Param {
            value,
            path: name.to_string(),
            member: Some(name.to_string()),
        }
    }

    /// The full name used in messages (`a.b`, `list[3]`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw value.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The raw value, unchecked (QAPI's `any`).
    pub fn into_value(self) -> Value {
        self.value
    }

    fn member_name(&self) -> &str {
        self.member.as_deref().unwrap_or("null")
    }

    /// A string, or `Invalid parameter type for 'x', expected: string`.
    pub fn into_str(self) -> Result<String, QmpError> {
        match self.value {
            Value::String(s) => Ok(s),
            _ => Err(QmpError::invalid_parameter_type(&self.path, "string")),
        }
    }

    /// A boolean, or `... expected: boolean`.
    pub fn into_bool(self) -> Result<bool, QmpError> {
        self.value
            .as_bool()
            .ok_or_else(|| QmpError::invalid_parameter_type(&self.path, "boolean"))
    }

    /// An integer of type `T`, with QEMU's messages: `Invalid parameter type for 'x', expected:
    /// integer` for a non-integer where a signed type is wanted, `Parameter 'x' expects uint64`
    /// for a non-integer where an unsigned type is wanted, and `Parameter 'x' expects int32_t`
    /// (or `uint8_t`, ...) for an integer out of range.
    ///
    /// Unlike QEMU, which quietly wraps a negative number into a `uint64`, a negative value for
    /// `u64` is refused with `Parameter 'x' expects uint64`.
    pub fn into_int<T: QapiInt>(self) -> Result<T, QmpError> {
        match T::from_json(&self.value) {
            Ok(v) => Ok(v),
            Err(true) => Err(QmpError::invalid_parameter_value(
                if T::C_NAME == "uint64" || T::C_NAME == "int64_t" {
                    &self.path
                } else {
                    self.member_name()
                },
                T::C_NAME,
            )),
            Err(false) if T::UNSIGNED => {
                Err(QmpError::invalid_parameter_value(&self.path, "uint64"))
            }
            Err(false) => Err(QmpError::invalid_parameter_type(&self.path, "integer")),
        }
    }

    /// A number (integers included), or `... expected: number`.
    pub fn into_number(self) -> Result<f64, QmpError> {
        self.value
            .as_f64()
            .ok_or_else(|| QmpError::invalid_parameter_type(&self.path, "number"))
    }

    /// One of `allowed`, or `Parameter 'x' does not accept value 'y'`.
    pub fn into_enum(self, allowed: &[&str]) -> Result<String, QmpError> {
        let member = self.member_name().to_string();
        let s = self.into_str()?;
        if allowed.contains(&s.as_str()) {
            Ok(s)
        } else {
            Err(QmpError::invalid_enum_value(&member, &s))
        }
    }

    /// A value of the QAPI enum `T`, or `Parameter 'x' does not accept value 'y'` (QEMU names
    /// the member only, `null` for a list element).
    pub fn into_qapi_enum<T: QapiEnum>(self) -> Result<T, QmpError> {
        let member = self.member_name().to_string();
        let s = self.into_str()?;
        T::from_name(&s).ok_or_else(|| QmpError::invalid_enum_value(&member, &s))
    }

    /// A string or an object (a QAPI alternate called `type_name`, e.g. `BlockdevRef`); anything
    /// else is `Invalid parameter type for 'x', expected: <type_name>`, naming the member only,
    /// as QEMU's alternate visitor does.
    pub fn into_str_or_object(self, type_name: &str) -> Result<StrOrObject, QmpError> {
        match self.value {
            Value::String(s) => Ok(StrOrObject::Str(s)),
            Value::Object(_) => self.into_object().map(StrOrObject::Object),
            _ => Err(QmpError::invalid_parameter_type(
                self.member_name(),
                type_name,
            )),
        }
    }

    /// QAPI's `StrOrNull`: a string, or `null` (`None`); anything else is `Invalid parameter type
    /// for 'x', expected: StrOrNull`.
    pub fn into_str_or_null(self) -> Result<Option<String>, QmpError> {
        match self.value {
            Value::String(s) => Ok(Some(s)),
            Value::Null => Ok(None),
            _ => Err(QmpError::invalid_parameter_type(
                self.member_name(),
                "StrOrNull",
            )),
        }
    }

    /// An object, as [`Args`] whose messages name its members `x.member`; or `... expected:
    /// object`.
    pub fn into_object(self) -> Result<Args, QmpError> {
        match self.value {
            Value::Object(map) => Ok(Args {
                map,
                prefix: format!("{}.", self.path),
            }),
            _ => Err(QmpError::invalid_parameter_type(&self.path, "object")),
        }
    }

    /// An array, as one [`Param`] per element named `x[i]`; or `... expected: array`.
    pub fn into_list(self) -> Result<Vec<Param>, QmpError> {
        match self.value {
            Value::Array(items) => Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, value)| Param {
                    value,
                    path: format!("{}[{i}]", self.path),
                    member: None,
                })
                .collect()),
            _ => Err(QmpError::invalid_parameter_type(&self.path, "array")),
        }
    }
}

/// A value of a QAPI alternate of a string and an object (`BlockdevRef`,
/// `BlockDirtyBitmapOrStr`): a name, or a definition whose members are checked as [`Args`].
#[derive(Debug, Clone, PartialEq)]
pub enum StrOrObject {
    /// The string branch.
    Str(String),
    /// The object branch.
    Object(Args),
}

/// A QAPI enum: a Rust type whose values have QEMU's names, so that arguments can be read as
/// the type itself ([`Param::into_qapi_enum`]), with QEMU's message for a name the enum does
/// not have.
pub trait QapiEnum: Sized + Copy + 'static {
    /// Every value, in the schema's order.
    const ALL: &'static [Self];

    /// The value's name on the wire.
    fn name(self) -> &'static str;

    /// The value called `name`, if there is one.
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name)
    }
}

/// QEMU's `id_wellformed` (`util/id.c`): an ASCII letter, then letters, digits, `-`, `.` or
/// `_`. The rule for node names, job ids, export ids and `block-bitmap-mapping` aliases.
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// A command's arguments, taken out one by one with type checks; see the
/// [module documentation](self).
///
/// Every getter removes the member it reads, so that [`Args::finish`] can report the first
/// member nobody asked for. A member present with value `null` is not "absent": it fails the
/// type check, as in QEMU.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Args {
    map: Map<String, Value>,
    /// Prepended to member names in messages (`outer.` or `list[0].`).
    prefix: String,
}

impl Args {
    /// Top-level arguments.
    pub fn new(map: Map<String, Value>) -> Args {
        Args {
            map,
            prefix: String::new(),
        }
    }

    /// Whether no members are left.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The members not taken yet.
    pub fn into_map(self) -> Map<String, Value> {
        self.map
    }

    /// Takes member `name` if present.
    pub fn take(&mut self, name: &str) -> Option<Param> {
        let value = self.map.shift_remove(name)?;
        Some(Param {
            value,
            path: format!("{}{name}", self.prefix),
            member: Some(name.to_string()),
        })
    }

    /// Takes member `name`, or fails with `Parameter 'x' is missing`.
    pub fn required(&mut self, name: &str) -> Result<Param, QmpError> {
        let path = format!("{}{name}", self.prefix);
        self.take(name)
            .ok_or_else(|| QmpError::missing_parameter(&path))
    }

    /// A required string.
    pub fn req_str(&mut self, name: &str) -> Result<String, QmpError> {
        self.required(name)?.into_str()
    }

    /// An optional string.
    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        self.take(name).map(Param::into_str).transpose()
    }

    /// A required boolean.
    pub fn req_bool(&mut self, name: &str) -> Result<bool, QmpError> {
        self.required(name)?.into_bool()
    }

    /// An optional boolean.
    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        self.take(name).map(Param::into_bool).transpose()
    }

    /// A required integer of type `T` (see [`Param::into_int`] for the messages).
    pub fn req_int<T: QapiInt>(&mut self, name: &str) -> Result<T, QmpError> {
        self.required(name)?.into_int()
    }

    /// An optional integer of type `T`.
    pub fn opt_int<T: QapiInt>(&mut self, name: &str) -> Result<Option<T>, QmpError> {
        self.take(name).map(Param::into_int).transpose()
    }

    /// A required number (integers accepted).
    pub fn req_number(&mut self, name: &str) -> Result<f64, QmpError> {
        self.required(name)?.into_number()
    }

    /// An optional number.
    pub fn opt_number(&mut self, name: &str) -> Result<Option<f64>, QmpError> {
        self.take(name).map(Param::into_number).transpose()
    }

    /// A required enum member, one of `allowed`.
    pub fn req_enum(&mut self, name: &str, allowed: &[&str]) -> Result<String, QmpError> {
        self.required(name)?.into_enum(allowed)
    }

    /// An optional enum member.
    pub fn opt_enum(&mut self, name: &str, allowed: &[&str]) -> Result<Option<String>, QmpError> {
        self.take(name).map(|p| p.into_enum(allowed)).transpose()
    }

    /// A required member of the QAPI enum `T`.
    pub fn req_qapi_enum<T: QapiEnum>(&mut self, name: &str) -> Result<T, QmpError> {
        self.required(name)?.into_qapi_enum()
    }

    /// An optional member of the QAPI enum `T`.
    pub fn opt_qapi_enum<T: QapiEnum>(&mut self, name: &str) -> Result<Option<T>, QmpError> {
        self.take(name).map(Param::into_qapi_enum).transpose()
    }

    /// A required object, as nested [`Args`] (finish it too).
    pub fn req_object(&mut self, name: &str) -> Result<Args, QmpError> {
        self.required(name)?.into_object()
    }

    /// An optional object.
    pub fn opt_object(&mut self, name: &str) -> Result<Option<Args>, QmpError> {
        self.take(name).map(Param::into_object).transpose()
    }

    /// A required array, one [`Param`] per element.
    pub fn req_list(&mut self, name: &str) -> Result<Vec<Param>, QmpError> {
        self.required(name)?.into_list()
    }

    /// An optional array.
    pub fn opt_list(&mut self, name: &str) -> Result<Option<Vec<Param>>, QmpError> {
        self.take(name).map(Param::into_list).transpose()
    }

    /// A required value of any type.
    pub fn req_any(&mut self, name: &str) -> Result<Value, QmpError> {
        Ok(self.required(name)?.into_value())
    }

    /// An optional value of any type.
    pub fn opt_any(&mut self, name: &str) -> Option<Value> {
        self.take(name).map(Param::into_value)
    }

    /// Succeeds if every member was taken; otherwise `Parameter 'x' is unexpected` for the
    /// first one left (in the order the client sent them).
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(QmpError::unexpected_parameter(&format!(
                "{}{k}",
                self.prefix
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Args::new(m),
            _ => Args::default(),
        }
    }

    #[test]
    fn messages_match_qemu() {
        let mut a = args(json!({
            "s": 1, "b": "yes", "i": 1.0, "u": "x", "u8": 300, "neg8": -3, "i64": 9223372036854775808u64,
            "n": "1", "o": [], "l": {}, "e": "bogus", "u64": -1
        }));
        let d = |r: Result<(), QmpError>| r.unwrap_err().desc;
        assert_eq!(
            d(a.req_str("s").map(drop)),
            "Invalid parameter type for 's', expected: string"
        );
        assert_eq!(
            d(a.req_bool("b").map(drop)),
            "Invalid parameter type for 'b', expected: boolean"
        );
        assert_eq!(
            d(a.req_int::<i64>("i").map(drop)),
            "Invalid parameter type for 'i', expected: integer"
        );
        assert_eq!(
            d(a.req_int::<u8>("u").map(drop)),
            "Parameter 'u' expects uint64"
        );
        assert_eq!(
            d(a.req_int::<u8>("u8").map(drop)),
            "Parameter 'u8' expects uint8_t"
        );
        assert_eq!(
            d(a.req_int::<u8>("neg8").map(drop)),
            "Parameter 'neg8' expects uint8_t"
        );
        assert_eq!(
            d(a.req_int::<i64>("i64").map(drop)),
            "Invalid parameter type for 'i64', expected: integer"
        );
        assert_eq!(
            d(a.req_number("n").map(drop)),
            "Invalid parameter type for 'n', expected: number"
        );
        assert_eq!(
            d(a.req_object("o").map(drop)),
            "Invalid parameter type for 'o', expected: object"
        );
        assert_eq!(
            d(a.req_list("l").map(drop)),
            "Invalid parameter type for 'l', expected: array"
        );
        assert_eq!(
            d(a.req_enum("e", &["on"]).map(drop)),
            "Parameter 'e' does not accept value 'bogus'"
        );
        assert_eq!(
            d(a.req_int::<u64>("u64").map(drop)),
            "Parameter 'u64' expects uint64"
        );
        assert_eq!(
            d(a.req_str("gone").map(drop)),
            "Parameter 'gone' is missing"
        );
        assert!(a.is_empty());
    }

    #[test]
    fn nested_names_follow_the_input_visitor() {
        let mut a = args(
            json!({"map": [{"node-name": "a", "bitmaps": [{"name": "x", "zz": 1}]}], "caps": ["x"], "n": [300]}),
        );
        let mut items = a.req_list("map").unwrap();
        let mut first = items.remove(0).into_object().unwrap();
        assert_eq!(first.req_str("node-name").unwrap(), "a");
        assert_eq!(
            first.req_str("alias").unwrap_err().desc,
            "Parameter 'map[0].alias' is missing"
        );
        let mut bitmaps = first.req_list("bitmaps").unwrap();
        let mut bm = bitmaps.remove(0).into_object().unwrap();
        bm.req_str("name").unwrap();
        assert_eq!(
            bm.finish().unwrap_err().desc,
            "Parameter 'map[0].bitmaps[0].zz' is unexpected"
        );
        let caps = a.req_list("caps").unwrap();
        assert_eq!(
            caps.into_iter()
                .next()
                .unwrap()
                .into_enum(&["oob"])
                .unwrap_err()
                .desc,
            "Parameter 'null' does not accept value 'x'"
        );
        let n = a.req_list("n").unwrap();
        assert_eq!(
            n.into_iter()
                .next()
                .unwrap()
                .into_int::<u8>()
                .unwrap_err()
                .desc,
            "Parameter 'null' expects uint8_t"
        );
        a.finish().unwrap();
    }

    #[test]
    fn good_values_come_through() {
        let mut a = args(
            json!({"s": "x", "b": true, "i": -5, "u": 18446744073709551615u64, "f": 2, "e": "on", "any": null}),
        );
        assert_eq!(a.req_str("s").unwrap(), "x");
        assert_eq!(a.opt_bool("b").unwrap(), Some(true));
        assert_eq!(a.req_int::<i8>("i").unwrap(), -5);
        assert_eq!(a.req_int::<u64>("u").unwrap(), u64::MAX);
        assert_eq!(a.req_number("f").unwrap(), 2.0);
        assert_eq!(
            a.opt_enum("e", &["on", "off"]).unwrap().as_deref(),
            Some("on")
        );
        assert_eq!(a.opt_any("any"), Some(Value::Null));
        assert_eq!(a.opt_str("absent").unwrap(), None);
        a.finish().unwrap();
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Speed {
        Slow,
        Fast,
    }

    impl QapiEnum for Speed {
        const ALL: &'static [Speed] = &[Speed::Slow, Speed::Fast];
        fn name(self) -> &'static str {
            match self {
                Speed::Slow => "slow",
                Speed::Fast => "fast",
            }
        }
    }

    #[test]
    fn enums_alternates_and_ids() {
        let mut a = args(json!({
            "s": "fast", "bad": "warp", "l": ["slow", "x"],
            "ref": "node0", "def": {"driver": "raw"}, "num": 3, "refs": [1],
            "creds": null, "host": "h", "authz": 3
        }));
        assert_eq!(a.req_qapi_enum::<Speed>("s").unwrap(), Speed::Fast);
        assert_eq!(
            a.opt_qapi_enum::<Speed>("bad").unwrap_err().desc,
            "Parameter 'bad' does not accept value 'warp'"
        );
        let mut l = a.req_list("l").unwrap().into_iter();
        assert_eq!(
            l.next().unwrap().into_qapi_enum::<Speed>().unwrap(),
            Speed::Slow
        );
        assert_eq!(
            l.next()
                .unwrap()
                .into_qapi_enum::<Speed>()
                .unwrap_err()
                .desc,
            "Parameter 'null' does not accept value 'x'"
        );
        assert_eq!(
            a.required("ref")
                .unwrap()
                .into_str_or_object("BlockdevRef")
                .unwrap(),
            StrOrObject::Str("node0".into())
        );
        match a
            .required("def")
            .unwrap()
            .into_str_or_object("BlockdevRef")
            .unwrap()
        {
            StrOrObject::Object(mut o) => {
                assert_eq!(o.req_str("driver").unwrap(), "raw");
                assert_eq!(
                    o.req_str("file").unwrap_err().desc,
                    "Parameter 'def.file' is missing"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            a.required("num")
                .unwrap()
                .into_str_or_object("BlockdevRef")
                .unwrap_err()
                .desc,
            "Invalid parameter type for 'num', expected: BlockdevRef"
        );
        let refs = a.req_list("refs").unwrap();
        assert_eq!(
            refs.into_iter()
                .next()
                .unwrap()
                .into_str_or_object("BlockDirtyBitmapOrStr")
                .unwrap_err()
                .desc,
            "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"
        );
        assert_eq!(
            a.required("creds").unwrap().into_str_or_null().unwrap(),
            None
        );
        assert_eq!(
            a.required("host")
                .unwrap()
                .into_str_or_null()
                .unwrap()
                .as_deref(),
            Some("h")
        );
        assert_eq!(
            a.required("authz")
                .unwrap()
                .into_str_or_null()
                .unwrap_err()
                .desc,
            "Invalid parameter type for 'authz', expected: StrOrNull"
        );
        a.finish().unwrap();

        for ok in ["a", "node0", "a.b-c_d", "abcdefghijabcdefghijabcdefghij1"] {
            assert!(id_wellformed(ok), "{ok}");
        }
        for bad in ["", "1abc", "a b", "a,b", "#block1", "_x", "é"] {
            assert!(!id_wellformed(bad), "{bad}");
        }
    }
}
