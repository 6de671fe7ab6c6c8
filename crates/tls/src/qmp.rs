//! The QMP commands of this crate, `object-add` and `object-del` for the object types of
//! [`crate::objects`], as one [`CommandSet`]. The objects check their own properties with
//! [`qmp::Args`] and report QEMU's messages as `GenericError`s.

use crate::objects::Objects;
use qmp::{Args, CommandSet, QmpError, Reply};
use std::sync::Arc;

/// The commands of [`ObjectCommands`].
pub const COMMANDS: &[&str] = &["object-add", "object-del"];

/// `object-add` and `object-del` over one process's [`Objects`].
pub struct ObjectCommands {
    objects: Arc<Objects>,
}

impl ObjectCommands {
    /// The commands of `objects`.
    pub fn new(objects: Arc<Objects>) -> ObjectCommands {
        ObjectCommands { objects }
    }
}

impl CommandSet for ObjectCommands {
    fn commands(&self) -> &[&'static str] {
        COMMANDS
    }

    fn dispatch(&self, name: &str, mut args: Args) -> Result<Reply, QmpError> {
        match name {
            "object-add" => self.objects.object_add(args)?,
            "object-del" => {
                let id = args.req_str("id")?;
                args.finish()?;
                self.objects.object_del(&id)?;
            }
            _ => return Err(QmpError::unknown_command(name)),
        }
        Ok(Reply::empty())
    }
}
