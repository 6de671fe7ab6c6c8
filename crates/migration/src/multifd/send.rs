//! The source's multifd channels: one thread per channel, fed batches of pages by the
//! migration thread.
//!
//! The migration thread fills a batch (up to 128 pages of one RAM block, as offsets; the pages
//! stay in guest memory) and hands it to a channel with a free slot — each channel takes up to
//! [`DEPTH`] batches, so it always has the next one while it writes, and a slow channel gets
//! fewer. The channel encodes the packet header into the buffer it keeps and writes header and
//! pages in one vectored write from guest memory (compressed: the compressed bytes; with zero
//! copy: the header, then the pages with `MSG_ZEROCOPY`), and gives the batch back for reuse,
//! so nothing is allocated per packet.
//!
//! At a sync point ([`Sender::sync`]) the partial batch goes out, every channel gets a SYNC
//! packet after what it already has, and the migration thread waits until every channel has
//! written it (and, with zero copy, until the kernel has completed every send).
//!
//! Threads and failure: channels talk to the migration thread through one event queue. A
//! channel that fails reports its error there and every other channel is shut down; the
//! migration thread, whatever it waits for, reads the error and fails the migration. Its waits
//! also give up when the migration is cancelled, even if a channel is stuck connecting.

use super::codec::Compressor;
use super::zerocopy::ZeroCopySocket;
use super::{channel_error, MultifdConfig, MultifdCounters, UUID};
use crate::error::MigrationError;
use crate::guest::{RamBlock, PAGE_SIZE};
use crate::transport::{BoxWrite, Connection, ShutdownHandle};
use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use wire::multifd::{
    encode_packet, InitPacket, PacketFields, FLAG_SYNC, PACKET_HEADER_LEN, PAGES_PER_PACKET,
};

/// Batches a channel may hold at once.
pub const DEPTH: usize = 2;

/// How often a wait of the migration thread looks at the cancel flag.
const POLL: Duration = Duration::from_millis(100);

/// Opens channel `id`: connects it, registers it for cancellation and secures it (TLS). Runs
/// on the channel's own thread.
pub type Opener = Arc<dyn Fn(u8) -> Result<Connection, MigrationError> + Send + Sync>;

/// Whether the migration was cancelled (checked while the migration thread waits).
pub type Cancelled = Arc<dyn Fn() -> bool + Send + Sync>;

/// Up to 128 pages of one block, as offsets into it.
struct Batch {
    block: Option<Arc<dyn RamBlock>>,
    /// Index of the block in the saver's list (the batch's identity).
    index: usize,
    offsets: Vec<u64>,
}

impl Batch {
    fn new() -> Batch {
        Batch {
            block: None,
            index: 0,
            offsets: Vec::with_capacity(PAGES_PER_PACKET),
        }
    }

    fn clear(&mut self) {
        self.block = None;
        self.offsets.clear();
    }
}

enum Job {
    Pages { batch: Batch, packet_num: u64 },
    Sync { packet_num: u64 },
}

enum Event {
    /// Channel `id` has a free slot (and gives back the batch it sent, if any).
    Ready { id: u8, batch: Option<Batch> },
    /// Channel `id` wrote its SYNC packet; `missed`: every zero-copy send since the last
    /// sync was copied by the kernel.
    Synced { missed: bool },
    /// Channel `id` failed.
    Failed { id: u8, error: MigrationError },
}

/// The source's side of the multifd channels.
pub struct Sender {
    jobs: Vec<mpsc::Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
    events: mpsc::Receiver<Event>,
    /// Channels with a free slot, in the order they freed it.
    ready: VecDeque<u8>,
    free: Vec<Batch>,
    current: Batch,
    packet_num: u64,
    /// Bytes handed to channels (headers and uncompressed pages): what the rate limit
    /// counts, as QEMU's `multifd_send_pages` counts it.
    queued: u64,
    synced: usize,
    counters: Arc<MultifdCounters>,
    /// Every connected channel, so a failure can stop the others.
    shutdowns: Arc<Mutex<Vec<ShutdownHandle>>>,
    cancelled: Cancelled,
    /// The first error: after it nothing more is sent.
    failed: Option<String>,
}

impl Sender {
    /// Starts `config.channels` channel threads; each opens its channel with `open`, sends
    /// its handshake and waits for work.
    pub fn start(
        config: &MultifdConfig,
        open: Opener,
        counters: Arc<MultifdCounters>,
        cancelled: Cancelled,
    ) -> Result<Sender, MigrationError> {
        let (etx, events) = mpsc::channel();
        let shutdowns = Arc::new(Mutex::new(Vec::new()));
        let mut jobs = Vec::new();
        let mut threads = Vec::new();
        for id in 0..config.channels {
            let (jtx, jrx) = mpsc::channel();
            let ch = Channel {
                id,
                config: config.clone(),
                open: open.clone(),
                jobs: jrx,
                events: etx.clone(),
                counters: counters.clone(),
                shutdowns: shutdowns.clone(),
            };
            let t = std::thread::Builder::new()
                .name(format!("multifdsend_{id}"))
                .spawn(move || ch.run())
                .map_err(|e| MigrationError::io("cannot start a multifd channel thread", e))?;
            jobs.push(jtx);
            threads.push(t);
        }
        Ok(Sender {
            jobs,
            threads,
            events,
            ready: VecDeque::new(),
            free: (0..config.channels as usize * DEPTH)
                .map(|_| Batch::new())
                .collect(),
            current: Batch::new(),
            packet_num: 0,
            queued: 0,
            synced: 0,
            counters,
            shutdowns,
            cancelled,
            failed: None,
        })
    }

    /// Bytes queued on the channels so far (for the byte budget of a round).
    pub fn queued_bytes(&self) -> u64 {
        self.queued
    }

    /// Queues the page at `offset` of `block` (index `index` in the saver's list).
    pub fn queue_page(
        &mut self,
        index: usize,
        block: &Arc<dyn RamBlock>,
        offset: u64,
    ) -> Result<(), MigrationError> {
        if !self.current.offsets.is_empty() && self.current.index != index {
            self.dispatch()?;
        }
        if self.current.offsets.is_empty() {
            self.current.block = Some(block.clone());
            self.current.index = index;
        }
        self.current.offsets.push(offset);
        if self.current.offsets.len() == PAGES_PER_PACKET {
            self.dispatch()?;
        }
        Ok(())
    }

    /// A sync point: sends what is queued, then a SYNC packet on every channel, and waits
    /// until all are written (zero copy: and completed by the kernel).
    pub fn sync(&mut self) -> Result<(), MigrationError> {
        if !self.current.offsets.is_empty() {
            self.dispatch()?;
        }
        self.check()?;
        self.synced = 0;
        for id in 0..self.jobs.len() {
            let packet_num = self.next_packet_num();
            self.send_job(id, Job::Sync { packet_num })?;
            self.queued += PACKET_HEADER_LEN as u64;
        }
        while self.synced < self.jobs.len() {
            self.wait_event()?;
        }
        Ok(())
    }

    fn next_packet_num(&mut self) -> u64 {
        let n = self.packet_num;
        self.packet_num += 1;
        n
    }

    fn check(&self) -> Result<(), MigrationError> {
        match &self.failed {
            Some(e) => Err(MigrationError::Other(e.clone())),
            None => Ok(()),
        }
    }

    /// Hands the current batch to the next channel with a free slot.
    fn dispatch(&mut self) -> Result<(), MigrationError> {
        self.check()?;
        let id = loop {
            if let Some(id) = self.ready.pop_front() {
                break id;
            }
            self.wait_event()?;
        };
        let next = self.free.pop().unwrap_or_else(Batch::new);
        let batch = std::mem::replace(&mut self.current, next);
        self.queued += PACKET_HEADER_LEN as u64 + batch.offsets.len() as u64 * PAGE_SIZE;
        let packet_num = self.next_packet_num();
        self.send_job(usize::from(id), Job::Pages { batch, packet_num })
    }

    fn send_job(&mut self, id: usize, job: Job) -> Result<(), MigrationError> {
        let Some(tx) = self.jobs.get(id) else {
            return Err(MigrationError::Other(format!("multifd: no channel {id}")));
        };
        if tx.send(job).is_err() {
            // The channel's thread ended: its error is on the way (or it quit).
            loop {
                self.wait_event()?;
            }
        }
        Ok(())
    }

    /// Waits for one event from the channels and takes it in; a channel's failure (or a
    /// cancel) is an error.
    fn wait_event(&mut self) -> Result<(), MigrationError> {
        loop {
            self.check()?;
            if (self.cancelled)() {
                self.abort();
                return Err(MigrationError::Cancelled);
            }
            match self.events.recv_timeout(POLL) {
                Ok(Event::Ready { id, batch }) => {
                    if let Some(mut b) = batch {
                        b.clear();
                        self.free.push(b);
                    }
                    self.ready.push_back(id);
                    return Ok(());
                }
                Ok(Event::Synced { missed }) => {
                    self.synced += 1;
                    if missed {
                        self.counters
                            .missed_zero_copy
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                Ok(Event::Failed { id, error }) => {
                    let e = channel_error(id, &error);
                    self.failed = Some(e.to_string());
                    self.abort();
                    return Err(e);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let e = "multifd: every channel has quit".to_string();
                    self.failed = Some(e.clone());
                    return Err(MigrationError::Other(e));
                }
            }
        }
    }

    /// Whether the peer closed a channel's connection (or it broke): looked at while nothing
    /// is written on the channels (pre-switchover), where no write would tell.
    pub fn channel_hung_up(&self) -> bool {
        let handles = self
            .shutdowns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        handles.iter().any(|h| {
            h.socket()
                .is_some_and(|fd| super::recv::hung_up(std::os::fd::AsFd::as_fd(&fd)))
        })
    }

    /// Shuts every channel down: blocked writes return and the threads end.
    pub fn abort(&self) {
        for h in self
            .shutdowns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            h.shutdown();
        }
    }

    /// Ends the channels and waits for their threads: after a completed migration the
    /// channels finish what they hold (nothing, after the last sync) and close; otherwise
    /// they are shut down first.
    pub fn finish(mut self, ok: bool) {
        if !ok || self.failed.is_some() {
            self.abort();
        }
        self.jobs.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.abort();
            self.jobs.clear();
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }
}

/// One channel's thread.
struct Channel {
    id: u8,
    config: MultifdConfig,
    open: Opener,
    jobs: mpsc::Receiver<Job>,
    events: mpsc::Sender<Event>,
    counters: Arc<MultifdCounters>,
    shutdowns: Arc<Mutex<Vec<ShutdownHandle>>>,
}

/// Writes all of `bufs` with vectored writes, resuming after partial ones.
fn write_all_vectored(w: &mut dyn Write, mut bufs: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::WriteZero)),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_error(e: std::io::Error) -> MigrationError {
    MigrationError::io("Unable to write to socket", e)
}

impl Channel {
    fn run(self) {
        let (id, events) = (self.id, self.events.clone());
        if let Err(error) = self.work() {
            let _ = events.send(Event::Failed { id, error });
        }
    }

    fn work(self) -> Result<(), MigrationError> {
        let mut conn = (self.open)(self.id)?;
        self.shutdowns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn.shutdown.clone());
        let mut zc = if self.config.zero_copy {
            let fd = conn
                .shutdown
                .socket()
                .ok_or_else(|| MigrationError::Other(super::zerocopy::NOT_SUPPORTED.into()))?;
            Some(
                ZeroCopySocket::new(fd)
                    .map_err(|_| MigrationError::Other(super::zerocopy::NOT_SUPPORTED.into()))?,
            )
        } else {
            None
        };
        let mut w: BoxWrite = conn.writer.take().ok_or_else(|| {
            MigrationError::Other("the transport has no outgoing direction".into())
        })?;
        // Multifd channels are one-way: the destination never writes on them.
        conn.reader = None;
        let init = InitPacket {
            uuid: UUID,
            id: self.id,
        }
        .encode();
        w.write_all(&init).map_err(write_error)?;
        w.flush().map_err(write_error)?;
        for _ in 0..DEPTH {
            let _ = self.events.send(Event::Ready {
                id: self.id,
                batch: None,
            });
        }
        let mut header = Box::new([0u8; PACKET_HEADER_LEN]);
        let mut codec = Compressor::new(
            self.config.compression,
            self.config.zlib_level,
            self.config.zstd_level,
        )
        .map_err(MigrationError::Other)?;
        let (mut scratch, mut zbuf) = (Vec::new(), Vec::new());
        while let Ok(job) = self.jobs.recv() {
            match job {
                Job::Pages { batch, packet_num } => {
                    let Some(block) = batch.block.clone() else {
                        continue;
                    };
                    let region = block.region();
                    let name = block.name();
                    let mut payload = batch.offsets.len() * PAGE_SIZE as usize;
                    let mut flags = 0;
                    if let Some(c) = codec.as_mut() {
                        flags = c.method().flag();
                        c.compress(
                            batch.offsets.len(),
                            |i, dst| batch.offsets.get(i).is_some_and(|&o| region.read(o, dst)),
                            &mut scratch,
                            &mut zbuf,
                        )
                        .map_err(MigrationError::Other)?;
                        payload = zbuf.len();
                    }
                    encode_packet(
                        &mut header,
                        &PacketFields {
                            flags,
                            packet_num,
                            next_packet_size: payload as u32,
                            ramblock: name,
                            offsets: &batch.offsets,
                        },
                    )?;
                    // On the stack: one slot for the header, one per page.
                    let mut iov = [IoSlice::new(&[]); PAGES_PER_PACKET + 1];
                    if codec.is_some() {
                        iov[0] = IoSlice::new(&header[..]);
                        iov[1] = IoSlice::new(&zbuf);
                        write_all_vectored(&mut w, &mut iov[..2]).map_err(write_error)?;
                    } else {
                        let n = batch.offsets.len();
                        for (slot, &o) in iov[1..].iter_mut().zip(&batch.offsets) {
                            *slot = region.io_slice(o, PAGE_SIZE as usize).ok_or_else(|| {
                                MigrationError::Other(format!(
                                    "page {o:#x} outside RAM block {name}"
                                ))
                            })?;
                        }
                        match zc.as_mut() {
                            Some(z) => {
                                // The header is ours and reused: it goes with a plain write.
                                w.write_all(&header[..]).map_err(write_error)?;
                                z.send_all(&mut iov[1..n + 1]).map_err(write_error)?;
                            }
                            None => {
                                iov[0] = IoSlice::new(&header[..]);
                                write_all_vectored(&mut w, &mut iov[..n + 1])
                                    .map_err(write_error)?;
                            }
                        }
                    }
                    self.counters
                        .bytes
                        .fetch_add((PACKET_HEADER_LEN + payload) as u64, Ordering::Relaxed);
                    self.counters.packets.fetch_add(1, Ordering::Relaxed);
                    let _ = self.events.send(Event::Ready {
                        id: self.id,
                        batch: Some(batch),
                    });
                }
                Job::Sync { packet_num } => {
                    encode_packet(
                        &mut header,
                        &PacketFields {
                            flags: FLAG_SYNC,
                            packet_num,
                            next_packet_size: 0,
                            ramblock: "",
                            offsets: &[],
                        },
                    )?;
                    w.write_all(&header[..]).map_err(write_error)?;
                    w.flush().map_err(write_error)?;
                    self.counters
                        .bytes
                        .fetch_add(PACKET_HEADER_LEN as u64, Ordering::Relaxed);
                    self.counters.packets.fetch_add(1, Ordering::Relaxed);
                    let missed = match zc.as_mut() {
                        Some(z) => z.flush().map_err(write_error)?,
                        None => false,
                    };
                    let _ = self.events.send(Event::Synced { missed });
                }
            }
        }
        // The migration thread is done with this channel.
        w.flush().map_err(write_error)?;
        Ok(())
    }
}
