//! Device-state layouts as data (stream-format.md §6): field kinds, vmsd descriptions, the
//! vmdesc JSON QEMU appends to a stream (§1.6, §8), subsection headers with QEMU's peek rule
//! (§6.3), and a generic decoder that reads a body by description.
//!
//! A vmstate body has no tags, lengths or padding: both sides must know the layout. A
//! [`VmsdDesc`] is that knowledge written down, so the same description can produce the JSON
//! trailer, decode a body for the analyzer, and compute sizes.

use crate::error::{Result, WireErrorKind};
use crate::reader::StreamReader;
use crate::section::QEMU_VM_SUBSECTION;
use crate::writer::StreamWriter;
use serde_json::{Map, Value};
use std::io::{Read, Write};

/// The wire type of one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldKind {
    /// u8 0/1 (`bool`).
    Bool,
    /// `uint8`.
    U8,
    /// `int8`.
    I8,
    /// be16 `uint16`.
    U16,
    /// be16 `int16`.
    I16,
    /// be32 `uint32`.
    U32,
    /// be32 `int32`.
    I32,
    /// be64 `uint64`.
    U64,
    /// be64 `int64`.
    I64,
    /// Exactly n raw bytes (`buffer`).
    Buffer(usize),
    /// n bytes written as zeros and skipped on load (`unused_buffer`, `VMSTATE_UNUSED`).
    Unused(usize),
    /// be64 expiry in ns, -1 when not pending (`timer`).
    Timer,
    /// ceil(nbits/64) be64 words (`bitmap`).
    Bitmap(u64),
    /// A nested vmsd inline: its fields then its subsections, no header (`struct`).
    Struct(Box<VmsdDesc>),
    /// n elements back to back, no count on the wire.
    Array(Box<FieldKind>, usize),
}

impl FieldKind {
    /// The `type` string QEMU writes in the vmdesc JSON.
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldKind::Bool => "bool",
            FieldKind::U8 => "uint8",
            FieldKind::I8 => "int8",
            FieldKind::U16 => "uint16",
            FieldKind::I16 => "int16",
            FieldKind::U32 => "uint32",
            FieldKind::I32 => "int32",
            FieldKind::U64 => "uint64",
            FieldKind::I64 => "int64",
            FieldKind::Buffer(_) => "buffer",
            FieldKind::Unused(_) => "unused_buffer",
            FieldKind::Timer => "timer",
            FieldKind::Bitmap(_) => "bitmap",
            FieldKind::Struct(_) => "struct",
            FieldKind::Array(e, _) => e.type_name(),
        }
    }

    /// Bytes this field occupies on the wire (all elements for arrays).
    pub fn wire_size(&self) -> u64 {
        match self {
            FieldKind::Bool | FieldKind::U8 | FieldKind::I8 => 1,
            FieldKind::U16 | FieldKind::I16 => 2,
            FieldKind::U32 | FieldKind::I32 => 4,
            FieldKind::U64 | FieldKind::I64 | FieldKind::Timer => 8,
            FieldKind::Buffer(n) | FieldKind::Unused(n) => *n as u64,
            FieldKind::Bitmap(bits) => bits.div_ceil(64).saturating_mul(8),
            FieldKind::Struct(d) => d.encoded_size(),
            FieldKind::Array(e, n) => e.wire_size().saturating_mul(*n as u64),
        }
    }

    /// Innermost element kind and total element count (nested arrays are flattened, as QEMU
    /// flattens multi-dimensional arrays).
    fn flatten(&self) -> (&FieldKind, usize) {
        match self {
            FieldKind::Array(e, n) => {
                let (inner, m) = e.flatten();
                (inner, n.saturating_mul(m))
            }
            k => (k, 1),
        }
    }
}

/// One field of a vmsd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDesc {
    /// Field name (QEMU's `VMStateField.name`).
    pub name: String,
    /// Wire type.
    pub kind: FieldKind,
    /// The field exists in streams of this version and later (`VMSTATE_*_V`).
    pub version_id: u32,
}

/// A device-state layout (QEMU's `VMStateDescription`, as data).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmsdDesc {
    /// vmsd name, e.g. `timer`.
    pub name: String,
    /// Current version: what a writer sends.
    pub version_id: u32,
    /// Oldest version a reader accepts.
    pub minimum_version_id: u32,
    /// Fields in declaration order.
    pub fields: Vec<FieldDesc>,
    /// Subsections. For the JSON and for writers: the ones that are sent. For the decoder: the
    /// ones that are known.
    pub subsections: Vec<VmsdDesc>,
}

impl VmsdDesc {
    /// A vmsd with no fields; minimum version = `version_id`.
    pub fn new(name: impl Into<String>, version_id: u32) -> Self {
        VmsdDesc {
            name: name.into(),
            version_id,
            minimum_version_id: version_id,
            fields: Vec::new(),
            subsections: Vec::new(),
        }
    }

    /// Sets the minimum version.
    pub fn minimum(mut self, v: u32) -> Self {
        self.minimum_version_id = v;
        self
    }

    /// Adds a field present in every version.
    pub fn field(self, name: impl Into<String>, kind: FieldKind) -> Self {
        self.field_since(name, kind, 0)
    }

    /// Adds a field present from `version_id` on.
    pub fn field_since(
        mut self,
        name: impl Into<String>,
        kind: FieldKind,
        version_id: u32,
    ) -> Self {
        self.fields.push(FieldDesc {
            name: name.into(),
            kind,
            version_id,
        });
        self
    }

    /// Adds a subsection.
    pub fn subsection(mut self, sub: VmsdDesc) -> Self {
        self.subsections.push(sub);
        self
    }

    /// Bytes of a body written at the current version, subsections included.
    pub fn encoded_size(&self) -> u64 {
        let fields: u64 = self
            .fields
            .iter()
            .filter(|f| f.version_id <= self.version_id)
            .map(|f| f.kind.wire_size())
            .fold(0, u64::saturating_add);
        let subs: u64 = self
            .subsections
            .iter()
            .map(|s| (1 + 1 + s.name.len() as u64 + 4).saturating_add(s.encoded_size()))
            .fold(0, u64::saturating_add);
        fields.saturating_add(subs)
    }

    /// True when an array of this struct can be described by one JSON entry (QEMU's
    /// `vmsd_can_compress`): no subsections here or in nested structs.
    fn compressible(&self) -> bool {
        self.subsections.is_empty()
            && self.fields.iter().all(|f| match f.kind.flatten().0 {
                FieldKind::Struct(d) => d.compressible(),
                _ => true,
            })
    }

    /// The vmdesc JSON object QEMU writes for a body of this vmsd: `vmsd_name`, `version`,
    /// `fields` and, when any, `subsections`.
    pub fn to_vmdesc_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("vmsd_name".into(), Value::from(self.name.clone()));
        o.insert("version".into(), Value::from(self.version_id));
        let present: Vec<&FieldDesc> = self
            .fields
            .iter()
            .filter(|f| f.version_id <= self.version_id)
            .collect();
        let mut fields = Vec::new();
        for (idx, f) in present.iter().enumerate() {
            let same: Vec<usize> = present
                .iter()
                .enumerate()
                .filter(|(_, g)| g.name == f.name)
                .map(|(i, _)| i)
                .collect();
            let name = if same.len() > 1 {
                let num = same.iter().position(|&i| i == idx).unwrap_or(0);
                format!("{}[{}]", f.name, num)
            } else {
                f.name.clone()
            };
            let (elem, n) = f.kind.flatten();
            let compress = match elem {
                FieldKind::Struct(d) => d.compressible(),
                _ => true,
            };
            let count = if n > 1 && !compress { n } else { 1 };
            for i in 0..count {
                let mut e = Map::new();
                e.insert("name".into(), Value::from(name.clone()));
                if n > 1 {
                    if compress {
                        e.insert("array_len".into(), Value::from(n));
                    } else {
                        e.insert("index".into(), Value::from(i));
                    }
                }
                e.insert("type".into(), Value::from(elem.type_name()));
                if let FieldKind::Struct(d) = elem {
                    e.insert("struct".into(), d.to_vmdesc_json());
                }
                e.insert("size".into(), Value::from(elem.wire_size()));
                fields.push(Value::Object(e));
            }
        }
        o.insert("fields".into(), Value::Array(fields));
        if !self.subsections.is_empty() {
            o.insert(
                "subsections".into(),
                Value::Array(
                    self.subsections
                        .iter()
                        .map(|s| s.to_vmdesc_json())
                        .collect(),
                ),
            );
        }
        Value::Object(o)
    }

    /// Rebuilds a description from a vmdesc JSON object (as found in a stream's trailer), for
    /// decoding. Types this crate has no kind for become raw buffers of their recorded `size`.
    /// Returns `None` when the object is not a vmsd description.
    pub fn from_vmdesc_json(v: &Value) -> Option<VmsdDesc> {
        Self::from_json_depth(v, 0)
    }

    fn from_json_depth(v: &Value, depth: usize) -> Option<VmsdDesc> {
        if depth > 32 {
            return None;
        }
        let o = v.as_object()?;
        let name = o.get("vmsd_name")?.as_str()?.to_string();
        let version = u32::try_from(o.get("version")?.as_u64()?).ok()?;
        let mut d = VmsdDesc::new(name, version).minimum(0);
        for f in o.get("fields")?.as_array()? {
            let fo = f.as_object()?;
            let fname = fo.get("name")?.as_str()?.to_string();
            let ty = fo.get("type")?.as_str()?;
            let size = fo.get("size").and_then(Value::as_u64).unwrap_or(0);
            let size_us = usize::try_from(size).ok()?;
            let elem = match ty {
                "bool" => FieldKind::Bool,
                "uint8" => FieldKind::U8,
                "int8" => FieldKind::I8,
                "uint16" => FieldKind::U16,
                "int16" => FieldKind::I16,
                "uint32" => FieldKind::U32,
                "int32" => FieldKind::I32,
                "uint64" => FieldKind::U64,
                "int64" => FieldKind::I64,
                "timer" => FieldKind::Timer,
                "unused_buffer" => FieldKind::Unused(size_us),
                "bitmap" => FieldKind::Bitmap(size.saturating_mul(8)),
                "struct" => FieldKind::Struct(Box::new(Self::from_json_depth(
                    fo.get("struct")?,
                    depth + 1,
                )?)),
                _ => FieldKind::Buffer(size_us),
            };
            // A JSON entry whose recorded size disagrees with the scalar width describes some
            // other encoding: keep its bytes raw.
            let elem = match &elem {
                FieldKind::Struct(_)
                | FieldKind::Buffer(_)
                | FieldKind::Unused(_)
                | FieldKind::Bitmap(_) => elem,
                k if k.wire_size() != size => FieldKind::Buffer(size_us),
                _ => elem,
            };
            let kind = match fo.get("array_len").and_then(Value::as_u64) {
                Some(n) if n > 1 => FieldKind::Array(Box::new(elem), usize::try_from(n).ok()?),
                _ => elem,
            };
            d.fields.push(FieldDesc {
                name: fname,
                kind,
                version_id: 0,
            });
        }
        if let Some(subs) = o.get("subsections").and_then(Value::as_array) {
            for s in subs {
                d.subsections.push(Self::from_json_depth(s, depth + 1)?);
            }
        }
        Some(d)
    }
}

/// One FULL section in the vmdesc trailer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDesc {
    /// Section idstr.
    pub idstr: String,
    /// Section instance id.
    pub instance_id: u32,
    /// Layout of its body.
    pub vmsd: VmsdDesc,
}

/// Builds the vmdesc JSON trailer exactly as QEMU writes it: `{"page_size": N, "devices":
/// [...]}`, with a leading `"configuration"` object when given (QEMU 8.2+).
pub fn vmdesc_json(
    page_size: u64,
    devices: &[DeviceDesc],
    configuration: Option<&VmsdDesc>,
) -> String {
    let mut top = Map::new();
    if let Some(c) = configuration {
        top.insert("configuration".into(), c.to_vmdesc_json());
    }
    top.insert("page_size".into(), Value::from(page_size));
    let devs = devices
        .iter()
        .map(|d| {
            let mut o = Map::new();
            o.insert("name".into(), Value::from(d.idstr.clone()));
            o.insert("instance_id".into(), Value::from(d.instance_id));
            if let Value::Object(inner) = d.vmsd.to_vmdesc_json() {
                o.extend(inner);
            }
            Value::Object(o)
        })
        .collect();
    top.insert("devices".into(), Value::Array(devs));
    qemu_json(&Value::Object(top))
}

/// Serializes JSON the way QEMU's `JSONWriter` (non-pretty) does: `", "` and `": "`
/// separators, `/` unescaped, control and non-ASCII characters as upper-case `\uXXXX`.
pub fn qemu_json(v: &Value) -> String {
    let mut out = String::new();
    emit(v, &mut out);
    out
}

fn emit(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => quoted(s, out),
        Value::Array(a) => {
            out.push('[');
            for (i, e) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                emit(e, out);
            }
            out.push(']');
        }
        Value::Object(o) => {
            out.push('{');
            for (i, (k, e)) in o.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                quoted(k, out);
                out.push_str(": ");
                emit(e, out);
            }
            out.push('}');
        }
    }
}

fn quoted(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || (c as u32) >= 0x7f => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04X}", unit));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A subsection header that was found and consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsectionHeader {
    /// Subsection name, e.g. `timer/icount`.
    pub name: String,
    /// Its version.
    pub version_id: u32,
    /// Stream offset of its 0x05 byte.
    pub offset: u64,
}

/// Writes a subsection header: `0x05`, counted name, be32 version.
pub fn write_subsection_header<W: Write>(
    w: &mut StreamWriter<W>,
    name: &str,
    version_id: u32,
) -> Result<()> {
    w.put_u8(QEMU_VM_SUBSECTION)?;
    w.put_counted_string(name, "subsection name")?;
    w.put_be32(version_id)
}

/// Reads a subsection header unconditionally (the next byte must be 0x05).
pub fn read_subsection_header<R: Read>(r: &mut StreamReader<R>) -> Result<SubsectionHeader> {
    let offset = r.offset();
    let got = r.u8()?;
    if got != QEMU_VM_SUBSECTION {
        return Err(r.error_at(offset, WireErrorKind::NotASubsection { got }));
    }
    let name = r.counted_string("subsection name")?;
    let version_id = r.be32()?;
    Ok(SubsectionHeader {
        name,
        version_id,
        offset,
    })
}

/// QEMU's rule for "does a subsection of `parent` follow?" (`vmstate_subsection_load`): the
/// next byte must be 0x05 and the name (peeked, not consumed) must be at least
/// `parent.len() + 1` long and start with `parent`; otherwise nothing is consumed and `None`
/// is returned. A name that passes but is not `is_known` is the error "VM subsection '…' in
/// '…' does not exist". A known one is consumed with its version.
pub fn peek_subsection<R: Read>(
    r: &mut StreamReader<R>,
    parent: &str,
    is_known: impl Fn(&str) -> bool,
) -> Result<Option<SubsectionHeader>> {
    let offset = r.offset();
    let head = r.peek_bytes(2)?;
    if head.first() != Some(&QEMU_VM_SUBSECTION) {
        return Ok(None);
    }
    let len = usize::from(head.get(1).copied().unwrap_or(0));
    if len < parent.len() + 1 {
        return Ok(None);
    }
    let all = r.peek_bytes(2 + len)?;
    let Some(name_bytes) = all.get(2..2 + len) else {
        return Ok(None);
    };
    if !name_bytes.starts_with(parent.as_bytes()) {
        return Ok(None);
    }
    let name = String::from_utf8_lossy(name_bytes).into_owned();
    if !is_known(&name) {
        return Err(r.error_at(
            offset,
            WireErrorKind::UnknownSubsection {
                name,
                parent: parent.into(),
            },
        ));
    }
    r.skip(2 + len as u64)?;
    let version_id = r.be32()?;
    Ok(Some(SubsectionHeader {
        name,
        version_id,
        offset,
    }))
}

/// Most values [`decode_body`] produces for one body: bounds the work a hostile description
/// (huge arrays of zero-sized elements) can cause.
pub const MAX_DECODED_VALUES: usize = 1 << 20;

/// Reads a vmstate body laid out as `desc`, at stream version `version`, into (field name,
/// JSON value) pairs, followed by one pair per subsection found (value: object of its fields).
/// Buffers become lower-case hex strings, timers signed integers, structs objects, arrays
/// arrays.
pub fn decode_body<R: Read>(
    r: &mut StreamReader<R>,
    desc: &VmsdDesc,
    version: u32,
) -> Result<Vec<(String, Value)>> {
    let mut budget = MAX_DECODED_VALUES;
    decode_vmsd(r, desc, version, &mut budget, 0)
}

fn decode_vmsd<R: Read>(
    r: &mut StreamReader<R>,
    desc: &VmsdDesc,
    version: u32,
    budget: &mut usize,
    depth: usize,
) -> Result<Vec<(String, Value)>> {
    let at = r.offset();
    if version > desc.version_id {
        return Err(r.error_at(
            at,
            WireErrorKind::VersionTooNew {
                name: desc.name.clone(),
                version,
                local: desc.version_id,
            },
        ));
    }
    if version < desc.minimum_version_id {
        return Err(r.error_at(
            at,
            WireErrorKind::VersionTooOld {
                name: desc.name.clone(),
                version,
                minimum: desc.minimum_version_id,
            },
        ));
    }
    if depth > 64 {
        return Err(r.error_at(
            at,
            WireErrorKind::TooMany {
                what: "nested vmstate structs",
                limit: 64,
            },
        ));
    }
    let mut out = Vec::new();
    for f in desc.fields.iter().filter(|f| f.version_id <= version) {
        let v = decode_kind(r, &f.kind, budget, depth)?;
        out.push((f.name.clone(), v));
    }
    while let Some(sub) = peek_subsection(r, &desc.name, |n| {
        desc.subsections.iter().any(|s| s.name == n)
    })? {
        let Some(sd) = desc.subsections.iter().find(|s| s.name == sub.name) else {
            break;
        };
        let fields = decode_vmsd(r, sd, sub.version_id, budget, depth + 1)?;
        out.push((sub.name, Value::Object(fields.into_iter().collect())));
    }
    Ok(out)
}

fn spend<R: Read>(r: &StreamReader<R>, budget: &mut usize) -> Result<()> {
    if *budget == 0 {
        return Err(r.error(WireErrorKind::TooMany {
            what: "decoded vmstate values",
            limit: MAX_DECODED_VALUES as u64,
        }));
    }
    *budget -= 1;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn raw<R: Read>(r: &mut StreamReader<R>, n: usize) -> Result<Vec<u8>> {
    // Grow as bytes arrive, so a size taken from an untrusted description cannot make us
    // allocate more than the stream actually holds.
    let mut v = Vec::new();
    let mut left = n;
    let mut chunk = [0u8; 4096];
    while left > 0 {
        let k = left.min(chunk.len());
        let dst = chunk.get_mut(..k).unwrap_or(&mut []);
        r.read_into(dst)?;
        v.extend_from_slice(dst);
        left -= k;
    }
    Ok(v)
}

fn decode_kind<R: Read>(
    r: &mut StreamReader<R>,
    kind: &FieldKind,
    budget: &mut usize,
    depth: usize,
) -> Result<Value> {
    spend(r, budget)?;
    Ok(match kind {
        FieldKind::Bool => Value::Bool(r.u8()? != 0),
        FieldKind::U8 => Value::from(r.u8()?),
        FieldKind::I8 => Value::from(r.u8()? as i8),
        FieldKind::U16 => Value::from(r.be16()?),
        FieldKind::I16 => Value::from(r.be16()? as i16),
        FieldKind::U32 => Value::from(r.be32()?),
        FieldKind::I32 => Value::from(r.be32()? as i32),
        FieldKind::U64 => Value::from(r.be64()?),
        FieldKind::I64 | FieldKind::Timer => Value::from(r.be64()? as i64),
        FieldKind::Buffer(n) | FieldKind::Unused(n) => Value::from(hex(&raw(r, *n)?)),
        FieldKind::Bitmap(bits) => {
            let words = bits.div_ceil(64);
            let n = usize::try_from(words.saturating_mul(8)).unwrap_or(usize::MAX);
            Value::from(hex(&raw(r, n)?))
        }
        FieldKind::Struct(d) => Value::Object(
            decode_vmsd(r, d, d.version_id, budget, depth + 1)?
                .into_iter()
                .collect(),
        ),
        FieldKind::Array(e, n) => {
            let mut a = Vec::new();
            for _ in 0..*n {
                a.push(decode_kind(r, e, budget, depth)?);
            }
            Value::Array(a)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The verbatim 7.2 trailer of stream-format.md §8.
    pub(crate) const TRAILER_72: &str = r#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [{"name": "cpu_ticks_offset", "type": "int64", "size": 8}, {"name": "unused", "type": "unused_buffer", "size": 8}, {"name": "cpu_clock_offset", "type": "int64", "size": 8}]}, {"name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1, "fields": [{"name": "size", "type": "uint32", "size": 4}, {"name": "runstate", "type": "buffer", "size": 100}]}]}"#;

    fn timer() -> VmsdDesc {
        VmsdDesc::new("timer", 2)
            .minimum(1)
            .field("cpu_ticks_offset", FieldKind::I64)
            .field("unused", FieldKind::Unused(8))
            .field_since("cpu_clock_offset", FieldKind::I64, 2)
    }

    fn globalstate() -> VmsdDesc {
        VmsdDesc::new("globalstate", 1)
            .field("size", FieldKind::U32)
            .field("runstate", FieldKind::Buffer(100))
    }

    #[test]
    fn trailer_72_byte_for_byte() {
        let devices = [
            DeviceDesc {
                idstr: "timer".into(),
                instance_id: 0,
                vmsd: timer(),
            },
            DeviceDesc {
                idstr: "globalstate".into(),
                instance_id: 0,
                vmsd: globalstate(),
            },
        ];
        let json = vmdesc_json(4096, &devices, None);
        assert_eq!(json, TRAILER_72);
        assert_eq!(json.len(), 486);
    }

    #[test]
    fn json_round_trips_to_descriptions() {
        let v: Value = serde_json::from_str(TRAILER_72).unwrap();
        let d = VmsdDesc::from_vmdesc_json(&v["devices"][0]).unwrap();
        assert_eq!(d.fields.len(), 3);
        assert_eq!(d.fields[1].kind, FieldKind::Unused(8));
        assert_eq!(d.encoded_size(), 24);
        let expect = serde_json::json!({"vmsd_name": "timer", "version": 2, "fields": v["devices"][0]["fields"]});
        assert_eq!(qemu_json(&d.to_vmdesc_json()), qemu_json(&expect));
    }

    #[test]
    fn decode_timer_body_from_the_walkthrough() {
        // §8.2 offset 0x12e016.
        let body = [
            0, 0, 1, 0x47, 8, 0xf7, 0xa5, 0x7e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x8e, 0x30, 0x73,
            0xaa, 0x89,
        ];
        let mut r = StreamReader::new(&body[..]);
        let fields = decode_body(&mut r, &timer(), 2).unwrap();
        assert_eq!(
            fields[0],
            ("cpu_ticks_offset".into(), Value::from(0x14708F7A57Ei64))
        );
        assert_eq!(
            fields[1],
            ("unused".into(), Value::from("0000000000000000"))
        );
        assert_eq!(
            fields[2],
            ("cpu_clock_offset".into(), Value::from(0x8E3073AA89i64))
        );
        // Version 1 bodies are 16 bytes: cpu_clock_offset is skipped.
        let mut r = StreamReader::new(&body[..16]);
        assert_eq!(decode_body(&mut r, &timer(), 1).unwrap().len(), 2);
        let e = decode_body(&mut StreamReader::new(&body[..]), &timer(), 3).unwrap_err();
        assert!(e
            .to_string()
            .ends_with("timer: incoming version_id 3 is too new for local version_id 2"));
        let e = decode_body(&mut StreamReader::new(&body[..]), &timer(), 0).unwrap_err();
        assert!(e
            .to_string()
            .ends_with("timer: incoming version_id 0 is too old for local minimum version_id 1"));
    }

    #[test]
    fn subsection_peek_rule() {
        let known = |n: &str| n == "timer/icount";
        // Not 0x05: nothing.
        let mut r = StreamReader::new(&[0x7e, 0, 0, 0, 0][..]);
        assert_eq!(peek_subsection(&mut r, "timer", known).unwrap(), None);
        // Name too short for "timer/x": left unread.
        let mut r = StreamReader::new(&[5, 5, b't', b'i', b'm', b'e', b'r'][..]);
        assert_eq!(peek_subsection(&mut r, "timer", known).unwrap(), None);
        assert_eq!(r.offset(), 0);
        // Other parent: left unread.
        let mut b = vec![5, 10];
        b.extend(b"globalst/x");
        let mut r = StreamReader::new(&b[..]);
        assert_eq!(peek_subsection(&mut r, "timer", known).unwrap(), None);
        // Right prefix, unknown name: error.
        let mut b = vec![5, 9];
        b.extend(b"timer/foo");
        let e = peek_subsection(&mut StreamReader::new(&b[..]), "timer", known).unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x0: VM subsection 'timer/foo' in 'timer' does not exist"
        );
        // Known: consumed with its version.
        let mut w = StreamWriter::new(Vec::new());
        write_subsection_header(&mut w, "timer/icount", 1).unwrap();
        let b = w.into_inner().unwrap();
        assert_eq!(b[..2], [5, 12]);
        let mut r = StreamReader::new(&b[..]);
        let h = peek_subsection(&mut r, "timer", known).unwrap().unwrap();
        assert_eq!((h.name.as_str(), h.version_id), ("timer/icount", 1));
        assert_eq!(r.offset() as usize, b.len());
        let h = read_subsection_header(&mut StreamReader::new(&b[..])).unwrap();
        assert_eq!(h.name, "timer/icount");
    }

    #[test]
    fn arrays_structs_and_subsections_in_json() {
        let inner = VmsdDesc::new("elem", 1).field("a", FieldKind::U16);
        let with_sub = VmsdDesc::new("sub", 3)
            .field("b", FieldKind::U8)
            .subsection(VmsdDesc::new("sub/x", 1).field("c", FieldKind::U32));
        let d = VmsdDesc::new("dev", 1)
            .field("arr", FieldKind::Array(Box::new(FieldKind::U32), 4))
            .field(
                "s",
                FieldKind::Array(Box::new(FieldKind::Struct(Box::new(inner))), 2),
            )
            .field(
                "t",
                FieldKind::Array(Box::new(FieldKind::Struct(Box::new(with_sub))), 2),
            )
            .field("unused", FieldKind::Unused(2))
            .field("unused", FieldKind::Unused(3))
            .field("bm", FieldKind::Bitmap(65));
        let j = qemu_json(&d.to_vmdesc_json());
        assert_eq!(
            j,
            concat!(
                r#"{"vmsd_name": "dev", "version": 1, "fields": ["#,
                r#"{"name": "arr", "array_len": 4, "type": "uint32", "size": 4}, "#,
                r#"{"name": "s", "array_len": 2, "type": "struct", "struct": {"vmsd_name": "elem", "version": 1, "fields": [{"name": "a", "type": "uint16", "size": 2}]}, "size": 2}, "#,
                r#"{"name": "t", "index": 0, "type": "struct", "struct": {"vmsd_name": "sub", "version": 3, "fields": [{"name": "b", "type": "uint8", "size": 1}], "subsections": [{"vmsd_name": "sub/x", "version": 1, "fields": [{"name": "c", "type": "uint32", "size": 4}]}]}, "size": 16}, "#,
                r#"{"name": "t", "index": 1, "type": "struct", "struct": {"vmsd_name": "sub", "version": 3, "fields": [{"name": "b", "type": "uint8", "size": 1}], "subsections": [{"vmsd_name": "sub/x", "version": 1, "fields": [{"name": "c", "type": "uint32", "size": 4}]}]}, "size": 16}, "#,
                r#"{"name": "unused[0]", "type": "unused_buffer", "size": 2}, "#,
                r#"{"name": "unused[1]", "type": "unused_buffer", "size": 3}, "#,
                r#"{"name": "bm", "type": "bitmap", "size": 16}]}"#
            )
        );
        assert_eq!(
            qemu_json(&Value::from("a/b\u{1}é\"")),
            r#""a/b\u0001\u00E9\"""#
        );
    }

    #[test]
    fn decode_nested_with_subsection() {
        let d = VmsdDesc::new("dev", 1)
            .field("x", FieldKind::U8)
            .subsection(VmsdDesc::new("dev/extra", 1).field("y", FieldKind::U16));
        let mut b = vec![7];
        b.extend([5, 9]);
        b.extend(b"dev/extra");
        b.extend([0, 0, 0, 1, 0x12, 0x34]);
        let mut r = StreamReader::new(&b[..]);
        let f = decode_body(&mut r, &d, 1).unwrap();
        assert_eq!(f[0], ("x".into(), Value::from(7)));
        assert_eq!(f[1], ("dev/extra".into(), serde_json::json!({"y": 0x1234})));
        assert_eq!(r.offset() as usize, b.len());
    }

    #[test]
    fn hostile_description_is_bounded() {
        let d = VmsdDesc::new("x", 1).field(
            "a",
            FieldKind::Array(Box::new(FieldKind::Buffer(0)), usize::MAX),
        );
        let e = decode_body(&mut StreamReader::new(&[][..]), &d, 1).unwrap_err();
        assert!(
            e.to_string().contains("too many decoded vmstate values"),
            "{e}"
        );
        let d = VmsdDesc::new("x", 1).field("a", FieldKind::Buffer(usize::MAX));
        assert!(decode_body(&mut StreamReader::new(&[1, 2][..]), &d, 1)
            .unwrap_err()
            .is_truncated());
    }
}
