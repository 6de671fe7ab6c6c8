//! Fault injection for the hand-over tests (`fault_matrix.rs`): a proxy between source and
//! destination that can cut the connection or stall the stream at the switchover, a hanging
//! listener owned by another process (so "killing the destination" also exists while the
//! source is still connecting), and what a user checks on a qcow2 image with QEMU's tools.
//!
//! The proxy parses the migration stream with the `wire` crate instead of counting bytes, so
//! "stall at the switchover" means exactly "forward everything before the `ram` END section
//! and nothing after it", whatever the number of precopy rounds: the source then sits in
//! `device` with its disks inactivated — waiting for the destination's `SHUT` if the proxy
//! keeps reading ([`Stall::Hold`]), or blocked in a write if it stops ([`Stall::Block`]) and
//! what is left does not fit the socket buffers.
//!
//! Connections after the first (a multifd source's channels) are forwarded as they are, in the
//! order they come: each is connected to the destination before the next is accepted, so the
//! destination sees the main channel first, as it requires. [`Proxy::cut_one`] cuts one of
//! them alone.

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use wire::ram::{read_mem_blocks, read_ram_record, MemBlockFields, RamRecord};
use wire::section::{read_file_header, read_footer};
use wire::{read_item, Item, SectionKind, StreamReader};

/// What the proxy has done so far.
#[derive(Default)]
struct ProxyState {
    /// Every connection's two sides (source side, destination side), for [`Proxy::cut`].
    conns: Vec<UnixStream>,
    /// The same, by connection index (0 is the first), for [`Proxy::cut_one`].
    pairs: Vec<(UnixStream, UnixStream)>,
    /// Stream offset of the `ram` END section, once forwarding stopped there.
    stalled_at: Option<u64>,
    /// Bytes received from the source after the stall and held back.
    held: u64,
    /// Why the stream could not be followed (the stall then never happens).
    error: Option<String>,
    /// A cut was asked for (perhaps before the connections were made).
    cut: bool,
    /// With [`Stall::Hold`]: the source ended its stream (it sent everything).
    source_done: bool,
}

struct ProxyShared {
    state: Mutex<ProxyState>,
    cond: Condvar,
}

impl ProxyShared {
    /// Connects connection `index` from the source to `target` and starts forwarding it: the
    /// first as `stall` says, the others as they are.
    fn connect(
        self: &Arc<Self>,
        index: usize,
        src: UnixStream,
        target: &Path,
        stall: Stall,
    ) -> Result<(), String> {
        let dst = match UnixStream::connect(target) {
            Ok(d) => d,
            Err(e) => {
                let _ = src.shutdown(Shutdown::Both);
                return Err(format!("cannot reach the destination: {e}"));
            }
        };
        self.register(&src, &dst)?;
        let clone = |s: &UnixStream| s.try_clone().map_err(|e| format!("clone: {e}"));
        let (back_from, back_to) = (clone(&dst)?, clone(&src)?);
        let down = self.clone();
        std::thread::spawn(move || {
            let (mut from, mut to) = (back_from, back_to);
            let _ = std::io::copy(&mut from, &mut to);
            if index == 0 {
                // The destination went away: the source sees it as on a direct connection.
                down.cut();
            } else {
                // A channel the destination closed: that connection alone.
                let _ = to.shutdown(Shutdown::Write);
            }
        });
        let sh = self.clone();
        std::thread::spawn(move || {
            if index == 0 && stall != Stall::No {
                forward_until_ram_end(src, dst, &sh, stall);
                return;
            }
            let (mut from, mut to) = (src, dst);
            match std::io::copy(&mut from, &mut to) {
                Ok(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                }
                Err(_) if index == 0 => sh.cut(),
                Err(_) => {
                    let _ = to.shutdown(Shutdown::Both);
                }
            }
        });
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, ProxyState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shuts both connections down in both directions, as when the network between the two
    /// hosts goes away: the source's writes fail and its return path reads end-of-stream.
    fn cut(&self) {
        let mut st = self.lock();
        st.cut = true;
        for c in &st.conns {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Keeps a connection's two sides for [`Self::cut`] and [`Proxy::cut_one`], cutting them
    /// at once if a cut was asked for while they were being made.
    fn register(&self, src: &UnixStream, dst: &UnixStream) -> Result<(), String> {
        let clone = |s: &UnixStream| s.try_clone().map_err(|e| format!("clone: {e}"));
        let mut st = self.lock();
        st.conns.push(clone(src)?);
        st.conns.push(clone(dst)?);
        st.pairs.push((clone(src)?, clone(dst)?));
        if st.cut {
            for c in &st.conns {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        Ok(())
    }

    fn fail(&self, why: String) {
        let mut st = self.lock();
        st.error.get_or_insert(why);
        self.cond.notify_all();
    }
}

/// Whether and how the proxy stops the stream at the `ram` END section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stall {
    /// Forward everything.
    No,
    /// Keep reading from the source but pass nothing on (not even the end of the stream).
    Hold,
    /// Stop reading from the source altogether.
    Block,
}

/// A proxy on a unix socket forwarding one migration connection to the destination's socket,
/// both ways (stream and return path). If the destination side closes (the destination died),
/// the proxy closes the source side too, as the kernel would on a direct connection.
pub struct Proxy {
    shared: Arc<ProxyShared>,
}

impl Proxy {
    /// Listens on `listen`; the first connection is forwarded to `target`, stalling as
    /// `stall` says (see the module doc), and every later one as it is.
    pub fn start(listen: &Path, target: &Path, stall: Stall) -> Proxy {
        let listener = UnixListener::bind(listen).expect("proxy bind");
        let shared = Arc::new(ProxyShared {
            state: Mutex::new(ProxyState::default()),
            cond: Condvar::new(),
        });
        let sh = shared.clone();
        let target = target.to_path_buf();
        std::thread::spawn(move || {
            for index in 0.. {
                let Ok((src, _)) = listener.accept() else {
                    return sh.fail("accept failed".into());
                };
                if let Err(e) = sh.connect(index, src, &target, stall) {
                    return sh.fail(e);
                }
            }
        });
        Proxy { shared }
    }

    /// Cuts connection `index` alone (0 is the first), both ways.
    pub fn cut_one(&self, index: usize) {
        let st = self.shared.lock();
        if let Some((a, b)) = st.pairs.get(index) {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Waits until `n` connections have been made.
    pub fn wait_connections(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.shared.lock().pairs.len() < n {
            assert!(Instant::now() < deadline, "fewer than {n} connections came");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (`timeout` at most, else fails saying `what` did not happen) until `ready` finds
    /// what it waits for in the proxy's state.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut ready: impl FnMut(&ProxyState) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            if let Some(v) = ready(&st) {
                return v;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "{what}");
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until the stream stopped at the `ram` END section; returns its offset.
    pub fn wait_stalled(&self, timeout: Duration) -> u64 {
        self.wait_for(timeout, "the stream never reached the switchover", |st| {
            if st.stalled_at.is_none() {
                if let Some(e) = &st.error {
                    panic!("the proxy could not follow the stream: {e}");
                }
            }
            st.stalled_at
        })
    }

    /// With [`Stall::Hold`]: waits until the source has sent its whole stream (and closed its
    /// side), so it now waits for the destination's verdict.
    pub fn wait_source_done(&self, timeout: Duration) {
        self.wait_for(timeout, "the source did not finish its stream", |st| {
            st.source_done.then_some(())
        })
    }

    /// Bytes the source sent after the stall, held back.
    pub fn held(&self) -> u64 {
        self.shared.lock().held
    }

    /// Cuts the connection (see [`ProxyShared::cut`]).
    pub fn cut(&self) {
        self.shared.cut();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.cut();
    }
}

/// Everything read from the source, from `start` on, until it is forwarded.
struct Tee {
    inner: UnixStream,
    log: Vec<u8>,
    start: u64,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.log.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

/// Sends the bytes the parser has consumed, up to stream offset `upto`.
fn forward(r: &mut StreamReader<Tee>, dst: &mut UnixStream, upto: u64) -> Result<(), String> {
    let tee = r.get_mut();
    let n = (upto - tee.start) as usize;
    dst.write_all(&tee.log[..n])
        .map_err(|e| format!("forwarding: {e}"))?;
    tee.log.drain(..n);
    tee.start = upto;
    Ok(())
}

/// Follows the precopy part of the stream item by item, forwarding each once it is whole,
/// and returns the offset of the `ram` END section without forwarding it.
fn follow_precopy(r: &mut StreamReader<Tee>, dst: &mut UnixStream) -> Result<u64, String> {
    let e = |e: wire::WireError| e.to_string();
    read_file_header(r).map_err(e)?;
    wire::config::read_configuration(r).map_err(e)?;
    let mut idstrs: HashMap<u32, String> = HashMap::new();
    loop {
        let upto = r.offset();
        forward(r, dst, upto)?;
        let at = r.offset();
        let header = match read_item(r).map_err(e)? {
            Item::Command(_) => continue,
            Item::Eof => return Err("EOF before the switchover".into()),
            Item::Section(h) => h,
        };
        if let Some(s) = header.start() {
            idstrs.insert(s.section_id, s.idstr.clone());
        }
        let id = header.section_id();
        let idstr = idstrs.get(&id).cloned().unwrap_or_default();
        match (idstr.as_str(), header.kind()) {
            ("ram", SectionKind::End) => return Ok(at),
            ("ram", SectionKind::Start | SectionKind::Part) => loop {
                match read_ram_record(r).map_err(e)? {
                    RamRecord::Eos => break,
                    RamRecord::MemSize { total } => {
                        read_mem_blocks(r, total, |_| MemBlockFields::default()).map_err(e)?;
                    }
                    rec => r.skip(rec.payload_len()).map_err(e)?,
                }
            },
            ("dirty-bitmap", SectionKind::Start | SectionKind::Part) => {
                while !wire::bitmap::read_chunk(r).map_err(e)?.eos {}
            }
            (other, kind) => {
                return Err(format!(
                    "{} section {other:?} (id {id}) before the switchover",
                    kind.name()
                ))
            }
        }
        read_footer(r, id).map_err(e)?;
    }
}

fn forward_until_ram_end(src: UnixStream, mut dst: UnixStream, sh: &ProxyShared, stall: Stall) {
    let mut r = StreamReader::new(Tee {
        inner: src,
        log: Vec::new(),
        start: 0,
    });
    match follow_precopy(&mut r, &mut dst) {
        Ok(at) => {
            {
                let mut st = sh.lock();
                st.stalled_at = Some(at);
                st.held = r.get_ref().log.len() as u64;
                sh.cond.notify_all();
            }
            let mut src = r.into_parts().0.inner;
            if stall == Stall::Block {
                // Read nothing more: the source's writes fill the buffers. (The connection
                // stays open: [`ProxyState::conns`] holds it.)
                return;
            }
            // Keep reading so the source is never blocked in a write, but pass nothing on —
            // not even the end of the stream.
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = src.read(&mut buf) {
                if n == 0 {
                    let mut st = sh.lock();
                    st.source_done = true;
                    sh.cond.notify_all();
                    break;
                }
                sh.lock().held += n as u64;
            }
        }
        Err(why) => {
            sh.fail(why);
            sh.cut();
        }
    }
}

/// A relay for postcopy's faults: every connection made to it (main channel, preempt
/// channel, a recovery's) is forwarded byte for byte to the destination, and [`Relay::cut`]
/// breaks them all at once, as a network outage would (both ends see their channels fail;
/// new connections still go through).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub struct Relay {
    conns: Arc<Mutex<Vec<UnixStream>>>,
}

#[allow(dead_code)]
impl Relay {
    /// Listens on `listen` and forwards to `target`.
    pub fn start(listen: &Path, target: &Path) -> Relay {
        let listener = UnixListener::bind(listen).expect("relay bind");
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let c = conns.clone();
        let target = target.to_path_buf();
        std::thread::spawn(move || {
            for src in listener.incoming() {
                let Ok(src) = src else { return };
                let Ok(dst) = UnixStream::connect(&target) else {
                    let _ = src.shutdown(Shutdown::Both);
                    continue;
                };
                let (Ok(s1), Ok(d1), Ok(s2), Ok(d2)) = (
                    src.try_clone(),
                    dst.try_clone(),
                    src.try_clone(),
                    dst.try_clone(),
                ) else {
                    continue;
                };
                c.lock().unwrap_or_else(|p| p.into_inner()).extend([s1, d1]);
                for (mut from, mut to) in [(src, dst), (d2, s2)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(Shutdown::Write);
                    });
                }
            }
        });
        Relay { conns }
    }

    /// Breaks every connection made so far.
    pub fn cut(&self) {
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// A unix listener that never accepts, owned by a separate process (python3), with its
/// backlog of zero filled: a connect to it hangs until the process dies, and then fails
/// with "Connection refused" — a destination killed while the source is still connecting.
pub struct ForeignListener {
    child: Child,
}

const LISTENER_PY: &str = "import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(0)
f = socket.socket(socket.AF_UNIX)
f.connect(sys.argv[1])
print('ready', flush=True)
time.sleep(600)
";

impl ForeignListener {
    /// Starts the process and waits until the listener is in place.
    pub fn start(path: &Path) -> ForeignListener {
        let mut child = Command::new("python3")
            .args(["-c", LISTENER_PY])
            .arg(path)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        let out = child.stdout.take().expect("stdout");
        BufReader::new(out).read_line(&mut line).expect("listener");
        assert_eq!(line.trim(), "ready", "the listener did not start");
        ForeignListener { child }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ForeignListener {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `qemu-img ARGS`; (success, stdout + stderr).
pub fn qemu_img(args: &[&str]) -> (bool, String) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// Creates a qcow2 image of `size` bytes with the persistent bitmaps `bitmaps` (name,
/// granularity), enabled, as `qemu-img bitmap --add` makes them.
pub fn create_qcow2(path: &Path, size: u64, bitmaps: &[(&str, u32)]) {
    let p = path.to_str().expect("path");
    let (ok, out) = qemu_img(&["create", "-q", "-f", "qcow2", p, &size.to_string()]);
    assert!(ok, "{out}");
    for (name, g) in bitmaps {
        let (ok, out) = qemu_img(&["bitmap", "--add", "-g", &g.to_string(), p, name]);
        assert!(ok, "{out}");
    }
}

/// `-blockdev` options opening `path` as the qcow2 node `d0`.
pub fn qcow2_blockdev(path: &Path) -> String {
    format!(
        "driver=qcow2,node-name=d0,file.driver=file,file.filename={}",
        path.display()
    )
}

/// The bitmaps of a closed image as `qemu-img info` shows them: `[{"flags", "name",
/// "granularity"}]`, sorted by name.
pub fn image_bitmaps(path: &Path) -> Vec<Value> {
    let (ok, out) = qemu_img(&["info", "--output=json", path.to_str().expect("path")]);
    assert!(ok, "qemu-img info {}: {out}", path.display());
    let v: Value = serde_json::from_str(&out).expect("qemu-img info JSON");
    let mut list = v
        .pointer("/format-specific/data/bitmaps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    list.sort_by_key(|b| b["name"].as_str().unwrap_or_default().to_string());
    list
}

/// `qemu-img check` finds nothing wrong with the image.
pub fn assert_image_clean(path: &Path) {
    let (ok, out) = qemu_img(&["check", path.to_str().expect("path")]);
    assert!(
        ok && out.contains("No errors were found on the image."),
        "qemu-img check {}: {out}",
        path.display()
    );
}

/// `qemu-io -r` runs each `read -P` command on the closed image and every one matches.
pub fn assert_image_reads(path: &Path, reads: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-r", "-f", "qcow2"]);
    for r in reads {
        cmd.args(["-c", r]);
    }
    let o = cmd.arg(path).output().expect("qemu-io");
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success()
            && !out.contains("failed")
            && out.matches("read ").count() == reads.len(),
        "qemu-io {reads:?} on {}: {out}",
        path.display()
    );
}

/// Another process has the image open for writing: QEMU's `qemu-img info` is refused the
/// shared lock (the source holds its image's write lock again after a failed hand-over).
pub fn assert_image_locked(path: &Path) {
    let (ok, out) = qemu_img(&["info", path.to_str().expect("path")]);
    assert!(
        !ok && out.contains("Failed to get shared \"write\" lock"),
        "{} is not write-locked: {out}",
        path.display()
    );
}

/// The system call a thread of process `pid` named `thread` (`comm`) is in, from
/// `/proc/PID/task/TID/syscall`: its number, or `None` if it is running or not found.
pub fn thread_syscall(pid: u32, thread: &str) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != thread {
            continue;
        }
        let sc = std::fs::read_to_string(t.path().join("syscall")).ok()?;
        return sc.split_whitespace().next()?.parse().ok();
    }
    None
}

/// x86-64 numbers of the system calls a socket write blocks in.
pub const WRITE_SYSCALLS: &[u64] = &[1, 20, 44, 46];
