//! Decoding: the walk over the stream — header, configuration, sections record by record
//! (`ram`, `dirty-bitmap`), opaque sections up to their footer, commands, the trailer and the
//! FULL sections decoded against it — into the items and summaries of an [`super::Analysis`].

use super::report::{command_detail, ram_detail};
use super::*;

pub(super) struct Analyzer<'o> {
    pub(super) opts: &'o AnalyzeOptions,
    pub(super) summary: Summary,
    pub(super) sections: HashMap<u32, String>,
    pub(super) ram_blocks: BlockTracker,
    pub(super) bitmap_names: NameTracker,
}

pub(super) type Res<T> = std::result::Result<T, WireError>;

#[derive(Default)]
pub(super) struct RamTally {
    pub(super) mem_size: Option<(u64, usize)>,
    pub(super) normal: u64,
    pub(super) zero: u64,
    pub(super) xbzrle: u64,
    pub(super) compressed: u64,
    pub(super) flush: u64,
    pub(super) hook: u64,
}

impl Analyzer<'_> {
    pub(super) fn run<R: Read>(&mut self, r: &mut StreamReader<R>) -> Res<()> {
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
    pub(super) fn items<R: Read>(&mut self, r: &mut StreamReader<R>, depth: usize) -> Res<()> {
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

    pub(super) fn section<R: Read>(
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

    pub(super) fn push(&mut self, item: ItemRun) {
        if let Some(last) = self.summary.items.last_mut() {
            if last.same_as(&item) {
                last.count += 1;
                last.bytes = last.bytes.saturating_add(item.bytes);
                return;
            }
        }
        self.summary.items.push(item);
    }

    pub(super) fn block(&mut self, name: &str) -> &mut RamBlockCounts {
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

    /// The stream's configuration turns `x-livemig-integrity` on: its RAM batches and bitmap
    /// chunks carry digests, checked here as the destination checks them.
    fn integrity(&self) -> bool {
        self.summary
            .configuration
            .as_ref()
            .and_then(|c| c.capabilities.as_ref())
            .is_some_and(|caps| caps.iter().any(|c| c == crate::digest::CAPABILITY))
    }

    pub(super) fn ram_body<R: Read>(&mut self, r: &mut StreamReader<R>) -> Res<RamTally> {
        let mut t = RamTally::default();
        let integrity = self.integrity();
        // Records in the digest run going (the loader's rule: a run is closed by a DIGEST
        // record, and one with records in it may not end at EOS).
        let mut run: Option<u64> = None;
        loop {
            if integrity && run.is_none() {
                r.digest_start();
                run = Some(0);
            }
            let at = r.offset();
            let rec = read_ram_record(r)?;
            if let (Some(n), false) = (
                run.as_mut(),
                matches!(rec, RamRecord::Eos | RamRecord::Digest),
            ) {
                *n += 1;
            }
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
                RamRecord::Digest if integrity => {
                    crate::digest::check_value(r, crate::digest::RAM_COVERS)?;
                    self.summary.integrity_digests += 1;
                    run = None;
                }
                // A DIGEST record in a stream whose configuration does not announce the
                // capability (or that has no configuration section): stepped over, as the
                // analyzer reads what a loader would refuse.
                RamRecord::Digest => r.skip(8)?,
                RamRecord::Eos => {
                    r.digest_finish();
                    if run.is_some_and(|n| n > 0) {
                        return Err(r.error(WireErrorKind::IntegrityMissing {
                            what: crate::digest::RAM_COVERS,
                        }));
                    }
                    return Ok(t);
                }
            }
        }
    }

    pub(super) fn bitmap_entry(&mut self, node: &str, bitmap: &str) -> &mut BitmapSummary {
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

    pub(super) fn bitmap_body<R: Read>(&mut self, r: &mut StreamReader<R>) -> Res<String> {
        let (mut starts, mut bits, mut completes) = (0u64, 0u64, 0u64);
        let integrity = self.integrity();
        loop {
            if integrity {
                r.digest_start();
            }
            let c = read_chunk(r)?;
            if integrity {
                crate::digest::check_value(r, crate::digest::BITMAP_CHUNK_COVERS)?;
                self.summary.integrity_digests += 1;
            }
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
    pub(super) fn opaque_body<R: Read>(
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
    pub(super) fn plausible_next(&self, after: &[u8], at_end: bool, depth: usize) -> Option<bool> {
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
    pub(super) fn decode_devices(&mut self) {
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
