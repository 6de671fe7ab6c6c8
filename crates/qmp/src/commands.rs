//! Command sets: how a crate that owns QMP commands offers them, and the table a monitor is
//! built from.
//!
//! Each crate with commands (the block layer, the NBD server, block jobs, the migration engine,
//! the VM itself) implements [`CommandSet`] once: the names it answers, and one `dispatch` that
//! checks the arguments with [`Args`] and runs the command. Its own error type converts into a
//! [`QmpError`] carrying QEMU's class for that condition (`GenericError`, `DeviceNotActive`,
//! ...), in one `From` impl next to its commands, so the mapping from a crate's errors to QMP
//! classes lives in exactly one place per crate.
//!
//! A program builds its monitor as a [`CommandSets`] table — one line per set — and hands it to
//! the [`Server`](crate::Server) as its [`Dispatcher`]:
//!
//! ```
//! use qmp::{Args, CommandSet, CommandSets, Dispatcher, QmpError, Reply};
//! use serde_json::json;
//!
//! struct RunControl;
//!
//! impl CommandSet for RunControl {
//!     fn commands(&self) -> &[&'static str] {
//!         &["query-status"]
//!     }
//!     fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
//!         args.finish()?;
//!         match name {
//!             "query-status" => Ok(Reply::new(json!({"status": "running", "running": true}))),
//!             _ => Err(QmpError::unknown_command(name)),
//!         }
//!     }
//! }
//!
//! let mut monitor = CommandSets::new();
//! monitor.add(RunControl);
//! assert_eq!(monitor.commands(), vec!["query-status".to_string()]);
//! ```

use crate::args::Args;
use crate::dispatch::{Dispatcher, Reply};
use crate::error::QmpError;
use std::collections::HashMap;
use std::sync::Arc;

/// The QMP commands one crate owns.
///
/// `dispatch` is called from the connections' threads, concurrently when several clients are
/// connected, so a set holds its state behind its own locks. As with every QMP command, it
/// takes and checks all of its arguments ([`Args::finish`]) before it changes anything.
pub trait CommandSet: Send + Sync {
    /// The commands this set runs.
    fn commands(&self) -> &[&'static str];

    /// Whether `name` may be run with `exec-oob` (QEMU's `allow-oob`).
    fn allows_oob(&self, _name: &str) -> bool {
        false
    }

    /// Runs command `name`, one of [`CommandSet::commands`].
    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError>;
}

impl<T: CommandSet + ?Sized> CommandSet for Arc<T> {
    fn commands(&self) -> &[&'static str] {
        (**self).commands()
    }
    fn allows_oob(&self, name: &str) -> bool {
        (**self).allows_oob(name)
    }
    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
        (**self).dispatch(name, args)
    }
}

/// A monitor's commands: a table of [`CommandSet`]s, each command served by exactly one set.
#[derive(Default)]
pub struct CommandSets {
    sets: Vec<Box<dyn CommandSet>>,
    /// Command name → index into `sets`.
    index: HashMap<&'static str, usize>,
}

impl CommandSets {
    /// An empty table.
    pub fn new() -> CommandSets {
        CommandSets::default()
    }

    /// Adds every command of `set`.
    ///
    /// # Panics
    ///
    /// If a command is already served by another set: two handlers for one command is a wiring
    /// mistake.
    pub fn add(&mut self, set: impl CommandSet + 'static) -> &mut CommandSets {
        let names: Vec<&'static str> = set.commands().to_vec();
        self.insert(Box::new(set), &names)
    }

    /// Adds only the commands `names` of `set` — for a harness that must not reach the host
    /// through the others (`migrate` opens sockets and runs programs).
    ///
    /// # Panics
    ///
    /// If `set` has no command of one of these names, or another set serves it already.
    pub fn add_only(
        &mut self,
        set: impl CommandSet + 'static,
        names: &[&'static str],
    ) -> &mut CommandSets {
        for n in names {
            assert!(
                set.commands().contains(n),
                "QMP command {n} is not in the set it is taken from"
            );
        }
        self.insert(Box::new(set), names)
    }

    fn insert(&mut self, set: Box<dyn CommandSet>, names: &[&'static str]) -> &mut CommandSets {
        let i = self.sets.len();
        for n in names {
            if self.index.insert(n, i).is_some() {
                panic!("QMP command {n} is served by two command sets");
            }
        }
        self.sets.push(set);
        self
    }

    fn set_of(&self, name: &str) -> Option<&dyn CommandSet> {
        self.index
            .get(name)
            .and_then(|&i| self.sets.get(i))
            .map(|s| &**s)
    }
}

impl Dispatcher for CommandSets {
    fn commands(&self) -> Vec<String> {
        let mut names: Vec<String> = self.index.keys().map(|n| n.to_string()).collect();
        names.sort();
        names
    }

    fn has_command(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn allows_oob(&self, name: &str) -> bool {
        self.set_of(name).is_some_and(|s| s.allows_oob(name))
    }

    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
        match self.set_of(name) {
            Some(set) => set.dispatch(name, args),
            None => Err(QmpError::unknown_command(name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;
    use serde_json::{json, Value};

    struct Echo(&'static [&'static str]);

    impl CommandSet for Echo {
        fn commands(&self) -> &[&'static str] {
            self.0
        }
        fn allows_oob(&self, name: &str) -> bool {
            name == "pause"
        }
        fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
            args.finish()?;
            Ok(Reply::new(Value::String(name.to_string())))
        }
    }

    #[test]
    fn each_command_goes_to_its_set() {
        let mut t = CommandSets::new();
        t.add(Echo(&["b", "pause"])).add(Echo(&["a"]));
        assert_eq!(t.commands(), ["a", "b", "pause"]);
        assert!(t.allows_oob("pause") && !t.allows_oob("a") && !t.allows_oob("nope"));
        assert_eq!(
            t.dispatch("a", Args::default()).unwrap().value(),
            &json!("a")
        );
        let e = t.dispatch("nope", Args::default()).unwrap_err();
        assert_eq!(e.class, ErrorClass::CommandNotFound);
        assert_eq!(e.desc, "The command nope has not been found");
    }

    #[test]
    fn a_subset_serves_only_its_names() {
        let mut t = CommandSets::new();
        t.add_only(Echo(&["safe", "dangerous"]), &["safe"]);
        assert!(t.has_command("safe") && !t.has_command("dangerous"));
    }

    #[test]
    #[should_panic(expected = "served by two command sets")]
    fn a_command_in_two_sets_is_a_wiring_mistake() {
        let mut t = CommandSets::new();
        t.add(Echo(&["a"])).add(Echo(&["a"]));
    }
}
