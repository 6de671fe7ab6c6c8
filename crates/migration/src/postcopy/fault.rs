//! The destination's fault thread, and the owner of the return path while postcopy runs.
//!
//! The thread `poll`s two descriptors: the userfaultfd (guest threads blocked on missing pages)
//! and an eventfd that other threads ring after queueing a [`Control`]. For each fault it asks
//! [`PostcopyRam::on_fault`] what to do and, for a page not yet requested, writes REQ_PAGES_ID
//! (when the block changes) or REQ_PAGES on the return path, flushing once per batch of faults.
//!
//! The return-path writer has one owner at a time (`docs/postcopy.md` §2): from LISTEN until the
//! end of postcopy it is this thread, so requests never wait for another thread's write and no
//! lock is held across a socket write. Other threads hand it what they need sent (PONGs from
//! the package, the received-map dump and RESUME_ACK of a recovery) through the control queue,
//! and take the writer back at the end for SHUT ([`FaultThread::stop`]).
//!
//! When a write fails (the link is cut) the thread drops the writer and carries on: faults are
//! still recorded as pending, and after a recovery [`Control::Attach`] gives it the new return
//! path and [`Control::ResendPending`] asks for every page still missing.

use super::placement::{FaultOutcome, PostcopyRam};
use super::uffd::Fault;
use crate::guest::PAGE_SIZE;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use userfaultfd::EventBuffer;
use wire::return_path::{write_recv_bitmap_dump, write_rp_message, RpMessage};
use wire::{StreamWriter, WireError};

/// Faults read per `read` of the userfaultfd.
const FAULT_BATCH: usize = 32;

/// The destination's end of the return path.
pub struct RpWriter {
    w: StreamWriter<Box<dyn Write + Send>>,
    /// Block index named by the last REQ_PAGES_ID on this connection.
    last_block: Option<usize>,
}

impl RpWriter {
    /// Wraps the return-path half of a connection.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        RpWriter {
            w: StreamWriter::new(w),
            last_block: None,
        }
    }

    /// Queues a request for page `offset` of block `block`: REQ_PAGES_ID when the block differs
    /// from the last request's on this connection, REQ_PAGES otherwise. Not flushed.
    pub fn request(
        &mut self,
        ram: &PostcopyRam,
        block: usize,
        offset: u64,
    ) -> Result<(), WireError> {
        let msg = if self.last_block == Some(block) {
            RpMessage::ReqPages {
                start: offset,
                len: PAGE_SIZE as u32,
            }
        } else {
            let name = ram.blocks().get(block).map_or("", |b| b.name());
            RpMessage::ReqPagesId {
                start: offset,
                len: PAGE_SIZE as u32,
                ramblock: name.to_string(),
            }
        };
        write_rp_message(&mut self.w, &msg)?;
        self.last_block = Some(block);
        Ok(())
    }

    /// Writes and flushes one message.
    pub fn send(&mut self, msg: &RpMessage) -> Result<(), WireError> {
        write_rp_message(&mut self.w, msg)?;
        self.w.flush()
    }

    /// Writes and flushes the answer to RECV_BITMAP: the message, then the dump.
    pub fn send_recv_bitmap(&mut self, ramblock: &str, dump: &[u8]) -> Result<(), WireError> {
        write_rp_message(
            &mut self.w,
            &RpMessage::RecvBitmap {
                ramblock: ramblock.to_string(),
            },
        )?;
        write_recv_bitmap_dump(&mut self.w, dump)?;
        self.w.flush()
    }

    /// Flushes what was queued.
    pub fn flush(&mut self) -> Result<(), WireError> {
        self.w.flush()
    }
}

/// What other threads ask the fault thread to do, in order.
pub enum Control {
    /// Send a return-path message (a PONG from the package, RESUME_ACK).
    Send(RpMessage),
    /// Send the answer to RECV_BITMAP.
    RecvBitmap {
        /// The block.
        ramblock: String,
        /// Its received map, as [`super::received::ReceivedMap::to_le_dump`] made it.
        dump: Vec<u8>,
    },
    /// Use this return path from now on (a recovery's new connection).
    Attach(RpWriter),
    /// The return path is gone (postcopy paused): requests are recorded, not sent, until
    /// the next [`Control::Attach`].
    Detach,
    /// Request every page still pending (after RESUME_ACK).
    ResendPending,
}

struct Ctl {
    queue: Mutex<VecDeque<Control>>,
    wake: EventFd,
    quit: AtomicBool,
    /// The last return-path write error, until the next attach.
    rp_error: Mutex<Option<String>>,
}

impl Ctl {
    fn ring(&self) {
        let _ = self.wake.write(1);
    }
}

/// A running fault thread.
pub struct FaultThread {
    ctl: Arc<Ctl>,
    handle: Option<JoinHandle<Option<RpWriter>>>,
}

impl FaultThread {
    /// Starts the thread for `ram`, owning return path `rp` (if there is one yet).
    pub fn spawn(ram: Arc<PostcopyRam>, rp: Option<RpWriter>) -> std::io::Result<Self> {
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(std::io::Error::from)?;
        let ctl = Arc::new(Ctl {
            queue: Mutex::new(VecDeque::new()),
            wake,
            quit: AtomicBool::new(false),
            rp_error: Mutex::new(None),
        });
        let c = ctl.clone();
        let handle = std::thread::Builder::new()
            .name("postcopy-fault".into())
            .spawn(move || run(&ram, &c, rp))?;
        Ok(FaultThread {
            ctl,
            handle: Some(handle),
        })
    }

    /// Queues `c` and wakes the thread.
    pub fn control(&self, c: Control) {
        self.ctl
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(c);
        self.ctl.ring();
    }

    /// Queues a return-path message.
    pub fn send(&self, m: RpMessage) {
        self.control(Control::Send(m));
    }

    /// The last return-path write error since the last attach, if any.
    pub fn rp_error(&self) -> Option<String> {
        self.ctl
            .rp_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stops the thread once it has done what was queued, and returns the return-path writer
    /// (for SHUT), if it still has a working one.
    pub fn stop(mut self) -> Option<RpWriter> {
        self.ctl.quit.store(true, Ordering::Release);
        self.ctl.ring();
        self.handle.take().and_then(|h| h.join().ok()).flatten()
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.ctl.quit.store(true, Ordering::Release);
            self.ctl.ring();
            let _ = h.join();
        }
    }
}

/// Drops the writer after a failed write, remembering why.
fn broken(ctl: &Ctl, rp: &mut Option<RpWriter>, e: WireError) {
    log::warn!("postcopy: the return path failed ({e}); page requests wait for a recovery");
    *ctl.rp_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    *rp = None;
}

fn run(ram: &PostcopyRam, ctl: &Ctl, mut rp: Option<RpWriter>) -> Option<RpWriter> {
    let mut events = EventBuffer::new(FAULT_BATCH);
    let mut faults: Vec<Fault> = Vec::with_capacity(FAULT_BATCH);
    // The pages this batch of faults asks for (their requests' send time is noted).
    let mut asked: Vec<(usize, u64)> = Vec::with_capacity(FAULT_BATCH);
    loop {
        let (uffd_ready, ctl_ready) = {
            let mut fds = vec![PollFd::new(ctl.wake.as_fd(), PollFlags::POLLIN)];
            if let Some(fd) = ram.uffd() {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("postcopy_ram_fault_thread: userfault poll: {e}");
                    return rp;
                }
            }
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (
                fds.get(1).is_some_and(ready),
                fds.first().is_some_and(ready),
            )
        };
        if ctl_ready {
            let _ = ctl.wake.read();
            loop {
                let next = ctl
                    .queue
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop_front();
                let Some(c) = next else { break };
                control(ram, ctl, &mut rp, c);
            }
            if ctl.quit.load(Ordering::Acquire) {
                return rp;
            }
        }
        if uffd_ready {
            let Some(fd) = ram.uffd() else { continue };
            faults.clear();
            if let Err(e) = fd.read_faults(&mut events, &mut faults) {
                log::error!("postcopy_ram_fault_thread: {e}");
                return rp;
            }
            asked.clear();
            for f in &faults {
                match ram.on_fault(f.addr, f.tid) {
                    Ok(FaultOutcome::Request { block, offset }) => {
                        if let Some(w) = rp.as_mut() {
                            match w.request(ram, block, offset) {
                                Ok(()) => asked.push((block, offset / PAGE_SIZE)),
                                Err(e) => broken(ctl, &mut rp, e),
                            }
                        }
                    }
                    Ok(FaultOutcome::Pending | FaultOutcome::Woken) => {}
                    Err(e) => log::error!("{e}"),
                }
            }
            if !asked.is_empty() {
                // Marked before the write: the answer may be placed before the write returns.
                ram.requests().sent(&asked, Instant::now());
                if let Some(Err(e)) = rp.as_mut().map(|w| w.flush()) {
                    broken(ctl, &mut rp, e);
                }
            }
        }
    }
}

fn control(ram: &PostcopyRam, ctl: &Ctl, rp: &mut Option<RpWriter>, c: Control) {
    let result = match c {
        Control::Detach => {
            *rp = None;
            Ok(())
        }
        Control::Attach(w) => {
            *rp = Some(w);
            *ctl.rp_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
            Ok(())
        }
        Control::Send(m) => match rp.as_mut() {
            Some(w) => w.send(&m),
            None => {
                log::warn!("postcopy: no return path to send {} on", m.name());
                Ok(())
            }
        },
        Control::RecvBitmap { ramblock, dump } => match rp.as_mut() {
            Some(w) => w.send_recv_bitmap(&ramblock, &dump),
            None => Ok(()),
        },
        Control::ResendPending => match rp.as_mut() {
            Some(w) => {
                let pending = ram.requests().pending();
                pending
                    .iter()
                    .try_for_each(|&(b, page)| w.request(ram, b, page * PAGE_SIZE))
                    .and_then(|()| {
                        ram.requests().sent(&pending, Instant::now());
                        w.flush()
                    })
            }
            None => Ok(()),
        },
    };
    if let Err(e) = result {
        broken(ctl, rp, e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postcopy::uffd::{AnonMapping, PostcopyFd};
    use std::os::unix::net::UnixStream;
    use std::sync::mpsc;
    use std::time::Duration;
    use wire::return_path::read_rp_message;
    use wire::StreamReader;

    const P: usize = PAGE_SIZE as usize;

    /// A "vCPU": reports its thread id, waits for `go`, then writes one byte of `page`.
    fn vcpu(
        map: &Arc<AnonMapping>,
        page: usize,
    ) -> (i32, mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let (tid_tx, tid_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let m = map.clone();
        let h = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid().as_raw()).unwrap();
            go_rx.recv().unwrap();
            m.write_byte(page * P + 1, 0xee);
        });
        (tid_rx.recv().unwrap(), go_tx, h)
    }

    fn rp_pair() -> (RpWriter, StreamReader<UnixStream>) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (RpWriter::new(Box::new(a)), StreamReader::new(b))
    }

    #[test]
    fn faults_become_one_request_per_page_and_placement_unblocks() {
        let map = Arc::new(AnonMapping::new(16 * P).unwrap());
        let (t1, go1, h1) = vcpu(&map, 5);
        let (t2, go2, h2) = vcpu(&map, 5);
        let ram = Arc::new(PostcopyRam::new(
            vec![("pc.ram".into(), map.range())],
            Some(PostcopyFd::open().unwrap()),
            Some(&[t1, t2]),
        ));
        ram.register().unwrap();
        let (w, mut r) = rp_pair();
        let ft = FaultThread::spawn(ram.clone(), Some(w)).unwrap();
        ft.send(RpMessage::Pong(3));
        assert_eq!(read_rp_message(&mut r).unwrap(), RpMessage::Pong(3));

        go1.send(()).unwrap();
        assert_eq!(
            read_rp_message(&mut r).unwrap(),
            RpMessage::ReqPagesId {
                start: 5 * PAGE_SIZE,
                len: 4096,
                ramblock: "pc.ram".into()
            }
        );
        go2.send(()).unwrap();
        // The second vCPU blocks on the same page without a second request: wait until its
        // fault has been seen, then place the page.
        while ram.stats.faults.load(Ordering::Relaxed) < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(
            !h1.is_finished() && !h2.is_finished(),
            "both wait for page 5"
        );
        let mut page = vec![0u8; P];
        page[0] = 0x42;
        assert!(ram.place_page(0, 5 * PAGE_SIZE, &page).unwrap());
        h1.join().unwrap();
        h2.join().unwrap();
        assert_eq!(map.read_byte(5 * P), Some(0x42));
        assert_eq!(map.read_byte(5 * P + 1), Some(0xee));

        // Same block again: REQ_PAGES without the name.
        let m = map.clone();
        let h = std::thread::spawn(move || m.read_byte(6 * P));
        assert_eq!(
            read_rp_message(&mut r).unwrap(),
            RpMessage::ReqPages {
                start: 6 * PAGE_SIZE,
                len: 4096
            }
        );
        ram.place_zero(0, 6 * PAGE_SIZE).unwrap();
        assert_eq!(h.join().unwrap(), Some(0));

        let bt = ram.blocktime().unwrap();
        let per_vcpu = bt.vcpu_ns();
        assert!(per_vcpu[0] > 20_000_000 && per_vcpu[1] > 0, "{per_vcpu:?}");
        assert!(bt.total_ns() > 0, "both vCPUs were blocked at once");
        assert_eq!(ram.requests().latency().count(), 2);
        assert!(ft.stop().is_some());
    }

    #[test]
    fn a_cut_return_path_keeps_requests_for_the_next_one() {
        let map = Arc::new(AnonMapping::new(8 * P).unwrap());
        let ram = Arc::new(PostcopyRam::new(
            vec![("ram".into(), map.range())],
            Some(PostcopyFd::open().unwrap()),
            None,
        ));
        ram.register().unwrap();
        let (w, r) = rp_pair();
        let ft = FaultThread::spawn(ram.clone(), Some(w)).unwrap();
        drop(r); // the link is cut
        let m = map.clone();
        let h = std::thread::spawn(move || m.read_byte(7 * P));
        while ft.rp_error().is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ram.requests().pending(), vec![(0, 7)]);
        // A faulting thread while there is no return path: recorded, not sent.
        let m = map.clone();
        let h2 = std::thread::spawn(move || m.read_byte(3 * P));
        while ram.requests().pending().len() < 2 {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Recovery: the new connection gets every pending page, the block named again.
        let (w, mut r) = rp_pair();
        ft.control(Control::Attach(w));
        ft.send(RpMessage::ResumeAck(1));
        ft.control(Control::ResendPending);
        assert_eq!(read_rp_message(&mut r).unwrap(), RpMessage::ResumeAck(1));
        assert_eq!(
            read_rp_message(&mut r).unwrap(),
            RpMessage::ReqPagesId {
                start: 7 * PAGE_SIZE,
                len: 4096,
                ramblock: "ram".into()
            }
        );
        assert_eq!(
            read_rp_message(&mut r).unwrap(),
            RpMessage::ReqPages {
                start: 3 * PAGE_SIZE,
                len: 4096
            }
        );
        assert!(ft.rp_error().is_none());
        ram.place_zero(0, 7 * PAGE_SIZE).unwrap();
        ram.place_zero(0, 3 * PAGE_SIZE).unwrap();
        assert_eq!(h.join().unwrap(), Some(0));
        assert_eq!(h2.join().unwrap(), Some(0));
        // The received-map dump goes out through the thread too.
        ft.control(Control::RecvBitmap {
            ramblock: "ram".into(),
            dump: ram.blocks()[0].received().to_le_dump(),
        });
        assert_eq!(
            read_rp_message(&mut r).unwrap(),
            RpMessage::RecvBitmap {
                ramblock: "ram".into()
            }
        );
        let dump = wire::return_path::read_recv_bitmap_dump(&mut r, "ram", 64).unwrap();
        assert_eq!(dump, vec![0b1000_1000, 0, 0, 0, 0, 0, 0, 0]);
        drop(ft);
    }
}
