//! QMP input: the JSON parser and a server session, over arbitrary bytes from a client.
//!
//! Three checks per input:
//! 1. `qmp::parse_all`, and every value it returns serializes (`qmp::json::to_line`) to one
//!    ASCII line that parses back to the same value.
//! 2. The streaming parser fed the same bytes in pieces (sizes derived from the input) returns
//!    exactly what `parse_all` returned, errors and their offsets included.
//! 3. A QMP server ([`qmp::Server`]) serving one end of a socket pair, with the program's own
//!    command sets ([`commands`]: the block layer's commands on a null-co node, the migration
//!    engine's capability and parameter commands, and `x-fuzz-echo`), gets the bytes as a
//!    client's input. It must answer with the greeting,
//!    then exactly one reply per value or error the parser found (what is left unfinished at
//!    EOF is dropped, as QEMU does), in order: a JSON object with exactly one of `return` and
//!    `error`, an `error` with string `class` and `desc`, the request's `id` echoed when it had
//!    one and no `id` otherwise; before `qmp_capabilities` succeeds nothing else succeeds, and
//!    after it `qmp_capabilities` fails. `x-fuzz-echo` returns its argument unchanged.

use block::qmp::BlockCommands;
use block::BlockLayer;
use migration::events::RecordedEvents;
use migration::qmp::{MigrationCommands, CONFIG_COMMANDS};
use migration::{Migration, MigrationOptions};
use qmp::json::to_line;
use qmp::{
    parse_all, Args, CommandSet, CommandSets, JsonError, JsonStream, Limits, QmpError, Reply,
    Server,
};
use serde_json::{json, Map, Value};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use vm::{MachineType, Vm, VmConfig};

/// Inputs longer than this skip the server session (check 3): the socket round trip costs
/// more than the parser, and the parser checks cover long inputs.
pub const MAX_SESSION_INPUT: usize = 64 << 10;

/// Largest null-co node `blockdev-add` may create here: bitmap commands on a node of 2^63
/// bytes take time in proportion, which is a management client's own business, not a bug.
pub const MAX_NODE_SIZE: u64 = 1 << 30;

/// What one input did.
#[derive(Debug)]
pub struct Outcome {
    /// What `parse_all` returned.
    pub parsed: Vec<Result<Value, JsonError>>,
    /// The server's replies (after the greeting), if the session ran.
    pub replies: Option<Vec<Value>>,
}

/// The fuzzed server's commands: the program's own command sets — the block layer's (on a
/// null-co node `disk0` of 1 MiB with a bitmap `b0`) and the migration engine's configuration
/// commands over a `-M none` VM — minus anything that touches the host (files, processes, the
/// network), and the harness's `query-status` and `x-fuzz-echo`.
pub fn commands() -> CommandSets {
    let layer = Arc::new(BlockLayer::new());
    layer
        .blockdev_add(&json!({"driver": "null-co", "node-name": "disk0", "size": 1 << 20}))
        .expect("harness setup: null-co node");
    layer
        .block_dirty_bitmap_add("disk0", "b0", Some(65536), None, None)
        .expect("harness setup: bitmap");
    let events = Arc::new(RecordedEvents::default());
    let vm = Vm::new(
        VmConfig {
            name: "fuzz-qmp".into(),
            machine: MachineType::None,
            ram_size: 1 << 20,
            vcpus: 1,
            start_paused: true,
            ..Default::default()
        },
        layer.clone(),
        events.clone(),
    )
    .expect("harness setup: VM");
    let mig = Arc::new(Migration::new(vm, events, MigrationOptions::default()));
    let mut sets = CommandSets::new();
    sets.add(NullCoOnly(BlockCommands::new(layer)))
        .add_only(MigrationCommands::new(mig), CONFIG_COMMANDS)
        .add(Harness);
    sets
}

/// The block layer's commands, with `blockdev-add` limited to small null-co nodes (no host
/// files, bounded work).
struct NullCoOnly(BlockCommands);

impl CommandSet for NullCoOnly {
    fn commands(&self) -> &[&'static str] {
        self.0.commands()
    }

    fn dispatch(&self, name: &str, args: Args) -> Result<Reply, QmpError> {
        if name == "blockdev-add" {
            let m = args.clone().into_map();
            let null_co = m.get("driver").and_then(Value::as_str) == Some("null-co");
            let size = m.get("size").and_then(Value::as_u64).unwrap_or(0);
            if !null_co || size > MAX_NODE_SIZE {
                return Err(QmpError::generic(
                    "the fuzzing harness only adds null-co nodes of at most 1 GiB",
                ));
            }
        }
        self.0.dispatch(name, args)
    }
}

/// The harness's own commands: `query-status` (a destination waiting) and `x-fuzz-echo`, which returns
/// its `value` unchanged and may run out of band.
struct Harness;

impl CommandSet for Harness {
    fn commands(&self) -> &[&'static str] {
        &["query-status", "x-fuzz-echo"]
    }

    fn allows_oob(&self, name: &str) -> bool {
        name == "x-fuzz-echo"
    }

    fn dispatch(&self, name: &str, mut args: Args) -> Result<Reply, QmpError> {
        match name {
            "query-status" => {
                args.finish()?;
                Ok(Reply::new(
                    json!({"status": "inmigrate", "singlestep": false, "running": false}),
                ))
            }
            "x-fuzz-echo" => {
                let v = args.req_any("value")?;
                args.finish()?;
                Ok(Reply::new(v))
            }
            _ => Err(QmpError::unknown_command(name)),
        }
    }
}

/// Runs the three checks (module doc) on `data`. Panics when one does not hold.
pub fn run(data: &[u8]) -> Outcome {
    let parsed = parse_all(data);
    check_round_trip(&parsed);
    check_chunking(data, &parsed);
    let replies = (data.len() <= MAX_SESSION_INPUT).then(|| check_session(data));
    Outcome { parsed, replies }
}

/// Check 1: every value serializes to one ASCII line that parses back equal.
fn check_round_trip(parsed: &[Result<Value, JsonError>]) {
    for v in parsed.iter().flatten() {
        let line = to_line(v);
        assert!(line.is_ascii(), "to_line wrote non-ASCII for {v}");
        assert!(line.ends_with(b"\r\n"), "to_line did not end the line");
        let body = line.get(..line.len() - 2).unwrap_or_default();
        assert!(
            !body.contains(&b'\n') && !body.contains(&b'\r'),
            "to_line wrote a line break inside the value"
        );
        if line.len() <= Limits::default().max_message_bytes {
            let back = parse_all(&line);
            assert_eq!(
                back,
                vec![Ok(v.clone())],
                "value does not survive to_line and parse: {}",
                String::from_utf8_lossy(&line)
            );
        }
    }
}

/// Piece sizes for check 2, varied by the input itself so the fuzzer explores them.
fn pieces(data: &[u8]) -> Vec<usize> {
    let mut seed = data
        .iter()
        .take(16)
        .fold(data.len() as u64 ^ 0x9e37_79b9_7f4a_7c15, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let mut out = Vec::new();
    let mut left = data.len();
    while left > 0 {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let n = match (seed >> 60) & 3 {
            0 => 1,
            1 => 1 + (seed >> 32) as usize % 8,
            _ => 1 + (seed >> 32) as usize % 257,
        };
        let n = n.min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// Check 2: feeding in pieces changes nothing.
fn check_chunking(data: &[u8], whole: &[Result<Value, JsonError>]) {
    let mut stream = JsonStream::new(Limits::default());
    let mut got = Vec::new();
    let mut rest = data;
    for n in pieces(data) {
        let (piece, tail) = rest.split_at(n);
        got.extend(stream.feed(piece));
        rest = tail;
    }
    got.extend(stream.finish());
    assert_eq!(
        got, whole,
        "feeding the input in pieces gave a different result"
    );
}

/// The request's `execute` or `exec-oob` name, if it is a well-formed request object.
fn command_name(request: &Map<String, Value>) -> Option<&str> {
    request
        .get("execute")
        .or_else(|| request.get("exec-oob"))
        .and_then(Value::as_str)
}

/// Check 3: a server session answers every input once, in order, correctly shaped.
fn check_session(data: &[u8]) -> Vec<Value> {
    let (ours, theirs) = UnixStream::pair().expect("harness setup: socket pair");
    let server = Server::new(Arc::new(commands()));
    server
        .serve_unix(theirs)
        .expect("harness setup: serve the socket");
    ours.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("harness setup: read timeout");
    let mut writer = ours.try_clone().expect("harness setup: socket clone");
    let input = data.to_vec();
    // Written from a thread of its own: the server stops reading while its replies are not
    // read, and replies can be larger than the input.
    let feeder = std::thread::spawn(move || {
        let _ = writer.write_all(&input);
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut out = Vec::new();
    let mut reader = ours;
    reader
        .read_to_end(&mut out)
        .expect("the server did not close the connection after the client's EOF");
    let _ = feeder.join();

    let expected = JsonStream::new(Limits::default()).feed(data);
    let text = String::from_utf8(out).expect("the server wrote non-UTF-8");
    assert!(text.is_ascii(), "the server wrote non-ASCII");
    assert!(
        text.is_empty() || text.ends_with("\r\n"),
        "the server's output ends mid-line"
    );
    let mut lines = text.split_terminator("\r\n");
    let greeting = lines.next().expect("no greeting");
    let greeting = parse_line(greeting);
    assert!(greeting.get("QMP").is_some(), "bad greeting {greeting}");
    let replies: Vec<Value> = lines.map(parse_line).collect();
    assert_eq!(
        replies.len(),
        expected.len(),
        "{} replies to {} inputs: {replies:?}",
        replies.len(),
        expected.len()
    );
    let mut negotiated = false;
    for (input, reply) in expected.iter().zip(&replies) {
        let reply_obj = reply
            .as_object()
            .unwrap_or_else(|| panic!("reply is not an object: {reply}"));
        for k in reply_obj.keys() {
            assert!(
                ["return", "error", "id"].contains(&k.as_str()),
                "reply has key {k}: {reply}"
            );
        }
        let ok = reply_obj.contains_key("return");
        assert!(
            ok != reply_obj.contains_key("error"),
            "reply needs exactly one of return and error: {reply}"
        );
        if let Some(e) = reply_obj.get("error") {
            assert!(
                e.get("class").and_then(Value::as_str).is_some()
                    && e.get("desc")
                        .and_then(Value::as_str)
                        .is_some_and(|d| !d.is_empty()),
                "error without class or desc: {reply}"
            );
        }
        let request = match input {
            Ok(Value::Object(m)) => Some(m),
            _ => None,
        };
        assert_eq!(
            reply_obj.get("id"),
            request.and_then(|m| m.get("id")),
            "id not echoed as sent: {reply} for {input:?}"
        );
        let Some(request) = request else {
            assert!(!ok, "a non-object input succeeded: {input:?}");
            continue;
        };
        let name = command_name(request);
        if ok {
            if negotiated {
                assert_ne!(
                    name,
                    Some("qmp_capabilities"),
                    "qmp_capabilities succeeded twice"
                );
            } else {
                assert_eq!(
                    name,
                    Some("qmp_capabilities"),
                    "a command succeeded before negotiation: {request:?}"
                );
                negotiated = true;
            }
            if name == Some("x-fuzz-echo") {
                let sent = request.get("arguments").and_then(|a| a.get("value"));
                assert_eq!(
                    reply_obj.get("return"),
                    sent,
                    "x-fuzz-echo changed its value"
                );
            }
        }
    }
    replies
}

fn parse_line(line: &str) -> Value {
    let mut values = parse_all(line.as_bytes());
    assert_eq!(values.len(), 1, "server line is not one JSON value: {line}");
    match values.pop() {
        Some(Ok(v)) => v,
        other => panic!("server line does not parse: {line}: {other:?}"),
    }
}
