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
//!
//! This module holds the options and what an analysis is made of; `decode` walks the stream
//! into it, `report` writes it out as text and JSON.

mod decode;
mod report;

use decode::Analyzer;

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
    /// `x-livemig-integrity` digests checked (RAM batches and bitmap chunks; the stream's
    /// configuration says whether it carries them).
    pub integrity_digests: u64,
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
            integrity_digests: 0,
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
