//! The `dirty-bitmap` section (version 1): named block dirty bitmaps, byte for byte as QEMU
//! writes them (`shared/reference/dirty-bitmaps.md` §4).
//!
//! Source. Setup selects the bitmaps (all named ones, or those `block-bitmap-mapping` maps),
//! refuses busy, readonly and inconsistent ones with QEMU's messages, marks the selected ones
//! busy and `skip_store`, and sends a START chunk for each. In precopy the data goes at
//! switchover, in the END section: BITS chunks of 1 KiB of bitmap (8192 granules) per chunk,
//! ZEROES for all-clear chunks, then COMPLETE for each bitmap. Cleanup releases them; after a
//! failure or cancel it also clears `skip_store`, so a persistent bitmap is never lost from
//! its image (QEMU leaves it set and loses the bitmap at the next shutdown).
//!
//! Destination. QEMU trusts the stream here and aborts on a bitmap whose node is smaller than
//! the source's (seed 000), on a bad granularity, or on a misaligned chunk. livemig checks
//! every chunk against the destination node before it touches the bitmap:
//! - granularity must be a power of two in [512, 2^31];
//! - every BITS range must lie inside the destination node, start on a 64-granule boundary
//!   where the previous one ended, and cover the 8192 granules a source cuts for the declared
//!   granularity — exactly, unless it ends the node, and never more;
//! - a BITS buffer must be the chunk's words, padded as a source pads them (QEMU's check:
//!   "Migrated bitmap granularity doesn't match"), with no bit set past the chunk's last
//!   granule;
//! - the source's size — the end of its last chunk, since every chunk is always sent — must
//!   equal the destination node's size.
//!
//! So no combination of granularity, size, chunk offsets and lengths that disagree with each
//! other or with the node gives the destination a bitmap different from the source's: either
//! the stream is exactly what a source holding the resulting bitmap would send, or the bitmap
//! is dropped.
//!
//! A bitmap failing any check is dropped with an error naming the bitmap, the node and the
//! reason; the rest of the migration, other bitmaps included, carries on. (QEMU's own
//! "cancel" drops *every* incoming bitmap on the first problem; livemig drops only the
//! offending one.) Where QEMU fails the whole migration — reserved START flags, a bitmap name
//! that already exists on the destination, an unreadable alias — livemig fails it too,
//! cleanly, and removes the bitmaps it had created.

use crate::error::MigrationError;
use crate::machine::{Reader, Writer};
use crate::params::BitmapMapping;
use block::bitmap::{BitmapCheck, BitmapId};
use block::node::{BlockNode, SECTOR_SIZE};
use block::BlockLayer;
use std::sync::Arc;
use wire::bitmap::{
    buffer_size, pad_buffer, read_chunk_header, read_chunk_payload, write_chunk, BitsData, Chunk,
    ChunkPayload, NameTracker, BUFFER_ALIGN, CHUNK_SIZE, FLAG_EOS, START_FLAG_ENABLED,
    START_FLAG_PERSISTENT, START_FLAG_RESERVED_MASK,
};

/// The section's idstr.
pub const BITMAP_IDSTR: &str = wire::bitmap::DIRTY_BITMAP_IDSTR;
/// The section's version; QEMU accepts exactly this one.
pub const BITMAP_VERSION: u32 = wire::bitmap::DIRTY_BITMAP_VERSION;

/// Sectors of disk covered by one BITS chunk of a bitmap of `granularity` bytes: 8192
/// granules (1 KiB of bitmap), kept within the be32 count and on a 64-granule boundary.
fn sectors_per_chunk(granularity: u32) -> u64 {
    let per = CHUNK_SIZE * 8 * (u64::from(granularity) >> 9);
    let align = 64 * (u64::from(granularity) >> 9);
    if per <= u64::from(u32::MAX) {
        per
    } else {
        (u64::from(u32::MAX) / align) * align
    }
}

/// Whether `buf` has a bit set at or past bit `granules` (granule i is bit i % 8 of byte
/// i / 8).
fn stray_bits(buf: &[u8], granules: u64) -> bool {
    let Ok(full) = usize::try_from(granules / 8) else {
        return false;
    };
    let Some(tail) = buf.get(full..) else {
        return false;
    };
    let mut rest = tail.iter();
    let partial = (granules % 8) as u32;
    if partial != 0 {
        if let Some(first) = rest.next() {
            if first >> partial != 0 {
                return true;
            }
        }
    }
    rest.any(|&b| b != 0)
}

struct OutBitmap {
    node: Arc<BlockNode>,
    id: BitmapId,
    node_alias: String,
    alias: String,
    granularity: u32,
    start_flags: u8,
    /// Node size in bytes.
    size: u64,
}

/// The source side.
pub struct BitmapSaver {
    bitmaps: Vec<OutBitmap>,
    names: NameTracker,
    /// The next BITS chunk to send: (bitmap index, first sector).
    cursor: (usize, u64),
    /// A reused serialization buffer.
    buf: Vec<u8>,
    /// `x-livemig-integrity`: each chunk is followed by its digest.
    integrity: bool,
}

/// What a `dirty-bitmap` digest covers, in integrity errors.
use wire::digest::BITMAP_CHUNK_COVERS as CHUNK_DIGEST_COVERS;

/// Writes one chunk; with `integrity`, followed by the digest of its bytes (`wire::digest`).
fn put_chunk(w: &mut Writer, c: &Chunk, integrity: bool) -> Result<(), MigrationError> {
    if integrity {
        w.digest_start();
    }
    write_chunk(w, c)?;
    if integrity {
        wire::digest::write_value(w)?;
    }
    Ok(())
}

impl BitmapSaver {
    /// Selects the bitmaps to migrate and marks them busy, or refuses with QEMU's message and
    /// changes nothing.
    pub fn setup(
        layer: Arc<BlockLayer>,
        mapping: Option<&BitmapMapping>,
    ) -> Result<Self, MigrationError> {
        let mut selected = Vec::new();
        for node in layer.nodes() {
            let node_alias = match mapping {
                Some(m) => match m.node_alias(node.name()) {
                    Some(n) => Some(n),
                    None => continue,
                },
                None => None,
            };
            let alias = node_alias
                .map(|n| n.alias.clone())
                .unwrap_or_else(|| layer.device_or_node_name(&node));
            let size = node.size()?;
            let picked = node.with_bitmaps(|list| -> Result<Vec<OutBitmap>, MigrationError> {
                let mut v = Vec::new();
                for bm in list.named() {
                    let name = bm.name().unwrap_or_default();
                    let (balias, persistent_override) = match node_alias {
                        Some(n) => match n.bitmaps.iter().find(|b| b.name == name) {
                            Some(b) => (b.alias.clone(), b.persistent),
                            None => continue,
                        },
                        None => (name.to_string(), None),
                    };
                    // QEMU names the node by its device's BlockBackend when it has one
                    // (`bdrv_get_device_or_node_name`): a `-drive id=drive0` disk migrates
                    // as `drive0` though its node's name is generated.
                    if alias.starts_with('#') && node_alias.is_none() {
                        return Err(MigrationError::Other(format!(
                            "Bitmap '{name}' in a node with auto-generated name '{alias}' can't be migrated"
                        )));
                    }
                    if node_alias.is_none() && name.len() > 255 {
                        let msg = format!(
                            "Cannot migrate bitmap '{name}' on node '{alias}': Name is longer than 255 bytes"
                        );
                        // QEMU 7.2 error_report()s this one: it reaches stderr too.
                        log::error!("{msg}");
                        return Err(MigrationError::Other(msg));
                    }
                    bm.check(BitmapCheck::DEFAULT)?;
                    let mut flags = 0;
                    if bm.enabled() {
                        flags |= START_FLAG_ENABLED;
                    }
                    if persistent_override.unwrap_or(bm.persistent()) {
                        flags |= START_FLAG_PERSISTENT;
                    }
                    v.push(OutBitmap {
                        node: node.clone(),
                        id: bm.id(),
                        node_alias: alias.clone(),
                        alias: balias,
                        granularity: bm.granularity(),
                        start_flags: flags,
                        size,
                    });
                }
                Ok(v)
            })?;
            selected.extend(picked);
        }
        for b in &selected {
            b.node.with_bitmaps(|list| {
                if let Some(bm) = list.get_mut(b.id) {
                    bm.set_busy(true);
                    bm.set_skip_store(true);
                }
            });
        }
        Ok(BitmapSaver {
            bitmaps: selected,
            names: NameTracker::new(),
            cursor: (0, 0),
            buf: Vec::new(),
            integrity: false,
        })
    }

    /// `x-livemig-integrity`: follow every chunk with the digest of its bytes.
    pub fn set_integrity(&mut self, on: bool) {
        self.integrity = on;
    }

    /// Whether there is anything to send.
    pub fn is_active(&self) -> bool {
        !self.bitmaps.is_empty()
    }

    /// Bytes the END section will carry (sent inside the downtime in precopy).
    pub fn pending_bytes(&self) -> u64 {
        self.bitmaps
            .iter()
            .map(|b| {
                let per = sectors_per_chunk(b.granularity);
                let sectors = b.size.div_ceil(SECTOR_SIZE);
                let chunks = sectors.div_ceil(per).max(1);
                let granules = b.size.div_ceil(u64::from(b.granularity));
                chunks * 21 + buffer_size(granules) + 2
            })
            .sum()
    }

    fn chunk(&mut self, b_index: usize, payload: ChunkPayload) -> Chunk {
        let b = &self.bitmaps[b_index];
        let (node, mut bitmap) = self.names.encode(&b.node_alias, &b.alias);
        // QEMU compares bitmap objects, not names: a new node always names its bitmap too.
        if node.is_some() && bitmap.is_none() {
            bitmap = Some(b.alias.clone());
        }
        Chunk::new((node, bitmap), payload)
    }

    /// The START section's body: a START chunk per bitmap, then EOS.
    pub fn save_setup(&mut self, w: &mut Writer) -> Result<(), MigrationError> {
        for i in 0..self.bitmaps.len() {
            let (granularity, flags) = (self.bitmaps[i].granularity, self.bitmaps[i].start_flags);
            let c = self.chunk(i, ChunkPayload::Start { granularity, flags });
            put_chunk(w, &c, self.integrity)?;
        }
        put_chunk(w, &Chunk::eos(), self.integrity)?;
        Ok(())
    }

    /// The END section's body: every chunk not sent yet (all of them in precopy; what
    /// postcopy's PART sections left), COMPLETE for each bitmap, EOS.
    pub fn save_complete(&mut self, w: &mut Writer) -> Result<(), MigrationError> {
        while self.write_next_chunk(w)? {}
        for i in 0..self.bitmaps.len() {
            let c = self.chunk(i, ChunkPayload::Complete);
            put_chunk(w, &c, self.integrity)?;
        }
        put_chunk(w, &Chunk::eos(), self.integrity)?;
        Ok(())
    }

    /// Postcopy (QEMU's `dirty_bitmap_save_iterate` after the switch): the body of one PART
    /// section — BITS chunks from where the last one stopped until about `budget` bytes are
    /// written, then EOS. Returns whether chunks remain (they go in later PARTs or the END).
    pub fn save_part(&mut self, w: &mut Writer, budget: u64) -> Result<bool, MigrationError> {
        let start = w.bytes_written();
        let mut more = true;
        while more && w.bytes_written() - start < budget {
            more = self.write_next_chunk(w)?;
        }
        put_chunk(w, &Chunk::eos(), self.integrity)?;
        Ok(more)
    }

    /// Whether BITS chunks remain to be sent.
    pub fn bits_remaining(&self) -> bool {
        self.cursor.0 < self.bitmaps.len()
    }

    /// A postcopy recovery's new stream: the bits are sent again from the first chunk (the
    /// source's bitmaps are frozen, so a resent chunk carries the same bits, and what was
    /// lost with the old connection is covered). The first chunk names its bitmap again (the
    /// chunk that last named one may have been lost), and its node too when the bitmaps are
    /// on several nodes. With one node it does not: the destination knows it from the START
    /// chunks, and QEMU 7.2's destination asserts when a postcopy chunk names a node
    /// (`bdrv_lookup_bs` outside the main thread).
    pub fn restart(&mut self) {
        self.cursor = (0, 0);
        let one_node = self
            .bitmaps
            .windows(2)
            .all(|p| p[0].node_alias == p[1].node_alias);
        if one_node {
            self.names.forget_bitmap();
        } else {
            self.names.forget();
        }
    }

    /// Writes the BITS chunk at the cursor and advances it. Returns whether chunks remain.
    fn write_next_chunk(&mut self, w: &mut Writer) -> Result<bool, MigrationError> {
        let (i, sector) = self.cursor;
        let Some(b) = self.bitmaps.get(i) else {
            return Ok(false);
        };
        let (node, id, size, gran) = (b.node.clone(), b.id, b.size, b.granularity);
        let total_sectors = size.div_ceil(SECTOR_SIZE);
        if sector >= total_sectors {
            self.cursor = (i + 1, 0);
            return Ok(self.bits_remaining());
        }
        let per = sectors_per_chunk(gran);
        let nr = per.min(total_sectors - sector);
        let (off, len) = (
            sector * SECTOR_SIZE,
            (nr * SECTOR_SIZE).min(size - sector * SECTOR_SIZE),
        );
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let all_zero = node.with_bitmaps(|list| -> Result<bool, MigrationError> {
            let bm = list
                .get(id)
                .ok_or_else(|| MigrationError::Other("a migrating bitmap disappeared".into()))?;
            let n = bm.serialization_size(off, len)?;
            buf.resize(n as usize, 0);
            bm.serialize_part(&mut buf, off, len)?;
            Ok(bm.hbitmap().next_dirty(off, len).is_none())
        })?;
        let data = if all_zero {
            BitsData::Zeroes
        } else {
            pad_buffer(&mut buf);
            BitsData::Buffer(std::mem::take(&mut buf))
        };
        let c = self.chunk(
            i,
            ChunkPayload::Bits {
                start_sector: sector,
                nr_sectors: nr as u32,
                data,
            },
        );
        put_chunk(w, &c, self.integrity)?;
        if let ChunkPayload::Bits {
            data: BitsData::Buffer(b),
            ..
        } = c.payload
        {
            buf = b;
        }
        self.buf = buf;
        self.cursor = if sector + nr >= total_sectors {
            (i + 1, 0)
        } else {
            (i, sector + nr)
        };
        Ok(self.bits_remaining())
    }

    /// Releases the bitmaps. After a failed or cancelled migration the source keeps them as
    /// they were, persistence included; after a successful one they stay un-stored, because
    /// the destination owns them now (QEMU's behaviour, kept by design).
    pub fn cleanup(self, success: bool) {
        for b in &self.bitmaps {
            b.node.with_bitmaps(|list| {
                if let Some(bm) = list.get_mut(b.id) {
                    bm.set_busy(false);
                    if !success {
                        bm.set_skip_store(false);
                    }
                }
            });
        }
    }
}

struct InBitmap {
    node: Arc<BlockNode>,
    node_alias: String,
    alias: String,
    name: String,
    id: BitmapId,
    enable: bool,
    /// One past the last byte covered by BITS chunks so far.
    covered: u64,
    completed: bool,
    /// A postcopy recovery resumed the stream: the next chunk may start over at byte 0
    /// (a livemig source resends the bits from the first chunk) or go on at `covered` (a
    /// QEMU source continues where it was).
    restartable: bool,
}

/// The destination side.
pub struct BitmapLoader {
    layer: Arc<BlockLayer>,
    mapping: Option<BitmapMapping>,
    names: NameTracker,
    bitmaps: Vec<InBitmap>,
    /// (node alias, bitmap alias) pairs whose chunks are ignored from now on.
    dropped: Vec<(String, String)>,
    /// Errors about dropped bitmaps, for the operator.
    pub errors: Vec<String>,
    /// A postcopy recovery happened: chunks for a completed bitmap are a resend.
    resumed: bool,
    /// `x-livemig-integrity`: every chunk is checked against the digest after it before
    /// anything of it is applied.
    integrity: bool,
}

enum Step {
    Continue,
    End,
}

impl BitmapLoader {
    /// A loader creating bitmaps in `layer`, resolving aliases through `mapping` if set.
    pub fn new(layer: Arc<BlockLayer>, mapping: Option<BitmapMapping>) -> Self {
        BitmapLoader {
            layer,
            mapping,
            names: NameTracker::new(),
            bitmaps: Vec::new(),
            dropped: Vec::new(),
            errors: Vec::new(),
            resumed: false,
            integrity: false,
        }
    }

    /// `x-livemig-integrity` (both ends agreed in the configuration section): check every
    /// chunk against its digest.
    pub fn set_integrity(&mut self, on: bool) {
        self.integrity = on;
    }

    /// Loads one section body: chunks up to the one with EOS.
    pub fn load(&mut self, r: &mut Reader) -> Result<(), MigrationError> {
        loop {
            // Names first, so that a payload the stream cannot carry (an oversized buffer, a
            // truncated one) fails the load with the bitmap it belongs to.
            if self.integrity {
                r.digest_start();
            }
            let h = read_chunk_header(r)?;
            let mut c = Chunk {
                node: h.node,
                bitmap: h.bitmap,
                payload: ChunkPayload::None,
                eos: h.flags & FLAG_EOS != 0,
            };
            c.payload =
                read_chunk_payload(r, h.flags).map_err(|e| match self.names.resolve(&c) {
                    (Some(node), Some(bitmap)) => {
                        MigrationError::Load(format!("{e} (bitmap '{bitmap}' on node '{node}')"))
                    }
                    _ => MigrationError::Wire(e),
                })?;
            if self.integrity {
                wire::digest::check_value(r, CHUNK_DIGEST_COVERS).map_err(|e| {
                    match self.names.resolve(&c) {
                        (Some(node), Some(bitmap)) => MigrationError::Load(format!(
                            "{e} (bitmap '{bitmap}' on node '{node}')"
                        )),
                        _ => MigrationError::Wire(e),
                    }
                })?;
            }
            if let Step::End = self.chunk(c)? {
                return Ok(());
            }
        }
    }

    fn drop_bitmap(&mut self, node_alias: &str, alias: &str, error: String) {
        log::error!("dirty bitmap migration: {error}");
        self.errors.push(error);
        if let Some(i) = self
            .bitmaps
            .iter()
            .position(|b| b.node_alias == node_alias && b.alias == alias)
        {
            let b = self.bitmaps.remove(i);
            release(&b);
        }
        self.dropped
            .push((node_alias.to_string(), alias.to_string()));
    }

    fn chunk(&mut self, c: Chunk) -> Result<Step, MigrationError> {
        let end = c.eos;
        let (node_alias, alias) = self.names.resolve(&c);
        let (node_alias, alias) = (node_alias.map(str::to_string), alias.map(str::to_string));
        if matches!(c.payload, ChunkPayload::None) {
            return Ok(if end { Step::End } else { Step::Continue });
        }
        let Some(node_alias) = node_alias else {
            self.errors
                .push("Error: block device name is not set".into());
            return Ok(if end { Step::End } else { Step::Continue });
        };
        let Some(alias) = alias else {
            self.errors.push(format!(
                "Error: bitmap name is not set for node '{node_alias}'"
            ));
            return Ok(if end { Step::End } else { Step::Continue });
        };
        if self
            .dropped
            .iter()
            .any(|(n, b)| *n == node_alias && *b == alias)
        {
            return Ok(if end { Step::End } else { Step::Continue });
        }
        match c.payload {
            ChunkPayload::Start { granularity, flags } => {
                self.start(&node_alias, &alias, granularity, flags)?
            }
            ChunkPayload::Bits {
                start_sector,
                nr_sectors,
                data,
            } => self.bits(&node_alias, &alias, start_sector, nr_sectors, data),
            ChunkPayload::Complete => self.complete(&node_alias, &alias),
            ChunkPayload::None => {}
        }
        Ok(if end { Step::End } else { Step::Continue })
    }

    /// Resolves wire aliases to (node, bitmap name), or the reason they do not resolve.
    fn resolve(&self, node_alias: &str, alias: &str) -> Result<(Arc<BlockNode>, String), String> {
        match &self.mapping {
            Some(m) => {
                let n = m
                    .node_by_alias(node_alias)
                    .ok_or_else(|| format!("Error: Unknown node alias '{node_alias}'"))?;
                let node = self
                    .layer
                    .lookup_bs(None, Some(&n.node_name))
                    .map_err(|e| e.to_string())?;
                let b = n.bitmaps.iter().find(|b| b.alias == alias).ok_or_else(|| {
                    format!(
                        "Error: Unknown bitmap alias '{alias}' on node '{}' (alias '{node_alias}')",
                        n.node_name
                    )
                })?;
                Ok((node, b.name.clone()))
            }
            None => {
                let node = self
                    .layer
                    .lookup_bs(Some(node_alias), Some(node_alias))
                    .map_err(|e| e.to_string())?;
                Ok((node, alias.to_string()))
            }
        }
    }

    fn start(
        &mut self,
        node_alias: &str,
        alias: &str,
        granularity: u32,
        flags: u8,
    ) -> Result<(), MigrationError> {
        // Checked before anything is created (QEMU checks after, and fails all the same).
        // QEMU prints the whole flags byte.
        if flags & START_FLAG_RESERVED_MASK != 0 {
            return Err(MigrationError::Load(format!(
                "Unknown flags in migrated dirty bitmap header: {flags:x} (bitmap '{alias}' on node '{node_alias}')"
            )));
        }
        let (node, name) = match self.resolve(node_alias, alias) {
            Ok(x) => x,
            Err(e) => {
                let e = format!("Bitmap '{alias}' on node '{node_alias}' dropped: {e}");
                self.drop_bitmap(node_alias, alias, e);
                return Ok(());
            }
        };
        if !granularity.is_power_of_two() || granularity < 512 {
            let e = format!(
                "Bitmap '{name}' on node '{}' cannot be migrated: granularity {granularity} is not a power of two of at least 512",
                node.name()
            );
            self.drop_bitmap(node_alias, alias, e);
            return Ok(());
        }
        let persistent = self
            .mapping
            .as_ref()
            .and_then(|m| m.node_by_alias(node_alias))
            .and_then(|n| n.bitmaps.iter().find(|b| b.alias == alias))
            .and_then(|b| b.persistent)
            .unwrap_or(flags & START_FLAG_PERSISTENT != 0);
        let enable = flags & START_FLAG_ENABLED != 0;
        let created = node.with_bitmaps(|list| -> Result<BitmapId, String> {
            if list.find(&name).is_some() {
                return Err(format!(
                    "Bitmap with the same name ('{name}') already exists on destination node '{}'",
                    node.name()
                ));
            }
            let id = list
                .create(granularity, Some(&name))
                .map_err(|e| e.to_string())?;
            if let Some(bm) = list.get_mut(id) {
                bm.set_persistent(persistent);
                bm.set_disabled(true);
            }
            if enable {
                list.create_successor(id).map_err(|e| e.to_string())?;
            } else if let Some(bm) = list.get_mut(id) {
                bm.set_busy(true);
            }
            Ok(id)
        });
        match created {
            Ok(id) => {
                self.bitmaps.push(InBitmap {
                    node,
                    node_alias: node_alias.to_string(),
                    alias: alias.to_string(),
                    name,
                    id,
                    enable,
                    covered: 0,
                    completed: false,
                    restartable: false,
                });
                Ok(())
            }
            Err(e) if e.contains("already exists on destination") => Err(MigrationError::Load(e)),
            Err(e) => {
                self.drop_bitmap(
                    node_alias,
                    alias,
                    format!("Bitmap '{name}' on node '{}': {e}", node.name()),
                );
                Ok(())
            }
        }
    }

    /// The index of the incoming bitmap a non-START chunk refers to; a chunk for a bitmap that
    /// never started drops it (QEMU's "unknown dirty bitmap" error).
    fn incoming(&mut self, node_alias: &str, alias: &str) -> Option<usize> {
        let found = self
            .bitmaps
            .iter()
            .position(|b| b.node_alias == node_alias && b.alias == alias);
        if found.is_none() {
            let e =
                format!("Error: unknown dirty bitmap '{alias}' for block device '{node_alias}'");
            self.drop_bitmap(node_alias, alias, e);
        }
        found
    }

    fn bits(
        &mut self,
        node_alias: &str,
        alias: &str,
        start_sector: u64,
        nr_sectors: u32,
        data: BitsData,
    ) {
        let Some(i) = self.incoming(node_alias, alias) else {
            return;
        };
        if self.resumed && self.bitmaps[i].completed {
            // A livemig source resending after a recovery: this bitmap completed before the
            // cut, and merged this side's writes in; its bits must not be overwritten.
            return;
        }
        let b = &self.bitmaps[i];
        let describe = |why: String| {
            format!(
                "Bitmap '{}' on node '{}' dropped: {why}",
                b.name,
                b.node.name()
            )
        };
        let size = match b.node.size() {
            Ok(s) => s,
            Err(e) => {
                let e = describe(e.to_string());
                self.drop_bitmap(node_alias, alias, e);
                return;
            }
        };
        let start = start_sector.checked_mul(SECTOR_SIZE);
        let len = u64::from(nr_sectors) * SECTOR_SIZE;
        let end = start.and_then(|s| s.checked_add(len));
        let (Some(start), Some(end)) = (start, end) else {
            let e = describe(format!("chunk at sector {start_sector} is out of range"));
            self.drop_bitmap(node_alias, alias, e);
            return;
        };
        let result = b.node.with_bitmaps(|list| -> Result<(), String> {
            let bm = list.get_mut(b.id).ok_or("the bitmap disappeared")?;
            let granularity = u64::from(bm.granularity());
            let align = bm.serialization_align();
            let wrong_granularity = |why: String| {
                format!(
                    "Migrated bitmap granularity doesn't match the destination bitmap '{}' granularity ({why})",
                    b.name
                )
            };
            if end > size.next_multiple_of(SECTOR_SIZE) {
                return Err(format!(
                    "the source sent bits for bytes [{start}, {end}) but node '{}' is only {size} bytes: the source's node is larger than the destination's",
                    b.node.name()
                ));
            }
            if start % align != 0 {
                return Err(format!("chunk start {start} is not aligned to {align} bytes (64 granules): malformed stream"));
            }
            if start != b.covered && !(b.restartable && start == 0) {
                return Err(format!(
                    "chunk starts at byte {start} but the previous one ended at {}: malformed stream",
                    b.covered
                ));
            }
            // Every chunk but the last covers exactly what a source cuts for the declared
            // granularity (8192 granules, dirty-bitmaps.md §4.4); the last one ends at the
            // node's end and may be shorter, never longer. A longer chunk was cut for a
            // coarser granularity than the one declared; a shorter one that stops before the
            // end is a smaller source node.
            let per_chunk = sectors_per_chunk(bm.granularity());
            if u64::from(nr_sectors) > per_chunk {
                return Err(wrong_granularity(format!(
                    "a chunk of {nr_sectors} sectors where one holds {per_chunk}"
                )));
            }
            if end < size && u64::from(nr_sectors) != per_chunk {
                return Err(format!(
                    "the source's node ends at byte {end} but node '{}' is {size} bytes: the nodes differ in size",
                    b.node.name()
                ));
            }
            // Clamp to the node: the last sector may extend past a size that is not a whole
            // number of sectors; QEMU's serialization clamps the same way.
            let len = end.min(size) - start;
            match data {
                BitsData::Zeroes => bm.deserialize_zeroes(start, len, false).map_err(|e| e.to_string()),
                BitsData::Buffer(buf) => {
                    let needed = bm.serialization_size(start, len).map_err(|e| e.to_string())?;
                    // QEMU's check: the buffer is the chunk's words, padded as a sender pads
                    // them (to 32 bytes on a 64-bit host; 16 on a 32-bit one, which is within).
                    let padded = needed.next_multiple_of(BUFFER_ALIGN as u64);
                    let got = buf.len() as u64;
                    if got < needed || got > padded {
                        return Err(wrong_granularity(format!(
                            "a buffer of {got} bytes for {needed} bytes of bitmap"
                        )));
                    }
                    // Past the chunk's last granule, the words and the padding are zero in
                    // every stream a source writes: set bits there mean the data was cut for
                    // another granularity or node size than the one declared.
                    let granules = len.div_ceil(granularity);
                    if stray_bits(&buf, granules) {
                        return Err(wrong_granularity(format!(
                            "bits set past the {granules} granules the chunk covers"
                        )));
                    }
                    let part = buf.get(..needed as usize).unwrap_or_default();
                    bm.deserialize_part(part, start, len, false).map_err(|e| e.to_string())
                }
            }
        });
        match result {
            Ok(()) => {
                self.bitmaps[i].covered = end.min(size);
                self.bitmaps[i].restartable = false;
            }
            Err(why) => {
                let e = describe(why);
                self.drop_bitmap(node_alias, alias, e);
            }
        }
    }

    fn complete(&mut self, node_alias: &str, alias: &str) {
        let Some(i) = self.incoming(node_alias, alias) else {
            return;
        };
        if self.resumed && self.bitmaps[i].completed {
            return;
        }
        let b = &self.bitmaps[i];
        let size = b.node.size().unwrap_or(0);
        if b.covered != size {
            let e = format!(
                "Bitmap '{}' on node '{}' dropped: the source's node is {} bytes, the destination's {size}: the nodes differ in size",
                b.name,
                b.node.name(),
                b.covered
            );
            self.drop_bitmap(node_alias, alias, e);
            return;
        }
        let r = b.node.with_bitmaps(|list| -> Result<(), String> {
            let bm = list.get_mut(b.id).ok_or("the bitmap disappeared")?;
            bm.deserialize_finish();
            if bm.successor().is_some() {
                list.reclaim(b.id).map_err(|e| e.to_string())
            } else {
                bm.set_busy(false);
                Ok(())
            }
        });
        match r {
            Ok(()) => self.bitmaps[i].completed = true,
            Err(why) => {
                let e = format!(
                    "Bitmap '{}' on node '{}' dropped: {why}",
                    b.name,
                    b.node.name()
                );
                self.drop_bitmap(node_alias, alias, e);
            }
        }
    }

    /// Just before the destination's guest starts: enables the migrated bitmaps that were
    /// enabled on the source, and drops any that never completed. Returns warnings.
    pub fn before_vm_start(&mut self) -> Vec<String> {
        let mut warnings = std::mem::take(&mut self.errors);
        for b in std::mem::take(&mut self.bitmaps) {
            if !b.completed {
                warnings.push(format!(
                    "Bitmap '{}' on node '{}' dropped: the stream ended before it was complete",
                    b.name,
                    b.node.name()
                ));
                release(&b);
                continue;
            }
            if b.enable {
                b.node.with_bitmaps(|list| {
                    if let Some(bm) = list.get_mut(b.id) {
                        bm.set_disabled(false);
                    }
                });
            }
        }
        warnings
    }

    /// At postcopy's switch, with bitmaps still to come (QEMU's `dirty_bitmap_mig_before_vm_start`
    /// in postcopy): a completed bitmap is enabled as in precopy; an incomplete enabled one
    /// has its successor enabled, so the guest's writes on this side are recorded from the
    /// first one on and merged in at COMPLETE (the final bitmap is the source's ∪ the writes
    /// here); incomplete bitmaps stay busy until their COMPLETE. Returns warnings.
    pub fn before_vm_start_postcopy(&mut self) -> Vec<String> {
        let mut warnings = std::mem::take(&mut self.errors);
        let mut pending = Vec::new();
        for b in std::mem::take(&mut self.bitmaps) {
            if b.completed {
                if b.enable {
                    b.node.with_bitmaps(|list| {
                        if let Some(bm) = list.get_mut(b.id) {
                            bm.set_disabled(false);
                        }
                    });
                }
                continue;
            }
            if b.enable {
                if let Err(e) = b.node.with_bitmaps(|list| list.enable_successor(b.id)) {
                    let e = format!(
                        "Bitmap '{}' on node '{}' dropped: {e}",
                        b.name,
                        b.node.name()
                    );
                    log::error!("dirty bitmap migration: {e}");
                    warnings.push(e);
                    self.dropped.push((b.node_alias.clone(), b.alias.clone()));
                    release(&b);
                    continue;
                }
            }
            pending.push(b);
        }
        self.bitmaps = pending;
        warnings
    }

    /// POSTCOPY_RESUME: the stream goes on over a new connection; chunks lost with the old
    /// one are sent again by a livemig source, from each bitmap's first chunk.
    pub fn resumed(&mut self) {
        self.resumed = true;
        for b in &mut self.bitmaps {
            b.restartable = true;
        }
    }

    /// Drops every bitmap still being received (the incoming migration failed, or a
    /// bitmap-only postcopy lost its source). Returns them as `node/name`.
    pub fn cancel(&mut self, why: &str) -> Vec<String> {
        let mut dropped = Vec::new();
        for b in std::mem::take(&mut self.bitmaps) {
            self.errors.push(format!(
                "Bitmap '{}' on node '{}' dropped: {why}",
                b.name,
                b.node.name()
            ));
            dropped.push(format!("{}/{}", b.node.name(), b.name));
            release(&b);
        }
        dropped
    }
}

/// Reads a warning of the destination's bitmap loader back as (node, bitmap, reason) when it
/// says a bitmap was dropped ("Bitmap 'B' on node 'N' dropped: WHY"), for the event and the
/// HMP line that report it.
pub fn parse_dropped(warning: &str) -> Option<(&str, &str, &str)> {
    let rest = warning.strip_prefix("Bitmap '")?;
    let (name, rest) = rest.split_once("' on node '")?;
    let (node, reason) = rest.split_once("' dropped: ")?;
    Some((node, name, reason))
}

/// Removes an incoming bitmap from its node (its successor, if any, goes with it).
fn release(b: &InBitmap) {
    b.node.with_bitmaps(|list| {
        if list.get(b.id).and_then(|bm| bm.successor()).is_some() {
            let _ = list.reclaim(b.id);
        }
        if let Some(bm) = list.get_mut(b.id) {
            bm.set_busy(false);
        }
        let _ = list.release(b.id);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_bitmap_warnings_read_back() {
        assert_eq!(
            parse_dropped(
                "Bitmap 'b 1' on node 'n0' dropped: the stream ended before it was complete"
            ),
            Some(("n0", "b 1", "the stream ended before it was complete"))
        );
        assert_eq!(parse_dropped("Error: block device name is not set"), None);
    }
    use crate::transport::BoxRead;
    use serde_json::json;
    use wire::{StreamReader, StreamWriter};

    fn layer() -> Arc<BlockLayer> {
        let l = Arc::new(BlockLayer::new());
        for n in ["node0", "node1"] {
            l.blockdev_add(&json!({"driver": "null-co", "node-name": n, "size": 64 << 20}))
                .unwrap();
        }
        l
    }

    fn stream(chunks: &[Chunk]) -> Reader {
        let mut w = StreamWriter::new(Vec::new());
        for c in chunks {
            write_chunk(&mut w, c).unwrap();
        }
        write_chunk(&mut w, &Chunk::eos()).unwrap();
        let bytes = w.into_inner().unwrap();
        StreamReader::new(Box::new(std::io::Cursor::new(bytes)) as BoxRead)
    }

    fn chunk(node: &str, bitmap: &str, payload: ChunkPayload) -> Chunk {
        Chunk::new((Some(node.into()), Some(bitmap.into())), payload)
    }

    fn start(node: &str, bitmap: &str, flags: u8) -> Chunk {
        let payload = ChunkPayload::Start {
            granularity: 65536,
            flags,
        };
        chunk(node, bitmap, payload)
    }

    fn names(layer: &BlockLayer) -> Vec<String> {
        let mut v = Vec::new();
        for n in layer.nodes() {
            n.with_bitmaps(|list| {
                for b in list.named() {
                    v.push(format!("{}/{}", n.name(), b.name().unwrap_or_default()));
                }
            });
        }
        v.sort();
        v
    }

    #[test]
    fn unknown_node_is_dropped_with_bitmap_and_node_named() {
        let mut l = BitmapLoader::new(layer(), None);
        l.load(&mut stream(&[
            start("nodeX", "bmX", 1),
            start("node0", "bm0", 1),
        ]))
        .unwrap();
        assert_eq!(
            l.errors,
            ["Bitmap 'bmX' on node 'nodeX' dropped: Cannot find device='nodeX' nor node-name='nodeX'"]
        );
    }

    #[test]
    fn fatal_errors_name_the_bitmap_and_the_node() {
        // Reserved START flags: QEMU's message, with the whole flags byte as QEMU prints it.
        let e = BitmapLoader::new(layer(), None)
            .load(&mut stream(&[start("node0", "bm0", 0x09)]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Unknown flags in migrated dirty bitmap header: 9 (bitmap 'bm0' on node 'node0')"
        );

        let lay = layer();
        if let Some(n) = lay.node("node1") {
            n.with_bitmaps(|list| list.create(4096, Some("bm1")).map(|_| ()))
                .unwrap();
        }
        let mut l = BitmapLoader::new(lay.clone(), None);
        let e = l
            .load(&mut stream(&[
                start("node0", "bm0", 1),
                start("node1", "bm1", 1),
            ]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "Bitmap with the same name ('bm1') already exists on destination node 'node1'"
        );
        l.cancel("the incoming migration failed");
        assert_eq!(names(&lay), ["node1/bm1"]);

        // A buffer beyond QEMU's 10 KiB limit; the chunk's names are known before its payload.
        let big = ChunkPayload::Bits {
            start_sector: 0,
            nr_sectors: 131072,
            data: BitsData::Buffer(vec![0; 16 << 10]),
        };
        let mut l = BitmapLoader::new(layer(), None);
        l.load(&mut stream(&[start("node1", "bm1", 1)])).unwrap();
        let e = l
            .load(&mut stream(&[chunk("node1", "bm1", big)]))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x17: Bitmap migration stream buffer allocation request is too large (16384 > 10240) (bitmap 'bm1' on node 'node1')"
        );
    }

    /// Issue 9, bug 2: a 64 KiB bitmap whose START declares 128 KiB. Read at 128 KiB, its
    /// 128-byte buffer (1024 granules of a 64 MiB node) would give 512 granules with the
    /// wrong bits; the buffer does not fit the declared granularity, so the bitmap is
    /// dropped with QEMU's message.
    #[test]
    fn a_granularity_that_does_not_match_the_bits_drops_the_bitmap() {
        let src = property::source(
            64 << 20,
            65536,
            &[(0, 65536), (320 << 10, 65536), (1 << 20, 65536)],
        );
        let (mut setup, complete) = property::sent(&src);
        for declared in [131072u32, 32768] {
            if let ChunkPayload::Start { granularity, .. } = &mut setup[0].payload {
                *granularity = declared;
            }
            let (got, warnings) = property::receive(64 << 20, &setup, &complete);
            assert!(got.is_none(), "{declared}: {got:?}");
            assert_eq!(warnings.len(), 1, "{warnings:?}");
            assert!(
                warnings[0].starts_with(
                    "Bitmap 'bm' on node 'n' dropped: Migrated bitmap granularity doesn't match the destination bitmap 'bm' granularity"
                ),
                "{warnings:?}"
            );
        }
    }

    /// The property of issue 9 (bug 2): whatever a patch does to the START granularity or to
    /// a BITS chunk's start, length or buffer size, the destination ends with the source's
    /// exact bitmap, or with none and a warning — unless the patched chunks are exactly what
    /// a source holding the destination's bitmap would have sent (a granularity patch on a
    /// bitmap small enough for one chunk, whose set bits all fall inside the reinterpreted
    /// granules): no receiver can tell such a stream from a genuine one.
    mod property {
        use super::*;
        use proptest::prelude::*;
        use std::io::Write;
        use std::sync::Mutex;

        /// A writer whose bytes can be read back after the saver is done with it.
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);

        impl Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }

        /// A layer with node `n` of `size` bytes holding bitmap `bm` of `granularity` with
        /// `dirty` ranges (offset, length) set.
        pub(super) fn source(size: u64, granularity: u32, dirty: &[(u64, u64)]) -> Arc<BlockLayer> {
            let l = Arc::new(BlockLayer::new());
            l.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": size}))
                .unwrap();
            l.node("n").unwrap().with_bitmaps(|list| {
                let id = list.create(granularity, Some("bm")).unwrap();
                let bm = list.get_mut(id).unwrap();
                for (off, len) in dirty {
                    bm.set_dirty(*off, *len).unwrap();
                }
            });
            l
        }

        /// Postcopy with a recovery: the bits go out in small PART slices after the switch,
        /// a cut loses some, the resumed stream sends them all again from the first chunk
        /// (`restart`) while the destination takes the restart (`resumed`), and a guest
        /// write on the destination during postcopy lands in the successor and is merged at
        /// COMPLETE: the result is the source's bits ∪ the write, enabled, not busy.
        #[test]
        fn postcopy_slices_a_restart_and_the_destinations_writes() {
            const SIZE: u64 = 1 << 30;
            let dirty = [(0, 65536), (300 << 20, 64 << 20)];
            let src = source(SIZE, 512, &dirty);
            let out = Captured::default();
            let mut w: Writer = StreamWriter::new(Box::new(out.clone()));
            let mut saver = BitmapSaver::setup(src.clone(), None).unwrap();
            saver.save_setup(&mut w).unwrap();
            let mut parts_before_cut = 0;
            while saver.save_part(&mut w, 4096).unwrap() && parts_before_cut < 3 {
                parts_before_cut += 1;
            }
            w.flush().unwrap();
            let first_stream = std::mem::take(&mut *out.0.lock().unwrap());
            // The new connection.
            saver.restart();
            let mut parts = 0;
            while saver.save_part(&mut w, 4096).unwrap() {
                parts += 1;
            }
            assert!(parts > parts_before_cut, "the bits took several slices");
            saver.save_complete(&mut w).unwrap();
            w.flush().unwrap();
            saver.cleanup(true);
            let second_stream = std::mem::take(&mut *out.0.lock().unwrap());

            let dst = Arc::new(BlockLayer::new());
            dst.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": SIZE}))
                .unwrap();
            let mut loader = BitmapLoader::new(dst.clone(), None);
            let mut r: Reader = StreamReader::new(Box::new(std::io::Cursor::new(first_stream)));
            loader.load(&mut r).unwrap(); // setup
            assert!(loader.before_vm_start_postcopy().is_empty());
            // The guest runs here: its write is recorded.
            let node = dst.node("n").unwrap();
            node.with_bitmaps(|l| l.mark(900 << 20, 4096));
            for _ in 0..parts_before_cut {
                loader.load(&mut r).unwrap();
            }
            assert!(node.with_bitmaps(|l| l.find("bm").unwrap().busy()));
            loader.resumed();
            let mut r: Reader = StreamReader::new(Box::new(std::io::Cursor::new(second_stream)));
            for _ in 0..=parts {
                loader.load(&mut r).unwrap();
            }
            loader.load(&mut r).unwrap(); // the END: COMPLETE
            assert!(loader.before_vm_start().is_empty());

            let want = source(SIZE, 512, &[dirty[0], dirty[1], (900 << 20, 4096)]);
            let want = want
                .node("n")
                .unwrap()
                .with_bitmaps(|l| l.find("bm").unwrap().sha256_hex());
            node.with_bitmaps(|l| {
                let bm = l.find("bm").unwrap();
                assert_eq!(bm.sha256_hex(), want, "source ∪ the destination's write");
                assert!(bm.enabled() && !bm.busy());
                assert_eq!(l.iter().count(), 1, "the successor was merged");
            });
        }

        /// `x-livemig-integrity`: a bitmap migrates whole with its chunk digests; a bit
        /// flipped anywhere in a chunk (flags, names, offsets, the bits themselves) fails the
        /// load before the chunk is applied, naming the check, the bitmap and the node — where
        /// without the digests a flip inside the bits loads silently as another bitmap.
        #[test]
        fn integrity_catches_a_flip_in_any_chunk_before_it_is_applied() {
            const SIZE: u64 = 64 << 20;
            let src = source(SIZE, 65536, &[(0, 65536), (5 << 20, 3 << 20)]);
            let want = src
                .node("n")
                .unwrap()
                .with_bitmaps(|l| l.find("bm").unwrap().sha256_hex());
            let stream = |integrity: bool| {
                let out = Captured::default();
                let mut w: Writer = StreamWriter::new(Box::new(out.clone()));
                let mut saver = BitmapSaver::setup(src.clone(), None).unwrap();
                saver.set_integrity(integrity);
                saver.save_setup(&mut w).unwrap();
                let setup_len = w.bytes_written() as usize;
                saver.save_complete(&mut w).unwrap();
                w.flush().unwrap();
                saver.cleanup(false);
                let bytes = out.0.lock().unwrap().clone();
                (bytes, setup_len)
            };
            let load = |bytes: &[u8], integrity: bool| {
                let dst = Arc::new(BlockLayer::new());
                dst.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": SIZE}))
                    .unwrap();
                let mut loader = BitmapLoader::new(dst.clone(), None);
                loader.set_integrity(integrity);
                let mut r: Reader =
                    StreamReader::new(Box::new(std::io::Cursor::new(bytes.to_vec())));
                r.set_section(Some(wire::SectionContext::new(BITMAP_IDSTR, 3)));
                let res = loader.load(&mut r).and_then(|_| loader.load(&mut r));
                let sha = dst
                    .node("n")
                    .unwrap()
                    .with_bitmaps(|l| l.find("bm").map(|b| b.sha256_hex()));
                (res, sha)
            };
            let (plain, plain_setup) = stream(false);
            let (bytes, setup_len) = stream(true);
            let (res, sha) = load(&bytes, true);
            res.unwrap();
            assert_eq!(sha.as_deref(), Some(want.as_str()));
            // A flip in the last byte of the bits of the one buffer chunk: without digests the
            // destination ends with a different bitmap and no error.
            let flip_plain = plain_setup + (plain.len() - plain_setup) / 2;
            let mut bad = plain.clone();
            bad[flip_plain] ^= 0x01;
            let (res, sha) = load(&bad, false);
            res.unwrap();
            assert_ne!(
                sha.as_deref(),
                Some(want.as_str()),
                "undetected without digests"
            );
            // With digests, every byte of every chunk of the END body is covered.
            for at in (setup_len..bytes.len()).step_by(7) {
                let mut bad = bytes.clone();
                bad[at] ^= 0x10;
                let (res, _) = load(&bad, true);
                let e = res.expect_err(&format!("flip at {at} loaded")).to_string();
                assert!(
                    e.contains("integrity check failed")
                        || e.contains("Unknown")
                        || e.contains("at byte"),
                    "flip at {at}: {e}"
                );
            }
            // A flip in the bits themselves names the check, the chunk, the bitmap and node.
            let mut bad = bytes.clone();
            let at = setup_len + (bytes.len() - setup_len) / 2;
            bad[at] ^= 0x01;
            let e = load(&bad, true).0.unwrap_err().to_string();
            assert!(
                e.contains("integrity check failed: the dirty-bitmap chunk"),
                "{e}"
            );
            assert!(e.contains("in section 'dirty-bitmap' (id 3)"), "{e}");
            assert!(e.contains("(bitmap 'bm' on node 'n')"), "{e}");
        }

        /// What a source sends for `layer`'s bitmaps: the setup section's chunks and the
        /// complete section's chunks, each without its EOS.
        pub(super) fn sent(layer: &Arc<BlockLayer>) -> (Vec<Chunk>, Vec<Chunk>) {
            let out = Captured::default();
            let mut w: Writer = StreamWriter::new(Box::new(out.clone()));
            let mut saver = BitmapSaver::setup(layer.clone(), None).unwrap();
            saver.save_setup(&mut w).unwrap();
            saver.save_complete(&mut w).unwrap();
            w.flush().unwrap();
            saver.cleanup(false);
            let bytes = out.0.lock().unwrap().clone();
            let mut r = StreamReader::new(std::io::Cursor::new(bytes));
            let (mut setup, mut complete) = (Vec::new(), Vec::new());
            for list in [&mut setup, &mut complete] {
                loop {
                    let c = wire::bitmap::read_chunk(&mut r).unwrap();
                    if c.eos {
                        break;
                    }
                    list.push(c);
                }
            }
            (setup, complete)
        }

        /// The destination's `bm` after `setup` and `complete` are loaded into a node of
        /// `size` bytes — its granularity, sha256, and what a source holding it would send —
        /// and the warnings.
        #[allow(clippy::type_complexity)]
        pub(super) fn receive(
            size: u64,
            setup: &[Chunk],
            complete: &[Chunk],
        ) -> (Option<(u32, String, (Vec<Chunk>, Vec<Chunk>))>, Vec<String>) {
            let l = Arc::new(BlockLayer::new());
            l.blockdev_add(&json!({"driver": "null-co", "node-name": "n", "size": size}))
                .unwrap();
            let mut loader = BitmapLoader::new(l.clone(), None);
            let loaded = loader
                .load(&mut stream(setup))
                .and_then(|_| loader.load(&mut stream(complete)));
            let mut warnings = Vec::new();
            if let Err(e) = loaded {
                warnings.push(e.to_string());
                loader.cancel("the incoming migration failed");
            }
            warnings.extend(loader.before_vm_start());
            let got = l.node("n").unwrap().with_bitmaps(|list| {
                list.find("bm").map(|bm| {
                    let n = bm.serialization_size(0, size).unwrap();
                    let mut buf = vec![0; n as usize];
                    bm.serialize_part(&mut buf, 0, size).unwrap();
                    (bm.granularity(), bm.sha256_hex(), buf)
                })
            });
            let got = got.map(|(g, sha, buf)| {
                let again = source(size, g, &[]);
                again.node("n").unwrap().with_bitmaps(|list| {
                    let bm = list.find_mut("bm").unwrap();
                    bm.deserialize_part(&buf, 0, size, true).unwrap();
                });
                (g, sha, sent(&again))
            });
            (got, warnings)
        }

        /// How a patched field changes.
        #[derive(Debug, Clone)]
        enum Change {
            Set(u64),
            Add(i64),
            Double,
            Halve,
        }

        impl Change {
            fn apply(&self, v: u64) -> u64 {
                match self {
                    Change::Set(x) => *x,
                    Change::Add(d) => v.wrapping_add(*d as u64),
                    Change::Double => v.wrapping_mul(2),
                    Change::Halve => v / 2,
                }
            }
        }

        fn change() -> impl Strategy<Value = Change> {
            prop_oneof![
                any::<u64>().prop_map(Change::Set),
                (0u32..40).prop_map(|s| Change::Set(1 << s)),
                (-4096i64..4096).prop_map(Change::Add),
                (-64i64..64).prop_map(|d| Change::Add(d * 64)),
                Just(Change::Double),
                Just(Change::Halve),
            ]
        }

        /// One field of the stream, patched.
        #[derive(Debug, Clone)]
        enum Patch {
            /// START's granularity.
            Granularity(Change),
            /// BITS chunk i's start sector.
            Start(usize, Change),
            /// BITS chunk i's sector count.
            Sectors(usize, Change),
            /// BITS chunk i's buffer size (truncated, or extended with zeros).
            BufferLen(usize, Change),
        }

        fn patch() -> impl Strategy<Value = Patch> {
            prop_oneof![
                change().prop_map(Patch::Granularity),
                (0usize..8, change()).prop_map(|(i, c)| Patch::Start(i, c)),
                (0usize..8, change()).prop_map(|(i, c)| Patch::Sectors(i, c)),
                (0usize..8, change()).prop_map(|(i, c)| Patch::BufferLen(i, c)),
            ]
        }

        /// Applies `p`; false if it changed nothing (the field already had that value, or
        /// there is no such chunk).
        fn apply(p: &Patch, setup: &mut [Chunk], complete: &mut [Chunk]) -> bool {
            let mut bits: Vec<&mut Chunk> = complete
                .iter_mut()
                .filter(|c| matches!(c.payload, ChunkPayload::Bits { .. }))
                .collect();
            let n = bits.len();
            let chunk = |i: usize| i % n.max(1);
            match p {
                Patch::Granularity(c) => match &mut setup[0].payload {
                    ChunkPayload::Start { granularity, .. } => {
                        let new = c.apply(u64::from(*granularity)) as u32;
                        std::mem::replace(granularity, new) != new
                    }
                    _ => false,
                },
                Patch::Start(i, c) => match bits.get_mut(chunk(*i)).map(|c| &mut c.payload) {
                    Some(ChunkPayload::Bits { start_sector, .. }) => {
                        let new = c.apply(*start_sector);
                        std::mem::replace(start_sector, new) != new
                    }
                    _ => false,
                },
                Patch::Sectors(i, c) => match bits.get_mut(chunk(*i)).map(|c| &mut c.payload) {
                    Some(ChunkPayload::Bits { nr_sectors, .. }) => {
                        let new = c.apply(u64::from(*nr_sectors)) as u32;
                        std::mem::replace(nr_sectors, new) != new
                    }
                    _ => false,
                },
                Patch::BufferLen(i, c) => match bits.get_mut(chunk(*i)).map(|c| &mut c.payload) {
                    Some(ChunkPayload::Bits {
                        data: BitsData::Buffer(buf),
                        ..
                    }) => {
                        // Within what the wire can carry (a longer one fails the whole
                        // migration, tested elsewhere).
                        let new = (c.apply(buf.len() as u64) % 10240) as usize;
                        let changed = new != buf.len();
                        buf.resize(new, 0);
                        changed
                    }
                    _ => false,
                },
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn the_destination_has_the_sources_bitmap_or_none(
                gran_shift in 9u32..=22,
                sectors in 1u64..=(40 << 11),
                dirty in proptest::collection::vec((0.0f64..1.0, 0.0f64..0.05), 0..6),
                patch in patch(),
            ) {
                let granularity = 1u32 << gran_shift;
                let size = sectors * SECTOR_SIZE;
                let dirty: Vec<(u64, u64)> = dirty
                    .iter()
                    .map(|(at, len)| {
                        let off = (at * size as f64) as u64 % size;
                        let len = ((len * size as f64) as u64).clamp(1, size - off);
                        (off, len)
                    })
                    .collect();
                let src = source(size, granularity, &dirty);
                let want = src.node("n").unwrap().with_bitmaps(|l| l.find("bm").unwrap().sha256_hex());
                let (mut setup, mut complete) = sent(&src);
                let changed = apply(&patch, &mut setup, &mut complete);
                let (got, warnings) = receive(size, &setup, &complete);
                match got {
                    None => prop_assert!(!warnings.is_empty(), "dropped without a warning"),
                    Some((g, sha, _)) if g == granularity && sha == want => {
                        // The source's exact bitmap (a patch the checks could ignore, such
                        // as a shorter zero padding).
                    }
                    Some((g, sha, genuine)) => {
                        prop_assert!(changed, "an unpatched stream gave another bitmap");
                        prop_assert_eq!(
                            (setup, complete),
                            genuine,
                            "granularity {} sha {}: another bitmap from a stream no source sends",
                            g,
                            sha
                        );
                    }
                }
                if !changed {
                    prop_assert!(warnings.is_empty(), "{:?}", warnings);
                }
            }
        }
    }
}
