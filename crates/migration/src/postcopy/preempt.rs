//! The destination's side of page records in postcopy: one record read and placed
//! ([`load_record`], QEMU's `ram_load_postcopy` for one target page), and the
//! `postcopy-preempt` channel's loop ([`load_preempt_channel`]).
//!
//! QEMU 7.2's preempt channel is a second connection the source opens right after the main
//! one; the destination takes its second accepted connection as that channel and waits for it
//! before it loads anything. The channel carries no header and no sections: only the RAM
//! records of requested pages (ZERO or PAGE, with the "last block" state of that channel
//! alone), ended by one EOS when the migration completes.

use super::PostcopyRam;
use crate::error::MigrationError;
use crate::machine::Reader;
use wire::ram::{read_ram_record, BlockTracker, RamRecord};

/// What [`load_record`] read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// A page, placed now (true) or already there (false).
    Page(bool),
    /// EOS: the end of the section body (main channel) or of the channel (preempt).
    Eos,
}

/// Reads one record of a postcopy RAM stream and places its page through `pc`: only ZERO,
/// PAGE and EOS may come (QEMU's "Unknown combination of migration flags ... (postcopy
/// mode)" otherwise). A PAGE's payload is read into `staging` (one page) and copied into
/// place atomically, so no vCPU ever sees half a page; a page that is already there (it came
/// on the other channel) is read and dropped.
pub fn load_record(
    r: &mut Reader,
    tracker: &mut BlockTracker,
    staging: &mut [u8],
    pc: &PostcopyRam,
) -> Result<Loaded, MigrationError> {
    let (block, offset, zero_fill) = match read_ram_record(r)? {
        RamRecord::Eos => return Ok(Loaded::Eos),
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
    let pe = |e: super::PostcopyError| MigrationError::Load(e.to_string());
    let placed = match zero_fill {
        Some(0) => pc.place_zero(bi, offset).map_err(pe)?,
        Some(fill) => {
            staging.fill(fill);
            pc.place_page(bi, offset, staging).map_err(pe)?
        }
        None => {
            // Read even when the page is already here: the payload is in the stream.
            r.read_into(staging)?;
            pc.place_page(bi, offset, staging).map_err(pe)?
        }
    };
    Ok(Loaded::Page(placed))
}

/// The destination's `postcopy-preempt` thread: places the requested pages the source sends
/// on the preempt channel until its EOS. Returns the number of records read.
pub fn load_preempt_channel(r: &mut Reader, pc: &PostcopyRam) -> Result<u64, MigrationError> {
    let mut tracker = BlockTracker::new();
    let mut staging = vec![0u8; crate::guest::PAGE_SIZE as usize];
    let mut n = 0;
    loop {
        match load_record(r, &mut tracker, &mut staging, pc)? {
            Loaded::Eos => return Ok(n),
            Loaded::Page(_) => {
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
