//! A connected socket of either family.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A connected unix or TCP socket.
#[derive(Debug)]
pub enum Stream {
    /// Unix domain.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl Stream {
    /// Connects to a unix socket.
    pub fn connect_unix(path: &Path) -> io::Result<Stream> {
        UnixStream::connect(path).map(Stream::Unix)
    }

    /// Connects to the first of `addrs` that answers, with `TCP_NODELAY` on (every user
    /// writes whole messages or batches; waiting to coalesce only adds latency). The error
    /// is the last address's.
    pub fn connect_tcp(addrs: &[SocketAddr]) -> io::Result<Stream> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for a in addrs {
            match TcpStream::connect(a) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Ok(Stream::Tcp(s));
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    /// Shuts one or both directions down; a thread blocked on the socket returns.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        }
    }

    /// Bounds how long one read may wait (`SO_RCVTIMEO`; `None` waits forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(t),
            Stream::Tcp(s) => s.set_read_timeout(t),
        }
    }

    /// How long one read may wait (`SO_RCVTIMEO`; `None` waits forever).
    pub fn read_timeout(&self) -> io::Result<Option<Duration>> {
        match self {
            Stream::Unix(s) => s.read_timeout(),
            Stream::Tcp(s) => s.read_timeout(),
        }
    }

    /// Bounds how long one write may wait (`SO_SNDTIMEO`; `None` waits forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_write_timeout(t),
            Stream::Tcp(s) => s.set_write_timeout(t),
        }
    }

    /// Switches non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_nonblocking(on),
            Stream::Tcp(s) => s.set_nonblocking(on),
        }
    }

    /// `TCP_NODELAY` (a unix socket has nothing to set).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Unix(_) => Ok(()),
            Stream::Tcp(s) => s.set_nodelay(on),
        }
    }

    /// Whether this is a TCP socket.
    pub fn is_tcp(&self) -> bool {
        matches!(self, Stream::Tcp(_))
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The reading side of a socket whose other direction carries the bulk of the traffic: the
/// source's return path, read while the migration stream goes out on the same socket.
///
/// A thread asleep in `recv` sits on the socket's one wait queue, and the kernel wakes that
/// queue for the writer too, every time acknowledgements free send space — so a reader
/// waiting in `recv` for a message that comes once in a while is woken thousands of times
/// per GiB sent (3 400 in a 1 GiB postcopy push, against a few hundred messages), each time
/// taking a core from the threads that move the data. `poll` for `POLLIN` only wakes for
/// data, so this reader tries the socket without waiting and, when nothing is there, waits
/// in `poll`. A read timeout set on the socket ([`Stream::set_read_timeout`]) bounds the wait
/// as it bounds `recv`'s, and a [`Stream::shutdown`] from another thread ends it.
#[derive(Debug)]
pub struct QuietReader(Stream);

impl QuietReader {
    /// Reads from `s` (typically a [`Stream::try_clone`] of the writer's socket).
    pub fn new(s: Stream) -> Self {
        QuietReader(s)
    }

    /// The socket read from.
    pub fn get_ref(&self) -> &Stream {
        &self.0
    }
}

impl Read for QuietReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use nix::errno::Errno;
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use nix::sys::socket::{recv, MsgFlags};
        use std::os::fd::AsRawFd;
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = self.0.read_timeout()?.map(|t| Instant::now() + t);
        loop {
            match recv(self.0.as_fd().as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {}
                Err(e) => return Err(e.into()),
            }
            let timeout = match deadline {
                None => PollTimeout::NONE,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(io::Error::from(io::ErrorKind::WouldBlock));
                    }
                    // At least 1 ms: a sub-millisecond rest would round to 0 and spin.
                    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
                }
            };
            let mut fds = [PollFd::new(self.0.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Calls `connect` until it succeeds or `timeout` has passed (every 20 ms: the peer is a
/// process still starting up); the last error when time runs out.
pub fn connect_retry<T>(
    mut connect: impl FnMut() -> io::Result<T>,
    timeout: Duration,
) -> io::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match connect() {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_unblocks_a_reader() {
        let (a, b) = UnixStream::pair().unwrap();
        let s = Stream::from(a);
        let mut r = s.try_clone().unwrap();
        let t = std::thread::spawn(move || {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map(|_| v.len())
        });
        std::thread::sleep(Duration::from_millis(20));
        s.shutdown(Shutdown::Both).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 0);
        drop(b);
    }

    /// Voluntary context switches of the calling thread so far.
    fn switches() -> u64 {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Whether the thread whose `/proc/.../stat` is at `stat` sleeps (state `S`).
    fn sleeping(stat: &str) -> bool {
        let s = std::fs::read_to_string(stat).unwrap();
        // The state follows the command name, which is in parentheses and may hold spaces.
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('S'))
    }

    /// A TCP connection on loopback: (this side, the peer).
    fn tcp_pair() -> (Stream, Stream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = Stream::connect_tcp(&[l.local_addr().unwrap()]).unwrap();
        let b = Stream::from(l.accept().unwrap().0);
        (a, b)
    }

    /// The source's return path: one message read while 256 MiB go out on the same socket.
    /// `recv` woke the reader on every acknowledgement (hundreds of times); the quiet reader
    /// sleeps until the message comes.
    #[test]
    fn a_quiet_reader_sleeps_through_the_other_directions_traffic() {
        let (a, mut b) = tcp_pair();
        let mut r = QuietReader::new(a.try_clone().unwrap());
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            tid_tx.send(nix::unistd::gettid()).unwrap();
            let before = switches();
            let mut m = [0u8; 5];
            r.read_exact(&mut m).unwrap();
            (m, switches() - before)
        });
        // The traffic starts once the reader sleeps in its wait. Any read takes the socket's
        // lock, which the writer holds through each send: a reader that starts beside the
        // writer sleeps on that lock, which is not what this test counts.
        let stat = format!("/proc/self/task/{}/stat", tid_rx.recv().unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sleeping(&stat) {
            assert!(Instant::now() < deadline, "the reader never went to sleep");
            std::thread::sleep(Duration::from_millis(1));
        }
        // The peer reads slower than the writer writes, so the writer keeps waiting for send
        // space, and each acknowledgement that frees some wakes whoever sleeps on the socket
        // without saying for which direction.
        const TOTAL: usize = 64 << 20;
        let drain = {
            let mut b = b.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 16];
                let mut n = 0usize;
                while n < TOTAL {
                    n += b.read(&mut buf).unwrap();
                    std::thread::sleep(Duration::from_micros(20));
                }
            })
        };
        let mut w = a;
        let chunk = vec![7u8; 128 << 10];
        for _ in 0..TOTAL / chunk.len() {
            w.write_all(&chunk).unwrap();
        }
        drain.join().unwrap();
        b.write_all(b"hello").unwrap();
        let (m, woken) = reader.join().unwrap();
        assert_eq!(&m, b"hello");
        assert!(
            woken <= 10,
            "the reader was woken {woken} times for one message"
        );
    }

    #[test]
    fn a_quiet_reader_reads_what_comes_and_ends_as_recv_does() {
        let (a, mut b) = tcp_pair();
        let mut r = QuietReader::new(a.try_clone().unwrap());
        b.write_all(b"abc").unwrap();
        let mut m = [0u8; 3];
        r.read_exact(&mut m).unwrap();
        assert_eq!(&m, b"abc");
        // A read timeout bounds the wait, as it bounds recv's.
        a.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
        let t0 = Instant::now();
        let e = r.read(&mut m).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        assert!(t0.elapsed() >= Duration::from_millis(30));
        a.set_read_timeout(None).unwrap();
        // A shutdown from another thread ends a wait with EOF.
        let t = std::thread::spawn(move || r.read(&mut [0u8; 8]));
        std::thread::sleep(Duration::from_millis(20));
        a.shutdown(Shutdown::Both).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), 0);
        // The peer's close is EOF too.
        let (a, b) = tcp_pair();
        let mut r = QuietReader::new(a);
        drop(b);
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[test]
    fn retry_gives_the_last_error_when_time_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none");
        let e = connect_retry(|| Stream::connect_unix(&p), Duration::from_millis(50)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
