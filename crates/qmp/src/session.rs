//! One connection's protocol state, without the I/O: turns each parsed input into exactly one
//! reply line, following QEMU's `monitor/qmp.c` and `qapi/qmp-dispatch.c` (7.2).
//!
//! A connection starts in capabilities negotiation, where only `qmp_capabilities` exists; a
//! successful `qmp_capabilities` moves it to command mode for good. The server answers the
//! built-in commands here and hands every other command to the [`Dispatcher`].

use crate::dispatch::{AfterFlush, Args, Dispatcher, Reply};
use crate::error::{ErrorClass, QmpError};
use crate::json::{to_line, JsonError};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// Commands the server implements itself.
const BUILTINS: [&str; 3] = ["qmp_capabilities", "query-commands", "query-version"];

/// What every connection of one server shares.
pub(crate) struct Shared {
    pub dispatcher: Arc<dyn Dispatcher>,
    /// The `query-version` result, also sent in the greeting.
    pub version: Value,
    /// Whether the greeting offers the `oob` capability.
    pub offer_oob: bool,
}

/// Where a connection is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Only `qmp_capabilities` is available; no events are sent.
    Negotiation,
    /// Everything else is available; `oob` says whether `exec-oob` is.
    Command { oob: bool },
}

/// The reply to one input, ready to be written.
pub(crate) struct Outcome {
    pub line: Vec<u8>,
    pub after: Option<AfterFlush>,
}

/// One connection's protocol state.
pub(crate) struct Session {
    shared: Arc<Shared>,
    mode: Mode,
}

impl Session {
    pub fn new(shared: Arc<Shared>) -> Session {
        Session {
            shared,
            mode: Mode::Negotiation,
        }
    }

    /// The greeting that opens every connection.
    pub fn greeting(&self) -> Vec<u8> {
        let caps: Vec<&str> = if self.shared.offer_oob {
            vec!["oob"]
        } else {
            vec![]
        };
        to_line(&json!({"QMP": {"version": self.shared.version, "capabilities": caps}}))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Answers one parsed input (or parse error).
    pub fn handle(&mut self, input: Result<Value, JsonError>) -> Outcome {
        let (id, result) = match input {
            Err(e) => (None, Err(QmpError::from(e))),
            Ok(Value::Object(request)) => {
                let id = request.get("id").cloned();
                let negotiating = self.mode == Mode::Negotiation;
                let mut result = self.execute(request);
                if negotiating {
                    if let Err(e) = &mut result {
                        if e.class == ErrorClass::CommandNotFound {
                            // QEMU's hint for clients that forgot to negotiate.
                            e.desc =
                                "Expecting capabilities negotiation with 'qmp_capabilities'".into();
                        }
                    }
                }
                (id, result)
            }
            Ok(_) => (
                None,
                Err(QmpError::generic("QMP input must be a JSON object")),
            ),
        };
        let mut reply = Map::new();
        let mut after = None;
        match result {
            Ok(r) => {
                let (value, hook) = r.into_parts();
                reply.insert("return".into(), value);
                after = hook;
            }
            Err(e) => {
                reply.insert("error".into(), e.to_value());
            }
        }
        if let Some(id) = id {
            reply.insert("id".into(), id);
        }
        Outcome {
            line: to_line(&Value::Object(reply)),
            after,
        }
    }

    /// Checks the request's shape (QEMU's `qmp_dispatch_check_obj`), finds the command and runs
    /// it.
    fn execute(&mut self, mut request: Map<String, Value>) -> Result<Reply, QmpError> {
        let oob_enabled = self.mode == Mode::Command { oob: true };
        let mut exec_key: Option<&str> = None;
        for (key, value) in &request {
            match key.as_str() {
                "execute" | "exec-oob" if key == "execute" || oob_enabled => {
                    if !value.is_string() {
                        return Err(QmpError::generic(format!(
                            "QMP input member '{key}' must be a string"
                        )));
                    }
                    if exec_key.is_some() {
                        // QEMU names them in this order whichever came first.
                        return Err(QmpError::generic(
                            "QMP input member 'execute' clashes with 'exec-oob'",
                        ));
                    }
                    exec_key = Some(key);
                }
                "arguments" => {
                    if !value.is_object() {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ));
                    }
                }
                "id" => {}
                _ => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' is unexpected"
                    )))
                }
            }
        }
        let Some(exec_key) = exec_key else {
            return Err(QmpError::generic("QMP input lacks member 'execute'"));
        };
        let oob = exec_key == "exec-oob";
        let name = match request.get(exec_key) {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(QmpError::generic("QMP input lacks member 'execute'")),
        };
        let args = match request.shift_remove("arguments") {
            Some(Value::Object(map)) => Args::new(map),
            _ => Args::default(),
        };

        let builtin = BUILTINS.contains(&name.as_str());
        if self.mode == Mode::Negotiation && name != "qmp_capabilities" {
            return Err(QmpError::unknown_command(&name));
        }
        if !builtin && !self.shared.dispatcher.has_command(&name) {
            return Err(QmpError::unknown_command(&name));
        }
        if oob && (builtin || !self.shared.dispatcher.allows_oob(&name)) {
            return Err(QmpError::generic(format!(
                "The command {name} does not support OOB"
            )));
        }
        match name.as_str() {
            "qmp_capabilities" => self.qmp_capabilities(args),
            "query-version" => {
                args.finish()?;
                Ok(Reply::new(self.shared.version.clone()))
            }
            "query-commands" => {
                args.finish()?;
                let mut names: Vec<String> = self.shared.dispatcher.commands();
                names.extend(BUILTINS.iter().map(|s| s.to_string()));
                names.sort();
                names.dedup();
                let list = names.into_iter().map(|n| json!({ "name": n })).collect();
                Ok(Reply::new(Value::Array(list)))
            }
            _ => self.shared.dispatcher.dispatch(&name, args),
        }
    }

    fn qmp_capabilities(&mut self, mut args: Args) -> Result<Reply, QmpError> {
        let mut want_oob = false;
        if let Some(list) = args.opt_list("enable")? {
            for cap in list {
                cap.into_enum(&["oob"])?;
                want_oob = true;
            }
        }
        args.finish()?;
        if self.mode != Mode::Negotiation {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        if want_oob && !self.shared.offer_oob {
            return Err(QmpError::generic("Capability oob not available"));
        }
        self.mode = Mode::Command { oob: want_oob };
        Ok(Reply::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::parse_all;

    fn session(offer_oob: bool) -> Session {
        let t = crate::dispatch::tests::echo_and_pause();
        Session::new(Arc::new(Shared {
            dispatcher: Arc::new(t),
            version: json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "test"}),
            offer_oob,
        }))
    }

    /// Feeds `input` and returns the reply lines as text, without CRLF.
    fn talk(s: &mut Session, input: &str) -> Vec<String> {
        parse_all(input.as_bytes())
            .into_iter()
            .map(|r| {
                let line = String::from_utf8(s.handle(r).line).unwrap();
                line.strip_suffix("\r\n").unwrap().to_string()
            })
            .collect()
    }

    #[test]
    fn negotiation_then_commands() {
        let mut s = session(true);
        assert_eq!(
            String::from_utf8(s.greeting()).unwrap(),
            "{\"QMP\": {\"version\": {\"qemu\": {\"major\": 7, \"minor\": 2, \"micro\": 0}, \"package\": \"test\"}, \"capabilities\": [\"oob\"]}}\r\n"
        );
        assert_eq!(
            talk(&mut s, r#"{"execute":"echo","arguments":{"v":1},"id":1}"#),
            [
                r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}"#
            ]
        );
        assert_eq!(
            talk(&mut s, r#"{"exec-oob":"pause"}"#),
            [
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}"#
            ]
        );
        assert_eq!(
            talk(
                &mut s,
                r#"{"execute":"qmp_capabilities","arguments":{"enable":["foo"]}}"#
            ),
            [
                r#"{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'foo'"}}"#
            ]
        );
        assert_eq!(s.mode(), Mode::Negotiation);
        assert_eq!(
            talk(&mut s, r#"{"execute":"qmp_capabilities"}"#),
            [r#"{"return": {}}"#]
        );
        assert_eq!(s.mode(), Mode::Command { oob: false });
        assert_eq!(
            talk(&mut s, r#"{"execute":"qmp_capabilities"}"#),
            [
                r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
            ]
        );
        assert_eq!(
            talk(
                &mut s,
                r#"{"execute":"echo","arguments":{"v":"é"},"id":{"a":[1]}}"#
            ),
            [r#"{"return": "\u00E9", "id": {"a": [1]}}"#]
        );
        assert_eq!(
            talk(&mut s, r#"{"execute":"query-commands"}"#),
            [
                r#"{"return": [{"name": "echo"}, {"name": "pause"}, {"name": "qmp_capabilities"}, {"name": "query-commands"}, {"name": "query-version"}]}"#
            ]
        );
    }

    #[test]
    fn malformed_requests_get_qemu_errors() {
        let mut s = session(true);
        talk(&mut s, r#"{"execute":"qmp_capabilities"}"#);
        let cases = [
            ("[]", "QMP input must be a JSON object", false),
            (
                r#"{"execute":1}"#,
                "QMP input member 'execute' must be a string",
                false,
            ),
            (
                r#"{"execute":"echo","arguments":[]}"#,
                "QMP input member 'arguments' must be an object",
                false,
            ),
            (
                r#"{"execute":"echo","foo":1}"#,
                "QMP input member 'foo' is unexpected",
                false,
            ),
            (r#"{"id":3}"#, "QMP input lacks member 'execute'", true),
            (
                r#"{"execute":"nope","id":3}"#,
                "The command nope has not been found",
                true,
            ),
            (
                r#"{"execute":"echo","id":3}"#,
                "Parameter 'v' is missing",
                true,
            ),
            (
                r#"{"execute":"query-version","arguments":{"a":1}}"#,
                "Parameter 'a' is unexpected",
                false,
            ),
            (
                r#"{"a" 1}"#,
                "JSON parse error, missing : in object pair",
                false,
            ),
        ];
        for (input, desc, has_id) in cases {
            let replies = talk(&mut s, input);
            assert_eq!(replies.len(), 1, "{input}");
            let v: Value = serde_json::from_str(&replies[0]).unwrap();
            assert_eq!(v["error"]["desc"], desc, "{input}");
            assert_eq!(v.get("id").is_some(), has_id, "{input}");
        }
    }

    #[test]
    fn oob_needs_the_capability_and_a_capable_command() {
        let mut s = session(true);
        talk(
            &mut s,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#,
        );
        assert_eq!(s.mode(), Mode::Command { oob: true });
        assert_eq!(
            talk(&mut s, r#"{"exec-oob":"pause","id":"p"}"#),
            [r#"{"return": {}, "id": "p"}"#]
        );
        assert_eq!(
            talk(&mut s, r#"{"exec-oob":"echo","id":2}"#),
            [
                r#"{"error": {"class": "GenericError", "desc": "The command echo does not support OOB"}, "id": 2}"#
            ]
        );
        assert_eq!(
            talk(
                &mut s,
                r#"{"exec-oob":"query-version","execute":"query-version"}"#
            ),
            [
                r#"{"error": {"class": "GenericError", "desc": "QMP input member 'execute' clashes with 'exec-oob'"}}"#
            ]
        );
        assert_eq!(
            talk(&mut s, r#"{"exec-oob":"nope"}"#),
            [
                r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#
            ]
        );

        let mut no_oob = session(false);
        assert!(String::from_utf8(no_oob.greeting())
            .unwrap()
            .contains("\"capabilities\": []"));
        assert_eq!(
            talk(
                &mut no_oob,
                r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#
            ),
            [r#"{"error": {"class": "GenericError", "desc": "Capability oob not available"}}"#]
        );
    }
}
