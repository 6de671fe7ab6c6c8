//! What the server tests share: the `fire` command, which emits the event a client names,
//! through the sink the server hands out once it exists.

use qmp::{Args, CommandTable, EventSink, QmpError};
use serde_json::json;
use std::sync::{Arc, OnceLock};

/// Registers `fire {name, data?}` in `table`: emits event `name` (with `data`) through the
/// sink `events` holds by the time the command runs. Returns that cell, for the test to fill.
pub fn register_fire(table: &mut CommandTable) -> Arc<OnceLock<EventSink>> {
    let events: Arc<OnceLock<EventSink>> = Arc::new(OnceLock::new());
    let ev = events.clone();
    table.register("fire", move |mut a: Args| {
        let name = a.req_str("name")?;
        let data = a.opt_any("data");
        a.finish()?;
        if let Some(sink) = ev.get() {
            sink.emit(&name, data);
        }
        Ok::<_, QmpError>(json!({}))
    });
    events
}
