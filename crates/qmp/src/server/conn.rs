//! One client connection: its outgoing queue (replies wait for room, events never do), the
//! reader thread that parses and runs commands, the writer thread that drains the queue, and
//! the refusal of a client beyond the cap.

use super::*;

/// Bytes to send: a reply of one connection, or an event shared by all.
pub(super) enum Payload {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

impl Payload {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Shared(a) => a,
        }
    }
}

pub(super) struct Item {
    pub(super) payload: Payload,
    pub(super) after: Option<AfterFlush>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum QueueState {
    Open,
    /// Flush what is queued, then close.
    Closing,
    /// Closed, or the client is gone: nothing more is written.
    Dead,
}

pub(super) struct Queue {
    pub(super) items: VecDeque<Item>,
    pub(super) bytes: usize,
    pub(super) state: QueueState,
}

/// One client connection, as seen by everyone but its reader.
pub(super) struct Conn {
    pub(super) id: u64,
    /// For shutting the socket down from any thread; `None` for a connection over stdio
    /// ([`Server::serve_io`]), which has none.
    pub(super) stream: Option<Stream>,
    pub(super) queue: Mutex<Queue>,
    /// Signalled on every change to `queue`.
    pub(super) changed: Condvar,
    /// Set once the client has negotiated, after its `qmp_capabilities` reply was queued.
    pub(super) command_mode: AtomicBool,
    pub(super) max_pending: usize,
    /// The descriptors the client passed (`getfd`); its commands run with them as the
    /// current monitor's.
    pub(super) fds: Arc<crate::fds::MonitorFds>,
}

impl Conn {
    /// Queues a reply, waiting while the queue is over its limit. Returns false (and runs the
    /// reply's hook) when the connection is dead.
    pub(super) fn push_reply(&self, line: Vec<u8>, after: Option<AfterFlush>) -> bool {
        let mut q = lock(&self.queue);
        loop {
            if q.state == QueueState::Dead {
                drop(q);
                if let Some(f) = after {
                    spawn_detached(f);
                }
                return false;
            }
            if q.bytes == 0 || q.bytes + line.len() <= self.max_pending {
                q.bytes += line.len();
                q.items.push_back(Item {
                    payload: Payload::Owned(line),
                    after,
                });
                self.changed.notify_all();
                return true;
            }
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Queues an event without waiting; drops the client if it has fallen too far behind.
    pub(super) fn push_event(&self, line: &Arc<[u8]>) {
        let mut q = lock(&self.queue);
        if q.state != QueueState::Open {
            return;
        }
        if q.bytes > 0 && q.bytes + line.len() > self.max_pending {
            q.state = QueueState::Dead;
            self.changed.notify_all();
            drop(q);
            self.shutdown();
            return;
        }
        q.bytes += line.len();
        q.items.push_back(Item {
            payload: Payload::Shared(line.clone()),
            after: None,
        });
        self.changed.notify_all();
    }

    /// Shuts the socket down, so both threads see the end of the connection.
    fn shutdown(&self) {
        if let Some(s) = &self.stream {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Asks the writer to flush and close.
    pub(super) fn begin_close(&self) {
        let mut q = lock(&self.queue);
        if q.state == QueueState::Open {
            q.state = QueueState::Closing;
        }
        self.changed.notify_all();
    }

    /// Closes at once, dropping whatever is queued.
    pub(super) fn kill(&self) {
        let mut q = lock(&self.queue);
        q.state = QueueState::Dead;
        self.changed.notify_all();
        drop(q);
        self.shutdown();
    }

    /// The next item to write, or `None` when the writer should stop.
    pub(super) fn next_item(&self) -> Option<Item> {
        let mut q = lock(&self.queue);
        loop {
            if q.state == QueueState::Dead {
                return None;
            }
            if let Some(item) = q.items.pop_front() {
                q.bytes = q.bytes.saturating_sub(item.payload.bytes().len());
                self.changed.notify_all();
                return Some(item);
            }
            if q.state == QueueState::Closing {
                return None;
            }
            q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Tells a client beyond [`ServerConfig::max_clients`] why it gets no greeting, without
/// waiting for it (a short write bound on the accept thread), and closes it.
pub(super) fn refuse(stream: &Stream, max: usize) {
    let line = to_line(&json!({"error": {
        "class": "GenericError",
        "desc": format!("Too many monitor clients: at most {max} are served at once"),
    }}));
    let mut s = match stream.try_clone() {
        Ok(s) => s,
        Err(_) => return,
    };
    let _ = s.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = s.write_all(&line).and_then(|()| s.flush());
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads the client's input and answers it, until EOF or error. On a socket that ends the
/// connection; on stdio (`socket` is `None`) only the reading ends: as QEMU 7.2's stdio
/// chardev at the end of stdin, the monitor keeps its mode and the events keep coming.
pub(super) fn reader_loop(
    conn: Arc<Conn>,
    mut input: impl Read,
    mut session: Session,
    limits: Limits,
) {
    let mut parser = JsonStream::new(limits);
    let mut buf = vec![0u8; 64 << 10];
    'read: loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        for parsed in parser.feed(buf.get(..n).unwrap_or_default()) {
            let out = crate::fds::with_monitor(&conn.fds, || session.handle(parsed));
            let alive = conn.push_reply(out.line, out.after);
            if session.mode() != Mode::Negotiation {
                // After the reply is queued, so no event can precede it.
                conn.command_mode.store(true, Ordering::Release);
            }
            if !alive {
                break 'read;
            }
        }
    }
    // What the client sent last without finishing it is dropped, as QEMU does on close.
    if conn.stream.is_some() {
        conn.begin_close();
    }
}

/// Writes the connection's queue to the socket until the connection closes.
pub(super) fn writer_loop(conn: Arc<Conn>, mut out: impl Write, hub: Arc<Hub>) {
    while let Some(item) = conn.next_item() {
        let written = out
            .write_all(item.payload.bytes())
            .and_then(|()| out.flush());
        if let Some(f) = item.after {
            spawn_detached(f);
        }
        if written.is_err() {
            break;
        }
    }
    let leftovers = {
        let mut q = lock(&conn.queue);
        q.state = QueueState::Dead;
        q.bytes = 0;
        conn.changed.notify_all();
        std::mem::take(&mut q.items)
    };
    for item in leftovers {
        if let Some(f) = item.after {
            spawn_detached(f);
        }
    }
    conn.shutdown();
    hub.remove(conn.id);
}
