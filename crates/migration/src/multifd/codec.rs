//! `multifd-compression`: one compression stream per channel, as QEMU 7.2's
//! `multifd-zlib.c` and `multifd-zstd.c` keep them.
//!
//! A channel's stream lives as long as the channel: it is started once (zlib: with its
//! header; zstd: one frame that never ends) and each packet's pages are compressed into it,
//! the last page with a flush (`Z_SYNC_FLUSH`, `ZSTD_e_flush`), so the packet's bytes end on a
//! boundary the receiver can decompress up to without waiting for more. The receiver keeps the
//! matching stream and decompresses each page straight into guest memory.
//!
//! The source copies each page into a scratch page before compressing it: the guest may be
//! writing it, and neither library promises anything about input that changes under it (QEMU
//! copies for zlib too). A page changed meanwhile is dirty again and goes once more.

use super::Compression;
use wire::multifd::MULTIFD_PACKET_SIZE;

/// Most compressed bytes one packet may carry on the wire: QEMU's receivers keep a buffer of
/// twice the packet size (and would overrun it with more).
pub const MAX_COMPRESSED: usize = 2 * MULTIFD_PACKET_SIZE;

const PAGE: usize = crate::guest::PAGE_SIZE as usize;

/// The source's side of a channel's compression stream.
pub enum Compressor {
    /// A zlib stream (with its header, as `deflateInit`).
    Zlib(Box<flate2::Compress>),
    /// A zstd stream.
    Zstd(Box<zstd::stream::raw::Encoder<'static>>),
}

impl Compressor {
    /// The stream for `method` at `level` (`multifd-zlib-level` / `multifd-zstd-level`);
    /// `None` without compression.
    pub fn new(
        method: Compression,
        zlib_level: u32,
        zstd_level: i32,
    ) -> Result<Option<Self>, String> {
        Ok(match method {
            Compression::None => None,
            Compression::Zlib => Some(Compressor::Zlib(Box::new(flate2::Compress::new(
                flate2::Compression::new(zlib_level.min(9)),
                true,
            )))),
            Compression::Zstd => Some(Compressor::Zstd(Box::new(
                zstd::stream::raw::Encoder::new(zstd_level)
                    .map_err(|e| format!("zstd createCStream failed: {e}"))?,
            ))),
        })
    }

    /// The method's flag bits.
    pub fn method(&self) -> Compression {
        match self {
            Compressor::Zlib(_) => Compression::Zlib,
            Compressor::Zstd(_) => Compression::Zstd,
        }
    }

    /// Compresses `pages` pages into `out` (replacing its contents), reading page `i` with
    /// `read(i, &mut scratch)`; the last one is flushed, so `out` is a whole packet's payload.
    pub fn compress(
        &mut self,
        pages: usize,
        mut read: impl FnMut(usize, &mut [u8]) -> bool,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), String> {
        scratch.resize(PAGE, 0);
        // QEMU's buffer: twice a full packet, whatever the packet's pages, which is also what
        // its receivers take. Incompressible pages can come out bigger than they went in (zlib
        // level 1's static codes), by far less than that.
        let bound = MAX_COMPRESSED;
        out.clear();
        out.resize(bound, 0);
        let mut pos = 0usize;
        for i in 0..pages {
            if !read(i, scratch) {
                return Err(format!("page {i} of the packet is outside its RAM block"));
            }
            let last = i + 1 == pages;
            match self {
                Compressor::Zlib(z) => {
                    let flush = if last {
                        flate2::FlushCompress::Sync
                    } else {
                        flate2::FlushCompress::None
                    };
                    let mut input: &[u8] = scratch;
                    loop {
                        let (in0, out0) = (z.total_in(), z.total_out());
                        let dst = out.get_mut(pos..).unwrap_or(&mut []);
                        z.compress(input, dst, flush)
                            .map_err(|e| format!("deflate failed: {e}"))?;
                        let used = (z.total_in() - in0) as usize;
                        let made = (z.total_out() - out0) as usize;
                        input = input.get(used..).unwrap_or(&[]);
                        pos += made;
                        // Done when the input is consumed and, for the flush, the output
                        // did not fill up (deflate had room to finish the flush).
                        if input.is_empty() && pos < out.len() {
                            break;
                        }
                        if pos >= out.len() || (used == 0 && made == 0) {
                            return Err("deflate failed to compress all input".into());
                        }
                    }
                }
                Compressor::Zstd(z) => {
                    use zstd::stream::raw::Operation;
                    let mut input: &[u8] = scratch;
                    while !input.is_empty() {
                        let dst = out.get_mut(pos..).unwrap_or(&mut []);
                        let st = z
                            .run_on_buffers(input, dst)
                            .map_err(|e| format!("compressStream error {e}"))?;
                        input = input.get(st.bytes_read..).unwrap_or(&[]);
                        pos += st.bytes_written;
                        if st.bytes_read == 0 && st.bytes_written == 0 {
                            return Err("compressStream buffer too small".into());
                        }
                    }
                    if last {
                        loop {
                            let dst = out.get_mut(pos..).unwrap_or(&mut []);
                            let mut ob = zstd::stream::raw::OutBuffer::around(dst);
                            let left = z
                                .flush(&mut ob)
                                .map_err(|e| format!("compressStream error {e}"))?;
                            let n = ob.pos();
                            pos += n;
                            if left == 0 {
                                break;
                            }
                            if n == 0 {
                                return Err("compressStream buffer too small".into());
                            }
                        }
                    }
                }
            }
        }
        out.truncate(pos);
        Ok(())
    }
}

/// The destination's side of a channel's compression stream.
pub enum Decompressor {
    /// A zlib stream.
    Zlib(Box<flate2::Decompress>),
    /// A zstd stream.
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
}

impl Decompressor {
    /// The stream for `method`; `None` without compression.
    pub fn new(method: Compression) -> Result<Option<Self>, String> {
        Ok(match method {
            Compression::None => None,
            Compression::Zlib => Some(Decompressor::Zlib(Box::new(flate2::Decompress::new(true)))),
            Compression::Zstd => Some(Decompressor::Zstd(Box::new(
                zstd::stream::raw::Decoder::new()
                    .map_err(|e| format!("zstd createDStream failed: {e}"))?,
            ))),
        })
    }

    /// The method's flag bits.
    pub fn method(&self) -> Compression {
        match self {
            Decompressor::Zlib(_) => Compression::Zlib,
            Decompressor::Zstd(_) => Compression::Zstd,
        }
    }

    /// One step of the stream: decompresses from `input` into `out`; returns the bytes of
    /// input used and of output made.
    fn step(&mut self, input: &[u8], out: &mut [u8], sync: bool) -> Result<(usize, usize), String> {
        match self {
            Decompressor::Zlib(z) => {
                let flush = if sync {
                    flate2::FlushDecompress::Sync
                } else {
                    flate2::FlushDecompress::None
                };
                let (in0, out0) = (z.total_in(), z.total_out());
                z.decompress(input, out, flush)
                    .map_err(|e| format!("inflate failed: {e}"))?;
                Ok((
                    (z.total_in() - in0) as usize,
                    (z.total_out() - out0) as usize,
                ))
            }
            Decompressor::Zstd(z) => {
                use zstd::stream::raw::Operation;
                let st = z
                    .run_on_buffers(input, out)
                    .map_err(|e| format!("decompressStream returned {e}"))?;
                Ok((st.bytes_read, st.bytes_written))
            }
        }
    }

    /// Decompresses one packet's payload `input` into `pages` pages, page `i` into the
    /// buffer `write(i, ..)` lends (guest memory); every page must come out whole, and the
    /// input must hold exactly the packet's pages (QEMU's checks and words).
    pub fn decompress(
        &mut self,
        input: &[u8],
        pages: usize,
        mut write: impl FnMut(
            usize,
            &mut dyn FnMut(&mut [u8]) -> Result<(), String>,
        ) -> Result<(), String>,
    ) -> Result<(), String> {
        let mut input = input;
        let mut total = 0usize;
        let short = match self {
            Decompressor::Zlib(_) => "inflate generated too few output",
            Decompressor::Zstd(_) => "decompressStream buffer too small",
        };
        for i in 0..pages {
            let last = i + 1 == pages;
            write(i, &mut |page: &mut [u8]| {
                let mut filled = 0usize;
                while filled < page.len() {
                    let (used, made) =
                        self.step(input, page.get_mut(filled..).unwrap_or(&mut []), last)?;
                    input = input.get(used..).unwrap_or(&[]);
                    filled += made;
                    if used == 0 && made == 0 {
                        break;
                    }
                }
                total += filled;
                if filled < page.len() {
                    return Err(short.into());
                }
                Ok(())
            })?;
        }
        // What follows the last page's bytes is the end of the flush (zlib's empty stored
        // block); it must make no output.
        let mut extra = [0u8; 1];
        while !input.is_empty() {
            let (used, made) = self.step(input, &mut extra, true)?;
            input = input.get(used..).unwrap_or(&[]);
            total += made;
            if used == 0 || made > 0 {
                break;
            }
        }
        // zstd decodes a block whole: output the packet's bytes hold beyond its pages may sit
        // in the decoder with no input left. It would come out as the next packet's first
        // page; ask for one byte to see.
        if input.is_empty() && total == pages * PAGE && matches!(self, Decompressor::Zstd(_)) {
            let (_, made) = self.step(&[], &mut extra, true)?;
            total += made;
        }
        if !input.is_empty() || total != pages * PAGE {
            return Err(format!(
                "packet size received {} size expected {}",
                total + input.len(),
                pages * PAGE
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize, seed: u8) -> Vec<Vec<u8>> {
        (0..n)
            .map(|p| {
                (0..PAGE)
                    .map(|i| {
                        if i % 64 < 8 {
                            (p as u8).wrapping_mul(seed) ^ (i / 64) as u8
                        } else {
                            0
                        }
                    })
                    .collect()
            })
            .collect()
    }

    fn round_trip(method: Compression) {
        let mut c = Compressor::new(method, 1, 1).unwrap().unwrap();
        let mut d = Decompressor::new(method).unwrap().unwrap();
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        // Several packets through the same streams, as a channel sends them.
        for (n, seed) in [(128, 3u8), (1, 5), (37, 7), (128, 0)] {
            let src = pages(n, seed);
            c.compress(
                n,
                |i, s| {
                    s.copy_from_slice(&src[i]);
                    true
                },
                &mut scratch,
                &mut out,
            )
            .unwrap();
            assert!(
                out.len() < n * PAGE / 2,
                "{method:?} compresses: {}",
                out.len()
            );
            let mut dst = vec![vec![0xffu8; PAGE]; n];
            d.decompress(&out, n, |i, f| f(&mut dst[i])).unwrap();
            assert_eq!(dst, src, "{method:?}");
        }
    }

    #[test]
    fn zlib_packets_round_trip() {
        round_trip(Compression::Zlib);
    }

    #[test]
    fn zstd_packets_round_trip() {
        round_trip(Compression::Zstd);
    }

    #[test]
    fn truncated_or_padded_payload_is_refused() {
        for method in [Compression::Zlib, Compression::Zstd] {
            let mut c = Compressor::new(method, 1, 1).unwrap().unwrap();
            let (mut scratch, mut out) = (Vec::new(), Vec::new());
            let src = pages(4, 9);
            c.compress(
                4,
                |i, s| {
                    s.copy_from_slice(&src[i]);
                    true
                },
                &mut scratch,
                &mut out,
            )
            .unwrap();
            let mut dst = vec![vec![0u8; PAGE]; 5];
            let mut d = Decompressor::new(method).unwrap().unwrap();
            // Asked for one page more than the packet holds.
            assert!(
                d.decompress(&out, 5, |i, f| f(&mut dst[i])).is_err(),
                "{method:?}"
            );
            // A payload that holds one page more than the header says: the extra page's
            // output is counted and refused (padding that makes no output, such as an empty
            // stored block or an empty zstd block, is accepted, as QEMU ignores it too).
            let mut c = Compressor::new(method, 1, 1).unwrap().unwrap();
            let src5 = pages(5, 9);
            c.compress(
                5,
                |i, s| {
                    s.copy_from_slice(&src5[i]);
                    true
                },
                &mut scratch,
                &mut out,
            )
            .unwrap();
            let mut d = Decompressor::new(method).unwrap().unwrap();
            let e = d.decompress(&out, 4, |i, f| f(&mut dst[i])).unwrap_err();
            assert!(e.contains("size expected 16384"), "{method:?}: {e}");
            let mut d = Decompressor::new(method).unwrap().unwrap();
            let garbage = vec![0x55u8; 100];
            assert!(
                d.decompress(&garbage, 1, |i, f| f(&mut dst[i])).is_err(),
                "{method:?}"
            );
        }
    }
}

#[cfg(test)]
mod random_tests {
    use super::*;

    /// Pages that do not compress (random bytes), at every level: every packet's stream
    /// comes out whole, even when the compressed bytes are more than the pages.
    #[test]
    fn incompressible_pages_round_trip_at_every_level() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let src: Vec<Vec<u8>> = (0..128)
            .map(|_| {
                (0..PAGE)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect();
        for (method, levels) in [(Compression::Zlib, 0..=9), (Compression::Zstd, 0..=20)] {
            for level in levels {
                let mut c = Compressor::new(method, level as u32, level)
                    .unwrap()
                    .unwrap();
                let mut d = Decompressor::new(method).unwrap().unwrap();
                let (mut scratch, mut out) = (Vec::new(), Vec::new());
                for n in [128, 1, 77, 128] {
                    c.compress(
                        n,
                        |i, s| {
                            s.copy_from_slice(&src[i]);
                            true
                        },
                        &mut scratch,
                        &mut out,
                    )
                    .unwrap_or_else(|e| panic!("{method:?} level {level}: {e}"));
                    let mut dst = vec![vec![0u8; PAGE]; n];
                    d.decompress(&out, n, |i, f| f(&mut dst[i]))
                        .unwrap_or_else(|e| panic!("{method:?} level {level}: {e}"));
                    assert!(dst == src[..n], "{method:?} level {level}");
                }
            }
        }
    }
}
