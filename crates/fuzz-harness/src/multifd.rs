//! The destination's multifd channels: `migration::multifd::recv::Receiver` over arbitrary
//! channel bytes, driven as the engine's incoming side drives it — `Receiver::accept` takes
//! the channels one after the other and checks each `MultiFDInit_t`, a thread per channel then
//! reads `MultiFDPacket_t` headers and their pages (raw, zlib or zstd) into guest RAM, and the
//! loader meets the channels at every sync point (`SyncPoint::sync_main`, as at each end of a
//! RAM section) until one fails or the input ends; then `Receiver::finish`.
//!
//! Input: one configuration byte — bits 0-1 the compression (0 none, 1 zlib, 2 zstd, 3 none),
//! bits 2-3 the number of channels minus one — then each channel's bytes, separated by
//! [`CHANNEL_SEPARATOR`]. A channel the input lacks is one the source never connected. The
//! destination's RAM is one block `ram` of [`RAM_SIZE`] (QEMU 7.2's `-M none -m 1M`), zero
//! when the load starts.
//!
//! Afterwards:
//! - an error (of the accept, of a channel) is a clean one, worded by one of the engine's known
//!   prefixes; a channel's names a channel that exists;
//! - guest RAM changed only inside pages some packet header of the input named (decoded
//!   independently, the syntax only), and the channels count no more pages than the headers
//!   name;
//! - no more sync rounds completed than every channel has SYNC packets;
//! - no `multifdrecv_*` thread is left once the receiver finished.

use migration::guest::{MmapRamBlock, RamBlock, PAGE_SIZE};
use migration::multifd::recv::Receiver;
use migration::multifd::{Compression, MultifdConfig};
use migration::transport::{Connection, ShutdownHandle};
use migration::MigrationError;
use std::collections::BTreeSet;
use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestRegionMmap, MemoryRegionAddress, MmapRegion};
use wire::multifd::{PacketHeader, INIT_LEN, PACKET_HEADER_LEN};

/// Separates the channels' bytes in an input.
pub const CHANNEL_SEPARATOR: &[u8; 4] = b"MFDC";
/// The destination's RAM: one block `ram` of this many bytes.
pub const RAM_SIZE: u64 = 1 << 20;
/// The name of the destination's RAM block.
pub const BLOCK: &str = "ram";
/// Most sync rounds the loader takes part in: a stream has a few (setup, each round, end).
const MAX_ROUNDS: u32 = 64;

/// What loading one input did.
#[derive(Debug)]
pub struct Outcome {
    /// The configuration the input's first byte chose.
    pub compression: Compression,
    /// Number of channels.
    pub channels: u8,
    /// `Receiver::accept`'s error, if it failed.
    pub accept: Result<(), String>,
    /// The first channel error, if any.
    pub channel_error: Option<String>,
    /// Sync rounds the loader completed.
    pub rounds: u32,
    /// Pages the channels loaded.
    pub pages: u64,
    /// Pages of guest RAM that are not zero afterwards.
    pub pages_written: u64,
}

/// Splits an input into its configuration and its channels' bytes.
pub fn split(data: &[u8]) -> (Compression, u8, Vec<&[u8]>) {
    let (cfg, rest) = data.split_first().map_or((0, &[][..]), |(c, r)| (*c, r));
    let compression = match cfg & 3 {
        1 => Compression::Zlib,
        2 => Compression::Zstd,
        _ => Compression::None,
    };
    let channels = ((cfg >> 2) & 3) + 1;
    let mut parts = Vec::new();
    let mut rest = rest;
    if !rest.is_empty() {
        loop {
            match rest
                .windows(CHANNEL_SEPARATOR.len())
                .position(|w| w == CHANNEL_SEPARATOR)
            {
                Some(at) => {
                    parts.push(&rest[..at]);
                    rest = &rest[at + CHANNEL_SEPARATOR.len()..];
                }
                None => {
                    parts.push(rest);
                    break;
                }
            }
        }
    }
    (compression, channels, parts)
}

/// Joins a configuration and channels' bytes into an input (the seeds' scripts do the same).
pub fn join(compression: Compression, channels: &[Vec<u8>]) -> Vec<u8> {
    let c = match compression {
        Compression::None => 0,
        Compression::Zlib => 1,
        Compression::Zstd => 2,
    };
    let n = channels.len().clamp(1, 4) as u8 - 1;
    let mut out = vec![c | (n << 2)];
    for (i, ch) in channels.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(CHANNEL_SEPARATOR);
        }
        out.extend_from_slice(ch);
    }
    out
}

/// What the input's headers name, decoded independently of the receiver: the pages (byte
/// ranges of `ram`) and each channel's SYNC packets.
struct Named {
    ranges: Vec<(u64, u64)>,
    offsets: u64,
    syncs: Vec<u32>,
}

fn named(channels: &[&[u8]], compression: Compression) -> Named {
    let mut n = Named {
        ranges: Vec::new(),
        offsets: 0,
        syncs: Vec::new(),
    };
    let mut h = PacketHeader::default();
    for ch in channels {
        let mut syncs = 0;
        let mut at = INIT_LEN;
        while let Some(b) = ch
            .get(at..at + PACKET_HEADER_LEN)
            .and_then(|b| <&[u8; PACKET_HEADER_LEN]>::try_from(b).ok())
        {
            if h.decode_from(b, at as u64).is_err() {
                break;
            }
            at += PACKET_HEADER_LEN;
            let pages = h.offsets().len();
            if pages > 0 {
                n.offsets += pages as u64;
                if h.ramblock_bytes() == BLOCK.as_bytes() {
                    n.ranges.extend(
                        h.offsets()
                            .iter()
                            .map(|&o| (o, o.saturating_add(PAGE_SIZE))),
                    );
                }
                at += match compression {
                    Compression::None => pages * PAGE_SIZE as usize,
                    _ => h.next_packet_size as usize,
                };
            }
            if h.is_sync() {
                syncs += 1;
            }
        }
        n.syncs.push(syncs);
    }
    n
}

/// The prefixes of the errors accepting the channels may end with.
const ACCEPT_ERRORS: &[&str] = &[
    "failed to receive packet via multifd channel ",
    "multifd: received id '",
    "multifd: the main channel closed before every multifd channel connected",
];

/// Loads `data` (module doc) and checks the invariants. Panics when one does not hold.
pub fn run(data: &[u8]) -> Outcome {
    let _one_at_a_time = crate::exclusive();
    let (compression, channels, parts) = split(data);
    let ctx = format!(
        "{compression:?}, {channels} channels, {} given",
        parts.len()
    );
    let mapping = MmapRegion::<AtomicBitmap>::new(RAM_SIZE as usize).expect("harness: guest RAM");
    let region = Arc::new(GuestRegionMmap::new(mapping, GuestAddress(0)).expect("region"));
    let block: Arc<dyn RamBlock> =
        Arc::new(MmapRamBlock::new(BLOCK, region.clone()).expect("harness: RAM block"));
    let config = MultifdConfig {
        channels,
        compression,
        zlib_level: 1,
        zstd_level: 1,
        zero_copy: false,
    };
    let mut next = parts.iter();
    let mut accept = || -> Result<Connection, MigrationError> {
        match next.next() {
            Some(p) => Ok(Connection {
                writer: None,
                reader: Some(Box::new(Cursor::new(p.to_vec()))),
                shutdown: ShutdownHandle::default(),
                child: None,
            }),
            // What waiting for a channel says when the source gave up on it.
            None => Err(MigrationError::Load(
                "multifd: the main channel closed before every multifd channel connected \
                 (the source failed to open one)"
                    .into(),
            )),
        }
    };
    let accepted = Receiver::accept(&config, &mut accept, vec![block], ShutdownHandle::default());
    let (accept, channel_error, rounds, pages) = match accepted {
        Err(e) => {
            let e = e.to_string();
            assert!(
                ACCEPT_ERRORS.iter().any(|p| e.starts_with(p)),
                "{ctx}: not a clean error: {e:?}"
            );
            (Err(e), None, 0, 0)
        }
        Ok(rx) => {
            let sync = rx.sync_point();
            let mut rounds = 0;
            while rounds < MAX_ROUNDS && sync.sync_main().is_ok() {
                rounds += 1;
            }
            let error = rx.error();
            rx.finish();
            (Ok(()), error, rounds, sync.pages())
        }
    };
    check_threads_ended(&ctx);
    if let Some(e) = &channel_error {
        let id = e
            .strip_prefix("multifd ")
            .and_then(|r| r.split_once(": "))
            .and_then(|(id, _)| id.parse::<u8>().ok());
        assert!(
            id.is_some_and(|id| id < channels),
            "{ctx}: a channel error that names no channel: {e:?}"
        );
        assert!(!e.contains("internal"), "{ctx}: {e:?}");
    }
    // The channels accepted: the first `channels` of the input (the rest never are).
    let n = named(
        &parts[..parts.len().min(usize::from(channels))],
        compression,
    );
    assert!(
        pages <= n.offsets,
        "{ctx}: {pages} pages loaded, the headers name {}",
        n.offsets
    );
    if accept.is_ok() {
        let min_syncs = n.syncs.iter().copied().min().unwrap_or(0);
        assert!(
            rounds <= min_syncs,
            "{ctx}: {rounds} sync rounds with {:?} SYNC packets",
            n.syncs
        );
    }
    // Guest RAM: nothing written outside the pages the headers name. Only pages the kernel
    // has mapped can hold anything (the RAM was fresh and nothing here reads the others).
    let mut covered = vec![false; RAM_SIZE as usize];
    for &(s, e) in &n.ranges {
        if let Some(c) = covered.get_mut(s.min(RAM_SIZE) as usize..e.min(RAM_SIZE) as usize) {
            c.fill(true);
        }
    }
    let mut page = vec![0u8; PAGE_SIZE as usize];
    let mut written = BTreeSet::new();
    for p in mapped_pages(&region, &ctx) {
        region
            .read_slice(&mut page, MemoryRegionAddress(p * PAGE_SIZE))
            .expect("harness: reading guest RAM");
        for (w, word) in page.chunks_exact(8).enumerate() {
            if u64::from_ne_bytes(word.try_into().expect("8 bytes")) == 0 {
                continue;
            }
            for (i, b) in word.iter().enumerate() {
                let at = p * PAGE_SIZE + (w * 8 + i) as u64;
                assert!(
                    *b == 0 || covered[at as usize],
                    "{ctx}: guest RAM byte {at:#x} written, but no header names its page"
                );
            }
            written.insert(p);
        }
    }
    Outcome {
        compression,
        channels,
        accept,
        channel_error,
        rounds,
        pages,
        pages_written: written.len() as u64,
    }
}

/// The pages of `region` the kernel has mapped (`/proc/self/pagemap`: present or swapped).
fn mapped_pages(region: &GuestRegionMmap<AtomicBitmap>, ctx: &str) -> Vec<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let pages = RAM_SIZE / PAGE_SIZE;
    let first = region.as_ptr() as u64 / PAGE_SIZE;
    let mut entries = vec![0u8; pages as usize * 8];
    std::fs::File::open("/proc/self/pagemap")
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(first * 8))?;
            f.read_exact(&mut entries)
        })
        .unwrap_or_else(|e| panic!("{ctx}: reading pagemap: {e}"));
    entries
        .chunks_exact(8)
        .enumerate()
        .filter(|(_, e)| u64::from_le_bytes((*e).try_into().expect("8 bytes")) & (3 << 62) != 0)
        .map(|(p, _)| p as u64)
        .collect()
}

/// No `multifdrecv_*` thread is left.
fn check_threads_ended(ctx: &str) {
    crate::wait_gone(
        ctx,
        "multifd channel threads left after finish",
        Duration::from_micros(20),
        || crate::threads(|c| c.starts_with("multifdrecv_")),
    );
}
