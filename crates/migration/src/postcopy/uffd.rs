//! userfaultfd for postcopy: the host probe, registration of guest RAM, atomic page placement,
//! and the memory advice around discards. With `guest`, this is the crate's only `unsafe`.
//!
//! Guest RAM in postcopy is registered in MISSING mode: the first access to a page that is not
//! there (never received, or discarded) blocks the accessing thread in the kernel and queues a
//! fault message for the fault thread. A page is then made present *atomically* with
//! `UFFDIO_COPY` (from a staging page) or `UFFDIO_ZEROPAGE`, which also wakes every thread
//! waiting on it. Nothing ever writes a missing page through the mapping: that write would
//! itself fault and wait for the page it is trying to place.
//!
//! Ranges are given as [`HostRange`]s, raw spans of host memory, so that this module does not
//! depend on how a VMM owns its guest memory.
#![allow(unsafe_code)]

use super::PostcopyError;
use crate::guest::{RamBlock, PAGE_SIZE};
use nix::sys::mman::{madvise, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};
use std::ffi::c_void;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use userfaultfd::{Event, EventBuffer, FeatureFlags, IoctlFlags, Uffd, UffdBuilder};

/// A span of host memory holding guest RAM (one RAM block), as postcopy sees it.
#[derive(Clone, Copy, Debug)]
pub struct HostRange {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: a HostRange is an address range, not ownership; `new`'s contract keeps the range
// mapped while any copy is used, from any thread. Every access through it is a kernel
// operation (ioctl, madvise), never a Rust reference.
unsafe impl Send for HostRange {}
// SAFETY: as above.
unsafe impl Sync for HostRange {}

impl HostRange {
    /// Wraps `base..base+len`.
    ///
    /// # Safety
    ///
    /// The range must be a private anonymous (or shmem) mapping, readable and writable,
    /// page-aligned, that stays mapped for as long as this value or a copy of it is used.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        HostRange { base, len }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The host address of the first byte.
    pub fn base_addr(&self) -> usize {
        self.base.as_ptr() as usize
    }

    /// The offset of host address `addr` inside the range, if it is inside.
    pub fn offset_of(&self, addr: usize) -> Option<u64> {
        let off = addr.checked_sub(self.base_addr())?;
        (off < self.len).then_some(off as u64)
    }

    /// The host address of `[offset, offset+len)`, if that lies inside the range.
    fn at(&self, offset: u64, len: usize) -> Option<*mut c_void> {
        let off = usize::try_from(offset).ok()?;
        if off.checked_add(len)? > self.len {
            return None;
        }
        Some((self.base_addr() + off) as *mut c_void)
    }

    fn out_of_range(&self, offset: u64, len: usize) -> PostcopyError {
        PostcopyError::BadPage(format!(
            "Illegal RAM offset {offset:x} (+{len:#x}) in a block of {:#x} bytes",
            self.len
        ))
    }
}

/// The host ranges of `blocks`, by name. The ranges stay valid only while `blocks` are alive:
/// [`super::PostcopyRam::from_blocks`] keeps the `Arc`s beside them.
pub(crate) fn ranges_of(blocks: &[Arc<dyn RamBlock>]) -> Vec<(String, HostRange)> {
    blocks
        .iter()
        .filter_map(|b| {
            let region = b.region();
            let base = NonNull::new(region.host_addr())?;
            // SAFETY: the region is the block's guest RAM mapping (private anonymous memory,
            // page-aligned, read-write, per the `RamBlock` contract); the caller keeps the
            // block, and so the mapping, alive for as long as it uses the range.
            let range = unsafe { HostRange::new(base, region.len()) };
            Some((b.name().to_string(), range))
        })
        .collect()
}

/// What a placement found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The page was missing and is now in place; its waiters are awake.
    Placed,
    /// The page was already present (placed by another channel): nothing changed.
    AlreadyPresent,
}

/// What one placement call did at the start of a run of pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStep {
    /// The first `n` pages (at least one) were missing and are now in place, their waiters
    /// awake.
    Placed(usize),
    /// The first page was already present (placed by another channel): nothing changed.
    FirstPresent,
}

/// The kernel reported `done` bytes of a `len`-byte run placed: whole pages, at least one, at
/// most all of them — anything else is not a count this code knows how to go on from.
fn run_step(
    done: usize,
    len: usize,
    what: impl FnOnce() -> String,
) -> Result<RunStep, PostcopyError> {
    if done == 0 || done > len || !done.is_multiple_of(PAGE_SIZE as usize) {
        return Err(PostcopyError::BadPage(format!(
            "{}: the kernel placed {done} bytes",
            what()
        )));
    }
    Ok(RunStep::Placed(done / PAGE_SIZE as usize))
}

/// The one ioctl this module issues itself.
mod sys {
    /// `struct uffdio_zeropage` of `<linux/userfaultfd.h>`.
    #[repr(C)]
    pub struct UffdioZeropage {
        pub start: u64,
        pub len: u64,
        pub mode: u64,
        pub zeropage: i64,
    }

    // UFFDIO_ZEROPAGE: _IOWR(UFFDIO (0xAA), _UFFDIO_ZEROPAGE (0x04), struct uffdio_zeropage).
    nix::ioctl_readwrite!(uffdio_zeropage, 0xAA, 0x04, UffdioZeropage);
}
use sys::{uffdio_zeropage, UffdioZeropage};

/// One fault read from the userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting host address (not page-aligned).
    pub addr: usize,
    /// The faulting thread's kernel id, when the kernel reports it (0 otherwise).
    pub tid: i32,
}

/// A userfaultfd set up for postcopy: non-blocking, close-on-exec, reporting thread ids when
/// the kernel can (they are what blocktime accounting maps to vCPUs).
#[derive(Debug)]
pub struct PostcopyFd {
    uffd: Uffd,
    thread_ids: bool,
}

fn uffd_err(what: impl Into<String>) -> impl FnOnce(userfaultfd::Error) -> PostcopyError {
    let what = what.into();
    move |source| PostcopyError::Uffd { what, source }
}

fn builder(features: FeatureFlags) -> UffdBuilder {
    let mut b = UffdBuilder::new();
    b.close_on_exec(true)
        .non_blocking(true)
        // Faults taken by the kernel on the guest's behalf (KVM, a read() into guest RAM)
        // must be reported too.
        .user_mode_only(false)
        .require_features(features)
        .require_ioctls(IoctlFlags::API | IoctlFlags::REGISTER | IoctlFlags::UNREGISTER);
    b
}

/// The ioctls a registered range must offer (QEMU's `postcopy_ram_supported_by_host`).
const NEEDED: IoctlFlags = IoctlFlags::COPY
    .union(IoctlFlags::ZEROPAGE)
    .union(IoctlFlags::WAKE);

impl PostcopyFd {
    /// Opens a userfaultfd (the system call, or `/dev/userfaultfd` where it exists).
    pub fn open() -> Result<Self, PostcopyError> {
        match builder(FeatureFlags::THREAD_ID).create() {
            Ok(uffd) => Ok(PostcopyFd {
                uffd,
                thread_ids: true,
            }),
            // An old kernel without thread ids: postcopy works, blocktime cannot tell vCPUs.
            Err(_) => builder(FeatureFlags::empty())
                .create()
                .map(|uffd| PostcopyFd {
                    uffd,
                    thread_ids: false,
                })
                .map_err(|e| PostcopyError::Unsupported(format!("userfaultfd not available: {e}"))),
        }
    }

    /// Whether faults carry the faulting thread's id.
    pub fn reports_thread_ids(&self) -> bool {
        self.thread_ids
    }

    /// Registers `r` in MISSING mode: from now on an access to a missing page of it faults to
    /// this descriptor.
    pub fn register(&self, r: &HostRange) -> Result<(), PostcopyError> {
        let ioctls = self
            .uffd
            .register(r.base.as_ptr().cast(), r.len)
            .map_err(uffd_err("userfault register"))?;
        if !ioctls.contains(NEEDED) {
            let _ = self.unregister(r);
            return Err(PostcopyError::Unsupported(format!(
                "Missing userfault map features: {:x}",
                (NEEDED - ioctls).bits()
            )));
        }
        Ok(())
    }

    /// Unregisters `r`; missing pages read as zero again afterwards.
    pub fn unregister(&self, r: &HostRange) -> Result<(), PostcopyError> {
        self.uffd
            .unregister(r.base.as_ptr().cast(), r.len)
            .map_err(uffd_err("userfault unregister"))
    }

    /// Places `page` (exactly [`PAGE_SIZE`] bytes) at `offset` of registered range `r`,
    /// atomically, and wakes the threads waiting on it.
    pub fn copy(
        &self,
        r: &HostRange,
        offset: u64,
        page: &[u8],
    ) -> Result<Placement, PostcopyError> {
        if page.len() != PAGE_SIZE as usize {
            return Err(PostcopyError::BadPage(format!(
                "a page to place has {} bytes, not {PAGE_SIZE}",
                page.len()
            )));
        }
        Ok(match self.copy_run(r, offset, page)? {
            RunStep::Placed(_) => Placement::Placed,
            RunStep::FirstPresent => Placement::AlreadyPresent,
        })
    }

    /// Places the pages of `data` (a whole number of pages) at `offset` of registered range
    /// `r` with one `UFFDIO_COPY`, atomically page by page, waking the threads waiting on the
    /// pages it places. The kernel stops at the first page already present (another channel
    /// placed it meanwhile): the result says how far it got, and the caller goes on past that
    /// page.
    pub fn copy_run(
        &self,
        r: &HostRange,
        offset: u64,
        data: &[u8],
    ) -> Result<RunStep, PostcopyError> {
        let len = data.len();
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as usize) {
            return Err(PostcopyError::BadPage(format!(
                "pages to place have {len} bytes, not a multiple of {PAGE_SIZE}"
            )));
        }
        let dst = r
            .at(offset, len)
            .ok_or_else(|| r.out_of_range(offset, len))?;
        // SAFETY: `dst..dst+len` is inside `r` (checked), which `HostRange::new`'s contract
        // keeps mapped; `data` is a live buffer of `len` bytes that the kernel only reads. The
        // kernel installs each new page atomically, so threads touching the range
        // concurrently see either a fault (and wait) or a whole new page — no Rust reference
        // into the range is involved.
        let res = unsafe { self.uffd.copy(data.as_ptr().cast(), dst, len, true) };
        let what = || format!("UFFDIO_COPY at offset {offset:#x} (+{len:#x})");
        match res {
            Ok(n) => run_step(n, len, what),
            // Part of the run placed (and woken): the kernel stopped at a page it could not
            // place, which the next call meets first.
            Err(userfaultfd::Error::PartiallyCopied(n)) => run_step(n, len, what),
            // (The crate's errno type is from its own nix version: compare numbers.)
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == nix::libc::EEXIST => {
                Ok(RunStep::FirstPresent)
            }
            Err(e) => Err(PostcopyError::Uffd {
                what: what(),
                source: e,
            }),
        }
    }

    /// Places `len` bytes of zero pages at `offset` of registered range `r`, atomically, and
    /// wakes their waiters.
    pub fn zero(&self, r: &HostRange, offset: u64, len: usize) -> Result<Placement, PostcopyError> {
        let mut at = 0;
        let mut placed = false;
        // A range of several pages goes on past pages already present, as a run does.
        while at < len {
            match self.zero_run(r, offset + at as u64, len - at)? {
                RunStep::Placed(n) => {
                    placed = true;
                    at += n * PAGE_SIZE as usize;
                }
                RunStep::FirstPresent => at += PAGE_SIZE as usize,
            }
        }
        Ok(if placed {
            Placement::Placed
        } else {
            Placement::AlreadyPresent
        })
    }

    /// Maps zero pages over `[offset, offset+len)` of registered range `r` with one
    /// `UFFDIO_ZEROPAGE`, waking their waiters; like [`copy_run`](Self::copy_run) it stops
    /// at the first page already present and says how far it got.
    pub fn zero_run(
        &self,
        r: &HostRange,
        offset: u64,
        len: usize,
    ) -> Result<RunStep, PostcopyError> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as usize) {
            return Err(PostcopyError::BadPage(format!(
                "zero pages to place have {len} bytes, not a multiple of {PAGE_SIZE}"
            )));
        }
        let dst = r
            .at(offset, len)
            .ok_or_else(|| r.out_of_range(offset, len))?;
        let mut arg = UffdioZeropage {
            start: dst as u64,
            len: len as u64,
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: the range is inside the mapping (checked) and registered with this
        // descriptor; the kernel maps zero pages there atomically and writes only `arg`, a
        // live local of the layout `UFFDIO_ZEROPAGE` takes. (The `userfaultfd` crate's
        // `zeropage` drops the count of pages placed when it stops early, which a run needs.)
        let res = unsafe { uffdio_zeropage(self.uffd.as_raw_fd(), &mut arg) };
        let what = || format!("UFFDIO_ZEROPAGE at offset {offset:#x} (+{len:#x})");
        match res {
            Ok(_) => run_step(len, len, what),
            Err(nix::Error::EAGAIN) => match usize::try_from(arg.zeropage) {
                Ok(n) => run_step(n, len, what),
                Err(_) => Err(PostcopyError::Sys {
                    what: what(),
                    source: nix::Error::EAGAIN,
                }),
            },
            Err(nix::Error::EEXIST) => Ok(RunStep::FirstPresent),
            Err(source) => Err(PostcopyError::Sys {
                what: what(),
                source,
            }),
        }
    }

    /// Wakes the threads waiting on `[offset, offset+len)` of `r` (a fault that raced a
    /// placement).
    pub fn wake(&self, r: &HostRange, offset: u64, len: usize) -> Result<(), PostcopyError> {
        let at = r
            .at(offset, len)
            .ok_or_else(|| r.out_of_range(offset, len))?;
        self.uffd
            .wake(at, len)
            .map_err(uffd_err(format!("UFFDIO_WAKE at offset {offset:#x}")))
    }

    /// Reads the faults queued now (the descriptor is non-blocking: none is not an error) and
    /// appends them to `out`.
    pub fn read_faults(
        &self,
        buf: &mut EventBuffer,
        out: &mut Vec<Fault>,
    ) -> Result<(), PostcopyError> {
        let events = self
            .uffd
            .read_events(buf)
            .map_err(uffd_err("reading the userfaultfd"))?;
        for ev in events {
            match ev.map_err(uffd_err("decoding a userfaultfd message"))? {
                Event::Pagefault {
                    addr, thread_id, ..
                } => out.push(Fault {
                    addr: addr as usize,
                    tid: if self.thread_ids {
                        thread_id.as_raw()
                    } else {
                        0
                    },
                }),
                // Only page faults were asked for (no fork/remap/remove features).
                other => log::warn!("postcopy: unexpected userfaultfd event {other:?}"),
            }
        }
        Ok(())
    }
}

impl AsFd for PostcopyFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor is owned by `self.uffd` and stays open while `self` is
        // borrowed.
        unsafe { BorrowedFd::borrow_raw(self.uffd.as_raw_fd()) }
    }
}

/// Throws away `[offset, offset+len)` of `r` (`MADV_DONTNEED`): the pages become missing, so
/// once `r` is registered the next access faults; before that they read as zero.
pub fn discard(r: &HostRange, offset: u64, len: usize) -> Result<(), PostcopyError> {
    if len == 0 {
        return Ok(());
    }
    let at = r
        .at(offset, len)
        .ok_or_else(|| r.out_of_range(offset, len))?;
    let ptr = NonNull::new(at).ok_or_else(|| r.out_of_range(offset, len))?;
    // SAFETY: the span is inside the mapping (checked). Dropping pages of guest RAM is what a
    // discard means; nobody holds Rust references into guest memory.
    unsafe { madvise(ptr, len, MmapAdvise::MADV_DONTNEED) }.map_err(|source| PostcopyError::Sys {
        what: format!("ram_block_discard_range: Failed to discard range at {offset:#x}"),
        source,
    })
}

/// Turns transparent huge pages off for `r` (`MADV_NOHUGEPAGE`), so that discards punch 4 KiB
/// holes and placement is per 4 KiB page, as QEMU does before the first discard. Advice only:
/// a kernel without THP has nothing to turn off.
pub fn no_huge_pages(r: &HostRange) {
    if r.len == 0 {
        return;
    }
    // SAFETY: the range is the whole mapping; the advice changes no contents.
    let _ = unsafe { madvise(r.base.cast(), r.len, MmapAdvise::MADV_NOHUGEPAGE) };
}

/// A private anonymous mapping owned by this value: the probe's test area, and scratch guest
/// RAM for tests.
#[derive(Debug)]
pub struct AnonMapping {
    range: HostRange,
}

impl AnonMapping {
    /// Maps `len` bytes (rounded up to pages) of zeroed memory.
    pub fn new(len: usize) -> Result<Self, PostcopyError> {
        let len = len.next_multiple_of(PAGE_SIZE as usize);
        let nz = NonZeroUsize::new(len).ok_or_else(|| PostcopyError::Sys {
            what: "mapping an empty area".into(),
            source: nix::Error::EINVAL,
        })?;
        // SAFETY: a fresh private anonymous mapping aliases nothing.
        let base = unsafe {
            mmap_anonymous(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(|source| PostcopyError::Sys {
            what: "Failed to map test area".into(),
            source,
        })?;
        // SAFETY: the mapping was just created with this length and lives until Drop.
        let range = unsafe { HostRange::new(base.cast(), len) };
        Ok(AnonMapping { range })
    }

    /// The mapping as a range (valid while `self` lives).
    pub fn range(&self) -> HostRange {
        self.range
    }

    /// Reads byte `offset` through the mapping (faults if the page is missing and registered).
    pub fn read_byte(&self, offset: usize) -> Option<u8> {
        let p = self.range.at(offset as u64, 1)?;
        // SAFETY: in bounds (checked); a volatile read of memory other threads may place.
        Some(unsafe { std::ptr::read_volatile(p as *const u8) })
    }

    /// Writes byte `offset` through the mapping (faults if the page is missing and registered).
    pub fn write_byte(&self, offset: usize, v: u8) -> bool {
        let Some(p) = self.range.at(offset as u64, 1) else {
            return false;
        };
        // SAFETY: in bounds (checked); a volatile write, as a guest's.
        unsafe { std::ptr::write_volatile(p as *mut u8, v) };
        true
    }
}

impl Drop for AnonMapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping created in `new`; no HostRange copy outlives its owner
        // (documented on `range`).
        let _ = unsafe { munmap(self.range.base.cast(), self.range.len) };
    }
}

/// QEMU's `postcopy_ram_supported_by_host`: a userfaultfd can be opened, and an anonymous page
/// registered in MISSING mode offers COPY, ZEROPAGE and WAKE.
pub fn probe() -> Result<(), PostcopyError> {
    let fd = PostcopyFd::open()?;
    let area = AnonMapping::new(PAGE_SIZE as usize)?;
    fd.register(&area.range())?;
    fd.unregister(&area.range())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    const P: usize = PAGE_SIZE as usize;

    /// Waits (polling the non-blocking descriptor) for the next fault.
    fn next_fault(fd: &PostcopyFd) -> Fault {
        let mut buf = EventBuffer::new(8);
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.is_empty() {
            assert!(Instant::now() < deadline, "no fault came");
            fd.read_faults(&mut buf, &mut out).unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        out[0]
    }

    #[test]
    fn the_host_can_do_postcopy() {
        probe().unwrap();
        assert!(PostcopyFd::open().unwrap().reports_thread_ids());
    }

    #[test]
    fn a_missing_page_blocks_its_reader_until_placed() {
        let map = std::sync::Arc::new(AnonMapping::new(8 * P).unwrap());
        let fd = PostcopyFd::open().unwrap();
        fd.register(&map.range()).unwrap();
        let (tx, rx) = mpsc::channel();
        let m = map.clone();
        let reader = std::thread::spawn(move || {
            tx.send(nix::unistd::gettid().as_raw()).unwrap();
            m.read_byte(2 * P + 100)
        });
        let tid = rx.recv().unwrap();
        let f = next_fault(&fd);
        assert_eq!(
            map.range().offset_of(f.addr).map(|o| o / PAGE_SIZE),
            Some(2)
        );
        assert_eq!(
            f.tid, tid,
            "the fault names the thread that touched the page"
        );
        assert!(!reader.is_finished(), "the reader waits for its page");
        let mut page = vec![0u8; P];
        page[100] = 0xab;
        assert_eq!(
            fd.copy(&map.range(), 2 * PAGE_SIZE, &page).unwrap(),
            Placement::Placed
        );
        assert_eq!(reader.join().unwrap(), Some(0xab));
        // Placing again changes nothing and is not an error (the other channel was first).
        page[100] = 0xcd;
        assert_eq!(
            fd.copy(&map.range(), 2 * PAGE_SIZE, &page).unwrap(),
            Placement::AlreadyPresent
        );
        assert_eq!(map.read_byte(2 * P + 100), Some(0xab));
        // Zero pages, and a writer blocked on one.
        let m = map.clone();
        let writer = std::thread::spawn(move || m.write_byte(3 * P + 7, 9));
        let f = next_fault(&fd);
        assert_eq!(
            map.range().offset_of(f.addr).map(|o| o / PAGE_SIZE),
            Some(3)
        );
        assert_eq!(
            fd.zero(&map.range(), 3 * PAGE_SIZE, P).unwrap(),
            Placement::Placed
        );
        assert!(writer.join().unwrap());
        assert_eq!(map.read_byte(3 * P + 7), Some(9));
        assert_eq!(
            fd.zero(&map.range(), 3 * PAGE_SIZE, P).unwrap(),
            Placement::AlreadyPresent
        );
        fd.wake(&map.range(), 3 * PAGE_SIZE, P).unwrap();
        // Out of range is refused before the kernel sees it.
        assert!(fd.copy(&map.range(), 8 * PAGE_SIZE, &page).is_err());
        assert!(fd.copy(&map.range(), 0, &page[..10]).is_err());
        // A discard makes a page missing again.
        discard(&map.range(), 2 * PAGE_SIZE, P).unwrap();
        let m = map.clone();
        let reader = std::thread::spawn(move || m.read_byte(2 * P + 100));
        let f = next_fault(&fd);
        assert_eq!(
            map.range().offset_of(f.addr).map(|o| o / PAGE_SIZE),
            Some(2)
        );
        fd.zero(&map.range(), 2 * PAGE_SIZE, P).unwrap();
        assert_eq!(reader.join().unwrap(), Some(0));
        fd.unregister(&map.range()).unwrap();
        // Unregistered, a missing page reads as zero without anyone's help.
        assert_eq!(map.read_byte(5 * P), Some(0));
    }

    #[test]
    fn a_run_stops_at_a_present_page_and_goes_on_after_it() {
        let map = std::sync::Arc::new(AnonMapping::new(8 * P).unwrap());
        let fd = PostcopyFd::open().unwrap();
        fd.register(&map.range()).unwrap();
        // Page 3 came on the other channel.
        fd.copy(&map.range(), 3 * PAGE_SIZE, &[0xee; P]).unwrap();
        // A reader waits on page 1, inside the run.
        let m = map.clone();
        let reader = std::thread::spawn(move || m.read_byte(P + 5));
        next_fault(&fd);
        let run: Vec<u8> = (0..6).flat_map(|i| [i as u8 + 1; P]).collect();
        assert_eq!(
            fd.copy_run(&map.range(), 0, &run).unwrap(),
            RunStep::Placed(3),
            "pages 0-2 placed, the kernel stopped at page 3"
        );
        assert_eq!(reader.join().unwrap(), Some(2), "its waiter is awake");
        assert_eq!(
            fd.copy_run(&map.range(), 3 * PAGE_SIZE, &run[3 * P..])
                .unwrap(),
            RunStep::FirstPresent
        );
        assert_eq!(
            fd.copy_run(&map.range(), 4 * PAGE_SIZE, &run[4 * P..])
                .unwrap(),
            RunStep::Placed(2)
        );
        for (page, want) in [(0, 1), (1, 2), (2, 3), (3, 0xee), (4, 5), (5, 6)] {
            assert_eq!(map.read_byte(page * P + 100), Some(want), "page {page}");
        }
        // Zero runs the same way: with page 7 placed, a run over 5..8 meets page 5 (present)
        // first, and one over 6..8 places page 6 and stops at page 7.
        fd.zero(&map.range(), 7 * PAGE_SIZE, P).unwrap();
        assert_eq!(
            fd.zero_run(&map.range(), 5 * PAGE_SIZE, 3 * P).unwrap(),
            RunStep::FirstPresent
        );
        assert_eq!(
            fd.zero_run(&map.range(), 6 * PAGE_SIZE, 2 * P).unwrap(),
            RunStep::Placed(1)
        );
        assert_eq!(map.read_byte(6 * P), Some(0));
        assert_eq!(
            fd.zero(&map.range(), 5 * PAGE_SIZE, 3 * P).unwrap(),
            Placement::AlreadyPresent
        );
        // Not whole pages, or past the end: refused before the kernel sees it.
        assert!(fd.copy_run(&map.range(), 0, &run[..P + 1]).is_err());
        assert!(fd.copy_run(&map.range(), 4 * PAGE_SIZE, &run).is_err());
        assert!(fd.zero_run(&map.range(), 0, 0).is_err());
        fd.unregister(&map.range()).unwrap();
    }

    #[test]
    fn discard_checks_its_range() {
        let map = AnonMapping::new(2 * P).unwrap();
        map.write_byte(P, 5);
        discard(&map.range(), PAGE_SIZE, P).unwrap();
        assert_eq!(map.read_byte(P), Some(0));
        assert!(discard(&map.range(), PAGE_SIZE, 2 * P).is_err());
        no_huge_pages(&map.range());
    }
}
