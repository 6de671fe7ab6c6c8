//! The server over real sockets, driven with raw bytes: what a client sends, what it reads back.

mod support;

use qmp::{Args, CommandTable, EventSink, QmpError, Reply, Server, ServerConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A client that speaks bytes.
struct Raw {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let stream = UnixStream::connect(path).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Raw {
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("send");
    }

    /// The next message, exactly as sent, without its CRLF (which must be there).
    fn line(&mut self) -> String {
        let mut buf = Vec::new();
        self.reader.read_until(b'\n', &mut buf).expect("read");
        assert!(
            buf.ends_with(b"\r\n"),
            "not CRLF-terminated: {:?}",
            String::from_utf8_lossy(&buf)
        );
        assert!(buf.is_ascii(), "not ASCII: {buf:?}");
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).unwrap()
    }

    fn json(&mut self) -> Value {
        serde_json::from_str(&self.line()).expect("reply is JSON")
    }

    /// Reads the greeting and negotiates (optionally enabling oob).
    fn negotiate(&mut self, oob: bool) {
        let greeting = self.json();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        if oob {
            self.send(
                b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"oob\"]}}\n",
            );
        } else {
            self.send(b"{\"execute\": \"qmp_capabilities\"}\n");
        }
        assert_eq!(self.line(), r#"{"return": {}}"#);
    }

    fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(
                rest.is_empty(),
                "unexpected data before EOF: {:?}",
                String::from_utf8_lossy(&rest)
            ),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        }
    }
}

struct Fixture {
    server: Server,
    path: PathBuf,
    quitted: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

/// A server with a few commands: `echo {v}`, `add {a: int64, b: uint32}`, `fire {name}` (emits
/// an event), `pause` (OOB-capable), `quit` (closes the server after replying).
fn fixture(config: ServerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let server_cell: Arc<OnceLock<Server>> = Arc::new(OnceLock::new());
    let quitted = Arc::new(AtomicBool::new(false));
    let mut table = CommandTable::new();
    table.register("echo", |mut a: Args| {
        let v = a.req_any("v")?;
        a.finish()?;
        Ok::<_, QmpError>(v)
    });
    table.register("add", |mut a: Args| {
        let x: i64 = a.req_int("a")?;
        let y: u32 = a.req_int("b")?;
        a.finish()?;
        Ok::<_, QmpError>(json!(x + i64::from(y)))
    });
    let events = support::register_fire(&mut table);
    table.register_oob("pause", |a: Args| a.finish().map(|()| Reply::empty()));
    let (cell, flag) = (server_cell.clone(), quitted.clone());
    table.register("quit", move |a: Args| {
        a.finish()?;
        let (cell, flag) = (cell.clone(), flag.clone());
        Ok::<_, QmpError>(Reply::empty().after_flush(move || {
            if let Some(s) = cell.get() {
                s.close(Duration::from_secs(5));
            }
            flag.store(true, Ordering::SeqCst);
        }))
    });
    let server = Server::with_config(Arc::new(table), config);
    let _ = events.set(server.events());
    let _ = server_cell.set(server.clone());
    server
        .start(
            &format!("unix:{},server=on,wait=off", path.display())
                .parse()
                .unwrap(),
        )
        .unwrap();
    Fixture {
        server,
        path,
        quitted,
        _dir: dir,
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn greeting_and_negotiation() {
    let f = fixture(ServerConfig::default());
    let mut c = Raw::connect(&f.path);
    assert_eq!(
        c.line(),
        format!(
            r#"{{"QMP": {{"version": {{"qemu": {{"major": 7, "minor": 2, "micro": 0}}, "package": "livemig {}"}}, "capabilities": ["oob"]}}}}"#,
            env!("CARGO_PKG_VERSION")
        )
    );
    c.send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": 1}, \"id\": 1}\n");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1}"#
    );
    c.send(b"{\"execute\": \"qmp_capabilities\", \"arguments\": {\"enable\": [\"fast\"]}}");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "Parameter 'null' does not accept value 'fast'"}}"#
    );
    c.send(b"{\"execute\": \"qmp_capabilities\", \"id\": \"neg\"}");
    assert_eq!(c.line(), r#"{"return": {}, "id": "neg"}"#);
    c.send(b"{\"execute\": \"qmp_capabilities\"}");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#
    );
    c.send(b"{\"execute\": \"query-version\"}");
    let v = c.json();
    assert_eq!(
        v["return"]["qemu"],
        json!({"major": 7, "minor": 2, "micro": 0})
    );
    c.send(b"{\"execute\": \"query-commands\"}");
    let names: Vec<String> = c.json()["return"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "add",
            "echo",
            "fire",
            "pause",
            "qmp_capabilities",
            "query-commands",
            "query-version",
            "quit"
        ]
    );
}

#[test]
fn ids_are_echoed_verbatim() {
    let f = fixture(ServerConfig::default());
    let mut c = Raw::connect(&f.path);
    c.negotiate(false);
    c.send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": \"x\"}, \"id\": 42}");
    assert_eq!(c.line(), r#"{"return": "x", "id": 42}"#);
    c.send(b"{'execute': 'echo', 'arguments': {'v': 1}, 'id': 'it\\'s \xc3\xa9'}");
    assert_eq!(c.line(), r#"{"return": 1, "id": "it's \u00E9"}"#);
    c.send(b"{\"id\": {\"seq\": [1, 2.5, null], \"tag\": \"a\"}, \"execute\": \"echo\", \"arguments\": {\"v\": []}}");
    assert_eq!(
        c.line(),
        r#"{"return": [], "id": {"seq": [1, 2.5, null], "tag": "a"}}"#
    );
    // Errors carry the id too, when the request was an object.
    c.send(b"{\"execute\": \"nope\", \"id\": [7]}");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": [7]}"#
    );
    c.send(b"{\"id\": 3}");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 3}"#
    );
    // Several commands in one write are answered in order.
    c.send(b"{\"execute\":\"add\",\"arguments\":{\"a\":1,\"b\":2},\"id\":1}{\"execute\":\"add\",\"arguments\":{\"a\":-5,\"b\":2},\"id\":2}\n");
    assert_eq!(c.line(), r#"{"return": 3, "id": 1}"#);
    assert_eq!(c.line(), r#"{"return": -3, "id": 2}"#);
}

#[test]
fn arguments_are_validated_with_qemus_messages() {
    let f = fixture(ServerConfig::default());
    let mut c = Raw::connect(&f.path);
    c.negotiate(false);
    let cases: &[(&str, &str)] = &[
        (
            r#"{"execute": "add", "arguments": {"b": 1}, "id": 1}"#,
            "Parameter 'a' is missing",
        ),
        (
            r#"{"execute": "add", "arguments": {"a": "1", "b": 1}, "id": 1}"#,
            "Invalid parameter type for 'a', expected: integer",
        ),
        (
            r#"{"execute": "add", "arguments": {"a": 1, "b": -1}, "id": 1}"#,
            "Parameter 'b' expects uint32_t",
        ),
        (
            r#"{"execute": "add", "arguments": {"a": 1, "b": 4294967296}, "id": 1}"#,
            "Parameter 'b' expects uint32_t",
        ),
        (
            r#"{"execute": "add", "arguments": {"a": 1, "b": 2.0}, "id": 1}"#,
            "Parameter 'b' expects uint64",
        ),
        (
            r#"{"execute": "add", "arguments": {"a": 1, "b": 1, "c": 1}, "id": 1}"#,
            "Parameter 'c' is unexpected",
        ),
        (
            r#"{"execute": "add", "arguments": [1, 2], "id": 1}"#,
            "QMP input member 'arguments' must be an object",
        ),
        (
            r#"{"execute": "query-version", "arguments": {"x": 1}, "id": 1}"#,
            "Parameter 'x' is unexpected",
        ),
    ];
    for (req, desc) in cases {
        c.send(req.as_bytes());
        let v = c.json();
        assert_eq!(v["error"]["class"], "GenericError", "{req}");
        assert_eq!(v["error"]["desc"], *desc, "{req}");
        assert_eq!(v["id"], 1, "{req}: {v}");
    }
    c.send(b"[1]");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#
    );
}

#[test]
fn events_reach_every_negotiated_client_with_timestamps() {
    let f = fixture(ServerConfig::default());
    let mut a = Raw::connect(&f.path);
    let mut b = Raw::connect(&f.path);
    let mut late = Raw::connect(&f.path);
    a.negotiate(false);
    b.negotiate(true);
    let _greeting = late.line();
    wait_until("two subscribers", || f.server.events().subscribers() == 2);

    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    f.server.events().emit("STOP", None);
    // An event fired from inside a command goes out before that command's reply, as in QEMU.
    a.send(b"{\"execute\": \"fire\", \"arguments\": {\"name\": \"MIGRATION\", \"data\": {\"status\": \"active\"}}, \"id\": 9}");
    let stop_a = a.json();
    let mig_a = a.json();
    assert_eq!(a.line(), r#"{"return": {}, "id": 9}"#);
    let stop_b = b.json();
    let mig_b = b.json();
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    for ev in [&stop_a, &stop_b] {
        assert_eq!(ev["event"], "STOP");
        assert!(ev.get("data").is_none(), "{ev}");
    }
    for ev in [&mig_a, &mig_b] {
        assert_eq!(ev["event"], "MIGRATION");
        assert_eq!(ev["data"], json!({"status": "active"}));
    }
    for ev in [&stop_a, &stop_b, &mig_a, &mig_b] {
        let secs = ev["timestamp"]["seconds"].as_u64().unwrap();
        let micros = ev["timestamp"]["microseconds"].as_u64().unwrap();
        assert!(micros < 1_000_000);
        let t = Duration::from_secs(secs) + Duration::from_micros(micros);
        assert!(
            t + Duration::from_micros(1) >= before && t <= after + Duration::from_micros(1),
            "{ev}"
        );
    }
    // The raw layout is QEMU's: timestamp, event, data.
    f.server.events().emit("RESUME", Some(json!({"x": "é"})));
    let line = b.line();
    assert!(line.starts_with(r#"{"timestamp": {"seconds": "#), "{line}");
    assert!(
        line.ends_with(r#", "event": "RESUME", "data": {"x": "\u00E9"}}"#),
        "{line}"
    );

    // The client still negotiating saw none of it.
    late.send(b"{\"execute\": \"qmp_capabilities\"}");
    assert_eq!(late.line(), r#"{"return": {}}"#);
}

#[test]
fn garbage_then_a_control_character_then_a_command() {
    let f = fixture(ServerConfig::default());
    let mut c = Raw::connect(&f.path);
    c.negotiate(false);
    c.send(b"{\"execute\": [1, @#$ {{{{ \"unterminated");
    c.send(b"\x04");
    c.send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": \"back\"}, \"id\": \"r\"}");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '@'"}}"#
    );
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\u0004'"}}"#
    );
    assert_eq!(c.line(), r#"{"return": "back", "id": "r"}"#);
    // 0xFF works the same way, for clients written for old QEMUs.
    c.send(b"[[[\"x\", \xff{\"execute\": \"echo\", \"arguments\": {\"v\": 2}}");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#
    );
    assert_eq!(c.line(), r#"{"return": 2}"#);
    c.send(b"{\"a\" 1}{\"execute\": \"echo\", \"arguments\": {\"v\": 3}}");
    assert_eq!(
        c.line(),
        r#"{"error": {"class": "GenericError", "desc": "JSON parse error, missing : in object pair"}}"#
    );
    assert_eq!(c.line(), r#"{"return": 3}"#);
}

#[test]
fn a_client_that_vanishes_does_not_disturb_the_others() {
    let f = fixture(ServerConfig::default());
    let mut steady = Raw::connect(&f.path);
    steady.negotiate(false);
    {
        // Half a command, then gone.
        let mut gone = Raw::connect(&f.path);
        gone.negotiate(false);
        gone.send(b"{\"execute\": \"echo\", \"argu");
        gone.writer.shutdown(std::net::Shutdown::Both).unwrap();
    }
    {
        // A command whose reply nobody reads.
        let mut rude = Raw::connect(&f.path);
        rude.negotiate(false);
        rude.send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": 1}}");
    }
    wait_until("the vanished clients to be dropped", || {
        f.server.connection_count() == 1
    });
    f.server.events().emit("STOP", None);
    assert_eq!(steady.json()["event"], "STOP");
    steady.send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": true}}");
    assert_eq!(steady.line(), r#"{"return": true}"#);
    assert_eq!(f.server.events().subscribers(), 1);
}

#[test]
fn clients_beyond_the_cap_are_told_and_closed_and_a_freed_place_is_taken_again() {
    let f = fixture(ServerConfig {
        max_clients: 3,
        ..ServerConfig::default()
    });
    let mut served: Vec<Raw> = (0..3)
        .map(|_| {
            let mut c = Raw::connect(&f.path);
            c.negotiate(false);
            c
        })
        .collect();
    // Issue 14: without a cap every client took two threads and three descriptors, until
    // new ones got no greeting at all.
    let mut extra = Raw::connect(&f.path);
    assert_eq!(
        extra.json(),
        json!({"error": {"class": "GenericError",
            "desc": "Too many monitor clients: at most 3 are served at once"}})
    );
    extra.expect_eof();
    assert_eq!(f.server.connection_count(), 3);
    // The served ones carry on.
    served[0].send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": 7}}");
    assert_eq!(served[0].line(), r#"{"return": 7}"#);
    // One leaves: its place is free again.
    let gone = served.pop().unwrap();
    gone.writer.shutdown(std::net::Shutdown::Both).unwrap();
    wait_until("the departed client to be dropped", || {
        f.server.connection_count() == 2
    });
    let mut next = Raw::connect(&f.path);
    next.negotiate(false);
}

#[test]
fn a_client_that_stops_reading_is_dropped_without_blocking_events() {
    let config = ServerConfig {
        max_pending_bytes: 512 << 10,
        ..ServerConfig::default()
    };
    let f = fixture(config);
    let mut slow = Raw::connect(&f.path);
    slow.negotiate(false);
    let mut reader = Raw::connect(&f.path);
    reader.negotiate(false);
    wait_until("subscribers", || f.server.events().subscribers() == 2);

    // Far more than the socket buffer plus the queue limit; `slow` never reads.
    let padding = "x".repeat(4096);
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen_by_reader = seen.clone();
    let started = Instant::now();
    let drain = std::thread::spawn(move || {
        for n in 0..2000 {
            let ev = reader.json();
            assert_eq!(ev["data"]["seq"], n);
            seen_by_reader.store(n + 1, Ordering::SeqCst);
        }
        reader
    });
    for seq in 0..2000usize {
        f.server
            .events()
            .emit("PING", Some(json!({"seq": seq, "pad": padding})));
        if seq % 32 == 31 {
            // Let the reading client keep up, so only the silent one falls behind.
            wait_until("the reader", || seen.load(Ordering::SeqCst) + 32 >= seq);
        }
    }
    let mut reader = drain.join().unwrap();
    assert!(started.elapsed() < Duration::from_secs(30));
    wait_until("the silent client to be dropped", || {
        f.server.connection_count() == 1
    });
    // It got some events, then EOF; never a partial message.
    let mut got = 0;
    loop {
        let mut buf = Vec::new();
        let n = slow.reader.read_until(b'\n', &mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        assert!(buf.ends_with(b"}\r\n"), "partial message");
        got += 1;
    }
    assert!(got < 2000, "the silent client should have been cut off");
    reader.send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": 0}}");
    assert_eq!(reader.line(), r#"{"return": 0}"#);
}

#[test]
fn out_of_band_execution() {
    let f = fixture(ServerConfig::default());
    let mut plain = Raw::connect(&f.path);
    plain.negotiate(false);
    plain.send(b"{\"exec-oob\": \"pause\", \"id\": 1}");
    assert_eq!(
        plain.line(),
        r#"{"error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}, "id": 1}"#
    );
    let mut oob = Raw::connect(&f.path);
    oob.negotiate(true);
    oob.send(b"{\"execute\": \"echo\", \"arguments\": {\"v\": 1}, \"id\": \"a\"}{\"exec-oob\": \"pause\", \"id\": \"b\"}");
    // Commands run in the order received, so the OOB reply comes second here.
    assert_eq!(oob.line(), r#"{"return": 1, "id": "a"}"#);
    assert_eq!(oob.line(), r#"{"return": {}, "id": "b"}"#);
    oob.send(b"{\"exec-oob\": \"echo\", \"arguments\": {\"v\": 1}, \"id\": \"c\"}");
    assert_eq!(
        oob.line(),
        r#"{"error": {"class": "GenericError", "desc": "The command echo does not support OOB"}, "id": "c"}"#
    );
}

#[test]
fn quit_replies_then_closes_everything() {
    let f = fixture(ServerConfig::default());
    let mut c = Raw::connect(&f.path);
    c.negotiate(false);
    let mut other = Raw::connect(&f.path);
    other.negotiate(false);
    c.send(b"{\"execute\": \"quit\", \"id\": \"q\"}");
    assert_eq!(c.line(), r#"{"return": {}, "id": "q"}"#);
    c.expect_eof();
    other.expect_eof();
    wait_until("the hook", || f.quitted.load(Ordering::SeqCst));
    assert_eq!(f.server.connection_count(), 0);
    assert!(!f.path.exists(), "socket file left behind");
    assert!(UnixStream::connect(&f.path).is_err());
}

#[test]
fn tcp_listener() {
    let f = fixture(ServerConfig::default());
    let addr = f.server.listen_tcp("127.0.0.1:0").unwrap();
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("{\"QMP\": ") && line.ends_with("\r\n"),
        "{line}"
    );
    w.write_all(b"{\"execute\": \"qmp_capabilities\"}{\"execute\": \"add\", \"arguments\": {\"a\": 40, \"b\": 2}}").unwrap();
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\": {}}\r\n");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "{\"return\": 42}\r\n");
}

/// Not a test by itself: the server process that `quit_exits_the_process` starts (it runs
/// this test binary again with `--ignored`).
#[test]
#[ignore = "helper process for quit_exits_the_process"]
fn quit_child_process() {
    let Ok(path) = std::env::var("QMP_QUIT_CHILD_SOCKET") else {
        return;
    };
    let cell: Arc<OnceLock<Server>> = Arc::new(OnceLock::new());
    let mut table = CommandTable::new();
    let c = cell.clone();
    table.register("quit", move |a: Args| {
        a.finish()?;
        let c = c.clone();
        Ok::<_, QmpError>(Reply::empty().after_flush(move || {
            if let Some(s) = c.get() {
                s.close(Duration::from_secs(5));
            }
            std::process::exit(0);
        }))
    });
    let server = Server::new(Arc::new(table));
    let _ = cell.set(server.clone());
    server
        .start(&format!("unix:{path},server=on,wait=off").parse().unwrap())
        .unwrap();
    std::thread::sleep(Duration::from_secs(60));
    std::process::exit(3);
}

#[test]
fn quit_exits_the_process() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("child.sock");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "quit_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("QMP_QUIT_CHILD_SOCKET", &path)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the child's socket", || path.exists());
    let mut c = Raw::connect(&path);
    c.negotiate(false);
    c.send(b"{\"execute\": \"quit\"}\n");
    assert_eq!(c.line(), r#"{"return": {}}"#);
    c.expect_eof();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "child did not exit");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(0));
    assert!(!path.exists());
}

#[test]
fn handles_are_shareable_across_threads() {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<Server>();
    shareable::<EventSink>();
}

#[test]
fn wait_on_blocks_until_the_first_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wait.sock");
    let server = Server::new(Arc::new(CommandTable::new()));
    let opt: qmp::QmpOption = format!("unix:{},server=on", path.display())
        .parse()
        .unwrap();
    assert!(opt.wait);
    let started = Arc::new(AtomicBool::new(false));
    let (s, flag) = (server.clone(), started.clone());
    let t = std::thread::spawn(move || {
        s.start(&opt).unwrap();
        flag.store(true, Ordering::SeqCst);
    });
    wait_until("the socket", || path.exists());
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !started.load(Ordering::SeqCst),
        "start returned before any client connected"
    );
    let mut first = Raw::connect(&path);
    first.negotiate(false);
    t.join().unwrap();
    assert!(started.load(Ordering::SeqCst));
    // Later clients are accepted in the background.
    let mut second = Raw::connect(&path);
    second.negotiate(false);
    server.close(Duration::from_secs(5));
    first.expect_eof();
    second.expect_eof();
}

#[test]
fn client_mode_connects_out() {
    // `-qmp unix:PATH` without `server`: the monitor connects to a listening client.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("client-mode.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = Server::new(Arc::new(CommandTable::new()));
    server
        .start(&format!("unix:{}", path.display()).parse().unwrap())
        .unwrap();
    let (stream, _) = listener.accept().unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut c = Raw {
        writer: stream.try_clone().unwrap(),
        reader: BufReader::new(stream),
    };
    c.negotiate(false);
    assert_eq!(server.connection_count(), 1);
}

/// A client may connect, negotiate and `quit` while `start` is still setting up the listener
/// it came in through (the monitor thread was preempted, as happens on a loaded machine). The
/// `quit` must win cleanly: `start` still reports success — the listener did start, and was
/// then closed by the client — instead of an error that makes the process exit with failure.
#[test]
fn quit_racing_listener_start_is_not_an_error() {
    for round in 0..100 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server_cell: Arc<OnceLock<Server>> = Arc::new(OnceLock::new());
        let mut table = CommandTable::new();
        let cell = server_cell.clone();
        table.register("quit", move |a: Args| {
            a.finish()?;
            let cell = cell.clone();
            Ok::<_, QmpError>(Reply::empty().after_flush(move || {
                if let Some(s) = cell.get() {
                    s.close(Duration::from_secs(5));
                }
            }))
        });
        let server = Server::with_config(Arc::new(table), ServerConfig::default());
        let _ = server_cell.set(server.clone());
        let client_path = path.clone();
        let client = std::thread::spawn(move || loop {
            if let Ok(s) = UnixStream::connect(&client_path) {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                w.write_all(b"{\"execute\":\"qmp_capabilities\"}{\"execute\":\"quit\"}")
                    .unwrap();
                let mut rest = Vec::new();
                let _ = r.read_to_end(&mut rest);
                return;
            }
            std::thread::yield_now();
        });
        let started = server.start(
            &format!("unix:{},server=on,wait=off", path.display())
                .parse()
                .unwrap(),
        );
        client.join().unwrap();
        assert!(started.is_ok(), "round {round}: start failed: {started:?}");
    }
}
