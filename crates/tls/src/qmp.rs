//! The QMP commands of this crate: `object-add` and `object-del`, for the object types of
//! [`crate::objects`].

use crate::objects::Objects;
use qmp::{Args, QmpError};
use serde_json::{json, Value};

/// The commands [`dispatch`] handles.
pub const COMMANDS: &[&str] = &["object-add", "object-del"];

/// Runs `name` if it is one of [`COMMANDS`]; `None` otherwise.
pub fn dispatch(objects: &Objects, name: &str, mut args: Args) -> Option<Result<Value, QmpError>> {
    Some(match name {
        "object-add" => objects.object_add(args).map(|_| json!({})),
        "object-del" => args
            .req_str("id")
            .and_then(|id| args.finish().map(|_| id))
            .and_then(|id| objects.object_del(&id))
            .map(|_| json!({})),
        _ => return None,
    })
}
