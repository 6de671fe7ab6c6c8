//! End-to-end integrity between livemig peers (capability `x-livemig-integrity`): a 64-bit
//! XXH3 digest of a run of stream bytes, sent after them and checked by the receiver.
//!
//! The reader and the writer each carry an optional running digest ([`StreamReader`] /
//! [`StreamWriter`]'s `digest_*` methods): while it runs, every byte consumed or written goes
//! into it, whichever path it takes (buffered fields, vectored page writes, `read_into` guest
//! memory). The sections decide where a run starts and ends; this crate only says how the
//! value travels: a `ram` DIGEST record ([`crate::ram::RAM_SAVE_FLAG_LIVEMIG_DIGEST`], whose
//! header word is part of the run it closes) and a be64 after each `dirty-bitmap` chunk.
//!
//! XXH3 is not a MAC: it catches what a link, a NIC or a buggy middlebox does to bytes, not a
//! peer that rewrites the stream on purpose (TLS is for that).
//!
//! [`StreamReader`]: crate::reader::StreamReader
//! [`StreamWriter`]: crate::writer::StreamWriter

use crate::error::{Result, WireErrorKind};
use crate::reader::StreamReader;
use crate::writer::StreamWriter;
use std::io::{Read, Write};
use xxhash_rust::xxh3::Xxh3;

/// The capability that turns the digests on (validated in the configuration section).
pub const CAPABILITY: &str = "x-livemig-integrity";

/// What a `ram` DIGEST record covers, in integrity errors.
pub const RAM_COVERS: &str = "batch of RAM records";

/// What the digest after a `dirty-bitmap` chunk covers, in integrity errors.
pub const BITMAP_CHUNK_COVERS: &str = "dirty-bitmap chunk";

/// A running digest over stream bytes (XXH3, 64 bits, seed 0).
#[derive(Clone)]
pub struct Digest {
    h: Xxh3,
}

impl Default for Digest {
    fn default() -> Self {
        Digest { h: Xxh3::new() }
    }
}

impl Digest {
    /// An empty digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Empties it, for a new run (no allocation).
    pub fn reset(&mut self) {
        self.h.reset();
    }

    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.h.update(bytes);
    }

    /// The value over everything added so far.
    pub fn value(&self) -> u64 {
        self.h.digest()
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({:#018x})", self.value())
    }
}

/// The digest run a [`StreamReader`] or [`StreamWriter`] carries: started and finished by the
/// sections, fed with every byte while it runs. The state is boxed and kept between runs: it
/// is large, and a run starts per batch.
#[derive(Debug, Default)]
pub(crate) struct DigestRun {
    digest: Option<Box<Digest>>,
    /// A run is going.
    running: bool,
}

impl DigestRun {
    /// Starts a run, dropping any run in progress.
    pub(crate) fn start(&mut self) {
        match self.digest.as_mut() {
            Some(d) => d.reset(),
            None => self.digest = Some(Box::default()),
        }
        self.running = true;
    }

    /// Ends the run and gives its value (`None` if no run was going).
    pub(crate) fn finish(&mut self) -> Option<u64> {
        if !std::mem::replace(&mut self.running, false) {
            return None;
        }
        self.digest.as_ref().map(|d| d.value())
    }

    /// The digest, while a run is going.
    #[inline]
    pub(crate) fn running(&mut self) -> Option<&mut Digest> {
        match self.digest.as_mut() {
            Some(d) if self.running => Some(d),
            _ => None,
        }
    }
}

/// The one-shot digest of `bytes` (what a run over exactly these bytes yields).
pub fn digest_of(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// Ends the writer's run and writes its value (be64), outside any run. With no run going,
/// the value is that of no bytes, as [`check_value`] computes it then.
pub fn write_value<W: Write>(w: &mut StreamWriter<W>) -> Result<()> {
    let v = w.digest_finish().unwrap_or_else(|| digest_of(&[]));
    w.put_be64(v)
}

/// Ends the reader's run and reads the value the source sent for it (be64, outside any run);
/// a different value is [`WireErrorKind::IntegrityMismatch`] about `what`, at the value's
/// offset and in the reader's section.
pub fn check_value<R: Read>(r: &mut StreamReader<R>, what: &'static str) -> Result<()> {
    let computed = r.digest_finish().unwrap_or_else(|| digest_of(&[]));
    let at = r.offset();
    let sent = r.be64()?;
    if sent != computed {
        return Err(r.error_at(
            at,
            WireErrorKind::IntegrityMismatch {
                what,
                sent,
                computed,
            },
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot_whatever_the_split() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let whole = digest_of(&data);
        for split in [0, 1, 8, 4096, 4104, 19_999, 20_000] {
            let mut d = Digest::new();
            d.update(&data[..split]);
            d.update(&data[split..]);
            assert_eq!(d.value(), whole, "split at {split}");
        }
        let mut flipped = data.clone();
        flipped[5000] ^= 0x10;
        assert_ne!(digest_of(&flipped), whole);
    }

    /// What the writer digests is what the reader digests, whatever path the bytes take
    /// (buffered fields, vectored slices, `read_into`, `skip`); one flipped bit in the run is
    /// an `IntegrityMismatch` naming the section, at the value's offset.
    #[test]
    fn a_run_round_trips_and_a_flip_is_caught() {
        let page = vec![0x5Au8; 4096];
        let mut w = StreamWriter::new(Vec::new());
        w.put_u8(9).unwrap();
        w.digest_start();
        w.put_be64(0x1008).unwrap();
        w.write_vectored_all(&mut [std::io::IoSlice::new(&page)])
            .unwrap();
        w.put_counted_string("ram", "RAM block name").unwrap();
        write_value(&mut w).unwrap();
        w.put_u8(7).unwrap();
        let bytes = w.into_inner().unwrap();
        let read = |bytes: &[u8]| -> Result<u8> {
            let mut r = StreamReader::new(bytes);
            r.set_section(Some(crate::SectionContext::new("ram", 2)));
            assert_eq!(r.u8()?, 9);
            r.digest_start();
            r.be64()?;
            let mut p = vec![0u8; 4096];
            r.read_into(&mut p[..100])?;
            r.skip(3996)?;
            r.counted_string("RAM block name")?;
            check_value(&mut r, "batch of RAM records")?;
            r.u8()
        };
        assert_eq!(read(&bytes).unwrap(), 7);
        for at in [1, 5, 9 + 2000, 9 + 4096 + 2] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x04;
            let e = read(&bad).unwrap_err();
            assert!(
                matches!(e.kind, WireErrorKind::IntegrityMismatch { .. }),
                "flip at {at}: {e}"
            );
            let msg = e.to_string();
            assert!(msg.contains("in section 'ram' (id 2)"), "{msg}");
            assert!(msg.contains("integrity check failed"), "{msg}");
        }
    }
}
