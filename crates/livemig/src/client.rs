//! A small blocking QMP client, for `demo` and `bench`, which drive two `livemig vm`
//! processes the way a management tool would.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A negotiated QMP connection.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for replies.
    pub events: Vec<Value>,
}

impl Client {
    /// Connects (retrying until `timeout` while the process starts) and negotiates.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Client, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!("cannot connect to {}: {e}", path.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut c = Client {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        c.read()?;
        c.call("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("the VM closed its QMP connection".into());
            }
            if !line.trim().is_empty() {
                return serde_json::from_str(line.trim()).map_err(|e| e.to_string());
            }
        }
    }

    /// Runs a command; its `return` value, or its error `desc` as the error.
    pub fn call(&mut self, cmd: &str, args: Value) -> Result<Value, String> {
        let msg = json!({"execute": cmd, "arguments": args});
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| e.to_string())?;
        loop {
            let m = self.read()?;
            if m.get("event").is_some() {
                self.events.push(m);
                continue;
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            let desc = m
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("malformed reply");
            return Err(format!("{cmd}: {desc}"));
        }
    }
}
