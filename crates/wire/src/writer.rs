//! [`StreamWriter`]: buffered writes of a migration stream, with a running byte count and
//! vectored sends of bulk payloads.
//!
//! Small fields (headers, integers, names) collect in a buffer. Guest pages do not: the RAM
//! sender hands them to [`StreamWriter::write_vectored_all`] together with their headers, and
//! they leave with the buffered bytes in as few `writev` calls as the kernel allows, without
//! being copied.

use crate::digest::{Digest, DigestRun};
use crate::error::{Result, WireError, WireErrorKind};
use std::io::{ErrorKind, IoSlice, Write};

/// Default size of the write buffer.
pub const DEFAULT_WRITE_BUFFER: usize = 32 * 1024;

/// How many caller slices go out together with the buffered bytes in the first `writev`.
const MAX_PREFIXED_SLICES: usize = 63;

/// A buffered writer of a migration stream over any [`Write`].
pub struct StreamWriter<W: Write> {
    inner: W,
    buf: Vec<u8>,
    capacity: usize,
    written: u64,
    /// The running integrity digest ([`crate::digest`]): every byte written goes into it.
    digest: DigestRun,
}

impl<W: Write> StreamWriter<W> {
    /// Wraps `inner` with the default buffer size.
    pub fn new(inner: W) -> Self {
        Self::with_capacity(inner, DEFAULT_WRITE_BUFFER)
    }

    /// Wraps `inner` with a buffer of `capacity` bytes (at least 64).
    pub fn with_capacity(inner: W, capacity: usize) -> Self {
        let capacity = capacity.max(64);
        StreamWriter {
            inner,
            buf: Vec::with_capacity(capacity),
            capacity,
            written: 0,
            digest: DigestRun::default(),
        }
    }

    /// Bytes handed to this writer so far (buffered or sent): the stream offset of the next
    /// byte. Used for statistics and rate limiting.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Starts a run of the integrity digest (dropping any run in progress): every byte
    /// written from now on goes into it, until [`StreamWriter::digest_finish`]. Bytes are
    /// digested when they are handed over, so a caller whose slices may change before the
    /// kernel copies them (guest pages of a running guest) must hand over a copy.
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

    /// Bytes waiting in the buffer.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The inner writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The inner writer, mutably. Writing to it directly bypasses bytes still buffered here:
    /// call [`StreamWriter::flush`] first.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Flushes the buffer and gives back the inner writer.
    pub fn into_inner(mut self) -> Result<W> {
        self.flush()?;
        Ok(self.inner)
    }

    fn io_error(&self, e: std::io::Error) -> WireError {
        WireError::new(self.written, WireErrorKind::Io(e))
    }

    /// Error helper for encoders: an error at the current output offset.
    pub fn error(&self, kind: WireErrorKind) -> WireError {
        WireError::new(self.written, kind)
    }

    fn drain_buffer(&mut self) -> Result<()> {
        let mut sent = 0;
        while sent < self.buf.len() {
            let chunk = self.buf.get(sent..).unwrap_or(&[]);
            match self.inner.write(chunk) {
                Ok(0) => {
                    return Err(self.io_error(std::io::Error::new(
                        ErrorKind::WriteZero,
                        "failed to write the migration stream",
                    )))
                }
                Ok(n) => sent += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.buf.drain(..sent.min(self.buf.len()));
                    return Err(self.io_error(e));
                }
            }
        }
        self.buf.clear();
        Ok(())
    }

    /// Sends the buffered bytes and flushes the inner writer.
    pub fn flush(&mut self) -> Result<()> {
        self.drain_buffer()?;
        self.inner.flush().map_err(|e| self.io_error(e))
    }

    fn reserve(&mut self, n: usize) -> Result<()> {
        if self.buf.len() + n > self.capacity {
            self.drain_buffer()?;
        }
        Ok(())
    }

    /// Appends one byte.
    pub fn put_u8(&mut self, v: u8) -> Result<()> {
        self.put_bytes(&[v])
    }

    /// Appends a big-endian u16.
    pub fn put_be16(&mut self, v: u16) -> Result<()> {
        self.put_bytes(&v.to_be_bytes())
    }

    /// Appends a big-endian u32.
    pub fn put_be32(&mut self, v: u32) -> Result<()> {
        self.put_bytes(&v.to_be_bytes())
    }

    /// Appends a big-endian u64.
    pub fn put_be64(&mut self, v: u64) -> Result<()> {
        self.put_bytes(&v.to_be_bytes())
    }

    /// Appends raw bytes (through the buffer; large slices go straight out after it).
    pub fn put_bytes(&mut self, data: &[u8]) -> Result<()> {
        if data.len() >= self.capacity {
            self.write_vectored_all(&mut [IoSlice::new(data)])
        } else {
            self.reserve(data.len())?;
            if let Some(d) = self.running_digest() {
                d.update(data);
            }
            self.buf.extend_from_slice(data);
            self.written += data.len() as u64;
            Ok(())
        }
    }

    /// Appends a counted string (u8 length then the bytes). Fails for empty strings (QEMU's
    /// reader rejects them) and strings longer than 255 bytes.
    pub fn put_counted_string(&mut self, s: &str, what: &'static str) -> Result<()> {
        let len = s.len();
        if len == 0 || len > 255 {
            return Err(self.error(WireErrorKind::BadStringLength { what, len }));
        }
        self.put_u8(len as u8)?;
        self.put_bytes(s.as_bytes())
    }

    /// Sends the buffered bytes followed by `bufs`, with as few `writev` calls as possible and
    /// without copying `bufs`. Partial writes are resumed where they stopped. `bufs` is
    /// consumed (its slices are advanced past what was written).
    pub fn write_vectored_all(&mut self, mut bufs: &mut [IoSlice<'_>]) -> Result<()> {
        let payload: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if let Some(d) = self.running_digest() {
            for b in bufs.iter() {
                d.update(b);
            }
        }
        IoSlice::advance_slices(&mut bufs, 0);
        // First the buffered bytes, in the same writev as the first caller slices.
        let mut sent = 0usize;
        while sent < self.buf.len() {
            let head = self.buf.get(sent..).unwrap_or(&[]);
            let mut iov: [IoSlice<'_>; MAX_PREFIXED_SLICES + 1] =
                [IoSlice::new(&[]); MAX_PREFIXED_SLICES + 1];
            iov[0] = IoSlice::new(head);
            let k = bufs.len().min(MAX_PREFIXED_SLICES);
            for (slot, b) in iov.iter_mut().skip(1).zip(bufs.iter()) {
                *slot = *b;
            }
            let pending = head.len();
            let n = match self.inner.write_vectored(&iov[..k + 1]) {
                Ok(0) => {
                    return Err(self.io_error(std::io::Error::new(
                        ErrorKind::WriteZero,
                        "failed to write the migration stream",
                    )))
                }
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.buf.drain(..sent.min(self.buf.len()));
                    return Err(self.io_error(e));
                }
            };
            if n < pending {
                sent += n;
            } else {
                sent = self.buf.len();
                IoSlice::advance_slices(&mut bufs, n - pending);
            }
        }
        self.buf.clear();
        // Then whatever is left of the caller's slices.
        while !bufs.is_empty() {
            match self.inner.write_vectored(bufs) {
                Ok(0) => {
                    return Err(self.io_error(std::io::Error::new(
                        ErrorKind::WriteZero,
                        "failed to write the migration stream",
                    )))
                }
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io_error(e)),
            }
        }
        self.written += payload;
        Ok(())
    }
}

impl<W: Write> std::fmt::Debug for StreamWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamWriter")
            .field("written", &self.written)
            .field("pending", &self.buf.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `max` bytes per call and records each call.
    #[derive(Default)]
    struct Stingy {
        out: Vec<u8>,
        max: usize,
        calls: usize,
    }

    impl Write for Stingy {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.calls += 1;
            let n = buf.len().min(self.max);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
            self.calls += 1;
            let mut left = self.max;
            let mut total = 0;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                total += n;
                if left == 0 {
                    break;
                }
            }
            Ok(total)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn integers_are_big_endian_and_counted() {
        let mut w = StreamWriter::new(Vec::new());
        w.put_u8(1).unwrap();
        w.put_be16(2).unwrap();
        w.put_be32(3).unwrap();
        w.put_be64(4).unwrap();
        w.put_counted_string("ram", "RAM block name").unwrap();
        assert_eq!(w.bytes_written(), 19);
        let out = w.into_inner().unwrap();
        assert_eq!(
            out,
            [1, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 4, 3, b'r', b'a', b'm']
        );
    }

    #[test]
    fn counted_string_limits() {
        let mut w = StreamWriter::new(Vec::new());
        assert!(w.put_counted_string("", "idstr").is_err());
        assert!(w.put_counted_string(&"x".repeat(256), "idstr").is_err());
        w.put_counted_string(&"x".repeat(255), "idstr").unwrap();
        assert_eq!(w.bytes_written(), 256);
    }

    #[test]
    fn vectored_write_survives_partial_writes() {
        let page_a = vec![0xAAu8; 4096];
        let page_b = vec![0xBBu8; 4096];
        let mut w = StreamWriter::new(Stingy {
            max: 1000,
            ..Default::default()
        });
        w.put_be64(0x1008).unwrap();
        w.write_vectored_all(&mut [
            IoSlice::new(&page_a),
            IoSlice::new(&[9, 9]),
            IoSlice::new(&page_b),
        ])
        .unwrap();
        assert_eq!(w.bytes_written(), 8 + 4096 + 2 + 4096);
        let s = w.into_inner().unwrap();
        let mut expect = 0x1008u64.to_be_bytes().to_vec();
        expect.extend(&page_a);
        expect.extend([9, 9]);
        expect.extend(&page_b);
        assert_eq!(s.out, expect);
    }

    #[test]
    fn vectored_write_uses_one_call_when_possible() {
        let page = vec![1u8; 4096];
        let mut w = StreamWriter::new(Stingy {
            max: usize::MAX,
            ..Default::default()
        });
        w.put_be64(8).unwrap();
        w.write_vectored_all(&mut [IoSlice::new(&page)]).unwrap();
        assert_eq!(w.get_ref().calls, 1);
        assert_eq!(w.get_ref().out.len(), 4104);
    }

    #[test]
    fn many_slices_are_all_sent() {
        let pages: Vec<Vec<u8>> = (0..200u8).map(|i| vec![i; 16]).collect();
        let mut slices: Vec<IoSlice<'_>> = pages.iter().map(|p| IoSlice::new(p)).collect();
        let mut w = StreamWriter::new(Stingy {
            max: 100,
            ..Default::default()
        });
        w.put_u8(0xEE).unwrap();
        w.write_vectored_all(&mut slices).unwrap();
        let out = w.into_inner().unwrap().out;
        assert_eq!(out.len(), 1 + 200 * 16);
        assert_eq!(out[0], 0xEE);
        assert!(out[1..]
            .chunks(16)
            .enumerate()
            .all(|(i, c)| c.iter().all(|&b| b == i as u8)));
    }

    #[test]
    fn large_put_bytes_bypasses_buffer() {
        let big = vec![5u8; 100_000];
        let mut w = StreamWriter::with_capacity(Vec::new(), 1024);
        w.put_u8(1).unwrap();
        w.put_bytes(&big).unwrap();
        w.put_u8(2).unwrap();
        let out = w.into_inner().unwrap();
        assert_eq!(out.len(), 100_002);
        assert_eq!((out[0], out[1], out[100_001]), (1, 5, 2));
    }
}
