//! [`StreamReader`]: buffered, offset-tracking reads of a migration stream.
//!
//! The reader keeps a lookahead buffer (QEMU's subsection rule needs to peek up to 257 bytes),
//! the absolute offset of the next byte, and the section being decoded, so that every error says
//! where it happened. Payloads that end up in guest memory go through [`StreamReader::read_into`],
//! which reads straight into the caller's buffer instead of through the lookahead buffer.

use crate::digest::{Digest, DigestRun};
use crate::error::{Result, SectionContext, WireError, WireErrorKind};
use std::io::{ErrorKind, IoSliceMut, Read};

/// Default size of the lookahead buffer.
pub const DEFAULT_BUFFER_SIZE: usize = 64 * 1024;

/// Smallest buffer accepted: the largest peek any decoder does is a subsection header
/// (type byte, length byte, 255 name bytes, be32 version).
pub const MIN_BUFFER_SIZE: usize = 512;

/// [`StreamReader::bytes`] allocates at most this much (or double what it already holds)
/// ahead of the data actually read.
const GROW_STEP: usize = 1024 * 1024;

/// Reads below this size go through the lookahead buffer; larger ones use a vectored read
/// straight into the destination.
const DIRECT_READ_THRESHOLD: usize = 1024;

/// Limits and format switches that decoders consult. One set per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Sections end with a footer (`0x7E`, be32 id). QEMU's `send-section-footer`, on by default
    /// (off only for machine types ≤ 2.3).
    pub section_footer: bool,
    /// Largest PACKAGED command payload accepted, in bytes. QEMU allows up to `u32::MAX`.
    pub max_packaged: u32,
    /// Largest dirty-bitmap BITS buffer accepted. QEMU: 10 × CHUNK_SIZE = 10 KiB.
    pub max_bitmap_buffer: u64,
    /// Largest VMDESCRIPTION JSON accepted.
    pub max_vmdesc: u32,
    /// Largest machine-type name in the configuration section.
    pub max_machine_name: u32,
    /// Most RAM blocks accepted in a MEM_SIZE record, and most capabilities in the
    /// configuration.
    pub max_list_entries: u32,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            section_footer: true,
            max_packaged: 256 * 1024 * 1024,
            max_bitmap_buffer: 10 * 1024,
            max_vmdesc: 64 * 1024 * 1024,
            max_machine_name: 4096,
            max_list_entries: 4096,
        }
    }
}

/// A buffered reader of a migration stream over any [`Read`]: sockets, pipes, files, byte
/// slices.
pub struct StreamReader<R> {
    inner: R,
    buf: Box<[u8]>,
    pos: usize,
    end: usize,
    /// Absolute offset of `buf[pos]`.
    offset: u64,
    /// The inner reader has returned 0 (end of file).
    eof: bool,
    section: Option<SectionContext>,
    options: ReaderOptions,
    /// The running integrity digest ([`crate::digest`]): every byte consumed goes into it.
    digest: DigestRun,
}

impl<R: Read> StreamReader<R> {
    /// Wraps `inner`, with offsets counted from 0 and default options.
    pub fn new(inner: R) -> Self {
        Self::with_capacity(inner, DEFAULT_BUFFER_SIZE)
    }

    /// Wraps `inner` with a lookahead buffer of `capacity` bytes (at least [`MIN_BUFFER_SIZE`]).
    pub fn with_capacity(inner: R, capacity: usize) -> Self {
        StreamReader {
            inner,
            buf: vec![0u8; capacity.max(MIN_BUFFER_SIZE)].into_boxed_slice(),
            pos: 0,
            end: 0,
            offset: 0,
            eof: false,
            section: None,
            options: ReaderOptions::default(),
            digest: DigestRun::default(),
        }
    }

    /// Wraps `inner`, whose first byte is at absolute offset `base` of the enclosing stream.
    /// Used for the nested stream inside a PACKAGED command, so its errors carry offsets of the
    /// outer stream.
    pub fn with_base_offset(inner: R, base: u64) -> Self {
        let mut r = Self::new(inner);
        r.offset = base;
        r
    }

    /// Replaces the options (limits, footer switch).
    pub fn set_options(&mut self, options: ReaderOptions) {
        self.options = options;
    }

    /// Builder form of [`StreamReader::set_options`].
    pub fn with_options(mut self, options: ReaderOptions) -> Self {
        self.options = options;
        self
    }

    /// The options in force.
    pub fn options(&self) -> &ReaderOptions {
        &self.options
    }

    /// Absolute offset of the next byte to be read.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Starts a run of the integrity digest (dropping any run in progress): every byte
    /// consumed from now on goes into it, until [`StreamReader::digest_finish`].
    pub fn digest_start(&mut self) {
        self.digest.start();
    }

    /// Ends the run and gives its value (`None` if no run was going).
    pub fn digest_finish(&mut self) -> Option<u64> {
        self.digest.finish()
    }

    fn running_digest(&mut self) -> Option<&mut Digest> {
        self.digest.running()
    }

    fn digest_update(&mut self, bytes_at: std::ops::Range<usize>) {
        if let (Some(d), Some(b)) = (self.digest.running(), self.buf.get(bytes_at)) {
            d.update(b);
        }
    }

    /// The section errors are attributed to.
    pub fn section(&self) -> Option<&SectionContext> {
        self.section.as_ref()
    }

    /// Sets (or clears) the section errors are attributed to, returning the previous one.
    pub fn set_section(&mut self, section: Option<SectionContext>) -> Option<SectionContext> {
        std::mem::replace(&mut self.section, section)
    }

    /// Builds an error at the current offset, in the current section.
    pub fn error(&self, kind: WireErrorKind) -> WireError {
        self.error_at(self.offset, kind)
    }

    /// Builds an error at `offset`, in the current section.
    pub fn error_at(&self, offset: u64, kind: WireErrorKind) -> WireError {
        WireError {
            offset,
            section: self.section.clone(),
            kind,
        }
    }

    /// The inner reader.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The inner reader, mutably (e.g. to shut a socket down). Reading from it directly skips
    /// the bytes already buffered here.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes read from the inner reader but not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        self.buf.get(self.pos..self.end).unwrap_or(&[])
    }

    /// Gives back the inner reader and the bytes it delivered that were not consumed.
    pub fn into_parts(self) -> (R, Vec<u8>) {
        let rest = self.buffered().to_vec();
        (self.inner, rest)
    }

    fn available(&self) -> usize {
        self.end - self.pos
    }

    /// One read from the inner reader into the free tail of the buffer. Returns the number of
    /// bytes read (0 at end of file).
    fn read_more(&mut self) -> Result<usize> {
        if self.eof {
            return Ok(0);
        }
        if self.pos == self.end {
            self.pos = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        loop {
            let free = match self.buf.get_mut(self.end..) {
                Some(f) => f,
                None => return Ok(0),
            };
            match self.inner.read(free) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(0);
                }
                Ok(n) => {
                    self.end += n.min(free.len());
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.error(WireErrorKind::Io(e))),
            }
        }
    }

    /// Makes at least `n` bytes available (n ≤ buffer size) unless the stream ends first.
    /// Returns how many are available.
    fn fill(&mut self, n: usize) -> Result<usize> {
        let n = n.min(self.buf.len());
        while self.available() < n {
            if self.buf.len() - self.pos < n {
                // Not enough room after pos: move the unread bytes to the front.
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            }
            if self.read_more()? == 0 {
                break;
            }
        }
        Ok(self.available())
    }

    /// True when the stream has ended cleanly at this point: no byte is left. A stream that
    /// ends inside an item shows up instead as a [`WireErrorKind::Truncated`] error from the
    /// read that needed the missing bytes.
    pub fn is_at_eof(&mut self) -> Result<bool> {
        Ok(self.fill(1)? == 0)
    }

    fn truncated(&self, what: &'static str, needed: usize) -> WireError {
        self.error(WireErrorKind::Truncated {
            what,
            needed: needed as u64,
        })
    }

    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let have = self.fill(N)?;
        if have < N {
            return Err(self.truncated(what, N - have));
        }
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.pos..self.pos + N) {
            out.copy_from_slice(src);
        }
        if let Some(d) = self.running_digest() {
            d.update(&out);
        }
        self.pos += N;
        self.offset += N as u64;
        Ok(out)
    }

    /// Reads one byte.
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>("a byte")?[0])
    }

    /// Reads a big-endian u16.
    pub fn be16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.take("a be16")?))
    }

    /// Reads a big-endian u32.
    pub fn be32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.take("a be32")?))
    }

    /// Reads a big-endian u64.
    pub fn be64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take("a be64")?))
    }

    /// Reads a fixed-size array of raw bytes.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        self.take("raw bytes")
    }

    /// The next byte without consuming it; `None` at end of stream.
    pub fn peek_u8(&mut self) -> Result<Option<u8>> {
        if self.fill(1)? == 0 {
            return Ok(None);
        }
        Ok(self.buf.get(self.pos).copied())
    }

    /// Up to `n` next bytes without consuming them (fewer only at end of stream; `n` is capped
    /// at the buffer size).
    pub fn peek_bytes(&mut self, n: usize) -> Result<&[u8]> {
        let have = self.fill(n)?;
        let take = have.min(n);
        Ok(self.buf.get(self.pos..self.pos + take).unwrap_or(&[]))
    }

    /// Reads a counted string (u8 length, bytes), rejecting length 0 as QEMU does, and
    /// invalid UTF-8. `what` names the field in errors, e.g. "ID string".
    pub fn counted_string(&mut self, what: &'static str) -> Result<String> {
        let at = self.offset;
        let len = self.u8()?;
        if len == 0 {
            return Err(self.error_at(at, WireErrorKind::EmptyString { what }));
        }
        self.string_of_len(at, usize::from(len), what)
    }

    /// Reads `len` bytes as a UTF-8 string (for strings whose length was read elsewhere).
    /// `at` is where errors point.
    pub(crate) fn string_of_len(
        &mut self,
        at: u64,
        len: usize,
        what: &'static str,
    ) -> Result<String> {
        let mut v = vec![0u8; len];
        self.read_into(&mut v)?;
        String::from_utf8(v).map_err(|_| self.error_at(at, WireErrorKind::InvalidUtf8 { what }))
    }

    /// Reads `len` raw bytes into a new vector, after checking `len <= limit` (so a hostile
    /// length never causes an allocation).
    pub fn bytes(&mut self, len: u64, limit: u64, what: &'static str) -> Result<Vec<u8>> {
        if len > limit {
            return Err(self.error(WireErrorKind::TooLarge { what, len, limit }));
        }
        let n = usize::try_from(len).map_err(|_| {
            self.error(WireErrorKind::TooLarge {
                what,
                len,
                limit: usize::MAX as u64,
            })
        })?;
        // Allocate as the bytes arrive, so a length that is within the limit but larger than
        // the stream costs no more memory than the stream itself.
        let mut v = Vec::with_capacity(n.min(GROW_STEP));
        while v.len() < n {
            let old = v.len();
            let step = (n - old).min(GROW_STEP.max(old));
            v.resize(old + step, 0);
            if let Some(tail) = v.get_mut(old..) {
                self.read_into(tail)?;
            }
        }
        Ok(v)
    }

    /// Discards `n` bytes.
    pub fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            if self.available() == 0 && self.read_more()? == 0 {
                return Err(
                    self.truncated("skipped bytes", usize::try_from(n).unwrap_or(usize::MAX))
                );
            }
            let step = (self.available() as u64).min(n) as usize;
            self.digest_update(self.pos..self.pos + step);
            self.pos += step;
            self.offset += step as u64;
            n -= step as u64;
        }
        Ok(())
    }

    /// Fills `dst` entirely from the stream. Bytes already buffered are copied; the rest is read
    /// with vectored reads `[dst, lookahead buffer]`, so the payload lands directly in `dst`
    /// (guest memory, say) and whatever follows it lands in the lookahead buffer.
    pub fn read_into(&mut self, dst: &mut [u8]) -> Result<()> {
        let total = dst.len();
        let mut done = 0usize;
        // Bytes already in the buffer first.
        let n = self.available().min(total);
        if n > 0 {
            if let (Some(d), Some(s)) = (dst.get_mut(..n), self.buf.get(self.pos..self.pos + n)) {
                d.copy_from_slice(s);
            }
            self.pos += n;
            self.offset += n as u64;
            done = n;
        }
        while done < total {
            let rest = total - done;
            if rest < DIRECT_READ_THRESHOLD || self.eof {
                // Small remainder: go through the buffer.
                let have = self.fill(rest)?;
                if have == 0 {
                    return Err(self.truncated("payload", rest));
                }
                let n = have.min(rest);
                if let (Some(d), Some(s)) = (
                    dst.get_mut(done..done + n),
                    self.buf.get(self.pos..self.pos + n),
                ) {
                    d.copy_from_slice(s);
                }
                self.pos += n;
                self.offset += n as u64;
                done += n;
                continue;
            }
            // The buffer is empty here: read into [dst rest, whole buffer].
            self.pos = 0;
            self.end = 0;
            let Some(d) = dst.get_mut(done..) else { break };
            let mut iov = [IoSliceMut::new(d), IoSliceMut::new(&mut self.buf[..])];
            let got = match self.inner.read_vectored(&mut iov) {
                Ok(0) => {
                    self.eof = true;
                    return Err(self.truncated("payload", rest));
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.error(WireErrorKind::Io(e))),
            };
            if got <= rest {
                done += got;
                self.offset += got as u64;
            } else {
                done = total;
                self.offset += rest as u64;
                self.end = (got - rest).min(self.buf.len());
            }
        }
        if let Some(d) = self.running_digest() {
            d.update(dst);
        }
        Ok(())
    }
}

impl<R> std::fmt::Debug for StreamReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("offset", &self.offset)
            .field("buffered", &(self.end - self.pos))
            .field("eof", &self.eof)
            .field("section", &self.section)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSliceMut;

    /// A reader that hands out at most `chunk` bytes per call and counts vectored reads.
    struct Trickle<'a> {
        data: &'a [u8],
        chunk: usize,
        vectored_calls: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.chunk).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
        fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> std::io::Result<usize> {
            self.vectored_calls += 1;
            let mut total = 0;
            for b in bufs {
                let n = self.read(b)?;
                total += n;
                if n < b.len() {
                    break;
                }
            }
            Ok(total)
        }
    }

    #[test]
    fn primitives_are_big_endian_and_track_offsets() {
        let data = [1u8, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4];
        let mut r = StreamReader::new(&data[..]);
        assert_eq!(r.u8().unwrap(), 1);
        assert_eq!(r.be16().unwrap(), 2);
        assert_eq!(r.be32().unwrap(), 3);
        assert_eq!(r.be64().unwrap(), 4);
        assert_eq!(r.offset(), 15);
        assert!(r.is_at_eof().unwrap());
    }

    #[test]
    fn truncated_read_reports_offset_and_missing_bytes() {
        let data = [0u8, 0, 1];
        let mut r = StreamReader::new(&data[..]);
        r.u8().unwrap();
        let e = r.be32().unwrap_err();
        assert_eq!(e.offset, 1);
        assert!(e.is_truncated());
        assert!(e.to_string().contains("2 more byte(s)"), "{e}");
    }

    #[test]
    fn counted_string_rejects_empty_and_bad_utf8() {
        let mut r = StreamReader::new(&[0u8][..]);
        let e = r.counted_string("ID string").unwrap_err();
        assert_eq!(e.to_string(), "at byte 0x0: Unable to read ID string");
        let mut r = StreamReader::new(&[2u8, 0xff, 0xfe][..]);
        let e = r.counted_string("RAM block name").unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x0: RAM block name is not valid UTF-8"
        );
        let mut r = StreamReader::new(&[3u8, b'r', b'a', b'm'][..]);
        assert_eq!(r.counted_string("x").unwrap(), "ram");
    }

    #[test]
    fn bytes_checks_limit_before_reading() {
        let mut r = StreamReader::new(&[1u8, 2, 3][..]);
        r.set_section(Some(SectionContext::new("dirty-bitmap", 3)));
        let e = r.bytes(20480, 10240, "BITS buffer").unwrap_err();
        assert_eq!(
            e.to_string(),
            "at byte 0x0 in section 'dirty-bitmap' (id 3): BITS buffer length 20480 exceeds limit 10240"
        );
        assert_eq!(r.offset(), 0);
        assert_eq!(r.bytes(3, 3, "x").unwrap(), vec![1, 2, 3]);
    }

    #[test]
    fn read_into_goes_direct_and_keeps_the_tail_buffered() {
        let mut data = vec![7u8; 10];
        data.extend((0..8192u32).map(|i| i as u8));
        data.extend([0xAA, 0xBB]);
        let src = Trickle {
            data: &data,
            chunk: 1 << 20,
            vectored_calls: 0,
        };
        let mut r = StreamReader::with_capacity(src, 512);
        let head: [u8; 10] = r.array().unwrap();
        assert_eq!(head, [7u8; 10]);
        let mut page = vec![0u8; 8192];
        r.read_into(&mut page).unwrap();
        assert!(page.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert!(r.get_ref().vectored_calls >= 1);
        assert_eq!(r.u8().unwrap(), 0xAA);
        assert_eq!(r.u8().unwrap(), 0xBB);
        assert_eq!(r.offset() as usize, data.len());
        assert!(r.is_at_eof().unwrap());
    }

    #[test]
    fn read_into_handles_short_reads() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let src = Trickle {
            data: &data,
            chunk: 333,
            vectored_calls: 0,
        };
        let mut r = StreamReader::with_capacity(src, 512);
        let mut a = vec![0u8; 4096];
        r.read_into(&mut a).unwrap();
        assert_eq!(&a[..], &data[..4096]);
        let mut b = vec![0u8; 904];
        r.read_into(&mut b).unwrap();
        assert_eq!(&b[..], &data[4096..]);
        let mut c = [0u8; 1];
        assert!(r.read_into(&mut c).unwrap_err().is_truncated());
    }

    #[test]
    fn peek_does_not_consume() {
        let mut r = StreamReader::with_capacity(&[5u8, 1, 2, 3][..], 512);
        assert_eq!(r.peek_u8().unwrap(), Some(5));
        assert_eq!(r.peek_bytes(10).unwrap(), &[5, 1, 2, 3]);
        assert_eq!(r.u8().unwrap(), 5);
        r.skip(3).unwrap();
        assert_eq!(r.peek_u8().unwrap(), None);
        assert!(r.skip(1).unwrap_err().is_truncated());
    }

    #[test]
    fn large_lengths_allocate_as_data_arrives() {
        let data = vec![9u8; 3 * 1024 * 1024 + 5];
        let mut r = StreamReader::new(&data[..]);
        let v = r.bytes(data.len() as u64, u64::MAX, "x").unwrap();
        assert_eq!(v, data);
        // 200 MiB announced, 10 bytes present: a truncation error, not a 200 MiB buffer.
        let mut r = StreamReader::new(&data[..10]);
        assert!(r
            .bytes(200 << 20, 256 << 20, "PACKAGED data")
            .unwrap_err()
            .is_truncated());
    }

    #[test]
    fn base_offset_shifts_errors() {
        let mut r = StreamReader::with_base_offset(&[][..], 0x1000);
        assert_eq!(r.u8().unwrap_err().offset, 0x1000);
    }
}
