//! The destination's side of page records in postcopy: one record read and placed
//! ([`load_record`], QEMU's `ram_load_postcopy` for one target page), and the
//! `postcopy-preempt` channel's loop ([`load_preempt_channel`]).
//!
//! QEMU 7.2's preempt channel is a second connection the source opens right after the main
//! one; the destination takes its second accepted connection as that channel and waits for it
//! before it loads anything. The channel carries no header and no sections: only the RAM
//! records of requested pages (ZERO or PAGE, with the "last block" state of that channel
//! alone), ended by one EOS when the migration completes.

use super::{PostcopyError, PostcopyRam};
use crate::error::MigrationError;
use crate::guest::PAGE_SIZE;
use crate::machine::Reader;
use wire::ram::{read_ram_record, BlockTracker, RamRecord};

/// What [`load_record`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// A page (placed now, or staged in the [`PageRun`] to be placed with its neighbours).
    Page,
    /// EOS: the end of the section body (main channel) or of the channel (preempt). Every
    /// page read before it is placed.
    Eos,
}

/// Pages of a postcopy channel read and not placed yet: a run of contiguous pages of one
/// block, all with data (staged here, back to back) or all zero, placed together with one
/// ioctl ([`PostcopyRam::place_pages`] / [`PostcopyRam::place_zeros`]) — the background push
/// sends RAM in order, so its pages come in runs, and one `UFFDIO_COPY` per 4 KiB page would
/// cost a system call, a page-table walk and a wake-up check per page.
///
/// A run is placed when the next record does not continue it, when it is full, at EOS, and
/// before a read that may wait for the network (nothing buffered): a staged page is one a
/// vCPU may be waiting for, so it never waits on the socket with the thread.
pub struct PageRun {
    /// `capacity` pages, page-aligned, starting at `start`.
    buf: Vec<u8>,
    start: usize,
    capacity: usize,
    block: usize,
    offset: u64,
    pages: usize,
    zero: bool,
}

impl PageRun {
    /// A run of at most `capacity` pages (at least one); 1 places every page as it comes.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let p = PAGE_SIZE as usize;
        let buf = vec![0u8; (capacity + 1) * p];
        // The kernel copies from page-aligned sources a little faster.
        let start = buf.as_ptr().align_offset(p).min(p);
        PageRun {
            buf,
            start,
            capacity,
            block: 0,
            offset: 0,
            pages: 0,
            zero: false,
        }
    }

    /// Pages staged and not placed.
    pub fn staged(&self) -> usize {
        self.pages
    }

    /// Forgets what is staged without placing it (after a failed read: the pages stay
    /// missing, and a recovery's received map has the source send them again).
    pub fn clear(&mut self) {
        self.pages = 0;
    }

    /// Places what is staged. Returns how many pages this placed (the others were there).
    pub fn flush(&mut self, pc: &PostcopyRam) -> Result<u64, PostcopyError> {
        let n = std::mem::take(&mut self.pages);
        if n == 0 {
            return Ok(0);
        }
        if self.zero {
            pc.place_zeros(self.block, self.offset, n as u64)
        } else {
            let len = n * PAGE_SIZE as usize;
            let data = self
                .buf
                .get(self.start..self.start + len)
                .ok_or_else(|| PostcopyError::BadPage("a run longer than its buffer".into()))?;
            pc.place_pages(self.block, self.offset, data)
        }
    }

    /// Makes room for page `offset` of block `block` (zero or not) at the end of the run,
    /// placing the run first if the page does not continue it.
    fn push(
        &mut self,
        pc: &PostcopyRam,
        block: usize,
        offset: u64,
        zero: bool,
    ) -> Result<(), PostcopyError> {
        let continues = self.pages > 0
            && self.pages < self.capacity
            && self.block == block
            && self.zero == zero
            && self.offset + (self.pages as u64) * PAGE_SIZE == offset;
        if !continues {
            self.flush(pc)?;
            self.block = block;
            self.offset = offset;
            self.zero = zero;
        }
        Ok(())
    }

    /// The staging slot of the next page (after [`push`](Self::push) with `zero` false).
    fn next_slot(&mut self) -> Result<&mut [u8], PostcopyError> {
        let p = PAGE_SIZE as usize;
        let at = self.start + self.pages * p;
        self.buf
            .get_mut(at..at + p)
            .ok_or_else(|| PostcopyError::BadPage("a run longer than its buffer".into()))
    }

    /// The page just pushed is in: counts it, and places the run once it is full.
    fn commit(&mut self, pc: &PostcopyRam) -> Result<(), PostcopyError> {
        self.pages += 1;
        if self.pages >= self.capacity {
            self.flush(pc)?;
        }
        Ok(())
    }
}

/// Reads one record of a postcopy RAM stream and stages its page in `run` (see [`PageRun`]
/// for when the run is placed): only ZERO, PAGE and EOS may come (QEMU's "Unknown combination
/// of migration flags ... (postcopy mode)" otherwise). A PAGE's payload is read into the run's
/// staging buffer and copied into place atomically, so no vCPU ever sees half a page; a page
/// that is already there (it came on the other channel) is read and dropped at placement.
pub fn load_record(
    r: &mut Reader,
    tracker: &mut BlockTracker,
    run: &mut PageRun,
    pc: &PostcopyRam,
) -> Result<Loaded, MigrationError> {
    let pe = |e: PostcopyError| MigrationError::Load(e.to_string());
    if run.staged() > 0 && r.buffered().is_empty() {
        // The next read may wait for the network: the staged pages go in first.
        run.flush(pc).map_err(pe)?;
    }
    let (block, offset, zero_fill) = match read_ram_record(r)? {
        RamRecord::Eos => {
            run.flush(pc).map_err(pe)?;
            return Ok(Loaded::Eos);
        }
        RamRecord::Zero {
            block,
            offset,
            fill,
        } => (block, offset, Some(fill)),
        RamRecord::Page { block, offset } => (block, offset, None),
        other => {
            return Err(MigrationError::Load(format!(
                "Unknown combination of migration flags: {other:?} (postcopy mode)"
            )))
        }
    };
    let name = tracker
        .resolve(block.as_deref())
        .map_err(|k| MigrationError::Wire(r.error(k)))?;
    let bi = pc.block_index(name).ok_or_else(|| {
        MigrationError::Load(format!(
            "Can't find block {name}: Illegal RAM offset {offset:x}"
        ))
    })?;
    pc.check_page(bi, offset).map_err(pe)?;
    let zero = zero_fill == Some(0);
    run.push(pc, bi, offset, zero).map_err(pe)?;
    match zero_fill {
        Some(0) => {}
        Some(fill) => run.next_slot().map_err(pe)?.fill(fill),
        // Read even when the page is already here: the payload is in the stream.
        None => r.read_into(run.next_slot().map_err(pe)?)?,
    }
    run.commit(pc).map_err(pe)?;
    Ok(Loaded::Page)
}

/// The destination's `postcopy-preempt` thread: places the requested pages the source sends
/// on the preempt channel until its EOS, each as soon as it is read. Returns the number of
/// records read.
pub fn load_preempt_channel(r: &mut Reader, pc: &PostcopyRam) -> Result<u64, MigrationError> {
    let mut tracker = BlockTracker::new();
    let mut run = PageRun::new(1);
    let mut n = 0;
    loop {
        match load_record(r, &mut tracker, &mut run, pc)? {
            Loaded::Eos => return Ok(n),
            Loaded::Page => {
                n += 1;
                pc.stats
                    .preempt_pages
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postcopy::uffd::{AnonMapping, PostcopyFd};
    use std::sync::Arc;
    use wire::ram::{write_eos, write_page, write_zero};

    #[test]
    fn the_main_channel_places_runs_of_pages() {
        let map = Arc::new(AnonMapping::new(16 * 4096).unwrap());
        let pc = PostcopyRam::new(
            vec![("pc.ram".into(), map.range())],
            Some(PostcopyFd::open().unwrap()),
            None,
        );
        pc.register().unwrap();
        // The preempt channel placed page 5.
        assert!(pc.place_page(0, 5 * 4096, &[0xee; 4096]).unwrap());
        let mut w = wire::StreamWriter::new(Vec::new());
        for p in 0..7u64 {
            let name = (p == 0).then_some("pc.ram");
            write_page(&mut w, name, p * 4096, &[p as u8 + 1; 4096]).unwrap();
        }
        write_zero(&mut w, None, 7 * 4096, 0).unwrap();
        write_zero(&mut w, None, 8 * 4096, 0).unwrap();
        write_zero(&mut w, None, 9 * 4096, 0x5a).unwrap();
        write_page(&mut w, None, 12 * 4096, &[13; 4096]).unwrap();
        write_eos(&mut w).unwrap();
        w.flush().unwrap();
        let bytes = w.into_inner().unwrap();
        let mut r: Reader = wire::StreamReader::new(Box::new(std::io::Cursor::new(bytes)));
        let mut tracker = BlockTracker::new();
        let mut run = PageRun::new(4);
        let mut pages = 0;
        while load_record(&mut r, &mut tracker, &mut run, &pc).unwrap() == Loaded::Page {
            pages += 1;
        }
        assert_eq!(pages, 11);
        assert_eq!(run.staged(), 0, "EOS placed everything");
        for (p, want) in [
            (0, 1),
            (3, 4),
            (4, 5),
            (5, 0xee),
            (6, 7),
            (7, 0),
            (8, 0),
            (9, 0x5a),
            (12, 13),
        ] {
            assert_eq!(map.read_byte(p * 4096 + 99), Some(want), "page {p}");
        }
        assert_eq!(pc.missing_pages(), 16 - 11);
        // Runs of at most 4: 0-3, 4 + 6 (5 skipped), the zeros 7-8, the filled page 9, page 12
        // — plus the preempt page's own ioctl.
        assert_eq!(
            pc.stats
                .placements
                .load(std::sync::atomic::Ordering::Relaxed),
            7
        );
        assert_eq!(
            pc.stats
                .duplicates
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_preempt_channel_places_pages_until_eos() {
        let map = Arc::new(AnonMapping::new(8 * 4096).unwrap());
        let pc = PostcopyRam::new(
            vec![("pc.ram".into(), map.range())],
            Some(PostcopyFd::open().unwrap()),
            None,
        );
        pc.register().unwrap();
        let mut w = wire::StreamWriter::new(Vec::new());
        write_page(&mut w, Some("pc.ram"), 3 * 4096, &[5u8; 4096]).unwrap();
        write_zero(&mut w, None, 4 * 4096, 0).unwrap();
        // A page already placed is read and dropped.
        write_page(&mut w, None, 3 * 4096, &[6u8; 4096]).unwrap();
        write_eos(&mut w).unwrap();
        w.flush().unwrap();
        let bytes = w.into_inner().unwrap();
        let mut r: Reader = wire::StreamReader::new(Box::new(std::io::Cursor::new(bytes)));
        assert_eq!(load_preempt_channel(&mut r, &pc).unwrap(), 3);
        assert_eq!(map.read_byte(3 * 4096 + 7), Some(5));
        assert!(pc.is_received(0, 4 * 4096));
        assert_eq!(pc.missing_pages(), 6);

        // Anything but ZERO, PAGE and EOS is refused, as QEMU refuses it.
        let mut w = wire::StreamWriter::new(Vec::new());
        wire::ram::write_mem_size(&mut w, 4096).unwrap();
        w.flush().unwrap();
        let bytes = w.into_inner().unwrap();
        let mut r: Reader = wire::StreamReader::new(Box::new(std::io::Cursor::new(bytes)));
        let e = load_preempt_channel(&mut r, &pc).unwrap_err();
        assert!(e.to_string().contains("(postcopy mode)"), "{e}");
    }
}
