//! The destination's multifd channels: one thread per channel reading packets straight into
//! guest memory, and the sync point they share with the main stream's loader.
//!
//! The channels are accepted after the main one, each handshake read and checked before the
//! next is accepted (QEMU 7.2's order and checks); the main stream is loaded only once all
//! are there. A channel thread reads a header, checks it against this VM's RAM (the block
//! must exist, every offset must fit in it), then the pages: raw, with vectored reads into
//! guest memory; compressed, into the channel's buffer and decompressed into guest memory. A
//! SYNC packet makes the thread wait at the [`SyncPoint`] until the loader, at the matching
//! end of a RAM section, releases every channel at once ([`SyncPoint::sync_main`]).
//!
//! A channel that fails (a bad packet, a channel that ends while the loader waits for it)
//! records its error, wakes the loader and shuts the main channel down, so the migration fails
//! with the channel's error rather than waiting for data that will not come.
//!
//! After a complete load the channels are read on until the source closes them
//! ([`Receiver::finish_after_load`]): QEMU 7.2's sender can write one more, empty packet on a
//! channel after its last SYNC (a channel given pages and the SYNC before its thread ran sends
//! both in one packet, then a second for the second job), possibly after the main stream's EOF.
//! Shutting the channel at once made that write fail, and a source still finishing then
//! failed the migration ("Unable to write to socket: Broken pipe") that had completed here.

use super::codec::{Decompressor, MAX_COMPRESSED};
use super::{channel_error, MultifdConfig, UUID};
use crate::error::MigrationError;
use crate::guest::{RamBlock, PAGE_SIZE};
use crate::transport::{BoxRead, Connection, ShutdownHandle};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::collections::HashMap;
use std::io::Read;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use wire::multifd::{Compression, InitPacket, PacketHeader, INIT_LEN, PACKET_HEADER_LEN};

#[derive(Default)]
struct SyncState {
    /// Channels waiting after a SYNC packet in the current round.
    waiting: u32,
    /// Rounds released so far.
    round: u64,
    /// Channels whose thread has ended.
    ended: u32,
    /// The first channel error.
    error: Option<String>,
    /// The load is over (or failed): channels stop waiting.
    quit: bool,
}

/// Where the channels and the loader meet at every sync point.
pub struct SyncPoint {
    channels: u32,
    state: Mutex<SyncState>,
    cond: Condvar,
    /// Pages the channels have loaded.
    pages: AtomicU64,
    /// The load completed: channels read on until the source closes them, placing nothing.
    /// Read for every packet, so an atomic rather than the lock the channels share.
    draining: AtomicBool,
    /// The main channel: shut down when a channel fails, so the loader stops waiting.
    main: ShutdownHandle,
}

impl SyncPoint {
    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The loader at the end of a RAM section: waits until every channel has delivered its
    /// SYNC packet (so every page sent before it is in guest memory), then releases them all.
    pub fn sync_main(&self) -> Result<(), MigrationError> {
        let mut st = self.lock();
        loop {
            if let Some(e) = &st.error {
                return Err(MigrationError::Load(e.clone()));
            }
            if st.quit {
                return Err(MigrationError::Load("multifd: the load was stopped".into()));
            }
            if st.waiting >= self.channels {
                break;
            }
            if st.ended > 0 {
                return Err(MigrationError::Load(
                    "multifd: a channel ended before its sync packet".into(),
                ));
            }
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.waiting = 0;
        st.round += 1;
        self.cond.notify_all();
        Ok(())
    }

    /// A channel after a SYNC packet: waits for the loader's release. False when the load is
    /// over instead.
    fn arrive(&self) -> bool {
        let mut st = self.lock();
        let round = st.round;
        st.waiting += 1;
        self.cond.notify_all();
        while st.round == round && !st.quit {
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        !st.quit
    }

    fn fail(&self, error: String) {
        let mut st = self.lock();
        if st.quit {
            return;
        }
        if self.draining.load(Ordering::Acquire) {
            // The load completed: what breaks a channel now changes nothing.
            log::debug!("incoming migration after the load: {error}");
            st.ended += 1;
            self.cond.notify_all();
            return;
        }
        if st.error.is_none() {
            log::error!("incoming migration: {error}");
            st.error = Some(error);
        }
        st.ended += 1;
        self.cond.notify_all();
        drop(st);
        self.main.shutdown();
    }

    fn end(&self) {
        let mut st = self.lock();
        st.ended += 1;
        self.cond.notify_all();
    }

    /// Pages loaded through the channels.
    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }
}

/// The destination's side of the multifd channels.
pub struct Receiver {
    sync: Arc<SyncPoint>,
    threads: Vec<JoinHandle<()>>,
    shutdowns: Vec<ShutdownHandle>,
}

/// Accepts the next connection, registers it for cancellation and secures it (TLS).
pub type Accept<'a> = &'a mut dyn FnMut() -> Result<Connection, MigrationError>;

/// Whether the peer of socket `fd` closed its side (or the connection broke), without
/// waiting.
pub(crate) fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(fd, crate::channel_wait::rdhup())];
    match poll(&mut fds, PollTimeout::ZERO) {
        // `None` is POLLRDHUP (see `channel_wait`). POLLERR alone is not taken: with zero copy it
        // only says that completions wait on the error queue.
        Ok(n) if n > 0 => fds
            .first()
            .is_some_and(|f| f.revents().is_none_or(|r| r.contains(PollFlags::POLLHUP))),
        _ => false,
    }
}

/// Waits until `listener` has the next channel to accept (`crate::channel_wait`). Gives up,
/// with an error, when the source hangs up the main channel (or it is shut down here: a
/// cancel) before the channel comes — a source whose channel failed (a refused
/// certificate, a peer that does not speak TLS) or a cut link —, when `plain` (this side
/// has no TLS) and the source began the main channel with a TLS hello, or when `bound`
/// (`x-livemig-stall-timeout`) passes without one; without this an `accept` would keep the
/// destination in `setup` for good.
pub fn wait_for_channel(
    listener: BorrowedFd<'_>,
    main: Option<BorrowedFd<'_>>,
    bound: Option<Duration>,
    plain: bool,
) -> Result<(), MigrationError> {
    use crate::channel_wait::NoChannel;
    crate::channel_wait::wait_for_channel(listener, main, bound, plain).map_err(|e| match e {
        NoChannel::Io(e) => MigrationError::io("cannot wait for a multifd channel", e),
        NoChannel::MainClosed => MigrationError::Load(
            "multifd: the main channel closed before every multifd channel connected \
             (the source failed to open one)"
                .into(),
        ),
        NoChannel::TimedOut(b) => MigrationError::Load(format!(
            "multifd: no multifd channel connected within {} ms of the main channel \
             (x-livemig-stall-timeout)",
            b.as_millis()
        )),
        NoChannel::SourceSpeaksTls => {
            MigrationError::Load(crate::channel_wait::SOURCE_SPEAKS_TLS.into())
        }
    })
}

impl Receiver {
    /// Accepts `config.channels` channels with `accept`, checks each handshake, and starts
    /// their threads. `blocks` is this VM's RAM; `main` shuts the main channel down.
    pub fn accept(
        config: &MultifdConfig,
        accept: Accept<'_>,
        blocks: Vec<Arc<dyn RamBlock>>,
        main: ShutdownHandle,
    ) -> Result<Receiver, MigrationError> {
        let n = u32::from(config.channels);
        let sync = Arc::new(SyncPoint {
            channels: n,
            state: Mutex::new(SyncState::default()),
            cond: Condvar::new(),
            pages: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            main,
        });
        let blocks: Arc<HashMap<String, Arc<dyn RamBlock>>> = Arc::new(
            blocks
                .into_iter()
                .map(|b| (b.name().to_string(), b))
                .collect(),
        );
        let mut rx = Receiver {
            sync: sync.clone(),
            threads: Vec::new(),
            shutdowns: Vec::new(),
        };
        let mut seen = vec![false; n as usize];
        for count in 0..n {
            let mut conn = accept()?;
            rx.shutdowns.push(conn.shutdown.clone());
            let mut r = conn.reader.take().ok_or_else(|| {
                MigrationError::Other("the transport has no incoming direction".into())
            })?;
            let prefix =
                |e: String| format!("failed to receive packet via multifd channel {count}: {e}");
            let mut b = [0u8; INIT_LEN];
            r.read_exact(&mut b)
                .map_err(|e| MigrationError::Load(prefix(crate::error::os_error_text(&e))))?;
            let init = InitPacket::decode(&b, &UUID, n, 0)
                .map_err(|e| MigrationError::Load(prefix(e.kind.to_string())))?;
            // Only the handshake is bounded (`accept` set the bound): afterwards a channel
            // may rightly hear nothing for long (every page on other channels, a source
            // waiting in pre-switchover).
            conn.shutdown.set_stall_timeout(true, true, None);
            let id = init.id;
            match seen.get_mut(usize::from(id)) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(MigrationError::Load(format!(
                        "multifd: received id '{id}' already setup'"
                    )))
                }
            }
            let ch = Channel {
                id,
                reader: r,
                compression: config.compression,
                blocks: blocks.clone(),
                sync: sync.clone(),
                // The rest of the connection (the unused direction) lives as long as the
                // thread.
                _conn: conn,
            };
            let t = std::thread::Builder::new()
                .name(format!("multifdrecv_{id}"))
                .spawn(move || ch.run())
                .map_err(|e| MigrationError::io("cannot start a multifd channel thread", e))?;
            rx.threads.push(t);
        }
        Ok(rx)
    }

    /// The sync point the loader waits at.
    pub fn sync_point(&self) -> Arc<SyncPoint> {
        self.sync.clone()
    }

    /// The first channel error, if any.
    pub fn error(&self) -> Option<String> {
        self.sync.lock().error.clone()
    }

    /// Ends the channels (the load failed, or its outcome does not matter): waiting threads
    /// are released, the channels shut down, the threads joined.
    pub fn finish(mut self) {
        self.stop();
    }

    /// Ends the channels of a load that completed: they are read on (nothing more is placed
    /// in guest memory) until the source closes each, at most `bound`, then shut down. Runs in
    /// a thread of its own, so the destination does not wait for the source's cleanup.
    pub fn finish_after_load(self, bound: Duration) {
        self.sync.draining.store(true, Ordering::Release);
        // Without a thread, dropping the receiver stops the channels at once.
        let _ = std::thread::Builder::new()
            .name("multifd-drain".into())
            .spawn(move || {
                let mut rx = self;
                rx.drain(bound);
            });
    }

    fn drain(&mut self, bound: Duration) {
        let deadline = std::time::Instant::now() + bound;
        let mut st = self.sync.lock();
        while st.ended < self.sync.channels {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            st = self
                .sync
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        drop(st);
        self.stop();
    }

    fn stop(&mut self) {
        {
            let mut st = self.sync.lock();
            st.quit = true;
            self.sync.cond.notify_all();
        }
        for h in &self.shutdowns {
            h.shutdown();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop();
        }
    }
}

struct Channel {
    id: u8,
    reader: BoxRead,
    compression: Compression,
    blocks: Arc<HashMap<String, Arc<dyn RamBlock>>>,
    sync: Arc<SyncPoint>,
    _conn: Connection,
}

/// Reads a whole header; `Ok(false)` when the channel ends cleanly before its first byte.
fn read_header(r: &mut dyn Read, buf: &mut [u8; PACKET_HEADER_LEN]) -> std::io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn read_error(e: std::io::Error) -> String {
    format!(
        "Unable to read from socket: {}",
        crate::error::os_error_text(&e)
    )
}

impl Channel {
    fn run(mut self) {
        let (id, sync) = (self.id, self.sync.clone());
        match self.work() {
            Ok(()) => sync.end(),
            Err(e) => sync.fail(channel_error(id, &MigrationError::Load(e)).to_string()),
        }
    }

    fn work(&mut self) -> Result<(), String> {
        let mut buf = Box::new([0u8; PACKET_HEADER_LEN]);
        let mut header = Box::<PacketHeader>::default();
        let mut codec = Decompressor::new(self.compression)?;
        let mut zbuf: Vec<u8> = Vec::new();
        // Where the next header starts on this channel, for errors.
        let mut at = INIT_LEN as u64;
        loop {
            if !read_header(&mut self.reader, &mut buf).map_err(read_error)? {
                return Ok(());
            }
            header.decode_from(&buf, at).map_err(|e| e.to_string())?;
            at += PACKET_HEADER_LEN as u64;
            let pages = header.offsets().len();
            if pages > 0 && self.sync.draining.load(Ordering::Acquire) {
                // The guest may already run on this memory: a page after the last SYNC has
                // no place (QEMU 7.2's sender never sends one).
                log::warn!(
                    "multifd channel {}: a packet with {pages} pages after the load ended, not loaded",
                    self.id
                );
                return Ok(());
            }
            if pages > 0 {
                let flags = header.flags & wire::multifd::FLAG_COMPRESSION_MASK;
                if flags != self.compression.flag() {
                    return Err(format!(
                        "flags received {flags:x} flags expected {:x}",
                        self.compression.flag()
                    ));
                }
                let name = String::from_utf8_lossy(header.ramblock_bytes());
                let Some(block) = self.blocks.get(name.as_ref()) else {
                    return Err(format!("multifd: unknown ram block {name}"));
                };
                let region = block.region();
                let len = region.len() as u64;
                for &o in header.offsets() {
                    if o > len.saturating_sub(PAGE_SIZE) || len < PAGE_SIZE {
                        return Err(format!("multifd: offset too long {o} (max {len:x})"));
                    }
                }
                match codec.as_mut() {
                    None => {
                        region
                            .read_pages(&mut self.reader, header.offsets(), PAGE_SIZE as usize)
                            .map_err(read_error)?;
                        at += pages as u64 * PAGE_SIZE;
                    }
                    Some(d) => {
                        let size = header.next_packet_size as usize;
                        if size > MAX_COMPRESSED {
                            return Err(format!(
                                "compressed packet of {size} bytes, more than the {MAX_COMPRESSED} a packet may carry"
                            ));
                        }
                        zbuf.resize(size, 0);
                        self.reader.read_exact(&mut zbuf).map_err(read_error)?;
                        at += size as u64;
                        let offsets = header.offsets();
                        d.decompress(&zbuf, pages, |i, f| {
                            let o = offsets.get(i).copied().unwrap_or(u64::MAX);
                            region
                                .with_slice_mut(o, PAGE_SIZE as usize, |s| f(s))
                                .unwrap_or_else(|| Err(format!("offset {o:#x} outside the block")))
                        })?;
                    }
                }
                self.sync.pages.fetch_add(pages as u64, Ordering::Relaxed);
            }
            if header.is_sync() && !self.sync.arrive() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::MmapRamBlock;
    use crate::multifd::MultifdConfig;
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion};
    use wire::multifd::{encode_packet, PacketFields, FLAG_SYNC};

    /// One packet header: `offsets` in block `ram` (pages follow it, raw), `flags`.
    fn packet(flags: u32, offsets: &[u64]) -> Vec<u8> {
        let mut b = [0u8; PACKET_HEADER_LEN];
        encode_packet(
            &mut b,
            &PacketFields {
                flags,
                packet_num: 0,
                next_packet_size: (offsets.len() as u64 * PAGE_SIZE) as u32,
                ramblock: if offsets.is_empty() { "" } else { "ram" },
                offsets,
            },
        )
        .unwrap();
        b.to_vec()
    }

    /// A load over one channel that completed (its SYNC came, the loader passed it): the
    /// channel is still read afterwards, so QEMU 7.2's late empty packet finds a reader
    /// instead of a shut socket ("Broken pipe" failed such a source before), and a packet
    /// with pages after the end is not placed in guest memory.
    #[test]
    fn a_completed_loads_channels_are_read_on_and_place_nothing() {
        let mapping = MmapRegion::<AtomicBitmap>::new(16 * PAGE_SIZE as usize).unwrap();
        let region = Arc::new(GuestRegionMmap::new(mapping, GuestAddress(0)).unwrap());
        let block: Arc<dyn RamBlock> = Arc::new(MmapRamBlock::new("ram", region.clone()).unwrap());
        let (ours, mut src) = UnixStream::pair().unwrap();
        let mut conn =
            Some(crate::transport::socket_connection(net::Stream::Unix(ours), false).unwrap());
        let config = MultifdConfig {
            channels: 1,
            compression: Compression::None,
            zlib_level: 1,
            zstd_level: 1,
            zero_copy: false,
        };
        src.write_all(&InitPacket { uuid: UUID, id: 0 }.encode())
            .unwrap();
        src.write_all(&packet(FLAG_SYNC, &[])).unwrap();
        let mut accept = || conn.take().ok_or(MigrationError::Cancelled);
        let rx =
            Receiver::accept(&config, &mut accept, vec![block], ShutdownHandle::default()).unwrap();
        rx.sync_point().sync_main().unwrap();
        rx.finish_after_load(Duration::from_secs(10));

        // The source's cleanup comes a moment later: its writes still land.
        std::thread::sleep(Duration::from_millis(200));
        src.write_all(&packet(0, &[])).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        // Header and page in one write: the receiver closes the channel once it has read the
        // header, and a second write could find it closed.
        let mut late = packet(0, &[PAGE_SIZE]);
        late.extend_from_slice(&[0xaa; PAGE_SIZE as usize]);
        src.write_all(&late).unwrap();
        // The channel ends at that packet; what was sent is not placed.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut b = [0u8; 1];
        loop {
            // The receiver closes its end once the channel's thread is done.
            src.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            match (&src).read(&mut b) {
                Ok(0) => break,
                _ if std::time::Instant::now() > deadline => {
                    panic!("the channel was not closed after the packet with pages")
                }
                _ => {}
            }
        }
        let mut page = [0u8; PAGE_SIZE as usize];
        region
            .read_slice(&mut page, MemoryRegionAddress(PAGE_SIZE))
            .unwrap();
        assert!(
            page.iter().all(|&x| x == 0),
            "a page sent after the load was placed"
        );
    }
}
