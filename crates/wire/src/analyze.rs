//! Whole-stream analysis without a VM: what a capture contains, in order, with offsets, and
//! where and why it is damaged if it is.
//!
//! `ram` and `dirty-bitmap` sections are decoded record by record. Other sections are opaque
//! to a reader without the device model; their end is found by scanning for their footer
//! (`0x7E` + id followed by a valid type byte or the end). FULL sections are kept and decoded
//! after the VMDESCRIPTION trailer, which describes their layout, has been read.
//!
//! Runs of identical items (QEMU emits tens of thousands of empty PART sections) collapse into
//! one entry with a count, in the text and in the JSON.

use crate::bitmap::{read_chunk, BitsData, ChunkPayload, NameTracker, DIRTY_BITMAP_IDSTR};
use crate::command::Command;
use crate::config::{read_configuration, Configuration};
use crate::error::{SectionContext, WireError, WireErrorKind};
use crate::ram::{
    read_mem_blocks, read_ram_record, BlockTracker, MemBlockFields, RamRecord, TARGET_PAGE_SIZE,
};
use crate::reader::{ReaderOptions, StreamReader};
use crate::section::{
    read_file_header, read_footer, read_item, read_vmdesc, Item, SectionHeader, Trailer,
    QEMU_VM_COMMAND, QEMU_VM_EOF, QEMU_VM_SECTION_END, QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART,
    QEMU_VM_SECTION_START, QEMU_VM_VMDESCRIPTION,
};
use crate::vmstate::{decode_body, VmsdDesc};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::io::Read;

/// Options of [`analyze_with`].
#[derive(Debug, Clone)]
pub struct AnalyzeOptions {
    /// Limits and footer switch for the reader.
    pub reader: ReaderOptions,
    /// The stream has a configuration section after its header (QEMU's default).
    pub configuration: bool,
    /// Largest opaque section body kept for decoding with the trailer.
    pub max_kept_body: usize,
    /// Deepest nesting of PACKAGED commands followed.
    pub max_package_depth: usize,
}

impl Default for AnalyzeOptions {
    fn default() -> Self {
        AnalyzeOptions {
            reader: ReaderOptions::default(),
            configuration: true,
            max_kept_body: 16 * 1024 * 1024,
            max_package_depth: 4,
        }
    }
}

/// A run of identical consecutive items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRun {
    /// Offset of the first item's type byte.
    pub offset: u64,
    /// Bytes of all items in the run (header to footer).
    pub bytes: u64,
    /// How many items.
    pub count: u64,
    /// `START`, `PART`, `END`, `FULL`, `COMMAND` or `EOF`.
    pub kind: &'static str,
    /// Section id (sections only).
    pub section_id: Option<u32>,
    /// Section idstr (sections), command name (commands).
    pub name: String,
    /// Instance and version (START/FULL only).
    pub instance_version: Option<(u32, u32)>,
    /// What the item held, e.g. "1024 zero pages", "empty", "24 bytes".
    pub detail: String,
    /// Nesting level: 0 for the main stream, 1 inside a PACKAGED command, ...
    pub depth: usize,
}

/// Per-block RAM record counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamBlockCounts {
    /// Block name.
    pub name: String,
    /// used_length from MEM_SIZE, when listed there.
    pub size: Option<u64>,
    /// PAGE records.
    pub normal: u64,
    /// ZERO records.
    pub zero: u64,
    /// ZERO records with a fill byte other than 0 (rejected by QEMU 8.2+).
    pub zero_nonzero_fill: u64,
    /// XBZRLE records.
    pub xbzrle: u64,
    /// COMPRESS_PAGE records.
    pub compressed: u64,
}

/// What the `ram` sections held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RamSummary {
    /// MEM_SIZE total, if a MEM_SIZE record was seen.
    pub total: Option<u64>,
    /// Blocks in order of first mention (MEM_SIZE list, then page records).
    pub blocks: Vec<RamBlockCounts>,
    /// MULTIFD_FLUSH records.
    pub multifd_flushes: u64,
    /// HOOK records.
    pub hooks: u64,
}

/// One BITS chunk, or a run of contiguous ZEROES chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitsSummary {
    /// First sector.
    pub start_sector: u64,
    /// Sectors covered.
    pub nr_sectors: u64,
    /// ZEROES chunk(s).
    pub zeroes: bool,
    /// Buffer size (0 for ZEROES).
    pub buf_size: u64,
    /// Bits set in the buffer.
    pub set_bits: u64,
    /// Chunks merged into this entry (ZEROES runs).
    pub chunks: u64,
}

/// One migrated dirty bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSummary {
    /// Node alias.
    pub node: String,
    /// Bitmap alias.
    pub bitmap: String,
    /// Granularity from START.
    pub granularity: Option<u32>,
    /// START flags.
    pub start_flags: Option<u8>,
    /// BITS chunks in order.
    pub chunks: Vec<BitsSummary>,
    /// COMPLETE was seen.
    pub complete: bool,
}

impl BitmapSummary {
    /// Total bits set over all chunks.
    pub fn set_bits(&self) -> u64 {
        self.chunks.iter().map(|c| c.set_bits).sum()
    }
}

/// One FULL (device) section.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceSummary {
    /// Offset of the section's type byte.
    pub offset: u64,
    /// Section id.
    pub section_id: u32,
    /// idstr.
    pub idstr: String,
    /// Instance id.
    pub instance_id: u32,
    /// Version id.
    pub version_id: u32,
    /// Body size in bytes.
    pub size: u64,
    /// Fields decoded with the trailer's description, when there was one.
    pub fields: Option<Vec<(String, Value)>>,
    /// Why decoding with the description failed, if it did.
    pub decode_error: Option<String>,
    body: Option<Vec<u8>>,
    body_offset: u64,
}

/// What followed EOF.
#[derive(Debug, Clone, PartialEq)]
pub enum TrailerSummary {
    /// EOF was never reached.
    NotReached,
    /// The stream ended right after EOF.
    Missing,
    /// Another byte than 0x06 followed EOF.
    Unexpected(u8),
    /// The JSON trailer, parsed.
    Json {
        /// Its length.
        len: usize,
        /// Its content.
        value: Value,
    },
    /// A trailer whose JSON does not parse.
    Invalid {
        /// Its length.
        len: usize,
        /// The parse error.
        error: String,
    },
}

/// Everything the analyzer learned.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// File version (3), once the header was read.
    pub file_version: Option<u32>,
    /// The configuration section.
    pub configuration: Option<Configuration>,
    /// Items in stream order, runs collapsed.
    pub items: Vec<ItemRun>,
    /// RAM.
    pub ram: RamSummary,
    /// Dirty bitmaps, in order of first mention.
    pub bitmaps: Vec<BitmapSummary>,
    /// FULL sections in order.
    pub devices: Vec<DeviceSummary>,
    /// The trailer.
    pub trailer: TrailerSummary,
    /// EOF (0x00) was reached at top level.
    pub eof: bool,
    /// Bytes consumed.
    pub bytes: u64,
    /// Bytes after the trailer.
    pub trailing_bytes: u64,
}

/// Result of [`analyze`]: the summary (partial if the stream is damaged) and the error that
/// stopped the analysis, if any.
#[derive(Debug)]
pub struct Analysis {
    /// What was decoded.
    pub summary: Summary,
    /// Where and why decoding stopped early.
    pub error: Option<WireError>,
}

/// Analyzes a whole stream with default options.
pub fn analyze<R: Read>(input: R) -> Analysis {
    analyze_with(input, &AnalyzeOptions::default())
}

/// Analyzes a whole stream.
pub fn analyze_with<R: Read>(input: R, opts: &AnalyzeOptions) -> Analysis {
    let mut r = StreamReader::new(input).with_options(opts.reader.clone());
    let mut a = Analyzer {
        opts,
        summary: Summary {
            file_version: None,
            configuration: None,
            items: Vec::new(),
            ram: RamSummary::default(),
            bitmaps: Vec::new(),
            devices: Vec::new(),
            trailer: TrailerSummary::NotReached,
            eof: false,
            bytes: 0,
            trailing_bytes: 0,
        },
        sections: HashMap::new(),
        ram_blocks: BlockTracker::new(),
        bitmap_names: NameTracker::new(),
    };
    let error = a.run(&mut r).err();
    a.summary.bytes = r.offset();
    a.decode_devices();
    Analysis {
        summary: a.summary,
        error,
    }
}

struct Analyzer<'o> {
    opts: &'o AnalyzeOptions,
    summary: Summary,
    sections: HashMap<u32, String>,
    ram_blocks: BlockTracker,
    bitmap_names: NameTracker,
}

type Res<T> = std::result::Result<T, WireError>;

#[derive(Default)]
struct RamTally {
    mem_size: Option<(u64, usize)>,
    normal: u64,
    zero: u64,
    xbzrle: u64,
    compressed: u64,
    flush: u64,
    hook: u64,
}

impl Analyzer<'_> {
    fn run<R: Read>(&mut self, r: &mut StreamReader<R>) -> Res<()> {
        read_file_header(r)?;
        self.summary.file_version = Some(3);
        if self.opts.configuration {
            self.summary.configuration = Some(read_configuration(r)?);
        }
        self.items(r, 0)?;
        if !self.summary.eof {
            return Ok(());
        }
        let trailer = read_vmdesc(r);
        self.summary.trailer = match trailer? {
            Trailer::Missing => TrailerSummary::Missing,
            Trailer::Unexpected(b) => TrailerSummary::Unexpected(b),
            Trailer::Vmdesc(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(value) => TrailerSummary::Json {
                    len: bytes.len(),
                    value,
                },
                Err(e) => TrailerSummary::Invalid {
                    len: bytes.len(),
                    error: e.to_string(),
                },
            },
        };
        loop {
            let n = r.peek_bytes(usize::MAX)?.len();
            if n == 0 {
                break;
            }
            r.skip(n as u64)?;
            self.summary.trailing_bytes += n as u64;
        }
        Ok(())
    }

    /// The item loop, for the main stream (depth 0) or a package. Returns at EOF or at the
    /// clean end of the input.
    fn items<R: Read>(&mut self, r: &mut StreamReader<R>, depth: usize) -> Res<()> {
        loop {
            if depth > 0 && r.is_at_eof()? {
                return Ok(());
            }
            let at = r.offset();
            match read_item(r)? {
                Item::Eof => {
                    self.push(ItemRun::new(
                        at,
                        r.offset() - at,
                        "EOF",
                        None,
                        String::new(),
                        None,
                        String::new(),
                        depth,
                    ));
                    if depth == 0 {
                        self.summary.eof = true;
                    }
                    return Ok(());
                }
                Item::Command(c) => {
                    let detail = command_detail(&c);
                    let end = r.offset();
                    self.push(ItemRun::new(
                        at,
                        end - at,
                        "COMMAND",
                        None,
                        c.name().into(),
                        None,
                        detail,
                        depth,
                    ));
                    if let Command::Packaged(data) = c {
                        if depth + 1 > self.opts.max_package_depth {
                            return Err(r.error_at(
                                at,
                                WireErrorKind::TooMany {
                                    what: "nested PACKAGED commands",
                                    limit: self.opts.max_package_depth as u64,
                                },
                            ));
                        }
                        let base = end - data.len() as u64;
                        let mut inner = StreamReader::with_base_offset(&data[..], base)
                            .with_options(r.options().clone());
                        self.items(&mut inner, depth + 1)?;
                    }
                }
                Item::Section(h) => self.section(r, at, h, depth)?,
            }
        }
    }

    fn section<R: Read>(
        &mut self,
        r: &mut StreamReader<R>,
        at: u64,
        h: SectionHeader,
        depth: usize,
    ) -> Res<()> {
        let id = h.section_id();
        let idstr = match h.start() {
            Some(s) => {
                self.sections.insert(id, s.idstr.clone());
                s.idstr.clone()
            }
            None => self
                .sections
                .get(&id)
                .cloned()
                .unwrap_or_else(|| "?".into()),
        };
        r.set_section(Some(SectionContext::new(idstr.clone(), id)));
        let body_at = r.offset();
        let detail = match idstr.as_str() {
            "ram" => {
                let t = self.ram_body(r)?;
                ram_detail(&t)
            }
            DIRTY_BITMAP_IDSTR => self.bitmap_body(r)?,
            _ => {
                let keep = matches!(h, SectionHeader::Full(_));
                let (size, body) = self.opaque_body(r, &idstr, id, keep, depth)?;
                if let (SectionHeader::Full(s), true) = (&h, keep) {
                    self.summary.devices.push(DeviceSummary {
                        offset: at,
                        section_id: id,
                        idstr: s.idstr.clone(),
                        instance_id: s.instance_id,
                        version_id: s.version_id,
                        size,
                        fields: None,
                        decode_error: None,
                        body,
                        body_offset: body_at,
                    });
                }
                format!("{size} bytes")
            }
        };
        read_footer(r, id)?;
        let iv = h.start().map(|s| (s.instance_id, s.version_id));
        self.push(ItemRun::new(
            at,
            r.offset() - at,
            h.kind().name(),
            Some(id),
            idstr,
            iv,
            detail,
            depth,
        ));
        Ok(())
    }

    fn push(&mut self, item: ItemRun) {
        if let Some(last) = self.summary.items.last_mut() {
            if last.same_as(&item) {
                last.count += 1;
                last.bytes = last.bytes.saturating_add(item.bytes);
                return;
            }
        }
        self.summary.items.push(item);
    }

    fn block(&mut self, name: &str) -> &mut RamBlockCounts {
        let blocks = &mut self.summary.ram.blocks;
        let i = match blocks.iter().position(|b| b.name == name) {
            Some(i) => i,
            None => {
                blocks.push(RamBlockCounts {
                    name: name.into(),
                    ..Default::default()
                });
                blocks.len() - 1
            }
        };
        &mut blocks[i]
    }

    fn ram_body<R: Read>(&mut self, r: &mut StreamReader<R>) -> Res<RamTally> {
        let mut t = RamTally::default();
        loop {
            let at = r.offset();
            let rec = read_ram_record(r)?;
            let name = match rec.block() {
                Some(b) => Some(
                    self.ram_blocks
                        .resolve(Some(b))
                        .map_err(|k| r.error_at(at, k))?
                        .to_string(),
                ),
                None => match rec {
                    RamRecord::Zero { .. }
                    | RamRecord::Page { .. }
                    | RamRecord::Xbzrle { .. }
                    | RamRecord::CompressPage { .. } => Some(
                        self.ram_blocks
                            .resolve(None)
                            .map_err(|k| r.error_at(at, k))?
                            .to_string(),
                    ),
                    _ => None,
                },
            };
            let name = name.unwrap_or_default();
            match rec {
                RamRecord::MemSize { total } => {
                    let blocks = read_mem_blocks(r, total, |_| MemBlockFields::default())?;
                    self.summary.ram.total = Some(total);
                    t.mem_size = Some((total, blocks.len()));
                    for b in blocks {
                        self.block(&b.name).size = Some(b.used_length);
                    }
                }
                RamRecord::Zero { fill, .. } => {
                    t.zero += 1;
                    let b = self.block(&name);
                    b.zero += 1;
                    if fill != 0 {
                        b.zero_nonzero_fill += 1;
                    }
                }
                RamRecord::Page { .. } => {
                    r.skip(TARGET_PAGE_SIZE)?;
                    t.normal += 1;
                    self.block(&name).normal += 1;
                }
                RamRecord::Xbzrle { len, .. } => {
                    r.skip(u64::from(len))?;
                    t.xbzrle += 1;
                    self.block(&name).xbzrle += 1;
                }
                RamRecord::CompressPage { len, .. } => {
                    r.skip(u64::from(len))?;
                    t.compressed += 1;
                    self.block(&name).compressed += 1;
                }
                RamRecord::MultifdFlush => {
                    t.flush += 1;
                    self.summary.ram.multifd_flushes += 1;
                }
                RamRecord::Hook { .. } => {
                    t.hook += 1;
                    self.summary.ram.hooks += 1;
                }
                // livemig's integrity digest: its value is not checked here (the analyzer
                // reads any stream, digests or not), only stepped over.
                RamRecord::Digest => r.skip(8)?,
                RamRecord::Eos => return Ok(t),
            }
        }
    }

    fn bitmap_entry(&mut self, node: &str, bitmap: &str) -> &mut BitmapSummary {
        let list = &mut self.summary.bitmaps;
        let i = match list
            .iter()
            .position(|b| b.node == node && b.bitmap == bitmap)
        {
            Some(i) => i,
            None => {
                list.push(BitmapSummary {
                    node: node.into(),
                    bitmap: bitmap.into(),
                    granularity: None,
                    start_flags: None,
                    chunks: Vec::new(),
                    complete: false,
                });
                list.len() - 1
            }
        };
        &mut list[i]
    }

    fn bitmap_body<R: Read>(&mut self, r: &mut StreamReader<R>) -> Res<String> {
        let (mut starts, mut bits, mut completes) = (0u64, 0u64, 0u64);
        loop {
            let c = read_chunk(r)?;
            let (node, bitmap) = self.bitmap_names.resolve(&c);
            let (node, bitmap) = (
                node.unwrap_or("?").to_string(),
                bitmap.unwrap_or("?").to_string(),
            );
            match &c.payload {
                ChunkPayload::Start { granularity, flags } => {
                    starts += 1;
                    let e = self.bitmap_entry(&node, &bitmap);
                    e.granularity = Some(*granularity);
                    e.start_flags = Some(*flags);
                }
                ChunkPayload::Bits {
                    start_sector,
                    nr_sectors,
                    data,
                } => {
                    bits += 1;
                    let e = self.bitmap_entry(&node, &bitmap);
                    let (zeroes, buf_size, set_bits) = match data {
                        BitsData::Zeroes => (true, 0, 0),
                        BitsData::Buffer(b) => (
                            false,
                            b.len() as u64,
                            b.iter().map(|x| u64::from(x.count_ones())).sum(),
                        ),
                    };
                    let nr = u64::from(*nr_sectors);
                    let merged = match e.chunks.last_mut() {
                        Some(last)
                            if zeroes
                                && last.zeroes
                                && last.start_sector.checked_add(last.nr_sectors)
                                    == Some(*start_sector) =>
                        {
                            last.nr_sectors = last.nr_sectors.saturating_add(nr);
                            last.chunks += 1;
                            true
                        }
                        _ => false,
                    };
                    if !merged {
                        e.chunks.push(BitsSummary {
                            start_sector: *start_sector,
                            nr_sectors: nr,
                            zeroes,
                            buf_size,
                            set_bits,
                            chunks: 1,
                        });
                    }
                }
                ChunkPayload::Complete => {
                    completes += 1;
                    self.bitmap_entry(&node, &bitmap).complete = true;
                }
                ChunkPayload::None => {}
            }
            if c.eos {
                break;
            }
        }
        let mut parts = Vec::new();
        if starts > 0 {
            parts.push(format!("{starts} START"));
        }
        if bits > 0 {
            parts.push(format!("{bits} BITS"));
        }
        if completes > 0 {
            parts.push(format!("{completes} COMPLETE"));
        }
        Ok(if parts.is_empty() {
            "empty".into()
        } else {
            parts.join(", ")
        })
    }

    /// Finds the end of a body of unknown layout by its footer. Returns its size and, when
    /// `keep` and small enough, its bytes. The footer itself is left unread.
    fn opaque_body<R: Read>(
        &mut self,
        r: &mut StreamReader<R>,
        idstr: &str,
        id: u32,
        keep: bool,
        depth: usize,
    ) -> Res<(u64, Option<Vec<u8>>)> {
        if !r.options().section_footer {
            return Err(r.error(WireErrorKind::UndecodableSection {
                idstr: idstr.into(),
            }));
        }
        const WINDOW: usize = 8192;
        let footer = [
            0x7E,
            (id >> 24) as u8,
            (id >> 16) as u8,
            (id >> 8) as u8,
            id as u8,
        ];
        let mut body = if keep { Some(Vec::new()) } else { None };
        let mut size = 0u64;
        loop {
            let win = r.peek_bytes(WINDOW)?;
            let n = win.len();
            let at_end = n < WINDOW;
            if n < footer.len() {
                return Err(r.error(WireErrorKind::Truncated {
                    what: "section footer",
                    needed: (footer.len() - n) as u64,
                }));
            }
            let mut found = None;
            let mut need_more_at = None;
            for i in 0..=n - footer.len() {
                if win.get(i..i + footer.len()) != Some(&footer[..]) {
                    continue;
                }
                let after = win.get(i + footer.len()..).unwrap_or(&[]);
                match self.plausible_next(after, at_end, depth) {
                    Some(true) => {
                        found = Some(i);
                        break;
                    }
                    Some(false) => {}
                    None => {
                        need_more_at = Some(i);
                        break;
                    }
                }
            }
            let take = match (found, need_more_at) {
                (Some(i), _) => i,
                (None, Some(i)) => i.max(1),
                (None, None) if at_end => {
                    return Err(r.error(WireErrorKind::Truncated {
                        what: "section footer",
                        needed: footer.len() as u64,
                    }))
                }
                (None, None) => n - (footer.len() - 1),
            };
            if let Some(b) = body.as_mut() {
                if b.len() + take <= self.opts.max_kept_body {
                    b.extend_from_slice(win.get(..take).unwrap_or(&[]));
                } else {
                    body = None;
                }
            }
            r.skip(take as u64)?;
            size += take as u64;
            if found.is_some() {
                return Ok((size, body));
            }
        }
    }

    /// Whether `after` (the bytes following a candidate footer) starts like the next item of
    /// a stream: `Some(true)`/`Some(false)`, or `None` when more lookahead is needed. This is
    /// what keeps a `7E id` pattern inside device data from ending a section early.
    fn plausible_next(&self, after: &[u8], at_end: bool, depth: usize) -> Option<bool> {
        // Decides on `after[..need]`, or asks for more (or says no at the end of the input).
        let have = |need: usize| -> Option<bool> {
            if after.len() >= need {
                Some(true)
            } else if at_end {
                Some(false)
            } else {
                None
            }
        };
        let be32 = |at: usize| -> Option<u32> {
            let b = after.get(at..at + 4)?;
            Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let Some(&ty) = after.first() else {
            return if at_end { Some(true) } else { None };
        };
        match ty {
            QEMU_VM_EOF => {
                if depth > 0 {
                    return Some(true);
                }
                match after.get(1) {
                    None => Some(at_end),
                    Some(&next) => Some(next == QEMU_VM_VMDESCRIPTION),
                }
            }
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => match have(5)? {
                false => Some(false),
                true => Some(be32(1).is_some_and(|id| self.sections.contains_key(&id))),
            },
            QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
                if !have(6)? {
                    return Some(false);
                }
                let len = usize::from(after.get(5).copied().unwrap_or(0));
                if len == 0 || !have(6 + len + 8)? {
                    return Some(false);
                }
                let name = after.get(6..6 + len).unwrap_or(&[]);
                Some(name.iter().all(u8::is_ascii_graphic))
            }
            QEMU_VM_COMMAND => {
                if !have(5)? {
                    return Some(false);
                }
                let cmd = u16::from_be_bytes([after.get(1).copied()?, after.get(2).copied()?]);
                let len = u16::from_be_bytes([after.get(3).copied()?, after.get(4).copied()?]);
                Some(match crate::command::command_info(cmd) {
                    Some((_, Some(fixed))) => fixed == len,
                    Some((_, None)) => true,
                    None => false,
                })
            }
            _ => Some(false),
        }
    }

    /// Decodes kept FULL bodies with the trailer's descriptions.
    fn decode_devices(&mut self) {
        let TrailerSummary::Json { value, .. } = &self.summary.trailer else {
            return;
        };
        let Some(descs) = value.get("devices").and_then(Value::as_array) else {
            return;
        };
        let mut used = vec![false; descs.len()];
        for dev in &mut self.summary.devices {
            let Some(body) = dev.body.take() else {
                continue;
            };
            let pick = descs.iter().enumerate().position(|(i, d)| {
                !used.get(i).copied().unwrap_or(true)
                    && d.get("name").and_then(Value::as_str) == Some(dev.idstr.as_str())
                    && d.get("instance_id").and_then(Value::as_u64)
                        == Some(u64::from(dev.instance_id))
            });
            let Some(i) = pick else { continue };
            if let Some(u) = used.get_mut(i) {
                *u = true;
            }
            let Some(desc) = descs.get(i).and_then(VmsdDesc::from_vmdesc_json) else {
                dev.decode_error =
                    Some("the trailer's description of this device is not understood".into());
                continue;
            };
            let mut r = StreamReader::with_base_offset(&body[..], dev.body_offset);
            r.set_section(Some(SectionContext::new(dev.idstr.clone(), dev.section_id)));
            match decode_body(&mut r, &desc, dev.version_id) {
                Ok(fields) => {
                    let used_bytes = r.offset() - dev.body_offset;
                    if used_bytes != body.len() as u64 {
                        dev.decode_error = Some(format!(
                            "the description covers {used_bytes} of the body's {} bytes",
                            body.len()
                        ));
                    }
                    dev.fields = Some(fields);
                }
                Err(e) => dev.decode_error = Some(e.to_string()),
            }
        }
    }
}

impl ItemRun {
    #[allow(clippy::too_many_arguments)]
    fn new(
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

    fn same_as(&self, o: &ItemRun) -> bool {
        self.kind == o.kind
            && self.section_id == o.section_id
            && self.name == o.name
            && self.instance_version == o.instance_version
            && self.detail == o.detail
            && self.depth == o.depth
            && self.kind != "EOF"
    }

    fn to_json(&self) -> Value {
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

fn command_detail(c: &Command) -> String {
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

fn ram_detail(t: &RamTally) -> String {
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

fn value_text(v: &Value) -> String {
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

fn plural(n: u64, one: &str, many: &str) -> String {
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
