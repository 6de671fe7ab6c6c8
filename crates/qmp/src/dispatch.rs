//! The seam between the protocol and the commands: the [`Dispatcher`] trait the server calls
//! (usually a [`CommandSets`](crate::CommandSets) table, or a [`CommandTable`] of closures) and
//! the [`Reply`] a command returns. Arguments reach a command as [`Args`] (see
//! [`crate::args`]).
// Re-exported: the argument type is part of this seam.
pub use crate::args::Args;
use crate::error::QmpError;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Something to run once a reply has been written to the client's socket.
pub type AfterFlush = Box<dyn FnOnce() + Send + 'static>;

/// A command's successful result: the `return` value, and optionally work to do once the reply
/// has been written.
///
/// The after-flush hook is how `quit` is built: the reply must reach the client before the
/// process goes away, as with QEMU. The hook runs on a thread of its own after the reply's bytes
/// were handed to the kernel (or after writing failed because the client is gone), so it may
/// block, call [`Server::close`](crate::Server::close), or exit the process:
///
/// ```no_run
/// # use qmp::{Reply, Server};
/// # use serde_json::json;
/// # fn quit(server: Server) -> Reply {
/// Reply::new(json!({})).after_flush(move || {
///     server.close(std::time::Duration::from_secs(5)); // flush everyone, then EOF
///     std::process::exit(0);
/// })
/// # }
/// ```
pub struct Reply {
    value: Value,
    after: Option<AfterFlush>,
}

impl Reply {
    /// A reply carrying `value` under `return`.
    pub fn new(value: Value) -> Reply {
        Reply { value, after: None }
    }

    /// The reply of a command that returns nothing: `{}`.
    pub fn empty() -> Reply {
        Reply::new(Value::Object(Map::new()))
    }

    /// Runs `f` once the reply has been written (see the type's documentation).
    pub fn after_flush(mut self, f: impl FnOnce() + Send + 'static) -> Reply {
        self.after = Some(Box::new(f));
        self
    }

    /// The `return` value.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// Splits the reply into its value and hook.
    pub fn into_parts(self) -> (Value, Option<AfterFlush>) {
        (self.value, self.after)
    }
}

impl From<Value> for Reply {
    fn from(value: Value) -> Reply {
        Reply::new(value)
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("value", &self.value)
            .field("after_flush", &self.after.is_some())
            .finish()
    }
}

/// The commands a QMP server offers beyond its built-ins (`qmp_capabilities`, `query-version`,
/// `query-commands`, which the server answers itself and which shadow any of the same name).
///
/// Calls come from the connections' threads, concurrently when several clients are connected,
/// and each call blocks that connection until it returns: commands should be quick, and long
/// work should run in the background and report through events.
pub trait Dispatcher: Send + Sync {
    /// Names of the commands, for `query-commands`.
    fn commands(&self) -> Vec<String>;

    /// Whether `name` is one of [`Dispatcher::commands`]. Override when a lookup is cheaper than
    /// building the list.
    fn has_command(&self, name: &str) -> bool {
        self.commands().iter().any(|c| c == name)
    }

    /// Whether `name` may be run with `exec-oob` (QEMU's `allow-oob`), like `migrate-pause`.
    fn allows_oob(&self, _name: &str) -> bool {
        false
    }

    /// Runs command `name` (one of [`Dispatcher::commands`]) with its arguments (`{}` when the
    /// client sent none).
    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError>;
}

type Handler = dyn Fn(Args) -> Result<Reply, QmpError> + Send + Sync;

struct Entry {
    handler: Box<Handler>,
    allow_oob: bool,
}

/// A [`Dispatcher`] built from one closure per command.
///
/// ```
/// use qmp::{CommandTable, QmpError};
/// use serde_json::json;
///
/// let mut table = CommandTable::new();
/// table.register("query-status", |args| {
///     args.finish()?;
///     Ok::<_, QmpError>(json!({"running": true, "status": "running"}))
/// });
/// ```
#[derive(Default)]
pub struct CommandTable {
    entries: BTreeMap<String, Entry>,
}

impl CommandTable {
    /// An empty table.
    pub fn new() -> CommandTable {
        CommandTable::default()
    }

    /// Adds command `name`. The handler returns a `serde_json::Value` or a [`Reply`].
    ///
    /// # Panics
    ///
    /// If `name` is already registered: two handlers for one command is a wiring mistake.
    pub fn register<F, R>(&mut self, name: &str, handler: F) -> &mut CommandTable
    where
        F: Fn(Args) -> Result<R, QmpError> + Send + Sync + 'static,
        R: Into<Reply>,
    {
        self.insert(name, handler, false)
    }

    /// Adds command `name`, which clients may also run out-of-band (`exec-oob`).
    ///
    /// # Panics
    ///
    /// If `name` is already registered.
    pub fn register_oob<F, R>(&mut self, name: &str, handler: F) -> &mut CommandTable
    where
        F: Fn(Args) -> Result<R, QmpError> + Send + Sync + 'static,
        R: Into<Reply>,
    {
        self.insert(name, handler, true)
    }

    fn insert<F, R>(&mut self, name: &str, handler: F, allow_oob: bool) -> &mut CommandTable
    where
        F: Fn(Args) -> Result<R, QmpError> + Send + Sync + 'static,
        R: Into<Reply>,
    {
        let entry = Entry {
            handler: Box::new(move |args| handler(args).map(Into::into)),
            allow_oob,
        };
        if self.entries.insert(name.to_string(), entry).is_some() {
            panic!("QMP command {name} registered twice");
        }
        self
    }

    /// Whether `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

impl Dispatcher for CommandTable {
    fn commands(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn has_command(&self, name: &str) -> bool {
        self.contains(name)
    }

    fn allows_oob(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.allow_oob)
    }

    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
        match self.entries.get(name) {
            Some(entry) => (entry.handler)(args),
            None => Err(QmpError::unknown_command(name)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A table of two commands for tests: `echo {v}` returns `v`, `pause` (OOB-capable)
    /// returns nothing.
    pub(crate) fn echo_and_pause() -> CommandTable {
        let mut t = CommandTable::new();
        t.register("echo", |mut a: Args| {
            let v = a.req_any("v")?;
            a.finish()?;
            Ok::<_, QmpError>(v)
        });
        t.register_oob("pause", |a: Args| a.finish().map(|()| Reply::empty()));
        t
    }

    #[test]
    fn table_dispatches_and_reports_unknown_commands() {
        let t = echo_and_pause();
        assert_eq!(t.commands(), vec!["echo".to_string(), "pause".to_string()]);
        assert!(t.allows_oob("pause") && !t.allows_oob("echo"));
        let mut m = Map::new();
        m.insert("v".into(), json!([1]));
        let r = t.dispatch("echo", Args::new(m)).unwrap();
        assert_eq!(r.value(), &json!([1]));
        let e = t.dispatch("nope", Args::default()).unwrap_err();
        assert_eq!(e.desc, "The command nope has not been found");
        assert_eq!(e.class, crate::ErrorClass::CommandNotFound);
    }
}
