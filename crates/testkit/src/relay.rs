//! A relay between a migration source and its destination that misbehaves as a network can:
//! it cuts the connection, stalls it, or flips bits, at byte offsets chosen by the test or
//! drawn from a seed — and never for longer than a bound, so no test can hang on it.
//!
//! The relay listens on a unix socket (or on 127.0.0.1) and forwards every connection it
//! accepts to the target, both ways: the stream towards the destination ("forward") and the
//! return path back. Faults are positions in the forward stream of the *first* connection
//! (the main migration channel); [`Relay::stall`] and [`Relay::cut`] act on every connection
//! at once, whenever the test calls them. [`Plan::divert`] sends the connections after the
//! first few to another target (a multifd source's extra channels to another peer);
//! [`Relay::cut_one`] cuts one connection and leaves the others.
//!
//! * [`Fault::Cut`] — once `at` bytes went forward, both connections are shut down in both
//!   directions, as when the network between the hosts goes away.
//! * [`Fault::Stall`] — once `at` bytes went forward, nothing moves any more, either way: the
//!   relay stops reading, so the sender's writes block once the socket buffers are full, and
//!   a side waiting for the other hears nothing. The stall lasts until [`Relay::release`], or
//!   at most [`Plan::bound`], after which the relay cuts the connection.
//! * [`Fault::Flip`] — the byte at offset `at` is XORed with `mask` on its way.
//! * [`Fault::CutBeforeEnd`] — the relay holds back the last `window` bytes of the stream and
//!   cuts when the sender ends it: the sender believes everything went out, the receiver
//!   misses its last `window` bytes.
//!
//! A plan may also be [`Plan::throttled`]: every connection's forward direction then shares
//! one rate, as a slow link (or a destination that takes its data slowly) would impose. The
//! relay reads a small chunk, waits for its turn, and writes it on, so what the sender wrote
//! beyond that waits in the sockets' buffers — the backlog a sender cannot see by counting
//! what it wrote.
//!
//! Everything the relay did is recorded ([`Relay::report`]), so a test can say what it broke.
//! A [`Plan::recording`] relay also keeps every byte it carried, per connection and
//! direction ([`Relay::recorded`]), so a test can look at what was on the wire (with
//! [`crate::tls_wire`]: TLS records and nothing else).

use net::Listener;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One misbehaviour, at a position of the forward stream of the first connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Shut both connections down once `at` bytes went forward.
    Cut {
        /// Bytes forwarded before the cut.
        at: u64,
    },
    /// Move nothing more, either way, once `at` bytes went forward.
    Stall {
        /// Bytes forwarded before the stall.
        at: u64,
    },
    /// XOR the forward byte at offset `at` with `mask`.
    Flip {
        /// Offset of the byte in the forward stream.
        at: u64,
        /// Bits to flip (non-zero).
        mask: u8,
    },
    /// Hold back the last `window` bytes of the forward stream; when the sender ends its
    /// stream (or the bound passes), cut without forwarding them.
    CutBeforeEnd {
        /// Bytes held back.
        window: u64,
    },
}

/// What the relay does: its faults and how long any of them may last.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The faults, by position.
    pub faults: Vec<Fault>,
    /// Longest a stall (or a hold-back) lasts before the relay cuts the connection.
    pub bound: Duration,
    /// Connections from this index on (0 is the first) go to another target: a multifd
    /// source's extra channels reach a peer other than its main channel's.
    pub divert: Option<(usize, Target)>,
    /// Bytes per second the forward directions of all connections carry together (`None`:
    /// as fast as the sockets go).
    pub rate: Option<u64>,
    /// Keep every byte carried, per connection and direction ([`Relay::recorded`]).
    pub record: bool,
}

impl Default for Plan {
    fn default() -> Self {
        Plan {
            faults: Vec::new(),
            bound: Duration::from_secs(60),
            divert: None,
            rate: None,
            record: false,
        }
    }
}

impl Plan {
    /// A relay that only forwards (until the test calls [`Relay::stall`] or [`Relay::cut`]).
    pub fn none() -> Plan {
        Plan::default()
    }

    /// One fault.
    pub fn one(f: Fault) -> Plan {
        Plan {
            faults: vec![f],
            ..Plan::default()
        }
    }

    /// With another bound.
    pub fn bounded(mut self, bound: Duration) -> Plan {
        self.bound = bound;
        self
    }

    /// With connections from index `from` on sent to `to` (see [`Plan::divert`]).
    pub fn diverting(mut self, from: usize, to: Target) -> Plan {
        self.divert = Some((from, to));
        self
    }

    /// With the forward directions of all connections held to `bytes_per_sec` together (see
    /// [`Plan::rate`]).
    pub fn throttled(mut self, bytes_per_sec: u64) -> Plan {
        self.rate = Some(bytes_per_sec.max(1));
        self
    }

    /// Keeping every byte carried (see [`Plan::record`]).
    pub fn recording(mut self) -> Plan {
        self.record = true;
        self
    }

    /// `n` bit flips at offsets drawn from `seed` inside `range` (one bit each), sorted.
    pub fn flips(seed: u64, range: std::ops::Range<u64>, n: usize) -> Plan {
        let mut rng = crate::rng::SplitMix(seed);
        let len = range.end.saturating_sub(range.start).max(1);
        let mut faults: Vec<Fault> = (0..n)
            .map(|_| Fault::Flip {
                at: range.start + rng.next_u64() % len,
                mask: 1 << (rng.next_u64() % 8),
            })
            .collect();
        faults.sort_by_key(|f| match f {
            Fault::Flip { at, .. } => *at,
            _ => 0,
        });
        Plan {
            faults,
            ..Plan::default()
        }
    }

    /// A fault of kind `make(offset)` at an offset drawn from `seed` inside `range`.
    pub fn seeded(seed: u64, range: std::ops::Range<u64>, make: impl Fn(u64) -> Fault) -> Plan {
        let mut rng = crate::rng::SplitMix(seed);
        let len = range.end.saturating_sub(range.start).max(1);
        Plan::one(make(range.start + rng.next_u64() % len))
    }
}

/// What the relay did so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Connections accepted.
    pub connections: usize,
    /// Bytes forwarded on the first connection's stream.
    pub forwarded: u64,
    /// Bytes forwarded back (return path) on the first connection.
    pub returned: u64,
    /// Where (forward offset) a stall began, if one did.
    pub stalled_at: Option<u64>,
    /// Where (forward offset) the relay cut, if it did.
    pub cut_at: Option<u64>,
    /// The bytes flipped: (offset, byte before, byte after).
    pub flipped: Vec<(u64, u8, u8)>,
    /// Bytes the sender wrote that never went forward.
    pub held: u64,
    /// The sender ended its stream (the forward direction read end-of-file).
    pub sender_done: bool,
}

#[derive(Default)]
struct State {
    report: Report,
    /// Every connection's two sockets, for cuts.
    socks: Vec<Sock>,
    /// Each connection's two sockets by index, for [`Relay::cut_one`].
    pairs: Vec<(usize, Sock, Sock)>,
    /// Connections cut alone: their end does not take the others down.
    dropped: Vec<usize>,
    /// A stall is in force (by plan or by [`Relay::stall`]).
    stalled: bool,
    /// When the current stall began.
    stall_began: Option<Instant>,
    /// A cut was made: nothing moves again.
    cut: bool,
    /// The relay is being dropped.
    closing: bool,
    /// With [`Plan::record`]: what each connection carried, by index.
    recorded: Vec<Recorded>,
}

/// What one relayed connection carried (with [`Plan::record`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Every byte forwarded from the connecting side (the source) to the target.
    pub forward: Vec<u8>,
    /// Every byte carried back from the target to the connecting side.
    pub back: Vec<u8>,
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    plan: Plan,
    /// With [`Plan::rate`]: when the shared link is free again.
    link_free: Mutex<Option<Instant>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// With [`Plan::rate`]: books `n` bytes on the shared link and waits until they have
    /// passed at that rate.
    fn throttle(&self, n: usize) {
        let Some(rate) = self.plan.rate else {
            return;
        };
        let done = {
            let mut free = self.link_free.lock().unwrap_or_else(|p| p.into_inner());
            let start = free.map_or_else(Instant::now, |f| f.max(Instant::now()));
            let done = start + Duration::from_secs_f64(n as f64 / rate as f64);
            *free = Some(done);
            done
        };
        std::thread::sleep(done.saturating_duration_since(Instant::now()));
    }

    /// With [`Plan::record`]: appends `bytes` to what connection `index` carried.
    fn record(&self, index: usize, forward: bool, bytes: &[u8]) {
        if !self.plan.record || bytes.is_empty() {
            return;
        }
        let mut st = self.lock();
        if st.recorded.len() <= index {
            st.recorded.resize_with(index + 1, Recorded::default);
        }
        let r = &mut st.recorded[index];
        if forward {
            r.forward.extend_from_slice(bytes);
        } else {
            r.back.extend_from_slice(bytes);
        }
    }

    fn cut_locked(&self, st: &mut State) {
        if !st.cut {
            st.cut = true;
            st.report.cut_at = Some(st.report.forwarded);
        }
        st.stalled = false;
        for s in &st.socks {
            cut(s);
        }
        self.cond.notify_all();
    }

    /// Waits while a stall is in force; cuts once it has lasted [`Plan::bound`]. Returns
    /// false if the connection is cut (nothing may move).
    fn wait_unstalled(&self) -> bool {
        let mut st = self.lock();
        loop {
            if st.cut || st.closing {
                return false;
            }
            if !st.stalled {
                return true;
            }
            let began = *st.stall_began.get_or_insert_with(Instant::now);
            let left = self.plan.bound.saturating_sub(began.elapsed());
            if left.is_zero() {
                self.cut_locked(&mut st);
                return false;
            }
            st = self
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// One side of a relayed connection.
type Sock = net::Stream;

/// Shuts a socket down both ways (a cut).
fn cut(s: &Sock) {
    let _ = s.shutdown(Shutdown::Both);
}

/// Where the relay forwards to.
#[derive(Clone, Debug)]
pub enum Target {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(std::net::SocketAddr),
}

/// A misbehaving relay (see the module doc). Dropping it cuts every connection.
pub struct Relay {
    shared: Arc<Shared>,
    /// The URI a source connects to (`unix:PATH` or `tcp:127.0.0.1:PORT`).
    pub uri: String,
}

impl Relay {
    /// A relay listening on the unix socket `listen`, forwarding to `target`.
    pub fn unix(listen: &Path, target: Target, plan: Plan) -> Relay {
        let l = Listener::bind_unix(listen).expect("relay: bind");
        Self::start(l, format!("unix:{}", listen.display()), target, plan)
    }

    /// A relay listening on an ephemeral port of 127.0.0.1, forwarding to `target`.
    pub fn tcp(target: Target, plan: Plan) -> Relay {
        let l = Listener::bind_tcp(&[([127, 0, 0, 1], 0).into()]).expect("relay: bind");
        let port = l.local_port().expect("relay: address");
        Self::start(l, format!("tcp:127.0.0.1:{port}"), target, plan)
    }

    fn start(listen: Listener, uri: String, target: Target, plan: Plan) -> Relay {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            cond: Condvar::new(),
            plan,
            link_free: Mutex::new(None),
        });
        let sh = shared.clone();
        std::thread::Builder::new()
            .name("relay-accept".into())
            .spawn(move || accept_loop(listen, target, sh))
            .expect("relay thread");
        Relay { shared, uri }
    }

    /// What happened so far.
    pub fn report(&self) -> Report {
        self.shared.lock().report.clone()
    }

    /// With [`Plan::recording`]: what every connection carried so far, by the order the
    /// relay accepted them (0 is the first).
    pub fn recorded(&self) -> Vec<Recorded> {
        let st = self.shared.lock();
        let mut all = st.recorded.clone();
        all.resize_with(st.report.connections, Recorded::default);
        all
    }

    /// Stalls every connection now (see [`Fault::Stall`]).
    pub fn stall(&self) {
        let mut st = self.shared.lock();
        if !st.stalled && !st.cut {
            st.stalled = true;
            st.stall_began = Some(Instant::now());
            st.report.stalled_at = Some(st.report.forwarded);
        }
    }

    /// Ends a stall: bytes move again.
    pub fn release(&self) {
        let mut st = self.shared.lock();
        st.stalled = false;
        st.stall_began = None;
        self.shared.cond.notify_all();
    }

    /// Cuts connection `index` alone (0 is the first), both ways, as when one flow of several
    /// is dropped on the way (a multifd channel): the others carry on.
    pub fn cut_one(&self, index: usize) {
        let mut st = self.shared.lock();
        st.dropped.push(index);
        for (_, a, b) in st.pairs.iter().filter(|(i, _, _)| *i == index) {
            cut(a);
            cut(b);
        }
        self.shared.cond.notify_all();
    }

    /// Cuts every connection now.
    pub fn cut(&self) {
        let mut st = self.shared.lock();
        self.shared.cut_locked(&mut st);
    }

    /// Waits until `pred` holds for the report, or `timeout` passes (then panics with it).
    pub fn wait(&self, timeout: Duration, what: &str, pred: impl Fn(&Report) -> bool) -> Report {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if pred(&st.report) {
                return st.report.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "relay: {what} did not happen: {:?}",
                st.report
            );
            st = self
                .shared
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(50)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closing = true;
        self.shared.cut_locked(&mut st);
    }
}

fn accept_loop(listen: Listener, target: Target, sh: Arc<Shared>) {
    for index in 0.. {
        let client = listen.accept();
        let Ok(client) = client else { return };
        if sh.lock().closing {
            return;
        }
        let target = match &sh.plan.divert {
            Some((from, to)) if index >= *from => to,
            _ => &target,
        };
        let server = match target {
            Target::Unix(p) => Sock::connect_unix(p),
            Target::Tcp(a) => Sock::connect_tcp(&[*a]),
        };
        let Ok(server) = server else {
            cut(&client);
            continue;
        };
        let clones = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(c1), Ok(s1), Ok(c2), Ok(s2)) = clones else {
            return;
        };
        let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) else {
            return;
        };
        {
            let mut st = sh.lock();
            st.report.connections += 1;
            st.socks.push(c1);
            st.socks.push(s1);
            st.pairs.push((index, c3, s3));
            if st.cut {
                for s in &st.socks {
                    cut(s);
                }
            }
        }
        let back = sh.clone();
        let _ = std::thread::Builder::new()
            .name("relay-back".into())
            .spawn(move || pump_back(s2, c2, &back, index));
        let fwd = sh.clone();
        let _ = std::thread::Builder::new()
            .name("relay-forward".into())
            .spawn(move || pump_forward(client, server, &fwd, index));
    }
}

/// The return direction: copies while not stalled.
fn pump_back(mut from: Sock, mut to: Sock, sh: &Shared, index: usize) {
    let first = index == 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                // A stalled link carries no end either: the other side hears nothing until
                // the stall is released or its bound passes.
                let _ = sh.wait_unstalled();
                break;
            }
            Ok(n) => n,
        };
        if !sh.wait_unstalled() || to.write_all(&buf[..n]).is_err() {
            break;
        }
        sh.record(index, false, &buf[..n]);
        if first {
            sh.lock().report.returned += n as u64;
            sh.cond.notify_all();
        }
    }
    // The destination went away (or the cut): the source sees its side close too, as it
    // would on a direct connection — unless this connection alone was cut. Another
    // connection's end (a multifd channel the destination closed after its load) closes that
    // connection alone, towards the source: the first one may still carry the verdict.
    let mut st = sh.lock();
    if !first {
        let _ = to.shutdown(Shutdown::Write);
        return;
    }
    if !st.dropped.contains(&index) {
        sh.cut_locked(&mut st);
    }
}

/// The forward direction, with the plan's faults on the first connection.
fn pump_forward(mut from: Sock, mut to: Sock, sh: &Shared, index: usize) {
    let first = index == 0;
    let faults: Vec<Fault> = if first {
        sh.plan.faults.clone()
    } else {
        Vec::new()
    };
    let window = faults.iter().find_map(|f| match f {
        Fault::CutBeforeEnd { window } => Some(*window),
        _ => None,
    });
    // Throttled, in small chunks: the backlog stays in the sockets, not in the relay.
    let chunk_len = if sh.plan.rate.is_some() {
        16 * 1024
    } else {
        64 * 1024
    };
    let mut buf = vec![0u8; chunk_len];
    // Bytes read from the sender (the stream offset of the next byte read).
    let mut offset: u64 = 0;
    // Held back for CutBeforeEnd: bytes read but not yet sent.
    let mut held: Vec<u8> = Vec::new();
    loop {
        // The next position at which a Cut or Stall acts.
        let next_stop = faults
            .iter()
            .filter_map(|f| match f {
                Fault::Cut { at } | Fault::Stall { at } if *at >= offset => Some(*at),
                _ => None,
            })
            .min();
        if next_stop == Some(offset) {
            let act = faults
                .iter()
                .find(|f| matches!(f, Fault::Cut { at } | Fault::Stall { at } if *at == offset));
            match act {
                Some(Fault::Cut { .. }) => {
                    let mut st = sh.lock();
                    sh.cut_locked(&mut st);
                    return;
                }
                Some(Fault::Stall { .. }) => {
                    let mut st = sh.lock();
                    if !st.stalled {
                        st.stalled = true;
                        st.stall_began = Some(Instant::now());
                        st.report.stalled_at = Some(offset);
                        sh.cond.notify_all();
                    }
                }
                _ => {}
            }
        }
        if !sh.wait_unstalled() {
            return;
        }
        let want = match next_stop {
            Some(stop) if stop > offset => ((stop - offset) as usize).min(buf.len()),
            _ => buf.len(),
        };
        let n = match from.read(&mut buf[..want]) {
            Ok(0) | Err(_) => {
                // Not through a stall (see `pump_back`).
                if !sh.wait_unstalled() {
                    return;
                }
                let mut st = sh.lock();
                st.report.sender_done = true;
                if window.is_some() {
                    st.report.held += held.len() as u64;
                    sh.cut_locked(&mut st);
                } else {
                    let _ = to.shutdown(Shutdown::Write);
                }
                sh.cond.notify_all();
                return;
            }
            Ok(n) => n,
        };
        let chunk = &mut buf[..n];
        let mut flips = Vec::new();
        for f in &faults {
            if let Fault::Flip { at, mask } = *f {
                if at >= offset && at < offset + n as u64 {
                    let i = (at - offset) as usize;
                    let before = chunk[i];
                    chunk[i] ^= mask;
                    flips.push((at, before, chunk[i]));
                }
            }
        }
        offset += n as u64;
        // What goes out now.
        let out: Vec<u8> = match window {
            Some(w) => {
                held.extend_from_slice(chunk);
                let keep = (w as usize).min(held.len());
                let send = held.len() - keep;
                held.drain(..send).collect()
            }
            None => chunk.to_vec(),
        };
        sh.throttle(out.len());
        if !sh.wait_unstalled() {
            return;
        }
        if !out.is_empty() && to.write_all(&out).is_err() {
            let mut st = sh.lock();
            if !st.dropped.contains(&index) {
                sh.cut_locked(&mut st);
            }
            return;
        }
        sh.record(index, true, &out);
        if first {
            let mut st = sh.lock();
            st.report.forwarded += out.len() as u64;
            st.report.flipped.extend(flips);
            sh.cond.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// A unix echo-less sink: accepts one connection and collects what arrives, while sending
    /// `reply` back once it has read `reply_after` bytes.
    fn sink(path: &Path) -> std::thread::JoinHandle<Vec<u8>> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut all = Vec::new();
            let _ = s.read_to_end(&mut all);
            all
        })
    }

    /// A relay with `plan` from a unix socket to a [`sink`], and a client connected to it:
    /// the directory they live in, what the sink will have read, the relay, the client.
    fn through(
        plan: Plan,
    ) -> (
        tempfile::TempDir,
        std::thread::JoinHandle<Vec<u8>>,
        Relay,
        UnixStream,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t");
        let got = sink(&t);
        let relay = Relay::unix(&dir.path().join("r"), Target::Unix(t), plan);
        let c = UnixStream::connect(dir.path().join("r")).unwrap();
        (dir, got, relay, c)
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn forwards_flips_and_reports() {
        let (_dir, got, relay, mut c) =
            through(Plan::one(Fault::Flip { at: 5, mask: 0x80 }).recording());
        let sent = data(200_000);
        c.write_all(&sent).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let got = got.join().unwrap();
        let mut want = sent.clone();
        want[5] ^= 0x80;
        assert_eq!(got, want);
        let r = relay.wait(Duration::from_secs(10), "end", |r| r.sender_done);
        assert_eq!(r.flipped, vec![(5, sent[5], sent[5] ^ 0x80)]);
        assert_eq!(r.forwarded, 200_000);
        // What went on the wire, as the receiver got it.
        let rec = relay.recorded();
        assert_eq!(rec.len(), 1);
        assert_eq!(rec[0].forward, want);
        assert!(rec[0].back.is_empty());
    }

    #[test]
    fn cut_before_end_holds_back_the_tail() {
        let (_dir, got, _relay, mut c) = through(Plan::one(Fault::CutBeforeEnd { window: 1000 }));
        c.write_all(&data(100_000)).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(got.join().unwrap(), data(100_000)[..99_000].to_vec());
    }

    #[test]
    fn a_stall_blocks_the_sender_and_ends_in_a_cut_at_the_bound() {
        let (_dir, got, relay, mut c) =
            through(Plan::one(Fault::Stall { at: 4096 }).bounded(Duration::from_millis(500)));
        c.set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let started = Instant::now();
        // The buffers fill, then a write times out: the stall is real.
        let mut blocked = false;
        for _ in 0..1000 {
            if c.write_all(&[1u8; 65536]).is_err() {
                blocked = true;
                break;
            }
        }
        assert!(blocked, "the sender was never blocked");
        assert_eq!(got.join().unwrap().len(), 4096);
        let r = relay.wait(Duration::from_secs(10), "cut", |r| r.cut_at.is_some());
        assert_eq!(r.stalled_at, Some(4096));
        assert!(started.elapsed() >= Duration::from_millis(500));
    }

    #[test]
    fn a_throttled_relay_carries_no_more_than_its_rate() {
        let (_dir, got, _relay, mut c) = through(Plan::none().throttled(1 << 20));
        let started = Instant::now();
        c.write_all(&data(300_000)).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(got.join().unwrap(), data(300_000));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "300 kB at 1 MiB/s in {took:?}"
        );
    }

    #[test]
    fn seeded_plans_replay() {
        assert_eq!(
            Plan::flips(7, 100..200, 3).faults,
            Plan::flips(7, 100..200, 3).faults
        );
        for f in Plan::flips(9, 100..200, 20).faults {
            let Fault::Flip { at, mask } = f else {
                panic!()
            };
            assert!((100..200).contains(&at) && mask.count_ones() == 1);
        }
    }
}
