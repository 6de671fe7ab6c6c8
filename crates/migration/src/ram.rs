//! The `ram` section (QEMU's format, version 4): the source walks a dirty bitmap per RAM block
//! and sends each dirty page as a ZERO or PAGE record; the destination puts each page straight
//! into guest memory.
//!
//! Data path: a batch of up to [`BATCH`] records goes out in one vectored write whose slices
//! alternate record headers (built on a reused arena, no per-page allocation) and the guest
//! pages themselves, so a page is copied once, by the kernel. The bitmap is scanned a word at a
//! time. On the destination, each PAGE record's payload is read with `read_into` directly into
//! the guest mapping; a ZERO record for a page that is already zero touches nothing (a fresh
//! destination's untouched RAM stays unallocated).
//!
//! With `x-livemig-integrity` every batch (and the START body's block list) is closed by a
//! DIGEST record over its bytes (`wire::digest`). The source then copies the batch's pages
//! into a reused arena first and sends the copy: a running guest may write a page between
//! the digest and the kernel's copy, and the digest must be of the bytes that left. The
//! destination checks each batch at its DIGEST, before anything can run on the pages: a
//! precopy destination's guest runs only after the whole stream loaded, and a failed load
//! never runs it.

use crate::error::MigrationError;
use crate::guest::{RamBlock, PAGE_SIZE};
use crate::machine::{Reader, Writer};
use crate::postcopy::PostcopyRam;
use std::collections::HashMap;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use wire::ram::{
    read_mem_blocks, read_ram_record, write_digest, write_eos, write_mem_block, write_mem_size,
    BlockTracker, MemBlock, MemBlockFields, PageHeader, RamRecord, RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_ZERO,
};
use wire::WireErrorKind;

/// What a `ram` digest covers, in integrity errors.
use wire::digest::RAM_COVERS as RAM_DIGEST_COVERS;

/// The section's idstr.
pub const RAM_IDSTR: &str = "ram";
/// The section's version; QEMU accepts exactly this one.
pub const RAM_VERSION: u32 = 4;
/// Records per vectored write.
pub const BATCH: usize = 64;
/// Pages a postcopy main channel places with one ioctl at most. A guest waiting for a page
/// of a run waits until the whole run is read: 16 pages (64 KiB) cost no more CPU time per
/// GiB than 64 on the test machine (the system call is paid back by then), for a quarter of
/// the wait.
const POSTCOPY_RUN_PAGES: usize = 16;

/// Counters shared with `query-migrate` (updated by the migration thread, read by anyone).
#[derive(Default, Debug)]
pub struct RamCounters {
    /// Zero pages sent (`duplicate`).
    pub zero_pages: AtomicU64,
    /// Normal pages sent (`normal`).
    pub normal_pages: AtomicU64,
    /// Dirty pages still to send (`remaining` / 4096).
    pub remaining_pages: AtomicU64,
    /// Dirty-log synchronisations (`dirty-sync-count`).
    pub dirty_syncs: AtomicU64,
    /// Pages found dirty by the last synchronisation.
    pub last_sync_dirty: AtomicU64,
    /// Page requests answered in postcopy (`postcopy-requests`).
    pub postcopy_requests: AtomicU64,
    /// Pages sent on the `postcopy-preempt` channel (`x-livemig-postcopy`).
    pub preempt_pages: AtomicU64,
    /// Postcopy requests for pages already on their way on the main channel
    /// (`x-livemig-postcopy`): the request waits for the main channel's queue to drain.
    pub requested_in_flight: AtomicU64,
}

struct BlockState {
    /// The block; its mapping is borrowed from it (`region()`) whenever pages are read, so no
    /// handle to the memory outlives the block.
    block: Arc<dyn RamBlock>,
    pages: u64,
    /// Pages still to send in this pass, one bit each.
    dirty: Vec<u64>,
    /// Word index where the scan resumes.
    cursor: usize,
}

/// Why [`RamSaver::send`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Every page of the current pass has been sent.
    PassDone,
    /// The byte or time budget ran out first.
    Budget,
}

/// The source side of the `ram` section.
pub struct RamSaver {
    blocks: Vec<BlockState>,
    tracker: BlockTracker,
    headers: Vec<PageHeader>,
    counters: Arc<RamCounters>,
    /// The multifd channels, when they carry the pages: zero pages stay on the main stream
    /// (as ZERO records, as QEMU 7.2 sends them), every other page goes to a channel.
    multifd: Option<crate::multifd::send::Sender>,
    /// `x-livemig-integrity`: a DIGEST record closes every batch.
    integrity: bool,
    /// Where a batch's pages are copied with integrity on (BATCH pages, reused).
    arena: Vec<u8>,
}

/// Page `page` of `block`, straight from guest memory, for a vectored write.
#[inline]
pub(crate) fn page_slice(block: &dyn RamBlock, page: u64) -> Result<IoSlice<'_>, MigrationError> {
    block
        .region()
        .io_slice(page * PAGE_SIZE, PAGE_SIZE as usize)
        .ok_or_else(|| MigrationError::Other(format!("page {page} outside RAM block")))
}

fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

impl RamSaver {
    /// Prepares to send `blocks`; every page starts dirty (the first pass sends all RAM).
    pub fn new(blocks: Vec<Arc<dyn RamBlock>>, counters: Arc<RamCounters>) -> Self {
        let blocks = blocks
            .into_iter()
            .map(|block| {
                let pages = block.region().len() as u64 / PAGE_SIZE;
                let mut dirty = vec![u64::MAX; bitmap_words(pages)];
                if !pages.is_multiple_of(64) {
                    if let Some(last) = dirty.last_mut() {
                        *last = (1u64 << (pages % 64)) - 1;
                    }
                }
                BlockState {
                    block,
                    pages,
                    dirty,
                    cursor: 0,
                }
            })
            .collect::<Vec<_>>();
        let total: u64 = blocks.iter().map(|b| b.pages).sum();
        counters.remaining_pages.store(total, Ordering::Relaxed);
        RamSaver {
            blocks,
            tracker: BlockTracker::new(),
            headers: Vec::with_capacity(BATCH),
            counters,
            multifd: None,
            integrity: false,
            arena: Vec::new(),
        }
    }

    /// `x-livemig-integrity`: close every batch of records with a DIGEST record (pages are
    /// then sent from a copy, see the module doc).
    pub fn set_integrity(&mut self, on: bool) {
        self.integrity = on;
        self.arena = if on {
            vec![0; BATCH * PAGE_SIZE as usize]
        } else {
            Vec::new()
        };
    }

    /// From now on the pages that are not zero go over the multifd channels of `sender`.
    pub fn attach_multifd(&mut self, sender: crate::multifd::send::Sender) {
        self.multifd = Some(sender);
    }

    /// The multifd channels, when they carry the pages.
    pub fn multifd(&self) -> Option<&crate::multifd::send::Sender> {
        self.multifd.as_ref()
    }

    /// Ends the multifd channels (after the migration, whatever its outcome): see
    /// [`crate::multifd::send::Sender::finish`].
    pub fn finish_multifd(&mut self, ok: bool) {
        if let Some(m) = self.multifd.take() {
            m.finish(ok);
        }
    }

    /// Ends a section body: with multifd, first a sync point (every page queued so far is
    /// written on its channel, followed by a SYNC packet), then EOS — the destination loads
    /// nothing after the EOS until its channels have delivered every page sent before it.
    pub fn end_section(&mut self, w: &mut Writer) -> Result<(), MigrationError> {
        if let Some(m) = self.multifd.as_mut() {
            m.sync()?;
        }
        write_eos(w)?;
        Ok(())
    }

    /// Bytes sent so far: the stream's and those queued on the multifd channels.
    pub fn sent_bytes(&self, w: &Writer) -> u64 {
        w.bytes_written() + self.multifd.as_ref().map_or(0, |m| m.queued_bytes())
    }

    /// Total RAM in bytes.
    pub fn total_bytes(&self) -> u64 {
        self.blocks.iter().map(|b| b.pages * PAGE_SIZE).sum()
    }

    /// Dirty pages not yet sent.
    pub fn remaining_pages(&self) -> u64 {
        self.counters.remaining_pages.load(Ordering::Relaxed)
    }

    /// Writes the START body: the MEM_SIZE record with the block list, then EOS; and starts
    /// the dirty logs, so every write from now on is caught.
    pub fn setup(&mut self, w: &mut Writer) -> Result<(), MigrationError> {
        if self.integrity {
            w.digest_start();
        }
        write_mem_size(w, self.total_bytes())?;
        for b in &self.blocks {
            write_mem_block(
                w,
                &MemBlock {
                    name: b.block.name().to_string(),
                    used_length: b.pages * PAGE_SIZE,
                    page_size: None,
                    addr: None,
                },
            )?;
            b.block.start_dirty_log();
        }
        if self.integrity {
            write_digest(w)?;
        }
        self.end_section(w)?;
        Ok(())
    }

    /// Pulls the pages dirtied since the last sync into the bitmaps and restarts the pass.
    /// Returns how many pages are dirty now.
    pub fn sync(&mut self) -> u64 {
        let before = self.remaining_pages();
        let mut total = 0;
        for b in &mut self.blocks {
            b.block.sync_dirty_log(&mut b.dirty);
            b.cursor = 0;
            total += b
                .dirty
                .iter()
                .map(|w| u64::from(w.count_ones()))
                .sum::<u64>();
        }
        self.counters
            .remaining_pages
            .store(total, Ordering::Relaxed);
        self.counters.dirty_syncs.fetch_add(1, Ordering::Relaxed);
        self.counters
            .last_sync_dirty
            .store(total.saturating_sub(before), Ordering::Relaxed);
        total
    }

    /// Sends dirty pages until the pass is done, `max_bytes` more bytes have been written, or
    /// `deadline` passes (checked once per batch).
    pub fn send(
        &mut self,
        w: &mut Writer,
        max_bytes: u64,
        deadline: Option<Instant>,
    ) -> Result<SendOutcome, MigrationError> {
        let start_bytes = self.sent_bytes(w);
        // (block index, page) of the records in the current batch.
        let mut batch: Vec<(usize, u64, bool)> = Vec::with_capacity(BATCH);
        let nblocks = self.blocks.len();
        for bi in 0..nblocks {
            loop {
                // Collect up to BATCH dirty pages of this block, clearing their bits — fewer
                // when the byte budget is smaller, so a low `max-bandwidth` is not overshot by
                // a whole batch (it is by at most one page).
                let left = max_bytes.saturating_sub(self.sent_bytes(w) - start_bytes);
                let limit = left.div_ceil(PAGE_SIZE).clamp(1, BATCH as u64) as usize;
                batch.clear();
                {
                    let b = &mut self.blocks[bi];
                    let region = b.block.region();
                    while batch.len() < limit && b.cursor < b.dirty.len() {
                        let word = b.dirty[b.cursor];
                        if word == 0 {
                            b.cursor += 1;
                            continue;
                        }
                        let bit = u64::from(word.trailing_zeros());
                        b.dirty[b.cursor] &= !(1u64 << bit);
                        let page = b.cursor as u64 * 64 + bit;
                        if page < b.pages {
                            let zero = region.is_zero(page * PAGE_SIZE, PAGE_SIZE as usize);
                            batch.push((bi, page, zero));
                        }
                    }
                }
                if batch.is_empty() {
                    break;
                }
                self.write_batch(w, &batch)?;
                let sent = self.sent_bytes(w) - start_bytes;
                if sent >= max_bytes || deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(SendOutcome::Budget);
                }
            }
        }
        Ok(SendOutcome::PassDone)
    }

    fn write_batch(
        &mut self,
        w: &mut Writer,
        batch: &[(usize, u64, bool)],
    ) -> Result<(), MigrationError> {
        const FILL: [u8; 1] = [0];
        self.headers.clear();
        let (mut zeros, mut normals) = (0u64, 0u64);
        if let Some(m) = self.multifd.as_mut() {
            // Pages to the channels; only the zero pages' records go on the main stream.
            for &(bi, page, zero) in batch {
                if !zero {
                    m.queue_page(bi, &self.blocks[bi].block, page * PAGE_SIZE)?;
                    normals += 1;
                }
            }
        }
        let multifd = self.multifd.is_some();
        for &(bi, page, zero) in batch.iter().filter(|(_, _, zero)| !multifd || *zero) {
            let name = self.blocks[bi].block.name();
            let wire_name = self.tracker.encode(name);
            let flags = if zero {
                RAM_SAVE_FLAG_ZERO
            } else {
                RAM_SAVE_FLAG_PAGE
            };
            let h = PageHeader::new(wire_name, page * PAGE_SIZE, flags)
                .map_err(|k| MigrationError::Wire(w.error(k)))?;
            self.headers.push(h);
            if zero {
                zeros += 1;
            } else {
                normals += 1;
            }
        }
        if self.integrity {
            // Each page the digest covers is copied first (module doc): slot k of the arena
            // holds the k-th record's page.
            let on_main = batch.iter().filter(|(_, _, zero)| !multifd || *zero);
            for (slot, &(bi, page, zero)) in
                self.arena.chunks_exact_mut(PAGE_SIZE as usize).zip(on_main)
            {
                if !zero && !self.blocks[bi].block.region().read(page * PAGE_SIZE, slot) {
                    return Err(MigrationError::Other(format!(
                        "page {page} outside RAM block"
                    )));
                }
            }
            w.digest_start();
        }
        let mut iov = [IoSlice::new(&[]); 2 * BATCH];
        let mut n = 0;
        let on_main = batch.iter().filter(|(_, _, zero)| !multifd || *zero);
        let mut slots = self.arena.chunks_exact(PAGE_SIZE as usize);
        for (h, &(bi, page, zero)) in self.headers.iter().zip(on_main) {
            let copy = slots.next().filter(|_| self.integrity);
            iov[n] = IoSlice::new(h.as_bytes());
            iov[n + 1] = if zero {
                IoSlice::new(&FILL)
            } else if let Some(copy) = copy {
                IoSlice::new(copy)
            } else {
                page_slice(&*self.blocks[bi].block, page)?
            };
            n += 2;
        }
        if n > 0 {
            w.write_vectored_all(&mut iov[..n])?;
            if self.integrity {
                write_digest(w)?;
            }
        }
        self.counters.zero_pages.fetch_add(zeros, Ordering::Relaxed);
        self.counters
            .normal_pages
            .fetch_add(normals, Ordering::Relaxed);
        let _ =
            self.counters
                .remaining_pages
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    Some(r.saturating_sub(zeros + normals))
                });
        Ok(())
    }

    /// The POSTCOPY_RAM_DISCARD commands for every page still to send (call after the last
    /// [`sync`](Self::sync), with the guest stopped): the destination throws those pages away.
    pub fn discard_commands(&self) -> Vec<wire::command::Command> {
        self.blocks
            .iter()
            .flat_map(|b| {
                crate::postcopy::discard::discard_commands(b.block.name(), &b.dirty, b.pages)
            })
            .collect()
    }

    /// The postcopy switch: hands the pages still to send over to postcopy's
    /// [`crate::postcopy::source::SourceRam`] as `(block, pages, bitmap)` per block; the saver
    /// has nothing left to send afterwards.
    pub fn take_dirty(&mut self) -> Vec<(Arc<dyn RamBlock>, u64, Vec<u64>)> {
        self.blocks
            .iter_mut()
            .map(|b| {
                let words = b.dirty.len();
                (
                    b.block.clone(),
                    b.pages,
                    std::mem::replace(&mut b.dirty, vec![0; words]),
                )
            })
            .collect()
    }

    /// Stops the dirty logs (at the end of the migration, whatever its outcome).
    pub fn stop(&self) {
        for b in &self.blocks {
            b.block.stop_dirty_log();
        }
    }
}

/// The destination side of the `ram` section.
pub struct RamLoader {
    blocks: HashMap<String, Arc<dyn RamBlock>>,
    tracker: BlockTracker,
    /// Pages loaded (normal and zero), for statistics.
    pub pages_loaded: u64,
    /// Guest RAM in postcopy, once ADVISE said postcopy may come: precopy pages are marked
    /// received in it, and after LISTEN pages are placed through it.
    postcopy: Option<Arc<PostcopyRam>>,
    /// LISTEN was seen: pages are placed atomically, never written through the mapping.
    listening: bool,
    /// Where postcopy pages land before they are placed, a run at a time.
    postcopy_run: crate::postcopy::preempt::PageRun,
    /// The multifd channels' sync point, when they carry pages.
    multifd: Option<Arc<crate::multifd::recv::SyncPoint>>,
    /// The source syncs at MULTIFD_FLUSH records (QEMU 8.1+) rather than at every EOS
    /// (QEMU 7.2): set by the first FLUSH, which comes before the first EOS.
    flush_syncs: bool,
    /// `x-livemig-integrity`: every record is inside a digest run closed by a DIGEST record.
    integrity: bool,
    /// Records read in the current digest run (`None`: no run going).
    run: Option<u64>,
}

impl RamLoader {
    /// A loader for this VM's RAM blocks.
    pub fn new(blocks: Vec<Arc<dyn RamBlock>>) -> Self {
        let blocks = blocks
            .into_iter()
            .map(|b| (b.name().to_string(), b))
            .collect();
        RamLoader {
            blocks,
            tracker: BlockTracker::new(),
            pages_loaded: 0,
            postcopy: None,
            listening: false,
            postcopy_run: crate::postcopy::preempt::PageRun::new(1),
            multifd: None,
            flush_syncs: false,
            integrity: false,
            run: None,
        }
    }

    /// `x-livemig-integrity` (both ends agreed in the configuration section): every batch
    /// of records is checked against the DIGEST record that closes it.
    pub fn set_integrity(&mut self, on: bool) {
        self.integrity = on;
    }

    /// Pages come over multifd channels too: every end of a section (or MULTIFD_FLUSH
    /// record) waits at `sync` until the channels have loaded what was sent before it.
    pub fn set_multifd(&mut self, sync: Arc<crate::multifd::recv::SyncPoint>) {
        self.multifd = Some(sync);
    }

    /// ADVISE: from now on every page loaded is marked in `ram`'s received map.
    pub fn set_postcopy(&mut self, ram: Arc<PostcopyRam>) {
        self.postcopy = Some(ram);
    }

    /// LISTEN: from now on pages are placed through userfaultfd (the RAM is registered).
    pub fn start_listening(&mut self) {
        self.listening = true;
        self.postcopy_run = crate::postcopy::preempt::PageRun::new(POSTCOPY_RUN_PAGES);
    }

    fn mark_received(&self, name: Option<&str>, offset: u64) {
        if let (Some(pc), Some(name)) = (&self.postcopy, name) {
            if let Some(bi) = pc.block_index(name) {
                pc.mark_received(bi, offset);
            }
        }
    }

    /// One record in postcopy (`ram_load_postcopy`): only ZERO, PAGE and EOS are allowed.
    /// Returns true at EOS.
    fn load_postcopy_record(&mut self, r: &mut Reader) -> Result<bool, MigrationError> {
        let pc = self
            .postcopy
            .clone()
            .ok_or_else(|| MigrationError::Load("postcopy page without POSTCOPY_ADVISE".into()))?;
        match crate::postcopy::preempt::load_record(
            r,
            &mut self.tracker,
            &mut self.postcopy_run,
            &pc,
        )? {
            crate::postcopy::preempt::Loaded::Eos => Ok(true),
            crate::postcopy::preempt::Loaded::Page => {
                self.pages_loaded += 1;
                Ok(false)
            }
        }
    }

    /// The block a record names (or the last one named), checked to hold the page at
    /// `offset`.
    fn block(
        &mut self,
        r: &Reader,
        block: Option<&str>,
        offset: u64,
    ) -> Result<&dyn RamBlock, MigrationError> {
        let name = self
            .tracker
            .resolve(block)
            .map_err(|k| MigrationError::Wire(r.error(k)))?;
        let Some(b) = self.blocks.get(name) else {
            return Err(MigrationError::Load(format!(
                "Can't find block {name}: Illegal RAM offset {offset:x}"
            )));
        };
        if offset
            .checked_add(PAGE_SIZE)
            .is_none_or(|end| end > b.region().len() as u64)
        {
            return Err(MigrationError::Load(format!(
                "Illegal RAM offset {offset:x}"
            )));
        }
        Ok(&**b)
    }

    /// Loads one section body (START, PART or END): records up to EOS.
    pub fn load(&mut self, r: &mut Reader) -> Result<(), MigrationError> {
        if self.listening {
            // Pages staged by a section that failed half-way are not placed (see `PageRun`).
            self.postcopy_run.clear();
            while !self.load_postcopy_record(r)? {}
            return Ok(());
        }
        loop {
            if self.integrity && self.run.is_none() {
                r.digest_start();
                self.run = Some(0);
            }
            let record = read_ram_record(r)?;
            if let (Some(n), false) = (
                self.run.as_mut(),
                matches!(record, RamRecord::Eos | RamRecord::Digest),
            ) {
                *n += 1;
            }
            match record {
                RamRecord::Digest if self.integrity => {
                    wire::digest::check_value(r, RAM_DIGEST_COVERS)?;
                    self.run = None;
                }
                RamRecord::Digest => {
                    return Err(MigrationError::Load(format!(
                        "Unknown combination of migration flags: {:#x}",
                        wire::ram::RAM_SAVE_FLAG_LIVEMIG_DIGEST
                    )));
                }
                RamRecord::Eos => {
                    r.digest_finish();
                    if self.run.take().is_some_and(|n| n > 0) {
                        return Err(MigrationError::Wire(r.error(
                            WireErrorKind::IntegrityMissing {
                                what: RAM_DIGEST_COVERS,
                            },
                        )));
                    }
                    if let (Some(m), false) = (&self.multifd, self.flush_syncs) {
                        m.sync_main()?;
                    }
                    return Ok(());
                }
                RamRecord::MemSize { total } => {
                    let list = read_mem_blocks(r, total, |_| MemBlockFields::default())?;
                    for mb in list {
                        let Some(block) = self.blocks.get(&mb.name) else {
                            return Err(MigrationError::Load(format!(
                                "Unknown ramblock \"{}\", cannot accept migration",
                                mb.name
                            )));
                        };
                        let local = block.region().len() as u64;
                        if mb.used_length != local {
                            return Err(MigrationError::Load(format!(
                                "Size mismatch: {}: {:#x} != {:#x}: Invalid argument",
                                mb.name, mb.used_length, local
                            )));
                        }
                    }
                }
                RamRecord::Zero { block, offset, fill } => {
                    let region = self.block(r, block.as_deref(), offset)?.region();
                    if fill != 0 || !region.is_zero(offset, PAGE_SIZE as usize) {
                        region.with_slice_mut(offset, PAGE_SIZE as usize, |s| s.fill(fill));
                    }
                    self.pages_loaded += 1;
                    self.mark_received(block.as_deref().or(self.tracker.last()), offset);
                }
                RamRecord::Page { block, offset } => {
                    let region = self.block(r, block.as_deref(), offset)?.region();
                    region
                        .with_slice_mut(offset, PAGE_SIZE as usize, |s| r.read_into(s))
                        .ok_or_else(|| MigrationError::Load(format!("Illegal RAM offset {offset:x}")))??;
                    self.pages_loaded += 1;
                    self.mark_received(block.as_deref().or(self.tracker.last()), offset);
                }
                // QEMU 8.1's multifd sync point. Without multifd channels it is refused with
                // QEMU 7.2's words (7.2 knows no such flag); with them, a source that sends it
                // syncs there and not at EOS.
                RamRecord::MultifdFlush => {
                    let Some(m) = &self.multifd else {
                        return Err(MigrationError::Load(format!(
                            "Unknown combination of migration flags: {:#x}",
                            wire::ram::RAM_SAVE_FLAG_MULTIFD_FLUSH
                        )));
                    };
                    self.flush_syncs = true;
                    m.sync_main()?;
                }
                other => {
                    return Err(MigrationError::Load(format!(
                        "RAM record {other:?} is not supported (xbzrle, compression and RDMA are not implemented)"
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::MmapRamBlock;
    use crate::transport::BoxRead;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{GuestAddress, GuestRegionMmap, MmapRegion};
    use wire::{SectionContext, StreamReader, StreamWriter};

    const RAM: usize = 1 << 20;

    fn block(fill: impl Fn(u64) -> u8) -> Arc<MmapRamBlock> {
        let region = GuestRegionMmap::new(
            MmapRegion::<AtomicBitmap>::new(RAM).unwrap(),
            GuestAddress(0),
        )
        .unwrap();
        let b = MmapRamBlock::new("ram", Arc::new(region)).unwrap();
        // Every third page stays zero (ZERO records), the others carry data.
        for page in 0..(RAM as u64 / PAGE_SIZE) {
            if page % 3 != 0 {
                let bytes: Vec<u8> = (0..PAGE_SIZE).map(|i| fill(page * PAGE_SIZE + i)).collect();
                assert!(b.region().write(page * PAGE_SIZE, &bytes));
            }
        }
        Arc::new(b)
    }

    fn contents(b: &MmapRamBlock) -> Vec<u8> {
        let mut v = vec![0u8; RAM];
        assert!(b.region().read(0, &mut v));
        v
    }

    /// A writer whose bytes can be read back after the saver is done with it.
    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The setup body and one pass of pages, each up to its EOS, as a source sends them.
    fn stream(src: &Arc<MmapRamBlock>, integrity: bool) -> Vec<u8> {
        let out = Captured::default();
        let mut w: Writer = StreamWriter::new(Box::new(out.clone()));
        let mut saver = RamSaver::new(
            vec![src.clone() as Arc<dyn RamBlock>],
            Arc::new(RamCounters::default()),
        );
        saver.set_integrity(integrity);
        saver.setup(&mut w).unwrap();
        saver.send(&mut w, u64::MAX, None).unwrap();
        saver.end_section(&mut w).unwrap();
        w.flush().unwrap();
        let bytes = out.0.lock().unwrap().clone();
        bytes
    }

    fn load(bytes: &[u8], integrity: bool) -> (Result<(), MigrationError>, Vec<u8>) {
        let dst = block(|_| 0);
        let mut loader = RamLoader::new(vec![dst.clone() as Arc<dyn RamBlock>]);
        loader.set_integrity(integrity);
        let mut r: Reader =
            StreamReader::new(Box::new(std::io::Cursor::new(bytes.to_vec())) as BoxRead);
        r.set_section(Some(SectionContext::new(RAM_IDSTR, 2)));
        let res = loader.load(&mut r).and_then(|_| loader.load(&mut r));
        (res, contents(&dst))
    }

    /// `x-livemig-integrity`: RAM migrates whole with its digests; a bit flipped in a page,
    /// in a record header or in a digest fails the load with the check and the section
    /// named, where without the digests the same flip in a page completes with a corrupt
    /// page. A loader that wants digests refuses a stream without them, and one that does
    /// not refuses a DIGEST record as QEMU refuses an unknown flag.
    #[test]
    fn integrity_catches_flips_in_pages_headers_and_digests() {
        let src = block(|i| (i.wrapping_mul(0x9e37_79b9) >> 7) as u8 | 1);
        let want = contents(&src);
        let plain = stream(&src, false);
        let bytes = stream(&src, true);
        let (res, got) = load(&bytes, true);
        res.unwrap();
        assert!(got == want, "RAM differs after an integrity migration");

        // The first data page of the pass: page 1, after the setup body.
        let page1 = |s: &[u8]| {
            let hdr =
                (PAGE_SIZE | RAM_SAVE_FLAG_PAGE | wire::ram::RAM_SAVE_FLAG_CONTINUE).to_be_bytes();
            s.windows(8).position(|w| w == hdr).unwrap() + 8
        };
        let mut bad = plain.clone();
        bad[page1(&plain) + 100] ^= 0x01;
        let (res, got) = load(&bad, false);
        res.unwrap();
        assert!(got != want, "without digests the flip loads silently");

        let p = page1(&bytes);
        for (at, mask, what) in [
            (p + 100, 0x01, "a page"),
            (p - 2, 0x10, "a record header (page 1 becomes page 0)"),
            (bytes.len() - 8 - 3, 0x01, "the last digest"),
        ] {
            let mut bad = bytes.clone();
            bad[at] ^= mask;
            let e = load(&bad, true).0.unwrap_err().to_string();
            assert!(
                e.contains(
                    "in section 'ram' (id 2): integrity check failed: the batch of RAM records"
                ),
                "flip in {what}: {e}"
            );
        }

        let e = load(&plain, true).0.unwrap_err().to_string();
        assert!(
            e.contains("the batch of RAM records came without its digest"),
            "{e}"
        );
        let e = load(&bytes, false).0.unwrap_err().to_string();
        assert!(
            e.contains("Unknown combination of migration flags: 0x800"),
            "{e}"
        );
    }
}
