//! A blocking QMP client: connect, negotiate, run commands, collect the events that arrive
//! in between. The one client of the tree — `livemig demo`/`bench` drive their two VMs with
//! it, and the tests (through `testkit`) drive livemig and QEMU with it.

use net::{Address, Stream};
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Why a command did not return a value.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection failed or closed, or a message was not JSON.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server answered with an error (or with something that is no reply).
    #[error("{cmd}: {desc}")]
    Command {
        /// The command.
        cmd: String,
        /// The error's `class` (empty for a malformed reply).
        class: String,
        /// The error's `desc`.
        desc: String,
    },
}

impl From<ClientError> for String {
    fn from(e: ClientError) -> String {
        e.to_string()
    }
}

/// How long [`Client::connect_to`] waits for the greeting and the negotiation on one
/// connection before it connects again.
pub const GREETING_WAIT: Duration = Duration::from_secs(5);

/// How long [`Client::connect_to`] waits before connecting again to a server that closed the
/// connection during negotiation.
const CLOSED_RETRY: Duration = Duration::from_millis(50);

/// A negotiated QMP connection.
pub struct Client {
    reader: BufReader<Stream>,
    writer: Stream,
    /// How long one read may wait outside [`Client::wait_event`] (`None`: for ever).
    read_timeout: Option<Duration>,
    /// Events received while waiting for replies, not yet taken by [`Client::wait_event`].
    pub events: Vec<Value>,
    /// The greeting the server sent.
    pub greeting: Value,
}

impl Client {
    /// Connects to a unix socket; see [`Client::connect_to`].
    pub fn connect(path: &Path, timeout: Duration) -> io::Result<Client> {
        Client::connect_to(&Address::Unix(path.to_path_buf()), timeout)
    }

    /// Connects, retrying until `timeout` while the server creates its socket, reads the
    /// greeting and negotiates capabilities.
    ///
    /// QEMU 7.2 can open its monitor twice for a client that connects while QEMU starts up
    /// under load: a second greeting arrives (where the `qmp_capabilities` reply was
    /// expected), and that second opening puts the monitor back into negotiation. Replies
    /// skip repeated greetings, and a probe (`query-version`) shows whether negotiation held;
    /// if not, it is negotiated again (three tries).
    ///
    /// A server that accepted the connection but says nothing for [`GREETING_WAIT`] (QEMU
    /// under load was seen holding a connection silent) is left, and connected to again,
    /// until `timeout` has passed. So is one that closes the connection before negotiation
    /// is done (QEMU 7.2 under load was seen closing the connection made after such a
    /// silent one): no command has run on it, so connecting again repeats nothing.
    pub fn connect_to(addr: &Address, timeout: Duration) -> io::Result<Client> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match Client::connect_once(addr, left.max(Duration::from_millis(1))) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) && Instant::now() < deadline => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                    ) && Instant::now() + CLOSED_RETRY < deadline =>
                {
                    std::thread::sleep(CLOSED_RETRY);
                }
                r => return r,
            }
        }
    }

    fn connect_once(addr: &Address, timeout: Duration) -> io::Result<Client> {
        let stream = addr.connect_retry(timeout)?;
        stream.set_read_timeout(Some(GREETING_WAIT.min(timeout)))?;
        let writer = stream.try_clone()?;
        let mut c = Client {
            reader: BufReader::new(stream),
            writer,
            read_timeout: None,
            events: Vec::new(),
            greeting: Value::Null,
        };
        c.greeting = c.read_message()?;
        let mut last = Value::Null;
        for _ in 0..3 {
            let r = c.execute("qmp_capabilities", json!({}))?;
            let already = r
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .is_some_and(|d| d.starts_with("Capabilities negotiation is already complete"));
            if r.get("return").is_none() && !already {
                return Err(io::Error::other(format!("qmp_capabilities failed: {r}")));
            }
            let probe = c.execute("query-version", json!({}))?;
            if probe.get("return").is_some() {
                c.set_read_timeout(None)?;
                return Ok(c);
            }
            last = probe;
        }
        Err(io::Error::other(format!(
            "QMP negotiation does not hold: {last}"
        )))
    }

    /// Bounds how long one read may wait for the server (`None`: for ever, the default); a
    /// server that stops answering then fails the command with `WouldBlock`.
    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(t)?;
        self.read_timeout = t;
        Ok(())
    }

    fn read_message(&mut self) -> io::Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the QMP connection closed",
                ));
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(line.trim()).map_err(io::Error::other);
            }
        }
    }

    /// Sends a command (without `arguments` when `args` is an empty object) and returns the
    /// whole reply (`{"return": ..}` or `{"error": ..}`), queueing events that arrive before
    /// it.
    pub fn execute(&mut self, cmd: &str, args: Value) -> io::Result<Value> {
        self.execute_with(cmd, args, None)
    }

    /// [`Client::execute`] with `fd` passed beside the command (`SCM_RIGHTS`), as for
    /// `getfd`: only over a unix socket.
    pub fn execute_with_fd(
        &mut self,
        cmd: &str,
        args: Value,
        fd: std::os::fd::BorrowedFd<'_>,
    ) -> io::Result<Value> {
        self.execute_with(cmd, args, Some(fd))
    }

    fn execute_with(
        &mut self,
        cmd: &str,
        args: Value,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> io::Result<Value> {
        let msg = if args.as_object().is_some_and(|o| o.is_empty()) {
            json!({ "execute": cmd })
        } else {
            json!({ "execute": cmd, "arguments": args })
        };
        let mut text = msg.to_string();
        text.push('\n');
        match (fd, &self.writer) {
            (None, _) => self.writer.write_all(text.as_bytes())?,
            (Some(fd), Stream::Unix(u)) => {
                // The descriptor goes with the first byte; the rest follows as usual.
                let n = net::fdpass::send_with_fd(u, text.as_bytes(), fd)?;
                self.writer
                    .write_all(text.as_bytes().get(n..).unwrap_or_default())?;
            }
            (Some(_), Stream::Tcp(_)) => {
                return Err(io::Error::other("descriptors pass over unix sockets only"))
            }
        }
        loop {
            let m = self.read_message()?;
            if m.get("event").is_some() {
                self.events.push(m);
            } else if m.get("QMP").is_none() {
                // (A repeated greeting is no reply; see `connect_to`.)
                return Ok(m);
            }
        }
    }

    /// Runs a command: its `return` value, or its error as [`ClientError::Command`].
    pub fn call(&mut self, cmd: &str, args: Value) -> Result<Value, ClientError> {
        let mut r = self.execute(cmd, args)?;
        if let Some(v) = r.get_mut("return") {
            return Ok(v.take());
        }
        let text = |p: &str| {
            r.pointer(p)
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_default()
        };
        let desc = match text("/error/desc") {
            d if d.is_empty() => "malformed reply".to_string(),
            d => d,
        };
        Err(ClientError::Command {
            cmd: cmd.to_string(),
            class: text("/error/class"),
            desc,
        })
    }

    /// Waits up to `timeout` for an event for which `pred` holds and takes it (earlier
    /// events stay queued); `None` when none came.
    pub fn wait_event(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(i) = self.events.iter().position(&pred) {
            return Some(self.events.remove(i));
        }
        let deadline = Instant::now() + timeout;
        let mut found = None;
        while Instant::now() < deadline {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            if self.reader.get_ref().set_read_timeout(Some(left)).is_err() {
                break;
            }
            match self.read_message() {
                Ok(m) if m.get("event").is_some() && pred(&m) => {
                    found = Some(m);
                    break;
                }
                Ok(m) => self.events.push(m),
                Err(_) => break,
            }
        }
        let _ = self.reader.get_ref().set_read_timeout(self.read_timeout);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};
    use std::os::unix::net::UnixListener;

    /// Greets `s` and answers every command on it until it closes.
    fn serve(s: std::os::unix::net::UnixStream) {
        let mut w = s.try_clone().unwrap();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
            .unwrap();
        for line in std::io::BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            let id = serde_json::from_str::<Value>(&line).unwrap();
            let reply = match id["execute"].as_str() {
                Some("query-version") => "{\"return\": {\"qemu\": {}}}\r\n",
                _ => "{\"return\": {}}\r\n",
            };
            w.write_all(reply.as_bytes()).unwrap();
        }
    }

    /// A server that holds its first client silent and answers the second: the client leaves
    /// the silent connection after [`GREETING_WAIT`] and negotiates on a new one.
    #[test]
    fn a_server_silent_after_accepting_is_connected_to_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (silent, _) = l.accept().unwrap();
            let (s, _) = l.accept().unwrap();
            serve(s);
            drop(silent);
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Client::connect(&p, Duration::from_secs(30)).map(|_| ()));
        });
        let t0 = Instant::now();
        let r = rx
            .recv_timeout(GREETING_WAIT * 3)
            .expect("connect_to still waits on the silent connection");
        assert!(r.is_ok(), "{r:?}");
        assert!(t0.elapsed() >= GREETING_WAIT, "{:?}", t0.elapsed());
        drop(server);
    }

    /// A server that closes its first client before the greeting and answers the second: the
    /// client connects again instead of failing with "the QMP connection closed".
    #[test]
    fn a_server_closing_before_the_greeting_is_connected_to_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            drop(l.accept().unwrap());
            let (s, _) = l.accept().unwrap();
            serve(s);
        });
        let c = Client::connect(&path, Duration::from_secs(10));
        assert!(c.is_ok(), "{:?}", c.err());
        drop(c);
        server.join().unwrap();
    }
}
