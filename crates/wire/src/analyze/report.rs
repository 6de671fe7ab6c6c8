//! Reporting: an analysis as text (runs of items, details, the summary) and as JSON.

use super::decode::RamTally;
use super::*;

impl ItemRun {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        offset: u64,
        bytes: u64,
        kind: &'static str,
        section_id: Option<u32>,
        name: String,
        instance_version: Option<(u32, u32)>,
        detail: String,
        depth: usize,
    ) -> Self {
        ItemRun {
            offset,
            bytes,
            count: 1,
            kind,
            section_id,
            name,
            instance_version,
            detail,
            depth,
        }
    }

    pub(super) fn same_as(&self, o: &ItemRun) -> bool {
        self.kind == o.kind
            && self.section_id == o.section_id
            && self.name == o.name
            && self.instance_version == o.instance_version
            && self.detail == o.detail
            && self.depth == o.depth
            && self.kind != "EOF"
    }

    pub(super) fn to_json(&self) -> Value {
        let mut o = Map::new();
        o.insert("offset".into(), json!(self.offset));
        o.insert("bytes".into(), json!(self.bytes));
        o.insert("count".into(), json!(self.count));
        o.insert("kind".into(), json!(self.kind));
        if let Some(id) = self.section_id {
            o.insert("section_id".into(), json!(id));
        }
        if !self.name.is_empty() {
            o.insert("name".into(), json!(self.name));
        }
        if let Some((i, v)) = self.instance_version {
            o.insert("instance_id".into(), json!(i));
            o.insert("version_id".into(), json!(v));
        }
        if !self.detail.is_empty() {
            o.insert("detail".into(), json!(self.detail));
        }
        if self.depth > 0 {
            o.insert("depth".into(), json!(self.depth));
        }
        Value::Object(o)
    }
}

pub(super) fn command_detail(c: &Command) -> String {
    match c {
        Command::Ping(v) => format!("{v:#x}"),
        Command::PostcopyAdvise(None) => "len 0".into(),
        Command::PostcopyAdvise(Some(a)) => {
            format!(
                "pagesize summary {:#x}, target page size {:#x}",
                a.ram_pagesize_summary, a.target_page_size
            )
        }
        Command::PostcopyRamDiscard { ramblock, ranges } => {
            format!("{ramblock}: {} range(s)", ranges.len())
        }
        Command::Packaged(d) => format!("{} bytes", d.len()),
        Command::RecvBitmap { ramblock } => ramblock.clone(),
        _ => String::new(),
    }
}

pub(super) fn ram_detail(t: &RamTally) -> String {
    let mut parts = Vec::new();
    if let Some((total, n)) = t.mem_size {
        parts.push(format!(
            "MEM_SIZE {total:#x} ({n} block{})",
            if n == 1 { "" } else { "s" }
        ));
    }
    for (n, one, many) in [
        (t.normal, "normal page", "normal pages"),
        (t.zero, "zero page", "zero pages"),
        (t.xbzrle, "XBZRLE page", "XBZRLE pages"),
        (t.compressed, "compressed page", "compressed pages"),
        (t.flush, "MULTIFD_FLUSH", "MULTIFD_FLUSH"),
        (t.hook, "HOOK", "HOOK"),
    ] {
        if n > 0 {
            parts.push(plural(n, one, many));
        }
    }
    if parts.is_empty() {
        "empty".into()
    } else {
        parts.join(", ")
    }
}

pub(super) fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) if s.len() > 64 => {
            let bytes: Vec<u8> = (0..s.len() / 2)
                .filter_map(|i| {
                    s.get(2 * i..2 * i + 2)
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                })
                .collect();
            let text_len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            let (text, rest) = bytes.split_at(text_len);
            if !text.is_empty()
                && text.iter().all(|b| b.is_ascii_graphic() || *b == b' ')
                && rest.iter().all(|&b| b == 0)
            {
                // NUL-padded strings (e.g. globalstate's runstate).
                format!(
                    "{:?} ({} bytes, NUL-padded)",
                    String::from_utf8_lossy(text),
                    bytes.len()
                )
            } else {
                let used = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
                if used <= 32 {
                    format!(
                        "{}… ({} bytes, rest zero)",
                        s.get(..(used.max(1) * 2)).unwrap_or(""),
                        bytes.len()
                    )
                } else {
                    format!("{}… ({} bytes)", s.get(..64).unwrap_or(""), bytes.len())
                }
            }
        }
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

impl Summary {
    /// The summary as JSON.
    pub fn to_json(&self) -> Value {
        let configuration = self.configuration.as_ref().map(|c| {
            let mut o = Map::new();
            o.insert("machine".into(), json!(c.machine));
            if let Some(b) = c.target_page_bits {
                o.insert("target_page_bits".into(), json!(b));
            }
            if let Some(caps) = &c.capabilities {
                o.insert("capabilities".into(), json!(caps));
            }
            if let Some(u) = &c.uuid {
                o.insert(
                    "uuid".into(),
                    json!(u.iter().map(|b| format!("{b:02x}")).collect::<String>()),
                );
            }
            Value::Object(o)
        });
        let ram = json!({
            "total": self.ram.total,
            "blocks": self.ram.blocks.iter().map(|b| json!({
                "name": b.name, "size": b.size, "normal": b.normal, "zero": b.zero,
                "zero_nonzero_fill": b.zero_nonzero_fill, "xbzrle": b.xbzrle, "compressed": b.compressed,
            })).collect::<Vec<_>>(),
            "multifd_flushes": self.ram.multifd_flushes,
            "hooks": self.ram.hooks,
        });
        let bitmaps: Vec<Value> = self
            .bitmaps
            .iter()
            .map(|b| {
                json!({
                    "node": b.node, "bitmap": b.bitmap, "granularity": b.granularity,
                    "start_flags": b.start_flags, "complete": b.complete, "set_bits": b.set_bits(),
                    "chunks": b.chunks.iter().map(|c| json!({
                        "start_sector": c.start_sector, "nr_sectors": c.nr_sectors, "zeroes": c.zeroes,
                        "buf_size": c.buf_size, "set_bits": c.set_bits, "chunks": c.chunks,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let devices: Vec<Value> = self
            .devices
            .iter()
            .map(|d| {
                let mut o = Map::new();
                o.insert("offset".into(), json!(d.offset));
                o.insert("section_id".into(), json!(d.section_id));
                o.insert("idstr".into(), json!(d.idstr));
                o.insert("instance_id".into(), json!(d.instance_id));
                o.insert("version_id".into(), json!(d.version_id));
                o.insert("size".into(), json!(d.size));
                if let Some(f) = &d.fields {
                    o.insert("fields".into(), Value::Object(f.iter().cloned().collect()));
                }
                if let Some(e) = &d.decode_error {
                    o.insert("decode_error".into(), json!(e));
                }
                Value::Object(o)
            })
            .collect();
        let trailer = match &self.trailer {
            TrailerSummary::NotReached => json!({"status": "not reached"}),
            TrailerSummary::Missing => json!({"status": "missing"}),
            TrailerSummary::Unexpected(b) => json!({"status": "unexpected", "byte": b}),
            TrailerSummary::Json { len, value } => {
                json!({"status": "present", "len": len, "json": value})
            }
            TrailerSummary::Invalid { len, error } => {
                json!({"status": "invalid", "len": len, "error": error})
            }
        };
        json!({
            "file_version": self.file_version,
            "bytes": self.bytes,
            "eof": self.eof,
            "configuration": configuration,
            "items": self.items.iter().map(ItemRun::to_json).collect::<Vec<_>>(),
            "ram": ram,
            "dirty_bitmaps": bitmaps,
            "devices": devices,
            "trailer": trailer,
            "trailing_bytes": self.trailing_bytes,
            "integrity_digests": self.integrity_digests,
        })
    }
}

impl Analysis {
    /// Summary and error as one JSON object (`"error"`: message, offset, section).
    pub fn to_json(&self) -> Value {
        let mut v = self.summary.to_json();
        if let (Some(o), Some(e)) = (v.as_object_mut(), &self.error) {
            o.insert(
                "error".into(),
                json!({
                    "message": e.to_string(),
                    "offset": e.offset,
                    "section": e.section.as_ref().map(|s| json!({"idstr": s.idstr, "section_id": s.section_id})),
                }),
            );
        }
        v
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.file_version {
            Some(v) => writeln!(
                f,
                "QEMU migration stream, file version {v}, {} bytes read",
                self.bytes
            )?,
            None => writeln!(
                f,
                "not a readable QEMU migration stream ({} bytes read)",
                self.bytes
            )?,
        }
        if let Some(c) = &self.configuration {
            write!(f, "configuration: machine '{}'", c.machine)?;
            if let Some(b) = c.target_page_bits {
                write!(f, ", target page bits {b}")?;
            }
            if let Some(caps) = &c.capabilities {
                write!(f, ", capabilities [{}]", caps.join(", "))?;
            }
            if let Some(u) = &c.uuid {
                write!(
                    f,
                    ", uuid {}",
                    u.iter().map(|b| format!("{b:02x}")).collect::<String>()
                )?;
            }
            writeln!(f)?;
        }
        writeln!(f, "items:")?;
        for it in &self.items {
            let indent = "  ".repeat(it.depth + 1);
            write!(f, "{indent}{:#08x}  {}", it.offset, it.kind)?;
            if !it.name.is_empty() {
                write!(f, " {}", it.name)?;
            }
            if let Some(id) = it.section_id {
                write!(f, " (id {id}")?;
                if let Some((i, v)) = it.instance_version {
                    write!(f, ", instance {i}, version {v}")?;
                }
                write!(f, ")")?;
            }
            if it.count > 1 {
                write!(f, " ×{}", it.count)?;
            }
            if !it.detail.is_empty() {
                write!(f, ": {}", it.detail)?;
            }
            writeln!(f, " [{} bytes]", it.bytes)?;
        }
        if !self.ram.blocks.is_empty() || self.ram.total.is_some() {
            writeln!(f, "ram:")?;
            if let Some(t) = self.ram.total {
                writeln!(f, "  total {t:#x} ({} KiB)", t / 1024)?;
            }
            for b in &self.ram.blocks {
                write!(f, "  block '{}'", b.name)?;
                if let Some(s) = b.size {
                    write!(f, " {s:#x} ({} pages)", s / TARGET_PAGE_SIZE)?;
                }
                write!(f, ": {} normal, {} zero", b.normal, b.zero)?;
                if b.zero_nonzero_fill > 0 {
                    write!(f, " ({} with a non-zero fill)", b.zero_nonzero_fill)?;
                }
                if b.xbzrle > 0 {
                    write!(f, ", {} XBZRLE", b.xbzrle)?;
                }
                if b.compressed > 0 {
                    write!(f, ", {} compressed", b.compressed)?;
                }
                writeln!(f)?;
            }
            if self.ram.multifd_flushes > 0 || self.ram.hooks > 0 {
                writeln!(
                    f,
                    "  MULTIFD_FLUSH {}, HOOK {}",
                    self.ram.multifd_flushes, self.ram.hooks
                )?;
            }
        }
        if !self.bitmaps.is_empty() {
            writeln!(f, "dirty bitmaps:")?;
            for b in &self.bitmaps {
                write!(f, "  {}/{}:", b.node, b.bitmap)?;
                if let Some(g) = b.granularity {
                    write!(f, " granularity {g}")?;
                }
                if let Some(fl) = b.start_flags {
                    let mut names = Vec::new();
                    if fl & crate::bitmap::START_FLAG_ENABLED != 0 {
                        names.push("enabled");
                    }
                    if fl & crate::bitmap::START_FLAG_PERSISTENT != 0 {
                        names.push("persistent");
                    }
                    write!(f, ", flags {fl:#x}")?;
                    if !names.is_empty() {
                        write!(f, " ({})", names.join("|"))?;
                    }
                }
                writeln!(
                    f,
                    ", {} bits set{}",
                    b.set_bits(),
                    if b.complete {
                        ", complete"
                    } else {
                        ", not complete"
                    }
                )?;
                for c in &b.chunks {
                    write!(f, "    sectors {}+{}", c.start_sector, c.nr_sectors)?;
                    if c.zeroes {
                        write!(f, ": zeroes")?;
                        if c.chunks > 1 {
                            write!(f, " ({} chunks)", c.chunks)?;
                        }
                        writeln!(f)?;
                    } else {
                        writeln!(f, ": {}-byte buffer, {} bits set", c.buf_size, c.set_bits)?;
                    }
                }
            }
        }
        if !self.devices.is_empty() {
            writeln!(f, "devices:")?;
            for d in &self.devices {
                writeln!(
                    f,
                    "  {:#08x}  {} (id {}, instance {}, version {}): {} bytes",
                    d.offset, d.idstr, d.section_id, d.instance_id, d.version_id, d.size
                )?;
                if let Some(fields) = &d.fields {
                    for (k, v) in fields {
                        writeln!(f, "    {k} = {}", value_text(v))?;
                    }
                }
                if let Some(e) = &d.decode_error {
                    writeln!(f, "    (decode: {e})")?;
                }
            }
        }
        match &self.trailer {
            TrailerSummary::NotReached => {}
            TrailerSummary::Missing => writeln!(f, "trailer: none (stream ends after EOF)")?,
            TrailerSummary::Unexpected(b) => {
                writeln!(f, "trailer: Expected vmdescription section, but got {b}")?
            }
            TrailerSummary::Json { len, value } => {
                let n = value
                    .get("devices")
                    .and_then(Value::as_array)
                    .map(Vec::len)
                    .unwrap_or(0);
                writeln!(f, "trailer: vmdesc JSON, {len} bytes, {n} device(s)")?;
            }
            TrailerSummary::Invalid { len, error } => {
                writeln!(f, "trailer: {len} bytes of invalid JSON ({error})")?
            }
        }
        if self.trailing_bytes > 0 {
            writeln!(f, "{} bytes after the trailer", self.trailing_bytes)?;
        }
        if self.integrity_digests > 0 {
            writeln!(
                f,
                "x-livemig-integrity: {} digests checked, all equal",
                self.integrity_digests
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for Analysis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.summary)?;
        match &self.error {
            Some(e) => writeln!(f, "error: {e}"),
            None if !self.summary.eof => writeln!(f, "error: the stream ended before EOF"),
            None => Ok(()),
        }
    }
}
