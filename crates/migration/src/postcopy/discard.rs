//! POSTCOPY_RAM_DISCARD, both ends (`stream-format.md` §5.3).
//!
//! At the switch to postcopy the source tells the destination which pages it must throw
//! away: every page still dirty on the source (never sent, or sent and written again). The
//! destination discards them, so the guest's first touch of each one faults and pulls the
//! current contents. The source groups runs of dirty pages into byte ranges, at most
//! [`MAX_DISCARDS_PER_COMMAND`] per command, as QEMU does; the destination checks every range
//! against the block before it touches memory.

use super::PostcopyError;
use crate::guest::PAGE_SIZE;
use wire::command::{Command, DiscardRange};

/// Ranges per POSTCOPY_RAM_DISCARD command (QEMU's `MAX_DISCARDS_PER_COMMAND`).
pub const MAX_DISCARDS_PER_COMMAND: usize = 12;

/// Iterates the runs of set bits of `bitmap` (bit `n` of word `n / 64` is page `n`, pages at
/// or past `pages` ignored) as `(first_page, count)`, a word at a time.
pub fn dirty_runs(bitmap: &[u64], pages: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let mut page = 0u64;
    std::iter::from_fn(move || {
        let start = next_bit(bitmap, pages, page, true)?;
        let end = next_bit(bitmap, pages, start, false).unwrap_or(pages);
        page = end;
        Some((start, end - start))
    })
}

/// The first page at or after `from` whose bit equals `set`, below `pages`.
fn next_bit(bitmap: &[u64], pages: u64, from: u64, set: bool) -> Option<u64> {
    let mut p = from;
    while p < pages {
        let w = *bitmap.get((p / 64) as usize)?;
        let w = if set { w } else { !w };
        let rest = w >> (p % 64);
        if rest != 0 {
            let found = p + u64::from(rest.trailing_zeros());
            return (found < pages).then_some(found);
        }
        p = (p / 64 + 1) * 64;
    }
    None
}

/// The discard commands for one block whose pages still to send are `dirty`.
pub fn discard_commands(block: &str, dirty: &[u64], pages: u64) -> Vec<Command> {
    let ranges: Vec<DiscardRange> = dirty_runs(dirty, pages)
        .map(|(first, count)| DiscardRange {
            start: first * PAGE_SIZE,
            length: count * PAGE_SIZE,
        })
        .collect();
    ranges
        .chunks(MAX_DISCARDS_PER_COMMAND)
        .map(|c| Command::PostcopyRamDiscard {
            ramblock: block.to_string(),
            ranges: c.to_vec(),
        })
        .collect()
}

/// Checks a discard range from the stream against a block of `block_len` bytes and returns it
/// as `(first_page, pages)`. Messages are QEMU's (`ram_block_discard_range`).
pub fn check_range(
    block: &str,
    block_len: u64,
    range: &DiscardRange,
) -> Result<(u64, u64), PostcopyError> {
    if !range.start.is_multiple_of(PAGE_SIZE) {
        return Err(PostcopyError::BadDiscard(format!(
            "ram_block_discard_range: Unaligned start address: {:#x} in block '{block}'",
            range.start
        )));
    }
    if !range.length.is_multiple_of(PAGE_SIZE) {
        return Err(PostcopyError::BadDiscard(format!(
            "ram_block_discard_range: Unaligned length: {:x}",
            range.length
        )));
    }
    if range
        .start
        .checked_add(range.length)
        .is_none_or(|end| end > block_len)
    {
        return Err(PostcopyError::BadDiscard(format!(
            "ram_block_discard_range: Overrun block '{block}' ({}/{:x}/{:x})",
            range.start, range.length, block_len
        )));
    }
    Ok((range.start / PAGE_SIZE, range.length / PAGE_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::command::{read_command, write_command};
    use wire::{StreamReader, StreamWriter};

    fn bitmap(pages: u64, set: &[u64]) -> Vec<u64> {
        let mut b = vec![0u64; pages.div_ceil(64) as usize];
        for p in set {
            b[(p / 64) as usize] |= 1 << (p % 64);
        }
        b
    }

    #[test]
    fn runs_cross_words_and_stop_at_the_end() {
        let mut set: Vec<u64> = vec![0, 1, 2, 63, 64, 65];
        set.extend(100..230);
        set.push(299);
        let b = bitmap(300, &set);
        let runs: Vec<_> = dirty_runs(&b, 300).collect();
        assert_eq!(runs, vec![(0, 3), (63, 3), (100, 130), (299, 1)]);
        // Bits past `pages` are not pages.
        let b = vec![u64::MAX];
        assert_eq!(dirty_runs(&b, 10).collect::<Vec<_>>(), vec![(0, 10)]);
        assert_eq!(dirty_runs(&[0, 0], 128).count(), 0);
    }

    #[test]
    fn commands_hold_twelve_ranges_and_encode_as_qemu() {
        // 25 isolated dirty pages: 12 + 12 + 1 ranges.
        let set: Vec<u64> = (0..25).map(|i| i * 2).collect();
        let b = bitmap(64, &set);
        let cmds = discard_commands("ram", &b, 64);
        assert_eq!(cmds.len(), 3);
        let Command::PostcopyRamDiscard { ramblock, ranges } = &cmds[1] else {
            panic!("{:?}", cmds[1])
        };
        assert_eq!(ramblock, "ram");
        assert_eq!(ranges.len(), 12);
        assert_eq!(
            ranges[0],
            DiscardRange {
                start: 24 * 4096,
                length: 4096
            }
        );
        // On the wire: len = 3 + name + 16 per range; decodes back to the same command.
        let mut w = StreamWriter::new(Vec::new());
        write_command(&mut w, &cmds[2]).unwrap();
        let bytes = w.into_inner().unwrap();
        assert_eq!(&bytes[..5], &[8, 0, 6, 0, 22]);
        let mut r = StreamReader::new(&bytes[1..]);
        assert_eq!(read_command(&mut r).unwrap(), cmds[2]);
        assert!(discard_commands("ram", &[0], 64).is_empty());
    }

    #[test]
    fn ranges_are_checked_against_the_block() {
        let ok = DiscardRange {
            start: 0x19b000,
            length: 0x1e65000,
        };
        assert_eq!(check_range("ram", 0x2000000, &ok).unwrap(), (0x19b, 0x1e65));
        let cases = [
            (
                DiscardRange {
                    start: 0x800,
                    length: 0x1000,
                },
                "ram_block_discard_range: Unaligned start address: 0x800 in block 'ram'",
            ),
            (
                DiscardRange {
                    start: 0,
                    length: 0x1800,
                },
                "ram_block_discard_range: Unaligned length: 1800",
            ),
            (
                DiscardRange {
                    start: 0x1ff_f000,
                    length: 0x2000,
                },
                "ram_block_discard_range: Overrun block 'ram' (33550336/2000/2000000)",
            ),
            (
                DiscardRange {
                    start: u64::MAX - 0xfff,
                    length: 0x1000,
                },
                "ram_block_discard_range: Overrun block 'ram' (18446744073709547520/1000/2000000)",
            ),
        ];
        for (r, msg) in cases {
            assert_eq!(
                check_range("ram", 0x2000000, &r).unwrap_err().to_string(),
                msg
            );
        }
    }
}
