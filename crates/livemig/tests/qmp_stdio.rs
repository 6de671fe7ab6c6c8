//! QMP on stdio (`-qmp stdio`), as QEMU's bash iotests drive it: the greeting at start-up, a
//! reply per line, errors, `quit` answered with the `SHUTDOWN` event and its reply before the
//! process exits with status 0 — and the end of stdin, which ends neither the VM nor the
//! events on stdout; each side by side with QEMU 7.2.

mod common;

use common::TIMEOUT;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};
use testkit::QmpClient;

/// A process with its QMP monitor on stdio; stdout is read line by line as it comes.
struct StdioQmp {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    name: String,
}

impl StdioQmp {
    /// Runs `program` (`livemig vm` for livemig) `-M none -display none -qmp stdio ARGS`.
    fn start(program: &Path, args: &[&str]) -> StdioQmp {
        let sub: &[&str] = if program == common::livemig() {
            &["vm"]
        } else {
            &[]
        };
        let mut child = Command::new(program)
            .args(sub)
            .args(["-M", "none", "-display", "none", "-qmp", "stdio"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        StdioQmp {
            child,
            stdin,
            lines,
            name: program.display().to_string(),
        }
    }

    /// The next line on stdout, as JSON (each line must be one whole message).
    fn next(&mut self) -> Value {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(line) => serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: not a JSON line: {line:?}: {e}", self.name)),
            Err(e) => panic!("{}: no line on stdout: {e}", self.name),
        }
    }

    fn send(&mut self, msg: Value) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        // One write for the whole line: the monitor acts on a message once its JSON is whole,
        // and `writeln!` writes a `Value` piece by piece, so after `quit` the newline, written
        // on its own, could find the process gone (EPIPE on a loaded machine).
        stdin.write_all(format!("{msg}\n").as_bytes()).unwrap();
    }

    /// Sends `msg` and returns the next line.
    fn cmd(&mut self, msg: Value) -> Value {
        self.send(msg);
        self.next()
    }

    /// Stdout reaches its end (no more lines) within the timeout.
    /// stdout ends with no line more, and the process exits with status 0.
    fn ends_cleanly(&mut self) {
        match self.lines.recv_timeout(TIMEOUT) {
            Err(RecvTimeoutError::Disconnected) => {}
            Ok(line) => panic!("{}: unexpected line {line:?}", self.name),
            Err(RecvTimeoutError::Timeout) => panic!("{}: stdout stays open", self.name),
        }
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "{}: {status}", self.name);
    }
}

impl Drop for StdioQmp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The greeting's version and the events' timestamps vary; the rest must not.
fn scrub(mut v: Value) -> Value {
    if let Some(ver) = v.pointer_mut("/QMP/version") {
        *ver = json!("VERSION");
    }
    if let Some(t) = v.get_mut("timestamp") {
        assert!(t["seconds"].as_u64().is_some() && t["microseconds"].as_u64().is_some());
        *t = json!("TIME");
    }
    v
}

/// A whole session on stdio, every line the program wrote, until it exited (status 0).
fn session(program: &Path) -> Vec<Value> {
    let mut q = StdioQmp::start(program, &[]);
    let mut seen = vec![q.next()];
    seen.push(q.cmd(json!({"execute": "qmp_capabilities"})));
    seen.push(q.cmd(json!({"execute": "query-status"})));
    seen.push(q.cmd(json!({"execute": "no-such-command", "id": 7})));
    seen.push(q.cmd(json!({"execute": "query-status", "arguments": {"x": 1}})));
    // The event comes before the reply, as QEMU's qmp_quit emits it before returning.
    seen.push(q.cmd(json!({"execute": "quit", "id": "bye"})));
    seen.push(q.next());
    q.ends_cleanly();
    seen.into_iter().map(scrub).collect()
}

#[test]
fn qmp_on_stdio_answers_as_qemu_does() {
    let lm = session(&common::livemig());
    let expected = vec![
        json!({"QMP": {"version": "VERSION", "capabilities": ["oob"]}}),
        json!({"return": {}}),
        json!({"return": {"status": "running", "singlestep": false, "running": true}}),
        json!({"id": 7, "error": {"class": "CommandNotFound",
            "desc": "The command no-such-command has not been found"}}),
        json!({"error": {"class": "GenericError", "desc": "Parameter 'x' is unexpected"}}),
        json!({"timestamp": "TIME", "event": "SHUTDOWN",
            "data": {"guest": false, "reason": "host-qmp-quit"}}),
        json!({"id": "bye", "return": {}}),
    ];
    assert_eq!(lm, expected);
    if !testkit::require("qmp_on_stdio_answers_as_qemu_does", testkit::qemu()) {
        return;
    }
    assert_eq!(session(Path::new("qemu-system-x86_64")), lm);
}

/// The end of stdin ends only the reading, as with QEMU: the VM runs on, another monitor
/// drives it, and stdout still gets the events (`STOP`, then `SHUTDOWN` on that monitor's
/// `quit`) until the process exits with status 0. Every line stdout got, from the greeting on.
fn stdin_closed(program: &Path) -> Vec<Value> {
    let dir = common::tempdir();
    let sock = dir.path().join("other.qmp");
    let opt = format!("unix:{},server=on,wait=off", sock.display());
    let mut q = StdioQmp::start(program, &["-qmp", &opt]);
    let mut seen = vec![q.next()];
    seen.push(q.cmd(json!({"execute": "qmp_capabilities"})));
    drop(q.stdin.take());
    let mut other = QmpClient::connect(&sock, TIMEOUT).expect("the other monitor");
    assert_eq!(other.ok("query-status", json!({}))["status"], "running");
    other.ok("stop", json!({}));
    seen.push(q.next());
    assert_eq!(other.ok("query-status", json!({}))["status"], "paused");
    assert!(q.child.try_wait().unwrap().is_none(), "{} exited", q.name);
    other.ok("quit", json!({}));
    seen.push(q.next());
    q.ends_cleanly();
    seen.into_iter().map(scrub).collect()
}

#[test]
fn end_of_stdin_ends_only_the_reading() {
    let lm = stdin_closed(&common::livemig());
    assert_eq!(
        lm,
        vec![
            json!({"QMP": {"version": "VERSION", "capabilities": ["oob"]}}),
            json!({"return": {}}),
            json!({"timestamp": "TIME", "event": "STOP"}),
            json!({"timestamp": "TIME", "event": "SHUTDOWN",
                "data": {"guest": false, "reason": "host-qmp-quit"}}),
        ]
    );
    if !testkit::require("end_of_stdin_ends_only_the_reading", testkit::qemu()) {
        return;
    }
    assert_eq!(stdin_closed(Path::new("qemu-system-x86_64")), lm);
}
