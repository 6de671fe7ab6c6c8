//! Events: the set of live connections ([`Hub`]) and the [`EventSink`] that queues an event
//! on every negotiated one without waiting for any.

use super::*;

/// The set of live connections, shared by the server and its event sinks.
pub(super) struct Hub {
    pub(super) conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// Signalled when a connection goes away.
    pub(super) removed: Condvar,
    pub(super) next_id: AtomicU64,
}

impl Hub {
    pub(super) fn remove(&self, id: u64) {
        lock(&self.conns).remove(&id);
        self.removed.notify_all();
    }
}

/// A handle for emitting QMP events to every client in command mode. Cheap to clone; usable
/// from any thread; never blocks on a client.
#[derive(Clone)]
pub struct EventSink {
    pub(super) hub: Arc<Hub>,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink")
            .field("subscribers", &self.subscribers())
            .finish()
    }
}

/// Host time as QMP reports it: seconds and microseconds since the Unix epoch, or -1 and -1
/// when the clock is before the epoch.
pub(super) fn timestamp() -> Value {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()}),
        Err(_) => json!({"seconds": -1, "microseconds": -1}),
    }
}

impl EventSink {
    /// Sends event `name` with optional `data`, stamped with the current time, to every
    /// connection that has completed capabilities negotiation. Events from one thread reach
    /// every client in the order they were emitted.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let mut event = serde_json::Map::new();
        event.insert("timestamp".into(), timestamp());
        event.insert("event".into(), Value::String(name.to_string()));
        if let Some(data) = data {
            event.insert("data".into(), data);
        }
        let line: Arc<[u8]> = to_line(&Value::Object(event)).into();
        // Holding the registry lock across the (non-blocking) pushes gives every client the
        // same order when several threads emit at once.
        let conns = lock(&self.hub.conns);
        for conn in conns.values() {
            if conn.command_mode.load(Ordering::Acquire) {
                conn.push_event(&line);
            }
        }
    }

    /// How many connections would receive an event now.
    pub fn subscribers(&self) -> usize {
        lock(&self.hub.conns)
            .values()
            .filter(|c| c.command_mode.load(Ordering::Acquire))
            .count()
    }
}
