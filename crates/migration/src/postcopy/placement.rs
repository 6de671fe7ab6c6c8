//! [`PostcopyRam`]: the destination's guest RAM during an incoming postcopy migration.
//!
//! It ties together, per RAM block, the host range, the received map, and for the whole
//! migration the userfaultfd, the pending requests and the blocktime tracker. The loader uses it
//! from ADVISE on (discards, received bits of precopy pages); from LISTEN on, the listen and
//! preempt threads place pages with it and the fault thread classifies faults with it. Every
//! method takes `&self`: the threads share one `Arc<PostcopyRam>`, and nothing in it is held
//! across a wait (see `docs/postcopy.md` §3).

use super::blocktime::Blocktime;
use super::discard::check_range;
use super::received::ReceivedMap;
use super::requests::{FaultAction, Requests};
use super::uffd::{self, HostRange, PostcopyFd, RunStep};
use super::PostcopyError;
use crate::guest::{RamBlock, PAGE_SIZE};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use wire::command::DiscardRange;

/// One RAM block in postcopy.
pub struct PostcopyBlock {
    name: String,
    range: HostRange,
    received: ReceivedMap,
}

impl PostcopyBlock {
    /// The block's name on the wire.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its received map.
    pub fn received(&self) -> &ReceivedMap {
        &self.received
    }

    /// Its host range.
    pub fn range(&self) -> &HostRange {
        &self.range
    }
}

/// What a fault calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Ask the source for `offset` (page-aligned) of block `block`.
    Request {
        /// Block index.
        block: usize,
        /// Byte offset of the page in the block.
        offset: u64,
    },
    /// The page is already requested; the faulting thread waits with the others.
    Pending,
    /// The page arrived between the fault and now; its waiters were woken.
    Woken,
}

/// Counters for `query-migrate` and benchmarks.
#[derive(Debug, Default)]
pub struct PlacementStats {
    /// Pages placed with UFFDIO_COPY.
    pub copied: AtomicU64,
    /// Pages placed with UFFDIO_ZEROPAGE.
    pub zeroed: AtomicU64,
    /// Pages that arrived when already present (both channels sent them).
    pub duplicates: AtomicU64,
    /// Faults read from the userfaultfd.
    pub faults: AtomicU64,
    /// Records read from the `postcopy-preempt` channel.
    pub preempt_pages: AtomicU64,
    /// Placement ioctls that placed pages (`copied + zeroed` over this is the mean run).
    pub placements: AtomicU64,
}

/// The destination's guest RAM in postcopy.
pub struct PostcopyRam {
    blocks: Vec<PostcopyBlock>,
    /// The RAM blocks whose mappings `blocks` point into, kept alive with them.
    _keep: Vec<Arc<dyn RamBlock>>,
    uffd: Option<PostcopyFd>,
    registered: AtomicBool,
    thp_off: AtomicBool,
    requests: Requests,
    blocktime: Option<Blocktime>,
    /// Placement and fault counters.
    pub stats: PlacementStats,
}

impl PostcopyRam {
    /// Guest RAM made of `blocks` (name, host range). `uffd` is the userfaultfd when RAM is
    /// postcopied (none in a bitmap-only postcopy); `vcpu_tids` turns on blocktime accounting.
    pub fn new(
        blocks: Vec<(String, HostRange)>,
        uffd: Option<PostcopyFd>,
        vcpu_tids: Option<&[i32]>,
    ) -> Self {
        PostcopyRam {
            _keep: Vec::new(),
            blocks: blocks
                .into_iter()
                .map(|(name, range)| PostcopyBlock {
                    received: ReceivedMap::new(range.len() as u64 / PAGE_SIZE),
                    name,
                    range,
                })
                .collect(),
            uffd,
            registered: AtomicBool::new(false),
            thp_off: AtomicBool::new(false),
            requests: Requests::default(),
            blocktime: vcpu_tids.map(Blocktime::new),
            stats: PlacementStats::default(),
        }
    }

    /// The guest RAM of a VMM's RAM blocks (kept alive by the value).
    pub fn from_blocks(
        blocks: Vec<Arc<dyn RamBlock>>,
        uffd: Option<PostcopyFd>,
        vcpu_tids: Option<&[i32]>,
    ) -> Self {
        let mut ram = Self::new(uffd::ranges_of(&blocks), uffd, vcpu_tids);
        ram._keep = blocks;
        ram
    }

    /// The blocks.
    pub fn blocks(&self) -> &[PostcopyBlock] {
        &self.blocks
    }

    /// The index of block `name`.
    pub fn block_index(&self, name: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.name == name)
    }

    /// The block at `index`, or the error a page record naming it gets.
    pub fn block(&self, index: usize) -> Result<&PostcopyBlock, PostcopyError> {
        self.blocks
            .get(index)
            .ok_or_else(|| PostcopyError::BadPage(format!("no RAM block number {index}")))
    }

    /// The userfaultfd, when RAM is postcopied.
    pub fn uffd(&self) -> Option<&PostcopyFd> {
        self.uffd.as_ref()
    }

    /// The pending requests.
    pub fn requests(&self) -> &Requests {
        &self.requests
    }

    /// The blocktime tracker, with `postcopy-blocktime`.
    pub fn blocktime(&self) -> Option<&Blocktime> {
        self.blocktime.as_ref()
    }

    /// ADVISE: all of RAM is thrown away and nothing counts as received.
    pub fn discard_all(&self) -> Result<(), PostcopyError> {
        for b in &self.blocks {
            uffd::discard(&b.range, 0, b.range.len())?;
            b.received.clear();
        }
        Ok(())
    }

    /// A page loaded the precopy way (straight into the mapping, before LISTEN).
    pub fn mark_received(&self, block: usize, offset: u64) {
        if let Some(b) = self.blocks.get(block) {
            b.received.set(offset / PAGE_SIZE);
        }
    }

    /// A POSTCOPY_RAM_DISCARD range for block `name`, checked, then discarded. The first one
    /// turns transparent huge pages off on guest RAM, so a discard really frees 4 KiB pages.
    ///
    /// Between a discard and [`register`](Self::register) nothing may touch the discarded
    /// pages: a read would map the shared zero page, which then counts as present, and the
    /// page that arrives later could not be placed. (The guest is stopped then, and device
    /// state loads only after LISTEN.)
    pub fn discard(&self, name: &str, range: &DiscardRange) -> Result<(), PostcopyError> {
        let bi = self.block_index(name).ok_or_else(|| {
            PostcopyError::BadDiscard(format!("ram_discard_range: Failed to find block '{name}'"))
        })?;
        let b = &self.blocks[bi];
        let (first, count) = check_range(name, b.range.len() as u64, range)?;
        if !self.thp_off.swap(true, Ordering::AcqRel) {
            for b in &self.blocks {
                uffd::no_huge_pages(&b.range);
            }
        }
        b.received.clear_range(first, count);
        uffd::discard(&b.range, range.start, range.length as usize)
    }

    /// LISTEN: registers every block with the userfaultfd. A no-op without one.
    pub fn register(&self) -> Result<(), PostcopyError> {
        let Some(fd) = &self.uffd else {
            return Ok(());
        };
        for (i, b) in self.blocks.iter().enumerate() {
            if let Err(e) = fd.register(&b.range) {
                for b in &self.blocks[..i] {
                    let _ = fd.unregister(&b.range);
                }
                return Err(e);
            }
        }
        self.registered.store(true, Ordering::Release);
        Ok(())
    }

    /// The end of postcopy: unregisters every block (missing pages, if any were left, would
    /// read as zero from now on — which is why this runs only once everything has arrived).
    pub fn unregister(&self) {
        if let Some(fd) = &self.uffd {
            if self.registered.swap(false, Ordering::AcqRel) {
                for b in &self.blocks {
                    let _ = fd.unregister(&b.range);
                }
            }
        }
    }

    /// Whether page `offset` of block `block` is in place.
    pub fn is_received(&self, block: usize, offset: u64) -> bool {
        self.blocks
            .get(block)
            .is_some_and(|b| b.received.test(offset / PAGE_SIZE))
    }

    /// Checks that the `pages` pages at `offset` lie inside block `block`, and returns it.
    fn check_run(
        &self,
        block: usize,
        offset: u64,
        pages: u64,
    ) -> Result<&PostcopyBlock, PostcopyError> {
        let b = self.block(block)?;
        if pages == 0
            || !offset.is_multiple_of(PAGE_SIZE)
            || pages
                .checked_mul(PAGE_SIZE)
                .and_then(|len| offset.checked_add(len))
                .is_none_or(|end| end > b.range.len() as u64)
        {
            return Err(PostcopyError::BadPage(format!(
                "Illegal RAM offset {offset:x}"
            )));
        }
        Ok(b)
    }

    /// Checks that a page record's offset names a whole page of block `block` (before its
    /// payload is read).
    pub fn check_page(&self, block: usize, offset: u64) -> Result<(), PostcopyError> {
        self.check_run(block, offset, 1).map(|_| ())
    }

    /// Places a page that arrived in postcopy (`data`, one page, from the caller's staging
    /// buffer) atomically. Returns whether this call placed it (false: it was already there).
    pub fn place_page(
        &self,
        block: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<bool, PostcopyError> {
        if data.len() != PAGE_SIZE as usize {
            return Err(PostcopyError::BadPage(format!(
                "a page to place has {} bytes, not {PAGE_SIZE}",
                data.len()
            )));
        }
        Ok(self.place_run(block, offset, 1, Some(data))? == 1)
    }

    /// Places a zero page that arrived in postcopy. Returns whether this call placed it.
    pub fn place_zero(&self, block: usize, offset: u64) -> Result<bool, PostcopyError> {
        Ok(self.place_run(block, offset, 1, None)? == 1)
    }

    /// Places a run of pages that arrived in postcopy, contiguous in block `block` from
    /// `offset`: `data` holds them all (a whole number of pages). Returns how many this call
    /// placed; the others were there already.
    pub fn place_pages(
        &self,
        block: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<u64, PostcopyError> {
        if data.is_empty() || !data.len().is_multiple_of(PAGE_SIZE as usize) {
            return Err(PostcopyError::BadPage(format!(
                "pages to place have {} bytes, not a multiple of {PAGE_SIZE}",
                data.len()
            )));
        }
        self.place_run(block, offset, data.len() as u64 / PAGE_SIZE, Some(data))
    }

    /// Places a run of `pages` zero pages, contiguous in block `block` from `offset`. Returns
    /// how many this call placed.
    pub fn place_zeros(&self, block: usize, offset: u64, pages: u64) -> Result<u64, PostcopyError> {
        self.place_run(block, offset, pages, None)
    }

    /// The placement path (`docs/postcopy.md` §4): the pages of the run not in the received
    /// map yet go in with one ioctl per stretch between received pages — `UFFDIO_COPY` from
    /// `data`, or `UFFDIO_ZEROPAGE` without it. A page placed meanwhile by the other channel
    /// stops the kernel there; the rest of the run is placed after it. Every page this call
    /// placed is then marked received, its request completed and its vCPUs' blocktime ended,
    /// in that order (the fault thread relies on it: see [`on_fault`](Self::on_fault)).
    fn place_run(
        &self,
        block: usize,
        offset: u64,
        pages: u64,
        data: Option<&[u8]>,
    ) -> Result<u64, PostcopyError> {
        let begun = Instant::now();
        let b = self.check_run(block, offset, pages)?;
        let fd = || {
            self.uffd.as_ref().ok_or_else(|| {
                PostcopyError::BadPage("a postcopy page arrived without postcopy-ram".into())
            })
        };
        let first = offset / PAGE_SIZE;
        let p = PAGE_SIZE as usize;
        let mut placed = 0;
        let mut i = 0u64;
        while i < pages {
            if b.received.test(first + i) {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                i += 1;
                continue;
            }
            let mut end = i + 1;
            while end < pages && !b.received.test(first + end) {
                end += 1;
            }
            let at = offset + i * PAGE_SIZE;
            let step = match data {
                Some(d) => {
                    let bytes = d
                        .get(i as usize * p..end as usize * p)
                        .ok_or_else(|| PostcopyError::BadPage("a short run of pages".into()))?;
                    fd()?.copy_run(&b.range, at, bytes)?
                }
                None => fd()?.zero_run(&b.range, at, (end - i) as usize * p)?,
            };
            match step {
                RunStep::Placed(n) => {
                    let n = n as u64;
                    self.after_placement(block, b, first + i, n, data.is_none(), begun);
                    placed += n;
                    i += n;
                }
                RunStep::FirstPresent => {
                    // Placed by the other channel, which marks it received too.
                    b.received.set(first + i);
                    self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            }
        }
        Ok(placed)
    }

    fn after_placement(
        &self,
        bi: usize,
        b: &PostcopyBlock,
        first: u64,
        n: u64,
        zero: bool,
        begun: Instant,
    ) {
        b.received.set_range(first, n);
        if zero {
            self.stats.zeroed.fetch_add(n, Ordering::Relaxed);
        } else {
            self.stats.copied.fetch_add(n, Ordering::Relaxed);
        }
        self.stats.placements.fetch_add(1, Ordering::Relaxed);
        self.requests
            .placed_range(bi, first, n, begun, Instant::now());
        if let Some(bt) = &self.blocktime {
            bt.end_range(
                b.range.base_addr() as u64 + first * PAGE_SIZE,
                n * PAGE_SIZE,
                bt.now(),
            );
        }
    }

    /// The fault thread's decision for a fault at host address `addr` by thread `tid`.
    pub fn on_fault(&self, addr: usize, tid: i32) -> Result<FaultOutcome, PostcopyError> {
        self.stats.faults.fetch_add(1, Ordering::Relaxed);
        let (bi, b, offset) = self
            .blocks
            .iter()
            .enumerate()
            .find_map(|(i, b)| b.range.offset_of(addr).map(|o| (i, b, o)))
            .ok_or_else(|| {
                PostcopyError::BadPage(format!(
                    "postcopy_ram_fault_thread: Fault outside guest: {addr:x}"
                ))
            })?;
        let offset = offset - offset % PAGE_SIZE;
        let page = offset / PAGE_SIZE;
        let page_addr = b.range.base_addr() as u64 + offset;
        if let Some(bt) = &self.blocktime {
            bt.begin(page_addr, tid, bt.now(), || b.received.test(page));
        }
        if b.received.test(page) {
            self.wake(b, offset)?;
            return Ok(FaultOutcome::Woken);
        }
        match self.requests.fault(bi, page, Instant::now()) {
            FaultAction::AlreadyRequested => Ok(FaultOutcome::Pending),
            FaultAction::Request => {
                // Placed between the test above and the insert: placement found no request
                // to complete, so withdraw it and wake instead of asking for a page that is here.
                if b.received.test(page) {
                    self.requests.withdraw(bi, page);
                    self.wake(b, offset)?;
                    return Ok(FaultOutcome::Woken);
                }
                Ok(FaultOutcome::Request { block: bi, offset })
            }
        }
    }

    fn wake(&self, b: &PostcopyBlock, offset: u64) -> Result<(), PostcopyError> {
        match &self.uffd {
            Some(fd) => fd.wake(&b.range, offset, PAGE_SIZE as usize),
            None => Ok(()),
        }
    }

    /// Pages received, over all blocks.
    pub fn received_pages(&self) -> u64 {
        self.blocks.iter().map(|b| b.received.count()).sum()
    }

    /// Pages not received yet, over all blocks.
    pub fn missing_pages(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.received.pages() - b.received.count())
            .sum()
    }
}

impl Drop for PostcopyRam {
    fn drop(&mut self) {
        self.unregister();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postcopy::uffd::AnonMapping;

    const P: usize = PAGE_SIZE as usize;

    fn setup(pages: usize) -> (Arc<AnonMapping>, Arc<AnonMapping>, PostcopyRam) {
        let a = Arc::new(AnonMapping::new(pages * P).unwrap());
        let b = Arc::new(AnonMapping::new(pages * P).unwrap());
        let ram = PostcopyRam::new(
            vec![("ram".into(), a.range()), ("rom".into(), b.range())],
            Some(PostcopyFd::open().unwrap()),
            Some(&[]),
        );
        (a, b, ram)
    }

    #[test]
    fn precopy_pages_discards_and_postcopy_placement() {
        let (a, _b, ram) = setup(16);
        // Precopy loaded pages 0..4 through the mapping.
        for p in 0..4 {
            a.write_byte(p * P, 1 + p as u8);
            ram.mark_received(0, (p * P) as u64);
        }
        assert_eq!(ram.received_pages(), 4);
        // The switch: pages 2 and 3 were dirtied on the source.
        ram.discard(
            "ram",
            &DiscardRange {
                start: 2 * PAGE_SIZE,
                length: 2 * PAGE_SIZE,
            },
        )
        .unwrap();
        assert!(ram.is_received(0, 0) && !ram.is_received(0, 2 * PAGE_SIZE));
        // (Nothing may read a discarded page before LISTEN: the read would map the zero page,
        // and the real page could then no longer be placed.)
        let e = ram
            .discard(
                "nope",
                &DiscardRange {
                    start: 0,
                    length: 4096,
                },
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "ram_discard_range: Failed to find block 'nope'"
        );
        assert!(ram
            .discard(
                "ram",
                &DiscardRange {
                    start: 0,
                    length: 17 * 4096
                }
            )
            .is_err());
        ram.register().unwrap();
        // A page arrives: placed once; the second copy (other channel) is a duplicate.
        let mut page = vec![0u8; P];
        page[0] = 0x77;
        assert!(ram.place_page(0, 2 * PAGE_SIZE, &page).unwrap());
        assert!(!ram.place_page(0, 2 * PAGE_SIZE, &page).unwrap());
        assert_eq!(a.read_byte(2 * P), Some(0x77));
        assert!(ram.place_zero(0, 3 * PAGE_SIZE).unwrap());
        assert!(!ram.place_zero(0, 3 * PAGE_SIZE).unwrap());
        assert_eq!(a.read_byte(0), Some(1), "a precopy page is still there");
        assert_eq!(ram.stats.copied.load(Ordering::Relaxed), 1);
        assert_eq!(ram.stats.zeroed.load(Ordering::Relaxed), 1);
        assert_eq!(ram.stats.duplicates.load(Ordering::Relaxed), 2);
        // Bad offsets are refused.
        assert!(ram.place_page(0, 16 * PAGE_SIZE, &page).is_err());
        assert!(ram.place_page(0, 100, &page).is_err());
        assert!(ram.place_page(5, 0, &page).is_err());
        ram.unregister();
    }

    /// Waits (polling the non-blocking descriptor) for the next fault.
    fn next_fault(ram: &PostcopyRam) -> uffd::Fault {
        let mut buf = userfaultfd::EventBuffer::new(8);
        let mut out = Vec::new();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while out.is_empty() {
            assert!(Instant::now() < deadline, "no fault came");
            ram.uffd().unwrap().read_faults(&mut buf, &mut out).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        out[0]
    }

    #[test]
    fn a_run_places_each_page_once_and_wakes_its_waiters() {
        let map = Arc::new(AnonMapping::new(16 * P).unwrap());
        // Two vCPUs, which will wait on pages 5 and 9.
        let mut vcpus = Vec::new();
        let mut tids = Vec::new();
        for page in [5usize, 9] {
            let (tid_tx, tid_rx) = std::sync::mpsc::channel();
            let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
            let m = map.clone();
            vcpus.push((
                go_tx,
                std::thread::spawn(move || {
                    tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
                    go_rx.recv().unwrap();
                    m.read_byte(page * P + 9)
                }),
            ));
            tids.push(tid_rx.recv().unwrap());
        }
        let ram = PostcopyRam::new(
            vec![("ram".into(), map.range())],
            Some(PostcopyFd::open().unwrap()),
            Some(&tids),
        );
        ram.register().unwrap();
        // Page 2 came on the preempt channel (received); page 7 too, a moment ago: the kernel
        // has it, the received map not yet, so the run's ioctl stops there.
        assert!(ram.place_page(0, 2 * PAGE_SIZE, &[0xa2; P]).unwrap());
        ram.uffd()
            .unwrap()
            .copy(&map.range(), 7 * PAGE_SIZE, &[0xa7; P])
            .unwrap();
        for (go, _) in &vcpus {
            go.send(()).unwrap();
            let f = next_fault(&ram);
            assert!(matches!(
                ram.on_fault(f.addr, f.tid).unwrap(),
                FaultOutcome::Request { .. }
            ));
        }
        assert_eq!(ram.requests().pending().len(), 2);
        // The background push's run: pages 0..12.
        let run: Vec<u8> = (0..12u8).flat_map(|i| [i + 1; P]).collect();
        assert_eq!(ram.place_pages(0, 0, &run).unwrap(), 10);
        let got: Vec<_> = vcpus.into_iter().map(|(_, t)| t.join().unwrap()).collect();
        assert_eq!(
            got,
            [Some(6), Some(10)],
            "both waiters woke with their pages"
        );
        for page in 0..12usize {
            let want = match page {
                2 => 0xa2,
                7 => 0xa7,
                _ => page as u8 + 1,
            };
            assert_eq!(map.read_byte(page * P + 1), Some(want), "page {page}");
        }
        assert_eq!(ram.received_pages(), 12);
        assert!(ram.requests().pending().is_empty());
        assert_eq!(ram.requests().latency().count(), 2);
        let bt = ram.blocktime().unwrap();
        assert!(bt.vcpu_ns().iter().all(|ns| *ns > 0), "{:?}", bt.vcpu_ns());
        let st = &ram.stats;
        assert_eq!(st.copied.load(Ordering::Relaxed), 11);
        assert_eq!(st.duplicates.load(Ordering::Relaxed), 2);
        // One ioctl for page 2, then 0-1, 3-6 (stopped at 7) and 8-11.
        assert_eq!(st.placements.load(Ordering::Relaxed), 4);
        // A zero run over pages already there and missing ones places only the missing.
        assert_eq!(ram.place_zeros(0, 10 * PAGE_SIZE, 4).unwrap(), 2);
        assert_eq!(map.read_byte(12 * P), Some(0));
        assert_eq!(map.read_byte(11 * P), Some(12));
        assert_eq!(st.zeroed.load(Ordering::Relaxed), 2);
        // Runs past the block, or of no whole page, are refused.
        assert!(ram.place_zeros(0, 14 * PAGE_SIZE, 3).is_err());
        assert!(ram.place_pages(0, 0, &run[..100]).is_err());
        assert_eq!(ram.missing_pages(), 2);
        ram.unregister();
    }

    #[test]
    fn faults_are_classified() {
        let (a, b, ram) = setup(8);
        ram.register().unwrap();
        let base_b = b.range().base_addr();
        assert_eq!(
            ram.on_fault(base_b + 3 * P + 17, 0).unwrap(),
            FaultOutcome::Request {
                block: 1,
                offset: 3 * PAGE_SIZE
            }
        );
        assert_eq!(
            ram.on_fault(base_b + 3 * P, 0).unwrap(),
            FaultOutcome::Pending
        );
        assert_eq!(ram.requests().pending(), vec![(1, 3)]);
        // Placement completes the request (a latency sample) and a late fault is only woken.
        ram.place_zero(1, 3 * PAGE_SIZE).unwrap();
        assert!(ram.requests().pending().is_empty());
        assert_eq!(ram.requests().latency().count(), 1);
        assert_eq!(
            ram.on_fault(base_b + 3 * P, 0).unwrap(),
            FaultOutcome::Woken
        );
        assert_eq!(
            ram.on_fault(a.range().base_addr() + 7 * P, 0).unwrap(),
            FaultOutcome::Request {
                block: 0,
                offset: 7 * PAGE_SIZE
            }
        );
        let e = ram.on_fault(1, 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "postcopy_ram_fault_thread: Fault outside guest: 1"
        );
        assert_eq!(ram.missing_pages(), 15);
        assert_eq!(ram.requests().requests(), 2);
    }
}
