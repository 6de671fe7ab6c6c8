//! The source's guest RAM in postcopy: which pages are still to send, shared by the threads
//! that send them.
//!
//! Once the guest has stopped and the discard list is out, the dirty bitmaps of the precopy
//! saver become [`SourceRam`]: one atomic word per 64 pages. Two threads claim pages from it:
//! `migration-out` (the background push, a word at a time, and — without preempt — the
//! requested pages it is handed) and, with `postcopy-preempt`, `migration-rp`, which answers a
//! request the moment it reads it ([`PreemptSender`]). A claim is a `fetch_and` that clears the
//! page's bit and says whether it was still set, so every page is sent exactly once, on
//! whichever channel got to it first (QEMU's rule too: a request for a page already sent is
//! dropped, the page is on its way).
//!
//! [`PageWriter`] writes claimed pages as RAM records (ZERO or PAGE) on one channel; each
//! channel has its own "last block" state, as QEMU's destination keeps one per channel.

use crate::error::MigrationError;
use crate::guest::{RamBlock, PAGE_SIZE};
use crate::machine::Writer;
use crate::ram::{page_slice, RamCounters};
use crate::transport::ShutdownHandle;
use std::io::IoSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use wire::ram::{BlockTracker, PageHeader, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO};

/// Pages per vectored write.
pub const BATCH: usize = 64;

struct SourceBlock {
    block: Arc<dyn RamBlock>,
    pages: u64,
    /// Pages still to send, one bit each.
    dirty: Vec<AtomicU64>,
}

/// The source's RAM from the postcopy switch on (see the module doc).
pub struct SourceRam {
    blocks: Vec<SourceBlock>,
    counters: Arc<RamCounters>,
}

/// Where the background push resumes its scan.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cursor {
    block: usize,
    word: usize,
}

impl SourceRam {
    /// Takes over the dirty bitmaps of the precopy saver: `(block, pages, bitmap)` per block.
    pub fn new(
        blocks: Vec<(Arc<dyn RamBlock>, u64, Vec<u64>)>,
        counters: Arc<RamCounters>,
    ) -> Self {
        let blocks: Vec<SourceBlock> = blocks
            .into_iter()
            .map(|(block, pages, dirty)| SourceBlock {
                block,
                pages,
                dirty: dirty.into_iter().map(AtomicU64::new).collect(),
            })
            .collect();
        let ram = SourceRam { blocks, counters };
        ram.counters
            .remaining_pages
            .store(ram.remaining(), Ordering::Relaxed);
        ram
    }

    /// Pages not sent yet.
    pub fn remaining(&self) -> u64 {
        self.blocks
            .iter()
            .flat_map(|b| b.dirty.iter())
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// The blocks' names and sizes in pages, in order.
    pub fn blocks(&self) -> impl Iterator<Item = (&str, u64)> {
        self.blocks.iter().map(|b| (b.block.name(), b.pages))
    }

    /// Claims page `page` of block `bi`: true if it was still to send (and now is not).
    pub fn claim(&self, bi: usize, page: u64) -> bool {
        let Some(b) = self.blocks.get(bi) else {
            return false;
        };
        let Some(word) = b.dirty.get((page / 64) as usize) else {
            return false;
        };
        let bit = 1u64 << (page % 64);
        word.fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// Claims up to `max` pages still to send from `cursor` on (background push). Returns
    /// false once the whole of RAM has been scanned with nothing left.
    pub fn claim_next(&self, cursor: &mut Cursor, max: usize, out: &mut Vec<(usize, u64)>) -> bool {
        out.clear();
        while out.len() < max {
            let Some(b) = self.blocks.get(cursor.block) else {
                return !out.is_empty();
            };
            let Some(word) = b.dirty.get(cursor.word) else {
                cursor.block += 1;
                cursor.word = 0;
                continue;
            };
            let v = word.load(Ordering::Acquire);
            if v == 0 {
                cursor.word += 1;
                continue;
            }
            // The lowest `max - len` set bits.
            let mut mask = 0u64;
            let mut left = v;
            while left != 0 && out.len() + (mask.count_ones() as usize) < max {
                let low = left & left.wrapping_neg();
                mask |= low;
                left &= !low;
            }
            let got = word.fetch_and(!mask, Ordering::AcqRel) & mask;
            let mut g = got;
            while g != 0 {
                let bit = u64::from(g.trailing_zeros());
                g &= g - 1;
                let page = cursor.word as u64 * 64 + bit;
                if page < b.pages {
                    out.push((cursor.block, page));
                }
            }
        }
        true
    }

    /// Resolves a page request (REQ_PAGES / REQ_PAGES_ID) with QEMU's checks and messages:
    /// returns (block index, first page, end page).
    pub fn resolve_request(
        &self,
        block: &str,
        offset: u64,
        len: u64,
    ) -> Result<(usize, u64, u64), String> {
        let Some(bi) = self.blocks.iter().position(|b| b.block.name() == block) else {
            return Err(format!(
                "migrate_handle_rp_req_pages: invalid block name '{block}'"
            ));
        };
        if !offset.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(format!(
                "migrate_handle_rp_req_pages: Misaligned page request, start: {offset:x} len: {len}"
            ));
        }
        let first = offset / PAGE_SIZE;
        let end = first
            .checked_add(len / PAGE_SIZE)
            .filter(|e| *e <= self.blocks[bi].pages)
            .ok_or_else(|| {
                format!(
                    "ram_save_queue_pages request overrun, start={offset:x} len={len:x} blen={:x}",
                    self.blocks[bi].pages * PAGE_SIZE
                )
            })?;
        Ok((bi, first, end))
    }

    /// Recovery: the pages of block `bi` to send from now on are exactly `dirty` (what the
    /// destination has not received). Returns how many there are.
    pub fn set_dirty(&self, bi: usize, dirty: &[u64]) -> u64 {
        let Some(b) = self.blocks.get(bi) else {
            return 0;
        };
        let mut n = 0;
        for (w, v) in b
            .dirty
            .iter()
            .zip(dirty.iter().copied().chain(std::iter::repeat(0)))
        {
            w.store(v, Ordering::Release);
            n += u64::from(v.count_ones());
        }
        self.counters
            .remaining_pages
            .store(self.remaining(), Ordering::Relaxed);
        n
    }

    /// The counters pages are accounted in.
    pub fn counters(&self) -> &RamCounters {
        &self.counters
    }
}

/// Writes claimed pages as RAM records on one channel.
#[derive(Default)]
pub struct PageWriter {
    tracker: BlockTracker,
    headers: Vec<PageHeader>,
    zero: Vec<bool>,
}

impl PageWriter {
    /// A writer for a channel on which nothing was written yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new connection: the next record names its block again.
    pub fn reset(&mut self) {
        self.tracker = BlockTracker::new();
    }

    /// Writes `pages` (block index, page) of `ram` — ZERO records for zero pages, PAGE records
    /// with the guest page otherwise — in vectored writes of up to [`BATCH`] records.
    pub fn write(
        &mut self,
        w: &mut Writer,
        ram: &SourceRam,
        pages: &[(usize, u64)],
    ) -> Result<(), MigrationError> {
        const FILL: [u8; 1] = [0];
        for chunk in pages.chunks(BATCH) {
            self.headers.clear();
            self.zero.clear();
            for &(bi, page) in chunk {
                let b = ram
                    .blocks
                    .get(bi)
                    .ok_or_else(|| MigrationError::Other(format!("no RAM block number {bi}")))?;
                let zero = b
                    .block
                    .region()
                    .is_zero(page * PAGE_SIZE, PAGE_SIZE as usize);
                let flags = if zero {
                    RAM_SAVE_FLAG_ZERO
                } else {
                    RAM_SAVE_FLAG_PAGE
                };
                let name = self.tracker.encode(b.block.name());
                let h = PageHeader::new(name, page * PAGE_SIZE, flags)
                    .map_err(|k| MigrationError::Wire(w.error(k)))?;
                self.headers.push(h);
                self.zero.push(zero);
            }
            let mut iov = [IoSlice::new(&[]); 2 * BATCH];
            let mut n = 0;
            for ((h, &(bi, page)), &zero) in self.headers.iter().zip(chunk).zip(&self.zero) {
                iov[n] = IoSlice::new(h.as_bytes());
                iov[n + 1] = if zero {
                    IoSlice::new(&FILL)
                } else {
                    page_slice(&*ram.blocks[bi].block, page)?
                };
                n += 2;
            }
            w.write_vectored_all(&mut iov[..n])?;
            let zeros = self.zero.iter().filter(|z| **z).count() as u64;
            let c = &ram.counters;
            c.zero_pages.fetch_add(zeros, Ordering::Relaxed);
            c.normal_pages
                .fetch_add(chunk.len() as u64 - zeros, Ordering::Relaxed);
            let _ = c
                .remaining_pages
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                    Some(r.saturating_sub(chunk.len() as u64))
                });
        }
        Ok(())
    }
}

struct PreemptChannel {
    w: Writer,
    pages: PageWriter,
}

/// The source's end of the `postcopy-preempt` channel: requested pages go out on it as bare
/// RAM records (no section, no header), written by the return-path thread as soon as it has
/// read the request. Its lock is held across the socket write; `migration-out` takes it only
/// to end the channel (EOS) or to replace it after a recovery. The shutdown handle is kept
/// outside the lock so a pause or a cut can unblock a writer stuck on a dead peer.
pub struct PreemptSender {
    ram: Arc<SourceRam>,
    channel: Mutex<Option<PreemptChannel>>,
    shutdown: Mutex<Option<ShutdownHandle>>,
}

impl PreemptSender {
    /// A sender of `ram`'s pages on channel `w` (whose shutdown handle is `shutdown`).
    pub fn new(ram: Arc<SourceRam>, w: Writer, shutdown: ShutdownHandle) -> Self {
        PreemptSender {
            ram,
            channel: Mutex::new(Some(PreemptChannel {
                w,
                pages: PageWriter::new(),
            })),
            shutdown: Mutex::new(Some(shutdown)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PreemptChannel>> {
        self.channel.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The RAM it sends from.
    pub fn ram(&self) -> &Arc<SourceRam> {
        &self.ram
    }

    /// Answers a request for pages `first..end` of block `bi`: the pages still to send are
    /// claimed and written, then the channel is flushed. Returns how many went out.
    pub fn answer(&self, bi: usize, first: u64, end: u64) -> Result<u64, MigrationError> {
        let mut claimed = Vec::new();
        for page in first..end {
            if self.ram.claim(bi, page) {
                claimed.push((bi, page));
            }
        }
        if claimed.is_empty() {
            self.ram
                .counters
                .requested_in_flight
                .fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        }
        let mut guard = self.lock();
        let Some(ch) = guard.as_mut() else {
            // Paused: the pages go back to the background's set, a recovery resends them.
            self.unclaim(&claimed);
            return Err(MigrationError::Other(
                "the postcopy preempt channel is down".into(),
            ));
        };
        let r = ch
            .pages
            .write(&mut ch.w, &self.ram, &claimed)
            .and_then(|()| ch.w.flush().map_err(MigrationError::from));
        if let Err(e) = r {
            *guard = None;
            return Err(e);
        }
        self.ram
            .counters
            .preempt_pages
            .fetch_add(claimed.len() as u64, Ordering::Relaxed);
        Ok(claimed.len() as u64)
    }

    fn unclaim(&self, pages: &[(usize, u64)]) {
        for &(bi, page) in pages {
            if let Some(w) = self
                .ram
                .blocks
                .get(bi)
                .and_then(|b| b.dirty.get((page / 64) as usize))
            {
                w.fetch_or(1u64 << (page % 64), Ordering::AcqRel);
            }
        }
    }

    /// The end of postcopy: EOS on the channel, which ends the destination's preempt thread.
    pub fn finish(&self) -> Result<(), MigrationError> {
        let mut guard = self.lock();
        let ch = guard
            .as_mut()
            .ok_or_else(|| MigrationError::Other("the postcopy preempt channel is down".into()))?;
        wire::ram::write_eos(&mut ch.w)?;
        ch.w.flush()?;
        Ok(())
    }

    /// Shuts the channel down (a pause, a cut, the end of a failed migration); a writer
    /// blocked on it returns.
    pub fn shutdown(&self) {
        if let Some(h) = self
            .shutdown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            h.shutdown();
        }
    }

    /// Drops the channel after a failure: requests fail until [`replace`](Self::replace).
    pub fn detach(&self) {
        self.shutdown();
        *self.lock() = None;
    }

    /// A recovery's new channel.
    pub fn replace(&self, w: Writer, shutdown: ShutdownHandle) {
        *self.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = Some(shutdown);
        *self.lock() = Some(PreemptChannel {
            w,
            pages: PageWriter::new(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(pages: u64, dirty: Vec<u64>) -> SourceRam {
        use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion};
        let mapping =
            MmapRegion::<vm_memory::bitmap::AtomicBitmap>::new((pages * PAGE_SIZE) as usize)
                .unwrap();
        let region = Arc::new(GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap());
        // Page 1 is not zero.
        region
            .write_slice(&[7], MemoryRegionAddress(PAGE_SIZE))
            .unwrap();
        let b: Arc<dyn RamBlock> =
            Arc::new(crate::guest::MmapRamBlock::new("pc.ram", region).unwrap());
        SourceRam::new(vec![(b, pages, dirty)], Arc::default())
    }

    #[test]
    fn each_page_is_claimed_once() {
        let r = ram(130, vec![u64::MAX, u64::MAX, 0b11]);
        assert_eq!(r.remaining(), 130);
        assert!(r.claim(0, 70));
        assert!(!r.claim(0, 70));
        let mut c = Cursor::default();
        let mut out = Vec::new();
        let mut all = Vec::new();
        while r.claim_next(&mut c, 50, &mut out) {
            assert!(out.len() <= 50);
            all.extend(out.iter().map(|p| p.1));
        }
        assert_eq!(all.len(), 129);
        assert!(!all.contains(&70));
        assert_eq!(r.remaining(), 0);
        assert!(!r.claim(0, 5));
    }

    #[test]
    fn requests_are_checked_as_qemu_checks_them() {
        let r = ram(16, vec![0xffff]);
        assert_eq!(r.resolve_request("pc.ram", 4096, 8192), Ok((0, 1, 3)));
        assert_eq!(
            r.resolve_request("nope", 0, 4096).unwrap_err(),
            "migrate_handle_rp_req_pages: invalid block name 'nope'"
        );
        assert!(r
            .resolve_request("pc.ram", 100, 4096)
            .unwrap_err()
            .contains("Misaligned"));
        assert!(r
            .resolve_request("pc.ram", 15 * 4096, 8192)
            .unwrap_err()
            .contains("overrun"));
    }

    #[test]
    fn preempt_records_name_the_block_once_per_channel() {
        let r = Arc::new(ram(8, vec![0xff]));
        let buf = Arc::new(Mutex::new(Vec::new()));
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let w: Writer = wire::StreamWriter::new(Box::new(Sink(buf.clone())));
        let p = PreemptSender::new(r.clone(), w, ShutdownHandle::default());
        assert_eq!(p.answer(0, 1, 2).unwrap(), 1);
        assert_eq!(p.answer(0, 1, 3).unwrap(), 1, "page 1 went already");
        p.finish().unwrap();
        let bytes = buf.lock().unwrap().clone();
        let mut rd = wire::StreamReader::new(std::io::Cursor::new(bytes));
        use wire::ram::{read_ram_record, RamRecord};
        assert_eq!(
            read_ram_record(&mut rd).unwrap(),
            RamRecord::Page {
                block: Some("pc.ram".into()),
                offset: 4096
            }
        );
        let mut page = vec![0u8; 4096];
        rd.read_into(&mut page).unwrap();
        assert_eq!(page[0], 7);
        assert_eq!(
            read_ram_record(&mut rd).unwrap(),
            RamRecord::Zero {
                block: None,
                offset: 8192,
                fill: 0
            }
        );
        assert_eq!(read_ram_record(&mut rd).unwrap(), RamRecord::Eos);
        assert_eq!(r.remaining(), 6);
        assert_eq!(r.counters().normal_pages.load(Ordering::Relaxed), 1);
    }
}
