//! The source's return path: what a destination sends back, read by the engine's
//! `migration-rp` thread (`migration::return_path::spawn`) and acted on as the migration thread
//! acts on it. What it parses: SHUT, PONG (the backlog PINGs' answers), SWITCHOVER_ACK,
//! REQ_PAGES_ID / REQ_PAGES (postcopy page requests, checked by `SourceRam::resolve_request`,
//! answered on the preempt channel by the thread itself or handed to `migration-out`),
//! RECV_BITMAP with its received-map dump and RESUME_ACK (a postcopy recovery).
//!
//! Input: the return path's bytes. Each input is read in four sources ([`Phase`]), each with
//! its own return-path thread over an in-memory reader that ends:
//! - [`Phase::Precopy`]: before the postcopy switch (no postcopy RAM yet);
//! - [`Phase::Postcopy`]: after it, without preempt: the requests go to the consumer, which
//!   sends the pages still to send as `migration-out` does (claim, `PageWriter`), between
//!   `drain_requests` calls;
//! - [`Phase::Preempt`]: after it, with `postcopy-preempt`: the thread answers each request on
//!   the preempt channel (`PreemptSender`, over a buffer);
//! - [`Phase::Recovery`]: a postcopy recovery's handshake: every block's RECV_BITMAP turned
//!   into the pages still to send (`SourceRam::set_dirty`), then RESUME_ACK.
//!
//! The source's RAM ([`BLOCKS`]): `ram` (1 MiB, as QEMU 7.2's `-M none -m 1M`) and a small
//! `rom`, every third page non-zero with a pattern naming it, every page still to send but the
//! first [`SENT_IN_PRECOPY`] of `ram`.
//!
//! Afterwards:
//! - the thread's events end with exactly one terminal event (SHUT, the return path closed, a
//!   failure), and an error is a clean one, worded by one of the engine's known prefixes;
//! - a page request event names an existing block and pages inside it, and only after the
//!   postcopy switch; without preempt none reaches the consumer when the thread answers them;
//! - every page sent (on the preempt channel, or by the consumer) lies inside a range the
//!   input requested — decoded independently of the thread — was still to send, went out
//!   once, with the guest's bytes (ZERO only for a zero page); the pages sent and the pages
//!   still to send are exactly the pages that were to send before (nothing lost);
//! - a recovery's received maps leave no page past a block's end to send, and count right;
//! - once its reader has ended, no `migration-rp` thread is left in the process.

use migration::guest::{MmapRamBlock, RamBlock, PAGE_SIZE};
use migration::machine::Writer;
use migration::postcopy::received::dump_len;
use migration::postcopy::source::{PageWriter, PreemptSender, SourceRam};
use migration::ram::RamCounters;
use migration::return_path::{drain_requests, spawn, RpCtx, RpEvent};
use migration::transport::ShutdownHandle;
use std::collections::BTreeSet;
use std::io::{Cursor, Write};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion};
use wire::ram::{read_ram_record, RamRecord};
use wire::return_path::{read_recv_bitmap_dump, read_rp_message, RpMessage};
use wire::{StreamReader, StreamWriter};

/// The source's RAM blocks: name and size in pages.
pub const BLOCKS: [(&str, u64); 2] = [("ram", 256), ("rom", 16)];
/// Pages at the start of `ram` that precopy sent and nobody dirtied again.
pub const SENT_IN_PRECOPY: u64 = 8;
/// Longest the consumer waits for the thread's next event. The reader is in memory, so the
/// thread never waits for input: this bounds a thread that stopped sending without ending.
const EVENT_WAIT: Duration = Duration::from_secs(10);

/// Where in a migration the return path is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the postcopy switch.
    Precopy,
    /// Postcopy without preempt: requested pages are sent by the consumer.
    Postcopy,
    /// Postcopy with `postcopy-preempt`: the thread answers requests on the preempt channel.
    Preempt,
    /// A postcopy recovery's handshake: RECV_BITMAP for every block, then RESUME_ACK.
    Recovery,
}

/// What reading one input in one phase did.
#[derive(Debug)]
pub struct Outcome {
    /// The phase.
    pub phase: Phase,
    /// Every event the thread reported, in order.
    pub events: Vec<RpEvent>,
    /// How the consumer ended (the migration thread's error, as `drain_requests` and the
    /// recovery words it), `Ok` if the consumer saw the thread end without one.
    pub result: Result<(), String>,
    /// Pages sent for requests (consumer and preempt channel).
    pub pages_sent: u64,
    /// The last backlog PONG the thread recorded.
    pub last_answer: Option<u32>,
    /// Recovery: blocks whose received map arrived, and whether RESUME_ACK 1 came after them.
    pub recovered: (usize, bool),
}

/// Reads `data` as the return path in every [`Phase`] and checks the invariants (module
/// doc). Panics when one does not hold.
pub fn run(data: &[u8]) -> Vec<Outcome> {
    [
        Phase::Precopy,
        Phase::Postcopy,
        Phase::Preempt,
        Phase::Recovery,
    ]
    .into_iter()
    .map(|p| run_phase(p, data))
    .collect()
}

/// A buffer a `Writer` writes into and the harness reads afterwards.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// The byte at `offset` of page `page` of block number `bi` (zero pages are all zero).
fn pattern(bi: usize, page: u64, offset: usize) -> u8 {
    if page.is_multiple_of(3) {
        ((bi as u8 + 1) ^ (page as u8) ^ (offset as u8)) | 1
    } else {
        0
    }
}

/// The source's RAM blocks, filled once per process: nothing under test writes guest RAM.
fn guest_blocks() -> &'static [Arc<dyn RamBlock>] {
    static RAM: OnceLock<Vec<Arc<dyn RamBlock>>> = OnceLock::new();
    RAM.get_or_init(|| {
        BLOCKS
            .iter()
            .enumerate()
            .map(|(bi, (name, pages))| {
                let mapping = MmapRegion::<AtomicBitmap>::new((pages * PAGE_SIZE) as usize)
                    .expect("harness: guest RAM");
                let region =
                    Arc::new(GuestRegionMmap::new(mapping, GuestAddress(0)).expect("region"));
                for page in (0..*pages).filter(|p| p.is_multiple_of(3)) {
                    let bytes: Vec<u8> = (0..PAGE_SIZE as usize)
                        .map(|o| pattern(bi, page, o))
                        .collect();
                    region
                        .write_slice(&bytes, MemoryRegionAddress(page * PAGE_SIZE))
                        .expect("harness: filling guest RAM");
                }
                Arc::new(MmapRamBlock::new(name, region).expect("harness: RAM block"))
                    as Arc<dyn RamBlock>
            })
            .collect()
    })
}

/// The source's RAM, with its initial set of pages to send (per block, one bit per page).
fn source_ram() -> (Arc<SourceRam>, Vec<Vec<u64>>) {
    let mut blocks = Vec::new();
    let mut dirty_all = Vec::new();
    for (bi, (b, (_, pages))) in guest_blocks().iter().zip(BLOCKS.iter()).enumerate() {
        let mut dirty = vec![0u64; pages.div_ceil(64) as usize];
        for p in 0..*pages {
            if bi != 0 || p >= SENT_IN_PRECOPY {
                dirty[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        dirty_all.push(dirty.clone());
        blocks.push((b.clone(), *pages, dirty));
    }
    let ram = SourceRam::new(blocks, Arc::new(RamCounters::default()));
    (Arc::new(ram), dirty_all)
}

fn is_set(words: &[u64], page: u64) -> bool {
    words
        .get((page / 64) as usize)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// The pages the input asks for, decoded from it independently of the thread (the syntax
/// only): (block number, page) for every REQ_PAGES_ID / REQ_PAGES whose block exists,
/// whatever the engine then makes of them.
fn requested(data: &[u8]) -> BTreeSet<(usize, u64)> {
    let mut out = BTreeSet::new();
    let mut r = StreamReader::new(data);
    let mut last: Option<String> = None;
    let block_of = |name: &str| BLOCKS.iter().position(|(n, _)| *n == name);
    while let Ok(m) = read_rp_message(&mut r) {
        let (name, start, len) = match m {
            RpMessage::ReqPagesId {
                start,
                len,
                ramblock,
            } => {
                last = Some(ramblock.clone());
                (ramblock, start, len)
            }
            RpMessage::ReqPages { start, len } => match &last {
                Some(n) => (n.clone(), start, len),
                None => continue,
            },
            RpMessage::RecvBitmap { ramblock } => {
                let Some(bi) = block_of(&ramblock) else { break };
                if read_recv_bitmap_dump(&mut r, &ramblock, dump_len(BLOCKS[bi].1)).is_err() {
                    break;
                }
                continue;
            }
            _ => continue,
        };
        let Some(bi) = block_of(&name) else { continue };
        let first = start / PAGE_SIZE;
        let end = start
            .saturating_add(u64::from(len))
            .div_ceil(PAGE_SIZE)
            .min(BLOCKS[bi].1);
        out.extend((first..end).map(|p| (bi, p)));
    }
    out
}

/// The prefixes of the errors the return path may end with.
const CLEAN_ERRORS: &[&str] = &[
    "RP: ",
    "migrate_handle_rp_req_pages: ",
    "ram_save_queue_pages request overrun",
    "ram_dirty_bitmap_reload: ",
    "postcopy preempt channel: ",
];

fn check_events(phase: Phase, events: &[RpEvent], ctx: &str) {
    let terminal = |e: &RpEvent| {
        matches!(
            e,
            RpEvent::Shut(_) | RpEvent::Closed(_) | RpEvent::Failed(_)
        )
    };
    let n = events.iter().filter(|e| terminal(e)).count();
    assert_eq!(n, 1, "{ctx}: {n} terminal events in {events:?}");
    assert!(
        events.last().is_some_and(terminal),
        "{ctx}: events after the terminal one: {events:?}"
    );
    for e in events {
        match e {
            RpEvent::Closed(why) | RpEvent::Failed(why) => assert!(
                CLEAN_ERRORS.iter().any(|p| why.starts_with(p)) && !why.contains("internal"),
                "{ctx}: not a clean error: {why:?}"
            ),
            RpEvent::Request { block, first, end } => {
                assert!(
                    matches!(phase, Phase::Postcopy | Phase::Recovery),
                    "{ctx}: a page request reached the consumer in {phase:?}"
                );
                let pages = BLOCKS.get(*block).map(|b| b.1);
                assert!(
                    pages.is_some_and(|p| first < end && *end <= p),
                    "{ctx}: request for pages {first}..{end} of block {block}"
                );
            }
            RpEvent::RecvBitmap { block, dirty } => {
                let pages = BLOCKS.get(*block).map_or(0, |b| b.1);
                assert!(
                    pages > 0 && dirty.len() as u64 <= pages.div_ceil(64),
                    "{ctx}: received map of block {block}: {} words",
                    dirty.len()
                );
                for (i, w) in dirty.iter().enumerate() {
                    for bit in 0..64 {
                        if w & (1 << bit) != 0 {
                            assert!(
                                (i as u64) * 64 + bit < pages,
                                "{ctx}: page {} past the end of block {block} to send",
                                i as u64 * 64 + bit
                            );
                        }
                    }
                }
            }
            RpEvent::Shut(_) | RpEvent::ResumeAck(_) => {}
        }
    }
}

/// Decodes the RAM records `bytes` carries (a preempt channel's, or the consumer's page
/// writes) into `sent`, checking each page's bytes against the guest's.
fn decode_pages(bytes: Vec<u8>, sent: &mut Vec<(usize, u64)>, ctx: &str) {
    let mut r = StreamReader::new(Cursor::new(bytes));
    let mut block: Option<usize> = None;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    while !r.is_at_eof().expect("harness: in-memory reader") {
        let rec = read_ram_record(&mut r).unwrap_or_else(|e| panic!("{ctx}: pages sent: {e}"));
        let (name, offset, zero) = match rec {
            RamRecord::Page { block, offset } => (block, offset, false),
            RamRecord::Zero {
                block,
                offset,
                fill,
            } => {
                assert_eq!(fill, 0, "{ctx}: fill");
                (block, offset, true)
            }
            RamRecord::Eos => continue,
            other => panic!("{ctx}: unexpected record {other:?}"),
        };
        if let Some(n) = name {
            block = BLOCKS.iter().position(|(b, _)| *b == n);
        }
        let bi = block.unwrap_or_else(|| panic!("{ctx}: a page of no known block"));
        let p = offset / PAGE_SIZE;
        if !zero {
            r.read_into(&mut page)
                .unwrap_or_else(|e| panic!("{ctx}: page data: {e}"));
        }
        let guest_zero = !p.is_multiple_of(3);
        assert_eq!(
            zero, guest_zero,
            "{ctx}: page {p} of block {bi} sent as zero={zero}"
        );
        if !zero {
            let ok = page
                .iter()
                .enumerate()
                .all(|(o, b)| *b == pattern(bi, p, o));
            assert!(ok, "{ctx}: page {p} of block {bi} sent with other bytes");
        }
        sent.push((bi, p));
    }
}

/// Reads `data` as the return path in `phase` and checks the invariants.
pub fn run_phase(phase: Phase, data: &[u8]) -> Outcome {
    let _one_at_a_time = crate::exclusive();
    let ctx = format!("{phase:?}");
    let (src, dirty_before) = source_ram();
    let rp_ctx = Arc::new(RpCtx::default());
    let preempt_out = Shared::default();
    let mut preempt = None;
    if phase != Phase::Precopy {
        assert!(rp_ctx.set_source(src.clone()));
    }
    if phase == Phase::Preempt {
        let w: Writer = StreamWriter::new(Box::new(preempt_out.clone()));
        let p = Arc::new(PreemptSender::new(
            src.clone(),
            w,
            ShutdownHandle::default(),
        ));
        assert!(rp_ctx.set_preempt(p.clone()));
        preempt = Some(p);
    }
    let rx = spawn(Box::new(Cursor::new(data.to_vec())), rp_ctx.clone())
        .expect("harness: the return-path thread");
    let mut events = Vec::new();
    let main_out = Shared::default();
    let mut recovered = (0, false);
    let result = match phase {
        Phase::Precopy => consume_all(&rx, &mut events, &ctx),
        Phase::Postcopy | Phase::Preempt => push(&rx, &src, &main_out, &mut events, &ctx),
        Phase::Recovery => recover(&rx, &src, &mut events, &mut recovered, &ctx),
    };
    // The rest, until the thread ends (its reader does).
    let rest = consume_all(&rx, &mut events, &ctx);
    let result = result.and(rest.or(Ok(())));
    check_events(phase, &events, &ctx);

    // The pages sent for requests.
    let mut sent = Vec::new();
    if let Some(p) = &preempt {
        // As at the end of postcopy (the channel may have been dropped on a failed write:
        // it cannot, into a buffer).
        p.finish()
            .unwrap_or_else(|e| panic!("{ctx}: preempt channel: {e}"));
        decode_pages(preempt_out.take(), &mut sent, &ctx);
    }
    decode_pages(main_out.take(), &mut sent, &ctx);
    if phase != Phase::Recovery {
        let asked = requested(data);
        let mut seen = BTreeSet::new();
        for &(bi, p) in &sent {
            assert!(
                asked.contains(&(bi, p)),
                "{ctx}: page {p} of block {bi} sent but never requested"
            );
            assert!(
                is_set(&dirty_before[bi], p),
                "{ctx}: page {p} of block {bi} sent again (it went out in precopy)"
            );
            assert!(
                seen.insert((bi, p)),
                "{ctx}: page {p} of block {bi} sent twice"
            );
        }
        // Nothing lost: what was to send is either sent or still to send.
        let mut cursor = migration::postcopy::source::Cursor::default();
        let mut left = Vec::new();
        let mut remaining = BTreeSet::new();
        while src.claim_next(&mut cursor, 64, &mut left) {
            remaining.extend(left.iter().copied());
        }
        for (bi, (_, pages)) in BLOCKS.iter().enumerate() {
            for p in 0..*pages {
                let before = is_set(&dirty_before[bi], p);
                let now = seen.contains(&(bi, p)) || remaining.contains(&(bi, p));
                assert_eq!(
                    before, now,
                    "{ctx}: page {p} of block {bi} was to send: {before}, sent or still to send: {now}"
                );
            }
        }
    }
    let last_answer = rp_ctx.last_answer().map(|(v, _)| v);
    if let Some(v) = last_answer {
        assert!(
            v & 0x8000_0000 != 0,
            "{ctx}: PONG {v:#x} taken as a backlog answer"
        );
    }
    drop(rx);
    check_thread_ended(&ctx);
    Outcome {
        phase,
        events,
        result,
        pages_sent: sent.len() as u64,
        last_answer,
        recovered,
    }
}

/// Takes every event until the thread ends.
fn consume_all(rx: &Receiver<RpEvent>, events: &mut Vec<RpEvent>, ctx: &str) -> Result<(), String> {
    loop {
        match rx.recv_timeout(EVENT_WAIT) {
            Ok(ev) => events.push(ev),
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
            Err(RecvTimeoutError::Timeout) => {
                panic!("{ctx}: the return-path thread neither reports nor ends")
            }
        }
    }
}

/// Postcopy's push as `migration-out` does it: `drain_requests`, then the requested pages
/// still to send, claimed and written; until `drain_requests` fails (the thread always ends:
/// its reader does).
fn push(
    rx: &Receiver<RpEvent>,
    src: &SourceRam,
    out: &Shared,
    events: &mut Vec<RpEvent>,
    ctx: &str,
) -> Result<(), String> {
    // `drain_requests` consumes the events: they reach it through a second channel, so the
    // checks see them too; it ends (disconnects) once the thread's has.
    let (tx2, rx2) = std::sync::mpsc::channel();
    let mut tx2 = Some(tx2);
    let mut w: Writer = StreamWriter::new(Box::new(out.clone()));
    let mut pages = PageWriter::new();
    let mut pending = Vec::new();
    let mut batch = Vec::new();
    loop {
        let mut first = true;
        while let Some(tx) = &tx2 {
            let ev = if first {
                match rx.recv_timeout(EVENT_WAIT) {
                    Ok(ev) => Some(ev),
                    Err(RecvTimeoutError::Disconnected) => None,
                    Err(RecvTimeoutError::Timeout) => {
                        panic!("{ctx}: the return-path thread neither reports nor ends")
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(ev) => Some(ev),
                    Err(TryRecvError::Disconnected) => None,
                    Err(TryRecvError::Empty) => break,
                }
            };
            first = false;
            match ev {
                Some(ev) => {
                    events.push(ev.clone());
                    let _ = tx.send(ev);
                }
                None => tx2 = None,
            }
        }
        let r = drain_requests(&rx2, &mut pending, Duration::ZERO);
        for (bi, first, end) in pending.drain(..) {
            batch.clear();
            batch.extend((first..end).filter(|p| src.claim(bi, *p)).map(|p| (bi, p)));
            pages
                .write(&mut w, src, &batch)
                .unwrap_or_else(|e| panic!("{ctx}: writing pages into a buffer: {e}"));
        }
        w.flush()
            .unwrap_or_else(|e| panic!("{ctx}: flushing into a buffer: {e}"));
        r.map_err(|e| e.to_string())?;
    }
}

/// A recovery's handshake as `Outgoing::postcopy_resume` runs it: every block's received map
/// (requests wait), then RESUME_ACK.
fn recover(
    rx: &Receiver<RpEvent>,
    src: &SourceRam,
    events: &mut Vec<RpEvent>,
    recovered: &mut (usize, bool),
    ctx: &str,
) -> Result<(), String> {
    let mut synced = vec![false; BLOCKS.len()];
    let next = |events: &mut Vec<RpEvent>| loop {
        match rx.recv_timeout(EVENT_WAIT) {
            Ok(ev) => {
                events.push(ev.clone());
                if !matches!(ev, RpEvent::Request { .. }) {
                    return Ok(ev);
                }
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err("the return path ended during the recovery".to_string())
            }
            Err(RecvTimeoutError::Timeout) => {
                panic!("{ctx}: the return-path thread neither reports nor ends")
            }
        }
    };
    while synced.iter().any(|s| !s) {
        match next(events)? {
            RpEvent::RecvBitmap { block, dirty } => {
                let n = src.set_dirty(block, &dirty);
                let want: u64 = dirty.iter().map(|w| u64::from(w.count_ones())).sum();
                assert_eq!(n, want, "{ctx}: pages to send in block {block}");
                if let Some(s) = synced.get_mut(block) {
                    *s = true;
                }
                recovered.0 += 1;
            }
            other => return Err(format!("{other:?}")),
        }
    }
    match next(events)? {
        RpEvent::ResumeAck(1) => {
            recovered.1 = true;
            Ok(())
        }
        other => Err(format!("{other:?}")),
    }
}

/// No `migration-rp` thread is left.
fn check_thread_ended(ctx: &str) {
    crate::wait_gone(
        ctx,
        "migration-rp threads left after the return path ended",
        Duration::from_micros(20),
        || crate::threads(|c| c == "migration-rp"),
    );
}
