//! File descriptors passed to a monitor, as QEMU 7.2's: a client sends descriptors beside its
//! bytes (`SCM_RIGHTS` on a unix socket), `getfd` names the one that came last, `closefd`
//! closes a named one, and commands that take a descriptor by name (`migrate fd:NAME`) take it
//! from the monitor that runs them — QEMU's `monitor_cur()`, here the connection whose reader
//! thread runs the command ([`current`]).

use crate::{Args, CommandSet, QmpError, Reply};
use serde_json::json;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// The descriptors of one monitor connection.
#[derive(Debug, Default)]
pub struct MonitorFds {
    /// The batch that came with the last read that carried any (QEMU keeps only that one).
    received: Mutex<Vec<OwnedFd>>,
    /// Named by `getfd`.
    named: Mutex<BTreeMap<String, OwnedFd>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MonitorFds {
    /// Keeps a batch of received descriptors in place of the previous one, which is closed.
    fn receive(&self, fds: Vec<OwnedFd>) {
        if !fds.is_empty() {
            *lock(&self.received) = fds;
        }
    }

    /// The first descriptor of the last batch; the rest of the batch is closed (QEMU's
    /// `qemu_chr_fe_get_msgfd`).
    fn take_received(&self) -> Option<OwnedFd> {
        let mut batch = std::mem::take(&mut *lock(&self.received));
        if batch.is_empty() {
            None
        } else {
            Some(batch.swap_remove(0))
        }
    }

    /// `getfd`: names the descriptor that came last.
    pub fn getfd(&self, name: &str) -> Result<(), QmpError> {
        let fd = self
            .take_received()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        // A name given again replaces (and closes) the descriptor it named.
        lock(&self.named).insert(name.to_string(), fd);
        Ok(())
    }

    /// `closefd`.
    pub fn closefd(&self, name: &str) -> Result<(), QmpError> {
        lock(&self.named)
            .remove(name)
            .map(drop)
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }

    /// Takes the descriptor called `name` out of the monitor (QEMU's `monitor_get_fd`).
    pub fn take(&self, name: &str) -> Result<OwnedFd, String> {
        lock(&self.named)
            .remove(name)
            .ok_or_else(|| format!("File descriptor named '{name}' has not been found"))
    }
}

thread_local! {
    static CURRENT: RefCell<Option<Arc<MonitorFds>>> = const { RefCell::new(None) };
}

/// Runs `f` with `fds` as the current monitor's descriptors (the reader thread of a
/// connection does, around each command).
pub fn with_monitor<R>(fds: &Arc<MonitorFds>, f: impl FnOnce() -> R) -> R {
    let previous = CURRENT.with(|c| c.replace(Some(fds.clone())));
    let r = f();
    CURRENT.with(|c| *c.borrow_mut() = previous);
    r
}

/// The descriptors of the monitor running the current command; `None` outside a command
/// (the command line, a migration thread).
pub fn current() -> Option<Arc<MonitorFds>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Reads a unix socket as `read` does, and keeps the descriptors that come with the bytes in
/// a connection's [`MonitorFds`].
pub(crate) struct FdReader {
    socket: UnixStream,
    fds: Arc<MonitorFds>,
}

impl FdReader {
    pub(crate) fn new(socket: UnixStream, fds: Arc<MonitorFds>) -> FdReader {
        FdReader { socket, fds }
    }
}

impl Read for FdReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (n, fds) = net::fdpass::recv_with_fds(&self.socket, buf)?;
        self.fds.receive(fds);
        Ok(n)
    }
}

/// `getfd` and `closefd`, on the descriptors of the monitor that runs them.
#[derive(Debug, Default)]
pub struct FdCommands;

impl CommandSet for FdCommands {
    fn commands(&self) -> &[&'static str] {
        &["getfd", "closefd"]
    }

    fn dispatch(&self, name: &str, mut a: Args) -> Result<Reply, QmpError> {
        let fdname = a.req_str("fdname")?;
        a.finish()?;
        // Every connection has its descriptors; a command run outside one has none.
        let fds = current().unwrap_or_default();
        if name == "getfd" {
            fds.getfd(&fdname)?;
        } else {
            fds.closefd(&fdname)?;
        }
        Ok(Reply::new(json!({})))
    }
}
