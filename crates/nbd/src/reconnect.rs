//! How the `nbd` driver keeps its connection, as QEMU 7.2's (`block/nbd.c`,
//! `nbd/client-connection.c`): the states of a node's link to its server, the background
//! thread that connects, and the two options that time them, `reconnect-delay` and
//! `open-timeout`.
//!
//! A request that finds the connection broken by an I/O error (the server went away, a read
//! or write on the socket failed) moves the link to *connecting*; any other breakage (the
//! server broke the protocol) ends it for good (*quit*: every later request fails with `EIO`).
//! While connecting, each request makes a reconnect attempt first:
//! - with `reconnect-delay` 0 the attempt does not wait: it takes a connection the background
//!   thread has made by then, or starts the thread, and the request fails with `EIO`;
//! - with `reconnect-delay` N the first request waits for the thread up to N seconds (the
//!   request that met the breakage is sent again on the new connection), others queue behind
//!   it; past the N seconds the link is connecting without waiting, as with 0.
//!
//! The thread, once the node is open, keeps trying until it connects (pausing 1 s, then 2,
//! 4, 8 and 16 s between attempts, as QEMU's), so a server back after a while is found by the
//! next request after the thread's next attempt. `open-timeout` N makes the first connection
//! retry the same way for up to N seconds before `blockdev-add` fails with the last attempt's
//! error; without it the open makes one attempt.
//!
//! [`Link`] and [`Connector`] are generic over the connection so that the state machine is
//! tested here with a fake one; the driver uses them with `NbdClient`.

use block::BlockError;
use nix::errno::Errno;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// How a connection broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Breakage {
    /// The socket failed: worth reconnecting (QEMU's `-EIO` channel errors).
    Io,
    /// The server broke the protocol: the link is over (QEMU's other channel errors).
    Fatal,
}

/// What [`Link`] needs of a connection.
pub(crate) trait Conn: Send + 'static {
    /// Whether (and how) the connection broke during the last request.
    fn breakage(&self) -> Option<Breakage>;
    /// Ends a connection that is not wanted (QEMU sends `NBD_CMD_DISC` as a courtesy).
    fn close(self);
}

/// Makes one connection, negotiated; the error is the message QEMU would give.
pub(crate) type ConnectFn<C> = Arc<dyn Fn() -> Result<C, String> + Send + Sync>;

/// Whether a new connection suits the node; the error says why not.
pub(crate) type CheckFn<C> = Box<dyn Fn(&C) -> Result<(), String> + Send + Sync>;

/// How long [`Connector::establish`] waits for the thread.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Not at all: a connection made by now, or an error.
    No,
    /// Until the thread is done or the instant passes.
    Until(Instant),
    /// Until the thread is done.
    Done,
}

/// What the thread and its callers share.
struct Attempts<C> {
    /// The thread is running.
    running: bool,
    /// The thread retries until it connects (else it makes one attempt).
    retry: bool,
    /// The node is gone: the thread ends and drops what it made.
    detached: bool,
    /// A connection the thread made that nobody took yet.
    ready: Option<C>,
    /// The last attempt's error.
    err: Option<String>,
    /// How many times waits were cancelled ([`Canceller::cancel`]).
    cancels: u64,
}

/// Stops a node's requests from waiting for a reconnect, from outside the lock they hold
/// (QEMU's `nbd_cancel_in_flight`).
#[derive(Clone)]
pub(crate) struct Canceller(Arc<dyn Fn() + Send + Sync>);

impl Canceller {
    /// The request waiting (if any) fails now, and so do later ones until a reconnect
    /// succeeds or the connection breaks again.
    pub(crate) fn cancel(&self) {
        (self.0)();
    }
}

/// The background connection thread of one node (QEMU's `NBDClientConnection`).
pub(crate) struct Connector<C: Conn> {
    connect: ConnectFn<C>,
    shared: Arc<(Mutex<Attempts<C>>, Condvar)>,
    /// The first pause between attempts (1 s as QEMU; tests take less).
    pause: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<C: Conn> Connector<C> {
    /// A connector that makes connections with `connect`, pausing `pause` (doubling up to 16
    /// times that) between attempts once retrying.
    pub(crate) fn new(connect: ConnectFn<C>, pause: Duration) -> Self {
        Connector {
            connect,
            shared: Arc::new((
                Mutex::new(Attempts {
                    running: false,
                    retry: false,
                    detached: false,
                    ready: None,
                    err: None,
                    cancels: 0,
                }),
                Condvar::new(),
            )),
            pause,
        }
    }

    /// From now on the thread tries until it connects.
    pub(crate) fn enable_retry(&self) {
        lock(&self.shared.0).retry = true;
    }

    /// A handle that cancels waits.
    pub(crate) fn canceller(&self) -> Canceller {
        let shared = Arc::clone(&self.shared);
        Canceller(Arc::new(move || {
            let (m, cv) = &*shared;
            lock(m).cancels += 1;
            cv.notify_all();
        }))
    }

    fn cancels(&self) -> u64 {
        lock(&self.shared.0).cancels
    }

    /// A connection: one the thread made already, else the thread is started (unless it
    /// runs) and waited for as `wait` says. The error is the last attempt's, or why there is
    /// none.
    pub(crate) fn establish(&self, wait: Wait) -> Result<C, String> {
        let (m, cv) = &*self.shared;
        let mut a = lock(m);
        if !a.running {
            if let Some(c) = a.ready.take() {
                return Ok(c);
            }
            let shared = Arc::clone(&self.shared);
            let connect = Arc::clone(&self.connect);
            let pause = self.pause;
            std::thread::Builder::new()
                .name("nbd-connect".into())
                .spawn(move || attempts(&shared, &connect, pause))
                .map_err(|e| format!("Cannot start the connection thread: {e}"))?;
            a.running = true;
        }
        let deadline = match wait {
            Wait::No => {
                return Err(a
                    .err
                    .clone()
                    .unwrap_or_else(|| "No connection at the moment".into()))
            }
            Wait::Until(d) => Some(d),
            Wait::Done => None,
        };
        let cancels = a.cancels;
        while a.running {
            if a.cancels != cancels {
                return Err("Connection attempt cancelled".into());
            }
            match deadline {
                None => a = cv.wait(a).unwrap_or_else(PoisonError::into_inner),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(a
                            .err
                            .clone()
                            .unwrap_or_else(|| "Connection attempt cancelled by timeout".into()));
                    }
                    a = cv
                        .wait_timeout(a, d - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        match a.ready.take() {
            Some(c) => Ok(c),
            None => Err(a
                .err
                .clone()
                .unwrap_or_else(|| "No connection at the moment".into())),
        }
    }
}

impl<C: Conn> Drop for Connector<C> {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        let ready = {
            let mut a = lock(m);
            a.detached = true;
            a.ready.take()
        };
        cv.notify_all();
        if let Some(c) = ready {
            c.close();
        }
    }
}

/// The thread: attempts until one succeeds, or once when not retrying, or until detached.
fn attempts<C: Conn>(
    shared: &(Mutex<Attempts<C>>, Condvar),
    connect: &ConnectFn<C>,
    pause: Duration,
) {
    let (m, cv) = shared;
    let mut next_pause = pause;
    let mut a = loop {
        let r = connect();
        let mut a = lock(m);
        match r {
            Ok(c) => {
                if a.detached {
                    c.close();
                } else {
                    a.ready = Some(c);
                    a.err = None;
                }
                break a;
            }
            Err(e) => {
                a.err = Some(e);
                if !a.retry || a.detached {
                    break a;
                }
                let until = Instant::now() + next_pause;
                loop {
                    let now = Instant::now();
                    if a.detached || now >= until {
                        break;
                    }
                    a = cv
                        .wait_timeout(a, until - now)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                if a.detached {
                    break a;
                }
                next_pause = (next_pause * 2).min(pause * 16);
            }
        }
    };
    a.running = false;
    drop(a);
    cv.notify_all();
}

/// Where a node's link stands (QEMU's `NBDClientState`).
enum State<C> {
    /// Requests go out on this connection.
    Connected(C),
    /// Broken; requests wait for a reconnect until the deadline the first attempt set.
    ConnectingWait(Option<Instant>),
    /// Broken; each request makes one attempt that does not wait.
    ConnectingNoWait,
    /// Over: every request fails.
    Quit,
}

/// A node's link to its server: the connection, or how it is being reconnected.
pub(crate) struct Link<C: Conn> {
    state: State<C>,
    /// `reconnect-delay` (zero: requests do not wait).
    delay: Duration,
    connector: Connector<C>,
    /// Whether a new connection suits the node (QEMU's `nbd_handle_updated_info`).
    check: CheckFn<C>,
    /// The connector's cancel count when the connection last broke: a cancel since then
    /// stops the waiting.
    cancels: u64,
}

impl<C: Conn> Link<C> {
    /// A link over `first`, the connection the open made; later ones come from `connector`
    /// (retrying from now on) and must pass `check`.
    pub(crate) fn new(
        first: C,
        delay: Duration,
        connector: Connector<C>,
        check: CheckFn<C>,
    ) -> Self {
        connector.enable_retry();
        Link {
            state: State::Connected(first),
            delay,
            connector,
            check,
            cancels: 0,
        }
    }

    /// Runs one request `f` on the connection, reconnecting first if it is broken; a request
    /// that breaks the connection is sent again on a new one while the link waits for one.
    pub(crate) fn run<R>(
        &mut self,
        mut f: impl FnMut(&mut C) -> Result<R, BlockError>,
    ) -> Result<R, BlockError> {
        loop {
            if matches!(
                self.state,
                State::ConnectingWait(_) | State::ConnectingNoWait
            ) {
                self.attempt();
            }
            let State::Connected(c) = &mut self.state else {
                return Err(BlockError::Io(Errno::EIO));
            };
            let r = f(c);
            match c.breakage() {
                None => return r,
                Some(Breakage::Fatal) => {
                    self.drop_connection(State::Quit);
                    return r;
                }
                Some(Breakage::Io) if self.delay.is_zero() => {
                    self.drop_connection(State::ConnectingNoWait);
                    return r;
                }
                Some(Breakage::Io) => {
                    self.cancels = self.connector.cancels();
                    self.drop_connection(State::ConnectingWait(None));
                }
            }
        }
    }

    fn drop_connection(&mut self, next: State<C>) {
        // A broken connection is only closed: it is out of step, nothing more goes on it.
        drop(std::mem::replace(&mut self.state, next));
    }

    /// One reconnect attempt, waiting or not as the state says.
    fn attempt(&mut self) {
        if matches!(self.state, State::ConnectingWait(_))
            && self.connector.cancels() != self.cancels
        {
            self.state = State::ConnectingNoWait;
        }
        let wait = match self.state {
            State::ConnectingWait(deadline) => {
                let d = deadline.unwrap_or_else(|| Instant::now() + self.delay);
                self.state = State::ConnectingWait(Some(d));
                Wait::Until(d)
            }
            State::ConnectingNoWait => Wait::No,
            State::Connected(_) | State::Quit => return,
        };
        match self.connector.establish(wait) {
            Ok(c) => match (self.check)(&c) {
                Ok(()) => self.state = State::Connected(c),
                Err(e) => {
                    log::warn!("nbd: the new connection does not suit the node: {e}");
                    c.close();
                }
            },
            Err(e) => log::debug!("nbd: reconnect attempt failed: {e}"),
        }
        if let State::ConnectingWait(Some(d)) = self.state {
            if Instant::now() >= d || self.connector.cancels() != self.cancels {
                self.state = State::ConnectingNoWait;
            }
        }
    }

    /// A handle that stops the waiting from outside (the caller of [`run`](Self::run) holds
    /// the link).
    pub(crate) fn canceller(&self) -> Canceller {
        self.connector.canceller()
    }

    /// The connection, if the link has one (to end it politely when the node closes).
    pub(crate) fn take(&mut self) -> Option<C> {
        match std::mem::replace(&mut self.state, State::Quit) {
            State::Connected(c) => Some(c),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A fake server: up or down; connections made count, and a connection breaks as told.
    #[derive(Default)]
    struct Server {
        up: AtomicBool,
        read_only: AtomicBool,
        connects: AtomicUsize,
    }

    struct Fake {
        id: usize,
        read_only: bool,
        broke: Option<Breakage>,
    }

    impl Conn for Fake {
        fn breakage(&self) -> Option<Breakage> {
            self.broke
        }
        fn close(self) {}
    }

    const PAUSE: Duration = Duration::from_millis(20);

    fn link(server: &Arc<Server>, delay: Duration) -> Link<Fake> {
        let s = Arc::clone(server);
        let connect: ConnectFn<Fake> = Arc::new(move || {
            if s.up.load(Ordering::SeqCst) {
                Ok(Fake {
                    id: s.connects.fetch_add(1, Ordering::SeqCst) + 1,
                    read_only: s.read_only.load(Ordering::SeqCst),
                    broke: None,
                })
            } else {
                Err("Failed to connect to 'x': Connection refused".into())
            }
        });
        let connector = Connector::new(connect, PAUSE);
        server.up.store(true, Ordering::SeqCst);
        let first = connector.establish(Wait::Done).unwrap();
        let check = Box::new(|c: &Fake| {
            if c.read_only {
                Err("NBD export is read-only".into())
            } else {
                Ok(())
            }
        });
        Link::new(first, delay, connector, check)
    }

    /// A request on connection `id`: breaks it as `brk` says when it is that one.
    fn request(l: &mut Link<Fake>, brk: Option<(usize, Breakage)>) -> Result<usize, BlockError> {
        l.run(|c| match brk {
            Some((id, b)) if id == c.id => {
                c.broke = Some(b);
                Err(BlockError::Io(Errno::EIO))
            }
            _ => Ok(c.id),
        })
    }

    /// Requests until one succeeds (the thread's next attempt finds the server): its
    /// connection.
    fn eventually(l: &mut Link<Fake>) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match request(l, None) {
                Ok(id) => return id,
                Err(e) => assert!(Instant::now() < deadline, "never reconnected: {e}"),
            }
            std::thread::sleep(PAUSE / 2);
        }
    }

    fn eio(r: Result<usize, BlockError>) -> bool {
        matches!(r, Err(BlockError::Io(Errno::EIO)))
    }

    #[test]
    fn without_delay_a_broken_request_fails_and_a_later_one_reconnects() {
        let s = Arc::new(Server::default());
        let mut l = link(&s, Duration::ZERO);
        assert_eq!(request(&mut l, None).unwrap(), 1);
        s.up.store(false, Ordering::SeqCst);
        assert!(eio(request(&mut l, Some((1, Breakage::Io)))));
        // Down: the attempt does not wait and fails; it started the thread.
        let t = Instant::now();
        assert!(eio(request(&mut l, None)));
        assert!(t.elapsed() < PAUSE * 10);
        s.up.store(true, Ordering::SeqCst);
        // The thread finds it at its next attempt; the request after that runs on it.
        assert_eq!(eventually(&mut l), 2);
    }

    #[test]
    fn without_delay_the_first_request_after_the_break_only_starts_the_thread() {
        let s = Arc::new(Server::default());
        let mut l = link(&s, Duration::ZERO);
        assert!(eio(request(&mut l, Some((1, Breakage::Io)))));
        // The server is up, but the attempt does not wait for the thread it starts.
        assert!(eio(request(&mut l, None)));
        assert_eq!(eventually(&mut l), 2);
    }

    #[test]
    fn with_delay_the_request_waits_and_runs_on_the_new_connection() {
        let s = Arc::new(Server::default());
        let mut l = link(&s, Duration::from_secs(5));
        s.up.store(false, Ordering::SeqCst);
        let s2 = Arc::clone(&s);
        let back = std::thread::spawn(move || {
            std::thread::sleep(PAUSE * 5);
            s2.up.store(true, Ordering::SeqCst);
        });
        // The request that met the breakage is sent again once the server is back.
        assert_eq!(request(&mut l, Some((1, Breakage::Io))).unwrap(), 2);
        back.join().unwrap();
    }

    #[test]
    fn past_the_delay_requests_fail_at_once_until_a_reconnect() {
        let s = Arc::new(Server::default());
        let delay = PAUSE * 10;
        let mut l = link(&s, delay);
        s.up.store(false, Ordering::SeqCst);
        let t = Instant::now();
        assert!(eio(request(&mut l, Some((1, Breakage::Io)))));
        assert!(t.elapsed() >= delay);
        let t = Instant::now();
        assert!(eio(request(&mut l, None)));
        assert!(t.elapsed() < delay);
        s.up.store(true, Ordering::SeqCst);
        assert_eq!(eventually(&mut l), 2);
        // Connected again: the next breakage waits again.
        s.up.store(false, Ordering::SeqCst);
        let t = Instant::now();
        assert!(eio(request(&mut l, Some((2, Breakage::Io)))));
        assert!(t.elapsed() >= delay);
    }

    #[test]
    fn a_cancel_stops_the_wait_until_the_next_breakage() {
        let s = Arc::new(Server::default());
        let mut l = link(&s, Duration::from_secs(30));
        let cancel = l.canceller();
        s.up.store(false, Ordering::SeqCst);
        let canceller = std::thread::spawn(move || {
            std::thread::sleep(PAUSE * 5);
            cancel.cancel();
        });
        let t = Instant::now();
        assert!(eio(request(&mut l, Some((1, Breakage::Io)))));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        canceller.join().unwrap();
        // Later requests do not wait either.
        let t = Instant::now();
        assert!(eio(request(&mut l, None)));
        assert!(t.elapsed() < Duration::from_secs(10));
        s.up.store(true, Ordering::SeqCst);
        assert_eq!(eventually(&mut l), 2);
        // Connected again: the next breakage waits, for a server back a moment later.
        s.up.store(false, Ordering::SeqCst);
        let s2 = Arc::clone(&s);
        let back = std::thread::spawn(move || {
            std::thread::sleep(PAUSE * 5);
            s2.up.store(true, Ordering::SeqCst);
        });
        assert_eq!(request(&mut l, Some((2, Breakage::Io))).unwrap(), 3);
        back.join().unwrap();
    }

    #[test]
    fn a_protocol_breakage_ends_the_link() {
        let s = Arc::new(Server::default());
        let mut l = link(&s, Duration::from_secs(5));
        assert!(eio(request(&mut l, Some((1, Breakage::Fatal)))));
        assert!(eio(request(&mut l, None)));
        std::thread::sleep(PAUSE * 2);
        assert!(eio(request(&mut l, None)));
        assert_eq!(s.connects.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_new_connection_that_does_not_suit_the_node_is_refused() {
        let s = Arc::new(Server::default());
        let mut l = link(&s, Duration::ZERO);
        s.read_only.store(true, Ordering::SeqCst);
        assert!(eio(request(&mut l, Some((1, Breakage::Io)))));
        assert!(eio(request(&mut l, None)));
        while s.connects.load(Ordering::SeqCst) < 2 {
            std::thread::sleep(PAUSE / 4);
        }
        std::thread::sleep(PAUSE);
        // The thread connected, but to an export now read-only: refused, still connecting.
        assert!(eio(request(&mut l, None)));
        s.read_only.store(false, Ordering::SeqCst);
        assert!(eio(request(&mut l, None)));
        assert_eq!(eventually(&mut l), 3);
    }

    #[test]
    fn an_open_with_a_timeout_retries_until_it_and_gives_the_last_error() {
        let s = Arc::new(Server::default());
        let s2 = Arc::clone(&s);
        let connect: ConnectFn<Fake> = Arc::new(move || {
            if s2.up.load(Ordering::SeqCst) {
                Ok(Fake {
                    id: 1,
                    read_only: false,
                    broke: None,
                })
            } else {
                Err("Failed to connect to 'x': No such file or directory".into())
            }
        });
        let c = Connector::new(Arc::clone(&connect), PAUSE);
        // No timeout: one attempt.
        assert_eq!(
            c.establish(Wait::Done).err().unwrap(),
            "Failed to connect to 'x': No such file or directory"
        );
        c.enable_retry();
        let t = Instant::now();
        let e = c.establish(Wait::Until(t + PAUSE * 5)).err().unwrap();
        assert!(t.elapsed() >= PAUSE * 5);
        assert_eq!(e, "Failed to connect to 'x': No such file or directory");
        drop(c);
        let c = Connector::new(connect, PAUSE);
        c.enable_retry();
        let s3 = Arc::clone(&s);
        let up = std::thread::spawn(move || {
            std::thread::sleep(PAUSE * 2);
            s3.up.store(true, Ordering::SeqCst);
        });
        let t = Instant::now();
        assert!(c.establish(Wait::Until(t + PAUSE * 50)).is_ok());
        up.join().unwrap();
    }
}
