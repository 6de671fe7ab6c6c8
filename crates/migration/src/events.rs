//! Where the engine reports what happens: QMP events such as `MIGRATION`, `MIGRATION_PASS`,
//! `STOP` and `RESUME`. The embedder decides how they reach clients (the livemig binary
//! forwards them to every QMP connection).

use serde_json::Value;
use std::sync::Mutex;

/// Receives events. Implementations must not block for long: the migration thread emits
/// events on its way through state changes.
pub trait EventSink: Send + Sync {
    /// Emits event `name` with optional `data`; the sink adds the timestamp.
    fn emit(&self, name: &str, data: Option<Value>);
}

/// Drops every event.
pub struct NoEvents;

impl EventSink for NoEvents {
    fn emit(&self, _name: &str, _data: Option<Value>) {}
}

/// Keeps every event in memory, for tests and for embedders that poll.
#[derive(Default)]
pub struct RecordedEvents {
    events: Mutex<Vec<(String, Option<Value>)>>,
}

impl RecordedEvents {
    /// The events so far, oldest first.
    pub fn take(&self) -> Vec<(String, Option<Value>)> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The events so far, without removing them.
    pub fn snapshot(&self) -> Vec<(String, Option<Value>)> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl EventSink for RecordedEvents {
    fn emit(&self, name: &str, data: Option<Value>) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name.to_string(), data));
    }
}
